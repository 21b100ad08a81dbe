"""StageStream on the prepared fixture: packing, mixtures, caps, length buckets, determinism across ranks and resume."""
import json
import logging
import re

import numpy as np
import pytest
import torch

from data.config import LengthBucketConfig, MixtureConfig, compose
from data.errors import DataError
from data.io import TMP_MARK, sha256_file
from data.loader import StageStream, index_workers, micro_batch_indices, open_components, plan_mixture
from data.prepare import prepare
from data.tokenizer import load_tokenizer

WEIGHTS = {"udhr": 0.3, "bible": 0.3, "sotu": 0.15, "code": 0.1, "reasoning": 0.15}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return prepare(compose("fixture", [f"root={tmp_path_factory.mktemp('data')}"]))


def stream(manifest, n=400, seq_len=64, seed=7, stage="general", **mix):
    mix = MixtureConfig(**{"weights": WEIGHTS, "language_alpha": 0.3, "max_epochs": 50, **mix})
    return StageStream(manifest, mix, seq_len=seq_len, seed=seed, stage=stage, num_samples=n)


def read_steps(s, steps, world, mb, accum, start_step=0):
    """What each rank reads, step by step, the way the trainer indexes: {(step, rank): [input_ids...]}."""
    out = {}
    for step in range(start_step, start_step + steps):
        for r in range(world):
            out[(step, r)] = [s.batch(micro_batch_indices(step * world * mb * accum, m, r, world, mb))["input_ids"]
                              for m in range(accum)]
    return out


def test_batch_shapes_dtypes_and_labels(manifest):
    s = stream(manifest)
    b = s.batch(range(8))
    assert {k: tuple(v.shape) for k, v in b.items()} == {k: (8, 64) for k in
                                                         ["input_ids", "labels", "position_ids", "doc_ids",
                                                          "component_ids"]}
    assert b["input_ids"].dtype == b["labels"].dtype == torch.int64
    assert b["doc_ids"].dtype == torch.int32
    assert torch.equal(b["position_ids"], torch.arange(64).expand(8, 64))
    # labels are the next token: the next sample's tokens come from the same packed slice
    assert torch.equal(b["labels"][:, :-1], b["input_ids"][:, 1:])
    assert (b["component_ids"] == b["component_ids"][:, :1]).all()  # one component per sample
    assert int(b["component_ids"].max()) < len(s.components)


def test_packing_eos_between_documents_and_doc_masking(manifest):
    eos = load_tokenizer(manifest).eos_id
    s = StageStream(manifest, MixtureConfig(weights={"reasoning": 1.0}), seq_len=256, seed=0, stage="general",
                    num_samples=20, doc_masking=True)
    b = s.batch(range(20))
    ids, doc, pos = b["input_ids"], b["doc_ids"], b["position_ids"]
    # reasoning documents are ~200 tokens, so 256-token samples hold several: a new document starts after each EOS
    after_eos = torch.zeros_like(ids, dtype=torch.bool)
    after_eos[:, 1:] = ids[:, :-1] == eos
    starts = torch.zeros_like(ids, dtype=torch.bool)
    starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
    assert torch.equal(after_eos, starts) and starts.any()
    assert (doc[:, 0] == 0).all() and (torch.diff(doc, dim=1) >= 0).all()
    # positions restart at each document
    assert (pos[starts] == 0).all() and (pos[:, 0] == 0).all()
    inside = ~starts
    inside[:, 0] = False
    assert (pos[:, 1:][inside[:, 1:]] == (pos[:, :-1] + 1)[inside[:, 1:]]).all()


def test_samples_are_contiguous_slices_of_the_shards(manifest):
    """Each sample, split at its document boundaries, is a run of real document tokens from its component."""
    comps = open_components(manifest)
    s = stream(manifest)
    b = s.batch(range(50))
    for row in range(50):
        comp = comps[s.components[int(b["component_ids"][row, 0])]]
        docs = [np.asarray(sh.tokens[a:z]) for sh in comp.shards for a, z in zip(sh.offsets[:-1], sh.offsets[1:])]
        ids, doc = b["input_ids"][row].numpy(), b["doc_ids"][row].numpy()
        for d in np.unique(doc):
            piece = ids[doc == d]
            assert any(_contains(x, piece) for x in docs), (row, d)


