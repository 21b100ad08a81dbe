"""Qwen3ForCausalLM: meta construction and init, HF names, RoPE state, loss path, document masking, checkpointing."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from models import Qwen3ForCausalLM, load_preset, position_ids_from_doc_ids


def build(name="tiny_dense", seed=0, **overrides):
    cfg = dataclasses.replace(load_preset(name), **overrides)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(cfg)
    model.to_empty(device="cpu")
    model.init_weights(seed=seed)
    return model


def test_meta_build_to_empty_init_is_deterministic_and_tied():
    a, b, c = build(seed=1), build(seed=1), build(seed=2)
    for (n, p), q, r in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(p, q), n
        if "norm" not in n:
            assert not torch.equal(p, r), n
    assert a.lm_head.weight is a.model.embed_tokens.weight  # to_empty unties; the model re-ties
    assert build(tie_word_embeddings=False).lm_head.weight is not build().model.embed_tokens.weight


def test_init_stds_follow_the_documented_scheme():
    model = build("tiny_moe", num_hidden_layers=8)
    sigma, L = model.config.initializer_range, 8
    sd = model.state_dict()
    assert sd["model.embed_tokens.weight"].std().item() == pytest.approx(sigma, rel=0.02)
    assert sd["lm_head.weight"].std().item() == pytest.approx(sigma, rel=0.02)
    assert sd["model.layers.3.self_attn.q_proj.weight"].std().item() == pytest.approx(sigma, rel=0.05)
    assert sd["model.layers.3.mlp.experts.gate_up_proj"].std().item() == pytest.approx(sigma, rel=0.05)
    # the routers, (8, 128) each: all 8 layers' 8,192 draws together (one layer's std is only ~2% from sigma)
    router = torch.cat([sd[f"model.layers.{i}.mlp.gate.weight"].flatten() for i in range(L)])
    assert router.std().item() == pytest.approx(sigma, rel=0.05)
    residual = sigma / math.sqrt(2 * L)
    assert sd["model.layers.3.self_attn.o_proj.weight"].std().item() == pytest.approx(residual, rel=0.05)
    assert sd["model.layers.3.mlp.experts.down_proj"].std().item() == pytest.approx(residual, rel=0.05)
    for n, t in sd.items():
        if "norm" in n:
            assert torch.equal(t, torch.ones_like(t)), n


def test_init_stds_of_the_dense_mlp_and_kv_projections():
    """gate/up_proj (and k/v_proj) at sigma; down_proj, which writes into the residual stream, at sigma / sqrt(2 L)
    (1/4 of it at L = 8)."""
    model = build("tiny_dense", num_hidden_layers=8)
    sigma = model.config.initializer_range
    sd = model.state_dict()
    for name in ("mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.v_proj"):
        assert sd[f"model.layers.3.{name}.weight"].std().item() == pytest.approx(sigma, rel=0.05), name
    assert sd["model.layers.3.mlp.down_proj.weight"].std().item() == pytest.approx(sigma / 4, rel=0.05)


def test_state_dict_uses_hf_names_and_never_holds_rope_tables():
    keys = set(build("tiny_moe").state_dict())
    for k in ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
              "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
              "model.layers.0.self_attn.v_proj.weight", "model.layers.0.self_attn.o_proj.weight",
              "model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.k_norm.weight",
              "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
              "model.layers.0.mlp.gate.weight", "model.layers.0.mlp.experts.gate_up_proj",
              "model.layers.0.mlp.experts.down_proj"]:
        assert k in keys, k
    assert not any("rope" in k or "inv_freq" in k for k in keys)
    dense = set(build().state_dict())
    assert {"model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight",
            "model.layers.1.mlp.down_proj.weight"} <= dense


def test_rope_theta_switch_recomputes_tables_and_survives_moves():
    model = build().eval()
    x = torch.randint(0, 8192, (1, 64))
    with torch.no_grad():
        before = model(x).logits
        model.set_rope_theta(1_000_000.0)
        after = model(x).logits
    assert model.config.rope_theta == 1e6
    cfg = load_preset("tiny_dense")
    Qwen3ForCausalLM(cfg).set_rope_theta(5e5)
    assert cfg.rope_theta == 1e4  # a model changes its own copy of the config, not the caller's
    assert not torch.allclose(before, after, atol=1e-4)
    inv = 1.0 / 1e6 ** (torch.arange(0, 32, 2).float() / 32)
    torch.testing.assert_close(model.rope_cos[100], torch.cos(100 * inv))
    # Loading weights into a fresh model at the old theta gives the old outputs: tables are not in the checkpoint.
    fresh = build(seed=5).eval()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, before)
    # A dtype round trip must not leave rounded tables behind.
    model.to(torch.bfloat16).to(torch.float32)
    assert model.rope_cos.dtype == torch.float32
    torch.testing.assert_close(model.rope_cos[100], torch.cos(100 * inv))


def test_a_bad_rope_base_is_refused_and_changes_nothing():
    """set_rope_theta checks the base as the config checks model.rope_theta: NaN and negative bases made NaN
    tables, inf and 1 constant rotations, and 1 under YaRN raised ZeroDivisionError with the config changed."""
    model = build().eval()
    model.set_rope_scaling({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024})
    cos = model.rope_cos.clone()
    for bad in (float("nan"), -5.0, 1.0, float("inf")):
        with pytest.raises(ValueError, match="rope_theta must be a finite number > 1"):
            model.set_rope_theta(bad)
        assert model.config.rope_theta == 1e4 and torch.equal(model.rope_cos, cos)
    with pytest.raises(ValueError, match="rope_theta must be a number, got '1e6'"):
        model.set_rope_theta("1e6")
    model.set_rope_theta(1e6)
    assert model.config.rope_theta == 1e6 and torch.isfinite(model.rope_cos).all()


def test_yarn_scaling_extends_tables_and_changes_long_positions_only():
    model = build(max_position_embeddings=256).eval()
    x = torch.randint(0, 8192, (1, 8))
    with torch.no_grad():
        base = model(x).logits
        model.set_rope_scaling({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256})
        assert model.rope_cos.shape[0] == 1024
        scaled = model(x).logits
        model.set_rope_scaling(None)
        torch.testing.assert_close(model(x).logits, base)
    assert not torch.allclose(base, scaled, atol=1e-4)
    with pytest.raises(ValueError, match="exceeds the RoPE tables"):
        model(torch.zeros(1, 257, dtype=torch.long))
    # factor x original positions, rounded up: a 1.001 factor over 1,000 positions covers 1,001 (it gave 1,000)
    from models.rope import rope_table_length

    yarn = {"rope_type": "yarn", "factor": 1.001, "original_max_position_embeddings": 1000}
    assert rope_table_length(1000, yarn) == 1001
    assert rope_table_length(64, {**yarn, "factor": 4.0, "original_max_position_embeddings": 64}) == 256


def test_legacy_type_key_selects_yarn_as_rope_type_does():
    """HF's older configs spell it `type`; the config check and the table length accept it, so the frequencies must
    be YaRN's too (not plain RoPE's over a longer table)."""
    from models.rope import rope_inv_freq

    scaling = {"factor": 4.0, "original_max_position_embeddings": 64}
    new, new_attention = rope_inv_freq(16, 1e4, {"rope_type": "yarn", **scaling})
    old, old_attention = rope_inv_freq(16, 1e4, {"type": "yarn", **scaling})
    assert torch.equal(old, new) and old_attention == new_attention > 1.0
    assert not torch.equal(old, rope_inv_freq(16, 1e4)[0])


def test_loss_path_matches_logits_path():
    model = build("tiny_moe").eval()
    torch.manual_seed(0)
    x = torch.randint(0, 8192, (2, 33))
    y = torch.randint(0, 8192, (2, 33))
    y[0, :5] = -100
    with torch.no_grad():
        out = model(x, labels=y, return_token_losses=True)
        logits = model(x).logits
    ref = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    torch.testing.assert_close(out.lm_loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)
    assert out.logits is None and out.token_losses.shape == (2, 33)
    assert (out.token_losses[0, :5] == 0).all()
    torch.testing.assert_close(out.token_losses.sum() / (y != -100).sum(), ref, rtol=1e-6, atol=1e-6)


def test_dense_model_has_zero_aux_loss_and_no_expert_load():
    model = build()
    out = model(torch.randint(0, 8192, (1, 8)), labels=torch.randint(0, 8192, (1, 8)))
    assert out.aux_loss.item() == 0.0 and model.expert_load() is None


def test_position_ids_restart_at_each_document():
    doc = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [5, 5, 5, 5, 5, 5, 5, 5, 5]])
    assert position_ids_from_doc_ids(doc).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3], list(range(9))]


@pytest.mark.parametrize("name", ["tiny_dense", "tiny_moe"])
def test_document_masking_equals_separate_documents(name):
    model = build(name).eval()
    torch.manual_seed(1)
    lengths = [7, 12, 5]
    docs = [torch.randint(0, 8192, (1, n)) for n in lengths]
    packed = torch.cat(docs, dim=1)
    doc_ids = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1)
    with torch.no_grad():
        masked = model(packed, doc_ids=doc_ids).logits
        separate = torch.cat([model(d).logits for d in docs], dim=1)
        plain = model(packed).logits
    torch.testing.assert_close(masked, separate, rtol=1e-5, atol=1e-5)
    # Default (plain packing): later documents see earlier ones, so their logits differ.
    torch.testing.assert_close(plain[:, :7], separate[:, :7], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain[:, 7:], separate[:, 7:], atol=1e-3)


@pytest.mark.parametrize("name", ["tiny_dense", "tiny_moe"])
def test_activation_checkpointing_gives_identical_loss_and_grads(name):
    torch.manual_seed(0)
    x, y = torch.randint(0, 8192, (2, 32)), torch.randint(0, 8192, (2, 32))
    doc = torch.tensor([[0] * 10 + [1] * 22, [0] * 32])
    results = []
    for ckpt in (False, True):
        model = build(name, activation_checkpointing=ckpt).train()
        out = model(x, labels=y, doc_ids=doc)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        load = model.expert_load()
        if load is not None:  # recomputation in backward must not count routed tokens twice
            assert torch.allclose(load.sum(-1), torch.ones(model.config.num_hidden_layers))
            assert model.balance.step_counts.sum().item() == 64 * 2 * model.config.num_hidden_layers
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l0, l1, rtol=0, atol=0)
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], rtol=1e-6, atol=1e-7, msg=n)


def test_a_few_adamw_steps_fit_a_batch():
    model = build().train()
    torch.manual_seed(0)
    x = torch.randint(0, 8192, (2, 64))
    y = torch.roll(x, -1, dims=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = model(x, labels=y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(8192), abs=0.1)
    assert losses[-1] < 0.5 * losses[0]


def test_bf16_forward_keeps_model_dtype_and_fp32_losses():
    model = build("tiny_moe").to(torch.bfloat16)
    x, y = torch.randint(0, 8192, (1, 16)), torch.randint(0, 8192, (1, 16))
    out = model(x, labels=y, return_token_losses=True)
    assert out.token_losses.dtype == torch.float32
    out.loss.backward()
    assert model.model.layers[0].mlp.experts.gate_up_proj.grad.dtype == torch.bfloat16
    assert model.eval()(x).logits.dtype == torch.bfloat16


def test_position_ids_at_the_end_of_the_rope_tables():
    """The last row of the tables is usable and the next one is refused (an IndexError on the CPU, a device-side
    assert on CUDA, without the check)."""
    cfg = dataclasses.replace(load_preset("tiny_dense"), max_position_embeddings=16)
    model = Qwen3ForCausalLM(cfg)
    model.init_weights(seed=0)
    model.eval()
    x = torch.randint(0, 8192, (1, 4))
    assert model(x, position_ids=torch.arange(12, 16)[None]).logits.shape == (1, 4, cfg.vocab_size)
    with pytest.raises(ValueError, match=r"position_ids span 13..16, outside the RoPE tables \(0..15\)"):
        model(x, position_ids=torch.arange(13, 17)[None])
