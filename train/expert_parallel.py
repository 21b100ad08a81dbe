"""Expert parallelism (`expert_parallel_size` = ep > 1) for our MoE layer, on DeepSpeed's own MoE machinery.

Why this path and not AutoEP. DeepSpeed 0.19.8 offers two: its native MoE support (expert / expert-data-parallel
process groups, expert-parameter tags, MoE-aware ZeRO-1/2, per-expert checkpoint files), and AutoEP, which
swaps each HF MoE block for its own `AutoEPMoELayer`. AutoEP would replace our layer: its router and
load-balancing loss instead of our fp32 router and global-batch balance loss (models/moe.py), and its parameter
names (`router.gate.weight`, `experts.w1/w2/w3`) instead of HF's, which our checkpoints and HF export rely on.
So we keep our layer and register it with the native machinery; models/ stays pure PyTorch (the all-to-all
dispatch and combine are plain torch.distributed in models/moe.py) and everything DeepSpeed-specific is here.
With train/engine.py it is the training path's way into DeepSpeed (see there); it imports deepspeed only inside
functions, so the loop imports this module (for `check_config` and `shard`) without loading deepspeed.

What DeepSpeed does, unchanged:
* groups: `groups._create_expert_and_data_parallel(ep)` - expert-parallel groups of ep consecutive ranks (the
  all-to-all runs there; rank r of a group holds experts [r*E/ep, (r+1)*E/ep) of every layer) and
  expert-data-parallel groups of the world/ep ranks holding the same experts;
* expert parameters are tagged as `deepspeed.moe.experts.Experts` tags its own (`allreduce = False`,
  `group_name = "ep_size_<ep>"`) and put in their own optimizer group
  (`split_params_into_different_moe_groups_for_optimizer`): ZeRO-1/2 then partition their optimizer state and
  reduce their gradients over the expert-data-parallel group only, averaged by the whole data-parallel world
  (each expert's gradient already holds its whole expert-parallel group's tokens, brought back by the
  all-to-all's backward), and compute the global gradient norm with each expert counted once;
* the engine runs in MoE mode because our experts modules are made instances of a subclass that also derives
  from `deepspeed.moe.layer.MoE` (its `__init__` never runs: no DeepSpeed gate or experts are built);
* checkpoints use DeepSpeed's MoE layout: `mp_rank_00_model_states.pt` without the experts, ZeRO shards per
  rank, and one `layer_<l>_expert_<e>_mp_rank_00_model_states.pt` per expert, read back by DeepSpeed's
  `load_moe_state_dict` for the experts this rank holds.

What is ours: DeepSpeed's per-expert *writer* only understands its own module layout
(`deepspeed_moe.experts.deepspeed_experts.<i>.*`), and skips our stacked `gate_up_proj` / `down_proj`; so
`save_expert_files` writes those files (tensors under the HF per-expert names), and a load_state_dict pre-hook
stacks what DeepSpeed's loader read back into this rank's slice (or slices a full state dict's experts);
`read_expert_files` reads them back whole, all E experts, for one process (`python -m train.eval`).
`shard` runs on the meta device when the model is built, so a rank never holds the other ranks' experts as
parameters. (`init_weights` draws each stacked expert parameter whole, once and transiently, one tensor at a time,
so the values equal an unsharded model's: for 235B-A22B a layer's `gate_up_proj` is 6 GB in fp32 for that moment.)

ZeRO-3 is refused: DeepSpeed 0.19.8 asserts "Native DeepSpeed MoE is not supported with ZeRO Stage 3" (only
AutoEP layers may be partitioned by ZeRO-3). ZeRO-0 is refused too: without ZeRO, DeepSpeed's gradient
clipping averages the per-rank norms instead of combining them, which is not the global norm once ranks hold
different experts.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from models.moe import Qwen3MoeExperts, Qwen3SparseMoeBlock
from train.config import ConfigError, TrainConfig

SUPPORTED_ZERO_STAGES = (1, 2)


def check_config(cfg: TrainConfig) -> None:
    """Refuse what expert parallelism cannot run with, before any process group starts."""
    ep, zero = cfg.expert_parallel_size, cfg.deepspeed.zero_stage
    if ep > 1 and zero not in SUPPORTED_ZERO_STAGES:
        why = ("DeepSpeed 0.19.8 partitions only AutoEP layers under ZeRO-3 (see train/expert_parallel.py)"
               if zero == 3 else "without ZeRO, DeepSpeed's gradient clipping is not exact across expert shards")
        raise ConfigError(f"config key 'expert_parallel_size' = {ep}: needs deepspeed=zero1 or deepspeed=zero2, "
                          f"got deepspeed.zero_stage={zero}; {why}")


def group_name(ep: int) -> str:
    """DeepSpeed's name for the expert-parallel groups of size ep (also each expert parameter's `group_name`)."""
    return f"ep_size_{ep}"


def experts_modules(model: nn.Module) -> Iterator[Tuple[str, Qwen3MoeExperts]]:
    """(name, module) of every MoE layer's experts, in module order (DeepSpeed's MoE layer ids follow it)."""
    for name, module in model.named_modules():
        if isinstance(module, Qwen3MoeExperts):
            yield name, module


@functools.lru_cache(maxsize=None)
def _deepspeed_experts_class(base: type) -> type:
    """`base` that DeepSpeed's engine also takes for one of its MoE layers (isinstance of deepspeed's MoE)."""
    from deepspeed.moe.layer import MoE
    from deepspeed.utils import groups

    def set_deepspeed_parallelism(self: Any, use_data_before_expert_parallel_: bool = False) -> None:
        # the engine calls this on every MoE layer at start; our groups exist already (they shaped the weights)
        if use_data_before_expert_parallel_:
            raise ValueError("expert parallelism here lays out expert groups before data groups (E + D)")
        if self.expert_group_name not in groups._get_expert_parallel_group_dict():
            raise RuntimeError(f"expert-parallel group {self.expert_group_name} was not created")

    # the base comes first, so forward, state_dict and num_local_experts are ours
    return type(f"DeepSpeed{base.__name__}", (base, MoE), {
        "__doc__": f"{base.__name__} registered with DeepSpeed as an MoE layer (train/expert_parallel.py).",
        "set_deepspeed_parallelism": set_deepspeed_parallelism,
    })


def _stack_experts(state_dict: Dict[str, Any], prefix: str, experts: range) -> None:
    """Replace the per-expert tensors (HF names, global ids) of `experts` in `state_dict` by the stacked
    `<prefix>gate_up_proj` (n, 2F, d) and `<prefix>down_proj` (n, d, F), in expert order."""
    gate_up, down = [], []
    for e in experts:
        gate = state_dict.pop(f"{prefix}{e}.gate_proj.weight")
        up = state_dict.pop(f"{prefix}{e}.up_proj.weight")
        gate_up.append(torch.cat([gate, up]))  # (2F, d): gate rows first, as in gate_up_proj
        down.append(state_dict.pop(f"{prefix}{e}.down_proj.weight"))  # (d, F)
    state_dict[f"{prefix}gate_up_proj"] = torch.stack(gate_up)
    state_dict[f"{prefix}down_proj"] = torch.stack(down)


def expert_files(ckpt: Path, model: nn.Module) -> List[Tuple[str, List[Path]]]:
    """(experts module name, its per-expert files in expert order) of every MoE layer of a whole (unsharded)
    `model`, in the checkpoint folder `ckpt` of an expert-parallel run (`save_expert_files` wrote them)."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    ckpt = Path(ckpt)
    return [(name, [Path(DeepSpeedEngine._get_expert_ckpt_name(str(ckpt.parent), layer_id, e, ckpt.name,
                                                                checkpoint_mp_rank=0))
                    for e in range(experts.num_experts)])
            for layer_id, (name, experts) in enumerate(experts_modules(model))]


