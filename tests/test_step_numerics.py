"""A training step's numbers against the same steps written out in plain PyTorch: one forward of the whole global
batch, `F.cross_entropy` over its tokens, the global gradient norm in fp64, clipping at `deepspeed.grad_clip`,
torch's AdamW with weight decay on the matrices (embeddings included) and not on the RMSNorm gains, and each
stage's LR from the README's formula, written again here."""
from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F

from test_train_config import compose_cfg
from trainutil import DENSE1, SMOKE, run_train, smoke_run, steps


def _readme_lr(lr, k: int, n: int) -> float:
    """Step k (0-based) of n: linear warmup from warmup_start, the peak, then the last decay_frac of the steps
    after the warmup decaying to `final`, landing on it at the last step."""
    if k < lr.warmup_steps:
        return lr.warmup_start + (lr.peak - lr.warmup_start) * (k + 1) / lr.warmup_steps
    decay = min(round(lr.decay_frac * n), n - lr.warmup_steps)
    if decay == 0 or k < n - decay:
        return lr.peak
    p = (k - (n - decay) + 1) / decay
    shape = {"linear": 1 - p, "sqrt": 1 - math.sqrt(p), "cosine": 0.5 * (1 + math.cos(math.pi * p))}[lr.decay_style]
    return lr.final + (lr.peak - lr.final) * shape


