"""ZeRO-3 builds the model already partitioned (DeepSpeed's zero.Init): each rank allocates its share of the
weights, never the whole model, and training is bit for bit the run that built the model whole first."""
from __future__ import annotations

import pytest
import torch

from trainutil import DENSE1, SMOKE, losses, records, run_train, smoke_run


def model_event(run_dir):
    (event,) = [r for r in records(run_dir) if r.get("event") == "model"]
    return event


@pytest.mark.parametrize("model", ["tiny_dense", "tiny_moe"])
def test_zero3_builds_each_rank_its_share_and_trains_as_the_whole_model(data_root, tmp_path_factory, model):
    parted = smoke_run(tmp_path_factory, f"{model}-zero3", [f"model={model}", "deepspeed=zero3"], nproc=2)
    # the whole build for General's first 3 steps (after the build both train the same partitions alike)
    built_whole = smoke_run(tmp_path_factory, f"{model}-zero3-whole",
                            [f"model={model}", "deepspeed=zero3", "deepspeed.partitioned_init=false", "max_steps=3",
                             "eval.enabled=false", "checkpoint.export_hf=false"], nproc=2)
    whole = losses(built_whole)
    assert list(whole) == [("general", s) for s in (1, 2, 3)]
    # same initial weights, same steps: every loss and grad norm, to the last bit
    assert whole == {k: v for k, v in losses(parted).items() if k in whole}
    ev, ev_whole = model_event(parted), model_event(built_whole)
    total = ev["parameters"]
    assert ev_whole["parameters"] == total and ev_whole["elements_per_rank"] == [total, total]
    assert ev["partitioned_init"] and not ev_whole["partitioned_init"]
    # each rank holds half of every weight (DeepSpeed pads each one to an even split)
    per_rank = ev["elements_per_rank"]
    assert len(per_rank) == 2 and per_rank[0] == per_rank[1]
    assert total / 2 <= per_rank[0] <= total / 2 + 512


@pytest.mark.parametrize("model, source, source_overrides, nproc", [
    ("tiny_dense", "dense1", DENSE1, 1),  # tied embeddings
    ("tiny_moe", "tiny_moe-zero2", ["model=tiny_moe", "deepspeed=zero2"], 2),  # untied head, stacked experts
])
def test_zero3_partitioned_model_starts_from_an_hf_export(data_root, tmp_path_factory, tmp_path, model, source,
                                                          source_overrides, nproc):
    """`init_from` an HF directory writes each weight into its partitions: the first Long Context loss of a
    2-rank ZeRO-3 run started from the Reasoning export is the uninterrupted run's."""
    full = smoke_run(tmp_path_factory, source, source_overrides, nproc=nproc)
    run_dir = tmp_path / "lc_zero3"
    proc = run_train([*SMOKE, f"run_dir={run_dir}", f"model={model}", "deepspeed=zero3", "eval.enabled=false",
                      "curriculum.start=long_context", f"init_from={full / 'hf' / 'reasoning'}"], nproc=2)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert model_event(run_dir)["partitioned_init"]
    got, ref = losses(run_dir), losses(full)
    assert list(got) == [("long_context", 1), ("long_context", 2)]
    assert got[("long_context", 1)][0] == pytest.approx(ref[("long_context", 1)][0], rel=1e-6)
    assert got[("long_context", 1)][0] < ref[("general", 1)][0] - 1.0  # trained weights, not a fresh init


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_partitioned_build_in_bf16_on_cuda_trains_as_the_whole_build(tmp_path):
    """On a GPU zero.Init makes the weights bf16 as they are built, the whole build rounds them later: the same
    numbers either way, so the same losses to the last bit. Uses the prepared fixture (launch/gpu_check.sh)."""
    got = {}
    for flag in ("true", "false"):
        proc = run_train([*SMOKE, f"run_dir={tmp_path / flag}", "model=tiny_moe", "deepspeed=zero3", "device=cuda",
                          f"deepspeed.partitioned_init={flag}", "eval.enabled=false"])
        assert proc.returncode == 0, proc.stdout[-3000:]
        got[flag] = losses(tmp_path / flag)
    assert len(got["true"]) == 8 and got["true"] == got["false"]
