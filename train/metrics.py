"""What a run reports: `metrics.jsonl`, a console line and wandb, with secrets kept out of all three.

MFU = tokens/s x flops_per_token / (peak FLOP/s x ranks), with flops_per_token = 6·N_matmul_active +
12·L·H·Dh·T (attention at full, un-halved cost; the same formula the GPU benchmark states), N_matmul_active
counting the parameters that take part in matrix products for one token (the LM head included, the embedding
lookup excluded; for MoE only the routed top-k experts).
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional

from data.io import atomic_path
from train.config import ConfigError, TrainConfig

if TYPE_CHECKING:  # torch loads with the training, not with a command line that is refused
    import torch

_SECRET_KEY = re.compile(r"(api[_-]?key|token|secret|password)$", re.IGNORECASE)
_REDACTED = "***"

# bf16 dense peak by device name, from the vendor datasheets
_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


def is_secret_key(key: str) -> bool:
    """Whether a config key holds a secret."""
    return bool(_SECRET_KEY.search(key))


def redact(obj: Any) -> Any:
    """A copy of a nested dict/list with every secret-looking key's value replaced."""
    if isinstance(obj, dict):
        return {k: (_REDACTED if (_SECRET_KEY.search(str(k)) and v not in (None, "")) else redact(v))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def device_peak_flops(device: torch.device) -> Optional[float]:
    """bf16 dense peak FLOP/s of the device by its name, or None where no figure is known (the CPU)."""
    if device.type == "cuda":
        import torch

        name = torch.cuda.get_device_name(device)
        for key, tflops in _PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None


def peak_flops(cfg: TrainConfig, device: torch.device) -> Optional[float]:
    """Peak FLOP/s of one device for MFU: `logging.peak_tflops` when set, else the device's datasheet figure."""
    if cfg.logging.peak_tflops > 0:
        return cfg.logging.peak_tflops * 1e12
    return device_peak_flops(device)


class MetricsLogger:
    """Writes one JSON line per logged step and event (rank 0), a console line, and mirrors to wandb.

    metrics.jsonl is the complete record (flushed line by line; a resume logs the steps after its checkpoint
    again, and the later record stands). wandb's history takes one row per global step, its steps only growing:
    a step's events go in under `<event>/<key>` (a `stage_start` at the last step of a stage would otherwise
    overwrite that step's lr and seq_len with the next stage's), records with no step go in at the current one,
    and steps a resume logs again, which wandb would drop, are not sent. The last step sent is kept in
    <run_dir>/wandb_step: an offline run resumes at step 0 in wandb's eyes, so its own count cannot tell.
    """

    def __init__(self, cfg: TrainConfig, run_dir: Path, rank: int, resolved_config: Dict[str, Any]):
        self.rank = rank
        self.console = cfg.logging.console
        self.path = run_dir / "metrics.jsonl"
        self._file = open(self.path, "a") if rank == 0 else None
        if self._file is not None and self._file.tell() > 0:
            with open(self.path, "rb") as f:  # a launch killed mid-line: its fragment stays a line of its own
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    self._file.write("\n")
        self._wandb = None
        self._wandb_step = 0
        self._step_file = run_dir / "wandb_step"
        if rank == 0 and cfg.logging.wandb.mode != "disabled":
            self._wandb = _start_wandb(cfg, run_dir, redact(resolved_config))
            if self._wandb is not None:
                sent = self._step_file.read_text().strip() if self._step_file.exists() else ""
                # a resumed online run's next step, or the last step an earlier launch sent
                self._wandb_step = max(int(getattr(self._wandb, "step", 0) or 0), int(sent) if sent.isdigit() else 0)
        self._last = time.time()

    def log(self, record: Dict[str, Any]) -> None:
        """Append a metrics record (rank 0 only writes)."""
        if self.rank != 0:
            return
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        assert self._file is not None
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.console and record.get("event") is None:
            print(_console_line(record), flush=True)
        elif self.console:  # events: their scalars and short fields (per-language tables stay in the file)
            fields = {k: v for k, v in record.items() if k not in ("event", "stage", "time")
                      and not (isinstance(v, (dict, list)) and len(v) > 8)}
            print(f"[{record.get('stage') or 'run'}] {record['event']}: "
                  + ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items()),
                  flush=True)
        if self._wandb is not None:
            self._to_wandb(record)

    def _to_wandb(self, record: Dict[str, Any]) -> None:
        step = record.get("global_step")
        step = self._wandb_step if step is None else int(step)
        if step < self._wandb_step:
            return
        if step > self._wandb_step:
            self._wandb_step = step
            with atomic_path(self._step_file) as tmp:
                tmp.write_text(f"{step}\n")
        event = record.get("event")
        flat = {(f"{event}/{k}" if event else k): v for k, v in _numbers(record).items()}
        if flat:
            self._wandb.log(flat, step=step)

    def close(self) -> None:
        """Flush and close the outputs."""
        if self._file is not None:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


