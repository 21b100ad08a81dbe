"""The training loop: one function runs any curriculum, stage after stage, inside one launch.

Per optimizer step: evaluate (if due) -> step -> log -> spike check -> save (if due, and always at a stage's end
or when the launch stops) -> at a stage end, its HF export and evaluation. A stage switch changes only what the
stage config says (batch shape, seq_len, data mixture, LR segment, RoPE base, optimizer carry-over); the weights
stay in the same DeepSpeed engine from the first stage to the last.

The data a step sees is a pure function of (seed, stage, global sample index): on step s of a stage with G
sequences per step, micro-batch m of rank r takes indices s·G + m·(R·B) + r·B + [0, B). The loader's state is
therefore the count of consumed samples (data.loader.micro_batch_indices), and resume is exact.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import resource
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import IO, Any, Dict, List, Optional

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from data.errors import DataError
from data.heldout import heldout_sets
from data.loader import StageStream, micro_batch_indices
from data.prepare import manifest_path, prepare, prepared_otherwise
from data.shards import verify
from data.tokenizer import load_tokenizer
from models.doc_mask import resolve_doc_mask_implementation
from models.params import count_parameters, flops_per_token
from models.qwen3 import Qwen3ForCausalLM
from train.checkpoint import (STAGE_FINISHED, CheckpointError, CheckpointManager, TrainerState, all_ok,
                              check_compatible, model_behaviour, model_shape, named_load_errors, read_meta_at)
from train.relaunch import (check_data_unchanged, check_resumable, finished_checkpoint, lock_run_dir,
                            record_config, stage_data)
from train.config import ConfigError, StageConfig, StagePlan, TrainConfig, check_data_fits, first_stage_index
from train import expert_parallel
from train.dist import DistInfo, Rank0Failed, barrier, init_distributed, on_rank0, rank0_outcome
from train.engine import (CheckpointLoadError, Engine, construction, local_parameter_elements, partitioned_init,
                          use_bf16, whole)
from train.export import export_config, write_tokenizer_files
from train.faults import (NONFINITE_EXIT_CODE, SpikeDetector, Watchdog, announce_failure, collective_result,
                          inject, injected)
from train.heldout import (first_languages, heldout_perplexity, make_eval_batches, pool_by_language,
                           window_tokens)
from train.metrics import MetricsLogger, peak_flops, redact
from train.profile import StepProfiler
from train.schedule import lr_at

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again"; the SLURM scripts requeue on it



class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class _Rollback(Exception):
    """Raised inside a stage to reload a checkpoint from before `before_global_step` after a loss spike."""

    def __init__(self, stage: str, before_global_step: int):
        super().__init__(stage)
        self.stage = stage
        self.before_global_step = before_global_step  # the global step of the first batch to skip


class _Preemption:
    """Remembers a SIGTERM or SIGUSR1 (what SLURM's `--signal=` sends before the time limit) so the loop can
    finish its step, agree with the other ranks, save and leave."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGUSR1, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True


def _table_due(every: int, step: int, steps: int) -> bool:
    """Whether a step record carries a table logged every `every` steps (0: never) and at a stage's last step."""
    return step == steps or bool(every and step % every == 0)


def build_model(cfg: TrainConfig, plan: StagePlan, info: DistInfo) -> Qwen3ForCausalLM:
    """Construct, materialise on this rank's device and initialise from the seed.

    The model is built on the meta device and only what this rank holds is allocated: its experts under
    expert parallelism, its partition of every weight under ZeRO-3 (train.engine.construction). The
    initial values are the same whatever the layout.
    """
    with construction(cfg, plan, info):
        model = Qwen3ForCausalLM(cfg.model)
    if partitioned_init(cfg):
        model.init_weights(seed=cfg.seed, gather=whole)
        return model
    if cfg.expert_parallel_size > 1:  # only this rank's experts are ever allocated here
        expert_parallel.shard(model, cfg.expert_parallel_size)
    if use_bf16(cfg, info.device):
        # DeepSpeed casts the module to bf16 (its fp32 masters are made from the bf16 weights): allocated in fp32
        # here first, Qwen3-235B-A22B's 36B parameters per rank under EP 8 took 136 GiB before the cast
        model.to(torch.bfloat16)
    model.to_empty(device=info.device)
    model.init_weights(seed=cfg.seed)
    return model


def _to_device(batch: Dict[str, torch.Tensor], device: torch.device, doc_masking: bool) -> Dict[str, Any]:
    out: Dict[str, Any] = {"input_ids": batch["input_ids"].to(device, non_blocking=True),
                           "labels": batch["labels"].to(device, non_blocking=True),
                           "return_token_losses": True}
    if doc_masking:
        out["position_ids"] = batch["position_ids"].to(device, non_blocking=True)
        out["doc_ids"] = batch["doc_ids"].to(device, non_blocking=True)
    return out


def _memory_gib(device: torch.device) -> float:
    """Peak memory: on CUDA the allocator's since the stage started (reset in `_enter_stage`), on the CPU the
    process's peak resident set since it started (the OS keeps no other)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


@dataclasses.dataclass
class StepResult:
    """One optimizer step as every rank sees it after the step's all-reduce."""

    loss: float  # mean token loss over the global batch (the LM loss; MoE router losses apart)
    grad_norm: float
    applied: bool  # False: DeepSpeed skipped the update (a non-finite gradient norm)
    comp_sums: torch.Tensor  # (components,) summed token losses of each data component, on the host
    comp_counts: torch.Tensor  # (components,) tokens of each
    router: List[float]  # mean weighted aux loss, balance loss and z-loss (0s for a dense model)
    preempt: bool  # some rank was asked to stop (SIGTERM / SIGUSR1)
    seconds: float


class Trainer:
    """Holds the run's pieces; `run()` executes the curriculum."""

    def __init__(self, cfg: TrainConfig, resolved: Dict[str, Any], plans: List[StagePlan], info: DistInfo,
                 watchdog: Watchdog):
        self.cfg = cfg
        self.watchdog = watchdog  # started by `run`, watching for hangs once this is built
        self.plans = plans
        self.info = info
        self.run_dir = Path(cfg.run_dir)
        self.resolved = resolved
        self.config_yaml = OmegaConf.to_yaml(OmegaConf.create(redact(resolved)))
        self.preemption = _Preemption()
        self.checkpoints = CheckpointManager(self.run_dir, cfg.checkpoint.keep, info.rank)
        if cfg.init_from and self.checkpoints.latest() is None:  # a fresh run: its weights must exist, said now,
            _init_from_kind(cfg.init_from)  # not after the data is prepared and the model built

        # data: rank 0 prepares (idempotent, cached; tokenizing a large corpus takes hours, longer than any
        # collective's timeout), then everyone verifies the manifest against the tokenizer
        on_rank0("preparing the data", lambda: self._prepare_data())
        self.manifest = manifest_path(cfg.data)
        self.tokenizer = load_tokenizer(cfg.data)
        if self.tokenizer.vocab_size > cfg.model.vocab_size:  # before the data check, which would blame a shard
            raise ConfigError(f"config key 'model.vocab_size' = {cfg.model.vocab_size}: smaller than the "
                              f"tokenizer's {self.tokenizer.vocab_size} tokens ({self.tokenizer.path})")
        unused = cfg.model.vocab_size - self.tokenizer.vocab_size
        # padding to a multiple of 128 (Megatron-LM's) adds < 128 rows: far below 10% for a real tokenizer
        if unused > 0.1 * cfg.model.vocab_size and info.rank == 0:
            share = unused * cfg.model.hidden_size * (1 if cfg.model.tie_word_embeddings else 2)
            print(f"[tristage] warning: model.vocab_size={cfg.model.vocab_size} for a tokenizer of "
                  f"{self.tokenizer.vocab_size} ids: {unused:,} embedding rows no token reaches "
                  f"({share / count_parameters(cfg.model).total:.0%} of the parameters); "
                  f"model.vocab_size={-(-self.tokenizer.vocab_size // 128) * 128} would fit it", file=sys.stderr,
                  flush=True)

        def check_data() -> Dict[str, Any]:
            return verify(self.manifest, tokenizer_fingerprint=self.tokenizer.fingerprint,
                          vocab_size=cfg.model.vocab_size, remember=True)

        # the full read (every shard's checksum and token range) once, by rank 0, and by each node's first rank
        # where nodes have data roots of their own; then every other rank checks headers and sizes against the
        # record (each rank verifies once: a check also hashes the manifest and loads the tokenizer)
        checked = on_rank0("verifying the data", check_data)
        checked = on_rank0("verifying this node's copy of the data",
                           (lambda: checked) if checked is not None else check_data, node=True)
        self.data_manifest = checked if checked is not None else check_data()
        # a data set far too small for the curriculum (the demo corpus under curriculum=qwen3) is named before the
        # model is built, not when its stage starts
        check_data_fits(cfg, plans, self.data_manifest, self.manifest)

        if (cfg.data.doc_masking and info.device.type != "cuda"
                and resolve_doc_mask_implementation(cfg.model.doc_mask_implementation, info.device) == "flex"):
            raise ConfigError("config key 'model.doc_mask_implementation' = 'flex': torch has no FlexAttention "
                              "backward on the CPU; train there with 'dense' or 'auto'")
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg, plans[0], info)
        for kind in ("raise", "named", "stall"):  # a failure on one rank at start-up, or one slow to join the rest
            inject(kind, "start", 0, info.rank)
        held = [local_parameter_elements(self.model)] * info.world_size  # what each rank allocated for the weights
        if info.world_size > 1:
            dist.all_gather_object(held, held[info.rank])
        self.state = TrainerState()
        # `run` mended the folder (CheckpointManager.recover, in finished_checkpoint) before building this
        latest = self.checkpoints.latest()
        self._init_checkpoint: Optional[Path] = None
        self.init_rope_theta: Optional[float] = None  # the RoPE base init_from's weights were trained at
        # A stage-end checkpoint whose stage-end work (export, suite, evaluation) no launch finished: read here, before
        # the engine's collectives, so that no rank can see a marker another rank wrote in this launch
        self.stage_end_pending: Optional[float] = None  # then the RoPE base the stage trained at
        if latest is not None:
            meta = self.checkpoints.read_meta(latest)
            if meta["state"]["stage_complete"] and not (self.checkpoints.dir / latest / STAGE_FINISHED).exists():
                self.stage_end_pending = float(meta["rope_theta"])
            check_compatible(meta, cfg.model, self.tokenizer.fingerprint,
                             str(self.checkpoints.dir / latest))
            check_resumable(meta, cfg, plans, self.data_manifest, str(self.checkpoints.dir / latest),
                            self.stage_end_pending is not None)
            reshard = self._needs_reshard(meta, self.checkpoints.dir / latest)  # refuses what cannot be, early
            given = [k for k, v in (("curriculum.start", cfg.curriculum.start), ("init_from", cfg.init_from)) if v]
            if given and info.rank == 0:
                print(f"[tristage] note: {' and '.join(given)} {'apply' if len(given) > 1 else 'applies'} only to a "
                      f"new run; this run_dir resumes its checkpoint '{latest}' (ignored)", file=sys.stderr,
                      flush=True)
        elif cfg.init_from:
            self._init_weights_from(cfg.init_from)  # logged as an `init_from` event below
        elif first_stage_index(cfg) > 0 and info.rank == 0:
            print(f"[tristage] warning: curriculum.start={cfg.curriculum.start} without init_from: the stage starts "
                  f"from randomly initialised weights", file=sys.stderr, flush=True)
        self.engine = Engine(self.model, cfg, plans[0], info)
        self.module = self.engine.module
        if self._init_checkpoint is not None:
            self._load_weights_from(self._init_checkpoint)
        if cfg.model.num_experts:
            self.module.set_balance_group(dist.group.WORLD if info.world_size > 1 else None)
        if latest is not None:
            self.state = self._load_checkpoint(latest)
            self.resumed_from = latest
        else:
            self.resumed_from = None
            order = cfg.curriculum.order
            self.state.stage_index = first_stage_index(cfg)
            self.state.stage = order[self.state.stage_index]
        self.peak = peak_flops(cfg, info.device)
        # the windows read at most max_tokens_per_language + 1 tokens of each held-out text (make_eval_batches)
        self.eval_sets = (heldout_sets(self.manifest, by="component", max_tokens=cfg.eval.max_tokens_per_language + 1)
                          if cfg.eval.enabled else {})
        # rank 0 opens metrics.jsonl and wandb, and a failure there (a damaged wandb_id) reaches every rank
        self.metrics = (on_rank0("opening metrics.jsonl and wandb",
                                 lambda: MetricsLogger(cfg, self.run_dir, 0, resolved))
                        or MetricsLogger(cfg, self.run_dir, info.rank, resolved))
        self.watchdog.watch("start")
        self.profiler = StepProfiler(cfg.logging.profile, self.run_dir, info.rank, info.device)
        self.closed = False
        self.metrics.log({"event": "model", "parameters": count_parameters(cfg.model).total,
                          "elements_per_rank": held, "partitioned_init": partitioned_init(cfg), "time": time.time()})
        if latest is not None:
            # stage and step are the checkpoint's; stage_complete: the launch goes on with the next stage
            self.metrics.log({"event": "resume", "stage": self.state.stage, "global_step": self.state.global_step,
                              "stage_complete": self.state.stage_complete, "checkpoint": latest,
                              "world_size": info.world_size, "saved_world_size": meta.get("world_size"),
                              "resharded": reshard, "time": time.time()})
        elif cfg.init_from:
            self.metrics.log({"event": "init_from", "stage": self.state.stage, "weights": str(cfg.init_from),
                              "rope_theta": self.init_rope_theta, "time": time.time()})

    # ------------------------------------------------------------------ set-up helpers
    def _prepare_data(self) -> Path:
        """Prepare the data set (rank 0), unless this launch resumes a checkpoint trained on the data set as it is
        and the data config now differs: preparing it again would rewrite the data in place, and the resume's
        check would come after (a new tokenizer is refused then, with the shared data set already re-tokenized)."""
        latest = self.checkpoints.latest()
        why = prepared_otherwise(self.cfg.data) if latest is not None else None
        if why is not None:
            raise DataError(f"{manifest_path(self.cfg.data)}: this run_dir resumes checkpoint '{latest}', and data set "
                            f"{self.cfg.data.name!r} there was prepared otherwise than this launch's data config asks "
                            f"({why}: this run's data config or input files changed, or another run prepared the "
                            f"name under its own); a relaunch does not prepare a run's data again. To go on with this "
                            f"data config, prepare it first (python -m data.prepare with the same data overrides; "
                            f"that rewrites the data set for every run reading it) and relaunch, which then checks that "
                            f"the stages resumed still read the same samples; or give it a data.name of its own")
        return prepare(self.cfg.data)

    def _load_checkpoint(self, tag: str) -> TrainerState:
        """Load checkpoint `tag` into the engine, through a re-sharded copy if it was saved in another layout."""
        meta = self.checkpoints.read_meta(tag)
        src = self.checkpoints.dir / tag
        load_dir = self._universal(src, meta, tag) if self._needs_reshard(meta, src) else None
        return self.checkpoints.load(self.engine, tag, load_dir=load_dir)

    def _load_weights_from(self, src: Path) -> None:
        """`init_from` a checkpoint folder: its weights, from whatever layout it was saved in, and no other state.

        Where the folder holds the whole weights as this launch reads them (`_weights_read_directly`: the model
        file holds them, the experts per expert-parallel rank), DeepSpeed reads them directly. Otherwise (to or
        from ZeRO-3's partitions, another expert_parallel_size) the checkpoint is re-sharded as a resume would be,
        loaded, and its AdamW state dropped; the re-sharded copy is removed once every rank has loaded it.
        """
        meta = read_meta_at(src)
        error: Optional[str] = None
        try:
            if self._weights_read_directly(meta, src):
                with named_load_errors(src):
                    self.engine.load(str(src.parent), src.name, load_optimizer=False, module_only=True)
                load_dir = None
            else:
                name = f"init_from-{src.name}"
                load_dir = self._universal(src, meta, name)
                with named_load_errors(src, load_dir):
                    if self._plain_optimizer():  # the module's own parameters, each read whole from the copy
                        from train import reshard

                        reshard.copy_whole_weights(Path(load_dir) / name, self.module)
                    else:
                        self.engine.load(load_dir, name, load_optimizer=True, universal=True)
                        self.engine.reset_optimizer_state()
        except CheckpointLoadError as e:  # a damaged file: every rank stops, not only the one that read it
            error = f"config key 'init_from' = {str(src)!r}: {e}"
        if not all_ok(error is None):
            raise ConfigError(error or f"config key 'init_from' = {str(src)!r}: its weights failed to load on "
                                       f"another rank (whose message names the file)")
        if load_dir is None:
            return
        barrier()
        if self.info.rank == 0:
            shutil.rmtree(Path(load_dir) / name, ignore_errors=True)

    def _weights_read_directly(self, meta: Dict[str, Any], src: Path) -> bool:
        """Whether DeepSpeed reads checkpoint `src`'s weights into this launch as they are (`init_from`): ZeRO-0/1/2
        to ZeRO-0/1/2 under the same expert_parallel_size, or the same layout; else they are re-sharded (and
        what cannot be is refused)."""
        unpartitioned = meta["zero_stage"] < 3 and self.cfg.deepspeed.zero_stage < 3
        if unpartitioned and meta.get("expert_parallel_size", 1) == self.cfg.expert_parallel_size:
            return True
        return not self._needs_reshard(meta, src, weights_only=True)

    def _plain_optimizer(self) -> bool:
        """Whether this launch trains in fp32 without ZeRO, where DeepSpeed steps torch's AdamW as it is: its
        universal (re-sharded) load goes through a ZeRO or bf16 optimizer, and fails inside torch on this one."""
        return self.cfg.deepspeed.zero_stage == 0 and not use_bf16(self.cfg, self.info.device)

    def _needs_reshard(self, meta: Dict[str, Any], src: Path, weights_only: bool = False) -> bool:
        """Whether checkpoint `src`'s world size, ZeRO stage or expert-parallel size differs from this launch (then
        it is re-sharded); refuses the changes that cannot be loaded (`weights_only`: for `init_from`)."""
        saved = (meta.get("world_size"), meta.get("zero_stage"), meta.get("expert_parallel_size", 1))
        if saved == (self.info.world_size, self.cfg.deepspeed.zero_stage, self.cfg.expert_parallel_size):
            return False
        if not any(src.glob("*optim_states.pt")):  # ZeRO-0 without bf16: all of it, whole, in the model file
            if self.cfg.deepspeed.zero_stage == 0:
                return False  # nothing is partitioned: any number of ranks reads it as it is
            raise CheckpointError(f"{src} was saved under deepspeed.zero_stage=0, its optimizer state whole in the "
                                  f"model file, which DeepSpeed's universal format cannot take: resume it with "
                                  f"deepspeed=zero0 (any number of ranks), or for its weights under another stage "
                                  f"use init_from=<its HF export>")
        if self._plain_optimizer() and not weights_only:
            raise CheckpointError(f"{src} was saved under deepspeed.zero_stage={saved[1]} on {saved[0]} rank(s), its "
                                  f"AdamW state partitioned; deepspeed.zero_stage=0 in fp32 cannot take it re-sharded "
                                  f"(DeepSpeed's universal load needs a ZeRO or bf16 optimizer): resume it with "
                                  f"deepspeed=zero{saved[1]} (any number of ranks), or for its weights under ZeRO-0 "
                                  f"use a new run_dir with init_from={src}")
        if saved[2] > 1 and self.cfg.deepspeed.zero_stage == 3:
            raise CheckpointError(f"{src} was saved with expert_parallel_size={saved[2]}; re-sharding it into "
                                  f"deepspeed.zero_stage=3 is not supported: use deepspeed=zero1 or zero2 (any "
                                  f"expert_parallel_size and world size), or a new run_dir with "
                                  f"init_from=<its HF export>")
        return True

    def _universal(self, src: Path, meta: Dict[str, Any], name: str) -> str:
        """Re-shard checkpoint `src` for this launch's layout once (rank 0), as <returned folder>/<name>.

        DeepSpeed's converter serves checkpoints without expert parallelism; train/reshard.py those with it.
        The result is specific to this launch's optimizer groups (the experts get their own group under
        expert parallelism), so it is kept per expert-parallel size, and to ZeRO-3 or not (`fit_to_layout`
        writes the model-states file that stage reads): its `done` marker records the layout it was fitted for,
        and a copy a killed launch left for another layout is made again.
        """
        from train import reshard

        ep, zero3 = self.cfg.expert_parallel_size, self.cfg.deepspeed.zero_stage == 3
        out_root = self.checkpoints.dir / ".universal" / f"ep{ep}"
        out = out_root / name
        layout = json.dumps({"expert_parallel_size": ep, "zero3": zero3})

        def convert() -> None:
            from train.engine import convert_to_universal

            if (out / "done").exists() and (out / "done").read_text() == layout:
                return
            try:
                shutil.rmtree(out, ignore_errors=True)
                saved_ep = meta.get("expert_parallel_size", 1)
                if saved_ep > 1:
                    reshard.convert_expert_parallel(src, out, saved_ep, meta["world_size"])
                else:
                    convert_to_universal(str(src), str(out))
                experts = [f"{name}.{p}" for name, _ in expert_parallel.experts_modules(self.module)
                           for p in ("gate_up_proj", "down_proj")]
                reshard.fit_to_layout(out, experts, self.engine.param_groups, ep, zero3=zero3)
                (out / "done").write_text(layout)
            except Exception as e:
                shutil.rmtree(out, ignore_errors=True)
                raise CheckpointError(f"re-sharding {src} for this launch's layout failed "
                                      f"({type(e).__name__}: {e}); the checkpoint itself is unchanged") from e

        on_rank0(f"re-sharding checkpoint {src.name}", convert)  # the others wait for rank 0's copy, however long
        return str(out_root)

    def _init_weights_from(self, path: str) -> None:
        """Start a fresh run's weights from an HF directory or a tristage checkpoint folder (weights only)."""
        src = Path(path)
        if _init_from_kind(path) == "hf":
            from models.hf import load_hf_weights, read_hf_config

            try:
                theirs = read_hf_config(src)
            except ValueError as e:
                raise ConfigError(f"config key 'init_from' = {path!r}: {e}") from e
            shape = model_shape(theirs)
            self._note_init_rope_theta(theirs.rope_theta, path)
            if shape != model_shape(self.cfg.model):
                raise ConfigError(f"config key 'init_from' = {path!r}: its model shape {shape} differs from "
                                  f"model={self.cfg.model.name} {model_shape(self.cfg.model)}")
            # what the weights compute with beside their shapes: trained on under other values, they would mean
            # something else (transformers' Qwen3-MoE default is norm_topk_prob=false, every Qwen3 preset's true)
            for key in model_behaviour(self.cfg.model):
                if getattr(theirs, key) != getattr(self.cfg.model, key):
                    raise ConfigError(f"config key 'init_from' = {path!r}: its {key}={getattr(theirs, key)} differs "
                                      f"from model.{key}={getattr(self.cfg.model, key)}; set model.{key} to match")
            self._check_init_tokenizer(src, path)
            try:
                load_hf_weights(self.model, src, gather=whole)  # one parameter at a time, this rank's part
            except (OSError, ValueError) as e:  # a damaged weight file, a missing or extra tensor: named
                raise ConfigError(f"config key 'init_from' = {path!r}: {e}") from None
        else:
            try:
                meta = read_meta_at(src)
            except CheckpointError as e:
                raise ConfigError(f"config key 'init_from' = {path!r}: {e}") from None
            check_compatible(meta, self.cfg.model, self.tokenizer.fingerprint, str(src))
            if meta.get("rope_theta") is not None:
                self._note_init_rope_theta(float(meta["rope_theta"]), path)
            self._weights_read_directly(meta, src)  # called for its refusal (what cannot be re-sharded) only
            self._init_checkpoint = src  # loaded into the engine once it exists (`_load_weights_from`)

    def _note_init_rope_theta(self, theirs: float, path: str) -> None:
        """Say (rank 0) when the first stage trains at another RoPE base than the weights were trained at: the
        released Qwen3 weights carry 1,000,000 and the General stage's is 10,000, which moves every position's
        rotation (a choice, so not refused)."""
        cfg = self.cfg
        start = cfg.curriculum.order[first_stage_index(cfg)]
        ours = cfg.curriculum.stages[start].rope_theta
        self.init_rope_theta = float(theirs)
        if float(theirs) != float(ours) and self.info.rank == 0:
            # raising the base is ABF (the Long Context stage); lowering it undoes one, rarely what is meant
            kind = "note" if ours > theirs else "warning"
            print(f"[tristage] {kind}: init_from={path} was trained at RoPE base {theirs:g}; stage {start!r} trains "
                  f"at curriculum.stages.{start}.rope_theta={ours:g}, which moves every position's rotation "
                  f"(curriculum.stages.{start}.rope_theta={theirs:g} keeps the weights' base)", file=sys.stderr,
                  flush=True)

    def _check_init_tokenizer(self, src: Path, path: str) -> None:
        """Refuse weights trained on other token ids than this run's data (when the folder has its tokenizer)."""
        if not any((src / n).exists() for n in ("tokenizer.model", "tokenizer.json")):
            return
        try:
            theirs = load_tokenizer(src)
        except DataError as e:
            raise ConfigError(f"config key 'init_from' = {path!r}: {e}") from None
        ours = self.tokenizer
        if not theirs.same_ids(ours):
            raise ConfigError(f"config key 'init_from' = {path!r}: its tokenizer {theirs.path} has another "
                              f"vocabulary than the data's {ours.path}, so the token ids would mean other tokens; "
                              f"prepare the data with that tokenizer (data.tokenizer.path) or start elsewhere")

    # ------------------------------------------------------------------ the loop
    def run(self) -> int:
        """Run the remaining stages; returns the process exit code."""
        cfg = self.cfg
        self.launch_global_step = self.state.global_step  # max_steps counts from here (a rollback goes back)
        exit_code = 0
        while True:
            state = self.state
            if state.stage_complete:  # a stage-end checkpoint: the next stage starts fresh
                done = cfg.curriculum.stages[cfg.curriculum.order[state.stage_index]]
                if self.stage_end_pending is not None:
                    # the launch that finished the stage stopped before its stage-end work (preempted in the last
                    # step, or the export failed): that work, with the RoPE base it trained at, then the next stage
                    self.module.set_rope_theta(self.stage_end_pending)
                    self.stage_end_pending = None
                    self._finish_stage(done)
                state.stage_index += 1
                state.step = state.consumed_samples = 0
                state.stage_complete = False
                state.loss_history = []  # the new stage's loss has its own level (other data, length): a new window
            if state.stage_index >= len(cfg.curriculum.order):
                break
            name = cfg.curriculum.order[state.stage_index]
            state.stage = name
            try:
                code = self._run_stage(cfg.curriculum.stages[name], self.plans[state.stage_index])
            except _Rollback as rb:
                self._stop_profiler()
                self._rollback(rb)
                continue
            if code is not None:
                exit_code = code
                break
        self.close()
        return exit_code

    def close(self) -> None:
        """Stop the watchdog and close the metrics file (also after a failure: in a --multirun sweep the next job
        runs in this process, and a watchdog left running would later name it as hung)."""
        if not self.closed:
            self.closed = True
            self._stop_profiler()
            self.watchdog.stop()
            self.metrics.close()

    def _rollback(self, rb: "_Rollback") -> None:
        """Reload the newest checkpoint from before the first batch to skip (else the newest, saying which of those
        batches it has trained on already), keeping the new skip list, and carry on from there.

        The checkpoint becomes `latest` again with the skip list beside it, and the newer ones go (they trained on
        the skipped batches): a crash before the next save resumes the rollback, not the spike. The spike window
        is the checkpoint's own, without the losses of the steps gone back over (retrained, they come again)."""
        tags = self.checkpoints.complete()
        steps = {t: self.checkpoints.read_meta(t)["state"]["global_step"] for t in tags}
        earlier = [t for t in tags if steps[t] < rb.before_global_step]
        tag = earlier[-1] if earlier else self.checkpoints.latest()
        assert tag is not None
        if not earlier and self.info.rank == 0:
            print(f"[tristage] warning: no checkpoint kept from before the first batch faults.spike_skip_before asks "
                  f"to skip; rolled back to '{tag}', which has trained on the batches up to its step "
                  f"(checkpoint.keep, checkpoint_every keep older ones)", file=sys.stderr, flush=True)
        skip, rollbacks = self.state.skip_steps, self.state.rollbacks
        self.state = self._load_checkpoint(tag)  # saved by an earlier launch in another layout, perhaps
        self.state.skip_steps = sorted(set(self.state.skip_steps) | set(skip))
        self.state.rollbacks = rollbacks
        discarded = on_rank0("recording the rollback in the checkpoints",
                             lambda: self.checkpoints.mark_rollback(tag, self.state.skip_steps, rollbacks))
        self.metrics.log({"event": "rollback", "stage": rb.stage, "global_step": self.state.global_step,
                          "to_checkpoint": tag, "skip_steps": self.state.skip_steps, "discarded": discarded,
                          "time": time.time()})
        inject("kill_after_rollback", self.state.stage, self.state.step, self.info.rank)

    def _enter_stage(self, stage: StageConfig, plan: StagePlan, fresh: bool) -> StageStream:
        """Apply a stage's switches to model, engine and data; log them."""
        cfg = self.cfg
        if self.info.device.type == "cuda":  # each stage's memory_gib is its own peak (a longer seq_len, a suite)
            torch.cuda.reset_peak_memory_stats(self.info.device)
        self.engine.set_plan(plan)
        self.module.set_rope_theta(stage.rope_theta)
        # the run's first stage has no moments to drop (counted by steps, not by curriculum.start, which a relaunch
        # of a run begun elsewhere may give)
        if fresh and self.state.global_step > 0 and not stage.carry_optimizer:
            self.engine.reset_optimizer_state()

        def open_stream() -> StageStream:
            check_data_unchanged(self.manifest, self.data_manifest, stage)
            return StageStream(self.manifest, stage.mixture, seq_len=stage.seq_len, seed=cfg.seed, stage=stage.name,
                               num_samples=plan.steps * plan.samples_per_step, doc_masking=cfg.data.doc_masking,
                               workers=cfg.data.index_workers, verbose=self.info.rank == 0)

        # rank 0 builds the stage's index arrays once (or finds them cached); each node's first rank then opens
        # them (where every node has a data root of its own, not a shared one, it builds its node's copy once),
        # and the node's other ranks memory-map them
        t0 = time.perf_counter()
        with self.watchdog.suspended(f"{stage.name} data index"):
            built = on_rank0(f"building the {stage.name} data index", open_stream)
            stream = on_rank0(f"opening the {stage.name} data index on this node",
                              (lambda: built) if built is not None else open_stream, node=True)
        if stream is None:
            stream = open_stream()
        self.metrics.log({"event": "stage_start", "stage": stage.name, "global_step": self.state.global_step,
                          "data_index": "cached" if stream.index_cached else "built",
                          "data_index_seconds": round(time.perf_counter() - t0, 3),
                          "resumed_at_step": None if fresh else self.state.step, "stage_steps": plan.steps,
                          "seq_len": stage.seq_len, "rope_theta": self.module.config.rope_theta,
                          "global_batch_tokens": stage.global_batch_tokens, "grad_accum": plan.grad_accum,
                          "micro_batch_size": plan.micro_batch_size,
                          "lr": lr_at(stage.lr, self.state.step, plan.steps),
                          "carry_optimizer": stage.carry_optimizer,
                          "mixture": dict(stage.mixture.weights), "time": time.time()})
        return stream

    def _run_stage(self, stage: StageConfig, plan: StagePlan) -> Optional[int]:
        """Train one stage to its end; returns an exit code if the launch must stop early, else None."""
        cfg, state = self.cfg, self.state
        stream = self._enter_stage(stage, plan, fresh=state.step == 0)
        spikes = SpikeDetector(cfg.faults.spike_factor, cfg.faults.spike_window, cfg.faults.spike_min_history,
                               state.loss_history)
        while state.step < plan.steps:
            if stage.eval_every and state.step and state.step % stage.eval_every == 0:
                self._evaluate(stage)
            step = state.step + 1  # 1-based, as logged
            first_sample = state.step * plan.samples_per_step
            if f"{stage.name}:{step}" in state.skip_steps:  # a rolled-back spike's batch: the step passes untrained
                self._advance(plan)
                self.metrics.log({"event": "skipped_batch", "stage": stage.name, "step": step,
                                  "global_step": state.global_step, "time": time.time(),
                                  "samples": [first_sample, first_sample + plan.samples_per_step]})
                preempt = False  # the ranks agree on it in a trained step's all-reduce; the next one reads it
            else:
                preempt = self._step_and_watch(stage, plan, stream, spikes, step, first_sample)
            last = state.step == plan.steps
            if last:
                self._stop_profiler()  # a range across the stage switch would record the stage-end work
                state.stage_complete = True
                self._save(stage)
                if preempt:  # out within the grace period: the relaunch does the stage-end work before going on
                    return self._preempted(stage)
                self._finish_stage(stage)
                if cfg.max_steps and self._steps_this_launch() >= cfg.max_steps:
                    return 0  # the stage-end checkpoint is saved: the next launch starts the next stage
                return None
            stop = preempt or bool(cfg.max_steps and self._steps_this_launch() >= cfg.max_steps)
            if stop or (stage.checkpoint_every and state.step % stage.checkpoint_every == 0):
                self._save(stage)  # once, whatever asked for it
            if preempt:
                return self._preempted(stage)
            if stop:
                return 0
        return None

    def _step_and_watch(self, stage: StageConfig, plan: StagePlan, stream: StageStream, spikes: SpikeDetector,
                        step: int, first_sample: int) -> bool:
        """Train step `step`, log it, and watch its loss for a spike (which may roll back); returns whether a
        rank asked for preemption."""
        cfg, state, info = self.cfg, self.state, self.info
        inject("kill", stage.name, step, info.rank)
        inject("sigusr1", stage.name, step, info.rank)
        inject("raise", stage.name, step, info.rank)
        inject("named", stage.name, step, info.rank)
        self.profiler.begin(state.global_step + 1)
        lr = lr_at(stage.lr, state.step, plan.steps)
        result = self._train_step(stage, plan, stream, lr)
        self._log_profile(self.profiler.end(state.global_step))
        self._count_skip(stage, step, result)
        if state.step % cfg.logging.log_every == 0 or state.step == plan.steps:
            self._log_step(stage, plan, stream, lr, result, first_sample)
        if result.applied and math.isfinite(result.loss):
            median = spikes.check(result.loss)
            state.loss_history = list(spikes.history)
            if median is not None:
                self._on_spike(stage, step, result.loss, median, first_sample, plan)
        return result.preempt

    def _train_step(self, stage: StageConfig, plan: StagePlan, stream: StageStream, lr: float) -> StepResult:
        """One optimizer step: every micro-batch of this rank, the update, the step's one all-reduce of the
        losses (by component), the router's losses and the preemption flag; advances the state."""
        cfg, state, info = self.cfg, self.state, self.info
        step = state.step + 1
        t0 = time.perf_counter()
        self.engine.set_lr(lr)
        self.module.start_step()
        # the step's sums stay on the device until the one copy to the host after the optimizer step: no
        # micro-batch waits for the one before it to finish (a host sync each would leave the GPU idle
        # while Python launches the next forward)
        dev, n = info.device, len(stream.components)
        comp_sums = torch.zeros(n, dtype=torch.float64, device=dev)
        comp_counts = torch.zeros(n, dtype=torch.float64, device=dev)
        router_sums = torch.zeros(3, dtype=torch.float64, device=dev)  # weighted aux, balance and z losses
        scale = (float("nan") if injected("nan", stage.name, step, info.rank)
                 else 20.0 if injected("spike", stage.name, step, info.rank) else None)
        for m in range(plan.grad_accum):
            self.watchdog.beat(f"{stage.name} step {step} micro-batch {m}")
            inject("stall", stage.name, step, info.rank)
            batch = stream.batch(micro_batch_indices(state.step * plan.samples_per_step, m, info.rank,
                                                     info.world_size, plan.micro_batch_size))
            on_device = _to_device(batch, dev, cfg.data.doc_masking)
            out = self.engine.micro_step(on_device, last=m == plan.grad_accum - 1, loss_scale=scale)
            tok = out.token_losses.detach().double()  # (B, T)
            if scale is not None:
                tok = tok * scale
            mask = (on_device["labels"] != -100).double()
            comp = batch["component_ids"].to(dev, torch.long, non_blocking=True).flatten()
            comp_sums.index_add_(0, comp, (tok * mask).flatten())
            comp_counts.index_add_(0, comp, mask.flatten())
            router_sums += torch.stack([out.aux_loss.detach(), out.balance_loss, out.z_loss]).double()  # 0s: dense
        grad_norm, applied = self.engine.optimizer_step()
        self.watchdog.beat(f"{stage.name} step {step} metrics")
        flag = torch.tensor([float(self.preemption.requested)], dtype=torch.float64).to(dev, non_blocking=True)
        # "global" balance: the logged value is the whole step's, E * sum f_i P_i (the micro-batches' own values
        # use partial counts, so their mean would depend on the ranks x micro-batches split)
        probs = self.module.router_probs_sum() if cfg.model.balance_loss_granularity == "global" else None
        extra = [] if probs is None else [probs.double().flatten()]
        packed = torch.cat([comp_sums, comp_counts, router_sums, flag, *extra])
        if info.world_size > 1:
            dist.all_reduce(packed)  # on the device: NCCL reduces GPU tensors only
        packed = collective_result(packed)  # the step's one host sync of its own
        comp_sums, comp_counts = packed[:n], packed[n: 2 * n]
        r = 2 * n  # then the router's three sums, the preemption flag, the router probabilities (global balance)
        forwards = plan.grad_accum * info.world_size
        router = packed[r: r + 3] / forwards
        if probs is not None:  # and the weighted aux loss from it, so aux = coef x balance + z_coef x z holds
            router[1] = self.module.step_balance_loss(packed[r + 4:].view(probs.shape) / forwards)
            router[0] = cfg.model.router_aux_loss_coef * router[1] + cfg.model.router_z_loss_coef * router[2]
        self._advance(plan)
        return StepResult(loss=comp_sums.sum().item() / max(comp_counts.sum().item(), 1.0), grad_norm=grad_norm,
                          applied=applied, comp_sums=comp_sums, comp_counts=comp_counts, router=router.tolist(),
                          preempt=packed[r + 3].item() > 0, seconds=time.perf_counter() - t0)

    def _count_skip(self, stage: StageConfig, step: int, result: StepResult) -> None:
        """Count a step whose update DeepSpeed skipped (a non-finite gradient norm, on every rank); too many in a
        row end the run."""
        state, cfg = self.state, self.cfg
        if result.applied:
            state.consecutive_skips = 0
            return
        state.skipped_steps += 1
        state.consecutive_skips += 1
        self.metrics.log({"event": "skipped_update", "stage": stage.name, "step": step,
                          "global_step": state.global_step, "loss": result.loss, "grad_norm": result.grad_norm,
                          "skipped_total": state.skipped_steps, "consecutive": state.consecutive_skips,
                          "time": time.time()})
        if state.consecutive_skips > cfg.faults.max_consecutive_skips:
            latest = self.checkpoints.latest()
            where = (f"The last checkpoint '{latest}' holds finite weights" if latest is not None
                     else "No checkpoint was saved yet (relaunching starts the run again)")
            n = state.consecutive_skips
            raise NonFiniteError(
                f"{n} consecutive step{'s' if n > 1 else ''} had a non-finite loss or gradient "
                f"(up to {stage.name} step {step}, loss {result.loss}, grad norm {result.grad_norm}); "
                f"faults.max_consecutive_skips={cfg.faults.max_consecutive_skips}. {where}: lower the LR or skip "
                f"the data")

    def _finish_stage(self, stage: StageConfig) -> None:
        """After the stage-end checkpoint: the HF export, the stage-end suite on it, the evaluation."""
        cfg = self.cfg
        self._export(stage)
        if cfg.eval.stage_end_suite and cfg.checkpoint.export_hf:
            with self.watchdog.suspended(f"{stage.name} evaluation suite"):  # rank 0 works, the rest wait
                on_rank0(f"the {stage.name} evaluation suite", lambda: self._stage_end_suite(stage))
        if cfg.eval.enabled:
            self._evaluate(stage)
        self.metrics.log({"event": "stage_end", "stage": stage.name, "global_step": self.state.global_step,
                          "tokens": self.state.tokens, "time": time.time()})
        if self.info.rank == 0:
            try:
                (self.checkpoints.dir / self._tag(stage) / STAGE_FINISHED).touch()
            except OSError as e:  # only a shortcut for the next launch, which otherwise does the work again
                print(f"[tristage] warning: could not mark the {stage.name} stage-end work done ({e})",
                      file=sys.stderr, flush=True)

    def _stop_profiler(self) -> None:
        """End a profiled range early (stage end, rollback, the launch's end) and write what it recorded."""
        self._log_profile(self.profiler.finish())

    def _log_profile(self, event: Optional[Dict[str, Any]]) -> None:
        if event is not None:
            self.metrics.log({**event, "time": time.time()})

    def _preempted(self, stage: StageConfig) -> int:
        """After the checkpoint of a preempted step: leave the marker, log, and give the exit code."""
        if self.info.rank == 0:
            (self.run_dir / "preempted").write_text(self._tag(stage) + "\n")
        self.metrics.log({"event": "preempted", "stage": stage.name, "global_step": self.state.global_step,
                          "exit_code": PREEMPTED_EXIT_CODE, "time": time.time()})
        return PREEMPTED_EXIT_CODE

    def _advance(self, plan: StagePlan) -> None:
        state = self.state
        state.step += 1
        state.global_step += 1
        state.consumed_samples = state.step * plan.samples_per_step
        state.tokens += plan.samples_per_step * plan.seq_len

    def _steps_this_launch(self) -> int:
        """Optimizer steps this launch has moved the run on by (steps a rollback went back over do not count)."""
        return self.state.global_step - self.launch_global_step

    def _on_spike(self, stage: StageConfig, step: int, loss: float, median: float, first_sample: int,
                  plan: StagePlan) -> None:
        """Log a loss spike with its batch; roll back and skip the batch when configured (and possible)."""
        faults = self.cfg.faults
        can_roll = (faults.spike_action == "rollback" and self.state.rollbacks < faults.max_rollbacks
                    and self.checkpoints.latest() is not None)
        self.metrics.log({"event": "loss_spike", "stage": stage.name, "step": step,
                          "global_step": self.state.global_step, "loss": loss, "median": median,
                          "factor": loss / median, "samples": [first_sample, first_sample + plan.samples_per_step],
                          "action": "rollback" if can_roll else "log", "time": time.time()})
        if can_roll:
            first = max(1, step - faults.spike_skip_before)
            self.state.skip_steps = sorted(set(self.state.skip_steps)
                                           | {f"{stage.name}:{s}" for s in range(first, step + 1)})
            self.state.rollbacks += 1
            raise _Rollback(stage.name, self.state.global_step - (step - first))

    # ------------------------------------------------------------------ pieces of a step
    def _log_step(self, stage: StageConfig, plan: StagePlan, stream: StageStream, lr: float, result: StepResult,
                  first_sample: int) -> None:
        """One step record (rank 0 writes it; the others have nothing to do here)."""
        state, info = self.state, self.info
        if info.rank != 0:
            return
        aux, balance, z = result.router
        loss, dt = result.loss, result.seconds
        moe = bool(self.cfg.model.num_experts)
        by_source: Dict[str, List[float]] = {}
        by_language: Dict[str, List[float]] = {}
        for comp, loss_sum, count in zip(stream.components, result.comp_sums.tolist(), result.comp_counts.tolist()):
            if count == 0:
                continue
            for table, key in ((by_source, stream.component_source[comp]),
                               (by_language, stream.component_language[comp])):
                acc = table.setdefault(key, [0.0, 0.0])
                acc[0] += loss_sum
                acc[1] += count
        tokens = plan.samples_per_step * plan.seq_len
        tps = tokens / dt
        record: Dict[str, Any] = {
            "stage": stage.name, "step": state.step, "stage_steps": plan.steps, "global_step": state.global_step,
            "tokens": state.tokens, "loss": loss + aux, "lm_loss": loss,
            "aux_loss": aux if moe else None, "balance_loss": balance if moe else None, "z_loss": z if moe else None,
            "lr": lr, "grad_norm": result.grad_norm, "step_applied": result.applied, "tokens_per_s": tps,
            "step_time_s": dt, "seq_len": plan.seq_len, "rope_theta": self.module.config.rope_theta,
            "memory_gib": _memory_gib(info.device), "time": time.time(),
            "loss_by_source": {k: v[0] / v[1] for k, v in sorted(by_source.items())},
            "loss_by_language": {k: v[0] / v[1] for k, v in sorted(by_language.items())},
            # the ledger's tables by language and component every logging.ledger_every steps and at a stage's end:
            # at hundreds of components they were ~10 KB in every step record (GBs of metrics.jsonl over a stage
            # of millions of steps); the totals and the per-source table are in each
            "ledger": stream.ledger(state.consumed_samples,
                                    tables=_table_due(self.cfg.logging.ledger_every, state.step, plan.steps)),
            "samples": [first_sample, first_sample + plan.samples_per_step],
        }
        if self.peak:
            record["mfu"] = tps * flops_per_token(self.cfg.model, plan.seq_len, causal_halved=False) / (
                self.peak * info.world_size)
        if self.cfg.model.num_experts:
            load = self.module.expert_load().float()  # (layers, experts): fraction of routed tokens
            # each layer's busiest expert's share x E (1: even; E/k: every token on the same k experts), averaged
            # over the layers and the worst layer's: a collapse in a few layers hides in the average
            busiest = (load.max(dim=1).values * load.shape[1]).tolist()
            record["expert_load_max_over_mean"] = sum(busiest) / len(busiest)
            record["expert_load_max_over_mean_worst"] = max(busiest)
            if _table_due(self.cfg.logging.expert_load_every, state.step, plan.steps):
                record["expert_load"] = [[round(x, 5) for x in row] for row in load.tolist()]
        self.metrics.log(record)

    def _tag(self, stage: StageConfig) -> str:
        return f"{self.state.stage_index}-{stage.name}-step{self.state.step:07d}"

    def _save(self, stage: StageConfig) -> None:
        meta = {"stage": stage.name, "model_shape": model_shape(self.cfg.model),
                "model_behaviour": model_behaviour(self.cfg.model),
                "tokenizer_fingerprint": self.tokenizer.fingerprint, "world_size": self.info.world_size,
                "zero_stage": self.cfg.deepspeed.zero_stage, "expert_parallel_size": self.cfg.expert_parallel_size,
                "rope_theta": stage.rope_theta, "stage_data": stage_data(self.cfg, stage, self.data_manifest)}
        t0 = time.perf_counter()
        self.watchdog.beat(f"{stage.name} checkpoint save")
        step, rank = self.state.step, self.info.rank
        path = self.checkpoints.save(self.engine, self._tag(stage), self.state, meta, self.config_yaml,
                                     fault=lambda kind: inject(kind, stage.name, step, rank))
        self.watchdog.beat(f"{stage.name} after checkpoint save")
        self.metrics.log({"event": "checkpoint", "stage": stage.name, "global_step": self.state.global_step,
                          "path": str(path), "seconds": round(time.perf_counter() - t0, 3), "time": time.time()})

    def _export(self, stage: StageConfig) -> None:
        """Write <run_dir>/hf/<stage>/ in the transformers layout, with the stage's RoPE base.

        A failure on rank 0 (a full disk, say) still lets the other ranks finish the gathers, then stops every
        rank with the reason; the stage-end checkpoint is saved already, and the relaunch writes the export
        before it moves on (`run`).
        """
        if not self.cfg.checkpoint.export_hf:
            return
        # known long work without steps (rank 0 writes every weight; ~1 TB in fp32 for 235B): not a hang
        t0 = time.perf_counter()
        with self.watchdog.suspended(f"{stage.name} HF export"):
            self._write_export(stage)
        self.metrics.log({"event": "hf_export", "stage": stage.name, "global_step": self.state.global_step,
                          "path": str(self.run_dir / "hf" / stage.name), "rope_theta": stage.rope_theta,
                          "seconds": round(time.perf_counter() - t0, 3), "time": time.time()})

    def _write_export(self, stage: StageConfig) -> None:
        from models.hf import write_hf

        parameters = self.engine.full_parameters()  # a collective per parameter: every rank drains it
        out = self.run_dir / "hf" / stage.name
        err: Optional[str] = None
        if self.info.rank == 0:  # writes each safetensors shard as soon as its parameters have arrived
            export_cfg = export_config(self.cfg.model, stage.rope_theta, self.tokenizer)
            with torch.device("meta"):
                layout = Qwen3ForCausalLM(export_cfg).state_dict()
            try:
                inject("slow_export", stage.name, self.state.step, self.info.rank)
                fail = injected("export_enospc", stage.name, self.state.step, self.info.rank)
                write_hf(export_cfg, out, _fail_after(parameters, 3) if fail else parameters, layout,
                         extra=lambda folder: write_tokenizer_files(folder, self.tokenizer, export_cfg))
            except Exception as e:  # noqa: BLE001 - every rank must hear of it, not only this one
                err = f"{type(e).__name__}: {e}"
        for _ in parameters:  # the gathers left after a failure (on rank 0), or all of them (elsewhere)
            pass
        err = rank0_outcome(f"export {stage.name}", err)
        if err is not None:
            raise CheckpointError(f"the HF export to {out} failed ({err}); the stage-end "
                                  f"checkpoint '{self.checkpoints.latest()}' is saved, and relaunching writes the "
                                  f"export before training goes on")

    def _stage_end_suite(self, stage: StageConfig) -> None:
        """Rank 0: the evaluation suite on the export just written, as a second model beside the training one.

        It is skipped, with the reason logged, when that copy would not fit in the device's free memory, and a
        failure inside it is logged, not raised: an evaluation must not end (or, with the other ranks waiting,
        hang) a training run. `python -m train.eval` runs the same suite on the export afterwards.
        """
        from train.eval.suite import stage_end_suite, suite_long_batch

        event: Dict[str, Any] = {"event": "eval_suite", "stage": stage.name, "global_step": self.state.global_step}
        long_batch, shortfall = suite_long_batch(self.cfg, stage.name, self.info.device)
        if shortfall:
            event["skipped"] = f"{shortfall}; run `python -m train.eval {self.run_dir / 'hf' / stage.name}` after"
        else:
            try:
                if injected("suite_error", stage.name, self.state.step, self.info.rank):
                    raise RuntimeError("injected evaluation failure")
                event |= stage_end_suite(self.cfg, stage.name, self.manifest, self.tokenizer, self.info.device,
                                         long_batch)
            except Exception as e:  # noqa: BLE001 - logged and reported; training goes on
                event["error"] = f"{type(e).__name__}: {e}"
                print(f"[tristage] warning: the {stage.name} evaluation suite failed ({event['error']}); "
                      f"training continues", file=sys.stderr, flush=True)
                if self.info.device.type == "cuda":
                    torch.cuda.empty_cache()
        self.metrics.log(event | {"time": time.time()})

    def _evaluate(self, stage: StageConfig) -> None:
        if not self.eval_sets:
            return
        cfg = self.cfg
        # each held-out text of a language (UDHR, the Bible book) cut on its own, then pooled: a language's first
        # tokens alone would be the Bible's where it has one and the UDHR's elsewhere
        sets = first_languages(self.eval_sets, cfg.eval.max_languages)
        components, batches = make_eval_batches(sets, stage.seq_len, cfg.eval.max_tokens_per_language,
                                                cfg.eval.batch_size)
        t0 = time.perf_counter()
        self.watchdog.beat(f"{stage.name} held-out evaluation")
        # eager: each eval batch shape (a short text, a partial last batch) would take one of the compiled blocks'
        # recompile_limit (8) entries, and a later stage's training shape would then run uncompiled
        with torch.compiler.set_stance("force_eager"):
            by_component = heldout_perplexity(self.module, components, batches, self.info.device, self.info.rank,
                                              self.info.world_size)
        ppl = pool_by_language(by_component, dict(zip(components, window_tokens(batches, len(components)))))
        self.module.start_step()  # evaluation forwards must not count toward the next step's expert load
        mean_log = sum(math.log(v) for v in ppl.values()) / max(1, len(ppl))
        self.metrics.log({"event": "eval", "stage": stage.name, "step": self.state.step,
                          "global_step": self.state.global_step, "heldout_ppl_geomean": math.exp(mean_log),
                          "heldout_ppl": ppl, "seconds": round(time.perf_counter() - t0, 3), "time": time.time()})


