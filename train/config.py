"""The typed schema behind `conf/`, registered in Hydra's ConfigStore, and the checks that run before any
process group starts.

Every YAML group in `conf/` merges into one of these dataclasses, so an unknown key or a wrong type fails
when Hydra composes the config; `validate()` then checks what types cannot (divisibility, budgets, ranges)
and names the offending key.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Set

from omegaconf import MISSING, DictConfig, OmegaConf

from data.config import DataConfig, MixtureConfig, check_data_config, check_mixture, to_source_config
from data.errors import DataError
from data.io import sha256_text
from models.config import Qwen3Config


class ConfigError(ValueError):
    """A config value that cannot run; the message names the key."""


@dataclass
class LRConfig:
    """One stage's segment of the warmup-stable-decay learning-rate schedule."""

    peak: float = 3e-4  # LR after warmup and through the stable phase
    final: float = 3e-5  # LR reached at the end of the decay phase (the last step of the stage)
    warmup_steps: int = 0  # linear warmup from `warmup_start` to `peak` over the first steps of the stage
    warmup_start: float = 0.0  # the ramp's origin: step k < warmup_steps gets start + (peak - start)(k+1)/warmup_steps
    decay_frac: float = 0.0  # fraction of the stage's steps spent decaying peak -> final (1.0 = all after warmup)
    decay_style: str = "cosine"  # cosine | linear | sqrt


@dataclass
class StageConfig:
    """What one curriculum stage changes: data mixture, length, batch, LR segment and RoPE base."""

    name: str = "general"  # stage name, used in metrics, checkpoint tags and the HF export folder
    tokens: int = 0  # token budget of the stage (rounded down to whole optimizer steps)
    seq_len: int = 4096  # packed sequence length
    global_batch_tokens: int = 4 * 1024 * 1024  # tokens per optimizer step over all ranks and micro-batches
    micro_batch_size: int = 1  # sequences per rank per forward pass
    # RoPE base for the stage (ABF: the Long Context stage raises it); None: the previous stage's in
    # curriculum.order (the first stage's: model.rope_theta), so a stage added after Long Context keeps its base
    rope_theta: Optional[float] = None
    lr: LRConfig = field(default_factory=LRConfig)
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    carry_optimizer: bool = True  # keep AdamW moments from the previous stage (False resets them)
    checkpoint_every: int = 0  # optimizer steps between periodic checkpoints (0: only at the stage end)
    eval_every: int = 0  # optimizer steps between held-out evaluations (0: only at the stage end)


@dataclass
class CurriculumConfig:
    """An ordered list of stages; `start` skips the stages before it (with `init_from` weights)."""

    order: List[str] = field(default_factory=lambda: ["general", "reasoning", "long_context"])
    stages: Dict[str, StageConfig] = field(default_factory=dict)
    start: Optional[str] = None  # first stage to run in a fresh run directory; None = order[0]


@dataclass
class DeepSpeedConfig:
    """The part of DeepSpeed's JSON config that tristage exposes; the rest is derived (see train/engine.py)."""

    zero_stage: int = 1  # 0, 1, 2 or 3
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer state and step on the CPU
    offload_param: bool = False  # ZeRO-3 only: parameters on the CPU between uses
    # ZeRO-3 only: build the model already partitioned (DeepSpeed's zero.Init), so no rank ever holds it whole
    partitioned_init: bool = True
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    # bf16 only: the dtype the micro-batches' gradients are summed in. auto: fp32 at ZeRO-2/3 (a partition of
    # 4 bytes per parameter / ranks), bf16 at ZeRO-0/1 (fp32 at ZeRO-1 is DeepSpeed's BF16_Optimizer: a whole
    # fp32 gradient beside the bf16 one, 6 bytes per parameter, its sum all-reduced in bf16; ZeRO-0 has no fp32)
    grad_accum_dtype: str = "auto"  # auto | fp32 | bf16
    grad_clip: float = 1.0  # global gradient-norm clip (0 disables)
    overlap_comm: bool = True  # overlap gradient reduction with the backward pass (GPU)
    reduce_bucket_size: int = 50_000_000  # elements per gradient-reduction bucket
    stage3_prefetch_bucket_size: int = 50_000_000  # ZeRO-3 parameter prefetch, elements
    extra: Dict[str, Any] = field(default_factory=dict)  # merged last into the generated DeepSpeed config


@dataclass
class OptimConfig:
    """torch AdamW, handed to DeepSpeed as the client optimizer."""

    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1  # decoupled; not applied to norms (1-D parameters)
    fused: str = "auto"  # auto (fused on CUDA) | true | false


@dataclass
class WandbConfig:
    """Weights & Biases; offline by default so nothing leaves the machine unless asked."""

    mode: str = "offline"  # online | offline | disabled
    project: str = "tristage"
    entity: Optional[str] = None
    api_key: Optional[str] = None  # prefer WANDB_API_KEY; never written to logs, dumps or checkpoints


