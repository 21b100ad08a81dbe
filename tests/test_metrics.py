"""What reaches wandb: one run per run directory, rows by global step that wandb keeps (its steps only grow), and
events apart from the step values they would overwrite."""
from __future__ import annotations

import json
import re

import pytest

from train.config import ConfigError
from train.metrics import MetricsLogger, wandb_run_id


class _Run:
    """Records what the logger sends, in the form wandb.log takes it."""

    step = 0

    def __init__(self):
        self.rows = []

    def log(self, data, step):
        assert step >= self.step, f"wandb drops a step below its current one ({step} < {self.step})"
        self.step = step
        self.rows.append((step, data))


def test_events_keep_to_their_own_keys_and_resumed_steps_are_not_sent(tmp_path):
    logger = MetricsLogger.__new__(MetricsLogger)  # just the wandb side
    logger._wandb, logger._wandb_step, logger._step_file = _Run(), 0, tmp_path / "wandb_step"
    for record in [
        {"event": "model", "parameters": 123},  # no step: at the current one
        {"event": "stage_start", "stage": "general", "global_step": 0, "seq_len": 64, "rope_theta": 1e4},
        {"stage": "general", "step": 4, "global_step": 4, "lr": 3e-3, "seq_len": 64, "loss": 5.0},
        {"event": "stage_start", "stage": "reasoning", "global_step": 4, "seq_len": 256, "lr": 1e-3},
        {"event": "resume", "global_step": 3, "checkpoint": "x"},  # a relaunch from step 3 ...
        {"stage": "reasoning", "step": 1, "global_step": 4, "lr": 3e-3, "loss": 4.9},  # ... logs step 4 again
        {"stage": "reasoning", "step": 2, "global_step": 5, "lr": 2e-3, "loss": 4.8, "ok": True,
         "loss_by_language": {"eng": 4.7, "fra": 4.9}, "ledger": {"tokens": 80, "source": {"bible": 80}},
         "expert_load": [[0.5, 0.5]]},
        {"event": "eval", "stage": "reasoning", "global_step": 5, "heldout_ppl": {"eng": 30.0}},
    ]:
        logger._to_wandb(record)
    rows = logger._wandb.rows
    assert rows[0] == (0, {"model/parameters": 123})
    assert rows[2] == (4, {"step": 4, "global_step": 4, "lr": 3e-3, "seq_len": 64, "loss": 5.0})
    assert rows[3] == (4, {"stage_start/global_step": 4, "stage_start/seq_len": 256, "stage_start/lr": 1e-3})
    assert [step for step, _ in rows] == [0, 0, 4, 4, 4, 5, 5]  # the resume event (step 3) is not sent
    # one level of the tables; no flag, no list, no deeper table
    assert rows[-2] == (5, {"step": 2, "global_step": 5, "lr": 2e-3, "loss": 4.8, "loss_by_language/eng": 4.7,
                            "loss_by_language/fra": 4.9, "ledger/tokens": 80})
    assert rows[-1] == (5, {"eval/global_step": 5, "eval/heldout_ppl/eng": 30.0})


def test_each_run_directory_has_its_own_wandb_id(tmp_path):
    a, b = tmp_path / "sweep" / "0-abc", tmp_path / "other" / "0-abc"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    first = wandb_run_id(a)
    assert wandb_run_id(a) == first != wandb_run_id(b)  # a relaunch continues; another folder does not
    assert first.startswith("0-abc-") and (a / "wandb_id").read_text().strip() == first
    for damaged in ("", "runs/a:b"):  # wandb's own error named no file (an empty id) or none at all (offline)
        (b / "wandb_id").write_text(damaged + "\n")
        with pytest.raises(ConfigError, match=re.escape(f"{b / 'wandb_id'}: holds {damaged!r}, not a wandb run id")):
            wandb_run_id(b)


def test_a_line_a_killed_launch_cut_off_stays_apart_from_the_next(tmp_path):
    """The next launch's first record was appended to the cut-off line: both lost to a JSON reader."""
    from test_train_config import compose_cfg

    cfg = compose_cfg([f"run_dir={tmp_path}", "logging.console=false", "logging.wandb.mode=disabled"])
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    logger = MetricsLogger(cfg, tmp_path, 0, {})
    logger.log({"event": "resume", "global_step": 1})
    logger.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert lines[1] == '{"step": 2, "lo' and json.loads(lines[2])["event"] == "resume"


