"""Relaunching a run with a changed config, `max_steps` at a stage end, and `--multirun` sweeps with a failed job.

Each was found broken by a probe: a lowered budget made the relaunch loop forever (filling metrics.jsonl, deaf to
SIGTERM), a reordered curriculum trained the wrong stage from the wrong step, a changed global batch repeated
samples, a sweep with failed jobs exited 0, and a failed job's watchdog later killed a healthy job of the sweep.
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil

import pytest
import torch

from test_train_config import compose_cfg
from trainutil import DENSE1, SMOKE, records, run_train, smoke_run, steps, stopped_at

BASE = [*SMOKE, "model=tiny_dense", "eval.enabled=false", "checkpoint.export_hf=false"]


@pytest.fixture(scope="module")
def mid_reasoning(data_root, tmp_path_factory):
    """A run stopped by max_steps=5: General's 4 steps done, Reasoning at step 1 of 2."""
    run_dir = tmp_path_factory.mktemp("mid") / "run"
    proc = run_train([*BASE, f"run_dir={run_dir}", "max_steps=5"])
    assert proc.returncode == 0, proc.stdout[-3000:]
    return run_dir


def test_max_steps_at_a_stage_end_stops_there(data_root, tmp_path):
    """max_steps=4 is General's last step: before, the launch ran one more step (into Reasoning)."""
    run_dir = tmp_path / "run"
    proc = run_train([*BASE, f"run_dir={run_dir}", "max_steps=4"])
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert [(r["stage"], r["step"]) for r in steps(run_dir)] == [("general", i) for i in range(1, 5)]
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert json.loads((run_dir / "checkpoints" / latest / "meta.json").read_text())["state"]["stage_complete"]


@pytest.mark.parametrize("override, key", [
    ("curriculum.stages.reasoning.tokens=1024", "curriculum.stages.reasoning.tokens"),  # the budget it is past
    ("curriculum.stages.reasoning.global_batch_tokens=512", "curriculum.stages.reasoning.global_batch_tokens"),
    ("data.mixtures.reasoning.code=0.9", "curriculum.stages.reasoning.mixture"),
    ("seed=7", "seed"),
    ("curriculum.stages.reasoning.rope_theta=500000", "curriculum.stages.reasoning.rope_theta"),
    ("curriculum.order=[general,long_context]", "curriculum.order"),
])
def test_a_relaunch_that_cannot_continue_the_stage_is_refused_naming_the_key(mid_reasoning, tmp_path, override,
                                                                             key):
    run_dir = tmp_path / "run"
    shutil.copytree(mid_reasoning, run_dir)
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    proc = run_train([*BASE, f"run_dir={run_dir}", override], timeout=300)
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert f"config key '{key}'" in proc.stdout and "1-reasoning-step0000001" in proc.stdout
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before  # nothing written


