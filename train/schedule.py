"""Warmup-stable-decay learning rate, one segment per curriculum stage.

The LR is a pure function of (stage config, step within the stage), so a resumed run needs no scheduler state
and every stage's shape is read off its YAML: e.g. the Reasoning stage sets `decay_frac: 1.0` to decay over
its whole length ("accelerated decay" in the Qwen3 report) while General keeps a long stable phase.
"""
from __future__ import annotations

import math

from train.config import LRConfig


def lr_at(lr: LRConfig, step: int, total_steps: int) -> float:
    """LR for optimizer step `step` (0-based) of a stage with `total_steps` steps."""
    if step < lr.warmup_steps:
        return lr.warmup_start + (lr.peak - lr.warmup_start) * (step + 1) / lr.warmup_steps
    # the decay window ends with the stage and never reaches into the warmup (as Megatron-LM's): decay_frac 1.0
    # with a warmup decays over the steps after it, where it would otherwise drop from the peak at once
    # a decay asked for takes at least the last step (a short stage rounded it to none: the stage ended at the peak)
    decay_steps = int(round(lr.decay_frac * total_steps))
    decay_steps = min(max(decay_steps, 1 if lr.decay_frac > 0 else 0), total_steps - lr.warmup_steps)
    decay_start = total_steps - decay_steps
    if decay_steps == 0 or step < decay_start:
        return lr.peak
    # progress runs over (0, 1] so the last step of the stage lands exactly on `final`
    progress = (step - decay_start + 1) / decay_steps
    if lr.decay_style == "linear":
        shape = 1.0 - progress
    elif lr.decay_style == "sqrt":
        shape = 1.0 - math.sqrt(progress)
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr.final + (lr.peak - lr.final) * shape
