"""All evaluations of one stage's weights, their grids, and the run-level summary.

Lengths follow from two numbers, the General stage's trained length L_G and the evaluated stage's L:
passkey in plain RoPE at {L_G, 2 L_G, 4 L_G, L, 2 L, 4 L}, with YaRN and DCA at the lengths beyond L; loss by
position in plain RoPE out to 4 L_G, and out to 4 L in plain, YaRN and DCA. Training calls
`stage_end_suite` on rank 0 after each stage's HF export (eval.stage_end_suite).
"""
from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from data.tokenizer import Tokenizer
from models.qwen3 import Qwen3ForCausalLM
from train.eval import curriculum, passkey, position_loss, ppl, reasoning
from train.eval.extend import MODES
from train.eval.outputs import read_results, write_result
from train.eval.target import EvalTarget, eval_dtype, load_model

EVALUATIONS = ("ppl", "reasoning", "passkey", "position_loss")


@dataclass
class Sizes:
    """How much each evaluation does; the defaults keep a tiny CPU model's whole suite under a minute."""

    ppl_max_tokens: int = 512  # held-out tokens per (source, language)
    ppl_max_languages: int = 0  # the first N held-out languages (sorted), as the loop's eval.max_languages; 0 = all
    tasks: Tuple[str, ...] = reasoning.TASKS
    problems: int = 4  # fresh problems per reasoning task
    max_new_tokens: int = 128  # thinking + answer budget per problem
    depths: Tuple[float, ...] = (0.0, 0.5, 1.0)  # passkey needle depths
    trials: int = 2  # passkey keys per (length, depth)
    windows: int = 2  # loss-by-position windows per length
    batch_size: int = 8  # held-out windows / reasoning prompts per forward
    long_batch_size: int = 4  # passkey prompts / loss-by-position windows per forward (long sequences)
    modes: Tuple[str, ...] = MODES
    dca_local_size: int = 0  # 0: the trained length / 8
    lengths: List[int] = field(default_factory=list)  # explicit passkey / position lengths instead of the plan


def plan(first_len: int, trained_len: int, modes: Sequence[str] = MODES,
         lengths: Sequence[int] = ()) -> Tuple[Dict[str, List[int]], List[Tuple[str, int]]]:
    """Passkey grids {mode: lengths} and loss-by-position checks [(mode, length)] for one stage."""
    if lengths:
        grid = sorted(set(lengths))
        return ({m: grid if m == "plain" else [x for x in grid if x > trained_len] for m in modes},
                [(m, max(grid)) for m in modes])
    plain = sorted({first_len, 2 * first_len, 4 * first_len, trained_len, 2 * trained_len, 4 * trained_len})
    grids = {m: plain if m == "plain" else [x for x in plain if x > trained_len] for m in modes}
    checks = [("plain", 4 * first_len)] if "plain" in modes else []
    checks += [(m, 4 * trained_len) for m in modes if (m, 4 * trained_len) not in checks]
    return grids, checks


def evaluate_stage(model: Qwen3ForCausalLM, tok: Tokenizer, manifest: Path, stage: str, first_len: int,
                   trained_len: int, out_dir: Path, sizes: Optional[Sizes] = None,
                   which: Sequence[str] = EVALUATIONS) -> Dict[str, Any]:
    """Run the chosen evaluations on one model, write <out_dir>/<evaluation>.{json,md}; returns a summary."""
    sizes = sizes or Sizes()
    grids, checks = plan(first_len, trained_len, sizes.modes, sizes.lengths)
    summary: Dict[str, Any] = {"stage": stage, "trained_len": trained_len}
    if "ppl" in which:
        r = ppl.perplexity(model, manifest, trained_len, sizes.ppl_max_tokens, sizes.batch_size,
                           sizes.ppl_max_languages)
        write_result(out_dir, "ppl", r, ppl.markdown(r, stage))
        summary["heldout_ppl_geomean"] = r["geomean"]["all"]
    if "reasoning" in which:
        r = reasoning.reasoning_accuracy(model, tok, manifest, sizes.tasks, sizes.problems, sizes.max_new_tokens,
                                         sizes.batch_size)
        write_result(out_dir, "reasoning", r, reasoning.markdown(r, stage))
        summary["reasoning_accuracy"] = r["accuracy"]
    if "passkey" in which:
        r = passkey.passkey_modes(model, tok, trained_len, grids, sizes.depths, sizes.trials,
                                  sizes.long_batch_size, sizes.dca_local_size)
        write_result(out_dir, "passkey", r, passkey.markdown(r, stage))
        summary["passkey"] = {m: dict(zip(map(str, g["lengths"]), g["accuracy_by_length"]))
                              for m, g in r["modes"].items()}
    if "position_loss" in which:
        r = position_loss.position_loss_modes(model, manifest, trained_len, checks, sizes.windows,
                                              sizes.long_batch_size, sizes.dca_local_size)
        write_result(out_dir, "position_loss", r, position_loss.markdown(r, stage))
        summary["loss_beyond"] = {f"{c['mode']}@{c['length']}": (c["summary"] or {}).get("loss_beyond")
                                  for c in r["curves"]}
    return summary


