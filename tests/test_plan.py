"""Capacity planner (launch/plan.py): model states against DeepSpeed's estimators, activations against the
tensors the real model saves, hand-computed figures, fit decisions, the error messages and the CLI."""
import dataclasses
import io
import os
import re
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from launch.plan import (GIB, ParamSplit, activation_memory, block_activation_bytes_per_token, format_plan,
                         model_states, plan, split_parameters)
from models import Qwen3ForCausalLM, count_parameters, flops_per_token, load_preset
from train.config import ConfigError, TrainConfig, register_configs

ROOT = Path(__file__).resolve().parents[1]
register_configs()


def _cfg(*overrides: str) -> TrainConfig:
    """A TrainConfig composed through the real conf/ tree, as `python -m launch.plan` composes it."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return OmegaConf.to_object(compose("config", overrides=list(overrides)))


def test_a_prepared_data_set_too_small_for_the_curriculum_is_refused(data_root):
    """The fixture corpus under curriculum=qwen3 (30T General tokens): named before any allocation, where the data
    root holds the prepared set; not prepared, nothing is said (the planner reads no corpus)."""
    from data.prepare import prepare

    over = ["model=qwen3_0_6b", "curriculum=qwen3", "data=fixture", "launch.nodes=1", "launch.gpus_per_node=8",
            f"data.root={data_root / 'plan'}"]
    plan(_cfg(*over))  # not prepared: the plan stands
    prepare(_cfg(*over).data)
    with pytest.raises(ConfigError, match=r"config key 'data' = 'fixture': .* stage 'general' needs 7324218368 "
                                          r"samples of 4096 tokens"):
        plan(_cfg(*over))


# ----------------------------------------------------------------------------------------------------------
# Model states vs DeepSpeed 0.19.8's estimators

PRESETS = ["qwen3_0_6b", "qwen3_8b", "qwen3_32b", "qwen3_30b_a3b", "qwen3_235b_a22b"]
CLUSTERS = [(1, 8), (4, 8), (32, 8)]  # (nodes, GPUs per node)


def _ds_gpu_bytes(p: ParamSplit, zero: int, nodes: int, gpn: int, offload_opt: bool, offload_param: bool) -> int:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if zero == 2:
        return estimate_zero2_model_states_mem_needs(p.total, gpn, nodes, cpu_offload=offload_opt)[1]
    return estimate_zero3_model_states_mem_needs(p.total, p.largest_module, gpn, nodes, cpu_offload=offload_opt,
                                                 cpu_offload_params=offload_param)[1]


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("nodes,gpn", CLUSTERS)
@pytest.mark.parametrize("zero,offload_opt,offload_param", [(2, False, False), (2, True, False),
                                                           (3, True, False), (3, True, True)])
def test_model_states_agree_with_deepspeed_estimators(name, nodes, gpn, zero, offload_opt, offload_param):
    p = split_parameters(load_preset(name))
    ours = model_states(p, zero, nodes * gpn, 1, offload_opt, offload_param).total
    theirs = _ds_gpu_bytes(p, zero, nodes, gpn, offload_opt, offload_param)
    assert abs(ours - theirs) <= 0.05 * theirs, (ours / GIB, theirs / GIB)


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("nodes,gpn", CLUSTERS)
def test_zero3_without_offload_adds_the_bf16_gradient_partition_to_the_estimate(name, nodes, gpn):
    """The one documented difference: DeepSpeed's ZeRO-3 estimate charges 18 B/param/N; stage3.py allocates a
    bf16 gradient partition (2), bf16 parameters (2), fp32 master (4), Adam moments (8) and, during the step,
    an fp32 gradient copy of at most sub_group_size (1e9) elements (4) per rank."""
    p = split_parameters(load_preset(name))
    n = nodes * gpn
    ours = model_states(p, 3, n).total
    theirs = _ds_gpu_bytes(p, 3, nodes, gpn, False, False)
    shard = p.total / n
    expected = theirs + 2 * shard - 4 * max(0.0, shard - 1e9)  # + bf16 grads, - the sub-group cap
    assert ours == pytest.approx(expected, rel=1e-6, abs=64)
    assert abs(ours - theirs) <= 0.12 * theirs


def test_the_printing_estimators_print_the_numbers_compared_above():
    """The `_all_cold` functions the DeepSpeed docs point to print exactly what the inner estimators return."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

    p = split_parameters(load_preset("qwen3_8b"))
    out = io.StringIO()
    with redirect_stdout(out):
        estimate_zero2_model_states_mem_needs_all_cold(p.total, num_gpus_per_node=8, num_nodes=4)
        estimate_zero3_model_states_mem_needs_all_cold(p.total, p.largest_module, num_gpus_per_node=8, num_nodes=4)
    text = out.getvalue().replace("OffloadDeviceEnum.cpu", "cpu")
    rows = {" ".join(opts.split()): float(gpu) for gpu, opts in re.findall(r"\|\s*([\d.]+)GB \|(.*)", text)}
    expected = {  # printed option row -> (ZeRO stage, offload_optimizer, offload_param)
        "offload_optimizer=none": (2, False, False),
        "offload_optimizer=cpu": (2, True, False),
        "offload_param=none, offload_optimizer=cpu, zero_init=1": (3, True, False),
        "offload_param=cpu, offload_optimizer=cpu, zero_init=1": (3, True, True),
    }
    for row, (zero, opt, par) in expected.items():
        assert rows[row] == pytest.approx(model_states(p, zero, 32, 1, opt, par).total / GIB, abs=0.01), row