def missing_expert_files(files: List[Tuple[str, List[Path]]]) -> List[Path]:
    """The files of `expert_files(...)` that are not there."""
    return [f for _, layer in files for f in layer if not f.exists()]


def read_expert_files(ckpt: Path, model: nn.Module) -> Dict[str, torch.Tensor]:
    """Every MoE layer's whole expert stacks (all E experts), under `model`'s state-dict names, from the
    per-expert files of an expert-parallel checkpoint folder; FileNotFoundError naming the first one missing.

    The checkpoint's `mp_rank_00_model_states.pt` holds every other weight; together they are the model's state
    dict. One layer's experts at a time are read and stacked. Call inside `train.engine.safe_torch_load`.
    """
    files = expert_files(ckpt, model)
    missing = missing_expert_files(files)
    if missing:
        raise FileNotFoundError(f"{missing[0]}: missing ({len(missing)} of the checkpoint's per-expert files are; "
                                f"an expert-parallel checkpoint holds one per MoE layer and expert)")
    state: Dict[str, torch.Tensor] = {}
    for name, layer in files:
        per_expert: Dict[str, Any] = {}
        for f in layer:
            per_expert.update(torch.load(f, map_location="cpu", weights_only=True))
        _stack_experts(per_expert, f"{name}.", range(len(layer)))
        state.update(per_expert)
    return state


