"""Meeting the faults of a long run: loss spikes, hung collectives, and the injection points that test them.

- `SpikeDetector`: a loss above `factor` x the running median of the last `window` steps is a spike; the loop
  logs it with the step's sample indices and, if asked, rolls back to the last checkpoint and skips the batch.
- `Watchdog`: a thread per rank that notices when the rank has made no progress for `dist.timeout_s`, asks every
  rank (through the rendezvous store) whether it is waiting inside a collective or stuck elsewhere, names the
  stuck ranks and ends the job with `HUNG_EXIT_CODE` instead of hanging until a scheduler's wall clock.
- `inject(...)`: fault injection for the tests, driven by the `TRISTAGE_INJECT` environment variable
  (`kind@stage:step[:rank]`, comma-separated). Without the variable every call is two dictionary lookups.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import signal
import statistics
import sys
import threading
import time
import traceback
from collections import deque
from typing import Any, Deque, Dict, Iterable, Iterator, List, Optional, Tuple

import torch.distributed as dist

HUNG_EXIT_CODE = 3  # a collective that did not complete within dist.timeout_s
NONFINITE_EXIT_CODE = 4  # too many consecutive non-finite steps

_ENV = "TRISTAGE_INJECT"


@functools.lru_cache(maxsize=8)
def _parse_injections(spec: str) -> Dict[Tuple[str, str, int], Optional[int]]:
    """{(kind, stage, step): rank or None} of a `kind@stage:step[:rank],...` spec; a malformed item is a ConfigError
    (exit 2) naming the variable and the item: an IndexError traceback came out of the first step otherwise."""
    from train.config import ConfigError

    out: Dict[Tuple[str, str, int], Optional[int]] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        m = re.fullmatch(r"([^@]+)@([^:]+):(\d+)(?::(\d+))?", item)
        if m is None:
            raise ConfigError(f"{_ENV}={spec!r}: {item!r} is not kind@stage:step[:rank] (comma-separated; step and "
                              f"rank integers, e.g. kill@general:3:0)")
        kind, stage, step, rank = m.groups()
        out[(kind, stage, int(step))] = None if rank is None else int(rank)
    return out


def injected(kind: str, stage: str, step: int, rank: int) -> bool:
    """True if the test asked for fault `kind` at (stage, step) on this rank (step counts from 1). The environment
    is read here, not at import: the tests fork runs from a process that imported train before it was set."""
    injections = _parse_injections(os.environ.get(_ENV, ""))
    key = (kind, stage, step)
    return key in injections and injections[key] in (None, rank)


def inject(kind: str, stage: str, step: int, rank: int) -> None:
    """Carry out the process-level faults: `stall` (sleep forever), `slow_export` (an HF export that takes
    TRISTAGE_SLOW_S seconds more, default 10), `enospc` / `enospc_in_write` (a full disk after DeepSpeed's part of
    a checkpoint save / in its first file), `kill` / `kill_in_save` / `kill_after_rollback` (SIGKILL at the start
    of a step / in the middle of a checkpoint save / right after a spike rollback to the checkpoint at that step),
    `sigusr1` (the signal, to this process, at the start of a step), `raise` (a RuntimeError there)."""
    if not injected(kind, stage, step, rank):
        return
    if kind == "stall":
        while True:
            time.sleep(3600)
    if kind == "slow_export":
        time.sleep(float(os.environ.get("TRISTAGE_SLOW_S", "10")))
    if kind == "sigusr1":
        os.kill(os.getpid(), signal.SIGUSR1)
    if kind in ("enospc", "enospc_in_write"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "(injected)")
    if kind in ("kill", "kill_in_save", "kill_after_rollback"):
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "raise":
        raise RuntimeError(f"injected failure at {stage} step {step} on rank {rank}")


class SpikeDetector:
    """Flags a loss above `factor` x the median of the last `window` losses (after `min_history` steps)."""

    def __init__(self, factor: float, window: int, min_history: int, history: Iterable[float] = ()):
        self.factor = factor
        self.min_history = min_history
        self.history: Deque[float] = deque(history, maxlen=window)

    def check(self, loss: float) -> Optional[float]:
        """Record `loss`; return the median it was compared with if it is a spike (spikes are not recorded)."""
        if self.factor <= 0:
            return None
        if len(self.history) >= self.min_history:
            median = statistics.median(self.history)
            if loss > self.factor * median:
                return median
        self.history.append(loss)
        return None


_COMM_MARKERS = (os.sep + "torch" + os.sep + "distributed" + os.sep, os.sep + "deepspeed" + os.sep + "comm" + os.sep,
                 os.sep + "deepspeed" + os.sep + "runtime" + os.sep + "zero" + os.sep)


def collective_result(t: Any) -> Any:
    """`t`, the output of a collective, on the host.

    Under NCCL a collective returns before the other ranks have joined it, and the host waits at the next
    sync instead, here; the watchdog counts a rank stuck here as waiting in a collective (a healthy rank
    waiting for a stuck one), as it does a rank stuck inside torch.distributed under gloo.
    """
    return t.cpu()


# host syncs right after a collective: collective_result, and the expert-parallel split sizes in models/moe.py
# (models/ imports nothing from train/)
_COLLECTIVE_SYNCS = {("faults.py", "collective_result"), ("moe.py", "_split_sizes")}


def _describe_main_thread() -> Tuple[bool, str]:
    """(waiting in a collective?, the innermost frame of the main thread) for this process."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    if frame is None:
        return False, "main thread gone"
    stack = traceback.extract_stack(frame)
    waiting = any(any(m in f.filename for m in _COMM_MARKERS)
                  or (os.path.basename(f.filename), f.name) in _COLLECTIVE_SYNCS for f in stack)
    inner = stack[-1]
    return waiting, f"{inner.name} ({os.path.basename(inner.filename)}:{inner.lineno})"


