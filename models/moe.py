"""Qwen3 mixture-of-experts MLP: fp32 top-k router, dropless experts run as a grouped matmul, balance losses.

Module and parameter names match HF transformers 5 in memory (`mlp.gate.weight` (E, d),
`mlp.experts.gate_up_proj` (E, 2F, d), `mlp.experts.down_proj` (E, d, F)); models/hf.py maps them to the
per-expert on-disk layout of the released checkpoints.

Load balancing (Qwen3 / Qiu et al. 2025, "Demons in the Detail"), per MoE layer:

    LBL = E * sum_i f_i * P_i,   f_i = (top-k assignments to expert i) / (k * tokens),   P_i = mean router prob of i

f_i sums to 1, so perfectly uniform routing gives LBL = 1 whatever E and k. The aux loss is
`router_aux_loss_coef * mean over layers of LBL`. P_i (which carries the gradient) is always the local
micro-batch mean. With `balance_loss_granularity = "global"` f_i is counted over the global batch:

* across data-parallel ranks, the counts are summed with one `all_reduce` over the balance group per forward
  (all layers at once), so with equal tokens per rank the rank-averaged loss and gradients equal those of the
  concatenated batch exactly;
* across the micro-batches of one optimizer step, the exact f_i would need every micro-batch routed before
  the first backward (a second pass). The rule used instead (as Megatron-LM's global aux loss): counts are
  accumulated in a per-step buffer, and micro-batch m uses f_i from micro-batches 1..m of the step (all
  ranks). The last micro-batch therefore sees the exact global-batch f_i. `start_step()` empties the buffer.

Only training-mode forwards touch the buffer and communicate; eval forwards use their own counts.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from models.config import Qwen3Config


class Qwen3MoeRouter(nn.Module):
    """Linear d -> E scored in fp32, softmax over all experts, top-k, optional renormalisation of the k weights."""

    def __init__(self, cfg: Qwen3Config) -> None:
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, d) -> router logits (N, E) fp32, probs (N, E) fp32, top-k weights (N, k) in x's dtype, ids (N, k)."""
        # fp32 scores: with bf16 logits, near-tied experts flip between steps and the z-loss is imprecise.
        logits = F.linear(x.float(), self.weight.float())  # (N, E)
        probs = logits.softmax(dim=-1)  # (N, E)
        top_w, top_i = probs.topk(self.top_k, dim=-1)  # (N, k)
        if self.norm_topk_prob:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        return logits, probs, top_w.to(x.dtype), top_i


def _use_grouped_mm(impl: str, x: torch.Tensor) -> bool:
    if impl == "auto":
        # torch's grouped GEMM kernels are CUDA bf16 (SM >= 80); its CPU backward fails on torch 2.13.
        return x.is_cuda and x.dtype == torch.bfloat16 and hasattr(F, "grouped_mm")
    return impl == "grouped_mm"


