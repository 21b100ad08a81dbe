"""Document masking through FlexAttention (models/doc_mask.py) computes what the dense (B, 1, T, T) mask computes.

On the CPU flex runs eagerly (torch's math reference under the BlockMask); the compiled CUDA kernel is compared in
bf16 by the GPU-only tests at the end, marked `gpu` and skipped on the CPU.
"""
import dataclasses
import math

import pytest
import torch
import torch._dynamo
import torch.nn.attention.flex_attention as flex_module
from torch.nn.attention.flex_attention import BlockMask
from torch import nn
from torch._dynamo.utils import counters

from models import load_preset, position_ids_from_doc_ids
from models import loss as loss_mod
from models.doc_mask import document_mask, resolve_doc_mask_implementation
from test_bench import assert_grads_close, build, gpu

T = 256  # two 128-token tiles per side, so the BlockMask has empty, full and partial tiles


def doc_batch(t=T, device="cpu", seed=0):
    """ids, labels (B=3, T) and doc_ids whose boundaries differ per row.

    Row 0: a one-token document, then documents ending inside the first tile and exactly on the tile boundary;
    row 1: one document over the whole row (no boundary); row 2: a document crossing the tile boundary, and
    labels that are not in increasing order (the mask compares them for equality only)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 8192, (3, t + 1), generator=g)
    labels = ids[:, 1:].clone()
    labels[0, 3:9] = -100
    rows = [[(0, 1), (1, 60), (2, 67), (3, t - 128)], [(0, t)], [(5, 100), (2, 56), (9, t - 166), (4, 10)]]
    doc = torch.cat([torch.cat([torch.full((n,), d) for d, n in row])[None] for row in rows])
    return ids[:, :-1].to(device), labels.to(device), doc.to(device=device, dtype=torch.int32)


def loss_and_grads(model, ids, labels, doc):
    """Loss output and every parameter's gradient of one forward + backward with doc_ids."""
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=labels, doc_ids=doc, return_token_losses=True)
    out.loss.backward()
    return out, {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture
def cpu_flex_backward(monkeypatch):
    """Let flex_attention run its backward on the CPU, for these comparisons only.

    torch refuses it on the CPU because its compiled CPU kernel has no backward; the eager path these tests run
    differentiates the math reference, exact in fp32, which is what comparing with the dense mask needs. If torch
    drops the check, monkeypatch's setattr fails loudly here and the fixture can go.
    """
    monkeypatch.setattr(flex_module, "_validate_device", lambda query, key, value: None)


def test_doc_mask_implementation_is_validated():
    cfg = dataclasses.replace(load_preset("tiny_dense"), doc_mask_implementation="sparse")
    with pytest.raises(ValueError, match="doc_mask_implementation .*'sparse'"):
        cfg.validate()
    assert load_preset("tiny_dense").doc_mask_implementation == "auto"


def test_auto_is_flex_on_cuda_and_dense_elsewhere():
    assert resolve_doc_mask_implementation("auto", torch.device("cuda")) == "flex"
    assert resolve_doc_mask_implementation("auto", torch.device("cpu")) == "dense"
    assert resolve_doc_mask_implementation("flex", torch.device("cpu")) == "flex"
    _, _, doc = doc_batch()
    assert isinstance(document_mask(doc, "auto"), torch.Tensor)  # the CPU keeps the dense mask
    flex = document_mask(doc, "flex")
    assert isinstance(flex, BlockMask) and flex.shape == (3, 1, T, T)
    # Row 0 ends a document on the tile boundary: tile (1, 0) is empty and skipped, so 2 of 3 causal tiles run.
    assert flex.kv_num_blocks[0, 0].tolist() == [1, 1] and flex.full_kv_num_blocks[0, 0].tolist() == [0, 0]
    # Row 1 is one document: the off-diagonal tile is full (no mask evaluated), the diagonal ones partial.
    assert flex.kv_num_blocks[1, 0].tolist() == [1, 1] and flex.full_kv_num_blocks[1, 0].tolist() == [0, 1]


def test_dense_mask_is_block_diagonal_causal():
    """The dense mask, built element by element: the reference the flex path is compared with."""
    doc = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [7, 7, 7, 7, 7, 7, 7, 7], [4, 1, 1, 1, 1, 1, 9, 9]])
    mask = document_mask(doc, "dense")
    assert mask.shape == (3, 1, 8, 8) and mask.dtype == torch.bool
    for b in range(3):
        expected = [[bool(doc[b, i] == doc[b, j] and i >= j) for j in range(8)] for i in range(8)]
        assert mask[b, 0].tolist() == expected
    assert mask[0, 0, 4].tolist() == [False, False, False, True, True, False, False, False]


