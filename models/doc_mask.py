"""Document masking of packed sequences: block-diagonal causal attention, as a dense mask or a FlexAttention BlockMask.

A packed row holds several documents; with `doc_ids` (B, T) a query attends to the keys of its own document at
or before its position. Two ways to the same attention (`Qwen3Config.doc_mask_implementation`):

- "dense": a (B, 1, T, T) boolean mask for SDPA. Simple and exact, but 1 GiB per sequence at 32K; SDPA turns it
  into an additive bias in the query dtype in every layer, and each layer saves its copy for the backward (one
  T x T copy per layer, measured); and SDPA cannot use its flash kernel with an arbitrary mask (it falls back to
  the memory-efficient one, on K/V expanded to every query head, computing the masked tiles too).
- "flex": `torch.nn.attention.flex_attention` with a BlockMask: per (128 x 128) tile of the score matrix, whether
  it is empty (skipped), full (no mask applied) or partial (the mask function is evaluated inside the kernel), so
  (T/128)^2 entries instead of T^2 and the work of the empty tiles across documents is skipped too. GQA native.

On CUDA both the BlockMask construction and the attention run under torch.compile (built once per process, on
first use): eager flex_attention materialises the whole score matrix, and eager create_block_mask the (B, T, T)
mask it is meant to avoid, and more (measured on the CPU: +720 MiB at T = 8,192 eager; compiled, < 90 MiB at
T = 32,768 including the compilation). Elsewhere both run eagerly: torch 2.13 has no flex_attention backward on
the CPU at all (eager or compiled), so the CPU path serves inference and tests.
"""
from __future__ import annotations

from typing import Callable, Dict, Union

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

AttentionMask = Union[torch.Tensor, BlockMask]
"""What the decoder layers receive as `mask`: a dense (B, 1, T, S) bool tensor for SDPA, or a BlockMask for flex."""

_COMPILED: Dict[str, Callable] = {}


def _compiled(fn: Callable) -> Callable:
    """`fn` under torch.compile, built on first use (one per process; shapes may vary: dynamic after a change)."""
    if fn.__name__ not in _COMPILED:
        _COMPILED[fn.__name__] = torch.compile(fn)
    return _COMPILED[fn.__name__]


def resolve_doc_mask_implementation(implementation: str, device: torch.device) -> str:
    """'flex' or 'dense' for a config's `doc_mask_implementation` on this device."""
    if implementation != "auto":
        return implementation
    # Flex on CUDA only. On the CPU (torch 2.13) flex_attention refuses the backward pass (eager and compiled),
    # which training needs; for the forward alone, eager flex was 2x slower than the dense mask at T = 2,048
    # (16 query / 8 KV heads, head_dim 128: 1.58 s vs 0.74 s, +1 GiB of scores) and compiled flex 5x faster
    # (0.15 s) but costs a C++ build per shape.
    return "flex" if device.type == "cuda" else "dense"


def document_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: where a document begins, i.e. where the id differs from the position before (and at 0)."""
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return starts


def document_mask(doc_ids: torch.Tensor, implementation: str = "auto") -> AttentionMask:
    """Block-diagonal causal mask of doc_ids (B, T): a dense (B, 1, T, T) bool tensor or a BlockMask.

    A document is a run of equal ids, as for the positions (`position_ids_from_doc_ids`): an id that comes back
    later in the row starts a new document, not a continuation of the earlier one.
    """
    b, t = doc_ids.shape
    doc_ids = document_starts(doc_ids).cumsum(dim=1)  # (B, T) run index
    if resolve_doc_mask_implementation(implementation, doc_ids.device) == "dense":
        causal = torch.ones(t, t, dtype=torch.bool, device=doc_ids.device).tril()
        return ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal)[:, None]  # (B, 1, T, T)

    def same_document_causal(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor):
        return (doc_ids[b, q_idx] == doc_ids[b, kv_idx]) & (q_idx >= kv_idx)

    build = _compiled(create_block_mask) if doc_ids.device.type == "cuda" else create_block_mask
    # H=None: one mask for every head. A new closure per batch does not recompile: dynamo guards on its code,
    # and doc_ids enters the graph as an input.
    return build(same_document_causal, b, None, t, t, device=doc_ids.device)


def flex_document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask) -> torch.Tensor:
    """q (B, H, T, D), k/v (B, Hkv, T, D) -> (B, H, T, D) under block_mask; scale 1/sqrt(D) as SDPA's default."""
    if torch.compiler.is_compiling() or q.device.type != "cuda":
        # Inside a compiled block (model.compile) dynamo captures flex_attention into the block's own graph.
        fn = flex_attention
    else:
        fn = _compiled(flex_attention)
    return fn(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])
