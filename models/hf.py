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

# What transformers 5 reads for a key config.json leaves out (Qwen3Config / Qwen3MoeConfig defaults), so that a
# sparse config builds the same shapes here as there. The MoE config has no head_dim: hidden_size / heads.
_HF_DEFAULTS = {
    "qwen3": {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128,
              "max_position_embeddings": 32768},
    "qwen3_moe": {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 24,
                  "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": None,
                  "max_position_embeddings": 32768, "num_experts": 128, "num_experts_per_tok": 8,
                  "moe_intermediate_size": 768, "norm_topk_prob": False},
}


def config_from_hf(d: Dict[str, Any], name: Optional[str] = None, source: str = "config.json") -> Qwen3Config:
    """Qwen3Config from an HF config.json dict (4.x `rope_theta` / `rope_scaling` or 5.x `rope_parameters`).

    Missing keys take transformers' defaults. `router_aux_loss_coef` is converted: transformers' balance loss
    counts each token k times (it is k at an even load), this model's counts assignments (1 at an even load), so
    the same strength is k x the HF coefficient. Errors are ValueErrors that start with `source`.
    """
    try:
        return _config_from_hf(d, name)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{source}: {e}") from e


def _config_from_hf(d: Dict[str, Any], name: Optional[str]) -> Qwen3Config:
    model_type = d.get("model_type")
    if model_type not in _HF_DEFAULTS:
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
    defaults = _HF_DEFAULTS[model_type]

    def get(key: str) -> Any:
        v = d.get(key)
        return defaults.get(key) if v is None else v

    # as transformers 5 (and 4.x, which knows no rope_parameters): a non-null rope_scaling is read first, whole
    rope = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", None) or d.get("rope_theta") or 10000.0
    kind = rope.get("rope_type", rope.get("type", "default"))
    scaling = None if kind == "default" else {k: v for k, v in rope.items() if k != "type"} | {"rope_type": kind}

    def token_id(v: Any) -> Optional[int]:
        return v[0] if isinstance(v, list) and v else (v if isinstance(v, int) else None)

    heads = get("num_attention_heads")
    top_k = get("num_experts_per_tok") if moe else 0
    # transformers 5 reads num_local_experts for num_experts; a 0 was taken for "missing" and became the default 128
    experts = next((d[k] for k in ("num_experts", "num_local_experts") if d.get(k) is not None),
                   defaults.get("num_experts", 0))
    if moe and (not isinstance(experts, int) or isinstance(experts, bool) or experts < 1):
        raise ValueError(f"num_experts: a qwen3_moe config needs a positive number of experts, got {experts!r}")
    cfg = Qwen3Config(
        name=name or d.get("_name_or_path") or model_type,
        vocab_size=get("vocab_size"),
        hidden_size=get("hidden_size"),
        intermediate_size=get("intermediate_size"),
        num_hidden_layers=get("num_hidden_layers"),
        num_attention_heads=heads,
        # an explicit null is "as many as the query heads" in transformers; a missing key its class default
        num_key_value_heads=heads if "num_key_value_heads" in d and d["num_key_value_heads"] is None
        else get("num_key_value_heads"),
        head_dim=get("head_dim") or get("hidden_size") // heads,
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta),
        rope_scaling=scaling,
        max_position_embeddings=get("max_position_embeddings"),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        num_experts=experts if moe else 0,
        num_experts_per_tok=top_k,
        moe_intermediate_size=get("moe_intermediate_size") if moe else 0,
        norm_topk_prob=bool(get("norm_topk_prob")) if moe else True,
        router_aux_loss_coef=float(d.get("router_aux_loss_coef", 0.001)) * max(top_k, 1),
        initializer_range=float(d.get("initializer_range", 0.02)),
        bos_token_id=token_id(d.get("bos_token_id")),
        eos_token_id=token_id(d.get("eos_token_id")),
    )
    return cfg.validate()


def read_hf_config(path: PathLike) -> Qwen3Config:
    """The Qwen3Config of an HF checkpoint directory; a missing, unreadable or unusable config.json is a
    ValueError naming the file."""
    file = Path(path) / "config.json"
    try:
        d = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{file}: cannot read it as JSON ({type(e).__name__}: {e})") from e
    if not isinstance(d, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(d).__name__}")
    return config_from_hf(d, name=Path(path).name, source=str(file))


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
            "router_aux_loss_coef": cfg.router_aux_loss_coef / cfg.num_experts_per_tok,  # see config_from_hf
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
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            return [path / f for f in sorted(set(weight_map.values()))]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from e
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


