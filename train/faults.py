"""Meeting the faults of a long run: loss spikes, hung collectives, and the injection points that test them.

- `SpikeDetector`: a loss above `factor` x the running median of the last `window` steps is a spike; the loop
  logs it with the step's sample indices and, if asked, rolls back to the last checkpoint and skips the batch.
- `Watchdog`: a thread per rank that notices when the rank has made no progress for `dist.timeout_s`, asks every
  rank (through the rendezvous store) whether it is waiting inside a collective or stuck elsewhere, names the
  stuck ranks and ends the job with `HUNG_EXIT_CODE` instead of hanging until a scheduler's wall clock. It also
  ends this rank within seconds when another rank failed (`announce_failure`) or stopped beating (killed).
- `inject(...)`: fault injection for the tests, driven by the `TRISTAGE_INJECT` environment variable
  (`kind@stage:step[:rank]`, comma-separated). Without the variable every call is two dictionary lookups.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import os
import random
import re
import signal
import socket
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
def _parse_injections(spec: str) -> Dict[Tuple[str, str, int], set]:
    """{(kind, stage, step): the ranks (None: every rank)} of a `kind@stage:step[:rank],...` spec; a malformed item
    is a ConfigError (exit 2) naming the variable and the item: an IndexError traceback came out of the first step
    otherwise."""
    from train.config import ConfigError

    out: Dict[Tuple[str, str, int], set] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        m = re.fullmatch(r"([^@]+)@([^:]+):(\d+)(?::(\d+))?", item)
        if m is None:
            raise ConfigError(f"{_ENV}={spec!r}: {item!r} is not kind@stage:step[:rank] (comma-separated; step and "
                              f"rank integers, e.g. kill@general:3:0)")
        kind, stage, step, rank = m.groups()
        out.setdefault((kind, stage, int(step)), set()).add(None if rank is None else int(rank))
    return out


def injected(kind: str, stage: str, step: int, rank: int) -> bool:
    """True if the test asked for fault `kind` at (stage, step) on this rank (step counts from 1). The environment
    is read here, not at import: the tests fork runs from a process that imported train before it was set."""
    injections = _parse_injections(os.environ.get(_ENV, ""))
    key = (kind, stage, step)
    return bool(injections.get(key, set()) & {None, rank})


def inject(kind: str, stage: str, step: int, rank: int) -> None:
    """Carry out the process-level faults: `stall` (sleep forever), `slow_export` (an HF export that takes
    TRISTAGE_SLOW_S seconds more, default 10), `enospc` / `enospc_in_write` (a full disk after DeepSpeed's part of
    a checkpoint save / in its first file), `kill` / `kill_in_save` / `kill_after_rollback` (SIGKILL at the start
    of a step / in the middle of a checkpoint save / right after a spike rollback to the checkpoint at that step),
    `sigusr1` (the signal, to this process, at the start of a step), `raise` (a RuntimeError there), `named` (a
    ConfigError there: an error with a message, exit 2). Stage `start`, step 0 is start-up, once the model is built."""
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
    if kind == "named":
        from train.config import ConfigError

        raise ConfigError(f"injected configuration error at {stage} step {step} on rank {rank}")


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


PEER_POLL_S = 5.0  # how often a watchdog asks the store whether another rank failed, and beats


def _job_key(what: str, job: str) -> str:
    # a torchrun restart (--max_restarts) keeps its agent's store: the failure of the attempt before is not news
    return f"tristage/{what}/{job}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def _store() -> Any:
    from torch.distributed.distributed_c10d import _get_default_store

    return _get_default_store()


def announce_failure(rank: int, error: BaseException, job: str, code: int = 1) -> None:
    """Tell the other ranks of job `job` (its run_dir), through the rendezvous store, that this rank failed with
    `error` and exits `code`: their watchdogs end them within two polls, with the same code. Otherwise, where no
    launcher ends them (srun with --kill-on-bad-exit=0, which a preemption's checkpoint needs; plain env://
    launches), they wait in their next collective for dist.timeout_s (NCCL) and the job's GPUs idle that long.
    Said for every failure, also one every rank meets together (a refused checkpoint): a rank meeting it alone (a
    file only it reads) would otherwise leave the rest waiting. Nothing is said where the store is gone."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    first = str(error).splitlines()[0] if str(error) else ""
    store = _store()
    if _tell(store, f"rank {rank} failed ({type(error).__name__}: {first})", job, code):
        _leave(store, rank, dist.get_world_size(), job)


