"""`python -m launch.plan [key=value ...]`: what a run needs per GPU, whether it fits, and how long each stage takes.

The planner composes the same Hydra config as `python -m train` (same overrides, same validation), so
`python -m launch.plan model=qwen3_235b_a22b curriculum=qwen3 deepspeed=zero2_offload expert_parallel_size=32
launch.nodes=32 launch.gpus_per_node=8` answers for exactly the job that `python -m train` with those overrides
would run. Exit code 0: every stage fits; 1: something does not fit (with the changes that would make it fit);
2: the config cannot run at all (the message names the key).

Memory model, per GPU, in bytes (bf16 mixed precision with fp32 master weights and torch AdamW, which is what
train/engine.py configures on a GPU). N = data-parallel ranks (= world size), EP = expert_parallel_size.
Dense parameters (everything but the routed experts) count P_d and are ZeRO-sharded over N ranks; each rank
holds P_e / EP expert parameters, ZeRO-sharded over the N / EP ranks of its expert-data-parallel group. For a
group of c parameters sharded over n ranks ("/n" applies from the ZeRO stage given):

    parameters   bf16                      2 c   (/n at ZeRO-3; 0 with offload_param)
    gradients    bf16                      2 c   (/n at ZeRO-2 and -3; 0 at ZeRO-2/3 with offload_optimizer)
                 summed in fp32 (deepspeed.grad_accum_dtype; auto at ZeRO-2/3): 4 c / n at ZeRO-2 and -3, which
                 is also the step's gradient at ZeRO-2 (no step copy); 6 c at ZeRO-1 (DeepSpeed's BF16_Optimizer:
                 the bf16 gradient and a whole fp32 sum, which the step reads in place)
    optimizer    fp32 master + Adam m, v  12 c   (/n at ZeRO >= 1; 0 with offload_optimizer)
    step copy    fp32 gradient partition   4 c   (/n at ZeRO >= 1; made only for the optimizer step;
                                                  ZeRO-3 makes it one sub-group of <= 1e9 elements at a time)
    gathered     ZeRO-3 only: 4 x the largest module's parameters (its bf16 weights and bf16 gradient while
                 it runs, DeepSpeed's "largest layer" term)

These are the tensors DeepSpeed 0.19.8 allocates (stage_1_and_2.py / stage3.py; tests/test_plan_deepspeed.py
counts them in real ZeRO-1/2/3 engines). DeepSpeed's estimators charge ZeRO-2 2 P + 18 P / N and ZeRO-3
18 P / N + 4 x largest layer: the planner's ZeRO-2 and offload figures equal them, and without offload its
ZeRO-3 figure is 2 P / N higher, the bf16 gradient partition (`grad_partitions_flat_buffer`) that the
estimator's 18 bytes leave out.

Activations, per micro-batch of b sequences of s tokens (n = b s tokens), bf16, for the Qwen3 block of
models/qwen3.py on a GPU: SDPA flash attention (it keeps q, k, v, the output and an fp32 log-sum-exp: no s^2
term), CUDA's fused RMSNorm (keeps its bf16 input and an fp32 rstd per vector) and the fused chunked
cross-entropy of models/loss.py (no (n, V) logits). Bytes one block keeps per token, with h = hidden,
q = heads x head_dim, kv = kv_heads x head_dim, H / KV = head counts, f = MLP width:

    two RMSNorms           2 (2h + 4)
    attention input        2h                q/k/v projections' input (the normalised hidden state)
    QK-Norm                2q + 4H + 2kv + 4KV
    SDPA                   4q + 4kv + 4H     q, k (after RoPE), v, output, fp32 log-sum-exp
    o_proj input           2q
    dense MLP              2h + 8f           input, gate, silu(gate), up, silu(gate) * up
    MoE MLP (top-k of E experts, width F)
                           4h + 8E + 4 + 24k + 2k + 4kh + 8kF  (+ 4k + 4 with norm_topk_prob)
                           fp32 router input, probs and logits (z-loss), token and expert indices,
                           dispatched inputs and outputs, the k experts' SwiGLU; plus an fp32 router
                           weight copy (4 E h) per block

(A dense block: 8h + 8q + 6kv + 8H + 4KV + 8f + 8. torch's composite RMSNorm on the CPU keeps 8w + 4 per
normalised vector of width w instead of 2w + 4; tests/test_plan.py checks the formula, with that CPU variant,
against the tensors autograd saves in the real model.) Outside the blocks: final norm 2h + 4, token ids 8 and
the fused loss's bf16 dL/dh 2h per token, plus its bf16 dL/dW (2 V h) and the RoPE tables (2 s head_dim).
With activation checkpointing a block keeps only its bf16 input (2h per token) and is recomputed in the
backward pass. On top of what is kept, the peak adds the larger of
  - the fused loss's forward: an fp32 head-gradient accumulator (4 V h) and one chunk of logits in fp32 and
    bf16 (6 C V, C = model.loss_chunk_size);
  - the backward of one block: its gradients (approximated by its activations), plus the recomputed
    activations under checkpointing, plus the loss gradients (2h n + 2 V h).
The peak per GPU is parameters + gradients + optimizer + max(step copy, gathered + activations + temporaries)
+ communication buckets (2 bytes x 2 x reduce_bucket_size, + the ZeRO-3 prefetch bucket) + a 2 GiB reserve
for the CUDA context, NCCL and allocator fragmentation. MoE routing is assumed balanced (each rank's experts
process b s k tokens). Memory sizes are in GiB (2^30 bytes), as DeepSpeed's estimators print them; pass the
GPU's usable memory as launch.gpu_memory_gb (an "80 GB" H100 has 79.6 GiB).

Time: a stage trains steps x global_batch_tokens tokens at models.params.flops_per_token (6 x active matmul
parameters + causal attention) per token, on N GPUs at launch.peak_tflops x launch.mfu. MFU counts model FLOPs,
so the recomputation of activation checkpointing is part of what the assumed MFU must absorb.
"""
from __future__ import annotations

