"""The warmup-stable-decay segments each stage's YAML describes."""
import math

import pytest

from train.config import LRConfig
from train.schedule import lr_at


def test_warmup_then_stable():
    lr = LRConfig(peak=1.0, final=0.1, warmup_steps=4, warmup_start=0.0, decay_frac=0.0)
    got = [lr_at(lr, s, 10) for s in range(10)]
    assert got[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert got[4:] == [1.0] * 6


def test_decay_phase_ends_exactly_on_final():
    lr = LRConfig(peak=1.0, final=0.1, warmup_steps=0, decay_frac=0.5, decay_style="cosine")
    got = [lr_at(lr, s, 8) for s in range(8)]
    assert got[:4] == [1.0] * 4  # stable half
    assert got[-1] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(got[3:], got[4:]))  # strictly decreasing through the decay
    # cosine midpoint of the decay: progress 2/4 -> peak/2 + final/2
    assert got[5] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_a_decay_over_the_whole_stage_starts_after_the_warmup():
    """decay_frac 1.0 with a warmup (say, a Reasoning stage started from an HF export with fresh AdamW moments):
    the decay runs over the steps after the warmup. It overlapped it, and the LR fell from the peak to
    0.55 x peak in one step at the warmup's end."""
    lr = LRConfig(peak=1.0, final=0.1, warmup_steps=5, warmup_start=0.0, decay_frac=1.0, decay_style="linear")
    got = [lr_at(lr, s, 10) for s in range(10)]
    assert got[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert got[5:] == pytest.approx([1.0 - 0.9 * k / 5 for k in range(1, 6)])  # 0.82 ... 0.1, from the peak
    assert got[-1] == pytest.approx(0.1)
    # a decay that fits after the warmup is left as it is
    fits = LRConfig(peak=1.0, final=0.1, warmup_steps=2, decay_frac=0.5, decay_style="linear")
    assert [lr_at(fits, s, 10) for s in range(4, 10)] == pytest.approx([1.0, 0.82, 0.64, 0.46, 0.28, 0.1])


def test_reasoning_stage_decays_faster_than_general():
    general = LRConfig(peak=3e-4, final=3e-5, warmup_steps=0, decay_frac=0.1)
    reasoning = LRConfig(peak=3e-4, final=3e-5, warmup_steps=0, decay_frac=1.0)
    assert lr_at(reasoning, 50, 100) < lr_at(general, 50, 100)


@pytest.mark.parametrize("style", ["linear", "sqrt", "cosine"])
def test_styles_hit_both_ends(style):
    lr = LRConfig(peak=2.0, final=0.5, warmup_steps=0, decay_frac=1.0, decay_style=style)
    assert lr_at(lr, 99, 100) == pytest.approx(0.5)
    assert 0.5 < lr_at(lr, 0, 100) <= 2.0


@pytest.mark.parametrize(
    "style, shape",
    [
        ("linear", lambda p: 1 - p),
        ("sqrt", lambda p: 1 - math.sqrt(p)),
        ("cosine", lambda p: 0.5 * (1 + math.cos(math.pi * p))),
    ],
)
def test_each_style_follows_its_formula_inside_the_decay(style, shape):
    # the endpoints agree for every style; an interior step tells them apart (sqrt at 1/4: 0.5 vs linear's 0.75)
    lr = LRConfig(peak=2.0, final=0.5, warmup_steps=0, decay_frac=1.0, decay_style=style)
    for step in (24, 49, 74):  # progress (step + 1) / 100
        assert lr_at(lr, step, 100) == pytest.approx(0.5 + 1.5 * shape((step + 1) / 100), rel=1e-12)


def test_warmup_ramps_from_warmup_start():
    lr = LRConfig(peak=1.0, final=0.1, warmup_steps=4, warmup_start=0.2, decay_frac=0.0)
    got = [lr_at(lr, s, 10) for s in range(5)]
    assert got == pytest.approx([0.4, 0.6, 0.8, 1.0, 1.0])  # 0.2 + 0.8 (k + 1) / 4


def test_decay_length_rounds_to_nearest_step():
    # 0.27 * 10 = 2.7 decay steps rounds to 3 (truncating would give 2 and a longer stable phase)
    lr = LRConfig(peak=1.0, final=0.0, warmup_steps=0, decay_frac=0.27, decay_style="linear")
    got = [lr_at(lr, s, 10) for s in range(10)]
    assert got[:7] == [1.0] * 7
    assert got[7:] == pytest.approx([2 / 3, 1 / 3, 0.0])


def test_a_decay_that_rounds_to_no_step_still_ends_on_final():
    """0.04 x 10 steps rounded to 0 decay steps: the stage ended at the peak, not at `final`, without a word."""
    lr = LRConfig(peak=1.0, final=0.1, warmup_steps=0, decay_frac=0.04, decay_style="cosine")
    got = [lr_at(lr, s, 10) for s in range(10)]
    assert got[:9] == [1.0] * 9 and got[9] == pytest.approx(0.1)
    # and never into the warmup: a stage of warmup only keeps its ramp
    lr = LRConfig(peak=1.0, final=0.1, warmup_steps=10, warmup_start=0.0, decay_frac=0.04)
    assert [lr_at(lr, s, 10) for s in range(10)][-1] == pytest.approx(1.0)
