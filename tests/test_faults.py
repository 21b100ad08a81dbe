"""Fault injection on real runs (2 gloo ranks where it matters): each fault meets its defined behaviour.

Faults are injected with TRISTAGE_INJECT=kind@stage:step[:rank] (train/faults.py) or from outside (signals).
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from trainutil import (ROOT, SMOKE, end_spawned_worker, free_port, losses, records, run_train, smoke_run, steps,
                       stopped_at, train_cmd)

STAGES = ["general", "reasoning", "long_context"]
EVERY_STEP = [f"curriculum.stages.{s}.checkpoint_every=1" for s in STAGES]
BASE = ["model=tiny_dense", "eval.enabled=false", *EVERY_STEP]


def inject(spec: str) -> dict:
    return {"TRISTAGE_INJECT": spec}


def test_a_rank_killed_mid_step_then_mid_save_and_each_relaunch_is_exact(data_root, tmp_path_factory, tmp_path):
    """One run, two deaths: rank 1 SIGKILLed at the start of a step, then (in the relaunch) rank 0 SIGKILLed
    inside a checkpoint save, after DeepSpeed wrote its shards and before the checkpoint was published. Each
    relaunch resumes from the newest published checkpoint, and the finished run equals the uninterrupted one."""
    overrides = [*BASE, "deepspeed=zero2"]
    reference = losses(reference_dir(tmp_path_factory, "zero2", "tiny_dense"))
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    proc = run_train([*SMOKE, f"run_dir={run_dir}", *overrides], nproc=2, env=inject("kill@general:3:1"))
    assert proc.returncode != 0
    assert len(steps(run_dir)) == 2  # rank 1 died at the start of step 3
    proc = run_train([*SMOKE, f"run_dir={run_dir}", *overrides], nproc=2, env=inject("kill_in_save@reasoning:1:0"))
    assert proc.returncode != 0
    assert (ckpts / ".tmp" / "1-reasoning-step0000001").exists()  # the half-written one
    assert (ckpts / "latest").read_text().strip() == "0-general-step0000004"
    proc = run_train([*SMOKE, f"run_dir={run_dir}", *overrides], nproc=2)
    assert proc.returncode == 0, proc.stdout[-3000:]
    resume = [r for r in records(run_dir) if r.get("event") == "resume"]
    assert [r["checkpoint"] for r in resume] == ["0-general-step0000002", "0-general-step0000004"]
    assert losses(run_dir) == reference
    # the next save cleared the killed one's partial shards (DeepSpeed leaves its zero_to_fp32.py scripts there)
    assert not [p for p in (ckpts / ".tmp").iterdir() if p.is_dir()]


@pytest.mark.parametrize("zero, model, new_world, new_zero", [
    ("zero1", "tiny_dense", 1, None), ("zero2", "tiny_dense", 4, None), ("zero3", "tiny_dense", 1, None),
    ("zero3", "tiny_moe", 4, None), ("zero3", "tiny_dense", 2, "zero1"), ("zero1", "tiny_dense", 1, "zero3")])
def test_world_size_change_reshards_exactly(data_root, tmp_path_factory, tmp_path, zero, model, new_world, new_zero):
    """A checkpoint of 2 ranks resumes on new_world ranks (and under new_zero: ZeRO-3 and ZeRO-1/2 save and read
    different universal forms, which `reshard.fit_to_layout` reconciles) as if never stopped."""
    overrides = reshard_overrides(zero, model)
    reference = losses(smoke_run(tmp_path_factory, f"ref-2-{zero}-{model}", overrides, nproc=2))
    run_dir = stopped_at(reference_dir(tmp_path_factory, zero, model), 3, tmp_path / "run")
    proc = run_train([*SMOKE, f"run_dir={run_dir}", *overrides, f"deepspeed={new_zero or zero}"], nproc=new_world)
    assert proc.returncode == 0, proc.stdout[-3000:]
    resume = [r for r in records(run_dir) if r.get("event") == "resume"]
    assert resume[0]["resharded"] and resume[0]["saved_world_size"] == 2 and resume[0]["world_size"] == new_world
    assert not (run_dir / "checkpoints" / ".universal").exists()  # the re-sharded copy went at the next save
    got = losses(run_dir)
    assert got.keys() == reference.keys()
    # the data stream continues where it stopped: every step's samples are the uninterrupted run's
    assert [r["samples"] for r in steps(run_dir)][3:] == [r["samples"] for r in steps(reference_dir(
        tmp_path_factory, zero, model))][3:]
    # weights and optimizer state came through the re-sharding: every later step matches the uninterrupted run
    # up to the order of the gradient sums (~1e-9 here; a wrong AdamW step count or decay on the norms, two
    # DeepSpeed ZeRO-3 universal-load bugs train/engine.py mends, showed as 1e-5 -> 2e-3 within two steps)
    for key in list(reference)[3:]:
        assert got[key][0] == pytest.approx(reference[key][0], rel=1e-6), key


def test_a_resharded_copy_left_by_a_killed_launch_is_not_reused_under_another_zero_stage(data_root, tmp_path_factory,
                                                                                        tmp_path):
    """The universal copy of a 2-rank ZeRO-1 checkpoint, fitted for a 1-rank ZeRO-1 launch killed before its next
    save (which removes the copy), was taken as it was by a relaunch under ZeRO-3, which reads another model-states
    file: "cannot be loaded (AssertionError: a file is missing)", with advice to resume from an older checkpoint.
    The copy records the layout it was fitted for and is made again for another."""
    overrides = reshard_overrides("zero1", "tiny_dense")
    reference = reference_dir(tmp_path_factory, "zero1", "tiny_dense")
    run_dir = stopped_at(reference, 3, tmp_path / "run")
    proc = run_train([*SMOKE, f"run_dir={run_dir}", *overrides], env=inject("kill@general:4"))
    assert proc.returncode != 0
    copy = run_dir / "checkpoints" / ".universal" / "ep1" / "0-general-step0000003"
    assert (copy / "done").exists()  # the killed launch's copy, fitted for ZeRO-1, is left
    proc = run_train([*SMOKE, f"run_dir={run_dir}", *overrides, "deepspeed=zero3", "max_steps=1"])
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert [r["resharded"] for r in records(run_dir) if r.get("event") == "resume"] == [True, True]
    got, want = losses(run_dir)[("general", 4)], losses(reference)[("general", 4)]
    assert got[0] == pytest.approx(want[0], rel=1e-6)


def test_zero0_checkpoint_resumes_on_another_world_size_and_gives_its_weights(data_root, tmp_path_factory, tmp_path):
    """ZeRO-0 in fp32 keeps everything whole in the model file (no optimizer shards, which DeepSpeed's universal
    format needs): 2 ranks -> 1 rank resumes it as it is; ZeRO-1 refuses to resume it, naming what to do, and
    takes its weights through init_from."""
    overrides = reshard_overrides("zero0", "tiny_dense")
    reference = losses(smoke_run(tmp_path_factory, "ref-2-zero0-tiny_dense", overrides, nproc=2))
    # the gradient norm is logged without ZeRO too (it was null), and is ZeRO-1's: the same fp32 gradients
    zero1 = losses(reference_dir(tmp_path_factory, "zero1", "tiny_dense"))
    first = next(iter(reference))
    # fp64 sums as DeepSpeed's: to the order of the sums (the fp32 norm used before was off by 6e-5)
    assert reference[first][1] == pytest.approx(zero1[first][1], rel=1e-6) and reference[first][1] > 0
    run_dir = stopped_at(smoke_run(tmp_path_factory, "ref-2-zero0-tiny_dense", overrides, nproc=2), 3,
                         tmp_path / "run")
    # 3 steps more: to Reasoning's step 2 of 2, so the run is not finished (a finished run has nothing to resume)
    assert run_train([*SMOKE, f"run_dir={run_dir}", *overrides, "max_steps=3"]).returncode == 0
    assert [r["resharded"] for r in records(run_dir) if r.get("event") == "resume"] == [False]
    got = losses(run_dir)
    assert len(got) == 6
    for key in list(reference)[3:6]:
        assert got[key][0] == pytest.approx(reference[key][0], rel=1e-6), key
    ckpt = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    proc = run_train([*SMOKE, f"run_dir={run_dir}", *BASE, "deepspeed=zero1"])
    assert proc.returncode == 2
    assert f"{ckpt} was saved under deepspeed.zero_stage=0" in proc.stdout and "resume it with deepspeed=zero0" in proc.stdout
    proc = run_train([*SMOKE, f"run_dir={tmp_path / 'init'}", *BASE, "deepspeed=zero1", "max_steps=1",
                      f"init_from={ckpt}"])
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert steps(tmp_path / "init")[0]["loss"] < steps(run_dir)[0]["loss"] - 0.3  # trained weights


def test_init_from_a_zero3_checkpoint_folder_of_another_layout(data_root, tmp_path_factory, tmp_path):
    """`init_from=<a ZeRO-3 checkpoint folder>` of 2 ranks into 1 rank under ZeRO-1 or fp32 ZeRO-0: its partitions
    are re-sharded and give the same weights as its HF export (before, DeepSpeed failed on a missing model file;
    under ZeRO-0, whose plain AdamW DeepSpeed's universal load cannot fill, torch failed with "'NoneType' object
    has no attribute 'copy'", as did a resume of such a checkpoint under ZeRO-0, now refused naming the key)."""
    source = reference_dir(tmp_path_factory, "zero3", "tiny_dense")
    ckpt = sorted((source / "checkpoints").glob("0-general-*"))[-1]
    first = {}
    for name, init, zero in [("hf", source / "hf" / "general", "zero1"), ("ckpt", ckpt, "zero1"),
                             ("ckpt_zero0", ckpt, "zero0")]:
        proc = run_train([*SMOKE, f"run_dir={tmp_path / name}", *BASE, f"deepspeed={zero}", "max_steps=1",
                          f"init_from={init}"])
        assert proc.returncode == 0, proc.stdout[-3000:]
        first[name] = steps(tmp_path / name)[0]["loss"]
    assert first["ckpt"] == first["ckpt_zero0"] == first["hf"] < steps(source)[0]["loss"] - 0.3
    run_dir = stopped_at(source, 3, tmp_path / "run")
    proc = run_train([*SMOKE, f"run_dir={run_dir}", *BASE, "deepspeed=zero0"])
    assert proc.returncode == 2, proc.stdout[-3000:]
    saved = run_dir / "checkpoints" / "0-general-step0000003"
    assert (f"{saved} was saved under deepspeed.zero_stage=3 on 2 rank(s)" in proc.stdout
            and "resume it with deepspeed=zero3 (any number of ranks)" in proc.stdout
            and f"init_from={saved}" in proc.stdout), proc.stdout[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("zero, new_zero", [("zero1", "zero2"), ("zero3", "zero1")])
def test_zero_stage_change_on_cuda_resumes_with_fused_adamw(tmp_path, zero, new_zero):
    """On a GPU the re-sharded (universal) load goes through fused AdamW, which needs each `step` on the
    parameter's device (DeepSpeed leaves it on the CPU): 3 steps under one ZeRO stage in bf16, then another
    resumes them (ZeRO-3's universal form, rewritten for ZeRO-1, too) and matches the uninterrupted run. Uses the
    prepared fixture (launch/gpu_check.sh)."""
    base = [*SMOKE, "model=tiny_dense", "device=cuda", "eval.enabled=false", "curriculum.order=[general]"]
    proc = run_train([*base, f"run_dir={tmp_path / 'ref'}", f"deepspeed={zero}"])
    assert proc.returncode == 0, proc.stdout[-3000:]
    run_dir = tmp_path / "run"
    proc = run_train([*base, f"run_dir={run_dir}", f"deepspeed={zero}", "max_steps=3"])
    assert proc.returncode == 0, proc.stdout[-3000:]
    proc = run_train([*base, f"run_dir={run_dir}", f"deepspeed={new_zero}"])
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert [r["resharded"] for r in records(run_dir) if r.get("event") == "resume"] == [True]
    reference, got = losses(tmp_path / "ref"), losses(run_dir)
    assert got.keys() == reference.keys() and len(got) == 4
    for key in reference:
        assert got[key][0] == pytest.approx(reference[key][0], rel=1e-3), key


_FULL = [(z, m, w, None) for z in ("zero1", "zero2", "zero3") for m in ("tiny_dense", "tiny_moe") for w in (1, 4)]
_FULL += [("zero3", "tiny_moe", 4, "zero2"), ("zero2", "tiny_moe", 1, "zero3"), ("zero2", "tiny_dense", 2, "zero3")]
# CI runs a case of each ZeRO stage, and ZeRO-3 MoE (the experts' own files re-sharded); the rest is `pytest -m
# matrix`. ZeRO-1 and 2 share DeepSpeed's loader, and test_expert_parallel_train.py re-shards MoE under ZeRO-1/2.
_CI = {("zero1", "tiny_dense", 1, None), ("zero2", "tiny_dense", 4, None), ("zero3", "tiny_dense", 1, None),
       ("zero3", "tiny_moe", 4, None)}


@pytest.mark.matrix
@pytest.mark.parametrize("zero, model, new_world, new_zero", [c for c in _FULL if c not in _CI])
def test_world_size_change_full_matrix(data_root, tmp_path_factory, tmp_path, zero, model, new_world, new_zero):
    """The rest of ZeRO-1/2/3 x dense/MoE x 2 -> 1/4 ranks, and more ZeRO-3 <-> ZeRO-1/2 changes (`pytest -m
    matrix`; with the matrix's other tests, 2 minutes on 2 cores)."""
    test_world_size_change_reshards_exactly(data_root, tmp_path_factory, tmp_path, zero, model, new_world, new_zero)


def reshard_overrides(zero: str, model: str) -> list:
    # MoE without the balance loss: under gradient accumulation its expert counts depend on how the global batch
    # is cut into micro-batches (models/moe.py), which a different world size changes by design
    # checkpoint.keep: every step's checkpoint stays, so a test starts from any step of the shared run (stopped_at)
    return ([*BASE, f"deepspeed={zero}", f"model={model}", "checkpoint.keep=20"]
            + (["model.router_aux_loss_coef=0"] if "moe" in model else []))


def reference_dir(tmp_path_factory, zero, model):
    return smoke_run(tmp_path_factory, f"ref-2-{zero}-{model}", reshard_overrides(zero, model), nproc=2)


def test_nonfinite_loss_on_one_rank_skips_the_update_everywhere(data_root, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train([*SMOKE, f"run_dir={run_dir}", *BASE, "deepspeed=zero2"], nproc=2,
                     env=inject("nan@general:2:1"))
    assert proc.returncode == 0, proc.stdout[-3000:]
    skips = [r for r in records(run_dir) if r.get("event") == "skipped_update"]
    assert [(r["stage"], r["step"], r["skipped_total"]) for r in skips] == [("general", 2, 1)]
    per_step = steps(run_dir)
    assert per_step[1]["loss"] is None and per_step[1]["step_applied"] is False  # NaN is logged as null
    assert all(math.isfinite(r["loss"]) for i, r in enumerate(per_step) if i != 1)
    from models.hf import load_hf

    model = load_hf(run_dir / "hf" / "long_context")
    assert all(p.isfinite().all() for p in model.parameters())


def test_consecutive_nonfinite_steps_abort_with_a_clear_message(data_root, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train([*SMOKE, f"run_dir={run_dir}", *BASE, "deepspeed=zero1", "faults.max_consecutive_skips=1"],
                     env=inject("nan@general:2,nan@general:3"))
    assert proc.returncode == 4
    assert "2 consecutive steps had a non-finite loss or gradient" in proc.stdout
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "0-general-step0000002"


def test_loss_spike_rolls_back_and_skips_the_batch(data_root, tmp_path_factory, tmp_path):
    spike = ["curriculum.stages.general.tokens=12288", "faults.spike_factor=3", "faults.spike_window=5",
             "faults.spike_min_history=3", "curriculum.stages.general.checkpoint_every=2"]
    overrides = ["model=tiny_dense", "eval.enabled=false", "deepspeed=zero1", *spike]
    reference = steps(smoke_run(tmp_path_factory, "ref-spike", overrides))
    run_dir = tmp_path / "run"
    proc = run_train([*SMOKE, f"run_dir={run_dir}", *overrides, "faults.spike_action=rollback"],
                     env=inject("spike@general:8"))
    assert proc.returncode == 0, proc.stdout[-3000:]
    recs = records(run_dir)
    spikes = [r for r in recs if r.get("event") == "loss_spike"]
    assert len(spikes) == 1 and spikes[0]["step"] == 8 and spikes[0]["samples"] == [7 * 16, 8 * 16]
    assert spikes[0]["factor"] > 3
    rollback = [r for r in recs if r.get("event") == "rollback"]
    assert rollback[0]["to_checkpoint"] == "0-general-step0000006" and rollback[0]["skip_steps"] == ["general:8"]
    assert [r["step"] for r in recs if r.get("event") == "skipped_batch"] == [8]
    got = {(r["stage"], r["step"]): r for r in steps(run_dir)}
    ref = {(r["stage"], r["step"]): r for r in reference}
    for s in range(1, 8):  # before the spike: the same run
        assert got[("general", s)]["loss"] == ref[("general", s)]["loss"]
    assert ("general", 8) not in got or got[("general", 8)]["loss"] > 3 * got[("general", 7)]["loss"]
    for s in range(9, 13):  # after it: the same data in the same order, one update fewer
        assert got[("general", s)]["samples"] == ref[("general", s)]["samples"]
        assert got[("general", s)]["loss"] != ref[("general", s)]["loss"]


def test_a_spike_at_a_stages_last_step_ends_the_stage(data_root, tmp_path):
    """The skipped batch is the stage's last step: the stage still ends (its checkpoint, its export) and the
    next one starts. It re-entered the finished stage forever, writing stage_start records without end.
    With spike_skip_before=3 the rollback goes to step 4, before the first batch to skip (it went to step 6, whose
    weights had trained on batches 5 and 6 already, while the skip list named them); max_steps=10, the run's
    10 steps, counts what the run moved on, not the steps retrained after the rollback (it stopped in General).

    Killed right after the rollback, the relaunch resumes the rollback: checkpoint 4 with the skip list. It
    resumed the checkpoint of step 6 (trained on batches 5 and 6) without it, and trained into the spike again."""
    overrides = ["model=tiny_dense", "eval.enabled=false", "deepspeed=zero1", "curriculum.stages.general.tokens=8192",
                 "faults.spike_factor=3", "faults.spike_window=5", "faults.spike_min_history=3",
                 "curriculum.stages.general.checkpoint_every=2", "curriculum.order=[general,reasoning]",
                 "curriculum.stages.reasoning.tokens=2048", "faults.spike_action=rollback",
                 "faults.spike_skip_before=3", "max_steps=10"]
    run_dir, killed = tmp_path / "run", tmp_path / "killed"
    proc = run_train([*SMOKE, *overrides, f"run_dir={run_dir}"], env=inject("spike@general:8"), timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:]
    recs = records(run_dir)
    rollback = [r for r in recs if r.get("event") == "rollback"]
    assert [(r["to_checkpoint"], r["skip_steps"], r["discarded"]) for r in rollback] == [
        ("0-general-step0000004", ["general:5", "general:6", "general:7", "general:8"], ["0-general-step0000006"])]
    # the spike window goes back with the weights: General's steps 1-4, not the losses of 5-7 gone back over
    meta = json.loads((run_dir / "checkpoints" / "0-general-step0000008" / "meta.json").read_text())
    assert meta["state"]["loss_history"] == [r["loss"] for r in steps(run_dir) if r["stage"] == "general"][:4]
    assert [r["step"] for r in recs if r.get("event") == "skipped_batch"] == [5, 6, 7, 8]
    assert [r["stage"] for r in recs if r.get("event") == "stage_start"] == ["general", "general", "reasoning"]
    assert [r["stage"] for r in recs if r.get("event") == "stage_end"] == ["general", "reasoning"]
    assert (run_dir / "checkpoints" / "0-general-step0000008").is_dir() and (run_dir / "hf" / "general").is_dir()
    assert [r["step"] for r in steps(run_dir) if r["stage"] == "reasoning"] == [1, 2]
    # the spike window starts empty in a new stage (General's losses are no baseline for Reasoning's)
    meta = json.loads((run_dir / "checkpoints" / "1-reasoning-step0000002" / "meta.json").read_text())
    assert meta["state"]["loss_history"] == [r["loss"] for r in steps(run_dir) if r["stage"] == "reasoning"]

    proc = run_train([*SMOKE, *overrides, f"run_dir={killed}"],
                     env=inject("spike@general:8,kill_after_rollback@general:4"), timeout=240)
    assert proc.returncode != 0
    ckpts = killed / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "0-general-step0000004"
    assert not (ckpts / "0-general-step0000006").exists()
    proc = run_train([*SMOKE, *overrides, f"run_dir={killed}"], env=inject("spike@general:8"), timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:]
    again = records(killed)
    resume = next(i for i, r in enumerate(again) if r.get("event") == "resume")
    assert again[resume]["checkpoint"] == "0-general-step0000004"
    assert [r["step"] for r in again[resume:] if r.get("event") == "skipped_batch"] == [5, 6, 7, 8]
    assert not [r for r in again[resume:] if r.get("event") in ("loss_spike", "rollback")]
    assert [r["loss"] for r in steps(killed) if r["stage"] == "reasoning"] == [
        r["loss"] for r in steps(run_dir) if r["stage"] == "reasoning"]


def test_rollback_after_a_world_size_change_reads_the_old_layout_again(data_root, tmp_path):
    """A spike right after a re-sharded resume rolls back to the checkpoint the *earlier* launch wrote (2 ranks)
    from this 1-process launch: the rollback goes through the re-sharded copy too."""
    spike = ["curriculum.stages.general.tokens=12288", "faults.spike_factor=3", "faults.spike_window=5",
             "faults.spike_min_history=3", "curriculum.stages.general.checkpoint_every=2"]
    overrides = ["model=tiny_dense", "eval.enabled=false", "deepspeed=zero1", *spike, f"run_dir={tmp_path / 'run'}"]
    proc = run_train([*SMOKE, *overrides, "max_steps=6"], nproc=2)
    assert proc.returncode == 0, proc.stdout[-3000:]
    proc = run_train([*SMOKE, *overrides, "faults.spike_action=rollback", "curriculum.order=[general]"],
                     env=inject("spike@general:7"))
    assert proc.returncode == 0, proc.stdout[-3000:]
    recs = records(tmp_path / "run")
    assert [(r["resharded"], r["saved_world_size"]) for r in recs if r.get("event") == "resume"] == [(True, 2)]
    rollback = [r for r in recs if r.get("event") == "rollback"]
    assert [(r["to_checkpoint"], r["skip_steps"]) for r in rollback] == [("0-general-step0000006", ["general:7"])]
    after = [r for r in steps(tmp_path / "run") if r["step"] > 7]
    assert [r["step"] for r in after] == [8, 9, 10, 11, 12] and all(math.isfinite(r["loss"]) for r in after)


def test_sigterm_to_torchrun_saves_once_and_marks_preemption(data_root, tmp_path):
    run_dir = tmp_path / "run"
    cmd = train_cmd([*SMOKE, f"run_dir={run_dir}", *BASE, "deepspeed=zero2", "curriculum.stages.general.tokens=65536"],
                    nproc=2)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not any(r["step"] >= 2 for r in steps(run_dir)):
        assert proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) != 0  # torchrun turns the workers' 75 into its own failure code
    preempted = [r for r in records(run_dir) if r.get("event") == "preempted"]
    assert len(preempted) == 1 and preempted[0]["exit_code"] == 75
    tag = (run_dir / "preempted").read_text().strip()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == tag
    assert tag == f"0-general-step{steps(run_dir)[-1]['step']:07d}"


def test_full_disk_fails_every_rank_and_keeps_the_last_checkpoint(data_root, tmp_path_factory, tmp_path):
    """A write failing inside DeepSpeed's save on rank 1 only made that rank leave the save before its closing
    barrier: both ranks then waited for the watchdog (30 min), the disk error never shown. A damaged file that
    only rank 1 reads at a resume (its RNG state) failed rank 1 alone, with a traceback, while rank 0 trained on."""
    overrides = [*BASE, "deepspeed=zero2"]
    reference = losses(reference_dir(tmp_path_factory, "zero2", "tiny_dense"))
    run_dir = tmp_path / "run"
    proc = run_train([*SMOKE, f"run_dir={run_dir}", *overrides, "dist.timeout_s=60"], nproc=2,
                     env=inject("enospc_in_write@general:2:1"))
    assert proc.returncode != 0
    assert "saving checkpoint '0-general-step0000002' failed" in proc.stdout
    assert "No space left on device" in proc.stdout and "GiB free on that file system" in proc.stdout
    assert str(run_dir / "checkpoints" / ".tmp") in proc.stdout
    assert "watchdog" not in proc.stdout
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "0-general-step0000001"
    assert (ckpts / "0-general-step0000001" / "meta.json").exists()
    assert not (ckpts / ".tmp" / "0-general-step0000002").exists()
    assert len(steps(run_dir)) == 2  # no rank went on training after the failed save

    rng = ckpts / "0-general-step0000001" / "rng_rank1.pt"
    good = rng.read_bytes()
    rng.write_bytes(good[: len(good) // 2])
    # torchrun's report names each rank's exit code
    proc = run_train([*SMOKE, f"run_dir={run_dir}", *overrides, "dist.timeout_s=60"], nproc=2, launcher="torchrun")
    assert proc.returncode != 0 and proc.stdout.count("exitcode  : 2") == 2, proc.stdout[-3000:]  # both ranks
    assert f"{rng}: cannot be read, truncated or damaged" in proc.stdout
    assert "checkpoint '0-general-step0000001' failed to load on another rank" in proc.stdout
    assert len(steps(run_dir)) == 2  # rank 0 did not train on alone
    rng.write_bytes(good)
    proc = run_train([*SMOKE, f"run_dir={run_dir}", *overrides], nproc=2)
    assert proc.returncode == 0
    assert losses(run_dir) == reference


def test_full_disk_during_the_hf_export_stops_every_rank_and_the_relaunch_writes_it(data_root, tmp_path_factory,
                                                                                   tmp_path):
    """Rank 0's export of the General stage fails after 3 of its parameters: rank 1 finishes the gathers and both
    stop with the reason (no hang); no half export is left; the relaunch writes the General export from the
    stage-end checkpoint, then trains on, and ends with the uninterrupted run's exports and losses."""
    from safetensors.torch import load_file

    overrides = [*BASE, "deepspeed=zero2"]
    reference = reference_dir(tmp_path_factory, "zero2", "tiny_dense")
    run_dir = tmp_path / "run"
    proc = run_train([*SMOKE, f"run_dir={run_dir}", *overrides], nproc=2, env=inject("export_enospc@general:4:0"))
    assert proc.returncode != 0  # 2 from every rank; torchrun reports 1
    assert f"the HF export to {run_dir / 'hf' / 'general'} failed (OSError: [Errno 28] No space left on device" \
           in proc.stdout and "the stage-end checkpoint '0-general-step0000004' is saved" in proc.stdout
    assert not (run_dir / "hf").exists() or not any((run_dir / "hf").iterdir())
    assert [r["stage"] for r in steps(run_dir)] == ["general"] * 4
    proc = run_train([*SMOKE, f"run_dir={run_dir}", *overrides], nproc=2)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert losses(run_dir) == losses(reference)
    for stage in STAGES:
        got = load_file(str(run_dir / "hf" / stage / "model.safetensors"))
        want = load_file(str(reference / "hf" / stage / "model.safetensors"))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), stage


def test_unwritable_run_dir_is_named(data_root, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    proc = run_train([*SMOKE, f"run_dir={blocker / 'run'}", *BASE])
    assert proc.returncode == 2
    assert f"config key 'run_dir' = '{blocker / 'run'}'" in proc.stdout


def _rank0_work_worker(rank: int, port: int, out_dir: str) -> None:
    import datetime

    import torch.distributed as dist

    from train.dist import on_rank0

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=2))
    seen = {}
    try:
        start = time.monotonic()
        seen["result"] = on_rank0("slow work", lambda: time.sleep(6) or 42)  # 3 x the collectives' timeout
        seen["waited"] = time.monotonic() - start

        def fail():
            raise ValueError("shard 3 is short")

        try:
            on_rank0("checking shards", fail)
        except Exception as e:  # noqa: BLE001 - the test records what each rank raised
            seen["error"] = f"{type(e).__name__}: {e}"
        # control: the same wait in a barrier exceeds the timeout
        time.sleep(6 if rank == 0 else 0)
        try:
            dist.barrier()
            seen["barrier"] = "passed"
        except Exception as e:  # noqa: BLE001
            seen["barrier"] = type(e).__name__
    finally:
        Path(out_dir, f"{rank}.json").write_text(json.dumps(seen))
        dist.destroy_process_group()
    end_spawned_worker()


def test_rank0_work_outlasts_the_collective_timeout_and_its_failure_reaches_every_rank(tmp_path):
    """`on_rank0`: rank 0 works for 3 x the process group's timeout while rank 1 waits (a barrier there times
    out: the control); an exception on rank 0 is raised there as it is, and on rank 1 naming the work."""
    import torch.multiprocessing as mp

    mp.spawn(_rank0_work_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    assert r0["result"] == 42 and r1["result"] is None
    assert r1["waited"] >= 5.5
    assert r0["error"] == "ValueError: shard 3 is short"
    assert r1["error"] == "Rank0Failed: rank 0 failed at checking shards: ValueError: shard 3 is short"
    assert r1["barrier"] != "passed"


def _node_work_worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from train.dist import on_rank0

    # 2 "nodes" of 2 ranks, as torchrun numbers them
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="4",
                      LOCAL_RANK=str(rank % 2), LOCAL_WORLD_SIZE="2")
    dist.init_process_group("gloo", rank=rank, world_size=4)
    seen = {}
    try:
        start = time.monotonic()
        seen["result"] = on_rank0("node work", lambda: time.sleep(3 if rank == 2 else 0) or rank, node=True)
        seen["waited"] = time.monotonic() - start

        def fail_on_node_1():
            if rank == 2:
                raise OSError("disk full")
            return rank

        try:
            seen["second"] = on_rank0("node work 2", fail_on_node_1, node=True)
        except Exception as e:  # noqa: BLE001 - the test records what each rank raised
            seen["second"] = f"{type(e).__name__}: {e}"
        dist.barrier()  # rank 0 hosts the store the others wait on
    finally:
        Path(out_dir, f"{rank}.json").write_text(json.dumps(seen))
        dist.destroy_process_group()
    end_spawned_worker()


def test_node_work_runs_once_per_node_and_its_failure_reaches_that_node(tmp_path):
    """`on_rank0(node=True)` (each node's copy of a stage's index, where data roots are not shared): local rank 0
    of each node works while its node-mates wait for it, and only for it."""
    import torch.multiprocessing as mp

    mp.spawn(_node_work_worker, args=(free_port(), str(tmp_path)), nprocs=4, join=True)
    seen = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(4)]
    assert [s["result"] for s in seen] == [0, None, 2, None]
    assert seen[3]["waited"] >= 2.9 and seen[1]["waited"] < 2.0  # rank 1 did not wait for node 1's leader
    assert [s["second"] for s in seen] == [0, None, "OSError: disk full",
                                           "Rank0Failed: rank 2 failed at node work 2: OSError: disk full"]


def test_data_that_fails_to_prepare_stops_every_rank_naming_it(tmp_path):
    """Rank 0 prepares the data while the others wait: its error (a missing source file) ends both ranks with
    exit 2 and the file named, without a traceback, and without waiting for any timeout. A data root of its own:
    under the session's, this changed config prepares the shared fixture again (its datasets cache included) while
    the other worker's runs read it (once in CI rank 0 printed something else there; the output was not kept)."""
    missing = tmp_path / "nowhere.jsonl"
    start = time.time()
    proc = run_train([*SMOKE, f"run_dir={tmp_path / 'run'}", *BASE, f"data.root={tmp_path / 'data'}",
                      f"data.sources.code.options.paths=[{missing}]"], nproc=2, timeout=240)
    assert proc.returncode != 0
    named = f"source 'code': no file matches {missing}\n"
    assert f"error: {named}" in proc.stdout, proc.stdout[-6000:]  # rank 0, as a message (torchrun adds a traceback)
    assert f"error: rank 0 failed at preparing the data: DataError: {named}" in proc.stdout  # rank 1
    assert "raise DataError" not in proc.stdout
    assert time.time() - start < 60


def test_a_config_yaml_rank_0_cannot_record_stops_every_rank_naming_it(data_root, tmp_path):
    """config.yaml is written by rank 0 alone while the other ranks wait (on_rank0): a run_dir where it cannot be
    written (here a folder in its place) ends both ranks with exit 2 and the file named, nothing trained, and no
    rank left in the first step's collectives until the watchdog."""
    run_dir = tmp_path / "run"
    (run_dir / "config.yaml").mkdir(parents=True)
    start = time.time()
    proc = run_train([*SMOKE, f"run_dir={run_dir}", *BASE], nproc=2, timeout=240)
    assert proc.returncode != 0
    named = f"config key 'run_dir' = '{run_dir}': {run_dir / 'config.yaml'} cannot be recorded (IsADirectoryError"
    assert f"error: {named}" in proc.stdout  # rank 0
    assert f"error: rank 0 failed at recording config.yaml: ConfigError: {named}" in proc.stdout  # rank 1
    assert not steps(run_dir) and time.time() - start < 90


def test_data_prepared_again_under_a_live_run_stops_it_before_the_next_stage(tmp_path):
    """A run of another data config under the same data set name prepares it again in place (here another
    tokenizer, while this run's General export takes 15 s): the next stage would read other token ids than the
    launch checked. The run stops there, exit 2, naming the manifest, with the General checkpoint kept."""
    from data.config import compose
    from data.prepare import prepare

    root, run_dir = tmp_path / "data", tmp_path / "run"  # not the session's corpus: other tests' runs read that
    manifest = prepare(compose("fixture", [f"root={root}"]))
    cmd = train_cmd([*SMOKE, f"run_dir={run_dir}", f"data.root={root}", "model=tiny_dense", "eval.enabled=false"])
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "TRISTAGE_SLOW_S": "15",
                                 **inject("slow_export@general:4")})
    try:
        deadline = time.time() + 120
        while not any(r.get("event") == "checkpoint" and r["stage"] == "general" and r["global_step"] == 4
                      for r in records(run_dir)):
            assert proc.poll() is None and time.time() < deadline, proc.poll()
            time.sleep(0.1)
        prepare(compose("fixture", [f"root={root}", "tokenizer.vocab_size=768"]))  # inside the slow export
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, out[-3000:]
    assert f"error: {manifest}: the data set was prepared again while this run trained" in out
    assert "stage 'reasoning' would read other data" in out
    assert not [r for r in steps(run_dir) if r["stage"] != "general"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "0-general-step0000004"


def test_hung_rank_ends_the_job_naming_it(data_root, tmp_path):
    run_dir = tmp_path / "run"
    start = time.time()
    proc = run_train([*SMOKE, f"run_dir={run_dir}", *BASE, "deepspeed=zero2", "dist.timeout_s=8"], nproc=2,
                     env=inject("stall@general:2:1"), timeout=240)
    elapsed = time.time() - start
    assert proc.returncode != 0
    assert "hung collective: rank 1 (stuck in inject (faults.py" in proc.stdout
    assert "ranks [0] wait for them" in proc.stdout
    assert elapsed < 120  # the 8 s timeout, not the 1,800 s default nor gloo's own


def test_pickled_payload_in_a_checkpoint_is_refused(data_root, tmp_path):
    run_dir = tmp_path / "run"
    assert run_train([*SMOKE, f"run_dir={run_dir}", *BASE, "deepspeed=zero1", "max_steps=1"]).returncode == 0
    marker = tmp_path / "pwned"
    target = run_dir / "checkpoints" / "0-general-step0000001" / "mp_rank_00_model_states.pt"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import torch

    torch.save({"module": Payload()}, target)
    proc = run_train([*SMOKE, f"run_dir={run_dir}", *BASE, "deepspeed=zero1"])
    assert proc.returncode == 2
    assert "refused to load" in proc.stdout and str(target) in proc.stdout
    assert not marker.exists()


def test_wandb_key_never_reaches_logs_dumps_or_checkpoints(data_root, tmp_path):
    """Nor one Hydra sets in the job's environment (`+hydra.job.env_set.WANDB_API_KEY=...`): Hydra's to read, so
    left on the command line, it reached the .wandb file, which records sys.argv."""
    run_dir = tmp_path / "run"
    secrets = ["clisecret0123456789abcdef", "envsecret9876543210fedcba", "hydrasecret0123456789abcdef"]
    proc = run_train([*SMOKE, f"run_dir={run_dir}", *BASE, "deepspeed=zero1", "max_steps=2",
                      "logging.wandb.mode=offline", f"logging.wandb.api_key={secrets[0]}",
                      f"+hydra.job.env_set.WANDB_API_KEY={secrets[2]}"], env={"WANDB_API_KEY": secrets[1]})
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert not [s for s in secrets if s in proc.stdout]
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files)  # wandb did write its offline run here, the command line too
    for path in files:
        data = path.read_bytes()
        assert not [s for s in secrets if s.encode() in data], path
    assert "api_key: '***'" in (run_dir / "config.yaml").read_text()


