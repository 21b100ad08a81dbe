"""`python -m train.export <checkpoint folder> <out dir>`: any checkpoint as an HF transformers directory.

The loop exports each stage's end to `<run_dir>/hf/<stage>/` itself; this writes the same directory for any
checkpoint folder, one from the middle of a stage (a SIGTERM's, a `max_steps` stop's) included: the weights as
`python -m train.eval` loads them (`train.eval.target.load_model`: ZeRO 0-3, expert-parallel checkpoints
included), written by the loop's own writer (`models.hf.write_hf`) with the same extra files (`export_config`,
`write_tokenizer_files`, which the loop uses too). The whole model is held in CPU memory once, in fp32.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import List, Optional

import torch

from data.errors import DataError
from data.tokenizer import Tokenizer
from models.config import Qwen3Config
from models.hf import write_hf
from train.eval.target import EvalError, load_model, resolve


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


class ExportError(ValueError):
    """A checkpoint that cannot be exported, or an output folder that would be overwritten."""


def export_checkpoint(ckpt: Path, out: Path, manifest: Optional[Path] = None) -> Path:
    """Write checkpoint folder `ckpt` as an HF directory `out` (created under a temporary name, then renamed).

    ExportError, naming the path, for a folder that is not a complete checkpoint, a tokenizer that is not the
    one the checkpoint was trained with, or an `out` that exists and is not an empty folder; DataError for a
    manifest or tokenizer that cannot be read. `ckpt` may be the `latest` pointer file.
    """
    ckpt, out = Path(ckpt).absolute(), Path(out).absolute()
    if ckpt.is_file() and ckpt.name == "latest":  # the pointer file: the checkpoint it names
        ckpt = ckpt.parent / ckpt.read_text().strip()
    if not (ckpt / "meta.json").is_file():
        raise ExportError(f"{ckpt}: not a checkpoint folder (no meta.json)" if ckpt.is_dir()
                          else f"{ckpt}: no such checkpoint folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out}: exists and is not an empty folder; nothing was written (choose another)")
    try:
        # checks the weight files, finds the tokenizer and refuses one the checkpoint was not trained with
        target = resolve(ckpt, manifest=manifest)
        tokenizer = target.tokenizer
        model = load_model(ckpt, torch.device("cpu"), torch.float32)
    except EvalError as e:
        raise ExportError(str(e)) from None
    cfg = export_config(model.config, model.config.rope_theta, tokenizer)  # load_model set the checkpoint's base
    state = model.state_dict()
    return write_hf(cfg, out, state.items(), state, extra=lambda folder: write_tokenizer_files(folder, tokenizer, cfg))


def main(argv: Optional[List[str]] = None) -> int:
    """Export; exit 2 on a checkpoint that cannot be exported or an output folder in the way."""
    p = argparse.ArgumentParser(prog="python -m train.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="a checkpoint folder, <run_dir>/checkpoints/<tag>")
    p.add_argument("out", type=Path, help="the HF directory to write (must not exist, or be empty)")
    p.add_argument("--manifest", type=Path, default=None, help="data set manifest (default: the run's)")
    args = p.parse_args(argv)
    try:
        path = export_checkpoint(args.checkpoint, args.out, args.manifest)
    except (ExportError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk or a folder that cannot be written: write_hf removed its temporary folder
        print(f"error: writing {Path(args.out).absolute()} failed: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
