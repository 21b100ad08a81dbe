"""Config errors fail at start, before any process group, naming the key; sweeps and overrides work."""
from __future__ import annotations

import re

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from trainutil import ROOT, SMOKE, records, run_train
from train.config import ConfigError, TrainConfig, check_known_keys, register_configs, validate


def compose_cfg(overrides):
    """The config `python -m train <overrides>` would run, as the typed object."""
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        dcfg = compose(config_name="config", overrides=list(overrides))
    return OmegaConf.to_object(dcfg)


def test_default_config_is_the_cpu_demo():
    cfg = compose_cfg([])
    assert isinstance(cfg, TrainConfig)
    assert cfg.model.name == "tiny_dense" and cfg.data.name == "demo"
    assert cfg.curriculum.order == ["general", "reasoning", "long_context"]
    plans = validate(cfg, world_size=1)
    stages = cfg.curriculum.stages
    assert [p.seq_len for p in plans] == [256, 256, 1024]
    assert stages["general"].rope_theta == 10_000 and stages["long_context"].rope_theta == 1_000_000
    assert stages["reasoning"].lr.decay_frac == 1.0 and stages["general"].lr.decay_frac == 0.0


def test_qwen3_recipe_numbers():
    cfg = compose_cfg(["model=qwen3_0_6b", "curriculum=qwen3", "data=demo"])
    plans = validate(cfg, world_size=64)
    assert [p.seq_len for p in plans] == [4096, 4096, 32768]
    assert plans[0].samples_per_step == 4_194_304 // 4096
    assert plans[0].grad_accum == 1024 // (4 * 64)


def test_rope_scaling_is_set_from_the_command_line():
    """`model.rope_scaling={...}` was a 40-line OmegaConf traceback (a merge into the preset's `null`); a preset's
    empty mapping reads as no scaling."""
    cfg = compose_cfg(["model.rope_scaling={rope_type: yarn, factor: 4.0}"])
    validate(cfg, world_size=1)
    assert cfg.model.rope_scaling["rope_type"] == "yarn" and cfg.model.rope_scaling["factor"] == 4.0
    assert cfg.model.rope_scaling["original_max_position_embeddings"] == cfg.model.max_position_embeddings
    for model in ("tiny_dense", "qwen3_30b_a3b"):
        cfg = compose_cfg([f"model={model}"])
        validate(cfg, world_size=1)
        assert cfg.model.rope_scaling is None
    with pytest.raises(ConfigError, match="rope_scaling: only rope_type 'yarn' is supported"):
        validate(compose_cfg(["+model.rope_scaling.factor=4.0"]), world_size=1)


def test_any_key_overrides():
    cfg = compose_cfg(["curriculum.stages.reasoning.lr.peak=1e-3", "deepspeed=zero3", "model.num_hidden_layers=2"])
    assert cfg.curriculum.stages["reasoning"].lr.peak == 1e-3
    assert cfg.deepspeed.zero_stage == 3 and cfg.model.num_hidden_layers == 2