_STACKED = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}  # safetensors' names of the dtypes a weight may be stored in


class HFWeights:
    """The weights of an HF checkpoint directory, read one parameter at a time under this model's names.

    Experts may be stored per expert (`mlp.experts.{e}.{gate,up,down}_proj.weight`, the released layout) or
    stacked as this model holds them (`mlp.experts.gate_up_proj`, what transformers 5 writes with
    `save_original_format=False`). Every key's name and shape is checked against `cfg` when the reader is made,
    before anything is read or written: a bad checkpoint fails with nothing loaded. `tensor(name)` then reads
    one parameter (for stacked MoE experts, optionally only some experts) from disk; nothing else is held in
    memory.
    """

    def __init__(self, path: PathLike, cfg: Qwen3Config) -> None:
        self.path = Path(path)
        self.cfg = cfg
        with torch.device("meta"):
            state = Qwen3ForCausalLM(cfg).state_dict()
        required = {k: tuple(t.shape) for k, t in hf_tensors(state, cfg)}
        # a stacked key stands for its per-expert keys
        stacked_of = {k: name for name, t in state.items() if name.endswith(_STACKED)
                      for k, _ in hf_tensors({name: t}, cfg)}
        expected = {**required, **{name: tuple(t.shape) for name, t in state.items() if name.endswith(_STACKED)}}
        self.files: Dict[str, Path] = {}
        self.stored_as: Dict[str, str] = {}  # a parameter read under another key (a tied head stored alone)
        self._open: Dict[Path, Any] = {}
        tied_head: Optional[Path] = None
        for file in _checkpoint_files(self.path):
            for key, shape, dtype in self._keys(file):
                # an integer tensor was cast to the model's floats unsaid (0.02 stored as 0); FP8 needs its scales
                if dtype not in _FLOAT_DTYPES:
                    raise ValueError(f"{file}: {key}: stored as {dtype}; weights are read from F32, BF16, F16 or F64")
                if key == "lm_head.weight" and cfg.tie_word_embeddings:
                    tied_head = file  # some exports store the tied head anyway: checked below
                    continue
                if key not in expected:
                    raise ValueError(f"{file}: unexpected key {key}")
                if shape != expected[key]:
                    raise ValueError(f"{file}: {key}: checkpoint shape {shape} != model shape {expected[key]}")
                self.files[key] = file
        if tied_head is not None and "model.embed_tokens.weight" not in self.files:
            # the tied matrix stored under the head's name only: transformers ties it the other way round
            self.files["model.embed_tokens.weight"] = tied_head
            self.stored_as["model.embed_tokens.weight"] = "lm_head.weight"
            tied_head = None
        both = sorted(k for k in stacked_of if k in self.files and stacked_of[k] in self.files)
        if both:
            raise ValueError(f"{self.path}: {both[0]} is stored both per expert and stacked as {stacked_of[both[0]]}")
        missing = sorted(k for k in required if k not in self.files and stacked_of.get(k) not in self.files)
        if missing:
            raise ValueError(f"{self.path}: missing weights {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        # transformers ties a stored head only when it equals the embedding, and otherwise uses both untied
        if tied_head is not None and not self._same_rows(tied_head, "lm_head.weight", "model.embed_tokens.weight"):
            raise ValueError(f"{tied_head}: lm_head.weight differs from model.embed_tokens.weight under "
                             f"tie_word_embeddings: true (transformers then keeps both, untied); set "
                             f"tie_word_embeddings to false in config.json to load them as two matrices")

    @staticmethod
    def _keys(file: Path) -> List[Tuple[str, tuple, str]]:
        """(key, shape, dtype) of every tensor in a safetensors file; an unreadable file is a ValueError naming it."""
        try:
            with safe_open(str(file), framework="pt") as f:
                return [(key, tuple(f.get_slice(key).get_shape()), f.get_slice(key).get_dtype()) for key in f.keys()]
        except Exception as e:  # safetensors raises its own error types (SafetensorError, OSError, ...)
            raise ValueError(f"{file}: not a readable safetensors file ({type(e).__name__}: {e})") from e

    def _file(self, key: str) -> Any:
        return self._file_at(self.files[key])

    def _file_at(self, file: Path) -> Any:
        if file not in self._open:  # memory-mapped; kept open for the (many) per-expert reads
            self._open[file] = safe_open(str(file), framework="pt")
        return self._open[file]

    def tensor(self, name: str, experts: Optional[range] = None) -> torch.Tensor:
        """Parameter `name` (a state_dict key of Qwen3ForCausalLM); `experts` picks slices of stacked experts."""
        if name.endswith(_STACKED):
            chosen = experts if experts is not None else range(self.cfg.num_experts)
            if name in self.files:  # stored stacked: read the experts' rows only
                return self._file(name).get_slice(name)[chosen.start:chosen.stop]
            stacked = name.rsplit(".", 1)[1]
            prefix = name[: -len(stacked)]
            parts = ("down",) if stacked == "down_proj" else ("gate", "up")
            return torch.stack([torch.cat([self._read(f"{prefix}{e}.{kind}_proj.weight") for kind in parts])
                                for e in chosen])
        return self._read(name)

    def _read(self, key: str) -> torch.Tensor:
        return self._file(key).get_tensor(self.stored_as.get(key, key))

    def _same_rows(self, file: Path, key: str, other: str, rows: int = 4096) -> bool:
        """Whether `key` in `file` equals the tensor `other` exactly, read a block of rows at a time (a vocabulary
        matrix of a large model is GBs, and every rank of a partitioned build reads it)."""
        a, b = self._file_at(file).get_slice(key), self._file(other).get_slice(other)
        n = a.get_shape()[0]
        return all(torch.equal(a[i:i + rows], b[i:i + rows]) for i in range(0, n, rows))


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
    cfg = read_hf_config(path)
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


def _as_umask_allows(path: Path) -> None:
    """Give a file the permissions the umask allows: safetensors creates its files owner-only (0600), which on a
    shared run directory keeps every other user from loading the weights."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


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


def _clear_killed_writes(path: Path) -> None:
    """Remove what a killed `write_hf` of `path` left beside it: a partial `.<name>.tmp-*` (up to a whole model's
    weights), and a `.<name>.old-*` copy, which is the previous complete export and goes back in place when the
    kill fell between the two renames."""
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    for old in sorted(path.parent.glob(f".{path.name}.old-*")):
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.rename(path)


def write_hf(cfg: Qwen3Config, path: PathLike, tensors: Iterable[Tuple[str, torch.Tensor]],
             layout: Dict[str, torch.Tensor], dtype: Optional[torch.dtype] = None,
             max_shard_size: Union[int, str] = "5GB", extra: Optional[Callable[[Path], None]] = None) -> Path:
    """`save_hf` from a stream: `tensors` yields (state-dict name, tensor) in any order, `layout` (a state dict,
    meta tensors will do) gives every name's shape and dtype. The shards are planned from `layout`; each is
    written as soon as its last tensor has arrived and then dropped, so a stream in state-dict order (a
    distributed gather, one parameter at a time) never has more than one shard in memory. `extra(folder)` writes
    more files (a tokenizer) into the folder before it is published, so they appear together with the weights.
    """
    path = Path(path)
    for name, t in layout.items():
        if name.endswith(_STACKED) and t.shape[0] != cfg.num_experts:
            raise ValueError(f"{path}: {name} holds {t.shape[0]} of the model's {cfg.num_experts} experts (an "
                             f"expert-parallel shard); an export needs every expert (the trainer's hf/<stage> "
                             f"export gathers them)")
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
    _clear_killed_writes(path)
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
                    _as_umask_allows(tmp / fname(i))
        if any(missing):
            absent = [n for n in shard_of if n not in arrived]
            raise ValueError(f"{path}: the stream ended without {len(absent)} tensors, e.g. {absent[:3]}")
        if len(shards) > 1:
            weight_map = {n: fname(shard_of[n]) for n in sorted(shard_of)}
            index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        saved_dtype = dtype or next(iter(layout.values())).dtype
        (tmp / "config.json").write_text(json.dumps(hf_config_dict(cfg, saved_dtype), indent=2) + "\n")
        if extra is not None:
            extra(tmp)
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
