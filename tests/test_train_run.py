"""The main job for real: `python -m train` through all three stages, on 1 process and on 2 gloo ranks
under ZeRO-2 and ZeRO-3, dense and MoE; exact resume after SIGKILL and SIGTERM; refused resumes."""
from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from trainutil import (DENSE1, ROOT, SMOKE, kill_when, losses, records, run_train, smoke_run, steps,
                       stopped_at, train_cmd)

STAGES = ["general", "reasoning", "long_context"]
# the smoke curriculum: 4 + 2 + 2 steps of 1,024 tokens
SMOKE_STEPS = {"general": 4, "reasoning": 2, "long_context": 2}
EVERY_STEP = [f"curriculum.stages.{s}.checkpoint_every=1" for s in STAGES]


def test_one_process_runs_all_three_stages(data_root, tmp_path_factory):
    run_dir = smoke_run(tmp_path_factory, "dense1", DENSE1)
    recs = records(run_dir)
    starts = [r for r in recs if r.get("event") == "stage_start"]
    assert [r["stage"] for r in starts] == STAGES
    assert [r["seq_len"] for r in starts] == [64, 64, 256]
    assert [r["rope_theta"] for r in starts] == [10_000.0, 10_000.0, 1_000_000.0]
    assert starts[0]["mixture"]["bible"] == 0.45 and starts[2]["mixture"] == {"sotu": 0.5, "bible": 0.3, "code": 0.2}
    per_step = steps(run_dir)
    assert [(r["stage"], r["step"]) for r in per_step] == [(s, i) for s in STAGES for i in range(1, SMOKE_STEPS[s] + 1)]
    # the model's RoPE base as each step trained at (ABF raises it for Long Context), not the stage's setting read back
    assert [r["rope_theta"] for r in per_step] == [10_000.0] * 6 + [1_000_000.0] * 2
    assert per_step[-1]["tokens"] == 8 * 1024 and per_step[-1]["global_step"] == 8
    assert per_step[0]["loss"] > per_step[3]["loss"]  # it learns
    assert math.log(8192) - 0.5 < per_step[0]["loss"] < math.log(8192) + 0.5  # starts near uniform
    # WSD: General holds its peak after a 1-step warmup; Reasoning decays to its final LR on its last step
    assert [r["lr"] for r in per_step[:4]] == [3e-3] * 4
    assert per_step[5]["lr"] == pytest.approx(3e-4)
    first = per_step[0]
    assert set(first["loss_by_source"]) <= {"udhr", "bible", "code", "reasoning", "sotu"}
    assert "python" in first["loss_by_language"] or "eng" in first["loss_by_language"]
    assert first["ledger"]["tokens"] == 1024 and sum(first["ledger"]["source"].values()) == 1024
    # the tables by language and component every logging.ledger_every steps (100) and at a stage's last step only
    assert "component" not in first["ledger"] and "language" not in first["ledger"]
    general_end = per_step[3]
    assert general_end["step"] == general_end["stage_steps"] == 4
    assert sum(general_end["ledger"]["component"].values()) == general_end["ledger"]["tokens"] == 4 * 1024
    assert sum(general_end["ledger"]["language"].values()) == 4 * 1024
    evals = [r for r in recs if r.get("event") == "eval"]
    assert [e["stage"] for e in evals] == STAGES and all(e["heldout_ppl"] for e in evals)
    assert evals[-1]["heldout_ppl_geomean"] < evals[0]["heldout_ppl_geomean"]
    # run directory as in architecture.md
    assert (run_dir / "config.yaml").exists() and (run_dir / "checkpoints" / "latest").exists()
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == "2-long_context-step0000002"
    meta = json.loads((run_dir / "checkpoints" / latest / "meta.json").read_text())
    assert meta["state"]["stage_complete"] and meta["tokenizer_fingerprint"]
    for stage, theta in zip(STAGES, [1e4, 1e4, 1e6]):
        hf_cfg = json.loads((run_dir / "hf" / stage / "config.json").read_text())
        assert hf_cfg["rope_theta"] == theta
    exports = [r for r in recs if r.get("event") == "hf_export"]  # each export is said, where and at which base
    assert [(r["stage"], r["global_step"], r["path"], r["rope_theta"]) for r in exports] == [
        (s, g, str(run_dir / "hf" / s), t) for s, g, t in zip(STAGES, [4, 6, 8], [1e4, 1e4, 1e6])]
    # DENSE1 profiles from global step 3 (step 2 its warm-up): General ends after step 4, and so does the range
    assert [r["steps"] for r in recs if r.get("event") == "profile"] == [[3, 4]]
    trace = json.loads((run_dir / "profile" / "step3-4" / "rank0.trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"aten::mm", "Optimizer.step#AdamW.step"} <= names
    assert "aten::mm" in (run_dir / "profile" / "step3-4" / "rank0.ops.txt").read_text()


def test_hf_export_matches_transformers(data_root, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from test_hf import assert_same_logits
    from models.hf import load_hf

    run_dir = smoke_run(tmp_path_factory, "dense1", DENSE1)
    export = run_dir / "hf" / "long_context"
    ours = load_hf(export).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    ids = torch.randint(0, 1024, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_same_logits(ours(ids).logits, theirs(ids).logits)  # bit for bit
    # the export decodes alone, as transformers reads it: the tokenizer gives the training ids, generation stops
    # at the EOS that ended every training document, and the padded embedding rows (1,024 tokens, 8,192 rows)
    # are never generated
    from data.tokenizer import load_tokenizer

    tok = load_tokenizer(export / "tokenizer.model")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(export))
    text = "In the beginning God created\n\tthe heaven — Всеобщая декларация 人权 😀"
    assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text)
    assert theirs.generation_config.eos_token_id == theirs.config.eos_token_id == tok.eos_id == hf_tok.eos_token_id
    assert theirs.generation_config.pad_token_id == tok.pad_id
    prompt = torch.tensor([tok.encode("In the beginning")])
    with torch.no_grad():
        sampled = theirs.generate(prompt, do_sample=True, temperature=5.0, top_k=0, max_new_tokens=32)
    new = sampled[0, prompt.shape[1]:].tolist()
    assert new and max(new) < tok.vocab_size  # at temperature 5 the 7,168 padded rows held most of the mass
    umask = os.umask(0)
    os.umask(umask)
    assert (export / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # safetensors made it 0600


@pytest.mark.parametrize("model, zero", [("tiny_dense", "zero2"), ("tiny_dense", "zero3"),
                                         ("tiny_moe", "zero2"), ("tiny_moe", "zero3")])
def test_two_gloo_ranks(data_root, tmp_path_factory, model, zero):
    run_dir = smoke_run(tmp_path_factory, f"{model}-{zero}", [f"model={model}", f"deepspeed={zero}"], nproc=2)
    per_step = steps(run_dir)
    assert len(per_step) == 8 and all(math.isfinite(r["loss"]) for r in per_step)
    assert [(r["stage"], r["seq_len"], r["rope_theta"]) for r in per_step][3:7:3] == [
        ("general", 64, 1e4), ("long_context", 256, 1e6)]
    ckpt = run_dir / "checkpoints" / "2-long_context-step0000002"
    assert (ckpt / "rng_rank1.pt").exists()
    assert len(list(ckpt.glob("*optim_states.pt"))) == 2  # ZeRO shards the optimizer over both ranks
    if model == "tiny_moe":
        # the unweighted balance loss (1 at an even load), not the weighted aux loss it was logged as before
        assert all(0.9 < r["balance_loss"] < 4 for r in per_step)
        assert all(r["aux_loss"] == pytest.approx(0.001 * r["balance_loss"], rel=1e-6) for r in per_step)
        assert all(r["z_loss"] > 0 and r["loss"] == pytest.approx(r["lm_loss"] + r["aux_loss"]) for r in per_step)
        assert len(per_step[-1]["expert_load"]) == 4 and len(per_step[-1]["expert_load"][0]) == 8
        assert sum(per_step[-1]["expert_load"][0]) == pytest.approx(1.0, abs=1e-3)
        # the table (48 x 128 numbers for 30B-A3B, ~55 KB a line) at each stage's last step only at the default
        # logging.expert_load_every=100; the summary in every record
        assert [r["step"] for r in per_step if "expert_load" in r] == [4, 2, 2]
        assert all(r["expert_load_max_over_mean"] >= 1.0 for r in per_step)


GOLDEN = ROOT / "tests" / "fixtures" / "golden"


@pytest.mark.parametrize("key, overrides, nproc", [("dense1", DENSE1, 1),
                                                   ("tiny_moe-zero2", ["model=tiny_moe", "deepspeed=zero2"], 2)])
def test_loss_curves_match_the_golden_files(data_root, tmp_path_factory, key, overrides, nproc):
    """The smoke curriculum's per-step loss and gradient norm against files kept in the repository (torchtitan's
    practice): a change to the model, the loss, the data order, the initialisation or the schedule shows here as a
    numeric change, not only as "it still trains". Tolerance 1e-4 relative: the BLAS of another CPU or torch
    version moves the last bits. After an intended change: TRISTAGE_UPDATE_GOLDEN=1 pytest -k golden."""
    got = losses(smoke_run(tmp_path_factory, key, overrides, nproc=nproc))
    path = GOLDEN / f"smoke_{key}.txt"
    lines = [f"{stage} {step} {loss:.8g} {norm:.8g}" for (stage, step), (loss, norm) in got.items()]
    if os.environ.get("TRISTAGE_UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# stage step loss grad_norm: python -m train experiment=smoke {' '.join(overrides)}"
                        f"{' (2 ranks)' if nproc == 2 else ''}\n" + "\n".join(lines) + "\n")
    golden = [line.split() for line in path.read_text().splitlines() if not line.startswith("#")]
    assert [(stage, int(step)) for stage, step, _, _ in golden] == list(got)
    for stage, step, loss, norm in golden:
        assert got[(stage, int(step))] == pytest.approx((float(loss), float(norm)), rel=1e-4), (stage, step)


def test_micro_granularity_logs_the_global_batch_expert_load(data_root, tmp_path_factory, tmp_path):
    """With balance_loss_granularity=micro the logged expert load was rank 0's tokens only (imbalance 1.36 where
    the global batch's was 1.23). Step 1 routes the same tokens with the same weights in both modes."""
    overrides = ["model=tiny_moe", "deepspeed=zero2"]
    global_ = steps(smoke_run(tmp_path_factory, "tiny_moe-zero2", overrides, nproc=2))[0]
    proc = run_train([*SMOKE, f"run_dir={tmp_path}", *overrides, "model.balance_loss_granularity=micro",
                      "max_steps=1", "eval.enabled=false", "checkpoint.export_hf=false",
                      "logging.expert_load_every=1"], nproc=2)
    assert proc.returncode == 0, proc.stdout[-3000:]
    micro = steps(tmp_path)[0]
    assert micro["expert_load_max_over_mean"] == pytest.approx(global_["expert_load_max_over_mean"])
    load = torch.tensor(micro["expert_load"])  # (layers, experts), the table this step (expert_load_every=1)
    assert load.sum(dim=1).tolist() == pytest.approx([1.0] * 4, abs=1e-3)
    assert (load.max(dim=1).values * 8).mean().item() == pytest.approx(micro["expert_load_max_over_mean"], rel=1e-4)
    assert (load.max(dim=1).values * 8).max().item() == pytest.approx(micro["expert_load_max_over_mean_worst"],
                                                                      rel=1e-4)
    assert micro["expert_load_max_over_mean_worst"] > micro["expert_load_max_over_mean"]  # the layers differ


def test_ranks_and_zero_stages_agree(data_root, tmp_path_factory):
    """The same global batch gives the same losses on 1 rank, 2 ranks ZeRO-2 and 2 ranks ZeRO-3."""
    one = losses(smoke_run(tmp_path_factory, "dense1", DENSE1))
    z2 = losses(smoke_run(tmp_path_factory, "tiny_dense-zero2", ["model=tiny_dense", "deepspeed=zero2"], nproc=2))
    z3 = losses(smoke_run(tmp_path_factory, "tiny_dense-zero3", ["model=tiny_dense", "deepspeed=zero3"], nproc=2))
    offload = losses(smoke_run(tmp_path_factory, "tiny_dense-zero3_offload",
                               ["model=tiny_dense", "deepspeed=zero3_offload"], nproc=2))
    for key in one:
        assert z2[key][0] == pytest.approx(one[key][0], rel=1e-4), key
        assert z3[key][0] == pytest.approx(z2[key][0], rel=1e-4), key
        assert offload[key][0] == pytest.approx(z3[key][0], rel=1e-4), key


@pytest.mark.parametrize("nproc, zero, stage, step", [
    (2, "zero2", "reasoning", 1),  # right after a stage switch
    (1, "zero1", "general", None),  # one rank, at a random step of General
])
def test_resume_after_sigkill_is_exact(data_root, tmp_path_factory, tmp_path, nproc, zero, stage, step):
    # checkpoint.keep=20 as in test_faults.py's references: one shared run for both files
    overrides = ["model=tiny_dense", f"deepspeed={zero}", "eval.enabled=false", *EVERY_STEP, "checkpoint.keep=20"]
    reference = losses(smoke_run(tmp_path_factory, f"ref-{nproc}-{zero}", overrides, nproc=nproc))
    if step is None:
        step = random.Random(os.getpid()).randint(1, SMOKE_STEPS[stage] - 1)
    run_dir = tmp_path / "killed"
    kill_when([*SMOKE, f"run_dir={run_dir}", *overrides], run_dir, stage, step, nproc=nproc)
    before = steps(run_dir)
    assert before and len(before) < 8  # it really died mid-run
    proc = run_train([*SMOKE, f"run_dir={run_dir}", *overrides], nproc=nproc)
    assert proc.returncode == 0, proc.stdout[-4000:]
    resumed = [r for r in records(run_dir) if r.get("event") == "stage_start" and r["resumed_at_step"] is not None]
    assert resumed or any(r.get("event") == "stage_start" and r["stage"] == stage for r in records(run_dir))
    # from the kill point or before it (none, killed before the first save), not later: every rank died with the
    # launcher (none trained on and saved again)
    for resume in [r for r in records(run_dir) if r.get("event") == "resume"][:1]:
        assert resume["stage"] != stage or int(resume["checkpoint"].rsplit("step", 1)[1]) <= step, resume
    assert losses(run_dir) == reference  # bit for bit, loss and gradient norm at every step


def test_sigterm_saves_exits_75_and_resumes_exactly(data_root, tmp_path_factory, tmp_path):
    overrides = ["model=tiny_dense", "deepspeed=zero1", "eval.enabled=false", *EVERY_STEP, "checkpoint.keep=20"]
    reference = losses(smoke_run(tmp_path_factory, "ref-1-zero1", overrides))
    run_dir = tmp_path / "preempted"
    proc = subprocess.Popen(train_cmd([*SMOKE, f"run_dir={run_dir}", *overrides]), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not any(r["step"] == 2 for r in steps(run_dir)):
        assert proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 75
    events = [r for r in records(run_dir) if r.get("event") == "preempted"]
    assert len(events) == 1
    last = steps(run_dir)[-1]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"0-general-step{last['step']:07d}"
    proc = run_train([*SMOKE, f"run_dir={run_dir}", *overrides])
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert losses(run_dir) == reference


def test_sigusr1_at_a_stage_end_leaves_at_once_and_the_relaunch_finishes_the_stage(data_root, tmp_path_factory,
                                                                                      tmp_path):
    """SIGUSR1 (SLURM's `--signal=USR1@...`) is a preemption like SIGTERM. Received in a stage's last step, the
    run used to go on through the stage-end work and the next stage before it left; now the stage-end checkpoint
    is written once and the process exits 75, and the relaunch does that stage's evaluation, with the stage's RoPE
    base (1e6 for Long Context), before anything else; also with checkpoint.export_hf=false, where no missing
    export tells it so."""
    overrides = ["model=tiny_dense", "deepspeed=zero1", "checkpoint.export_hf=false", *EVERY_STEP]
    reference = smoke_run(tmp_path_factory, "ref-1-zero1-noexport", overrides)
    run_dir = tmp_path / "preempted"
    proc = run_train([*SMOKE, f"run_dir={run_dir}", *overrides], env={"TRISTAGE_INJECT": "sigusr1@long_context:2"})
    assert proc.returncode == 75, proc.stdout[-3000:]
    saves = [Path(r["path"]).name for r in records(run_dir) if r.get("event") == "checkpoint"]
    assert saves[-2:] == ["2-long_context-step0000001", "2-long_context-step0000002"]  # one save for the last step
    assert [r["stage"] for r in records(run_dir) if r.get("event") == "stage_end"] == STAGES[:2]
    assert (run_dir / "preempted").read_text().strip() == "2-long_context-step0000002"
    proc = run_train([*SMOKE, f"run_dir={run_dir}", *overrides])
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert [r["stage"] for r in records(run_dir) if r.get("event") == "stage_end"] == STAGES
    evals = lambda d: [(r["stage"], r["step"], r["heldout_ppl_geomean"]) for r in records(d)
                       if r.get("event") == "eval"]
    assert evals(run_dir)[-1] == evals(reference)[-1] and evals(run_dir)[-1][:2] == ("long_context", 2)
    assert losses(run_dir) == losses(reference)
    assert (run_dir / "checkpoints" / "2-long_context-step0000002" / "stage_finished").exists()


@pytest.mark.parametrize("overrides, needle", [
    (["model.hidden_size=64"], "different model shape"),
    # a data set of its own name: prepared again in place, the session's fixture would change under other runs
    (["data.tokenizer.vocab_size=768", "data.name=fixture_vocab768"], "tokenizer"),
])
def test_resume_refuses_a_changed_model_or_tokenizer(data_root, tmp_path, overrides, needle):
    run_dir = tmp_path / "run"
    base = [*SMOKE, f"run_dir={run_dir}", "model=tiny_dense", "max_steps=1", "eval.enabled=false"]
    assert run_train(base).returncode == 0
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    proc = run_train([*base, *overrides])
    assert proc.returncode == 2
    assert needle in proc.stdout
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before  # nothing overwritten


def test_carry_optimizer_false_resets_adamw_at_the_switch(data_root, tmp_path_factory):
    """Same weights into Reasoning either way (its first loss is equal); fresh AdamW moments change its updates."""
    carried = losses(smoke_run(tmp_path_factory, "carry", ["model=tiny_dense", "deepspeed=zero2", "eval.enabled=false"]))
    reset = losses(smoke_run(tmp_path_factory, "reset", ["model=tiny_dense", "deepspeed=zero2", "eval.enabled=false",
                                                          "curriculum.stages.reasoning.carry_optimizer=false"]))
    assert all(reset[("general", s)] == carried[("general", s)] for s in range(1, 5))
    assert reset[("reasoning", 1)][0] == carried[("reasoning", 1)][0]
    assert abs(reset[("reasoning", 2)][0] - carried[("reasoning", 2)][0]) > 1e-3


def test_curriculum_start_on_a_run_in_progress_is_ignored_and_said(data_root, tmp_path_factory, tmp_path):
    """A relaunch with curriculum.start=reasoning of a run stopped after General resumes it; the start it names
    made Reasoning count as the run's first stage, which kept the AdamW moments carry_optimizer=false resets."""
    overrides = ["model=tiny_dense", "deepspeed=zero2", "eval.enabled=false",
                 "curriculum.stages.reasoning.carry_optimizer=false"]
    reset = smoke_run(tmp_path_factory, "reset", overrides)
    run_dir = stopped_at(reset, 4, tmp_path / "run")  # General done
    proc = run_train([*SMOKE, f"run_dir={run_dir}", *overrides, "curriculum.start=reasoning"])
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert ("note: curriculum.start applies only to a new run; this run_dir resumes its checkpoint "
            "'0-general-step0000004' (ignored)") in proc.stdout
    assert losses(run_dir) == losses(reset)  # the moments were reset at the switch, as in the uninterrupted run


def test_start_at_a_later_stage_from_an_hf_export(data_root, tmp_path_factory, tmp_path):
    """`curriculum.start=long_context init_from=<run>/hf/reasoning` trains only Long Context, from those weights:
    its first loss (a forward before any update, on the same data) is the full run's, to fp32 rounding."""
    full = smoke_run(tmp_path_factory, "dense1", DENSE1)
    run_dir = tmp_path / "lc_only"
    proc = run_train([*SMOKE, f"run_dir={run_dir}", "model=tiny_dense", "curriculum.start=long_context",
                      f"init_from={full / 'hf' / 'reasoning'}"])
    assert proc.returncode == 0, proc.stdout[-3000:]
    got = losses(run_dir)
    assert list(got) == [("long_context", 1), ("long_context", 2)]
    assert got[("long_context", 1)][0] == pytest.approx(losses(full)[("long_context", 1)][0], rel=1e-6)
    starts = [r for r in records(run_dir) if r.get("event") == "stage_start"]
    assert [(r["stage"], r["rope_theta"]) for r in starts] == [("long_context", 1e6)]
    # where the weights came from is in the log, not only in config.yaml
    assert [(r["stage"], r["weights"], r["rope_theta"]) for r in records(run_dir) if r.get("event") == "init_from"] == [
        ("long_context", str(full / "hf" / "reasoning"), 10_000.0)]
    # Reasoning's export was trained at base 10,000, Long Context trains at 1,000,000 (ABF): said, as released
    # Qwen3 weights (1,000,000) given to a General stage (10,000) would be
    assert (f"note: init_from={full / 'hf' / 'reasoning'} was trained at RoPE base 10000; stage 'long_context' "
            f"trains at curriculum.stages.long_context.rope_theta=1e+06") in proc.stdout
    # the fixture tokenizer has 1,024 ids, tiny_dense 8,192 embedding rows: said once, with the size that fits
    assert proc.stdout.count("7,168 embedding rows no token reaches") == 1
    assert "model.vocab_size=1024 would fit it" in proc.stdout


def test_weights_of_another_tokenizer_or_too_few_embedding_rows_are_refused(data_root, tmp_path_factory, tmp_path):
    """`init_from` an export whose tokenizer has another vocabulary trained on ids that mean other tokens (it was
    accepted); a model.vocab_size below the tokenizer's was reported as a damaged shard."""
    import shutil

    from data.config import TokenizerConfig
    from data.tokenizer import train_sentencepiece

    full = smoke_run(tmp_path_factory, "dense1", DENSE1)
    other = tmp_path / "other"
    shutil.copytree(full / "hf" / "reasoning", other)
    lines = {"eng": [json.loads(line)["text"] for line in (ROOT / "tests/fixtures/corpus/sotu.jsonl").open()]}
    trained = train_sentencepiece(lines, TokenizerConfig(vocab_size=600), tmp_path / "tok")
    shutil.copyfile(trained, other / "tokenizer.model")
    proc = run_train([*SMOKE, f"run_dir={tmp_path / 'run'}", "model=tiny_dense", "curriculum.start=long_context",
                      f"init_from={other}"])
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert f"'init_from' = '{other}': its tokenizer {other / 'tokenizer.model'} has another vocabulary" in proc.stdout
    # weights of the same shapes that compute with another norm epsilon (or MoE routing) were taken unsaid
    eps = tmp_path / "eps"
    shutil.copytree(full / "hf" / "reasoning", eps)
    config = json.loads((eps / "config.json").read_text())
    (eps / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    proc = run_train([*SMOKE, f"run_dir={tmp_path / 'run'}", "model=tiny_dense", "curriculum.start=long_context",
                      f"init_from={eps}"])
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert (f"'init_from' = '{eps}': its rms_norm_eps=1e-05 differs from model.rms_norm_eps=1e-06; set "
            "model.rms_norm_eps to match") in proc.stdout
    proc = run_train([*SMOKE, f"run_dir={tmp_path / 'small'}", "model=tiny_dense", "model.vocab_size=512"])
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert "config key 'model.vocab_size' = 512: smaller than the tokenizer's 1024 tokens" in proc.stdout
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "small" / "checkpoints").exists()


def test_heldout_perplexity_in_training_scores_each_language_on_all_its_texts(data_root, tmp_path_factory):
    """The loop's per-language perplexity cuts each held-out text of a language (UDHR articles, the Bible book)
    on its own and pools them, as the evaluation suite does; it took the first tokens of the two joined, which were
    the Bible's where a language has one and the UDHR's elsewhere."""
    from data.config import compose
    from data.prepare import prepare
    from models.hf import load_hf
    from train.eval import ppl

    run_dir = smoke_run(tmp_path_factory, "dense1", DENSE1)
    last = [r for r in records(run_dir) if r.get("event") == "eval"][-1]
    manifest = prepare(compose("fixture", [f"root={data_root}"]))
    model = load_hf(run_dir / "hf" / "long_context").eval()
    suite = ppl.perplexity(model, manifest, 256, max_tokens=256, batch_size=4)  # experiment=smoke's eval sizes
    assert list(last["heldout_ppl"]) == sorted(suite["by_language"])[:4]
    for lang, value in last["heldout_ppl"].items():
        assert value == pytest.approx(suite["by_language"][lang]["all"], rel=1e-5), lang
    assert any(len(suite["by_language"][lang]) == 3 for lang in last["heldout_ppl"])  # udhr, bible and all


def test_a_relaunch_with_another_config_keeps_the_earlier_one(tmp_path):
    from train.config import ConfigError
    from train.relaunch import record_config

    record_config(tmp_path, "a: 1\n")
    record_config(tmp_path, "a: 1\n")  # the same: nothing to keep
    assert not (tmp_path / "config_history").exists()
    record_config(tmp_path, "a: 2\n")
    record_config(tmp_path, "a: 3\n")
    assert (tmp_path / "config.yaml").read_text() == "a: 3\n"
    assert [(p.name, p.read_text()) for p in sorted((tmp_path / "config_history").iterdir())] == [
        ("config.1.yaml", "a: 1\n"), ("config.2.yaml", "a: 2\n")]
    (tmp_path / "config.yaml").unlink()
    (tmp_path / "config.yaml").mkdir()  # unwritable (a full disk was a bare OSError traceback on rank 0 alone)
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'config.yaml'} cannot be recorded (")):
        record_config(tmp_path, "a: 4\n")


def test_a_relaunch_of_a_finished_run_says_so_and_trains_nothing(data_root, tmp_path_factory, tmp_path):
    """It printed a resume line and exited without a word (correct, but a user could not tell it had finished).
    On another world size it re-sharded the whole checkpoint (weights and AdamW state, left on disk) to say so."""
    import shutil

    run_dir = tmp_path / "done"
    shutil.copytree(smoke_run(tmp_path_factory, "dense1", DENSE1), run_dir)
    before, config = records(run_dir), (run_dir / "config.yaml").read_text()
    proc = run_train([*SMOKE, f"run_dir={run_dir}", *DENSE1, "logging.console=true"], nproc=2)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert ("the curriculum is complete (2-long_context-step0000002); nothing to do (a new run needs another "
            "run_dir)") in proc.stdout
    assert records(run_dir) == before  # no model/resume events, no steps
    assert not (run_dir / "checkpoints" / ".universal").exists()  # nothing re-sharded for 2 ranks
    # the record of what the run trained with stays (it was overwritten with this launch's, console=true here)
    assert (run_dir / "config.yaml").read_text() == config and not (run_dir / "config_history").exists()
    # DeepSpeed's converter lies beside the checkpoints, not among the partial saves of .tmp/
    assert (run_dir / "checkpoints" / "zero_to_fp32.py").exists()
    assert not list((run_dir / "checkpoints" / ".tmp").glob("zero_to_*.py"))


def test_a_second_live_launch_into_the_run_dir_is_refused(data_root, tmp_path):
    """Two launches training one run_dir interleaved their metrics and deleted each other's checkpoints (seen
    with ranks a SIGTERMed `deepspeed` launcher left running). Rank 0 holds <run_dir>/.lock for the launch; a
    second launch exits 2 naming the holder and writes nothing; the lock goes with the holder."""
    import fcntl

    from train.config import ConfigError
    from train.relaunch import lock_run_dir

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    held = lock_run_dir(run_dir)  # this test process stands for the live launch
    holder = (run_dir / ".lock").read_text().strip()
    assert holder.startswith(f"pid {os.getpid()} on ")
    proc = run_train([*SMOKE, f"run_dir={run_dir}", "model=tiny_dense"])
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert (f"config key 'run_dir' = '{run_dir}': in use by {holder} (it holds {run_dir / '.lock'}); stop that "
            f"launch or choose another run_dir (if it is gone, as a node that died holding the lock on NFS can "
            f"leave it, delete {run_dir / '.lock'})") in proc.stdout
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]
    with pytest.raises(ConfigError, match="in use by pid"):
        lock_run_dir(run_dir)
    held.close()  # the holder ends: the next launch takes the lock
    again = lock_run_dir(run_dir)
    assert len((run_dir / ".lock").read_text().splitlines()) == 1  # only its holder: a refusal names no old one
    with pytest.raises(BlockingIOError):
        fcntl.flock(open(run_dir / ".lock"), fcntl.LOCK_EX | fcntl.LOCK_NB)
    (run_dir / ".lock").unlink()  # what the message says to do when the holder is gone but its lock stayed
    third = lock_run_dir(run_dir)  # a new file: a lock of its own
    third.close()
    again.close()


def test_logged_throughput_mfu_and_aux_loss_follow_their_formulas(data_root, tmp_path):
    """2 ranks: tokens/s = the global batch's tokens / step time; MFU = tokens/s x flops_per_token (attention at
    full cost) / (peak x ranks), the formula train/metrics.py states; with a z-loss, aux = 0.001 x balance +
    0.01 x z and loss = lm + aux. No test set a peak (so no MFU was ever logged on the CPU) or a z-loss."""
    from models import load_preset
    from models.params import flops_per_token

    proc = run_train([*SMOKE, f"run_dir={tmp_path}", "model=tiny_moe", "model.router_z_loss_coef=0.01",
                      "logging.peak_tflops=0.001", "deepspeed=zero2", "max_steps=3", "eval.enabled=false",
                      "checkpoint.export_hf=false"], nproc=2)
    assert proc.returncode == 0, proc.stdout[-3000:]
    per_step = steps(tmp_path)
    assert len(per_step) == 3
    fpt = flops_per_token(load_preset("tiny_moe"), 64, causal_halved=False)
    for r in per_step:
        samples = r["samples"][1] - r["samples"][0]  # the global batch, in sequences
        assert samples * r["seq_len"] == 1024
        assert r["tokens_per_s"] == pytest.approx(1024 / r["step_time_s"], rel=1e-6)
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * fpt / (0.001e12 * 2), rel=1e-6)
        assert r["z_loss"] > 0
        assert r["aux_loss"] == pytest.approx(0.001 * r["balance_loss"] + 0.01 * r["z_loss"], rel=1e-6)
        assert r["loss"] == pytest.approx(r["lm_loss"] + r["aux_loss"], rel=1e-9)


RESET_AT_REASONING = ["model=tiny_dense", "deepspeed=zero2", "eval.enabled=false",
                      "curriculum.stages.reasoning.carry_optimizer=false"]


def test_a_mid_stage_resume_keeps_the_moments_of_a_carry_optimizer_false_stage(data_root, tmp_path_factory, tmp_path):
    """m23 (`fresh` dropped from the reset condition in _enter_stage): a relaunch in the middle of a stage with
    carry_optimizer=false reset AdamW's moments again at the resume, so the resumed run differs from the
    uninterrupted one. m32 (stage_end_pending set for every stage-end checkpoint, the stage_finished marker
    ignored): a relaunch from General's finished stage-end checkpoint exported and closed General again.
    Expected values: the shared "reset" smoke run (the one test_carry_optimizer_false_... uses)."""
    reference = smoke_run(tmp_path_factory, "reset", RESET_AT_REASONING)
    run_dir = stopped_at(reference, 4, tmp_path / "run")  # General done, its stage-end work done (marker there)
    proc = run_train([*SMOKE, f"run_dir={run_dir}", *RESET_AT_REASONING, "max_steps=1"])  # Reasoning step 1, saved
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "1-reasoning-step0000001"
    proc = run_train([*SMOKE, f"run_dir={run_dir}", *RESET_AT_REASONING])  # resumes in the middle of Reasoning
    assert proc.returncode == 0, proc.stdout[-3000:]
    recs = records(run_dir)
    assert [r["stage"] for r in recs if r.get("event") == "stage_end"] == ["general", "reasoning", "long_context"]
    assert [r["stage"] for r in recs if r.get("event") == "hf_export"] == ["general", "reasoning", "long_context"]
    assert losses(run_dir) == losses(reference)


def test_eval_every_log_every_and_isolated_non_finite_steps(data_root, tmp_path):
    """Settings no test set (each found by a hand mutation the suite let through): eval_every=2 over General's 4
    steps evaluates after step 2 and at the stage end, not before the first step; log_every=3 logs step 3 and the
    stage's last step 4; two isolated NaN steps (2 and 4) under faults.max_consecutive_skips=1 are not
    'consecutive' (an applied step resets the count), so the run finishes."""
    proc = run_train([*SMOKE, f"run_dir={tmp_path}", "model=tiny_dense", "deepspeed=zero1", "curriculum.order=[general]",
                      "checkpoint.export_hf=false", "curriculum.stages.general.eval_every=2", "logging.log_every=3",
                      "faults.max_consecutive_skips=1"], env={"TRISTAGE_INJECT": "nan@general:2,nan@general:4"})
    assert proc.returncode == 0, proc.stdout[-3000:]
    recs = records(tmp_path)
    assert [r["step"] for r in recs if r.get("event") == "eval"] == [2, 4]
    assert [r["step"] for r in steps(tmp_path)] == [3, 4]
    skips = [r for r in recs if r.get("event") == "skipped_update"]
    assert [(r["step"], r["consecutive"], r["skipped_total"]) for r in skips] == [(2, 1, 1), (4, 1, 2)]
