"""`python -m train.bench`: tristage against HF transformers and HF + Liger, on the same shapes, in one process.

    python -m train.bench                          # GPU: every case, pure bf16 and DeepSpeed ZeRO-1 bf16
    python -m train.bench --device cpu --tiny      # CPU check of the whole path (tiny shapes, peers skipped with a note)
    python -m train.bench --ablate                 # GPU: each optimisation measured on its own (PERF_NOTES.md)
    python -m train.bench --report bench.json --train-metrics runs/gpu_speed/metrics.jsonl   # add the real path

Every run builds its model with random weights and times warmup + timed optimizer steps (forward, backward,
gradient clipping at 1.0, AdamW) on random tokens, with CUDA events around each step and
`torch.cuda.max_memory_allocated` for the peak. Regimes:

- `bf16`: pure bf16 parameters and torch AdamW (fused on CUDA), as a user of HF transformers would run;
- `ds`: DeepSpeed ZeRO-1 bf16 (bf16 model, fp32 master weights and moments) through `train.engine.Engine`, the
  engine `python -m train` uses, for tristage and the peers alike;
- `torch_master`: the same precision as `ds` in plain PyTorch (bf16 model, fp32 master copies, fused AdamW on them):
  the reference for DeepSpeed's own overhead. (bf16 autocast over fp32 weights, `autocast`, is a different regime:
  the weights are cast on every forward; it is available but not the reference.)

Implementations: `tristage` (models/, with `model.compile` and the attention backend chosen below), `hf`
(`transformers.Qwen3ForCausalLM` / `Qwen3MoeForCausalLM`, SDPA attention, grouped-GEMM experts on CUDA) and
`liger` (the same after `liger_kernel.transformers.apply_liger_kernel_to_qwen3(_moe)`: fused linear
cross-entropy, RMSNorm, SwiGLU, RoPE; skipped with a note where it cannot be imported or on the CPU).

MFU = tokens/s x flops_per_token / peak (989 TFLOP/s bf16 on an H100/H200), with the attention term counted over
the full T x T scores (`mfu`, as shared/gpu/README.md's reference figures) and over the causal half
(`mfu_causal`). Ratios compare tristage with each peer in the same regime, at the same micro-batch and at each
implementation's best micro-batch. The table is printed last; `--json` writes every number.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from data.io import atomic_path
from models.config import Qwen3Config
from models.params import flops_per_token
from models.presets import load_preset
from train.metrics import device_peak_flops

REPO = Path(__file__).resolve().parents[1]
IMPLS = ("tristage", "hf", "liger")
REGIMES = ("bf16", "ds", "torch_master", "autocast")


@dataclass
class Case:
    """One benchmark shape: a model preset (optionally changed: fewer layers, a smaller vocabulary), a length and
    micro-batches to try."""

    preset: str
    seq_len: int
    micro_batches: Tuple[int, ...]
    shape: Dict[str, Any] = field(default_factory=dict)  # preset fields changed for this case
    warmup: int = 2  # the first step compiles; the second runs warm
    steps: int = 5
    note: str = ""
    known_oom: Dict[str, str] = field(default_factory=dict)  # impl:micro_batch -> why it is listed, not run

    def config(self, **overrides: Any) -> Qwen3Config:
        """The model config of this case, with overrides (compile, attention_backend, ...)."""
        cfg = load_preset(self.preset)
        return dataclasses.replace(cfg, **{**self.shape, **overrides}).validate()


# plain HF rows that ran out of memory on the H200 in shared/gpu/README.md's reference figures (pure bf16; the ds
# regime adds fp32 master weights): listed with this note instead of spending the bench's minutes on an OOM
KNOWN_OOM = "known out of memory on a 141 GB H200 (shared/gpu/README.md: {}), not run"
CASES: Dict[str, Case] = {
    # 2 warmup steps (the first compiles) and 3 timed: run-to-run spread on a GPU is ~1%, and the whole table has
    # to fit in the issue's 5 minutes with compilation included
    "0.6b_4k": Case("qwen3_0_6b", 4096, (4, 8), steps=3,
                    known_oom={"hf:8": KNOWN_OOM.format("fp32 logits, 18.5 GiB per copy")}),
    "1.7b_4k": Case("qwen3_1_7b", 4096, (4,), steps=3),
    "moe_8l_4k": Case("qwen3_30b_a3b", 4096, (4,), shape={"num_hidden_layers": 8}, steps=3,
                      note="Qwen3-30B-A3B shape, 8 layers"),
    "0.6b_32k": Case("qwen3_0_6b", 32768, (1,), steps=3, known_oom={"hf:1": KNOWN_OOM.format("the logits")}),
}
# the fixture tokenizer's 1,024 ids, not the presets' 8,192 rows: on a CPU the LM head and loss were most of the
# tiny bench's time (a bf16 matmul there runs 10-60x slower than fp32), and a plumbing check needs no wide head
TINY_CASES: Dict[str, Case] = {
    "tiny_dense": Case("tiny_dense", 128, (2, 4), shape={"vocab_size": 1024}, warmup=1, steps=3),
    "tiny_moe": Case("tiny_moe", 128, (2,), shape={"vocab_size": 1024}, warmup=1, steps=3),
}


@dataclass
class Run:
    """One timed configuration."""

    case: str
    impl: str
    regime: str
    micro_batch: int
    variant: str = "default"  # ablation name; "default" rows form the comparison table
    model: Dict[str, Any] = field(default_factory=dict)  # tristage model-config overrides
    fused_adamw: Optional[bool] = None  # None: fused on CUDA
    compile_loss: Optional[bool] = None  # None: as model.compile
    sync_each_step: bool = False  # read the loss on the host after every step (the old loop's habit)
    skip: str = ""  # a reason not to run it: its row says so and costs no time


# ------------------------------------------------------------------------------------------------ models


def _hf_config(cfg: Qwen3Config):
    """transformers config of the same shape (training: no KV cache; MoE: router logits for the balance loss)."""
    import transformers

    from models.hf import hf_config_dict

    d = hf_config_dict(cfg)
    d.pop("architectures")
    d.pop("model_type")
    d["use_cache"] = False
    if cfg.is_moe:
        d["output_router_logits"] = True  # the balance loss, as tristage computes it
        return transformers.Qwen3MoeConfig(**d)
    return transformers.Qwen3Config(**d)


class _LigerPatch:
    """Apply Liger's patches to transformers' Qwen3 modules for one run (build and steps), then undo them.

    `apply_liger_kernel_to_qwen3` replaces module globals (RMSNorm, MLP, RoPE) and `ForCausalLM.forward`, which
    are looked up at call time: they must stay while the Liger model runs, and go before the next `hf` run.
    """

    def __init__(self, moe: bool):
        import importlib

        name = "qwen3_moe" if moe else "qwen3"
        self.module = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
        self.cls = self.module.Qwen3MoeForCausalLM if moe else self.module.Qwen3ForCausalLM
        self.moe = moe

    def __enter__(self) -> "_LigerPatch":
        self.saved = dict(vars(self.module))
        self.forward = self.cls.forward
        from liger_kernel.transformers import apply_liger_kernel_to_qwen3, apply_liger_kernel_to_qwen3_moe

        (apply_liger_kernel_to_qwen3_moe if self.moe else apply_liger_kernel_to_qwen3)()
        return self

    def __exit__(self, *exc: Any) -> None:
        for key in list(vars(self.module)):
            if key not in self.saved:
                delattr(self.module, key)
        for key, value in self.saved.items():
            setattr(self.module, key, value)
        self.cls.forward = self.forward


def liger_unavailable(device: torch.device) -> Optional[str]:
    """Why Liger cannot run here (None when it can)."""
    if device.type != "cuda":
        return "skipped: Liger's kernels are Triton (CUDA only)"
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means the peer is absent
        return f"skipped: liger_kernel not importable ({type(e).__name__}: {e})"
    return None


def hf_unavailable() -> Optional[str]:
    """Why HF transformers cannot run here (None when it can)."""
    try:
        import transformers  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"skipped: transformers not importable ({type(e).__name__}: {e})"
    return None


def build_model(run: Run, cfg: Qwen3Config, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The run's model on `device` in `dtype`, random weights (seeded)."""
    torch.manual_seed(0)
    if run.impl == "tristage":
        from models.qwen3 import Qwen3ForCausalLM

        with torch.device("meta"):
            model = Qwen3ForCausalLM(cfg).to(dtype)  # built in dtype as training builds it (train/loop.py)
        model.to_empty(device=device)
        model.init_weights(seed=0)
        if run.compile_loss is not None:
            model.lm_head.compiled = run.compile_loss
        return model.train()

    import transformers

    hf_cfg = _hf_config(cfg)
    cls = transformers.Qwen3MoeForCausalLM if cfg.is_moe else transformers.Qwen3ForCausalLM
    kwargs: Dict[str, Any] = {"attn_implementation": "sdpa", "dtype": dtype}
    if cfg.is_moe:
        # grouped GEMM where it runs (CUDA); its CPU backward fails on torch 2.13 (shared/gpu/README.md)
        kwargs["experts_implementation"] = "grouped_mm" if device.type == "cuda" else "eager"
    with torch.device(device):  # a `liger` run is inside _LigerPatch (run_one)
        model = cls._from_config(hf_cfg, **kwargs)
    return model.to(device=device, dtype=dtype).train()


