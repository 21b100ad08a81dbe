"""`python -m train.report RUN_DIR`: plots and a Markdown summary of one run, in <run_dir>/report/.

Reads <run_dir>/metrics.jsonl (per-step records and events) and <run_dir>/eval/ (train.eval's results, written at
each stage end or by `python -m train.eval all RUN_DIR`). Writes loss.png (training loss by stage, switches
marked), perplexity.png (held-out perplexity per language after each stage), passkey.png (accuracy over
length x depth, per stage and inference mode), position_loss.png, expert_load.png (MoE runs: fraction of routed
tokens per layer and expert at each stage's last step), throughput.png and report.md.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from train.eval.outputs import fmt, md_table, mean, read_results  # noqa: E402

COLORS = plt.rcParams["axes.prop_cycle"].by_key()["color"]


# what the report reads of a step record (the loop writes every one of them) and of the events it uses
_STEP_KEYS = {"stage": "a string", "step": "an integer", "global_step": "an integer", "tokens": "an integer",
             "lm_loss": "a number or null", "seq_len": "an integer", "rope_theta": "a number",
             "tokens_per_s": "a number or null"}  # a non-finite value is logged as null (a skipped step): a gap
_EVENT_KEYS = {"stage": "a string", "global_step": "an integer"}
_READ_EVENTS = ("eval", "resume", "rollback", "stage_start")
_TYPES = {"a string": str, "an integer": int, "a number": (int, float), "a number or null": (int, float, type(None))}


def _unusable(r: Any) -> Optional[str]:
    """Why the report cannot use a parsed line of metrics.jsonl, or None if it can."""
    if not isinstance(r, dict):
        return f"a JSON {type(r).__name__}, not a record"
    keys = _STEP_KEYS if "event" not in r else _EVENT_KEYS if r["event"] in _READ_EVENTS else {}
    for key, kind in keys.items():
        if key not in r:
            return f"{'a step' if 'event' not in r else repr(r['event'])} record without {key!r}"
        if not isinstance(r[key], _TYPES[kind]) or isinstance(r[key], bool):
            return f"{key!r} is {r[key]!r}, not {kind}"
    return None


def read_metrics(run_dir: Path) -> List[Dict[str, Any]]:
    """Every record of metrics.jsonl that still stands: a resume or a rollback goes back to a checkpoint, so the
    steps logged past it are dropped (a rolled-back spike's step is never logged again: its batch is skipped), and
    a step logged twice keeps its later record. A line that is not JSON (cut short by a full disk or a kill
    mid-write, with the relaunch appending after it), or a record the report cannot read (not an object, a key it
    reads missing or of another type), is skipped, with a warning naming it. The loop's held-out evaluations
    (`eval` events) are the steps' kind: logged again after a resume or rollback, so they go the same way and come
    after the other events, in global-step order."""
    out: List[Dict[str, Any]] = []
    path = Path(run_dir) / "metrics.jsonl"
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if line.strip():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                print(f"warning: {path}:{n}: not a JSON record (cut short?); skipped", file=sys.stderr)
                continue
            why = _unusable(r)
            if why:
                print(f"warning: {path}:{n}: {why}; skipped", file=sys.stderr)
            else:
                out.append(r)
    steps: Dict[Tuple[str, int], Dict[str, Any]] = {}
    evals: Dict[Tuple[str, int], Dict[str, Any]] = {}
    events = []
    for r in out:
        if "event" not in r:
            steps[(r["stage"], r["step"])] = r
            continue
        if r["event"] == "eval":
            evals[(r["stage"], r["global_step"])] = r
            continue
        events.append(r)
        if r["event"] in ("resume", "rollback"):
            steps = {k: v for k, v in steps.items() if v["global_step"] <= r["global_step"]}
            evals = {k: v for k, v in evals.items() if v["global_step"] <= r["global_step"]}
    return (sorted(steps.values(), key=lambda r: r["global_step"]) + events
            + sorted(evals.values(), key=lambda r: r["global_step"]))


def step_records(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per-step records in global-step order."""
    return [r for r in records if "event" not in r]


def stage_order(records: List[Dict[str, Any]]) -> List[str]:
    """Stages in the order they ran."""
    order: List[str] = []
    for r in step_records(records):
        if r["stage"] not in order:
            order.append(r["stage"])
    return order


def stage_switches(records: List[Dict[str, Any]]) -> List[Tuple[int, str]]:
    """(global step after which the stage starts, stage) for every stage but the first: from the stage_start
    events (a resumed one starts `resumed_at_step` steps earlier), else from the first step record of each stage,
    which is the stage's first step only at log_every 1."""
    order = stage_order(records)
    starts: Dict[str, int] = {}
    for e in records:
        if e.get("event") == "stage_start" and e["stage"] in order and e["stage"] not in starts:
            starts[e["stage"]] = e["global_step"] - (e.get("resumed_at_step") or 0)
    steps = step_records(records)
    firsts = {b["stage"]: b["global_step"] - 1 for a, b in zip(steps, steps[1:]) if a["stage"] != b["stage"]}
    return [(starts.get(s, firsts.get(s)), s) for s in order[1:] if s in starts or s in firsts]


def _stage_colors(order: List[str]) -> Dict[str, str]:
    return {s: COLORS[i % len(COLORS)] for i, s in enumerate(order)}


def _plot_by_stage(ax: Any, records: List[Dict[str, Any]], key: str) -> List[Dict[str, Any]]:
    """One line per stage of step records' `key` against global step; returns the step records."""
    steps, order = step_records(records), stage_order(records)
    colors = _stage_colors(order)
    for s in order:
        rs = [r for r in steps if r["stage"] == s]
        ax.plot([r["global_step"] for r in rs], [r[key] for r in rs], color=colors[s], label=s,
                marker="." if len(rs) < 3 else None)  # one logged step draws no line
    return steps


def _save(fig: Any, path: Path, tight: bool = True) -> Path:
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_loss(records: List[Dict[str, Any]], path: Path) -> Path:
    """Training loss against global step, one colour per stage, a dashed line at every switch."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    _plot_by_stage(ax, records, "lm_loss")
    evals = [r for r in records if r.get("event") == "eval" and r.get("heldout_ppl_geomean")]
    if evals:
        ax.scatter([r["global_step"] for r in evals], [math.log(r["heldout_ppl_geomean"]) for r in evals],
                   color="black", marker="x", zorder=3, label="held-out (log ppl, geomean over languages)")
    starts = {r["stage"]: r for r in records if r.get("event") == "stage_start"}
    for step, s in stage_switches(records):
        ax.axvline(step + 0.5, color="grey", linestyle="--", linewidth=1)
        info = starts.get(s, {})
        ax.text(step + 0.5, ax.get_ylim()[1], f" {s}\n seq {info.get('seq_len', '?')}, θ {info.get('rope_theta', 0):g}",
                va="top", fontsize=8)
    ax.set_xlabel("global step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("Training loss by stage")
    ax.legend(fontsize=8, loc="lower left")
    return _save(fig, path)


def stage_perplexities(records: List[Dict[str, Any]],
                       results: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, float]]:
    """{stage: {language: perplexity}} after each stage, from one measure for every stage: train.eval's ppl
    (eval/<stage>/ppl.json) where it covers as many stages as the loop's held-out evaluations, else the loop's last
    eval of each stage. The two cut different amounts of text, so a mix of them would show changes no weights made."""
    suite: Dict[str, Dict[str, float]] = {}
    loop: Dict[str, Dict[str, float]] = {}
    for s in stage_order(records):
        r = results.get(s, {}).get("ppl")
        if r:
            suite[s] = {lang: v["all"] for lang, v in r["by_language"].items()}
        evals = [e for e in records if e.get("event") == "eval" and e["stage"] == s and e.get("heldout_ppl")]
        if evals:
            loop[s] = dict(evals[-1]["heldout_ppl"])
    return suite if len(suite) >= len(loop) else loop


def plot_perplexity(ppl: Dict[str, Dict[str, float]], path: Path) -> Path:
    """Held-out perplexity per language after each stage (bars; a sorted profile when there are many languages)."""
    stages = list(ppl)
    languages = sorted({lang for v in ppl.values() for lang in v})
    first = ppl[stages[0]]
    languages.sort(key=lambda lang: first.get(lang, math.inf))
    colors = _stage_colors(stages)
    fig, ax = plt.subplots(figsize=(max(6, min(16, 0.35 * len(languages) + 3)), 4.5))
    if len(languages) <= 40:
        width = 0.8 / len(stages)
        x = np.arange(len(languages))
        for i, s in enumerate(stages):
            ax.bar(x + i * width, [ppl[s].get(lang, np.nan) for lang in languages], width, label=s, color=colors[s])
        ax.set_xticks(x + 0.4 - width / 2, languages, rotation=90, fontsize=7)
    else:  # hundreds of UDHR languages: one line per stage over the languages sorted by the first stage
        for s in stages:
            ax.plot([ppl[s].get(lang, np.nan) for lang in languages], label=s, color=colors[s], linewidth=1)
        ax.set_xlabel(f"{len(languages)} languages, sorted by perplexity after {stages[0]}")
    ax.set_yscale("log")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("Held-out perplexity per language (UDHR art. 26-30 + held-out Bible book)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_passkey(results: Dict[str, Dict[str, Any]], order: List[str], path: Path) -> Optional[Path]:
    """Heatmaps of passkey accuracy (rows: context length, columns: needle depth), one per stage and mode."""
    panels = [(s, m, g) for s in order for m, g in results.get(s, {}).get("passkey", {}).get("modes", {}).items()]
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols + 1, 2.8 * rows + 0.5), squeeze=False,
                             layout="constrained")
    cmap = plt.get_cmap("viridis").copy()
    cmap.set_bad("lightgrey")  # not measured: beyond the RoPE tables or too short for the prompt
    for ax, (s, m, g) in zip(axes.flat, panels):
        acc = np.array([[np.nan if a is None else a for a in row] for row in g["accuracy"]], dtype=float)
        im = ax.imshow(acc, vmin=0, vmax=1, cmap=cmap, aspect="auto")
        ax.set_yticks(range(len(g["lengths"])), g["lengths"], fontsize=7)
        ax.set_xticks(range(len(g["depths"])), [f"{d:g}" for d in g["depths"]], fontsize=7)
        for (i, j), a in np.ndenumerate(acc):
            if not np.isnan(a):
                ax.text(j, i, f"{a:.2f}", ha="center", va="center", fontsize=7, color="white" if a < 0.5 else "black")
        ax.set_title(f"{s} — {m}", fontsize=9)
    for ax in axes[-1]:
        ax.set_xlabel("needle depth", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("context length (tokens)", fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.colorbar(im, ax=axes, shrink=0.8, label="passkey accuracy")
    return _save(fig, path, tight=False)


def plot_position_loss(results: Dict[str, Dict[str, Any]], order: List[str], path: Path) -> Optional[Path]:
    """Loss by token position (moving average), one panel per evaluated length: curves of one length share
    their windows of text, so only they compare (4x General: the stages; 4x Long Context: the modes)."""
    curves = [(s, c) for s in order for c in results.get(s, {}).get("position_loss", {}).get("curves", [])
              if c.get("curve")]
    if not curves:
        return None
    lengths = sorted({c["length"] for _, c in curves})
    fig, axes = plt.subplots(1, len(lengths), figsize=(6 * len(lengths), 4.2), squeeze=False, layout="constrained")
    styles = {"plain": "-", "yarn": "--", "dca": ":"}
    colors = _stage_colors(order)
    for ax, length in zip(axes[0], lengths):
        for s, c in curves:
            if c["length"] != length:
                continue
            y = np.asarray(c["curve"])
            k = max(1, len(y) // 32)  # a few windows leave per-position losses noisy
            smooth = np.convolve(y, np.ones(k) / k, mode="valid")
            ax.plot(np.arange(len(smooth)) + k // 2, smooth, styles.get(c["mode"], "-"), color=colors[s],
                    label=f"{s} {c['mode']}", linewidth=1.2)
        for s in order:
            r = results.get(s, {}).get("position_loss")
            if r and r["trained_len"] < length:
                ax.axvline(r["trained_len"], color=colors[s], linewidth=0.8, alpha=0.6)
        ax.set_title(f"windows of {length} tokens", fontsize=10)
        ax.set_xlabel("token position (vertical lines: trained lengths)")
        ax.legend(fontsize=7, ncol=2)
    axes[0][0].set_ylabel("mean held-out loss (nats/token)")
    fig.suptitle("Held-out loss by position")
    return _save(fig, path, tight=False)


def plot_expert_load(records: List[Dict[str, Any]], path: Path) -> Optional[Path]:
    """MoE: fraction of routed tokens per (layer, expert) at each stage's last logged step."""
    last: Dict[str, Dict[str, Any]] = {}
    for r in step_records(records):
        if r.get("expert_load"):
            last[r["stage"]] = r
    if not last:
        return None
    fig, axes = plt.subplots(1, len(last), figsize=(4.5 * len(last), 3.5), squeeze=False)
    for ax, (s, r) in zip(axes[0], last.items()):
        load = np.asarray(r["expert_load"], dtype=float)  # (layers, experts)
        im = ax.imshow(load * load.shape[1], cmap="magma", aspect="auto", vmin=0)  # 1 = perfectly uniform
        ax.set_title(f"{s}, step {r['step']}", fontsize=9)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, label="load x experts (1 = uniform)")
    return _save(fig, path)


