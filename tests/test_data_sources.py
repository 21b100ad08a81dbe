"""Local sources and reruns of `prepare`: what changed is prepared again, what cannot be read is named, and the
command line can add a source. Each case here was a wrong data set or a traceback before it was fixed."""
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest

from data.config import LengthBucketConfig, MixtureConfig, compose
from data.errors import DataError
from data.heldout import heldout_sets
from data.io import HOST, STALE_AFTER_S, TMP_MARK, atomic_path, remove_stale_tmp
from data.loader import plan_mixture
from data.prepare import prepare
from data.shards import verify
from data.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fixture_manifest(tmp_path_factory):
    return prepare(compose("fixture", [f"root={tmp_path_factory.mktemp('fixture')}"]))


@pytest.fixture(scope="module")
def tokenizer(fixture_manifest):
    """The fixture's trained tokenizer, given by `tokenizer.path` so that no test here trains one."""
    return str(fixture_manifest.parent / verify(fixture_manifest)["tokenizer"]["path"])


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def local(tmp_path, tokenizer, options: str, extra=()):
    return compose("fixture", [f"root={tmp_path / 'root'}", f"tokenizer.path={tokenizer}", "~sources",
                               f"+sources.j={{kind: local, options: {{{options}}}}}", *extra])


def decoded(manifest, tokenizer, section="components"):
    """Text of every document per component of a prepared data set."""
    from data.shards import open_shard

    tok, m, out = load_tokenizer(tokenizer), verify(manifest), {}
    for key, comp in m[section].items():
        for f in comp["files"]:
            s = open_shard(manifest.parent / f["path"])
            out.setdefault(key, []).extend(tok.decode(s.tokens[a:b].tolist())
                                           for a, b in zip(s.offsets[:-1], s.offsets[1:]))
    return out


def test_changed_column_options_prepare_again_and_keep_heldout_text_out_of_training(tmp_path, tokenizer):
    """The same files read with another split / language / text column are other data: before, the first
    preparation's shards were reused, and a document meant to be held out stayed in training."""
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": "training document one", "part": "train", "body": "b one"},
                                           {"text": "SECRET heldout document", "part": "heldout", "body": "b two"}])
    first = decoded(prepare(local(tmp_path, tokenizer, f"paths: ['{f}'], language: eng")), tokenizer)
    assert any("SECRET" in d for d in first["j/eng"])
    m = prepare(local(tmp_path, tokenizer, f"paths: ['{f}'], language: eng, split_field: part"))
    assert not any("SECRET" in d for d in decoded(m, tokenizer)["j/eng"])
    assert [d.removesuffix("<|endoftext|>") for d in decoded(m, tokenizer, "heldout")["j/eng"]] == [
        "SECRET heldout document"]
    m = prepare(local(tmp_path, tokenizer, f"paths: ['{f}'], language: fra, split_field: part, text_field: body"))
    assert list(decoded(m, tokenizer)) == ["j/fra"] and decoded(m, tokenizer)["j/fra"][0].startswith("b one")


def test_an_edited_local_file_or_tokenizer_file_is_prepared_again(tmp_path, tokenizer):
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": "one short document"}])
    cfg = local(tmp_path, tokenizer, f"paths: ['{f}']")
    before = verify(prepare(cfg))["totals"]["tokens"]
    write_jsonl(f, [{"text": "one short document"}, {"text": "and a second, longer document than the first"}])
    after = verify(prepare(cfg))
    assert after["totals"]["tokens"] > before and after["totals"]["documents"] == 2
    # the same files with new mtimes (a copy, a git clone): nothing to prepare, the manifest stays as it is, and
    # the new mtime is recorded, so the file is hashed once, not at every launch
    manifest = (tmp_path / "root" / "fixture" / "manifest.json").read_bytes()
    os.utime(f, (1e9, 1e9))
    prepare(cfg)
    assert (tmp_path / "root" / "fixture" / "manifest.json").read_bytes() == manifest
    inputs = json.loads((tmp_path / "root" / "fixture" / "inputs.json").read_text())
    assert inputs["data.sources.j"][str(f)][1] == 10**18
    # the raw files gone (the prepared data set copied elsewhere): it still opens as it is
    f.unlink()
    assert verify(prepare(cfg))["totals"] == after["totals"]

    own = tmp_path / "own.model"
    own.write_bytes(Path(tokenizer).read_bytes())
    g = write_jsonl(tmp_path / "g.jsonl", [{"text": "text"}])
    cfg = compose("fixture", [f"root={tmp_path / 'root2'}", f"tokenizer.path={own}", "~sources",
                              f"+sources.j={{kind: local, options: {{paths: ['{g}']}}}}"])
    first = verify(prepare(cfg))["tokenizer"]["fingerprint"]
    other = prepare(compose("fixture", [f"root={tmp_path / 'other'}", "tokenizer.vocab_size=600"]))
    own.write_bytes(Path(other.parent / verify(other)["tokenizer"]["path"]).read_bytes())
    second = verify(prepare(cfg))["tokenizer"]
    assert second["fingerprint"] != first and second["vocab_size"] == 600


