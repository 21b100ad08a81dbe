"""The planner's bytes per parameter are what DeepSpeed 0.19.8 really allocates: real ZeRO-0/1/2/3 engines in
bf16 (the GPU configuration of train/engine.py), summing the micro-batches' gradients in bf16 and in fp32, on 2 gloo
processes, their tensors counted per rank."""
import json
import logging
import os

import pytest
import torch
import torch.multiprocessing as mp

from launch.plan import ParamSplit, model_states
from trainutil import end_spawned_worker, free_port

D_IN, D_HID = 128, 256  # two bias-free linears: P = 2 * 128 * 256, evenly split over 2 ranks
WORLD = 2
# (ZeRO stage, the dtype micro-batch gradients are summed in: DeepSpeed's data_types.grad_accum_dtype)
CASES = [(0, "bf16"), (1, "bf16"), (2, "bf16"), (3, "bf16"), (1, "fp32"), (2, "fp32"), (3, "fp32")]


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _rank_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    logging.disable(logging.WARNING)
    import deepspeed

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    result = {}
    for stage, accum in CASES:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(D_IN, D_HID, bias=False), torch.nn.Linear(D_HID, D_IN, bias=False))
        config = {"train_batch_size": 2 * 2 * WORLD, "train_micro_batch_size_per_gpu": 2,
                  "gradient_accumulation_steps": 2, "bf16": {"enabled": True}, "steps_per_print": 2**31 - 1,
                  "data_types": {"grad_accum_dtype": accum},
                  "zero_optimization": {"stage": stage, "contiguous_gradients": True, "overlap_comm": False,
                                        "stage3_param_persistence_threshold": 0},
                  "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False}
        engine, zopt, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()),
                                                  config=config)
        inner = zopt.optimizer  # the torch AdamW that steps the fp32 master partition
        seen, kept = {}, []  # kept: the gradients held between micro-batches
        step = inner.step

        def counting_step(*args, _step=step, **kwargs):
            fp32 = [p for g in inner.param_groups for p in g["params"]]
            seen["master"] = _nbytes(fp32)
            # the fp32 gradient copy made for the step; none where the step reads the fp32 sum in place (a held
            # gradient's storage that still has its bytes: DeepSpeed frees some by resizing them to 0)
            held = {g.untyped_storage().data_ptr() for g in kept if g.untyped_storage().nbytes() > 0}
            seen["step_grads"] = _nbytes(p.grad for p in fp32 if p.grad.untyped_storage().data_ptr() not in held)
            out = _step(*args, **kwargs)
            seen["moments"] = _nbytes(v for s in inner.state.values() for v in s.values() if v.dim() > 0)
            return out

        inner.step = counting_step
        for micro in range(2):
            loss = engine(torch.randn(2, D_IN, dtype=torch.bfloat16)).float().pow(2).mean()
            engine.backward(loss)
            if micro == 0:  # gradients held between micro-batches of one step
                grads = []
                if stage <= 1:
                    grads = [p.grad for p in model.parameters()]
                    grads += getattr(zopt, "fp32_groups_gradients_flat", [])  # BF16_Optimizer's fp32 sum
                elif stage == 3:
                    grads = [zopt.grad_partitions_flat_buffer]
                elif accum == "fp32":  # ZeRO-2's fp32 partition (its bf16 one is inside bucket bookkeeping)
                    grads = [g.flat_partition for g in zopt.averaged_gradients.values()]
                if grads:
                    seen["grads"] = _nbytes(grads)
                kept += grads
            engine.step()
        params = model.parameters()
        seen["params"] = _nbytes(p.ds_tensor for p in params) if stage == 3 else _nbytes(params)
        result[f"{stage}-{accum}"] = seen
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    # leave together and close the group: a process exiting with gloo's threads still running can abort
    # ("terminate called without an active exception"), which spawn reports as a failure
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    end_spawned_worker()


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds_bytes")
    mp.spawn(_rank_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize("stage, accum", CASES)
def test_planner_bytes_are_deepspeeds(measured, stage, accum):
    P = 2 * D_IN * D_HID
    split = ParamSplit(total=P, dense=P, expert=0, active=P, largest_module=D_IN * D_HID, largest_module_name="0")
    plan = model_states(split, stage, WORLD, grad_accum=accum)
    for rank in measured:
        got = rank[f"{stage}-{accum}"]
        assert got["params"] == plan.params
        if "grads" in got:  # ZeRO-2 in bf16 keeps its partition inside bucket bookkeeping: not counted here
            assert got["grads"] == plan.grads
        assert got["master"] + got["moments"] == plan.optimizer
        assert got["step_grads"] == plan.step_grads
    if (stage, accum) in ((1, "fp32"), (2, "fp32")):
        assert "grads" in got and plan.step_grads == 0  # the fp32 sum is counted, and read in place by the step
