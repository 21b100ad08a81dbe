"""What a launch into an existing run directory checks before it trains.

Rank 0 holds `<run_dir>/.lock` for the launch (`lock_run_dir`); a finished run has nothing to do
(`finished_checkpoint`); a resume is refused where the curriculum as configured now cannot continue the
checkpoint exactly (`check_resumable`); `config.yaml` records the config each launch trains with
(`record_config`).
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import IO, Any, Dict, List, Optional

from data.errors import DataError
from data.io import sha256_text
from data.shards import read_manifest
from train.checkpoint import STAGE_FINISHED, CheckpointManager, write_atomic
from train.config import ConfigError, StageConfig, StagePlan, TrainConfig
from train.dist import on_rank0


def data_fingerprint(manifest: Dict[str, Any], stage: StageConfig) -> str:
    """What a stage trains on: the shard checksums of the components its mixture reads (not the manifest's own
    bytes, which a rerun of `prepare` rewrites with the same data; not sources only later stages read)."""
    sources = {s for s, w in stage.mixture.weights.items() if w > 0} or None  # empty weights: every source
    files = {k: [f["sha256"] for f in c["files"]] for k, c in sorted(manifest["components"].items())
             if sources is None or c["source"] in sources}
    return sha256_text(json.dumps(files, sort_keys=True))[:16]


def check_data_unchanged(path: Path, checked: Dict[str, Any], stage: StageConfig) -> None:
    """Refuse to start a stage on data prepared again since this launch checked it: a run of another data config
    under the same data set name rewrites it in place, and the stage would then read other samples, or token ids of
    another tokenizer, than the launch's checks and its checkpoints' records assume."""
    now = read_manifest(path)
    if (now["tokenizer"]["fingerprint"] != checked["tokenizer"]["fingerprint"]
            or data_fingerprint(now, stage) != data_fingerprint(checked, stage)):
        raise DataError(f"{path}: the data set was prepared again while this run trained (a run of another data "
                        f"config under the same data.name?), so stage {stage.name!r} would read other data than this "
                        "launch checked; give the other config a data.name of its own, and prepare this run's "
                        "config again (python -m data.prepare) before relaunching")


def stage_data(cfg: TrainConfig, stage: StageConfig, manifest: Dict[str, Any]) -> Dict[str, Any]:
    """The config values that decide which samples each step of a stage reads (its index arrays and the global
    batch), keyed by their config key; a checkpoint in the middle of the stage resumes only under the same."""
    key = f"curriculum.stages.{stage.name}"
    return {"seed": cfg.seed, f"{key}.tokens": stage.tokens, f"{key}.global_batch_tokens": stage.global_batch_tokens,
            f"{key}.seq_len": stage.seq_len, f"{key}.mixture": dataclasses.asdict(stage.mixture),
            "data (the prepared shards)": data_fingerprint(manifest, stage)}


def check_resumable(meta: Dict[str, Any], cfg: TrainConfig, plans: List[StagePlan], manifest: Dict[str, Any],
                    where: str, stage_end_pending: bool = False) -> None:
    """Refuse a resume the curriculum as configured now cannot continue exactly, naming the key: another stage at
    the checkpoint's place in `curriculum.order`, or, in the middle of a stage, another value of what decides the
    stage's samples (its budget, batch, seq_len, mixture, the seed or the data), which would repeat or skip data
    and could leave the stage with no step to run, or another RoPE base. A stage-end checkpoint whose stage-end
    work (export, evaluation) is still to do keeps the stage's seq_len and RoPE base, which that work uses."""
    st = meta.get("state", {})
    order, index, name = cfg.curriculum.order, st.get("stage_index", 0), st.get("stage")
    restart = (f"keep the value it had, or start a new run_dir with init_from={where} "
               f"curriculum.start=<stage>")
    if index >= len(order) or order[index] != name:
        raise ConfigError(f"config key 'curriculum.order' = {list(order)}: {where} was saved in stage {name!r} at "
                          f"position {index} of the curriculum, where this order has "
                          f"{order[index] if index < len(order) else 'nothing'!r}; {restart}")
    if st.get("stage_complete"):
        if stage_end_pending:
            seq_len = cfg.curriculum.stages[name].seq_len
            saved = (meta.get("stage_data") or {}).get(f"curriculum.stages.{name}.seq_len", seq_len)
            _check_theta(meta, cfg, name, "its stage-end export and evaluation, still to do, use that base", where,
                         restart)
            if saved != seq_len:
                raise ConfigError(f"config key 'curriculum.stages.{name}.seq_len' = {seq_len}: {where} ends stage "
                                  f"{name!r}, trained at {saved}, whose stage-end evaluation is still to do; "
                                  f"{restart}")
        return  # the next stage starts fresh: its config may change freely
    saved, now = meta.get("stage_data"), stage_data(cfg, cfg.curriculum.stages[name], manifest)
    for key, value in (now.items() if saved is not None else []):
        if saved.get(key) != value:
            weights = (f" (its weights: curriculum.stages.{name}.mixture.weights if set, else data.mixtures.{name}; "
                       f"an override `curriculum.stages.{name}.mixture.weights.<source>=w` of earlier versions is "
                       f"now `data.mixtures.{name}.<source>=w`)" if key.endswith(".mixture") else "")
            raise ConfigError(f"config key '{key}' = {value!r}: {where} is at step {st.get('step')} of stage "
                              f"{name!r}, which started with {saved.get(key)!r}{weights}; a stage's samples are "
                              f"fixed once it has started (this would repeat or skip data); {restart}")
    _check_theta(meta, cfg, name, "the base is fixed once a stage has started (its steps so far learned those "
                 "positions)", where, restart)
    if st.get("step", 0) >= plans[index].steps:  # a checkpoint from before stage_data was recorded
        raise ConfigError(f"config key 'curriculum.stages.{name}.tokens': {where} is at step {st.get('step')} of "
                          f"stage {name!r}, which now has {plans[index].steps} steps; {restart}")


