"""Expert parallelism of the MoE block (models/moe.py) on gloo processes: the sharded layer, its all-to-all
dispatch and combine, and the global-batch balance loss give the single-process model's loss and gradients; and
each rank initialises its slice of the unsharded model's experts."""
from __future__ import annotations

import dataclasses
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models import Qwen3ForCausalLM, load_preset
from models.moe import Qwen3SparseMoeBlock
from trainutil import end_spawned_worker

N_SEQ, SEQ = 8, 16


def _build(activation_checkpointing: bool = False) -> Qwen3ForCausalLM:
    cfg = dataclasses.replace(load_preset("tiny_moe"), router_z_loss_coef=1e-3,
                              activation_checkpointing=activation_checkpointing)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(cfg)
    model.to_empty(device="cpu")
    model.init_weights(seed=0)
    with torch.no_grad():  # decisive, imbalanced routing: some experts get no rows on some ranks
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    return model.train()


def _batch():
    g = torch.Generator().manual_seed(123)
    return torch.randint(0, 8192, (N_SEQ, SEQ), generator=g), torch.randint(0, 8192, (N_SEQ, SEQ), generator=g)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        for ep, recompute in CASES:
            _one_expert_parallel_size(rank, world, ep, recompute, out_dir)
        _compiled_blocks_do_not_recompile_per_routing(rank, world, out_dir)
    finally:
        dist.destroy_process_group()
    end_spawned_worker()