import copy
import logging
import math
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from omegaconf import DictConfig, OmegaConf

from models.config import Qwen3Config
from models.params import count_parameters, flops_per_token
from train.config import (ConfigError, StagePlan, TrainConfig, check_data_fits, check_known_keys, grad_accum_dtype,
                          to_train_config, validate)

GIB = 2**30
SUB_GROUP_SIZE = 1_000_000_000  # DeepSpeed's default zero_optimization.sub_group_size (elements)
RESERVE_BYTES = 2 * GIB  # CUDA context, NCCL channels, caching-allocator fragmentation


@dataclass
class ParamSplit:
    """Parameter counts the memory model needs."""

    total: int
    dense: int  # everything but the routed experts: replicated over EP, ZeRO-sharded over all ranks
    expert: int  # routed expert weights of all experts (each rank holds expert / EP)
    active: int  # parameters a token uses
    largest_module: int  # parameters owned directly by the largest module on one rank (DeepSpeed's "layer")
    largest_module_name: str


@dataclass
class ModelStates:
    """Model-state bytes per GPU (see the module docstring for what each holds)."""

    params: int
    grads: int
    optimizer: int
    step_grads: int  # fp32 gradient copy that exists only during the optimizer step
    gathered: int  # ZeRO-3 working set: one module's full bf16 parameters and gradients
    cpu: int  # bytes this GPU's rank keeps in CPU memory (offload)

    @property
    def total(self) -> int:
        """Everything DeepSpeed's estimators count: persistent state, step copy and gathered module."""
        return self.params + self.grads + self.optimizer + self.step_grads + self.gathered


@dataclass
class Activations:
    """Activation bytes per GPU for one micro-batch."""

    saved: int  # kept from the forward pass for the backward pass
    temporaries: int  # transient peak on top of `saved` (fused-loss forward or one block's backward)


@dataclass
class StageFit:
    """One curriculum stage on the planned cluster."""

    name: str
    seq_len: int
    micro_batch_size: int
    grad_accum: int
    steps: int
    tokens_per_step: int
    activations: Activations
    peak: int  # bytes per GPU at the worse of forward/backward and the optimizer step
    fits: bool
    flops_per_token: float
    seconds: float


@dataclass
class Plan:
    """The whole capacity plan: cluster, model states, one StageFit per stage and what to change."""

    model: str
    nodes: int
    gpus_per_node: int
    expert_parallel_size: int
    zero_stage: int
    offload_optimizer: bool
    offload_param: bool
    grad_accum: str  # the dtype micro-batch gradients are summed in (fp32 or bf16)
    activation_checkpointing: bool
    gpu_memory: int  # bytes
    cpu_memory_per_node: int  # bytes
    peak_tflops: float
    mfu: float
    params: ParamSplit
    states: ModelStates
    buffers: int  # communication buckets + reserve, bytes
    deepspeed_estimate: Optional[int]  # DeepSpeed's own model-state estimate per GPU (ZeRO-2/3), bytes
    stages: List[StageFit]
    suggestions: List[str] = field(default_factory=list)  # overrides that would make it fit
    suggestions_combined: bool = False  # True: the suggestions are needed together

    @property
    def world(self) -> int:
        """Number of GPUs (= data-parallel ranks)."""
        return self.nodes * self.gpus_per_node

    @property
    def cpu_needed_per_node(self) -> int:
        """Offloaded bytes all ranks of one node keep in CPU memory."""
        return self.states.cpu * self.gpus_per_node

    @property
    def cpu_fits(self) -> bool:
        """Whether the offloaded state fits in a node's CPU memory."""
        return self.cpu_needed_per_node <= self.cpu_memory_per_node

    @property
    def fits(self) -> bool:
        """Every stage fits in GPU memory and the offloaded state in CPU memory."""
        return self.cpu_fits and all(s.fits for s in self.stages)


