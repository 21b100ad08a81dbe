"""Held-out evaluation data: token arrays of text that never reaches the training shards.

UDHR articles 26-30 of every language and the held-out Bible books (Ruth by default) are the same text in every
language, so per-language perplexity on them compares languages fairly.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from data.errors import DataError
from data.shards import open_shard, read_manifest, resolve_in_root


NO_HELDOUT = "the data set has no held-out texts (rows whose split column says heldout)"


def heldout_sets(manifest_path: Path, by: str = "language", max_tokens: Optional[int] = None) -> Dict[str, np.ndarray]:
    """Held-out tokens (documents back to back, each ending in EOS) per language, or per component with
    `by="component"` (e.g. "udhr/fra", "bible/fra"); with `max_tokens`, each set's first max_tokens only.

    Only what is asked for is read from the shards: an evaluation of a few thousand tokens per set held every
    rank's copy of the whole held-out split (8 bytes a token, for the run), GBs for a data set whose split is 1%."""
    if by not in ("language", "component"):
        raise ValueError(f"by must be 'language' or 'component', not {by!r}")
    manifest_path = Path(manifest_path)
    m = read_manifest(manifest_path)
    parts: Dict[str, List[np.ndarray]] = {}
    for key in sorted(m["heldout"]):
        c = m["heldout"][key]
        have = parts.setdefault(c["language"] if by == "language" else key, [])
        for f in c["files"]:
            left = None if max_tokens is None else max_tokens - sum(len(a) for a in have)
            if left is not None and left <= 0:
                break
            shard = open_shard(resolve_in_root(manifest_path.parent, f["path"], manifest_path), m["dtype"],
                               check_offsets=False)
            have.append(np.asarray(shard.tokens[:left], dtype=np.int64))
    return {k: np.concatenate(v) for k, v in parts.items()}


def reasoning_eval_seed(manifest_path: Path, task: str) -> int:
    """The first reasoning-gym generator seed of `task` that no training problem used (evaluate from here on)."""
    m = read_manifest(Path(manifest_path))
    used = [src["generator_seeds"][task]["first_unused_seed"] for src in m["sources"].values()
            if task in src.get("generator_seeds", {})]
    if not used:
        raise DataError(f"{manifest_path}: no reasoning_gym source generated task {task!r}")
    return int(max(used))
