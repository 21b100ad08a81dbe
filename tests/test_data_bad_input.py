"""Damaged data is refused at start: the error names the file (and byte offset), the exit is non-zero and
nothing is overwritten. One test per case."""
import hashlib
import json
import logging
import os
import re
import shutil
import time
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data.config import compose
from data.errors import DataError
from data.prepare import prepare
from data.shards import HEADER_BYTES, verify

REPO = Path(__file__).resolve().parents[1]


def E(p) -> str:
    """A path as a regex."""
    return re.escape(str(p))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine")
    prepare(compose("fixture", [f"root={root}"]))
    return root


@pytest.fixture
def data(pristine, tmp_path):
    """A fresh copy of the prepared fixture: (config, manifest path, manifest, first shard path)."""
    root = tmp_path / "root"
    shutil.copytree(pristine, root)
    cfg = compose("fixture", [f"root={root}"])
    mpath = root / "fixture" / "manifest.json"
    m = json.loads(mpath.read_text())
    shard = mpath.parent / m["components"]["udhr/fra"]["files"][0]["path"]
    return cfg, mpath, m, shard


def snapshot(folder: Path) -> dict:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(cfg, mpath, pattern, **verify_kwargs):
    """verify and prepare both raise a DataError matching `pattern`, and prepare changes no file."""
    with pytest.raises(DataError, match=pattern):
        verify(mpath, **verify_kwargs)
    if verify_kwargs:  # the condition lives in the caller's arguments, not on disk
        return
    before = snapshot(mpath.parent)
    with pytest.raises(DataError, match=pattern):
        prepare(cfg)
    assert snapshot(mpath.parent) == before


def refused_source(data, files, pattern):
    """prepare with one more `local` source reading `files` raises a DataError matching `pattern` and changes no file
    of the prepared data set."""
    _, mpath, _, _ = data
    paths = ", ".join(f"'{f}'" for f in files)
    cfg = compose("fixture", [f"root={mpath.parent.parent}",
                              f"+sources.x={{kind: local, options: {{paths: [{paths}]}}}}"])
    verify(mpath, remember=True)  # prepare's own check writes this record of it first: not a change to the data
    before = snapshot(mpath.parent)
    with pytest.raises(DataError, match=pattern):
        prepare(cfg)
    assert snapshot(mpath.parent) == before


def test_pristine_copy_verifies(data):
    cfg, mpath, m, _ = data
    assert verify(mpath)["name"] == "fixture"
    assert prepare(cfg) == mpath


def test_truncated_shard(data):
    cfg, mpath, _, shard = data
    size = shard.stat().st_size
    os.truncate(shard, size - 10)
    refused(cfg, mpath, rf"{E(shard)}: truncated: the header promises {size} bytes, the file has {size - 10} "
                        rf"\(data ends at byte offset {size - 10}\)")


def test_wrong_magic(data):
    cfg, mpath, _, shard = data
    with open(shard, "r+b") as f:
        f.write(b"NOTASHRD")
    refused(cfg, mpath, rf"{E(shard)}: wrong magic b'NOTASHRD' at byte offset 0")


def test_checksum_mismatch(data):
    cfg, mpath, _, shard = data
    tokens = np.memmap(shard, dtype="<u2", mode="r+", offset=HEADER_BYTES, shape=(4,))
    tokens[2] = 300 if tokens[2] != 300 else 301  # a valid id, so only the checksum can tell
    tokens.flush()
    del tokens
    refused(cfg, mpath, rf"{E(shard)}: checksum mismatch: sha256 [0-9a-f]{{64}} but {E(mpath)} says")


def test_token_id_not_below_vocab_size(data):
    cfg, mpath, _, shard = data
    tokens = np.memmap(shard, dtype="<u2", mode="r+", offset=HEADER_BYTES, shape=(4,))
    tokens[3] = 5000  # vocab is 1024
    tokens.flush()
    del tokens
    refused(cfg, mpath, rf"{E(shard)}: token id 5000 >= vocab size 1024 at token 3 \(byte offset {HEADER_BYTES + 6}\)")


