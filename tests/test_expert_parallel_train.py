"""Expert parallelism for real: `python -m train` on 2 and 4 gloo ranks with expert_parallel_size 2 and 4
against EP = 1 (losses, gradient norms, expert load, final weights, HF logits), exact resume under EP,
re-sharded layout changes (weights and AdamW state), and the three-stage smoke curriculum with EP = 2 (what CI runs)."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from safetensors.torch import load_file

from train.engine import safe_torch_load
from trainutil import MOE1, MOE_GENERAL, SMOKE, losses, records, run_train, smoke_run, steps, stopped_at

TEN_STEPS = [*SMOKE, *MOE_GENERAL]  # the General stage alone, 10 steps (trainutil says why these settings)
TOL = 1e-5


def ten_steps(tmp_path_factory, nproc: int, zero: str, ep: int) -> Path:
    """The 10-step General stage of a layout, run once per test session (every xdist worker shares it)."""
    return smoke_run(tmp_path_factory, f"{nproc}-{zero}-ep{ep}", [*MOE_GENERAL, f"deepspeed={zero}",
                                                                   f"expert_parallel_size={ep}"], nproc=nproc)


def hf_weights(run_dir: Path, stage: str = "general") -> Dict[str, torch.Tensor]:
    """The run's HF export of a stage (one file for these tiny models)."""
    return load_file(str(run_dir / "hf" / stage / "model.safetensors"))


def max_diff(a: List[dict], b: List[dict], key: str) -> float:
    """Largest |a - b| of a per-step metric (nested lists flattened)."""
    def flat(v):
        return [x for row in v for x in row] if isinstance(v, list) else [v]
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(flat(ra[key]), flat(rb[key])))


