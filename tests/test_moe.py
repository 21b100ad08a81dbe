"""MoE: router, dropless expert compute, balance loss definitions, global-batch counting across ranks and steps."""
import dataclasses
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from models import Qwen3ForCausalLM, load_preset
from models.moe import ExpertBalance, Qwen3SparseMoeBlock
from trainutil import end_spawned_worker, free_port


def build(seed=0, **overrides):
    cfg = dataclasses.replace(load_preset("tiny_moe"), **overrides)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(cfg)
    model.to_empty(device="cpu")
    model.init_weights(seed=seed)
    # Larger router weights than the init so routing is decisive and imbalanced (a stricter test).
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed + 1))
    return model


def record_router_stats(model):
    """Forward hooks collecting each MoE layer's (probs_mean, counts, z) of every forward."""
    records = []

    def hook(_module, _inputs, output):
        records.append(tuple(t.detach().clone() for t in output[1]))

    for m in model.modules():
        if isinstance(m, Qwen3SparseMoeBlock):
            m.register_forward_hook(hook)
    return records


def stats_of_last_forward(records, n_layers):
    probs, counts, z = (torch.stack(v) for v in zip(*records[-n_layers:]))
    return probs, counts, z


def test_router_is_fp32_topk_and_renormalised():
    block = build().model.layers[0].mlp
    x = torch.randn(20, 128).to(torch.bfloat16)
    logits, probs, top_w, top_i = block.gate.to(torch.bfloat16)(x)
    assert logits.dtype == probs.dtype == torch.float32 and top_w.dtype == torch.bfloat16
    ref_probs = F.linear(x.float(), block.gate.weight.float()).softmax(-1)
    torch.testing.assert_close(probs, ref_probs)
    ref_w, ref_i = ref_probs.topk(2, dim=-1)
    assert torch.equal(top_i, ref_i)
    torch.testing.assert_close(top_w.float(), ref_w / ref_w.sum(-1, keepdim=True), rtol=1e-2, atol=1e-2)
    block.gate.norm_topk_prob = False
    torch.testing.assert_close(block.gate(x)[2].float(), ref_w, rtol=1e-2, atol=1e-2)


def test_dropless_block_equals_per_token_reference():
    block = build().model.layers[1].mlp
    torch.manual_seed(0)
    x = torch.randn(2, 9, 128)
    y, (probs_mean, counts, _) = block(x)
    flat = x.reshape(-1, 128)
    _, probs, top_w, top_i = block.gate(flat)
    ref = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for j in range(2):
            e = top_i[t, j]
            gate, up = (flat[t] @ block.experts.gate_up_proj[e].T).chunk(2)
            ref[t] += top_w[t, j] * ((F.silu(gate) * up) @ block.experts.down_proj[e].T)
    torch.testing.assert_close(y.reshape(-1, 128), ref, rtol=1e-5, atol=1e-6)
    assert counts.sum() == 18 * 2 and torch.equal(counts, torch.bincount(top_i.flatten(), minlength=8))
    torch.testing.assert_close(probs_mean, probs.mean(0))


def test_grouped_mm_forward_agrees_with_the_loop_path():
    if not hasattr(F, "grouped_mm"):
        pytest.skip("torch has no grouped_mm")
    experts = build().model.layers[0].mlp.experts
    torch.manual_seed(0)
    counts = torch.tensor([5, 0, 3, 9, 1, 0, 7, 2])
    x = torch.randn(int(counts.sum()), 128)
    with torch.no_grad():
        try:
            grouped = experts._grouped_mm(x, counts)
        except RuntimeError as e:  # e.g. a build whose CPU kernel refuses these strides
            pytest.skip(f"grouped_mm forward does not run here: {e}")
        loop = experts._loop(x, counts)
    torch.testing.assert_close(grouped, loop, rtol=1e-5, atol=1e-6)


def test_cpu_auto_path_trains():
    model = build().train()
    out = model(torch.randint(0, 8192, (2, 16)), labels=torch.randint(0, 8192, (2, 16)))
    out.loss.backward()
    for layer in model.model.layers:
        assert layer.mlp.experts.gate_up_proj.grad.abs().sum() > 0
        assert layer.mlp.gate.weight.grad.abs().sum() > 0


