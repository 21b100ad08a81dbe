"""Token shard files, the manifest that lists them, and `verify`, which refuses any shard that is not exactly right.

A shard file holds the documents of one (source, language), each ending with EOS:

    offset 0   header, 64 bytes, little-endian:
               magic b"TRISTAGE" | version u32 | bytes per token u32 (2 = uint16, 4 = uint32)
               | n_tokens u64 | n_docs u64 | vocab_size u64 | zero padding
    offset 64  tokens        n_tokens x (uint16 | uint32)
               zero padding to a multiple of 8 bytes
               doc offsets   (n_docs + 1) x uint64: document d is tokens[offsets[d]:offsets[d + 1]]

Files are written to a temporary name and renamed when complete, and the manifest (written last) holds each file's
sha256, so a reader never trusts a half-written shard.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

from data.errors import DataError, ShardError
from data.io import atomic_path, read_json, sha256_file, write_json

MAGIC = b"TRISTAGE"
VERSION = 1
HEADER = struct.Struct("<8sIIQQQ")
HEADER_BYTES = 64
log = logging.getLogger(__name__)
DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}
MANIFEST_FORMAT = "tristage-shards"
MANIFEST_VERSION = 1


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else uint32."""
    return DTYPES[2] if vocab_size <= 1 << 16 else DTYPES[4]


def _layout(itemsize: int, n_tokens: int, n_docs: int) -> Tuple[int, int]:
    """(byte offset of the doc offsets, total file size)."""
    off = HEADER_BYTES + n_tokens * itemsize
    off += -off % 8
    return off, off + 8 * (n_docs + 1)


def write_shard(path: Path, tokens: np.ndarray, offsets: np.ndarray, vocab_size: int) -> dict:
    """Write one shard atomically; returns its manifest entry (without the path)."""
    dtype = token_dtype(vocab_size)
    tokens = np.ascontiguousarray(tokens, dtype=dtype)
    offsets = np.ascontiguousarray(offsets, dtype="<u8")
    n_docs = len(offsets) - 1
    assert offsets[0] == 0 and offsets[-1] == len(tokens), "offsets must span the tokens"
    off, size = _layout(dtype.itemsize, len(tokens), n_docs)
    header = HEADER.pack(MAGIC, VERSION, dtype.itemsize, len(tokens), n_docs, vocab_size).ljust(HEADER_BYTES, b"\0")
    h = hashlib.sha256()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for part in (header, memoryview(tokens).cast("B"), b"\0" * (off - HEADER_BYTES - tokens.nbytes),
                     memoryview(offsets).cast("B")):
            f.write(part)
            h.update(part)
        f.flush()
        os.fsync(f.fileno())
    return {"sha256": h.hexdigest(), "bytes": size, "tokens": int(len(tokens)), "documents": int(n_docs)}


