"""torch.profiler traces of a few optimizer steps, and a CUDA memory snapshot: `logging.profile.*`.

What torchtitan's `profiling.*` and Megatron's `--profile` give: every rank records steps
[start_step, start_step + num_steps) (global step numbers, 1-based, as `global_step` in metrics.jsonl) and writes

    <run_dir>/profile/step<first>-<last>/rank<r>.trace.json   Chrome trace (https://ui.perfetto.dev, chrome://tracing)
    <run_dir>/profile/step<first>-<last>/rank<r>.ops.txt      the ops by their own device (else CPU) time, then
                                                                the same per input shape
    <run_dir>/profile/step<first>-<last>/rank<r>.memory.pickle  with `memory: true` on CUDA: the allocator's
                                                                history, for https://pytorch.org/memory_viz

The step before the first recorded one runs under the profiler as warm-up and is not recorded (the profiler's
own start-up would otherwise show in the first step). A range cut short (the stage, the launch or a preemption
ends first) writes what it recorded, in a folder named for the steps it holds. Files are written under a temporary
name and renamed, so a reader never sees half a trace.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from data.io import atomic_path
from train.config import ProfileConfig

_HISTORY_ENTRIES = 100_000  # allocator events kept for the memory snapshot (the oldest are dropped first)


class StepProfiler:
    """Starts and stops torch.profiler around the configured steps; `begin`/`end` bracket every optimizer step."""

    def __init__(self, cfg: ProfileConfig, run_dir: Path, rank: int, device: torch.device):
        self.cfg = cfg
        self.first = cfg.start_step
        self.last = cfg.start_step + cfg.num_steps - 1
        self.rank = rank
        self.cuda = device.type == "cuda"
        self.root = run_dir / "profile"
        self.prof: Optional[profile] = None
        self.recorded: List[int] = []  # global steps recorded so far
        self.done = not cfg.start_step  # 0: off

    def begin(self, global_step: int) -> None:
        """Before optimizer step `global_step` runs: start the profiler if this step or the next is in range."""
        if self.done or self.prof is not None or not self.first - 1 <= global_step <= self.last:
            return
        warmup = 1 if global_step < self.first else 0
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        with warnings.catch_warnings():  # no step to warm up on (start_step 1, or a launch resumed in the range)
            warnings.filterwarnings("ignore", message="Profiler won't be using warmup")
            steps = schedule(wait=0, warmup=warmup, active=self.last - global_step + 1 - warmup, repeat=1)
        self.prof = profile(activities=activities, record_shapes=self.cfg.record_shapes,
                            profile_memory=self.cfg.memory, with_stack=self.cfg.with_stack, schedule=steps,
                            on_trace_ready=self._write)
        self.prof.start()
        if self.cfg.memory and self.cuda:
            torch.cuda.memory._record_memory_history(max_entries=_HISTORY_ENTRIES)

    def end(self, global_step: int) -> Optional[Dict[str, Any]]:
        """After optimizer step `global_step`: advance the schedule; returns the written files' event once done."""
        if self.prof is None:
            return None
        if global_step >= self.first:
            self.recorded.append(global_step)
        if global_step >= self.last:
            return self.finish()
        self.prof.step()
        return None

    def finish(self) -> Optional[Dict[str, Any]]:
        """Stop a running profiler and write what it recorded (also when its range is cut short)."""
        if self.prof is None:
            return None
        prof, self.prof = self.prof, None
        self.done = True
        prof.stop()  # a recording schedule hands the trace to _write here
        if not self.recorded:  # ended in the warm-up step: nothing to write
            if self.cfg.memory and self.cuda:
                torch.cuda.memory._record_memory_history(enabled=None)
            return None
        folder = self.folder
        if self.cfg.memory and self.cuda:
            with atomic_path(folder / f"rank{self.rank}.memory.pickle") as tmp:
                torch.cuda.memory._dump_snapshot(str(tmp))
            torch.cuda.memory._record_memory_history(enabled=None)
        return {"event": "profile", "steps": [self.recorded[0], self.recorded[-1]], "folder": str(folder)}

    @property
    def folder(self) -> Path:
        """<run_dir>/profile/step<first>-<last>/ of the steps recorded."""
        return self.root / f"step{self.recorded[0]}-{self.recorded[-1]}"

    def _write(self, prof: profile) -> None:
        """The trace and the op table of this rank (none when the range ended before its first recorded step)."""
        if not self.recorded:
            return
        with atomic_path(self.folder / f"rank{self.rank}.trace.json") as tmp:
            prof.export_chrome_trace(str(tmp))
        sort = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
        tables = [f"steps {self.recorded[0]}-{self.recorded[-1]}, ops by their own time",
                  prof.key_averages().table(sort_by=sort, row_limit=30)]
        if self.cfg.record_shapes:
            tables += ["the same, per input shape",
                       prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=30)]
        with atomic_path(self.folder / f"rank{self.rank}.ops.txt") as tmp:
            tmp.write_text(os.linesep.join(tables) + os.linesep)
