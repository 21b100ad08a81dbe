"""The speed path: `python -m train.bench` runs end to end on tiny shapes, and each optimisation of the training path
(compiled blocks and loss, SDPA backend choice) computes what the plain path computes. GPU-only checks (Inductor on
CUDA, cuDNN/flash attention, grouped GEMM, Liger) are marked `gpu` and skipped on the CPU."""
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch._dynamo
from torch import nn

from models import Qwen3ForCausalLM, load_preset
from models import loss as loss_mod
from models.loss import fused_linear_cross_entropy
from train import bench

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def build(name="tiny_dense", seed=0, device="cpu", **overrides):
    cfg = dataclasses.replace(load_preset(name), **overrides)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(cfg)
    model.to_empty(device=device)
    model.init_weights(seed=seed)
    return model


def batch(cfg, b=2, t=64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (b, t + 1), generator=g)
    labels = ids[:, 1:].clone()
    labels[0, :5] = -100  # ignored positions take part too
    return ids[:, :-1].to(device), labels.to(device)


def loss_and_grads(model, ids, labels):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=labels, return_token_losses=True)
    out.loss.backward()
    return out, {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def assert_grads_close(ref, got, rtol):
    for name, g in ref.items():
        err = ((got[name].float() - g.float()).norm() / g.float().norm().clamp(min=1e-30)).item()
        assert err <= rtol, f"{name}: relative error {err:.2e} > {rtol}"


# ------------------------------------------------------------------------------------------------ the bench


def test_bench_tiny_on_cpu_has_every_row_and_sane_numbers(tmp_path, capsys):
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--device", "cpu", "--tiny", "--warmup", "1", "--steps", "1", "--json", str(out)]) == 0
        # one thread for every implementation, the ds regime's engine included (its set-up would take them all)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    rows = {(r["case"], r["impl"], r["regime"], r["micro_batch"]): r for r in result["rows"]}
    expected = set()
    for case, mbs in (("tiny_dense", (2, 4)), ("tiny_moe", (2,))):
        for mb in mbs:
            expected |= {(case, impl, reg, mb) for impl in ("tristage", "hf", "liger") for reg in ("bf16", "ds")}
    expected |= {("tiny_dense", "tristage", "torch_master", mb) for mb in (2, 4)}  # DeepSpeed's reference
    assert set(rows) == expected
    for key, r in rows.items():
        if key[1] == "liger":  # Triton kernels: no CPU run, a note instead
            assert r["status"].startswith("skipped"), r
            continue
        assert r["status"] == "ok", (key, r["status"], r.get("traceback"))
        assert r["tokens_per_step"] == key[3] * 128
        assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / r["step_s"])
        assert r["step_s_min"] <= r["step_s"] <= r["step_s_max"]
        assert "mfu" not in r  # no peak figure for a CPU
    for key, r in rows.items():
        if key[1] == "tristage" and key[2] in ("bf16", "ds"):
            peer = rows[(key[0], "hf", key[2], key[3])]
            assert r["vs_hf"] == pytest.approx(r["tokens_per_s"] / peer["tokens_per_s"])
            assert r["vs_liger"] is None
    table = {(e["case"], e["regime"]): e for e in result["summary"]["table"]}
    assert list(table) == [("tiny_dense", "bf16"), ("tiny_dense", "ds"), ("tiny_dense", "torch_master"),
                           ("tiny_moe", "bf16"), ("tiny_moe", "ds")]  # by case, though the runs went bf16 first
    best = max((r for k, r in rows.items() if k[:3] == ("tiny_dense", "tristage", "bf16")),
               key=lambda r: r["tokens_per_s"])
    assert table[("tiny_dense", "bf16")]["tristage"]["micro_batch"] == best["micro_batch"]
    assert table[("tiny_dense", "bf16")]["best_vs_hf"] > 0
    assert {(z["case"], z["micro_batch"]) for z in result["summary"]["zero1"]} == {("tiny_dense", 2), ("tiny_dense", 4)}
    assert result["meta"]["torch"] == torch.__version__ and result["meta"]["command"].startswith("python -m train.bench")
    assert result["meta"]["threads"] == 1
    assert "## tristage vs peers" in printed and printed.rstrip().endswith("`")  # the table comes last