def write_summary(eval_dir: Path, order: Sequence[str], seq_lens: Dict[str, int]) -> Path:
    """<eval_dir>/summary.md and curriculum.json: every stage's tables and the curriculum-effect table."""
    results = read_results(eval_dir)
    stages = [s for s in order if s in results]
    parts = ["# Evaluation summary\n"]
    if len(order) >= 2 and stages:
        effect = curriculum.curriculum_effect(results, order, seq_lens)
        write_result(eval_dir, "curriculum", effect, curriculum.markdown(effect))
        parts.append("## Curriculum effect\n\n" + curriculum.markdown(effect))
    # then checkpoints from the middle of a stage (eval/<tag>/), which never stand for "after <stage>"
    mid = sorted(k for k in results if k not in order)
    for s in stages + mid:
        parts.append(f"## {s} (trained at {seq_lens[s]} tokens)\n" if s in seq_lens
                     else f"## {s} (a checkpoint from the middle of a stage)\n")
        for name in EVALUATIONS:
            md = eval_dir / s / f"{name}.md"
            if md.exists():
                parts.append(md.read_text())
    path = Path(eval_dir) / "summary.md"
    path.write_text("\n".join(parts))
    return path


def evaluate(target: EvalTarget, sizes: Optional[Sizes] = None, which: Sequence[str] = EVALUATIONS,
             device: torch.device = torch.device("cpu")) -> Dict[str, Any]:
    """Evaluate every stage of a target, one model in memory at a time; writes the run summary."""
    summaries = {}
    for st in target.stages:
        t0 = time.perf_counter()
        model = load_model(st.path, device, eval_dtype(device))
        summaries[st.name] = evaluate_stage(model, target.tokenizer, target.manifest, st.name, target.first_seq_len,
                                            st.seq_len, target.out_dir / st.name, sizes, which)
        summaries[st.name]["seconds"] = round(time.perf_counter() - t0, 2)
        del model
        gc.collect()
    write_summary(target.out_dir, target.order, target.seq_lens)
    return summaries


def suite_long_batch(cfg: Any, stage: str, device: torch.device) -> Tuple[int, str]:
    """(long sequences per forward, '') for the stage-end suite: Sizes' default where it fits beside training,
    else one; (0, why) where not even one does."""
    for batch in (Sizes.long_batch_size, 1):
        shortfall = suite_memory_shortfall(cfg, stage, device, batch)
        if not shortfall:
            return batch, ""
    return 0, shortfall


def suite_memory_shortfall(cfg: Any, stage: str, device: torch.device, batch: int) -> str:
    """Why the stage-end suite's copy of the model would not fit on `device` beside training ('' if it fits).

    The estimate: the bf16 weights plus a quarter for work buffers, then per token of the suite's longest
    sequences (4x the stage's length, `batch` of them per forward) the K/V of every layer (passkey's generation
    keeps it) and one layer's bf16 activations (4 x hidden + 3 x the MLP width, the top-k experts' for MoE).
    The loss is chunked (no logits row) and DCA's scores come in blocks (models/dca.py). Only CUDA is checked.
    """
    if device.type != "cuda":
        return ""
    from models.params import count_parameters

    m = cfg.model
    first = cfg.curriculum.stages[cfg.curriculum.order[0]].seq_len
    grids, checks = plan(first, cfg.curriculum.stages[stage].seq_len)
    longest = max([x for grid in grids.values() for x in grid] + [length for _, length in checks])
    weights = count_parameters(m).total * 2
    mlp = m.num_experts_per_tok * m.moe_intermediate_size if m.is_moe else m.intermediate_size
    per_token = 2 * m.num_hidden_layers * m.num_key_value_heads * m.head_dim * 2 + (4 * m.hidden_size + 3 * mlp) * 2
    need = int(weights * 1.25) + batch * longest * per_token
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    if need <= free:
        return ""
    return (f"needs ~{need / 2**30:.1f} GiB on {device} for a second copy of the model and {batch} x {longest} "
            f"tokens, {free / 2**30:.1f} GiB free")


def stage_end_suite(cfg: Any, stage: str, manifest: Path, tok: Tokenizer, device: torch.device,
                    long_batch: int) -> Dict[str, Any]:
    """The suite on <run_dir>/hf/<stage>/ at a stage's end (rank 0, sizes from cfg.eval, `long_batch` long
    sequences per forward: `suite_long_batch`); results in <run_dir>/eval/<stage>/."""
    # perplexity over the loop's `eval` windows, so the two records of one step agree (batch_size is the
    # reasoning prompts' too)
    sizes = Sizes(problems=cfg.eval.suite_problems, max_new_tokens=cfg.eval.suite_max_new_tokens,
                  trials=cfg.eval.suite_trials, ppl_max_tokens=cfg.eval.max_tokens_per_language,
                  ppl_max_languages=cfg.eval.max_languages, batch_size=cfg.eval.batch_size, long_batch_size=long_batch)
    run_dir = Path(cfg.run_dir)
    order = list(cfg.curriculum.order)
    seq_lens = {s: int(cfg.curriculum.stages[s].seq_len) for s in order}
    t0 = time.perf_counter()
    model = load_model(run_dir / "hf" / stage, device, eval_dtype(device))
    summary = evaluate_stage(model, tok, manifest, stage, seq_lens[order[0]], seq_lens[stage],
                             run_dir / "eval" / stage, sizes)
    del model
    write_summary(run_dir / "eval", order, seq_lens)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return {k: v for k, v in summary.items() if not (isinstance(v, float) and math.isnan(v))}
