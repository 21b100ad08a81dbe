"""Per-language held-out perplexity: UDHR articles 26-30 of every language and the held-out Bible book, apart.

The same text in every language, never trained on (data/heldout.py), cut into windows of the stage's trained
length; a language's "all" column pools its UDHR and Bible tokens.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict

import torch

from data.heldout import NO_HELDOUT, heldout_sets
from train.eval.outputs import md_table
from train.heldout import (first_languages, heldout_perplexity, make_eval_batches, pool_by_language,
                           window_tokens)


@torch.no_grad()
def perplexity(model: torch.nn.Module, manifest: Path, seq_len: int, max_tokens: int = 4096,
               batch_size: int = 8, max_languages: int = 0) -> Dict[str, Any]:
    """Perplexity per held-out component ("udhr/fra") and per language, with the tokens each one counts; the first
    `max_languages` languages in sorted order only, when it is set (as the training loop's evaluation)."""
    sets = first_languages(heldout_sets(manifest, by="component", max_tokens=max_tokens + 1), max_languages)
    if not sets:  # a data set of one's own without held-out rows (a `split` column with "heldout")
        return {"seq_len": seq_len, "max_tokens": max_tokens, "sources": [], "by_component": {}, "tokens": {},
                "by_language": {}, "geomean": {"all": None}, "note": NO_HELDOUT}
    components, batches = make_eval_batches(sets, seq_len, max_tokens, batch_size)
    device = next(model.parameters()).device
    ppl = heldout_perplexity(model, components, batches, device, rank=0, world=1)
    tokens = dict(zip(components, window_tokens(batches, len(components))))
    by_language: Dict[str, Dict[str, float]] = {}
    for comp, value in sorted(ppl.items()):
        source, language = comp.split("/", 1)
        by_language.setdefault(language, {})[source] = value
    for language, value in pool_by_language(ppl, tokens).items():
        by_language[language]["all"] = value
    sources = sorted({c.split("/", 1)[0] for c in ppl})
    geomean = {s: math.exp(sum(math.log(v[s]) for v in by_language.values() if s in v)
                           / sum(1 for v in by_language.values() if s in v)) for s in sources + ["all"]}
    return {"seq_len": seq_len, "max_tokens": max_tokens, "sources": sources, "by_component": ppl,
            "tokens": tokens, "by_language": dict(sorted(by_language.items())), "geomean": geomean}


def markdown(result: Dict[str, Any], title: str = "") -> str:
    """Languages as rows, sources (udhr, bible) and their pooled value as columns; geometric means first."""
    if result.get("note"):
        return f"### Held-out perplexity{f' — {title}' if title else ''}\n\nNot measured: {result['note']}.\n"
    cols = result["sources"] + ["all"]
    rows = [["**geomean**", *[result["geomean"].get(c) for c in cols]]]
    rows += [[lang, *[v.get(c) for c in cols]] for lang, v in result["by_language"].items()]
    head = f"### Held-out perplexity{f' — {title}' if title else ''} (windows of {result['seq_len']} tokens)\n\n"
    return head + md_table(["language", *cols], rows, digits=2)