def _one_expert_parallel_size(rank: int, world: int, ep: int, recompute: bool, out_dir: str) -> None:
    # groups as DeepSpeed lays them out: ep consecutive ranks share the experts out (all-to-all); the ranks
    # holding the same experts form an expert-data-parallel group (gradient reduction)
    ep_groups = [dist.new_group(list(range(s, s + ep))) for s in range(0, world, ep)]
    edp_groups = [dist.new_group(list(range(i, world, ep))) for i in range(ep)]
    ep_group, edp_group = ep_groups[rank // ep], edp_groups[rank % ep]
    model = _build(recompute)  # recompute: the backward re-runs each layer's forward, all-to-alls included
    model.set_balance_group(dist.group.WORLD)
    for m in model.modules():
        if isinstance(m, Qwen3SparseMoeBlock):
            m.set_expert_parallel(ep_group)
    x, y = _batch()
    per = N_SEQ // world
    model.start_step()
    out = model(x[rank * per:(rank + 1) * per], labels=y[rank * per:(rank + 1) * per])
    out.loss.backward()
    loss, balance = out.loss.detach().clone(), out.balance_loss.clone()
    dist.all_reduce(loss)
    dist.all_reduce(balance)
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.detach().clone()
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            dist.all_reduce(g, group=edp_group)  # what DeepSpeed does with expert gradients ...
            parts = [torch.empty_like(g) for _ in range(ep)]
            dist.all_gather(parts, g, group=ep_group)  # ... then gathered here to compare
            g = torch.cat(parts)
        else:
            dist.all_reduce(g)
        grads[name] = g / world
    eval_logits = model.eval()(x[rank * per:(rank + 1) * per]).logits
    if rank == 0:
        torch.save({"loss": loss / world, "balance": balance / world, "grads": grads, "load": model.expert_load(),
                    "logits": eval_logits, "shape": tuple(model.model.layers[0].mlp.experts.down_proj.shape)},
                   os.path.join(out_dir, f"ep{ep}-{recompute}.pt"))


def _compiled_blocks_do_not_recompile_per_routing(rank: int, world: int, out_dir: str) -> None:
    """Blocks compiled as `model.compile` does, under EP = 2: new routing (other split sizes of the all-to-all)
    each forward. The dispatch's split sizes were guarded on, so each micro-batch recompiled until dynamo's limit
    (8), after which the MoE layer ran uncompiled; now the dispatch runs eagerly inside the compiled block."""
    import torch._dynamo

    model = _build()
    model.set_balance_group(dist.group.WORLD)
    for m in model.modules():
        if isinstance(m, Qwen3SparseMoeBlock):
            m.set_expert_parallel(dist.group.WORLD)
    for layer in model.model.layers:
        layer.compile(backend="eager", dynamic=False)  # dynamo's capture and guards, no code generation
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(rank)
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        model.start_step()
        model(torch.randint(0, 8192, (2, SEQ), generator=g))  # the first forward compiles
        for _ in range(4):  # each routes its tokens otherwise
            model.start_step()
            model(torch.randint(0, 8192, (2, SEQ), generator=g))
    if rank == 0:
        open(os.path.join(out_dir, "compiled_ok"), "w").close()


CASES = [(2, False), (2, True)]  # (expert_parallel_size, activation checkpointing)


@pytest.mark.slow
def test_expert_parallel_block_equals_one_process():
    """2 ranks, EP = 2, with and without activation checkpointing, against one process (4 ranks with EP = 2
    and 4, i.e. with expert-data-parallel replicas, run in tests/test_expert_parallel_train.py)."""
    world = 2
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(world, _free_port(), out_dir), nprocs=world, join=True)
        results = {case: torch.load(os.path.join(out_dir, f"ep{case[0]}-{case[1]}.pt")) for case in CASES}
        assert os.path.exists(os.path.join(out_dir, "compiled_ok"))  # no recompile as the routing changed

    model = _build()
    x, y = _batch()
    model.start_step()
    out = model(x, labels=y)  # one process, the whole batch, all experts
    out.loss.backward()
    per = N_SEQ // world
    logits = model.eval()(x[:per]).logits
    for (ep, recompute), got in results.items():
        assert got["shape"] == (8 // ep, 128, 128)  # rank 0 really held only its experts
        torch.testing.assert_close(got["loss"], out.loss.detach(), rtol=0, atol=1e-6)
        torch.testing.assert_close(got["balance"], out.balance_loss, rtol=0, atol=1e-6)
        torch.testing.assert_close(got["load"], model.expert_load())
        for name, p in model.named_parameters():
            torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-5, atol=1e-7, msg=f"EP={ep} {recompute=} {name}")
        torch.testing.assert_close(got["logits"], logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ep", [2, 4])
def test_each_expert_parallel_rank_initialises_its_slice_of_the_full_models_experts(monkeypatch, ep):
    """Built as train.loop builds it under EP (sharded on the meta device, then `to_empty` and `init_weights` from
    the seed): rank r of ep holds experts [r*E/ep, (r+1)*E/ep) of the unsharded model of the same seed, bit for
    bit, and every other weight as that model has it. The group is this process pretending to be rank r."""
    import models.moe

    cfg = load_preset("tiny_moe")
    full = Qwen3ForCausalLM(cfg)
    full.init_weights(seed=5)
    want = full.state_dict()
    per = 8 // ep
    for rank in range(ep):
        monkeypatch.setattr(models.moe.dist, "get_world_size", lambda group: ep)
        monkeypatch.setattr(models.moe.dist, "get_rank", lambda group, r=rank: r)
        with torch.device("meta"):
            model = Qwen3ForCausalLM(cfg)
        for m in model.modules():
            if isinstance(m, Qwen3SparseMoeBlock):
                m.set_expert_parallel(object())
        model.to_empty(device="cpu")
        model.init_weights(seed=5)
        got = model.state_dict()
        assert got.keys() == want.keys()
        for name, value in got.items():
            if ".mlp.experts." in name:
                assert value.shape[0] == per and torch.equal(value, want[name][rank * per:(rank + 1) * per]), \
                    (rank, name)
            else:
                assert torch.equal(value, want[name]), (rank, name)


def test_a_full_state_dict_loads_this_ranks_expert_slice():
    """The load hook's second source: the stacked tensors of all E experts go in as this rank's slice (experts
    4-5 of 8 here), every other weight as it is."""
    from train.expert_parallel import _restack_pre_hook

    full = Qwen3ForCausalLM(load_preset("tiny_moe"))
    full.init_weights(seed=1)
    part = Qwen3ForCausalLM(load_preset("tiny_moe"))
    for layer in part.model.layers:
        layer.mlp.experts.keep_experts(4, 2)
        layer.mlp.experts.register_load_state_dict_pre_hook(_restack_pre_hook)
    part.init_weights(seed=0)
    part.load_state_dict(full.state_dict())
    for (name, got), want in zip(part.state_dict().items(), full.state_dict().values()):
        assert torch.equal(got, want[4:6] if ".mlp.experts." in name else want), name


def test_per_expert_files_round_trip_on_non_square_experts(tmp_path, monkeypatch):
    """`save_expert_files` of two expert-parallel ranks (experts 0-3 and 4-7, F = 64 != d = 128 so gate/up rows and
    down's axes cannot be mixed up unseen), read back whole by `read_expert_files` and, per expert, by the load
    hook of a rank holding experts 4-5: every expert's tensors under its HF name and global id."""
    from types import SimpleNamespace

    from deepspeed.utils import groups

    from train.engine import safe_torch_load
    from train.expert_parallel import _restack_pre_hook, experts_modules, read_expert_files, save_expert_files

    cfg = dataclasses.replace(load_preset("tiny_moe"), moe_intermediate_size=64, num_hidden_layers=2)
    full = Qwen3ForCausalLM(cfg)
    full.init_weights(seed=3)
    f = cfg.moe_intermediate_size
    monkeypatch.setattr(groups, "_get_expert_data_parallel_rank", lambda name: 0)
    ckpt = tmp_path / "step5"
    ckpt.mkdir()
    for first in (0, 4):  # two expert-parallel ranks' halves
        rank = Qwen3ForCausalLM(cfg)
        rank.load_state_dict(full.state_dict())
        for _, experts in experts_modules(rank):
            experts.keep_experts(first, 4)
            experts.expert_group_name = "ep_size_2"
        engine = SimpleNamespace(module=rank, checkpoint_mp_rank=0,
                                 checkpoint_engine=SimpleNamespace(save=lambda state, path: torch.save(state, path)))
        save_expert_files(engine, str(tmp_path), ckpt.name)
    name = "model.layers.1.mlp.experts"
    one = torch.load(ckpt / "layer_1_expert_6_mp_rank_00_model_states.pt", weights_only=True)
    stack = full.state_dict()
    assert torch.equal(one[f"{name}.6.gate_proj.weight"], stack[f"{name}.gate_up_proj"][6, :f])
    assert torch.equal(one[f"{name}.6.up_proj.weight"], stack[f"{name}.gate_up_proj"][6, f:])
    assert torch.equal(one[f"{name}.6.down_proj.weight"], stack[f"{name}.down_proj"][6])
    with safe_torch_load():
        whole = read_expert_files(ckpt, full)
    assert sorted(whole) == sorted(k for k in stack if ".mlp.experts." in k)
    assert all(torch.equal(whole[k], stack[k]) for k in whole)

    part = Qwen3ForCausalLM(cfg)  # a rank of EP = 4 holding experts 4-5, loading the per-expert tensors
    for layer in part.model.layers:
        layer.mlp.experts.keep_experts(4, 2)
        layer.mlp.experts.register_load_state_dict_pre_hook(_restack_pre_hook)
    per_expert = {k: v for k, v in stack.items() if ".mlp.experts." not in k}
    for layer_id in range(cfg.num_hidden_layers):
        per_expert.update(torch.load(ckpt / f"layer_{layer_id}_expert_4_mp_rank_00_model_states.pt", weights_only=True))
        per_expert.update(torch.load(ckpt / f"layer_{layer_id}_expert_5_mp_rank_00_model_states.pt", weights_only=True))
    part.load_state_dict(per_expert)
    for key, got in part.state_dict().items():
        assert torch.equal(got, stack[key][4:6] if ".mlp.experts." in key else stack[key]), key
