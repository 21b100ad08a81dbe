"""The evaluations on the prepared fixture with small random models: passkey prompts, greedy completion, reasoning
scoring and fresh seeds, perplexity and loss by position against direct computations, the length plan, the
inference modes and the curriculum-effect table."""
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from data.config import compose
from data.heldout import heldout_sets
from data.prepare import prepare
from data.recipes.reasoning import chat
from data.tokenizer import load_tokenizer
from models import Qwen3ForCausalLM, generate, load_preset
from train.eval import curriculum, passkey, position_loss, ppl, reasoning
from train.eval.extend import set_mode
from train.eval.suite import plan


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return prepare(compose("fixture", [f"root={tmp_path_factory.mktemp('data')}"]))


@pytest.fixture(scope="module")
def tok(manifest):
    return load_tokenizer(manifest)


def build(seed=0, std=0.1, **overrides):
    # the fixture tokenizer has 1,024 ids; a larger init std than training keeps greedy choices free of ties
    cfg = dataclasses.replace(load_preset("tiny_dense"), vocab_size=1024, initializer_range=std, **overrides)
    model = Qwen3ForCausalLM(cfg)
    model.init_weights(seed=seed)
    return model.eval()


# ----------------------------------------------------------------------------------------------------- passkey

@pytest.mark.parametrize("length", [300, 517])
def test_passkey_prompt_is_exact_and_the_needle_sits_at_its_depth(tok, length):
    unit, needle = tok.encode(passkey.FILLER), tok.encode(passkey.NEEDLE.format(key="48213"))
    intro, question = tok.encode(passkey.INTRO), tok.encode(passkey.QUESTION)
    budget = length - len(intro) - len(needle) - len(question)
    positions = []
    for depth in (0.0, 0.5, 1.0):
        ids = passkey.passkey_prompt(tok, length, depth, "48213")
        assert len(ids) == length
        assert ids[: len(intro)] == intro and ids[-len(question):] == question
        at = next(i for i in range(length) if ids[i: i + len(needle)] == needle)
        before = at - len(intro)
        assert before % len(unit) == 0  # whole filler sentences precede the needle
        assert abs(before - depth * budget) <= len(unit)
        positions.append(at)
        text = tok.decode(ids)
        assert "The pass key is 48213. Remember it." in text and text.count("48213") == 1
    assert positions[0] == len(intro) and positions[0] < positions[1] < positions[2]
    assert length - positions[2] - len(needle) - len(question) < len(unit)  # depth 1: at most a sentence after
    with pytest.raises(ValueError, match="shorter than"):
        passkey.passkey_prompt(tok, len(intro) + 3, 0.5, "48213")


def test_retrieved_reads_the_first_number(tok):
    assert passkey.retrieved(tok, tok.encode(" 48213. Remember"), "48213")
    assert not passkey.retrieved(tok, tok.encode(" 4821 3"), "48213")
    assert not passkey.retrieved(tok, tok.encode(" 148213"), "48213")
    assert not passkey.retrieved(tok, tok.encode(" the key"), "48213")


def test_passkey_grid_marks_what_cannot_run_and_yarn_extends(tok):
    model = build(max_position_embeddings=256)
    short = passkey.min_length(tok) - 1
    g = passkey.passkey_grid(model, tok, [short, 200, 400], [0.0, 1.0], trials=2, batch_size=3)
    assert g["accuracy"][0] == [None, None]  # below the fixed text
    assert g["accuracy"][2] == [None, None]  # past plain RoPE's 256 positions
    assert g["accuracy"][1] == [0.0, 0.0]  # a random model does not guess 5-digit keys
    r = passkey.passkey_modes(model, tok, 128, {"plain": [200], "yarn": [400], "dca": [400]}, [0.5], trials=1)
    assert r["modes"]["yarn"]["settings"]["factor"] == pytest.approx(400 / 128)
    assert r["modes"]["yarn"]["accuracy"] == [[0.0]] and r["modes"]["dca"]["accuracy"] == [[0.0]]
    assert model.dca is None and model.config.rope_scaling is None  # left in the trained configuration
    assert "| 400 | 0.00 | 0.00 |" in passkey.markdown(r)


