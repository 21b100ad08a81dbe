"""Per-language held-out perplexity: UDHR articles 26-30 of every language and the held-out Bible book, apart.

The same text in every language, never trained on (data/heldout.py), cut into windows of the stage's trained
length; a language's "all" column pools its UDHR and Bible tokens.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List

import torch

from data.heldout import heldout_sets
from train.eval.outputs import md_table
from train.heldout import heldout_perplexity, make_eval_batches


@torch.no_grad()
def perplexity(model: torch.nn.Module, manifest: Path, seq_len: int, max_tokens: int = 4096,
               batch_size: int = 8) -> Dict[str, Any]:
    """Perplexity per held-out component ("udhr/fra") and per language, with the tokens each one counts."""
    sets = heldout_sets(manifest, by="component")
    components, batches = make_eval_batches(sets, seq_len, max_tokens, batch_size)
    device = next(model.parameters()).device
    ppl = heldout_perplexity(model, components, batches, device, rank=0, world=1)
    counts = [0] * len(components)
    for _, valid, owner in batches:
        for o, n in zip(owner.tolist(), valid[:, 1:].sum(1).tolist()):
            counts[o] += int(n)
    tokens = dict(zip(components, counts))
    by_language: Dict[str, Dict[str, float]] = {}
    pooled: Dict[str, List[float]] = {}  # language -> [sum of token losses, tokens]
    for comp, value in sorted(ppl.items()):
        source, language = comp.split("/", 1)
        by_language.setdefault(language, {})[source] = value
        acc = pooled.setdefault(language, [0.0, 0.0])
        acc[0] += math.log(value) * tokens[comp]
        acc[1] += tokens[comp]
    for language, (loss_sum, n) in pooled.items():
        by_language[language]["all"] = math.exp(loss_sum / n)
    sources = sorted({c.split("/", 1)[0] for c in ppl})
    geomean = {s: math.exp(sum(math.log(v[s]) for v in by_language.values() if s in v)
                           / sum(1 for v in by_language.values() if s in v)) for s in sources + ["all"]}
    return {"seq_len": seq_len, "max_tokens": max_tokens, "sources": sources, "by_component": ppl,
            "tokens": tokens, "by_language": dict(sorted(by_language.items())), "geomean": geomean}


def markdown(result: Dict[str, Any], title: str = "") -> str:
    """Languages as rows, sources (udhr, bible) and their pooled value as columns; geometric means first."""
    cols = result["sources"] + ["all"]
    rows = [["**geomean**", *[result["geomean"].get(c) for c in cols]]]
    rows += [[lang, *[v.get(c) for c in cols]] for lang, v in result["by_language"].items()]
    head = f"### Held-out perplexity{f' — {title}' if title else ''} (windows of {result['seq_len']} tokens)\n\n"
    return head + md_table(["language", *cols], rows, digits=2)