@pytest.mark.parametrize("overrides, world, key", [
    (["curriculum.stages.general.global_batch_tokens=16000"], 1, "curriculum.stages.general.global_batch_tokens"),
    (["curriculum.stages.general.global_batch_tokens=16384"], 3, "curriculum.stages.general.global_batch_tokens"),
    (["curriculum.stages.general.global_batch_tokens=16384"], 8, "curriculum.stages.general.micro_batch_size=8 "
                                                                 "divides it"),  # 64 sequences, micro-batch 16
    (["model=tiny_moe", "expert_parallel_size=3"], 3, "expert_parallel_size"),
    (["model=tiny_moe", "expert_parallel_size=2"], 3, "expert_parallel_size"),
    (["expert_parallel_size=2"], 2, "expert_parallel_size"),  # the demo model is dense
    (["curriculum.stages.long_context.seq_len=2048"], 1, "curriculum.stages.long_context.seq_len"),
    (["curriculum.stages.general.seq_len=16384"], 1, "curriculum.stages.general.seq_len"),
    (["curriculum.order=[general,foo]"], 1, "curriculum.order"),
    (["curriculum.start=foo"], 1, "curriculum.start"),
    (["+curriculum.stages.general.mixture.weights.wiki=0.5"], 1, "curriculum.stages.general.mixture.weights.wiki"),
    (["curriculum.stages.general.tokens=100"], 1, "curriculum.stages.general.tokens"),
    # 0 was a ZeroDivisionError traceback (exit 1); a negative one was blamed on `tokens`
    (["curriculum.stages.general.global_batch_tokens=0"], 1, "'curriculum.stages.general.global_batch_tokens' = 0"),
    (["curriculum.stages.general.global_batch_tokens=-16384"], 1,
     "'curriculum.stages.general.global_batch_tokens' = -16384: must be positive"),
    # NaN and inf passed (`<= 0` is false for NaN) and trained on NaN RoPE tables; a base in (0, 1] passed here
    # while models.config refuses it for model.rope_theta (and the export's config.json would not load)
    (["curriculum.stages.long_context.rope_theta=nan"], 1, "'curriculum.stages.long_context.rope_theta' = nan"),
    (["curriculum.stages.general.rope_theta=inf"], 1, "'curriculum.stages.general.rope_theta' = inf"),
    (["curriculum.stages.general.rope_theta=0.5"], 1, "'curriculum.stages.general.rope_theta' = 0.5"),
    (["model.rope_theta=nan", "curriculum.stages.general.rope_theta=null"], 1,  # the model's, before a stage inherits it
     "model: rope_theta must be a finite number > 1, got nan"),
    (["deepspeed.zero_stage=4"], 1, "deepspeed.zero_stage"),
    (["deepspeed.offload_param=true"], 1, "deepspeed.offload_param"),
    (["+deepspeed.extra._target_=os.system"], 1, "deepspeed.extra._target_"),
    (["model.num_key_value_heads=3"], 1, "num_key_value_heads"),
    (["data.index_workers=0"], 1, "data.index_workers"),
    (["data.mixtures.general.udhr=-1"], 1, "config key 'data.mixtures.general.udhr' = -1"),
    (["+curriculum.stages.general.mixture.weights.udhr=-1"], 1, "curriculum.stages.general.mixture.weights.udhr"),
    (["~data.mixtures.general", "+data.mixtures.generl={udhr: 1}"], 1,  # a typo'd stage left without weights
     "data.mixtures.generl' = {'udhr': 1}: names no stage of curriculum.stages ['general', 'long_context', "
     "'reasoning'], and stage(s) ['general'] have no weights"),
    (["data.mixtures.general.udhr=lots"], 1, "data.mixtures.general.udhr' = 'lots': must be a number"),
    (["data.mixtures.general=0.5"], 1, "data.mixtures.general' = 0.5: must map source names"),
    (["+data.sources.x={kind: local, langauges: [eng]}"], 1, "data.sources.x: Key 'langauges'"),
    (["logging.profile.start_step=-1"], 1, "logging.profile.start_step' = -1"),
    (["logging.profile.num_steps=0"], 1, "logging.profile.num_steps' = 0"),
    (["logging.expert_load_every=-1"], 1, "logging.expert_load_every' = -1"),
    (["curriculum.stages.reasoning.lr.final=1.0"], 1, "curriculum.stages.reasoning.lr.final' = 1.0"),  # LR rose
    (["curriculum.stages.general.lr.peak=-0.003"], 1, "curriculum.stages.general.lr.peak' = -0.003"),  # ascent
    (["curriculum.stages.general.lr.warmup_start=-1"], 1, "curriculum.stages.general.lr.warmup_start"),
    (["curriculum.stages.general.checkpoint_every=-1"], 1, "curriculum.stages.general.checkpoint_every"),
    (["optim.weight_decay=-0.1"], 1, "optim.weight_decay' = -0.1"),
    (["optim.betas=[0.9,1.5]"], 1, "optim.betas' = [0.9, 1.5]"),
    (["optim.betas=[0.9]"], 1, "optim.betas' = [0.9]"),
    (["optim.eps=-1"], 1, "optim.eps"),
    (["deepspeed.grad_clip=-1"], 1, "deepspeed.grad_clip' = -1.0"),
    (["logging.log_every=0"], 1, "logging.log_every' = 0"),
    (["eval.batch_size=0"], 1, "config key 'eval.batch_size' = 0"),  # a traceback once General had trained
    (["eval.max_tokens_per_language=0"], 1, "config key 'eval.max_tokens_per_language' = 0"),
    (["eval.max_languages=-1"], 1, "config key 'eval.max_languages' = -1"),
    # accepted before, and first read later: by the stage-end suite after a stage, by DeepSpeed, by the MFU figure
    (["eval.suite_problems=0"], 1, "config key 'eval.suite_problems' = 0"),
    (["eval.suite_max_new_tokens=0"], 1, "config key 'eval.suite_max_new_tokens' = 0"),
    (["eval.suite_trials=0"], 1, "config key 'eval.suite_trials' = 0"),
    (["logging.peak_tflops=nan"], 1, "config key 'logging.peak_tflops' = nan"),
    (["logging.peak_tflops=-1"], 1, "config key 'logging.peak_tflops' = -1.0"),
    (["deepspeed.reduce_bucket_size=0"], 1, "config key 'deepspeed.reduce_bucket_size' = 0"),
    (["max_steps=-1"], 1, "config key 'max_steps' = -1"),  # it stopped the launch after one step, exit 0
    # checks a hand mutation found untested (removing any left the suite green)
    (["deepspeed.offload_optimizer=true", "deepspeed.zero_stage=0"], 1, "config key 'deepspeed.offload_optimizer'"),
    (["faults.spike_action=rollbak"], 1, "config key 'faults.spike_action'"),
    (["checkpoint.keep=0"], 1, "config key 'checkpoint.keep'"),
    (["dist.timeout_s=0"], 1, "config key 'dist.timeout_s'"),
    # beats come every 5 s: below three of them a busy host would be taken for a dead rank
    (["dist.heartbeat_timeout_s=10"], 1, "config key 'dist.heartbeat_timeout_s' = 10"),
    (["dist.heartbeat_timeout_s=-1"], 1, "config key 'dist.heartbeat_timeout_s' = -1"),
    (["faults.max_consecutive_skips=-1"], 1, "config key 'faults.max_consecutive_skips'"),
    (["device=tpu"], 1, "config key 'device'"),
    (["threads=-1"], 1, "config key 'threads' = -1"),  # "set_num_threads expects a positive integer", exit 1
    # a run in the working directory (exit 0); numpy's "expected non-negative integer" and torch's overflow later
    (["run_dir="], 1, "config key 'run_dir' = '': must name a directory"),
    # written into the exports' config.json and generation_config.json as they were
    # before the run: named by data.prepare, after config.yaml and the lock were written
    (["data.tokenizer.alpha=nan"], 1, "config key 'data.tokenizer.alpha' = nan"),
    (["data.shard_tokens=0"], 1, "config key 'data.shard_tokens' = 0"),
    (["model.eos_token_id=99999"], 1, "eos_token_id must be a token id in [0, vocab_size=8192), got 99999"),
    (["model.bos_token_id=-1"], 1, "bos_token_id must be a token id in [0, vocab_size=8192), got -1"),
    (["seed=-1"], 1, "config key 'seed' = -1: must lie in [0, 2**63)"),
    (["seed=99999999999999999999"], 1, "config key 'seed' = 99999999999999999999"),
    (["deepspeed=zero3", "deepspeed.stage3_prefetch_bucket_size=-5"], 1,  # pydantic's traceback in DeepSpeed
     "config key 'deepspeed.stage3_prefetch_bucket_size' = -5"),
    # the spike detector: a window shorter than the history it needs (or a NaN factor) never judged, silently off
    (["faults.spike_factor=3", "faults.spike_window=5"], 1, "config key 'faults.spike_window' = 5: must be >= "
                                                            "faults.spike_min_history=10"),
    (["faults.spike_factor=nan"], 1, "config key 'faults.spike_factor' = nan"),
    (["faults.spike_factor=-2"], 1, "config key 'faults.spike_factor' = -2.0"),
    (["faults.spike_min_history=0"], 1, "config key 'faults.spike_min_history' = 0"),  # median of no losses
    (["faults.spike_skip_before=-1"], 1, "config key 'faults.spike_skip_before' = -1"),
    (["faults.max_rollbacks=-1"], 1, "config key 'faults.max_rollbacks' = -1"),
    (["dist.backend=mpi"], 1, "config key 'dist.backend'"),
    (["logging.wandb.mode=on"], 1, "config key 'logging.wandb.mode'"),
    (["optim.fused=yes"], 1, "config key 'optim.fused'"),
    (["deepspeed.precision=fp16"], 1, "config key 'deepspeed.precision'"),
    (["deepspeed.grad_accum_dtype=fp16"], 1, "config key 'deepspeed.grad_accum_dtype' = 'fp16'"),
    # otherwise DeepSpeed's own refusal ("unsupported mix"), a traceback at the engine's start
    (["deepspeed=zero0", "deepspeed.precision=bf16", "deepspeed.grad_accum_dtype=fp32"], 1,
     "config key 'deepspeed.grad_accum_dtype' = 'fp32': needs deepspeed.zero_stage >= 1"),
])
def test_inconsistent_values_name_the_key(overrides, world, key):
    cfg = compose_cfg(overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=world)
    assert key in str(err.value)


