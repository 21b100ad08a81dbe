"""Re-sharding a checkpoint for another layout (expert_parallel_size, world size or ZeRO stage), weights and AdamW
state both: `convert_expert_parallel` for expert-parallel ZeRO-1/2 checkpoints (DeepSpeed's converter serves the
others), then `fit_to_layout` for the launch that loads the universal copy, whichever converter wrote it.

DeepSpeed's own converter (`ds_to_universal`) merges each parameter's ZeRO fragments across all ranks by name.
Under expert parallelism that is wrong for the experts: every expert-parallel rank holds *other* experts under
the *same* name (`model.layers.0.mlp.experts.gate_up_proj` is experts 0-3 on one rank and 4-7 on the next), and
their optimizer state is partitioned over the expert-data-parallel group only. So this module writes the same
universal layout itself, knowing where each fragment comes from:

* rank r of a launch with expert_parallel_size ep holds experts [k*E/ep, (k+1)*E/ep) with k = r % ep, and is
  position r // ep of the expert-data-parallel group that partitions those experts' optimizer state (DeepSpeed's
  E + D layout: expert-parallel groups of ep consecutive ranks); every other parameter is partitioned over all
  ranks, position r;
* a parameter's fragments, in position order, are its flattened values; the experts' local stacks, in k order,
  are the whole stack of E experts.

The result is DeepSpeed's universal checkpoint: `zero/<name>/{fp32,exp_avg,exp_avg_sq,step}.pt` with the whole
tensor, expert stacks tagged with DeepSpeed's `ep_is_expert_param` / `ep_num_experts` so that its universal
loader gives each rank of the new layout its own experts, and `zero/optimizer_state.pt` with the optimizer's
global state and the *new* layout's parameter groups (expert parallelism moves the experts into a group of
their own, so the group lists differ between layouts). The work runs on one rank, one rank's file and then one
parameter at a time: memory is one rank's optimizer shard, not the model's.
"""
from __future__ import annotations

import re
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List

import torch

from train.engine import safe_torch_load

STATES = ("fp32", "exp_avg", "exp_avg_sq")
_OPTIM_FILE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


def _optim_files(ckpt: Path, world_size: int) -> Dict[int, Path]:
    """{rank: its ZeRO optimizer shard} of a checkpoint folder saved by `world_size` ranks."""
    files = {int(m.group(1)): p for p in ckpt.iterdir() if (m := _OPTIM_FILE.match(p.name))}
    if sorted(files) != list(range(world_size)):
        raise FileNotFoundError(f"{ckpt}: expected the ZeRO optimizer shards of ranks 0..{world_size - 1}, "
                                f"found those of ranks {sorted(files)}")
    return files


