"""Local files: JSONL/JSON, Parquet or plain text (one document per file), read with `datasets`."""
from __future__ import annotations

import codecs
import glob
import itertools
import json
import logging
import os
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from data.errors import DataError
from data.io import sha256_file, sha256_text, write_error

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}


@dataclass
class Options:
    paths: List[str] = field(default_factory=list)  # files or globs; relative = to the cwd, else to the repo root
    text_field: str = "text"  # column with the document text
    language_field: str = "language"  # column with each document's language, if the files have one
    language: str = "und"  # language of every document when there is no language column
    split_field: str = "split"  # column with "train"/"heldout", if the files have one (else all "train")


def resolve(paths: List[str], source: str, quiet: bool = False) -> List[Path]:
    """Expand globs; a relative path is looked up in the cwd first, then in the repository root. A file that several
    entries match (`[a.jsonl, "*.jsonl"]`, or a symlink to it) is read once, with a warning unless `quiet`: its
    documents were trained on twice, unsaid (weights are the mixture's job)."""
    out: List[Path] = []
    for p in paths:
        bases = [Path("/")] if Path(p).is_absolute() else list(dict.fromkeys([Path.cwd(), REPO]))
        for base in bases:
            hits = sorted(glob.glob(str(base / p), recursive=True))
            if hits:
                files = [Path(h) for h in hits if not Path(h).is_dir()]  # `dir/*` over subfolders: their files
                if not files:
                    raise DataError(f"source '{source}': options.paths entry {p!r} is a folder ({hits[0]}), not "
                                    f"files; name its files, e.g. '{p.rstrip('/')}/*.jsonl'")
                out += files
                break
        else:
            where = "" if Path(p).is_absolute() else f" (looked in {' and '.join(map(str, bases))})"
            raise DataError(f"source '{source}': no file matches {p}{where}")
    first: Dict[str, Path] = {}
    for f in out:
        if first.setdefault(os.path.realpath(f), f) is not f and not quiet:
            log.warning("source '%s': %s is matched again by options.paths %s (as %s); reading it once", source,
                        first[os.path.realpath(f)], paths, f)
    return list(first.values())