def test_a_rerun_says_which_sources_it_tokenized_again_and_which_it_reused(tmp_path, tokenizer, caplog):
    """Editing one local source retrained the tokenizer (it learns from every source's text) and so tokenized every
    source again, while the log said "(finished shards are reused)". It now says what it did."""
    corpus = tmp_path / "corpus"
    shutil.copytree(REPO / "tests" / "fixtures" / "corpus", corpus)
    paths = [f"sources.{n}.options.paths=['{corpus / n}.jsonl']"
             for n in ("udhr", "bible", "reasoning", "code", "sotu")]
    code = corpus / "code.jsonl"
    caplog.set_level(logging.INFO, logger="data.prepare")
    for extra in ([], [f"tokenizer.path={tokenizer}"]):  # a tokenizer trained on the sources; a given one
        cfg = compose("fixture", [f"root={tmp_path / f'root{len(extra)}'}", *paths, *extra])
        old = verify(prepare(cfg))["tokenizer"]["fingerprint"]
        code.write_text(code.read_text().replace("def ", "dEf ", 1))  # the next one each time
        caplog.clear()
        new = verify(prepare(cfg))["tokenizer"]["fingerprint"]
        assert "data set fixture: the files of data.sources.code changed, preparing again\n" in caplog.text
        assert "reused)" not in caplog.text
        if extra:
            assert new == old and ("data set fixture: sources tokenized again: code; shards reused: udhr, bible, "
                                   "reasoning, sotu\n") in caplog.text
        else:
            assert new != old and (f"data set fixture: sources tokenized again: udhr, bible, reasoning, code, sotu; "
                                   f"shards reused: none; the tokenizer changed ({old} -> {new}): shards of the old "
                                   f"one are not reused\n") in caplog.text


def test_the_same_files_at_another_path_are_not_prepared_again(tmp_path, tokenizer, monkeypatch, caplog):
    """A data set prepared in one checkout and used from another: the GPU machine holds the tree at another path,
    with the prepared folder carried over. inputs.json names the files by absolute path, and other names counted as
    changed files, so the data was prepared again there, which needs `datasets` (absent on that machine)."""
    here, there = tmp_path / "here", tmp_path / "there"
    for repo in (here, there):
        shutil.copytree(REPO / "tests" / "fixtures" / "corpus", repo / "tests" / "fixtures" / "corpus")
    cfg = compose("fixture", [f"root={tmp_path / 'root'}", f"tokenizer.path={tokenizer}"])
    monkeypatch.chdir(here)  # the fixture's relative paths are looked up in the cwd first
    mpath = prepare(cfg)
    manifest = mpath.read_bytes()

    monkeypatch.chdir(there)
    monkeypatch.setitem(sys.modules, "datasets", None)  # as on the GPU machine: `import datasets` fails
    caplog.set_level(logging.INFO, logger="data.prepare")
    assert prepare(cfg) == mpath and mpath.read_bytes() == manifest
    assert "is prepared and verified" in caplog.text and "preparing again" not in caplog.text
    inputs = json.loads((mpath.parent / "inputs.json").read_text())
    assert list(inputs["data.sources.udhr"]) == [str(there / "tests/fixtures/corpus/udhr.jsonl")]  # restamped

    # other content at another path is still a change (same size: one letter differs), and only that source's
    code = here / "tests/fixtures/corpus/code.jsonl"
    code.write_text(code.read_text().replace("def ", "dEf ", 1))
    monkeypatch.chdir(here)
    caplog.clear()
    with pytest.raises(ImportError):  # it prepares again, so it needs `datasets`
        prepare(cfg)
    assert "data set fixture: the files of data.sources.code changed, preparing again" in caplog.text


