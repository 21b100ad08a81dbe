"""Dual Chunk Attention against its definition: a brute-force score matrix with remapped positions, ordinary
attention whenever the sequence fits, the KV cache, and lengths beyond the RoPE tables."""
import dataclasses
import math

import pytest
import torch

from models import KVCache, Qwen3ForCausalLM, generate, load_preset
from models.dca import DualChunkAttention, dual_chunk_attention
from models.rope import apply_rope, rope_tables


def build(seed=0, **overrides):
    # a larger init std than training, so attention is far from uniform and position errors show
    cfg = dataclasses.replace(load_preset("tiny_dense"), initializer_range=0.1, **overrides)
    model = Qwen3ForCausalLM(cfg)
    model.init_weights(seed=seed)
    return model.eval()


def reference(q, k, v, cos, sin, chunk_size, local_size):
    """The paper's definition written out: for every (query i, key j <= i) pick the query position by how far
    back j's chunk lies, rotate, score; one softmax per query. Also returns the relative distances used."""
    b, h, t, d = q.shape
    k = k.repeat_interleave(h // k.shape[1], dim=1)
    v = v.repeat_interleave(h // v.shape[1], dim=1)
    s = chunk_size - local_size

    def rot(x, p):  # x (b, h, d) rotated to position p
        return apply_rope(x[:, :, None], cos[p][None, None, None], sin[p][None, None, None])[:, :, 0]

    out = torch.zeros_like(q)
    distances = {}
    for i in range(t):
        scores = []
        for j in range(i + 1):
            back = i // s - j // s
            if back == 0:
                qp = i % s  # intra-chunk
            elif back == 1:
                qp = s + i % s if i % s < local_size else chunk_size - 1  # successive chunk
            else:
                qp = chunk_size - 1  # inter-chunk
            kp = j % s
            distances[i, j] = qp - kp
            scores.append((rot(q[:, :, i], qp) * rot(k[:, :, j], kp)).sum(-1) / math.sqrt(d))  # (b, h)
        p = torch.stack(scores, -1).softmax(-1)  # (b, h, i+1)
        out[:, :, i] = torch.einsum("bhj,bhjd->bhd", p, v[:, :, : i + 1])
    return out, distances


def test_matches_brute_force_definition_over_several_chunks():
    torch.manual_seed(0)
    b, h, hkv, t, d = 2, 4, 2, 23, 8
    chunk_size, local_size = 8, 3  # chunks of 5: 23 tokens span 5 chunks, all three kinds of attention occur
    q, k, v = torch.randn(b, h, t, d), torch.randn(b, hkv, t, d), torch.randn(b, hkv, t, d)
    cos, sin = rope_tables(d, 10_000.0, None, 64, torch.device("cpu"))
    ours = dual_chunk_attention(q, k, v, cos, sin, DualChunkAttention(chunk_size, local_size))
    ref, distances = reference(q, k, v, cos, sin, chunk_size, local_size)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    # the point of DCA: no relative distance reaches chunk_size, and nearby tokens keep their exact distance
    assert max(distances.values()) == chunk_size - 1 and min(distances.values()) == 0
    assert all(dist == i - j for (i, j), dist in distances.items() if i - j < local_size)
    # and it is not ordinary attention at this length
    plain = torch.nn.functional.scaled_dot_product_attention(
        apply_rope(q, cos[:t], sin[:t]), apply_rope(k, cos[:t], sin[:t]).repeat_interleave(2, 1),
        v.repeat_interleave(2, 1), is_causal=True)
    assert (ours - plain).abs().max() > 1e-2


def test_blocks_of_scores_merge_to_the_whole_softmax(monkeypatch):
    """The partial attentions run in blocks of BLOCK x BLOCK scores (one chunk's whole matrix at Qwen3's sizes is
    ~100 GB); blocks of 3 (rows whose later column blocks are all masked, a last block of 2) give the definition."""
    import models.dca

    torch.manual_seed(1)
    b, h, hkv, t, d = 1, 4, 2, 23, 8
    q, k, v = torch.randn(b, h, t, d), torch.randn(b, hkv, t, d), torch.randn(b, hkv, t, d)
    cos, sin = rope_tables(d, 10_000.0, None, 64, torch.device("cpu"))
    whole = dual_chunk_attention(q, k, v, cos, sin, DualChunkAttention(8, 3))
    monkeypatch.setattr(models.dca, "BLOCK", 3)
    blocked = dual_chunk_attention(q, k, v, cos, sin, DualChunkAttention(8, 3))
    torch.testing.assert_close(blocked, whole, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(blocked, reference(q, k, v, cos, sin, 8, 3)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("t", [12, 40])
def test_equals_full_attention_when_the_sequence_fits(t):
    """One chunk (t <= chunk_len), or two with every query near enough (t <= chunk_size): ordinary attention."""
    model = build()
    x = torch.randint(0, 8192, (2, t), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(x).logits
        model.set_attention_mode("dca", chunk_size=40, local_size=8)  # chunk_len 32
        dca = model(x).logits
        model.set_attention_mode("full")
        back = model(x).logits
    torch.testing.assert_close(dca, full, atol=2e-5, rtol=1e-5)
    assert torch.equal(back, full)  # switching back restores the training path exactly


def test_kv_cache_decoding_matches_full_forward():
    model = build()
    model.set_attention_mode("dca", chunk_size=16, local_size=4)
    x = torch.randint(0, 8192, (2, 45), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(x).logits
        cache = KVCache.for_model(model, batch=2, max_len=45)
        parts = [model(x[:, :13], kv_cache=cache).logits,  # prefill ending inside a chunk
                 model(x[:, 13:14], kv_cache=cache).logits,  # one token
                 model(x[:, 14:45], kv_cache=cache).logits]  # several chunks at once on a filled cache
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=2e-5, rtol=1e-5)
    # greedy decoding with the cache = argmax of a full DCA forward at every step
    prompt = x[:, :20]
    out = generate(model, prompt, max_new_tokens=12)
    with torch.no_grad():
        for step in range(12):
            nxt = model(out[:, : 20 + step]).logits[:, -1].argmax(-1)
            assert torch.equal(nxt, out[:, 20 + step])


def test_runs_past_the_rope_tables():
    """Positions never exceed chunk_size - 1, so DCA reads 4x past a model's RoPE tables."""
    model = build(max_position_embeddings=32)
    x = torch.randint(0, 8192, (1, 128), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), pytest.raises(ValueError, match="exceeds the RoPE tables"):
        model(x)
    model.set_attention_mode("dca", chunk_size=32, local_size=4)
    with torch.no_grad():
        out = model(x, labels=x)
    assert torch.isfinite(out.lm_loss)
    with pytest.raises(ValueError, match="exceeds the RoPE tables"):
        model.set_attention_mode("dca", chunk_size=64, local_size=4)
    assert model.dca.chunk_size == 32 and all(layer.self_attn.dca is model.dca for layer in model.model.layers)
    with torch.no_grad():  # the refused call changed nothing (it left the model half switched)
        torch.testing.assert_close(model(x, labels=x).lm_loss, out.lm_loss, rtol=0, atol=0)


def test_rope_scaling_cannot_shrink_the_tables_under_an_active_dca():
    model = build(max_position_embeddings=32)
    model.set_rope_scaling({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32})
    model.set_attention_mode("dca", chunk_size=100, local_size=4)
    with pytest.raises(ValueError, match="shrink to 32 positions, below the active DCA chunk_size 100"):
        model.set_rope_scaling(None)
    assert model.rope_cos.shape[0] == 128 and model.config.rope_scaling["factor"] == 4.0
    model.set_attention_mode("full")
    model.set_rope_scaling(None)
    assert model.rope_cos.shape[0] == 32


def test_bad_settings_are_refused():
    model = build()
    with pytest.raises(ValueError, match="local_size < chunk_size"):
        model.set_attention_mode("dca", chunk_size=16, local_size=16)
    with pytest.raises(ValueError, match="'full' or 'dca'"):
        model.set_attention_mode("sliding")
    model.set_attention_mode("dca", chunk_size=16, local_size=4)
    with pytest.raises(ValueError, match="position_ids nor doc_ids"):
        model(torch.zeros(1, 8, dtype=torch.long), doc_ids=torch.zeros(1, 8, dtype=torch.long))
