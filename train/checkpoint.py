"""Atomic, resumable checkpoints of a whole run.

Layout under `<run_dir>/checkpoints/`:

    <tag>/                 one complete checkpoint (DeepSpeed shards + meta.json + rng_rank<r>.pt + config.yaml)
    .tmp/<tag>/            a checkpoint being written; never read (a save clears what killed saves left here)
    zero_to_fp32.py        DeepSpeed's converter of a checkpoint to fp32 weights (it writes one beside every save)
    latest                 the tag of the newest complete checkpoint, written last with an atomic rename
    <tag>/rollback.json    after a spike rollback to <tag>: the batches to skip from there (load() adds them)

A save writes everything into `.tmp/<tag>`, every rank flushes its files to disk and reports success, rank 0
renames the folder into place and only then replaces `latest` (both renames flushed too). A crash at any point leaves `latest` naming the previous complete checkpoint.
A failed write on any rank (a full disk, say) fails every rank together and keeps what was there. Saving a tag
that exists (a relaunch that reached the step again) moves the old folder aside only once the new one is
complete; were a crash to fall between those two renames, `recover()` puts the old copy back at the next start.
A spike rollback (`mark_rollback`) makes the checkpoint it went back to `latest` again, with its skip list, and
removes the newer ones, which trained on the batches it skips: a crash before the next save resumes there.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import shutil
import sys
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
import torch.distributed as dist

from data.io import atomic_path
from models.config import Qwen3Config
from train.faults import collective_result


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or does not fit this run."""


@dataclass
class TrainerState:
    """Where the run is: everything besides weights and optimizer state that an exact resume needs."""

    stage_index: int = 0  # index into curriculum.order
    stage: str = ""
    step: int = 0  # optimizer steps completed in this stage
    consumed_samples: int = 0  # sequences consumed in this stage (the loader's whole state)
    global_step: int = 0  # optimizer steps over the whole run
    tokens: int = 0  # tokens trained on over the whole run
    stage_complete: bool = False  # the stage's last step is done; a resume starts the next stage
    skipped_steps: int = 0  # updates skipped for non-finite loss or gradients
    consecutive_skips: int = 0
    skip_steps: List[str] = field(default_factory=list)  # "stage:step" batches left out after a spike rollback
    loss_history: List[float] = field(default_factory=list)  # the spike detector's window, so resume is exact
    rollbacks: int = 0


def read_meta_at(folder: Path) -> Dict[str, Any]:
    """A checkpoint folder's meta.json; unreadable, not JSON or not an object, a CheckpointError naming it."""
    path = folder / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: cannot be read (a JSON {type(meta).__name__}, not an object)")
    return meta


@contextlib.contextmanager
def named_load_errors(folder: Path, load_dir: Optional[str] = None) -> Iterator[None]:
    """Inside, a damaged or refused file of checkpoint `folder` (or of its re-sharded copy in `load_dir`) that
    DeepSpeed met is a CheckpointLoadError naming the folder: DeepSpeed's own errors name no file."""
    from train.engine import CheckpointLoadError

    try:
        yield
    except CheckpointLoadError:
        raise
    except pickle.UnpicklingError as e:
        raise CheckpointLoadError(f"{folder}: refused to load ({str(e).splitlines()[0]})") from None
    except (OSError, AssertionError, KeyError, ValueError) as e:  # a missing or damaged DeepSpeed file
        raise CheckpointLoadError(f"{load_dir or folder}: cannot be loaded ({type(e).__name__}: "
                                  f"{str(e) or 'a file is missing'})") from None


def all_ok(ok: bool) -> bool:
    """True only if every rank says ok."""
    if not dist.is_initialized():
        return ok
    # NCCL reduces GPU tensors only (a CPU tensor there fails: "No backend type associated with device type cpu")
    nccl = dist.get_backend() == "nccl"
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32,
                        device=torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(collective_result(flag).item())


