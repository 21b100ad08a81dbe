"""Real runs: the tiny curriculum-effect experiment (`python -m train` on the smoke curriculum with the stage-end
suite switched on, then every evaluation of every stage), the eval CLI on a checkpoint and on an HF export, and
`python -m train.report` on the run directory."""
import json
import subprocess
import sys

import matplotlib.image
import pytest

from train.eval.__main__ import main as eval_main
from train.eval.outputs import mean
from train.experiments import curriculum_effect
from trainutil import ROOT, records, steps

STAGES = ["general", "reasoning", "long_context"]


@pytest.fixture(scope="module")
def run_dir(data_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("effect") / "run"
    assert curriculum_effect.main(["--tiny", "--run-dir", str(run_dir), "--device", "cpu"]) == 0
    return run_dir


def test_stage_end_suite_runs_inside_training(run_dir):
    recs = records(run_dir)
    suites = [r for r in recs if r.get("event") == "eval_suite"]
    assert [r["stage"] for r in suites] == STAGES
    assert [r["global_step"] for r in suites] == [4, 6, 8]  # right after each stage's last step
    evals = {r["global_step"]: r for r in recs if r.get("event") == "eval"}
    for r in suites:
        assert 0.0 <= r["reasoning_accuracy"] <= 1.0 and r["heldout_ppl_geomean"] > 1.0
        # the suite's perplexity (on the export) is the loop's (on the training model) at that step: one name,
        # one number (they used 512 and 1,024 tokens per held-out text)
        assert r["heldout_ppl_geomean"] == pytest.approx(evals[r["global_step"]]["heldout_ppl_geomean"], rel=1e-4)
        assert set(r["passkey"]) == {"plain", "yarn", "dca"}
    # loss at 4x the General length (4 x 64) after every stage; at 4x Long Context (4 x 256) in every mode
    assert set(suites[0]["loss_beyond"]) == {"plain@256", "yarn@256", "dca@256"}
    assert set(suites[2]["loss_beyond"]) == {"plain@256", "plain@1024", "yarn@1024", "dca@1024"}
    assert suites[2]["loss_beyond"]["plain@256"] is None  # 256 is the Long Context stage's own length
    assert all(v > 0 for k, v in suites[2]["loss_beyond"].items() if k != "plain@256")


def test_experiment_writes_the_curriculum_table(run_dir):
    text = (run_dir / "curriculum_effect.md").read_text()
    assert "Command: `python -m train.experiments.curriculum_effect --tiny`" in text
    assert "| passkey accuracy at 256 tokens (4x General), plain RoPE |" in text
    effect = json.loads((run_dir / "eval" / "curriculum.json").read_text())
    assert effect["general_len"] == 64 and effect["long_context_len"] == 256
    for s in STAGES:
        assert 0.0 <= effect["reasoning_accuracy"][s] <= 1.0
        assert 0.0 <= effect["abf"][s]["passkey"] <= 1.0
    for m in ("plain", "yarn", "dca"):
        assert 0.0 <= effect["extension"][m]["passkey"] <= 1.0 and effect["extension"][m]["loss_beyond"] > 0
    # the table's long-position loss is the mean of the stored curve over positions 64..255
    curves = json.loads((run_dir / "eval" / "general" / "position_loss.json").read_text())["curves"]
    plain = next(c for c in curves if c["mode"] == "plain" and c["length"] == 256)
    assert effect["abf"]["general"]["loss_beyond"] == pytest.approx(mean(plain["curve"][64:256]))
    summary = (run_dir / "eval" / "summary.md").read_text()
    assert all(f"## {s} (trained at" in summary for s in STAGES)


def test_cli_gives_the_same_numbers_for_a_checkpoint_and_its_export(run_dir, tmp_path):
    ckpt = run_dir / "checkpoints" / "2-long_context-step0000002"
    common = ["--max-tokens", "64", "--device", "cpu"]
    assert eval_main(["ppl", str(ckpt), "--out", str(tmp_path / "a"), *common]) == 0
    assert eval_main(["ppl", str(run_dir / "hf" / "long_context"), "--out", str(tmp_path / "b"), *common]) == 0
    a = json.loads((tmp_path / "a" / "long_context" / "ppl.json").read_text())
    b = json.loads((tmp_path / "b" / "long_context" / "ppl.json").read_text())
    assert a["seq_len"] == b["seq_len"] == 256
    assert a["by_component"] == pytest.approx(b["by_component"], rel=1e-5)
    assert eval_main(["passkey", str(tmp_path), "--device", "cpu"]) == 2  # not a run, export or checkpoint


def test_report_on_the_run_directory(run_dir):
    proc = subprocess.run([sys.executable, "-m", "train.report", str(run_dir)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = run_dir / "report"
    for name in ("loss", "perplexity", "passkey", "position_loss", "throughput"):
        image = matplotlib.image.imread(out / f"{name}.png")
        assert image.shape[0] > 200 and image.shape[1] > 400, name
    assert not (out / "expert_load.png").exists()  # a dense model
    md = (out / "report.md").read_text()
    last = steps(run_dir)[-1]
    # the smoke curriculum: Long Context's own 2 steps of 1,024 tokens (the run's total, 8,192, was shown before)
    assert "| long_context | 2 | 2048 | 256 | 1e+06 | " in md and f"| {last['lm_loss']:.3f} |" in md
    assert "## Curriculum effect" in md and "![passkey](passkey.png)" in md


def test_a_failing_stage_end_suite_is_logged_and_training_goes_on(data_root, tmp_path):
    """2 ranks: the suite fails on rank 0 at the General stage's end; the failure is logged with its reason,
    rank 1 does not hang waiting, and the Reasoning stage trains and runs its suite."""
    from trainutil import SMOKE, run_train

    run = tmp_path / "run"
    proc = run_train([*SMOKE, f"run_dir={run}", "model=tiny_dense", "eval.stage_end_suite=true",
                      "curriculum.order=[general,reasoning]"], nproc=2,
                     env={"TRISTAGE_INJECT": "suite_error@general:4:0"}, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "the general evaluation suite failed (RuntimeError: injected evaluation failure)" in proc.stdout
    suites = {r["stage"]: r for r in records(run) if r.get("event") == "eval_suite"}
    assert suites["general"]["error"] == "RuntimeError: injected evaluation failure"
    assert "reasoning_accuracy" not in suites["general"]
    assert 0.0 <= suites["reasoning"]["reasoning_accuracy"] <= 1.0 and "error" not in suites["reasoning"]
    assert [r["stage"] for r in steps(run)][-1] == "reasoning"


def test_suite_is_skipped_when_a_second_copy_would_not_fit(monkeypatch):
    """The estimate for Qwen3-0.6B under the Qwen3 curriculum: 596,049,920 parameters x 2 bytes x 1.25, plus per
    token of the suite's longest sequences (4x the stage's length) 28 layers x 8 K/V heads x 128 x 2 (K and V) x
    2 bytes = 114,688 B and (4 x 1,024 + 3 x 3,072) x 2 bytes = 26,624 B of activations. General: 1.490e9 +
    16,384 x 141,312 = 3.805e9 B (3.5 GiB) for one sequence per forward, 10.75e9 B (10.01 GiB) for four; Long
    Context: 20.01e9 B (18.6 GiB) for one. It used to count the stage's length, not 4x, and one sequence where
    the suite read four; now it reads four where they fit, else one."""
    import torch

    from test_train_config import compose_cfg
    from train.eval.suite import suite_long_batch

    cfg = compose_cfg(["model=qwen3_0_6b", "curriculum=qwen3"])
    assert suite_long_batch(cfg, "long_context", torch.device("cpu")) == (4, "")  # only CUDA is checked
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    gib = 2 ** 30
    for free, stage, expect in [
            (11 * gib, "general", (4, "")), (10 * gib, "general", (1, "")),
            (10 * gib, "long_context", (0, "needs ~18.6 GiB on cuda:0 for a second copy of the model and 1 x 131072 "
                                           "tokens, 10.0 GiB free")),
            (3 * gib, "general", (0, "needs ~3.5 GiB on cuda:0 for a second copy of the model and 1 x 16384 tokens, "
                                     "3.0 GiB free"))]:
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free=free: (free, 141 * gib))
        assert suite_long_batch(cfg, stage, torch.device("cuda", 0)) == expect, (free, stage)


def test_a_mid_stage_checkpoint_and_bad_sizes_leave_the_stage_results_alone(run_dir, tmp_path):
    """Evaluating a checkpoint from the middle of a stage used to overwrite eval/<stage>/ (read as "after the
    stage" by the summary and the report); bad sizes were tracebacks; a DCA window as long as a stage's trained
    length failed halfway through `all`, leaving some stages' results and no summary."""
    import shutil

    mid = tmp_path / "checkpoints" / "0-general-step0000001"
    shutil.copytree(run_dir / "checkpoints" / "0-general-step0000004", mid)
    shutil.copy(run_dir / "config.yaml", tmp_path / "config.yaml")
    meta = json.loads((mid / "meta.json").read_text())
    meta["state"]["stage_complete"] = False
    (mid / "meta.json").write_text(json.dumps(meta))
    assert eval_main(["ppl", str(mid), "--max-tokens", "64", "--device", "cpu"]) == 0
    assert (tmp_path / "eval" / mid.name / "ppl.json").exists() and not (tmp_path / "eval" / "general").exists()
    summary = (tmp_path / "eval" / "summary.md").read_text()  # listed, as what it is (it was left out)
    assert "## 0-general-step0000001 (a checkpoint from the middle of a stage)" in summary
    assert "Held-out perplexity" in summary
    for bad in (["--trials", "0"], ["--batch-size", "0"], ["--depths", "1.5"], ["--lengths", "0"]):
        with pytest.raises(SystemExit) as e:
            eval_main(["passkey", str(run_dir), *bad])
        assert e.value.code == 2
    out = tmp_path / "dca"
    assert eval_main(["all", str(run_dir), "--dca-local-size", "64", "--out", str(out), "--device", "cpu"]) == 2
    assert not out.exists()


def test_a_model_outside_a_run_gets_its_results_beside_it(run_dir, tmp_path):
    """Results used to go into the HF folder itself (<hf>/eval/), where the next save_hf to that path deleted
    them; now <folder>-eval/ beside it, and the model's folder is left as it was."""
    import shutil

    from train.eval.target import _manifest_of, _run_config

    hf = tmp_path / "exported"
    shutil.copytree(run_dir / "hf" / "general", hf)
    before = sorted(p.name for p in hf.iterdir())
    manifest = _manifest_of(_run_config(run_dir))
    assert eval_main(["ppl", str(hf), "--seq-len", "64", "--manifest", str(manifest), "--max-tokens", "64",
                      "--device", "cpu"]) == 0
    assert sorted(p.name for p in hf.iterdir()) == before
    assert json.loads((tmp_path / "exported-eval" / "exported" / "ppl.json").read_text())["seq_len"] == 64


def test_bad_inputs_exit_2_naming_what_is_wrong_before_anything_is_written(run_dir, tmp_path, capsys):
    """Each was a traceback with exit 1, or silently taken (--seq-len 0 became the stage's length; --seq-len on a
    run was ignored)."""
    import shutil

    from train.eval.target import _manifest_of, _run_config

    hf = tmp_path / "no_weights"
    shutil.copytree(run_dir / "hf" / "general", hf)
    (hf / "model.safetensors").unlink()
    ckpt = tmp_path / "ckpt"
    shutil.copytree(run_dir / "checkpoints" / "0-general-step0000004", ckpt)
    (ckpt / "mp_rank_00_model_states.pt").unlink()
    outside = tmp_path / "outside"
    shutil.copytree(run_dir / "hf" / "general", outside)
    out = tmp_path / "out"
    cases = [
        (["reasoning", str(run_dir), "--tasks", "nosuchtask"], "--tasks ['nosuchtask']: not reasoning-gym tasks"),
        # past the model's 8,192 positions: ppl and reasoning were written, then DCA's chunk (the trained length)
        # was a ValueError traceback, exit 1
        (["all", str(outside), "--seq-len", "9000", "--manifest", str(_manifest_of(_run_config(run_dir)))],
         f"--seq-len 9000: beyond the 8192 positions of {outside / 'config.json'} (max_position_embeddings)"),
        (["ppl", str(run_dir), "--seq-len", "64"], "--seq-len 64: only for an HF directory"),
        (["ppl", str(run_dir), "--manifest", str(tmp_path / "none.json")], "none.json: no such file"),
        (["ppl", str(hf), "--seq-len", "64", "--manifest", str(tmp_path / "none.json")], f"{hf}: no weights here"),
        (["ppl", str(ckpt)], f"{ckpt}: no weights here (mp_rank_00_model_states.pt missing)"),
        # a folder from outside a run needs both; they were asked for one launch at a time
        (["ppl", str(hf)], f"{hf}: not inside a run directory; pass --seq-len (the trained length) and --manifest "
                           "(the data set it was trained on)"),
        (["ppl", str(hf), "--manifest", str(tmp_path / "m.json")],
         f"{hf}: not inside a run directory; pass --seq-len (the trained length)\n"),
        (["ppl", str(run_dir), "--device", "gpu"], "--device 'gpu'"),
    ]
    if not __import__("torch").cuda.is_available():
        cases.append((["ppl", str(run_dir), "--device", "cuda"], "this machine has no CUDA device"))
    for argv, message in cases:
        assert eval_main([*argv, "--out", str(out)]) == 2, argv
        assert message in capsys.readouterr().err, argv
    with pytest.raises(SystemExit) as e:
        eval_main(["ppl", str(hf), "--seq-len", "0"])
    assert e.value.code == 2
    assert not out.exists()


def test_damaged_files_exit_2_naming_the_file(run_dir, tmp_path, capsys):
    """A truncated or overwritten file of the model to evaluate was a traceback with exit 1, for a checkpoint's
    meta.json without the file's name (a bare JSONDecodeError) and for its truncated model states without any
    (torch: "OSError: [Errno 22] Invalid argument")."""
    import shutil

    from train.eval.target import _manifest_of, _run_config

    manifest = str(_manifest_of(_run_config(run_dir)))
    ckpt = tmp_path / "ckpt"
    shutil.copytree(run_dir / "checkpoints" / "0-general-step0000004", ckpt)
    states = ckpt / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:5000])
    meta = tmp_path / "meta" / "0-general-step0000004"
    shutil.copytree(run_dir / "checkpoints" / "0-general-step0000004", meta)
    (meta / "meta.json").write_text('{"stage": ')
    config = tmp_path / "config"
    shutil.copytree(run_dir / "hf" / "general", config)
    (config / "config.json").write_text("not json")
    weights = tmp_path / "weights"
    shutil.copytree(run_dir / "hf" / "general", weights)
    (weights / "model.safetensors").write_bytes((weights / "model.safetensors").read_bytes()[:1000])
    hf = ["--seq-len", "64", "--manifest", manifest]
    cases = [(["ppl", str(ckpt)], f"{ckpt}: cannot load the checkpoint"),
             (["ppl", str(meta)], f"{meta / 'meta.json'}: cannot read it as JSON"),
             (["ppl", str(config), *hf], f"{config / 'config.json'}: cannot read it as JSON"),
             (["ppl", str(weights), *hf], f"{weights / 'model.safetensors'}: not a readable safetensors file")]
    for argv, message in cases:
        assert eval_main([*argv, "--out", str(tmp_path / "out"), "--device", "cpu"]) == 2, argv
        assert message in capsys.readouterr().err, argv


def test_a_model_of_another_tokenizer_is_refused(run_dir, tmp_path, capsys):
    """Weights evaluated against a data set of another tokenizer read its ids as other text: an HF export, the same
    folder outside the run and a checkpoint all gave perplexities (2,850 for the smoke run's General, 2,687 with
    its own data set) without a word. The same tokenizer in a file of other bytes is still the same ids."""
    import shutil

    from data.config import compose
    from data.prepare import prepare
    from data.tokenizer import load_tokenizer
    from train.eval.target import _manifest_of, _run_config

    other = prepare(compose("fixture", [f"root={tmp_path / 'data'}", "tokenizer.vocab_size=512"]))
    ckpt = run_dir / "checkpoints" / "0-general-step0000004"
    own = json.loads((ckpt / "meta.json").read_text())["tokenizer_fingerprint"]
    theirs = load_tokenizer(other).fingerprint
    assert own != theirs
    outside = tmp_path / "outside"
    shutil.copytree(run_dir / "hf" / "general", outside)
    for target, extra in [(run_dir / "hf" / "general", []), (outside, ["--seq-len", "64"]), (ckpt, [])]:
        argv = ["ppl", str(target), "--manifest", str(other), *extra, "--out", str(tmp_path / "out"),
                "--device", "cpu"]
        assert eval_main(argv) == 2, target
        assert f"{target}: trained with tokenizer {own}, not the data set's {theirs}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    (outside / "tokenizer.model").unlink()  # tokenizer.json alone: another fingerprint, the same vocabulary
    manifest = str(_manifest_of(_run_config(run_dir)))
    assert eval_main(["ppl", str(outside), "--seq-len", "64", "--manifest", manifest, "--max-tokens", "64",
                      "--out", str(tmp_path / "ok"), "--device", "cpu"]) == 0