def _restack_pre_hook(module: nn.Module, state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
    """Turn what is loaded into this rank's stacked expert slice.

    Two sources: per-expert tensors under HF names and global ids (DeepSpeed's loader reading our expert
    files), or the stacked tensors of all E experts (a full state dict, e.g. `init_from` an HF directory).
    """
    assert isinstance(module, Qwen3MoeExperts)
    first, n = module.first_expert, module.num_local_experts
    if f"{prefix}{first}.gate_proj.weight" in state_dict:
        _stack_experts(state_dict, prefix, range(first, first + n))
        return
    for param in ("gate_up_proj", "down_proj"):
        full = state_dict.get(f"{prefix}{param}")
        if full is not None and full.shape[0] == module.num_experts != n:
            state_dict[f"{prefix}{param}"] = full[first:first + n]


def shard(model: nn.Module, ep: int) -> None:
    """Create DeepSpeed's expert groups and keep only this rank's experts in every MoE layer.

    Call on every rank; on the meta device (before `to_empty`, so the other experts are never allocated here;
    `init_weights` then draws the same values as an unsharded model) or on real weights. Idempotent.
    """
    from deepspeed.utils import groups

    name = group_name(ep)
    if name not in groups._get_expert_parallel_group_dict():  # kept across the jobs of a --multirun sweep
        groups._create_expert_and_data_parallel(ep)
    ep_group = groups._get_expert_parallel_group(name)
    for module in model.modules():
        if isinstance(module, Qwen3SparseMoeBlock) and module.ep_group is None:
            module.set_expert_parallel(ep_group)
            module.experts.register_load_state_dict_pre_hook(_restack_pre_hook)


def setup(model: nn.Module, ep: int) -> None:
    """Shard (if not done yet) and register every MoE layer with DeepSpeed as its expert-parallel MoE layer.

    Call on every rank, before the optimizer and the DeepSpeed engine are created.
    """
    shard(model, ep)
    name = group_name(ep)
    for _, experts in experts_modules(model):
        experts.__class__ = _deepspeed_experts_class(type(experts))
        experts.expert_group_name = name  # what DeepSpeed reads off its MoE layers
        experts.ep_size = ep
        for p in (experts.gate_up_proj, experts.down_proj):
            p.allreduce = False  # type: ignore[attr-defined]
            p.group_name = name  # type: ignore[attr-defined]


def optimizer_param_groups(param_groups: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The model's optimizer groups with the expert parameters moved into DeepSpeed's MoE groups."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    named = [{"name": f"group{i}", **g} for i, g in enumerate(param_groups)]  # DeepSpeed keys MoE groups by name
    return split_params_into_different_moe_groups_for_optimizer(named)


def save_expert_files(engine: Any, save_dir: str, tag: str) -> None:
    """Write this rank's experts into DeepSpeed's per-expert checkpoint files (one rank per expert writes)."""
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.utils import groups

    layers = list(experts_modules(engine.module))
    if groups._get_expert_data_parallel_rank(layers[0][1].expert_group_name) != 0:
        return  # another replica of these experts (same expert-parallel rank, another data-parallel rank) writes
    for layer_id, (name, experts) in enumerate(layers):
        f = experts.down_proj.shape[-1]
        for j in range(experts.num_local_experts):
            e = experts.first_expert + j
            gate_up = experts.gate_up_proj[j].detach()
            state = {f"{name}.{e}.gate_proj.weight": gate_up[:f].clone(),
                     f"{name}.{e}.up_proj.weight": gate_up[f:].clone(),
                     f"{name}.{e}.down_proj.weight": experts.down_proj[j].detach().clone()}
            path = DeepSpeedEngine._get_expert_ckpt_name(save_dir, layer_id, e, tag,
                                                         checkpoint_mp_rank=engine.checkpoint_mp_rank)
            engine.checkpoint_engine.save(state, path)


def gather_to_rank0(local: torch.Tensor, experts: nn.Module) -> Optional[torch.Tensor]:
    """All E experts of one stacked parameter on global rank 0, from each rank's slice `local`; None elsewhere.

    Only the expert-parallel group holding rank 0 takes part (the other groups hold copies of the same experts).
    """
    from deepspeed.utils import groups

    group = groups._get_expert_parallel_group(experts.expert_group_name)
    if 0 not in dist.get_process_group_ranks(group):
        return None
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))] if dist.get_rank() == 0 else None
    dist.gather(local.contiguous(), parts, dst=0, group=group)  # in expert-parallel rank order = expert order
    return torch.cat(parts) if parts is not None else None