def test_balance_formula_and_uniform_minimum():
    bal = ExpertBalance(load_preset("tiny_moe"))
    probs = torch.tensor([[0.4, 0.1, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05]])
    counts = torch.tensor([[6, 2, 2, 2, 2, 2, 0, 0]])
    balance, _ = bal.losses(probs, counts, torch.zeros(1), training=False)
    f = counts.float() / 16
    assert balance.item() == pytest.approx(8 * (f * probs).sum().item())
    uniform, _ = bal.losses(torch.full((1, 8), 1 / 8), torch.full((1, 8), 4), torch.zeros(1), training=False)
    assert uniform.item() == pytest.approx(1.0)


def test_micro_balance_equals_transformers_switch_loss_times_k():
    pytest.importorskip("transformers")
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    model = build(num_hidden_layers=1, balance_loss_granularity="micro").eval()
    logits = []
    model.model.layers[0].mlp.gate.register_forward_hook(lambda m, i, o: logits.append(o[0]))
    out = model(torch.randint(0, 8192, (2, 40)))
    hf = load_balancing_loss_func((logits[0],), num_experts=8, top_k=2)
    # transformers normalises f_i by tokens (sums to k); this model by assignments (sums to 1).
    torch.testing.assert_close(out.balance_loss * 2, hf.detach(), rtol=1e-6, atol=1e-6)
    assert out.balance_loss.item() > 1.0  # the strong router is imbalanced


def test_aux_loss_weights_and_z_loss():
    model = build(router_aux_loss_coef=0.01, router_z_loss_coef=0.001, balance_loss_granularity="micro").train()
    logits = []
    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(lambda m, i, o: logits.append(o[0].detach()))
    out = model(torch.randint(0, 8192, (2, 16)), labels=torch.randint(0, 8192, (2, 16)))
    z = torch.stack([torch.logsumexp(lg, -1).square().mean() for lg in logits]).mean()
    torch.testing.assert_close(out.z_loss, z)
    torch.testing.assert_close(out.aux_loss, 0.01 * out.balance_loss + 0.001 * out.z_loss)
    # f_i (counts) carries no gradient: the aux loss alone moves the last layer's router, not its experts
    # (earlier layers' experts do get some, through the inputs of later routers).
    out.aux_loss.backward()
    last = model.model.layers[-1].mlp
    assert last.gate.weight.grad.abs().sum() > 0
    assert last.experts.gate_up_proj.grad is None or last.experts.gate_up_proj.grad.abs().sum() == 0


def test_global_counts_accumulate_through_a_step_as_documented():
    """Micro-batch m of a step uses f_i from micro-batches 1..m; start_step() resets; eval never counts."""
    model = build().train()
    records = record_router_stats(model)
    L = model.config.num_hidden_layers
    torch.manual_seed(0)
    a, b = torch.randint(0, 8192, (2, 24)), torch.randint(0, 8192, (3, 24))

    def balance_from(probs, counts):
        f = counts.float() / counts.sum(-1, keepdim=True)
        return (8 * (f * probs).sum(-1)).mean()

    model.start_step()
    out_a = model(a)
    p_a, c_a, _ = stats_of_last_forward(records, L)
    out_b = model(b)
    p_b, c_b, _ = stats_of_last_forward(records, L)
    torch.testing.assert_close(out_a.balance_loss, balance_from(p_a, c_a))  # first micro-batch: its own counts
    torch.testing.assert_close(out_b.balance_loss, balance_from(p_b, c_a + c_b))  # second: counts of a and b
    assert not torch.allclose(out_b.balance_loss, balance_from(p_b, c_b))
    torch.testing.assert_close(model.expert_load(), (c_a + c_b).float() / (c_a + c_b).sum(-1, keepdim=True))

    load = model.expert_load()
    model.eval()
    model(b)
    torch.testing.assert_close(model.expert_load(), load)  # evaluation leaves the step's counts alone
    model.train()

    model.start_step()
    assert model.expert_load() is None
    out_b2 = model(b)
    torch.testing.assert_close(out_b2.balance_loss, balance_from(p_b, c_b))  # a new step starts from zero

    micro = build(balance_loss_granularity="micro").train()
    micro(a)
    torch.testing.assert_close(micro(b).balance_loss, out_b2.balance_loss)  # micro never looks back