class Qwen3MoeExperts(nn.Module):
    """E SwiGLU experts with stacked weights, applied to tokens already sorted by expert."""

    def __init__(self, cfg: Qwen3Config) -> None:
        super().__init__()
        self.implementation = cfg.moe_implementation
        e, d, f = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * f, d))  # gate rows first, then up rows
        self.down_proj = nn.Parameter(torch.empty(e, d, f))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (M, d) sorted by expert, counts (E,) rows per expert -> (M, d)."""
        if _use_grouped_mm(self.implementation, x):
            return self._grouped_mm(x, counts)
        return self._loop(x, counts)

    def _grouped_mm(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        # One kernel per projection for all experts; no host sync (offsets stay on the device).
        offs = counts.cumsum(0).to(torch.int32)  # (E,) end row of each expert's group
        h = F.grouped_mm(x, self.gate_up_proj.transpose(1, 2), offs=offs)  # (M, 2F)
        gate, up = h.chunk(2, dim=-1)
        return F.grouped_mm(F.silu(gate) * up, self.down_proj.transpose(1, 2), offs=offs)  # (M, d)

    def _loop(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        # Reference path for any device and dtype: a matmul per expert over its contiguous slice.
        outputs = []
        for e, rows in enumerate(x.split(counts.tolist())):  # .tolist() syncs; fine off the GPU hot path
            if rows.shape[0] == 0:
                continue
            gate, up = F.linear(rows, self.gate_up_proj[e]).chunk(2, dim=-1)  # (m, F) each
            outputs.append(F.linear(F.silu(gate) * up, self.down_proj[e]))  # (m, d)
        return torch.cat(outputs) if outputs else x.new_zeros(x.shape)


class Qwen3SparseMoeBlock(nn.Module):
    """Dropless top-k MoE MLP; also returns the per-layer router statistics the balance losses need."""

    def __init__(self, cfg: Qwen3Config) -> None:
        super().__init__()
        self.num_experts = cfg.num_experts
        self.top_k = cfg.num_experts_per_tok
        self.gate = Qwen3MoeRouter(cfg)
        self.experts = Qwen3MoeExperts(cfg)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """x (B, T, d) -> y (B, T, d), (mean router probs (E,) fp32, expert counts (E,) int64, z-loss () fp32)."""
        b, t, d = x.shape
        n, k = b * t, self.top_k
        x = x.reshape(n, d)
        logits, probs, top_w, top_i = self.gate(x)  # (N, E), (N, E), (N, k), (N, k)

        # Permute the N*k (token, expert) pairs so each expert's rows are contiguous.
        flat_expert = top_i.reshape(-1)  # (N*k,)
        order = flat_expert.argsort(stable=True)  # (N*k,) sorted position -> flat pair index
        counts = torch.zeros(self.num_experts, dtype=torch.long, device=x.device)
        counts.scatter_add_(0, flat_expert, torch.ones_like(flat_expert))  # (E,), no host sync (unlike bincount)
        y_sorted = self.experts(x[order // k], counts)  # (N*k, d)

        # Un-permute, then mix each token's k expert outputs with its router weights (fp32 accumulation in bmm).
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        y_pairs = y_sorted[inverse].view(n, k, d)  # (N, k, d)
        y = torch.bmm(top_w.unsqueeze(1), y_pairs).view(b, t, d)  # (N, 1, k) @ (N, k, d)

        z_loss = torch.logsumexp(logits, dim=-1).square().mean()  # ()
        return y, (probs.mean(dim=0), counts, z_loss)


class ExpertBalance:
    """Expert-count bookkeeping and the balance / z losses of all MoE layers of one model (see module doc)."""

    def __init__(self, cfg: Qwen3Config) -> None:
        self.num_experts = cfg.num_experts
        self.aux_coef = cfg.router_aux_loss_coef
        self.z_coef = cfg.router_z_loss_coef
        self.granularity = cfg.balance_loss_granularity
        self.group: Optional[dist.ProcessGroup] = None
        self.step_counts: Optional[torch.Tensor] = None  # (L, E) int64, assignments so far in this step

    def start_step(self) -> None:
        """Forget the counts of the previous optimizer step."""
        self.step_counts = None

    def expert_load(self) -> Optional[torch.Tensor]:
        """(L, E) fraction of top-k assignments per expert over the step so far (global when a group is set)."""
        if self.step_counts is None:
            return None
        counts = self.step_counts.to(torch.float32)
        return counts / counts.sum(dim=-1, keepdim=True).clamp(min=1)

    def losses(self, probs_mean: torch.Tensor, counts: torch.Tensor, z: torch.Tensor,
               training: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """Balance loss and z-loss (both unweighted, averaged over layers) from stacked per-layer router stats.

        probs_mean (L, E) fp32 with grad, counts (L, E) int64 of this micro-batch on this rank, z (L,) fp32.
        """
        counts = counts.detach()
        if training:
            if self.granularity == "global" and self.group is not None:
                counts = counts.clone()
                dist.all_reduce(counts, group=self.group)  # one collective for all layers
            if self.step_counts is None or self.step_counts.device != counts.device:
                self.step_counts = torch.zeros_like(counts)
            self.step_counts += counts
            if self.granularity == "global":
                counts = self.step_counts
        f = counts.to(torch.float32)
        f = f / f.sum(dim=-1, keepdim=True).clamp(min=1)  # (L, E), rows sum to 1
        balance = self.num_experts * (f * probs_mean).sum(dim=-1)  # (L,)
        return balance.mean(), z.mean()