def _check_theta(meta: Dict[str, Any], cfg: TrainConfig, name: str, why: str, where: str, restart: str) -> None:
    """Refuse another RoPE base than the one checkpoint `where` of stage `name` trained at."""
    saved, theta = meta.get("rope_theta"), cfg.curriculum.stages[name].rope_theta
    if saved is not None and float(saved) != float(theta):
        raise ConfigError(f"config key 'curriculum.stages.{name}.rope_theta' = {theta}: {where} is at step "
                          f"{meta['state'].get('step')} of stage {name!r}, which trains at RoPE base {saved}; {why}; "
                          f"{restart}")


def record_config(run_dir: Path, text: str) -> None:
    """`<run_dir>/config.yaml`: the config this launch trains with. One that differs from the last launch's (a key
    a relaunch may change) keeps the earlier one as `config_history/config.<n>.yaml`."""
    path = run_dir / "config.yaml"
    try:
        if path.exists():
            old = path.read_text()
            if old == text:
                return
            history = run_dir / "config_history"
            history.mkdir(exist_ok=True)
            write_atomic(history / f"config.{len(list(history.glob('config.*.yaml'))) + 1}.yaml", old)
        write_atomic(path, text)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config key 'run_dir' = {str(run_dir)!r}: {path} cannot be recorded "
                          f"({type(e).__name__}: {e})") from None


def lock_run_dir(run_dir: Path) -> Optional[IO[str]]:
    """An exclusive lock on `<run_dir>/.lock` (rank 0, for the launch), or a refusal naming its holder.

    Two live launches into one run directory interleave their metrics and delete each other's checkpoints: a
    duplicate submission, or ranks a `deepspeed` launcher left running when it was sent SIGTERM on one node.
    The operating system drops the lock when the process ends, however it ends, so a killed launch never leaves
    a stale one. Where the file system has no locks (some parallel file systems), a warning and no lock.
    """
    path = run_dir / ".lock"
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ConfigError(f"config key 'run_dir' = {str(run_dir)!r}: in use by {holder} (it holds {path}); stop "
                          f"that launch or choose another run_dir (if it is gone, as a node that died holding the "
                          f"lock on NFS can leave it, delete {path})") from None
    except OSError as e:
        handle.close()
        print(f"[tristage] warning: {path}: no file lock on this file system ({e}); nothing stops a second launch "
              f"into this run_dir", file=sys.stderr, flush=True)
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    return handle


def finished_checkpoint(cfg: TrainConfig, rank: int) -> Optional[str]:
    """The tag of the run's last stage-end checkpoint when its stage-end work is done too: the run is complete
    and a relaunch has nothing to do (decided before the model is built or a checkpoint re-sharded)."""
    checkpoints = CheckpointManager(Path(cfg.run_dir), cfg.checkpoint.keep, rank)
    on_rank0("checking the checkpoints", checkpoints.recover)
    latest = checkpoints.latest()
    if latest is None:
        return None
    state, order = checkpoints.read_meta(latest)["state"], cfg.curriculum.order
    # the last stage of this order (another order goes on to the checks of a resume, which name what differs)
    last = state["stage_index"] == len(order) - 1 and order[-1] == state["stage"]
    return latest if state["stage_complete"] and last and (checkpoints.dir / latest / STAGE_FINISHED).exists() else None
