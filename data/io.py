"""Small file helpers shared by the fetcher, tokenizer and shard writer: atomic writes and checksums."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Iterator, Optional

TMP_MARK = ".tmp-"  # temporary files carry this in their name; nothing ever reads them
HOST = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "host"  # in temporary names, before the pid
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}  # a write failed: full disk, quota, size limit,
# read-only file system. The OSError of a write names no file, so these are given the path that was being written
STALE_AFTER_S = 3600  # another host's temporary not modified for this long is a leftover: its pid means nothing
# here, and a writer that is alive touches its file (or its folder's files) far more often than once an hour


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
    an exception (or a kill) leaves at most a `*.tmp-<host>-<pid>` file or folder that no reader looks at (and
    that `remove_stale_tmp` deletes later).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        try:
            yield tmp
        except OSError as e:
            if e.filename is None and e.errno in WRITE_ERRNOS:  # write()'s ENOSPC names no file: name what it wrote
                raise OSError(e.errno, e.strerror, str(tmp)) from e
            raise
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
                shutil.rmtree(tmp)
            else:
                tmp.unlink()


def write_error(e: BaseException, path: Path) -> Optional[OSError]:
    """The failed write (`WRITE_ERRNOS`) somewhere in `e`'s chain (`datasets` wraps its own), as an OSError naming
    `path` where it names no file; None when `e` is something else. `write()`'s ENOSPC names no file, so a full disk
    under `datasets` was `could not read <your file>: OSError: [Errno 28] No space left on device`."""
    cause: Optional[BaseException] = e
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in WRITE_ERRNOS:
            return OSError(cause.errno, cause.strerror, cause.filename or str(path))
        cause = cause.__cause__ or cause.__context__
    return None


def temporary_name(path: Path) -> Path:
    """Where `atomic_path` writes `path` first: `<name>.tmp-<host>-<pid>`, so that on a file system several nodes
    share, a process can tell its own host's leftovers (by the pid) from another host's."""
    return path.with_name(f"{path.name}{TMP_MARK}{HOST}-{os.getpid()}")


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
    """Delete the temporary files and folders an interrupted run left in `folder` (never renamed, so never trusted).

    Left alone: those of a process still running on this host (another `prepare` writing the same files), and
    another host's until nothing in them has been modified for STALE_AFTER_S (its process cannot be checked from
    here; a shared file system's other node may be writing it now). Names without a host (`*.tmp-<pid>`, from
    earlier versions) count as this host's."""
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if TMP_MARK not in p.name:
            continue
        host, _, pid = p.name.rsplit(TMP_MARK, 1)[1].rpartition("-")
        if host in ("", HOST):
            stale = not _running(pid)
        else:
            stale = time.time() - _last_modified(p) > STALE_AFTER_S
        if stale:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)  # a leftover: whatever of it is gone meanwhile is fine
            else:
                p.unlink(missing_ok=True)


def _last_modified(path: Path) -> float:
    """The newest mtime of a file, or of a folder and the files in it (a writer appends to those, which leaves the
    folder's own mtime as it was); +inf where it vanished meanwhile (its owner renamed it: not a leftover)."""
    try:
        times = [path.stat().st_mtime]
        if path.is_dir():
            times += [e.stat(follow_symlinks=False).st_mtime for e in os.scandir(path)]
    except FileNotFoundError:
        return float("inf")
    return max(times)


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