def test_token_id_not_below_the_models_vocab_size(data):
    cfg, mpath, _, shard = data
    # the shards are fine for the tokenizer (1024) but not for a model with a 300-row embedding
    refused(cfg, mpath, r"token id \d+ >= vocab size 300 at token \d+ \(byte offset \d+\)", vocab_size=300)


def test_tokenizer_fingerprint_differs_from_manifest(data):
    cfg, mpath, m, _ = data
    refused(cfg, mpath, rf"{E(mpath)}: the shards were tokenized with tokenizer {m['tokenizer']['fingerprint']}, "
                        r"but this run uses sentencepiece-0123456789abcdef",
            tokenizer_fingerprint="sentencepiece-0123456789abcdef")


def test_tokenizer_file_changed_since_the_shards_were_written(data):
    cfg, mpath, m, _ = data
    tok = mpath.parent / m["tokenizer"]["path"]
    tok.write_bytes(tok.read_bytes() + b"\0")
    refused(cfg, mpath, rf"{E(tok)}: tokenizer file changed")


def test_missing_file(data):
    cfg, mpath, _, shard = data
    shard.unlink()
    refused(cfg, mpath, rf"{E(shard)}: shard file is missing")


def test_manifest_path_escaping_the_data_root(data):
    cfg, mpath, m, _ = data
    m["components"]["udhr/fra"]["files"][0]["path"] = "../../../etc/passwd"
    mpath.write_text(json.dumps(m))
    refused(cfg, mpath, rf"{E(mpath)}: path '../../../etc/passwd' escapes the data root")
    m["components"]["udhr/fra"]["files"][0]["path"] = "/etc/passwd"
    mpath.write_text(json.dumps(m))
    refused(cfg, mpath, rf"{E(mpath)}: path '/etc/passwd' escapes the data root")


def test_a_symlinked_shards_folder_stays_inside_the_data_set(data, tmp_path):
    """Shards moved to a scratch disk and linked back: refused as 'escapes the data root' before, since the check
    resolved the link. The path as written is checked instead; `..` still escapes."""
    cfg, mpath, m, shard = data
    scratch = tmp_path / "scratch" / "shards"
    scratch.parent.mkdir()
    shutil.move(mpath.parent / "shards", scratch)
    (mpath.parent / "shards").symlink_to(scratch)
    assert verify(mpath)["components"] == m["components"]
    assert prepare(cfg) == mpath
    m["components"]["udhr/fra"]["files"][0]["path"] = "shards/../../../etc/passwd"
    mpath.write_text(json.dumps(m))
    with pytest.raises(DataError, match=rf"{E(mpath)}: path 'shards/../../../etc/passwd' escapes the data root"):
        verify(mpath)


def test_manifest_that_is_not_json(data):
    cfg, mpath, _, _ = data
    mpath.write_text("{ not json")
    refused(cfg, mpath, rf"{E(mpath)}: cannot read JSON")


