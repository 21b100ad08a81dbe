"""Reasoning: exact-match accuracy of greedy answers on freshly generated problems.

Problems come from reasoning-gym (arithmetic: basic_arithmetic, chain_sum; grade-school word problems:
gsm_symbolic), generated from the first generator seed the training data did not use (the manifest records the
seeds, data.heldout.reasoning_eval_seed). The prompt is the training format (data/recipes/reasoning.py) up to the
opening <think>; the model thinks, closes </think>, answers and ends with <|im_end|>. The answer is the text
between </think> and <|im_end|>, compared with reasoning-gym's answer after stripping whitespace.

Unseen seeds are not unseen problems: short ones recur by chance (of 50 problems from the demo's first unused seeds,
2 were word for word in its training set), so a tiny model's score is a ceiling on what it reasons, not a floor.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from data.errors import DataError
from data.heldout import reasoning_eval_seed
from data.tokenizer import Tokenizer
from models.decode import generate, sample_next
from train.eval.outputs import md_table, mean

TASKS = ("basic_arithmetic", "chain_sum", "gsm_symbolic")
# For a data set whose reasoning problems came from files (the test fixture) the manifest records no generator
# seeds; this one is far above any seed a committed config trains on.
FALLBACK_SEED = 1_000_000


def check_tasks(tasks: Sequence[str]) -> None:
    """DataError naming the tasks reasoning-gym does not have (before any model is loaded)."""
    from reasoning_gym.factory import DATASETS

    unknown = sorted(set(tasks) - set(DATASETS))
    if unknown:
        raise DataError(f"--tasks {unknown}: not reasoning-gym tasks (e.g. {', '.join(TASKS)})")


def prompt(question: str) -> str:
    """The user turn and the opening of the assistant's thinking, exactly as training documents begin."""
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n<think>\n"


def extract_answer(completion: str) -> str:
    """The final answer: after the last </think>, before <|im_end|>, stripped; "" if the model never closed </think>."""
    if "</think>" not in completion:
        return ""
    return completion.rsplit("</think>", 1)[1].split("<|im_end|>", 1)[0].strip()


def fresh_problems(manifest: Path, task: str, n: int) -> Tuple[int, str, List[Dict[str, Any]]]:
    """n problems of `task` from unseen generator seeds: (first seed, where it came from, items)."""
    import reasoning_gym

    try:
        seed, source = reasoning_eval_seed(manifest, task), "manifest"
    except DataError:
        seed, source = FALLBACK_SEED, "fallback"
    return seed, source, list(reasoning_gym.create_dataset(task, size=n, seed=seed))


@torch.no_grad()
def greedy_complete(model: torch.nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    stop_id: int, batch_size: int = 16, strategy: str = "auto",
                    vocab_size: Optional[int] = None) -> List[List[int]]:
    """Greedy continuations of prompts of different lengths, each ending at stop_id (included) or the budget;
    ids from `vocab_size` (the tokenizer's) on, padded embedding rows, are never chosen.

    Two ways to the same tokens: "cached" runs models.decode.generate (KV cache) on each group of equal-length prompts,
    cheap per step and best on a CPU; "batched" left-pads up to batch_size prompts, makes the padding a document
    of its own (doc_ids) so each prompt sees exactly what it would alone from position 0, and reruns the whole
    batch every step (the cache takes no padding mask), which wins on a GPU. "auto" picks by device.
    """
    device = next(model.parameters()).device
    if strategy == "auto":
        strategy = "batched" if device.type == "cuda" else "cached"
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths together
    if strategy == "cached":
        groups = [[i for i in order if len(prompts[i]) == n] for n in sorted({len(p) for p in prompts})]
        groups = [g[k: k + batch_size] for g in groups for k in range(0, len(g), batch_size)]
    else:
        groups = [order[k: k + batch_size] for k in range(0, len(order), batch_size)]
    out: List[List[int]] = [[] for _ in prompts]
    for group in groups:
        width = max(len(prompts[i]) for i in group)
        if strategy == "cached":
            ids = torch.tensor([list(prompts[i]) for i in group], device=device)
            ids = generate(model, ids, max_new_tokens, eos_token_id=stop_id, vocab_size=vocab_size)
        else:
            ids = _batched_greedy(model, [prompts[i] for i in group], width, max_new_tokens, stop_id, device,
                                  vocab_size)
        for row, i in enumerate(group):
            new = ids[row, width:].tolist()
            out[i] = new[: new.index(stop_id) + 1] if stop_id in new else new
    return out