def convert_expert_parallel(ckpt_dir: str | Path, out_dir: str | Path, expert_parallel_size: int,
                            world_size: int) -> None:
    """Write the universal form of the ZeRO-1/2 checkpoint `ckpt_dir`, saved by `world_size` ranks with
    `expert_parallel_size`, to `out_dir` (then `fit_to_layout` it for the launch that loads it)."""
    from deepspeed.checkpoint.constants import PARAM

    ckpt, out, ep = Path(ckpt_dir), Path(out_dir), expert_parallel_size
    if world_size % ep:
        raise ValueError(f"{ckpt}: {world_size} ranks is not a multiple of expert_parallel_size={ep}")
    files = _optim_files(ckpt, world_size)
    with safe_torch_load():
        model_states = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    shapes = {name: tuple(shape) for group in model_states["param_shapes"] for name, shape in group.items()}
    tmp = out / "tmp"
    shutil.rmtree(out, ignore_errors=True)
    tmp.mkdir(parents=True)

    # pass 1: every rank's fragments, one file each: tmp/<name>/<k>.<position>.pt
    expert_names, global_state = set(), None  # the parameters DeepSpeed partitioned as experts
    for rank, path in sorted(files.items()):
        with safe_torch_load():
            sd = torch.load(path, map_location="cpu", weights_only=True)["optimizer_state_dict"]
        if sd["zero_stage"] not in (1, 2):
            raise ValueError(f"{path}: ZeRO stage {int(sd['zero_stage'])}; expert parallelism saves ZeRO-1/2 only")
        base = sd["base_optimizer_state"]
        if global_state is None:
            base_groups = [{k: v for k, v in g.items() if k != "params"} for g in base["param_groups"]]
            global_state = {k: v for k, v in sd.items()
                            if k not in ("base_optimizer_state", "param_slice_mappings",
                                         "single_partition_of_fp32_groups")}
        for g, (group, mapping) in enumerate(zip(base["param_groups"], sd["param_slice_mappings"])):
            moe = bool(group.get("moe"))
            k, position = (rank % ep, rank // ep) if moe else (0, rank)
            state = base["state"][g]
            flat = {"fp32": sd["single_partition_of_fp32_groups"][g], "exp_avg": state["exp_avg"],
                    "exp_avg_sq": state["exp_avg_sq"]}
            for name, frag in mapping.items():
                if moe:
                    expert_names.add(name)
                piece = {key: t.narrow(0, frag.start, frag.numel).clone() for key, t in flat.items()}
                piece["step"] = state["step"]
                (tmp / name).mkdir(exist_ok=True)
                torch.save(piece, tmp / name / f"{k}.{position}.pt")
        del sd, base

    # pass 2: one parameter at a time, its fragments in order; expert stacks in expert-parallel rank order
    zero = out / "zero"
    for param_dir in sorted(tmp.iterdir()):
        name = param_dir.name
        by_k: Dict[int, List[tuple]] = defaultdict(list)
        for f in param_dir.iterdir():
            k, position = map(int, f.stem.split("."))
            by_k[k].append((position, f))
        whole: Dict[str, List[torch.Tensor]] = {key: [] for key in STATES}
        step = None
        for k in sorted(by_k):
            with safe_torch_load():
                pieces = [torch.load(f, weights_only=True) for _, f in sorted(by_k[k])]
            step = pieces[0]["step"]
            for key in STATES:
                whole[key].append(torch.cat([p[key] for p in pieces]).view(shapes[name]))
        if name in expert_names and sorted(by_k) != list(range(ep)):
            raise ValueError(f"{ckpt}: {name} has expert shards from expert-parallel ranks {sorted(by_k)}, "
                             f"expected 0..{ep - 1}")
        (zero / name).mkdir(parents=True)
        for key in STATES:
            tensor = torch.cat(whole[key]) if name in expert_names else whole[key][0]
            torch.save({PARAM: tensor}, zero / name / f"{key}.pt")
        torch.save(step, zero / name / "step.pt")
        shutil.rmtree(param_dir)
    assert global_state is not None
    global_state["param_groups"] = base_groups
    torch.save(global_state, zero / "optimizer_state.pt")
    shutil.copy2(ckpt / "mp_rank_00_model_states.pt", out / "mp_rank_00_model_states.pt")
    shutil.rmtree(tmp)


def fit_to_layout(universal_dir: str | Path, expert_params: List[str], param_groups: List[Dict[str, Any]],
                  expert_parallel_size: int, zero3: bool) -> None:
    """Make a universal checkpoint (ours, or DeepSpeed's of any ZeRO stage) load into a launch with these optimizer
    groups, this expert_parallel_size and ZeRO-3 or not.

    DeepSpeed 0.19.8 writes it in two forms, and each stage's loader reads only its own. ZeRO-1/2: each state
    `{param: whole tensor}`, a `step.pt` beside them, and a global state whose `param_groups` the loader pairs
    with its own groups (copying their hyper-parameters, loading state only for the groups it pairs). ZeRO-3: flat
    tensors, no `step.pt`, the step in the saved optimizer's state dict, and the model-states file of ZeRO-3's name.
    The copy is rewritten so that both loaders read it: states as `{param: tensor}` in their shapes with a
    `step.pt`, a global state with the loading layout's own groups in both places, and the model-states file
    the loading stage asks for (`_fit_model_states`). With expert_parallel_size > 1 every expert stack is tagged
    so that the loader keeps this rank's experts.
    """
    from deepspeed.checkpoint.constants import DS_VERSION, EP_IS_EXPERT_PARAM, EP_NUM_EXPERTS, OPTIMIZER_STATE_DICT, PARAM

    out = Path(universal_dir)
    zero = out / "zero"
    model_states = _model_states(out)
    shapes = {name: torch.Size(shape) for group in model_states["param_shapes"] for name, shape in group.items()}
    state_path = zero / "optimizer_state.pt"
    with safe_torch_load():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    saved = state.pop(OPTIMIZER_STATE_DICT, None)  # ZeRO-3's form: rank 0's whole optimizer state dict
    state.pop("fp32_flat_groups", None)  # ZeRO-3's form: rank 0's partition of the weights, read from zero/ instead
    if saved is not None:
        step = saved["state"][0]["step"]
    else:  # every parameter has the same step
        with safe_torch_load():
            step = torch.load(zero / next(iter(shapes)) / "step.pt", map_location="cpu", weights_only=True)
    experts = set(expert_params) if expert_parallel_size > 1 else set()
    # the files to rewrite: all in ZeRO-3's form (flat, never expert-parallel), else the expert stacks only
    for name in shapes if saved is not None else sorted(experts):
        for key in STATES:
            path = zero / name / f"{key}.pt"
            with safe_torch_load():
                entry = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(entry, dict):
                torch.save({PARAM: entry.view(shapes[name])}, path)
            elif name in experts:  # the whole stack of every expert
                torch.save(entry | {EP_IS_EXPERT_PARAM: True, EP_NUM_EXPERTS: entry[PARAM].shape[0]}, path)
        if not (zero / name / "step.pt").exists():
            torch.save(step, zero / name / "step.pt")
    groups = [{k: v for k, v in g.items() if k != "params"} for g in param_groups]
    state["param_groups"] = groups
    state[OPTIMIZER_STATE_DICT] = {"state": {0: {"step": step}}, "param_groups": groups}
    state.setdefault(DS_VERSION, model_states.get(DS_VERSION))
    torch.save(state, state_path)
    _fit_model_states(out, model_states, zero3)


_PARTITIONED, _WHOLE = "zero_pp_rank_0_mp_rank_00_model_states.pt", "mp_rank_00_model_states.pt"


def _model_states(universal_dir: Path) -> Dict[str, Any]:
    """The universal copy's model-states file (either stage's name), its tensors memory-mapped."""
    path = universal_dir / (_WHOLE if (universal_dir / _WHOLE).exists() else _PARTITIONED)
    with safe_torch_load():
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _fit_model_states(out: Path, states: Dict[str, Any], zero3: bool) -> None:
    """Write the model-states file the loading stage reads, when the copy was saved under the other kind:
    `zero_pp_rank_0_...` for ZeRO-3 (module entries as empty placeholders, as ZeRO-3 saves them), `mp_rank_00_...`
    otherwise (whole weights, from the fp32 files, memory-mapped). The weights DeepSpeed trains from are the fp32
    files either way; the module entries only have to match the model's parameters."""
    from deepspeed.checkpoint.constants import PARAM

    want = out / (_PARTITIONED if zero3 else _WHOLE)
    if want.exists():
        return
    buffers, shared = set(states.get("buffer_names") or ()), states.get("shared_params") or {}
    for name, value in states["module"].items():
        if name in buffers:
            continue
        if zero3:
            states["module"][name] = torch.empty(0, dtype=value.dtype)
        else:
            with safe_torch_load():
                states["module"][name] = torch.load(out / "zero" / shared.get(name, name) / "fp32.pt",
                                                    map_location="cpu", weights_only=True, mmap=True)[PARAM]
    torch.save(states, want)


def copy_whole_weights(universal_dir: str | Path, module: torch.nn.Module) -> None:
    """Copy every parameter of `module` from a universal copy's fp32 files, which hold each one whole (an expert
    stack with all its experts, whatever expert_parallel_size saved it): `init_from` under fp32 ZeRO-0, whose
    plain AdamW DeepSpeed's universal load cannot fill, and whose model-states file an expert-parallel copy
    lacks the experts of."""
    from deepspeed.checkpoint.constants import PARAM

    zero = Path(universal_dir) / "zero"
    with torch.no_grad():
        for name, p in module.named_parameters():  # a tied head appears once, under the embedding's name
            with safe_torch_load():
                entry = torch.load(zero / name / "fp32.pt", map_location="cpu", weights_only=True, mmap=True)
            p.copy_((entry[PARAM] if isinstance(entry, dict) else entry).view(p.shape))
