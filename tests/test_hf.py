"""HF transformers is the ground truth: weights copied both ways give the same logits (dense models bit for bit),
round trips are lossless."""
import json
import re

import pytest
import torch
from safetensors import safe_open

from models import Qwen3ForCausalLM, config_from_hf, hf_config_dict, load_hf, load_preset, save_hf
import models.hf as hf_module

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6)
CASES = {
    "dense_tied": lambda **kw: transformers.Qwen3Config(**COMMON, tie_word_embeddings=True, **kw),
    "dense_untied": lambda **kw: transformers.Qwen3Config(**COMMON, tie_word_embeddings=False, **kw),
    "moe": lambda **kw: transformers.Qwen3MoeConfig(**COMMON, tie_word_embeddings=False, num_experts=8,
                                                    num_experts_per_tok=2, moe_intermediate_size=32,
                                                    norm_topk_prob=True, **kw),
}


# MoE logits are not bit for bit: a CPU GEMM's rounding depends on the rows it computes together and on the call,
# and each implementation multiplies an expert's rows otherwise: transformers' eager path takes them by top-k slot
# (ours by token), its grouped_mm path through torch's grouped-mm fallback. Computed per expert with our row order,
# transformers' own eager arithmetic gives our layer bit for bit; the logits differ by 1.7e-6 (of ~5) from each of
# transformers' paths (5.24: eager, grouped_mm; batched_mm 2.5e-6).
MOE_ATOL = 1e-5


def assert_same_logits(ours: torch.Tensor, theirs: torch.Tensor, moe: bool = False) -> None:
    """Dense: equal bit for bit (the same operations in the same order as transformers). MoE: within MOE_ATOL."""
    if moe:
        torch.testing.assert_close(ours, theirs, rtol=0, atol=MOE_ATOL)
    else:
        assert torch.equal(ours, theirs), f"max |difference| {(ours - theirs).abs().max().item():.3e}"