# --------------------------------------------------------------------------------------------------- reasoning

def test_greedy_complete_strategies_match_generate():
    model = build()
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 1024, (n,), generator=gen).tolist() for n in (5, 9, 9, 14)]
    alone = [generate(model, torch.tensor([p]), 12)[0, len(p):].tolist() for p in prompts]
    stop = alone[0][3]  # make the first completion stop at its 4th token
    expected = [a[: a.index(stop) + 1] if stop in a else a for a in alone]
    assert len(expected[0]) <= 4
    for strategy in ("cached", "batched"):
        got = reasoning.greedy_complete(model, prompts, 12, stop, batch_size=3, strategy=strategy)
        assert got == expected, strategy


def test_prompt_is_the_training_format_and_the_answer_is_read_back():
    q = "Calculate 3 + 4."
    doc = chat(q, "3 + 4 = 7\nThe answer is 7.", "7")
    assert doc.startswith(reasoning.prompt(q))
    assert reasoning.extract_answer(doc[len(reasoning.prompt(q)):]) == "7"
    assert reasoning.extract_answer("3 + 4 = 7 and then 7<|im_end|>") == ""  # never closed its thinking
    assert reasoning.extract_answer("x</think> -12 \n<|im_end|>junk") == "-12"
    assert reasoning.extract_answer("a</think>b</think> 9<|im_end|>") == "9"  # after the last </think>


def test_fresh_problems_start_after_the_training_seeds(manifest, tmp_path):
    import reasoning_gym

    seed, source, items = reasoning.fresh_problems(manifest, "chain_sum", 3)
    assert (seed, source) == (reasoning.FALLBACK_SEED, "fallback")  # the fixture's problems came from a file
    m = json.loads(manifest.read_text())
    m["sources"]["reasoning"]["generator_seeds"] = {"chain_sum": {"seed": 0, "size": 40, "first_unused_seed": 40}}
    fake = tmp_path / "manifest.json"
    fake.write_text(json.dumps(m))
    seed, source, items = reasoning.fresh_problems(fake, "chain_sum", 3)
    assert (seed, source) == (40, "manifest")
    trained = {it["question"] for it in reasoning_gym.create_dataset("chain_sum", size=40, seed=0)}
    assert [it["question"] for it in items] == [
        it["question"] for it in reasoning_gym.create_dataset("chain_sum", size=3, seed=40)]
    assert not trained & {it["question"] for it in items}


def test_reasoning_accuracy_is_exact_match(manifest, tok, monkeypatch):
    _, _, items = reasoning.fresh_problems(manifest, "basic_arithmetic", 4)
    answers = [str(it["answer"]) for it in items]
    replies = [f"x</think>\n\n{answers[0]}<|im_end|>",  # right
               f"x</think>\n\n{answers[1]}0<|im_end|>",  # wrong by a digit
               f"{answers[2]}<|im_end|>",  # the right number but never closed </think>
               f"</think>  {answers[3]} <|im_end|>"]  # right, with spaces

    def fake(model, prompts, max_new_tokens, stop_id, batch_size=16, strategy="auto", vocab_size=None):
        assert len(prompts) == 4 and stop_id == tok.special_ids["<|im_end|>"] and vocab_size == tok.vocab_size
        return [tok.encode(r) for r in replies]

    monkeypatch.setattr(reasoning, "greedy_complete", fake)
    r = reasoning.reasoning_accuracy(build(), tok, manifest, ["basic_arithmetic"], problems=4)
    t = r["tasks"]["basic_arithmetic"]
    assert [s["correct"] for s in t["samples"]] == [True, False, False, True]
    assert t["accuracy"] == r["accuracy"] == 0.5 and t["closed_think"] == 0.75