@pytest.mark.parametrize("overrides, keys", [
    (["+model.num_layers=2"], "'model.num_layers'"),
    (["+optim.lr=1e-3", "+seeed=1"], "keys 'optim.lr', 'seeed'"),
    (["+deepspeed.zero_stag=2"], "'deepspeed.zero_stag'"),
    (["+curriculum.stages.general.tokenz=5"], "'curriculum.stages.general.tokenz'"),
])
def test_an_added_key_that_is_no_setting_is_refused(overrides, keys):
    """`+key=value` composes any key and the typed config silently drops it (config.yaml kept it)."""
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        dcfg = compose(config_name="config", overrides=overrides)
    with pytest.raises(ConfigError, match="not a setting") as err:
        check_known_keys(OmegaConf.to_container(dcfg, resolve=True), OmegaConf.to_object(dcfg))
    assert keys in str(err.value)


def test_added_sources_and_free_form_keys_are_settings():
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        dcfg = compose(config_name="config", overrides=[
            "+data.sources.wiki={kind: local, options: {paths: [x.jsonl]}}",
            "+deepspeed.extra.wall_clock_breakdown=true",
            "+curriculum.stages.general.mixture.weights.wiki=0.1"])
    check_known_keys(OmegaConf.to_container(dcfg, resolve=True), OmegaConf.to_object(dcfg))


