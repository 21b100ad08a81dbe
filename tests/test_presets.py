"""Presets: one YAML per preset, every released row's parameter counts, meta builds, the config schema."""
import dataclasses
import math
import time
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from models import Qwen3Config, Qwen3ForCausalLM, count_parameters, flops_per_token, load_preset, preset_names

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
EXPECTED = ["qwen3_0_6b", "qwen3_1_7b", "qwen3_4b", "qwen3_8b", "qwen3_14b", "qwen3_32b",
            "qwen3_30b_a3b", "qwen3_235b_a22b", "tiny_dense", "tiny_moe"]

# Figures as printed on the model cards / in shared/qwen3.md (billions): total, non-embedding or active.
CARD = {
    "qwen3_0_6b": dict(total="0.6", non_embedding="0.44"),
    "qwen3_1_7b": dict(total="1.7", non_embedding="1.4"),
    "qwen3_4b": dict(total="4.0", non_embedding="3.6"),
    "qwen3_8b": dict(total="8.2", non_embedding="6.95"),
    "qwen3_14b": dict(total="14.8", non_embedding="13.2"),
    "qwen3_32b": dict(total="32.8", non_embedding="31.2"),
    "qwen3_30b_a3b": dict(total="30.5", active="3.3"),
    "qwen3_235b_a22b": dict(total="235", active="22"),
}


def _matches_card(count: int, printed: str) -> bool:
    """Within 1% of the card, or equal to the count cut to the card's printed digits.

    Two cards truncate rather than round to 1%: Qwen3-1.7B has 1.72B parameters ("1.7B") and
    Qwen3-30B-A3B activates 3.35B per token ("3.3B").
    """
    card = float(printed) * 1e9
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    truncated = math.floor(count / 1e9 * 10**decimals) / 10**decimals
    return abs(count - card) <= 0.01 * card or f"{truncated:.{decimals}f}" == printed


def test_every_preset_has_a_yaml_with_a_source_comment():
    assert sorted(EXPECTED) == preset_names()
    for name in EXPECTED:
        text = (CONF / f"{name}.yaml").read_text()
        assert text.startswith("#"), name  # cites its source
        values = yaml.safe_load(text)
        assert values["name"] == name
        assert values["rope_theta"] == 10000.0  # General-stage base, whatever the release carries
        assert "defaults" not in values


@pytest.mark.parametrize("name", list(CARD))
def test_released_rows_match_the_cards(name):
    cfg = load_preset(name)
    counts = count_parameters(cfg)
    for field, printed in CARD[name].items():
        assert _matches_card(getattr(counts, field), printed), (name, field, getattr(counts, field), printed)
    assert counts.total == counts.embedding + counts.non_embedding
    if not cfg.is_moe:
        assert counts.active == counts.total


def test_exact_counts_of_two_rows():
    # 0.6B: 28 x (attention 6,291,456 + MLP 9,437,184 + norms 2,304) + final norm 1,024 + tied embedding.
    assert count_parameters(load_preset("qwen3_0_6b")).total == 28 * (6291456 + 9437184 + 2304) + 1024 + 151936 * 1024
    c = count_parameters(load_preset("qwen3_30b_a3b"))
    assert round(c.total / 1e9, 1) == 30.5 and round(c.active / 1e9, 2) == 3.35


def test_meta_build_is_fast_and_matches_the_analytic_count():
    with torch.device("meta"):
        Qwen3ForCausalLM(load_preset("tiny_dense"))  # warm up torch's lazy imports for meta tensors
    for name in EXPECTED:
        cfg = load_preset(name)
        elapsed = []
        for _ in range(3):  # best of three: other processes may share the CPU
            start = time.perf_counter()
            with torch.device("meta"):
                model = Qwen3ForCausalLM(cfg)
            elapsed.append(time.perf_counter() - start)
        assert min(elapsed) < 0.5, (name, elapsed)
        assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg).total, name
        assert all(p.device.type == "meta" for p in model.parameters())


