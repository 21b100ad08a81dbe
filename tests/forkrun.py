"""Training runs for the tests, forked from a process that has already imported torch, DeepSpeed and train.

A `python -m train` launch spends most of a smoke run's time importing torch, torch._dynamo (which
`torch.optim.Optimizer` imports in any case) and DeepSpeed's Muon module (which every ZeRO-1/2 engine imports, and
which loads inductor): a 1-step run took 4.8 s as `python -m train` and 1.2 s forked, on a machine where the suite's
~200 launches were most of its time. So `fork_train` forks them from a `multiprocessing` fork server that made those
imports once. Each forked rank is what torchrun would have started: the caller's environment (with RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT for more than one rank), working directory,
command line and output, `train` run as `__main__`, Python's exit code, its atexit handlers run; for more ranks
the worker environment torchrun gives, with the rendezvous store hosted by the caller as torchrun's agent hosts it.

What a fork cannot stand in for stays with the real launchers (`trainutil.train_cmd`): torchrun's and the deepspeed
launcher's own messages and behaviour, signals sent to a launcher, and import-time effects of the environment (the
server imported train before a test set its variables, so train reads them when it runs: TRISTAGE_INJECT in
train/faults.py). Forked ranks also share the server's string-hash salt (PYTHONHASHSEED), where launched ranks each
have their own: a rank-dependent set or dict order would show only in launched runs, so every multi-rank path keeps
launched runs too (tests/test_forkrun.py, test_launch_real.py, the SIGKILL, SIGTERM and full-disk tests), and
tests/test_forkrun.py compares forked and launched runs.
"""
from __future__ import annotations

import atexit
import io
import multiprocessing
import multiprocessing.connection
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import threading
import time
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
    """The forkserver context, its server started with OpenBLAS on one thread: numpy's import otherwise leaves a
    pool thread in it, and a process with threads should not fork (Python 3.12 warns)."""
    global _CONTEXT
    if _CONTEXT is None:
        from multiprocessing import forkserver
        from unittest import mock

        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(PRELOAD)
        with mock.patch.dict(os.environ, OPENBLAS_NUM_THREADS="1"):
            forkserver.ensure_running()
    return _CONTEXT


def _rank_main(argv: List[str], env: Dict[str, str], cwd: str, log: str) -> None:
    """A forked rank: `python -m train *argv` with `env` in `cwd`, stdout and stderr unbuffered (PYTHONUNBUFFERED's)
    to file `log`; ends the process as the interpreter would: 0, SystemExit's code, 1 after printing an uncaught
    exception, killed by SIGINT after a KeyboardInterrupt; non-daemon threads joined, then the atexit handlers."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    for stream in (sys.stdout, sys.stderr):  # the server's, which handlers made at import (DeepSpeed's logger) hold
        stream.reconfigure(line_buffering=True)
    sys.stdout, sys.stderr = (io.TextIOWrapper(io.FileIO(n, "w", closefd=False), encoding="utf-8",
                                               errors="backslashreplace", write_through=True) for n in (1, 2))
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.argv = ["-m", *argv]  # run_module puts the module's path first
    code, interrupted = 0, False
    try:
        runpy.run_module("train", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        sys.excepthook(*sys.exc_info())  # torch's, once a process group exists: it prefixes [rank<N>]
        interrupted = True
    except BaseException:  # noqa: BLE001 - what the interpreter does with an uncaught exception
        sys.excepthook(*sys.exc_info())
        code = 1
    try:
        threading._shutdown()  # type: ignore[attr-defined]  # the interpreter's own wait for non-daemon threads
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.__stdout__, sys.__stderr__, sys.stdout, sys.stderr):
            stream.flush()
        if interrupted:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
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
    returns the finished run, every rank's output in .stdout, rank 0's first, then a line per failed rank. One
    rank's code is the run's; with more, the rendezvous store is this process's (as torchrun's agent hosts it, so a
    rank's death does not take the store from the others), a failed rank has the others sent SIGTERM (SIGKILL 30 s
    later), and the run's code is 1, as torchrun's."""
    from torch.distributed import TCPStore

    ctx = _context()
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False) if nproc > 1 else None
    procs, logs = [], []
    with tempfile.TemporaryDirectory(prefix="forkrun-") as tmp:
        try:
            for rank in range(nproc):
                rank_env = dict(env)
                if store is not None:  # what torchrun --nproc_per_node N gives each worker
                    rank_env.update(
                        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                        GROUP_RANK="0", GROUP_WORLD_SIZE="1", ROLE_NAME="default", ROLE_RANK=str(rank),
                        ROLE_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port),
                        TORCHELASTIC_USE_AGENT_STORE="True", TORCHELASTIC_RUN_ID="none",
                        TORCHELASTIC_RESTART_COUNT="0", TORCHELASTIC_MAX_RESTARTS="0",
                        TORCHELASTIC_SIGNALS_TO_HANDLE="SIGTERM,SIGINT,SIGHUP,SIGQUIT",
                        TORCH_NCCL_ASYNC_ERROR_HANDLING="1")
                    rank_env.setdefault("OMP_NUM_THREADS", "1")
                logs.append(os.path.join(tmp, f"rank{rank}.log"))
                procs.append(ctx.Process(target=_rank_main, args=(list(argv), rank_env, str(cwd), logs[-1])))
                procs[-1].start()
            _wait(procs, timeout, lambda: _read(logs))
        finally:
            for p in (p for p in procs if p.pid is not None):  # started
                if p.exitcode is None:
                    signal_tree(p.pid, signal.SIGKILL)
                p.join()
            del store
        codes = [p.exitcode for p in procs]
        out = _read(logs) + "".join(f"[forkrun] rank {r} exited with code {c}\n" for r, c in enumerate(codes) if c)
        return subprocess.CompletedProcess(["fork_train", *argv], codes[0] if nproc == 1 else int(any(codes)),
                                           stdout=out)


def _wait(procs: list, timeout: float, output) -> None:
    """Wait for every rank; once one fails, SIGTERM the others and SIGKILL them 30 s later (torchrun's way)."""
    deadline, failed_at = time.monotonic() + timeout, None
    while any(p.exitcode is None for p in procs):
        if time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(["fork_train"], timeout, output=output())
        if failed_at is None and len(procs) > 1 and any(p.exitcode not in (None, 0) for p in procs):
            failed_at = time.monotonic()
            for p in procs:
                if p.exitcode is None:
                    signal_tree(p.pid, signal.SIGTERM)
        if failed_at is not None and time.monotonic() - failed_at > _TERM_GRACE_S:
            for p in procs:
                if p.exitcode is None:
                    signal_tree(p.pid, signal.SIGKILL)
        multiprocessing.connection.wait([p.sentinel for p in procs if p.exitcode is None], timeout=0.2)


def _read(logs: List[str]) -> str:
    return "".join(Path(p).read_text(errors="replace") if os.path.exists(p) else "" for p in logs)
