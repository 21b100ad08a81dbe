"""Held-out evaluation data: token arrays of text that never reaches the training shards.

UDHR articles 26-30 of every language and the held-out Bible books (Ruth by default) are the same text in every
language, so per-language perplexity on them compares languages fairly.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import numpy as np

from data.errors import DataError
from data.loader import open_components
from data.shards import read_manifest


NO_HELDOUT = "the data set has no held-out texts (rows whose split column says heldout)"


def heldout_sets(manifest_path: Path, by: str = "language") -> Dict[str, np.ndarray]:
    """Held-out tokens (documents back to back, each ending in EOS) per language, or per component with
    `by="component"` (e.g. "udhr/fra", "bible/fra")."""
    if by not in ("language", "component"):
        raise ValueError(f"by must be 'language' or 'component', not {by!r}")
    comps = open_components(Path(manifest_path), section="heldout")
    parts: Dict[str, list] = {}
    for key in sorted(comps):
        c = comps[key]
        parts.setdefault(c.language if by == "language" else key, []).extend(
            np.asarray(s.tokens, dtype=np.int64) for s in c.shards)
    return {k: np.concatenate(v) for k, v in parts.items()}


def reasoning_eval_seed(manifest_path: Path, task: str) -> int:
    """The first reasoning-gym generator seed of `task` that no training problem used (evaluate from here on)."""
    m = read_manifest(Path(manifest_path))
    used = [src["generator_seeds"][task]["first_unused_seed"] for src in m["sources"].values()
            if task in src.get("generator_seeds", {})]
    if not used:
        raise DataError(f"{manifest_path}: no reasoning_gym source generated task {task!r}")
    return int(max(used))