def test_a_source_added_on_the_command_line_is_prepared(tmp_path, tokenizer):
    """`python -m data.prepare '+data.sources.x={...}'` (the README's way): OmegaConf refused to add a plain dict to a
    dict of dataclasses, so this failed with 'dict is not a subclass of SourceConfig'."""
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": "a document added from the command line", "language": "eng"}])
    env = {**os.environ, "TRISTAGE_DATA_ROOT": str(tmp_path / "root")}
    args = [sys.executable, "-m", "data.prepare", "data=fixture", f"data.root={tmp_path / 'root'}",
            f"data.tokenizer.path={tokenizer}"]
    proc = subprocess.run([*args, f"+data.sources.x={{kind: local, options: {{paths: ['{f}']}}}}"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "x/eng" in verify(Path(proc.stdout.strip().splitlines()[-1]))["components"]
    proc = subprocess.run([*args, "+data.sources.x={kind: local, langauges: [eng]}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "data.sources.x: Key 'langauges' not in 'SourceConfig'" in proc.stderr
    assert (proc.stdout + proc.stderr).count("Key 'langauges'") == 1, proc.stderr  # said once (a log line repeated it)


@pytest.mark.parametrize("rows, extra, message", [
    ([{"text": "a"}, {"text": None}], [], r"source 'j': .*d\.jsonl line 2 has no text \(null in field 'text'\)"),
    ([{"text": 5}], [], r"d\.jsonl line 1 has int 5 in field 'text', not a string"),
    ([{"text": "a", "language": "heldout-eng"}], [], "language 'heldout-eng': names starting with 'heldout-'"),
    ([{"text": "a", "language": "eng"}], ["+sources.j.languages=[fr]"],
     r"data.sources.j.languages=\['fr'\] keeps no training document; its languages are \['eng'\]"),
    ([{"text": "a", "split": "heldout"}], [], "no training document"),
])
def test_local_values_that_make_no_training_data_are_named(tmp_path, tokenizer, rows, extra, message):
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=message):
        prepare(local(tmp_path, tokenizer, f"paths: ['{f}']", extra))


def test_rows_without_a_language_take_the_default(tmp_path, tokenizer):
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "language": "deu"}, {"text": "b", "language": None},
                                           {"text": "c"}])
    m = verify(prepare(local(tmp_path, tokenizer, f"paths: ['{f}'], language: eng")))
    assert {k: c["documents"] for k, c in m["components"].items()} == {"j/deu": 1, "j/eng": 2}


def test_a_file_that_several_paths_match_is_read_once(tmp_path, tokenizer, caplog):
    """`paths: [main.jsonl, "*.jsonl"]` (or a symlink to a listed file) read main.jsonl twice: its documents were
    trained on twice and the manifest counted them twice, without a word."""
    data = tmp_path / "data"
    data.mkdir()
    main = write_jsonl(data / "main.jsonl", [{"text": "alpha"}, {"text": "beta"}])
    write_jsonl(data / "more.jsonl", [{"text": "gamma"}])
    (tmp_path / "link.jsonl").symlink_to(main)
    caplog.set_level(logging.WARNING, logger="data.recipes.local")
    m = prepare(local(tmp_path, tokenizer, f"paths: ['{main}', '{data}/*.jsonl', '{tmp_path}/link.jsonl']"))
    assert verify(m)["components"]["j/und"]["documents"] == 3
    assert sorted(decoded(m, tokenizer)["j/und"]) == [f"{t}<|endoftext|>" for t in ("alpha", "beta", "gamma")]
    assert f"source 'j': {main} is matched again by options.paths" in caplog.text
    assert f"(as {tmp_path}/link.jsonl); reading it once" in caplog.text