def _contains(hay: np.ndarray, needle: np.ndarray) -> bool:
    if len(needle) > len(hay):
        return False
    w = np.lib.stride_tricks.sliding_window_view(hay, len(needle))
    return bool((w == needle).all(axis=1).any())


def test_two_ranks_together_see_exactly_the_single_rank_stream(manifest):
    s = stream(manifest)
    one = read_steps(s, steps=5, world=1, mb=8, accum=1)  # G = 8
    two = read_steps(s, steps=5, world=2, mb=2, accum=2)  # G = 2 ranks x 2 x 2 micro-steps = 8
    for step in range(5):
        single = one[(step, 0)][0]
        # rank r, micro-step m covers global positions m*4 + r*2 + [0, 2)
        pieces = {m * 4 + r * 2: two[(step, r)][m] for r in range(2) for m in range(2)}
        combined = torch.cat([pieces[k] for k in sorted(pieces)])
        assert torch.equal(combined, single)


def test_a_new_stream_reads_the_same_batches_at_the_same_indices(manifest):
    """A relaunch builds a new StageStream: from step 5's indices it reads what the first one read there (the
    loader holds no state but the index). It computes the indices as read_steps always does, so it says nothing
    of where the trainer resumes; test_faults' relaunch tests compare whole runs' losses for that."""
    full = read_steps(stream(manifest), steps=10, world=2, mb=4, accum=1)
    resumed = read_steps(stream(manifest), steps=5, world=2, mb=4, accum=1, start_step=5)  # a new process
    for key, v in resumed.items():
        assert torch.equal(v[0], full[key][0])


def test_two_to_one_ranks_loses_and_repeats_nothing(manifest):
    s = stream(manifest, n=96)
    seen = []
    # 2 ranks x micro-batch 4 for 6 steps, then the job restarts on 1 rank (micro-batch 4, accumulation 2: same G)
    consumed = 0
    for _ in range(6):
        for r in range(2):
            seen += list(micro_batch_indices(consumed, 0, r, 2, 4))
        consumed += 8
    for _ in range(6):
        for m in range(2):
            seen += list(micro_batch_indices(consumed, m, 0, 1, 4))
        consumed += 8
    assert sorted(seen) == list(range(96))
    assert torch.equal(s.batch(seen)["input_ids"], s.batch(range(96))["input_ids"])


def test_stream_depends_on_seed_and_stage_only_through_its_arguments(manifest):
    a = stream(manifest).batch(range(32))["input_ids"]
    assert torch.equal(a, stream(manifest).batch(range(32))["input_ids"])
    assert not torch.equal(a, stream(manifest, seed=8).batch(range(32))["input_ids"])
    assert not torch.equal(a, stream(manifest, stage="reasoning").batch(range(32))["input_ids"])


def test_ledger_matches_what_the_batches_held(manifest):
    s = stream(manifest)
    counts = torch.zeros(len(s.components), dtype=torch.int64)
    for i in range(0, 120, 8):
        counts += torch.bincount(s.batch(range(i, i + 8))["component_ids"].flatten(), minlength=len(s.components))
    led = s.ledger(120)
    assert led["tokens"] == 120 * 64 == sum(led["source"].values()) == sum(led["language"].values())
    assert led["component"] == {c: int(n) for c, n in zip(s.components, counts) if n}
    assert s.ledger(0)["tokens"] == 0
    # counted on from the last call (a recount of every sample consumed was O(samples) per logged step), and
    # from the start again when the count goes back (a rollback)
    for n in (8, 40, 120, 56, 56, 200, 0, 64):
        assert s.ledger(n) == stream(manifest).ledger(n), n


