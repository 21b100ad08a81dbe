"""Dual Chunk Attention (An et al. 2024, "Training-Free Long-Context Scaling of Large Language Models"):
attention over sequences longer than the trained length that never uses a relative position the model has
not seen in training. Inference only; the training path never comes here.

The sequence is cut into chunks of s = chunk_size - local_size tokens (`chunk_len`). A key at position j is
rotated as position j mod s. A query at position i attends each key j <= i with a position that depends on
how far back j's chunk lies (paper, section 3):

    same chunk         intra-chunk       i mod s                    distance i - j (exact)
    previous chunk     successive-chunk  min(s + i mod s, c - 1)    exact i - j while i mod s < local_size
    two or more back   inter-chunk       c - 1                      c - 1 - (j mod s), in [local_size, c - 1]

with c = chunk_size. Every distance is below chunk_size, which should not exceed the trained length. The three
partial attentions are computed separately and merged with their log-sum-exps, which is exactly one softmax
over all keys (as flash attention merges blocks).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional, Tuple

import torch

from models.rope import apply_rope

if TYPE_CHECKING:
    from models.decode import KVCache


@dataclass(frozen=True)
class DualChunkAttention:
    """DCA's two lengths; `chunk_size` is the largest relative position used (set it to the trained length)."""

    chunk_size: int
    """c: chunk length plus local window; query positions stay below it."""
    local_size: int
    """w: how many queries at the start of a chunk see the previous chunk at exact distances."""

    def __post_init__(self) -> None:
        if not 0 <= self.local_size < self.chunk_size:
            raise ValueError(f"dual chunk attention needs 0 <= local_size < chunk_size, "
                             f"got local_size={self.local_size}, chunk_size={self.chunk_size}")

    @property
    def chunk_len(self) -> int:
        """s = chunk_size - local_size: tokens per chunk."""
        return self.chunk_size - self.local_size

    def key_positions(self, j: torch.Tensor) -> torch.Tensor:
        """Rotary position of the key at absolute position j."""
        return j % self.chunk_len

    def query_positions(self, i: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotary positions of the query at absolute position i: (intra, successive, inter)."""
        s, c = self.chunk_len, self.chunk_size
        intra = i % s
        successive = (intra + s).clamp(max=c - 1)
        return intra, successive, torch.full_like(i, c - 1)


# rows x columns of one block of scores: (B, G, R, 1024, 1024) fp32 is 64 MiB for 16 query heads, where one
# chunk's whole score matrix at Qwen3's 32K chunks read out to 128K would be ~100 GB
BLOCK = 1024


def _partial(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
             causal_from: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (B, G, R, t, D) over k, v (B, G, 1, n, D): output (B, G, R, t, D) fp32, lse (B, G, R, t).

    causal_from: query row r may see key columns <= r + causal_from (None: every key). Computed in blocks of
    BLOCK rows x BLOCK columns merged by their log-sum-exps (flash attention's online softmax), so the memory is
    one block's scores whatever t and n are.
    """
    t, n, block = q.shape[-2], k.shape[-2], BLOCK
    out = torch.empty(*q.shape, dtype=torch.float32, device=q.device)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    for r0 in range(0, t, block):
        r1 = min(t, r0 + block)
        last = n if causal_from is None else min(n, r1 + causal_from)  # columns any of these rows sees
        acc, acc_lse = None, None
        for c0 in range(0, last, block):
            c1 = min(last, c0 + block)
            scores = torch.matmul(q[..., r0:r1, :], k[..., c0:c1, :].transpose(-1, -2)).float() * scale
            if causal_from is not None and c1 - 1 > r0 + causal_from:  # a block the diagonal crosses
                rows = torch.arange(r0, r1, device=q.device)[:, None]
                cols = torch.arange(c0, c1, device=q.device)[None, :]
                scores = scores.masked_fill(cols > rows + causal_from, float("-inf"))
            blk_lse = torch.logsumexp(scores, dim=-1)  # (B, G, R, rows); -inf for a row that sees none
            finite = torch.where(torch.isfinite(blk_lse), blk_lse, torch.zeros_like(blk_lse))
            blk = torch.matmul(torch.exp(scores - finite[..., None]), v[..., c0:c1, :].float())
            if acc is None:  # the first column block: every row sees key 0
                acc, acc_lse = blk, blk_lse
            else:
                new = torch.logaddexp(acc_lse, blk_lse)
                acc = acc * torch.exp(acc_lse - new)[..., None] + blk * torch.exp(blk_lse - new)[..., None]
                acc_lse = new
        out[..., r0:r1, :], lse[..., r0:r1] = acc, acc_lse
    return out, lse


def dual_chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         dca: DualChunkAttention, kv_cache: Optional["KVCache"] = None,
                         layer_idx: int = 0) -> torch.Tensor:
    """DCA of one layer: q (B, H, T, D), k, v (B, Hkv, T, D) before RoPE; cos/sin tables (>= chunk_size, D/2).

    The queries are the T positions after the cache's filled ones (0 without a cache). Keys are stored in the
    cache rotated at their DCA positions, so a cache filled in this mode only serves this mode.
    Returns (B, H, T, D) in q's dtype.
    """
    b, h, t, d = q.shape
    hkv = k.shape[1]
    start = 0 if kv_cache is None else kv_cache.length
    pos = torch.arange(start, start + t, device=q.device)  # absolute positions of the new tokens
    kp = dca.key_positions(pos)
    k = apply_rope(k, cos[kp][None, None], sin[kp][None, None])
    if kv_cache is not None:
        k, v = kv_cache.update(layer_idx, k, v)  # (B, Hkv, S, D), S = start + t
    # grouped-query attention by broadcasting: query head g*R + r reads key head g (no repeated k/v copies)
    rep = h // hkv
    q = q.view(b, hkv, rep, t, d)
    k, v = k[:, :, None], v[:, :, None]  # (B, Hkv, 1, S, D)
    scale = 1.0 / math.sqrt(d)
    s = dca.chunk_len
    out = torch.empty(b, hkv, rep, t, d, dtype=q.dtype, device=q.device)
    for m in range(start // s, (start + t - 1) // s + 1):  # every chunk that holds some of the queries
        lo, hi = max(m * s, start), min((m + 1) * s, start + t)  # absolute query positions [lo, hi)
        rows = q[:, :, :, lo - start: hi - start]  # (B, Hkv, R, n, D)
        intra, successive, inter = dca.query_positions(torch.arange(lo, hi, device=q.device))

        def rotated(p: torch.Tensor) -> torch.Tensor:
            return apply_rope(rows, cos[p][None, None, None], sin[p][None, None, None])

        parts: List[Tuple[torch.Tensor, torch.Tensor]] = [
            # same chunk, causal: query lo - m*s sees keys up to itself
            _partial(rotated(intra), k[..., m * s: hi, :], v[..., m * s: hi, :], scale, causal_from=lo - m * s)]
        if m >= 1:
            parts.append(_partial(rotated(successive), k[..., (m - 1) * s: m * s, :],
                                  v[..., (m - 1) * s: m * s, :], scale))
        if m >= 2:
            parts.append(_partial(rotated(inter), k[..., : (m - 1) * s, :], v[..., : (m - 1) * s, :], scale))
        lse = torch.logsumexp(torch.stack([p[1] for p in parts]), dim=0)  # (B, Hkv, R, n)
        merged = sum(o * torch.exp(l - lse)[..., None] for o, l in parts)
        out[:, :, :, lo - start: hi - start] = merged.to(q.dtype)
    return out.view(b, h, t, d)