def test_an_id_that_comes_back_later_in_the_row_is_a_new_document():
    """The mask took equal ids anywhere in the row for one document while the positions restarted at each change
    (a caller's doc_ids; the loader numbers documents 0, 1, 2, ... in order)."""
    again, numbered = torch.tensor([[0, 0, 1, 1, 0, 0]]), torch.tensor([[0, 0, 1, 1, 2, 2]])
    assert torch.equal(document_mask(again, "dense"), document_mask(numbered, "dense"))
    assert torch.equal(position_ids_from_doc_ids(again), position_ids_from_doc_ids(numbered))
    model = build("tiny_dense")
    x = torch.randint(0, 8192, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x, doc_ids=again).logits, model(x, doc_ids=numbered).logits, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["tiny_dense", "tiny_moe"])
def test_flex_gives_the_dense_loss_and_gradients(name, cpu_flex_backward):
    """fp32, GQA (4 query heads on 2 KV heads): the same loss, per-token losses and gradients."""
    dense, flex = build(name, doc_mask_implementation="dense"), build(name, doc_mask_implementation="flex")
    ids, labels, doc = doc_batch()
    ref, ref_grads = loss_and_grads(dense, ids, labels, doc)
    got, got_grads = loss_and_grads(flex, ids, labels, doc)
    assert got.loss.item() == pytest.approx(ref.loss.item(), rel=1e-6)
    torch.testing.assert_close(got.token_losses, ref.token_losses, rtol=1e-5, atol=1e-5)
    assert_grads_close(ref_grads, got_grads, 1e-4)
    # The same positions without the mask: per-token losses far outside the tolerance above.
    unmasked = dense(ids, labels=labels, position_ids=position_ids_from_doc_ids(doc), return_token_losses=True)
    assert (unmasked.token_losses - ref.token_losses).abs().amax().item() > 1e-2