def test_mixture_weights_and_language_temperature(manifest):
    n = 4000
    s = stream(manifest, n=n, max_epochs=1000)
    led = s.ledger(n)
    for src, w in WEIGHTS.items():
        assert led["source"][src] / led["tokens"] == pytest.approx(w, abs=1e-3)
    # within udhr, p(language) ∝ tokens^0.3
    comps = open_components(manifest)
    udhr = {c.language: c.tokens for c in comps.values() if c.source == "udhr"}
    p = {l: t ** 0.3 for l, t in udhr.items()}
    z = sum(p.values())
    got = {c.split("/")[1]: t for c, t in led["component"].items() if c.startswith("udhr/")}
    for lang in udhr:
        assert got[lang] / led["source"]["udhr"] == pytest.approx(p[lang] / z, abs=2e-3)
    # every global batch of 40 holds the mixture in proportion (parts are interleaved, not blocked)
    b = s.batch(range(40))["component_ids"][:, 0]
    assert len(set(b.tolist())) >= 8


def test_epoch_cap_warns_and_moves_samples_elsewhere(manifest, caplog):
    comps = open_components(manifest)
    sotu = sum(c.tokens for c in comps.values() if c.source == "sotu")
    mix = MixtureConfig(weights={"sotu": 0.6, "reasoning": 0.4}, max_epochs=2.0)
    with caplog.at_level(logging.WARNING, logger="data.loader"):
        plan = plan_mixture(manifest, mix, 64, 250, "general")
    src = plan.by_source()
    # sotu wants 150 samples but 2 epochs of it give (2 * tokens - 1) // 64; reasoning takes the rest
    assert src["sotu"]["capped"] == 1 and src["sotu"]["samples"] == (2 * sotu - 1) // 64 < 150
    assert src["sotu"]["epochs"] <= 2.0
    assert src["reasoning"]["samples"] == 250 - src["sotu"]["samples"] and src["reasoning"]["capped"] == 0
    assert any("source sotu" in r.message and "max_epochs=2.0" in r.message for r in caplog.records)
    # a stage that the capped sources cannot fill is refused, with the numbers
    with pytest.raises(DataError, match="needs 100000 samples"):
        plan_mixture(manifest, mix, 64, 100_000, "general")
    with pytest.raises(DataError, match="lacks"):
        plan_mixture(manifest, MixtureConfig(weights={"wiki": 1.0}), 64, 10, "general")


@pytest.mark.parametrize("mix, seq_len", [
    (MixtureConfig(weights={"sotu": 1.0}, max_epochs=2.0), 64),
    (MixtureConfig(max_epochs=1.0), 64),  # empty weights: every source, 14 components of whole samples each
    (MixtureConfig(weights={"bible": 0.4, "sotu": 0.4, "code": 0.2}, max_epochs=3.0,
                   length_buckets=[LengthBucketConfig(128, 256, 0.75), LengthBucketConfig(32, 127, 0.25)]), 256),
])
def test_check_stage_fits_counts_what_plan_mixture_counts_when_the_stage_starts(manifest, mix, seq_len):
    """`check_stage_fits` (train before building the model, launch.plan before an allocation) refuses exactly the
    stages `plan_mixture` refuses. Before, it compared total tokens x max_epochs only: a stage whose parts'
    whole-sample caps or length buckets could not fill it passed, and failed when the stage started."""
    from data.loader import check_stage_fits
    from data.shards import read_manifest

    m = read_manifest(manifest)
    capacity = sum(p.capacity for p in plan_mixture(manifest, mix, seq_len, 1, "general").parts)
    check_stage_fits(m, manifest, mix, seq_len, capacity, "general")
    with pytest.raises(DataError) as refused:
        check_stage_fits(m, manifest, mix, seq_len, capacity + 1, "general")
    with pytest.raises(DataError) as at_start:
        plan_mixture(manifest, mix, seq_len, capacity + 1, "general")
    assert str(refused.value) == str(at_start.value)
    tokens = sum(p.tokens for p in plan_mixture(manifest, mix, seq_len, 1, "general").parts)
    assert str(refused.value) == (
        f"{manifest}: stage 'general' needs {capacity + 1} samples of {seq_len} tokens "
        f"({(capacity + 1) * seq_len:,} tokens), but its sources give only {capacity} within "
        f"max_epochs={mix.max_epochs} ({tokens:,} training tokens{' in its length buckets' * bool(mix.length_buckets)}"
        f"); lower the stage's token budget, raise max_epochs or use a larger data set (data=<yours>: README "
        f"\"Your own data\")")
    if not mix.weights:  # the old bound, tokens x max_epochs: room for more samples than the parts give
        assert tokens * mix.max_epochs // seq_len > capacity