def test_matmul_params_and_flops():
    cfg = load_preset("tiny_moe")
    c = count_parameters(cfg)
    d, L, f = cfg.hidden_size, cfg.num_hidden_layers, cfg.moe_intermediate_size
    k, e = cfg.num_experts_per_tok, cfg.num_experts
    attn = d * cfg.head_dim * 2 * (cfg.num_attention_heads + cfg.num_key_value_heads)
    assert c.matmul_active == L * (attn + k * 3 * d * f + d * e) + cfg.vocab_size * d
    full = flops_per_token(cfg, 1024, causal_halved=False)
    half = flops_per_token(cfg, 1024, causal_halved=True)
    attention = 12 * L * cfg.num_attention_heads * cfg.head_dim * 1024
    assert full == 6 * c.matmul_active + attention and half == full - attention / 2


@pytest.mark.parametrize("field,value,match", [
    ("num_key_value_heads", 3, "num_key_value_heads"),
    ("num_experts_per_tok", 9, "num_experts_per_tok"),
    ("balance_loss_granularity", "step", "balance_loss_granularity"),
    ("moe_implementation", "triton", "moe_implementation"),
    ("head_dim", 31, "head_dim"),
    ("rope_scaling", {"rope_type": "linear", "factor": 2.0}, "rope_scaling"),
    # NaN passed '<= 1' and '<= 0' (comparisons with NaN are false): NaN RoPE tables, NaN norms
    ("rope_theta", float("nan"), "rope_theta must be a finite number > 1, got nan"),
    ("rope_theta", float("inf"), "rope_theta must be a finite number > 1, got inf"),
    ("rms_norm_eps", float("nan"), "rms_norm_eps must be positive and finite, got nan"),
    # NaN passed '< 0': every step's loss NaN, each update skipped until the run stopped with exit 4
    ("router_aux_loss_coef", float("nan"), "router_aux_loss_coef must be a finite number >= 0, got nan"),
    ("router_z_loss_coef", float("inf"), "router_z_loss_coef must be a finite number >= 0, got inf"),
    ("router_z_loss_coef", -0.1, "router_z_loss_coef must be a finite number >= 0, got -0.1"),
    ("initializer_range", float("nan"), "initializer_range must be positive and finite, got nan"),  # NaN weights
])
def test_validate_names_the_bad_field(field, value, match):
    cfg = dataclasses.replace(load_preset("tiny_moe"), **{field: value})
    with pytest.raises(ValueError, match=match):
        cfg.validate()


def test_schema_is_omegaconf_compatible_and_yaml_is_strict(tmp_path, monkeypatch):
    schema = OmegaConf.structured(Qwen3Config)
    merged = OmegaConf.merge(schema, OmegaConf.load(CONF / "qwen3_30b_a3b.yaml"))
    assert OmegaConf.to_object(merged) == load_preset("qwen3_30b_a3b")
    with torch.device("meta"):
        assert Qwen3ForCausalLM(merged).config == load_preset("qwen3_30b_a3b")  # a DictConfig is accepted too
    with pytest.raises(Exception):
        OmegaConf.merge(schema, {"hidden_sise": 3})  # a typo fails at composition time

    import models.presets as presets
    monkeypatch.setattr(presets, "PRESET_DIR", tmp_path)
    text = (CONF / "tiny_dense.yaml").read_text()
    (tmp_path / "bad_eps.yaml").write_text(text.replace("1.0e-06", "1e-6"))  # YAML 1.1 reads this as a string
    with pytest.raises(ValueError, match="rms_norm_eps"):
        presets.load_preset("bad_eps")
    (tmp_path / "typo.yaml").write_text(text + "num_layers: 3\n")
    with pytest.raises(ValueError, match="num_layers"):
        presets.load_preset("typo")
    with pytest.raises(ValueError, match="unknown model preset"):
        presets.load_preset("nope")