def prepare_cli(tmp_path, root, *overrides: str) -> subprocess.CompletedProcess:
    """`python -m data.prepare` on the fixture under `root` (and `overrides`), with a data-only primary config (so
    that the test does not depend on train's schema)."""
    conf = tmp_path / "conf"
    conf.mkdir(exist_ok=True)
    (conf / "prep.yaml").write_text("defaults:\n  - data: fixture\n  - _self_\nhydra:\n  output_subdir: null\n"
                                    f"  run:\n    dir: {tmp_path}/hydra\n")
    return subprocess.run([sys.executable, "-m", "data.prepare", "--config-dir", str(conf), "--config-name", "prep",
                           f"data.root={root}", *overrides], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_cli_exits_non_zero_naming_the_file_and_overwrites_nothing(data, tmp_path):
    _, mpath, m, _ = data
    tokens = m["components"]["sotu/eng"]["tokens"]
    m["components"]["sotu/eng"]["tokens"] = 1000 * tokens
    mpath.write_text(json.dumps(m))
    before = snapshot(mpath.parent)
    proc = prepare_cli(tmp_path, mpath.parent.parent)
    assert proc.returncode == 1, proc.stderr
    assert (f"error: {mpath}: malformed manifest: components.sotu/eng.tokens is {1000 * tokens}, but its files "
            f"hold {tokens}") in proc.stderr
    assert snapshot(mpath.parent) == before


@pytest.mark.parametrize("override, message", [
    ("tokenizer.alpha=nan", "config key 'data.tokenizer.alpha' = nan: must be in [0, 1]"),
    ("tokenizer.alpha=-0.5", "config key 'data.tokenizer.alpha' = -0.5: must be in [0, 1]"),
    ("shard_tokens=0", "config key 'data.shard_tokens' = 0: must be at least 1"),
    ("shard_tokens=-5", "config key 'data.shard_tokens' = -5: must be at least 1"),
    ("num_proc=0", "config key 'data.num_proc' = 0: must be at least 1 (or null: all cores)"),
    ("num_proc=-3", "config key 'data.num_proc' = -3: must be at least 1 (or null: all cores)"),
])
def test_a_data_config_value_prepare_cannot_use_is_named_and_nothing_is_written(data, tmp_path, override, message):
    """alpha=nan was a 'cannot convert float NaN to integer' traceback from the tokenizer's sample; shard_tokens <= 0
    wrote one document per shard file; num_proc <= 0 was taken as all cores (null's meaning)."""
    _, mpath, _, _ = data
    before = snapshot(mpath.parent)
    with pytest.raises(DataError) as e:
        prepare(compose("fixture", [f"root={mpath.parent.parent}", override]))
    assert str(e.value).startswith(message)
    with pytest.raises(DataError, match=re.escape(message)):
        prepare(compose("fixture", [f"root={tmp_path / 'fresh'}", override]))
    assert snapshot(mpath.parent) == before and not (tmp_path / "fresh").exists()


def test_cli_names_a_bad_data_config_value_and_writes_nothing(data, tmp_path):
    """`python -m data.prepare data.tokenizer.alpha=nan` ended in a traceback; now one line naming the key and the
    value (exit 1, prepare's code for what it refuses; train exits 2)."""
    _, mpath, _, _ = data
    before = snapshot(mpath.parent)
    proc = prepare_cli(tmp_path, mpath.parent.parent, "data.tokenizer.alpha=nan")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: config key 'data.tokenizer.alpha' = nan: ")
    assert snapshot(mpath.parent) == before


def test_cli_tokenizes_the_source_of_a_damaged_shard_again(data, tmp_path):
    """Before, `python -m data.prepare` refused a damaged shard (exit 1) even with the manifest moved away, since
    the source's _done.json was trusted and then failed its check: nothing but deleting the right folder by hand
    repaired it. Shards are derived data: the source is tokenized again, said on stderr, the others reused."""
    _, mpath, _, shard = data
    before = snapshot(mpath.parent)
    os.truncate(shard, shard.stat().st_size - 1)
    proc = prepare_cli(tmp_path, mpath.parent.parent)
    assert proc.returncode == 0, proc.stderr
    assert f"warning: {shard}: truncated: the header promises" in proc.stderr
    assert "shards are derived data, tokenizing source 'udhr' again" in proc.stderr
    assert "tokenizing source 'bible'" not in proc.stderr
    assert snapshot(mpath.parent) == before  # the same bytes again; the manifest (and so the index caches) kept


def test_a_damaged_shard_without_its_manifest_is_tokenized_again_by_prepare_and_refused_to_train(data, capsys):
    """prepare(cfg) is what train calls: it keeps refusing, and says how to repair; prepare(cfg, repair=True) is
    the CLI's."""
    cfg, mpath, m, shard = data
    before = snapshot(mpath.parent)
    shard.unlink()
    mpath.unlink()  # moved away: the source's own record of its shards was trusted, then failed its check
    with pytest.raises(DataError, match=rf"^{E(shard)}: shard file is missing; shards are derived data: "
                                        rf"`python -m data.prepare` with this run's data settings tokenizes the "
                                        rf"damaged source again$"):
        prepare(cfg)
    assert prepare(cfg, repair=True) == mpath
    assert f"warning: {shard}: shard file is missing: shards are derived data, tokenizing source 'udhr' again" \
        in capsys.readouterr().err
    after = snapshot(mpath.parent)
    assert after.pop(mpath) != before.pop(mpath)  # written anew: another creation time
    assert after == before
    assert {k: v for k, v in verify(mpath).items() if k != "created"} == {k: v for k, v in m.items() if k != "created"}


def test_a_full_check_is_remembered_and_only_changed_shards_are_read_again(data, monkeypatch):
    """Every rank verifies the data at every launch: a full read of a data set of TBs each time, before this. The
    shards a full check passed are recorded by size and mtime; an unchanged one gets the header and size checks."""
    import data.shards as shards

    _, mpath, m, shard = data
    old = time.time() - 3600
    for p in (mpath.parent / "shards").rglob("*.tok"):
        os.utime(p, (old, old))  # written an hour ago: outside the racy window
    hashed = []
    sha = shards.sha256_file
    monkeypatch.setattr(shards, "sha256_file", lambda p, *a: hashed.append(Path(p).suffix) or sha(p, *a))
    verify(mpath, remember=True)
    n_shards = sum(1 for _ in shards.manifest_files(m))
    assert hashed.count(".tok") == n_shards and (mpath.parent / shards.VERIFIED).is_file()
    hashed.clear()
    verify(mpath, remember=True)
    assert hashed.count(".tok") == 0  # nothing read in full
    raw = bytearray(shard.read_bytes())
    raw[HEADER_BYTES] ^= 1  # one token changed in place: same size, new mtime
    shard.write_bytes(bytes(raw))
    hashed.clear()
    with pytest.raises(DataError, match=f"{E(shard)}: checksum mismatch"):
        verify(mpath, remember=True)
    assert hashed.count(".tok") == 1
    # ids checked below the tokenizer's 1024 are below a model's 2048 too; the other way round is a new check
    shard.write_bytes(bytes(raw[:HEADER_BYTES]) + bytes([raw[HEADER_BYTES] ^ 1]) + bytes(raw[HEADER_BYTES + 1:]))
    os.utime(shard, (old, old))
    verify(mpath, remember=True)
    hashed.clear()
    verify(mpath, vocab_size=2048, remember=True)
    assert hashed.count(".tok") == 0
    (mpath.parent / shards.VERIFIED).unlink()
    shards._VERIFIED_HERE.clear()
    verify(mpath, vocab_size=2048, remember=True)
    hashed.clear()
    verify(mpath, remember=True)
    assert hashed.count(".tok") == n_shards
    # a copy of the data set, mtimes and record included (cp -a, rsync -a), is read in full: other inodes
    copy = mpath.parent.parent / "copy"
    shutil.copytree(mpath.parent, copy)
    hashed.clear()
    verify(copy / "manifest.json", remember=True)
    assert hashed.count(".tok") == n_shards
    # a shard written just now is not recorded: a write in the same clock tick would leave its mtime as it is
    shard.write_bytes(shard.read_bytes())
    verify(mpath, remember=True)
    assert m["components"]["udhr/fra"]["files"][0]["path"] not in json.loads(
        (mpath.parent / shards.VERIFIED).read_text())["files"]


def test_an_empty_local_file_is_named(data, tmp_path, caplog):
    """Before: `could not read .../empty.jsonl: StopIteration`; and an empty file among others was skipped unsaid."""
    empty, blank, good = tmp_path / "empty.jsonl", tmp_path / "blank.jsonl", tmp_path / "good.jsonl"
    empty.write_text("")
    blank.write_text("\n  \n")
    good.write_text('{"text": "a document"}\n')
    refused_source(data, [empty], rf"source 'x': {E(empty)} is empty \(no documents\)$")
    refused_source(data, [empty, blank], rf"source 'x': all 2 files are empty \(no documents\): "
                                         rf"\['{E(empty)}', '{E(blank)}'\]")
    from data.recipes import local

    caplog.set_level(logging.WARNING, logger="data.recipes.local")
    ds, _, prov = local.load(local.Options(paths=[str(good), str(empty)]), tmp_path / "hf", "x")
    assert ds["text"] == ["a document"] and prov["files"] == [str(good)]
    assert f"source 'x': {empty} is empty (no documents); reading the other files" in caplog.text


@pytest.mark.parametrize("content, where, what", [
    ('{"text": "a"}\n\n{"body": "b"}\n', "line 3", r"has no field 'text' \(its fields: \['body'\]; options.text_field"),
    ('{"text": "a"}\n{"text": null}\n', "line 2", r"has no text \(null in field 'text'\)"),
    ('[{"text": "a"}, {"Text": "b"}]', r"element 1 \(counting from 0\)",
     r"has no field 'text' \(its fields: \['Text'\]"),
])
def test_a_record_without_text_is_named_by_file_and_line(data, tmp_path, content, where, what):
    """Before: `document 1 (counting from 0 over its files in order) has no text`, no file or line."""
    bad = tmp_path / ("bad.json" if content.startswith("[") else "bad.jsonl")
    bad.write_text(content)
    refused_source(data, [bad], rf"source 'x': {E(bad)} {where} {what}")
    if "null" in content:  # the row counts on over the files before it (other columns would not load together)
        good = tmp_path / "good.jsonl"
        good.write_text('{"text": "first"}\n{"text": "second"}\n')
        refused_source(data, [good, bad], rf"source 'x': {E(bad)} {where} {what}")


@pytest.mark.parametrize("name, rows, where, what", [
    ("mixed.jsonl", [{"text": "a"}, {"text": 5}], "line 2", "int 5"),  # a JSON column of mixed types (arrow.json)
    ("numbers.jsonl", [{"text": 5}, {"text": 6}], "line 1", "int 5"),  # an int64 column
    ("object.jsonl", [{"text": "a"}, {"text": {"body": "b"}}], "line 2", r"dict \{'body': 'b'\}"),
    ("numbers.parquet", [{"text": 1.5}], r"row 0 \(counting from 0\)", r"float 1\.5"),
])
def test_a_text_that_is_not_a_string_is_named_with_file_line_and_type(data, tmp_path, name, rows, where, what):
    """Before: `column 'text' holds extension<arrow.json>, not text` (or int64): no file, no line, no value."""
    bad = tmp_path / name
    if bad.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), bad)
    else:
        bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    refused_source(data, [bad], rf"source 'x': {E(bad)} {where} has {what} in field 'text', not a string$")