def test_own_data_config_brings_its_stage_weights_and_replacements_and_unused_entries_are_said(tmp_path, capsys,
                                                                                               monkeypatch):
    """A data config of one's own (in a --config-dir) names its sources and each stage's weights; nothing of the
    demo's mixture is merged in. A stage's own `mixture.weights` replaces the data config's for that stage."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.yaml").write_text(
        "name: mine\nsources:\n"
        "  en: {kind: local, options: {paths: [a.jsonl]}}\n  fr: {kind: local, options: {paths: [b.jsonl]}}\n"
        "mixtures:\n  general: {en: 7, fr: 3}\n  reasoning: {en: 1}\n  long_context: {fr: 1}\n")
    cfg = compose_cfg([f"hydra.searchpath=[file://{tmp_path}]", "data=mine"])
    assert sorted(cfg.data.sources) == ["en", "fr"]  # the group option replaces demo's sources, not merges
    validate(cfg, world_size=1)
    stages = cfg.curriculum.stages
    assert stages["general"].mixture.weights == {"en": 7, "fr": 3}
    assert stages["long_context"].mixture.weights == {"fr": 1}

    cfg = compose_cfg([f"hydra.searchpath=[file://{tmp_path}]", "data=mine",
                       "+curriculum.stages.reasoning.mixture.weights.fr=1", "data.mixtures.general.fr=1"])
    validate(cfg, world_size=1)
    assert cfg.curriculum.stages["reasoning"].mixture.weights == {"fr": 1}  # replaced, not merged with en
    assert cfg.curriculum.stages["general"].mixture.weights == {"en": 7, "fr": 1}  # one weight changed
    # said, since a stage weight in a YAML file merged into the stage preset's weights in earlier versions
    assert ("curriculum.stages.reasoning.mixture.weights {'fr': 1.0} replaces data.mixtures.reasoning (sources "
            "['en'] get no samples)") in capsys.readouterr().err
    monkeypatch.setenv("RANK", "1")  # once, by rank 0
    validate(compose_cfg([f"hydra.searchpath=[file://{tmp_path}]", "data=mine",
                          "+curriculum.stages.reasoning.mixture.weights.fr=1"]), world_size=1)
    assert capsys.readouterr().err == ""
    monkeypatch.delenv("RANK")
    # a curriculum of other stage names whose stages all have weights: the data config's others are unused
    validate(compose_cfg([f"hydra.searchpath=[file://{tmp_path}]", "data=mine", "curriculum.order=[general]",
                          "+data.mixtures.anneal={en: 1}"]), world_size=1)
    note = "data.mixtures has weights for ['anneal'], which are not stages of this curriculum"
    assert note in capsys.readouterr().err

    cfg = compose_cfg([f"hydra.searchpath=[file://{tmp_path}]", "data=mine", "+data.mixtures.general.udhr=1"])
    with pytest.raises(ConfigError, match=r"data.mixtures.general.udhr' = 1.0: names no source in data.sources"):
        validate(cfg, world_size=1)


def test_project_targets_are_allowed():
    cfg = compose_cfg(["+deepspeed.extra._target_=train.engine.Engine"])
    validate(cfg, world_size=1)


@pytest.mark.parametrize("override, needle", [
    ("curriculum.stages.general.seq_lenn=64", "seq_lenn"),  # unknown key
    ("seed=abc", "seed"),  # wrong type
    ("deepspeed=zero9", "zero9"),  # unknown group option
    ("+optim.lr=1e-3", "'optim.lr': not a setting"),  # added, but no setting: it was silently ignored
])
def test_cli_rejects_bad_keys_before_anything_starts(tmp_path, override, needle):
    run_dir = tmp_path / "run"
    proc = run_train([*SMOKE, f"run_dir={run_dir}", override], timeout=120)
    assert proc.returncode != 0
    assert needle in proc.stdout
    assert not run_dir.exists()  # nothing was written: it failed before the process group and the data


def test_a_secret_inside_a_dict_override_is_refused_unprinted(tmp_path):
    """`logging.wandb={mode: offline, api_key: ...}` went to Hydra whole (only a key ending in a secret word was taken
    out), and so stayed in sys.argv, which wandb wrote into the run's .wandb file with the command line."""
    from train.__main__ import take_secrets

    run_dir = tmp_path / "run"
    proc = run_train([*SMOKE, f"run_dir={run_dir}", "logging.wandb={mode: offline, api_key: SUPERSECRET42}"],
                     timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:]
    assert ("error: config key 'logging.wandb': its value holds the secret 'api_key', which would be recorded with "
            "the command line (wandb keeps it with the run): give it as an override of its own, "
            "logging.wandb.api_key=... or WANDB_API_KEY in the environment") in proc.stdout
    assert "SUPERSECRET42" not in proc.stdout and not run_dir.exists()
    with pytest.raises(ConfigError, match=r"own, data\.sources\.x\.options\.hf_token=\.\.\.$"):
        take_secrets(["train", "+data.sources.x={kind: hub, options: {dataset: d, hf_token: t}}"])
    plain = ["train", "+data.mixtures.anneal={udhr: 1, code: 1}", "curriculum.stages.general.mixture={max_epochs: 2}",
             "logging.wandb.api_key=k", "hydra.job.env_set={WANDB_API_KEY: k}"]
    assert take_secrets(plain) == ([*plain[:3], plain[4]], [plain[3]])


def test_a_hydra_secret_under_a_sweep_is_refused_before_hydra_writes_multirun_yaml(tmp_path):
    """Hydra's sweeper writes every override, `+hydra.job.env_set.WANDB_API_KEY=...` too, into multirun.yaml."""
    secret = "sweepsecret0123456789abcdef"
    proc = run_train([*SMOKE, "--multirun", f"hydra.sweep.dir={tmp_path / 'sweep'}", "seed=1,2",
                      f"+hydra.job.env_set.WANDB_API_KEY={secret}"], timeout=120)
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert "error: hydra.job.env_set.WANDB_API_KEY: a secret for Hydra under --multirun would be written" in proc.stdout
    assert secret not in proc.stdout and not (tmp_path / "sweep").exists()


def test_a_typod_secret_key_is_not_quoted_and_hydras_secrets_leave_the_recorded_command_line(tmp_path):
    """`logging.wandb.api_kye=...` (no setting, so no secret word) was quoted whole by Hydra's refusal ("To append to
    your config use +logging.wandb.api_kye=..."). A hydra.* secret is Hydra's to read and stays on the command line
    until the job starts; then it goes (the run itself: test_faults' wandb test)."""
    from train.__main__ import _hidden_hydra_secrets

    secret = "typosecret0123456789abcdef"
    for key in ("logging.wandb.api_kye", "logging.wandb.key", "+logging.wandb.apikey"):
        proc = run_train([*SMOKE, f"run_dir={tmp_path / 'run'}", f"{key}={secret}"], timeout=120)
        assert proc.returncode == 2, proc.stdout[-3000:]
        assert key.lstrip("+").split(".")[-1] in proc.stdout and secret not in proc.stdout, proc.stdout[-3000:]
        assert not (tmp_path / "run").exists()
    assert _hidden_hydra_secrets(["train", f"hydra.job.env_set={{WANDB_API_KEY: {secret}}}", "hydra.verbose=true",
                                  f"+hydra.job.env_set.MY_TOKEN={secret}", "logging.wandb.mode=offline"]) == [
        "train", "hydra.job.env_set=***", "hydra.verbose=true", "+hydra.job.env_set.MY_TOKEN=***",
        "logging.wandb.mode=offline"]


