"""`python -m train.export`: any checkpoint folder as an HF directory. A stage-end checkpoint's export equals the
loop's own `hf/<stage>/` (ZeRO-1 with tied embeddings, ZeRO-3 MoE on 2 ranks; the expert-parallel case is in
test_expert_parallel_train.py), a mid-stage one loads in transformers with the logits tristage computes from the
checkpoint, and bad paths or an output folder in the way exit 2 with nothing written."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from train.export import main as export_main
from trainutil import DENSE1, SMOKE, run_train, smoke_run


def assert_same_export(ours, theirs) -> None:
    """Same files; the tensors bitwise, every other file byte for byte."""
    names = sorted(p.name for p in ours.iterdir())
    assert names == sorted(p.name for p in theirs.iterdir()) and "model.safetensors" in names
    a, b = load_file(str(ours / "model.safetensors")), load_file(str(theirs / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), \
        [k for k in a if not torch.equal(a[k], b[k])]
    for name in names:
        if name != "model.safetensors":
            assert (ours / name).read_bytes() == (theirs / name).read_bytes(), name


@pytest.mark.parametrize("key, overrides, nproc, stage", [
    ("dense1", DENSE1, 1, "long_context"),  # ZeRO-1, tied embeddings, the raised RoPE base
    ("tiny_moe-zero3", ["model=tiny_moe", "deepspeed=zero3"], 2, "general"),  # shared with test_two_gloo_ranks
])
def test_export_of_a_stage_end_checkpoint_equals_the_loops(data_root, tmp_path_factory, tmp_path, key, overrides,
                                                           nproc, stage):
    run_dir = smoke_run(tmp_path_factory, key, overrides, nproc=nproc)
    [ckpt] = run_dir.glob(f"checkpoints/*-{stage}-step*")
    assert export_main([str(ckpt), str(tmp_path / "out")]) == 0
    assert_same_export(tmp_path / "out", run_dir / "hf" / stage)


def test_export_of_a_mid_stage_checkpoint_loads_in_transformers(data_root, tmp_path, capsys, monkeypatch):
    transformers = pytest.importorskip("transformers")
    from test_hf import assert_same_logits
    from train.eval.target import load_model

    run_dir = tmp_path / "run"
    proc = run_train([*SMOKE, f"run_dir={run_dir}", "model=tiny_dense", "eval.enabled=false", "max_steps=2"])
    assert proc.returncode == 0, proc.stdout[-4000:]
    ckpt = run_dir / "checkpoints" / "0-general-step0000002"  # 2 of the General stage's 4 steps
    assert not json.loads((ckpt / "meta.json").read_text())["state"]["stage_complete"]
    assert not (run_dir / "hf").exists()  # the loop exports stage ends only
    out = tmp_path / "exports" / "mid"
    assert export_main([str(ckpt), str(out)]) == 0
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = load_model(ckpt, torch.device("cpu"), torch.float32)
    ids = torch.randint(0, 1024, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_same_logits(ours(ids).logits, theirs(ids).logits)  # bit for bit
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert theirs.generation_config.eos_token_id == theirs.config.eos_token_id == hf_tok.eos_token_id
    # `checkpoints/latest` (the pointer file) exports the checkpoint it names
    assert export_main([str(run_dir / "checkpoints" / "latest"), str(tmp_path / "exports" / "latest")]) == 0
    pointed = tmp_path / "exports" / "latest" / "model.safetensors"
    assert pointed.read_bytes() == (out / "model.safetensors").read_bytes()

    # refused, exit 2 naming the path, nothing written or overwritten
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    (tmp_path / "a_file").write_text("x")
    cases = [([str(ckpt), str(out)], f"{out}: exists and is not an empty folder"),
             ([str(ckpt), str(tmp_path / "a_file")], f"{tmp_path / 'a_file'}: exists and is not an empty folder"),
             ([str(tmp_path / "nothing"), str(tmp_path / "o")], f"{tmp_path / 'nothing'}: no such checkpoint"),
             ([str(run_dir), str(tmp_path / "o")], f"{run_dir}: not a checkpoint folder (no meta.json)")]
    capsys.readouterr()
    for argv, message in cases:
        assert export_main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert not (tmp_path / "o").exists()
    # a checkpoint trained with another tokenizer than the manifest's: refused before any weight is read
    import shutil

    other = tmp_path / "checkpoints_other" / ckpt.name
    shutil.copytree(ckpt, other)
    meta = json.loads((other / "meta.json").read_text())
    meta["tokenizer_fingerprint"] = "sentencepiece-0123456789abcdef"
    (other / "meta.json").write_text(json.dumps(meta))
    assert export_main([str(other), str(tmp_path / "o")]) == 2
    assert (f"{other}: trained with tokenizer sentencepiece-0123456789abcdef, not the data set's"
            in capsys.readouterr().err)
    assert not (tmp_path / "o").exists()

    # a write that fails halfway (after the weights, in the tokenizer files) leaves no folder, temporary or not
    import train.export

    def full_disk(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train.export, "write_tokenizer_files", full_disk)
    assert export_main([str(ckpt), str(tmp_path / "exports" / "again")]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == ["latest", "mid"]


def test_export_config_and_generation_config(tmp_path):
    """What every export carries (the loop's and `train.export`'s alike, so comparing the two cannot catch it): the
    stage's RoPE base, the tokenizer's EOS unless the model names one, and a generation_config.json that stops at
    that EOS, pads with the tokenizer's pad id and never picks the padded embedding rows past the tokenizer."""
    import dataclasses
    from types import SimpleNamespace

    from models import load_preset
    from train.export import export_config, write_tokenizer_files

    tok = SimpleNamespace(eos_id=3, pad_id=0, vocab_size=1020, write_hf=lambda folder: None)
    model = dataclasses.replace(load_preset("tiny_dense"), vocab_size=1024, eos_token_id=None, bos_token_id=None)
    cfg = export_config(model, 1e6, tok)
    assert (cfg.rope_theta, cfg.eos_token_id) == (1e6, 3)
    assert export_config(dataclasses.replace(model, eos_token_id=7), 1e4, tok).eos_token_id == 7
    write_tokenizer_files(tmp_path, tok, cfg)
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation == {"eos_token_id": 3, "pad_token_id": 0, "bos_token_id": None, "do_sample": False,
                          "suppress_tokens": [1020, 1021, 1022, 1023]}
    write_tokenizer_files(tmp_path, SimpleNamespace(**{**vars(tok), "vocab_size": 1024}), cfg)  # no padded rows
    assert "suppress_tokens" not in json.loads((tmp_path / "generation_config.json").read_text())
