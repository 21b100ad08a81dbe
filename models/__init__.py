"""tristage models: the Qwen3 family (dense and MoE) in pure PyTorch, its loss, HF interop and decoding."""
from models.config import Qwen3Config
from models.generate import KVCache, generate
from models.hf import config_from_hf, hf_config_dict, load_hf, read_hf_config, save_hf
from models.loss import fused_linear_cross_entropy
from models.params import ParamCounts, count_parameters, flops_per_token
from models.presets import load_preset, preset_names
from models.qwen3 import ModelOutput, Qwen3ForCausalLM, position_ids_from_doc_ids

__all__ = [
    "Qwen3Config", "Qwen3ForCausalLM", "ModelOutput", "position_ids_from_doc_ids",
    "load_preset", "preset_names", "ParamCounts", "count_parameters", "flops_per_token",
    "fused_linear_cross_entropy", "load_hf", "save_hf", "config_from_hf", "read_hf_config", "hf_config_dict",
    "KVCache", "generate",
]
