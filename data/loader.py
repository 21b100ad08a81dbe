"""Stage mixtures and packed batches: the sample at global index i is a pure function of (seed, stage, i).

Megatron-style index arrays, built once per stage from the manifest, the stage's `MixtureConfig`, seq_len, seed and
num_samples (no randomness at read time):

- the mixture is split into *parts*: one per component (source/language), or per (component, length bucket)
  (with buckets, documents longer than the longest bucket are cut into pieces of that length first);
  part weights = source weight x p(language | source) ∝ tokens^language_alpha (x bucket weight);
- each part gets `samples` of the stage's num_samples, capped at `max_epochs` passes over its tokens (the excess is
  handed to the uncapped parts, with a warning);
- `blend_part`, `blend_sample`: which part, and which of its samples, global sample i comes from (parts interleaved
  evenly, so every global batch holds the mixture in proportion);
- per part: `doc_idx` (its documents, reshuffled each epoch), `sample_doc`/`sample_off` (where packed sample k starts
  in that document stream: sample k is tokens [k*seq_len, (k+1)*seq_len] of it, seq_len + 1 tokens, so inputs and
  next-token labels come from one slice) and `shuffle` (a permutation of its samples).

A rank reads the indices the trainer gives it (`micro_batch_indices`), so the loader state is one integer
(consumed samples), resume is exact and a different number of ranks neither repeats nor skips a sample.

The arrays take ~20 bytes per sample (int32 where the values fit; a stage of 1e9 samples: 20 GB), so, as Megatron
does, they are built once and kept beside the manifest (`index/<stage>-<key>/`, the key hashing everything that
decides them), written atomically, and every later StageStream of the same stage (each rank, each resume)
memory-maps them: the ranks of a node share one copy in the page cache instead of each holding its own, and a
restart does not rebuild them. The parts' document tables (which shard, first token, length) and the plan are
cached with them, so a rank that maps a built index holds no per-document memory of its own. The build itself
writes them to disk a piece at a time (a few million documents of a part's stream, a window of the blend), on
several threads, so it holds a few pieces and the largest part's permutations, not the stage's arrays, in memory.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import io
import json
import logging
import os
import shutil
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from data.config import MixtureConfig, check_mixture, to_mixture_config
from data.errors import DataError
from data.io import atomic_path, remove_stale_tmp, sha256_file, sha256_text, usable_cpus, write_json
from data.shards import Shard, open_shard, read_manifest, resolve_in_root

log = logging.getLogger(__name__)


def micro_batch_indices(consumed_samples: int, micro_step: int, rank: int, world_size: int,
                        micro_batch_size: int) -> range:
    """Global sample indices of one rank's micro-batch: consumed + micro_step*(world*mb) + rank*mb + [0, mb)."""
    start = consumed_samples + micro_step * world_size * micro_batch_size + rank * micro_batch_size
    return range(start, start + micro_batch_size)


@dataclass
class Component:
    """The training documents of one (source, language) across its shard files."""

    name: str  # "source/language"
    source: str
    language: str
    shards: List[Shard]
    doc_file: np.ndarray  # (n_docs,) which shard holds document d
    doc_start: np.ndarray  # (n_docs,) its first token within that shard
    doc_len: np.ndarray  # (n_docs,) its length in tokens, EOS included

    @property
    def tokens(self) -> int:
        return int(self.doc_len.sum(dtype=np.int64))


def open_components(manifest_path: Path, section: str = "components",
                    keep_offsets: bool = True) -> Dict[str, Component]:
    """Every component the manifest lists (header-checked; `data.shards.verify` does the full check).
    keep_offsets=False: the shards' document offsets are dropped once the tables hold what they said."""
    manifest_path = Path(manifest_path)
    m = read_manifest(manifest_path)
    out = {}
    for key, c in m[section].items():
        shards = [open_shard(resolve_in_root(manifest_path.parent, f["path"], manifest_path), m["dtype"])
                  for f in c["files"]]
        lens = [s.doc_lengths for s in shards]
        # int32 where the values fit (a document's start within one shard file, its length): 12 bytes per document
        # instead of 20 on the rank that builds a stage's index, which holds these for every source of the mixture
        starts = [s.offsets[:-1] for s in shards]
        out[key] = Component(
            key, c["source"], c["language"], shards,
            doc_file=np.concatenate([np.full(len(l), i, np.int32) for i, l in enumerate(lens)]),
            doc_start=np.concatenate(starts).astype(_index_dtype(max((len(s.tokens) for s in shards), default=0))),
            doc_len=np.concatenate(lens).astype(_index_dtype(max((len(s.tokens) + 1 for s in shards), default=0))))
        for shard in shards if not keep_offsets else []:
            shard.offsets = None
    return out


def open_component_shards(manifest_path: Path, names: Sequence[str]) -> Dict[str, List[Shard]]:
    """The shard files of these components with their tokens memory-mapped, and no document tables: what a rank
    reads batches from once a stage's index holds the tables (O(files) memory, not O(documents))."""
    manifest_path = Path(manifest_path)
    m = read_manifest(manifest_path)
    return {k: [open_shard(resolve_in_root(manifest_path.parent, f["path"], manifest_path), m["dtype"],
                           check_offsets=False) for f in m["components"][k]["files"]] for k in names}


# ---------------------------------------------------------------------------------------------------------------------
# The plan: how many samples each part gives


@dataclass
class Part:
    """One sampled unit of a stage: a component, or a component's documents within one length bucket."""

    component: str  # "source/language"
    source: str
    language: str
    bucket: int  # index into mixture.length_buckets; -1 = no bucketing
    doc_file: np.ndarray  # (n,) for each of its documents: which shard of the component holds it
    doc_start: np.ndarray  # (n,) first token within that shard
    doc_len: np.ndarray  # (n,) length in tokens
    tokens: int  # tokens in those documents
    weight: float  # share of the stage before caps
    capacity: int  # most samples before max_epochs passes over its tokens
    samples: int = 0  # samples the stage draws from it
    epochs: float = 0.0  # passes over its tokens those samples make
    capped: bool = False  # its share was cut to `capacity`


