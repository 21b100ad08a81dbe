"""Session fixtures shared by the tests.

CI runs the suite on two pytest-xdist workers (`-n 2`). Each worker is a process of its own, on one torch thread,
and so is each training run it starts (`trainutil.run_train`, forked or launched): two tests then share the two
cores, where two processes of two threads each would keep four threads spinning on them. What the workers share
(the prepared fixture corpus here, the smoke runs in `trainutil.smoke_run`) is made once, by the first worker that
needs it, under a file lock in a folder they all see (`trainutil.shared_dir`).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from filelock import FileLock

from trainutil import UNDER_XDIST, shared_dir

if UNDER_XDIST:
    os.environ["OMP_NUM_THREADS"] = "1"  # the processes the tests start (a training run takes `threads=1`)
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """One data cache for the whole session, every worker's: the fixture corpus, prepared once."""
    from data.config import compose
    from data.prepare import prepare

    root = shared_dir(tmp_path_factory) / "data"
    os.environ["TRISTAGE_DATA_ROOT"] = str(root)
    with FileLock(f"{root}.lock"):
        prepare(compose("fixture", [f"root={root}"]))  # after the first, a check that it is there
    return root


@pytest.fixture(autouse=True)
def _restore_environment():
    """Tests that start process groups in-process set MASTER_ADDR/PORT & co.; later tests must not inherit them."""
    saved = dict(os.environ)
    yield
    for key in set(os.environ) - set(saved):
        del os.environ[key]
    os.environ.update(saved)