def test_a_token_id_equal_to_the_vocabulary_size_is_refused(tmp_path):
    from data.shards import check_token_range, open_shard, write_shard

    path = tmp_path / "s.bin"
    write_shard(path, np.array([1, 2, 1024, 3], np.uint16), np.array([0, 4]), 1024)
    with pytest.raises(DataError, match="token id 1024 >= vocab size 1024 at token 2"):
        check_token_range(open_shard(path), 1024)


def test_a_document_offset_one_below_its_predecessor_is_refused(tmp_path):
    """Offsets must not decrease, by any amount: a one-token step back names the document and its byte offset."""
    from data.shards import _layout, open_shard, write_shard

    path = tmp_path / "s.bin"
    write_shard(path, np.arange(6, dtype=np.uint16), np.array([0, 3, 4, 6]), 1024)
    off, _ = _layout(2, 6, 3)
    offsets = np.memmap(path, dtype="<u8", mode="r+", offset=off, shape=(4,))
    offsets[:] = [0, 4, 3, 6]  # document 2 starts one token before document 1
    offsets.flush()
    del offsets
    with pytest.raises(DataError, match=rf"document offset 2 is inconsistent \(byte offset {off + 16}\)"):
        open_shard(path)


def test_token_width_and_the_8_byte_aligned_offsets_table():
    """uint16 holds every id of a 65,536-token vocabulary (uint32 from 65,537); the offsets table starts on an
    8-byte boundary after any number of tokens (the format on disk: a reader padding otherwise misreads them)."""
    from data.shards import _layout, token_dtype

    assert token_dtype(1 << 16) == np.uint16 and token_dtype((1 << 16) + 1) == np.uint32
    assert [_layout(2, n, 1)[0] - HEADER_BYTES for n in (1, 3, 4, 5)] == [8, 8, 8, 16]
    assert _layout(4, 3, 2) == (HEADER_BYTES + 16, HEADER_BYTES + 16 + 24)
