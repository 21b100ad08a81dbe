"""DeepSpeed, behind one small interface: engine, micro-batch step, checkpoint I/O (the process group and the
ranks' coordination: train/dist.py).

The training path reaches DeepSpeed's engine only through here, and through train/expert_parallel.py, the part
that registers our MoE layers with DeepSpeed's expert parallelism. Elsewhere deepspeed is imported inside
functions, for its checkpoint tools only: the re-shard of saved checkpoints (train/reshard.py), reading a ZeRO
folder's fp32 weights (train/eval/target.py) and the memory estimators (launch/plan.py). The loop sees an `Engine`
with `set_plan`, `set_lr`, `micro_step`, `optimizer_step`, `reset_optimizer_state`, `save`, `load`,
`full_parameters`, `param_groups`, `close` and its `module`, so a different engine would replace these files.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import pickle
import shutil
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from train import expert_parallel
from train.config import StagePlan, TrainConfig, grad_accum_dtype
from train.dist import DistInfo


def use_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """bf16 mixed precision (fp32 master weights) on GPU, plain fp32 on the CPU, unless the config says."""
    if cfg.deepspeed.precision == "auto":
        return device.type == "cuda"
    return cfg.deepspeed.precision == "bf16"


def deepspeed_config(cfg: TrainConfig, plan: StagePlan, device: torch.device) -> Dict[str, Any]:
    """The DeepSpeed JSON config generated from the Hydra config for one stage's batch shape."""
    ds = cfg.deepspeed
    zero: Dict[str, Any] = {
        "stage": ds.zero_stage,
        "overlap_comm": ds.overlap_comm and device.type == "cuda",
        "contiguous_gradients": True,
        "reduce_bucket_size": ds.reduce_bucket_size,
        "allgather_bucket_size": ds.reduce_bucket_size,
    }
    if ds.zero_stage == 3:
        zero["stage3_prefetch_bucket_size"] = ds.stage3_prefetch_bucket_size
        zero["stage3_param_persistence_threshold"] = 0 if device.type == "cpu" else 100_000
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    config: Dict[str, Any] = {
        "train_batch_size": plan.samples_per_step,
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.grad_accum,
        # fp32 without ZeRO: DeepSpeed would clip by a norm of fp32 sums (on the CPU 0.4% low for 50M elements),
        # not the one logged; `Engine.optimizer_step` clips there by the fp64 norm it logs
        "gradient_clipping": 0.0 if own_clipping(cfg, device) else ds.grad_clip,
        "zero_optimization": zero,
        # a non-finite global gradient norm makes ZeRO skip the update on every rank (fp32 always does)
        "bf16": {"enabled": use_bf16(cfg, device), "check_grad_overflow": True},
        # fp32 at ZeRO-2/3: each micro-batch's reduced bf16 gradient is added to an fp32 partition, so 32 of them
        # sum exactly instead of drifting 7e-3 (relative; tests/test_grad_accum.py)
        "data_types": {"grad_accum_dtype": grad_accum_dtype(ds, use_bf16(cfg, device))},
        "fp16": {"enabled": False},
        # torch AdamW is the client optimizer: DeepSpeed's FusedAdam does not build everywhere (see README)
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    for key, value in ds.extra.items():  # a section (zero_optimization, bf16) is merged key by key
        config[key] = {**config[key], **value} if isinstance(config.get(key), dict) else value
    return config


def own_clipping(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether `Engine.optimizer_step` computes the gradient norm and clips itself (fp32 without ZeRO, where
    DeepSpeed's optimizer is torch's own), rather than DeepSpeed."""
    return cfg.deepspeed.zero_stage == 0 and not use_bf16(cfg, device)


def partitioned_init(cfg: TrainConfig) -> bool:
    """Whether the model is built already partitioned over the ranks (ZeRO-3 with deepspeed.partitioned_init)."""
    return cfg.deepspeed.zero_stage == 3 and cfg.deepspeed.partitioned_init


def construction(cfg: TrainConfig, plan: StagePlan, info: DistInfo) -> contextlib.AbstractContextManager:
    """The context the model is built in: under ZeRO-3 with `partitioned_init`, DeepSpeed's `zero.Init`.

    Inside it each module's weights are split over the ranks as soon as the module is built, so no rank ever
    holds more than one module's weights whole (a 32B dense model cannot be built whole on an 80 GB GPU);
    `whole` then makes one parameter whole again for writing. Elsewhere the model is built on the meta
    device and materialised on each rank.
    """
    if not partitioned_init(cfg):
        return torch.device("meta")
    import deepspeed

    return deepspeed.zero.Init(config_dict_or_path=deepspeed_config(cfg, plan, info.device))


@contextlib.contextmanager
def whole(p: torch.nn.Parameter) -> Iterator[bool]:
    """A context in which parameter `p` is whole on every rank; it yields whether what this rank writes to it is
    kept. A partitioned one is gathered and rank 0's values are kept (broadcast, then partitioned again on
    leaving), so the other ranks need not read or compute them. Plain parameters are whole already."""
    if not hasattr(p, "ds_id"):
        yield True
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters([p], modifier_rank=0):  # rank 0 of the parameter's ZeRO group
        yield dist.get_rank() == dist.get_global_rank(p.ds_process_group, 0)


def local_parameter_elements(model: torch.nn.Module) -> int:
    """Weight elements this rank holds: its partitions under ZeRO-3's partitioned construction, else all."""
    return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())