@dataclass
class ProfileConfig:
    """torch.profiler traces of a few steps into <run_dir>/profile/ (train/profile.py); off by default."""

    start_step: int = 0  # first recorded global step (1-based, as metrics' global_step); 0 = off
    num_steps: int = 2  # steps recorded from start_step on (the step before runs as the profiler's warm-up)
    record_shapes: bool = True  # input shapes of each op (the op table groups by them)
    memory: bool = False  # allocations per op, and on CUDA the allocator history (rank<r>.memory.pickle)
    with_stack: bool = False  # Python stacks of each op (large traces)


@dataclass
class LoggingConfig:
    """Console, metrics.jsonl, wandb and the profiler."""

    log_every: int = 1  # optimizer steps between metrics lines
    console: bool = True  # one live line per logged step on rank 0
    peak_tflops: float = 0.0  # device peak for MFU; 0 = look it up (989 for H100/H200 bf16, none on CPU)
    # MoE: the (layers x experts) load table in step records every this many steps and at each stage's last step
    # (0: the last steps only); 48 x 128 numbers are ~55 KB a line. Its max/mean summary is in every record.
    expert_load_every: int = 100
    ledger_every: int = 100  # the data ledger's language and component tables in step records (+ stage ends)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)


@dataclass
class EvalConfig:
    """Held-out per-language perplexity run inside training."""

    enabled: bool = True
    max_languages: int = 0  # 0 = every held-out language
    max_tokens_per_language: int = 1024  # cap per held-out text of a language (UDHR, the Bible book: each is cut alone)
    batch_size: int = 8  # sequences per forward
    # at each stage end, rank 0 runs train/eval's suite (reasoning, passkey, loss by position, per-component
    # perplexity; small grids) on <run_dir>/hf/<stage>/ into <run_dir>/eval/<stage>/; needs checkpoint.export_hf
    stage_end_suite: bool = True
    suite_problems: int = 4  # suite: fresh reasoning problems per task (3 tasks)
    suite_max_new_tokens: int = 128  # suite: thinking + answer budget per problem
    suite_trials: int = 2  # suite: passkey keys per (length, needle depth)


@dataclass
class CheckpointConfig:
    """Where and how often the run is saved."""

    keep: int = 2  # newest periodic checkpoints kept (stage-end checkpoints are always kept)
    export_hf: bool = True  # write <run_dir>/hf/<stage>/ at each stage end


@dataclass
class DistConfig:
    """Process-group settings."""

    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | nccl | gloo
    timeout_s: int = 1800  # a rank without progress this long ends the job, naming the stuck rank
    # a rank that has not beaten this long (killed outright, its node down) ends the job, as does a rendezvous store
    # that has not answered this long (each rank's watchdog thread beats every 5 s); 0: not watched
    heartbeat_timeout_s: int = 300


@dataclass
class FaultsConfig:
    """What a long run does when a step goes wrong."""

    max_consecutive_skips: int = 5  # non-finite loss/gradient steps skipped in a row before the run aborts
    spike_factor: float = 0.0  # a loss above this x the running median is a spike (0: detector off)
    spike_window: int = 50  # steps in the running median
    spike_min_history: int = 10  # steps seen before the detector judges
    spike_action: str = "log"  # log | rollback (to the last checkpoint, skipping the spike's batch)
    spike_skip_before: int = 0  # on rollback, also skip this many batches before the spike (PaLM skipped ~200-500)
    max_rollbacks: int = 3  # rollbacks per run (the count is saved in checkpoints) before spikes are only logged


@dataclass
class LaunchConfig:
    """The cluster a run is planned for (`python -m launch.plan`); training itself reads the real world size."""

    nodes: int = 1
    gpus_per_node: int = 1
    gpu_memory_gb: float = 80.0  # usable memory per GPU
    peak_tflops: float = 989.0  # bf16 dense peak per GPU (H100/H200 datasheet)
    mfu: float = 0.40  # assumed model FLOPs utilisation for time estimates
    cpu_memory_gb: float = 1024.0  # per node, for offload plans


@dataclass
class TrainConfig:
    """The whole run: `conf/config.yaml` composes every group into this."""

    name: str = "demo"  # experiment name; the default run directory is runs/<name>
    run_dir: str = "runs/demo"  # everything the run writes; relaunching here resumes
    seed: int = 1234  # model init, data order and dropout-free training all follow from it
    device: str = "auto"  # auto | cpu | cuda
    init_from: Optional[str] = None  # checkpoint dir or HF directory to start a fresh run from
    expert_parallel_size: int = 1  # MoE experts sharded over this many ranks
    threads: int = 0  # torch intra-op threads per process on the CPU (0: cores / local ranks)
    model: Qwen3Config = MISSING  # filled from conf/model/<preset>.yaml
    data: DataConfig = field(default_factory=DataConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)  # cluster shape for the planner (launch/)
    max_steps: int = 0  # stop after this many optimizer steps in this launch (0: run to the end); for tests