def test_watchdog_waits_out_known_long_work_and_watches_again_after_it(monkeypatch):
    """Building a large stage's data index makes no steps for minutes: inside `suspended` that is not a hang;
    before and after it, no progress for timeout_s is."""
    from train.faults import Watchdog

    fired = []
    dog = Watchdog(rank=0, world=1, timeout_s=0.3)
    monkeypatch.setattr(dog, "_fire", lambda: fired.append(dog.where) or dog.beat("fired"))
    dog.start()
    try:
        with dog.suspended("general data index"):
            time.sleep(0.9)  # three timeouts without a beat
        assert fired == []
        time.sleep(0.9)  # no progress after it
        assert fired and fired[0] == "after general data index"
    finally:
        dog.stop()


class _Store:
    """The rendezvous store's requests the watchdog makes, in a dict (`broken`: every request fails)."""

    def __init__(self):
        self.values, self.broken = {}, False

    def _up(self):
        if self.broken:
            raise RuntimeError("Broken pipe")

    def clone(self):
        self._up()
        return self

    def add(self, key, n):
        self._up()
        self.values[key] = self.values.get(key, 0) + n
        return self.values[key]

    def check(self, keys):
        self._up()
        return all(k in self.values for k in keys)

    def get(self, key):
        self._up()
        return str(self.values[key]).encode()

    def compare_set(self, key, expected, value):
        self._up()
        if self.values.get(key, "") == expected:
            self.values[key] = value