# --------------------------------------------------------------------------------------------------------
# Parameters and model states


def split_parameters(m: Qwen3Config, expert_parallel_size: int = 1) -> ParamSplit:
    """Dense / expert parameter counts and the largest module on one rank (experts divided by EP)."""
    counts = count_parameters(m)
    d, q, kv = m.hidden_size, m.num_attention_heads * m.head_dim, m.num_key_value_heads * m.head_dim
    expert = m.num_hidden_layers * m.num_experts * 3 * d * m.moe_intermediate_size if m.is_moe else 0
    # Modules and the parameters each owns directly, as DeepSpeed's model_to_params() walks them.
    modules = {"embed_tokens": m.vocab_size * d, "q_proj": d * q, "o_proj": q * d, "k_proj": d * kv}
    if not m.tie_word_embeddings:
        modules["lm_head"] = m.vocab_size * d
    if m.is_moe:
        local_experts = m.num_experts // expert_parallel_size
        modules["mlp.experts"] = local_experts * 3 * d * m.moe_intermediate_size  # gate_up_proj + down_proj
        modules["mlp.gate"] = m.num_experts * d
    else:
        modules["mlp.gate_proj"] = d * m.intermediate_size
    name = max(modules, key=lambda k: modules[k])
    return ParamSplit(total=counts.total, dense=counts.total - expert, expert=expert, active=counts.active,
                      largest_module=modules[name], largest_module_name=name)