def _reference(overrides: Sequence[str]) -> Tuple[List[Tuple[str, int, float, float, float]],
                                                  Dict[str, torch.Tensor]]:
    """`python -m train experiment=smoke <overrides>` in plain fp32 PyTorch on one process: (stage, step, loss,
    gradient norm before clipping, lr) per step, and the weights at the end."""
    from data.loader import StageStream
    from data.prepare import manifest_path
    from models.qwen3 import Qwen3ForCausalLM
    from train.config import validate

    cfg = compose_cfg([*SMOKE, *overrides])
    plans = validate(cfg, 1)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(cfg.model)
    model.to_empty(device="cpu")
    model.init_weights(seed=cfg.seed)
    params = list(model.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim == 2], "weight_decay": cfg.optim.weight_decay},
                             {"params": [p for p in params if p.ndim == 1], "weight_decay": 0.0}],
                            lr=0.0, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    out = []
    for name, plan in zip(cfg.curriculum.order, plans):
        stage = cfg.curriculum.stages[name]
        model.set_rope_theta(stage.rope_theta)
        G = plan.samples_per_step
        stream = StageStream(manifest_path(cfg.data), stage.mixture, seq_len=stage.seq_len, seed=cfg.seed,
                             stage=name, num_samples=plan.steps * G, workers=1, verbose=False)
        for k in range(plan.steps):
            batch = stream.batch(range(k * G, (k + 1) * G))  # the whole global batch at once
            opt.zero_grad()
            loss = F.cross_entropy(model(batch["input_ids"]).logits.flatten(0, 1), batch["labels"].flatten())
            loss.backward()
            # in fp64: torch's fp32 norm of the embedding's gradient is 1.3e-4 low on the CPU here
            norm = torch.stack([p.grad.double().norm() for p in params]).norm().item()
            if norm > cfg.deepspeed.grad_clip > 0:
                for p in params:
                    p.grad.mul_(cfg.deepspeed.grad_clip / (norm + 1e-6))
            lr = _readme_lr(stage.lr, k, plan.steps)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step()
            out.append((name, k + 1, loss.item(), norm, lr))
    return out, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _logged(run_dir) -> List[Tuple[str, int, float, float, float]]:
    return [(r["stage"], r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in steps(run_dir)]


def test_the_smoke_curriculum_steps_as_plain_pytorch(data_root, tmp_path_factory):
    """The shared one-process run (ZeRO-1, 4 micro-batches a step): each of its eight steps through General,
    Reasoning and Long Context logs the reference's loss, pre-clip gradient norm and LR. The losses agree to
    5e-7 relative; weight decay on the norms, none on the embedding, betas (0.9, 0.999), eps 1e-6 or no
    clipping each move a loss by 3e-5 relative or more by step 4 (the norms by 4e-5 or more)."""
    got = _logged(smoke_run(tmp_path_factory, "dense1", DENSE1))
    ref, _ = _reference(DENSE1)
    assert [(s, k) for s, k, *_ in got] == [(s, k) for s, k, *_ in ref]
    for (stage, step, loss, norm, lr), (_, _, loss_ref, norm_ref, lr_ref) in zip(got, ref):
        assert loss == pytest.approx(loss_ref, rel=3e-6), (stage, step)
        assert norm == pytest.approx(norm_ref, rel=2e-5), (stage, step)
        assert lr == pytest.approx(lr_ref, rel=1e-12), (stage, step)
    # the handover: General holds the peak to its end, Reasoning's first step is already on its decay
    assert [lr for s, _, _, _, lr in got if s != "long_context"] == pytest.approx([3e-3] * 4 + [1.65e-3, 3e-4])


ZERO0 = ["model=tiny_dense", "deepspeed=zero0", "curriculum.order=[general]", "eval.enabled=false",
         "optim.eps=1e-4"]  # an eps above the smallest gradients, so their rounding does not decide an update


def test_zero0_bf16_counts_adamw_steps_from_one_and_exports_the_masters(data_root, tmp_path):
    """bf16 without ZeRO: DeepSpeed's FP16_UnfusedOptimizer creates torch AdamW's state with one step on zero
    gradients, which left each `step` count one ahead, so every update was bias-corrected for the step after (the
    first one 0.73 x lr): the loss of step 2 was 7.9e-3 above the fp32 reference's, step 3's 4.5e-2 (bf16's own
    difference: 1.3e-4). And the loop's HF export gave the bf16 copies (every value a bf16 number), not the
    fp32 master weights it gives under ZeRO 1-3."""
    from models.hf import load_hf

    overrides = [*ZERO0, "deepspeed.precision=bf16"]
    proc = run_train([*SMOKE, f"run_dir={tmp_path}", *overrides])
    assert proc.returncode == 0, proc.stdout[-3000:]
    ref, weights = _reference(overrides)
    for (stage, step, loss, _, _), (_, _, loss_ref, _, _) in zip(_logged(tmp_path), ref, strict=True):
        assert loss == pytest.approx(loss_ref, abs=1e-3), (stage, step)
    exported = load_hf(tmp_path / "hf" / "general").state_dict()
    values = torch.cat([v.flatten() for v in exported.values()])
    assert (values.bfloat16().float() == values).float().mean().item() < 1e-3  # 2.6e-5: the masters
    assert max((exported[k] - v).abs().max().item() for k, v in weights.items()) < 5e-3  # bf16's compute


def test_zero0_fp32_clips_by_the_norm_it_logs(data_root, tmp_path):
    """Without ZeRO in fp32 DeepSpeed clipped by its own norm, summed in fp32 (here 5.6e-5 low, 0.4% for 50M
    elements on the CPU), while the loop logged the fp64 one: the weights after General's four steps were 1.4e-6
    off the reference's (and step 2's norm 1.8e-6), and now agree to 1.3e-7 as ZeRO 1-3's do."""
    from models.hf import load_hf

    proc = run_train([*SMOKE, f"run_dir={tmp_path}", *ZERO0])
    assert proc.returncode == 0, proc.stdout[-3000:]
    ref, weights = _reference(ZERO0)
    for (stage, step, loss, norm, _), (_, _, loss_ref, norm_ref, _) in zip(_logged(tmp_path), ref, strict=True):
        assert (loss, norm) == pytest.approx((loss_ref, norm_ref), rel=1e-6), (stage, step)
    exported = load_hf(tmp_path / "hf" / "general").state_dict()
    assert max((exported[k] - v).abs().max().item() for k, v in weights.items()) < 5e-7