def _watchdog(monkeypatch, rank: int, store: "_Store"):
    """A 2-rank Watchdog on `store` (heartbeat_s 15), its exits recorded in `ended` instead of made."""
    from train import faults

    monkeypatch.setattr(faults, "_store", lambda: store)
    monkeypatch.setattr(faults.dist, "is_initialized", lambda: True)
    dog = faults.Watchdog(rank=rank, world=2, timeout_s=600, job="run", heartbeat_s=15)
    ended = []
    monkeypatch.setattr(dog, "_end", lambda code, news, grace=False: ended.append((code, news)))
    return dog, ended


def test_a_silent_peer_is_named_dead_after_heartbeat_s_and_a_stopped_process_blames_no_one(monkeypatch):
    """The poller (`_poll`, every PEER_POLL_S): the next rank's beat count not moving for heartbeat_s -- counted from
    the first poll for a rank that never beat (killed while starting) -- names it in the store for every rank; time
    in which this process itself did not run (stopped, suspended) is not counted against the peer."""
    from train import faults

    store = _Store()
    dog, ended = _watchdog(monkeypatch, 0, store)
    dog._poll()
    assert store.values[faults._job_key("alive/0", "run")] == 1
    dog._peer_seen -= 14
    dog._poll()
    assert ended == []  # 14 s without a beat: not yet
    dog._polled -= 100  # this process was stopped for 100 s: the peer's silence is not judged on it
    dog._peer_seen -= 100
    dog._poll()
    assert ended == []
    store.add(faults._job_key("alive/1", "run"), 1)
    dog._poll()
    dog._peer_seen -= 16
    dog._poll()
    assert len(ended) == 1 and ended[0][0] == 1 and ended[0][1].startswith("rank 1 stopped: no beat for 16s ")
    assert store.values[faults._job_key("failed", "run")] == f"1|{ended[0][1]}"
    # another rank's failure read from the store ends this one with the failure's code
    store.values[faults._job_key("failed", "run")] = "2|rank 1 failed (ConfigError: x)"
    dog._poll()
    assert ended[-1] == (2, "rank 1 failed (ConfigError: x)")