def _tell(store: Any, news: str, job: str, code: int) -> bool:
    """Write `news` (and the exit code it ends the job with) as job `job`'s failure, unless one is there already
    (the first failure is the news: a peer's broken connection to the failed rank does not replace it). False
    where the store is gone (it lives in rank 0's process outside torchrun)."""
    try:
        store.compare_set(_job_key("failed", job), "", f"{code}|{news}")
        return True
    except Exception:  # noqa: BLE001 - the store's host ended: no one to tell
        return False


_LEFT: Dict[str, threading.Event] = {}  # the jobs this process has counted itself out of: set once it is done
_LEFT_LOCK = threading.Lock()
LINGER_S = 3 * PEER_POLL_S + 1  # the longest the store's host waits for the others to read a failure


def _leave(store: Any, rank: int, world: int, job: str) -> None:
    """Count this rank out of job `job` after a failure, once: the main thread and the watchdog may both get here,
    and the second waits for the first. Outside torchrun the rendezvous store lives in rank 0's process: rank 0
    waits, at most LINGER_S, until every other rank has counted itself out (each has read the failure; they would
    find the store gone). Most failures reach every rank at once: no wait then."""
    key = _job_key("gone", job)
    with _LEFT_LOCK:
        first = key not in _LEFT
        done = _LEFT.setdefault(key, threading.Event())
    if not first:
        done.wait(LINGER_S + 1)
        return
    try:
        _count_out(store, key, rank, world)
    finally:
        done.set()


def _count_out(store: Any, key: str, rank: int, world: int) -> None:
    """Add this rank to the count at `key`; rank 0 outside torchrun then waits for the whole world (`_leave`)."""
    try:
        store.add(key, 1)
        if rank != 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            return
        deadline = time.monotonic() + LINGER_S
        while store.add(key, 0) < world and time.monotonic() < deadline:
            time.sleep(0.1)
    except Exception:  # noqa: BLE001 - the store is gone: no one left to wait for
        return