# -------------------------------------------------------------------------------------- perplexity, positions

def test_perplexity_matches_a_direct_computation(manifest):
    model = build(std=0.02)
    r = ppl.perplexity(model, manifest, seq_len=32, max_tokens=64, batch_size=4)
    sets = heldout_sets(manifest, by="component")
    assert set(r["by_component"]) == set(sets)
    comp = "bible/eng"
    ids = torch.from_numpy(sets[comp][:65].astype(np.int64))
    windows = torch.stack([ids[:33], ids[32:65]])
    with torch.no_grad():
        loss = model(windows[:, :-1], labels=windows[:, 1:]).lm_loss
    assert r["by_component"][comp] == pytest.approx(math.exp(loss.item()), rel=1e-4)
    assert r["tokens"][comp] == 64
    eng = r["by_language"]["eng"]
    pooled = math.exp((math.log(eng["bible"]) * r["tokens"]["bible/eng"] + math.log(eng["udhr"]) * r["tokens"]
                       ["udhr/eng"]) / (r["tokens"]["bible/eng"] + r["tokens"]["udhr/eng"]))
    assert eng["all"] == pytest.approx(pooled)
    assert "| eng |" in ppl.markdown(r)
    # geometric means over the languages that have each source (spa has no UDHR text here, arb no Bible book)
    for source in ("udhr", "bible", "all"):
        values = [v[source] for v in r["by_language"].values() if source in v]
        assert 0 < len(values) < len(r["by_language"]) or source == "all"
        assert r["geomean"][source] == pytest.approx(math.exp(sum(map(math.log, values)) / len(values)))


def test_loss_by_position_averages_windows(manifest):
    model = build(std=0.02)
    stream = position_loss.heldout_stream(manifest)
    assert stream[:10].tolist() == heldout_sets(manifest, by="component")["bible/deu"][:10].tolist()
    # what the evaluation reads: the stream's first windows x length + 1 tokens, however many components they span
    bible = len(heldout_sets(manifest, by="component")["bible/deu"])
    for n in (121, bible + 50, len(stream) + 7):
        assert position_loss.heldout_stream(manifest, max_tokens=n).tolist() == stream[:n].tolist()
    curve = position_loss.loss_by_position(model, stream, 40, windows=3, batch_size=2)
    ids = torch.from_numpy(np.stack([stream[w * 40: w * 40 + 41] for w in range(3)]).astype(np.int64))
    with torch.no_grad():
        tl = model(ids[:, :-1], labels=ids[:, 1:], return_token_losses=True).token_losses
    np.testing.assert_allclose(curve, tl.double().mean(0).numpy(), rtol=1e-5)
    s = position_loss.summarize(curve, trained_len=10, bins=4)
    assert s["loss_within"] == pytest.approx(curve[:10].mean()) and s["loss_beyond"] == pytest.approx(curve[10:].mean())
    assert s["bin_edges"] == [0, 10, 20, 30, 40]
    r = position_loss.position_loss_modes(model, manifest, 40, [("plain", 40), ("dca", 40)], windows=3)
    plain, dca = (c["curve"] for c in r["curves"])
    np.testing.assert_allclose(dca, plain, atol=1e-3)  # within the trained length DCA is ordinary attention
    # a window longer than the held-out text is noted, not a traceback that lost the stage's other results
    too_long = len(stream)
    r = position_loss.position_loss_modes(model, manifest, 40, [("plain", 40), ("dca", too_long)], windows=3)
    assert r["curves"][0]["summary"]["length"] == 40 and r["curves"][1]["summary"] is None
    note = f"the held-out text ({len(stream)} tokens) is shorter than one window of {too_long + 1}"
    assert r["curves"][1]["note"] == note
    assert f"dca at {too_long}: not measured, {note}." in position_loss.markdown(r)