def test_a_rank_ended_by_a_peers_failure_waits_a_poll_and_keeps_its_own_code(monkeypatch):
    """`_end` for a peer's announced failure: a rank whose main thread stops the watchdog within a poll (it met the
    same error itself: a sweep's next job then runs in this process) is not ended; one that is failing on its own
    exits with its own code; the store's host counts itself out once and waits for the others (`_leave`)."""
    from train import faults

    store = _Store()
    monkeypatch.setattr(faults, "_store", lambda: store)
    monkeypatch.setattr(faults, "_LEFT", {})
    monkeypatch.setattr(faults.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(faults, "PEER_POLL_S", 0.2)
    monkeypatch.setattr(faults, "LINGER_S", 0.5)
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    codes = []
    monkeypatch.setattr(faults.os, "_exit", codes.append)
    store.values[faults._job_key("failed", "run")] = "2|rank 1 failed (ConfigError: x)"
    dog = faults.Watchdog(rank=0, world=2, timeout_s=600, job="run", heartbeat_s=15)
    threading.Timer(0.05, dog.stop).start()
    dog._poll()
    assert codes == []  # stopped within the grace: its own error is its report
    dog = faults.Watchdog(rank=0, world=2, timeout_s=600, job="run", heartbeat_s=15)
    dog.failing(4)
    t0 = time.monotonic()
    dog._poll()
    assert codes == [4]
    assert store.values[faults._job_key("gone", "run")] == 1  # rank 1 never counted itself out: waited LINGER_S
    assert time.monotonic() - t0 >= 0.2 + 0.5
    faults._leave(store, 0, 2, "run")  # the main thread's own announcement after it: counted once
    assert store.values[faults._job_key("gone", "run")] == 1
    # a second caller while the first still waits for the others (the watchdog, while the main thread lingers)
    # waits with it: the store's host must not exit before the others have read the failure
    first = threading.Thread(target=faults._leave, args=(store, 0, 2, "other"))
    first.start()
    time.sleep(0.1)
    t0 = time.monotonic()
    faults._leave(store, 0, 2, "other")
    assert time.monotonic() - t0 >= 0.3 and store.values[faults._job_key("gone", "other")] == 1
    first.join()


def test_a_store_that_stopped_answering_ends_the_rank_only_once_its_host_stopped_listening(monkeypatch):
    """After a failed request the poller connects again only once the store's host takes connections; the watchdog
    ends the rank when the store has not answered for heartbeat_s and its host takes no connection, naming the
    address; a host that still listens is alive (a broken connection), and the beats go on over a new one."""
    import socket

    store = _Store()
    dog, ended = _watchdog(monkeypatch, 1, store)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(listener.getsockname()[1]))
    dog._poll()
    store.broken = True
    dog._poll()
    assert dog._store is None and ended == []
    dog._answered -= 100
    dog._judge_store(time.monotonic())  # the host still listens
    assert ended == []
    store.broken = False
    dog._poll()  # a new connection, and a beat on it
    assert dog._store is store and time.monotonic() - dog._answered < 5 and store.values
    store.broken = True
    dog._poll()
    listener.close()
    dog._answered -= 14
    dog._probed = 0.0
    dog._judge_store(time.monotonic())
    assert ended == []  # 14 s: not yet
    dog._answered -= 2
    dog._judge_store(time.monotonic())
    assert len(ended) == 1 and ended[0][0] == 1
    assert ended[0][1].startswith(f"the rendezvous store (127.0.0.1:{os.environ['MASTER_PORT']}) has not answered "
                                  f"for 16s (dist.heartbeat_timeout_s)")