@pytest.mark.parametrize("name", ["tiny_dense", "tiny_moe"])
def test_parameter_split_matches_deepspeed_model_to_params_on_a_real_model(name):
    """DeepSpeed's `_all_live` estimators walk the module with model_to_params(): same total, same largest layer."""
    from deepspeed.runtime.zero.stage3 import model_to_params

    cfg = load_preset(name)
    total, largest = model_to_params(Qwen3ForCausalLM(cfg))  # real storage: tied weights counted once
    p = split_parameters(cfg)
    assert (p.total, p.largest_module) == (total, largest)


@pytest.mark.parametrize("name,ep", [("qwen3_8b", 1), ("qwen3_32b", 1), ("qwen3_30b_a3b", 1), ("qwen3_30b_a3b", 8),
                                     ("qwen3_235b_a22b", 1), ("qwen3_235b_a22b", 8)])
def test_largest_module_matches_deepspeed_on_meta_models(name, ep):
    """ZeRO-3's working set is 4 x the largest module; with EP a rank's expert module holds E / EP experts."""
    from deepspeed.runtime.zero.stage3 import model_to_params

    cfg = load_preset(name)
    local = dataclasses.replace(cfg, num_experts=cfg.num_experts // ep) if ep > 1 else cfg
    with torch.device("meta"):
        model = Qwen3ForCausalLM(local)
    assert model_to_params(model)[1] == split_parameters(cfg, ep).largest_module


def test_expert_parallel_states_by_hand():
    """Qwen3-235B-A22B, 256 GPUs, EP 8: experts are 1/8 per rank and ZeRO-sharded over 32 expert-data ranks."""
    p = split_parameters(load_preset("qwen3_235b_a22b"), 8)
    e = 94 * 128 * 3 * 4096 * 1536  # layers x experts x (gate, up, down) x d x expert ffn
    assert p.expert == e and p.dense == count_parameters(load_preset("qwen3_235b_a22b")).total - e
    z2 = model_states(p, 2, 256, 8)
    assert z2.params == 2 * (p.dense + e // 8)  # bf16 copy replicated over data parallelism
    assert z2.grads == pytest.approx(2 * (p.dense / 256 + e / 8 / 32), abs=1)
    assert z2.optimizer == pytest.approx(12 * (p.dense + e) / 256, abs=2)
    z3 = model_states(p, 3, 256, 8)
    assert z3.params == pytest.approx(2 * p.total / 256, abs=2)  # ZeRO-3: EP does not change the per-GPU share
    assert z3.gathered == 4 * 151936 * 4096  # the embedding is now the largest module, not 16 local experts
    assert z3.step_grads == pytest.approx(4 * e / 8 / 32, abs=1)  # the larger of the two sub-groups


# ----------------------------------------------------------------------------------------------------------
# Activations


def test_activation_figure_by_hand_for_tiny_dense():
    """tiny_dense (h 128, 4 / 2 heads of 32, ffn 384, 4 layers, vocab 8192), micro-batch 2 x 256, bf16, GPU."""
    m = load_preset("tiny_dense")
    h, q, kv, H, KV, f, V, L = 128, 128, 64, 4, 2, 384, 8192, 4
    block = (2 * (2 * h + 4)  # two fused RMSNorms: bf16 input, fp32 rstd
             + 2 * h  # q/k/v projections' input
             + (2 * q + 4 * H) + (2 * kv + 4 * KV)  # QK-Norm, per head
             + (2 * q + 2 * kv + 2 * kv + 2 * q + 4 * H)  # SDPA: q, k, v, out, fp32 logsumexp
             + 2 * q  # o_proj input
             + 2 * h + 4 * 2 * f)  # MLP input; gate, silu(gate), up, product
    assert block == 5552 == block_activation_bytes_per_token(m)
    n = 2 * 256
    outside = (2 * h + 4) * n + 8 * n + 2 * 256 * 32 + 2 * h * n + 2 * V * h  # norm, ids, RoPE, fused loss
    act = activation_memory(m, 2, 256, checkpointing=False)
    assert act.saved == L * block * n + outside == 13_752_320
    act_ckpt = activation_memory(m, 2, 256, checkpointing=True)
    assert act_ckpt.saved == L * 2 * h * n + outside == 2_906_112
    # temporaries: the fused loss's fp32 dW accumulator + one 512-token chunk of logits in fp32 and bf16
    assert act.temporaries == max(4 * V * h + 6 * 512 * V + 4 * n, 2 * h * n + 2 * V * h + block * n)


def _saved_bytes(name: str, b: int, t: int, checkpointing: bool) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in a bf16 training forward of the real model."""
    cfg = dataclasses.replace(load_preset(name), activation_checkpointing=checkpointing)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg)
    model.init_weights(0)
    model.to(torch.bfloat16).train()
    own = {p.untyped_storage().data_ptr() for p in model.parameters()}
    own |= {buf.untyped_storage().data_ptr() for buf in model.buffers()}
    seen = {}

    def pack(x: torch.Tensor) -> torch.Tensor:
        storage = x.untyped_storage()
        if storage.data_ptr() not in own:  # views of one storage count once
            seen[storage.data_ptr()] = storage.nbytes()
        return x

    ids = torch.randint(0, cfg.vocab_size, (b, t))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        model(ids, labels=ids)
    return sum(seen.values())


@pytest.mark.parametrize("name", ["tiny_dense", "tiny_moe"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_formula_matches_what_the_model_saves(name, checkpointing):
    """The formula is the model's: counted from the tensors autograd keeps on the CPU, where SDPA runs a flash
    kernel too (no T^2 term) but RMSNorm is torch's composite (fp32 copies) rather than CUDA's fused kernel."""
    measured = _saved_bytes(name, 2, 256, checkpointing)
    predicted = activation_memory(load_preset(name), 2, 256, checkpointing, fused_rms_norm=False).saved
    # tiny_moe: the stacked (layers, experts) router means (128 bytes) are not modelled
    assert measured == pytest.approx(predicted, rel=1e-4)


# ----------------------------------------------------------------------------------------------------------
# Plans


def test_plan_time_and_tokens_for_qwen3_8b():
    c = _cfg("model=qwen3_8b", "curriculum=qwen3", "deepspeed=zero2", "model.activation_checkpointing=true",
             "launch.nodes=4", "launch.gpus_per_node=8", "launch.mfu=0.5", "launch.peak_tflops=1000")
    p = plan(c)
    general = p.stages[0]
    assert general.tokens_per_step == 4_194_304 and general.grad_accum == 1024 // (4 * 32)
    assert general.steps == 30_000_000_000_000 // 4_194_304
    fpt = flops_per_token(c.model, 4096, causal_halved=True)  # the planner counts attention halved
    assert general.seconds == pytest.approx(general.steps * 4_194_304 * fpt / (32 * 1000e12 * 0.5))
    # rough cross-check: 6 N flops per token for 30T tokens at 16 PFLOP/s is ~2.2 years
    assert general.seconds / 86400 == pytest.approx(6 * 8.19e9 * 30e12 / 16e15 / 86400, rel=0.2)
    # ZeRO-2 sums the gradients in fp32 (auto): a 4-byte partition the step reads in place, where DeepSpeed's
    # estimator counts a 2-byte bf16 one and the step's 4-byte fp32 copy of it; summed in bf16, the same accounting
    assert p.grad_accum == "fp32" and p.states.step_grads == 0
    assert p.deepspeed_estimate - p.states.total == 2 * p.params.total // 32
    bf16 = plan(_cfg("model=qwen3_8b", "curriculum=qwen3", "deepspeed=zero2", "model.activation_checkpointing=true",
                     "launch.nodes=4", "launch.gpus_per_node=8", "deepspeed.grad_accum_dtype=bf16"))
    assert bf16.deepspeed_estimate == bf16.states.total
    assert p.fits and p.stages[2].seq_len == 32768


@pytest.mark.parametrize("zero", [2, 3])
def test_communication_buckets_are_in_every_peak(zero):
    """Two bf16 gradient-reduction buckets of reduce_bucket_size elements (DeepSpeed's double buffer under
    overlap_comm) and, at ZeRO-3, the bf16 parameter prefetch bucket, plus the 2 GiB reserve: in `buffers` and in
    each stage's peak, which moves by exactly that when the bucket sizes change (other sizes than the defaults, so
    neither term hides behind the other)."""
    base = ["model=qwen3_8b", "curriculum=qwen3", f"deepspeed=zero{zero}", "model.activation_checkpointing=true",
            "launch.nodes=4", "launch.gpus_per_node=8"]
    small = plan(_cfg(*base, "deepspeed.reduce_bucket_size=10000000", "deepspeed.stage3_prefetch_bucket_size=0"))
    big = plan(_cfg(*base, "deepspeed.reduce_bucket_size=300000000",
                    "deepspeed.stage3_prefetch_bucket_size=70000000"))
    prefetch = 2 * 70_000_000 if zero == 3 else 0  # ZeRO-2 has no parameter prefetch
    assert big.buffers == 2 * 2 * 300_000_000 + prefetch + 2 * GIB
    assert [b.peak - s.peak for b, s in zip(big.stages, small.stages)] == [2 * 2 * 290_000_000 + prefetch] * 3


def test_peak_is_the_worse_of_backward_and_optimizer_step():
    p = plan(_cfg("model=qwen3_8b", "curriculum=qwen3", "deepspeed=zero3", "model.activation_checkpointing=true",
                  "launch.nodes=4", "launch.gpus_per_node=8"))
    s, st = p.stages[0], p.states
    fwd_bwd = st.params + st.grads + st.optimizer + st.gathered + s.activations.saved + s.activations.temporaries
    assert s.peak == max(fwd_bwd, st.params + st.grads + st.optimizer + st.step_grads) + p.buffers
    assert p.stages[2].peak > s.peak  # 32K tokens keep more than 4 x 4K with checkpointing


def test_does_not_fit_names_what_to_change():
    c = _cfg("model=qwen3_8b", "curriculum=qwen3", "deepspeed=zero3", "launch.nodes=4", "launch.gpus_per_node=8")
    p = plan(c)
    assert not p.fits and not any(s.fits for s in p.stages)
    assert p.suggestions[0].startswith("model.activation_checkpointing=true")
    assert not p.suggestions_combined
    text = format_plan(p)
    assert "does not fit" in text and "model.activation_checkpointing=true" in text
    assert plan(_cfg("model=qwen3_8b", "curriculum=qwen3", "deepspeed=zero3", "model.activation_checkpointing=true",
                     "launch.nodes=4", "launch.gpus_per_node=8")).fits


def test_combined_suggestion_when_no_single_change_fits():
    p = plan(_cfg("model=qwen3_32b", "curriculum=qwen3", "deepspeed=zero0", "launch.nodes=1", "launch.gpus_per_node=1"))
    assert not p.fits and p.suggestions_combined
    assert "deepspeed.zero_stage=3" in p.suggestions and "deepspeed.offload_optimizer=true" in p.suggestions
    fixed = _cfg("model=qwen3_32b", "curriculum=qwen3", "deepspeed=zero0", "launch.nodes=1", "launch.gpus_per_node=1",
                 *p.suggestions)
    assert plan(fixed).fits


@pytest.mark.parametrize("base", [
    ["model=qwen3_235b_a22b", "deepspeed=zero2", "expert_parallel_size=8", "launch.nodes=4", "launch.gpus_per_node=8",
     "model.activation_checkpointing=true"],
    ["model=qwen3_32b", "deepspeed=zero1", "launch.nodes=1", "launch.gpus_per_node=8"]])
def test_a_combined_suggestion_holds_no_change_the_others_make_unneeded(base):
    """Every change that lowered the excess stayed in, so both of these were told to train at micro-batch 1 too
    (a throughput cost the time column, at a fixed MFU, does not show), which the rest already made fit."""
    p = plan(_cfg("curriculum=qwen3", *base))
    assert not p.fits and p.suggestions_combined
    assert not [s for s in p.suggestions if "micro_batch_size" in s], p.suggestions
    assert plan(_cfg("curriculum=qwen3", *base, *p.suggestions)).fits
    for dropped in p.suggestions:
        assert not plan(_cfg("curriculum=qwen3", *base, *[s for s in p.suggestions if s != dropped])).fits, dropped


def test_combined_suggestion_adds_nodes_when_changes_alone_cannot_fit():
    """235B-A22B on one node of 8 GPUs: no change nor set of changes fits there; the fewest doubled node count at
    which the strongest changes together fit is named with them (the search stopped at 'no fitting overrides')."""
    base = ["model=qwen3_235b_a22b", "curriculum=qwen3", "deepspeed=zero0", "launch.nodes=1", "launch.gpus_per_node=8"]
    p = plan(_cfg(*base))
    assert not p.fits and p.suggestions_combined
    nodes = [s for s in p.suggestions if s.startswith("launch.nodes=")]
    assert len(nodes) == 1 and "deepspeed.zero_stage=3" in p.suggestions
    assert plan(_cfg(*base, *p.suggestions)).fits
    n = int(nodes[0].split("=")[1])
    assert n > 1 and not plan(_cfg(*base, *p.suggestions, f"launch.nodes={n // 2}")).fits  # the fewest
    assert "launch.nodes=" in format_plan(p)


def test_offload_needs_cpu_memory():
    p = plan(_cfg("model=qwen3_32b", "curriculum=qwen3", "deepspeed=zero3_offload", "launch.nodes=1",
                  "launch.gpus_per_node=8", "launch.cpu_memory_gb=256", "model.activation_checkpointing=true"))
    assert p.states.optimizer == 0 and p.states.params == 0
    assert p.cpu_needed_per_node == pytest.approx(18 * p.params.total, rel=1e-6)  # fp32 x 4 + bf16 params, / 8 x 8
    assert not p.cpu_fits and not p.fits
    assert "launch.cpu_memory_gb" in format_plan(p)


@pytest.mark.parametrize("overrides,message", [
    (["launch.nodes=0"], "config key 'launch.nodes' = 0: must be a positive finite number"),
    (["launch.gpus_per_node=-8"], "config key 'launch.gpus_per_node' = -8: must be a positive finite number"),
    (["launch.gpu_memory_gb=0"], "config key 'launch.gpu_memory_gb' = 0.0: must be a positive finite number"),
    (["launch.peak_tflops=-1"], "config key 'launch.peak_tflops' = -1.0: must be a positive finite number"),
    # infinite values were an OverflowError traceback (memory) or a "0.0 min" plan (peak)
    (["launch.gpu_memory_gb=inf"], "config key 'launch.gpu_memory_gb' = inf: must be a positive finite number"),
    (["launch.peak_tflops=inf"], "config key 'launch.peak_tflops' = inf: must be a positive finite number"),
    (["launch.mfu=1.5"], "config key 'launch.mfu' = 1.5: must lie in (0, 1]"),
    (["model=qwen3_235b_a22b", "expert_parallel_size=3"],
     "config key 'expert_parallel_size' = 3: must divide the world size 8"),
    (["model=tiny_moe", "expert_parallel_size=16", "launch.nodes=2"],
     "config key 'expert_parallel_size' = 16: must divide model.num_experts=8"),
    (["model=qwen3_8b", "expert_parallel_size=2"], "config key 'expert_parallel_size' = 2: model 'qwen3_8b' is dense"),
    (["deepspeed.precision=fp32"], "config key 'deepspeed.precision' = 'fp32'"),
    (["launch.nodes=32", "curriculum=qwen3", "model=qwen3_8b"],
     "config key 'curriculum.stages.long_context.global_batch_tokens' = 4194304: one pass over 256 ranks takes "
     "seq_len x micro_batch_size x ranks = 32768 x 1 x 256 = 8,388,608 tokens"),
])
def test_bad_cluster_input_names_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        plan(_cfg("launch.gpus_per_node=8", *overrides))
    assert message in str(err.value)


# ----------------------------------------------------------------------------------------------------------
# CLI


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RANK")}
    return subprocess.run([sys.executable, "-m", "launch.plan", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_fits_exit_0_and_writes_nothing(tmp_path):
    r = _cli(tmp_path, "model=qwen3_235b_a22b", "curriculum=qwen3", "deepspeed=zero2_offload",
             "expert_parallel_size=32", "model.activation_checkpointing=true", "launch.nodes=32",
             "launch.gpus_per_node=8", "launch.gpu_memory_gb=80",
             "curriculum.stages.long_context.global_batch_tokens=8388608")
    assert r.returncode == 0, r.stderr
    assert "256 GPUs" in r.stdout and "expert parallel 32" in r.stdout and r.stdout.rstrip().endswith("fits.")
    assert re.search(r"^long_context\s+32768\s+1\s+1\s", r.stdout, re.M)
    assert "DeepSpeed estimate_zero2_model_states_mem_needs" in r.stdout
    assert list(tmp_path.iterdir()) == []  # no run directory, no .hydra


def test_cli_drops_a_secret_unread(tmp_path):
    """Hydra quoted a secret override it could not parse ("Ambiguous value for argument ...") into the job log."""
    r = _cli(tmp_path, "logging.wandb.api_key=SEC,RET42")
    assert r.returncode == 0, r.stderr
    assert "RET42" not in r.stdout + r.stderr


def test_cli_refuses_zero3_with_expert_parallelism(tmp_path):
    r = _cli(tmp_path, "model=qwen3_235b_a22b", "deepspeed=zero3", "expert_parallel_size=8", "launch.nodes=32",
             "launch.gpus_per_node=8")
    assert r.returncode == 2
    assert "config key 'expert_parallel_size' = 8: needs deepspeed=zero1 or deepspeed=zero2" in r.stderr


def test_cli_does_not_fit_exit_1(tmp_path):
    r = _cli(tmp_path, "model=qwen3_8b", "curriculum=qwen3", "deepspeed=zero3", "launch.nodes=4",
             "launch.gpus_per_node=8")
    assert r.returncode == 1, r.stderr
    assert "does not fit" in r.stdout and "model.activation_checkpointing=true" in r.stdout


def test_cli_bad_input_exit_2(tmp_path):
    r = _cli(tmp_path, "model=qwen3_235b_a22b", "expert_parallel_size=3", "launch.gpus_per_node=8")
    assert r.returncode == 2
    assert "config key 'expert_parallel_size' = 3: must divide the world size 8" in r.stderr


def _scaling_section() -> str:
    """The README's 'Scaling out' section."""
    readme = (ROOT / "README.md").read_text()
    return readme[readme.index("## Scaling out"):]


def test_scaling_table_is_the_planners_output():
    """The documented table is regenerated here, so a change to the model, the recipe or the planner shows up."""
    rows = re.findall(r"^\| (qwen3_\w+) \| (\d+) x 8 \| ZeRO-(\d( offload)?)(?:, EP (\d+))? \|(.*)\|$",
                      _scaling_section(), re.M)
    assert [r[0] for r in rows] == ["qwen3_0_6b", "qwen3_1_7b", "qwen3_4b", "qwen3_8b", "qwen3_14b", "qwen3_32b",
                                    "qwen3_30b_a3b", "qwen3_235b_a22b"]
    for name, nodes, zero, _, ep, rest in rows:
        overrides = [f"model={name}", "curriculum=qwen3", f"deepspeed=zero{zero.replace(' ', '_')}", "model.activation_checkpointing=true",
                     f"launch.nodes={nodes}", "launch.gpus_per_node=8", "launch.gpu_memory_gb=80"]
        if ep:
            overrides.append(f"expert_parallel_size={ep}")
        if int(nodes) * 8 > 128:  # 32K x 1 x GPUs exceeds the recipe's 4M-token batch
            overrides.append("curriculum.stages.long_context.global_batch_tokens=8388608")
        p = plan(_cfg(*overrides))
        assert p.fits, name
        g, r, lc = p.stages
        ds = f"{p.deepspeed_estimate / GIB:.1f}" if p.deepspeed_estimate is not None else "–"
        expected = [f"{p.params.total / 1e9:.2f} / {p.params.active / 1e9:.2f}", f"{p.states.total / GIB:.1f} ({ds})",
                    f"{g.peak / GIB:.1f}", f"{lc.peak / GIB:.1f}", f"{g.seconds / 86400:,.0f}",
                    f"{r.seconds / 86400:,.0f}", f"{lc.seconds / 86400:,.1f}"]
        assert [c.strip() for c in rest.split("|")] == expected, name