def random_hf_model(case, seed=0, **kw):
    """A random transformers model with weights large enough that logits are far from uniform."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(CASES[case](**kw), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.15)
    return model.eval()


def files_tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            out.update({k: sf.get_tensor(k) for k in sf.keys()})
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_hf_checkpoint_loads_with_equal_logits_and_loss(case, tmp_path):
    hf = random_hf_model(case)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="100KB")  # sharded, with an index
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    model = load_hf(tmp_path / "hf").eval()
    assert model.config.is_moe == (case == "moe")
    assert model.config.tie_word_embeddings == (case == "dense_tied")
    x = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(x, labels=x)  # transformers shifts the labels itself
        out = model(x)
        labels = torch.cat([x[:, 1:], torch.full((2, 1), -100)], dim=1)
        ours = model(x, labels=labels)
    assert ref.logits.abs().max() > 1.0  # logits that can disagree
    assert_same_logits(out.logits, ref.logits, moe=case == "moe")
    torch.testing.assert_close(ours.lm_loss, ref.loss, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("shard", ["5GB", 60_000])
def test_saved_model_loads_in_transformers_and_round_trips(case, shard, tmp_path):
    hf = random_hf_model(case)
    hf.save_pretrained(tmp_path / "hf")
    model = load_hf(tmp_path / "hf")

    out = save_hf(model, tmp_path / "ours", max_shard_size=shard)
    assert (out / "model.safetensors.index.json").exists() == (shard != "5GB")
    # Same on-disk layout and values as transformers' own writer (per-expert MoE keys, no tied head).
    ours, theirs = files_tensors(out), files_tensors(tmp_path / "hf")
    assert set(ours) == set(theirs)
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    if case == "moe":
        assert "model.layers.1.mlp.experts.7.down_proj.weight" in ours
    assert ("lm_head.weight" in ours) == (case != "dense_tied")

    reloaded_hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x = torch.randint(0, 512, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(reloaded_hf(x).logits, hf(x).logits)  # the same weights back
    back = load_hf(out)
    for (k, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k


def test_our_initialised_moe_exports_to_transformers(tmp_path):
    model = Qwen3ForCausalLM(load_preset("tiny_moe"))
    model.init_weights(seed=3)
    model.set_rope_theta(1_000_000.0)  # the exported config must carry the current base
    save_hf(model, tmp_path / "m", dtype=torch.bfloat16)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_moe" and cfg["num_experts"] == 8 and cfg["rope_theta"] == 1e6
    assert files_tensors(tmp_path / "m")["model.embed_tokens.weight"].dtype == torch.bfloat16
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    assert hf.config.num_experts == 8 and hf.config.rope_parameters["rope_theta"] == 1e6
    ours = load_hf(tmp_path / "m").eval()
    x = torch.randint(0, 8192, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_same_logits(ours(x).logits, hf(x).logits, moe=True)


def test_yarn_matches_transformers_beyond_the_original_length(tmp_path):
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 1e6}
    hf = random_hf_model("dense_untied", rope_parameters=dict(yarn))
    hf.save_pretrained(tmp_path / "hf")
    model = load_hf(tmp_path / "hf").eval()
    assert model.config.rope_scaling["rope_type"] == "yarn" and model.config.rope_theta == 1e6
    x = torch.randint(0, 512, (1, 200), generator=torch.Generator().manual_seed(3))  # > 64 positions
    with torch.no_grad():
        assert_same_logits(model(x).logits, hf(x).logits)
        model.set_rope_scaling(None)
        assert not torch.allclose(model(x).logits, hf(x).logits, atol=1e-2)


def test_config_from_transformers_4_layout_and_unsupported_options():
    released = {  # the shape of Qwen/Qwen3-30B-A3B's config.json (transformers 4.51)
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 151936,
        "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 48, "num_attention_heads": 32,
        "num_key_value_heads": 4, "head_dim": 128, "rope_theta": 1000000.0, "rope_scaling": None,
        "max_position_embeddings": 40960, "tie_word_embeddings": False, "num_experts": 128,
        "num_experts_per_tok": 8, "moe_intermediate_size": 768, "norm_topk_prob": True,
        "router_aux_loss_coef": 0.001, "decoder_sparse_step": 1, "mlp_only_layers": [], "rms_norm_eps": 1e-06,
        "use_sliding_window": False, "eos_token_id": 151645, "bos_token_id": 151643,
    }
    cfg = config_from_hf(released)
    preset = load_preset("qwen3_30b_a3b")
    for f in ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "num_experts", "num_experts_per_tok", "moe_intermediate_size", "tie_word_embeddings"]:
        assert getattr(cfg, f) == getattr(preset, f), f
    assert cfg.rope_theta == 1e6 and cfg.rope_scaling is None and cfg.eos_token_id == 151645
    legacy_yarn = dict(released, rope_scaling={"type": "yarn", "factor": 4.0,
                                               "original_max_position_embeddings": 32768})
    assert config_from_hf(legacy_yarn).rope_scaling["rope_type"] == "yarn"
    assert config_from_hf(hf_config_dict(cfg)) == cfg
    for bad in [{"mlp_only_layers": [3]}, {"use_sliding_window": True}, {"model_type": "llama"}]:
        with pytest.raises(ValueError):
            config_from_hf(dict(released, **bad))
    # a 0 read as "missing": 128 experts, then an unexpected-key error at the weights that named no config key
    for experts in (0, -8, "64"):
        with pytest.raises(ValueError, match=re.escape(f"num_experts: a qwen3_moe config needs a positive number "
                                                       f"of experts, got {experts!r}")):
            config_from_hf(dict(released, num_experts=experts))
    assert config_from_hf(dict({k: v for k, v in released.items() if k != "num_experts"},
                               num_local_experts=64)).num_experts == 64


def test_save_is_atomic(tmp_path, monkeypatch):
    model = Qwen3ForCausalLM(load_preset("tiny_dense"))
    model.init_weights(seed=0)
    target = save_hf(model, tmp_path / "ckpt")
    before = files_tensors(target)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    model.init_weights(seed=1)
    monkeypatch.setattr(hf_module, "save_file", broken)
    with pytest.raises(OSError):
        save_hf(model, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary left behind
    after = files_tensors(target)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the old checkpoint is intact
    monkeypatch.undo()
    save_hf(model, target)  # overwriting an existing checkpoint works
    assert not torch.equal(files_tensors(target)["model.embed_tokens.weight"], before["model.embed_tokens.weight"])


def test_streamed_export_writes_each_shard_once_complete(tmp_path):
    """write_hf from a stream in state-dict order (what a distributed export yields, one parameter at a time):
    the same files as save_hf, and every shard is on disk before the stream goes past it, so no more than one
    shard is ever held; a short or doubled stream is refused and leaves nothing at the target."""
    model = Qwen3ForCausalLM(load_preset("tiny_moe"))
    model.init_weights(seed=0)
    sd = model.state_dict()
    with torch.device("meta"):
        layout = Qwen3ForCausalLM(load_preset("tiny_moe")).state_dict()
    shard = 600_000  # bytes: tiny_moe's 2.6M fp32 parameters make ~17 shards
    reference = files_tensors(save_hf(model, tmp_path / "whole", max_shard_size=shard))
    on_disk = []

    def stream():
        for name, t in sd.items():
            on_disk.append(len(list(tmp_path.glob(".streamed.tmp-*/*.safetensors"))))
            yield name, t

    out = hf_module.write_hf(model.config, tmp_path / "streamed", stream(), layout, max_shard_size=shard)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert files == sorted(p.name for p in (tmp_path / "whole").glob("*.safetensors")) and len(files) > 10
    got = files_tensors(out)
    assert got.keys() == reference.keys() and all(torch.equal(got[k], reference[k]) for k in got)
    assert on_disk[0] == 0 and on_disk[-1] >= len(files) - 2 and on_disk == sorted(on_disk)
    assert json.loads((out / "model.safetensors.index.json").read_text()) == \
        json.loads((tmp_path / "whole" / "model.safetensors.index.json").read_text())

    items = list(sd.items())
    for bad, needle in [(items[:-1], "the stream ended without 1 tensors, e.g. ['lm_head.weight']"),
                        (items + items[-1:], "tensor lm_head.weight (8192, 128) is not in the planned layout")]:
        with pytest.raises(ValueError, match=re.escape(needle)):
            hf_module.write_hf(model.config, tmp_path / "bad", iter(bad), layout, max_shard_size=shard)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["streamed", "whole"]


def test_what_a_killed_export_left_is_cleared_and_a_moved_aside_export_put_back(tmp_path):
    """A SIGKILL during an export left `.<name>.tmp-*` (up to a whole model's weights) beside the target forever,
    and between the two renames left the previous complete export only as `.<name>.old-*`."""
    model = Qwen3ForCausalLM(load_preset("tiny_dense"))
    model.init_weights(seed=0)
    stale = tmp_path / ".general.tmp-0badc0de"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    other = tmp_path / ".reasoning.tmp-0badc0de"  # another export's: not this one's to clear
    other.mkdir()
    old = save_hf(model, tmp_path / "general")
    assert not stale.exists() and other.exists()
    old.rename(tmp_path / ".general.old-12345678")  # killed between `path -> .old` and `.tmp -> path`
    hf_module._clear_killed_writes(tmp_path / "general")
    assert files_tensors(tmp_path / "general").keys() == files_tensors(save_hf(model, tmp_path / "ref")).keys()
    (tmp_path / ".general.old-87654321").mkdir()  # and beside a complete export it is a leftover
    save_hf(model, tmp_path / "general")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".reasoning.tmp-0badc0de", "general", "ref"]


@pytest.mark.parametrize("defect", ["shape", "missing", "extra"])
def test_a_bad_checkpoint_is_refused_before_any_weight_is_written(tmp_path, defect):
    """Names and shapes are checked for the whole directory first: the model is untouched by a refused load."""
    from safetensors.torch import save_file

    from models.hf import load_hf_weights

    hf = random_hf_model("moe")
    hf.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    tensors = files_tensors(tmp_path / "hf")
    key = "model.layers.1.mlp.experts.7.up_proj.weight"  # late in the order: earlier weights would be written
    if defect == "shape":
        tensors[key] = tensors[key][:, :-1].contiguous()
    elif defect == "missing":
        del tensors[key]
    else:
        tensors["model.layers.1.mlp.experts.8.up_proj.weight"] = tensors[key].clone()
    for f in (tmp_path / "hf").glob("model*"):
        f.unlink()
    save_file(tensors, str(tmp_path / "hf" / "model.safetensors"))
    model = Qwen3ForCausalLM(config_from_hf(hf.config.to_dict()))
    model.init_weights(seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as err:
        load_hf_weights(model, tmp_path / "hf")
    assert (key if defect != "extra" else "experts.8.up_proj") in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_expert_parallel_ranks_read_only_their_experts(tmp_path, monkeypatch):
    """A model holding experts [4, 6) of 8 gets exactly those slices, and never reads another expert's tensor."""
    from models.hf import HFWeights, load_hf_weights

    hf = random_hf_model("moe")
    hf.save_pretrained(tmp_path / "hf")
    full = load_hf(tmp_path / "hf")
    model = Qwen3ForCausalLM(config_from_hf(hf.config.to_dict()))
    for layer in model.model.layers:
        layer.mlp.experts.keep_experts(4, 2)
    model.init_weights(seed=0)
    read = []
    original = HFWeights._read
    monkeypatch.setattr(HFWeights, "_read", lambda self, key: read.append(key) or original(self, key))
    load_hf_weights(model, tmp_path / "hf")
    ours, ref = model.state_dict(), full.state_dict()
    for name, t in ours.items():
        want = ref[name][4:6] if ".mlp.experts." in name else ref[name]
        assert torch.equal(t, want), name
    experts_read = {int(k.split(".")[5]) for k in read if ".mlp.experts." in k}
    assert experts_read == {4, 5}


def test_yarn_export_is_read_by_transformers_4_and_a_missing_original_length_is_the_configured_one(tmp_path):
    """transformers 4.x takes the YaRN factor as max_position_embeddings / original_max_position_embeddings: the
    export wrote the base model's 8,192 with factor 4 over 64 (4.51 scaled RoPE by 128, logits off by 0.58);
    a config without original_max_position_embeddings failed to load with a KeyError (transformers reads it as
    max_position_embeddings)."""
    transformers = pytest.importorskip("transformers")
    model = Qwen3ForCausalLM(load_preset("tiny_dense"))
    model.init_weights(seed=0)
    model.set_rope_scaling({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})
    save_hf(model, tmp_path / "m")
    d = json.loads((tmp_path / "m" / "config.json").read_text())
    assert d["max_position_embeddings"] == 256 and d["rope_scaling"]["original_max_position_embeddings"] == 64
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    x = torch.randint(0, 8192, (1, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_same_logits(model.eval()(x).logits, hf(x).logits)
    d["max_position_embeddings"] = 64
    for key in ("rope_scaling", "rope_parameters"):
        d[key].pop("original_max_position_embeddings")
    (tmp_path / "m" / "config.json").write_text(json.dumps(d))
    cfg = load_hf(tmp_path / "m").config
    assert cfg.rope_scaling["original_max_position_embeddings"] == 64 and cfg.max_position_embeddings == 64


@pytest.mark.parametrize("extra", [{"mscale": 1.0, "mscale_all_dim": 0.5}, {"attention_factor": 1.3},
                                   {"mscale": 0.7}, {"factor": None}, {"truncate": False},
                                   {"beta_fast": 1.5, "beta_slow": 0.25}, {"rope_theta": 10.0}])
def test_yarn_variants_match_transformers(extra, tmp_path):
    """mscale / mscale_all_dim (DeepSeek-style) were ignored: the attention factor was 0.1 ln(s) + 1 whatever the
    config said, and logits differed from transformers by 0.05-2.4. A null factor is max / original positions.
    The ramp's options, each changing the tables here: `truncate: False` keeps its fractional ends, betas 1.5 /
    0.25 move it to dims (1, 3) from the defaults' (0, 2), and theta 10 puts its upper end (8.07 -> 9) past
    head_dim / 2 - 1 = 7, where the clamp applies (accepted by the config, never run before)."""
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 1e6, **extra}
    hf = random_hf_model("dense_untied", rope_parameters=yarn)
    hf.save_pretrained(tmp_path / "hf")
    model = load_hf(tmp_path / "hf").eval()
    x = torch.randint(0, 512, (1, 200), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_same_logits(model(x).logits, hf(x).logits)
    assert model.config.rope_scaling["factor"] == (4.0 if extra.get("factor", 4.0) else 256 / 64)


@pytest.mark.parametrize("edit", [
    # Qwen3's model card: add rope_scaling for YaRN, here to a config transformers 5 wrote (rope_parameters, no
    # top-level rope_theta)
    {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}},
    # both layouts, disagreeing
    {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 1e6},
     "rope_scaling": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64},
     "rope_theta": 5e5},
])
def test_rope_scaling_is_read_first_as_transformers_does(edit, tmp_path):
    """transformers (5.x as 4.x) takes a non-null rope_scaling over rope_parameters, with the top-level rope_theta
    (else 10,000). This model read rope_parameters first, and a folder with both computed other RoPE tables than
    transformers (logits off by 3.6-6.9) without a word."""
    hf = random_hf_model("dense_untied", rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    hf.save_pretrained(tmp_path / "hf")
    cfg_file = tmp_path / "hf" / "config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), **edit}))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ours = load_hf(tmp_path / "hf").eval()
    assert ours.config.rope_theta == theirs.config.rope_parameters["rope_theta"]
    assert ours.config.rope_scaling["factor"] == theirs.config.rope_parameters["factor"] == \
        edit["rope_scaling"]["factor"]
    x = torch.randint(0, 512, (1, 200), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_same_logits(ours(x).logits, theirs(x).logits)


def test_rope_scaling_is_checked_whole_before_the_model_changes():
    model = Qwen3ForCausalLM(dict(load_preset("tiny_dense").to_dict(), max_position_embeddings=128))
    model.init_weights(seed=0)
    x = torch.randint(0, 8192, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model.eval()(x).logits
    for bad, needle in [({"factor": 4.0, "partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5"),
                        ({"factor": 4.0, "mscale": "big"}, "mscale must be a number"),
                        ({"factor": 4.0, "low_freq_factor": 1.0}, "unsupported keys ['low_freq_factor']"),
                        ({"factor": 0.5}, "factor must be >= 1"),
                        ({"factor": 4.0, "original_max_position_embeddings": 0}, "original_max_position_embeddings")]:
        with pytest.raises(ValueError, match=re.escape(needle)):
            model.set_rope_scaling({"rope_type": "yarn", **bad})
        assert model.config.rope_scaling is None and model.rope_cos.shape[0] == 128
    with torch.no_grad():
        assert torch.equal(model(x).logits, before)
    with pytest.raises(ValueError, match="rope_theta 500000.0 differs from the model's rope_theta 10000.0"):
        model.set_rope_scaling({"rope_type": "yarn", "factor": 4.0, "rope_theta": 5e5})
    # no original length: the configured maximum, as transformers reads it (a KeyError here before); a
    # transformers 5 style rope_theta inside, equal to the model's, is taken
    model.set_rope_scaling({"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4})
    assert model.config.rope_scaling["original_max_position_embeddings"] == 128 and model.rope_cos.shape[0] == 512


def test_a_stored_head_other_than_the_tied_embedding_is_refused(tmp_path):
    """A config with tie_word_embeddings whose checkpoint also stores lm_head.weight: transformers ties the two only
    when they are equal, and otherwise warns and keeps both (the head it read). This model took the embedding as the
    head regardless, and its logits differed from transformers' by up to 30 without a word."""
    from safetensors.torch import save_file

    hf = random_hf_model("dense_tied")
    hf.save_pretrained(tmp_path / "hf")
    tensors = files_tensors(tmp_path / "hf")
    x = torch.randint(0, 512, (1, 30), generator=torch.Generator().manual_seed(5))
    for head in [tensors["model.embed_tokens.weight"].clone(), torch.randn(512, 64, generator=torch.Generator())]:
        save_file({**tensors, "lm_head.weight": head}, str(tmp_path / "hf" / "model.safetensors"))
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
        assert torch.equal(theirs.lm_head.weight, head)
        if torch.equal(head, tensors["model.embed_tokens.weight"]):  # the same values: one tied matrix
            with torch.no_grad():
                assert_same_logits(load_hf(tmp_path / "hf").eval()(x).logits, theirs(x).logits)
        else:
            with pytest.raises(ValueError, match=re.escape(
                    "lm_head.weight differs from model.embed_tokens.weight under tie_word_embeddings")):
                load_hf(tmp_path / "hf")


def test_a_tied_matrix_stored_under_the_heads_name_alone_loads_as_transformers_loads_it(tmp_path):
    """tie_word_embeddings with only lm_head.weight in the file (no model.embed_tokens.weight): transformers ties
    the embedding to the stored head; this model refused it as missing the embedding."""
    from safetensors.torch import save_file

    hf = random_hf_model("dense_tied")
    hf.save_pretrained(tmp_path / "hf")
    tensors = files_tensors(tmp_path / "hf")
    head = torch.randn(512, 64, generator=torch.Generator().manual_seed(3))  # not the saved model's embedding
    tensors.pop("model.embed_tokens.weight")
    save_file({**tensors, "lm_head.weight": head}, str(tmp_path / "hf" / "model.safetensors"))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ours = load_hf(tmp_path / "hf").eval()
    assert torch.equal(ours.model.embed_tokens.weight, head) and ours.lm_head.weight is ours.model.embed_tokens.weight
    x = torch.randint(0, 512, (1, 30), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert_same_logits(ours(x).logits, theirs(x).logits)


def test_transformers_stacked_expert_layout_loads(tmp_path):
    """transformers 5 writes experts stacked (`mlp.experts.gate_up_proj`) with save_original_format=False; that
    was refused as an unexpected key. Expert-parallel ranks still read only their rows."""
    from models.hf import load_hf_weights

    hf = random_hf_model("moe")
    hf.save_pretrained(tmp_path / "hf", save_original_format=False)
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in files_tensors(tmp_path / "hf"))
    model = load_hf(tmp_path / "hf").eval()
    x = torch.randint(0, 512, (2, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert_same_logits(model(x).logits, hf(x).logits, moe=True)
    part = Qwen3ForCausalLM(config_from_hf(hf.config.to_dict()))
    for layer in part.model.layers:
        layer.mlp.experts.keep_experts(2, 3)
    part.init_weights(seed=0)
    load_hf_weights(part, tmp_path / "hf")
    assert torch.equal(part.model.layers[1].mlp.experts.down_proj, model.model.layers[1].mlp.experts.down_proj[2:5])


def test_an_expert_parallel_shard_is_not_exported(tmp_path):
    """save_hf on a model holding experts 4..7 of 8 wrote them as experts 0..3 under num_experts 8."""
    model = Qwen3ForCausalLM(load_preset("tiny_moe"))
    model.init_weights(seed=0)
    for layer in model.model.layers:
        layer.mlp.experts.keep_experts(4, 4)
    with pytest.raises(ValueError, match=r"holds 4 of the model's 8 experts"):
        save_hf(model, tmp_path / "m")
    assert not (tmp_path / "m").exists() and not list(tmp_path.iterdir())


def test_bad_directories_are_named_and_missing_keys_take_transformers_defaults(tmp_path):
    from models.hf import read_hf_config

    hf = random_hf_model("dense_untied")
    hf.save_pretrained(tmp_path / "hf")
    cfg_file = tmp_path / "hf" / "config.json"
    d = json.loads(cfg_file.read_text())
    cfg_file.write_text("{not json")
    with pytest.raises(ValueError, match=re.escape(f"{cfg_file}: cannot read it as JSON")):
        load_hf(tmp_path / "hf")
    cfg_file.write_text(json.dumps(dict(d, num_key_value_heads=3)))
    with pytest.raises(ValueError, match=re.escape(f"{cfg_file}: num_attention_heads (4) must be a multiple")):
        load_hf(tmp_path / "hf")
    # keys left out read as transformers reads them (head_dim 128 for a dense model, not hidden / heads)
    sparse = {k: v for k, v in d.items() if k not in ("head_dim", "max_position_embeddings", "vocab_size")}
    cfg_file.write_text(json.dumps(sparse))
    ours, theirs = read_hf_config(tmp_path / "hf"), transformers.Qwen3Config.from_pretrained(tmp_path / "hf")
    assert (ours.head_dim, ours.max_position_embeddings, ours.vocab_size) == (
        theirs.head_dim, theirs.max_position_embeddings, theirs.vocab_size) == (128, 32768, 151936)
    cfg_file.write_text(json.dumps(dict(d, num_key_value_heads=None)))  # an explicit null: one per query head
    ours, theirs = read_hf_config(tmp_path / "hf"), transformers.Qwen3Config.from_pretrained(tmp_path / "hf")
    assert ours.num_key_value_heads == theirs.num_key_value_heads == 4
    cfg_file.write_text(json.dumps(d))
    weights = tmp_path / "hf" / "model.safetensors"
    # an integer tensor was cast to floats unsaid (a 0.02-std weight stored as int32 is all zeros)
    from safetensors.torch import load_file, save_file

    state = load_file(weights)
    save_file(dict(state, **{"model.norm.weight": state["model.norm.weight"].to(torch.int32)}), weights)
    with pytest.raises(ValueError, match=re.escape(f"{weights}: model.norm.weight: stored as I32; weights are read "
                                                   "from F32, BF16, F16 or F64")):
        load_hf(tmp_path / "hf")
    save_file(state, weights)
    load_hf(tmp_path / "hf")
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=re.escape(f"{weights}: not a readable safetensors file")):
        load_hf(tmp_path / "hf")


def test_balance_loss_coefficient_is_converted_to_and_from_transformers_meaning():
    """transformers' balance loss is k at an even load, this model's 1: the released 0.001 is 0.001 * k here."""
    released = {"model_type": "qwen3_moe", "num_experts_per_tok": 8, "router_aux_loss_coef": 0.001,
                "num_hidden_layers": 2}
    cfg = config_from_hf(released)
    assert cfg.router_aux_loss_coef == pytest.approx(0.008)
    assert load_preset("qwen3_30b_a3b").router_aux_loss_coef == pytest.approx(0.008)
    assert hf_config_dict(cfg)["router_aux_loss_coef"] == pytest.approx(0.001)


def test_moe_gradients_match_transformers(tmp_path):
    """The LM loss's gradient of every weight, routers included, equals transformers' (the forward alone missed
    a detached norm_topk_prob divisor, which only changes the router's gradient)."""
    hf = random_hf_model("moe")
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf(tmp_path / "hf").eval()  # eval: no balance-loss bookkeeping; the LM loss on both sides
    x = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    labels = torch.cat([x[:, 1:], torch.full((2, 1), -100)], dim=1)
    hf(x, labels=x).loss.backward()
    ours(x, labels=labels).lm_loss.backward()
    theirs = dict(hf.named_parameters())
    routers = 0
    for name, p in ours.named_parameters():
        if name in theirs and theirs[name].grad is not None and theirs[name].shape == p.shape:
            torch.testing.assert_close(p.grad, theirs[name].grad, rtol=1e-4, atol=1e-6, msg=name)
            routers += ".mlp.gate." in name
    assert routers == 2  # both layers' routers compared
