"""python -m data.prepare on the committed fixture: manifest, caching, interrupted runs, sources, held-out data."""
import errno
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data.config import compose
from data.errors import DataError
from data.heldout import heldout_sets, reasoning_eval_seed
from data.io import sha256_file
from data.loader import open_components
from data.prepare import prepare
from data.shards import open_shard, verify, write_shard
from data.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "tests" / "fixtures" / "corpus"


def jsonl(name):
    return [json.loads(l) for l in (CORPUS / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    cfg = compose("fixture", [f"root={root}"])
    return cfg, prepare(cfg)


def files_state(folder: Path) -> dict:
    return {p: (p.stat().st_mtime_ns, sha256_file(p)) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_manifest_counts_checksums_and_tokenizer(prepared):
    cfg, mpath = prepared
    m = verify(mpath)
    tok = load_tokenizer(mpath)
    assert m["tokenizer"]["fingerprint"] == tok.fingerprint == load_tokenizer(cfg).fingerprint
    assert m["tokenizer"]["vocab_size"] == tok.vocab_size == 1024 and m["dtype"] == "uint16"
    assert set(tok.special_ids) == {"<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"}
    # documents per source and language match the JSONL files (train split)
    for src in cfg.sources:
        docs = [d for d in jsonl(f"{src}.jsonl") if d["split"] == "train"]
        assert m["sources"][src]["documents"] == len(docs)
        for lang in {d["language"] for d in docs}:
            comp = m["components"][f"{src}/{lang}"]
            assert comp["documents"] == sum(d["language"] == lang for d in docs)
            for f in comp["files"]:
                path = mpath.parent / f["path"]
                assert sha256_file(path) == f["sha256"] and path.stat().st_size == f["bytes"]
                shard = open_shard(path)
                assert len(shard.tokens) == f["tokens"] and shard.tokens.dtype == np.uint16
                # every document ends with EOS, and re-encoding the text gives the stored tokens
                ends = shard.offsets[1:] - 1
                assert (np.asarray(shard.tokens)[ends] == tok.eos_id).all()
    assert m["languages"]["eng"]["tokens"] == sum(c["tokens"] for c in m["components"].values()
                                                 if c["language"] == "eng")
    assert m["totals"]["tokens"] == sum(c["tokens"] for c in m["components"].values())
    first = [d for d in jsonl("udhr.jsonl") if d["language"] == "fra" and d["split"] == "train"][0]
    shard = open_shard(mpath.parent / m["components"]["udhr/fra"]["files"][0]["path"])
    assert list(shard.tokens[: shard.offsets[1]]) == tok.encode(first["text"]) + [tok.eos_id]


def test_second_prepare_is_instant_and_writes_nothing(prepared):
    """Nothing but the record of the full check it made (`verified.json`, see test_data_bad_input.py)."""
    from data.shards import VERIFIED

    cfg, mpath = prepared
    before = files_state(mpath.parent)
    assert prepare(cfg) == mpath
    after = files_state(mpath.parent)
    assert after.pop(mpath.parent / VERIFIED, None) is not None
    before.pop(mpath.parent / VERIFIED, None)
    assert after == before


def test_heldout_text_never_reaches_training_shards(prepared):
    cfg, mpath = prepared
    tok = load_tokenizer(mpath)
    train_text = []
    for comp in open_components(mpath).values():
        for sh in comp.shards:
            train_text += [tok.decode(sh.tokens[a:z]) for a, z in zip(sh.offsets[:-1], sh.offsets[1:])]
    held = [d for f in ("udhr.jsonl", "bible.jsonl") for d in jsonl(f) if d["split"] == "heldout"]
    assert len(held) == 10
    for d in held:
        for para in d["text"].split("\n"):
            if len(para) > 30:
                assert not any(para in t for t in train_text), para
    sets = heldout_sets(mpath)
    assert set(sets) == {"eng", "fra", "deu", "rus", "arb", "vie", "spa"}
    eng = [d["text"] for d in held if d["language"] == "eng"]
    assert tok.decode(sets["eng"].tolist()) == "".join(f"{t}<|endoftext|>" for t in
                                                       [eng[1], eng[0]])  # bible/eng, then udhr/eng
    by_comp = heldout_sets(mpath, by="component")
    assert set(by_comp) == {f"udhr/{l}" for l in ["eng", "fra", "deu", "rus", "arb", "vie"]} | \
        {f"bible/{l}" for l in ["eng", "fra", "spa", "deu"]}


def test_heldout_sets_read_only_the_tokens_an_evaluation_uses(prepared, tmp_path):
    """The loop (every rank, for the whole run) and the perplexity suite evaluate max_tokens_per_language tokens
    of each held-out text, but held the whole held-out split as int64: 40 MB here for 5 sources of 1M tokens,
    GBs per rank for a data set of one's own whose split is 1% of it. Now they read each set's first tokens only,
    which are the same tokens the whole read began with."""
    import tracemalloc

    from data.bench import synthetic_manifest

    _, mpath = prepared
    for by in ("language", "component"):
        whole = heldout_sets(mpath, by=by)
        first = heldout_sets(mpath, by=by, max_tokens=400)
        assert set(first) == set(whole) and all(np.array_equal(first[k], whole[k][:400]) for k in whole)
    assert len(heldout_sets(mpath)["eng"]) > 400 > len(whole["bible/eng"])  # the first 400 span two texts
    manifest = synthetic_manifest(tmp_path / "synthetic", 5_000)  # 5 sources x 5,000 documents of 1-400 tokens
    m = json.loads(manifest.read_text())
    m["heldout"], m["components"] = m["components"], {}
    manifest.write_text(json.dumps(m))
    tracemalloc.start()
    try:
        sets = heldout_sets(manifest, by="component", max_tokens=1025)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sorted(len(v) for v in sets.values()) == [1025] * 5
    assert sum(c["tokens"] for c in m["heldout"].values()) * 8 > 4e7 and peak < 1e6


def test_interrupted_run_leaves_nothing_trusted_and_rerun_completes(prepared, tmp_path):
    """Kill the process (SIGKILL, no cleanup) half-way through writing a shard, then prepare again."""
    _, clean = prepared
    root = tmp_path / "root"
    script = f"""
import os, signal
import data.prepare as P
from data.config import compose
from data.io import temporary_name
real, calls = P.write_shard, []
def dying(path, tokens, offsets, vocab):
    calls.append(path)
    if len(calls) == 8:  # a few shards in: write half a file under the temporary name, then die
        tmp = temporary_name(path)
        tmp.write_bytes(b"TRISTAGE" + b"\\0" * 100)
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path, tokens, offsets, vocab)
P.write_shard = dying
P.prepare(compose("fixture", ["root={root}"]))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    out = root / "fixture"
    assert not (out / "manifest.json").exists()
    assert list(out.rglob("*.tmp-*"))  # the half shard is there, under a name no reader looks at
    assert len(list(out.rglob("_done.json"))) < len(json.loads(clean.read_text())["sources"])
    mpath = prepare(compose("fixture", [f"root={root}"]))
    assert not list(out.rglob("*.tmp-*"))
    m, ref = verify(mpath), json.loads(clean.read_text())
    assert m["components"] == ref["components"] and m["heldout"] == ref["heldout"]


def test_a_full_disk_is_an_error_naming_the_file_and_a_rerun_finishes(prepared, tmp_path):
    """ENOSPC while writing a shard ended `python -m data.prepare` in a traceback; now one line naming the file,
    exit 1, no temporary file left and nothing that a reader would trust half-written."""
    _, clean = prepared
    root = tmp_path / "root"
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "prep.yaml").write_text("defaults:\n  - data: fixture\n  - _self_\nhydra:\n  output_subdir: null\n"
                                    f"  run:\n    dir: {tmp_path}/hydra\n")
    script = f"""
import errno, os, runpy, sys
import data.shards as S
from data.io import atomic_path
real, calls = S.write_shard, []
def full(path, tokens, offsets, vocab):
    calls.append(path)
    if len(calls) == 8:  # a few shards in, the disk is full half-way through one
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"TRISTAGE")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
    return real(path, tokens, offsets, vocab)
S.write_shard = full  # before `python -m data.prepare` imports it
sys.argv = ["prepare", "--config-dir", "{conf}", "--config-name", "prep", "data.root={root}"]
runpy.run_module("data.prepare", run_name="__main__", alter_sys=True)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"error: {re.escape(str(root))}/fixture/shards/\S+\.000\.tok\.tmp-\S+-\d+: No space left on "
                        rf"device; what is finished is kept: free space \(or fix the permissions\) and run the same "
                        rf"command again", line), line
    out = root / "fixture"
    assert not (out / "manifest.json").exists() and not list(out.rglob("*.tmp-*"))
    mpath = prepare(compose("fixture", [f"root={root}"]))
    m, ref = verify(mpath), json.loads(clean.read_text())
    assert m["components"] == ref["components"] and m["heldout"] == ref["heldout"]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_a_real_full_disk_names_the_file_it_was_writing(tmp_path):
    """The test above gives its OSError a file name; a real write()'s ENOSPC has none, and a full disk ended
    `python -m data.prepare` with `error: No space left on device`: no file, so no telling which disk. /dev/full fails
    every write with ENOSPC, as a full disk does."""
    from data.io import temporary_name
    from data.prepare import _os_error

    path = tmp_path / "eng.000.tok"
    tmp = temporary_name(path)
    tmp.symlink_to("/dev/full")  # where write_shard writes first
    with pytest.raises(OSError) as e:
        write_shard(path, np.arange(5000) % 1024, np.array([0, 5000]), 1024)
    assert (e.value.errno, e.value.filename) == (errno.ENOSPC, str(tmp))
    assert _os_error(e.value).startswith(f"{tmp}: No space left on device; what is finished is kept")
    assert not path.exists() and not tmp.is_symlink()


FULL_UNDER_DATASETS = """
import json, resource, signal, sys
from pathlib import Path
from data.config import compose
from data.prepare import _os_error, load_source, prepare, tokenize
from data.tokenizer import load_tokenizer
root, corpus, tok, stage = sys.argv[1:]
cfg = compose("fixture", [f"root={root}", f"tokenizer.path={tok}", "~sources",
                          f"+sources.j={{kind: local, options: {{paths: ['{corpus}']}}}}"])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as a full disk's ENOSPC
ds = load_source("j", cfg.sources["j"], cfg)[0] if stage == "tokenize" else None
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))  # the corpus's arrow copy and its ids are larger
try:
    prepare(cfg) if ds is None else tokenize(ds, load_tokenizer(tok), 1, "tokenize j")
except Exception as e:
    print(json.dumps([type(e).__name__, str(e), _os_error(e) if isinstance(e, OSError) else None]))
"""


@pytest.mark.parametrize("stage", ["load", "tokenize"])
def test_a_full_disk_under_datasets_names_its_cache_not_the_input(prepared, tmp_path, stage):
    """A write that `datasets` makes (the corpus converted to arrow, the token ids) failing for lack of space was
    `could not read <the user's file>: OSError: [Errno 28] No space left on device` (the file is fine), or the bare
    `error: No space left on device`. A real write failure: the file size limit (EFBIG), in a process of its own."""
    _, mpath = prepared
    corpus = tmp_path / "big.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i} " + "lorem ipsum dolor " * 50}) + "\n"
                              for i in range(300)))
    tok = mpath.parent / verify(mpath)["tokenizer"]["path"]
    root = tmp_path / "root"
    proc = subprocess.run([sys.executable, "-c", FULL_UNDER_DATASETS, str(root), str(corpus), str(tok), stage],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    kind, message, cli = json.loads(proc.stdout.strip().splitlines()[-1])
    assert kind == "OSError" and str(corpus) not in message, (kind, message)
    assert re.fullmatch(rf"\[Errno {errno.EFBIG}\] File too large: '{re.escape(str(root / 'hf'))}\S*'", message)
    assert cli.startswith(f"{root / 'hf'}") and ": File too large; what is finished is kept" in cli


def test_rerun_with_changed_config_reuses_finished_sources(prepared, tmp_path):
    cfg, _ = prepared
    root = tmp_path / "root"
    mpath = prepare(compose("fixture", [f"root={root}"]))
    done = {p: p.stat().st_mtime_ns for p in (root / "fixture" / "shards").rglob("_done.json")}
    m2 = prepare(compose("fixture", [f"root={root}", "+sources.udhr.languages=[eng,fra]"]))
    assert m2 == mpath
    m = verify(mpath)
    assert sorted(k for k in m["components"] if k.startswith("udhr/")) == ["udhr/eng", "udhr/fra"]
    assert sorted(k for k in m["heldout"] if k.startswith("udhr/")) == ["udhr/eng", "udhr/fra"]
    for p, t in done.items():  # the other sources were not tokenized again; the old udhr shards stay untouched
        assert p.stat().st_mtime_ns == t
    assert len(list((root / "fixture" / "shards").glob("udhr-*"))) == 2


def test_local_parquet_and_text_sources(prepared, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    cfg, mpath = prepared
    pq.write_table(pa.table({"body": ["Hallo Welt. " * 20, "Bonjour le monde. " * 20], "lang": ["deu", "fra"]}),
                   tmp_path / "a.parquet")
    (tmp_path / "b.txt").write_text("first line\nsecond line of one document\n")
    tok = str(mpath.parent / verify(mpath)["tokenizer"]["path"])
    m = json.loads(prepare(compose("fixture", [
        f"root={tmp_path / 'root'}", f"tokenizer.path={tok}", "~sources",
        f"+sources.pq={{kind: local, options: {{paths: ['{tmp_path}/*.parquet'], text_field: body, "
        f"language_field: lang}}}}",
        f"+sources.txt={{kind: local, options: {{paths: ['{tmp_path}/b.txt'], language: eng}}}}"])).read_text())
    assert sorted(m["components"]) == ["pq/deu", "pq/fra", "txt/eng"]
    assert m["components"]["txt/eng"]["documents"] == 1  # a text file is one document
    # the given tokenizer is copied into the data set, so the manifest points at nothing outside its root
    assert m["tokenizer"]["path"].startswith("tokenizer-file-")
    assert m["tokenizer"]["fingerprint"] == load_tokenizer(tok).fingerprint


@pytest.mark.parametrize("source, message", [
    ("{kind: local, options: {paths: [nowhere/*.jsonl]}}", "no file matches nowhere/"),
    ("{kind: local, options: {paths: [tests/fixtures/corpus/udhr.jsonl], text_field: body}}", "no column 'body'"),
    ("{kind: local, options: {paths: [tests/fixtures/corpus/udhr.jsonl], pathz: []}}", "bad options"),
    ("{kind: wiki}", "unknown kind 'wiki'"),
    ("{kind: local, options: {paths: [tests/fixtures/corpus/udhr.jsonl], language_field: id}}",
     "language 'udhr/[a-z]+' is not a safe file name"),
])
def test_bad_source_configs_are_refused(tmp_path, source, message):
    with pytest.raises(DataError, match=message):
        prepare(compose("fixture", [f"root={tmp_path}", "~sources", f"+sources.bad={source}"]))


def test_hub_source_without_network_is_a_clear_error(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="hub data set 'wikitext' could not be loaded.*use a `local` source"):
        prepare(compose("fixture", [f"root={tmp_path}", "~sources",
                                    "+sources.wiki={kind: hub, options: {dataset: wikitext}}"]))


def test_hub_source_on_a_full_disk_names_the_disk_not_the_network(tmp_path, monkeypatch):
    """A download that fills the disk was reported as 'needs a network' (every OSError was). Offline, the failure
    of the download itself is stood in for: datasets' own error, an ENOSPC without a file name."""
    import errno

    import datasets

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(datasets, "load_dataset", full)
    with pytest.raises(OSError) as err:
        prepare(compose("fixture", [f"root={tmp_path}", "~sources",
                                    "+sources.wiki={kind: hub, options: {dataset: wikitext}}"]))
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(tmp_path / "hf")
    assert "network" not in str(err.value)


def test_reasoning_recipe_records_generator_seeds(prepared, tmp_path):
    cfg, mpath = prepared
    tok = str(mpath.parent / verify(mpath)["tokenizer"]["path"])
    m = prepare(compose("fixture", [f"root={tmp_path}", f"tokenizer.path={tok}", "~sources",
                                    "+sources.rg={kind: reasoning_gym, options: {tasks: "
                                    "{chain_sum: {size: 20, seed: 5}}}}"]))
    rec = verify(m)["sources"]["rg"]
    assert rec["generator_seeds"] == {"chain_sum": {"seed": 5, "size": 20, "first_unused_seed": 25}}
    assert rec["documents"] == 20 and rec["package"] == "pypi reasoning-gym==0.1.25"
    assert reasoning_eval_seed(m, "chain_sum") == 25
    with pytest.raises(DataError, match="no reasoning_gym source generated task 'gsm_symbolic'"):
        reasoning_eval_seed(m, "gsm_symbolic")


def test_uint32_shards_for_large_vocabularies(tmp_path):
    tokens = np.array([5, 151_643, 70_000, 151_668, 1], dtype=np.int64)
    entry = write_shard(tmp_path / "x.tok", tokens, np.array([0, 2, 5]), vocab_size=151_669)
    shard = open_shard(tmp_path / "x.tok", "uint32")
    assert shard.tokens.dtype == np.uint32 and list(shard.tokens) == tokens.tolist()
    assert list(shard.doc_lengths) == [2, 3] and entry["sha256"] == sha256_file(tmp_path / "x.tok")
    with pytest.raises(DataError, match="4 bytes per token at byte offset 12, expected 2"):
        open_shard(tmp_path / "x.tok", "uint16")


def test_a_changed_shard_size_is_not_served_from_the_old_shards(tmp_path):
    """m12 (shard_tokens dropped from the shard folder's cache key): config_key changes, so the manifest is
    rebuilt, but the sources' finished shards of the old size are reused: data.shard_tokens has no effect on a
    data root that was prepared before."""
    from data.config import compose
    from data.prepare import prepare
    from data.shards import verify

    root = tmp_path / "d"
    prepare(compose("fixture", [f"root={root}"]))
    m = verify(prepare(compose("fixture", [f"root={root}", "shard_tokens=1000"])))
    files = [f for c in m["components"].values() for f in c["files"]]
    assert any(len(c["files"]) > 1 for c in m["components"].values())
    assert all(f["tokens"] <= 1000 or f["documents"] == 1 for f in files)  # a shard holds >= 1 whole document