def _rng_state() -> Dict[str, Any]:
    state: Dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, _, gauss = random.getstate()
    random.setstate((version, tuple(state["python"]), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def fsync_path(path: str | Path) -> None:
    """Flush a file's data, or a folder's entries (the renames into it), from the page cache to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Write `text` durably: on disk before the rename, and the rename on disk before returning, so a crash or a
    power loss leaves the old file or the new one."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    fsync_path(path.parent)


class CheckpointManager:
    """Saves and finds checkpoints in one run directory."""

    def __init__(self, run_dir: str | Path, keep: int, rank: int):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep = keep
        self.rank = rank

    def recover(self) -> None:
        """Rank 0, before any rank reads `latest`: mend what a crash in the middle of a save can leave.

        A re-save of the tag `latest` names that died between its two renames leaves the complete old copy in
        `.replaced-<tag>`: it is put back. Other `.replaced-*` folders are stale copies and go. A pointer naming a
        folder that is gone is moved to the newest complete checkpoint here, once, so that every rank reads the
        same one.
        """
        pointer = self.dir / "latest"
        if not pointer.exists():
            return
        tag = self._pointed()
        aside = self.dir / f".replaced-{tag}"
        if tag and not (self.dir / tag / "meta.json").exists() and (aside / "meta.json").exists():
            os.rename(aside, self.dir / tag)
        for stale in [*self.dir.glob(".replaced-*"), *self.dir.glob(".discarded-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        found = self.latest()  # the fallback, with its warning
        if found is not None and found != tag:
            write_atomic(pointer, found)

    def latest(self) -> Optional[str]:
        """The newest complete checkpoint's tag, or None for a fresh run.

        When `latest` names a folder that is gone, the newest complete one left is taken, with a warning; when none
        is left that is an error naming the pointer.
        """
        pointer = self.dir / "latest"
        if not pointer.exists():
            return None
        tag = self._pointed()
        if tag and (self.dir / tag / "meta.json").exists():
            return tag
        foreign = f"names no checkpoint folder of {self.dir}"
        others = self.complete()
        if not others:
            named = f"names '{tag}', but {self.dir / tag / 'meta.json'} is missing" if tag else foreign
            raise CheckpointError(f"{pointer} {named}, and no other complete checkpoint is left in {self.dir}")
        if self.rank == 0:
            named = f"names '{tag}', which is missing" if tag else foreign
            print(f"[tristage] warning: {pointer} {named}; taking the newest complete checkpoint, '{others[-1]}'",
                  file=sys.stderr, flush=True)
        return others[-1]

    def _pointed(self) -> str:
        """The tag `latest` names, or "" where it names no folder of this directory: bytes that are not text, or a
        path (`../other/checkpoints/...` resumed another run's checkpoint as this run's)."""
        try:
            tag = (self.dir / "latest").read_text().strip()
        except UnicodeDecodeError:
            return ""
        return tag if tag and tag == Path(tag).name and not tag.startswith(".") else ""

    def complete(self) -> List[str]:
        """Tags of the complete checkpoints (a readable meta.json), oldest first by global step."""
        return list(self._states())

    def _states(self) -> Dict[str, Dict[str, Any]]:
        """{tag: trainer state} of the complete checkpoints, oldest first by global step; a folder whose meta.json
        is missing or unreadable is none (a save in progress, or a damaged one: `read_meta` names it)."""
        found = []
        for path in self.dir.iterdir() if self.dir.is_dir() else ():
            try:
                state = json.loads((path / "meta.json").read_text())["state"]
                step = state["global_step"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if not path.name.startswith("."):
                found.append((step, path.name, state))
        return {tag: state for _, tag, state in sorted(found, key=lambda f: f[:2])}

    def save(self, engine: Any, tag: str, state: TrainerState, meta: Dict[str, Any], config_yaml: str,
             fault: Callable[[str], None] = lambda kind: None) -> Path:
        """Write one checkpoint atomically on every rank; raise CheckpointError on every rank if any rank fails.

        `fault(kind)` is the test hook for faults in the middle of a save (`enospc`, `enospc_in_write`, `kill`).
        """
        tmp_root = self.dir / ".tmp"
        final = self.dir / tag
        ok, err = True, ""
        if self.rank == 0:
            try:
                shutil.rmtree(tmp_root, ignore_errors=True)  # and the partial checkpoints of killed saves
                (tmp_root / tag).mkdir(parents=True, exist_ok=True)
            except OSError as e:
                ok, err = False, f"{tmp_root / tag}: {e}"
        if all_ok(ok):
            try:
                written = engine.save(str(tmp_root), tag, client_state={"trainer_state": asdict(state)},
                                      fault=fault)
                fault("enospc")
                fault("kill_in_save")
                torch.save(_rng_state(), tmp_root / tag / f"rng_rank{self.rank}.pt")
                # each rank flushes what it wrote before saying ok: `latest` must never name a folder whose
                # files a power loss or a node crash can leave empty (the renames below are durable, the
                # page cache is not)
                for f in [*written, tmp_root / tag / f"rng_rank{self.rank}.pt"]:
                    fsync_path(f)
                if self.rank == 0:
                    write_atomic(tmp_root / tag / "meta.json", json.dumps(meta | {"state": asdict(state)}, indent=1))
                    write_atomic(tmp_root / tag / "config.yaml", config_yaml)
            except Exception as e:  # noqa: BLE001 - any failure must reach every rank, not only this one
                ok, err = False, f"{tmp_root / tag}: {type(e).__name__}: {e}"
        else:
            ok = False
        if not all_ok(ok):
            if self.rank == 0:
                shutil.rmtree(tmp_root / tag, ignore_errors=True)
            raise CheckpointError(f"saving checkpoint '{tag}' failed on at least one rank "
                                  f"({err or 'another rank failed'}); the previous checkpoint "
                                  f"'{self.latest()}' is kept")
        if self.rank == 0:
            try:
                aside = self.dir / f".replaced-{tag}"
                if final.exists():  # a re-save of the same tag (a relaunch reaching the same step)
                    shutil.rmtree(aside, ignore_errors=True)
                    os.rename(final, aside)  # the old copy goes only once the new one is complete
                fsync_path(tmp_root / tag)  # the names of every rank's files, before the folder is published
                os.replace(tmp_root / tag, final)
                for script in tmp_root.glob("zero_to_*.py"):  # DeepSpeed's converters, copied beside each save
                    os.replace(script, self.dir / script.name)
                write_atomic(self.dir / "latest", tag)  # flushes self.dir: the folder's rename too
                shutil.rmtree(aside, ignore_errors=True)
                self._retain(protect=tag)
            except OSError as e:
                ok, err = False, f"{final}: {e}"
        if not all_ok(ok):
            # the pointer as written, not latest(): a re-save that failed here has moved the tag it names aside
            # (recover() puts it back), and latest() would raise over that instead of reporting this failure
            pointer = self.dir / "latest"
            named = pointer.read_text().strip() if pointer.exists() else None
            raise CheckpointError(f"publishing checkpoint '{tag}' failed ({err or 'on rank 0'}); "
                                  f"'latest' still names '{named}'")
        return final

    def mark_rollback(self, tag: str, skip_steps: List[str], rollbacks: int) -> List[str]:
        """Rank 0, after a spike rollback to `tag`: make `tag` what a relaunch resumes, with the rollback's skip list
        (`rollback.json` beside its files, which keep the state they were saved with), and remove the checkpoints
        newer than it, which trained on batches the list skips. Returns the removed tags, oldest first.

        Each removal is a rename out of sight first: a crash in the middle of one leaves no half-deleted folder
        that `complete()` would offer as a checkpoint.
        """
        write_atomic(self.dir / tag / ROLLBACK_FILE, json.dumps({"skip_steps": skip_steps, "rollbacks": rollbacks}))
        write_atomic(self.dir / "latest", tag)
        step = self.read_meta(tag)["state"]["global_step"]
        newer = [t for t in self.complete() if self.read_meta(t)["state"]["global_step"] > step]
        for t in newer:
            aside = self.dir / f".discarded-{t}"
            os.rename(self.dir / t, aside)
            shutil.rmtree(aside, ignore_errors=True)
        return newer

    def _retain(self, protect: str) -> None:
        """Keep the newest `keep` periodic checkpoints; stage-end checkpoints and `protect` always stay.

        The re-sharded copies in `.universal/` go: a resume or a rollback loads the newest checkpoint, `protect`,
        which is in this launch's layout. Each is as large as the checkpoint it came from (weights and AdamW
        state), and one would be stale if its tag were ever saved again.
        """
        shutil.rmtree(self.dir / ".universal", ignore_errors=True)
        periodic, keep = [], self.keep
        # a checkpoint whose meta.json cannot be read (or says no stage_complete) is left alone: it failed every
        # later save on rank 0 alone, which the other ranks then waited for in the save's agreement
        for tag, state in self._states().items():
            if state.get("stage_complete", True):
                continue
            if tag == protect:
                keep -= 1  # one of the `keep`
            else:
                periodic.append(tag)
        for tag in periodic[: max(0, len(periodic) - keep)]:
            shutil.rmtree(self.dir / tag, ignore_errors=True)

    def _fail_together(self, error: Optional[str], tag: str) -> None:
        """Raise CheckpointError on every rank when loading `tag` failed on this one (`error`) or on another."""
        if not all_ok(error is None):
            error = error or f"checkpoint '{tag}' failed to load on another rank (whose message names the file)"
            raise CheckpointError(f"{error}{self._way_out(tag)}")

    def cut_short(self, tag: str) -> Optional[str]:
        """The first file of checkpoint `tag` that only this rank reads (its ZeRO partition, its RNG state) and
        that is empty or a zip archive without its closing directory, i.e. cut short; None if there is none.
        Reads each file's last bytes only. In bf16 DeepSpeed names the partition `bf16_zero_pp_rank_<r>_...`."""
        folder = self.dir / tag
        own = sorted(folder.glob(f"*zero_pp_rank_{self.rank}_mp_rank_*"))
        for path in own + [folder / f"rng_rank{self.rank}.pt"]:
            try:
                with open(path, "rb") as f:
                    head = f.read(4)
                if not head or (head == b"PK\x03\x04" and not zipfile.is_zipfile(path)):
                    return f"{path}: cannot be read, truncated or damaged (cut short: {path.stat().st_size} bytes)"
            except FileNotFoundError:
                continue  # a missing file is named by the load itself
            except OSError as e:
                return f"{path}: cannot be read ({e})"
        return None

    def read_meta(self, tag: str) -> Dict[str, Any]:
        """meta.json of a checkpoint (stage, step, model shape, tokenizer fingerprint)."""
        try:
            return read_meta_at(self.dir / tag)
        except CheckpointError as e:
            raise CheckpointError(f"{e}{self._way_out(tag)}") from None

    def _way_out(self, tag: str) -> str:
        """The hint for a damaged checkpoint: the other complete checkpoints, to resume from instead."""
        older = [t for t in self.complete() if t != tag]
        if not older:
            return ""
        return (f"; to resume from an older checkpoint instead, write its tag into {self.dir / 'latest'} "
                f"(complete: {', '.join(older[-3:])})")

    def load(self, engine: Any, tag: str, load_dir: Optional[str] = None) -> TrainerState:
        """Load weights, optimizer and this rank's RNG state; returns the trainer state.

        `load_dir` holds a re-sharded (universal) copy of `tag` when the world size changed. A file only one rank
        reads (its optimizer partition, its RNG state) that is damaged fails every rank, not that rank alone: a
        rank going on alone would wait in the first step's collectives until the watchdog.
        """
        from train.engine import CheckpointLoadError, safe_torch_load

        # before DeepSpeed's load, whose collectives (ZeRO-3's, with persistent parameters on GPUs) would wait for
        # a rank that failed on its own file while that rank waits in all_ok
        self._fail_together(None if load_dir else self.cut_short(tag), tag)
        error: Optional[str] = None
        try:
            with named_load_errors(self.dir / tag, load_dir):
                client = engine.load(load_dir or str(self.dir), tag, universal=load_dir is not None)
                rng_path = self.dir / tag / f"rng_rank{self.rank}.pt"
                if rng_path.exists():
                    try:
                        with safe_torch_load():
                            rng = torch.load(rng_path, weights_only=True)
                    except CheckpointLoadError:
                        raise
                    except (OSError, RuntimeError, EOFError) as e:  # torch's zip reader names no file
                        raise CheckpointLoadError(f"{rng_path}: cannot be read, truncated or damaged "
                                                  f"({type(e).__name__}: {e})") from None
                    _set_rng_state(rng)
        except CheckpointLoadError as e:
            error = str(e)
        self._fail_together(error, tag)
        if "trainer_state" not in client:
            raise CheckpointError(f"{self.dir / tag} holds no tristage trainer state")
        state = TrainerState(**client["trainer_state"])
        rolled = self.dir / tag / ROLLBACK_FILE
        if rolled.exists():  # a spike rollback went back to this checkpoint: the batches it skips from here
            try:
                extra = json.loads(rolled.read_text())
                state.skip_steps = sorted(set(state.skip_steps) | set(extra["skip_steps"]))
                state.rollbacks = max(state.rollbacks, int(extra["rollbacks"]))
            except (OSError, ValueError, KeyError, TypeError) as e:
                why = f"{type(e).__name__}: {e}"
                raise CheckpointError(f"{rolled}: cannot be read ({why}){self._way_out(tag)}") from None
        return state


# fields that fix the shape of the weights: a resume with any of them changed is refused
_SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "tie_word_embeddings", "num_experts", "num_experts_per_tok",
               "moe_intermediate_size")

