"""The suite's forked training runs (tests/forkrun.py) are the runs `python -m train` and torchrun start: the same
numbers bit for bit, the same exit codes. (That a forked run reads its environment when it runs, not the fork
server's when it imported train, the fault-injection tests show: each sets TRISTAGE_INJECT for its run only.)
With CUDA the tests launch for real (trainutil.run_train), and these have nothing to compare."""
from __future__ import annotations

import pytest
import torch

from trainutil import DENSE1, SMOKE, losses, run_train, smoke_run, steps

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="runs are forked only without CUDA")


@pytest.mark.parametrize("nproc, overrides", [(1, DENSE1), (2, ["model=tiny_dense", "deepspeed=zero2"])],
                         ids=["python-m-train", "torchrun-2"])
def test_a_forked_run_trains_bit_for_bit_as_a_launched_one(data_root, tmp_path_factory, tmp_path, nproc,
                                                           overrides):
    """The shared smoke run (forked; other tests use it too) against the same run started by the real launcher:
    every step's loss and gradient norm of the three stages equal, and the same stage sequence."""
    forked = smoke_run(tmp_path_factory, f"tiny_dense-{nproc}", overrides, nproc=nproc)
    proc = run_train([*SMOKE, f"run_dir={tmp_path / 'run'}", *overrides], nproc=nproc, launcher="torchrun")
    assert proc.returncode == 0, proc.stdout[-3000:]
    launched = losses(tmp_path / "run")
    assert len(launched) == len(steps(tmp_path / "run")) == 8  # 4 + 2 + 2 steps
    assert losses(forked) == launched
    assert {r["stage"] for r in steps(forked)} == {"general", "reasoning", "long_context"}


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_refused_config_exits_as_from_the_launcher(data_root, tmp_path, nproc):
    """A value validate() refuses: exit 2 from `python -m train`, and 1 from torchrun (which reports any failed
    rank as 1), with the same message, forked or launched."""
    bad = [*SMOKE, f"run_dir={tmp_path / 'run'}", "curriculum.stages.general.global_batch_tokens=1000"]
    forked = run_train(bad, nproc=nproc)
    launched = run_train(bad, nproc=nproc, launcher="torchrun")
    assert forked.returncode == launched.returncode == (2 if nproc == 1 else 1), launched.stdout[-2000:]
    message = [line for line in launched.stdout.splitlines() if "global_batch_tokens" in line]
    assert message and all(line in forked.stdout for line in message), (message, forked.stdout[-2000:])