@dataclass
class MixturePlan:
    """Samples, epochs and caps of every part of one stage; `by_source()` sums them per source."""

    stage: str
    seq_len: int
    num_samples: int
    max_epochs: float
    parts: List[Part]

    def by_source(self) -> Dict[str, Dict[str, Any]]:
        """Per source: tokens available, samples drawn, epochs, capacity and how many parts hit the cap."""
        out: Dict[str, Dict[str, Any]] = {}
        for p in self.parts:
            d = out.setdefault(p.source, {"tokens": 0, "samples": 0, "capacity": 0, "parts": 0, "capped": 0})
            d["tokens"] += p.tokens
            d["samples"] += p.samples
            d["capacity"] += p.capacity
            d["parts"] += 1
            d["capped"] += int(p.capped)
        for d in out.values():
            d["epochs"] = d["samples"] * self.seq_len / d["tokens"] if d["tokens"] else 0.0
        return out

    def table(self) -> str:
        """A printable summary, one line per source."""
        rows = [f"stage {self.stage}: {self.num_samples} samples x {self.seq_len} tokens, max_epochs {self.max_epochs}"]
        for s, d in self.by_source().items():
            rows.append(f"  {s:<16} tokens {d['tokens']:>11,}  samples {d['samples']:>9,}  epochs {d['epochs']:6.2f}  "
                        f"capacity {d['capacity']:>10,}  capped parts {d['capped']}/{d['parts']}")
        return "\n".join(rows)


_PART_FIELDS = ("component", "source", "language", "bucket", "tokens", "weight", "capacity", "samples", "epochs",
                "capped")


def _plan_json(plan: MixturePlan) -> str:
    """The plan without its document tables (those go into the index arrays)."""
    return json.dumps({"stage": plan.stage, "seq_len": plan.seq_len, "num_samples": plan.num_samples,
                       "max_epochs": plan.max_epochs,
                       "parts": [{k: getattr(p, k) for k in _PART_FIELDS} for p in plan.parts]})


def _plan_from_json(text: str) -> MixturePlan:
    d = json.loads(text)
    empty = np.zeros(0, np.int64)
    parts = [Part(**{k: p[k] for k in _PART_FIELDS}, doc_file=empty, doc_start=empty, doc_len=empty)
             for p in d["parts"]]
    return MixturePlan(d["stage"], d["seq_len"], d["num_samples"], d["max_epochs"], parts)


