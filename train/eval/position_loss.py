"""Loss by token position, out to several times the trained length: does the model stay sane past it?

Windows of `length` + 1 tokens are cut from the held-out stream (the held-out Bible book of every language
first, its longest documents, then UDHR articles 26-30; documents back to back, each ending in EOS), and the
mean next-token loss at each position is averaged over the windows. The summary numbers are the mean loss
within the trained length and beyond it, and per bin of positions.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch

from data.heldout import NO_HELDOUT, heldout_sets
from models.qwen3 import Qwen3ForCausalLM
from train.eval.extend import set_mode
from train.eval.outputs import md_table


def heldout_stream(manifest: Path, max_tokens: Optional[int] = None) -> np.ndarray:
    """The held-out tokens, long documents (bible/*) first, then the rest, in a fixed order; with `max_tokens`, the
    stream's first max_tokens only, read from no more of each component than that (not the whole split)."""
    sets = heldout_sets(manifest, by="component", max_tokens=max_tokens)
    order = sorted(sets, key=lambda c: (not c.startswith("bible/"), c))
    stream = np.concatenate([sets[c] for c in order]) if order else np.zeros(0, dtype=np.int64)
    return stream if max_tokens is None else stream[:max_tokens]


@torch.no_grad()
def loss_by_position(model: Qwen3ForCausalLM, stream: np.ndarray, length: int, windows: int = 4,
                     batch_size: int = 2) -> np.ndarray:
    """(length,) mean loss at each position over up to `windows` non-overlapping windows of the stream."""
    n = min(windows, (len(stream) - 1) // length)
    if n < 1:
        raise ValueError(f"the held-out stream ({len(stream)} tokens) is shorter than one window of {length + 1}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = torch.zeros(length, dtype=torch.float64)
    for start in range(0, n, batch_size):
        rows = range(start, min(n, start + batch_size))
        ids = torch.from_numpy(np.stack([stream[w * length: w * length + length + 1] for w in rows]))
        ids = ids.to(device=device, dtype=torch.long)
        out = model(input_ids=ids[:, :-1], labels=ids[:, 1:], return_token_losses=True)
        total += out.token_losses.double().sum(0).cpu()
    model.train(was_training)
    return (total / n).numpy()


def summarize(curve: np.ndarray, trained_len: int, bins: int = 16) -> Dict[str, Any]:
    """Mean loss within / beyond the trained length and over `bins` equal ranges of positions (fewer for a curve
    shorter than `bins`: an empty range has no mean)."""
    edges = np.linspace(0, len(curve), min(bins, len(curve)) + 1).round().astype(int)
    return {"length": len(curve), "trained_len": trained_len,
            "loss_within": float(curve[:trained_len].mean()),
            "loss_beyond": float(curve[trained_len:].mean()) if len(curve) > trained_len else None,
            "bin_edges": edges.tolist(),
            "bin_loss": [float(curve[a:b].mean()) for a, b in zip(edges[:-1], edges[1:])]}


def position_loss_modes(model: Qwen3ForCausalLM, manifest: Path, trained_len: int,
                        checks: Sequence[Sequence[Any]], windows: int = 4, batch_size: int = 2,
                        dca_local_size: int = 0, bins: int = 16) -> Dict[str, Any]:
    """One loss-by-position curve per (mode, length) in `checks`; a length past plain RoPE's tables or longer than
    the held-out text gets None (the latter with a note)."""
    t0 = time.perf_counter()
    stream = heldout_stream(manifest, max_tokens=windows * max((length for _, length in checks), default=0) + 1)
    if not len(stream):  # a data set of one's own without held-out rows
        return {"trained_len": trained_len, "curves": [], "seconds": round(time.perf_counter() - t0, 2),
                "note": NO_HELDOUT}
    curves = []
    for mode, length in checks:
        settings = set_mode(model, mode, trained_len, length, dca_local_size)
        entry: Dict[str, Any] = {"mode": mode, "settings": settings, "length": length}
        if model.dca is None and length > model.rope_cos.shape[0]:
            entry["summary"] = None
        elif len(stream) < length + 1:
            entry["summary"] = None
            entry["note"] = f"the held-out text ({len(stream)} tokens) is shorter than one window of {length + 1}"
        else:
            curve = loss_by_position(model, stream, length, windows, batch_size)
            entry["summary"] = summarize(curve, trained_len, bins)
            entry["curve"] = [round(float(x), 4) for x in curve]  # per position, for plots and other ranges
            entry["windows"] = min(windows, (len(stream) - 1) // length)
        curves.append(entry)
    set_mode(model, "plain", trained_len, trained_len)
    return {"trained_len": trained_len, "curves": curves, "seconds": round(time.perf_counter() - t0, 2)}


def markdown(result: Dict[str, Any], title: str = "") -> str:
    """One row per (mode, length): loss within the trained length, beyond it, and in the last bin."""
    rows = []
    for c in result["curves"]:
        s = c["summary"] or {}
        rows.append([c["mode"], c["length"], c.get("windows"), s.get("loss_within"), s.get("loss_beyond"),
                     (s.get("bin_loss") or [None])[-1]])
    head = (f"### Loss by position{f' — {title}' if title else ''} (trained length {result['trained_len']}; "
            f"held-out text)\n\n")
    if result.get("note"):
        return head + f"Not measured: {result['note']}.\n"
    notes = "".join(f"\n{c['mode']} at {c['length']}: not measured, {c['note']}.\n" for c in result["curves"]
                    if c.get("note"))
    return head + md_table(["mode", "length", "windows", "loss < trained", "loss >= trained", "last bin"], rows) + notes
