"""Helpers for tests that run `python -m train` for real (one process, torchrun or deepspeed) and read its metrics."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from filelock import FileLock

from forkrun import fork_train, free_port, signal_tree

ROOT = Path(__file__).resolve().parents[1]
UNDER_XDIST = "PYTEST_XDIST_WORKER" in os.environ  # a pytest-xdist worker (tests/conftest.py)
SMOKE = ["experiment=smoke"]
# the one-process dense smoke run several tests share (smoke_run "dense1"); it also records steps 3-4 under
# torch.profiler, and its golden loss file shows that the profiler changes no number
DENSE1 = ["model=tiny_dense", "logging.profile.start_step=3"]
# The General stage of tiny_moe alone for 10 steps of 16 x 64 tokens, at the General stage's real peak LR (3e-4; the
# smoke curriculum's 3e-3 makes 10 steps chaotic enough that fp32 rounding, which differs with any change of
# reduction order - ZeRO-1 vs ZeRO-2 as much as EP - grows past 1e-5 within a few steps). AdamW's eps at 1e-6:
# with 1e-8, a weight whose gradient is ~1e-7 (an expert few tokens reach) moves by lr * g / sqrt(v) ~ lr
# whatever g is, so a rounding-level change of g could move it by ~1e-5 after 10 steps. The expert-parallel
# layouts of test_expert_parallel_train run it.
MOE_GENERAL = ["model=tiny_moe", "eval.enabled=false", "curriculum.order=[general]",
               "curriculum.stages.general.tokens=10240", "curriculum.stages.general.lr.peak=3e-4",
               "curriculum.stages.general.lr.final=3e-4", "optim.eps=1e-6",
               "logging.expert_load_every=1",  # every step's table, to compare layouts step by step
               # experts narrower than the model, as in every MoE preset (30B-A3B: 768 x 2,048): with tiny_moe's
               # square 128 x 128 experts, a gate/up/down axis mixed up in the expert files or the re-sharding
               # would go unseen
               "model.moe_intermediate_size=64",
               "curriculum.stages.general.checkpoint_every=5"]  # step 5 stays (keep=2): resume tests start there
# the one-process MoE run several tests share (smoke_run "tiny_moe-1"): MOE_GENERAL's first 3 steps, 4 micro-batches
# a step, under ZeRO-2, with the router z-loss on and AdamW's eps at 1e-4 (above the gradients of the experts few
# tokens reach, so their rounding does not decide an update)
MOE1 = [*MOE_GENERAL, "deepspeed=zero2", "model.router_z_loss_coef=1e-3", "optim.eps=1e-4", "max_steps=3"]


def shared_dir(tmp_path_factory) -> Path:
    """A folder of this test session that every pytest-xdist worker sees (the session's base folder without xdist,
    whose workers each have a folder of their own under it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if UNDER_XDIST else base


def _overrides(overrides: Sequence[str]) -> List[str]:
    """Under xdist a run's ranks take one thread each (tests/conftest.py)."""
    return [*overrides, "threads=1"] if UNDER_XDIST else list(overrides)


def train_cmd(overrides: Sequence[str], nproc: int = 1, launcher: str = "torchrun") -> List[str]:
    """The command line for a training run (torchrun or deepspeed launcher when nproc > 1)."""
    overrides = _overrides(overrides)
    if nproc == 1:
        return [sys.executable, "-m", "train", *overrides]
    if launcher == "deepspeed":
        return [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(nproc), "--master_port",
                str(free_port()), "--module", "train", *overrides]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(free_port()), "-m", "train", *overrides]