def register_configs() -> None:
    """Register the schema so `conf/config.yaml` can name it in its defaults list."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    schema = OmegaConf.structured(TrainConfig)
    # an empty mapping, not None: Hydra merges a `model.rope_scaling={...}` override into the node, and OmegaConf's
    # merge into a None of type Optional[Dict] fails ("'NoneType' object has no attribute 'get'", a traceback);
    # models.config reads an empty rope_scaling as none
    schema.model = OmegaConf.structured(Qwen3Config)
    schema.model.rope_scaling = {}
    OmegaConf.set_struct(schema.model.rope_scaling, False)  # free-form: YaRN's keys, checked by models.config
    cs.store(name="tristage_schema", node=schema)
    cs.store(group="curriculum/stage_schema", name="stage", node=StageConfig)
    # `${short_hash:...}`: a sweep job's folder name carries a hash of its overrides (conf/config.yaml), so a
    # relaunched sweep resumes each job and another sweep under the same name never resumes the first one's
    if not OmegaConf.has_resolver("short_hash"):
        OmegaConf.register_new_resolver("short_hash", lambda text: sha256_text(str(text))[:8])


@dataclass
class StagePlan:
    """Numbers derived from one stage's config and the world size."""

    name: str
    steps: int  # optimizer steps in the stage
    samples_per_step: int  # global batch in sequences
    grad_accum: int  # micro-batches per rank per optimizer step
    micro_batch_size: int
    seq_len: int


@functools.lru_cache(maxsize=None)
def _say_once(note: str) -> None:
    """Print `note` on stderr once per process (the planner validates each config it tries)."""
    print(note, file=sys.stderr)


def _fail(key: str, value: Any, why: str) -> None:
    raise ConfigError(f"config key '{key}' = {value!r}: {why}")


def _keyed(e: Exception) -> ConfigError:
    """A checker's "<key> = <value>: why" (data.config, models.config) in this module's form, the key quoted."""
    key, sep, rest = str(e).partition(" = ")
    return ConfigError(f"config key '{key}' = {rest}" if sep else f"config key {e}")


