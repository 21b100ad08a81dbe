"""Inference beyond the trained length: the three ways a model can be run at a longer context.

- plain: the trained RoPE as is (positions past the trained length were never seen);
- yarn:  static YaRN, factor = longest evaluated length / trained length, as Qwen3 serves 4x its context;
- dca:   Dual Chunk Attention (models/dca.py) with chunk_size = the trained length, so no relative position
         beyond the trained ones is used, and local_size = chunk_size / 8 by default.
"""
from __future__ import annotations

from typing import Any, Dict

from models.qwen3 import Qwen3ForCausalLM

MODES = ("plain", "yarn", "dca")
DCA_LOCAL_FRACTION = 8  # local_size = chunk_size // 8 (ChunkLlama and Qwen2.5-1M keep the window a small fraction)


def set_mode(model: Qwen3ForCausalLM, mode: str, trained_len: int, max_len: int,
             dca_local_size: int = 0) -> Dict[str, Any]:
    """Put the model in `mode` for inputs up to max_len tokens; returns the settings used (for the results)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    model.set_attention_mode("full")
    model.set_rope_scaling(None)
    if mode == "yarn":
        factor = max(1.0, max_len / trained_len)
        if factor > 1.0:
            model.set_rope_scaling({"rope_type": "yarn", "factor": factor,
                                    "original_max_position_embeddings": trained_len})
        return {"mode": mode, "factor": factor, "original_max_position_embeddings": trained_len}
    if mode == "dca":
        local = dca_local_size or max(1, trained_len // DCA_LOCAL_FRACTION)
        model.set_attention_mode("dca", chunk_size=trained_len, local_size=local)
        return {"mode": mode, "chunk_size": trained_len, "local_size": local}
    return {"mode": mode}


def reset(model: Qwen3ForCausalLM) -> None:
    """Back to the trained configuration (full attention, no RoPE scaling)."""
    model.set_attention_mode("full")
    model.set_rope_scaling(None)