def make_batch(run: Run, cfg: Qwen3Config, seq_len: int, device: torch.device) -> Dict[str, Any]:
    """Random tokens; tristage takes labels already shifted, transformers shifts its own."""
    gen = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (run.micro_batch, seq_len + 1), generator=gen)
    if run.impl == "tristage":
        return {"input_ids": ids[:, :-1].to(device), "labels": ids[:, 1:].to(device), "return_token_losses": True}
    x = ids[:, :-1].to(device)
    return {"input_ids": x, "labels": x}


# ------------------------------------------------------------------------------------------------ steps


def _adamw(groups: List[dict], fused: bool) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, fused=fused, foreach=None if fused else True)


class Stepper:
    """One optimizer step per call for a run's regime; `close()` frees what it holds."""

    def __init__(self, run: Run, model: torch.nn.Module, cfg: Qwen3Config, batch: Dict[str, Any],
                 device: torch.device):
        self.run, self.model, self.batch, self.device = run, model, batch, device
        fused = device.type == "cuda" if run.fused_adamw is None else run.fused_adamw
        self.engine = None
        self.master: List[torch.Tensor] = []
        from train.engine import decay_groups  # the training path's groups

        self.params = [p for p in model.parameters() if p.requires_grad]
        if run.regime == "ds":
            self.engine = _deepspeed_engine(model, cfg, run, device, fused)
        elif run.regime == "torch_master":
            # fp32 master copies of the bf16 weights; the optimizer updates them, the model gets a bf16 copy
            self.master = [p.detach().float().requires_grad_(True) for p in self.params]
            self.opt = _adamw(decay_groups(self.master, 0.1), fused)
        else:
            self.opt = _adamw(decay_groups(self.params, 0.1), fused)

    def __call__(self) -> None:
        run = self.run
        if self.engine is not None:
            self.engine.micro_step(self.batch, last=True)
            self.engine.optimizer_step()
            return
        if run.regime == "autocast":
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                loss = self.model(**self.batch).loss
        else:
            loss = self.model(**self.batch).loss
        loss.backward()
        if self.master:
            for m, p in zip(self.master, self.params):
                m.grad = p.grad.float()
                p.grad = None
            torch.nn.utils.clip_grad_norm_(self.master, 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                torch._foreach_copy_(self.params, self.master)
        else:
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        if run.sync_each_step:
            loss.item()

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
        self.engine = self.opt = self.model = self.batch = None  # type: ignore[assignment]
        self.master, self.params = [], []


def _deepspeed_engine(model: torch.nn.Module, cfg: Qwen3Config, run: Run, device: torch.device, fused: bool):
    """train.engine.Engine (DeepSpeed ZeRO-1 bf16, torch AdamW as client optimizer) around any model."""
    from train.config import StagePlan, TrainConfig
    from train.dist import init_distributed
    from train.engine import Engine

    tcfg = TrainConfig(model=cfg)
    tcfg.device = device.type
    tcfg.deepspeed.zero_stage = 1
    tcfg.deepspeed.precision = "bf16"
    tcfg.optim.fused = "true" if fused else "false"
    tcfg.threads = torch.get_num_threads()  # the bench's choice (`--threads`), which init_distributed would reset
    info = init_distributed(tcfg)
    plan = StagePlan("bench", 1, run.micro_batch, 1, run.micro_batch, 0)
    engine = Engine(model, tcfg, plan, info)
    engine.set_lr(1e-4)
    return engine


def time_steps(step: Callable[[], None], warmup: int, steps: int, device: torch.device) -> List[float]:
    """Seconds per timed step (CUDA events on the GPU; the host clock on the CPU, where work is synchronous)."""
    for _ in range(warmup):
        step()
    if device.type != "cuda":
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        return times
    torch.cuda.synchronize(device)
    events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    events[0].record()
    for i in range(steps):
        step()
        events[i + 1].record()
    torch.cuda.synchronize(device)
    return [events[i].elapsed_time(events[i + 1]) / 1e3 for i in range(steps)]


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _measure(run: Run, case: Case, cfg: Qwen3Config, device: torch.device, dtype: torch.dtype, warmup: int,
             steps: int) -> List[float]:
    """Build the run's model, batch and optimizer, time its steps; everything it allocated dies with this frame."""
    model = build_model(run, cfg, device, dtype)
    batch = make_batch(run, cfg, case.seq_len, device)
    stepper = Stepper(run, model, cfg, batch, device)
    del model, batch
    try:
        return time_steps(stepper, warmup, steps, device)
    finally:
        stepper.close()


def run_one(run: Run, case: Case, device: torch.device, warmup: int, steps: int) -> Dict[str, Any]:
    """Build, time and free one run; returns its row (status 'ok', 'oom', 'error: ...' or 'skipped: ...')."""
    cfg = case.config(**run.model)
    row: Dict[str, Any] = {"case": run.case, "impl": run.impl, "regime": run.regime, "variant": run.variant,
                           "micro_batch": run.micro_batch, "seq_len": case.seq_len,
                           "tokens_per_step": run.micro_batch * case.seq_len,
                           "compile": cfg.compile if run.impl == "tristage" else None,
                           "attention_backend": cfg.attention_backend if run.impl == "tristage" else None}
    skip = (f"skipped: {run.skip}" if run.skip else None) or (
        hf_unavailable() if run.impl in ("hf", "liger") else None) or (
        liger_unavailable(device) if run.impl == "liger" else None)
    if skip:
        return {**row, "status": skip}
    pure = run.regime in ("bf16", "torch_master")
    dtype = torch.bfloat16 if pure else torch.float32  # ds: DeepSpeed casts to bf16 and keeps fp32 masters
    t_start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with _LigerPatch(cfg.is_moe) if run.impl == "liger" else contextlib.nullcontext():
            times = _measure(run, case, cfg, device, dtype, warmup, steps)
    except torch.OutOfMemoryError:
        row["status"] = "oom"
    except Exception as e:  # noqa: BLE001 - one failing run must not cost the others
        row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        row["traceback"] = traceback.format_exc(limit=8)
    else:
        row["status"] = "ok"
        med = statistics.median(times)
        row.update(step_s=med, step_s_min=min(times), step_s_max=max(times), steps=len(times),
                   tokens_per_s=row["tokens_per_step"] / med)
        peak = device_peak_flops(device)
        if peak:
            row["mfu"] = row["tokens_per_s"] * flops_per_token(cfg, case.seq_len, causal_halved=False) / peak
            row["mfu_causal"] = row["tokens_per_s"] * flops_per_token(cfg, case.seq_len, causal_halved=True) / peak
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    _free(device)  # the failed run's tensors died with its frame when the except clause ended
    row["wall_s"] = time.perf_counter() - t_start
    return row


# ------------------------------------------------------------------------------------------------ probes


def probe_attention(case: Case, device: torch.device, backends: Sequence[str], reps: int = 5) -> Dict[str, Any]:
    """Forward + backward of one layer's causal GQA attention at the case's shape under each backend (ms)."""
    from models.qwen3 import sdpa_priority
    from torch.nn.attention import sdpa_kernel

    cfg = case.config()
    b, t = case.micro_batches[0], case.seq_len
    gen = torch.Generator(device=device).manual_seed(0)
    shape_q = (b, cfg.num_attention_heads, t, cfg.head_dim)
    shape_kv = (b, cfg.num_key_value_heads, t, cfg.head_dim)
    q = torch.randn(shape_q, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_()
    k = torch.randn(shape_kv, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_()
    v = torch.randn(shape_kv, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_()
    out: Dict[str, Any] = {}
    ref = None
    for name in backends:
        only = sdpa_priority(name)[:1]  # this kernel alone: an unsupported case raises instead of falling back
        rep = cfg.num_attention_heads // cfg.num_key_value_heads

        def fwd_bwd() -> torch.Tensor:
            kk, vv, gqa = k, v, rep > 1
            if name == "cudnn_mha" and gqa:
                kk, vv, gqa = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), False
            with sdpa_kernel(only):
                y = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)
            y.backward(torch.ones_like(y))
            return y.detach()

        try:
            y = fwd_bwd()
            times = time_steps(fwd_bwd, 1, reps, device)
            err = None
            if ref is None:
                ref = y.float()
            else:
                err = ((y.float() - ref).norm() / ref.norm()).item()
            out[name] = {"ms": 1e3 * statistics.median(times), "rel_err_vs_first": err}
        except Exception as e:  # noqa: BLE001 - "no kernel for this case" is an answer
            out[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"}
        q.grad = k.grad = v.grad = None
    del q, k, v, ref
    _free(device)
    return out


def best_attention(probe: Dict[str, Any]) -> str:
    """The fastest backend of a probe that ran; 'auto' when none did."""
    ok = {name: r["ms"] for name, r in probe.items() if "ms" in r and (r.get("rel_err_vs_first") or 0) < 2e-2}
    return min(ok, key=ok.get) if ok else "auto"


# ------------------------------------------------------------------------------------------------ plans


def default_runs(cases: Dict[str, Case], impls: Sequence[str], regimes: Sequence[str], compile_: bool,
                 attention: Dict[str, str]) -> List[Run]:
    """The comparison table: every case x micro-batch x regime x implementation, in the order a time limit should
    cut it: every case's pure bf16 rows first, then the DeepSpeed and fp32-master rows, the known OOMs last.

    Within a case and micro-batch: tristage, HF + Liger, HF. `torch_master` (the reference for DeepSpeed's
    overhead) runs for tristage on the first case only, right after its `ds` row.
    """
    order = [i for i in ("tristage", "liger", "hf") if i in impls]
    runs: List[Run] = []
    for regime_set in ([r for r in regimes if r == "bf16"], [r for r in regimes if r != "bf16"]):
        for c, (name, case) in enumerate(cases.items()):
            ours = {"compile": compile_, "attention_backend": attention.get(name, "auto")}
            for mb in case.micro_batches:
                for impl in order:
                    for regime in regime_set:
                        if regime == "torch_master" and (impl != "tristage" or c > 0):
                            continue
                        runs.append(Run(name, impl, regime, mb, model=ours if impl == "tristage" else {},
                                        skip=case.known_oom.get(f"{impl}:{mb}", "")))
    return [r for r in runs if not r.skip] + [r for r in runs if r.skip]


def ablation_runs(cases: Dict[str, Case], compile_: bool, attention: Dict[str, str]) -> List[Run]:
    """Each means of PERF_NOTES.md on its own: tristage, pure bf16, first micro-batch, against the eager model
    with the probe's attention kernel (so the compiled variants reuse the table's compiled graphs).

    Each variant changes one thing; without compilation (the CPU default) the compiled variants are left out.
    """
    runs: List[Run] = []
    dense = next((n for n, c in cases.items() if not load_preset(c.preset).num_experts), None)
    moe = next((n for n, c in cases.items() if load_preset(c.preset).num_experts), None)
    if dense:
        mb = cases[dense].micro_batches[0]
        attn = attention.get(dense, "auto")
        eager = {"compile": False, "attention_backend": attn}
        runs.append(Run(dense, "tristage", "bf16", mb, "eager", eager))
        if compile_:
            runs += [Run(dense, "tristage", "bf16", mb, "compile_blocks", {**eager, "compile": True}, compile_loss=False),
                     Run(dense, "tristage", "bf16", mb, "compile_blocks+loss", {**eager, "compile": True})]
        runs += [Run(dense, "tristage", "bf16", mb, f"eager_attn_{name}", {**eager, "attention_backend": name})
                 for name in ("auto", "flash", "cudnn", "cudnn_mha") if name != attn]
        runs += [
            Run(dense, "tristage", "bf16", mb, "eager_act_ckpt", {**eager, "activation_checkpointing": True}),
            Run(dense, "tristage", "bf16", mb, "eager_foreach_adamw", eager, fused_adamw=False),
            Run(dense, "tristage", "bf16", mb, "eager_sync_each_step", eager, sync_each_step=True),
        ]
    if moe:
        mb = cases[moe].micro_batches[0]
        eager = {"compile": False, "attention_backend": attention.get(moe, "auto")}
        runs += [
            # eager both: the loop's per-expert split sizes are host values, which compilation would specialise on
            Run(moe, "tristage", "bf16", mb, "eager_moe_grouped_mm", {**eager, "moe_implementation": "auto"}),
            Run(moe, "tristage", "bf16", mb, "eager_moe_loop", {**eager, "moe_implementation": "loop"}),
        ]
    return runs


# ------------------------------------------------------------------------------------------------ report


def summarise(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Ratios per (case, regime): same micro-batch and best micro-batch of each; ZeRO-1 vs plain PyTorch."""
    ok = [r for r in rows if r["status"] == "ok" and r["variant"] == "default"]
    for r in rows:
        if r["status"] != "ok" or r["variant"] != "default" or r["impl"] != "tristage":
            continue
        for peer in ("hf", "liger"):
            match = [p for p in ok if p["impl"] == peer and p["case"] == r["case"] and p["regime"] == r["regime"]
                     and p["micro_batch"] == r["micro_batch"]]
            r[f"vs_{peer}"] = r["tokens_per_s"] / match[0]["tokens_per_s"] if match else None
    table = []
    cases = list(dict.fromkeys(r["case"] for r in rows))
    keys = dict.fromkeys((r["case"], r["regime"]) for r in rows if r["variant"] == "default")
    for case, regime in sorted(keys, key=lambda k: (cases.index(k[0]), REGIMES.index(k[1]))):  # by case, as CASES
        entry: Dict[str, Any] = {"case": case, "regime": regime}
        for impl in IMPLS:
            mine = [r for r in ok if r["case"] == case and r["regime"] == regime and r["impl"] == impl]
            if mine:
                best = max(mine, key=lambda r: r["tokens_per_s"])
                entry[impl] = {k: best.get(k) for k in ("micro_batch", "tokens_per_s", "mfu", "mfu_causal",
                                                         "peak_gib")}
        for peer in ("hf", "liger"):
            if "tristage" in entry and peer in entry:
                entry[f"best_vs_{peer}"] = entry["tristage"]["tokens_per_s"] / entry[peer]["tokens_per_s"]
        table.append(entry)
    zero1 = []
    for r in ok:
        if r["impl"] == "tristage" and r["regime"] == "ds":
            plain = [p for p in ok if p["impl"] == "tristage" and p["regime"] == "torch_master"
                     and p["case"] == r["case"] and p["micro_batch"] == r["micro_batch"]]
            if plain:
                zero1.append({"case": r["case"], "micro_batch": r["micro_batch"], "ds_tokens_per_s": r["tokens_per_s"],
                              "plain_tokens_per_s": plain[0]["tokens_per_s"],
                              "ds_slower_pct": 100.0 * (plain[0]["tokens_per_s"] / r["tokens_per_s"] - 1.0)})
    return {"table": table, "zero1": zero1}


def train_comparison(metrics_path: Path, rows: List[Dict[str, Any]], case: str, micro_batch: int,
                     skip_steps: int = 10) -> Dict[str, Any]:
    """Median tokens/s of a `python -m train` run's steps (after `skip_steps`) against the bench's ds row.

    A step's rate is taken from the clock between its record and the one before (tokens over seconds), so the
    loop's own work between steps (logging, the data, the spike check) counts against it; `step_tokens_per_s`
    is the median of the records' own `tokens_per_s`, timed inside the step.
    """
    steps = []
    for line in metrics_path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "event" not in rec and "tokens_per_s" in rec:
            steps.append(rec)
    first = skip_steps if len(steps) > skip_steps else 0
    timed = steps[first:]
    out: Dict[str, Any] = {"metrics": str(metrics_path), "steps_logged": len(steps), "steps_used": len(timed)}
    if not timed:
        return {**out, "status": "no steps logged"}
    pairs = [(steps[i - 1], steps[i]) for i in range(max(first, 1), len(steps))]
    wall = [(b["tokens"] - a["tokens"]) / (b["time"] - a["time"]) for a, b in pairs  # consecutive steps only
            if b.get("global_step") == a.get("global_step", -2) + 1 and b.get("time", 0) > a.get("time", 0)]
    step_tps = statistics.median(r["tokens_per_s"] for r in timed)
    tps = statistics.median(wall) if wall else step_tps
    rate_from = "clock between records" if wall else "records' tokens_per_s"
    mfu = None
    if all("mfu" in r for r in timed):  # the records' MFU is the in-step rate's: scaled to the clock's
        mfu = statistics.median(r["mfu"] for r in timed) * tps / step_tps
    out.update(tokens_per_s=tps, step_tokens_per_s=step_tps, rate_from=rate_from, mfu=mfu,
               memory_gib=max(r.get("memory_gib", 0.0) for r in timed))
    bench = [r for r in rows if r["status"] == "ok" and r["impl"] == "tristage" and r["regime"] == "ds"
             and r["case"] == case and r["micro_batch"] == micro_batch and r["variant"] == "default"]
    if bench:
        out.update(case=case, micro_batch=micro_batch, bench_tokens_per_s=bench[0]["tokens_per_s"],
                   ratio=tps / bench[0]["tokens_per_s"])
    return out


def _fmt(v: Any, spec: str = ",.0f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def _x(v: Any) -> str:
    return "-" if v is None else f"{v:.2f}x"


def format_report(result: Dict[str, Any]) -> str:
    """The printed tables: every run, then the comparison, ZeRO-1 overhead and the real training path."""
    lines = ["", "## Runs", "",
             "| case | impl | regime | variant | mb | tokens/s | MFU | MFU causal | peak GiB | vs HF | vs Liger | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['case']} | {r['impl']} | {r['regime']} | {r['variant']} | {r['micro_batch']} | "
                     f"{_fmt(r.get('tokens_per_s'))} | {_fmt(r.get('mfu'), '.1%')} | {_fmt(r.get('mfu_causal'), '.1%')} | "
                     f"{_fmt(r.get('peak_gib'), '.1f')} | {_x(r.get('vs_hf'))} | "
                     f"{_x(r.get('vs_liger'))} | {r['status'][:60]} |")
    s = result["summary"]
    lines += ["", "## tristage vs peers (best micro-batch of each, same regime)", "",
              "| case | regime | tristage tok/s (mb) | MFU | MFU causal | peak GiB | HF tok/s (mb) | Liger tok/s (mb) "
              "| vs HF | vs Liger |", "|---|---|---|---|---|---|---|---|---|---|"]
    for e in s["table"]:
        t, h, g = e.get("tristage", {}), e.get("hf", {}), e.get("liger", {})
        lines.append(f"| {e['case']} | {e['regime']} | {_fmt(t.get('tokens_per_s'))} ({t.get('micro_batch', '-')}) | "
                     f"{_fmt(t.get('mfu'), '.1%')} | {_fmt(t.get('mfu_causal'), '.1%')} | {_fmt(t.get('peak_gib'), '.1f')} | "
                     f"{_fmt(h.get('tokens_per_s'))} ({h.get('micro_batch', '-')}) | "
                     f"{_fmt(g.get('tokens_per_s'))} ({g.get('micro_batch', '-')}) | "
                     f"{_x(e.get('best_vs_hf'))} | {_x(e.get('best_vs_liger'))} |")
    if s["zero1"]:
        lines += ["", "## DeepSpeed ZeRO-1 bf16 vs plain PyTorch (bf16 model, fp32 masters, fused AdamW)", "",
                  "| case | mb | ZeRO-1 tok/s | plain tok/s | ZeRO-1 slower by |", "|---|---|---|---|---|"]
        for z in s["zero1"]:
            lines.append(f"| {z['case']} | {z['micro_batch']} | {_fmt(z['ds_tokens_per_s'])} | "
                         f"{_fmt(z['plain_tokens_per_s'])} | {z['ds_slower_pct']:+.1f}% |")
    if result.get("train"):
        t = result["train"]
        lines += ["", "## The real training path (`python -m train`, DeepSpeed ZeRO-1 bf16)", "",
                  f"{t.get('steps_used')} steps: {_fmt(t.get('tokens_per_s'))} tokens/s by the {t.get('rate_from')} "
                  f"({_fmt(t.get('step_tokens_per_s'))} inside the steps), "
                  f"{_fmt(t.get('ratio'), '.1%')} of the bench's tristage ds row "
                  f"({t.get('case')}, mb {t.get('micro_batch')}: {_fmt(t.get('bench_tokens_per_s'))} tokens/s)"]
    if result.get("probes"):
        lines += ["", "## Attention backends (one layer's causal GQA attention, forward + backward, ms)", ""]
        for case, probe in result["probes"].items():
            cells = ", ".join(f"{k} {v['ms']:.2f}" if "ms" in v else f"{k} n/a" for k, v in probe.items())
            lines.append(f"- {case}: {cells}; used: {result['meta']['attention'].get(case, 'auto')}")
    m = result["meta"]
    lines += ["", f"{m['device_name']}, torch {m['torch']}, transformers {m.get('transformers')}, "
              f"liger {m.get('liger_kernel')}, deepspeed {m.get('deepspeed')}; {m['date']}; `{m['command']}`"]
    return "\n".join(lines)


def _version(module: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001
        return None


def _meta(device: torch.device, argv: Sequence[str]) -> Dict[str, Any]:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001
        commit = None
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": " ".join(["python -m train.bench", *argv]), "commit": commit,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
            or "cpu", "torch": torch.__version__, "transformers": _version("transformers"),
            "liger_kernel": _version("liger-kernel") or _version("liger_kernel"),
            "deepspeed": _version("deepspeed"), "python": platform.python_version(),
            "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------------------ main


def main(argv: Optional[List[str]] = None) -> int:
    """Run the benchmark (or only report an earlier JSON); prints the tables last."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m train.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU check; default on the CPU)")
    p.add_argument("--cases", default="", help=f"comma list; default all of {list(CASES)} (or {list(TINY_CASES)})")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--regimes", default="bf16,ds,torch_master", help=f"comma list of {REGIMES}")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="model.compile (auto: on CUDA)")
    p.add_argument("--attention", default="best",
                   help="tristage attention_backend: best (fastest in the probe), auto, flash, cudnn, cudnn_mha, ...")
    p.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (default 1: steady ratios)")
    p.add_argument("--ablate", action="store_true", help="time each optimisation on its own instead of the table")
    p.add_argument("--warmup", type=int, default=0, help="override each case's warmup steps")
    p.add_argument("--steps", type=int, default=0, help="override each case's timed steps")
    p.add_argument("--json", type=Path, default=None, help="write every number here")
    p.add_argument("--report", type=Path, default=None, help="only print/extend the report of an earlier --json")
    p.add_argument("--train-metrics", type=Path, default=None,
                   help="a `python -m train` metrics.jsonl to compare with the bench's ds row")
    p.add_argument("--train-case", default="0.6b_4k:4", help="case:micro_batch the training run used")
    args = p.parse_args(argv)

    if args.report:
        result = json.loads(args.report.read_text())
    else:
        result = bench(args, argv, lambda partial: _write(args.json, partial))
    if args.train_metrics:
        case, _, mb = args.train_case.partition(":")
        result["train"] = train_comparison(args.train_metrics, result["rows"], case, int(mb or 4))
    _write(args.json, result)
    print(format_report(result), flush=True)
    return 0 if any(r["status"] == "ok" for r in result["rows"]) else 1


def _write(path: Optional[Path], result: Dict[str, Any]) -> None:
    """Write the result atomically: a kill mid-write leaves the previous complete JSON (and a stray temp file)."""
    if path is not None:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(result, indent=1, default=str))


def bench(args: argparse.Namespace, argv: Sequence[str],
          save: Callable[[Dict[str, Any]], None] = lambda result: None) -> Dict[str, Any]:
    """Probe, then time every run of the plan (`save` gets the result so far after each run)."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA device")
    tiny = args.tiny or device.type == "cpu"
    pool = TINY_CASES if tiny else CASES
    names = [c for c in args.cases.split(",") if c] or list(pool)
    unknown = [c for c in names if c not in pool]
    if unknown:
        raise SystemExit(f"error: unknown cases {unknown}; available: {list(pool)}")
    cases = {n: pool[n] for n in names}
    impls = [i for i in args.impls.split(",") if i]
    regimes = [r for r in args.regimes.split(",") if r]
    for bad in [i for i in impls if i not in IMPLS] + [r for r in regimes if r not in REGIMES]:
        raise SystemExit(f"error: unknown implementation or regime {bad!r}")
    compile_ = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    # the compiled block is specialised per shape; many cases and variants in one process need more than the
    # default 8 specialisations before dynamo would fall back to eager
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    if device.type == "cpu":
        torch.manual_seed(0)
        # every implementation on the same fixed number of threads: on cores shared with other work, idle
        # intra-op threads spin and swamp the comparison (2 shared cores: 0.56x HF with all threads, 1.04x with 1)
        torch.set_num_threads(args.threads)

    result: Dict[str, Any] = {"meta": _meta(device, argv), "probes": {}, "rows": []}
    attention: Dict[str, str] = {}
    if args.attention == "best":
        if device.type == "cuda":
            for name, case in cases.items():
                probe = probe_attention(case, device, ("flash", "cudnn", "cudnn_mha", "efficient"))
                result["probes"][name] = probe
                attention[name] = best_attention(probe)
                print(f"[bench] attention probe {name}: {json.dumps(probe)} -> {attention[name]}", flush=True)
        else:
            attention = {n: "auto" for n in cases}
    else:
        attention = {n: args.attention for n in cases}
    result["meta"]["attention"] = attention

    runs = ablation_runs(cases, compile_, attention) if args.ablate else default_runs(cases, impls, regimes, compile_, attention)
    result["summary"] = summarise([])
    save(result)  # the probes, should the first run never finish
    t0 = time.perf_counter()
    for i, run in enumerate(runs):
        case = cases[run.case]
        row = run_one(run, case, device, args.warmup or case.warmup, args.steps or case.steps)
        if row["status"].startswith("error") and run.impl == "tristage" and run.model.get("compile"):
            # a compiler failure must not cost the whole comparison: measure the eager model instead, and say so
            print(f"[bench] compiled run failed ({row['status']}); again without compile\n{row.get('traceback')}",
                  file=sys.stderr, flush=True)
            result["meta"].setdefault("compile_failed", []).append(f"{run.case} {run.regime}: {row['status']}")
            failed = row["status"]
            row = run_one(dataclasses.replace(run, model={**run.model, "compile": False}), case, device,
                          args.warmup or case.warmup, args.steps or case.steps)
            row["note"] = f"eager: the compiled run failed ({failed})"
        result["rows"].append(row)
        print(f"[bench] {i + 1}/{len(runs)} {run.case} {run.impl} {run.regime} {run.variant} mb{run.micro_batch}: "
              f"{row['status']} {_fmt(row.get('tokens_per_s'))} tok/s {_fmt(row.get('mfu'), '.1%')} "
              f"{_fmt(row.get('peak_gib'), '.1f')} GiB ({row.get('wall_s', 0):.0f}s, total {time.perf_counter() - t0:.0f}s)",
              flush=True)
        if row.get("traceback"):
            print(row["traceback"], file=sys.stderr, flush=True)
        result["summary"] = summarise(result["rows"])
        result["meta"]["wall_s"] = time.perf_counter() - t0
        save(result)  # a run stopped by its time limit still leaves every finished row behind
    result["summary"] = summarise(result["rows"])
    return result


if __name__ == "__main__":
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    sys.exit(main())
