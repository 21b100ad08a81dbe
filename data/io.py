"""Small file helpers shared by the fetcher, tokenizer and shard writer: atomic writes and checksums."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

TMP_MARK = ".tmp-"  # temporary files carry this in their name; nothing ever reads them


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    """Hex sha256 of a string (utf-8)."""
    return hashlib.sha256(text.encode()).hexdigest()


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block finishes.

    The rename is atomic on POSIX, so a reader sees either no file or the whole file, never a half-written one;
    an exception (or a kill) leaves at most a `*.tmp-<pid>` file that no reader looks at.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    try:
        yield tmp
        try:
            os.replace(tmp, path)
        except OSError as e:
            # a folder cannot replace a non-empty one: another process published `path` first. Both wrote the same
            # content (every cached folder is keyed by what decides it), so theirs stays and ours is dropped.
            if not (tmp.is_dir() and path.is_dir() and e.errno in (errno.ENOTEMPTY, errno.EEXIST)):
                raise
    finally:
        if tmp.exists():
            if tmp.is_dir():
                import shutil

                shutil.rmtree(tmp)
            else:
                tmp.unlink()


def usable_cpus() -> int:
    """The cores this process may run on (its affinity mask, where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (indent 1, keys in insertion order)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def remove_stale_tmp(folder: Path) -> None:
    """Delete temporary files an interrupted run left in `folder` (they were never renamed, so never trusted); those
    of a process still running here (another `prepare` writing the same files) are left to it."""
    if folder.is_dir():
        for p in folder.iterdir():
            if TMP_MARK in p.name and p.is_file() and not _running(p.name.rsplit(TMP_MARK, 1)[1]):
                p.unlink(missing_ok=True)


def _running(pid: str) -> bool:
    """Whether the process that named a temporary file is alive on this machine."""
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def read_json(path: Path) -> Any:
    """Parse a JSON file; a DataError naming the file if it is missing or malformed."""
    from data.errors import DataError

    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read JSON: {e}") from None
