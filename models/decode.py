"""Autoregressive decoding with a KV cache: greedy (temperature 0) or sampled with top-k / top-p."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from models.qwen3 import Qwen3ForCausalLM


class KVCache:
    """Preallocated keys and values of every layer, (B, Hkv, max_len, D) each; `length` positions are filled."""

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, max_len: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        shape = (num_layers, batch, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    @classmethod
    def for_model(cls, model: Qwen3ForCausalLM, batch: int, max_len: int) -> "KVCache":
        """An empty cache sized for `model`, on its device and in its dtype."""
        cfg, w = model.config, model.model.embed_tokens.weight
        return cls(cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim, w.device, w.dtype)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, Hkv, T, D) after the filled positions; return all keys and values (B, Hkv, length+T, D)."""
        end = self.length + k.shape[2]
        if end > self.k.shape[3]:
            raise ValueError(f"KV cache full: {end} > {self.k.shape[3]} positions")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, t: int) -> None:
        """Mark t more positions as filled (the model calls this once per forward, after all layers)."""
        self.length += t


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None,
                vocab_size: Optional[int] = None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V): argmax at temperature 0, else filtered sampling.

    top_k None or 0 and top_p None or 1 filter nothing (as in transformers); the most likely token always stays.
    vocab_size: the tokenizer's; ids from there to V (embedding rows padded for speed, which no token maps to)
    are never chosen.
    """
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0: no top-k filter), got {top_k}")
    if top_p is not None and not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1], got {top_p}")
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        logits = logits[:, :vocab_size]  # the ids kept are the first ones: argmax and sampling index alike
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the ones ranked above it already reach top_p; the first token always stays.
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.no_grad()
def generate(model: Qwen3ForCausalLM, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, eos_token_id: Optional[int] = None,
             generator: Optional[torch.Generator] = None, vocab_size: Optional[int] = None) -> torch.Tensor:
    """Continue input_ids (B, T) (equal-length prompts, no padding) by up to max_new_tokens; returns (B, T + n).

    Greedy when temperature == 0. A sequence that emits eos_token_id is padded with it until all have ended.
    vocab_size (the tokenizer's) keeps padded embedding rows from being chosen (`sample_next`).
    Runs in eval mode (restoring the previous mode) with a KV cache: one prefill, then one token per step.
    """
    was_training = model.training
    model.eval()
    try:
        b, t = input_ids.shape
        cache = KVCache.for_model(model, b, t + max_new_tokens)
        out = input_ids
        finished = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        step_input = input_ids
        for _ in range(max_new_tokens):
            logits = model(step_input, kv_cache=cache, logits_to_keep=1).logits[:, -1]  # (B, V)
            nxt = sample_next(logits, temperature, top_k, top_p, generator, vocab_size)  # (B,)
            if eos_token_id is not None:
                nxt = nxt.masked_fill(finished, eos_token_id)
                finished |= nxt == eos_token_id
            out = torch.cat([out, nxt[:, None]], dim=1)
            if eos_token_id is not None and bool(finished.all()):
                break
            step_input = nxt[:, None]
        return out
    finally:
        model.train(was_training)
