"""`train.report` on a hand-written MoE metrics file: resumed steps, stage switches, the expert-load heatmap."""
import json

import matplotlib.image
import pytest

from train import report


def write_metrics(run_dir, lines):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def step(stage, s, g, loss, load=None, **extra):
    return {"stage": stage, "step": s, "global_step": g, "tokens": 100 * g, "loss": loss, "lm_loss": loss,
            "seq_len": 64 if stage == "general" else 256, "rope_theta": 1e4 if stage == "general" else 1e6,
            "tokens_per_s": 1000.0 + g, "expert_load": load, **extra}


def test_moe_run_report(tmp_path):
    uniform = [[0.25] * 4, [0.25] * 4]
    skewed = [[0.7, 0.1, 0.1, 0.1], [0.25] * 4]
    write_metrics(tmp_path, [
        {"event": "stage_start", "stage": "general", "global_step": 0, "seq_len": 64, "rope_theta": 1e4},
        step("general", 1, 1, 5.0, uniform), step("general", 2, 2, 9.9, uniform),
        step("general", 2, 2, 4.0, uniform),  # the same step logged again after a resume: the later one counts
        step("general", 3, 3, 3.5, skewed),
        {"event": "eval", "stage": "general", "global_step": 3, "heldout_ppl": {"eng": 40.0, "fra": 60.0},
         "heldout_ppl_geomean": 48.99},
        {"event": "stage_start", "stage": "long_context", "global_step": 3, "seq_len": 256, "rope_theta": 1e6},
        step("long_context", 1, 4, 3.2, uniform), step("long_context", 2, 5, 3.0, uniform),
        {"event": "eval", "stage": "long_context", "global_step": 5, "heldout_ppl": {"eng": 20.0, "fra": 45.0},
         "heldout_ppl_geomean": 30.0},
    ])
    recs = report.read_metrics(tmp_path)
    assert [r["lm_loss"] for r in report.step_records(recs)] == [5.0, 4.0, 3.5, 3.2, 3.0]
    assert report.stage_switches(recs) == [(3, "long_context")]
    written = report.report(tmp_path)
    assert set(written) == {"loss", "throughput", "perplexity", "expert_load", "report"}
    heat = matplotlib.image.imread(written["expert_load"])
    assert heat.shape[1] > heat.shape[0] > 100  # two panels side by side
    rows = report.stage_table(recs, report.stage_perplexities(recs, {}))
    assert rows[0][:7] == ["general", 3, 300, 64, "10000", 5.0, 3.5]
    assert rows[1][7] == pytest.approx((20.0 * 45.0) ** 0.5)  # geometric mean over languages
    md = written["report"].read_text()
    assert "## Expert load (MoE)" in md and "## Passkey retrieval" not in md  # no eval/ results in this run


def test_missing_metrics_is_an_error(tmp_path):
    assert report.main([str(tmp_path)]) == 2


def test_a_line_cut_short_is_skipped_and_an_empty_file_is_an_error(tmp_path, capsys):
    """A kill or a full disk mid-write leaves half a line, and the relaunch appends after it: the report used to be
    lost to a JSONDecodeError; an empty file gave a ValueError traceback."""
    good = [step("general", 1, 1, 5.0), step("general", 2, 2, 4.0)]
    (tmp_path / "metrics.jsonl").write_text(json.dumps(good[0]) + "\n" + json.dumps(good[1])[:40]
                                            + json.dumps(good[1]) + "\n")
    assert [r["lm_loss"] for r in report.step_records(report.read_metrics(tmp_path))] == [5.0]
    assert "metrics.jsonl:2: not a JSON record" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text("")
    assert report.main([str(tmp_path)]) == 2
    assert "has no step records yet" in capsys.readouterr().err


def test_a_record_the_report_cannot_read_is_skipped_naming_its_line(tmp_path, capsys):
    """A line that is JSON but not an object, or a record without a key the report reads, was a TypeError or a
    KeyError traceback (exit 1): now skipped with a warning, as a line cut short is."""
    no_global = step("general", 2, 2, 9.0)
    del no_global["global_step"]
    lines = [json.dumps(step("general", 1, 1, 5.0)), "[1, 2]", '"text"', "7", json.dumps(no_global),
             json.dumps(step("general", "x", 2, 9.0)),
             json.dumps({"event": "rollback", "stage": "general", "to_checkpoint": "0-general-step0000001"}),
             json.dumps(step("general", 2, 2, 4.0)), json.dumps(step("general", 3, 3, None, tokens_per_s=None))]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    # a skipped step's non-finite loss is logged as null: kept, a gap in the plot
    assert [r["lm_loss"] for r in report.step_records(report.read_metrics(tmp_path))] == [5.0, 4.0, None]
    err = capsys.readouterr().err
    path = tmp_path / "metrics.jsonl"
    for n, why in [(2, "a JSON list, not a record"), (3, "a JSON str, not a record"), (4, "a JSON int, not a record"),
                   (5, "a step record without 'global_step'"), (6, "'step' is 'x', not an integer"),
                   (7, "'rollback' record without 'global_step'")]:
        assert f"warning: {path}:{n}: {why}; skipped\n" in err, n
    assert report.main([str(tmp_path)]) == 0
    assert (tmp_path / "report" / "report.md").exists()