# fields that change what the same weights compute: a resume or init_from with another value is refused
_BEHAVIOUR_KEYS = ("rms_norm_eps", "norm_topk_prob")  # the latter for MoE only

STAGE_FINISHED = "stage_finished"  # in a stage-end checkpoint: its stage-end work is done
ROLLBACK_FILE = "rollback.json"  # in a checkpoint a spike rollback went back to: the skip list from there on


def model_shape(cfg: Qwen3Config) -> Dict[str, Any]:
    """The config fields that fix the weights' shapes."""
    return {k: getattr(cfg, k) for k in _SHAPE_KEYS}


def model_behaviour(cfg: Qwen3Config) -> Dict[str, Any]:
    """The config fields beside the shapes that the weights were trained to compute with (norm_topk_prob for MoE:
    transformers' Qwen3-MoE default is false, every Qwen3 preset's true)."""
    return {k: getattr(cfg, k) for k in _BEHAVIOUR_KEYS[:None if cfg.num_experts else 1]}


def check_compatible(meta: Dict[str, Any], model: Qwen3Config, tokenizer_fingerprint: str, where: str) -> None:
    """Refuse to load a checkpoint of another model shape or tokenizer, naming what changed (a different layout,
    world size, ZeRO stage or expert_parallel_size, is re-sharded instead: train/reshard.py)."""
    saved_shape = meta.get("model_shape", {})
    changed = {k: (saved_shape.get(k), v) for k, v in model_shape(model).items() if saved_shape.get(k) != v}
    saved_behaviour = meta.get("model_behaviour", {})  # absent from checkpoints of earlier versions
    changed |= {k: (saved_behaviour[k], v) for k, v in model_behaviour(model).items()
                if k in saved_behaviour and saved_behaviour[k] != v}
    if changed:
        detail = ", ".join(f"model.{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in changed.items())
        raise CheckpointError(f"{where} was saved with a different model shape or behaviour ({detail}); "
                              f"use a new run_dir or restore the config")
    saved_fp = meta.get("tokenizer_fingerprint")
    if saved_fp != tokenizer_fingerprint:
        raise CheckpointError(f"{where} was saved with tokenizer {saved_fp}, the data now uses "
                              f"{tokenizer_fingerprint}; use a new run_dir or the original tokenizer")
