"""Rotary position embeddings: the frequency tables (plain RoPE and YaRN) and their application.

Tables are derived from the config and never saved with the weights, so raising `rope_theta` for the
Long Context stage cannot be undone by a stale buffer in a checkpoint.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import torch


def yarn_inv_freq(head_dim: int, theta: float, scaling: Dict[str, Any]) -> Tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023) inverse frequencies (head_dim/2,) and attention factor for a scaling dict.

    Dimensions that rotate many times within the original context keep their frequency (extrapolate), those
    that rotate less than once are divided by `factor` (interpolate), and a linear ramp blends the two in
    between. Logits are scaled by attention_factor**2 (applied to cos and sin, hence to q and k).
    """
    factor = float(scaling["factor"])
    original_len = int(scaling["original_max_position_embeddings"])
    beta_fast = float(scaling.get("beta_fast") or 32.0)  # rotations above which a dim is left alone
    beta_slow = float(scaling.get("beta_slow") or 1.0)  # rotations below which a dim is fully interpolated

    def dim_for_rotations(rotations: float) -> float:
        # The dimension index whose wavelength fits `rotations` times in the original context.
        return head_dim * math.log(original_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_for_rotations(beta_fast), dim_for_rotations(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp

    base_freq = theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    extrapolated = 1.0 / base_freq
    interpolated = 1.0 / (factor * base_freq)
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1.0 - ramp  # 1 for fast-rotating dims (keep), 0 for slow ones (interpolate)
    inv_freq = interpolated * (1 - keep) + extrapolated * keep

    def mscale(weight: float = 1.0) -> float:  # the paper's sqrt(1/t) = 0.1 ln(s) + 1, optionally weighted
        return 0.1 * weight * math.log(factor) + 1.0 if factor > 1 else 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        # DeepSeek-style configs give the ratio of two weighted ones (as transformers reads them: both or neither)
        if scaling.get("mscale") and scaling.get("mscale_all_dim"):
            attention_factor = mscale(scaling["mscale"]) / mscale(scaling["mscale_all_dim"])
        else:
            attention_factor = mscale()
    return inv_freq, float(attention_factor)


def rope_inv_freq(head_dim: int, theta: float,
                  scaling: Optional[Dict[str, Any]] = None) -> Tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim/2,) fp32 on the CPU and the attention factor for plain RoPE or YaRN."""
    kind = None if scaling is None else scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "yarn":
        return yarn_inv_freq(head_dim, theta, scaling)
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    return inv_freq, 1.0


def rope_table_length(max_position_embeddings: int, scaling: Optional[Dict[str, Any]] = None) -> int:
    """Positions the tables cover: the configured maximum, or factor x original length under YaRN if longer."""
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) == "yarn":
        # up, not down: factor x original positions must fit (1.001 x 1000 is 1001 positions, not 1000)
        extended = math.ceil(float(scaling["factor"]) * int(scaling["original_max_position_embeddings"]) - 1e-9)
        return max(max_position_embeddings, extended)
    return max_position_embeddings


def rope_tables(head_dim: int, theta: float, scaling: Optional[Dict[str, Any]], length: int,
                device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (length, head_dim/2) fp32, already multiplied by the attention factor."""
    inv_freq, attention_factor = rope_inv_freq(head_dim, theta, scaling)
    positions = torch.arange(length, dtype=torch.float32, device=device)
    angles = torch.outer(positions, inv_freq.to(device))  # (length, head_dim/2)
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by cos/sin (B or 1, 1, T, D/2): the two halves of D form the complex pairs."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, H, T, D/2) each, the "rotate half" convention of HF Qwen3
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