def test_a_length_bucket_no_document_falls_in_is_refused_before_the_stage_and_the_count_is_kept(manifest,
                                                                                                 monkeypatch):
    """The probe's case: a Long Context bucket of 4,000-8,000 tokens over documents of at most 3,846 was found
    only when the stage started, after General and Reasoning had trained. The tokens per bucket come from the
    shards' document offsets once, then from `bucket_tokens.json` beside the manifest."""
    import data.loader as loader
    from data.loader import BUCKET_TOKENS, check_stage_fits
    from data.shards import read_manifest

    m = read_manifest(manifest)
    mix = MixtureConfig(weights={"sotu": 0.5, "bible": 0.3, "code": 0.2},
                        length_buckets=[LengthBucketConfig(4000, 8000, 1.0)])
    message = (f"{manifest}: stage 'long_context': no document of the mixture's sources is 4000 <= length <= 8000 "
               f"tokens (length bucket 0)")
    with pytest.raises(DataError) as refused:
        check_stage_fits(m, manifest, mix, 1024, 1, "long_context")
    assert str(refused.value) == message
    with pytest.raises(DataError, match=re.escape(message)):
        plan_mixture(manifest, mix, 1024, 1, "long_context")
    record = json.loads((manifest.parent / BUCKET_TOKENS).read_text())
    assert record["manifest"] == sha256_file(manifest)
    counted = record["buckets"]["[[4000, 8000], 8000]"]
    assert set(counted) == {k for k, c in m["components"].items() if c["source"] in mix.weights}
    assert counted["sotu/eng"] == [0]  # its one address, 3,846 tokens, is shorter than the bucket
    # a later check (another launch: nothing in this process) reads no shard
    monkeypatch.setattr(loader, "_BUCKET_TOKENS_HERE", {})
    monkeypatch.setattr(loader, "open_shard", lambda *a, **k: pytest.fail("read a shard again"))
    with pytest.raises(DataError) as again:
        check_stage_fits(m, manifest, mix, 1024, 1, "long_context")
    assert str(again.value) == message


def test_a_weighted_source_no_length_bucket_takes_is_refused_not_dropped(manifest):
    """The probe's case: a Long Context stage weighing udhr 1 next to sotu, bible and code, with one bucket of
    750-1,024 tokens, which none of the UDHR declarations (487-745 tokens) reaches: udhr gave no sample and its
    half of the stage went to the others, without a word. Refused, before the stage and when it starts, naming it;
    weighed by their tokens (no weights given), such a source is only left out."""
    from data.loader import check_stage_fits
    from data.shards import read_manifest

    buckets = [LengthBucketConfig(750, 1024, 1.0)]
    mix = MixtureConfig(weights={"sotu": 0.5, "bible": 0.3, "code": 0.2, "udhr": 1.0}, length_buckets=buckets)
    message = (f"{manifest}: stage 'long_context' mixture weighs sources ['udhr'] (udhr: 1), but no document of "
               f"theirs falls in its length buckets ['750..1024'] (tokens): they would give no sample, and their "
               f"share would go to the other sources; give them weight 0 or widen the buckets")
    with pytest.raises(DataError) as refused:
        check_stage_fits(read_manifest(manifest), manifest, mix, 1024, 8, "long_context")
    assert str(refused.value) == message
    with pytest.raises(DataError) as at_start:
        plan_mixture(manifest, mix, 1024, 8, "long_context")
    assert str(at_start.value) == message
    by_tokens = plan_mixture(manifest, MixtureConfig(length_buckets=buckets), 1024, 8, "long_context").by_source()
    assert "udhr" not in by_tokens and sum(d["samples"] for d in by_tokens.values()) == 8