def decay_groups(params: Iterable[torch.Tensor], weight_decay: float) -> List[Dict[str, Any]]:
    """AdamW's two groups: matrices decay, 1-D parameters (RMSNorm gains) do not."""
    decay, no_decay = [], []
    for p in params:
        if p.requires_grad:  # a ZeRO-3 partition is flat: its whole shape is ds_shape
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _safe_load_globals() -> list:
    """The few non-tensor classes DeepSpeed pickles into its checkpoints, allowed for `weights_only=True`."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def safe_torch_load() -> Iterator[None]:
    """Every `torch.load` inside (DeepSpeed's loaders and converters included) runs with `weights_only=True`.

    DeepSpeed 0.19.8 loads its own files with `weights_only=False`, which would execute a `__reduce__` payload
    planted in a checkpoint; under this context such a file is refused with `CheckpointLoadError`.
    """
    original = torch.load

    def load(f: Any, map_location: Any = None, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        try:
            with torch.serialization.safe_globals(_safe_load_globals()):
                return original(f, map_location, *args, **kwargs)
        except pickle.UnpicklingError as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointLoadError(f"{f}: refused to load (it holds pickled objects other than tensors and "
                                      f"DeepSpeed's state; {first})") from None
        except (RuntimeError, EOFError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            # a truncated or overwritten file (torch's zip reader names no file); not an out-of-memory or a
            # device error, which say nothing about the file
            if isinstance(e, EOFError) or "PytorchStreamReader" in first or "zip archive" in first:
                raise CheckpointLoadError(f"{f}: cannot be read, truncated or damaged ({first})") from None
            raise

    torch.load = load  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.load = original  # type: ignore[assignment]


class _RecordingWriter:
    """DeepSpeed's checkpoint writer for one save, recording its first failed write instead of raising it
    (`Engine.save`); every other attribute is the wrapped writer's."""

    def __init__(self, inner: Any, fault: Callable[[str], None]):
        self.inner = inner
        self.fault = fault
        self.error: Optional[str] = None
        self.written: List[str] = []  # the files this rank wrote, for Engine.save to flush to disk

    def guard(self, write: Callable[..., Any]) -> Callable[..., Any]:
        """`write`, skipped once a write has failed, and its own failure recorded."""
        def call(*args: Any, **kwargs: Any) -> Any:
            if self.error is None:
                try:
                    return write(*args, **kwargs)
                except Exception as e:  # noqa: BLE001 - raised by Engine.save once every rank is through
                    # torch's zip writer says only "unexpected pos" for a full disk: the file and the free space
                    where = kwargs.get("path", args[-1] if args else "")
                    self.error = f"{where}: {type(e).__name__}: {e}"
            return None
        return call

    def save(self, state_dict: Any, path: str) -> None:
        def write(state_dict: Any, path: str) -> None:
            self.fault("enospc_in_write")
            self.inner.save(state_dict, path)
            self.written.append(path)

        self.guard(write)(state_dict, path)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class CheckpointLoadError(RuntimeError):
    """A checkpoint file that cannot be loaded safely."""


def convert_to_universal(ckpt_dir: str, out_dir: str) -> None:
    """DeepSpeed's universal checkpoint of `ckpt_dir` in `out_dir` (for a different world size), loaded safely."""
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=ckpt_dir, output_folder=out_dir, num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    with safe_torch_load(), contextlib.redirect_stdout(io.StringIO()):
        ds_to_universal.main(args)


class Engine:
    """A DeepSpeed engine with the few operations the training loop needs."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, plan: StagePlan, info: DistInfo):
        import deepspeed

        self.cfg = cfg
        self.info = info
        fused = cfg.optim.fused == "true" or (cfg.optim.fused == "auto" and info.device.type == "cuda")
        if cfg.expert_parallel_size > 1:  # shard the experts before the optimizer and ZeRO see the weights
            expert_parallel.setup(model, cfg.expert_parallel_size)
        param_groups = decay_groups(model.parameters(), cfg.optim.weight_decay)
        if cfg.expert_parallel_size > 1:
            param_groups = expert_parallel.optimizer_param_groups(param_groups)
        optimizer = torch.optim.AdamW(param_groups, lr=0.0,
                                      betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, fused=fused)
        self.ds_config = deepspeed_config(cfg, plan, info.device)
        self.ds, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                             config=self.ds_config)
        # bf16 without ZeRO wraps torch's AdamW in DeepSpeed's FP16_UnfusedOptimizer, which creates the AdamW
        # state by one step on zero gradients (at LR 0): the moments stay 0 but every `step` count is 1, so each
        # bias correction would run a step ahead (the first update 0.73 x lr instead of lr). Nothing has trained
        # yet: counting from 0 again makes the state a fresh one
        for st in getattr(self.ds.optimizer, "optimizer", self.ds.optimizer).state.values():
            if torch.is_tensor(st.get("step")):
                st["step"].zero_()
            elif "step" in st:
                st["step"] = 0
        self.plan = plan
        # per-group hyper-parameters as built here; a load must not change them (see `load`)
        self._group_hparams = [{"weight_decay": g["weight_decay"]} for g in self.ds.optimizer.param_groups]

    @property
    def module(self) -> torch.nn.Module:
        """The wrapped model (parameters partitioned under ZeRO-3)."""
        return self.ds.module

    @property
    def param_groups(self) -> List[Dict[str, Any]]:
        """The optimizer's parameter groups as DeepSpeed's wrapper holds them (what its checkpoints are keyed by)."""
        return self.ds.optimizer.param_groups

    def close(self) -> None:
        """Free the engine's hooks and buffers (a process that builds several engines, as train.bench does)."""
        self.ds.destroy()

    def set_plan(self, plan: StagePlan) -> None:
        """Switch micro-batch size and accumulation for a new stage, keeping the same engine and optimizer."""
        self.ds.set_train_micro_batch_size(plan.micro_batch_size)
        self.ds.set_train_batch_size(plan.samples_per_step)
        inner = getattr(self.ds, "optimizer", None)
        if inner is not None and hasattr(inner, "gradient_accumulation_steps"):
            inner.gradient_accumulation_steps = plan.grad_accum
        self.plan = plan

    def reset_optimizer_state(self) -> None:
        """Forget AdamW moments (a stage with `carry_optimizer: false`); they restart from zero lazily."""
        inner = self.ds.optimizer
        torch_opt = getattr(inner, "optimizer", inner)  # ZeRO wraps the client optimizer
        torch_opt.state.clear()

    def set_lr(self, lr: float) -> None:
        """Set the LR of every parameter group for the next optimizer step."""
        for group in self.ds.optimizer.param_groups:
            group["lr"] = lr

    def micro_step(self, batch: Dict[str, torch.Tensor], last: bool, loss_scale: Optional[float] = None) -> Any:
        """Forward and backward of one micro-batch; `last` marks the accumulation boundary.

        `loss_scale` multiplies the loss before backward (fault-injection tests: NaN, spikes).
        """
        self.ds.set_gradient_accumulation_boundary(last)
        out = self.ds(**batch)
        self.ds.backward(out.loss if loss_scale is None else out.loss * loss_scale)
        return out

    def optimizer_step(self) -> tuple[float, bool]:
        """Clip, step and zero gradients; returns (global grad norm before clipping, whether the step applied).

        ZeRO 1-3 skip a step with a non-finite global gradient norm themselves (identically on every rank, the
        norm being global); without ZeRO the gradients are already all-reduced, so every rank sees the same
        non-finite values and skips alike here.
        """
        own_norm = None
        # fp32 without ZeRO: DeepSpeed neither reports the norm nor checks it, and its clipping sums in fp32
        # (its bf16 wrapper reports, checks and clips by a norm of its own, and keeps the accumulated gradients in
        # buffers of its own: `.grad` holds only the last micro-batch's there)
        if own_clipping(self.cfg, self.info.device):
            grads = [p.grad for p in self.ds.module.parameters() if p.grad is not None]
            # the global L2 norm, summed in fp64 as ZeRO's (fp32 norms of large tensors drift by ~1e-4 on the
            # CPU); one host sync, as ZeRO's own check
            own_norm = float(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64) for g in grads])
                             .norm()) if grads else 0.0
            if not math.isfinite(own_norm):
                self.ds.zero_grad()
                return float("nan"), False
            clip = self.cfg.deepspeed.grad_clip
            if clip > 0 and own_norm + 1e-6 > clip:  # DeepSpeed's (and torch's) coefficient, clip / (norm + 1e-6)
                for g in grads:
                    g.mul_(clip / (own_norm + 1e-6))
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        norm = float(norm) if norm is not None else own_norm if own_norm is not None else float("nan")
        return norm, bool(self.ds.was_step_applied())

    def save(self, save_dir: str, tag: str, client_state: Dict[str, Any],
             fault: Callable[[str], None] = lambda kind: None) -> List[str]:
        """Every rank writes its shard of weights and optimizer state to save_dir/tag (no `latest` file); returns
        the files this rank wrote.

        A write that fails on one rank (a full disk fills first where rank 0 writes the most) must not make that
        rank leave DeepSpeed's save at the failed file: it would skip the save's closing barrier, where the other
        ranks would wait until the watchdog. The failed write is recorded instead, the rest of this checkpoint is
        not written, and the error is raised once every rank is through the save's collectives. `fault` is the
        test hook for a failed write inside DeepSpeed's save (`enospc_in_write`).
        """
        writer = _RecordingWriter(self.ds.checkpoint_engine, fault)
        # DeepSpeed's zero_to_fp32.py beside the shards (rank 0; a private method of deepspeed==0.19.8, pinned)
        copy_scripts = self.ds._copy_recovery_script
        self.ds.checkpoint_engine, self.ds._copy_recovery_script = writer, writer.guard(copy_scripts)
        try:
            self.ds.save_checkpoint(save_dir, tag=tag, client_state=client_state, save_latest=False)
            if self.cfg.expert_parallel_size > 1 and writer.error is None:  # DeepSpeed's writer skips our experts
                expert_parallel.save_expert_files(self.ds, save_dir, tag)
        finally:
            self.ds.checkpoint_engine = writer.inner
            del self.ds._copy_recovery_script  # the class's method again
        if writer.error is not None:
            try:
                free = f" ({shutil.disk_usage(save_dir).free / 2**30:.1f} GiB free on that file system)"
            except OSError:
                free = ""
            raise OSError(f"{writer.error}{free}")
        return writer.written

    def load(self, load_dir: str, tag: str, load_optimizer: bool = True, module_only: bool = False,
             universal: bool = False) -> Dict[str, Any]:
        """Load load_dir/tag into the engine; returns the client state saved with it.

        `universal`: load_dir/tag is a universal (re-sharded) copy of a checkpoint saved in another layout.
        """
        self.ds._config.load_universal_checkpoint = universal  # DeepSpeed reads it at each load
        with safe_torch_load():
            path, client = self.ds.load_checkpoint(load_dir, tag=tag, load_optimizer_states=load_optimizer,
                                                   load_lr_scheduler_states=False, load_module_strict=True,
                                                   load_module_only=module_only)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint in {os.path.join(load_dir, tag)}")
        # DeepSpeed 0.19.8's ZeRO-3 universal load copies group 0's hyper-parameters onto every group, which
        # would put weight decay on the RMSNorm gains; the groups' own values are restored here
        for group, hparams in zip(self.ds.optimizer.param_groups, self._group_hparams):
            group.update(hparams)
        # ...and hands one `step` tensor to every parameter group, which AdamW then increments once per group
        # (a bias correction running ahead); each state gets its own copy again. A universal load also leaves
        # `step` on the CPU, where fused (and capturable) AdamW needs it on the parameter's device, in fp32
        # (by the optimizer's defaults: ZeRO-3's universal load empties its groups' parameter lists)
        inner = getattr(self.ds.optimizer, "optimizer", self.ds.optimizer)
        on_device = bool(inner.defaults.get("fused") or inner.defaults.get("capturable"))
        for p, st in inner.state.items():
            if "step" in st:
                step = st["step"]
                step = step.detach().clone() if torch.is_tensor(step) else torch.tensor(float(step))
                st["step"] = step.to(device=p.device if on_device else "cpu", dtype=torch.float32)
        return client or {}

    def full_parameters(self) -> Iterator[Tuple[str, Optional[torch.Tensor]]]:
        """(name, the whole parameter in fp32 on the CPU) on rank 0 and (name, None) elsewhere, one parameter at
        a time in state-dict order (a tied head comes again under its own name). Every rank must drain it.

        In bf16 training these are the fp32 master weights (ZeRO's, or without ZeRO those of DeepSpeed's bf16
        optimizer wrapper), not the bf16 copies the forward uses. Each parameter is assembled by a collective over
        its ZeRO group (experts then gathered over the expert-parallel group); only rank 0 keeps it, and only until
        the consumer (`models.hf.write_hf`) has written the shard it belongs to.
        """
        from deepspeed.utils import safe_get_full_fp32_param

        keep = self.info.rank == 0
        experts = {id(p): m for _, m in expert_parallel.experts_modules(self.ds.module)
                   for p in (m.gate_up_proj, m.down_proj)} if self.cfg.expert_parallel_size > 1 else {}
        # without ZeRO, bf16's masters sit in the wrapper's groups beside the bf16 ones (fp32: the parameter itself)
        wrapper = self.ds.optimizer
        masters = {id(low): high for lows, highs in zip(getattr(wrapper, "fp16_groups", []),
                                                        getattr(wrapper, "fp32_groups", []))
                   for low, high in zip(lows, highs)} if self.cfg.deepspeed.zero_stage == 0 else {}
        for name, param in self.ds.module.named_parameters(remove_duplicate=False):
            full = safe_get_full_fp32_param(param)  # None without ZeRO
            full = (masters.get(id(param), param) if full is None else full).detach()
            if id(param) in experts:  # this rank's slice of the experts: all E on rank 0
                full = expert_parallel.gather_to_rank0(full, experts[id(param)])
            yield name, (full.to("cpu", torch.float32).clone() if keep else None)
            del full