def test_a_data_set_without_held_out_texts_is_noted_not_a_crash(manifest, tmp_path):
    """One's own data often has no `split: heldout` rows: perplexity and loss by position say so (they divided by
    zero and concatenated nothing, so the whole stage-end suite failed)."""
    from data.config import DataConfig, TokenizerConfig

    (tmp_path / "en.jsonl").write_text("".join(json.dumps({"text": f"line {i} of my own text"}) + "\n"
                                               for i in range(50)))
    tokenizer = str(next(manifest.parent.glob("tokenizer-*/tokenizer.model")))
    own = prepare(DataConfig(name="own", root=str(tmp_path / "root"), num_proc=1,
                             sources={"en": {"kind": "local", "options": {"paths": [str(tmp_path / "en.jsonl")]}}},
                             tokenizer=TokenizerConfig(path=tokenizer)))
    assert heldout_sets(own, by="component") == {}
    model = build(std=0.02)
    r = ppl.perplexity(model, own, seq_len=32, max_tokens=64, batch_size=4)
    assert r["by_component"] == {} and r["geomean"]["all"] is None  # null in ppl.json (NaN is no JSON)
    assert "Not measured: the data set has no held-out texts" in ppl.markdown(r)
    r = position_loss.position_loss_modes(model, own, 40, [("plain", 40)], windows=3)
    assert r["curves"] == [] and "Not measured" in position_loss.markdown(r)


# ----------------------------------------------------------------------------------- plan, modes and table

def test_plan_covers_four_times_both_lengths():
    grids, checks = plan(64, 256)
    assert grids == {"plain": [64, 128, 256, 512, 1024], "yarn": [512, 1024], "dca": [512, 1024]}
    assert checks == [("plain", 256), ("plain", 1024), ("yarn", 1024), ("dca", 1024)]
    grids, checks = plan(256, 256)
    assert grids["plain"] == [256, 512, 1024] and checks == [("plain", 1024), ("yarn", 1024), ("dca", 1024)]
    grids, checks = plan(64, 256, lengths=[300, 100])
    assert grids["plain"] == [100, 300] and grids["dca"] == [300] and checks[-1] == ("dca", 300)


def test_modes_configure_the_model():
    model = build(max_position_embeddings=256)
    assert set_mode(model, "yarn", 256, 1024)["factor"] == 4.0
    assert model.rope_cos.shape[0] == 1024 and model.config.rope_scaling["original_max_position_embeddings"] == 256
    assert set_mode(model, "dca", 256, 1024) == {"mode": "dca", "chunk_size": 256, "local_size": 32}
    assert model.config.rope_scaling is None and model.model.layers[2].self_attn.dca.chunk_len == 224
    set_mode(model, "plain", 256, 1024)
    assert model.dca is None and model.rope_cos.shape[0] == 256