def test_length_buckets(manifest):
    buckets = [LengthBucketConfig(128, 256, 0.75), LengthBucketConfig(32, 127, 0.25)]
    mix = MixtureConfig(weights={"bible": 0.4, "sotu": 0.4, "code": 0.2}, language_alpha=0.5, max_epochs=1000,
                        length_buckets=buckets)
    s = StageStream(manifest, mix, seq_len=256, seed=0, stage="long_context", num_samples=400)
    parts = s.plan.parts
    assert {p.bucket for p in parts} == {0, 1}
    for p in parts:
        lo, hi = (128, 256) if p.bucket == 0 else (32, 127)
        assert ((p.doc_len >= lo) & (p.doc_len <= hi)).all()
    share = sum(p.samples for p in parts if p.bucket == 0) / 400
    assert share == pytest.approx(0.75, abs=0.01)
    # the 3.8K-token address is cut into 256-token pieces that feed the long bucket
    assert any(p.source == "sotu" and p.bucket == 0 and p.samples > 0 for p in parts)
    with pytest.raises(DataError, match="length bucket 0"):
        plan_mixture(manifest, MixtureConfig(weights={"reasoning": 1.0},
                                             length_buckets=[LengthBucketConfig(100_000, None, 1.0)]), 64, 10)


def test_index_out_of_range(manifest):
    s = stream(manifest, n=10)
    with pytest.raises(IndexError):
        s.batch([10])


def test_blend_spreads_many_small_parts_over_every_batch():
    """440 small parts (UDHR's languages) and 4 large ones: each 64-sample batch keeps the mixture's shares.

    With one fixed phase for every part, the small parts' samples all fell at the same positions and made
    whole batches of one source (seen in the demo as loss jumps of 1.5 nats every ~25 steps).
    """
    import numpy as np

    samples = np.array([3] * 440 + [600] * 4)
    small_share = 3 * 440 / samples.sum()
    phase = np.random.default_rng(0).random(len(samples))
    part, k = _blend(samples, phase)
    assert len(part) == samples.sum() and np.array_equal(np.bincount(part), samples)
    for p in (0, 440):  # each part's samples keep their order
        assert list(k[part == p]) == list(range(samples[p]))
    small = (part < 440).astype(float)
    usable = len(small) // 64 * 64
    per_batch = small[:usable].reshape(-1, 64).mean(axis=1)
    assert per_batch.max() < 2 * small_share and per_batch.min() > small_share / 3


def _blend(samples, phase):
    from data.loader import StageStream, _Sink

    part, k = _Sink((int(samples.sum()),), np.int32), _Sink((int(samples.sum()),), np.int64)
    for _, task in StageStream._blend_tasks(samples, phase, part, k):
        task()
    return part.close(), k.close()