def model_states(p: ParamSplit, zero_stage: int, world: int, expert_parallel_size: int = 1,
                 offload_optimizer: bool = False, offload_param: bool = False,
                 grad_accum: str = "bf16") -> ModelStates:
    """Bytes per GPU of parameters, gradients, optimizer state, step copy and ZeRO-3 working set; `grad_accum`:
    the dtype the micro-batches' gradients are summed in (train.config.grad_accum_dtype)."""
    ep = expert_parallel_size
    # (parameters on this rank, ranks their ZeRO state is sharded over); with EP > 1 the experts form their
    # own optimizer groups over the expert-data-parallel ranks, otherwise all parameters share the groups
    groups = [(p.dense, world), (p.expert // ep, world // ep)] if ep > 1 else [(p.total, world)]
    params = grads = optimizer = cpu = 0
    fp32_sum = grad_accum == "fp32"
    step_parts: List[float] = []
    for count, ranks in groups:
        shard = count / ranks
        if offload_param:  # ZeRO-3 only: the bf16 partition waits in CPU memory between uses
            cpu += 2 * shard
        else:
            params += 2 * (shard if zero_stage == 3 else count)
        if not (offload_optimizer and zero_stage >= 2):  # ZeRO-2/3 offload reduces gradients into CPU buffers
            if zero_stage >= 2:
                grads += (4 if fp32_sum else 2) * shard
            else:
                grads += (6 if fp32_sum and zero_stage == 1 else 2) * count
        opt_elems = shard if zero_stage >= 1 else count
        if offload_optimizer:
            cpu += 16 * opt_elems  # master, moments and the fp32 gradient partition, in pinned CPU memory
        else:
            optimizer += 12 * opt_elems
            # ZeRO-3 upcasts one sub-group at a time; ZeRO-0/1/2 upcast every group before the step, except where
            # the gradient was summed in fp32 at ZeRO-1/2: the step reads that sum in place
            if not (fp32_sum and zero_stage in (1, 2)):
                step_parts.append(4 * (min(shard, SUB_GROUP_SIZE) if zero_stage == 3 else opt_elems))
    if zero_stage == 3:
        step = max(step_parts, default=0)
    else:
        step = sum(step_parts)
    gathered = 4 * p.largest_module if zero_stage == 3 else 0
    return ModelStates(params=int(params), grads=int(grads), optimizer=int(optimizer), step_grads=int(step),
                       gathered=gathered, cpu=int(cpu))


def deepspeed_estimate(p: ParamSplit, zero_stage: int, nodes: int, gpus_per_node: int,
                       expert_parallel_size: int = 1, offload_optimizer: bool = False,
                       offload_param: bool = False) -> Optional[int]:
    """DeepSpeed's own GPU model-state estimate (ZeRO-2 and -3 only; None otherwise), per GPU in bytes.

    DeepSpeed's estimators know nothing of expert parallelism; with EP > 1 they are applied to the dense
    parameters over all ranks plus the local experts over the expert-data-parallel group.
    """
    if zero_stage not in (2, 3):
        return None
    logging.disable(logging.WARNING)  # importing deepspeed logs its accelerator choice; not the planner's news
    try:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    finally:
        logging.disable(logging.NOTSET)

    world, ep = nodes * gpus_per_node, expert_parallel_size
    groups: List[Tuple[int, int, int]] = [(p.dense, world, p.largest_module)]  # (params, GPUs, largest layer)
    if p.expert:
        groups = [(p.dense, world, p.largest_module), (p.expert // ep, world // ep, 0)]
    total = 0
    for count, gpus, largest in groups:
        if zero_stage == 2:
            _, gpu = estimate_zero2_model_states_mem_needs(count, num_gpus_per_node=gpus, num_nodes=1,
                                                           cpu_offload=offload_optimizer)
        else:
            _, gpu, _ = estimate_zero3_model_states_mem_needs(count, largest, num_gpus_per_node=gpus, num_nodes=1,
                                                              cpu_offload=offload_optimizer,
                                                              cpu_offload_params=offload_param)
        total += gpu
    return total


# --------------------------------------------------------------------------------------------------------
# Activations


def _rms_norm_bytes(width: int, rows: int, fused: bool) -> int:
    """Bytes an RMSNorm over `rows` vectors of `width` keeps per token (bf16 input).

    CUDA's fused kernel (`_fused_rms_norm`) keeps the bf16 input and an fp32 rstd per row; torch's composite
    path (the CPU) keeps an fp32 copy of the input, the fp32 normalised values and the rstd.
    """
    return (2 if fused else 8) * width * rows + 4 * rows


def block_activation_bytes_per_token(m: Qwen3Config, fused_rms_norm: bool = True) -> int:
    """Bytes one decoder block keeps per token for its backward pass, without checkpointing (see module doc)."""
    h, hd = m.hidden_size, m.head_dim
    H, KV = m.num_attention_heads, m.num_key_value_heads
    q, kv = H * hd, KV * hd
    norms = 2 * _rms_norm_bytes(h, 1, fused_rms_norm)  # input_layernorm + post_attention_layernorm
    qk_norm = _rms_norm_bytes(hd, H, fused_rms_norm) + _rms_norm_bytes(hd, KV, fused_rms_norm)
    attention = 2 * h + qk_norm + (4 * q + 4 * kv + 4 * H) + 2 * q  # proj input, QK-Norm, SDPA, o_proj input
    if m.is_moe:
        k, E, F = m.num_experts_per_tok, m.num_experts, m.moe_intermediate_size
        mlp = 4 * h + 8 * E + 4 + 24 * k + 2 * k + 4 * k * h + 8 * k * F
        if m.norm_topk_prob:
            mlp += 4 * k + 4  # fp32 top-k weights and their sum, kept by the renormalising division
    else:
        mlp = 2 * h + 8 * m.intermediate_size
    return norms + attention + mlp


def activation_memory(m: Qwen3Config, micro_batch_size: int, seq_len: int, checkpointing: bool,
                      fused_rms_norm: bool = True) -> Activations:
    """Activation bytes for one micro-batch of micro_batch_size x seq_len tokens (see module doc).

    fused_rms_norm: True for CUDA (what the planner plans for); False for torch's composite RMSNorm (CPU).
    """
    n = micro_batch_size * seq_len
    h, V, L = m.hidden_size, m.vocab_size, m.num_hidden_layers
    block = block_activation_bytes_per_token(m, fused_rms_norm) * n
    if m.is_moe:
        block += 4 * m.num_experts * h  # fp32 copy of the router weight
    kept_per_block = 2 * h * n if checkpointing else block
    loss_saved = 2 * h * n + 2 * V * h  # bf16 dL/dhidden and dL/dW_head, computed in the forward chunks
    final_norm = _rms_norm_bytes(h, 1, fused_rms_norm) * n
    outside = final_norm + 8 * n + 2 * seq_len * m.head_dim + loss_saved  # final norm, ids, RoPE tables, loss
    saved = L * kept_per_block + outside
    chunk = min(m.loss_chunk_size, n)
    loss_forward = 4 * V * h + 6 * chunk * V + 4 * n  # fp32 dW accumulator, a chunk of logits, token losses
    block_backward = 2 * h * n + 2 * V * h + block * (2 if checkpointing else 1)
    return Activations(saved=saved, temporaries=max(loss_forward, block_backward))


# --------------------------------------------------------------------------------------------------------
# The plan


def _positive(key: str, value: Any, integer: bool = False) -> None:
    if integer and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"config key '{key}' = {value!r}: must be a positive integer")
    if not 0 < value < math.inf:
        raise ConfigError(f"config key '{key}' = {value!r}: must be a positive finite number")


def check_launch(cfg: TrainConfig) -> None:
    """Refuse cluster values that describe no machine, naming the key."""
    lc = cfg.launch
    _positive("launch.nodes", lc.nodes, integer=True)
    _positive("launch.gpus_per_node", lc.gpus_per_node, integer=True)
    _positive("launch.gpu_memory_gb", lc.gpu_memory_gb)
    _positive("launch.peak_tflops", lc.peak_tflops)
    _positive("launch.cpu_memory_gb", lc.cpu_memory_gb)
    if not 0 < lc.mfu <= 1:
        raise ConfigError(f"config key 'launch.mfu' = {lc.mfu!r}: must lie in (0, 1]")
    if cfg.deepspeed.precision == "fp32":
        raise ConfigError("config key 'deepspeed.precision' = 'fp32': the planner models bf16 mixed precision "
                          "(what precision=auto runs on a GPU); fp32 is the CPU path")


def _check_data_fits(cfg: TrainConfig, stage_plans: List[StagePlan]) -> None:
    """Where the data set is prepared already (a shared data root), refuse a stage it cannot fill, as train would
    before building the model (`data.loader.check_stage_fits`, from the manifest's totals); unprepared: nothing said."""
    from data.errors import DataError
    from data.prepare import manifest_path
    from data.shards import read_manifest

    path = manifest_path(cfg.data)
    if not path.exists():
        return
    try:
        check_data_fits(cfg, stage_plans, read_manifest(path), path)
    except DataError as e:
        raise ConfigError(f"config key 'data' = {cfg.data.name!r}: {e}") from None


def _check_batches(cfg: TrainConfig, world: int) -> None:
    """Name the smallest global batch a stage can take on this many ranks (train's check only says 'divisible')."""
    for name in cfg.curriculum.order:
        st = cfg.curriculum.stages.get(name)
        if st is None or st.seq_len <= 0 or st.micro_batch_size <= 0 or st.global_batch_tokens % st.seq_len:
            continue  # validate() names these
        smallest = st.seq_len * st.micro_batch_size * world
        if (st.global_batch_tokens // st.seq_len) % (st.micro_batch_size * world):
            raise ConfigError(
                f"config key 'curriculum.stages.{name}.global_batch_tokens' = {st.global_batch_tokens}: one pass "
                f"over {world} ranks takes seq_len x micro_batch_size x ranks = {st.seq_len} x "
                f"{st.micro_batch_size} x {world} = {smallest:,} tokens; use a multiple of {smallest} "
                f"(e.g. curriculum.stages.{name}.global_batch_tokens="
                f"{-(-st.global_batch_tokens // smallest) * smallest}) or fewer ranks")


def plan(cfg: TrainConfig | DictConfig, suggest: bool = True) -> Plan:
    """Plan memory per GPU and time per stage for the cluster in cfg.launch; raises ConfigError on bad input."""
    cfg = to_train_config(cfg)
    check_launch(cfg)
    lc, ds, m = cfg.launch, cfg.deepspeed, cfg.model
    world = lc.nodes * lc.gpus_per_node
    try:
        stage_plans = validate(cfg, world)  # the same checks (EP, batch divisibility, budgets) train runs
    except ConfigError as e:
        if "global_batch_tokens" in str(e):
            _check_batches(cfg, world)  # the same problem, said with the smallest batch that works
        raise
    _check_data_fits(cfg, stage_plans)
    ep = cfg.expert_parallel_size
    params = split_parameters(m, ep)
    accum = grad_accum_dtype(ds, bf16=True)  # the planner plans bf16 training on GPUs
    states = model_states(params, ds.zero_stage, world, ep, ds.offload_optimizer, ds.offload_param, accum)
    buckets = 2 * 2 * ds.reduce_bucket_size + (2 * ds.stage3_prefetch_bucket_size if ds.zero_stage == 3 else 0)
    buffers = buckets + RESERVE_BYTES
    gpu_memory = int(lc.gpu_memory_gb * GIB)
    persistent = states.params + states.grads + states.optimizer
    stages = []
    for sp in stage_plans:
        act = activation_memory(m, sp.micro_batch_size, sp.seq_len, m.activation_checkpointing)
        peak = persistent + buffers + max(states.step_grads, states.gathered + act.saved + act.temporaries)
        tokens_per_step = sp.samples_per_step * sp.seq_len
        fpt = flops_per_token(m, sp.seq_len, causal_halved=True)
        seconds = sp.steps * tokens_per_step * fpt / (world * lc.peak_tflops * 1e12 * lc.mfu)
        stages.append(StageFit(name=sp.name, seq_len=sp.seq_len, micro_batch_size=sp.micro_batch_size,
                               grad_accum=sp.grad_accum, steps=sp.steps, tokens_per_step=tokens_per_step,
                               activations=act, peak=peak, fits=peak <= gpu_memory, flops_per_token=fpt,
                               seconds=seconds))
    result = Plan(model=m.name, nodes=lc.nodes, gpus_per_node=lc.gpus_per_node, expert_parallel_size=ep,
                  zero_stage=ds.zero_stage, offload_optimizer=ds.offload_optimizer, offload_param=ds.offload_param,
                  grad_accum=accum, activation_checkpointing=m.activation_checkpointing, gpu_memory=gpu_memory,
                  cpu_memory_per_node=int(lc.cpu_memory_gb * GIB), peak_tflops=lc.peak_tflops, mfu=lc.mfu,
                  params=params, states=states, buffers=buffers,
                  deepspeed_estimate=deepspeed_estimate(params, ds.zero_stage, lc.nodes, lc.gpus_per_node, ep,
                                                        ds.offload_optimizer, ds.offload_param),
                  stages=stages)
    if suggest and not result.fits:
        result.suggestions, result.suggestions_combined = suggestions(cfg, result)
    return result


# --------------------------------------------------------------------------------------------------------
# What to change when it does not fit

Change = Tuple[str, Callable[[TrainConfig], None]]


def _try(cfg: TrainConfig, changes: List[Change]) -> Optional[Plan]:
    """The plan with the changes applied, or None when the changed config is invalid."""
    trial = copy.deepcopy(cfg)
    for _, apply in changes:
        apply(trial)
    try:
        return plan(trial, suggest=False)
    except ConfigError:
        return None


def _set(path: str, value: Any) -> Callable[[TrainConfig], None]:
    def apply(c: TrainConfig) -> None:
        *parents, leaf = path.split(".")
        node: Any = c
        for part in parents:
            node = node[part] if isinstance(node, dict) else getattr(node, part)
        if isinstance(node, dict):
            node[leaf] = value
        else:
            setattr(node, leaf, value)
    return apply


def _candidates(cfg: TrainConfig, current: Plan) -> List[Change]:
    """Single changes that lower memory, least disruptive first."""
    out: List[Change] = []
    if not cfg.model.activation_checkpointing:
        out.append(("model.activation_checkpointing=true", _set("model.activation_checkpointing", True)))
    for st in current.stages:
        if not st.fits and st.micro_batch_size > 1:
            for mb in range(st.micro_batch_size - 1, 0, -1):
                if st.micro_batch_size % mb == 0:  # keeps the global batch divisible
                    key = f"curriculum.stages.{st.name}.micro_batch_size"
                    out.append((f"{key}={mb}", _set(key, mb)))
    for z in range(cfg.deepspeed.zero_stage + 1, 4):
        out.append((f"deepspeed.zero_stage={z}", _set("deepspeed.zero_stage", z)))
    m = cfg.model
    if m.is_moe:
        world = cfg.launch.nodes * cfg.launch.gpus_per_node
        for e in range(cfg.expert_parallel_size + 1, m.num_experts + 1):
            if m.num_experts % e == 0 and world % e == 0:
                out.append((f"expert_parallel_size={e}", _set("expert_parallel_size", e)))
    # Offload needs ZeRO >= 1 (parameters: ZeRO-3); alone it may be invalid, after a ZeRO change it is not.
    if not cfg.deepspeed.offload_optimizer:
        out.append(("deepspeed.offload_optimizer=true", _set("deepspeed.offload_optimizer", True)))
    if not cfg.deepspeed.offload_param:
        out.append(("deepspeed.offload_param=true", _set("deepspeed.offload_param", True)))
    nodes = cfg.launch.nodes
    while nodes < 4096:
        nodes *= 2
        out.append((f"launch.nodes={nodes}", _set("launch.nodes", nodes)))
    return out


def _excess(p: Plan) -> int:
    """Bytes over the GPU (and CPU) budget, summed over stages: 0 when the plan fits."""
    over = sum(max(0, s.peak - p.gpu_memory) for s in p.stages)
    return over + max(0, p.cpu_needed_per_node - p.cpu_memory_per_node)


def suggestions(cfg: TrainConfig, current: Plan, limit: int = 4) -> Tuple[List[str], bool]:
    """Overrides that make the plan fit, and whether they are needed together (no single one is enough)."""
    found: List[str] = []
    candidates = _candidates(cfg, current)
    for label, apply in candidates:
        if any(f.startswith(label.split("=")[0] + "=") for f in found):
            continue  # the smallest change of each key is enough
        trial = _try(cfg, [(label, apply)])
        if trial is not None and trial.fits:
            found.append(f"{label}  (peak {_gib(max(s.peak for s in trial.stages))} GiB)")
            if len(found) >= limit:
                break
    if found:
        return found, False
    together = _together(cfg, current)
    if together:
        return together, True
    # nor at this size: the fewest nodes (doubling) at which the strongest changes together fit
    nodes = cfg.launch.nodes
    while nodes < 4096:
        nodes *= 2
        wider_cfg = copy.deepcopy(cfg)
        wider_cfg.launch.nodes = nodes
        wider = _try(wider_cfg, [])
        together = _together(wider_cfg, wider) if wider is not None else []
        if together:
            return [f"launch.nodes={nodes}", *together], True
    return [], False


def _together(cfg: TrainConfig, current: Plan) -> List[str]:
    """No single change being enough: the changes taken in order while each lowers the excess, until the plan
    fits (for keys with several candidate values, micro-batch and EP, the last is the strongest); [] if it never
    does. Then each change the others make unneeded goes (the last taken first), and each key left takes its
    mildest value that still fits: a micro-batch of 1 costs throughput the time estimate (at a fixed MFU) does not
    show. The node count stays."""
    options: Dict[str, List[Change]] = {}  # each key's candidate values, mildest first
    for label, apply in _candidates(cfg, current):
        if not label.startswith("launch.nodes="):
            options.setdefault(label.split("=")[0], []).append((label, apply))
    chosen: List[Change] = []
    best = _excess(current)

    def fits(changes: List[Change]) -> bool:
        trial = _try(cfg, changes)
        return trial is not None and trial.fits

    for values in options.values():
        trial = _try(cfg, chosen + [values[-1]])
        if trial is not None and _excess(trial) < best:
            chosen, best = chosen + [values[-1]], _excess(trial)
            if trial.fits:
                break
    else:
        return []
    for change in reversed(list(chosen)):
        if fits([c for c in chosen if c is not change]):
            chosen = [c for c in chosen if c is not change]
    for i, (label, _) in enumerate(chosen):
        milder = next((v for v in options[label.split("=")[0]] if v[0] != label
                       and fits(chosen[:i] + [v] + chosen[i + 1:])), None)
        chosen[i] = milder or chosen[i]
    return [label for label, _ in chosen]


# --------------------------------------------------------------------------------------------------------
# Output


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def _duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:,.1f} d"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def format_plan(p: Plan) -> str:
    """The plan as the text `python -m launch.plan` prints."""
    offload = [name for name, on in (("optimizer", p.offload_optimizer), ("parameters", p.offload_param)) if on]
    lines = [
        f"{p.model} on {p.nodes} node(s) x {p.gpus_per_node} GPU(s) = {p.world} GPUs with "
        f"{p.gpu_memory / GIB:g} GiB each; ZeRO-{p.zero_stage}"
        + (f", offload: {' + '.join(offload)}" if offload else "")
        + (f", expert parallel {p.expert_parallel_size}" if p.expert_parallel_size > 1 else "")
        + f", activation checkpointing {'on' if p.activation_checkpointing else 'off'}; bf16 + AdamW",
        f"parameters: {_count(p.params.total)} total"
        + (f" ({_count(p.params.expert)} in routed experts)" if p.params.expert else "")
        + f", {_count(p.params.active)} active per token; largest module "
        f"{p.params.largest_module_name} {_count(p.params.largest_module)}",
        "",
        "model states per GPU                          GiB",
        f"  parameters (bf16)                      {_gib(p.states.params):>9}",
        f"  gradients ({p.grad_accum:<4} sum)                   {_gib(p.states.grads):>9}",
        f"  optimizer (fp32 master + Adam m, v)    {_gib(p.states.optimizer):>9}",
        f"  fp32 gradient copy (optimizer step)    {_gib(p.states.step_grads):>9}",
        f"  ZeRO-3 gathered module (params+grads)  {_gib(p.states.gathered):>9}",
        f"  total                                  {_gib(p.states.total):>9}",
    ]
    if p.deepspeed_estimate is not None:
        fn = "estimate_zero3_model_states_mem_needs" if p.zero_stage == 3 else "estimate_zero2_model_states_mem_needs"
        lines.append(f"  DeepSpeed {fn}: {_gib(p.deepspeed_estimate)} GiB")
    lines.append(f"  buckets + CUDA/NCCL reserve            {_gib(p.buffers):>9}")
    if p.states.cpu:
        verdict = "fits" if p.cpu_fits else "DOES NOT FIT"
        lines.append(f"CPU memory for offloaded state: {_gib(p.cpu_needed_per_node)} GiB per node of "
                     f"{p.cpu_memory_per_node / GIB:g} GiB: {verdict} (launch.cpu_memory_gb)")
    lines += [
        "",
        f"{'stage':<14}{'seq_len':>8}{'micro':>6}{'accum':>6}{'activ.':>8}{'temp.':>7}{'peak':>8}  {'fits':<5}"
        f"{'tokens/step':>12}{'steps':>11}{'time':>11}",
    ]
    for s in p.stages:
        lines.append(f"{s.name:<14}{s.seq_len:>8}{s.micro_batch_size:>6}{s.grad_accum:>6}"
                     f"{s.activations.saved / GIB:>8.1f}{s.activations.temporaries / GIB:>7.1f}{s.peak / GIB:>8.1f}  "
                     f"{'yes' if s.fits else 'NO':<5}{s.tokens_per_step:>12,}{s.steps:>11,}{_duration(s.seconds):>11}")
    total = sum(s.seconds for s in p.stages)
    lines.append(f"(GiB per GPU; time at {p.mfu:.0%} MFU of {p.peak_tflops:g} TFLOP/s per GPU; "
                 f"all stages {_duration(total)})")
    if p.fits:
        lines.append("fits.")
    else:
        bad = [s.name for s in p.stages if not s.fits]
        what = f"stage(s) {', '.join(bad)} need more than launch.gpu_memory_gb={p.gpu_memory / GIB:g} GiB" if bad \
            else "the offloaded state needs more than launch.cpu_memory_gb"
        lines.append(f"does not fit: {what}.")
        if p.suggestions_combined:
            lines.append("no single change is enough; these overrides together would fit:")
            lines.append("  " + " ".join(p.suggestions))
        elif p.suggestions:
            lines.append("any one of these overrides would fit:")
            lines += [f"  {s}" for s in p.suggestions]
        else:
            lines.append("the planner's search (one change at a time, then its strongest changes together, at this "
                         "node count and at each doubling of it up to 4096 nodes) found no fitting overrides; try "
                         "GPUs with more memory (or launch.cpu_memory_gb if only the CPU side overflows), or a "
                         "smaller model.")
    return "\n".join(lines)


def main() -> None:
    """Hydra entry point: print the plan; exit 0 if everything fits, 1 if not, 2 on a config error."""
    import hydra

    from train.config import register_configs

    register_configs()

    @hydra.main(config_path="../conf", config_name="config", version_base="1.3")
    def _app(dcfg: DictConfig) -> None:
        started.append(True)
        try:
            cfg = OmegaConf.to_object(dcfg)
            check_known_keys(OmegaConf.to_container(dcfg, resolve=True), cfg)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
        except Exception as e:  # an interpolation or type error found at resolution time
            print(f"error: config: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
        try:
            result = plan(cfg)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
        print(format_plan(result), flush=True)
        sys.exit(0 if result.fits else 1)

    # The plan needs no secret, and Hydra would quote one in an error (into a SLURM job's log): dropped unread
    from train.__main__ import take_secrets

    try:
        sys.argv = take_secrets(sys.argv)[0]
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    # Planning writes nothing: keep Hydra from creating the run directory (config.yaml sets it to run_dir).
    if not any(a.startswith("hydra.run.dir=") for a in sys.argv[1:]):
        sys.argv.append("hydra.run.dir=.")
    started: list = []
    try:
        _app()
    except SystemExit as e:
        if not started and e.code == 1:  # Hydra could not compose an override: a config error, not "does not fit"
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
