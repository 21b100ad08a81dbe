"""A training step's numbers against the same steps written out in plain PyTorch: one forward of the whole global
batch, `F.cross_entropy` over its tokens, the global gradient norm in fp64, clipping at `deepspeed.grad_clip`,
torch's AdamW with weight decay on the matrices (embeddings and 3-D expert stacks included) and not on the RMSNorm
gains, and each stage's LR from the README's formula, written again here. An MoE step goes micro-batch by
micro-batch and rank by rank instead, as its balance loss depends on that split (`_moe_step`)."""
from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F

from test_train_config import compose_cfg
from trainutil import DENSE1, MOE1, MOE_GENERAL, SMOKE, run_train, smoke_run, steps


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


def _moe_step(model: torch.nn.Module, router_logits: List[torch.Tensor], cfg,
              micro_batches: List[List[Dict[str, torch.Tensor]]]) -> Dict[str, object]:
    """Backward of one MoE optimizer step as the loop's ranks make it, on one process: micro_batches[m][r] is rank
    r's micro-batch m. Each forward's loss is its mean cross-entropy + coef x E * sum_i f_i P_i (per layer, mean over
    layers) + z_coef x mean logsumexp^2, f_i counted over micro-batches 1..m of every rank (Megatron-LM's global
    aux loss: only the last micro-batch sees the whole step's f), P_i this forward's mean router probability; the
    gradient is the mean over the forwards. Returns the step's logged values: lm_loss, balance_loss (the whole
    step's f and mean P), z_loss, loss and the (layers, experts) assignment counts."""
    mc = cfg.model
    E, k = mc.num_experts, mc.num_experts_per_tok
    forwards = len(micro_batches) * len(micro_batches[0])
    seen = torch.zeros(mc.num_hidden_layers, E, dtype=torch.long)  # (L, E) assignments so far, every rank
    ce_sum, tokens, probs_sum, z_sum = 0.0, 0, 0.0, 0.0
    for ranks in micro_batches:
        outs = []
        for b in ranks:  # every rank's forward of micro-batch m before any loss: f needs all their counts
            router_logits.clear()
            logits = model(b["input_ids"]).logits  # (B, T, V)
            scores = torch.stack(router_logits)  # (L, B*T, E)
            probs = scores.softmax(dim=-1)
            seen += F.one_hot(probs.topk(k, dim=-1).indices, E).sum(dim=(1, 2))
            outs.append((b, logits, scores, probs))
        f = seen.float() / seen.sum(dim=-1, keepdim=True)  # (L, E), rows sum to 1
        for b, logits, scores, probs in outs:
            ce = F.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), reduction="none")
            valid = b["labels"].flatten() != -100
            balance = (E * (f * probs.mean(dim=1)).sum(dim=-1)).mean()
            z = torch.logsumexp(scores, dim=-1).square().mean(dim=-1).mean()
            loss = ce[valid].mean() + mc.router_aux_loss_coef * balance + mc.router_z_loss_coef * z
            (loss / forwards).backward()
            ce_sum += ce[valid].double().sum().item()
            tokens += int(valid.sum())
            probs_sum = probs_sum + probs.detach().double().mean(dim=1)
            z_sum += z.item()
    f = seen.double() / seen.sum(dim=-1, keepdim=True)
    out = {"lm_loss": ce_sum / tokens, "balance_loss": (E * (f * probs_sum / forwards).sum(dim=-1)).mean().item(),
           "z_loss": z_sum / forwards, "expert_counts": seen.tolist()}
    out["loss"] = out["lm_loss"] + mc.router_aux_loss_coef * out["balance_loss"] + mc.router_z_loss_coef * out["z_loss"]
    return out


