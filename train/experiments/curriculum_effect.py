"""`python -m train.experiments.curriculum_effect`: does each stage do its job? One command, one table.

Trains `experiment=curriculum_effect` (a ~91M-parameter Qwen3 through General 512 -> Reasoning 512 -> Long
Context 2,048 on the bundled demo corpus; under 8 minutes on one H200), then evaluates every stage's HF export
(train/eval) and writes <run_dir>/curriculum_effect.md: reasoning accuracy after General vs after Reasoning;
passkey accuracy and loss at positions L_G..4 L_G after General vs after Long Context (ABF); and at 4x the Long
Context length, plain RoPE vs YaRN vs Dual Chunk Attention.

    python -m data.prepare                                # once, with the package registries reachable
    python -m train.experiments.curriculum_effect         # GPU: train + evaluate + table
    python -m train.experiments.curriculum_effect --tiny  # CPU check of the path: smoke curriculum, stage-end suite

Extra arguments are Hydra overrides for the training run (e.g. `deepspeed=zero2`). A finished run directory is
not retrained (training resumes from its last checkpoint, which is the end); `--eval-only` skips training.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

from train.eval.curriculum import curriculum_effect
from train.eval.curriculum import markdown as effect_markdown
from train.eval.outputs import read_results
from train.eval.suite import EVALUATIONS, Sizes, evaluate
from train.eval.target import REPO, eval_device, resolve

# GPU grids, estimated at ~1.5 minutes for the three stages of the ~91M model on an H200: 50 problems per task
# decoded together (no KV cache, left-padded), passkey 5 depths x 10 keys per length in batches of 16 (DCA's
# score blocks at 8K tokens stay a few GB), 8 windows of loss by position
GPU_SIZES = Sizes(ppl_max_tokens=2048, problems=50, max_new_tokens=256, depths=(0.0, 0.25, 0.5, 0.75, 1.0),
                  trials=10, windows=8, batch_size=64, long_batch_size=16)
# CPU check (--tiny): the smoke curriculum, evaluated inside training by the stage-end suite with the smoke
# experiment's small grids; --eval-only --tiny evaluates afterwards with these
TINY_SIZES = Sizes(ppl_max_tokens=256, problems=1, max_new_tokens=16, depths=(0.5,), trials=1, windows=1,
                   batch_size=8)
TINY_OVERRIDES = ["experiment=smoke", "eval.stage_end_suite=true"]


def train_command(run_dir: Path, tiny: bool, overrides: List[str]) -> List[str]:
    """The training command line."""
    preset = TINY_OVERRIDES if tiny else ["experiment=curriculum_effect"]
    return [sys.executable, "-m", "train", *preset, f"run_dir={run_dir}", *overrides]


def main(argv: Optional[List[str]] = None) -> int:
    """Train, evaluate every stage, write and print the table; returns the exit code."""
    p = argparse.ArgumentParser(prog="python -m train.experiments.curriculum_effect", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", type=Path, default=None, help="default: runs/curriculum_effect(_tiny)")
    p.add_argument("--tiny", action="store_true", help="CPU check: smoke curriculum on the fixture, tiny grids")
    p.add_argument("--eval-only", action="store_true", help="evaluate an existing run directory")
    p.add_argument("--device", default="auto", help="evaluation device: auto | cpu | cuda")
    args, overrides = p.parse_known_args(argv)
    run_dir = (args.run_dir or REPO / "runs" / ("curriculum_effect_tiny" if args.tiny else "curriculum_effect"))
    run_dir = run_dir.absolute()
    command = "python -m train.experiments.curriculum_effect" + (" --tiny" if args.tiny else "") + "".join(
        f" {shlex.quote(o)}" for o in overrides)

    t0 = time.perf_counter()
    if not args.eval_only:
        cmd = train_command(run_dir, args.tiny, overrides)
        print("+ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
        proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if proc.returncode != 0:
            print(f"error: training exited with {proc.returncode}", file=sys.stderr)
            return proc.returncode
    train_s = time.perf_counter() - t0

    t1 = time.perf_counter()
    target = resolve(run_dir)
    device = eval_device(args.device)
    if not args.tiny or args.eval_only:  # --tiny training already evaluated every stage at its end
        evaluate(target, TINY_SIZES if args.tiny else GPU_SIZES, EVALUATIONS, device)
    eval_s = time.perf_counter() - t1

    effect = curriculum_effect(read_results(target.out_dir), target.order, target.seq_lens)
    text = (f"# Curriculum effect: `{run_dir.name}`\n\nCommand: `{command}`  \n"
            f"Device: {device}; training {train_s:.0f} s{' (stage-end evaluations included)' if args.tiny else ''}, "
            f"evaluation {eval_s:.0f} s (wall clock).\n\n"
            + effect_markdown(effect)
            + f"\nPer-stage tables: `{target.out_dir / 'summary.md'}`; plots: `python -m train.report {run_dir}`.\n")
    (run_dir / "curriculum_effect.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
