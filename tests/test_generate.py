"""Decoding: greedy matches transformers token for token; the KV cache reproduces full forwards; sampling options."""
import dataclasses

import pytest
import torch

from models import KVCache, Qwen3ForCausalLM, generate, load_preset, save_hf
from models.decode import sample_next


def build(name, seed=0, **overrides):
    # A larger init std than training uses, so next-token distributions are peaked and greedy ties impossible.
    cfg = dataclasses.replace(load_preset(name), initializer_range=0.1, **overrides)
    model = Qwen3ForCausalLM(cfg)
    model.init_weights(seed=seed)
    return model.eval()


@pytest.mark.parametrize("name", ["tiny_dense", "tiny_moe"])
def test_greedy_matches_transformers_generate(name, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = build(name)
    save_hf(model, tmp_path / "m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    prompt = torch.randint(0, 8192, (2, 7), generator=torch.Generator().manual_seed(0))
    ours = generate(model, prompt, max_new_tokens=24)
    theirs = hf.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours.shape == (2, 31)
    assert torch.equal(ours, theirs), (ours.tolist(), theirs.tolist())
    assert len(set(ours[0, 7:].tolist())) > 3  # not a degenerate constant continuation


@pytest.mark.parametrize("name", ["tiny_dense", "tiny_moe"])
def test_kv_cache_reproduces_full_forward(name):
    model = build(name)
    x = torch.randint(0, 8192, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(x).logits
        cache = KVCache.for_model(model, batch=2, max_len=16)
        parts = [model(x[:, :6], kv_cache=cache).logits,  # prefill
                 model(x[:, 6:10], kv_cache=cache).logits]  # several tokens onto a non-empty cache
        parts += [model(x[:, t:t + 1], kv_cache=cache).logits for t in range(10, 16)]  # one at a time
    assert cache.length == 16
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="KV cache full"):
        model(x[:, :1], kv_cache=cache)


def test_sampling_is_reproducible_and_respects_filters():
    model = build("tiny_dense").train()
    prompt = torch.randint(0, 8192, (3, 5), generator=torch.Generator().manual_seed(2))

    def run(seed, **kw):
        return generate(model, prompt, 12, generator=torch.Generator().manual_seed(seed), **kw)

    a, b, c = run(0, temperature=1.0), run(0, temperature=1.0), run(1, temperature=1.0)
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = generate(model, prompt, 12)
    assert torch.equal(run(0, temperature=1.0, top_k=1), greedy)
    assert torch.equal(run(0, temperature=1.0, top_p=1e-6), greedy)
    assert model.training  # generate restores the mode it found

    logits = torch.tensor([[0.0, 5.0, 4.9, 1.0, -3.0]])
    draws = {sample_next(logits, 1.0, top_k=2, generator=torch.Generator().manual_seed(s)).item() for s in range(50)}
    assert draws == {1, 2}
    # top_p: token 1 alone has p ~ 0.52 < 0.6, so token 2 is needed; token 3 is not.
    draws = {sample_next(logits, 1.0, top_p=0.6, generator=torch.Generator().manual_seed(s)).item() for s in range(50)}
    assert draws == {1, 2}


def test_eos_stops_and_pads_finished_sequences():
    model = build("tiny_dense")
    prompt = torch.randint(0, 8192, (2, 4), generator=torch.Generator().manual_seed(3))
    free = generate(model, prompt, 10)
    eos = free[0, 6].item()  # the third generated token of sequence 0
    out = generate(model, prompt, 10, eos_token_id=eos)
    for row in range(2):
        hits = (free[row, 4:] == eos).nonzero()
        end = 4 + hits[0].item() + 1 if len(hits) else free.shape[1]  # up to and including the first eos
        assert torch.equal(out[row, :end], free[row, :end])
        assert (out[row, end:] == eos).all()
    ended = all((free[r, 4:] == eos).any() for r in range(2))
    assert out.shape[1] == (max(4 + (free[r, 4:] == eos).nonzero()[0].item() + 1 for r in range(2)) if ended else 14)


def test_decoding_past_the_rope_tables_is_named():
    """An IndexError from deep inside the RoPE lookup before; now the limit and the ways past it."""
    model = build("tiny_dense", max_position_embeddings=16)
    prompt = torch.randint(0, 8192, (1, 14), generator=torch.Generator().manual_seed(0))
    assert generate(model, prompt, max_new_tokens=3).shape == (1, 17)  # the 17th is predicted at position 15
    with pytest.raises(ValueError, match=r"position 16 is beyond the RoPE tables \(16 positions\).*YaRN.*DCA"):
        generate(model, prompt, max_new_tokens=4)


def test_edge_filters_and_explicit_positions():
    """top_p=0 kept nothing (NaN probabilities), top_k=0 was a shape error; transformers reads top_k=0 as off.
    Positions the caller gives past the RoPE tables were a bare IndexError."""
    logits = torch.tensor([[0.0, 1.0, 0.9, 0.5, -0.3]])
    draws = lambda **kw: [sample_next(logits, 1.0, generator=torch.Generator().manual_seed(s), **kw).item()
                          for s in range(60)]
    assert set(draws(top_p=0.0)) == {1}
    assert draws(top_k=0) == draws() and len(set(draws())) == 5
    for bad in ({"top_k": -1}, {"top_p": 1.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            sample_next(logits, 1.0, **bad)
    model = build("tiny_dense", max_position_embeddings=16).eval()
    x = torch.randint(0, 8192, (1, 4))
    with pytest.raises(ValueError, match=r"position_ids span 14..17, outside the RoPE tables \(0..15\)"):
        model(x, position_ids=torch.arange(14, 18)[None])


def test_padded_vocabulary_rows_are_never_chosen():
    """Ids from the tokenizer's vocabulary size to the embedding's rows map to no token (decode refuses them); a
    briefly trained model still gives them most of its mass (69% in the smoke run's export)."""
    logits = torch.tensor([[0.0, 1.0, 2.0, 9.0, 9.5], [3.0, 0.0, 0.0, 8.0, 0.0]])
    assert sample_next(logits).tolist() == [4, 3]
    assert sample_next(logits, vocab_size=3).tolist() == [2, 0]
    gen = torch.Generator().manual_seed(0)
    drawn = torch.stack([sample_next(logits, temperature=2.0, generator=gen, vocab_size=3) for _ in range(200)])
    assert drawn.max() < 3 and len(set(drawn.flatten().tolist())) == 3
    model = build("tiny_dense")
    prompt = torch.randint(0, 8192, (2, 5), generator=torch.Generator().manual_seed(0))
    free = generate(model, prompt, max_new_tokens=16, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert free[:, 5:].max() >= 100  # without the limit the draws range over all 8,192 rows
    kept = generate(model, prompt, max_new_tokens=16, temperature=1.0, generator=torch.Generator().manual_seed(1),
                    vocab_size=100)
    assert kept[:, 5:].max() < 100 and torch.equal(kept[:, :5], prompt)