def plot_throughput(records: List[Dict[str, Any]], path: Path) -> Path:
    """Tokens per second (and MFU when logged) against global step, per stage."""
    fig, ax = plt.subplots(figsize=(8, 4))
    steps = _plot_by_stage(ax, records, "tokens_per_s")
    ax.set_xlabel("global step")
    ax.set_ylabel("tokens / s")
    if any(r.get("mfu") for r in steps):
        ax2 = ax.twinx()
        ax2.plot([r["global_step"] for r in steps], [100 * (r.get("mfu") or 0) for r in steps], color="black",
                 linewidth=0.6, alpha=0.5)
        ax2.set_ylabel("MFU (%)")
    for step, _ in stage_switches(records):
        ax.axvline(step + 0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_title("Throughput")
    ax.legend(fontsize=8)
    return _save(fig, path)


def stage_table(records: List[Dict[str, Any]], ppl: Dict[str, Dict[str, float]]) -> List[List[Any]]:
    """Per stage: steps, tokens (the stage's own), seq_len, RoPE base, first and last loss, held-out geomean ppl,
    median tokens/s."""
    rows = []
    before = 0  # tokens of the stages before (a run's `tokens` counts from its start)
    for s in stage_order(records):
        rs = [r for r in step_records(records) if r["stage"] == s]
        vals = list(ppl.get(s, {}).values())
        geo = math.exp(mean([math.log(v) for v in vals])) if vals else None
        tokens, before = rs[-1]["tokens"] - before, rs[-1]["tokens"]
        speeds = [r["tokens_per_s"] for r in rs if r["tokens_per_s"] is not None]  # null: a skipped step
        rows.append([s, rs[-1]["step"], tokens, rs[-1]["seq_len"], f"{rs[-1]['rope_theta']:g}",
                     rs[0]["lm_loss"], rs[-1]["lm_loss"], geo, float(np.median(speeds)) if speeds else None])
    return rows


def report(run_dir: Path, out_dir: Optional[Path] = None) -> Dict[str, Path]:
    """Write the plots and report.md; returns {name: path} of what was written."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir else run_dir / "report"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file by that name, or above it: named (exit 2), and that file left as it is
        raise ValueError(f"{out_dir}: cannot be the report folder ({e.strerror}); nothing was written") from None
    records = read_metrics(run_dir)
    if not step_records(records):
        raise ValueError(f"{run_dir}/metrics.jsonl has no step records yet")
    results = read_results(run_dir / "eval") if (run_dir / "eval").is_dir() else {}
    order = stage_order(records)
    ppl = stage_perplexities(records, results)
    written: Dict[str, Path] = {"loss": plot_loss(records, out_dir / "loss.png"),
                                "throughput": plot_throughput(records, out_dir / "throughput.png")}
    if ppl:
        written["perplexity"] = plot_perplexity(ppl, out_dir / "perplexity.png")
    for name, fn in (("passkey", plot_passkey), ("position_loss", plot_position_loss)):
        p = fn(results, order, out_dir / f"{name}.png")
        if p:
            written[name] = p
    p = plot_expert_load(records, out_dir / "expert_load.png")
    if p:
        written["expert_load"] = p

    cfg = OmegaConf.load(run_dir / "config.yaml") if (run_dir / "config.yaml").exists() else None
    model = f"`{cfg.model.name}`" if cfg is not None else "?"
    md = [f"# Run report: `{run_dir.name}`\n", f"Model {model}; run directory `{run_dir}`.\n",
          "## Stages\n", md_table(["stage", "steps", "tokens", "seq_len", "RoPE θ", "first loss", "last loss",
                                   "held-out ppl (geomean)", "tokens/s (median)"], stage_table(records, ppl)),
          "\n![loss](loss.png)\n"]
    curriculum = run_dir / "eval" / "curriculum.md"
    if curriculum.exists():
        md += ["## Curriculum effect\n", curriculum.read_text()]
    reasoning = [[s, fmt(results[s]["reasoning"]["accuracy"]),
                  *[fmt(t["accuracy"]) for t in results[s]["reasoning"]["tasks"].values()]]
                 for s in order if "reasoning" in results.get(s, {})]
    if reasoning:
        tasks = list(results[reasoning[0][0]]["reasoning"]["tasks"])
        md += ["## Reasoning (greedy exact match on unseen problems)\n", md_table(["stage", "mean", *tasks], reasoning)]
    for name, title in (("perplexity", "Held-out perplexity per language"), ("passkey", "Passkey retrieval"),
                        ("position_loss", "Loss by position"), ("expert_load", "Expert load (MoE)"),
                        ("throughput", "Throughput")):
        if name in written:
            md.append(f"## {title}\n\n![{name}]({written[name].name})\n")
    if (run_dir / "eval" / "summary.md").exists():
        md.append("Every evaluation table: [eval/summary.md](../eval/summary.md).\n")
    written["report"] = out_dir / "report.md"
    written["report"].write_text("\n".join(md))
    return written


def main(argv: Optional[List[str]] = None) -> int:
    """Command line: python -m train.report RUN_DIR [--out DIR]."""
    p = argparse.ArgumentParser(prog="python -m train.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, default=None, help="default: <run_dir>/report")
    args = p.parse_args(argv)
    if not (args.run_dir / "metrics.jsonl").exists():
        print(f"error: {args.run_dir}/metrics.jsonl not found", file=sys.stderr)
        return 2
    try:
        written = report(args.run_dir, args.out)
    except ValueError as e:  # no step records yet, or an --out that cannot be a folder
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(str(p) for p in written.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
