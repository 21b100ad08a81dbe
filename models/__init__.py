"""tristage models: the Qwen3 family (dense and MoE) in pure PyTorch, its loss, HF interop and decoding.

The names below load on first use (PEP 562), so `models.config` and `models.presets`, which need no torch, can be
read without importing it: a command line with a bad key is refused in a second, not after torch's start-up.
"""
from __future__ import annotations

import importlib
from typing import Any

_HOME = {
    "Qwen3Config": "models.config", "load_preset": "models.presets", "preset_names": "models.presets",
    "Qwen3ForCausalLM": "models.qwen3", "ModelOutput": "models.qwen3", "position_ids_from_doc_ids": "models.qwen3",
    "ParamCounts": "models.params", "count_parameters": "models.params", "flops_per_token": "models.params",
    "fused_linear_cross_entropy": "models.loss", "KVCache": "models.decode", "generate": "models.decode",
    "load_hf": "models.hf", "save_hf": "models.hf", "config_from_hf": "models.hf", "read_hf_config": "models.hf",
    "hf_config_dict": "models.hf",
}
__all__ = list(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME[name]), name)