@dataclass
class Shard:
    """An opened shard: tokens as a read-only memmap, document offsets in memory."""

    path: Path
    tokens: np.ndarray  # (n_tokens,) uint16 | uint32 memmap
    offsets: Optional[np.ndarray]  # (n_docs + 1,) int64; None when opened without them
    vocab_size: int  # of the tokenizer that wrote it

    @property
    def doc_lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def _header(path: Path, dtype: Optional[str] = None) -> Tuple[int, int, int, int, int]:
    """(bytes per token, tokens, documents, vocab size, byte offset of the document offsets) of a shard, after
    checking magic, version, dtype and the file's size against its header; errors name the file and byte offset."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ShardError(f"{path}: shard file is missing") from None
    if size < HEADER_BYTES:
        raise ShardError(f"{path}: truncated: {size} bytes, shorter than the {HEADER_BYTES}-byte header")
    with open(path, "rb") as f:
        magic, version, itemsize, n_tokens, n_docs, vocab = HEADER.unpack(f.read(HEADER.size))
    if magic != MAGIC:
        raise ShardError(f"{path}: wrong magic {magic!r} at byte offset 0 (expected {MAGIC!r}): not a tristage shard")
    if version != VERSION:
        raise ShardError(f"{path}: shard format version {version} at byte offset 8; this code reads version {VERSION}")
    if itemsize not in DTYPES or (dtype is not None and DTYPES[itemsize] != np.dtype(dtype)):
        raise ShardError(f"{path}: {itemsize} bytes per token at byte offset 12, expected {np.dtype(dtype).itemsize}")
    off, expected = _layout(itemsize, n_tokens, n_docs)
    if size != expected:
        what = "truncated" if size < expected else "has trailing bytes"
        raise ShardError(f"{path}: {what}: the header promises {expected} bytes, the file has {size} "
                         f"(data ends at byte offset {min(size, expected)})")
    return itemsize, n_tokens, n_docs, vocab, off


def open_shard(path: Path, dtype: Optional[str] = None, check_offsets: bool = True) -> Shard:
    """Open a shard, checking magic, version, dtype, size and offsets; errors name the file and byte offset.

    check_offsets=False: the tokens only, `offsets` None (a full check of the data passed them already, and the
    reader has the documents' tables elsewhere): O(1) memory, not 8 bytes per document, and one mapping per shard."""
    itemsize, n_tokens, n_docs, vocab, off = _header(path, dtype)
    tokens = np.memmap(path, dtype=DTYPES[itemsize], mode="r", offset=HEADER_BYTES, shape=(n_tokens,))
    if not check_offsets:
        return Shard(path, tokens, None, int(vocab))
    offsets = np.fromfile(path, dtype="<u8", count=n_docs + 1, offset=off).astype(np.int64)
    bad = np.flatnonzero(np.diff(offsets) < 0)
    if offsets[0] != 0 or offsets[-1] != n_tokens or len(bad):
        d = int(bad[0]) + 1 if len(bad) else (0 if offsets[0] != 0 else n_docs)
        raise ShardError(f"{path}: document offset {d} is inconsistent (byte offset {off + 8 * d})")
    return Shard(path, tokens, offsets, int(vocab))


def check_token_range(shard: Shard, vocab_size: int) -> None:
    """Refuse a shard holding a token id >= vocab_size, naming the first one's position."""
    if len(shard.tokens) == 0 or int(shard.tokens.max()) < vocab_size:
        return
    i = int(np.argmax(shard.tokens >= vocab_size))
    raise ShardError(f"{shard.path}: token id {int(shard.tokens[i])} >= vocab size {vocab_size} at token {i} "
                     f"(byte offset {HEADER_BYTES + i * shard.tokens.dtype.itemsize})")


def resolve_in_root(root: Path, rel: str, manifest: Path) -> Path:
    """`root / rel`, refusing paths that are absolute or have a `..` component (e.g. "../../etc/passwd").

    The path is checked as written, not resolved: a folder of the data set that is a symlink (shards on a scratch
    disk) is the user's choice and stays inside the data set, while a manifest cannot name a file outside it."""
    if Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise DataError(f"{manifest}: path {rel!r} escapes the data root {root}")
    return root / rel


def read_manifest(path: Path) -> dict:
    """Parse a manifest and check its format and version."""
    m = read_json(path)
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{path}: not a tristage manifest (format {m.get('format') if isinstance(m, dict) else m!r})")
    if m.get("version") != MANIFEST_VERSION:
        raise DataError(f"{path}: manifest version {m.get('version')}; this code reads version {MANIFEST_VERSION}")
    _check_fields(m, _MANIFEST, path, "")
    if m["dtype"] not in {d.name for d in DTYPES.values()}:
        raise DataError(f"{path}: dtype {m['dtype']!r}: expected one of {sorted(d.name for d in DTYPES.values())}")
    _check_counts_and_files(m, path)
    return m


_FILE = {"path": str, "sha256": str, "tokens": int, "documents": int}
_COMPONENT = {"source": str, "language": str, "tokens": int, "documents": int, "files": [_FILE]}
_MANIFEST = {"dtype": str, "tokenizer": {"path": str, "fingerprint": str, "vocab_size": int},
             "components": {str: _COMPONENT}, "heldout": {str: _COMPONENT}}


def _check_fields(value: Any, spec: Any, path: Path, where: str) -> None:
    """Refuse a manifest (edited by hand, or written by something else) whose fields lack what readers use: `spec` is
    a type, {key: spec} for required keys, {str: spec} for a mapping of any keys, or [spec] for a list."""
    def fail(why: str) -> None:
        raise DataError(f"{path}: malformed manifest: {where or 'the top level'} {why}")

    if isinstance(spec, type):
        if not isinstance(value, spec) or (spec is int and (isinstance(value, bool) or value < 0)):
            fail(f"is {value!r}, expected a{'' if spec is str else ' non-negative'} {spec.__name__}")
    elif isinstance(spec, list):
        if not isinstance(value, list):
            fail(f"is {type(value).__name__}, expected a list")
        for i, item in enumerate(value):
            _check_fields(item, spec[0], path, f"{where}[{i}]")
    else:
        if not isinstance(value, dict):
            fail(f"is {type(value).__name__}, expected an object")
        if str in spec:
            for key, item in value.items():
                _check_fields(item, spec[str], path, f"{where}.{key}" if where else key)
        else:
            for key, item_spec in spec.items():
                if key not in value:
                    fail(f"lacks {key!r}")
                _check_fields(value[key], item_spec, path, f"{where}.{key}" if where else key)


def _check_counts_and_files(m: dict, path: Path) -> None:
    """Refuse what the field types let through: a component whose `tokens` or `documents` differ from its files'
    sums (an inflated count would pass the pre-start fits check, and the files' own counts are checked against their
    headers), and a file listed twice, above all a held-out file listed as training data."""
    listed: Dict[str, Tuple[str, str]] = {}  # file -> (section, component) that lists it
    for section, key, entry in manifest_files(m):
        name = os.path.normpath(entry["path"])
        if name in listed:
            first_section, first_key = listed[name]
            why = ": held-out text would be trained on" if first_section != section else ""
            raise DataError(f"{path}: malformed manifest: {section}.{key} lists file {entry['path']!r}, which "
                            f"{first_section}.{first_key} lists too{why}")
        listed[name] = (section, key)
    for section in ("components", "heldout"):
        for key, comp in m[section].items():
            for field in ("tokens", "documents"):
                total = sum(f[field] for f in comp["files"])
                if comp[field] != total:
                    raise DataError(f"{path}: malformed manifest: {section}.{key}.{field} is {comp[field]}, but its "
                                    f"files hold {total}")


def manifest_files(manifest: dict) -> Iterator[Tuple[str, str, dict]]:
    """(section, component, file entry) for every shard the manifest lists, training and held-out."""
    for section in ("components", "heldout"):
        for key, comp in manifest.get(section, {}).items():
            for entry in comp["files"]:
                yield section, key, entry


def _counts_match(path: Path, n_tok: int, n_doc: int, entry: dict) -> None:
    if (n_tok, n_doc) != (entry["tokens"], entry["documents"]):
        raise ShardError(f"{path}: header has {n_tok} tokens / {n_doc} documents (byte offset 16), "
                         f"the manifest says {entry['tokens']} / {entry['documents']}")


def verify_file(root: Path, entry: dict, manifest_path: Path, dtype: str, vocab_size: int,
                checksums: bool = True) -> Shard:
    """Check one listed shard against its manifest entry: location, header, size, counts, token range, sha256."""
    path = resolve_in_root(root, entry["path"], manifest_path)
    shard = open_shard(path, dtype)
    _counts_match(path, len(shard.tokens), len(shard.offsets) - 1, entry)
    check_token_range(shard, vocab_size)
    if checksums:
        actual = sha256_file(path)
        if actual != entry["sha256"]:
            raise ShardError(f"{path}: checksum mismatch: sha256 {actual} but {manifest_path} says {entry['sha256']}")
    return shard


VERIFIED = "verified.json"  # beside the manifest: the shards a full check passed, by size, mtime and inode
RACY_NS = 2 * 10**9  # a file changed this close to its check is read again next time: a write within the same
# clock tick as the check would leave its mtime unchanged
_VERIFIED_HERE: Dict[str, Dict[str, List[int]]] = {}  # the same, for this process (where the record cannot be written)


def _stamp(path: Path) -> Optional[List[int]]:
    """[size, mtime_ns, inode]: a copy of the data set (even one that keeps mtimes) has other inodes."""
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _verified(manifest_path: Path, manifest_sha: str) -> Dict[str, List[int]]:
    """The shards an earlier full check of this manifest passed: {path: [size, mtime_ns, inode, vocab limit]}."""
    known = {}
    try:
        rec = json.loads((manifest_path.parent / VERIFIED).read_text())
        if rec.get("manifest") == manifest_sha:
            known = {p: list(v) for p, v in rec["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return {**known, **_VERIFIED_HERE.get(f"{manifest_path}:{manifest_sha}", {})}


def _remember(manifest_path: Path, manifest_sha: str, passed: Dict[str, List[int]]) -> None:
    now = time.time_ns()
    files = {p: v for p, v in passed.items() if v[1] < now - RACY_NS}
    _VERIFIED_HERE[f"{manifest_path}:{manifest_sha}"] = files
    try:
        write_json(manifest_path.parent / VERIFIED, {"manifest": manifest_sha, "files": files})
    except OSError as e:  # a read-only data root: later checks in this process still use the record
        log.info("%s: cannot record the verified shards (%s)", manifest_path.parent / VERIFIED, e)


def verify(manifest_path: Path, tokenizer_fingerprint: Optional[str] = None, vocab_size: Optional[int] = None,
           checksums: bool = True, remember: bool = False) -> dict:
    """Check a prepared data set before training reads it; returns the manifest or raises DataError.

    Refuses: a missing or truncated shard, a wrong magic/version/dtype, a sha256 mismatch, a token id >= vocab_size
    (default: the tokenizer's), a tokenizer whose fingerprint differs from the manifest's, and any listed path that
    leads outside the data root. `checksums=False` skips the sha256 pass (a full read) for very large data sets.

    remember: record the shards a full check passed in `verified.json` beside the manifest (size, mtime, inode and
    the vocab limit their ids are below), and next time read in full only those that changed since (or were new, or
    were checked against a larger limit); the others get the header and size checks.
    A data set of many TB is then read once, not by every rank at every launch.
    """
    manifest_path = Path(manifest_path)
    m = read_manifest(manifest_path)
    root = manifest_path.parent
    tok = m["tokenizer"]
    if tokenizer_fingerprint is not None and tokenizer_fingerprint != tok["fingerprint"]:
        raise DataError(f"{manifest_path}: the shards were tokenized with tokenizer {tok['fingerprint']}, "
                        f"but this run uses {tokenizer_fingerprint}; prepare the data again or use that tokenizer")
    tok_path = resolve_in_root(root, tok["path"], manifest_path)
    if not tok_path.exists():
        raise DataError(f"{tok_path}: tokenizer file is missing (listed in {manifest_path})")
    if checksums and not tok["fingerprint"].endswith(sha256_file(tok_path)[:16]):
        raise DataError(f"{tok_path}: tokenizer file changed: its fingerprint no longer matches "
                        f"{tok['fingerprint']} in {manifest_path}")
    if checksums:
        from data.tokenizer import load_tokenizer

        actual_vocab = load_tokenizer(tok_path).vocab_size
        if actual_vocab != tok["vocab_size"]:
            raise DataError(f"{manifest_path}: tokenizer.vocab_size is {tok['vocab_size']}, but {tok_path} has "
                            f"{actual_vocab} ids")
    limit = vocab_size if vocab_size is not None else tok["vocab_size"]
    remember = remember and checksums
    manifest_sha = sha256_file(manifest_path) if remember else ""
    known = _verified(manifest_path, manifest_sha) if remember else {}
    passed: Dict[str, List[int]] = {}
    for _, _, entry in manifest_files(m):
        path = resolve_in_root(root, entry["path"], manifest_path)
        stamp, before = _stamp(path), known.get(entry["path"])
        if stamp is not None and before is not None and before[:3] == stamp and before[3] <= limit:
            _, n_tok, n_doc, _, _ = _header(path, m["dtype"])  # passed a full check (ids below a limit at most
            _counts_match(path, n_tok, n_doc, entry)  # this one), unchanged since: header and size only
            passed[entry["path"]] = before
        else:
            verify_file(root, entry, manifest_path, m["dtype"], limit, checksums)
            if stamp is not None:
                passed[entry["path"]] = [*stamp, limit]
    if remember and passed != known:
        _remember(manifest_path, manifest_sha, passed)
    return m
