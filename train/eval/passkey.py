"""Passkey retrieval (Mohtashami & Jaggi 2023): find a 5-digit key hidden at some depth in filler text.

A context of exactly `length` tokens, the answer the model writes included: an instruction, a repeated filler
sentence, the needle "The pass key is NNNNN. Remember it." after `depth` of the filler, more filler, then
"What is the pass key? The pass key is". The model continues greedily; the first run of digits in the
continuation must equal the key. Each piece is tokenized on its own and starts with a space, so every piece
starts at a word boundary and all prompts of one length have the same number of tokens (one batch, one KV
cache, no padding).
"""
from __future__ import annotations

import random
import re
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from data.tokenizer import Tokenizer
from models.decode import generate
from models.qwen3 import Qwen3ForCausalLM
from train.eval.extend import set_mode
from train.eval.outputs import md_table, mean

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it."
QUESTION = " What is the pass key? The pass key is"


def passkey_prompt(tok: Tokenizer, length: int, depth: float, key: str) -> List[int]:
    """Token ids of one prompt, exactly `length` long, with the needle after `depth` (0..1) of the filler."""
    intro, unit = tok.encode(INTRO), tok.encode(FILLER)
    needle, question = tok.encode(NEEDLE.format(key=key)), tok.encode(QUESTION)
    budget = length - len(intro) - len(needle) - len(question)
    if budget < 0:
        raise ValueError(f"passkey length {length} is shorter than the prompt's fixed text "
                         f"({length - budget} tokens)")
    repeated = unit * (budget // len(unit) + 2)
    before = min(round(depth * budget / len(unit)), budget // len(unit)) * len(unit)  # whole sentences first
    after = budget - before
    # the filler after the needle ends on a whole sentence right before the question
    tail = repeated[len(repeated) - after:] if after else []
    return intro + repeated[:before] + needle + tail + question


def min_length(tok: Tokenizer) -> int:
    """The shortest prompt: the fixed text and one filler sentence."""
    return sum(len(tok.encode(t)) for t in (INTRO, FILLER, NEEDLE.format(key="12345"), QUESTION))


def retrieved(tok: Tokenizer, continuation: Sequence[int], key: str) -> bool:
    """Whether the first run of digits the model wrote is the key."""
    m = re.search(r"\d+", tok.decode(list(continuation)))
    return m is not None and m.group(0) == key


def _key(seed: int, length: int, depth: float, trial: int) -> str:
    return str(random.Random(f"{seed}/{length}/{depth}/{trial}").randint(10_000, 99_999))


@torch.no_grad()
def passkey_grid(model: Qwen3ForCausalLM, tok: Tokenizer, lengths: Sequence[int], depths: Sequence[float],
                 trials: int = 2, batch_size: int = 8, seed: int = 0) -> Dict[str, Any]:
    """Accuracy per (length, depth) over `trials` keys each, in the model's current attention / RoPE mode.

    A length the model cannot run (beyond its RoPE tables) or too short for the fixed text gets None.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    accuracy: List[List[Optional[float]]] = []
    for length in lengths:
        jobs = [(d, t, _key(seed, length, d, t)) for d in depths for t in range(trials)]
        answer_len = len(tok.encode(" " + jobs[0][2])) + 2  # the key's digits, a space and some slack
        prompt_len = length - answer_len  # `length` counts every position the model reads, answer included
        hits: Dict[float, List[float]] = {d: [] for d in depths}
        too_long = model.dca is None and length > model.rope_cos.shape[0]  # past the RoPE tables
        if too_long or prompt_len < min_length(tok):
            accuracy.append([None for _ in depths])
            continue
        for start in range(0, len(jobs), batch_size):
            group = jobs[start: start + batch_size]
            ids = torch.tensor([passkey_prompt(tok, prompt_len, d, key) for d, _, key in group], device=device)
            out = generate(model, ids, max_new_tokens=answer_len, vocab_size=tok.vocab_size)[:, prompt_len:]
            for (d, _, key), row in zip(group, out.tolist()):
                hits[d].append(float(retrieved(tok, row, key)))
        accuracy.append([mean(hits[d]) for d in depths])
    model.train(was_training)
    rows = [mean([a for a in row if a is not None]) if any(a is not None for a in row) else None
            for row in accuracy]
    return {"lengths": list(lengths), "depths": list(depths), "trials": trials, "accuracy": accuracy,
            "accuracy_by_length": rows}


def passkey_modes(model: Qwen3ForCausalLM, tok: Tokenizer, trained_len: int, grids: Dict[str, Sequence[int]],
                  depths: Sequence[float], trials: int = 2, batch_size: int = 8,
                  dca_local_size: int = 0) -> Dict[str, Any]:
    """One grid per inference mode ({mode: lengths}), each mode set up for its longest length."""
    t0 = time.perf_counter()
    result: Dict[str, Any] = {"trained_len": trained_len, "modes": {}}
    for mode, lengths in grids.items():
        if not lengths:
            continue
        settings = set_mode(model, mode, trained_len, max(lengths), dca_local_size)
        result["modes"][mode] = {"settings": settings,
                                 **passkey_grid(model, tok, lengths, depths, trials, batch_size)}
    set_mode(model, "plain", trained_len, trained_len)
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


def markdown(result: Dict[str, Any], title: str = "") -> str:
    """One table per mode: lengths as rows, needle depths as columns, and the row mean."""
    out = [f"### Passkey retrieval{f' — {title}' if title else ''} (trained length {result['trained_len']})\n"]
    for mode, g in result["modes"].items():
        header = ["length", *[f"depth {d:g}" for d in g["depths"]], "mean"]
        rows = [[length, *acc, m] for length, acc, m in zip(g["lengths"], g["accuracy"], g["accuracy_by_length"])]
        settings = ", ".join(f"{k}={v}" for k, v in g["settings"].items() if k != "mode")
        out.append(f"**{mode}**{f' ({settings})' if settings else ''}, {g['trials']} keys per cell\n\n"
                   + md_table(header, rows, digits=2))
    return "\n".join(out)