def _init_from_kind(path: str) -> str:
    """"hf" (an HF directory) or "checkpoint" (a tristage checkpoint folder) for `init_from`; else refused."""
    src = Path(path)
    if (src / "config.json").exists():
        return "hf"
    if (src / "meta.json").exists():
        return "checkpoint"
    raise ConfigError(f"config key 'init_from' = {path!r}: neither an HF directory (config.json) nor a tristage "
                      f"checkpoint folder (meta.json)")


def _fail_after(items: Any, n: int) -> Any:
    """`items` for `n` elements, then a full disk (the export fault injected by tests)."""
    for i, item in enumerate(items):
        yield item
        if i + 1 == n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "(injected)")


def run(cfg: TrainConfig, resolved: Dict[str, Any], plans: List[StagePlan]) -> int:
    """Start the process group and train the curriculum (`cfg` validated, `plans` its stages'); the exit code."""
    for name in cfg.curriculum.order:  # config.yaml records the RoPE base a stage trains at, inherited or set
        resolved["curriculum"]["stages"][name]["rope_theta"] = cfg.curriculum.stages[name].rope_theta
    info = init_distributed(cfg)
    # from here a failure on any rank, or one killed, ends every rank within seconds (start-up is not watched for
    # hangs: `Trainer` starts that once it is built)
    watchdog = Watchdog(info.rank, info.world_size, cfg.dist.timeout_s, "start-up", job=cfg.run_dir,
                        heartbeat_s=cfg.dist.heartbeat_timeout_s, watching=False).start()
    run_dir = Path(cfg.run_dir)
    lock: Optional[IO[str]] = None

    def make_run_dir() -> Optional[IO[str]]:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            held = lock_run_dir(run_dir)
            (run_dir / "preempted").unlink(missing_ok=True)  # the marker of an earlier preemption is spent
            return held
        except OSError as e:
            raise ConfigError(f"config key 'run_dir' = {str(run_dir)!r}: cannot be created or written ({e})") from None

    trainer: Optional[Trainer] = None
    try:
        lock = on_rank0("creating run_dir", make_run_dir)
        done = finished_checkpoint(cfg, info.rank)
        if done is not None:
            if info.rank == 0:
                print(f"[tristage] the curriculum is complete ({done}); nothing to do (a new run needs another "
                      f"run_dir)", flush=True)
            barrier()
            return 0
        trainer = Trainer(cfg, resolved, plans, info, watchdog)
        on_rank0("recording config.yaml", lambda: record_config(run_dir, trainer.config_yaml))
        code = trainer.run()
    except (ConfigError, CheckpointError, DataError, Rank0Failed, NonFiniteError) as e:  # named: no traceback
        print(f"error: {e}", file=sys.stderr, flush=True)
        code = NONFINITE_EXIT_CODE if isinstance(e, NonFiniteError) else 2
        watchdog.failing(code)
        announce_failure(info.rank, e, cfg.run_dir, code)  # maybe this rank's alone (a file only it reads)
    except Exception as e:  # this rank's own failure (an OOM, a bug): the others are told, then it goes on up
        watchdog.failing(1)
        announce_failure(info.rank, e, cfg.run_dir)
        raise
    finally:
        watchdog.stop()
        if trainer is not None:
            trainer.close()
        if lock is not None:
            lock.close()
    if code == 0:
        barrier()
    return code