def plan_stage(stage: StageConfig, key: str, dp_world: int) -> StagePlan:
    """Derive steps, global batch in sequences and accumulation for one stage, or name the key that cannot work."""
    if stage.seq_len <= 0:
        _fail(f"{key}.seq_len", stage.seq_len, "must be positive")
    if stage.micro_batch_size <= 0:
        _fail(f"{key}.micro_batch_size", stage.micro_batch_size, "must be positive")
    if stage.global_batch_tokens <= 0:  # 0 divided the budget by zero; a negative one blamed `tokens`
        _fail(f"{key}.global_batch_tokens", stage.global_batch_tokens, "must be positive")
    if stage.global_batch_tokens % stage.seq_len:
        _fail(f"{key}.global_batch_tokens", stage.global_batch_tokens,
              f"must be a multiple of {key}.seq_len={stage.seq_len}")
    samples = stage.global_batch_tokens // stage.seq_len
    per_pass = stage.micro_batch_size * dp_world
    if samples % per_pass:
        fits = [m for m in range(stage.micro_batch_size, 0, -1) if samples % (m * dp_world) == 0]
        hint = (f"{key}.micro_batch_size={fits[0]} divides it (a mid-stage relaunch cannot change the global "
                f"batch, but can the micro-batch)" if fits else f"no micro-batch does on {dp_world} ranks: fewer ranks")
        _fail(f"{key}.global_batch_tokens", stage.global_batch_tokens,
              f"{samples} sequences per step are not divisible by micro_batch_size x data-parallel ranks "
              f"= {stage.micro_batch_size} x {dp_world}; {hint}")
    steps = stage.tokens // stage.global_batch_tokens
    if steps < 1:
        _fail(f"{key}.tokens", stage.tokens, f"below one optimizer step of {stage.global_batch_tokens} tokens")
    lr = stage.lr
    if not 0.0 <= lr.decay_frac <= 1.0:
        _fail(f"{key}.lr.decay_frac", lr.decay_frac, "must lie in [0, 1]")
    if lr.decay_style not in ("cosine", "linear", "sqrt"):
        _fail(f"{key}.lr.decay_style", lr.decay_style, "must be cosine, linear or sqrt")
    if lr.warmup_steps < 0 or lr.warmup_steps > steps:
        _fail(f"{key}.lr.warmup_steps", lr.warmup_steps, f"must lie in [0, {steps}] (the stage's steps)")
    if not (math.isfinite(lr.peak) and lr.peak > 0):
        _fail(f"{key}.lr.peak", lr.peak, "must be a positive learning rate")
    if not (math.isfinite(lr.final) and 0 <= lr.final <= lr.peak):
        _fail(f"{key}.lr.final", lr.final, f"must lie in [0, {key}.lr.peak={lr.peak}] (the decay goes down)")
    if not (math.isfinite(lr.warmup_start) and lr.warmup_start >= 0):
        _fail(f"{key}.lr.warmup_start", lr.warmup_start, "must be >= 0")
    for name in ("checkpoint_every", "eval_every"):
        if getattr(stage, name) < 0:
            _fail(f"{key}.{name}", getattr(stage, name), "must be >= 0 (0: never)")
    # NaN or inf made NaN RoPE tables (every loss NaN); a base <= 1 is what models.config refuses for the model
    if not (math.isfinite(stage.rope_theta) and stage.rope_theta > 1):
        _fail(f"{key}.rope_theta", stage.rope_theta, "must be a finite RoPE base > 1 (as model.rope_theta)")
    return StagePlan(stage.name, steps, samples, samples // per_pass, stage.micro_batch_size, stage.seq_len)


# DeepSpeed keys the loop derives from its own settings and relies on: the batch its data plan feeds, the clipping
# it logs (and, without ZeRO in fp32, does itself), the ZeRO layout its checkpoints record, the precision, optimizer
# and LR schedule it hands DeepSpeed. A key of `deepspeed.extra` under one of these is refused, naming the setting.
DERIVED_DEEPSPEED_KEYS = {
    "gradient_clipping": "deepspeed.grad_clip",
    "train_batch_size": "the stage's global_batch_tokens",
    "train_micro_batch_size_per_gpu": "the stage's micro_batch_size",
    "gradient_accumulation_steps": "the stage's global_batch_tokens and micro_batch_size",
    "data_types": "deepspeed.grad_accum_dtype",
    "zero_optimization.stage": "deepspeed.zero_stage",
    "zero_optimization.overlap_comm": "deepspeed.overlap_comm",
    "zero_optimization.reduce_bucket_size": "deepspeed.reduce_bucket_size",
    "zero_optimization.allgather_bucket_size": "deepspeed.reduce_bucket_size",
    "zero_optimization.stage3_prefetch_bucket_size": "deepspeed.stage3_prefetch_bucket_size",
    "zero_optimization.offload_optimizer": "deepspeed.offload_optimizer",
    "zero_optimization.offload_param": "deepspeed.offload_param",
    "bf16.enabled": "deepspeed.precision",
    "bf16.check_grad_overflow": "deepspeed.precision (a non-finite gradient norm skips the step on every rank)",
    "fp16": "deepspeed.precision (bf16 or fp32; fp16 with loss scaling is not supported)",
    "optimizer": "optim.* (torch AdamW is the client optimizer)",
    "scheduler": "the stages' lr settings (the loop sets each step's LR)",
}
_DEEPSPEED_SECTIONS = ("zero_optimization", "bf16")  # dicts of the derived config that `extra` merges into


def _check_deepspeed_extra(extra: Dict[str, Any]) -> None:
    """Refuse what `deepspeed.extra` may not set: a derived key (DERIVED_DEEPSPEED_KEYS), a merged section that is
    not a mapping, a `steps_per_print` DeepSpeed divides by."""
    todo = [(str(k), v) for k, v in extra.items()]
    while todo:
        path, value = todo.pop(0)
        if path in DERIVED_DEEPSPEED_KEYS:
            _fail(f"deepspeed.extra.{path}", value, f"set by tristage from {DERIVED_DEEPSPEED_KEYS[path]}; "
                  "set that instead")
        if path in _DEEPSPEED_SECTIONS:
            if not isinstance(value, dict):
                _fail(f"deepspeed.extra.{path}", value, "must be a mapping (merged into the derived section)")
            todo += [(f"{path}.{k}", v) for k, v in value.items()]
    steps = extra.get("steps_per_print", 1)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        _fail("deepspeed.extra.steps_per_print", steps, "must be an integer >= 1 (DeepSpeed divides by it)")


def unknown_keys(node: Any, typed: Any, path: str = "") -> List[str]:
    """Keys of a composed config (as a container) that its typed object has no field for. Hydra's `+key=value`
    adds any key and `OmegaConf.to_object` drops what a dataclass lacks, so a typo such as `+optim.lr=1e-3`
    would otherwise be ignored while config.yaml records it."""
    found: List[str] = []
    if dataclasses.is_dataclass(typed) and isinstance(node, dict):
        names = {f.name for f in dataclasses.fields(typed)}
        for key, value in node.items():
            where = f"{path}.{key}" if path else str(key)
            if key not in names:
                found.append(where)
            else:
                found += unknown_keys(value, getattr(typed, key), where)
    elif isinstance(typed, dict) and isinstance(node, dict):
        for key, value in node.items():
            if key in typed:
                found += unknown_keys(value, typed[key], f"{path}.{key}")
    return found


def check_known_keys(resolved: Dict[str, Any], cfg: TrainConfig) -> None:
    """Refuse keys that are no setting (see `unknown_keys`), naming them."""
    extra = unknown_keys(resolved, cfg)
    if extra:
        names = ", ".join(repr(k) for k in extra)
        raise ConfigError(f"config key{'s' if len(extra) > 1 else ''} {names}: not a setting (a typo? "
                          f"`python -m train --cfg job` prints every key)")


def to_train_config(cfg: TrainConfig | DictConfig) -> TrainConfig:
    """The typed config object of a composed DictConfig (a TrainConfig passes through)."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    assert isinstance(cfg, TrainConfig)
    return cfg


def first_stage_index(cfg: TrainConfig) -> int:
    """Where in curriculum.order a fresh run starts: `curriculum.start`, else the first stage."""
    return cfg.curriculum.order.index(cfg.curriculum.start) if cfg.curriculum.start else 0


def check_data_fits(cfg: TrainConfig, plans: List[StagePlan], manifest: Dict[str, Any], manifest_path: Any) -> None:
    """Refuse (DataError) a stage from the run's first on that the prepared data cannot fill, as its start would
    (`data.loader.check_stage_fits`: its length buckets and each part's max_epochs cap): train says it before
    building the model, launch.plan before an allocation. Rank 0 checks while the other ranks wait: with length
    buckets the first check reads the shards' document offsets (then recorded beside the manifest)."""
    from data.loader import check_stage_fits
    from train.dist import on_rank0

    def check() -> None:
        for plan in plans[first_stage_index(cfg):]:
            stage = cfg.curriculum.stages[plan.name]
            check_stage_fits(manifest, manifest_path, stage.mixture, plan.seq_len,
                             plan.steps * plan.samples_per_step, stage.name)

    on_rank0("checking that the data fills each stage", check)


def apply_data_mixtures(cfg: TrainConfig) -> Set[str]:
    """Give each stage whose `mixture.weights` is empty the data config's `mixtures.<stage>`, in place; returns
    the stages filled. Refused: `data.mixtures` entries for no stage of the curriculum while a stage of
    `curriculum.order` is left with no weights (a typo'd or renamed stage, which would otherwise weigh the sources by
    their tokens). Said on rank 0: a stage's own weights replacing the data config's (and dropping sources)."""
    unmatched = sorted(set(cfg.data.mixtures) - set(cfg.curriculum.stages))
    order, start = cfg.curriculum.order, cfg.curriculum.start
    trained = order[order.index(start):] if start in order else order  # stages before curriculum.start never run
    bare = [n for n in trained if n in cfg.curriculum.stages
            and not cfg.curriculum.stages[n].mixture.weights and not cfg.data.mixtures.get(n)]
    if unmatched and bare:
        _fail(f"data.mixtures.{unmatched[0]}", cfg.data.mixtures[unmatched[0]],
              f"names no stage of curriculum.stages {sorted(cfg.curriculum.stages)}, and stage(s) {bare} have no "
              f"weights: set data.mixtures.<stage> (in the data config, or `+data.mixtures.{bare[0]}={{...}}`) or "
              f"curriculum.stages.<stage>.mixture.weights")
    if bare and cfg.data.mixtures:  # a stage added to a curriculum whose data config weighs the others
        _fail(f"data.mixtures.{bare[0]}", None,
              f"stage(s) {bare} of curriculum.order have no weights, while data.mixtures gives the stages "
              f"{sorted(cfg.data.mixtures)} theirs: set `+data.mixtures.{bare[0]}={{<source>: <weight>, ...}}` or "
              f"curriculum.stages.{bare[0]}.mixture.weights (without either, its sources would be weighed by "
              f"their tokens)")
    talk = os.environ.get("RANK", "0") == "0"
    if unmatched and talk:
        print(f"[tristage] note: data.mixtures has weights for {unmatched}, which are not stages of this curriculum "
              f"(unused)", file=sys.stderr, flush=True)
    filled: Set[str] = set()
    for name, stage in cfg.curriculum.stages.items():
        weights = cfg.data.mixtures.get(name)
        if stage.mixture.weights and isinstance(weights, dict) and talk:
            dropped = sorted(set(weights) - set(stage.mixture.weights))
            if dropped and name in cfg.curriculum.order:
                print(f"[tristage] note: curriculum.stages.{name}.mixture.weights {dict(stage.mixture.weights)} "
                      f"replaces data.mixtures.{name} (sources {dropped} get no samples)", file=sys.stderr,
                      flush=True)
        if stage.mixture.weights or not weights:
            continue
        if not isinstance(weights, dict):
            _fail(f"data.mixtures.{name}", weights, "must map source names to weights, e.g. {en: 0.7, fr: 0.3}")
        for src, w in weights.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)):
                _fail(f"data.mixtures.{name}.{src}", w, "must be a number")
        stage.mixture.weights = {src: float(w) for src, w in weights.items()}
        filled.add(name)
    return filled