def test_an_out_that_is_a_file_is_named_and_left_as_it_is(tmp_path, capsys):
    """`--out <an existing file>` was a FileExistsError traceback (exit 1), `--out <file>/sub` a NotADirectoryError."""
    write_metrics(tmp_path / "run", [step("general", 1, 1, 5.0)])
    taken = tmp_path / "taken.txt"
    taken.write_bytes(b"someone's notes\n")
    for out in (taken, taken / "sub"):
        assert report.main([str(tmp_path / "run"), "--out", str(out)]) == 2
        assert f"error: {out}: cannot be the report folder" in capsys.readouterr().err
        assert taken.read_bytes() == b"someone's notes\n"
    assert not (tmp_path / "run" / "report").exists()


def test_steps_past_a_rollback_or_resume_point_are_dropped(tmp_path):
    """A rolled-back spike's step was plotted (134.7 among losses of 7) and listed in the stage rows: its batch is
    skipped on the replay, so nothing logged it again."""
    flat = [[0.25] * 4]
    write_metrics(tmp_path, [
        step("general", 1, 1, 7.5, flat), step("general", 2, 2, 7.2, flat), step("general", 3, 3, 134.7, flat),
        {"event": "rollback", "stage": "general", "global_step": 2, "to_checkpoint": "0-general-step0000002"},
        {"event": "skipped_batch", "stage": "general", "step": 3, "global_step": 2},
        step("general", 4, 3, 7.0, flat),
        step("general", 5, 4, 6.9, flat),  # then killed; the relaunch resumes from step 4 and logs 5 again
        {"event": "resume", "stage": "general", "global_step": 3, "checkpoint": "0-general-step0000004"},
        step("general", 5, 4, 6.8, flat),
    ])
    recs = report.step_records(report.read_metrics(tmp_path))
    assert [(r["step"], r["lm_loss"]) for r in recs] == [(1, 7.5), (2, 7.2), (4, 7.0), (5, 6.8)]


def test_stage_perplexities_come_from_one_measure():
    """train.eval's pooled perplexity and the loop's held-out evaluation cut different amounts of text; the stage
    table took one where present and the other elsewhere, showing a rise between stages that no weights made."""
    recs = [step("general", 1, 1, 5.0), step("reasoning", 1, 2, 4.0), step("long_context", 1, 3, 3.0)]
    recs += [{"event": "eval", "stage": s, "global_step": g, "heldout_ppl": {"eng": v}}
             for s, g, v in (("general", 1, 2446.5), ("reasoning", 2, 2004.1), ("long_context", 3, 1953.4))]
    suite = {s: {"ppl": {"by_language": {"eng": {"all": v}}}}
             for s, v in (("general", 2607.8), ("reasoning", 2153.0), ("long_context", 2110.0))}
    assert report.stage_perplexities(recs, suite) == {"general": {"eng": 2607.8}, "reasoning": {"eng": 2153.0},
                                                      "long_context": {"eng": 2110.0}}
    del suite["reasoning"]  # one stage's ppl.json missing: the loop's, for all three
    assert report.stage_perplexities(recs, suite) == {"general": {"eng": 2446.5}, "reasoning": {"eng": 2004.1},
                                                      "long_context": {"eng": 1953.4}}


def test_switches_come_from_the_stage_starts_and_tokens_are_each_stages_own(tmp_path):
    """At log_every 3 the first logged record of a stage is not its first step: the switch was drawn a step late;
    the stage table showed the run's running token count as each stage's."""
    write_metrics(tmp_path, [
        {"event": "stage_start", "stage": "general", "global_step": 0, "resumed_at_step": None},
        step("general", 3, 3, 5.0), step("general", 4, 4, 4.5),
        {"event": "stage_start", "stage": "reasoning", "global_step": 4, "resumed_at_step": None},
        step("reasoning", 2, 6, 4.0),  # the stage's first (and only) logged step: its last
        {"event": "stage_start", "stage": "long_context", "global_step": 7, "resumed_at_step": 1},  # a resume
        step("long_context", 2, 8, 3.5),
    ])
    recs = report.read_metrics(tmp_path)
    assert report.stage_switches(recs) == [(4, "reasoning"), (6, "long_context")]
    rows = report.stage_table(recs, {})
    assert [row[2] for row in rows] == [400, 200, 200]  # 100 tokens a step (step()), per stage
    assert set(report.report(tmp_path)) >= {"loss", "throughput", "report"}