def test_a_file_that_cannot_be_read_is_named_with_the_reason(tmp_path, tokenizer):
    good = write_jsonl(tmp_path / "a.jsonl", [{"text": "fine"}])
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(DataError, match=rf"could not read {bad}: .*\S"):
        prepare(local(tmp_path, tokenizer, f"paths: ['{good}', '{bad}']"))
    empty = tmp_path / "c.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=rf"{empty} is empty \(no documents\)"):
        prepare(local(tmp_path, tokenizer, f"paths: ['{empty}']"))
    # Arrow's JSON reader takes invalid UTF-8 into the strings; it surfaced as the tokenizer's traceback, no file named
    latin1 = tmp_path / "d.jsonl"
    latin1.write_bytes('{"text": "fine"}\n{"text": "sch\u00f6n"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=rf"{latin1} is not UTF-8 text: byte 30 \(line 2\)"):
        prepare(local(tmp_path, tokenizer, f"paths: ['{good}', '{latin1}']"))


@pytest.mark.parametrize("lines, bad, what", [
    (['{"text": "fine"}'] * 3000 + ["oops"], 3001, r"is not JSON \(Expecting value at character 1\): 'oops'"),
    (['{"text": "a"}', '{"text": "b"'], 2, r"is not JSON \(Expecting ',' delimiter at character 14\): '\{\"text\": \"b\"'"),
    (['{"text": "a"}', "[1, 2]"], 2, r"is list \[1, 2\], not a JSON object"),
])
def test_a_line_that_is_not_a_json_object_is_named(tmp_path, tokenizer, lines, bad, what):
    """`datasets` (pandas' fallback on the whole file) said `ValueError: Trailing data at position 13` of any such
    line, here line 3001: nothing in a file of millions of lines to find it by."""
    good = write_jsonl(tmp_path / "a.jsonl", [{"text": "fine"}])
    f = tmp_path / "b.jsonl"
    f.write_text("\n".join(lines) + "\n")
    for paths in ([f], [good, f]):  # alone, and found among other files
        with pytest.raises(DataError, match=rf"^source 'j': could not read {f}: line {bad} {what}$"):
            prepare(local(tmp_path, tokenizer, f"paths: {[str(p) for p in paths]}"))


@pytest.mark.parametrize("mixture, message", [
    (MixtureConfig(weights={"udhr": -1.0, "bible": 1.0}), r"weights.udhr = -1.0: must be a finite weight >= 0"),
    (MixtureConfig(weights={"udhr": float("nan")}), "weights.udhr = nan"),
    (MixtureConfig(weights={"udhr": float("inf")}), "weights.udhr = inf"),
    (MixtureConfig(weights={"udhr": 0.0, "bible": 0.0}), "weights = .*: every weight is 0"),
    (MixtureConfig(length_buckets=[LengthBucketConfig(0, 256, 1.0), LengthBucketConfig(257, 1024, -0.5)]),
     r"length_buckets\[1\].weight = -0.5"),
    (MixtureConfig(length_buckets=[LengthBucketConfig(0, 256, 0.0)]), r"length_buckets\[0\].weight = 0.0"),
    (MixtureConfig(max_epochs=float("inf")), "max_epochs = inf"),
    (MixtureConfig(length_buckets=[LengthBucketConfig(4096, 2048, 1.0)]),
     r"length_buckets\[0\]: min_tokens = 4096, max_tokens = 2048: a bucket needs 0 <= min_tokens <= max_tokens"),
    (MixtureConfig(length_buckets=[LengthBucketConfig(-1, None, 1.0)]), r"length_buckets\[0\]: min_tokens = -1"),
])
def test_mixture_weights_a_stage_cannot_sample_by_are_refused(fixture_manifest, mixture, message):
    """Before, a negative bucket weight gave negative sample counts and a blend longer than the stage; all-zero
    weights gave INT64_MIN samples and an IndexError at the first batch."""
    with pytest.raises(DataError, match=f"stage 'general' mixture.{message}"):
        plan_mixture(fixture_manifest, mixture, 64, 100, "general")


def test_a_cached_folder_published_meanwhile_by_another_process_wins(tmp_path):
    """Two `prepare` runs on one root: the later rename of a folder onto an existing one failed (ENOTEMPTY)."""
    dest = tmp_path / "tokenizer-x"
    with atomic_path(dest) as tmp:
        tmp.mkdir()
        (tmp / "f").write_text("ours")
        dest.mkdir()  # the other process finishes first
        (dest / "f").write_text("theirs")
    assert (dest / "f").read_text() == "theirs" and not list(tmp_path.glob(f"*{TMP_MARK}*"))
    with pytest.raises(OSError):  # anything else still fails
        with atomic_path(tmp_path / "missing" / "deeper" / "x") as tmp:
            pass  # nothing written at tmp: the rename fails


def test_stale_temporary_files_of_a_running_process_are_left_to_it(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live, dead = tmp_path / f"eng.000.tok{TMP_MARK}{child.pid}", tmp_path / f"eng.001.tok{TMP_MARK}999999999"
        live.write_text("being written")
        dead.write_text("left by a killed run")
        remove_stale_tmp(tmp_path)
        assert live.exists() and not dead.exists()
    finally:
        child.kill()
        child.wait()
    remove_stale_tmp(tmp_path)
    assert not live.exists()


def test_stale_temporary_folders_go_and_another_hosts_only_once_untouched_for_an_hour(tmp_path):
    """A killed index build left `index/<stage>-<key>.tmp-<pid>/` for ever (only files were removed). Temporary
    names now hold the host: on a file system several nodes share, another host's pid means nothing here, so its
    temporaries are removed only when nothing in them has been modified for STALE_AFTER_S (an hour)."""
    with atomic_path(tmp_path / "x") as tmp:
        assert tmp.name == f"x{TMP_MARK}{HOST}-{os.getpid()}"
        tmp.write_text("")
    old = time.time() - STALE_AFTER_S - 60

    def leftover(name: str, modified: float = None, file_modified: float = None) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "doc_idx.npy").write_bytes(b"half")
        if file_modified is not None:
            os.utime(folder / "doc_idx.npy", (file_modified, file_modified))
        if modified is not None:
            os.utime(folder, (modified, modified))
        return folder

    leftover(f"general-a{TMP_MARK}{HOST}-999999999")  # this host, its process gone
    leftover(f"general-b{TMP_MARK}node-b-17", modified=old, file_modified=old)  # another host's, untouched an hour
    leftover(f"general-c{TMP_MARK}node-b-18")  # another host's, being written
    leftover(f"general-d{TMP_MARK}node-b-19", modified=old)  # its folder old, but a file in it written just now
    (tmp_path / f"eng.000.tok{TMP_MARK}node-b-20").write_text("")  # a file another host is writing
    remove_stale_tmp(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"eng.000.tok{TMP_MARK}node-b-20", f"general-c{TMP_MARK}node-b-18", f"general-d{TMP_MARK}node-b-19", "x"]


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("tokenizer"), "the top level lacks 'tokenizer'"),
    (lambda m: m["tokenizer"].update(fingerprint=None), "tokenizer.fingerprint is None, expected a str"),
    (lambda m: m.update(dtype="int7"), "dtype 'int7': expected one of"),
    (lambda m: m.update(components=None), "components is NoneType, expected an object"),
    (lambda m: next(iter(m["components"].values())).pop("source"), r"components\.\S+ lacks 'source'"),
    (lambda m: next(iter(m["components"].values()))["files"][0].pop("sha256"),
     r"components\.\S+\.files\[0\] lacks 'sha256'"),
    (lambda m: next(iter(m["heldout"].values()))["files"][0].update(tokens=-3),
     r"heldout\.\S+\.files\[0\]\.tokens is -3, expected a non-negative int"),
    (lambda m: m["tokenizer"].update(vocab_size=10**9), "tokenizer.vocab_size is 1000000000, but .* has 1024 ids"),
    # accepted before: only the fields' types were checked
    (lambda m: m["components"]["udhr/fra"].update(files=m["heldout"]["udhr/fra"]["files"],
                                                  tokens=m["heldout"]["udhr/fra"]["tokens"],
                                                  documents=m["heldout"]["udhr/fra"]["documents"]),
     r"heldout\.udhr/fra lists file 'shards/udhr-\w+/heldout-fra\.000\.tok', which components\.udhr/fra lists too: "
     r"held-out text would be trained on"),
    (lambda m: m["components"]["sotu/eng"].update(tokens=10**12),
     r"components\.sotu/eng\.tokens is 1000000000000, but its files hold 3846"),
    (lambda m: m["heldout"]["bible/deu"].update(documents=0),
     r"heldout\.bible/deu\.documents is 0, but its files hold 1"),
])
def test_a_hand_edited_manifest_is_refused_naming_the_field(tmp_path, edit, message):
    mpath = prepare(compose("fixture", [f"root={tmp_path}"]))
    m = json.loads(mpath.read_text())
    edit(m)
    mpath.write_text(json.dumps(m))
    with pytest.raises(DataError, match=f"{mpath}: (malformed manifest: )?{message}"):
        verify(mpath)