@pytest.mark.parametrize("implementation", ["dense", "flex"])
def test_a_document_does_not_see_its_neighbours(implementation):
    """Changing the middle document of a row changes its own logits and no other document's."""
    model = build(doc_mask_implementation=implementation).eval()
    ids, _, doc = doc_batch()
    other = ids.clone()
    middle = doc[2] == 2  # row 2: tokens 100-155, the document crossing the tile boundary
    other[2, middle] = torch.randint(0, 8192, (int(middle.sum()),), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = model(ids, doc_ids=doc).logits
        b = model(other, doc_ids=doc).logits
    torch.testing.assert_close(b[2, ~middle], a[2, ~middle], rtol=0, atol=1e-6)
    torch.testing.assert_close(b[:2], a[:2], rtol=0, atol=0)
    assert (b[2, middle] - a[2, middle]).abs().amax().item() > 1e-2


def test_flex_equals_each_document_run_alone():
    model = build("tiny_moe", doc_mask_implementation="flex").eval()
    ids, _, doc = doc_batch()
    row = 2
    with torch.no_grad():
        packed = model(ids[row: row + 1], doc_ids=doc[row: row + 1]).logits[0]
        starts = [0] + [i for i in range(1, T) if doc[row, i] != doc[row, i - 1]] + [T]
        alone = torch.cat([model(ids[row: row + 1, s:e]).logits[0] for s, e in zip(starts, starts[1:])])
    assert len(starts) == 5
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_activation_checkpointing_recomputes_flex_exactly(cpu_flex_backward):
    ids, labels, doc = doc_batch()
    plain = build(doc_mask_implementation="flex").train()
    ckpt = build(doc_mask_implementation="flex", activation_checkpointing=True).train()
    ref, ref_grads = loss_and_grads(plain, ids, labels, doc)
    got, got_grads = loss_and_grads(ckpt, ids, labels, doc)
    assert got.loss.item() == ref.loss.item()
    assert_grads_close(ref_grads, got_grads, 1e-6)


def test_compiled_blocks_take_the_block_mask_without_recompiling(monkeypatch, cpu_flex_backward):
    """model.compile with flex: one graph for the 4 blocks, the dense path's numbers, and a batch with other
    document boundaries (a new BlockMask and mask function) reuses the graph. aot_eager backend, as in
    tests/test_bench.py (seconds on a CPU); Inductor's flex kernel is the GPU test's."""
    torch._dynamo.reset()
    compile_ = nn.Module.compile
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: compile_(self, backend="aot_eager"))
    monkeypatch.setitem(loss_mod._COMPILED, "fn", loss_mod._softmax_xent_grad)
    dense = build(doc_mask_implementation="dense")
    fast = build(doc_mask_implementation="flex", compile=True)
    counters.clear()
    for seed in (0, 1):
        ids, labels, doc = doc_batch(seed=seed)
        if seed == 1:
            doc = doc.flip(1)  # other boundaries in every row
        ref, ref_grads = loss_and_grads(dense, ids, labels, doc)
        with torch._dynamo.config.patch(error_on_recompile=seed == 1):
            got, got_grads = loss_and_grads(fast, ids, labels, doc)
        assert got.loss.item() == pytest.approx(ref.loss.item(), rel=1e-6)
        assert_grads_close(ref_grads, got_grads, 1e-4)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------ GPU only


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["tiny_dense", "tiny_moe"])
def test_compiled_flex_matches_dense_on_cuda(name):
    """auto = compiled flex on CUDA, against the dense mask (SDPA), bf16; a second batch does not recompile."""
    from models import doc_mask

    dense = build(name, device="cuda", doc_mask_implementation="dense").to(torch.bfloat16)
    flex = build(name, device="cuda").to(torch.bfloat16)  # doc_mask_implementation: auto
    for seed in (0, 1):
        ids, labels, doc = doc_batch(t=512, device="cuda", seed=seed)
        if seed == 1:
            doc = doc.flip(1)
        ref, ref_grads = loss_and_grads(dense, ids, labels, doc)
        with torch._dynamo.config.patch(error_on_recompile=seed == 1):
            got, got_grads = loss_and_grads(flex, ids, labels, doc)
        assert {"flex_attention", "create_block_mask"} <= set(doc_mask._COMPILED)  # the compiled path ran
        assert got.loss.item() == pytest.approx(ref.loss.item(), rel=2e-3)
        assert_grads_close(ref_grads, got_grads, 3e-2)


