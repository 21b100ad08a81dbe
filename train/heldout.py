"""Held-out per-language perplexity, run inside training at intervals and at each stage end.

Every rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively, so a rank that
skipped a forward would hang the others); the work is split round-robin and the sums are all-reduced.
"""
from __future__ import annotations

import math
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.distributed as dist

from train.faults import collective_result

EvalBatch = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # ids (B, T+1), valid (B, T+1), language index (B,)


def make_eval_batches(sets: Dict[str, np.ndarray], seq_len: int, max_tokens: int,
                      batch_size: int) -> Tuple[List[str], List[EvalBatch]]:
    """Cut each set's held-out tokens (a language's, or a component's) into (input, label) windows of seq_len, at
    most `max_tokens` per set, and group them in batches.

    Returns the set names and batches of (ids (B, T+1), valid (B, T+1), set index (B,)); inputs are
    ids[:, :-1] and labels ids[:, 1:], so a window never predicts across a set's boundary.
    """
    languages = sorted(sets)
    windows, owners = [], []
    for li, lang in enumerate(languages):
        tokens = np.asarray(sets[lang][: max_tokens + 1], dtype=np.int64)
        n = (len(tokens) - 1) // seq_len
        if n == 0 and len(tokens) > 1:  # a short language still counts: one window, padded below
            n = 1
        for w in range(n):
            chunk = tokens[w * seq_len: w * seq_len + seq_len + 1]
            windows.append(chunk)
            owners.append(li)
    batches = []
    for start in range(0, len(windows), batch_size):
        group = windows[start: start + batch_size]
        width = max(len(c) for c in group) - 1
        ids = torch.zeros(len(group), width + 1, dtype=torch.long)
        valid = torch.zeros(len(group), width + 1, dtype=torch.bool)
        for i, c in enumerate(group):
            ids[i, : len(c)] = torch.from_numpy(c)
            valid[i, : len(c)] = True
        batches.append((ids, valid, torch.tensor(owners[start: start + batch_size])))
    return languages, batches


def first_languages(sets: Dict[str, np.ndarray], n: int) -> Dict[str, np.ndarray]:
    """The per-component sets ("udhr/fra") of the first `n` languages in sorted order (all when n is 0)."""
    languages = sorted({c.split("/", 1)[1] for c in sets})
    kept = set(languages[:n] if n else languages)
    return {c: t for c, t in sets.items() if c.split("/", 1)[1] in kept}


def window_tokens(batches: List[EvalBatch], n: int) -> List[int]:
    """Predicted tokens per owner (component or language index) in `make_eval_batches`' batches."""
    counts = [0] * n
    for _, valid, owner in batches:
        for o, k in zip(owner.tolist(), valid[:, 1:].sum(1).tolist()):
            counts[o] += int(k)
    return counts


def pool_by_language(ppl: Dict[str, float], tokens: Dict[str, int]) -> Dict[str, float]:
    """Per-language perplexity from per-component ("udhr/fra", "bible/fra") values: the token-weighted mean loss of
    the language's held-out texts, each cut on its own (so every language is scored on the same texts)."""
    pooled: Dict[str, List[float]] = {}
    for comp, value in ppl.items():
        acc = pooled.setdefault(comp.split("/", 1)[1], [0.0, 0.0])
        acc[0] += math.log(value) * tokens[comp]
        acc[1] += tokens[comp]
    return {lang: math.exp(s / n) for lang, (s, n) in sorted(pooled.items())}


@torch.no_grad()
def heldout_perplexity(model: torch.nn.Module, languages: List[str], batches: List[EvalBatch], device: torch.device,
                       rank: int, world: int) -> Dict[str, float]:
    """Per-language perplexity (exp of mean token loss) over the held-out batches, identical on every rank."""
    sums = torch.zeros(len(languages), dtype=torch.float64)
    counts = torch.zeros(len(languages), dtype=torch.float64)
    mine = batches[rank::world]
    rounds = math.ceil(len(batches) / world)
    was_training = model.training
    model.eval()
    for r in range(rounds):
        real = r < len(mine)
        ids, valid, owner = mine[r] if real else batches[0]
        inputs = ids[:, :-1].to(device)
        labels = ids[:, 1:].clone()
        labels[~valid[:, 1:]] = -100
        out = model(input_ids=inputs, labels=labels.to(device), return_token_losses=True)
        if not real:  # a padding round keeps collectives aligned; its numbers are dropped
            continue
        tok = out.token_losses.double().cpu()  # (B, T)
        mask = (labels != -100).double()
        sums.index_add_(0, owner, (tok * mask).sum(1))
        counts.index_add_(0, owner, mask.sum(1))
    model.train(was_training)
    if dist.is_initialized() and world > 1:
        both = torch.stack([sums, counts]).to(device)  # on the model's device: NCCL reduces GPU tensors only
        dist.all_reduce(both)
        sums, counts = collective_result(both)
    return {lang: math.exp(sums[i] / counts[i]) for i, lang in enumerate(languages) if counts[i] > 0}