def test_heldout_sets_still_read_the_prepared_fixture(tmp_path):
    """The schema check accepts what `prepare` writes (every reader goes through it)."""
    m = prepare(compose("fixture", [f"root={tmp_path}"]))
    assert sum(len(v) for v in heldout_sets(m).values()) > 0


def test_a_data_config_of_ones_own_without_root_takes_the_environments(monkeypatch, tmp_path):
    """Only the shipped data configs read $TRISTAGE_DATA_ROOT: one's own wrote a large corpus under the cwd."""
    from data.config import DataConfig, to_data_config

    monkeypatch.setenv("TRISTAGE_DATA_ROOT", str(tmp_path))
    assert to_data_config({"name": "mine"}).root == str(tmp_path)
    assert to_data_config({"name": "mine", "root": "/scratch/x"}).root == "/scratch/x"
    assert DataConfig(name="mine").root == str(tmp_path)  # built in Python too, not only through OmegaConf
    monkeypatch.delenv("TRISTAGE_DATA_ROOT")
    assert to_data_config({"name": "mine"}).root == ".cache/tristage"
    # set but empty: the shipped configs' ${oc.env:...} gave "", and a run prepared its data into the cwd
    from data.errors import DataError

    monkeypatch.setenv("TRISTAGE_DATA_ROOT", "")
    with pytest.raises(DataError, match="config key 'data.root' is empty"):
        to_data_config(compose("fixture", []))