def test_train_metrics_are_compared_with_the_bench_ds_row(tmp_path):
    rows = [{"case": "c", "impl": "tristage", "regime": "ds", "micro_batch": 4, "variant": "default", "status": "ok",
             "tokens_per_s": 1000.0}]
    metrics = tmp_path / "metrics.jsonl"
    # each step 95 tokens in 0.1 s of its own, then 0.025 s of the loop's work before the next one starts
    lines = [{"event": "stage_start"}] + [{"step": i, "global_step": i, "tokens": 95 * i, "time": 0.125 * i,
                                           "tokens_per_s": 10.0 if i < 3 else 950.0, "memory_gib": 1.0}
                                          for i in range(1, 14)]
    metrics.write_text("\n".join(json.dumps(x) for x in lines) + "\n{\"partial")
    out = bench.train_comparison(metrics, rows, "c", 4, skip_steps=3)
    assert out["steps_logged"] == 13 and out["steps_used"] == 10
    assert out["step_tokens_per_s"] == 950.0  # timed inside the step
    assert out["tokens_per_s"] == pytest.approx(760.0) and out["ratio"] == pytest.approx(0.76)  # by the clock


def test_liger_patches_last_for_the_run_and_are_undone(monkeypatch):
    """Liger's patches are module globals looked up at call time: on during a liger run, gone for the next hf run."""
    import sys
    import types

    from transformers.models.qwen3 import modeling_qwen3

    def fake_apply():
        modeling_qwen3.apply_rotary_pos_emb = "liger rope"
        modeling_qwen3.Qwen3ForCausalLM.forward = "liger forward"
        modeling_qwen3.LigerOnly = True

    fake = types.ModuleType("liger_kernel.transformers")
    fake.apply_liger_kernel_to_qwen3, fake.apply_liger_kernel_to_qwen3_moe = fake_apply, None
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    rope, forward = modeling_qwen3.apply_rotary_pos_emb, modeling_qwen3.Qwen3ForCausalLM.forward
    with bench._LigerPatch(moe=False):
        assert modeling_qwen3.apply_rotary_pos_emb == "liger rope" and modeling_qwen3.LigerOnly
        assert modeling_qwen3.Qwen3ForCausalLM.forward == "liger forward"
    assert modeling_qwen3.apply_rotary_pos_emb is rope and modeling_qwen3.Qwen3ForCausalLM.forward is forward
    assert not hasattr(modeling_qwen3, "LigerOnly")


def test_the_default_plan_runs_first_what_a_time_limit_should_keep():
    """gpu_check.sh gives the bench ~290 s for 32 runs with cold compiles: in case order (0.6B's DeepSpeed rows
    before 1.7B's bf16 ones) the MoE and 32K cases were killed before they ran. Now every case's pure bf16 rows come
    first, then the DeepSpeed ones (the ZeRO-1 vs plain pair leading), and the plain HF rows that ran out of memory
    in the reference figures are listed last with a note instead of run."""
    runs = bench.default_runs(bench.CASES, bench.IMPLS, ("bf16", "ds", "torch_master"), True, {})
    keys = [(r.case, r.impl, r.regime, r.micro_batch) for r in runs]
    expected = {(c, impl, regime, mb) for c, case in bench.CASES.items() for mb in case.micro_batches
                for impl in bench.IMPLS for regime in ("bf16", "ds")}
    expected |= {("0.6b_4k", "tristage", "torch_master", mb) for mb in (4, 8)}
    assert len(keys) == 32 and set(keys) == expected  # nothing dropped, nothing twice
    known_oom = [("0.6b_4k", "hf", "bf16", 8), ("0.6b_32k", "hf", "bf16", 1), ("0.6b_4k", "hf", "ds", 8),
                 ("0.6b_32k", "hf", "ds", 1)]
    assert keys[-4:] == known_oom and all(r.skip for r in runs[-4:]) and not any(r.skip for r in runs[:-4])
    ran = keys[:-4]
    assert [k[2] for k in ran] == ["bf16"] * 13 + ["ds", "torch_master", "ds", "ds"] + ["ds", "torch_master"] + [
        "ds"] * 9
    assert ran[:3] == [("0.6b_4k", impl, "bf16", 4) for impl in ("tristage", "liger", "hf")]
    assert [k[0] for k in ran[:13]] == ["0.6b_4k"] * 5 + ["1.7b_4k"] * 3 + ["moe_8l_4k"] * 3 + ["0.6b_32k"] * 2
    assert ran[13:15] == [("0.6b_4k", "tristage", "ds", 4), ("0.6b_4k", "tristage", "torch_master", 4)]
    row = bench.run_one(runs[-1], bench.CASES["0.6b_32k"], torch.device("cpu"), 1, 1)  # costs no time
    assert row["status"].startswith("skipped: known out of memory") and "tokens_per_s" not in row