PEER_POLL_S = 5.0  # how often a watchdog asks the store whether another rank failed


def _failure_key(job: str) -> str:
    # a torchrun restart (--max_restarts) keeps its agent's store: the failure of the attempt before is not news
    return f"tristage/failed/{job}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def announce_failure(rank: int, error: BaseException, job: str) -> None:
    """Tell the other ranks of job `job` (its run_dir), through the rendezvous store, that this rank failed with
    `error`: their watchdogs end them within PEER_POLL_S seconds. Otherwise, where no launcher ends them (srun with
    --kill-on-bad-exit=0, which a preemption's checkpoint needs; plain env:// launches), they wait in their next
    collective for dist.timeout_s (NCCL) and the job's GPUs idle that long. Nothing is said where the store is
    gone (it lives in rank 0's process outside torchrun)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    first = str(error).splitlines()[0] if str(error) else ""
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        # the first failure is the news: a peer's broken connection to the failed rank does not replace it
        _get_default_store().compare_set(_failure_key(job), "", f"rank {rank} failed ({type(error).__name__}: {first})")
    except Exception:  # noqa: BLE001 - the store's host ended: no one to tell
        return
    _linger_as_store_host(rank)


def _linger_as_store_host(rank: int) -> None:
    """Outside torchrun the rendezvous store lives in rank 0's process: before it exits, every other rank's
    watchdog gets the time of two polls to read the failure there (they would find the store gone and wait on)."""
    if rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        time.sleep(2 * PEER_POLL_S + 1)


class Watchdog:
    """Ends the job, naming the stuck ranks, when this rank makes no progress for `timeout_s` seconds; ends this
    rank within PEER_POLL_S seconds when another rank of job `job` announced a failure (`announce_failure`)."""

    def __init__(self, rank: int, world: int, timeout_s: float, where: str = "", job: str = ""):
        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        self.job = job
        self.last = time.monotonic()
        self.where = where
        self._stop = threading.Event()
        self._suspended = False
        self._thread: Optional[threading.Thread] = None
        self._store = None
        if dist.is_initialized() and world > 1:
            from torch.distributed.distributed_c10d import _get_default_store

            self._store = _get_default_store()

    def start(self) -> "Watchdog":
        """Start watching in a daemon thread."""
        self._thread = threading.Thread(target=self._run, name="tristage-watchdog", daemon=True)
        self._thread.start()
        return self

    def beat(self, where: str) -> None:
        """The main thread made progress (called at every micro-step and around saves and evaluations)."""
        self.last = time.monotonic()
        self.where = where

    def stop(self) -> None:
        """Stop watching."""
        self._stop.set()

    @contextlib.contextmanager
    def suspended(self, where: str) -> Iterator[None]:
        """Known long work without steps, not a hang: rank 0 building a large stage's data index (minutes for
        billions of samples) while the others wait for it (`train.dist.on_rank0`). Watching resumes, from now, on
        leaving."""
        self.beat(where)
        self._suspended = True
        try:
            yield
        finally:
            self._suspended = False
            self.beat(f"after {where}")

    def _run(self) -> None:
        polled = time.monotonic()
        while not self._stop.wait(min(1.0, self.timeout_s / 10)):
            if not self._suspended and time.monotonic() - self.last > self.timeout_s:
                self._fire()
            if self._store is not None and time.monotonic() - polled >= PEER_POLL_S:
                polled = time.monotonic()
                failed = self._peer_failure()
                if failed and not failed.startswith(f"rank {self.rank} ") and not self._stop.is_set():
                    print(f"error: rank {self.rank}: {failed}, so this job cannot go on; exiting with code 1 at "
                          f"{self.where}", file=sys.stderr, flush=True)
                    _linger_as_store_host(self.rank)
                    os._exit(1)

    def _peer_failure(self) -> Optional[str]:
        """What another rank of this job announced (`announce_failure`), or None."""
        key = _failure_key(self.job)
        try:
            return self._store.get(key).decode() if self._store.check([key]) else None
        except Exception:  # noqa: BLE001 - the store's host ended (rank 0 outside torchrun): its own exit says why
            return None

    def _fire(self) -> None:
        waiting, frame = _describe_main_thread()
        mine = f"{'waiting in a collective' if waiting else 'stuck'} in {frame} at {self.where}"
        try:
            verdict = self._gather(mine, waiting)
        except Exception as e:  # noqa: BLE001 - the store's host ended (rank 0 outside torchrun): still exit
            verdict = f"rank {self.rank} {mine}; the other ranks could not be asked ({type(e).__name__}: {e})"
        print(f"error: rank {self.rank}: no progress for {self.timeout_s:.0f}s (dist.timeout_s); {verdict}; "
              f"exiting with code {HUNG_EXIT_CODE}", file=sys.stderr, flush=True)
        os._exit(HUNG_EXIT_CODE)

    def _gather(self, mine: str, waiting: bool) -> str:
        """Publish this rank's state and read the others' for a few seconds; name the ranks not in a collective."""
        if self._store is None:
            return f"rank {self.rank} {mine}"
        key = "tristage/hang/{}"
        self._store.set(key.format(self.rank), f"{int(waiting)}|{mine}")
        states: Dict[int, str] = {}
        deadline = time.monotonic() + min(10.0, self.timeout_s)
        while time.monotonic() < deadline and len(states) < self.world:
            for r in range(self.world):
                if r not in states and self._store.check([key.format(r)]):
                    states[r] = self._store.get(key.format(r)).decode()
            time.sleep(0.2)
        stuck: List[str] = []
        for r in range(self.world):
            if r not in states:
                stuck.append(f"rank {r} (did not answer)")
            elif states[r].startswith("0|"):
                stuck.append(f"rank {r} ({states[r][2:]})")
        waiting_ranks = [r for r in range(self.world) if states.get(r, "").startswith("1|")]
        if not stuck:
            return f"every rank waits in a collective ({mine}): a peer process or the network failed"
        return f"hung collective: {', '.join(stuck)}; ranks {waiting_ranks} wait for them"
