"""The curriculum's effect in one table, from the per-stage results in <run_dir>/eval/<stage>/.

- Reasoning stage: reasoning accuracy after General vs after Reasoning;
- Long Context stage (ABF): passkey accuracy and mean loss over positions [L_G, 4 L_G) at 4x the General
  length L_G, after General vs after Long Context;
- inference beyond the trained length: the same at 4x the Long Context length L_LC, plain vs YaRN vs DCA.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from train.eval.outputs import md_table, mean


def passkey_at(result: Optional[Dict[str, Any]], mode: str, length: int) -> Optional[float]:
    """Mean passkey accuracy over depths at one length in one mode, or None if not measured."""
    grid = (result or {}).get("modes", {}).get(mode)
    if not grid or length not in grid["lengths"]:
        return None
    return grid["accuracy_by_length"][grid["lengths"].index(length)]


def loss_over(result: Optional[Dict[str, Any]], mode: str, length: int, lo: int, hi: int) -> Optional[float]:
    """Mean loss over positions [lo, hi) of the curve measured at `length` in `mode`, or None."""
    for c in (result or {}).get("curves", []):
        if c["mode"] == mode and c["length"] == length and c.get("curve"):
            return mean(c["curve"][lo:hi])
    return None


def curriculum_effect(results: Dict[str, Dict[str, Any]], order: Sequence[str],
                      seq_lens: Dict[str, int]) -> Dict[str, Any]:
    """The comparison numbers; `order` is the curriculum, General first; "Long Context" is the stage trained at
    the longest length (the last such: a stage added after it, an anneal say, keeps neither its place nor,
    necessarily, its length)."""
    general = order[0]
    longctx = max(reversed(order), key=lambda s: seq_lens[s])
    lg, llc = seq_lens[general], seq_lens[longctx]

    def get(stage: str, name: str) -> Optional[Dict[str, Any]]:
        return results.get(stage, {}).get(name)

    reasoning = {s: (get(s, "reasoning") or {}).get("accuracy") for s in order}
    tasks = sorted({t for s in order for t in (get(s, "reasoning") or {}).get("tasks", {})})
    by_task = {t: {s: (get(s, "reasoning") or {}).get("tasks", {}).get(t, {}).get("accuracy") for s in order}
               for t in tasks}
    # problems per task after each stage: a later `train.eval reasoning --problems N` may have re-run some stages
    problems = {s: max([r.get("problems", 0) for r in (get(s, "reasoning") or {}).get("tasks", {}).values()],
                       default=None) for s in order}
    return {
        "order": list(order), "general_len": lg, "long_context_len": llc,
        "reasoning_accuracy": reasoning, "reasoning_by_task": by_task, "reasoning_problems": problems,
        "abf": {s: {"passkey": passkey_at(get(s, "passkey"), "plain", 4 * lg),
                    "loss_beyond": loss_over(get(s, "position_loss"), "plain", 4 * lg, lg, 4 * lg)}
                for s in order},
        "extension": {m: {"passkey": passkey_at(get(longctx, "passkey"), m, 4 * llc),
                          "loss_beyond": loss_over(get(longctx, "position_loss"), m, 4 * llc, llc, 4 * llc)}
                      for m in ("plain", "yarn", "dca")},
    }


def markdown(effect: Dict[str, Any]) -> str:
    """Two tables: stages side by side, then plain / YaRN / DCA at 4x the Long Context length."""
    order: List[str] = effect["order"]
    lg, llc = effect["general_len"], effect["long_context_len"]
    rows = [["reasoning accuracy (mean over tasks)", *[effect["reasoning_accuracy"][s] for s in order]]]
    rows += [[f"  {t}", *[v[s] for s in order]] for t, v in effect["reasoning_by_task"].items()]
    if "reasoning_problems" in effect:
        rows.append(["  problems per task", *[effect["reasoning_problems"][s] for s in order]])
    rows.append([f"passkey accuracy at {4 * lg} tokens (4x General), plain RoPE",
                 *[effect["abf"][s]["passkey"] for s in order]])
    rows.append([f"loss at positions {lg}-{4 * lg} (4x General), plain RoPE",
                 *[effect["abf"][s]["loss_beyond"] for s in order]])
    ext = effect["extension"]
    modes = ["plain", "yarn", "dca"]
    second = [[f"passkey accuracy at {4 * llc} tokens", *[ext[m]["passkey"] for m in modes]],
              [f"loss at positions {llc}-{4 * llc}", *[ext[m]["loss_beyond"] for m in modes]]]
    return ("#### After each stage\n\n" + md_table(["measure", *[f"after {s}" for s in order]], rows)
            + f"\n#### Beyond the Long Context length ({llc} tokens), after {order[-1]}\n\n"
            + md_table(["measure", "plain RoPE", "YaRN", "DCA"], second))
