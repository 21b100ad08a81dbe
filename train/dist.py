"""The process group and the ranks' coordination: where a process sits, the group's start, rank-0 work.

Every rank calls these the same number of times. Work that only one rank does (preparing data, building a
stage's index, re-sharding a checkpoint, writing an export) goes through `on_rank0`: the others wait for it on
the rendezvous store, however long, and hear of its failure instead of waiting behind a dead rank.
"""
from __future__ import annotations

import atexit
import datetime
import itertools
import os
import socket
from dataclasses import dataclass
from typing import Callable, Optional, TypeVar

import torch
import torch.distributed as dist

from data.io import usable_cpus
from train.config import ConfigError, TrainConfig, world_from_env


@dataclass
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cuda_index(local_rank: int, visible: int) -> int:
    """The CUDA device of local rank `local_rank` among the `visible` ones: its own number where the rank sees every
    GPU of the node (torchrun, the deepspeed launcher, srun with --gpus-per-node), device 0 where it sees only
    its own (srun --gpus-per-task=1 or a GPU binding: each rank's CUDA_VISIBLE_DEVICES holds one GPU)."""
    if visible == 1:
        return 0
    if not 0 <= local_rank < visible:
        raise ConfigError(f"LOCAL_RANK={local_rank}, but this process sees {visible} CUDA devices "
                           f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): start at most "
                           f"one rank per GPU on a node")
    return local_rank


def resolve_device(cfg: TrainConfig, local_rank: int) -> torch.device:
    """The rank's GPU (`cuda_index`) when asked for or available, else cpu."""
    want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if want_cuda:
        if not torch.cuda.is_available():
            raise ConfigError("config key 'device' = 'cuda' but torch sees no CUDA device")
        return torch.device("cuda", cuda_index(local_rank, torch.cuda.device_count()))
    return torch.device("cpu")


def cpu_threads(cfg: TrainConfig, device: torch.device, local_world: int) -> Optional[int]:
    """torch's intra-op threads for a rank (None: left as they are): `threads`, else this process's cores shared by
    the node's ranks, on the CPU and on GPUs under ZeRO-Offload, whose AdamW step over the offloaded partition runs on
    the CPU (torchrun starts its workers with OMP_NUM_THREADS=1: one core for ~1B parameters per rank)."""
    ds = cfg.deepspeed
    if device.type == "cuda" and not (ds.offload_optimizer or ds.offload_param):
        return None
    return cfg.threads or max(1, usable_cpus() // max(1, local_world))  # the affinity mask (srun --cpus-per-task)


def init_distributed(cfg: TrainConfig) -> DistInfo:
    """Start the process group (a one-process group when not launched), gloo on CPU and nccl on GPU."""
    import deepspeed

    rank, world, local_rank, local_world = world_from_env()
    device = resolve_device(cfg, local_rank)
    if world == 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        # a plain `python -m train`: a one-rank group keeps a single code path for everything below. Its own
        # free port, always: a MASTER_PORT inherited from a parent process may be taken (torchrun's workers,
        # which connect to their agent's store there, keep theirs)
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    backend = cfg.dist.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":  # NCCL moves CUDA tensors only; torch's error named no key
        raise ConfigError(f"config key 'dist.backend' = 'nccl' but the device is {device.type}: NCCL runs between "
                          f"CUDA devices; use dist.backend=gloo (or auto)")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    threads = cpu_threads(cfg, device, local_world)
    if threads:
        torch.set_num_threads(threads)
    if not dist.is_initialized():
        # one process group per process, kept across the jobs of a --multirun sweep (DeepSpeed caches its
        # groups), destroyed at exit
        # the collective timeout sits past the watchdog's (train/faults.py), which names the stuck rank first
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                   timeout=datetime.timedelta(seconds=2 * cfg.dist.timeout_s + 60))
        atexit.register(_destroy)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, local_world, device)


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


_RANK0_WAITS = itertools.count(1)  # each call's own key in the store


def rank0_outcome(what: str, error: Optional[str], leader: int = 0) -> Optional[str]:
    """Rank 0's (or rank `leader`'s) `error` (None: it succeeded) on every rank, once it is done with `what`.

    The other ranks wait on the rendezvous store, not in a collective: a collective times out after the process
    group's timeout (2 x dist.timeout_s + 60 s), and rank 0's work (re-sharding a checkpoint of hundreds of GB)
    may take longer. They wait up to a day. Every rank must call it the same number of times.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return error
    from torch.distributed.distributed_c10d import _get_default_store

    key, store = f"tristage/rank{leader}/{next(_RANK0_WAITS)}/{what}", _get_default_store()
    if dist.get_rank() == leader:
        store.set(key, "" if error is None else f"error:{error}")
        return error
    store.wait([key], datetime.timedelta(days=1))
    value = store.get(key).decode()
    return value[len("error:"):] if value.startswith("error:") else None


class Rank0Failed(RuntimeError):
    """Raised on the ranks that waited for `on_rank0` work that failed where it ran (rank 0, or their node's first
    rank); the message names that rank and its error."""


_T = TypeVar("_T")


def on_rank0(what: str, work: Callable[[], _T], node: bool = False) -> Optional[_T]:
    """`work()` on rank 0 (its result there, None elsewhere) while the other ranks wait for it, however long.
    With `node`, on each node's first rank (local rank 0) while the rest of that node waits for it.

    An exception in it is raised there as it is and, as `Rank0Failed` naming `what` and the error, on every rank
    that waited: none is left waiting behind a failed rank. The wait is `rank0_outcome`'s, on the store.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    leader = rank - world_from_env()[2] if node else 0  # ranks are numbered node by node
    result, error = None, None
    if not dist.is_initialized() or rank == leader:
        try:
            result = work()
        except Exception as e:  # noqa: BLE001 - every rank must hear of it, not only this one
            error = e
    message = rank0_outcome(what, None if error is None else f"{type(error).__name__}: {error}", leader)
    if error is not None:
        raise error
    if message is not None:
        raise Rank0Failed(f"rank {leader} failed at {what}: {message}")
    return result


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if dist.is_initialized():
        dist.barrier()