def test_without_stage_starts_the_switch_is_the_step_before_a_stages_first_record_and_the_last_record_counts(
        tmp_path, monkeypatch):
    """A metrics file without stage_start events (an older run's, or one cut before them): the switch falls after
    the previous stage's step; a stage's perplexity is its last eval, and the expert-load panel its last step;
    the perplexity bars list languages by the first stage's perplexity."""
    recs = [step("general", 1, 1, 5.0, [[0.5, 0.5]]), step("general", 2, 2, 4.0, [[0.9, 0.1]]),
            step("reasoning", 1, 3, 3.5, [[0.5, 0.5]]),
            {"event": "eval", "stage": "general", "global_step": 1, "heldout_ppl": {"eng": 90.0, "fra": 10.0}},
            {"event": "eval", "stage": "general", "global_step": 2, "heldout_ppl": {"eng": 30.0, "fra": 50.0}}]
    assert report.stage_switches(recs) == [(2, "reasoning")]
    ppl = report.stage_perplexities(recs, {})
    assert ppl == {"general": {"eng": 30.0, "fra": 50.0}}
    figures = []
    monkeypatch.setattr(report, "_save", lambda fig, path, tight=True: figures.append(fig) or path)
    report.plot_expert_load(recs, tmp_path / "load.png")
    assert [ax.get_title() for ax in figures[0].axes if ax.get_title()] == ["general, step 2", "reasoning, step 1"]
    report.plot_perplexity({"general": {"fra": 50.0, "eng": 30.0, "deu": 40.0}}, tmp_path / "ppl.png")
    assert [t.get_text() for t in figures[1].axes[0].get_xticklabels()] == ["eng", "deu", "fra"]


def test_held_out_marks_past_a_rollback_or_resume_point_are_dropped(tmp_path, monkeypatch):
    """The loop's held-out evaluations are logged again after a resume or rollback, like the steps: loss.png drew
    every one, so a rollback's discarded weights (here log 6.0 at step 3, trained on the skipped batch) stood
    beside the replay's mark at the same step, and a resume drew its checkpoint step's mark twice."""
    import math

    write_metrics(tmp_path, [
        step("general", 1, 1, 7.5), {"event": "eval", "stage": "general", "global_step": 1,
                                     "heldout_ppl": {"eng": math.e ** 7}, "heldout_ppl_geomean": math.e ** 7},
        step("general", 2, 2, 7.2), {"event": "eval", "stage": "general", "global_step": 2,
                                     "heldout_ppl": {"eng": math.e ** 6.5}, "heldout_ppl_geomean": math.e ** 6.5},
        step("general", 3, 3, 7.0), {"event": "eval", "stage": "general", "global_step": 3,
                                     "heldout_ppl": {"eng": math.e ** 6}, "heldout_ppl_geomean": math.e ** 6},
        step("general", 4, 4, 134.7),
        {"event": "rollback", "stage": "general", "global_step": 1, "to_checkpoint": "0-general-step0000001"},
        {"event": "eval", "stage": "general", "global_step": 1, "heldout_ppl": {"eng": math.e ** 7},
         "heldout_ppl_geomean": math.e ** 7},  # the checkpoint's step, evaluated again
        {"event": "skipped_batch", "stage": "general", "step": 2, "global_step": 2},
        {"event": "eval", "stage": "general", "global_step": 2, "heldout_ppl": {"eng": math.e ** 7},
         "heldout_ppl_geomean": math.e ** 7},
        step("general", 3, 3, 6.9), {"event": "eval", "stage": "general", "global_step": 3,
                                     "heldout_ppl": {"eng": math.e ** 6.8}, "heldout_ppl_geomean": math.e ** 6.8},
    ])
    recs = report.read_metrics(tmp_path)
    evals = [(r["global_step"], round(math.log(r["heldout_ppl_geomean"]), 6)) for r in recs if r.get("event") == "eval"]
    assert evals == [(1, 7.0), (2, 7.0), (3, 6.8)]
    assert report.stage_perplexities(recs, {})["general"]["eng"] == pytest.approx(math.e ** 6.8)
    figures = []
    monkeypatch.setattr(report, "_save", lambda fig, path, tight=True: figures.append(fig) or path)
    report.plot_loss(recs, tmp_path / "loss.png")
    [marks] = [c for c in figures[0].axes[0].collections]
    assert marks.get_offsets().flatten().tolist() == pytest.approx([1, 7.0, 2, 7.0, 3, 6.8])
