"""Read and write HF transformers Qwen3 / Qwen3-MoE checkpoint directories (config.json + safetensors).

Parameter names are HF's already; the only layout change is MoE experts: this model (like transformers 5 in
memory) stacks them as `mlp.experts.gate_up_proj` (E, 2F, d) and `mlp.experts.down_proj` (E, d, F), while
the released checkpoints store `mlp.experts.{e}.{gate,up,down}_proj.weight` per expert, which is what
`save_hf` writes. transformers itself is not needed here.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models.config import Qwen3Config
from models.moe import Qwen3MoeExperts
from models.qwen3 import Qwen3ForCausalLM, whole_already

PathLike = Union[str, os.PathLike]
_SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


# --------------------------------------------------------------------------------------------------------
# config.json

def config_from_hf(d: Dict[str, Any], name: Optional[str] = None) -> Qwen3Config:
    """Qwen3Config from an HF config.json dict (4.x `rope_theta` / `rope_scaling` or 5.x `rope_parameters`)."""
    model_type = d.get("model_type")
    if model_type not in ("qwen3", "qwen3_moe"):
        raise ValueError(f"model_type must be qwen3 or qwen3_moe, got {model_type!r}")
    if d.get("use_sliding_window"):
        raise ValueError("use_sliding_window: sliding-window attention is not supported")
    if d.get("attention_bias"):
        raise ValueError("attention_bias: Qwen3 has no attention biases")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act must be silu, got {d.get('hidden_act')!r}")
    moe = model_type == "qwen3_moe"
    if moe and (d.get("mlp_only_layers") or d.get("decoder_sparse_step", 1) != 1):
        raise ValueError("mlp_only_layers / decoder_sparse_step: only all-MoE layer stacks are supported")

    rope = dict(d.get("rope_parameters") or {})
    legacy = d.get("rope_scaling")
    theta = rope.pop("rope_theta", None) or d.get("rope_theta") or 10000.0
    if rope.get("rope_type", rope.get("type", "default")) == "default" and legacy:
        rope = dict(legacy)  # 4.x layout: scaling in rope_scaling, theta at the top level
        rope.pop("rope_theta", None)
    kind = rope.get("rope_type", rope.get("type", "default"))
    scaling = None if kind == "default" else {k: v for k, v in rope.items() if k != "type"} | {"rope_type": kind}
    if kind == "yarn" and "original_max_position_embeddings" not in scaling:  # as transformers reads it
        scaling["original_max_position_embeddings"] = d.get("max_position_embeddings", 40960)

    def token_id(v: Any) -> Optional[int]:
        return v[0] if isinstance(v, list) and v else (v if isinstance(v, int) else None)

    heads = d["num_attention_heads"]
    cfg = Qwen3Config(
        name=name or d.get("_name_or_path") or model_type,
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d.get("intermediate_size", 0),
        num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or d["hidden_size"] // heads,
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta),
        rope_scaling=scaling,
        max_position_embeddings=d.get("max_position_embeddings", 40960),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        num_experts=(d.get("num_experts") or d.get("num_local_experts") or 0) if moe else 0,
        num_experts_per_tok=d.get("num_experts_per_tok", 0) if moe else 0,
        moe_intermediate_size=d.get("moe_intermediate_size", 0) if moe else 0,
        norm_topk_prob=bool(d.get("norm_topk_prob", False)) if moe else True,
        router_aux_loss_coef=float(d.get("router_aux_loss_coef", 0.001)),
        initializer_range=float(d.get("initializer_range", 0.02)),
        bos_token_id=token_id(d.get("bos_token_id")),
        eos_token_id=token_id(d.get("eos_token_id")),
    )
    return cfg.validate()


def _hf_max_positions(cfg: Qwen3Config) -> int:
    """max_position_embeddings as transformers reads it: under YaRN, factor x the original length (transformers
    4.x derives the YaRN factor from max_position_embeddings / original_max_position_embeddings, so any other value
    would scale RoPE differently from this model)."""
    s = cfg.rope_scaling
    if s is not None and s.get("rope_type", s.get("type")) == "yarn" and "original_max_position_embeddings" in s:
        return int(round(float(s["factor"]) * int(s["original_max_position_embeddings"])))
    return cfg.max_position_embeddings


def hf_config_dict(cfg: Qwen3Config, dtype: Optional[torch.dtype] = None) -> Dict[str, Any]:
    """HF config.json dict for cfg, readable by transformers 4.x (rope_theta/rope_scaling) and 5.x (rope_parameters)."""
    rope_parameters: Dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope_parameters = {**cfg.rope_scaling, "rope_theta": cfg.rope_theta}
    d: Dict[str, Any] = {
        "architectures": ["Qwen3MoeForCausalLM" if cfg.is_moe else "Qwen3ForCausalLM"],
        "model_type": "qwen3_moe" if cfg.is_moe else "qwen3",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": _hf_max_positions(cfg),
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None if cfg.rope_scaling is None else dict(cfg.rope_scaling),
        "rope_parameters": rope_parameters,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "initializer_range": cfg.initializer_range,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "use_cache": True,
    }
    if cfg.is_moe:
        d.update({
            "num_experts": cfg.num_experts,  # the released key; transformers 5 maps it to num_local_experts
            "num_experts_per_tok": cfg.num_experts_per_tok,
            "moe_intermediate_size": cfg.moe_intermediate_size,
            "norm_topk_prob": cfg.norm_topk_prob,
            "router_aux_loss_coef": cfg.router_aux_loss_coef,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "output_router_logits": False,
        })
    else:
        d["max_window_layers"] = cfg.num_hidden_layers
    if dtype is not None:
        d["dtype"] = d["torch_dtype"] = str(dtype).removeprefix("torch.")
    return d


# --------------------------------------------------------------------------------------------------------
# weights

def _checkpoint_files(path: Path) -> List[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


class HFWeights:
    """The weights of an HF checkpoint directory, read one parameter at a time under this model's names.

    Every key's name and shape is checked against `cfg` when the reader is made, before anything is read
    or written: a bad checkpoint fails with nothing loaded. `tensor(name)` then reads one parameter (for
    stacked MoE experts, optionally only some experts) from disk; nothing else is held in memory.
    """

    def __init__(self, path: PathLike, cfg: Qwen3Config) -> None:
        self.path = Path(path)
        self.cfg = cfg
        with torch.device("meta"):
            expected = {k: tuple(t.shape) for k, t in hf_tensors(Qwen3ForCausalLM(cfg).state_dict(), cfg)}
        self.files: Dict[str, Path] = {}
        for file in _checkpoint_files(self.path):
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    if key == "lm_head.weight" and cfg.tie_word_embeddings:
                        continue  # some exports store the tied head anyway; the embedding is the source
                    if key not in expected:
                        raise ValueError(f"{file.name}: unexpected key {key}")
                    shape = tuple(f.get_slice(key).get_shape())
                    if shape != expected[key]:
                        raise ValueError(f"{file.name}: {key}: checkpoint shape {shape} != model shape "
                                         f"{expected[key]}")
                    self.files[key] = file
        self._open: Dict[Path, Any] = {}
        missing = sorted(set(expected) - set(self.files))
        if missing:
            raise ValueError(f"{self.path}: missing weights {missing[:8]}{' ...' if len(missing) > 8 else ''}")

    def _read(self, key: str) -> torch.Tensor:
        file = self.files[key]
        if file not in self._open:  # memory-mapped; kept open for the (many) per-expert reads
            self._open[file] = safe_open(str(file), framework="pt")
        return self._open[file].get_tensor(key)

    def tensor(self, name: str, experts: Optional[range] = None) -> torch.Tensor:
        """Parameter `name` (a state_dict key of Qwen3ForCausalLM); `experts` picks slices of stacked experts."""
        for stacked in ("gate_up_proj", "down_proj"):
            if name.endswith(f"mlp.experts.{stacked}"):
                prefix = name[: -len(stacked)]
                parts = ("down",) if stacked == "down_proj" else ("gate", "up")
                chosen = experts if experts is not None else range(self.cfg.num_experts)
                return torch.stack([torch.cat([self._read(f"{prefix}{e}.{kind}_proj.weight") for kind in parts])
                                    for e in chosen])
        return self._read(name)


def load_hf_weights(model: Qwen3ForCausalLM, path: PathLike,
                    gather: Optional[Callable[[torch.nn.Parameter], ContextManager[bool]]] = None) -> None:
    """Copy an HF checkpoint directory's weights into `model`, one parameter at a time.

    Expert-parallel models read only their own experts. gather(p): a context in which a partitioned (ZeRO-3)
    parameter is whole, yielding whether this rank's writes are kept (a rank whose are not skips the read); the
    files are read one parameter at a time, never the whole model at once.
    """
    weights = HFWeights(path, model.config)
    with torch.no_grad():
        for name, p in model.named_parameters():  # a tied head appears once, as model.embed_tokens.weight
            owner = model.get_submodule(name.rsplit(".", 1)[0])
            experts = None
            if isinstance(owner, Qwen3MoeExperts):
                experts = range(owner.first_expert, owner.first_expert + owner.num_local_experts)
            with (gather or whole_already)(p) as kept:
                if kept:
                    p.copy_(weights.tensor(name, experts))


def load_hf(path: PathLike, device: Union[str, torch.device] = "cpu",
            dtype: torch.dtype = torch.float32) -> Qwen3ForCausalLM:
    """Build a Qwen3ForCausalLM from an HF checkpoint directory (sharded or not); every weight must be present."""
    path = Path(path)
    cfg = config_from_hf(json.loads((path / "config.json").read_text()), name=path.name)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(cfg).to(dtype)
    model.to_empty(device=device)  # also recomputes the RoPE tables and re-ties the head
    load_hf_weights(model, path)
    return model


def hf_tensors(state_dict: Dict[str, torch.Tensor], cfg: Qwen3Config) -> Iterator[Tuple[str, torch.Tensor]]:
    """(on-disk name, tensor view) pairs in the released layout: per-expert MoE keys, tied head omitted."""
    f_size = cfg.moe_intermediate_size
    for name, t in state_dict.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            for e in range(t.shape[0]):
                yield f"{prefix}{e}.gate_proj.weight", t[e, :f_size]
                yield f"{prefix}{e}.up_proj.weight", t[e, f_size:]
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                yield f"{prefix}{e}.down_proj.weight", t[e]
        else:
            yield name, t


def _parse_size(size: Union[int, str]) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B)\s*", size.upper())
    if not m:
        raise ValueError(f"max_shard_size: expected bytes or e.g. '5GB', got {size!r}")
    return int(float(m[1]) * _SIZE_UNITS[m[2]])


def save_hf(model: Qwen3ForCausalLM, path: PathLike, dtype: Optional[torch.dtype] = None,
            max_shard_size: Union[int, str] = "5GB",
            state_dict: Optional[Dict[str, torch.Tensor]] = None) -> Path:
    """Write model as an HF checkpoint directory (config.json + safetensors, sharded with an index when large).

    dtype: cast the weights (None keeps each tensor's dtype). state_dict: use these tensors instead of
    model.state_dict() (e.g. a ZeRO-3 consolidated one). The directory is written under a temporary name
    next to `path` and renamed into place, so a crash never leaves a half-written checkpoint at `path`.
    """
    sd = model.state_dict() if state_dict is None else state_dict
    return write_hf(model.config, path, sd.items(), sd, dtype, max_shard_size)


def write_hf(cfg: Qwen3Config, path: PathLike, tensors: Iterable[Tuple[str, torch.Tensor]],
             layout: Dict[str, torch.Tensor], dtype: Optional[torch.dtype] = None,
             max_shard_size: Union[int, str] = "5GB") -> Path:
    """`save_hf` from a stream: `tensors` yields (state-dict name, tensor) in any order, `layout` (a state dict,
    meta tensors will do) gives every name's shape and dtype. The shards are planned from `layout`; each is
    written as soon as its last tensor has arrived and then dropped, so a stream in state-dict order (a
    distributed gather, one parameter at a time) never has more than one shard in memory.
    """
    path = Path(path)
    planned = list(hf_tensors(layout, cfg))

    # Plan the shards from sizes alone, then materialise each as its tensors arrive.
    limit = _parse_size(max_shard_size)
    shards: List[List[str]] = [[]]
    shard_bytes, total_bytes = 0, 0
    for name, t in planned:
        nbytes = t.numel() * (dtype or t.dtype).itemsize
        if shards[-1] and shard_bytes + nbytes > limit:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += nbytes
        total_bytes += nbytes
    shard_of = {name: i for i, shard in enumerate(shards) for name in shard}
    shapes = {name: t.shape for name, t in planned}
    missing = [len(shard) for shard in shards]
    fname = (lambda i: "model.safetensors") if len(shards) == 1 else (
        lambda i: f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        pending: Dict[str, torch.Tensor] = {}
        arrived = set()
        for key, value in tensors:
            for name, t in hf_tensors({key: value}, cfg):
                if name not in shard_of or name in arrived or t.shape != shapes[name]:
                    raise ValueError(f"{path}: tensor {name} {tuple(t.shape)} is not in the planned layout, "
                                     f"or came twice")
                # clone(): expert slices are views of one stacked tensor, and safetensors refuses shared storage
                pending[name] = t.detach().to(device="cpu", dtype=dtype or t.dtype).contiguous().clone()
                arrived.add(name)
                i = shard_of[name]
                missing[i] -= 1
                if missing[i] == 0:
                    save_file({n: pending.pop(n) for n in shards[i]}, str(tmp / fname(i)), metadata={"format": "pt"})
        if any(missing):
            absent = [n for n in shard_of if n not in arrived]
            raise ValueError(f"{path}: the stream ended without {len(absent)} tensors, e.g. {absent[:3]}")
        if len(shards) > 1:
            weight_map = {n: fname(shard_of[n]) for n in sorted(shard_of)}
            index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        saved_dtype = dtype or next(iter(layout.values())).dtype
        (tmp / "config.json").write_text(json.dumps(hf_config_dict(cfg, saved_dtype), indent=2) + "\n")
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