def test_wandb_that_cannot_start_online_exits_2_naming_the_way_out(data_root, tmp_path):
    """Online with no route to the server was wandb's CommError traceback, exit 1 (after 90 s, its init timeout)."""
    key = "k" * 40
    proc = run_train([*SMOKE, f"run_dir={tmp_path / 'run'}", "logging.wandb.mode=online"], timeout=120,
                     env={"WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_API_KEY": key, "WANDB_INIT_TIMEOUT": "5"})
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert ("error: config key 'logging.wandb.mode' = 'online': wandb could not start the run (CommError: "
            in proc.stdout), proc.stdout[-3000:]
    assert "logging.wandb.mode=offline and `wandb sync" in proc.stdout
    assert "Traceback" not in proc.stdout and key not in proc.stdout


def test_cli_inconsistent_value_exits_2_before_process_group(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train([*SMOKE, f"run_dir={run_dir}", "curriculum.stages.general.global_batch_tokens=1000"],
                     timeout=120, env={"WORLD_SIZE": "1"})
    assert proc.returncode == 2, proc.stdout
    assert "curriculum.stages.general.global_batch_tokens" in proc.stdout
    assert not run_dir.exists()


@pytest.mark.parametrize("override, key", [("seed=abc", "seed"),
                                           ("curriculum.stages.general.global_batch_tokens=1000",
                                            "curriculum.stages.general.global_batch_tokens")])
def test_a_refused_command_line_never_imports_torch(tmp_path, override, key):
    """The schema's and validate()'s refusals come before torch loads (its start-up was 4.5 of the 5.5 s such a
    refusal took): Python's import log of the refused launch names no torch module."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "train", *SMOKE, f"run_dir={tmp_path}/run",
                           override], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and key in proc.stderr, proc.stderr[-2000:]
    imported = re.findall(r"^import time:.*\|\s*([\w.]+)$", proc.stderr, re.M)
    assert "hydra" in imported and "train.config" in imported  # the log is read right
    assert not [m for m in imported if m == "torch" or m.startswith("torch.")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for a GPU on a machine without one")
def test_device_cuda_without_a_gpu_exits_2_naming_the_key(tmp_path):
    """It was a RuntimeError traceback, exit 1."""
    proc = run_train([*SMOKE, f"run_dir={tmp_path / 'run'}", "device=cuda"], timeout=120, env={"WORLD_SIZE": "1"})
    assert proc.returncode == 2, proc.stdout
    assert "error: config key 'device' = 'cuda' but torch sees no CUDA device" in proc.stdout
    assert "Traceback" not in proc.stdout and not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="NCCL on a CPU-only machine")
def test_nccl_on_the_cpu_exits_2_naming_the_key(tmp_path):
    """"Distributed package doesn't have NCCL built in" was a traceback, exit 1."""
    proc = run_train([*SMOKE, f"run_dir={tmp_path / 'run'}", "dist.backend=nccl"], timeout=120)
    assert proc.returncode == 2, proc.stdout
    assert "error: config key 'dist.backend' = 'nccl' but the device is cpu" in proc.stdout
    assert "Traceback" not in proc.stdout and not (tmp_path / "run").exists()


def test_a_stage_end_suite_without_exports_is_said_to_be_skipped(capsys):
    """The suite evaluates each stage's HF export: with checkpoint.export_hf=false it was skipped unsaid. Said once
    a process (the planner validates every config it tries)."""
    from train.config import _say_once

    _say_once.cache_clear()
    validate(compose_cfg(["checkpoint.export_hf=false"]), world_size=1)
    validate(compose_cfg(["checkpoint.export_hf=false"]), world_size=1)
    assert capsys.readouterr().err.count("checkpoint.export_hf=false writes none: the suite is skipped") == 1
    validate(compose_cfg(["checkpoint.export_hf=false", "eval.stage_end_suite=false"]), world_size=1)
    validate(compose_cfg([]), world_size=1)
    assert "suite is skipped" not in capsys.readouterr().err


def test_zero_offload_on_gpus_gets_the_nodes_cores_not_torchruns_one_thread(monkeypatch):
    """On GPUs the threads were left as torchrun sets them (OMP_NUM_THREADS=1), so ZeRO-Offload's AdamW step
    (torch's, on the CPU) updated ~1B parameters per rank on one core; srun left every rank all cores."""
    from train.dist import cpu_threads

    monkeypatch.setattr("train.dist.usable_cpus", lambda: 64)  # the affinity mask's cores, not os.cpu_count
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert cpu_threads(compose_cfg(["deepspeed=zero2"]), gpu, 8) is None
    assert cpu_threads(compose_cfg(["deepspeed=zero2_offload"]), gpu, 8) == 8
    assert cpu_threads(compose_cfg(["deepspeed=zero3", "deepspeed.offload_param=true"]), gpu, 8) == 8
    assert cpu_threads(compose_cfg(["deepspeed=zero2_offload", "threads=3"]), gpu, 8) == 3
    assert cpu_threads(compose_cfg([]), cpu, 2) == 32


def test_each_rank_takes_its_gpu_whether_it_sees_the_nodes_or_only_its_own():
    """A rank that sees only its own GPU (srun --gpus-per-task=1) asked for cuda:<LOCAL_RANK> and failed
    ("invalid device ordinal") on every rank but the first; more ranks than visible GPUs are named."""
    from train.dist import cuda_index

    assert [cuda_index(r, 8) for r in range(8)] == list(range(8))
    assert [cuda_index(r, 1) for r in range(4)] == [0, 0, 0, 0]
    with pytest.raises(ConfigError, match="LOCAL_RANK=4, but this process sees 4 CUDA devices"):
        cuda_index(4, 4)


def test_the_deepspeed_launchers_local_size_sets_the_ranks_per_node(monkeypatch):
    """The deepspeed launcher sets LOCAL_SIZE, not LOCAL_WORLD_SIZE: a CPU rank's threads were the cores divided by
    the whole world size instead of this node's ranks."""
    from train.dist import world_from_env

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for key, value in dict(RANK="5", WORLD_SIZE="8", LOCAL_RANK="1", LOCAL_SIZE="4").items():
        monkeypatch.setenv(key, value)
    assert world_from_env() == (5, 8, 1, 4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun's name, where both are set
    assert world_from_env() == (5, 8, 1, 2)


def test_a_curriculum_the_data_cannot_fill_is_refused_before_the_model_is_built(data_root, tmp_path):
    """The Long Context stage asking for far more tokens than the fixture holds: exit 2 naming the stage, from the
    manifest's totals, before the model (a released shape would take minutes to build on a cluster) and before any
    checkpoint."""
    run_dir = tmp_path / "run"
    proc = run_train([*SMOKE, f"run_dir={run_dir}", "curriculum.stages.long_context.tokens=1_000_000_000"])
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert "stage 'long_context' needs" in proc.stdout and "use a larger data set" in proc.stdout
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.jsonl").exists()


def test_an_init_from_that_holds_no_weights_is_refused_before_the_data_and_the_model(data_root, tmp_path):
    """A typo'd `init_from` was named only after the data was prepared and verified and the model built (on a
    cluster: hours of tokenizing a new corpus, minutes to build a large model)."""
    run_dir = tmp_path / "run"
    proc = run_train([*SMOKE, f"run_dir={run_dir}", f"init_from={tmp_path / 'nope'}", "curriculum.start=reasoning"],
                     timeout=120)
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert (f"error: config key 'init_from' = '{tmp_path / 'nope'}': neither an HF directory (config.json) nor a "
            f"tristage checkpoint folder (meta.json)") in proc.stdout
    assert "prepared and verified" not in proc.stdout and not (run_dir / "metrics.jsonl").exists()


def test_a_length_bucket_the_data_cannot_fill_is_refused_before_the_model_is_built(data_root, tmp_path):
    """The probe's case: a Long Context bucket of 4,000-8,000 tokens over the fixture's documents (3,846 at most)
    trained General and Reasoning, then failed when Long Context started; only total tokens were checked."""
    run_dir = tmp_path / "run"
    proc = run_train([*SMOKE, f"run_dir={run_dir}",
                      "curriculum.stages.long_context.mixture.length_buckets=[{min_tokens: 4000, max_tokens: 8000, "
                      "weight: 1}]"])
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert (f"error: {data_root}/fixture/manifest.json: stage 'long_context': no document of the mixture's sources "
            f"is 4000 <= length <= 8000 tokens (length bucket 0)") in proc.stdout
    assert "[general]" not in proc.stdout and not (run_dir / "metrics.jsonl").exists()


def test_training_refuses_a_damaged_shard_and_says_how_to_repair_it(tmp_path):
    """`python -m data.prepare` tokenizes a source with a damaged shard again; training does not rewrite data under
    a run, and says to run it."""
    from data.config import compose as compose_data
    from data.prepare import prepare

    mpath = prepare(compose_data("fixture", [f"root={tmp_path / 'data'}"]))
    shard = next(mpath.parent.glob("shards/udhr-*/eng.000.tok"))
    shard.unlink()
    run_dir = tmp_path / "run"
    proc = run_train([*SMOKE, f"run_dir={run_dir}", f"data.root={tmp_path / 'data'}"], timeout=120)
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert (f"error: {shard}: shard file is missing; shards are derived data: `python -m data.prepare` with this "
            f"run's data settings tokenizes the damaged source again") in proc.stdout
    assert not shard.exists() and not (run_dir / "checkpoints").exists()


def test_multirun_sweep_gives_each_job_its_own_run_dir(data_root, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_train(["--multirun", *SMOKE, "seed=1,2", "max_steps=1", "eval.enabled=false",
                      "checkpoint.export_hf=false", f"hydra.sweep.dir={sweep}"], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    # <job number>-<hash of its overrides>: another sweep under the same name, with other values, never resumes
    # this one's jobs (it did, and was refused: "a stage's samples are fixed")
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name[:2] for p in jobs] == ["0-", "1-"] and len({p.name[2:] for p in jobs}) == 2
    first, second = ([r for r in records(job) if "event" not in r] for job in jobs)
    assert len(first) == 1 and len(second) == 1
    assert first[0]["loss"] != second[0]["loss"]  # different seeds, different initial weights


def test_a_stage_added_after_long_context_keeps_its_base_and_needs_its_weights(capsys):
    """An annealing stage appended to the curriculum (`+stage@curriculum.stages.anneal=...`) that leaves out
    rope_theta trained at 10,000 (the schema's default), undoing Long Context's ABF without a word; left without
    weights while data.mixtures weighs the other stages, it weighed its sources by their tokens."""
    added = ["+stage@curriculum.stages.anneal=reasoning", "curriculum.stages.anneal.name=anneal",
             "curriculum.stages.anneal.rope_theta=null", "curriculum.order=[general,long_context,anneal]"]
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg(added), 1)
    assert str(e.value).startswith("config key 'data.mixtures.anneal' = None: stage(s) ['anneal'] of "
                                   "curriculum.order have no weights, while data.mixtures gives the stages "
                                   "['general', 'long_context', 'reasoning'] theirs: set `+data.mixtures.anneal=")
    # a stage before curriculum.start never trains: it needs no weights
    validate(compose_cfg(["~data.mixtures.general", "curriculum.start=reasoning"]), 1)
    cfg = compose_cfg([*added, "+data.mixtures.anneal={udhr: 1, bible: 1}"])
    validate(cfg, 1)
    assert [cfg.curriculum.stages[s].rope_theta for s in cfg.curriculum.order] == [1e4, 1e6, 1e6]
    assert cfg.curriculum.stages["anneal"].mixture.weights == {"udhr": 1.0, "bible": 1.0}
    assert "lowers" not in capsys.readouterr().err
    # the first stage without a base takes the model's; a stage that lowers its predecessor's base is warned of
    cfg = compose_cfg(["curriculum.stages.general.rope_theta=null", "model.rope_theta=5e5",
                       "curriculum.order=[general,long_context,reasoning]"])
    validate(cfg, 1)
    assert [cfg.curriculum.stages[s].rope_theta for s in cfg.curriculum.order] == [5e5, 1e6, 1e4]
    assert ("warning: curriculum.stages.reasoning.rope_theta=10000 lowers the previous stage's RoPE base 1e+06, "
            "which undoes its ABF") in capsys.readouterr().err


def test_stage_budget_rounds_down_to_whole_steps_and_warmup_may_span_the_stage():
    """m45 (`round(tokens / gbt)`): README/schema 'rounded down to whole optimizer steps': 1.5625 steps -> 1.
    m09 (`warmup_steps >= steps`): warmup over all of the stage's steps is inside the documented [0, steps]."""
    from train.config import LRConfig, StageConfig, plan_stage

    stage = StageConfig(name="general", tokens=1600, seq_len=64, global_batch_tokens=1024, micro_batch_size=4, rope_theta=1e4)
    assert plan_stage(stage, "k", 1).steps == 1
    stage = StageConfig(name="general", tokens=4096, seq_len=64, global_batch_tokens=1024, micro_batch_size=4, rope_theta=1e4,
                        lr=LRConfig(peak=1e-3, final=1e-4, warmup_steps=4))
    assert plan_stage(stage, "k", 1).steps == 4


def test_a_stage_may_train_at_exactly_max_position_embeddings():
    """m49 (`seq_len >= max_position_embeddings`): seq_len equal to the model's maximum is legal (Qwen3's own
    Long Context stage trains at 32,768 = max_position_embeddings of the report's base models)."""
    from train.config import validate

    cfg = compose_cfg(["model.max_position_embeddings=1024"])  # the demo's Long Context seq_len
    validate(cfg, world_size=1)


def test_deepspeed_json_takes_clip_extra_and_no_cuda_only_options_on_cpu():
    """m05 (`"gradient_clipping": 1.0`): deepspeed.grad_clip reaches DeepSpeed. m11 (`extra` merged first /
    setdefault): `deepspeed.extra` is 'merged last' (schema comment), so it overrides a derived key.
    m42 (overlap_comm without the cuda condition): on the CPU overlap_comm is off, pin_memory too."""
    from train.config import validate
    from train.engine import deepspeed_config

    cfg = compose_cfg(["deepspeed.grad_clip=0.25", "deepspeed=zero2_offload", "+deepspeed.extra.steps_per_print=7"])
    plans = validate(cfg, world_size=1)
    ds = deepspeed_config(cfg, plans[0], torch.device("cpu"))
    assert ds["gradient_clipping"] == 0.25
    assert ds["steps_per_print"] == 7
    assert ds["zero_optimization"]["overlap_comm"] is False
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert ds["gradient_accumulation_steps"] * ds["train_micro_batch_size_per_gpu"] == ds["train_batch_size"]
    assert ds["bf16"]["enabled"] is False
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"}
    on_gpu = deepspeed_config(cfg, plans[0], torch.device("cuda"))
    assert on_gpu["bf16"]["enabled"] is True
    assert on_gpu["data_types"] == {"grad_accum_dtype": "fp32"}  # auto at ZeRO-2: fp32
    for overrides, accum in ((["deepspeed=zero1"], "bf16"), (["deepspeed=zero1", "deepspeed.grad_accum_dtype=fp32"],
                              "fp32"), (["deepspeed=zero3", "deepspeed.grad_accum_dtype=bf16"], "bf16")):
        cfg = compose_cfg(overrides)
        assert deepspeed_config(cfg, validate(cfg, 1)[0], torch.device("cuda"))["data_types"] == {
            "grad_accum_dtype": accum}, overrides


@pytest.mark.parametrize("key, refused, own", [
    ("gradient_clipping", "gradient_clipping", "deepspeed.grad_clip"),
    ("gradient_accumulation_steps", "gradient_accumulation_steps", "the stage's global_batch_tokens"),
    ("data_types", "data_types", "deepspeed.grad_accum_dtype"),
    ("zero_optimization.stage", "zero_optimization.stage", "deepspeed.zero_stage"),
    ("zero_optimization.offload_optimizer.device", "zero_optimization.offload_optimizer",
     "deepspeed.offload_optimizer"),
    ("bf16.enabled", "bf16.enabled", "deepspeed.precision"),
    ("fp16.enabled", "fp16", "deepspeed.precision (bf16 or fp32"),
    ("optimizer.type", "optimizer", "optim.*"),
    ("scheduler.type", "scheduler", "the stages' lr settings")])
def test_a_deepspeed_extra_key_tristage_derives_is_refused(key, refused, own):
    """`deepspeed.extra.gradient_clipping` overrode the derived key in DeepSpeed's config, while the loop logged
    (and under fp32 ZeRO-0 clipped by) deepspeed.grad_clip; an accumulation count of its own broke the data plan.
    `extra.zero_optimization={...}` replaced the whole section: a run recorded as ZeRO-1 trained at ZeRO-0 (its
    relaunch then missed optimizer files), `{stage: 3}` at ZeRO-3; an `optimizer` or `scheduler` section was
    ignored (the client optimizer and the loop's LR win) while config.yaml showed it; `fp16` failed in DeepSpeed."""
    cfg = compose_cfg([f"+deepspeed.extra.{key}=2"])
    with pytest.raises(ConfigError, match=re.escape(f"config key 'deepspeed.extra.{refused}' = ") + ".*"
                       + re.escape(f": set by tristage from {own}")):
        validate(cfg, world_size=1)


def test_deepspeed_extra_merges_into_the_zero_and_bf16_sections():
    """A tuning key of its own (`zero_optimization.round_robin_gradients`) joins the derived section instead of
    replacing it, so the stage, buckets and offload the run records stay; a section that is not a mapping and a
    `steps_per_print` below 1 (DeepSpeed's ZeroDivisionError at the first step) are refused."""
    from train.engine import deepspeed_config

    cfg = compose_cfg(["deepspeed=zero2_offload", "+deepspeed.extra.zero_optimization.round_robin_gradients=true",
                       "+deepspeed.extra.bf16.immediate_grad_update=true"])
    ds = deepspeed_config(cfg, validate(cfg, world_size=1)[0], torch.device("cpu"))
    assert ds["zero_optimization"]["round_robin_gradients"] is True
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert ds["bf16"] == {"enabled": False, "check_grad_overflow": True, "immediate_grad_update": True}
    for override, message in (("+deepspeed.extra.zero_optimization=3", "must be a mapping"),
                              ("+deepspeed.extra.steps_per_print=0", "must be an integer >= 1"),
                              ("+deepspeed.extra.steps_per_print=1.5", "must be an integer >= 1")):
        with pytest.raises(ConfigError, match=re.escape(f"'{override[1:].split('=')[0]}' = ") + ".*" + message):
            validate(compose_cfg([override]), world_size=1)


def test_help_says_how_a_run_is_launched_and_lists_the_groups():
    """--help said only "__main__ is powered by Hydra" above the groups."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "train", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("tristage: the Qwen3 three-stage pretraining curriculum")
    assert "Usage: python -m train [--config-dir DIR] [group=option ...] [key=value ...]" in proc.stdout
    assert "75 preempted" in proc.stdout and "powered by Hydra" not in proc.stdout
    assert "model: qwen3_0_6b, qwen3_14b" in proc.stdout  # the groups still follow


@pytest.mark.parametrize("overrides, world, peak", [
    (["model=qwen3_8b", "curriculum=qwen3", "curriculum.stages.general.lr.peak=1.5e-4"], 64, 1.5e-4),
    (["curriculum.stages.general.lr.peak=1e-3"], 1, 1e-3),  # the demo
])
def test_the_general_stage_lr_is_set_by_its_peak_alone(overrides, world, peak):
    """README: the LR is "to be set per model (`curriculum.stages.<stage>.lr.peak=...`)". General holds its peak
    (decay_frac 0), but its `final` was a second copy of the peak: a lower peak was refused ("lr.final = 0.0003:
    must lie in [0, ...peak]") until the unused final was set too."""
    from train.schedule import lr_at

    cfg = compose_cfg(overrides)
    plans = validate(cfg, world_size=world)
    lr, steps = cfg.curriculum.stages["general"].lr, plans[0].steps
    assert lr.final == peak
    assert [lr_at(lr, s, steps) for s in (lr.warmup_steps - 1, lr.warmup_steps, steps - 1)] == [peak] * 3
    assert lr_at(lr, 0, steps) == pytest.approx(peak / lr.warmup_steps)


@pytest.mark.parametrize("model", ["tiny_dense", "tiny_moe"])
def test_a_bf16_run_builds_its_model_in_bf16_with_the_fp32_draws_rounded(model):
    """Under bf16 the model was allocated in fp32 and DeepSpeed cast it: 4 bytes per local parameter at start (136
    GiB per rank for Qwen3-235B-A22B under EP 8, over an H200). Built in bf16 now, each weight drawn in fp32 and
    rounded once, it holds exactly what the fp32 build cast to bf16 holds; an fp32 run is built as before."""
    from train.dist import DistInfo
    from train.loop import build_model

    info = DistInfo(0, 1, 0, 1, torch.device("cpu"))
    bf16 = compose_cfg([f"model={model}", "deepspeed.precision=bf16"])
    fp32 = compose_cfg([f"model={model}", "deepspeed.precision=fp32"])
    built = build_model(bf16, validate(bf16, world_size=1)[0], info)
    reference = build_model(fp32, validate(fp32, world_size=1)[0], info)
    assert {p.dtype for p in reference.parameters()} == {torch.float32}
    assert {p.dtype for p in built.parameters()} == {torch.bfloat16}
    assert built.rope_cos.dtype == torch.float32 and torch.equal(built.rope_cos, reference.rope_cos)
    theirs = dict(reference.to(torch.bfloat16).named_parameters())
    for name, p in built.named_parameters():
        assert torch.equal(p, theirs[name]), name