def _reason(e: BaseException) -> str:
    """The innermost cause of an exception (datasets wraps a parse error in 'An error occurred while generating')."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    return f"{type(e).__name__}: {e}".rstrip(": ")


def _unreadable(source: str, builder: str, files: List[Path], cache_dir: Path, kwargs: dict,
                error: Exception) -> DataError:
    """A DataError naming the first file that fails on its own (or all of them) and the reason."""
    import datasets

    for f in files if len(files) > 1 else []:
        try:
            datasets.load_dataset(builder, data_files=[str(f)], split="train", cache_dir=str(cache_dir), **kwargs)
        except Exception as e:  # noqa: BLE001 - this is the one to name
            return DataError(f"source '{source}': could not read {f}: {_bad_line(f, builder) or _reason(e)}")
    where = files[0] if len(files) == 1 else [str(f) for f in files]
    bad = _bad_line(files[0], builder) if len(files) == 1 else None
    return DataError(f"source '{source}': could not read {where}: {bad or _reason(error)}")


def _bad_line(path: Path, builder: str) -> Optional[str]:
    """'line N is not JSON (why): <the line>' for the first line of a JSON lines file that is not a JSON object, else
    None. What `datasets` says of one (pandas' fallback on the whole file) is 'Trailing data at position 13' whatever
    the line, which in a file of millions of lines leads nowhere."""
    if builder != "json" or _first_byte(path) == b"[":
        return None
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                return f"line {n} is not JSON ({e.msg} at character {e.pos + 1}): {reprlib.repr(line.strip())}"
            if not isinstance(record, dict):
                return f"line {n} is {type(record).__name__} {reprlib.repr(record)}, not a JSON object"
    return None


def _is_empty(path: Path, builder: str) -> bool:
    """No document in the file: no bytes, or (JSON) only whitespace. Alone, such a file failed inside `datasets`
    with a bare `StopIteration`; among others it was skipped without a word."""
    return _first_byte(path) == b"" if builder == "json" else path.stat().st_size == 0


def _first_byte(path: Path) -> bytes:
    """The file's first byte that is not whitespace (b"" if none)."""
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            if chunk.strip():
                return chunk.lstrip()[:1]
    return b""


def _records(path: Path) -> Iterator[Tuple[str, Optional[Any]]]:
    """(where, record) of each document of one file, in the order `datasets` reads them; the record where it can
    be read back (JSON), else None."""
    builder = BUILDERS[path.suffix]
    if builder == "text":  # one document per file
        yield str(path), None
    elif builder == "parquet":
        import pyarrow.parquet as pq

        for i in range(pq.ParquetFile(path).metadata.num_rows):
            yield f"{path} row {i} (counting from 0)", None
    elif _first_byte(path) == b"[":  # one JSON array
        for i, rec in enumerate(json.loads(path.read_text(encoding="utf-8"))):
            yield f"{path} element {i} (counting from 0)", rec
    else:  # JSON lines; Arrow skips blank ones
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield f"{path} line {n}", json.loads(line)
                    except ValueError:
                        yield f"{path} line {n}", None


def locate(files: List[Path], row: int) -> Optional[Tuple[str, Optional[Any]]]:
    """Where document `row` of `load`'s dataset is ('FILE line 7' for JSON lines) and its record, if JSON; None if
    the files hold fewer. Reads the files again: for error messages only."""
    records = (r for f in files for r in _records(f))
    return next(itertools.islice(records, row, None), None)


def _check_utf8(path: Path, source: str) -> None:
    """Refuse a JSON file that is not UTF-8, naming the line: Arrow's JSON reader lets invalid bytes into the
    strings, and they surfaced only later, as a traceback from the tokenizer that named no file."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                at = offset - pending + e.start
                f.seek(0)
                line = f.read(at).count(b"\n") + 1
                raise DataError(f"source '{source}': {path} is not UTF-8 text: byte {at} (line {line}) "
                                f"{e.reason}; re-encode the file as UTF-8") from None
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as e:
        raise DataError(f"source '{source}': {path} is not UTF-8 text: it ends inside a character "
                        f"({e.reason})") from None


def load(opts: Options, cache_dir: Path, source: str):
    """(`datasets.Dataset` of the files in the order given, identity (their checksums), provenance)."""
    import datasets

    files = resolve(opts.paths, source)
    if not files:
        raise DataError(f"source '{source}': `options.paths` is empty")
    kinds = {BUILDERS.get(f.suffix) for f in files}
    if len(kinds) != 1 or None in kinds:
        raise DataError(f"source '{source}': files must all be one of {sorted(BUILDERS)}: {[str(f) for f in files]}")
    builder = kinds.pop()
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    empty = [f for f in files if _is_empty(f, builder)]
    if len(empty) == len(files):
        raise DataError(f"source '{source}': {files[0]} is empty (no documents)" if len(files) == 1 else
                        f"source '{source}': all {len(files)} files are empty (no documents): "
                        f"{[str(f) for f in files]}")
    for f in empty:  # a glob that caught a placeholder: the others are the data
        log.warning("source '%s': %s is empty (no documents); reading the other files", source, f)
    files = [f for f in files if f not in empty]
    if builder == "json":
        for f in files:
            _check_utf8(f, source)
    try:
        ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train",
                                   cache_dir=str(cache_dir), **kwargs)
    except Exception as e:  # a malformed file: name it, and what is wrong with it
        written = write_error(e, cache_dir)
        if written is not None:  # the disk `datasets` converts the files onto is full: not the files' fault
            raise written from e
        raise _unreadable(source, builder, files, cache_dir, kwargs, e) from e
    # content and how it is read, not where it lies: the same files from another checkout reuse the shards
    identity = sha256_text(json.dumps([builder, [sha256_file(f) for f in files]]))
    return ds, identity, {"files": [str(f) for f in files]}

