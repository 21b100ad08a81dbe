"""logging.profile: torch.profiler records exactly the configured global steps and writes a trace and an op table
per rank (the training run's own trace is checked in test_train_run.py)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from train.config import ProfileConfig
from train.profile import StepProfiler


def _steps(prof: StepProfiler, steps: range) -> list:
    """Run global steps; step g does g matmuls, so the trace tells which steps it holds. Returns the events."""
    a = torch.randn(16, 16)
    events = []
    for g in steps:
        prof.begin(g)
        for _ in range(g):
            a = torch.mm(a, a).tanh()
        events.append(prof.end(g))
    return events


def _mm_count(folder: Path) -> int:
    trace = json.loads((folder / "rank0.trace.json").read_text())
    return sum(1 for e in trace["traceEvents"] if e.get("name") == "aten::mm" and e.get("ph") == "X")


def test_records_exactly_the_configured_steps(tmp_path):
    prof = StepProfiler(ProfileConfig(start_step=3, num_steps=2), tmp_path, rank=0, device=torch.device("cpu"))
    events = _steps(prof, range(1, 8))
    folder = tmp_path / "profile" / "step3-4"
    assert [e for e in events if e] == [{"event": "profile", "steps": [3, 4], "folder": str(folder)}]
    assert events[3] is not None  # written as soon as step 4 ends
    assert _mm_count(folder) == 3 + 4  # not the warm-up step 2, not step 5
    table = (folder / "rank0.ops.txt").read_text()
    assert "aten::mm" in table and "[[16, 16], [16, 16]]" in table  # grouped by input shape
    assert sorted(p.name for p in folder.iterdir()) == ["rank0.ops.txt", "rank0.trace.json"]  # no temporary files
    assert prof.finish() is None and [p.name for p in (tmp_path / "profile").iterdir()] == ["step3-4"]


def test_a_range_cut_short_writes_what_it_recorded(tmp_path):
    prof = StepProfiler(ProfileConfig(start_step=2, num_steps=10), tmp_path, rank=1, device=torch.device("cpu"))
    assert _steps(prof, range(1, 4)) == [None, None, None]
    folder = tmp_path / "profile" / "step2-3"
    assert prof.finish() == {"event": "profile", "steps": [2, 3], "folder": str(folder)}
    assert (folder / "rank1.trace.json").exists()
    trace = json.loads((folder / "rank1.trace.json").read_text())
    assert sum(1 for e in trace["traceEvents"] if e.get("name") == "aten::mm" and e.get("ph") == "X") == 2 + 3


def test_first_step_and_a_resume_inside_the_range(tmp_path):
    # start_step 1 has no step before it to warm up on; a launch resumed at step 5 records 5-6 of 4-6
    first = StepProfiler(ProfileConfig(start_step=1, num_steps=1), tmp_path / "a", 0, torch.device("cpu"))
    assert _steps(first, range(1, 3))[0]["steps"] == [1, 1]
    assert _mm_count(tmp_path / "a" / "profile" / "step1-1") == 1
    resumed = StepProfiler(ProfileConfig(start_step=4, num_steps=3), tmp_path / "b", 0, torch.device("cpu"))
    assert _steps(resumed, range(5, 9))[1]["steps"] == [5, 6]
    assert _mm_count(tmp_path / "b" / "profile" / "step5-6") == 5 + 6


def test_off_by_default_and_a_range_ended_in_its_warm_up_writes_nothing(tmp_path):
    off = StepProfiler(ProfileConfig(), tmp_path, 0, torch.device("cpu"))
    assert _steps(off, range(1, 4)) == [None] * 3 and off.finish() is None
    warm = StepProfiler(ProfileConfig(start_step=3), tmp_path, 0, torch.device("cpu"))
    _steps(warm, range(1, 3))  # step 2 is the warm-up; the stage ends there
    assert warm.finish() is None
    assert not (tmp_path / "profile").exists()