def write_words(path: Path, n: int) -> List[dict]:
    """A JSON lines file of `n` documents of 20-400 random words, alternately English and German."""
    import random

    rng = random.Random(0)
    words = ["stream", "shard", "token", "memory", "corpus", "document", "river", "mountain", "garden", "signal"]
    rows = [{"text": " ".join(rng.choice(words) for _ in range(rng.randint(20, 400))), "lang": ["eng", "deu"][i % 2]}
            for i in range(n)]
    return write_jsonl(path, rows) and rows


def in_own_process(overrides: List[str], code: str) -> dict:
    """Run `code` in a fresh Python with `cfg`, the fixture data config under `overrides`, and `P` (data.prepare);
    returns the JSON of the dict it leaves in `result`. A tracemalloc window inside a test worker counts whatever
    else that process allocates meanwhile (once in CI the sharding window read 8.9 MB in a worker that had run other
    tests; alone, 1.2 MB; not traced further)."""
    script = (f"import json, tracemalloc\nimport data.prepare as P\nfrom data.config import compose, to_data_config\n"
              f"cfg = to_data_config(compose('fixture', {overrides!r}))\n{code}\nprint(json.dumps(result))\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def words_source(tmp_path: Path, tokenizer: str, *extra: str) -> List[str]:
    """Overrides of a data config whose one source, `j`, is tmp_path/big.jsonl of `write_words`."""
    return [f"root={tmp_path / 'root'}", f"tokenizer.path={tokenizer}", "~sources", *extra,
            f"+sources.j={{kind: local, options: {{paths: ['{tmp_path}/big.jsonl'], language_field: lang}}}}"]


def test_the_tokenizer_sample_is_drawn_without_holding_the_text(tmp_path, tokenizer):
    """The sentencepiece sample is drawn in two passes over the documents, holding each line's length and then the
    lines drawn: 200K characters out of ~17M allocate a small fraction of the text at the peak. All the text was
    held as Python strings first (a corpus of one's own larger than memory could not train its tokenizer). The
    sample is the one `language_sample` draws from all the lines in memory: same lines, same order."""
    import data.prepare as P
    from data.config import to_data_config
    from data.tokenizer import language_sample

    write_words(tmp_path / "big.jsonl", 12000)
    overrides = words_source(tmp_path, tokenizer, "tokenizer.sample_chars=200000")
    got = in_own_process(overrides, """
ds, _, _ = P.load_source("j", cfg.sources["j"], cfg)
tracemalloc.start()
sample = P._tokenizer_sample({"j": ds}, cfg.tokenizer)
result = {"peak": tracemalloc.get_traced_memory()[1], "sample": sample}""")
    peak, sample = got["peak"], got["sample"]
    cfg = to_data_config(compose("fixture", overrides))
    ds, _, _ = P.load_source("j", cfg.sources["j"], cfg)
    sources = {"j": ds}
    text = sum(len(line) for _, line in P._tokenizer_lines(sources))
    assert text > 15_000_000 and peak < 0.25 * text, (peak, text)  # str of ASCII: a byte a character, and more
    lines: Dict[str, List[str]] = {}
    for lang, line in P._tokenizer_lines(sources):
        lines.setdefault(lang, []).append(line)
    t = cfg.tokenizer
    assert sample == language_sample(lines, t.sample_chars, t.alpha, t.seed)
    assert 200_000 <= sum(map(len, sample)) < 210_000 and {"eng", "deu"} == set(lines)


def test_a_source_is_sharded_with_one_shards_tokens_in_memory(tmp_path, tokenizer):
    """The token ids stay in datasets' memory-mapped arrow file and each shard reads its documents' ids from there:
    sharding ~0.5M tokens of two languages into 4,096-token files allocates (numpy, which tracemalloc sees) a small
    fraction of the ids' bytes. It gathered each component's ids whole, with an int64 index per token: a corpus of
    one's own larger than the machine's memory could not be prepared. The shards are the same documents in the same
    order, split where the next document would pass shard_tokens."""
    import numpy as np

    from data.config import to_data_config
    from data.shards import open_shard

    rows = write_words(tmp_path / "big.jsonl", 3000)
    overrides = words_source(tmp_path, tokenizer, "shard_tokens=4096")
    cfg = to_data_config(compose("fixture", overrides))
    got = in_own_process(overrides, """
ds, identity, _ = P.load_source("j", cfg.sources["j"], cfg)
tok = P.ensure_tokenizer(cfg, {"j": ds}, {"j": identity})
real = P.tokenize
def tokenize_then_measure(*args, **kwargs):  # datasets' map holds a batch of Python lists: not the sharding
    out = real(*args, **kwargs)
    tracemalloc.reset_peak()
    return out
P.tokenize = tokenize_then_measure
tracemalloc.start()
rec, reused = P.ensure_source_shards("j", ds, identity, tok, cfg)
result = {"peak": tracemalloc.get_traced_memory()[1], "rec": rec, "reused": reused}""")
    peak, rec, reused = got["peak"], got["rec"], got["reused"]
    tok = load_tokenizer(tokenizer)
    assert not reused
    out = tmp_path / "root" / cfg.name
    total = sum(c["tokens"] for c in rec["train"].values())
    assert total > 400_000 and peak < 0.25 * 4 * total, (peak, total)  # the ids as int32: 4 bytes each
    for lang, texts in (("eng", rows[0::2]), ("deu", rows[1::2])):
        comp = rec["train"][f"j/{lang}"]
        assert len(comp["files"]) > 20 and comp["documents"] == len(texts)
        docs = []
        for i, f in enumerate(comp["files"]):
            s = open_shard(out / f["path"])
            lengths = np.diff(s.offsets)
            assert s.offsets[-1] <= 4096 or len(lengths) == 1  # at most shard_tokens, or one longer document
            if i + 1 < len(comp["files"]):  # full: the next file's first document would not have fitted
                nxt = open_shard(out / comp["files"][i + 1]["path"])
                assert s.offsets[-1] + nxt.offsets[1] > 4096
            docs += [tok.decode(s.tokens[a:b].tolist()) for a, b in zip(s.offsets[:-1], s.offsets[1:])]
        assert [d.removesuffix(tok.decode([tok.eos_id])).strip() for d in docs] == [r["text"] for r in texts]


def test_a_folder_in_paths_is_named_and_a_glob_skips_subfolders(tmp_path, tokenizer):
    """A folder given as a path was refused as 'files must all be one of [...]: [folder]'; a glob over a folder
    with a subfolder in it failed the same way."""
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    write_jsonl(data / "a.jsonl", [{"text": "alpha"}])
    with pytest.raises(DataError, match=re.escape(f"source 'j': options.paths entry '{data}' is a folder ({data}), "
                                                  f"not files; name its files, e.g. '{data}/*.jsonl'")):
        prepare(local(tmp_path, tokenizer, f"paths: ['{data}']"))
    m = prepare(local(tmp_path, tokenizer, f"paths: ['{data}/*']"))
    assert decoded(m, tokenizer)["j/und"][0].startswith("alpha")