def test_a_kill_leaves_the_finished_rows_in_a_complete_json(tmp_path, monkeypatch):
    """gpu_check.sh kills the bench at its limit: the rows finished before stay in bench.json, and a kill while the
    file is written leaves the previous complete JSON (it was rewritten in place: a kill there left half a file)."""
    out, calls = tmp_path / "bench.json", []

    def run_one(run, case, device, warmup, steps):
        calls.append(run)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the kill, during the third run
        return {"case": run.case, "impl": run.impl, "regime": run.regime, "variant": run.variant,
                "micro_batch": run.micro_batch, "status": "ok", "tokens_per_s": 100.0 * len(calls)}

    monkeypatch.setattr(bench, "run_one", run_one)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--device", "cpu", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["impl"], r["tokens_per_s"]) for r in rows] == [("tristage", 100.0), ("liger", 200.0)]

    before, write_text = out.read_text(), Path.write_text

    def torn(path, text, *args, **kwargs):
        write_text(path, text[:len(text) // 2])
        raise KeyboardInterrupt  # killed half way through the file

    monkeypatch.setattr(Path, "write_text", torn)
    with pytest.raises(KeyboardInterrupt):
        bench._write(out, {**json.loads(before), "rows": rows * 50})
    monkeypatch.setattr(Path, "write_text", write_text)
    assert out.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["bench.json"]


def test_bench_rejects_unknown_cases():
    with pytest.raises(SystemExit, match="unknown cases"):
        bench.main(["--device", "cpu", "--cases", "no_such_case"])


# ------------------------------------------------------------------------------------------------ the optimisations


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_loss_function_equals_the_eager_chunk_loop(monkeypatch, dtype):
    """The function torch.compile fuses (here run eagerly) gives the loss, token losses and gradients of the in-place loop."""
    monkeypatch.setitem(loss_mod._COMPILED, "fn", loss_mod._softmax_xent_grad)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(70, 32, generator=g).to(dtype).requires_grad_()
    w = (0.3 * torch.randn(300, 32, generator=g)).to(dtype).requires_grad_()
    labels = torch.randint(0, 300, (70,), generator=g)
    labels[3:9] = -100
    results = []
    for compiled in (False, True):
        h.grad = w.grad = None
        loss, tok = fused_linear_cross_entropy(h, w, labels, chunk_size=32, compiled=compiled)  # 3 uneven chunks
        loss.backward()
        results.append((loss.detach(), tok, h.grad.clone(), w.grad.clone()))
    (l0, t0, gh0, gw0), (l1, t1, gh1, gw1) = results
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # bf16: the gradient is rounded to bf16 either way
    assert l1.item() == pytest.approx(l0.item(), rel=1e-6, abs=1e-6)
    assert torch.allclose(t1, t0, rtol=1e-6, atol=1e-6) and (t1[3:9] == 0).all()
    for a, b in ((gh0, gh1), (gw0, gw1)):
        assert ((a.float() - b.float()).norm() / a.float().norm()).item() < tol


def test_compiled_blocks_share_one_graph_and_give_the_same_loss_and_grads(monkeypatch):
    """Regional compilation: one graph for all blocks (compile time does not grow with depth), same numbers.

    Captured with the aot_eager backend (dynamo + AOT autograd, no code generation: seconds on a CPU); the
    Inductor kernels themselves are compared on the GPU (test_inductor_on_cuda_matches_eager).
    """
    torch._dynamo.reset()
    compile_ = nn.Module.compile
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: compile_(self, backend="aot_eager"))
    monkeypatch.setitem(loss_mod._COMPILED, "fn", loss_mod._softmax_xent_grad)
    plain = build()
    fast = build(compile=True)
    assert list(fast.state_dict()) == list(plain.state_dict())  # Module.compile keeps the names
    assert fast.lm_head.compiled and not plain.lm_head.compiled
    ids, labels = batch(plain.config)
    from torch._dynamo.utils import counters

    counters.clear()
    ref, ref_grads = loss_and_grads(plain, ids, labels)
    got, got_grads = loss_and_grads(fast, ids, labels)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])  # 4 blocks, one graph
    assert got.loss.item() == pytest.approx(ref.loss.item(), rel=1e-6)
    assert torch.allclose(got.token_losses, ref.token_losses, rtol=1e-5, atol=1e-6)
    assert_grads_close(ref_grads, got_grads, 1e-5)
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["math", "flash", "cudnn", "cudnn_mha", "efficient"])
def test_attention_backends_compute_the_same_attention(backend):
    """Every attention_backend gives the default's loss and gradients (on the CPU the CUDA kernels fall back)."""
    plain, chosen = build(), build(attention_backend=backend)
    assert (chosen.model.layers[0].self_attn.expand_kv) == (backend == "cudnn_mha")
    ids, labels = batch(plain.config)
    ref, ref_grads = loss_and_grads(plain, ids, labels)
    got, got_grads = loss_and_grads(chosen, ids, labels)
    assert got.loss.item() == pytest.approx(ref.loss.item(), rel=1e-5)
    assert_grads_close(ref_grads, got_grads, 1e-4)