def test_a_relaunch_may_change_the_stages_not_yet_started(mid_reasoning, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(mid_reasoning, run_dir)
    proc = run_train([*BASE, f"run_dir={run_dir}", "curriculum.stages.long_context.tokens=1024"], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert [(r["stage"], r["step"]) for r in steps(run_dir)][4:] == [
        ("reasoning", 1), ("reasoning", 2), ("long_context", 1)]


def test_a_sweep_with_a_failed_job_fails_and_its_other_jobs_finish(data_root, tmp_path):
    """Job 0 diverges (exit 4); job 1 trains for longer than dist.timeout_s after that: before, job 0's watchdog
    was left running and killed job 1 as 'hung', and the sweep exited 0."""
    sweep = tmp_path / "sweep"
    proc = run_train(["--multirun", *BASE, "curriculum.stages.general.lr.peak=1e30,3e-3",
                      "faults.max_consecutive_skips=0", "dist.timeout_s=6", f"hydra.sweep.dir={sweep}"], timeout=600)
    assert proc.returncode == 4, proc.stdout[-3000:]
    assert "1 consecutive step had a non-finite loss" in proc.stdout and "no progress" not in proc.stdout
    # before its first checkpoint: said so (it named a checkpoint 'None' as holding finite weights)
    assert "No checkpoint was saved yet (relaunching starts the run again): lower the LR" in proc.stdout
    job1 = next(sweep.glob("1-*"))  # <job number>-<hash of its overrides>
    assert [r["stage"] for r in records(job1) if r.get("event") == "stage_end"] == [
        "general", "reasoning", "long_context"]


def test_the_data_a_stage_is_pinned_to_is_that_of_its_own_sources():
    """A source added for a later stage (with a fixed tokenizer) does not stop a resume in the middle of this one;
    new shards of a source it reads do."""
    from data.config import MixtureConfig
    from train.config import StageConfig
    from train.relaunch import data_fingerprint

    def manifest(**shas):
        return {"components": {f"{s}/eng": {"source": s, "files": [{"sha256": h}]} for s, h in shas.items()}}

    stage = StageConfig(name="general", mixture=MixtureConfig(weights={"udhr": 0.5, "bible": 0.5}))
    base = data_fingerprint(manifest(udhr="a", bible="b"), stage)
    assert data_fingerprint(manifest(udhr="a", bible="b", wiki="c"), stage) == base
    assert data_fingerprint(manifest(udhr="a", bible="B"), stage) != base
    every = StageConfig(name="general", mixture=MixtureConfig())  # no weights: by tokens over every source
    assert data_fingerprint(manifest(udhr="a", bible="b", wiki="c"), every) != data_fingerprint(
        manifest(udhr="a", bible="b"), every)


@pytest.mark.parametrize("override, message", [
    # a finished run relaunched with another order said "the curriculum is complete" though its last stage never ran
    ("curriculum.order=[long_context,reasoning,general]", "config key 'curriculum.order' = ['long_context', "
     "'reasoning', 'general']: {ckpt} was saved in stage 'long_context' at position 2"),
    ("curriculum.order=[general,reasoning]", "config key 'curriculum.order' = ['general', 'reasoning']: {ckpt} was "
     "saved in stage 'long_context' at position 2 of the curriculum, where this order has 'nothing'"),
    # its stage-end export and evaluation still to do: they ran at the new base and length (a wrong config.json)
    ("curriculum.stages.long_context.rope_theta=500000", "config key 'curriculum.stages.long_context.rope_theta' = "
     "500000.0: {ckpt} is at step 2 of stage 'long_context', which trains at RoPE base 1000000.0; its stage-end "
     "export and evaluation, still to do, use that base"),
    ("curriculum.stages.long_context.seq_len=128", "config key 'curriculum.stages.long_context.seq_len' = 128: "
     "{ckpt} ends stage 'long_context', trained at 256, whose stage-end evaluation is still to do"),
])
def test_a_relaunch_after_the_last_stage_ended_keeps_what_it_trained_with(data_root, tmp_path_factory, tmp_path,
                                                                          override, message):
    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run(tmp_path_factory, "dense1", DENSE1), run_dir)
    ckpt = run_dir / "checkpoints" / "2-long_context-step0000002"
    if "stages.long_context" in override:  # as a launch preempted in the stage's last step leaves it
        (ckpt / "stage_finished").unlink()
    before = records(run_dir)
    extra = ["curriculum.stages.long_context.mixture.length_buckets=[]"] if "seq_len" in override else []
    proc = run_train([*SMOKE, f"run_dir={run_dir}", *DENSE1, override, *extra], timeout=300)
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert message.format(ckpt=ckpt) in proc.stdout
    assert records(run_dir) == before  # nothing trained, exported or evaluated
    assert (ckpt / "stage_finished").exists() == ("stages" not in override)


def test_a_checkpoint_without_stage_data_at_the_stages_last_step_is_refused():
    """m14 (`step >= plans[index].steps` -> `>`): a checkpoint from before stage_data was recorded, mid-stage at
    step == the stage's steps now, has no step left to run; it must be refused naming the tokens key (the
    relaunch tests never reach this check: their checkpoints have stage_data, whose check fires first)."""
    from train.config import ConfigError, validate
    from train.relaunch import check_resumable

    cfg = compose_cfg([])
    plans = validate(cfg, world_size=1)
    meta = {"state": {"stage_index": 1, "stage": "reasoning", "step": plans[1].steps, "stage_complete": False}}
    with pytest.raises(ConfigError, match="config key 'curriculum.stages.reasoning.tokens'"):
        check_resumable(meta, cfg, plans, {"components": {}}, "ckpt")
    meta["state"]["step"] = plans[1].steps - 1
    check_resumable(meta, cfg, plans, {"components": {}}, "ckpt")


def test_a_checkpoint_is_refused_under_another_norm_eps_or_topk_normalisation():
    """Shapes were the only check on a resume or an init_from of a checkpoint folder: a relaunch with
    model.norm_topk_prob=false trained on silently (step 3: 9.0373 against 9.0114), as did another rms_norm_eps,
    while an init_from of the HF export refused the same change."""
    from models.presets import load_preset
    from train.checkpoint import CheckpointError, check_compatible, model_behaviour, model_shape

    moe = load_preset("tiny_moe")
    meta = {"model_shape": model_shape(moe), "model_behaviour": model_behaviour(moe), "tokenizer_fingerprint": "t"}
    check_compatible(meta, moe, "t", "ckpt")
    for key, value in (("norm_topk_prob", False), ("rms_norm_eps", 1e-5)):
        other = dataclasses.replace(moe, **{key: value})
        with pytest.raises(CheckpointError, match=re.escape(f"model.{key}: checkpoint {getattr(moe, key)!r} vs "
                                                            f"config {value!r}")):
            check_compatible(meta, other, "t", "ckpt")
    # a dense model's norm_topk_prob means nothing; a checkpoint of an earlier version has no record to check
    dense = load_preset("tiny_dense")
    dense_meta = {"model_shape": model_shape(dense), "model_behaviour": model_behaviour(dense),
                  "tokenizer_fingerprint": "t"}
    check_compatible(dense_meta, dataclasses.replace(dense, norm_topk_prob=not dense.norm_topk_prob), "t", "ckpt")
    check_compatible({"model_shape": model_shape(moe), "tokenizer_fingerprint": "t"},
                     dataclasses.replace(moe, norm_topk_prob=False), "t", "ckpt")


def _change_weight(cfg, stage, manifest):
    source = next(iter(stage.mixture.weights))
    stage.mixture.weights[source] *= 2


# one change of each value stage_data() records, by its key (the reasoning stage's)
STAGE_DATA_CHANGES = {
    "seed": lambda cfg, stage, manifest: setattr(cfg, "seed", cfg.seed + 1),
    "curriculum.stages.reasoning.tokens": lambda cfg, stage, manifest: setattr(stage, "tokens", stage.tokens * 2),
    "curriculum.stages.reasoning.global_batch_tokens":
        lambda cfg, stage, manifest: setattr(stage, "global_batch_tokens", stage.global_batch_tokens // 2),
    "curriculum.stages.reasoning.seq_len": lambda cfg, stage, manifest: setattr(stage, "seq_len", stage.seq_len // 2),
    "curriculum.stages.reasoning.mixture": _change_weight,
    "data (the prepared shards)": lambda cfg, stage, manifest: manifest["components"][
        next(iter(manifest["components"]))]["files"][0].update(sha256="prepared again"),
}


@pytest.fixture(scope="module")
def demo_cfg():
    from train.config import validate

    cfg = compose_cfg([])
    return cfg, validate(cfg, world_size=1)


@pytest.mark.parametrize("key", list(STAGE_DATA_CHANGES))
def test_a_relaunch_that_changes_any_stage_data_value_is_refused_naming_it(demo_cfg, key):
    """check_resumable against a mid-Reasoning checkpoint's stage_data, each recorded value changed alone: refused,
    the message naming that key with both values (the relaunch tests above change four of the six in real runs,
    neither seq_len nor the data); every key stage_data records has its case here."""
    import copy

    from train.config import ConfigError
    from train.relaunch import check_resumable, stage_data

    cfg, plans = copy.deepcopy(demo_cfg)
    stage = cfg.curriculum.stages["reasoning"]
    manifest = {"components": {f"{s}/eng": {"source": s, "files": [{"sha256": s}]} for s in stage.mixture.weights}}
    saved = stage_data(cfg, stage, manifest)
    assert set(saved) == set(STAGE_DATA_CHANGES)
    meta = {"state": {"stage_index": 1, "stage": "reasoning", "step": 1, "stage_complete": False},
            "stage_data": copy.deepcopy(saved), "rope_theta": stage.rope_theta}
    check_resumable(meta, cfg, plans, manifest, "ckpt")  # unchanged: resumes
    STAGE_DATA_CHANGES[key](cfg, stage, manifest)
    now = stage_data(cfg, stage, manifest)
    assert [k for k in saved if saved[k] != now[k]] == [key]  # this value alone
    with pytest.raises(ConfigError) as err:
        check_resumable(meta, cfg, plans, manifest, "ckpt")
    assert str(err.value).startswith(f"config key '{key}' = {now[key]!r}: ckpt is at step 1 of stage 'reasoning', "
                                     f"which started with {saved[key]!r}")


@pytest.mark.parametrize("pointer", [b"../../other/checkpoints/0-general-step0000009", b"\xff\xfe\x00garbage",
                                     b"/abs/0-general-step0000009", b".replaced-0-general-step0000002"])
def test_a_latest_naming_no_folder_of_this_run_falls_back_to_its_newest(tmp_path, capsys, pointer):
    """`latest` holding bytes that are not text was a UnicodeDecodeError traceback; one holding a path resumed
    another run's checkpoint as this run's, unsaid. Both fall back as a pointer naming a missing folder does, with
    the warning; with no checkpoint of this run left, the error names the pointer."""
    from train.checkpoint import CheckpointError, CheckpointManager

    ckpts = tmp_path / "run" / "checkpoints"
    for name, step in (("0-general-step0000001", 1), ("0-general-step0000002", 2)):
        (ckpts / name).mkdir(parents=True)
        (ckpts / name / "meta.json").write_text(json.dumps({"state": {"global_step": step}}))
    other = tmp_path / "other" / "checkpoints" / "0-general-step0000009"  # a complete checkpoint of another run
    other.mkdir(parents=True)
    (other / "meta.json").write_text(json.dumps({"state": {"global_step": 9}}))
    (tmp_path / "abs").mkdir()
    shutil.copytree(other, tmp_path / "abs" / other.name)
    (ckpts / "latest").write_bytes(pointer.replace(b"/abs/", str(tmp_path / "abs").encode() + b"/"))
    manager = CheckpointManager(tmp_path / "run", keep=2, rank=0)
    manager.recover()
    assert manager.latest() == "0-general-step0000002"
    assert (ckpts / "latest").read_text() == "0-general-step0000002"
    assert f"names no checkpoint folder of {ckpts}; taking the newest complete checkpoint" in capsys.readouterr().err
    (ckpts / "latest").write_bytes(pointer)
    for name in ("0-general-step0000001", "0-general-step0000002"):
        shutil.rmtree(ckpts / name)
    with pytest.raises(CheckpointError, match=re.escape(f"{ckpts / 'latest'} names no checkpoint folder of {ckpts}, "
                                                        "and no other complete checkpoint")):
        manager.latest()


def test_a_damaged_init_from_exits_2_naming_the_file(data_root, tmp_path_factory, tmp_path):
    """A damaged `init_from` was a traceback, exit 1, where a resume, eval or export of the same files exits 2 naming
    the file: an HF directory with a cut-short or extra tensor (models.hf's ValueError), a checkpoint folder whose
    meta.json is not JSON (a bare JSONDecodeError naming no file) or whose model file is cut short (DeepSpeed's
    load, CheckpointLoadError). Nothing is trained or written into the run's checkpoints."""
    source = smoke_run(tmp_path_factory, "dense1", DENSE1)
    hf, ckpt = tmp_path / "hf", tmp_path / "ckpts" / "0-general-step0000004"
    shutil.copytree(source / "hf" / "general", hf)
    shutil.copytree(source / "checkpoints" / ckpt.name, ckpt)
    weights, meta, model_file = hf / "model.safetensors", ckpt / "meta.json", ckpt / "mp_rank_00_model_states.pt"

    def refused(init, *expected):
        run_dir = tmp_path / f"run{len(list(tmp_path.glob('run*')))}"
        proc = run_train([*SMOKE, *DENSE1, f"run_dir={run_dir}", f"init_from={init}", "max_steps=1"], timeout=120)
        assert proc.returncode == 2, proc.stdout[-3000:]
        assert f"error: config key 'init_from' = '{init}': " in proc.stdout, proc.stdout[-3000:]
        for text in expected:
            assert text in proc.stdout, proc.stdout[-3000:]
        assert "Traceback" not in proc.stdout and not list(run_dir.glob("checkpoints/*/meta.json"))

    from safetensors.torch import load_file, save_file

    whole = weights.read_bytes()
    save_file(dict(load_file(weights), **{"model.extra.weight": torch.zeros(2)}), weights)
    refused(hf, f"{weights}: unexpected key model.extra.weight")
    weights.write_bytes(whole[: len(whole) // 2])
    refused(hf, f"{weights}: ")
    text = meta.read_text()
    meta.write_text(text[:-10])
    refused(ckpt, f"{meta}: cannot be read (JSONDecodeError")
    meta.write_text(text)
    model_file.write_bytes(model_file.read_bytes()[:4096])
    refused(ckpt, f"{model_file}: cannot be read, truncated or damaged")


def test_a_relaunch_under_another_data_config_leaves_the_prepared_data_as_it_is(data_root, tmp_path_factory, tmp_path):
    """A relaunch with another tokenizer setting prepared the data set again in place (a new tokenizer, every
    shard tokenized again, manifest.json rewritten: hours on a real corpus) and was refused only after, by the
    resume's tokenizer check, leaving the run unable to resume on its own data until prepared back. Now it is
    refused before anything is prepared, saying how to go on. A copy of the data root: the check failing would
    otherwise rewrite the session's shared fixture."""
    run_dir = stopped_at(smoke_run(tmp_path_factory, "dense1", DENSE1), 4, tmp_path / "run")  # General done
    shutil.copytree(data_root / "fixture", tmp_path / "data" / "fixture")
    data = tmp_path / "data" / "fixture"
    before = {p.relative_to(data): p.read_bytes() for p in data.rglob("*") if p.is_file()}
    proc = run_train([*SMOKE, *DENSE1, f"run_dir={run_dir}", f"data.root={tmp_path / 'data'}",
                      "data.tokenizer.vocab_size=512"], timeout=120)
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert (f"error: {data / 'manifest.json'}: this run_dir resumes checkpoint '0-general-step0000004', and data set "
            f"'fixture' there was prepared otherwise than this launch's data config asks (config: ") in proc.stdout, \
        proc.stdout[-3000:]
    assert "a relaunch does not prepare a run's data again" in proc.stdout
    assert {p.relative_to(data): p.read_bytes() for p in data.rglob("*") if p.is_file()} == before
    # the same config over the copied data (another path, the same files) resumes: nothing to prepare
    proc = run_train([*SMOKE, *DENSE1, f"run_dir={run_dir}", f"data.root={tmp_path / 'data'}"], timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