class Watchdog:
    """Ends the job, naming the stuck ranks, when this rank makes no progress for `timeout_s` seconds while it is
    watched (`watch`; start-up is not). From the start, with a second thread (the poller) and a store connection of
    its own (the main thread's may be inside a day-long `store.wait` for rank 0's work), it also ends this rank
    when another rank of job `job` announced a failure (`announce_failure`; with that failure's exit code, unless
    this rank stops or fails on its own within a poll) and, with `heartbeat_s`, when the next rank has not beaten
    for that long (killed outright, its node down), or the rendezvous store's host has neither answered nor taken
    a connection for that long (outside torchrun it lives in rank 0's process): no rank is left to wait out
    dist.timeout_s in a collective with a dead peer. Each rank beats every PEER_POLL_S from the poller, whatever its
    main thread does, and watches one peer: three store requests per rank and poll."""

    def __init__(self, rank: int, world: int, timeout_s: float, where: str = "", job: str = "",
                 heartbeat_s: float = 0.0, watching: bool = True):
        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        self.job, self.heartbeat_s = job, heartbeat_s
        self.last = time.monotonic()
        self.where = where
        self._stop = threading.Event()
        self._watching = watching
        self._suspended = False
        self._threads: List[threading.Thread] = []
        self._default = None  # the process group's store, to connect to again
        self._store = None  # this watchdog's own connection (None: lost)
        if dist.is_initialized() and world > 1:
            self._default = _store()
            self._store = self._connect()
        self._peer = (rank + 1) % world
        now = time.monotonic()
        # the peer's beat count and when it last moved: a peer that never beats is judged from here (the process
        # group's start, which every rank passed within moments of the others)
        self._peer_beats, self._peer_seen = -1, now
        self._answered = now  # when the store last answered
        self._polled = now  # when the poller last ran
        self._probed = 0.0  # when the store's host was last asked for a connection
        self._own_code: Optional[int] = None  # set by `failing`

    def _connect(self) -> Any:
        """A connection to the store of its own (the main thread's is locked while it waits there); None where the
        store cannot be reached."""
        try:
            return self._default.clone()
        except Exception:  # noqa: BLE001 - the store's host ended
            return None

    def start(self) -> "Watchdog":
        """Start watching in daemon threads."""
        self._threads = [threading.Thread(target=self._run, name="tristage-watchdog", daemon=True)]
        if self._default is not None:
            self._threads.append(threading.Thread(target=self._poll_loop, name="tristage-beats", daemon=True))
        for t in self._threads:
            t.start()
        return self

    def beat(self, where: str) -> None:
        """The main thread made progress (called at every micro-step and around saves and evaluations)."""
        self.last = time.monotonic()
        self.where = where

    def watch(self, where: str) -> None:
        """Start-up is over: from now on, no progress for timeout_s is a hang."""
        self.beat(where)
        self._watching = True

    def stop(self) -> None:
        """Stop watching."""
        self._stop.set()

    def failing(self, code: int) -> None:
        """This rank is on its way out with exit code `code` (its error said): if another rank's failure ends it
        first (while it announces its own), that is still its code."""
        self._own_code = code

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
        while not self._stop.wait(min(1.0, self.timeout_s / 10)):
            if self._watching and not self._suspended and time.monotonic() - self.last > self.timeout_s:
                self._fire()
            if self._default is not None and self.heartbeat_s:
                self._judge_store(time.monotonic())

    def _poll_loop(self) -> None:
        # the ranks' first polls spread over a second: every rank starts at the process group's start
        if not self._stop.wait(random.random()):
            self._poll()
            while not self._stop.wait(PEER_POLL_S):
                self._poll()

    def _poll(self) -> None:
        """Beat; end this rank if another one failed, or if the watched peer stopped beating."""
        now = time.monotonic()
        if now - self._polled > 3 * PEER_POLL_S:  # this process did not run (stopped, suspended): its peer's
            self._peer_seen = now  # silence meanwhile is not the peer's
        self._polled = now
        if self._store is None:  # lost: connect again once the host takes connections
            if self._host_listens():
                self._store = self._connect()
            if self._store is None:
                return
        try:
            failed = self._peer_failure()
            self._store.add(_job_key(f"alive/{self.rank}", self.job), 1)
            beats = self._store.add(_job_key(f"alive/{self._peer}", self.job), 0)
        except Exception:  # noqa: BLE001 - a broken connection (each request on it would log a C++ backtrace)
            self._store = None
            return
        self._answered = time.monotonic()
        if failed is not None and not failed[1].startswith(f"rank {self.rank} "):
            self._end(*failed, grace=True)
        if beats != self._peer_beats:
            self._peer_beats, self._peer_seen = beats, now
        elif self.heartbeat_s and now - self._peer_seen > self.heartbeat_s:
            news = (f"rank {self._peer} stopped: no beat for {now - self._peer_seen:.0f}s (dist.heartbeat_timeout_s; "
                    f"killed outright, e.g. by the out-of-memory killer, or its node is down)")
            _tell(self._store, news, self.job, 1)  # the first failure stands: a peer may have told of one first
            try:
                told = self._peer_failure()
            except Exception:  # noqa: BLE001 - the store just went
                told = None
            self._end(*(told or (1, news)))

    def _host_listens(self) -> bool:
        addr, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "0"))
        try:
            socket.create_connection((addr, port), timeout=2).close()
            return True
        except OSError:
            return False

    def _judge_store(self, now: float) -> None:
        """End this rank once the store has not answered for heartbeat_s (the poller's connection lost, or a request
        that does not return) and its host takes no connection: a host that still listens lives (a broken
        connection, a slow store), and the poller connects again."""
        if now - self._answered <= self.heartbeat_s or now - self._probed < PEER_POLL_S:
            return
        self._probed = now
        if not self._host_listens():
            self._store = None  # the store is not to be asked on the way out
            self._end(1, f"the rendezvous store ({os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}) "
                         f"has not answered for {now - self._answered:.0f}s (dist.heartbeat_timeout_s): the process "
                         f"that holds it (rank 0, or torchrun's agent) has ended")

    def _end(self, code: int, news: str, grace: bool = False) -> None:
        """Exit `code` (this rank's own if it is failing), saying `news`; with `grace`, only if the main thread
        has not stopped this watchdog within a poll: a failure every rank meets together (a refused checkpoint)
        is each rank's own to report, and in a --multirun sweep its next job runs in this process."""
        if self._stop.wait(PEER_POLL_S if grace else 0):
            return
        code = code if self._own_code is None else self._own_code
        print(f"error: rank {self.rank}: {news}, so this job cannot go on; exiting with code {code} at "
              f"{self.where}", file=sys.stderr, flush=True)
        if self._store is not None:
            _leave(self._store, self.rank, self.world, self.job)
        os._exit(code)

    def _peer_failure(self) -> Optional[Tuple[int, str]]:
        """(exit code, news) of a failure a rank of this job announced (`announce_failure`), or None. Raises
        where the store does not answer."""
        key = _job_key("failed", self.job)
        if not self._store.check([key]):
            return None
        code, _, news = self._store.get(key).decode().partition("|")
        return (int(code) if code.isdigit() else 1), news

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