def test_attention_backend_is_validated():
    with pytest.raises(ValueError, match="attention_backend"):
        dataclasses.replace(load_preset("tiny_dense"), attention_backend="fa3").validate()


def test_gpu_speed_experiment_is_the_bench_shape():
    """conf/experiment/gpu_speed.yaml trains the bench's 0.6b_4k case through DeepSpeed, one micro-batch per step."""
    from test_train_config import compose_cfg
    from train.config import validate

    cfg = compose_cfg(["experiment=gpu_speed"])
    (plan,) = validate(cfg, 1)
    case = bench.CASES["0.6b_4k"]
    assert (plan.seq_len, plan.micro_batch_size, plan.grad_accum) == (case.seq_len, 4, 1)
    assert plan.micro_batch_size in case.micro_batches and plan.steps >= cfg.max_steps > 0
    assert cfg.model.name == case.preset and cfg.model.compile and cfg.deepspeed.zero_stage == 1
    assert cfg.data.name == "fixture" and not cfg.eval.enabled and not cfg.checkpoint.export_hf


# ------------------------------------------------------------------------------------------------ GPU only


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["tiny_dense", "tiny_moe"])
def test_inductor_on_cuda_matches_eager(name):
    """The compiled blocks and loss (Inductor, Triton) against the eager model, bf16 on CUDA."""
    torch._dynamo.reset()
    plain = build(name, device="cuda").to(torch.bfloat16)
    fast = build(name, device="cuda", compile=True).to(torch.bfloat16)
    ids, labels = batch(plain.config, b=4, t=256, device="cuda")
    ref, ref_grads = loss_and_grads(plain, ids, labels)
    got, got_grads = loss_and_grads(fast, ids, labels)
    assert got.loss.item() == pytest.approx(ref.loss.item(), rel=2e-3)
    assert_grads_close(ref_grads, got_grads, 3e-2)
    torch._dynamo.reset()


def assert_bf16_cuda_models_agree(reference, model, b, t):
    """In bf16 on CUDA, `model` gives `reference`'s loss (2e-3) and gradients (3e-2) on one random batch."""
    reference, model = reference.to(torch.bfloat16), model.to(torch.bfloat16)
    ids, labels = batch(reference.config, b=b, t=t, device="cuda")
    ref, ref_grads = loss_and_grads(reference, ids, labels)
    got, got_grads = loss_and_grads(model, ids, labels)
    assert got.loss.item() == pytest.approx(ref.loss.item(), rel=2e-3)
    assert_grads_close(ref_grads, got_grads, 3e-2)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash", "cudnn", "cudnn_mha", "efficient"])
def test_cuda_attention_kernels_match_math(backend):
    """Each SDPA kernel the config can pick gives the math kernel's loss and gradients (bf16)."""
    assert_bf16_cuda_models_agree(build(device="cuda", attention_backend="math"),
                                  build(device="cuda", attention_backend=backend), b=2, t=512)


@gpu
@pytest.mark.gpu
def test_grouped_gemm_experts_match_the_loop_on_cuda():
    assert_bf16_cuda_models_agree(build("tiny_moe", device="cuda", moe_implementation="loop"),
                                  build("tiny_moe", device="cuda", moe_implementation="grouped_mm"), b=4, t=256)


@gpu
@pytest.mark.gpu
def test_bench_tiny_on_cuda_runs_every_peer(tmp_path):
    out = tmp_path / "bench.json"
    assert bench.main(["--device", "cuda", "--tiny", "--cases", "tiny_dense", "--warmup", "1", "--steps", "2",
                       "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    liger_missing = bench.liger_unavailable(torch.device("cuda"))
    for r in result["rows"]:
        if r["impl"] == "liger" and liger_missing:
            assert r["status"].startswith("skipped")
        else:
            assert r["status"] == "ok", (r, r.get("traceback"))
            assert 0 < r["mfu_causal"] < r["mfu"] < 1 and r["peak_gib"] > 0