_LONG_WAIT = """
import os, sys, time
import torch.distributed as dist
from train.dist import on_rank0
from train.faults import Watchdog
rank = int(os.environ["RANK"])
dist.init_process_group("gloo")
dog = Watchdog(rank, 2, 1800, "start-up", job=sys.argv[1], heartbeat_s=15).start()
time.sleep(6)  # both beat
on_rank0("long work", lambda: time.sleep(24))  # rank 1 waits on the store, in its main thread's connection
dog.stop()
dist.barrier()
print(f"rank {rank}: through", flush=True)
"""


def test_a_rank_waiting_for_rank0s_work_keeps_beating(tmp_path):
    """A rank waiting for rank 0's long work (preparing data, a stage's index, re-sharding: `on_rank0`, up to a day)
    waits in its main thread's store connection, which holds every other request on it: beats sent there stopped,
    and after heartbeat_s rank 0 named rank 1 dead (killed outright) and ended a healthy job. The beats go over a
    connection of the watchdog's own."""
    port, procs = free_port(), []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-c", _LONG_WAIT, str(tmp_path)], cwd=ROOT, env=env,
                                      text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    out = [p.communicate(timeout=120)[0] for p in procs]
    for rank in range(2):
        assert procs[rank].returncode == 0 and f"rank {rank}: through" in out[rank], out[rank][-3000:]


def test_a_rank_waiting_for_a_collective_result_counts_as_waiting():
    """Under NCCL the host blocks at the sync after a collective, not inside torch.distributed: the watchdog's
    verdict must still call a rank stuck in `collective_result` waiting (healthy), and a rank stuck anywhere
    else not."""
    import threading

    from train import faults

    from models.moe import _split_sizes

    class SlowToReachTheHost:  # stands in for a device tensor whose collective has not finished
        def cpu(self):
            time.sleep(0.6)
            return "on the host"

        def sum(self, dim):
            return self

        def tolist(self):
            return self.cpu()

    seen = {}

    def look(key):
        time.sleep(0.2)
        seen[key] = faults._describe_main_thread()

    for key, work in [("collective", lambda: faults.collective_result(SlowToReachTheHost())),
                      ("split sizes", lambda: _split_sizes(SlowToReachTheHost(), SlowToReachTheHost())),
                      ("elsewhere", lambda: SlowToReachTheHost().cpu())]:
        watcher = threading.Thread(target=look, args=(key,))
        watcher.start()
        work()
        watcher.join()
    assert seen["collective"][0] is True and seen["collective"][1].startswith("cpu (test_faults.py:")
    assert seen["split sizes"][0] is True  # the expert-parallel host sync after the counts' all-to-all
    assert seen["elsewhere"][0] is False and seen["elsewhere"][1].startswith("cpu (test_faults.py:")


def test_one_save_per_step_and_a_slow_export_is_not_a_hang(data_root, tmp_path):
    """A `checkpoint_every` step that is also the `max_steps` step was saved twice (the second save deleted the
    published folder before replacing it: a kill then left nothing to resume from). An HF export longer than
    dist.timeout_s was ended as a hang (exit 3) at every relaunch."""
    run_dir = tmp_path / "run"
    common = [*SMOKE, f"run_dir={run_dir}", "model=tiny_dense", "eval.enabled=false", "curriculum.order=[general]"]
    proc = run_train([*common, "max_steps=2", "curriculum.stages.general.checkpoint_every=2"])
    assert proc.returncode == 0, proc.stdout[-3000:]
    saves = [r["path"] for r in records(run_dir) if r.get("event") == "checkpoint"]
    assert [Path(p).name for p in saves] == ["0-general-step0000002"]
    proc = run_train([*common, "dist.timeout_s=4"], env={**inject("slow_export@general:4"), "TRISTAGE_SLOW_S": "9"})
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert (run_dir / "hf" / "general" / "config.json").exists()