def grad_accum_dtype(ds: DeepSpeedConfig, bf16: bool) -> str:
    """The dtype a step's micro-batch gradients are summed in: `deepspeed.grad_accum_dtype` resolved (auto: fp32
    at ZeRO-2/3, bf16 at ZeRO-0/1); always fp32 when training is not bf16."""
    if not bf16:
        return "fp32"
    if ds.grad_accum_dtype == "auto":
        return "fp32" if ds.zero_stage >= 2 else "bf16"
    return ds.grad_accum_dtype


def world_from_env() -> tuple[int, int, int, int]:
    """(rank, world size, local rank, local world size) as torchrun / the deepspeed launcher set them."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    # torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world)))
    return rank, world, local_rank, local_world


def validate(cfg: TrainConfig | DictConfig, world_size: int) -> List[StagePlan]:
    """Check everything the schema's types cannot, before any process group starts; returns each stage's plan.
    Fills each stage's empty mixture weights from `data.mixtures` first (`apply_data_mixtures`), in place on a
    TrainConfig (a DictConfig is converted, and its copy filled): every entry point (train, launch.plan) passes
    its typed config here before it reads a stage."""
    cfg = to_train_config(cfg)
    from_data = apply_data_mixtures(cfg)
    _refuse_foreign_targets(dataclasses.asdict(cfg), "")
    if world_size < 1:
        _fail("world_size", world_size, "must be at least 1")
    try:
        cfg.model.validate()
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    ep = cfg.expert_parallel_size
    if ep < 1:
        _fail("expert_parallel_size", ep, "must be at least 1")
    if ep > 1:
        if cfg.model.num_experts == 0:
            _fail("expert_parallel_size", ep, f"model '{cfg.model.name}' is dense (model.num_experts=0)")
        if world_size % ep:
            _fail("expert_parallel_size", ep, f"must divide the world size {world_size}")
        if cfg.model.num_experts % ep:
            _fail("expert_parallel_size", ep, f"must divide model.num_experts={cfg.model.num_experts}")
        from train.expert_parallel import check_config  # the ZeRO stages DeepSpeed's MoE support allows

        check_config(cfg)
    ds = cfg.deepspeed
    if ds.zero_stage not in (0, 1, 2, 3):
        _fail("deepspeed.zero_stage", ds.zero_stage, "must be 0, 1, 2 or 3")
    if ds.offload_param and ds.zero_stage != 3:
        _fail("deepspeed.offload_param", True, "needs deepspeed.zero_stage=3")
    if ds.offload_optimizer and ds.zero_stage == 0:
        _fail("deepspeed.offload_optimizer", True, "needs deepspeed.zero_stage >= 1")
    if ds.precision not in ("auto", "bf16", "fp32"):
        _fail("deepspeed.precision", ds.precision, "must be auto, bf16 or fp32")
    if ds.grad_accum_dtype not in ("auto", "fp32", "bf16"):
        _fail("deepspeed.grad_accum_dtype", ds.grad_accum_dtype, "must be auto, fp32 or bf16")
    if ds.grad_accum_dtype == "fp32" and ds.zero_stage == 0 and ds.precision != "fp32":
        # DeepSpeed's engine refuses that mix without ZeRO ("unsupported mix") with a traceback
        _fail("deepspeed.grad_accum_dtype", "fp32", "needs deepspeed.zero_stage >= 1 in bf16 (without ZeRO "
              "DeepSpeed sums bf16 gradients in bf16)")
    try:
        check_data_config(cfg.data)
    except DataError as e:
        raise ConfigError(str(e)) from None
    for name, src in cfg.data.sources.items():
        try:
            to_source_config(name, src)
        except DataError as e:
            raise ConfigError(f"config key {e}") from None
    if cfg.data.index_workers is not None and cfg.data.index_workers < 1:
        _fail("data.index_workers", cfg.data.index_workers, "must be at least 1 (or null: one per core, up to 16)")
    if not cfg.run_dir.strip():  # Path("") is the working directory: the run wrote its files and lock there
        _fail("run_dir", cfg.run_dir, "must name a directory (relaunching there resumes)")
    if not 0 <= cfg.seed < 2**63:  # numpy's generators take no negative seed, torch's none past 64 bits
        _fail("seed", cfg.seed, "must lie in [0, 2**63)")
    if cfg.threads < 0:  # torch.set_num_threads raised it in init_distributed, a traceback not naming the key
        _fail("threads", cfg.threads, "must be >= 0 (0: cores / local ranks)")
    if cfg.device not in ("auto", "cpu", "cuda"):
        _fail("device", cfg.device, "must be auto, cpu or cuda")
    if cfg.dist.backend not in ("auto", "nccl", "gloo"):
        _fail("dist.backend", cfg.dist.backend, "must be auto, nccl or gloo")
    for key in ("expert_load_every", "ledger_every"):
        if getattr(cfg.logging, key) < 0:
            _fail(f"logging.{key}", getattr(cfg.logging, key), "must be >= 0 (0: each stage's last step)")
    if cfg.logging.profile.start_step < 0:
        _fail("logging.profile.start_step", cfg.logging.profile.start_step, "must be 0 (off) or a global step >= 1")
    if cfg.logging.profile.num_steps < 1:
        _fail("logging.profile.num_steps", cfg.logging.profile.num_steps, "must be at least 1")
    if cfg.logging.wandb.mode not in ("online", "offline", "disabled"):
        _fail("logging.wandb.mode", cfg.logging.wandb.mode, "must be online, offline or disabled")
    if cfg.optim.fused not in ("auto", "true", "false"):
        _fail("optim.fused", cfg.optim.fused, "must be auto, true or false")
    if cfg.faults.spike_action not in ("log", "rollback"):
        _fail("faults.spike_action", cfg.faults.spike_action, "must be log or rollback")
    if cfg.faults.max_consecutive_skips < 0:
        _fail("faults.max_consecutive_skips", cfg.faults.max_consecutive_skips, "must be >= 0")
    # the spike detector (train.faults.SpikeDetector) judges once it holds spike_min_history losses of its last
    # spike_window: a window below that never judged (the detector silently off), as did a NaN factor (no loss is
    # above NaN x median); a min_history of 0 took the median of no losses (a StatisticsError at the first step)
    faults = cfg.faults
    if not (math.isfinite(faults.spike_factor) and faults.spike_factor >= 0):
        _fail("faults.spike_factor", faults.spike_factor, "must be a finite factor >= 0 (0: the detector is off)")
    if faults.spike_min_history < 1:
        _fail("faults.spike_min_history", faults.spike_min_history, "must be at least 1")
    if faults.spike_window < faults.spike_min_history:
        _fail("faults.spike_window", faults.spike_window, f"must be >= faults.spike_min_history="
              f"{faults.spike_min_history} (the losses the detector needs before it judges a spike)")
    for key in ("spike_skip_before", "max_rollbacks"):
        if getattr(faults, key) < 0:
            _fail(f"faults.{key}", getattr(faults, key), "must be >= 0")
    if cfg.dist.timeout_s <= 0:
        _fail("dist.timeout_s", cfg.dist.timeout_s, "must be positive")
    if cfg.dist.heartbeat_timeout_s != 0 and cfg.dist.heartbeat_timeout_s < 15:
        _fail("dist.heartbeat_timeout_s", cfg.dist.heartbeat_timeout_s, "must be 0 (not watched) or at least 15 "
              "(three of the 5 s beats, so that a busy host is not taken for a dead rank)")
    # read at the first evaluation, after a stage has trained: batch_size 0 ended the run there (range() step 0),
    # max_tokens_per_language 0 evaluated nothing, max_languages -1 dropped the last language
    # the stage-end suite's sizes too (read at a stage's end; `eval.stage_end_suite=false` turns the suite off)
    for key, least in (("batch_size", 1), ("max_tokens_per_language", 1), ("max_languages", 0), ("suite_problems", 1),
                       ("suite_max_new_tokens", 1), ("suite_trials", 1)):
        if getattr(cfg.eval, key) < least:
            _fail(f"eval.{key}", getattr(cfg.eval, key), f"must be >= {least}")
    if not (math.isfinite(cfg.logging.peak_tflops) and cfg.logging.peak_tflops >= 0):
        _fail("logging.peak_tflops", cfg.logging.peak_tflops, "must be a finite TFLOP/s >= 0 (0: the device's own)")
    if ds.reduce_bucket_size < 1:
        _fail("deepspeed.reduce_bucket_size", ds.reduce_bucket_size, "must be at least 1 (elements per bucket)")
    if ds.stage3_prefetch_bucket_size < 0:  # DeepSpeed's own check was a pydantic traceback at the engine's start
        _fail("deepspeed.stage3_prefetch_bucket_size", ds.stage3_prefetch_bucket_size,
              "must be >= 0 (elements; 0: no prefetch)")
    if cfg.eval.stage_end_suite and not cfg.checkpoint.export_hf and os.environ.get("RANK", "0") == "0":
        _say_once("note: eval.stage_end_suite evaluates each stage's HF export, and checkpoint.export_hf=false "
                  "writes none: the suite is skipped")
    _check_deepspeed_extra(ds.extra)
    if cfg.max_steps < 0:  # `steps >= max_steps` held after the first step: a negative one stopped the run there
        _fail("max_steps", cfg.max_steps, "must be >= 0 (0: run to the end)")
    if cfg.checkpoint.keep < 1:
        _fail("checkpoint.keep", cfg.checkpoint.keep, "must keep at least one checkpoint")
    if cfg.logging.log_every < 1:
        _fail("logging.log_every", cfg.logging.log_every, "must be at least 1")
    opt = cfg.optim
    if len(opt.betas) != 2 or not all(0.0 <= b < 1.0 for b in opt.betas):
        _fail("optim.betas", list(opt.betas), "must be two values in [0, 1), e.g. [0.9, 0.95]")
    if not (math.isfinite(opt.eps) and opt.eps > 0):
        _fail("optim.eps", opt.eps, "must be positive")
    if not (math.isfinite(opt.weight_decay) and opt.weight_decay >= 0):
        _fail("optim.weight_decay", opt.weight_decay, "must be >= 0")
    if not (math.isfinite(ds.grad_clip) and ds.grad_clip >= 0):
        _fail("deepspeed.grad_clip", ds.grad_clip, "must be >= 0 (0: no clipping)")

    cur = cfg.curriculum
    if not cur.order:
        _fail("curriculum.order", cur.order, "is empty")
    if len(set(cur.order)) != len(cur.order):
        _fail("curriculum.order", cur.order, "names a stage twice")
    for name in cur.order:
        if name not in cur.stages:
            _fail("curriculum.order", cur.order, f"stage '{name}' is not in curriculum.stages {sorted(cur.stages)} "
                  f"(add one: `+stage@curriculum.stages.{name}=<a stage file>`, README \"The curriculum\")")
    if cur.start is not None and cur.start not in cur.order:
        _fail("curriculum.start", cur.start, f"is not one of curriculum.order {cur.order}")
    dp_world = world_size  # expert parallelism shards experts, not the batch: every rank is a data-parallel rank
    plans = []
    base = cfg.model.rope_theta
    for name in cur.order:
        stage = cur.stages[name]
        key = f"curriculum.stages.{name}"
        if stage.rope_theta is None:  # the previous stage's base, filled in place as the mixtures are
            stage.rope_theta = base
        elif stage.rope_theta < base and name != cur.order[0] and os.environ.get("RANK", "0") == "0":
            print(f"[tristage] warning: {key}.rope_theta={stage.rope_theta:g} lowers the previous stage's RoPE base "
                  f"{base:g}, which undoes its ABF (leave the key out to keep the previous base)", file=sys.stderr,
                  flush=True)
        base = stage.rope_theta
        if stage.name != name:
            _fail(f"{key}.name", stage.name, f"must equal its key '{name}'")
        weights_key = f"data.mixtures.{name}" if name in from_data else f"{key}.mixture.weights"
        try:
            check_mixture(stage.mixture, f"{key}.mixture", weights_key)
        except ValueError as e:
            raise _keyed(e) from None
        for src in stage.mixture.weights:
            if src not in cfg.data.sources:
                _fail(f"{weights_key}.{src}", stage.mixture.weights[src],
                      f"names no source in data.sources {sorted(cfg.data.sources)}")
        if stage.seq_len > cfg.model.max_position_embeddings:
            _fail(f"{key}.seq_len", stage.seq_len,
                  f"above model.max_position_embeddings={cfg.model.max_position_embeddings}")
        longest = [b.max_tokens for b in stage.mixture.length_buckets]
        if longest and None not in longest and stage.seq_len > max(longest):
            _fail(f"{key}.seq_len", stage.seq_len,
                  f"above the longest documents the stage's length buckets hold ({max(longest)} tokens, "
                  f"{key}.mixture.length_buckets): its samples could only be packed from several short documents")
        plans.append(plan_stage(stage, key, dp_world))
    return plans


_PROJECT_PACKAGES = ("models.", "data.", "train.", "launch.")


def _refuse_foreign_targets(node: Any, path: str) -> None:
    """Refuse any `_target_` that points outside the project's own packages (no arbitrary code from a config)."""
    if isinstance(node, dict):
        for key, child in node.items():
            child_path = f"{path}.{key}" if path else str(key)
            if key == "_target_" and not (isinstance(child, str) and child.startswith(_PROJECT_PACKAGES)):
                _fail(child_path, child, "only the project's own classes (models., data., train., launch.) "
                      "may be instantiated from a config")
            _refuse_foreign_targets(child, child_path)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            _refuse_foreign_targets(item, f"{path}.{i}")
