"""The launch scripts for real on this machine: 2 "nodes" x 2 processes (two torchrun agents meeting through a
c10d rendezvous on localhost) and the deepspeed launcher with a localhost hostfile, each running the tiny
curriculum to the end with the losses of a single-process run of the same global batch."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trainutil import ROOT, SMOKE, free_port, losses, records, smoke_run

OVERRIDES = ["model=tiny_dense", "eval.enabled=false", "deepspeed=zero2"]


def _env() -> dict:
    # the scripts call `torchrun` / `deepspeed` from PATH: the ones of this interpreter's environment
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}


def _assert_same_losses(run_dir: Path, reference: dict, world: int) -> None:
    got = losses(run_dir)
    assert got.keys() == reference.keys()
    for key in reference:  # other ranks, other summation order: equal up to fp32 rounding
        assert got[key][0] == pytest.approx(reference[key][0], rel=1e-5), key
    starts = [r for r in records(run_dir) if r.get("event") == "stage_start"]
    assert [r["stage"] for r in starts] == ["general", "reasoning", "long_context"]
    assert starts[0]["grad_accum"] == 16 // (4 * world)


def test_two_nodes_of_two_processes_with_torchrun_c10d(data_root, tmp_path_factory, tmp_path):
    """One "node" reads the shared data root, the other a copy of its own (data copied to each node's disk, no
    index there yet): that node's first rank builds its index."""
    reference = losses(smoke_run(tmp_path_factory, "ref-1-launch", OVERRIDES))
    run_dir = tmp_path / "run"
    own_root = tmp_path / "node_data"
    shutil.copytree(data_root, own_root, ignore=shutil.ignore_patterns("index"))
    env = {**_env(), "NNODES": "2", "NPROC": "2", "HEAD_ADDR": "127.0.0.1", "HEAD_PORT": str(free_port()),
           "RDZV_ID": f"test{os.getpid()}"}
    args = ["bash", "launch/torchrun_multi_node.sh", *SMOKE, *OVERRIDES, f"run_dir={run_dir}"]
    nodes = [subprocess.Popen(args, cwd=ROOT, env={**env, **extra}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for extra in ({}, {"TRISTAGE_DATA_ROOT": str(own_root)})]
    outs = [n.communicate(timeout=600)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    _assert_same_losses(run_dir, reference, world=4)
    built = sorted(p.name.split("-")[0] for p in own_root.glob("*/index/*"))
    assert built == ["general", "long_context", "reasoning"]
    assert len(list((run_dir / "checkpoints" / "2-long_context-step0000002").glob("rng_rank*.pt"))) == 4


def test_deepspeed_launcher_with_a_localhost_hostfile(data_root, tmp_path_factory, tmp_path):
    reference = losses(smoke_run(tmp_path_factory, "ref-1-launch", OVERRIDES))
    run_dir = tmp_path / "run"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    env = {**_env(), "HOSTFILE": str(hostfile), "MASTER_PORT": str(free_port())}
    proc = subprocess.run(["bash", "launch/deepspeed_hostfile.sh", *SMOKE, *OVERRIDES, f"run_dir={run_dir}"],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    _assert_same_losses(run_dir, reference, world=2)