def test_a_damaged_checkpoint_is_named_and_a_missing_one_falls_back(data_root, tmp_path):
    """A truncated DeepSpeed file was a traceback naming no file (exit 1); `latest` naming a folder that is gone
    was a dead end although older complete checkpoints were there."""
    run_dir = tmp_path / "run"
    common = [*SMOKE, f"run_dir={run_dir}", *BASE, "deepspeed=zero1", "curriculum.order=[general]"]
    proc = run_train([*common, "max_steps=2"])
    assert proc.returncode == 0, proc.stdout[-3000:]
    ckpts = run_dir / "checkpoints"
    model_file = ckpts / "0-general-step0000002" / "mp_rank_00_model_states.pt"
    model_file.write_bytes(model_file.read_bytes()[: model_file.stat().st_size // 2])
    proc = run_train([*common, "max_steps=1"])
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert f"{model_file}: cannot be read, truncated or damaged" in proc.stdout
    assert "write its tag into" in proc.stdout and "0-general-step0000001" in proc.stdout
    import shutil

    shutil.rmtree(ckpts / "0-general-step0000002")
    proc = run_train([*common, "max_steps=1"])
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "names '0-general-step0000002', which is missing; taking the newest complete checkpoint, " \
           "'0-general-step0000001'" in proc.stdout
    resume = [r for r in records(run_dir) if r.get("event") == "resume"]
    assert resume[-1]["checkpoint"] == "0-general-step0000001"


def test_config_errors_exit_2_and_a_sweep_never_shows_a_secret(data_root, tmp_path):
    """Hydra's own errors (an unknown key, a wrong type) exited 1, which launch.plan documents as "does not
    fit". Under --multirun Hydra printed the wandb key and wrote it to multirun.yaml before any redaction."""
    for cmd in (["-m", "train", "seed=notanint"], ["-m", "train", "curriculum.stages.nosuch.tokens=1"],
                ["-m", "launch.plan", "seed=notanint"]):
        proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, (cmd, proc.stderr[-2000:])
    # a sweep's run_dir= was dropped unsaid (each job trains in a folder of its own)
    for mode in ("--multirun", "hydra.mode=MULTIRUN"):
        proc = subprocess.run([sys.executable, "-m", "train", mode, f"run_dir={tmp_path / 'mine'}", "seed=1,2",
                               f"hydra.sweep.dir={tmp_path / 'sweep0'}"], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2 and "set hydra.sweep.dir=<folder> instead" in proc.stderr, proc.stderr[-2000:]
        assert not (tmp_path / "mine").exists() and not list((tmp_path / "sweep0").glob("*/config.yaml"))
    secret = "sweepsecret0123456789"
    sweep = tmp_path / "sweep"
    proc = run_train(["--multirun", *SMOKE, *BASE, "deepspeed=zero1", "max_steps=1", "logging.wandb.mode=offline",
                      f"logging.wandb.api_key={secret}", f"hydra.sweep.dir={sweep}", "seed=1,2"])
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert secret not in proc.stdout
    files = [p for p in sweep.rglob("*") if p.is_file()]
    assert any(p.name == "multirun.yaml" for p in files) and any(p.name == "config.yaml" for p in files)
    for path in files:
        assert secret.encode() not in path.read_bytes(), path
    jobs = [p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit()]
    assert len(jobs) == 2
    for job in jobs:  # the key still reached each job's config, redacted in its dump
        assert "api_key: '***'" in (job / "config.yaml").read_text()
    # one wandb run per job: both were `smoke` (the run's name), so online the second appended to the first
    ids = {(job / "wandb_id").read_text().strip() for job in jobs}
    assert len(ids) == 2 and all((job / "wandb" / "latest-run").exists() for job in jobs)


def test_recover_puts_back_a_copy_moved_aside_and_agrees_on_a_fallback(tmp_path, capsys):
    """A re-save of the tag `latest` names moves the old folder to `.replaced-<tag>` once the new copy is complete;
    a crash between that rename and the next left `latest` naming nothing (and the copy on disk forever). Rank 0's
    `recover()` at start puts it back, removes stale copies, and points `latest` at the fallback for every rank."""
    from train.checkpoint import CheckpointManager

    ckpts = tmp_path / "checkpoints"

    def checkpoint(name, step):
        (ckpts / name).mkdir(parents=True)
        (ckpts / name / "meta.json").write_text(json.dumps({"state": {"global_step": step}}))

    checkpoint("0-general-step0000001", 1)
    checkpoint(".replaced-0-general-step0000002", 2)  # the crash fell between the two renames
    checkpoint(".replaced-0-general-step0000000", 0)  # stale
    (ckpts / "latest").write_text("0-general-step0000002")
    manager = CheckpointManager(tmp_path, keep=2, rank=0)
    manager.recover()
    assert sorted(p.name for p in ckpts.iterdir()) == ["0-general-step0000001", "0-general-step0000002", "latest"]
    assert manager.latest() == "0-general-step0000002"
    import shutil

    shutil.rmtree(ckpts / "0-general-step0000002")  # gone, with no copy aside: the newest complete one
    manager.recover()
    assert (ckpts / "latest").read_text() == "0-general-step0000001"
    assert "taking the newest complete checkpoint, '0-general-step0000001'" in capsys.readouterr().err
    assert CheckpointManager(tmp_path, keep=2, rank=1).latest() == "0-general-step0000001"


class StandInEngine:
    """An engine for CheckpointManager.save alone: writes one file, `weights`, holding `payload`, and returns the
    files it wrote, as Engine.save does (each is flushed before the checkpoint is published). What the tests that
    use it check is the folder dance, not DeepSpeed's files."""

    def __init__(self, payload: str = "w"):
        self.payload = payload

    def save(self, save_dir, tag, client_state, fault=lambda kind: None):
        (Path(save_dir) / tag / "weights").write_text(self.payload)
        return [str(Path(save_dir) / tag / "weights")]


def _replace_fails(monkeypatch, when):
    """os.replace raising EIO where `when(src, dst)` (as Paths) holds; returns the real os.replace."""
    real_replace = os.replace

    def replace(src, dst):
        if when(Path(src), Path(dst)):
            raise OSError(5, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    return real_replace


def test_resave_of_a_tag_keeps_the_old_copy_until_the_new_one_is_published(tmp_path, monkeypatch):
    """save() itself, re-saving a tag that exists: a failure after the old folder is moved aside but before the
    new one is renamed into place must leave the old copy on disk (not deleted first), and recover() puts it back."""
    from train.checkpoint import CheckpointError, CheckpointManager, TrainerState

    manager = CheckpointManager(tmp_path, keep=2, rank=0)
    tag, state = "0-general-step0000002", TrainerState(stage="general", step=2, global_step=2)
    final = manager.save(StandInEngine("old"), tag, state, meta={}, config_yaml="")
    assert (final / "weights").read_text() == "old"

    publish = manager.dir / ".tmp" / tag
    real_replace = _replace_fails(monkeypatch, lambda src, dst: src == publish)
    # the cause and the pointer as it stands (the message resolved `latest`, which raised about the missing tag)
    with pytest.raises(CheckpointError, match=f"publishing checkpoint '{tag}' failed .*Input/output error.*"
                                              f"'latest' still names '{tag}'"):
        manager.save(StandInEngine("new"), tag, state, meta={}, config_yaml="")
    monkeypatch.setattr(os, "replace", real_replace)
    assert not final.exists()  # the failure fell between the two renames
    assert (manager.dir / f".replaced-{tag}" / "weights").read_text() == "old"
    manager.recover()
    assert manager.latest() == tag and (final / "weights").read_text() == "old"
    assert not any(p.name.startswith(".replaced-") for p in manager.dir.iterdir())

    manager.save(StandInEngine("new"), tag, state, meta={}, config_yaml="")  # a re-save that completes replaces it
    assert (final / "weights").read_text() == "new"
    assert not (manager.dir / f".replaced-{tag}").exists()


def test_a_save_is_on_disk_before_latest_names_it(tmp_path, monkeypatch):
    """Durability against a power loss or a node crash, not only a killed process: every file a rank wrote is
    flushed before the folder is published, the folder's entries before its rename, and the checkpoints folder
    (the renames of the folder and of `latest`) after `latest` is replaced. The order of fsync and rename calls
    is what is checked; the engine is a stand-in that returns the files it wrote, as Engine.save does."""
    from train.checkpoint import CheckpointManager, TrainerState

    events, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b)))
    manager = CheckpointManager(tmp_path, keep=2, rank=0)
    tag = "0-general-step0000001"
    manager.save(StandInEngine(), tag, TrainerState(stage="general", step=1, global_step=1), meta={}, config_yaml="")
    ckpts, tmp = str(manager.dir), str(manager.dir / ".tmp" / tag)
    publish = events.index(("replace", f"{ckpts}/{tag}"))
    before = {p.split(".tmp-")[0] for kind, p in events[:publish] if kind == "fsync"}  # meta.json: its temp name
    assert {f"{tmp}/weights", f"{tmp}/rng_rank0.pt", f"{tmp}/meta.json", f"{tmp}/config.yaml", tmp} <= before
    pointer = max(i for i, e in enumerate(events) if e == ("replace", f"{ckpts}/latest"))
    assert ("fsync", ckpts) in events[pointer:]


@pytest.mark.parametrize("failing", ["folder", "latest"])
def test_a_failed_publish_keeps_latest_on_the_previous_checkpoint(tmp_path, monkeypatch, failing):
    """A save of a new tag whose publish fails, at the rename of its folder out of .tmp or at the replace of
    `latest`: the error names the pointer, which still names the previous checkpoint, complete and unchanged, and
    retention (keep 1) has removed nothing; a relaunch resumes there, and the next save succeeds."""
    from train.checkpoint import CheckpointError, CheckpointManager, TrainerState

    manager = CheckpointManager(tmp_path, keep=1, rank=0)
    good, new = "0-general-step0000001", "0-general-step0000002"
    manager.save(StandInEngine("good"), good, TrainerState(stage="general", step=1, global_step=1), meta={},
                 config_yaml="")
    target = manager.dir / new if failing == "folder" else manager.dir / "latest"
    real_replace = _replace_fails(monkeypatch, lambda src, dst: dst == target)
    with pytest.raises(CheckpointError, match=f"publishing checkpoint '{new}' failed .*Input/output error.*"
                                              f"'latest' still names '{good}'"):
        manager.save(StandInEngine("new"), new, TrainerState(stage="general", step=2, global_step=2), meta={},
                     config_yaml="")
    monkeypatch.setattr(os, "replace", real_replace)
    assert (manager.dir / "latest").read_text() == good
    assert (manager.dir / good / "weights").read_text() == "good" and (manager.dir / good / "meta.json").exists()
    assert (manager.dir / new).exists() == (failing == "latest")  # published, but never named
    relaunch = CheckpointManager(tmp_path, keep=1, rank=0)
    relaunch.recover()
    assert relaunch.latest() == good
    relaunch.save(StandInEngine("new"), new, TrainerState(stage="general", step=2, global_step=2), meta={},
                  config_yaml="")
    assert relaunch.latest() == new and (manager.dir / new / "weights").read_text() == "new"


def test_secret_overrides_are_parsed_as_hydra_does_and_hydra_keys_stay_hydras():
    """Values applied after Hydra must read as Hydra reads them (`null` was the string 'null', which then replaced
    a real WANDB_API_KEY); `hydra.job.env_set.WANDB_API_KEY=...` is Hydra's own and was swallowed."""
    from omegaconf import OmegaConf

    from train.__main__ import _apply_secrets, take_secrets

    argv = ["train", "model=tiny_dense", "logging.wandb.api_key=null", "hydra.job.env_set.WANDB_API_KEY=x"]
    rest, secrets = take_secrets(argv)
    assert rest == ["train", "model=tiny_dense", "hydra.job.env_set.WANDB_API_KEY=x"]
    cfg = OmegaConf.create({"logging": {"wandb": {"api_key": "old"}}})
    _apply_secrets(cfg, secrets)
    assert cfg.logging.wandb.api_key is None
    _apply_secrets(cfg, ["logging.wandb.api_key='a b'"])
    assert cfg.logging.wandb.api_key == "a b"
    with pytest.raises(ValueError, match="not deleted or swept"):
        _apply_secrets(cfg, ["logging.wandb.api_key=a,b"])
    with pytest.raises(ValueError) as err:  # the parser's own message quoted parts of the value
        _apply_secrets(cfg, ["logging.wandb.api_key=SECRET(a)b"])
    assert "quote it: logging.wandb.api_key='...'" in str(err.value) and "SECRET" not in str(err.value)
    _apply_secrets(cfg, ["++logging.wandb.api_key='x=y'"])
    assert cfg.logging.wandb.api_key == "x=y"


def test_only_a_damaged_file_is_called_damaged(monkeypatch, tmp_path):
    """An out-of-memory or a device error while loading said nothing about the file, but was reported as a
    truncated checkpoint with advice to roll `latest` back."""
    from train.engine import CheckpointLoadError, safe_torch_load

    path = tmp_path / "x.pt"
    torch.save({"a": torch.ones(2)}, path)
    path.write_bytes(path.read_bytes()[:40])
    with safe_torch_load(), pytest.raises(CheckpointLoadError, match=f"{path}: cannot be read, truncated"):
        torch.load(path)

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(torch, "load", oom)
    with safe_torch_load(), pytest.raises(torch.OutOfMemoryError):
        torch.load(path)


def test_a_rank_finds_its_own_cut_short_files_before_the_load(tmp_path):
    """Under ZeRO-3 on GPUs DeepSpeed's load ends in a collective (the persistent parameters' all-gather): a rank
    that failed on its own optimizer partition waited in the agreement after the load while the others waited in
    that collective, both until the process group's timeout (~1 h). Each rank now checks the files only it reads
    before the load: empty, or a zip archive without its closing directory."""
    from train.checkpoint import CheckpointManager

    folder = tmp_path / "checkpoints" / "0-general-step0000002"
    folder.mkdir(parents=True)
    for name in ("zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
                 "zero_pp_rank_10_mp_rank_00_optim_states.pt", "rng_rank0.pt", "rng_rank1.pt"):
        torch.save({"a": torch.ones(64)}, folder / name)
    legacy = folder / "zero_pp_rank_2_mp_rank_00_optim_states.pt"  # the old pickle format: no zip to check
    torch.save({"a": torch.ones(64)}, legacy, _use_new_zipfile_serialization=False)
    ranks = {r: CheckpointManager(tmp_path, keep=2, rank=r) for r in (0, 1, 2, 10)}
    assert all(m.cut_short(folder.name) is None for m in ranks.values())
    rank1 = folder / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    rank1.write_bytes(rank1.read_bytes()[:-30])  # the end of the archive lost
    assert ranks[1].cut_short(folder.name) == (f"{rank1}: cannot be read, truncated or damaged (cut short: "
                                               f"{rank1.stat().st_size} bytes)")
    assert ranks[0].cut_short(folder.name) is None and ranks[10].cut_short(folder.name) is None
    (folder / "rng_rank0.pt").write_bytes(b"")
    assert ranks[0].cut_short(folder.name).startswith(f"{folder / 'rng_rank0.pt'}: cannot be read, truncated")


def test_a_rank_finds_its_own_cut_short_partition_of_a_bf16_checkpoint(tmp_path):
    """In bf16 (every GPU run's default) DeepSpeed names a rank's optimizer partition `bf16_zero_pp_rank_<r>_...`,
    which the check's `zero_pp_rank_<r>_...` pattern missed: a 2-rank bf16 ZeRO-3 resume with rank 1's partition
    cut to 5,000 bytes said "cannot be loaded (OSError: [Errno 22] Invalid argument)" of the folder, not the file,
    and on GPUs left the ranks in DeepSpeed's collective, which the check is there to prevent."""
    from train.checkpoint import CheckpointManager

    folder = tmp_path / "checkpoints" / "0-general-step0000002"
    folder.mkdir(parents=True)
    for r in (0, 1, 10):
        torch.save({"a": torch.ones(64)}, folder / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    ranks = {r: CheckpointManager(tmp_path, keep=2, rank=r) for r in (0, 1, 10)}
    rank1 = folder / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    rank1.write_bytes(rank1.read_bytes()[:-30])
    assert ranks[1].cut_short(folder.name) == (f"{rank1}: cannot be read, truncated or damaged (cut short: "
                                               f"{rank1.stat().st_size} bytes)")
    assert ranks[0].cut_short(folder.name) is None and ranks[10].cut_short(folder.name) is None


def test_retention_keeps_the_newest_periodic_checkpoints_and_every_stage_end(tmp_path):
    """checkpoint.keep periodic checkpoints stay, whether the save that just happened was periodic or a stage end
    (a stage-end save kept one periodic checkpoint fewer), and stage-end checkpoints always stay."""
    from train.checkpoint import CheckpointManager

    manager = CheckpointManager(tmp_path, keep=2, rank=0)

    def save(step, stage_end=False):
        tag = f"0-general-step{step:07d}"
        (manager.dir / tag).mkdir(parents=True)
        (manager.dir / tag / "meta.json").write_text(
            json.dumps({"state": {"global_step": step, "stage_complete": stage_end}}))
        manager._retain(protect=tag)
        return sorted(int(p.name[-7:]) for p in manager.dir.iterdir() if p.name.startswith("0-"))

    assert save(1) == [1]
    assert save(2) == [1, 2]
    assert save(3) == [2, 3]
    assert save(4, stage_end=True) == [2, 3, 4]
    assert save(5) == [3, 4, 5]
    assert save(6) == [4, 5, 6]


def _checkpoint(manager, step, stage_end=False):
    tag = f"0-general-step{step:07d}"
    (manager.dir / tag).mkdir(parents=True)
    (manager.dir / tag / "meta.json").write_text(
        json.dumps({"state": {"global_step": step, "stage_complete": stage_end}}))
    return tag


def test_latest_falls_back_to_the_newest_complete_checkpoint_not_the_oldest(tmp_path):
    """m01 (`return others[0]`): with three complete checkpoints left and `latest` naming a fourth that is gone,
    the fallback is step 3, the newest (the docstring; README "a missing one falls back"). The suite's fallback
    tests leave only one complete checkpoint, where newest == oldest."""
    from train.checkpoint import CheckpointManager

    manager = CheckpointManager(tmp_path, keep=5, rank=1)
    for s in (1, 2, 3):
        _checkpoint(manager, s)
    (manager.dir / "latest").write_text("0-general-step0000004")
    assert manager.latest() == "0-general-step0000003"


def test_retention_with_keep_3_never_drops_below_keep(tmp_path):
    """m02 (`periodic[: len(periodic) - keep]`, the max(0, ...) dropped): with keep=3 and only two periodic
    checkpoints besides a stage-end save, nothing may go (2 <= 3). The suite uses keep=2, where the negative
    slice of a 1-element list happens to be empty too."""
    from train.checkpoint import CheckpointManager

    manager = CheckpointManager(tmp_path, keep=3, rank=0)
    _checkpoint(manager, 1)
    _checkpoint(manager, 2)
    manager._retain(protect=_checkpoint(manager, 3, stage_end=True))
    assert sorted(p.name for p in manager.dir.iterdir()) == [
        "0-general-step0000001", "0-general-step0000002", "0-general-step0000003"]


def test_retention_leaves_a_checkpoint_with_a_damaged_meta_json_alone(tmp_path):
    """Retention parsed every meta.json itself, so one cut short (a disk fault, an edit) raised JSONDecodeError on
    rank 0 after every later save was published, which no handler caught: a traceback there and the other ranks
    left waiting in the save's agreement, at every relaunch. It now skips what `complete()` skips."""
    from train.checkpoint import CheckpointManager

    manager = CheckpointManager(tmp_path, keep=1, rank=0)
    damaged = manager.dir / _checkpoint(manager, 1) / "meta.json"
    damaged.write_text(damaged.read_text()[:20])
    _checkpoint(manager, 2)
    manager._retain(protect=_checkpoint(manager, 3))
    assert sorted(p.name for p in manager.dir.iterdir()) == ["0-general-step0000001", "0-general-step0000003"]
    assert manager.complete() == ["0-general-step0000003"]


def test_spike_detector_judges_from_min_history_steps_on():
    """m03 (`>=` -> `>` on min_history): 'after `min_history` steps' -- with 3 losses seen and min_history=3 the
    4th is judged. The run tests spike at step 8 with min_history=3, far past the boundary."""
    from train.faults import SpikeDetector

    d = SpikeDetector(factor=3, window=5, min_history=3)
    assert [d.check(x) for x in (1.0, 1.0, 1.0)] == [None, None, None]
    assert d.check(10.0) == 1.0


def test_spike_detector_factor_0_is_off_and_spikes_are_not_recorded():
    """m51 (`factor <= 0` -> `< 0`): spike_factor=0 is the documented 'detector off' (the default), so no loss
    is ever a spike (with the mutant, every loss > 0 = 0 x median is one: every default run logs loss_spike events
    and, with spike_action=rollback, rolls back at every step). m50 (the loss appended before the check): a spike
    must not enter the window (the docstring), else its median creeps up after each spike."""
    from train.faults import SpikeDetector

    off = SpikeDetector(factor=0.0, window=5, min_history=1)
    assert all(off.check(x) is None for x in (1.0, 2.0, 100.0, 1e6))
    d = SpikeDetector(factor=3, window=5, min_history=3)
    for x in (1.0, 1.0, 1.0):
        d.check(x)
    assert d.check(10.0) == 1.0
    assert list(d.history) == [1.0, 1.0, 1.0]


def test_rollbacks_are_capped_skip_before_is_skipped_and_spikes_stay_out_of_the_window(data_root, tmp_path):
    """Spikes injected at General steps 8 and 10 with spike_skip_before=1 and max_rollbacks=1.
    m26 (`first = step`, spike_skip_before ignored; no test sets it): the rollback skips steps 7 and 8.
    m25 (`rollbacks` not carried over the reload): the count lives in the checkpoint the rollback reloads (0
    there), so the cap never bit: the second spike rolled back again; it must only be logged.
    m50 (a spike's loss entering the detector's window): the logged spike of step 10 is not in the window saved
    with the stage-end checkpoint."""
    overrides = ["model=tiny_dense", "eval.enabled=false", "deepspeed=zero1", "curriculum.order=[general]",
                 "curriculum.stages.general.tokens=12288", "curriculum.stages.general.checkpoint_every=2",
                 "faults.spike_factor=3", "faults.spike_window=5", "faults.spike_min_history=3",
                 "faults.spike_action=rollback", "faults.spike_skip_before=1", "faults.max_rollbacks=1",
                 f"run_dir={tmp_path}"]
    proc = run_train([*SMOKE, *overrides], env={"TRISTAGE_INJECT": "spike@general:8,spike@general:10"})
    assert proc.returncode == 0, proc.stdout[-3000:]
    recs = records(tmp_path)
    assert [(r["to_checkpoint"], r["skip_steps"]) for r in recs if r.get("event") == "rollback"] == [
        ("0-general-step0000006", ["general:7", "general:8"])]
    assert [r["step"] for r in recs if r.get("event") == "skipped_batch"] == [7, 8]
    assert [(r["step"], r["action"]) for r in recs if r.get("event") == "loss_spike"] == [(8, "rollback"), (10, "log")]
    spike = [r["loss"] for r in steps(tmp_path) if r["step"] == 10][-1]
    meta = json.loads((tmp_path / "checkpoints" / "0-general-step0000012" / "meta.json").read_text())
    assert meta["state"]["rollbacks"] == 1 and len(meta["state"]["loss_history"]) == 5
    assert spike not in meta["state"]["loss_history"]


def test_a_spike_before_the_first_checkpoint_is_only_logged(data_root, tmp_path):
    """m79 (`and self.checkpoints.latest() is not None` dropped from can_roll): with nothing to roll back to,
    a spike under spike_action=rollback is logged (action 'log') and training goes on; the mutant raised _Rollback
    and died in _rollback's `assert tag is not None` (a traceback, exit 1). Every suite spike test has a
    checkpoint before its spike."""
    proc = run_train([*SMOKE, f"run_dir={tmp_path}", "model=tiny_dense", "eval.enabled=false", "deepspeed=zero1",
                      "curriculum.order=[general]", "checkpoint.export_hf=false",
                      "curriculum.stages.general.tokens=8192", "faults.spike_factor=3", "faults.spike_window=5",
                      "faults.spike_min_history=3", "faults.spike_action=rollback"],
                     env={"TRISTAGE_INJECT": "spike@general:5"})
    assert proc.returncode == 0, proc.stdout[-3000:]
    recs = records(tmp_path)
    assert [(r["step"], r["action"]) for r in recs if r.get("event") == "loss_spike"] == [(5, "log")]
    assert not [r for r in recs if r.get("event") == "rollback"]
    assert [r["step"] for r in steps(tmp_path)] == list(range(1, 9))


def test_spike_detector_compares_with_the_median_of_its_window_and_its_seed_history():
    """The window is the last `window` losses (not all of them), the baseline their median (not the mean, which
    one high early loss drags up), a resumed detector starts from the checkpoint's history, and a loss equal to
    factor x median is not above it."""
    from train.faults import SpikeDetector

    d = SpikeDetector(factor=3, window=3, min_history=1)
    for x in (1.0, 1.0, 1.0, 2.5, 2.5, 2.5):
        assert d.check(x) is None
    assert list(d.history) == [2.5, 2.5, 2.5] and d.check(7.0) is None  # 7 < 3 x 2.5; all six: median 1.75
    d = SpikeDetector(factor=3, window=5, min_history=3)
    assert [d.check(x) for x in (1.0, 1.0, 7.0)] == [None, None, None]  # before min_history: recorded unjudged
    assert d.check(4.0) == 1.0  # median 1 (the mean, 3, would call 4 normal)
    assert d.check(3.0) is None  # 3 = 3 x 1 is not above it
    resumed = SpikeDetector(factor=3, window=5, min_history=3, history=[1.0, 1.0, 1.0])
    assert resumed.check(10.0) == 1.0


def test_watchdog_verdict_names_the_stuck_the_silent_and_the_waiting_ranks():
    """The verdict from the ranks' states on the store: stuck and silent ranks named, and the waiting ranks are
    those that said so (the hung-rank run has 2 ranks, where 'every rank but me' looks the same)."""
    from train.faults import Watchdog

    class Store:
        def __init__(self, values):
            self.values = dict(values)

        def set(self, key, value):
            self.values[key] = value

        def check(self, keys):
            return all(k in self.values for k in keys)

        def get(self, key):
            return self.values[key].encode()

    dog = Watchdog(rank=3, world=4, timeout_s=0.4)
    dog._store = Store({"tristage/hang/0": "1|waiting in a collective in wait (x.py:1)",
                        "tristage/hang/1": "0|stuck in sleep (y.py:2)"})  # rank 2 does not answer
    verdict = dog._gather("waiting in a collective in wait (x.py:1)", True)
    assert verdict == ("hung collective: rank 1 (stuck in sleep (y.py:2)), rank 2 (did not answer); "
                       "ranks [0, 3] wait for them")
    assert dog._store.values["tristage/hang/3"] == "1|waiting in a collective in wait (x.py:1)"
    dog._store = Store({f"tristage/hang/{r}": "1|waiting" for r in range(3)})
    assert dog._gather("waiting", True).startswith("every rank waits in a collective")


def test_each_rank0_wait_has_its_own_key_even_under_the_same_name(monkeypatch):
    """The waiting ranks read rank 0's outcome from the store: a second wait under the same name (a stage's data
    index built again after a rollback) must not find the first one's answer there and go on before rank 0."""
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    from train import dist as tdist

    keys = []

    class Store:
        def set(self, key, value):
            keys.append(key)

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(c10d, "_get_default_store", lambda: Store())
    assert tdist.rank0_outcome("building the index", None) is None
    assert tdist.rank0_outcome("building the index", "OSError: disk full") == "OSError: disk full"
    assert len(keys) == 2 and len(set(keys)) == 2


@pytest.mark.parametrize("spec", ["garbage", "kill@general", "kill@general:x", "nan@general:2, kill@:3",
                                  "kill@general:3:0:1"])
def test_a_malformed_injection_spec_is_a_config_error_naming_it(monkeypatch, spec):
    """`TRISTAGE_INJECT=garbage` was an IndexError traceback at the first step (exit 1); now a ConfigError, which
    the loop turns into exit 2, naming the variable, the value and the form it takes."""
    from train.config import ConfigError
    from train.faults import injected

    monkeypatch.setenv("TRISTAGE_INJECT", spec)
    with pytest.raises(ConfigError) as e:
        injected("kill", "general", 1, 0)
    assert str(e.value).startswith(f"TRISTAGE_INJECT={spec!r}: ")
    assert "is not kind@stage:step[:rank]" in str(e.value)
    monkeypatch.setenv("TRISTAGE_INJECT", "nan@general:2, kill@general:3:1")
    assert injected("nan", "general", 2, 5) and injected("kill", "general", 3, 1)
    assert not injected("kill", "general", 3, 0) and not injected("nan", "general", 3, 0)
    # the same fault on two ranks is two items: the second kept only its own rank (a stall meant for ranks 0 and 1
    # stalled rank 1 alone)
    monkeypatch.setenv("TRISTAGE_INJECT", "stall@general:2:0,stall@general:2:1")
    assert [injected("stall", "general", 2, r) for r in range(3)] == [True, True, False]


def srun_ranks(world: int, run_dir: Path, spec: str, *overrides: str) -> list:
    """`world` ranks started as srun starts them (RANK, WORLD_SIZE, MASTER_ADDR/PORT; no torchrun agent to end the
    rest when one fails; the rendezvous store in rank 0's process), with faults `spec`."""
    port, procs = free_port(), []
    for rank in range(world):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "TRISTAGE_INJECT": spec}
        procs.append(subprocess.Popen(train_cmd([*SMOKE, f"run_dir={run_dir}", *BASE, "threads=1",
                                                 "dist.timeout_s=300", *overrides]), cwd=ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    return procs


def test_a_rank_that_fails_ends_the_others_where_no_launcher_does(data_root, tmp_path):
    """Four srun-style ranks (`srun_ranks`): rank 2 raises at the start of step 2 while the others are busy (a stall
    standing in for work or an NCCL wait). They waited out dist.timeout_s and ended as a hang (exit 3); now each ends
    within seconds naming rank 2's error, rank 0 last (the store's host waits until the others have read it)."""
    procs = srun_ranks(4, tmp_path / "run", "raise@general:2:2,stall@general:2:0,stall@general:2:1,stall@general:2:3")
    out = {2: procs[2].communicate(timeout=300)[0]}
    failed_at = time.monotonic()
    for rank in (3, 1, 0):
        out[rank] = procs[rank].communicate(timeout=300)[0]
    assert time.monotonic() - failed_at < 60  # PEER_POLL_S and the store host's wait, not dist.timeout_s
    assert procs[2].returncode == 1 and "RuntimeError: injected failure at general step 2 on rank 2" in out[2], out[2]
    told = ("error: rank {}: rank 2 failed (RuntimeError: injected failure at general step 2 on rank 2), so this job "
            "cannot go on; exiting with code 1")
    # a rank in a gloo exchange with rank 2 may fail on its own first (its connection to rank 2 broken)
    for rank in (1, 3):
        assert procs[rank].returncode == 1, out[rank][-3000:]
        assert told.format(rank) in out[rank] or "remote worker" in out[rank], out[rank][-3000:]
    assert procs[0].returncode == 1 and told.format(0) in out[0], out[0][-3000:]  # stalled: only the store told it


def test_an_error_one_rank_meets_alone_at_start_up_ends_the_others_with_its_exit_code(data_root, tmp_path):
    """A named error (exit 2, no traceback) that only rank 1 meets, at start-up (standing in for a file only it
    reads, such as its part of a ZeRO-3 init_from), while rank 0 goes on to wait (a stall standing in for an NCCL
    collective). Named errors were not announced and start-up had no watchdog: rank 0 waited for the process
    group's timeout (2 x dist.timeout_s + 60 s). Now it exits 2 within seconds, naming rank 1's error."""
    procs = srun_ranks(2, tmp_path / "run", "named@start:0:1,stall@start:0:0")
    out1 = procs[1].communicate(timeout=300)[0]
    failed_at = time.monotonic()
    out0 = procs[0].communicate(timeout=120)[0]
    assert time.monotonic() - failed_at < 30
    error = "ConfigError: injected configuration error at start step 0 on rank 1"
    assert procs[1].returncode == 2 and f"error: {error.split(': ', 1)[1]}" in out1, out1[-3000:]
    assert "Traceback" not in out1, out1[-3000:]
    assert procs[0].returncode == 2, out0[-3000:]
    assert (f"error: rank 0: rank 1 failed ({error}), so this job cannot go on; exiting with code 2 at start-up"
            in out0), out0[-3000:]


def test_a_rank_killed_outright_ends_the_others(data_root, tmp_path):
    """Rank 1 of four is SIGKILLed (the out-of-memory killer, a lost node) at the start of step 2; the others
    stall there (standing in for an NCCL collective, which would wait for rank 1 for dist.timeout_s). A killed rank
    says nothing: rank 0, which watches rank 1's beats, names it once they stop for dist.heartbeat_timeout_s, and
    ranks 2 and 3 hear it from the store. Each exits 1 well before dist.timeout_s (300 s here)."""
    procs = srun_ranks(4, tmp_path / "run", "kill@general:2:1,stall@general:2:0,stall@general:2:2,stall@general:2:3",
                       "dist.heartbeat_timeout_s=15")
    procs[1].communicate(timeout=300)
    killed_at = time.monotonic()
    out = {rank: procs[rank].communicate(timeout=120)[0] for rank in (2, 3, 0)}
    assert procs[1].returncode == -signal.SIGKILL
    assert 10 <= time.monotonic() - killed_at < 60  # heartbeat_timeout_s after its last beat (every 5 s)
    news = "rank 1 stopped: no beat for "
    for rank in (0, 2, 3):
        assert procs[rank].returncode == 1, out[rank][-3000:]
        assert f"error: rank {rank}: {news}" in out[rank], out[rank][-3000:]
        assert "(dist.heartbeat_timeout_s; killed outright" in out[rank]


def test_the_store_hosts_death_ends_the_others(data_root, tmp_path):
    """Outside torchrun the rendezvous store lives in rank 0's process: rank 0 SIGKILLed takes it along, and rank 1
    (stalled, standing in for an NCCL wait) could ask no one. It exits 1 once the store has not answered for
    dist.heartbeat_timeout_s."""
    procs = srun_ranks(2, tmp_path / "run", "kill@general:2:0,stall@general:2:1", "dist.heartbeat_timeout_s=15")
    procs[0].communicate(timeout=300)
    killed_at = time.monotonic()
    out = procs[1].communicate(timeout=120)[0]
    assert procs[0].returncode == -signal.SIGKILL
    assert 10 <= time.monotonic() - killed_at < 60  # heartbeat_timeout_s after its last answer (every 5 s)
    assert procs[1].returncode == 1, out[-3000:]
    assert "error: rank 1: the rendezvous store (127.0.0.1:" in out and "has not answered for" in out, out[-3000:]