def _numbers(record: Dict[str, Any]) -> Dict[str, float]:
    """The record's numbers, with one level of its tables as `<table>/<key>` (loss_by_language/eng,
    heldout_ppl/fra, ledger/tokens); deeper tables, lists (the expert load) and flags stay in metrics.jsonl."""
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    out: Dict[str, float] = {}
    for k, v in record.items():
        if number(v):
            out[k] = v
        elif isinstance(v, dict):
            out.update({f"{k}/{kk}": vv for kk, vv in v.items() if number(vv)})
    return out


def _console_line(r: Dict[str, Any]) -> str:
    parts = [f"[{r['stage']}] step {r['step']}/{r['stage_steps']}",
             f"loss {r['loss']:.4f}" if r.get("loss") is not None else "loss nan",
             f"lr {r['lr']:.2e}", f"gnorm {r['grad_norm']:.3f}" if r.get("grad_norm") is not None else "",
             f"{r['tokens_per_s']:,.0f} tok/s", f"seq {r['seq_len']}", f"theta {r['rope_theta']:.0f}"]
    if r.get("mfu") is not None:
        parts.append(f"mfu {100 * r['mfu']:.1f}%")
    if r.get("balance_loss") is not None:
        parts.append(f"bal {r['balance_loss']:.4f}")
    return "  ".join(p for p in parts if p)


def _start_wandb(cfg: TrainConfig, run_dir: Path, safe_config: Dict[str, Any]) -> Any:
    """Start wandb in the configured mode; the API key goes through the environment, never into the config."""
    try:
        import wandb
    except ImportError:
        print("wandb is not installed; logging.wandb is ignored", file=sys.stderr)
        return None
    if cfg.logging.wandb.api_key:
        os.environ["WANDB_API_KEY"] = cfg.logging.wandb.api_key
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        return wandb.init(project=cfg.logging.wandb.project, entity=cfg.logging.wandb.entity, name=cfg.name,
                          dir=str(run_dir), mode=cfg.logging.wandb.mode, config=safe_config,
                          id=wandb_run_id(run_dir), resume="allow")
    except wandb.errors.Error as e:  # no network, a refused key: was wandb's traceback, exit 1
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        key = os.environ.get("WANDB_API_KEY")
        first = first.replace(key, "***") if key else first
        raise ConfigError(f"config key 'logging.wandb.mode' = {cfg.logging.wandb.mode!r}: wandb could not start the "
                          f"run ({type(e).__name__}: {first}); check the network and WANDB_API_KEY, or log with "
                          f"logging.wandb.mode=offline and `wandb sync {run_dir}/wandb` later") from None


def wandb_run_id(run_dir: Path) -> str:
    """This run directory's wandb run id: made at the first launch and kept in <run_dir>/wandb_id, so relaunches
    continue the run and no two run directories share one (the run's `name` is the demo's `demo` in most)."""
    path = run_dir / "wandb_id"
    if path.exists():
        run_id = path.read_text(errors="replace").strip()
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,128}", run_id):
            raise ConfigError(f"{path}: holds {run_id[:80]!r}, not a wandb run id (letters, digits, '_' and '-'); "
                              f"write the run's id there, or delete the file to start a new wandb run")
        return run_id
    run_id = re.sub(r"[^A-Za-z0-9_-]", "_", run_dir.name[:40]) + f"-{uuid.uuid4().hex[:8]}"
    with atomic_path(path) as tmp:
        tmp.write_text(run_id + "\n")
    return run_id