def test_step_balance_loss_is_the_global_batch_value_whatever_the_micro_batches():
    """Two micro-batches of a step: `step_balance_loss` of their mean router probability equals the balance loss
    of the two as one micro-batch; the mean of the micro-batches' own (partial-count) values does not."""
    torch.manual_seed(1)
    x = torch.randint(0, 8192, (4, 24))
    whole = build().train()
    whole.start_step()
    exact = whole(x).balance_loss
    model = build().train()
    model.start_step()
    parts = [model(x[:2]).balance_loss, model(x[2:]).balance_loss]
    torch.testing.assert_close(model.step_balance_loss(model.router_probs_sum() / 2), exact)
    assert abs((sum(parts) / 2 - exact).item()) > 1e-3
    model.start_step()
    assert model.router_probs_sum() is None


def test_transformers_pools_layers_first_so_only_one_layer_matches_times_k():
    """The per-layer mean (Switch / Megatron) vs transformers' pooled counts: equal x k for one layer (above),
    not for four; the README says so."""
    pytest.importorskip("transformers")
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    model = build(num_hidden_layers=4, balance_loss_granularity="micro").eval()
    logits = []
    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(lambda m, i, o: logits.append(o[0]))
    out = model(torch.randint(0, 8192, (2, 40), generator=torch.Generator().manual_seed(3)))
    hf = load_balancing_loss_func(tuple(logits), num_experts=8, top_k=2).item()
    per_layer = []
    for lg in logits:  # each layer alone, as transformers computes one layer
        per_layer.append(load_balancing_loss_func((lg,), num_experts=8, top_k=2).item() / 2)
    assert out.balance_loss.item() == pytest.approx(sum(per_layer) / 4, rel=1e-5)
    assert abs(out.balance_loss.item() * 2 - hf) > 1e-3


# ---------------------------------------------------------------------------------------------------------
# Data parallelism: 2 gloo processes, each with half of the batch.

BATCH_SEED, N_SEQ, SEQ = 123, 4, 16


def _batch():
    g = torch.Generator().manual_seed(BATCH_SEED)
    x = torch.randint(0, 8192, (N_SEQ, SEQ), generator=g)
    y = torch.randint(0, 8192, (N_SEQ, SEQ), generator=g)
    return x, y


def _loss_and_grads(model, x, y):
    model.start_step()
    out = model(x, labels=y)
    out.loss.backward()
    return out, {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _rank_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = build().train()
        model.set_balance_group(dist.group.WORLD)
        x, y = _batch()
        per = N_SEQ // world
        out, grads = _loss_and_grads(model, x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per])
        loss = out.loss.detach().clone()
        balance = out.balance_loss.clone()
        dist.all_reduce(loss)
        dist.all_reduce(balance)
        for g in grads.values():  # what data-parallel training does with gradients
            dist.all_reduce(g)
            g /= world
        if rank == 0:
            torch.save({"loss": loss / world, "balance": balance / world, "grads": grads,
                        "load": model.expert_load()}, os.path.join(out_dir, "dp.pt"))
    finally:
        dist.destroy_process_group()
    end_spawned_worker()


@pytest.mark.slow
def test_global_batch_balance_across_ranks_equals_concatenated_batch():
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_rank_worker, args=(2, free_port(), out_dir), nprocs=2, join=True)
        dp = torch.load(os.path.join(out_dir, "dp.pt"))

    x, y = _batch()
    out, grads = _loss_and_grads(build().train(), x, y)  # one process, whole batch, group None
    torch.testing.assert_close(dp["loss"], out.loss.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(dp["balance"], out.balance_loss, rtol=0, atol=1e-6)
    for n, g in grads.items():
        torch.testing.assert_close(dp["grads"][n], g, rtol=1e-5, atol=1e-6, msg=n)
    # Every rank's expert load is the global one.
    ref = build().train()
    ref(x)
    torch.testing.assert_close(dp["load"], ref.expert_load())

    # Without the all_reduce (micro-batch counts per rank) the result differs: the test can fail.
    micro = build(balance_loss_granularity="micro").train()
    halves = [micro(x[i:i + 2]).balance_loss for i in (0, 2)]
    assert abs((sum(halves) / 2).item() - out.balance_loss.item()) > 1e-4