def run_train(overrides: Sequence[str], nproc: int = 1, timeout: float = 600, launcher: Optional[str] = None,
              env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """Run training to completion and return the finished process (stdout+stderr in .stdout).

    `launcher`: "fork" (the default on a machine without CUDA) forks the ranks from a server that has imported
    torch and train already (tests/forkrun.py: a run as `python -m train` or torchrun would start it, without their
    seconds of imports); "torchrun" (the default with CUDA: DeepSpeed's import asks CUDA for its devices, and a
    process that has cannot fork CUDA users) or "deepspeed" start the real launcher (`python -m train` for one
    rank), for what only they do: their own messages and exit codes, signals to them, import-time effects."""
    import torch

    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    if launcher is None:
        launcher = "torchrun" if torch.cuda.is_available() else "fork"
    if launcher == "fork":
        return fork_train(_overrides(overrides), nproc, full_env, ROOT, timeout)
    return subprocess.run(train_cmd(overrides, nproc, launcher), cwd=ROOT, env=full_env, timeout=timeout,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_tree(pid: int) -> None:
    """SIGKILL process `pid` and all its descendants: torchrun starts its workers in sessions of their own, so a
    signal to the launcher's process group would leave them training."""
    import psutil

    tree = signal_tree(pid, signal.SIGKILL)
    psutil.wait_procs(tree[1:], timeout=30)  # not the root: its parent reaps it, and reads its exit code


def kill_when(overrides: Sequence[str], run_dir: Path, stage: str, step: int, nproc: int = 1,
              timeout: float = 600) -> int:
    """Start training, SIGKILL the launcher and every rank once metrics show (stage, step); returns the exit code."""
    proc = subprocess.Popen(train_cmd(overrides, nproc), cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            if any(r.get("stage") == stage and r.get("step") == step for r in steps(run_dir)):
                kill_tree(proc.pid)
                return proc.wait()
            if proc.poll() is not None:
                raise AssertionError(f"run ended (code {proc.returncode}) before {stage} step {step}")
            time.sleep(0.05)
        raise AssertionError("timed out waiting for the step to kill at")
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.wait()


def records(run_dir: Path) -> List[dict]:
    """Every line of metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written while we read
            pass
    return out


def steps(run_dir: Path) -> List[dict]:
    """The per-step metrics records (no events)."""
    return [r for r in records(run_dir) if "event" not in r]


def losses(run_dir: Path) -> Dict[Tuple[str, int], Tuple[float, float]]:
    """(stage, step) -> (loss, grad norm), the last record for each step (a resumed run logs some twice)."""
    return {(r["stage"], r["step"]): (r["loss"], r["grad_norm"]) for r in steps(run_dir)}


_RUNS: Dict[Tuple[Tuple[str, ...], int], Path] = {}


def run_key(overrides: Sequence[str], nproc: int) -> Tuple[Tuple[str, ...], int]:
    """What decides a smoke run: its overrides, the last for each config key as Hydra takes them, in any order."""
    last = {o.split("=", 1)[0]: o for o in overrides}
    return tuple(sorted(last.values())), nproc


def smoke_run(tmp_path_factory, name: str, overrides: Sequence[str], nproc: int = 1) -> Path:
    """Run the smoke curriculum once per test session for each config and return its run directory.

    Tests that ask for the same overrides on the same number of ranks share one run (`name` only labels its
    folder), so a test must not write into the directory it gets: copy it first. Under xdist the first worker to
    ask makes it and the others wait for it (a lock beside the folder; `.done` once it finished).
    """
    key = run_key(overrides, nproc)
    if key not in _RUNS:
        run_dir = shared_dir(tmp_path_factory) / f"{name}-{hashlib.sha1(repr(key).encode()).hexdigest()[:12]}"
        done = run_dir.parent / f"{run_dir.name}.done"
        with FileLock(f"{run_dir}.lock"):
            if not done.exists():
                shutil.rmtree(run_dir, ignore_errors=True)  # a run that failed in another worker: again, here
                proc = run_train([*SMOKE, f"run_dir={run_dir}", *overrides], nproc=nproc)
                assert proc.returncode == 0, proc.stdout[-4000:]
                done.touch()
        _RUNS[key] = run_dir
    return _RUNS[key]


def end_spawned_worker() -> None:
    """End a torch.multiprocessing.spawn worker that finished its work (process group already destroyed).

    Exits at once, without C++ static destructors: a thread of gloo or the autograd engine still joinable
    when they run aborts the process ("terminate called without an active exception"), which spawn reports
    as a failed worker (seen with torch 2.11 and 2.13, about once in a few CI runs). Call it only after the
    work succeeded: an exception must still propagate and fail the test.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def stopped_at(source: Path, global_step: int, dest: Path) -> Path:
    """A copy of a finished run as a launch with max_steps=global_step would have left its checkpoints, exports
    and metrics (its eval/, profile/ and wandb files are copied as they are: use it for runs without those).

    Checkpoints after that step, the HF exports of stages not finished by then and the metrics after that step
    go; `latest` names the step's checkpoint, which must exist (checkpoint_every and checkpoint.keep in the
    source run keep it). A periodic save at that step is the save max_steps makes, so a resume from the copy
    is a resume from that launch.
    """
    shutil.copytree(source, dest)
    ckpts = dest / "checkpoints"
    target, finished = None, set()
    for path in ckpts.iterdir():
        if not (path / "meta.json").exists():
            continue
        state = json.loads((path / "meta.json").read_text())["state"]
        if state["global_step"] > global_step:
            shutil.rmtree(path)
        elif state["global_step"] == global_step:
            target = path.name
        if state["stage_complete"] and state["global_step"] <= global_step:
            finished.add(state["stage"])
    assert target, f"{source} has no checkpoint of step {global_step}"
    (ckpts / "latest").write_text(target)
    for export in (dest / "hf").iterdir() if (dest / "hf").exists() else []:
        if export.name not in finished:
            shutil.rmtree(export)
    lines = (dest / "metrics.jsonl").read_text().splitlines(keepends=True)
    end = next((i for i, line in enumerate(lines)
                if "event" not in (r := json.loads(line)) and r["global_step"] > global_step), len(lines))
    while end and json.loads(lines[end - 1]).get("event") == "stage_start":  # the next stage had not begun
        end -= 1
    (dest / "metrics.jsonl").write_text("".join(lines[:end]))
    assert steps(dest)[-1]["global_step"] == global_step
    return dest
