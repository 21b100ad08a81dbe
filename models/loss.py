"""Output head + cross-entropy fused and chunked over tokens, so the (tokens x vocab) logits never exist at once.

With Qwen3's 151,936-row vocabulary, fp32 logits for 32K tokens take 18.5 GiB per copy, and a plain
`F.cross_entropy(hidden @ W.T, labels)` holds several copies (logits, fp32 upcast, softmax for backward).
Here the tokens are processed `chunk_size` at a time: the chunk's logits are computed in the input dtype,
upcast to fp32 for the logsumexp, and turned straight into the gradients w.r.t. the hidden states and the
head weight, which are kept for the backward pass (as Liger's fused linear cross-entropy does). Peak extra
memory is one chunk of logits plus a gradient buffer of the head weight's size, whatever the sequence length,
and the head matmul runs three times in total (forward, dL/dh, dL/dW), as in the unfused path.

With `compiled=True` the per-chunk softmax and its gradient run as one torch.compile'd function
(`_softmax_xent_grad`): the chunk's logits stay in the input dtype and are read twice (statistics, gradient)
and written once, instead of the ~9 passes over an fp32 copy that the eager in-place sequence makes. With
Qwen3's vocabulary those passes cost about as much as the three head matmuls, so this matters on a GPU.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

IGNORE_INDEX = -100


def _softmax_xent_grad(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
                       scale: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """One chunk, for torch.compile: per-token losses (C,) fp32 and d(loss)/d(logits) (C, V) in logits' dtype.

    logits (C, V), labels (C,) in range (ignored rows pointed at 0), valid (C,) bool, scale (C,) fp32 =
    1/n_valid on valid rows and 0 elsewhere. Statistics in fp32; the same function as the eager loop below.
    """
    x = logits.float()  # fused into the reductions and the pointwise kernel; never stored in fp32
    lse = torch.logsumexp(x, dim=-1, keepdim=True)  # (C, 1)
    target = x.gather(1, labels[:, None])  # (C, 1)
    onehot = torch.arange(x.shape[-1], device=x.device)[None, :] == labels[:, None]  # (C, V), never stored
    grad = (torch.exp(x - lse) - onehot.to(x.dtype)) * scale[:, None]  # (C, V)
    return (lse - target).squeeze(1).masked_fill(~valid, 0.0), grad.to(logits.dtype)


_COMPILED: dict = {}


def _compiled_softmax_xent_grad():
    """`_softmax_xent_grad` under torch.compile, built on first use (one per process)."""
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(_softmax_xent_grad, dynamic=False)  # a (chunk, V) shape or two per run
    return _COMPILED["fn"]


def _chunked_ce(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int,
                with_grads: bool, compiled: bool = False, grad_scale: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Mean loss, per-token losses (N,) fp32 and, if asked, gradients of the mean loss w.r.t. hidden and weight.

    grad_scale: an fp32 scalar the gradients are multiplied by in fp32, before they are rounded to the input
    dtype (the loss scale under fp16, whose small gradients would otherwise underflow).
    """
    n_tokens = hidden.shape[0]
    w = weight if weight.dtype == hidden.dtype else weight.to(hidden.dtype)  # (V, d) in the compute dtype
    valid = labels != IGNORE_INDEX  # (N,)
    # Mean over the non-ignored tokens; an all-ignored batch gives loss 0 (not NaN) so a step never poisons.
    inv_count = 1.0 / valid.sum().clamp(min=1).to(torch.float32)
    grad_unit = inv_count if grad_scale is None else inv_count * grad_scale.to(torch.float32)
    safe_labels = labels.masked_fill(~valid, 0)
    token_losses = torch.empty(n_tokens, dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if with_grads else None
    # The weight gradient is accumulated over chunks in fp32, whatever the weight's dtype.
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if with_grads else None

    for start in range(0, n_tokens, chunk_size):
        end = min(start + chunk_size, n_tokens)
        h = hidden[start:end]  # (C, d)
        if with_grads and compiled:
            scale = valid[start:end].to(torch.float32) * grad_unit  # (C,)
            token_losses[start:end], g = _compiled_softmax_xent_grad()(h @ w.T, safe_labels[start:end],
                                                                       valid[start:end], scale)
            grad_hidden[start:end] = g @ w  # (C, d)
            if g.dtype == grad_weight.dtype:
                grad_weight.addmm_(g.T, h)
            else:
                grad_weight.add_(g.T @ h)  # (V, d) low-precision product, accumulated in fp32
            del g
            continue
        logits = (h @ w.T).float()  # (C, V): matmul in the input dtype, softmax statistics in fp32
        target = logits.gather(1, safe_labels[start:end, None])  # (C, 1)
        # logsumexp by hand, in place on the one fp32 buffer, so its exp pass is reused by the softmax below.
        row_max = logits.amax(dim=-1, keepdim=True)  # (C, 1)
        exp = logits.sub_(row_max).exp_()  # (C, V), same storage as logits
        sum_exp = exp.sum(dim=-1, keepdim=True)  # (C, 1)
        lse = row_max + sum_exp.log()  # (C, 1)
        token_losses[start:end] = (lse - target).squeeze(1).masked_fill(~valid[start:end], 0.0)
        if with_grads:
            # d(mean loss)/d(logits) = (softmax - onehot(label)) / n_valid on valid rows, 0 on ignored ones.
            probs = exp.div_(sum_exp)  # (C, V), still the same buffer
            rows = torch.arange(end - start, device=hidden.device)
            probs[rows, safe_labels[start:end]] -= 1.0
            probs.mul_((valid[start:end].to(torch.float32) * grad_unit)[:, None])
            g = probs.to(hidden.dtype)  # (C, V) back in the input dtype for the two matmuls
            grad_hidden[start:end] = g @ w  # (C, d)
            if g.dtype == grad_weight.dtype:
                grad_weight.addmm_(g.T, h)  # (V, d), no temporary
            else:
                grad_weight.add_(g.T @ h)  # (V, d) low-precision product, accumulated in fp32
            del probs, g
        del logits, exp  # free the chunk (all names of its buffer) before the next one is allocated

    loss = token_losses.sum() * inv_count
    return loss, token_losses, grad_hidden, grad_weight


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Autograd wrapper: gradients are computed in the forward chunks, the backward only scales them.

    fp16 is the exception: its gradients must be multiplied by the loss scale before they are rounded, or the
    small ones underflow to 0 and a large scale overflows, and the scale is known only in the backward. There the
    forward computes the loss alone and the backward runs the chunks again (one more head matmul).
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                chunk_size: int, compiled: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        ctx.chunk_size, ctx.compiled = chunk_size, compiled
        ctx.recompute = hidden.dtype == torch.float16
        if ctx.recompute:
            loss, token_losses, _, _ = _chunked_ce(hidden, weight, labels, chunk_size, False)
            ctx.save_for_backward(hidden, weight, labels)
        else:
            loss, token_losses, grad_hidden, grad_weight = _chunked_ce(hidden, weight, labels, chunk_size, True,
                                                                       compiled)
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        ctx.mark_non_differentiable(token_losses)
        return loss, token_losses

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_token_losses: Optional[torch.Tensor]):
        if ctx.recompute:
            hidden, weight, labels = ctx.saved_tensors
            _, _, grad_hidden, grad_weight = _chunked_ce(hidden, weight, labels, ctx.chunk_size, True,
                                                         ctx.compiled, grad_scale=grad_loss)
            return grad_hidden, grad_weight.to(weight.dtype), None, None, None
        grad_hidden, grad_weight = ctx.saved_tensors
        # grad_loss is a scalar (1 in plain training, a factor under gradient accumulation).
        return (grad_hidden * grad_loss.to(grad_hidden.dtype), grad_weight * grad_loss.to(grad_weight.dtype), None,
                None, None)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               chunk_size: int = 2048, compiled: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean CE of softmax(hidden @ weight.T) against labels (-100 ignored) and detached per-token losses (N,) fp32.

    hidden (N, d), weight (V, d), labels (N,). Equal to `F.cross_entropy(hidden @ weight.T, labels)` in value and
    gradients within fp32 rounding, while holding at most `chunk_size` rows of logits at a time. `compiled`: run
    the per-chunk softmax and gradient through torch.compile (training only; equal within fp32 rounding).
    """
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be (N, d) and labels (N,), got {tuple(hidden.shape)} and {tuple(labels.shape)}")
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _FusedLinearCrossEntropy.apply(hidden, weight, labels, chunk_size, compiled)
    loss, token_losses, _, _ = _chunked_ce(hidden, weight, labels, chunk_size, with_grads=False)
    return loss, token_losses