def _reference(overrides: Sequence[str], world_size: int = 1,
               max_steps: int = 0) -> Tuple[List[Dict[str, object]], Dict[str, torch.Tensor]]:
    """`python -m train experiment=smoke <overrides>` on `world_size` ranks in plain fp32 PyTorch on one process:
    per step a record with the logged stage, step, loss, grad_norm (before clipping) and lr (MoE: also lm_loss,
    balance_loss, z_loss and expert_counts, see `_moe_step`), and the weights at the end. A dense step is one
    forward of the whole global batch; an MoE step follows the ranks' micro-batches, which its balance loss
    depends on. max_steps > 0 stops after that many steps, as the run's `max_steps`."""
    from data.loader import StageStream, micro_batch_indices
    from data.prepare import manifest_path
    from models.moe import Qwen3MoeRouter
    from models.qwen3 import Qwen3ForCausalLM
    from train.config import validate

    cfg = compose_cfg([*SMOKE, *overrides])
    plans = validate(cfg, world_size)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(cfg.model)
    model.to_empty(device="cpu")
    model.init_weights(seed=cfg.seed)
    router_logits: List[torch.Tensor] = []  # each MoE layer's (tokens, E) router logits, in layer order
    if cfg.model.num_experts:
        model.eval()  # its own balance bookkeeping stays out of the way (no dropout: the same forward)
        for module in model.modules():
            if isinstance(module, Qwen3MoeRouter):
                module.register_forward_hook(lambda mod, args, out: router_logits.append(out[0]))
    params = list(model.parameters())
    # decay on every matrix, the 3-D expert stacks (E, rows, cols) included; none on the 1-D RMSNorm gains
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.optim.weight_decay},
                             {"params": [p for p in params if p.ndim == 1], "weight_decay": 0.0}],
                            lr=0.0, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    out: List[Dict[str, object]] = []
    for name, plan in zip(cfg.curriculum.order, plans):
        stage = cfg.curriculum.stages[name]
        model.set_rope_theta(stage.rope_theta)
        G = plan.samples_per_step
        stream = StageStream(manifest_path(cfg.data), stage.mixture, seq_len=stage.seq_len, seed=cfg.seed,
                             stage=name, num_samples=plan.steps * G, workers=1, verbose=False)
        for k in range(plan.steps):
            if max_steps and len(out) == max_steps:
                break
            opt.zero_grad()
            if cfg.model.num_experts:
                record = _moe_step(model, router_logits, cfg, [
                    [stream.batch(micro_batch_indices(k * G, m, r, world_size, plan.micro_batch_size))
                     for r in range(world_size)] for m in range(plan.grad_accum)])
            else:
                batch = stream.batch(range(k * G, (k + 1) * G))  # the whole global batch at once
                loss = F.cross_entropy(model(batch["input_ids"]).logits.flatten(0, 1), batch["labels"].flatten())
                loss.backward()
                record = {"loss": loss.item()}
            # in fp64: torch's fp32 norm of the embedding's gradient is 1.3e-4 low on the CPU here
            norm = torch.stack([p.grad.double().norm() for p in params]).norm().item()
            if norm > cfg.deepspeed.grad_clip > 0:
                for p in params:
                    p.grad.mul_(cfg.deepspeed.grad_clip / (norm + 1e-6))
            lr = _readme_lr(stage.lr, k, plan.steps)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step()
            out.append({"stage": name, "step": k + 1, **record, "grad_norm": norm, "lr": lr})
    return out, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _fields(records: Sequence[Dict[str, object]]) -> List[Tuple[str, int, float, float, float]]:
    """(stage, step, loss, grad_norm, lr) of each step record, a run's or the reference's."""
    return [(r["stage"], r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in records]


def test_the_smoke_curriculum_steps_as_plain_pytorch(data_root, tmp_path_factory):
    """The shared one-process run (ZeRO-1, 4 micro-batches a step): each of its eight steps through General,
    Reasoning and Long Context logs the reference's loss, pre-clip gradient norm and LR. The losses agree to
    5e-7 relative; weight decay on the norms, none on the embedding, betas (0.9, 0.999), eps 1e-6 or no
    clipping each move a loss by 3e-5 relative or more by step 4 (the norms by 4e-5 or more)."""
    got = _fields(steps(smoke_run(tmp_path_factory, "dense1", DENSE1)))
    ref = _fields(_reference(DENSE1)[0])
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
    for (stage, step, loss, _, _), (_, _, loss_ref, _, _) in zip(_fields(steps(tmp_path)), _fields(ref), strict=True):
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
    for (stage, step, loss, norm, _), (_, _, loss_ref, norm_ref, _) in zip(_fields(steps(tmp_path)), _fields(ref),
                                                                           strict=True):
        assert (loss, norm) == pytest.approx((loss_ref, norm_ref), rel=1e-6), (stage, step)
    exported = load_hf(tmp_path / "hf" / "general").state_dict()
    assert max((exported[k] - v).abs().max().item() for k, v in weights.items()) < 5e-7


def _assert_moe_steps(got: List[dict], ref: List[Dict[str, object]], rel: Dict[str, float]) -> None:
    """Each logged MoE step against the reference's: the losses and norm within `rel`, the expert counts exact."""
    assert [(r["stage"], r["step"]) for r in got] == [(r["stage"], r["step"]) for r in ref]
    for r, want in zip(got, ref):
        at = (r["stage"], r["step"])
        for key, tol in rel.items():
            assert r[key] == pytest.approx(want[key], rel=tol), (at, key)
        assert r["lr"] == pytest.approx(want["lr"], rel=1e-12), at
        if "expert_load" in r:  # fractions to 5 decimals, of 2 x 1,024 assignments a layer: the counts
            per_layer = sum(want["expert_counts"][0])
            assert [[round(x * per_layer) for x in row] for row in r["expert_load"]] == want["expert_counts"], at


def test_moe_steps_as_plain_pytorch(data_root, tmp_path_factory):
    """The shared one-process MoE run (ZeRO-2, 4 micro-batches a step, z-loss on): each of its three steps logs
    the reference's loss, lm, balance and z-losses and pre-clip gradient norm (measured: 6.6e-8 relative at
    most, the norm's) and exactly its expert counts, micro-batch m's balance loss counting f over micro-batches
    1..m. Each micro-batch's own counts instead moved step 1's norm by 5.7e-6 relative and step 2's loss by
    5.0e-7, and routed step 2 otherwise."""
    got = steps(smoke_run(tmp_path_factory, "tiny_moe-1", MOE1))
    ref, _ = _reference(MOE1, max_steps=3)
    assert [r["step"] for r in got if "expert_load" in r] == [1, 2, 3]
    _assert_moe_steps(got, ref, {"loss": 2e-7, "lm_loss": 2e-7, "balance_loss": 2e-7, "z_loss": 2e-7,
                                 "grad_norm": 3e-7})


def test_two_rank_moe_steps_as_plain_pytorch(data_root, tmp_path_factory):
    """The shared 2-rank MoE ZeRO-2 run of tests/test_expert_parallel_train.py (EP = 1: General alone, 10 steps, 2
    micro-batches a rank, the counts summed over both ranks, logged every step) against the reference: losses,
    balance loss and norm 1e-9 .. 2e-7 relative (measured), the expert counts exact at every step. Each
    micro-batch's own counts moved step 2's loss by 1.5e-6 and every loss after it by ~1e-4. It compared the
    smoke curriculum's eight steps before, whose LR (3e-3) and AdamW eps (1e-8) make the run chaotic: on another
    CPU (other matmul kernels) the rounding grew into other routing by step 3 (counts off by up to 61)."""
    overrides = [*MOE_GENERAL, "deepspeed=zero2", "expert_parallel_size=1"]
    got = steps(smoke_run(tmp_path_factory, "2-zero2-ep1", overrides, nproc=2))
    ref, _ = _reference(overrides, world_size=2)
    assert [r["step"] for r in got if "expert_load" in r] == list(range(1, 11))
    _assert_moe_steps(got, ref, {"loss": 1e-7, "lm_loss": 1e-7, "balance_loss": 1e-7, "grad_norm": 1e-6})