def _reference_arrays(s: StageStream):
    """The index arrays by their definition, each whole array at once (how the build worked before it streamed):
    per part (doc_idx, sample_doc, sample_off, shuffle), and the blend (part, sample)."""
    from data.loader import _rng

    parts = []
    for ix in s._parts:
        part, name, L = ix.part, f"{ix.part.component}#{ix.part.bucket}", s.seq_len
        epochs = -(-(part.samples * L + 1) // part.tokens)
        doc_idx = np.concatenate([_rng(s.seed, s.stage, name, 0, e).permutation(len(part.doc_len))
                                  for e in range(epochs)])
        ends = np.cumsum(part.doc_len[doc_idx])
        starts = np.arange(part.samples + 1) * L
        sample_doc = np.searchsorted(ends, starts, side="right")
        sample_off = starts - (ends[sample_doc] - part.doc_len[doc_idx[sample_doc]])
        parts.append((doc_idx, sample_doc, sample_off, _rng(s.seed, s.stage, name, 1).permutation(part.samples)))
    samples = np.array([ix.part.samples for ix in s._parts])
    phase = _rng(s.seed, s.stage, "blend", 2).random(len(samples))
    part = np.repeat(np.arange(len(samples)), samples)
    k = np.concatenate([np.arange(n) for n in samples])
    order = np.argsort((k + phase[part]) / samples[part], kind="stable")
    return parts, (part[order], k[order])


@pytest.mark.parametrize("docs, window, workers", [(3, 7, 1), (3, 7, 4), (1 << 22, 1 << 24, None)])
@pytest.mark.parametrize("cache", [True, False])
def test_streamed_build_gives_the_arrays_of_their_definition(manifest, monkeypatch, docs, window, workers, cache):
    """The build writes an epoch's documents and a window of the blend at a time (to disk, or in memory), as tasks
    on several threads: pieces of 3 documents and windows of 7 samples, many boundaries, written in whatever order
    4 threads finish them, still give exactly the whole-array arrays."""
    import data.loader

    monkeypatch.setattr(data.loader, "BUILD_DOCS", docs)
    monkeypatch.setattr(data.loader, "BUILD_BLEND", window)
    mix = MixtureConfig(weights=WEIGHTS, language_alpha=0.3, max_epochs=50,
                        length_buckets=[LengthBucketConfig(min_tokens=0, max_tokens=40, weight=1.0),
                                        LengthBucketConfig(min_tokens=41, max_tokens=300, weight=2.0)])
    s = StageStream(manifest, mix, seq_len=32, seed=5, stage=f"streamed{docs}-{workers}", num_samples=3000,
                    cache=cache, workers=workers)
    assert not s.index_cached and len(s._parts) > 10 and s.workers == (workers or index_workers())
    assert isinstance(s.blend_part, np.memmap) == cache
    parts, (part, k) = _reference_arrays(s)
    assert sum(len(d) > len(ix.part.doc_len) for (d, *_), ix in zip(parts, s._parts)) > 0  # parts of many epochs
    for ix, want in zip(s._parts, parts):
        for got, ref in zip((ix.doc_idx, ix.sample_doc, ix.sample_off, ix.shuffle), want):
            assert np.array_equal(got, ref) and got.dtype == np.int32
    assert np.array_equal(s.blend_part, part) and np.array_equal(s.blend_sample, k)


def _same_batches(a, b, n):
    idx = np.random.default_rng(0).choice(n, size=32, replace=False).tolist()
    x, y = a.batch(idx), b.batch(idx)
    return all(torch.equal(x[k], y[k]) for k in x)


def test_index_arrays_are_cached_beside_the_manifest_and_memory_mapped(manifest, monkeypatch):
    from data.loader import index_dir

    mix = MixtureConfig(weights=WEIGHTS, language_alpha=0.3, max_epochs=50)
    folder = index_dir(manifest, mix, 64, 11, "general", 500)
    assert folder.parent == manifest.parent / "index" and not folder.exists()
    built = StageStream(manifest, mix, seq_len=64, seed=11, stage="general", num_samples=500)
    assert not built.index_cached and (folder / "done").is_file()
    assert not list(folder.parent.glob(f"*{TMP_MARK}*"))  # no temporary folder left behind
    monkeypatch.setattr(StageStream, "_build_index", lambda *a: pytest.fail("rebuilt a cached index"))
    cached = StageStream(manifest, mix, seq_len=64, seed=11, stage="general", num_samples=500)
    assert cached.index_cached and isinstance(cached.blend_part, np.memmap)
    monkeypatch.undo()
    in_memory = StageStream(manifest, mix, seq_len=64, seed=11, stage="general", num_samples=500, cache=False)
    assert not isinstance(in_memory.blend_part, np.memmap)
    assert _same_batches(cached, in_memory, 500) and _same_batches(built, cached, 500)
    assert cached.ledger(300) == in_memory.ledger(300)
    # anything that decides the arrays gives another folder
    others = {index_dir(manifest, mix, 64, 12, "general", 500), index_dir(manifest, mix, 128, 11, "general", 500),
              index_dir(manifest, mix, 64, 11, "general", 501), index_dir(manifest, mix, 64, 11, "reasoning", 500),
              index_dir(manifest, MixtureConfig(weights=WEIGHTS, language_alpha=0.5, max_epochs=50), 64, 11,
                        "general", 500)}
    assert folder not in others and len(others) == 5


def test_a_killed_builds_temporary_index_folder_is_removed_by_the_next_build(manifest):
    """A build killed mid-way left `index/<stage>-<key>.tmp-<pid>/` (arrays of up to ~20 bytes per sample) for
    ever: nothing removed temporary folders, and nothing looked in index/."""
    from data.io import HOST
    from data.loader import index_dir

    mix = MixtureConfig(weights=WEIGHTS, language_alpha=0.3, max_epochs=50)
    folder = index_dir(manifest, mix, 64, 31, "general", 200)
    dead = folder.parent / f"{folder.name}{TMP_MARK}{HOST}-999999999"  # its process is gone
    dead.mkdir(parents=True)
    (dead / "doc_idx.npy").write_bytes(b"\x93NUMPY half")
    s = StageStream(manifest, mix, seq_len=64, seed=31, stage="general", num_samples=200)
    assert not s.index_cached and (folder / "done").is_file()
    assert not dead.exists() and not list(folder.parent.glob(f"*{TMP_MARK}*"))


def test_an_unreadable_index_cache_is_rebuilt_and_a_failed_write_falls_back_to_memory(manifest, monkeypatch, caplog):
    from data.loader import index_dir

    mix = MixtureConfig(weights=WEIGHTS, language_alpha=0.3, max_epochs=50)
    reference = StageStream(manifest, mix, seq_len=64, seed=21, stage="general", num_samples=300, cache=False)
    folder = index_dir(manifest, mix, 64, 21, "general", 300)
    StageStream(manifest, mix, seq_len=64, seed=21, stage="general", num_samples=300)
    data = (folder / "shuffle.npy").read_bytes()
    (folder / "shuffle.npy").write_bytes(data[: len(data) // 2])  # truncated
    with caplog.at_level(logging.WARNING):
        again = StageStream(manifest, mix, seq_len=64, seed=21, stage="general", num_samples=300)
    assert not again.index_cached and "unreadable index cache" in caplog.text
    assert (folder / "shuffle.npy").read_bytes() == data  # replaced by a whole copy
    assert _same_batches(again, reference, 300)

    from data.loader import _Sink

    write = _Sink.write

    def full_disk(sink, at, values):  # the disk fills up once the build has written to a file
        if sink.array is None and sink.filled:
            raise OSError(28, "No space left on device")
        write(sink, at, values)

    monkeypatch.setattr(_Sink, "write", full_disk)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        s = StageStream(manifest, mix, seq_len=64, seed=22, stage="general", num_samples=300)
    assert not s.index_cached and "could not cache the index arrays" in caplog.text
    assert not index_dir(manifest, mix, 64, 22, "general", 300).exists()
    assert not list(folder.parent.glob(f"*{TMP_MARK}*"))
    assert s.batch([0, 5])["input_ids"].shape == (2, 64)


def test_memory_mapped_index_costs_a_rank_a_fraction_of_building_it(manifest):
    """`python -m data.bench`'s index figures, small: each way in its own process, private memory compared."""
    import json
    import subprocess
    import sys

    n = 2_000_000

    def probe(mode):
        out = subprocess.run([sys.executable, "-m", "data.bench", "--index-probe", mode, str(n), str(manifest)],
                             check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    memory, build, load = probe("memory"), probe("build"), probe("load")
    assert not memory["cached"] and not build["cached"] and load["cached"]
    assert memory["private_mib"] > n * 20 / 2**20  # int32 arrays, ~20 bytes a sample, held privately
    # the rank that built them streamed them to the cache and maps them too: it keeps no private copy either
    assert build["private_mib"] < memory["private_mib"] / 4 and load["private_mib"] < memory["private_mib"] / 4


def test_a_rank_opening_a_cached_index_holds_no_document_tables(tmp_path):
    """A corpus shaped like a real one (5 sources x 400K documents): a rank that maps a built index keeps less than
    8 bytes per document privately. Before, every rank rebuilt the mixture's document tables from the shards,
    ~50 bytes per document: 100 MiB here, hundreds of GB per rank for a web-scale corpus."""
    import json
    import subprocess
    import sys

    from data.bench import synthetic_manifest

    docs, n = 400_000, 1_000_000
    manifest = synthetic_manifest(tmp_path / "synthetic", docs)

    def probe(mode):
        out = subprocess.run([sys.executable, "-m", "data.bench", "--index-probe", mode, str(n), str(manifest)],
                             check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    memory, build, load = probe("memory"), probe("build"), probe("load")
    assert load["cached"] and not build["cached"]
    below = 5 * docs * 8 / 2**20  # MiB: 8 bytes per document, what the shard offsets alone took before
    assert load["private_mib"] < below and build["private_mib"] < below
    assert memory["private_mib"] > n * 20 / 2**20  # the control: arrays built in memory are held privately


def test_index_arrays_are_int32_where_the_values_fit(tmp_path):
    from data.loader import _index_dtype, _Sink

    assert _index_dtype(2**31) == np.int32 and _index_dtype(2**31 + 1) == np.int64  # values below the bound
    sink = _Sink((2, 3), np.int32, tmp_path / "a.npy")
    sink.write(2, np.arange(2, 6))  # in any order
    with pytest.raises(ValueError, match="has 4 of its 6 elements"):
        sink.close()
    with pytest.raises(ValueError, match=r"slice \[4, 7\) overflows its 6 elements"):
        sink.write(4, np.arange(3))
    sink.write(0, np.arange(2))
    assert sink.close() is None
    assert np.array_equal(np.load(tmp_path / "a.npy"), np.arange(6, dtype=np.int32).reshape(2, 3))


def test_every_label_including_the_last_is_the_next_token_of_a_document(manifest):
    """The whole seq_len + 1 window (the inputs and the last label, which the label test of the other positions
    never reached) is a run of real tokens: the last document's tail, the final label included, lies in one
    document; after an EOS input the last label starts the next one."""
    eos = load_tokenizer(manifest).eos_id
    comps = open_components(manifest)
    s = StageStream(manifest, MixtureConfig(weights={"bible": 1.0}, max_epochs=50), seq_len=64, seed=7,
                    stage="general", num_samples=50, cache=False)
    b = s.batch(range(50))
    for row in range(50):
        comp = comps[s.components[int(b["component_ids"][row, 0])]]
        docs = [np.asarray(sh.tokens[a:z]) for sh in comp.shards for a, z in zip(sh.offsets[:-1], sh.offsets[1:])]
        window = np.concatenate([b["input_ids"][row, :1].numpy(), b["labels"][row].numpy()])  # L + 1 tokens
        ends = int(b["input_ids"][row, -1]) == eos
        doc = np.concatenate([b["doc_ids"][row].numpy(), b["doc_ids"][row, -1:].numpy() + ends])
        last = window[doc == doc[-1]][-8:]
        assert any(_contains(x, last) for x in docs), row


def test_capacity_and_rounding_of_the_sample_counts():
    """n samples of L tokens read n L + 1 tokens (640 tokens give 9 samples of 64, 641 give 10); the samples a
    mixture's shares leave over go by largest remainder (shares 3.5, 2.1, 1.4 of 7 give 4, 2, 1)."""
    from data.loader import _capacity, _fill

    assert _capacity(640, 64, 1.0) == 9 and _capacity(641, 64, 1.0) == 10
    n, capped = _fill(np.array([0.5, 0.3, 0.2]), np.array([100, 100, 100]), 7)
    assert n.tolist() == [4, 2, 1] and not capped.any()


def test_overlapping_length_buckets_take_each_document_once(manifest):
    """A document goes to the first bucket it fits (the Qwen3 recipe's buckets share their 16384 bound)."""
    mix = MixtureConfig(weights={"bible": 0.5, "sotu": 0.5}, max_epochs=1000,
                        length_buckets=[LengthBucketConfig(64, 256, 0.5), LengthBucketConfig(32, 300, 0.5)])
    plan = plan_mixture(manifest, mix, 64, 100, "long_context")
    second = [p for p in plan.parts if p.bucket == 1]
    assert second
    for part in second:
        assert not ((part.doc_len >= 64) & (part.doc_len <= 256)).any(), part.component
