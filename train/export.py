"""What an HF export holds besides the weights: the config it carries and the tokenizer files.

The loop writes each stage's end to `<run_dir>/hf/<stage>/` with `models.hf.write_hf` and these.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from data.tokenizer import Tokenizer
from models.config import Qwen3Config


def export_config(model: Qwen3Config, rope_theta: float, tokenizer: Tokenizer) -> Qwen3Config:
    """The config an export carries: the stage's RoPE base, and the tokenizer's EOS (the one that ends every
    training document) unless the model config names one."""
    eos = tokenizer.eos_id if model.eos_token_id is None else model.eos_token_id
    return dataclasses.replace(model, rope_theta=rope_theta, eos_token_id=eos)


def write_tokenizer_files(folder: Path, tokenizer: Tokenizer, cfg: Qwen3Config) -> None:
    """The export decodes alone: the tokenizer as AutoTokenizer loads it, and generation_config.json with the
    EOS that ends every training document (so `generate` stops) and the padded embedding rows suppressed."""
    tokenizer.write_hf(folder)
    generation = {"eos_token_id": cfg.eos_token_id, "pad_token_id": tokenizer.pad_id,
                  "bos_token_id": cfg.bos_token_id, "do_sample": False}
    if tokenizer.vocab_size < cfg.vocab_size:  # rows no token maps to: never a prediction
        generation["suppress_tokens"] = list(range(tokenizer.vocab_size, cfg.vocab_size))
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=1) + "\n")