def test_an_offline_resume_does_not_send_its_steps_again(tmp_path):
    """A resumed offline wandb run starts at step 0 in wandb's eyes, so the steps a resume logs again (3-5 here)
    were all sent twice; the last step sent is kept in <run_dir>/wandb_step. Real wandb, offline."""
    from test_train_config import compose_cfg

    cfg = compose_cfg(["logging.wandb.mode=offline", f"run_dir={tmp_path}", "logging.console=false"])
    sent = []
    for first, last in [(1, 5), (3, 7)]:  # a launch to step 5, then a resume from step 2's checkpoint
        logger = MetricsLogger(cfg, tmp_path, 0, {})
        log = logger._wandb.log
        logger._wandb.log = lambda data, step, log=log: (sent.append(step), log(data, step=step))
        for step in range(first, last + 1):
            logger.log({"stage": "general", "step": step, "global_step": step, "loss": 1.0 / step})
        logger.close()
    assert sent == [1, 2, 3, 4, 5, 5, 6, 7]  # step 5 again (the same row), not 3 and 4
    assert (tmp_path / "wandb_step").read_text() == "7\n"


def test_redaction_hides_secret_values_only(tmp_path, capsys):
    """Only keys that end in a secret word lose their value (an unset one stays visible as unset); a key that merely
    starts with one (`tokenizer`, `tokens_per_s`) keeps its value."""
    from train.metrics import redact

    cfg = {"logging": {"wandb": {"api_key": "k3y", "project": "p"}}, "hf_token": "t0k", "password": "",
           "secret": None, "tokenizer": {"path": "x.model"}, "tokens_per_s": 5, "list": [{"db_password": "pw"}]}
    assert redact(cfg) == {"logging": {"wandb": {"api_key": "***", "project": "p"}}, "hf_token": "***",
                           "password": "", "secret": None, "tokenizer": {"path": "x.model"}, "tokens_per_s": 5,
                           "list": [{"db_password": "***"}]}


def test_redaction_ignores_the_keys_case_and_the_values_type():
    """An environment-style key (WANDB_API_KEY, HF_TOKEN) or any other case (Api_Key) is a secret too, and so is a
    value that is not a string: `+x.API_KEY=12345` reaches the config as the integer 12345 (a 0 or a float
    alike). On the command line the same keys are taken out of Hydra's sight and out of error messages."""
    from omegaconf import OmegaConf

    from train.__main__ import _apply_secrets, redact_text, take_secrets
    from train.metrics import redact

    cfg = {"env": {"WANDB_API_KEY": "k3y", "Api_Key": "k", "HF_TOKEN": 12345, "Db_Password": 0, "SECRET": 2.5,
                   "TOKENS": 7, "Unset_Token": None}, 3: "not a key"}
    assert redact(cfg) == {"env": {"WANDB_API_KEY": "***", "Api_Key": "***", "HF_TOKEN": "***", "Db_Password": "***",
                                   "SECRET": "***", "TOKENS": 7, "Unset_Token": None}, 3: "not a key"}
    argv = ["train", "+env.WANDB_API_KEY=12345", "+env.Api_Key=0", "+env.TOKENS=7"]
    rest, secrets = take_secrets(argv)
    assert rest == ["train", "+env.TOKENS=7"] and secrets == argv[1:3]
    dump = OmegaConf.create({"env": {}})
    _apply_secrets(dump, secrets)
    assert OmegaConf.to_container(dump) == {"env": {"WANDB_API_KEY": 12345, "Api_Key": 0}}  # Hydra's int
    yaml = OmegaConf.to_yaml(OmegaConf.create(redact(OmegaConf.to_container(dump))))  # as config.yaml is written
    assert "12345" not in yaml and yaml.count("'***'") == 2
    assert redact_text("env.WANDB_API_KEY: 12345 is not a string", secrets) == "env.WANDB_API_KEY: *** is not a string"


def test_a_step_record_is_one_console_line_and_non_finite_values_are_null_json(tmp_path, capsys):
    """metrics.jsonl must stay JSON (NaN is not); steps print the one-line summary, events their fields."""
    import json

    logger = MetricsLogger.__new__(MetricsLogger)  # just the file and console side
    logger.rank, logger.console, logger._wandb = 0, True, None
    logger._file = open(tmp_path / "metrics.jsonl", "a")
    logger.log({"stage": "general", "step": 3, "stage_steps": 10, "loss": float("nan"), "lr": 3e-4,
                "grad_norm": float("inf"), "tokens_per_s": 12345.6, "seq_len": 64, "rope_theta": 1e4, "mfu": 0.4123})
    logger.log({"event": "eval", "stage": "general", "global_step": 3, "heldout_ppl_geomean": 48.99})
    logger.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    first = json.loads(lines[0], parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))
    assert first["loss"] is None and first["grad_norm"] is None
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "[general] step 3/10  loss nan  lr 3.00e-04  12,346 tok/s  seq 64  theta 10000  mfu 41.2%"
    assert out[1] == "[general] eval: global_step=3, heldout_ppl_geomean=48.99"
