"""Training runs for the tests, forked from a process that has already imported torch, DeepSpeed and train.

A `python -m train` launch spends most of a smoke run's time importing torch, torch._dynamo (which
`torch.optim.Optimizer` imports in any case) and DeepSpeed's Muon module (which every ZeRO-1/2 engine imports, and
which loads inductor): a 1-step run took 4.8 s as `python -m train` and 1.2 s forked, on a machine where the suite's
~200 launches were most of its time. So `fork_train` forks them from a `multiprocessing` fork server that made those
imports once. Each forked rank is what torchrun would have started: the caller's environment (with RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT for more than one rank), working directory,
command line and output, `train` run as `__main__`, Python's exit code, its atexit handlers run.

What a fork cannot stand in for stays with the real launchers (`trainutil.train_cmd`): torchrun's and the deepspeed
launcher's own messages and behaviour, signals sent to a launcher, and import-time effects of the environment (the
server imported train before a test set its variables, so train reads them when it runs: TRISTAGE_INJECT in
train/faults.py). tests/test_forkrun.py compares forked and launched runs.
"""
from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.connection
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Dict, List, Mapping, Sequence

# what a run imports that takes long (python -X importtime -m train); the rest is quick
# (not train.__main__: runpy runs it as __main__, and warns when it was imported before)
PRELOAD = ["torch", "torch._dynamo", "deepspeed", "deepspeed.runtime.zero.muon.muon_optimizer", "hydra",
           "omegaconf", "train.loop"]
# torchrun's pause between SIGTERM to the ranks left when one failed, and SIGKILL
_TERM_GRACE_S = 30.0

_CONTEXT = None


def _context():
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(PRELOAD)
    return _CONTEXT


def _rank_main(argv: List[str], env: Dict[str, str], cwd: str, log: str) -> None:
    """A forked rank: `python -m train *argv` with `env` in `cwd`, stdout and stderr to file `log`; ends the process
    with the exit code Python would have (0, SystemExit's code, or 1 after printing the uncaught exception)."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.argv = ["-m", *argv]  # run_module puts the module's path first
    code = 0
    try:
        runpy.run_module("train", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - what the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def free_port() -> int:
    """A TCP port of localhost that nothing listens on now (for a run's MASTER_PORT)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def signal_tree(pid: int, sig: int) -> list:
    """Send `sig` to process `pid` and all its descendants; returns them (psutil.Process), `pid` first."""
    import psutil

    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    for p in tree:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    return tree


def fork_train(argv: Sequence[str], nproc: int, env: Mapping[str, str], cwd: Path,
               timeout: float) -> subprocess.CompletedProcess:
    """Run `python -m train *argv` on `nproc` forked ranks as torchrun would (one rank: as `python -m train`);
    returns the finished run, every rank's output in .stdout, rank 0's first. One rank's code is the run's; with
    more, a failed rank has the others sent SIGTERM (SIGKILL 30 s later) and the run's code is 1, as torchrun's."""
    ctx = _context()
    with tempfile.TemporaryDirectory(prefix="forkrun-") as tmp:
        port = str(free_port())
        procs, logs = [], []
        for rank in range(nproc):
            rank_env = dict(env)
            if nproc > 1:
                rank_env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                                LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0", ROLE_RANK=str(rank),
                                ROLE_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                                TORCHELASTIC_RUN_ID="forkrun", TORCHELASTIC_RESTART_COUNT="0",
                                TORCHELASTIC_MAX_RESTARTS="0")
                rank_env.setdefault("OMP_NUM_THREADS", "1")
            logs.append(os.path.join(tmp, f"rank{rank}.log"))
            proc = ctx.Process(target=_rank_main, args=(list(argv), rank_env, str(cwd), logs[-1]))
            proc.start()
            procs.append(proc)
        deadline, failed_at = time.monotonic() + timeout, None
        try:
            while any(p.exitcode is None for p in procs):
                if time.monotonic() > deadline:
                    raise subprocess.TimeoutExpired(["fork_train", *argv], timeout, output=_read(logs))
                if failed_at is None and any(p.exitcode not in (None, 0) for p in procs) and nproc > 1:
                    failed_at = time.monotonic()
                    for p in procs:
                        if p.exitcode is None:
                            signal_tree(p.pid, signal.SIGTERM)
                if failed_at is not None and time.monotonic() - failed_at > _TERM_GRACE_S:
                    for p in procs:
                        if p.exitcode is None:
                            signal_tree(p.pid, signal.SIGKILL)
                multiprocessing.connection.wait([p.sentinel for p in procs if p.exitcode is None], timeout=0.2)
        finally:
            for p in procs:
                if p.exitcode is None:
                    signal_tree(p.pid, signal.SIGKILL)
                p.join()
        codes = [p.exitcode for p in procs]
        code = codes[0] if nproc == 1 else int(any(codes))
        return subprocess.CompletedProcess(["fork_train", *argv], code, stdout=_read(logs))


def _read(logs: List[str]) -> str:
    return "".join(Path(p).read_text(errors="replace") if os.path.exists(p) else "" for p in logs)