def _batched_greedy(model: torch.nn.Module, prompts: Sequence[Sequence[int]], width: int, max_new_tokens: int,
                    stop_id: int, device: torch.device, vocab_size: Optional[int]) -> torch.Tensor:
    """Left-padded prompts (B, width) continued greedily by rerunning the batch; returns (B, width + n)."""
    ids = torch.full((len(prompts), width), stop_id, dtype=torch.long)
    docs = torch.zeros(len(prompts), width, dtype=torch.long)  # padding is document 0, the prompt document 1
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(list(p))
        docs[row, width - len(p):] = 1
    ids, docs = ids.to(device), docs.to(device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        nxt = sample_next(model(ids, doc_ids=docs, logits_to_keep=1).logits[:, -1], vocab_size=vocab_size)  # (B,)
        nxt = nxt.masked_fill(done, stop_id)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        docs = torch.cat([docs, torch.ones_like(docs[:, :1])], dim=1)
        done |= nxt == stop_id
        if bool(done.all()):
            break
    return ids


def reasoning_accuracy(model: torch.nn.Module, tok: Tokenizer, manifest: Path, tasks: Sequence[str] = TASKS,
                       problems: int = 8, max_new_tokens: int = 160, batch_size: int = 16) -> Dict[str, Any]:
    """Exact-match accuracy per task (and their mean), with every prompt's completion for inspection."""
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    stop = tok.special_ids["<|im_end|>"]
    result: Dict[str, Any] = {"tasks": {}, "max_new_tokens": max_new_tokens}
    for task in tasks:
        seed, source, items = fresh_problems(manifest, task, problems)
        completions = greedy_complete(model, [tok.encode(prompt(it["question"])) for it in items], max_new_tokens,
                                      stop, batch_size, vocab_size=tok.vocab_size)
        samples = []
        for it, ids in zip(items, completions):
            text = tok.decode(ids)
            answer = extract_answer(text)
            samples.append({"question": it["question"], "expected": str(it["answer"]).strip(), "answer": answer,
                            "correct": answer == str(it["answer"]).strip(), "completion": text,
                            "closed_think": "</think>" in text})
        result["tasks"][task] = {
            "first_seed": seed, "seed_source": source, "problems": len(samples),
            "accuracy": mean([float(s["correct"]) for s in samples]),
            "closed_think": mean([float(s["closed_think"]) for s in samples]), "samples": samples}
    result["accuracy"] = mean([t["accuracy"] for t in result["tasks"].values()])
    result["seconds"] = round(time.perf_counter() - t0, 2)
    model.train(was_training)
    return result


def markdown(result: Dict[str, Any], title: str = "") -> str:
    """One row per task: accuracy, how often the model closed its thinking, seeds used."""
    rows = [[task, r["problems"], r["accuracy"], r["closed_think"], f"{r['first_seed']}+ ({r['seed_source']})"]
            for task, r in result["tasks"].items()]
    rows.append(["**mean**", sum(r["problems"] for r in result["tasks"].values()), result["accuracy"], None, ""])
    head = f"### Reasoning, greedy exact match{f' — {title}' if title else ''}\n\n"
    return head + md_table(["task", "problems", "accuracy", "closed </think>", "generator seeds"], rows)