def _capacity(tokens: int, seq_len: int, max_epochs: float) -> int:
    # sample k needs tokens up to (k+1)*seq_len inclusive of a stream of at most max_epochs * tokens
    return max(0, int((max_epochs * tokens - 1) // seq_len))


def _fill(weights: np.ndarray, caps: np.ndarray, total: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer samples per part: proportional to weights, none above its cap, summing to total (water-filling)."""
    share = np.zeros(len(weights))
    fixed = caps <= 0
    while True:
        free = ~fixed
        left = total - caps[fixed & (caps > 0)].sum()
        share[free] = left * weights[free] / weights[free].sum()
        over = free & (share > caps)
        if not over.any():
            break
        share[over] = caps[over]
        fixed |= over
    share[fixed] = np.maximum(caps[fixed], 0)
    n = np.floor(share).astype(np.int64)
    short = total - n.sum()
    if short > 0:  # largest remainders of the uncapped parts first; ceil(share) <= cap, so caps still hold
        free = np.flatnonzero(~fixed)
        n[free[np.argsort(-(share - n)[free], kind="stable")[:short]]] += 1
    return n, fixed  # capped, including parts too small for a single sample


def _pieces(doc_file: np.ndarray, doc_start: np.ndarray, doc_len: np.ndarray,
            cut: Optional[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(file, start, length) of documents, those longer than `cut` split into `cut`-token pieces."""
    if cut is None or not (doc_len > cut).any():
        return doc_file, doc_start, doc_len
    n = -(-doc_len // cut)  # pieces per document
    first = np.repeat(np.cumsum(n) - n, n)  # index of each piece's first sibling
    k = np.arange(n.sum()) - first  # piece number within its document
    doc = np.repeat(np.arange(len(n)), n)
    return doc_file[doc], doc_start[doc] + k * cut, np.minimum(cut, doc_len[doc] - k * cut)


Bucket = Tuple[int, Optional[int], float]  # (min_tokens, max_tokens or None: no bound, weight)


def _buckets(mix: MixtureConfig) -> tuple[List[Bucket], Optional[int]]:
    """The stage's length buckets ((0, None, 1.0): one bucket of every document, without them) and the length
    documents are cut to first: with buckets, a document longer than the longest is cut into pieces of that length,
    so a 50K-token address feeds the 16K-32K bucket instead of being left out (the last piece is bucketed by its
    length)."""
    buckets = [(b.min_tokens, b.max_tokens, b.weight) for b in mix.length_buckets] or [(0, None, 1.0)]
    tops = [hi for _, hi, _ in buckets]
    return buckets, (max(tops) if mix.length_buckets and None not in tops else None)


def _bucket_masks(lengths: np.ndarray, buckets: List[Bucket]) -> Iterator[np.ndarray]:
    """Per bucket in order, which of these documents it takes: each goes to the first bucket whose
    [min_tokens, max_tokens] holds its length."""
    taken = np.zeros(len(lengths), dtype=bool)
    for lo, hi, _ in buckets:
        keep = ~taken & (lengths >= lo) & (lengths <= (hi if hi is not None else np.iinfo(np.int64).max))
        taken |= keep
        yield keep


def _source_weights(manifest_path: Path, mix: MixtureConfig, tokens_by_source: Dict[str, int],
                    stage: str) -> Dict[str, float]:
    """The sources a stage samples and their weights (empty weights: by token count); sources the data set lacks
    are refused."""
    weights = dict(mix.weights) or {s: float(t) for s, t in tokens_by_source.items()}
    unknown = sorted(set(weights) - set(tokens_by_source))
    if unknown:
        raise DataError(f"{manifest_path}: stage {stage!r} mixture names sources {unknown} that the data set lacks "
                        f"(it has {sorted(tokens_by_source)})")
    return {s: float(w) for s, w in weights.items() if w > 0}


def _check_sources_bucketed(manifest_path: Path, stage: str, mix: MixtureConfig, weights: Dict[str, float],
                            bucketed: set[str]) -> None:
    """Refuse a source the stage's weights name whose documents no length bucket takes (`bucketed`: the sources
    with tokens in some bucket): its share would go to the other sources without a word. Sources weighed by their
    tokens (no weights given) are only left out."""
    missing = sorted(s for s in weights if s not in bucketed) if mix.weights else []
    if missing:
        bounds = [f"{b.min_tokens}..{b.max_tokens}" for b in mix.length_buckets]
        raise DataError(f"{manifest_path}: stage {stage!r} mixture weighs sources {missing} "
                        f"({', '.join(f'{s}: {weights[s]:g}' for s in missing)}), but no document of theirs falls in "
                        f"its length buckets {bounds} (tokens): they would give no sample, and their share would go "
                        f"to the other sources; give them weight 0 or widen the buckets")


def _check_fill(manifest_path: Path, stage: str, seq_len: int, num_samples: int, max_epochs: float,
                buckets: List[Bucket], part_tokens: List[List[int]]) -> None:
    """Refuse a stage its parts cannot fill (`part_tokens[b]`: the tokens of each part of bucket b that has any): a
    length bucket no document falls in, or part capacities (whole samples within max_epochs) below its samples."""
    for bi, ((lo, hi, _), tokens) in enumerate(zip(buckets, part_tokens)):
        if not tokens:
            raise DataError(f"{manifest_path}: stage {stage!r}: no document of the mixture's sources is "
                            f"{lo} <= length <= {hi} tokens (length bucket {bi})")
    capacity = sum(_capacity(t, seq_len, max_epochs) for tokens in part_tokens for t in tokens)
    if capacity < num_samples:
        where = " in its length buckets" if any(hi is not None for _, hi, _ in buckets) else ""
        raise DataError(f"{manifest_path}: stage {stage!r} needs {num_samples} samples of {seq_len} tokens "
                        f"({num_samples * seq_len:,} tokens), but its sources give only {capacity} within "
                        f"max_epochs={max_epochs} ({sum(map(sum, part_tokens)):,} training tokens{where}); lower "
                        f"the stage's token budget, raise max_epochs or use a larger data set (data=<yours>: README "
                        f"\"Your own data\")")


BUCKET_TOKENS = "bucket_tokens.json"  # beside the manifest: per length-bucket bounds, each component's tokens there
_BUCKET_TOKENS_HERE: Dict[str, Dict[str, List[int]]] = {}  # the same, for this process (a read-only data root)


def bucket_tokens(manifest_path: Path, manifest: Dict[str, Any], keys: Sequence[str], buckets: List[Bucket],
                  cut: Optional[int]) -> Dict[str, List[int]]:
    """{component: its training tokens in each length bucket}, with documents longer than `cut` in pieces, as
    `plan_mixture` counts them, for these components of the manifest.

    From the shards' document offsets (8 bytes a document, a shard at a time), once: the sums are recorded in
    `bucket_tokens.json` beside the manifest, keyed by its sha256 and the buckets' bounds, so that a later check
    (each launch, launch.plan) reads no shard."""
    manifest_path = Path(manifest_path)
    manifest_sha = sha256_file(manifest_path)
    spec = json.dumps([[lo, hi] for lo, hi, _ in buckets] + [cut])
    record_path = manifest_path.parent / BUCKET_TOKENS
    try:
        record = json.loads(record_path.read_text())
        if not (isinstance(record, dict) and record.get("manifest") == manifest_sha
                and isinstance(record.get("buckets"), dict)):
            raise ValueError("another manifest's")
    except (OSError, ValueError):
        record = {"manifest": manifest_sha, "buckets": {}}
    known = {k: v for k, v in (record["buckets"].get(spec) or {}).items()
             if isinstance(v, list) and len(v) == len(buckets) and all(type(x) is int for x in v)}
    known.update(_BUCKET_TOKENS_HERE.get(manifest_sha + spec, {}))
    missing = [k for k in keys if k not in known]
    for key in missing:
        sums = np.zeros(len(buckets), np.int64)
        for f in manifest["components"][key]["files"]:
            path = resolve_in_root(manifest_path.parent, f["path"], manifest_path)
            lengths = open_shard(path, manifest["dtype"]).doc_lengths
            none = np.zeros(len(lengths), np.int8)  # which file, where: not needed for the sums
            _, _, lengths = _pieces(none, none, lengths, cut)
            sums += [int(lengths[m].sum(dtype=np.int64)) for m in _bucket_masks(lengths, buckets)]
        known[key] = [int(x) for x in sums]
    if missing:
        _BUCKET_TOKENS_HERE[manifest_sha + spec] = known
        try:
            write_json(record_path, {"manifest": manifest_sha, "buckets": {**record["buckets"], spec: known}})
        except OSError as e:  # a read-only data root: counted again by the next process
            log.info("%s: cannot record the length buckets' tokens (%s)", record_path, e)
    return {k: known[k] for k in keys}


def check_stage_fits(manifest: Dict[str, Any], manifest_path: Path, mixture: Any, seq_len: int,
                     num_samples: int, stage: str) -> None:
    """Refuse (DataError), with the same count as `plan_mixture` when the stage starts, a stage its data cannot fill:
    a length bucket no document of its sources falls in, or parts (components, or a component's documents in one
    length bucket) whose capacities within max_epochs sum below the stage's samples. Train says it before building
    the model, launch.plan before an allocation.

    Without length buckets the parts are the components, whose tokens the manifest holds: nothing is read. With them,
    each component's tokens per bucket come from `bucket_tokens` (the shards' document offsets, read once per
    manifest and bucket bounds, then recorded beside the manifest)."""
    mix = to_mixture_config(mixture)
    try:
        check_mixture(mix, f"stage {stage!r} mixture")
    except ValueError as e:
        raise DataError(f"{manifest_path}: {e}") from None
    comps = manifest["components"]
    tokens_by_source: Dict[str, int] = {}
    for c in comps.values():
        tokens_by_source[c["source"]] = tokens_by_source.get(c["source"], 0) + c["tokens"]
    weights = _source_weights(manifest_path, mix, tokens_by_source, stage)
    keys = sorted(k for k, c in comps.items() if c["source"] in weights)
    buckets, cut = _buckets(mix)
    if mix.length_buckets:
        tokens = bucket_tokens(manifest_path, manifest, keys, buckets, cut)
    else:
        tokens = {k: [comps[k]["tokens"]] for k in keys}
    _check_fill(manifest_path, stage, seq_len, num_samples, mix.max_epochs, buckets,
                [[tokens[k][bi] for k in keys if tokens[k][bi]] for bi in range(len(buckets))])
    _check_sources_bucketed(manifest_path, stage, mix, weights, {comps[k]["source"] for k in keys if any(tokens[k])})


def plan_mixture(manifest_path: Path, mixture: Any, seq_len: int, num_samples: int, stage: str = "") -> MixturePlan:
    """How many samples each part of a stage gives, with caps applied; DataError if the data cannot fill the stage."""
    mix = to_mixture_config(mixture)
    try:
        check_mixture(mix, f"stage {stage!r} mixture")
    except ValueError as e:
        raise DataError(f"{manifest_path}: {e}") from None
    comps = open_components(manifest_path, keep_offsets=False)
    tokens_by_source: Dict[str, int] = {}
    for c in comps.values():
        tokens_by_source[c.source] = tokens_by_source.get(c.source, 0) + c.tokens
    weights = _source_weights(manifest_path, mix, tokens_by_source, stage)
    buckets, cut = _buckets(mix)
    docs = {k: _pieces(c.doc_file, c.doc_start, c.doc_len, cut) for k, c in comps.items() if c.source in weights}
    masks = {k: _bucket_masks(d[2], buckets) for k, d in docs.items()}  # a document joins one bucket only
    candidates = []  # per bucket: (component, its documents there, their tokens) of each component with any
    for _ in buckets:
        found = []
        for key in sorted(docs):
            f, st, ln = docs[key]
            keep = next(masks[key])
            n_tok = int(ln[keep].sum(dtype=np.int64))
            if n_tok:  # every document (no length buckets): the component's own tables, not copies
                found.append((comps[key], (f, st, ln) if keep.all() else (f[keep], st[keep], ln[keep]), n_tok))
        candidates.append(found)
    _check_fill(manifest_path, stage, seq_len, num_samples, mix.max_epochs, buckets,
                [[n_tok for _, _, n_tok in found] for found in candidates])
    _check_sources_bucketed(manifest_path, stage, mix, weights, {c.source for found in candidates for c, _, _ in found})
    parts: List[Part] = []
    for bi, ((_, _, bw), found) in enumerate(zip(buckets, candidates)):
        src_w = {s: weights[s] for s in {c.source for c, _, _ in found}}
        src_total = sum(src_w.values())
        lang_tok: Dict[str, float] = {}
        for c, _, n_tok in found:
            lang_tok[c.source] = lang_tok.get(c.source, 0.0) + n_tok ** mix.language_alpha
        for c, (f, st, ln), n_tok in found:
            w = bw * src_w[c.source] / src_total * n_tok ** mix.language_alpha / lang_tok[c.source]
            parts.append(Part(c.name, c.source, c.language, bi if mix.length_buckets else -1, f, st, ln, n_tok, w,
                              _capacity(n_tok, seq_len, mix.max_epochs)))
    w = np.array([p.weight for p in parts])
    caps = np.array([p.capacity for p in parts], dtype=np.int64)
    samples, capped = _fill(w / w.sum(), caps, num_samples)
    for p, n, cp in zip(parts, samples, capped):
        p.samples, p.capped, p.epochs = int(n), bool(cp), int(n) * seq_len / p.tokens
    plan = MixturePlan(stage, seq_len, num_samples, mix.max_epochs, parts)
    for s, d in plan.by_source().items():
        if d["capped"]:
            log.warning("stage %s: source %s: %d of %d parts hit max_epochs=%s; their excess samples go to the "
                        "other parts, so the mixture is not exactly as configured", stage, s, d["capped"],
                        d["parts"], mix.max_epochs)
    return plan


# ---------------------------------------------------------------------------------------------------------------------
# Index arrays and batches


def _rng(seed: int, stage: str, part: str, purpose: int, epoch: int = 0) -> np.random.Generator:
    # crc32, not hash(): Python salts str hashes per process, and every rank must build the same arrays
    return np.random.default_rng([seed, zlib.crc32(stage.encode()), zlib.crc32(part.encode()), purpose, epoch])


@dataclass
class _PartIndex:
    component: int  # index into StageStream.components
    part: Part  # its documents
    doc_idx: np.ndarray  # (epochs * n_docs,) indices into the part's documents, each epoch reshuffled
    sample_doc: np.ndarray  # (samples + 1,) position in doc_idx where packed sample k starts
    sample_off: np.ndarray  # (samples + 1,) token offset within that document
    shuffle: np.ndarray  # (samples,) order in which the packed samples are drawn


INDEX_FORMAT = 3  # bump when the arrays' meaning or layout changes: old caches are then never read
BUILD_DOCS = 1 << 22  # documents per piece of a part's stream in the build (2^22: ~100 MB of temporaries)
BUILD_BLEND = 1 << 24  # samples per window of the blend's sort (2^24: ~450 MB of temporaries)


def _index_dtype(bound: int) -> np.dtype:
    """int32 for values in [0, bound) when they fit (indices below 2^31: every part but one of billions of
    samples), else int64: ~20 instead of ~37 bytes per sample, in memory, on disk and in the page cache."""
    return np.dtype(np.int32 if bound <= 2**31 else np.int64)


class _Sink:
    """One index array, filled a slice at a time (`write(at, values)`, from any thread, in any order): in memory,
    or (`path` given) written straight into its place in a .npy file, so that the build never holds the whole
    array."""

    def __init__(self, shape: tuple, dtype: np.dtype, path: Optional[Path] = None) -> None:
        self.shape, self.length, self.dtype = shape, int(np.prod(shape)), np.dtype(dtype)
        self.filled, self._lock, self.fd = 0, threading.Lock(), None
        if path is None:
            self.array: Optional[np.ndarray] = np.empty(self.length, self.dtype)
            return
        self.array, header = None, io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                      "fortran_order": False, "shape": shape})
        self.base = len(header.getvalue())
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            self._pwrite(header.getvalue(), 0)
        except OSError:
            self.release()
            raise

    def _pwrite(self, data: bytes, at: int) -> None:
        view = memoryview(data)
        while view:  # pwrite may write less than asked (above 2 GiB at once, say)
            n = os.pwrite(self.fd, view, at)
            view, at = view[n:], at + n

    def write(self, at: int, values: np.ndarray) -> None:
        """Elements [at, at + len(values))."""
        n = len(values)
        if at < 0 or at + n > self.length:
            raise ValueError(f"index array slice [{at}, {at + n}) overflows its {self.length} elements")
        if self.array is not None:
            self.array[at:at + n] = values
        else:
            self._pwrite(np.ascontiguousarray(values, dtype=self.dtype).tobytes(), self.base + at * self.dtype.itemsize)
        with self._lock:
            self.filled += n

    def close(self) -> Optional[np.ndarray]:
        """The array (in memory), or None after the file is complete and synced."""
        if self.filled != self.length:
            raise ValueError(f"index array has {self.filled} of its {self.length} elements")
        if self.array is None:
            os.fsync(self.fd)
            self.release()
            return None
        return self.array.reshape(self.shape)

    def release(self) -> None:
        """Close the file, if one is open (after a failure too)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def index_workers(requested: Optional[int] = None) -> int:
    """Threads that build a stage's index: `requested`, or this process's cores, at most 16 (each thread holds
    about a piece of a part or a window of the blend, a few hundred MB at most)."""
    if requested is not None:
        if requested < 1:
            raise DataError(f"data.index_workers = {requested}: must be at least 1 (or null: one per core, up to 16)")
        return requested
    return max(1, min(16, usable_cpus()))


def _run_all(tasks: List[Callable[[], None]], workers: int) -> None:
    """Run independent tasks on `workers` threads (numpy's permutations, sorts and gathers release the GIL); the
    first failure cancels what has not started, waits for what has, and is raised."""
    if workers <= 1:
        for task in tasks:
            task()
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="index-build") as pool:
        futures = [pool.submit(task) for task in tasks]
        try:
            for f in as_completed(futures):
                f.result()
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def _trim_heap() -> None:
    """Hand the build's freed temporaries back to the system: glibc keeps freed heap pages otherwise, and the
    building rank would hold tens of MB it no longer uses for the rest of the run."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


_INDEX_ARRAYS = ("blend_part", "blend_sample", "doc_idx", "sample_doc", "sample_off", "shuffle", "offsets",
                 "part_file", "part_start", "part_len")
PLAN = "plan.json"  # beside the arrays: the stage's MixturePlan without its document tables


def index_dir(manifest_path: Path, mixture: Any, seq_len: int, seed: int, stage: str, num_samples: int) -> Path:
    """Where a stage's index arrays are cached: beside the manifest, keyed by everything that decides them."""
    manifest_path = Path(manifest_path)
    mix = dataclasses.asdict(to_mixture_config(mixture))
    identity = [INDEX_FORMAT, sha256_file(manifest_path), mix, seq_len, seed, stage, num_samples]
    key = sha256_text(json.dumps(identity, sort_keys=True, default=str))[:16]
    return manifest_path.parent / "index" / f"{stage}-{key}"


def _load_index(folder: Path) -> Optional[tuple[Dict[str, np.ndarray], MixturePlan]]:
    """The cached arrays, memory-mapped read-only, and the plan; None when absent or unreadable (then they are
    rebuilt)."""
    if not (folder / "done").is_file():
        return None
    try:
        arrays = {n: np.load(folder / f"{n}.npy", mmap_mode="r", allow_pickle=False) for n in _INDEX_ARRAYS}
        off = arrays["offsets"]
        if off.ndim != 2 or off.shape[1] != 4 or any(int(off[-1, j]) != len(arrays[n]) for j, n in
                                                     enumerate(("doc_idx", "sample_doc", "shuffle", "part_len"))):
            raise ValueError("offsets do not match the arrays")
        if len(arrays["sample_off"]) != len(arrays["sample_doc"]) or len(arrays["blend_part"]) != len(
                arrays["blend_sample"]) or not len(arrays["part_file"]) == len(arrays["part_start"]) == len(
                arrays["part_len"]):
            raise ValueError("array lengths differ")
        plan = _plan_from_json((folder / PLAN).read_text())
        if sum(p.samples > 0 for p in plan.parts) != len(off) - 1:
            raise ValueError(f"{PLAN} does not match the arrays")
        return arrays, plan
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("%s: unreadable index cache (%s); rebuilding it", folder, e)
        return None


Sinks = Callable[[str, tuple, np.dtype], _Sink]  # (array name, shape, dtype) -> where its elements go


def _build_arrays(folder: Optional[Path], build: Callable[[Sinks, bool], None],
                  plan: MixturePlan) -> tuple[Dict[str, np.ndarray], MixturePlan]:
    """Run `build(sinks, threaded)`, which fills a `_Sink` per index array, and return the arrays and the plan
    (written beside them).

    With a folder, the sinks are .npy files in a temporary folder renamed onto it when complete (`atomic_path`: a
    reader sees all or nothing), then memory-mapped; the temporary folders of killed builds beside it are deleted
    first (`remove_stale_tmp`). A failure to write there (read-only or full disk) is a warning: the arrays are then
    built again, in memory, on one thread (every rank of the node does the same then).
    """
    if folder is not None:
        opened: List[_Sink] = []

        def to_file(tmp: Path, name: str, shape: tuple, dtype: np.dtype) -> _Sink:
            opened.append(_Sink(shape, dtype, tmp / f"{name}.npy"))
            return opened[-1]

        try:
            remove_stale_tmp(folder.parent)  # the temporary folders of builds that were killed
            if folder.exists():  # an unreadable cache, replaced
                shutil.rmtree(folder)
            with atomic_path(folder) as tmp:
                tmp.mkdir()
                build(lambda *a: to_file(tmp, *a), True)
                for sink in opened:
                    sink.close()
                (tmp / PLAN).write_text(_plan_json(plan))
                (tmp / "done").write_text("")
        except OSError as e:
            if not (folder / "done").is_file():  # not another process winning the race: a real failure
                log.warning("%s: could not cache the index arrays (%s); building them in memory", folder, e)
        finally:
            for sink in opened:
                sink.release()
        loaded = _load_index(folder)
        if loaded is not None:
            return loaded
    sinks: Dict[str, _Sink] = {}

    def to_memory(name: str, shape: tuple, dtype: np.dtype) -> _Sink:
        sinks[name] = _Sink(shape, dtype)
        return sinks[name]

    build(to_memory, False)
    return {name: sink.close() for name, sink in sinks.items()}, plan


class StageStream:
    """Packed batches of one stage; `batch(indices)` is a pure function of (seed, stage, indices)."""

    def __init__(self, manifest_path: Path, mixture: Any, seq_len: int, seed: int, stage: str,
                 num_samples: int, doc_masking: bool = False, cache: bool = True,
                 workers: Optional[int] = None, verbose: bool = True) -> None:
        """cache: read the index arrays from (or write them to) `index_dir(...)` beside the manifest; workers:
        threads that build them (`index_workers`); verbose: log the stage's plan table (one rank of a job)."""
        self.manifest_path = Path(manifest_path)
        self.seq_len, self.seed, self.stage, self.num_samples = seq_len, seed, stage, num_samples
        self.doc_masking, self.workers = doc_masking, index_workers(workers)
        self.build_threads = 0  # threads the index build used (0: read from the cache)
        folder = index_dir(self.manifest_path, mixture, seq_len, seed, stage, num_samples) if cache else None
        loaded = _load_index(folder) if folder is not None else None
        self.index_cached = loaded is not None
        if loaded is None:
            loaded = self._build(folder, mixture)
        arrays, self.plan = loaded
        self.components: List[str] = sorted({p.component for p in self.plan.parts})
        self.component_source = {p.component: p.source for p in self.plan.parts}
        self.component_language = {p.component: p.language for p in self.plan.parts}
        shards = open_component_shards(self.manifest_path, self.components)
        self._shards = [shards[c] for c in self.components]
        cidx = {c: i for i, c in enumerate(self.components)}
        parts = [p for p in self.plan.parts if p.samples > 0]
        off = arrays["offsets"]
        for p in self.plan.parts:  # the tables of parts that give no sample are never read
            p.doc_file = p.doc_start = p.doc_len = np.zeros(0, np.int64)
        for i, p in enumerate(parts):  # their documents' tables: memory-mapped from the index, like its arrays
            p.doc_file, p.doc_start, p.doc_len = (arrays[n][off[i, 3]:off[i + 1, 3]]
                                                  for n in ("part_file", "part_start", "part_len"))
        if not self.index_cached:
            _trim_heap()  # the build's temporaries and the mixture's tables it read from the shards are gone now
        self._parts = [
            _PartIndex(cidx[p.component], p, arrays["doc_idx"][off[i, 0]:off[i + 1, 0]],
                       arrays["sample_doc"][off[i, 1]:off[i + 1, 1]], arrays["sample_off"][off[i, 1]:off[i + 1, 1]],
                       arrays["shuffle"][off[i, 2]:off[i + 1, 2]])
            for i, p in enumerate(parts)]
        self._part_component = np.array([ix.component for ix in self._parts], dtype=np.int64)
        self.blend_part, self.blend_sample = arrays["blend_part"], arrays["blend_sample"]
        self._arange = np.arange(seq_len + 1, dtype=np.int64)
        self._ledger_counts = (0, np.zeros(len(self.components), np.int64))  # (samples, per component) counted
        if verbose:
            log.info("%s", self.plan.table())

    def __len__(self) -> int:
        return self.num_samples

    def _build(self, folder: Optional[Path], mixture: Any) -> tuple[Dict[str, np.ndarray], MixturePlan]:
        """Plan the stage and build its index (into `folder`, or in memory): the documents' tables of the whole
        mixture are read from the shards and held until this returns."""
        plan = plan_mixture(self.manifest_path, mixture, self.seq_len, self.num_samples, self.stage)
        return _build_arrays(folder, lambda sinks, threaded: self._build_index(
            [p for p in plan.parts if p.samples > 0], sinks, self.workers if threaded else 1), plan)

    def _build_index(self, parts: List[Part], sinks: Sinks, workers: int) -> None:
        """Every part's arrays, one after the other (`offsets` (parts + 1, 4): where each part's doc_idx,
        sample_doc / sample_off, shuffle and document tables start), and the blend, each into its sink.

        The work is cut into independent tasks that write disjoint slices, run on `workers` threads: each part's
        epochs (about BUILD_DOCS documents a task; every epoch holds all of the part's tokens, so where its samples
        start is known without the epochs before it), each part's shuffle, and each window of the blend.
        """
        epochs = [-(-(p.samples * self.seq_len + 1) // p.tokens) for p in parts]  # ceil: samples*L + 1 tokens
        docs = [e * len(p.doc_len) for e, p in zip(epochs, parts)]
        lengths = np.array([[d, p.samples + 1, p.samples, len(p.doc_len)] for d, p in zip(docs, parts)],
                           dtype=np.int64)
        offsets = np.concatenate([np.zeros((1, 4), np.int64), np.cumsum(lengths.reshape(-1, 4), axis=0)])
        sinks("offsets", offsets.shape, np.dtype(np.int64)).write(0, offsets.ravel())
        tables = [sinks(f"part_{n}", (int(offsets[-1, 3]),), _index_dtype(max(
            (int(getattr(p, f"doc_{n}").max()) + 1 for p in parts), default=0))) for n in ("file", "start", "len")]
        samples = np.array([p.samples for p in parts], dtype=np.int64)
        most = int(samples.max(initial=0))
        total = [(int(t),) for t in offsets[-1]]
        doc_idx = sinks("doc_idx", total[0], _index_dtype(max((len(p.doc_len) for p in parts), default=0)))
        sample_doc = sinks("sample_doc", total[1], _index_dtype(max(docs, default=0) + 1))
        sample_off = sinks("sample_off", total[1], _index_dtype(max((int(p.doc_len.max()) for p in parts), default=0)))
        shuffle = sinks("shuffle", total[2], _index_dtype(most))
        tasks: List[tuple] = []  # (cost, task): the largest first, so that no long task starts last
        for part, n_epochs, (d0, s0, h0, t0) in zip(parts, epochs, offsets[:-1].tolist()):
            tasks.append((len(part.doc_len), functools.partial(self._build_tables, part, (tables, t0))))
            per = max(1, BUILD_DOCS // len(part.doc_len))  # epochs per task: a small part's many go together
            for e0 in range(0, n_epochs, per):
                e1 = min(e0 + per, n_epochs)
                tasks.append(((e1 - e0) * len(part.doc_len), functools.partial(
                    self._build_epochs, part, e0, e1, (doc_idx, d0), (sample_doc, sample_off, s0))))
            tasks.append((part.samples, functools.partial(self._build_shuffle, part, (shuffle, h0))))
        tasks += self._blend_tasks(samples, _rng(self.seed, self.stage, "blend", 2).random(len(parts)),
                                   sinks("blend_part", (int(samples.sum()),), np.dtype(np.int32)),
                                   sinks("blend_sample", (int(samples.sum()),), _index_dtype(most)))
        tasks.sort(key=lambda t: -t[0])
        work = sum(cost for cost, _ in tasks)  # a thread per BUILD_DOCS of it at most: a small stage builds on one
        self.build_threads = min(workers, max(1, work // BUILD_DOCS))
        _run_all([task for _, task in tasks], self.build_threads)

    def _build_epochs(self, part: Part, e0: int, e1: int, doc_out: tuple, sample_out: tuple) -> None:
        """Epochs [e0, e1) of one part: their doc_idx, and sample_doc / sample_off of the samples that start in them
        (see _PartIndex), about BUILD_DOCS documents at a time.

        The part's document stream is its epochs' permutations of its documents; packed sample k starts at token
        k * seq_len of it, in the first document that ends after that token. Epoch e starts at token e * tokens.
        """
        (doc_idx, d0), (sample_doc, sample_off, s0) = doc_out, sample_out
        name, lens, L, last = f"{part.component}#{part.bucket}", part.doc_len, self.seq_len, part.samples + 1
        n = len(lens)
        order = np.concatenate([_rng(self.seed, self.stage, name, 0, e).permutation(n) for e in range(e0, e1)])
        doc_idx.write(d0 + e0 * n, order)
        before = e0 * part.tokens  # tokens of the stream before this piece
        k = min(last, -(-before // L))  # the first sample that starts in it
        for j0 in range(0, len(order), BUILD_DOCS):
            ln = lens[order[j0:j0 + BUILD_DOCS]]
            ends = before + np.cumsum(ln, dtype=np.int64)  # (piece,) token position just past each document
            k1 = min(last, -(-int(ends[-1]) // L))  # the samples that start in this piece
            starts = np.arange(k, k1, dtype=np.int64) * L
            j = np.searchsorted(ends, starts, side="right")
            sample_doc.write(s0 + k, e0 * n + j0 + j)
            sample_off.write(s0 + k, starts - (ends[j] - ln[j]))
            k, before = k1, int(ends[-1])

    @staticmethod
    def _build_tables(part: Part, out: tuple) -> None:
        """One part's documents: their shard file, first token in it and length (part_file / part_start /
        part_len), so that a rank opening the index maps them instead of rebuilding them from the shards."""
        tables, at = out
        for table, values in zip(tables, (part.doc_file, part.doc_start, part.doc_len)):
            table.write(at, values)

    def _build_shuffle(self, part: Part, out: tuple) -> None:
        """One part's shuffle: the order in which its packed samples are drawn."""
        shuffle, at = out
        shuffle.write(at, _rng(self.seed, self.stage, f"{part.component}#{part.bucket}", 1).permutation(part.samples))

    @staticmethod
    def _blend_tasks(samples: np.ndarray, phase: np.ndarray, part_out: _Sink, k_out: _Sink) -> List[tuple]:
        """(cost, task)s that interleave the parts evenly: part p's k-th sample sits at 'time' (k + phase_p) /
        samples_p.

        Each part is spread evenly over the stage; the random phase in [0, 1) keeps parts of equal size apart.
        With one fixed phase, hundreds of small parts (UDHR's 440 languages with a few samples each) would all
        fall at the same times, and whole global batches would be made of one source and none of the others.

        Each task sorts one window of times (about BUILD_BLEND samples), not all at once: every sample of a window
        comes before every sample of the next, so the order is the one a global stable sort would give, and a
        window's place in the output is the count of the samples before its start time.
        """
        n = np.asarray(samples, dtype=np.int64)

        def first_at(t: float) -> np.ndarray:
            """Per part, how many of its samples have a time below t (the same float expression as the sort's)."""
            k = np.clip(np.ceil(t * n - phase), 0, n).astype(np.int64)
            while True:  # the estimate may be off by one where the rounding differs
                down = (k > 0) & ((k - 1 + phase) / n >= t)
                up = (k < n) & ((k + phase) / n < t)
                if not (down.any() or up.any()):
                    return k
                k = k - down + up

        def window(lo: np.ndarray, hi: np.ndarray) -> None:
            count = hi - lo
            part = np.repeat(np.arange(len(n), dtype=np.int32), count)
            k = np.arange(int(count.sum()), dtype=np.int64) - np.repeat(np.cumsum(count) - count - lo, count)
            order = np.argsort((k + phase[part]) / n[part], kind="stable")
            part_out.write(int(lo.sum()), part[order])
            k_out.write(int(lo.sum()), k[order])

        windows = max(1, -(-int(n.sum()) // BUILD_BLEND))
        bounds = [np.zeros_like(n)] + [first_at((w + 1) / windows) for w in range(windows - 1)] + [n]
        return [(int((hi - lo).sum()), functools.partial(window, lo, hi)) for lo, hi in zip(bounds, bounds[1:])]

    def batch(self, indices: Sequence[int]) -> Dict[str, torch.Tensor]:
        """Packed samples at these global indices: input_ids, labels, position_ids, doc_ids, component_ids (B, T)."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_samples):
            raise IndexError(f"stage {self.stage}: sample index out of range [0, {self.num_samples})")
        B, L = len(idx), self.seq_len
        tok = np.empty((B, L + 1), dtype=np.int64)  # seq_len + 1: inputs and next-token labels from one slice
        doc = np.empty((B, L + 1), dtype=np.int32)
        pos = np.empty((B, L + 1), dtype=np.int64) if self.doc_masking else None
        comp = self._part_component[self.blend_part[idx]]
        for b, (p, k) in enumerate(zip(self.blend_part[idx].tolist(), self.blend_sample[idx].tolist())):
            ix = self._parts[p]
            shards, part = self._shards[ix.component], ix.part
            s = int(ix.shuffle[k])
            j0, j1 = int(ix.sample_doc[s]), int(ix.sample_doc[s + 1])
            off0, off1 = int(ix.sample_off[s]), int(ix.sample_off[s + 1])
            at = 0
            for n, d in enumerate(ix.doc_idx[j0:j1 + 1].tolist()):
                a = off0 if n == 0 else 0
                z = off1 + 1 if n == j1 - j0 else int(part.doc_len[d])
                first = int(part.doc_start[d])
                tok[b, at:at + z - a] = shards[part.doc_file[d]].tokens[first + a:first + z]
                doc[b, at:at + z - a] = n
                if pos is not None:
                    pos[b, at:at + z - a] = self._arange[:z - a]
                at += z - a
        out = {
            "input_ids": torch.from_numpy(np.ascontiguousarray(tok[:, :-1])),
            "labels": torch.from_numpy(np.ascontiguousarray(tok[:, 1:])),
            "position_ids": torch.from_numpy(np.ascontiguousarray(pos[:, :-1]) if pos is not None
                                             else np.broadcast_to(self._arange[:L], (B, L)).copy()),
            "doc_ids": torch.from_numpy(np.ascontiguousarray(doc[:, :-1])),
            "component_ids": torch.from_numpy(np.repeat(comp[:, None], L, axis=1)),
        }
        return out

    def ledger(self, consumed_samples: int, tables: bool = True) -> Dict[str, Any]:
        """Tokens consumed per source, language and component by the first `consumed_samples` samples (without
        `tables`, the totals and the per-source table only)."""
        n = min(max(int(consumed_samples), 0), self.num_samples)
        done, counts = self._ledger_counts
        if n < done:  # gone back (a rollback): count from the start
            done, counts = 0, np.zeros(len(self.components), np.int64)
        # only the samples since the last call: O(samples per step), not O(samples consumed), which near the end
        # of a stage of billions of samples was seconds and a temporary of 8 bytes per sample at every step
        counts = counts + np.bincount(self._part_component[self.blend_part[done:n]], minlength=len(self.components))
        self._ledger_counts = (n, counts)
        by_comp = {c: int(k) * self.seq_len for c, k in zip(self.components, counts) if k}
        by_src: Dict[str, int] = {}
        by_lang: Dict[str, int] = {}
        for c, t in by_comp.items():
            by_src[self.component_source[c]] = by_src.get(self.component_source[c], 0) + t
            by_lang[self.component_language[c]] = by_lang.get(self.component_language[c], 0) + t
        out = {"stage": self.stage, "samples": n, "tokens": n * self.seq_len, "source": by_src}
        return out | {"language": by_lang, "component": by_comp} if tables else out