def test_curriculum_effect_reads_the_right_cells():
    curve = [1.0] * 64 + [3.0] * 192  # loss 1 within 64 positions, 3 beyond
    results = {
        "general": {"reasoning": {"accuracy": 0.1, "tasks": {"chain_sum": {"accuracy": 0.1, "problems": 50}}},
                    "passkey": {"modes": {"plain": {"lengths": [64, 256], "accuracy_by_length": [0.5, 0.0]}}},
                    "position_loss": {"curves": [{"mode": "plain", "length": 256, "curve": curve}]}},
        "reasoning": {"reasoning": {"accuracy": 0.4, "tasks": {"chain_sum": {"accuracy": 0.4, "problems": 4}}}},
        "long_context": {
            "passkey": {"modes": {"plain": {"lengths": [256, 1024], "accuracy_by_length": [0.75, 0.0]},
                                  "dca": {"lengths": [1024], "accuracy_by_length": [0.25]}}},
            "position_loss": {"curves": [{"mode": "plain", "length": 256, "curve": [2.0] * 256},
                                         {"mode": "yarn", "length": 1024, "curve": [0.0] * 256 + [5.0] * 768}]}}}
    e = curriculum.curriculum_effect(results, ["general", "reasoning", "long_context"],
                                     {"general": 64, "reasoning": 64, "long_context": 256})
    assert e["reasoning_accuracy"] == {"general": 0.1, "reasoning": 0.4, "long_context": None}
    assert e["abf"]["general"] == {"passkey": 0.0, "loss_beyond": 3.0}
    assert e["abf"]["long_context"] == {"passkey": 0.75, "loss_beyond": 2.0}
    assert e["extension"]["dca"]["passkey"] == 0.25 and e["extension"]["plain"]["passkey"] == 0.0
    assert e["extension"]["yarn"] == {"passkey": None, "loss_beyond": 5.0}
    md = curriculum.markdown(e)
    assert "| passkey accuracy at 256 tokens (4x General), plain RoPE | 0.000 | – | 0.750 |" in md
    assert "| loss at positions 256-1024 | – | 5.000 | – |" in md
    # accuracies of different sample sizes side by side (a later `train.eval reasoning --problems 50`) say so
    assert e["reasoning_problems"] == {"general": 50, "reasoning": 4, "long_context": None}
    assert "|   problems per task | 50 | 4 | – |" in md
    # a stage after Long Context (an anneal at General's length): "Long Context" is still the longest-trained one
    e = curriculum.curriculum_effect(results, ["general", "reasoning", "long_context", "anneal"],
                                     {"general": 64, "reasoning": 64, "long_context": 256, "anneal": 64})
    assert e["long_context_len"] == 256 and e["extension"]["dca"]["passkey"] == 0.25
    # two stages at the longest length: the later one is "Long Context" (no passkey results of its own here)
    e = curriculum.curriculum_effect(results, ["general", "long_context", "longer"],
                                     {"general": 64, "long_context": 256, "longer": 256})
    assert e["extension"]["dca"]["passkey"] is None