@pytest.mark.slow
@pytest.mark.parametrize("nproc, zero, eps", [(2, "zero2", [2]), (4, "zero1", [2, 4])])
def test_expert_parallel_equals_ep1(data_root, tmp_path_factory, nproc, zero, eps):
    reference = ten_steps(tmp_path_factory, nproc, zero, 1)
    ref_steps, ref_weights = steps(reference), hf_weights(reference)
    assert len(ref_steps) == 10 and ref_steps[-1]["loss"] < ref_steps[0]["loss"] - 0.3  # it trains
    for ep in eps:
        run_dir = ten_steps(tmp_path_factory, nproc, zero, ep)
        got = steps(run_dir)
        assert [r["step"] for r in got] == list(range(1, 11))
        diffs = {k: max_diff(ref_steps, got, k) for k in
                 ("loss", "lm_loss", "balance_loss", "grad_norm", "expert_load")}
        weights = hf_weights(run_dir)
        assert weights.keys() == ref_weights.keys() and len(weights) == 4 * (8 * 3 + 9) + 3
        diffs["weights"] = max((weights[k] - ref_weights[k]).abs().max().item() for k in weights)
        print(f"{nproc} ranks {zero} EP={ep} vs EP=1, max |difference|:",
              ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
        assert all(v <= TOL for v in diffs.values()), diffs
        # DeepSpeed's MoE checkpoint layout: the experts are not in the model-states file but one file each
        ckpt = run_dir / "checkpoints" / "0-general-step0000010"
        assert len(list(ckpt.glob("layer_*_expert_*_mp_rank_00_model_states.pt"))) == 4 * 8
        with safe_torch_load():
            module = torch.load(ckpt / "mp_rank_00_model_states.pt")["module"]
        assert not [k for k in module if ".experts." in k] and "model.layers.0.mlp.gate.weight" in module
        assert len(list(ckpt.glob("zero_pp_rank_*_optim_states.pt"))) == nproc
        meta = json.loads((ckpt / "meta.json").read_text())
        assert (meta["expert_parallel_size"], meta["world_size"]) == (ep, nproc)


@pytest.mark.slow
def test_logged_balance_loss_is_the_global_batch_value_on_any_split(data_root, tmp_path_factory):
    """Step 1's global batch on 1 rank (4 micro-batches) and on 2 ranks (2 each): the same logged balance loss
    (the step's E * sum f_i P_i), loss and expert load. The mean of the micro-batches' partial-count losses,
    logged before, differed with the split. (The one-rank run is the shared one with the z-loss on, which changes
    no step-1 value but the aux loss.)"""
    ref = steps(ten_steps(tmp_path_factory, 2, "zero2", 1))[0]
    one = steps(smoke_run(tmp_path_factory, "tiny_moe-1", MOE1))[0]
    assert one["step"] == ref["step"] == 1
    assert max_diff([one], [ref], "expert_load") <= TOL and abs(one["lm_loss"] - ref["lm_loss"]) <= TOL
    assert abs(one["balance_loss"] - ref["balance_loss"]) <= TOL, (one["balance_loss"], ref["balance_loss"])
    assert abs(one["z_loss"] - ref["z_loss"]) <= TOL
    # the logged aux and total loss are that step's too: aux = coef x balance + z_coef x z, loss = lm + aux
    assert one["aux_loss"] == pytest.approx(0.001 * one["balance_loss"] + 1e-3 * one["z_loss"], rel=1e-6)
    assert one["loss"] == pytest.approx(one["lm_loss"] + one["aux_loss"], rel=1e-9)


@pytest.mark.slow
def test_hf_export_under_ep_gives_ep1_logits(data_root, tmp_path_factory):
    from models.hf import load_hf

    ref = load_hf(ten_steps(tmp_path_factory, 2, "zero2", 1) / "hf" / "general").eval()
    ep2 = load_hf(ten_steps(tmp_path_factory, 2, "zero2", 2) / "hf" / "general").eval()
    assert ep2.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 8  # one directory with every expert
    ids = torch.randint(0, 8192, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ep2(ids).logits, ref(ids).logits, rtol=0, atol=TOL)


@pytest.mark.slow
def test_eval_of_an_expert_parallel_checkpoint_equals_its_hf_export(data_root, tmp_path_factory, tmp_path, capsys):
    """`python -m train.eval` on an EP checkpoint folder: the experts are not in its model-states file but in
    DeepSpeed's per-expert files, which were not read (exit 1, missing gate_up_proj). The stage-end checkpoint
    now loads to the stage's HF export's weights bitwise, and one missing per-expert file exits 2 naming it,
    before anything is written."""
    from models.hf import load_hf
    from train.eval.__main__ import main as eval_main
    from train.eval.target import load_model

    run_dir = ten_steps(tmp_path_factory, 2, "zero2", 2)
    ckpt = run_dir / "checkpoints" / "0-general-step0000010"
    ours = load_model(ckpt, torch.device("cpu")).state_dict()
    exported = load_hf(run_dir / "hf" / "general").state_dict()
    assert ours.keys() == exported.keys() and ours["model.layers.0.mlp.experts.gate_up_proj"].shape[0] == 8
    assert all(torch.equal(ours[k], exported[k]) for k in ours)
    common = ["--max-tokens", "64", "--device", "cpu"]
    assert eval_main(["ppl", str(ckpt), "--out", str(tmp_path / "a"), *common]) == 0
    assert eval_main(["ppl", str(run_dir / "hf" / "general"), "--out", str(tmp_path / "b"), *common]) == 0
    a, b = (json.loads((tmp_path / x / "general" / "ppl.json").read_text()) for x in "ab")
    assert a["by_component"] == b["by_component"] and a["by_component"]

    broken = tmp_path / "run" / "checkpoints" / ckpt.name
    shutil.copytree(ckpt, broken)
    (broken / "layer_2_expert_5_mp_rank_00_model_states.pt").unlink()
    capsys.readouterr()
    assert eval_main(["ppl", str(broken), "--out", str(tmp_path / "c"), *common]) == 2
    assert (f"{broken}: incomplete expert-parallel checkpoint (1 per-expert files missing, e.g. "
            "layer_2_expert_5_mp_rank_00_model_states.pt)") in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_export_of_an_expert_parallel_checkpoint_equals_the_loops(data_root, tmp_path_factory, tmp_path):
    """`python -m train.export` of the EP 2 run's stage-end checkpoint: the same files as the loop's hf/general,
    every tensor bitwise (all 8 experts of each layer, from the two expert-parallel ranks' files)."""
    from test_export import assert_same_export
    from train.export import main as export_main

    run_dir = ten_steps(tmp_path_factory, 2, "zero2", 2)
    assert export_main([str(run_dir / "checkpoints" / "0-general-step0000010"), str(tmp_path / "out")]) == 0
    assert_same_export(tmp_path / "out", run_dir / "hf" / "general")


def resume_records(run_dir: Path) -> List[dict]:
    """The `resume` events of a run."""
    return [r for r in records(run_dir) if r.get("event") == "resume"]


@pytest.mark.slow
def test_resume_under_ep_is_exact_and_other_layouts_are_resharded(data_root, tmp_path_factory, tmp_path):
    """Stopped at step 5 under EP = 2 on 2 ranks: the same layout resumes bit for bit; EP = 1 re-shards the
    experts and their AdamW state (to rounding); ZeRO-3, which EP checkpoints cannot reach, is refused."""
    reference = ten_steps(tmp_path_factory, 2, "zero2", 2)
    run_dir = stopped_at(ten_steps(tmp_path_factory, 2, "zero2", 2), 5, tmp_path / "resumed")
    base = [*TEN_STEPS, f"run_dir={run_dir}"]
    shutil.copytree(run_dir, tmp_path / "to_ep1")

    saved = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    proc = run_train([*base, "deepspeed=zero3", "expert_parallel_size=1"], nproc=2)
    assert proc.returncode != 0  # 2 from every rank; torchrun reports 1
    assert ("was saved with expert_parallel_size=2; re-sharding it into deepspeed.zero_stage=3 is not supported"
            in proc.stdout)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == saved  # nothing written
    assert len(steps(run_dir)) == 5

    proc = run_train([*base, "deepspeed=zero2", "expert_parallel_size=2"], nproc=2)  # the same layout
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert losses(run_dir) == losses(reference)  # bit for bit, loss and gradient norm at every step
    ref_weights, weights = hf_weights(reference), hf_weights(run_dir)
    assert all(torch.equal(weights[k], ref_weights[k]) for k in ref_weights)
    assert [r["resharded"] for r in resume_records(run_dir)] == [False]

    # EP = 1 on the same 2 ranks: each expert's weights and moments now live in the dense optimizer groups
    other = tmp_path / "to_ep1"
    proc = run_train([*TEN_STEPS, f"run_dir={other}", "deepspeed=zero2", "expert_parallel_size=1"], nproc=2)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert [(r["resharded"], r["saved_world_size"]) for r in resume_records(other)] == [(True, 2)]
    got = steps(other)
    assert [r["step"] for r in got] == list(range(1, 11))
    diffs = {k: max_diff(steps(reference), got, k) for k in ("loss", "grad_norm", "expert_load")}
    # measured: loss 2e-8, gradient norm 2e-7 (the reduction order of the dense groups differs from EP = 2)
    assert all(v <= 1e-6 for v in diffs.values()), diffs


@pytest.mark.slow
def test_an_expert_parallel_checkpoint_under_zero0_resumes_refused_and_inits_from(data_root, tmp_path_factory, tmp_path):
    """EP = 1 under fp32 deepspeed=zero0 can hold an EP = 2 run's model, but DeepSpeed reads its universal format
    into ZeRO (or bf16) optimizers only: a resume or an init_from of the EP checkpoint failed inside the load with a
    traceback ("'NoneType' object has no attribute 'copy'", exit 1). The resume is refused naming the ways; the
    init_from takes the re-sharded copy's whole weights, the experts of both expert-parallel ranks."""
    source = ten_steps(tmp_path_factory, 2, "zero2", 2)
    run_dir = stopped_at(source, 5, tmp_path / "resumed")
    ckpt = run_dir / "checkpoints" / "0-general-step0000005"
    saved = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    proc = run_train([*TEN_STEPS, f"run_dir={run_dir}", "deepspeed=zero0", "expert_parallel_size=1"])
    assert proc.returncode == 2, proc.stdout[-4000:]
    assert (f"{ckpt} was saved under deepspeed.zero_stage=2 on 2 rank(s), its AdamW state partitioned; "
            f"deepspeed.zero_stage=0 in fp32 cannot take it re-sharded") in proc.stdout, proc.stdout[-4000:]
    assert "Traceback" not in proc.stdout
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == saved and len(steps(run_dir)) == 5
    first = {}
    for name, init in [("ckpt", source / "checkpoints" / "0-general-step0000010"), ("hf", source / "hf" / "general")]:
        proc = run_train([*TEN_STEPS, f"run_dir={tmp_path / name}", f"init_from={init}", "deepspeed=zero0",
                          "expert_parallel_size=1", "max_steps=1"])
        assert proc.returncode == 0, (name, proc.stdout[-4000:])
        first[name] = steps(tmp_path / name)[0]["loss"]
    assert first["ckpt"] == first["hf"] < steps(source)[0]["loss"] - 0.3  # the trained weights, all experts


@pytest.mark.slow
def test_zero2_offload_under_ep_trains_and_reshards(data_root, tmp_path_factory, tmp_path):
    """The 235B-A22B recipe's layout in miniature (ZeRO-2 with the optimizer offloaded, EP = 2): it trains as
    ZeRO-2 does, and its checkpoint of step 5 resumes under EP = 1, offloaded still, to the same losses."""
    reference = ten_steps(tmp_path_factory, 2, "zero2", 2)
    run_dir = tmp_path / "run"
    base = [*TEN_STEPS, f"run_dir={run_dir}", "deepspeed=zero2_offload"]
    proc = run_train([*base, "expert_parallel_size=2", "max_steps=5"], nproc=2)
    assert proc.returncode == 0, proc.stdout[-4000:]
    proc = run_train([*base, "expert_parallel_size=1"], nproc=2)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert [r["resharded"] for r in resume_records(run_dir)] == [True]
    assert [r["step"] for r in steps(run_dir)] == list(range(1, 11))
    diffs = {k: max_diff(steps(reference), steps(run_dir), k) for k in ("loss", "grad_norm")}
    assert all(v <= 1e-6 for v in diffs.values()), diffs


@pytest.mark.slow
def test_ep1_checkpoint_resumes_under_ep2_and_zero1(data_root, tmp_path_factory, tmp_path):
    """The other direction: experts saved inside the dense ZeRO-2 groups, resumed under EP = 2 and ZeRO-1."""
    reference = ten_steps(tmp_path_factory, 2, "zero2", 1)
    run_dir = stopped_at(ten_steps(tmp_path_factory, 2, "zero2", 1), 5, tmp_path / "run")
    proc = run_train([*TEN_STEPS, f"run_dir={run_dir}", "deepspeed=zero1", "expert_parallel_size=2"], nproc=2)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert [r["resharded"] for r in resume_records(run_dir)] == [True]
    assert not (run_dir / "checkpoints" / ".universal").exists()  # the copy went at the next checkpoint
    diffs = {k: max_diff(steps(reference), steps(run_dir), k) for k in ("loss", "grad_norm", "expert_load")}
    assert all(v <= 1e-6 for v in diffs.values()), diffs
    weights, ref_weights = hf_weights(run_dir), hf_weights(reference)
    assert max((weights[k] - ref_weights[k]).abs().max().item() for k in weights) <= TOL


@pytest.mark.slow
def test_expert_parallel_conversion_reassembles_every_expert(data_root, tmp_path_factory, tmp_path):
    """4 ranks, EP = 2: each expert stack's optimizer state is split over an expert-data-parallel group of 2
    (ranks 0 and 2 hold experts 0-3, ranks 1 and 3 experts 4-7). The universal copy's fp32 weights equal the
    HF export of the same step exactly, and every state holds all 8 experts."""
    from train.reshard import convert_expert_parallel

    run_dir = ten_steps(tmp_path_factory, 4, "zero1", 2)
    ckpt = run_dir / "checkpoints" / "0-general-step0000010"
    convert_expert_parallel(ckpt, tmp_path / "u", 2, 4)
    exported = hf_weights(run_dir)
    zero = tmp_path / "u" / "zero"
    names = sorted(p.name for p in zero.iterdir() if p.is_dir())
    moments = {}
    assert len(names) == 4 * 11 + 3  # every parameter once: 11 per layer, embedding, final norm, head
    for name in names:
        fp32 = torch.load(zero / name / "fp32.pt", weights_only=True)["param"]
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            assert fp32.shape[0] == 8
            layer = name[:-len(".gate_up_proj")] if name.endswith("gate_up_proj") else name[:-len(".down_proj")]
            for e in range(8):
                if name.endswith("gate_up_proj"):
                    want = torch.cat([exported[f"{layer}.{e}.gate_proj.weight"], exported[f"{layer}.{e}.up_proj.weight"]])
                else:
                    want = exported[f"{layer}.{e}.down_proj.weight"]
                assert torch.equal(fp32[e], want), (name, e)
        else:
            assert torch.equal(fp32, exported[name]), name
        for key in ("exp_avg", "exp_avg_sq"):
            moments[name, key] = torch.load(zero / name / f"{key}.pt", weights_only=True)["param"]
            assert moments[name, key].shape == fp32.shape, (name, key)
    assert not (tmp_path / "u" / "tmp").exists()
    # each moment is the one saved (not merely nonzero: swapped moments had the right shape): rank 0 holds the
    # start of every flat partition it is in (position 0, expert-parallel rank 0), so each of its fragments is the
    # first `numel` values of a parameter's whole tensor
    with safe_torch_load():
        sd = torch.load(ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=True)["optimizer_state_dict"]
    checked = set()
    for g, mapping in enumerate(sd["param_slice_mappings"]):
        for name, frag in mapping.items():
            for key in ("exp_avg", "exp_avg_sq"):
                saved = sd["base_optimizer_state"]["state"][g][key].narrow(0, frag.start, frag.numel)
                assert torch.equal(moments[name, key].flatten()[:frag.numel], saved), (name, key)
            checked.add(name)
    assert any(".experts." in n for n in checked) and any(".experts." not in n for n in checked), checked


@pytest.mark.slow
def test_reshard_of_an_incomplete_checkpoint_fails_on_every_rank(data_root, tmp_path_factory, tmp_path):
    """A missing ZeRO shard: the launch stops on both ranks naming the folder and what is missing (not a hang
    in the barrier behind rank 0), and the checkpoint is left as it was."""
    run_dir = stopped_at(ten_steps(tmp_path_factory, 2, "zero2", 2), 5, tmp_path / "run")  # a run to go on with
    ckpt = run_dir / "checkpoints" / "0-general-step0000005"
    (ckpt / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    before = sorted(p.name for p in ckpt.iterdir())
    proc = run_train([*TEN_STEPS, f"run_dir={run_dir}", "deepspeed=zero2", "expert_parallel_size=1"], nproc=2,
                     timeout=300)
    assert proc.returncode != 0
    assert (f"re-sharding {ckpt} for this launch's layout failed (FileNotFoundError: {ckpt}: expected the ZeRO "
            "optimizer shards of ranks 0..1, found those of ranks [0])") in proc.stdout
    assert sorted(p.name for p in ckpt.iterdir()) == before
    assert not (run_dir / "checkpoints" / ".universal" / "ep1" / ckpt.name).exists()


@pytest.mark.slow
def test_init_from_under_ep(data_root, tmp_path_factory, tmp_path):
    """A new run starts from an EP run's HF export or checkpoint folder with the same weights, under the same
    expert_parallel_size (read directly) or another one (re-sharded, its AdamW state dropped, the copy removed)."""
    source = ten_steps(tmp_path_factory, 2, "zero2", 2)
    base = [*TEN_STEPS, "deepspeed=zero2", "max_steps=1"]
    first = {}
    for name, ep, init in [("hf", 2, source / "hf" / "general"), ("hf1", 1, source / "hf" / "general"),
                           ("ckpt", 2, source / "checkpoints" / "0-general-step0000010"),
                           ("ckpt1", 1, source / "checkpoints" / "0-general-step0000010")]:
        run_dir = tmp_path / name
        proc = run_train([*base, f"run_dir={run_dir}", f"expert_parallel_size={ep}", f"init_from={init}"], nproc=2)
        assert proc.returncode == 0, proc.stdout[-4000:]
        first[name] = steps(run_dir)[0]["loss"]
    assert first["hf"] == first["ckpt"] < steps(source)[0]["loss"] - 0.3  # trained weights, loaded alike
    assert first["ckpt1"] == first["hf1"]  # the experts reassembled from both expert-parallel ranks
    assert not list((tmp_path / "ckpt1" / "checkpoints" / ".universal").glob("*/init_from-*"))


def test_ep_refuses_zero3_at_launch(data_root, tmp_path):
    proc = run_train([*SMOKE, f"run_dir={tmp_path / 'run'}", "model=tiny_moe", "deepspeed=zero3",
                      "expert_parallel_size=2"], nproc=2)
    assert proc.returncode != 0  # 2 from every rank; torchrun reports 1
    assert ("config key 'expert_parallel_size' = 2: needs deepspeed=zero1 or deepspeed=zero2, got "
            "deepspeed.zero_stage=3; DeepSpeed 0.19.8 partitions only AutoEP layers under ZeRO-3") in proc.stdout
    assert not (tmp_path / "run").exists()  # refused before anything ran


@pytest.mark.parametrize("zero, ep, refused", [(0, 2, True), (3, 2, True), (1, 2, False), (2, 2, False),
                                              (0, 1, False), (3, 1, False)])
def test_ep_zero_stages(zero, ep, refused):
    from test_train_config import compose_cfg
    from train import expert_parallel
    from train.config import ConfigError

    cfg = compose_cfg(["model=tiny_moe", f"deepspeed=zero{zero}", f"expert_parallel_size={ep}"])
    if refused:
        with pytest.raises(ConfigError, match=f"expert_parallel_size' = {ep}: needs deepspeed=zero1 or"):
            expert_parallel.check_config(cfg)
    else:
        expert_parallel.check_config(cfg)


@pytest.mark.slow
def test_smoke_curriculum_with_expert_parallelism(data_root, tmp_path):
    """CI's smoke run with EP: experiment=smoke_ep, tiny MoE, 2 ranks, EP = 2, all three stages."""
    run_dir = tmp_path / "smoke_ep"
    proc = run_train(["experiment=smoke_ep", f"run_dir={run_dir}"], nproc=2)
    assert proc.returncode == 0, proc.stdout[-4000:]
    per_step = steps(run_dir)
    assert [(r["stage"], r["step"]) for r in per_step] == [
        ("general", 1), ("general", 2), ("general", 3), ("general", 4), ("reasoning", 1), ("reasoning", 2),
        ("long_context", 1), ("long_context", 2)]
    assert all(math.isfinite(r["loss"]) and r["balance_loss"] > 0 for r in per_step)
    assert per_step[3]["loss"] < per_step[0]["loss"]
    load = per_step[-1]["expert_load"]  # counted over both ranks' tokens, all 8 experts
    assert len(load) == 4 and all(len(row) == 8 and sum(row) == pytest.approx(1.0, abs=1e-3) for row in load)
    for stage in ("general", "reasoning", "long_context"):
        ckpt = next((run_dir / "checkpoints").glob(f"*-{stage}-step*"))
        assert len(list(ckpt.glob("layer_*_expert_*_mp_rank_00_model_states.pt"))) == 4 * 8
        assert hf_weights(run_dir, stage)["model.layers.3.mlp.experts.7.down_proj.weight"].shape == (128, 128)
    evals = [r for r in (json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())
             if r.get("event") == "eval"]
    assert len(evals) == 3 and all(math.isfinite(e["heldout_ppl_geomean"]) for e in evals)


# --------------------------------------------------------------------------------------------------------
# train/reshard.py on hand-made ZeRO-2 shards (seconds, no launch): which rank holds which fragment is spelled out

def _fake_ep_checkpoint(ckpt: Path, world: int = 4, ep: int = 2, experts: int = 4) -> Dict[str, Dict[str, torch.Tensor]]:
    """A ZeRO-2 checkpoint folder as `world` ranks with expert_parallel_size `ep` save it: a dense group
    (a (3, 4) weight and a (5,) bias, flattened, padded to a multiple of `world`, one slice per rank) and an expert
    group (each rank's stack of experts/ep experts of shape (2, 3), sliced over its expert-data-parallel group).
    Returns {name: {state: whole tensor}} with every value distinct, what the universal copy must hold."""
    from deepspeed.utils.tensor_fragment import fragment_address

    local = (experts // ep, 2, 3)
    shapes = {"dense.weight": (3, 4), "dense.bias": (5,), "experts.stack": local}
    whole: Dict[str, Dict[str, torch.Tensor]] = {}
    offset = 0.0
    for name, shape in shapes.items():
        full = (experts, *shape[1:]) if name == "experts.stack" else shape
        n = math.prod(full)
        whole[name] = {key: torch.arange(n, dtype=torch.float32).add(offset + 1000 * i).view(full)
                       for i, key in enumerate(("fp32", "exp_avg", "exp_avg_sq"))}
        offset += n
    ckpt.mkdir(parents=True)
    torch.save({"param_shapes": [{k: shapes[k] for k in ("dense.weight", "dense.bias")}, {"experts.stack": local}],
                "module": {"dense.weight": torch.zeros(3, 4), "dense.bias": torch.zeros(5),
                           "rope_cos": torch.zeros(2)}, "buffer_names": ["rope_cos"], "ds_version": "0.19.8"},
               ckpt / "mp_rank_00_model_states.pt")

    def partition(flats: List[torch.Tensor], names: List[str], ranks: int, pos: int):
        flat = torch.cat(flats)
        size = -(-flat.numel() // ranks)
        flat = torch.cat([flat, torch.zeros(size * ranks - flat.numel())])
        lo, hi, mapping, start = pos * size, (pos + 1) * size, {}, 0
        for name, t in zip(names, flats):
            a, b = max(lo, start), min(hi, start + t.numel())
            if a < b:
                mapping[name] = fragment_address(numel=b - a, start=a - lo)
            start += t.numel()
        return flat[lo:hi].clone(), mapping

    for rank in range(world):
        k, pos = rank % ep, rank // ep
        flat, maps = {}, []
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            dense, m0 = partition([whole[n][key].flatten() for n in ("dense.weight", "dense.bias")],
                                  ["dense.weight", "dense.bias"], world, rank)
            mine = whole["experts.stack"][key][k * local[0]:(k + 1) * local[0]].flatten()
            expert, m1 = partition([mine], ["experts.stack"], world // ep, pos)
            flat[key], maps = (dense, expert), [m0, m1]
        sd = {"zero_stage": 2, "loss_scaler": None, "partition_count": [world, world // ep],
              "base_optimizer_state": {
                  "param_groups": [{"params": [0, 1], "lr": 1e-3, "name": "group0"},
                                   {"params": [2], "lr": 1e-3, "name": "ep_size_2_group0", "moe": True}],
                  "state": {g: {"step": torch.tensor(7.0), "exp_avg": flat["exp_avg"][g],
                                "exp_avg_sq": flat["exp_avg_sq"][g]} for g in (0, 1)}},
              "param_slice_mappings": maps, "single_partition_of_fp32_groups": list(flat["fp32"])}
        torch.save({"optimizer_state_dict": sd}, ckpt / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    return whole


def test_reshard_reassembles_hand_made_expert_parallel_shards(tmp_path):
    """4 ranks, EP = 2: ranks 0 and 2 hold experts 0-1 (each half of their state), ranks 1 and 3 experts 2-3; the
    dense group is sliced over all four. Every state of every parameter comes back whole, in its shape; the
    fitted copy tags the expert stack for the loader, keeps the step, and carries the loading layout's groups."""
    from deepspeed.checkpoint.constants import EP_IS_EXPERT_PARAM, EP_NUM_EXPERTS, OPTIMIZER_STATE_DICT
    from train.reshard import convert_expert_parallel, fit_to_layout

    whole = _fake_ep_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "u"
    convert_expert_parallel(tmp_path / "ckpt", out, 2, 4)
    zero = out / "zero"
    assert sorted(p.name for p in zero.iterdir()) == ["dense.bias", "dense.weight", "experts.stack",
                                                      "optimizer_state.pt"]
    for name, states in whole.items():
        for key, want in states.items():
            got = torch.load(zero / name / f"{key}.pt", weights_only=True)
            assert list(got) == ["param"] and torch.equal(got["param"], want), (name, key)
        assert torch.load(zero / name / "step.pt", weights_only=True) == 7.0
    saved = torch.load(zero / "optimizer_state.pt", weights_only=True)
    assert saved["param_groups"] == [{"lr": 1e-3, "name": "group0"},
                                     {"lr": 1e-3, "name": "ep_size_2_group0", "moe": True}]
    assert saved["partition_count"] == [4, 2] and "base_optimizer_state" not in saved
    assert not (out / "tmp").exists() and (out / "mp_rank_00_model_states.pt").exists()

    # loaded with EP = 2 and ZeRO-1 (the same ranks' layout or another): the stack is tagged, nothing else
    groups = [{"params": [0, 1], "lr": 5e-4, "weight_decay": 0.1}, {"params": [2], "lr": 5e-4, "moe": True}]
    fit_to_layout(out, ["experts.stack"], groups, 2, zero3=False)
    stack = torch.load(zero / "experts.stack" / "fp32.pt", weights_only=True)
    assert stack[EP_IS_EXPERT_PARAM] is True and stack[EP_NUM_EXPERTS] == 4
    assert torch.equal(stack["param"], whole["experts.stack"]["fp32"])
    assert list(torch.load(zero / "dense.weight" / "exp_avg.pt", weights_only=True)) == ["param"]
    state = torch.load(zero / "optimizer_state.pt", weights_only=True)
    want_groups = [{"lr": 5e-4, "weight_decay": 0.1}, {"lr": 5e-4, "moe": True}]
    assert state["param_groups"] == want_groups
    assert state[OPTIMIZER_STATE_DICT] == {"state": {0: {"step": 7.0}}, "param_groups": want_groups}
    # and for ZeRO-3: its model-states file, module entries as placeholders, the buffer as saved
    fit_to_layout(out, [], groups[:1], 1, zero3=True)
    z3 = torch.load(out / "zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=True)
    assert [tuple(v.shape) for v in z3["module"].values()] == [(0,), (0,), (2,)]


def test_fit_to_layout_turns_zero3s_flat_universal_form_into_shaped_states(tmp_path):
    """DeepSpeed's ZeRO-3 universal form: flat tensors, no step.pt, the step in the saved optimizer state, the
    model-states file of ZeRO-3's name. Loaded under ZeRO-1/2: shaped {param: tensor} states, a step.pt each, and
    mp_rank_00_model_states.pt with the whole weights (a tied head read from the embedding's files)."""
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT
    from train.reshard import fit_to_layout

    shapes = {"embed.weight": (4, 3), "norm.weight": (3,)}
    values = {n: {k: torch.arange(math.prod(s), dtype=torch.float32).add(100 * i).view(s)
                  for i, k in enumerate(("fp32", "exp_avg", "exp_avg_sq"))} for n, s in shapes.items()}
    zero = tmp_path / "zero"
    for name, states in values.items():
        (zero / name).mkdir(parents=True)
        for key, t in states.items():
            torch.save(t.flatten(), zero / name / f"{key}.pt")
    torch.save({OPTIMIZER_STATE_DICT: {"state": {0: {"step": 3}}, "param_groups": [{"lr": 1.0}]},
                "fp32_flat_groups": [torch.zeros(15)], "param_groups": [{"lr": 1.0}]}, zero / "optimizer_state.pt")
    torch.save({"param_shapes": [shapes], "module": {n: torch.empty(0) for n in ("embed.weight", "norm.weight",
                                                                                 "head.weight")},
                "shared_params": {"head.weight": "embed.weight"}, "ds_version": "0.19.8"},
               tmp_path / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    fit_to_layout(tmp_path, [], [{"params": [0, 1], "lr": 2.0}], 1, zero3=False)
    for name, states in values.items():
        for key, want in states.items():
            assert torch.equal(torch.load(zero / name / f"{key}.pt", weights_only=True)["param"], want), (name, key)
        assert torch.load(zero / name / "step.pt", weights_only=True) == 3
    state = torch.load(zero / "optimizer_state.pt", weights_only=True)
    assert "fp32_flat_groups" not in state and state["param_groups"] == [{"lr": 2.0}]
    assert state[OPTIMIZER_STATE_DICT] == {"state": {0: {"step": 3}}, "param_groups": [{"lr": 2.0}]}
    module = torch.load(tmp_path / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    assert torch.equal(module["head.weight"], values["embed.weight"]["fp32"])
    assert torch.equal(module["norm.weight"], values["norm.weight"]["fp32"])
