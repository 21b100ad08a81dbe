"""Data benchmark: tokenization tokens/s (num_proc 1 vs 2), loader batches/s and tokens/s per rank, and what a
stage's index arrays cost a rank built in memory against memory-mapped from their cache.

    python -m data.bench [--config demo] [--root .cache/tristage] [--seconds 3] [--index-samples 10000000]

Target: the loader must give each rank >= 1M tokens/s, 20x what an H200 consumes training Qwen3-0.6B (~50K/s).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

TARGET = 1_000_000  # tokens/s per rank
MIXTURE = {"udhr": 0.25, "bible": 0.45, "code": 0.15, "reasoning": 0.05, "sotu": 0.10}


def bench_tokenize(cfg, num_procs=(1, 2)) -> None:
    """Tokenize every source of the data set with datasets.map at each num_proc; print tokens/s."""
    import datasets
    import pyarrow.compute as pc

    from data.prepare import drop_cache_files, load_source, manifest_path, tokenize
    from data.tokenizer import load_tokenizer

    tok = load_tokenizer(manifest_path(cfg))
    ds = datasets.concatenate_datasets([load_source(n, s, cfg)[0] for n, s in cfg.sources.items()])
    # shuffle so the num_proc contiguous pieces carry equal work (the sources differ 100x in document length)
    ds = ds.shuffle(seed=0).flatten_indices()
    chars = sum(len(t) for t in ds["text"])
    print(f"\ntokenization: {len(ds):,} documents, {chars / 1e6:.1f}M characters, {tok.kind} vocab {tok.vocab_size}")
    for n in num_procs:
        t0 = time.perf_counter()
        out = tokenize(ds, tok, n, desc=f"bench num_proc={n}")
        dt = time.perf_counter() - t0
        n_tok = int(pc.sum(pc.list_value_length(out.data.column("input_ids"))).as_py())
        print(f"  num_proc={n}: {n_tok:,} tokens in {dt:.1f}s = {n_tok / dt / 1e6:.2f}M tokens/s "
              f"({chars / n_tok:.2f} characters/token)")
        drop_cache_files(out, keep=ds)
    drop_cache_files(ds)  # the shuffled copy


def bench_loader(manifest, seconds: float, world: int = 2) -> None:
    """Read one rank's micro-batches of a general-stage mixture for a few seconds per shape; print rates."""
    from data.config import MixtureConfig
    from data.loader import StageStream, micro_batch_indices

    print(f"\nloader (rank 0 of {world}; target >= {TARGET / 1e6:.0f}M tokens/s per rank):")
    print(f"  {'seq_len':>7} {'micro':>5} {'build s':>7} {'batches/s':>10} {'tokens/s/rank':>14} {'x target':>8}")
    for seq_len, mb in [(256, 16), (1024, 4), (4096, 4), (32768, 1)]:
        mix = MixtureConfig(weights=MIXTURE, language_alpha=0.3, max_epochs=1e9)  # any corpus fills it
        n = min(200_000, 20_000_000 // seq_len * world)
        t0 = time.perf_counter()
        s = StageStream(manifest, mix, seq_len, seed=0, stage="general", num_samples=n, cache=False)
        build = time.perf_counter() - t0
        steps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            idx = micro_batch_indices((steps * world * mb) % (n - world * mb), 0, 0, world, mb)
            s.batch(idx)
            steps += 1
        dt = time.perf_counter() - t0
        rate = steps * mb * seq_len / dt
        print(f"  {seq_len:>7} {mb:>5} {build:>7.2f} {steps / dt:>10.0f} {rate / 1e6:>12.1f}M {rate / TARGET:>8.1f}")


def _status_mib(key: str) -> float:
    """A /proc/self/status figure: RssAnon (anonymous resident memory; page-cache pages of mapped files are shared,
    not counted), VmRSS or VmHWM (the peak of VmRSS)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024


def index_probe(manifest: str, mode: str, n: int, workers: Optional[int] = None) -> dict:
    """One process: open a stage of n samples (mode memory: cache=False; build / load: through the cache), read a
    batch spread over it; its time, the private memory it added and the peak above the start (while building)."""
    import numpy as np

    from data.config import MixtureConfig
    from data.loader import StageStream

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # restart VmHWM from the current resident size
    base, base_rss = _status_mib("RssAnon"), _status_mib("VmRSS")
    t0 = time.perf_counter()
    s = StageStream(manifest, MixtureConfig(weights=MIXTURE, language_alpha=0.3, max_epochs=1e9), 64,
                    seed=12345, stage="index_bench", num_samples=n, cache=mode != "memory", workers=workers)
    seconds = time.perf_counter() - t0
    s.batch((np.arange(64) * (n // 64)).tolist())
    return {"mode": mode, "threads": s.build_threads, "cached": s.index_cached, "seconds": seconds,
            "private_mib": _status_mib("RssAnon") - base,
            "peak_mib": _status_mib("VmHWM") - base_rss}


def bench_index(manifest, n: int) -> None:
    """The ways a rank gets a stage's index arrays, each in a fresh process: built in memory, built into the cache
    on one thread and on every core's (up to 16; run side by side, so the ratio is one machine's), mapped."""
    from data.config import MixtureConfig
    from data.loader import index_dir, index_workers

    folder = index_dir(manifest, MixtureConfig(weights=MIXTURE, language_alpha=0.3, max_epochs=1e9), 64, 12345,
                       "index_bench", n)
    threads = index_workers()
    print(f"\nindex arrays of a {n:,}-sample stage (seq_len 64), per rank:")
    print(f"  {'how':<38} {'seconds':>8} {'private MiB':>12} {'peak MiB':>9}")
    ways = [("memory", None, "built in memory (cache=False)"), ("build", 1, "built and cached, 1 thread"),
            *([("build", threads, f"built and cached, {threads} threads")] if threads > 1 else []),
            ("load", None, "memory-mapped from the cache")]
    seconds = {}
    try:
        for mode, workers, label in ways:
            if mode == "build":
                shutil.rmtree(folder, ignore_errors=True)
            out = subprocess.run([sys.executable, "-m", "data.bench", "--index-probe", mode, str(n), str(manifest),
                                  *([f"--index-workers={workers}"] if workers else [])],
                                 check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            seconds[label] = r["seconds"]
            used = f" ({r['threads']} used)" if mode == "build" and r["threads"] != workers else ""
            print(f"  {label + used:<38} {r['seconds']:>8.2f} {r['private_mib']:>12.1f} {r['peak_mib']:>9.1f}")
        if threads > 1:
            one, many = seconds["built and cached, 1 thread"], seconds[f"built and cached, {threads} threads"]
            print(f"  {threads} threads build {one / many:.2f}x as fast as 1 thread")
        size = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
        print(f"  on disk: {size:,.0f} MiB ({size * 2**20 / n:.1f} bytes per sample), shared by a node's ranks")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def synthetic_manifest(folder: Path, docs: int) -> Path:
    """A data set shaped like a real pretraining corpus for the index figures: each source of MIXTURE one language
    with `docs` documents of 1-400 tokens (the demo corpus has few, long documents, repeated over many epochs).
    Only the document offsets are written: the token region is a hole in a sparse file, since the index never
    reads tokens."""
    import numpy as np

    from data.shards import HEADER, HEADER_BYTES, MAGIC, MANIFEST_FORMAT, MANIFEST_VERSION, VERSION, _layout

    manifest = folder / "manifest.json"
    if manifest.exists():
        return manifest
    folder.mkdir(parents=True, exist_ok=True)
    components = {}
    for i, source in enumerate(MIXTURE):
        lens = np.random.default_rng(i).integers(1, 401, docs)
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype("<u8")
        path = folder / f"{source}.tok"
        off, size = _layout(2, int(offsets[-1]), docs)
        with open(path, "wb") as f:
            f.write(HEADER.pack(MAGIC, VERSION, 2, int(offsets[-1]), docs, 1024).ljust(HEADER_BYTES, b"\0"))
            f.truncate(off)
            f.seek(off)
            f.write(offsets.tobytes())
        assert path.stat().st_size == size
        components[f"{source}/eng"] = {"source": source, "language": "eng", "tokens": int(offsets[-1]),
                                       "documents": docs, "files": [{"path": path.name, "sha256": "-",
                                                                     "tokens": int(offsets[-1]), "documents": docs}]}
    manifest.write_text(json.dumps({"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "dtype": "uint16",
                                    "tokenizer": {"path": "-", "fingerprint": "-", "vocab_size": 1024},
                                    "components": components, "heldout": {}}))
    return manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="demo", help="conf/data/<name>.yaml")
    ap.add_argument("--root", default=None, help="data root (default: the config's)")
    ap.add_argument("--seconds", type=float, default=3.0, help="loader time per shape")
    ap.add_argument("--skip-tokenize", action="store_true")
    ap.add_argument("--index-samples", type=int, default=10_000_000, help="stage size for the index figures (0: skip)")
    ap.add_argument("--index-synthetic", type=int, default=0, metavar="DOCS",
                    help="index figures only, on a corpus of 5 sources x DOCS documents of 1-400 tokens (built once "
                         "under the root's bench-synthetic/), instead of the data set")
    ap.add_argument("--index-probe", nargs=3, metavar=("MODE", "N", "MANIFEST"),
                    help="one rank's memory: open a stage index of N samples over MANIFEST in MODE "
                         "(memory, build, load)")
    ap.add_argument("--index-workers", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.index_probe:
        mode, n, manifest = args.index_probe
        print(json.dumps(index_probe(manifest, mode, int(n), args.index_workers)))
        return
    logging.basicConfig(level=logging.WARNING)
    from data.config import compose
    from data.prepare import prepare

    cfg = compose(args.config, [f"root={args.root}"] if args.root else [])
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (other work on these cores slows every figure)")
    if args.index_synthetic:
        from data.prepare import data_root

        manifest = synthetic_manifest(data_root(cfg) / f"bench-synthetic-{args.index_synthetic}", args.index_synthetic)
        print(f"synthetic corpus: {len(MIXTURE)} sources x {args.index_synthetic:,} documents -> {manifest}")
        bench_index(manifest, args.index_samples)
        return
    t0 = time.perf_counter()
    manifest = prepare(cfg)
    print(f"prepare (cached after the first run): {time.perf_counter() - t0:.1f}s -> {manifest}")
    if not args.skip_tokenize:
        bench_tokenize(cfg)
    bench_loader(manifest, args.seconds)
    if args.index_samples:
        bench_index(manifest, args.index_samples)


if __name__ == "__main__":
    main()