@gpu
@pytest.mark.gpu
def test_block_mask_on_cuda_never_holds_the_dense_mask():
    """At 16K the dense mask is 256 MiB; the compiled BlockMask construction stays far below T^2 bytes."""
    t = 16384
    doc = torch.repeat_interleave(torch.arange(9, device="cuda", dtype=torch.int32), t // 8)[:t][None]
    document_mask(doc, "flex")  # compile outside the measurement
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    mask = document_mask(doc, "flex")
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < t * t // 16
    assert mask.kv_num_blocks.shape == (1, 1, t // 128)


def test_the_loop_hands_the_model_each_rows_document_boundaries():
    """train.loop._to_device: with data.doc_masking the loader's doc_ids and position_ids reach the model as they
    are, so the forward is the masked one; without it, neither goes (plain packing). The training test below sees
    only that masked losses part from plain ones, which restarted positions without the mask would do too."""
    from train.loop import _to_device

    ids, labels, doc = (x[:, :128] for x in doc_batch())  # documents of 1, 60 and 67 tokens in row 0
    pos = position_ids_from_doc_ids(doc)
    batch = {"input_ids": ids, "labels": labels, "position_ids": pos, "doc_ids": doc,
             "component_ids": torch.zeros(3, 128, dtype=torch.int32)}
    plain = _to_device(batch, torch.device("cpu"), doc_masking=False)
    assert sorted(plain) == ["input_ids", "labels", "return_token_losses"]
    moved = _to_device(batch, torch.device("cpu"), doc_masking=True)
    assert sorted(moved) == ["doc_ids", "input_ids", "labels", "position_ids", "return_token_losses"]
    for key in ("input_ids", "labels", "position_ids", "doc_ids"):
        assert torch.equal(moved[key], batch[key]), key
    model = build().eval()
    with torch.no_grad():
        got = model(**moved).token_losses
        want = model(ids, labels=labels, doc_ids=doc, return_token_losses=True).token_losses
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_training_with_doc_masking_runs_and_changes_the_attention(data_root, tmp_path_factory, tmp_path):
    """`data.doc_masking=true` trains through the loop (restarted positions, documents kept apart): finite
    losses that part from plain packing's on the same tokens as training goes on."""
    from trainutil import DENSE1, SMOKE, losses, run_train, smoke_run

    plain = losses(smoke_run(tmp_path_factory, "dense1", DENSE1))
    run_dir = tmp_path / "docmask"
    # General and Reasoning (a stage switch with the mask on); Long Context's T x T dense masks would only add time
    proc = run_train([*SMOKE, f"run_dir={run_dir}", "model=tiny_dense", "data.doc_masking=true",
                      "eval.enabled=false", "curriculum.order=[general,reasoning]"])
    assert proc.returncode == 0, proc.stdout[-3000:]
    masked = losses(run_dir)
    assert list(masked) == [k for k in plain if k[0] != "long_context"]
    assert all(math.isfinite(loss) for loss, _ in masked.values())
    # at initialisation attention hardly matters (equal first losses); once trained, the context does
    assert masked[("general", 1)][0] == pytest.approx(plain[("general", 1)][0], rel=1e-6)
    last = list(masked)[-1]
    assert abs(masked[last][0] - plain[last][0]) > 1e-4  # measured 1.0e-3 at Reasoning's last step; kernels' ~1e-6


def test_training_refuses_flex_on_the_cpu(data_root, tmp_path):
    from trainutil import SMOKE, run_train

    proc = run_train([*SMOKE, f"run_dir={tmp_path / 'run'}", "model=tiny_dense", "data.doc_masking=true",
                      "model.doc_mask_implementation=flex"])
    assert proc.returncode != 0
    assert "config key 'model.doc_mask_implementation' = 'flex'" in proc.stdout
    assert not (tmp_path / "run" / "checkpoints").exists()


@gpu
@pytest.mark.gpu
def test_doc_masking_trains_through_flex_on_cuda(tmp_path):
    """The BlockMask through the trainer, DeepSpeed's module hooks and compiled flex: losses as the dense mask's,
    to bf16 kernel differences. Uses the prepared fixture (launch/gpu_check.sh)."""
    from trainutil import SMOKE, losses, run_train

    got = {}
    for impl in ("flex", "dense"):
        proc = run_train([*SMOKE, f"run_dir={tmp_path / impl}", "model=tiny_dense", "device=cuda", "eval.enabled=false",
                          "data.doc_masking=true", f"model.doc_mask_implementation={impl}"])
        assert proc.returncode == 0, proc.stdout[-3000:]
        got[impl] = losses(tmp_path / impl)
    assert list(got["flex"]) == list(got["dense"]) and len(got["flex"]) == 8
    for key, (loss, _) in got["flex"].items():
        assert loss == pytest.approx(got["dense"][key][0], rel=2e-2), key