def test_yarn_tables_follow_the_paper():
    """YaRN (Peng et al. 2023): dims rotating more than beta_fast=32 times in the original context keep their
    frequency, dims rotating less than beta_slow=1 time are divided by the factor, those between lie in between;
    logits scale by (0.1 ln s + 1)^2, i.e. cos and sin by 0.1 ln s + 1."""
    from models.rope import rope_inv_freq, rope_tables

    head_dim, theta, original, factor = 64, 10_000.0, 256, 4.0
    scaling = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original}
    plain, _ = rope_inv_freq(head_dim, theta)
    yarn, attention = rope_inv_freq(head_dim, theta, scaling)
    rotations = original * plain / (2 * math.pi)  # turns each dim makes over the original context
    fast, slow = rotations > 32, rotations < 1
    assert fast.any() and slow.any() and (~fast & ~slow).any()
    torch.testing.assert_close(yarn[fast], plain[fast])
    torch.testing.assert_close(yarn[slow], plain[slow] / factor)
    mid = ~fast & ~slow
    assert bool(((yarn[mid] <= plain[mid] + 1e-9) & (yarn[mid] >= plain[mid] / factor - 1e-9)).all())
    assert attention == pytest.approx(0.1 * math.log(factor) + 1)
    cos, sin = rope_tables(head_dim, theta, scaling, 8, torch.device("cpu"))
    torch.testing.assert_close(cos[0], torch.full((head_dim // 2,), attention))


def test_a_short_stream_gives_fewer_windows_counted_as_such(monkeypatch):
    """Held-out text for 2 windows of 40 (+1) tokens but 4 asked for: the curve is the mean of the 2 there are, and
    the result says 2 (not 4, and not a third window cut short)."""
    model = build(std=0.02)
    stream = np.random.default_rng(0).integers(0, 1024, 3 * 40).astype(np.int32)
    monkeypatch.setattr(position_loss, "heldout_stream", lambda manifest, max_tokens=None: stream[:max_tokens])
    r = position_loss.position_loss_modes(model, None, 40, [("plain", 40)], windows=4, batch_size=4)
    [c] = r["curves"]
    ids = torch.from_numpy(np.stack([stream[:41], stream[40:81]]).astype(np.int64))
    with torch.no_grad():
        tl = model(ids[:, :-1], labels=ids[:, 1:], return_token_losses=True).token_losses
    assert c["windows"] == 2
    np.testing.assert_allclose(c["curve"], tl.double().mean(0).numpy(), atol=1e-4)


def test_passkey_scores_the_answer_the_model_writes_and_runs_up_to_its_tables(tok, monkeypatch):
    """A model that writes the key right after the prompt scores 1 at every depth, up to and including the last
    position its RoPE tables cover (plain RoPE runs at exactly max_position_embeddings)."""
    import re

    def oracle(model, ids, max_new_tokens, vocab_size=None):  # writes the needle's key, then a full stop
        rows = []
        for row in ids.tolist():
            key = re.search(r"pass key is (\d+)", tok.decode(row)).group(1)
            answer = (tok.encode(key + ". Remember") + [0] * max_new_tokens)[:max_new_tokens]
            rows.append(row + answer)
        return torch.tensor(rows)

    monkeypatch.setattr(passkey, "generate", oracle)
    model = build(max_position_embeddings=256)
    g = passkey.passkey_grid(model, tok, [200, 256], [0.0, 1.0], trials=1)
    assert g["accuracy"] == [[1.0, 1.0], [1.0, 1.0]] and g["accuracy_by_length"] == [1.0, 1.0]


def test_loss_bins_of_a_curve_shorter_than_the_bins_are_never_empty():
    """`--lengths 10` with 16 bins: edges [0, 1, 1, 2, ...] gave empty bins, NaN in position_loss.json (no JSON) and a
    RuntimeWarning; each bin now holds at least one position, and every position lies in exactly one bin."""
    curve = np.arange(10, dtype=float)
    s = position_loss.summarize(curve, trained_len=4, bins=16)
    edges = s["bin_edges"]
    assert edges[0] == 0 and edges[-1] == 10 and all(a < b for a, b in zip(edges, edges[1:]))
    assert s["bin_loss"] == [float(curve[a:b].mean()) for a, b in zip(edges, edges[1:])]
    json.dumps(s, allow_nan=False)
    assert position_loss.summarize(np.arange(64, dtype=float), 16, bins=16)["bin_edges"] == list(range(0, 65, 4))


def test_an_out_that_is_a_file_is_named_before_anything_runs_and_left_as_it_is(manifest, tmp_path, capsys):
    """`python -m train.eval ppl <export> --out <a file>` evaluated, then died in a NotADirectoryError traceback
    (exit 1) when the first result was due; now exit 2 naming the path before any stage runs, the file unchanged."""
    from models.hf import save_hf
    from train.eval.__main__ import main

    hf = save_hf(build(), tmp_path / "hf")
    taken = tmp_path / "taken.bin"
    taken.write_bytes(b"\x00 not a folder")
    common = ["--seq-len", "64", "--manifest", str(manifest), "--max-tokens", "64", "--device", "cpu"]
    for out, what in [(taken, f"{taken}: a file, not a folder for the results"),
                      (taken / "sub", f"{taken / 'sub'}: under the file {taken}, not a folder for the results")]:
        assert main(["ppl", str(hf), "--out", str(out), *common]) == 2
        assert f"error: {what}; nothing was written" in capsys.readouterr().err
        assert taken.read_bytes() == b"\x00 not a folder"
    assert main(["ppl", str(hf), "--out", str(tmp_path / "results"), *common]) == 0  # the control
    assert (tmp_path / "results" / "hf" / "ppl.json").exists()
