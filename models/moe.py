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

With "micro" the loss uses each micro-batch's own counts; the counts are summed over the group all the same,
into the per-step buffer that `expert_load()` reports, so the logged load is the global batch's in both modes.
Only training-mode forwards touch the buffer and communicate; eval forwards use their own counts.

Expert parallelism (`Qwen3SparseMoeBlock.set_expert_parallel(group)`): rank r of an expert-parallel group of
size ep keeps experts [r*E/ep, (r+1)*E/ep) only. Routing is unchanged (the router is replicated); each rank
sends the rows of its (token, expert) pairs to the ranks holding those experts and gets the outputs back, with
one all-to-all each way (plus one of the per-expert counts first, so every rank knows what it receives). The
balance-loss counts stay those of this rank's tokens over all E experts, so the global-batch balance loss is
the same whatever ep is. Plain torch.distributed; the trainer builds the group (train/expert_parallel.py).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

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
    """E SwiGLU experts with stacked weights, applied to tokens already sorted by expert.

    Under expert parallelism the module holds experts [first_expert, first_expert + num_local_experts) only.
    """

    def __init__(self, cfg: Qwen3Config) -> None:
        super().__init__()
        self.implementation = cfg.moe_implementation
        e, d, f = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.num_experts = e  # in the whole layer, on all ranks
        self.first_expert = 0  # global index of local expert 0
        self.num_local_experts = e  # experts held here (fewer under expert parallelism)
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * f, d))  # gate rows first, then up rows
        self.down_proj = nn.Parameter(torch.empty(e, d, f))

    @torch.no_grad()
    def keep_experts(self, first: int, count: int) -> None:
        """Keep experts [first, first + count) and drop the rest (expert parallelism; before the optimizer exists)."""
        if first < 0 or count < 1 or first + count > self.num_local_experts or self.first_expert != 0:
            raise ValueError(f"cannot keep experts [{first}, {first + count}) of {self.num_local_experts} "
                             f"(starting at {self.first_expert})")
        self.gate_up_proj = nn.Parameter(self.gate_up_proj[first:first + count].clone())
        self.down_proj = nn.Parameter(self.down_proj[first:first + count].clone())
        self.first_expert, self.num_local_experts = first, count

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (M, d) sorted by expert, counts (num_local_experts,) rows per expert -> (M, d)."""
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
        # Reference path for any device and dtype: a matmul per expert over its contiguous slice. Experts
        # without rows run too (on 0 rows): the autograd graph then has the same shape whatever the routing,
        # so under expert parallelism every rank reaches its backward collectives in the same order, and
        # both weights always get a gradient (zeros for unused experts), as without expert parallelism.
        outputs = []
        for e, rows in enumerate(x.split(counts.tolist())):  # .tolist() syncs; fine off the GPU hot path
            gate, up = F.linear(rows, self.gate_up_proj[e]).chunk(2, dim=-1)  # (m, F) each
            outputs.append(F.linear(F.silu(gate) * up, self.down_proj[e]))  # (m, d)
        return torch.cat(outputs)


class Qwen3SparseMoeBlock(nn.Module):
    """Dropless top-k MoE MLP; also returns the per-layer router statistics the balance losses need."""

    def __init__(self, cfg: Qwen3Config) -> None:
        super().__init__()
        self.num_experts = cfg.num_experts
        self.top_k = cfg.num_experts_per_tok
        self.gate = Qwen3MoeRouter(cfg)
        self.experts = Qwen3MoeExperts(cfg)
        self.ep_group: Optional[dist.ProcessGroup] = None  # expert parallelism; None: all experts are here

    def set_expert_parallel(self, group: dist.ProcessGroup) -> None:
        """Shard the experts over `group`: its rank r keeps experts [r*E/ep, (r+1)*E/ep) (call once, before training)."""
        ep, r = dist.get_world_size(group), dist.get_rank(group)
        if self.num_experts % ep:
            raise ValueError(f"{self.num_experts} experts cannot be split evenly over {ep} ranks")
        per_rank = self.num_experts // ep
        self.experts.keep_experts(r * per_rank, per_rank)
        self.ep_group = group

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
        if self.ep_group is None:
            y_sorted = self.experts(x[order // k], counts)  # (N*k, d)
        else:
            y_sorted = _run_experts_parallel(self.experts, x[order // k], counts, self.ep_group)  # (N*k, d)

        # Un-permute, then mix each token's k expert outputs with its router weights (fp32 accumulation in bmm).
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        y_pairs = y_sorted[inverse].view(n, k, d)  # (N, k, d)
        y = torch.bmm(top_w.unsqueeze(1), y_pairs).view(b, t, d)  # (N, 1, k) @ (N, k, d)

        z_loss = torch.logsumexp(logits, dim=-1).square().mean()  # ()
        return y, (probs.mean(dim=0), counts, z_loss)


def _all_to_all(x: torch.Tensor, send: List[int], recv: List[int], group: dist.ProcessGroup) -> torch.Tensor:
    """Rows x[sum(send[:j]) : sum(send[:j+1])] go to rank j of group; returns the rows received, by source rank."""
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """`_all_to_all` whose backward sends the gradients of the received rows back to where the rows came from."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: List[int], recv: List[int],  # type: ignore[override]
                group: dist.ProcessGroup) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return _all_to_all(x, send, recv, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return _all_to_all(grad, ctx.recv, ctx.send, ctx.group), None, None, None


def _split_sizes(counts: torch.Tensor, recv_counts: torch.Tensor) -> Tuple[List[int], List[int]]:
    """(rows to each rank, rows from each rank) on the host, from (ep, El) counts sent and received.

    The host waits here for the counts' all-to-all (on GPUs a collective returns before it is done);
    train/faults.py's watchdog knows this frame as waiting in a collective.
    """
    return counts.sum(dim=1).tolist(), recv_counts.sum(dim=1).tolist()


@torch.compiler.disable  # its split sizes change every micro-batch: compiled, each was a recompile until the
# limit (8), after which the MoE layer ran uncompiled; eager here, the rest of the block stays one compiled graph
def _run_experts_parallel(experts: Qwen3MoeExperts, x: torch.Tensor, counts: torch.Tensor,
                          group: dist.ProcessGroup) -> torch.Tensor:
    """Apply every rank's experts to x (M, d) sorted by global expert, counts (E,) -> (M, d) in x's order.

    Rank r of the ep ranks holds local experts [r*El, (r+1)*El); the rows for them are contiguous in x.
    """
    ep, local = dist.get_world_size(group), experts.num_local_experts
    recv_counts = torch.empty_like(counts)
    dist.all_to_all_single(recv_counts, counts.contiguous(), group=group)  # (ep*El,) [source, local expert]
    recv_counts = recv_counts.view(ep, local)
    send, recv = _split_sizes(counts.view(ep, local), recv_counts)
    x_recv = _AllToAll.apply(x, send, recv, group)  # (R, d) grouped by source, then by local expert

    # Regroup by local expert (stable: sources stay in rank order), run the experts, undo the regrouping.
    owner = torch.arange(local, device=x.device).repeat(ep).repeat_interleave(  # (R,); the size known: no sync
        recv_counts.flatten(), output_size=sum(recv))
    order = owner.argsort(stable=True)
    y_local = experts(x_recv[order], recv_counts.sum(dim=0))  # (R, d)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return _AllToAll.apply(y_local[inverse], recv, send, group)  # (M, d) back in x's order


class ExpertBalance:
    """Expert-count bookkeeping and the balance / z losses of all MoE layers of one model (see module doc)."""

    def __init__(self, cfg: Qwen3Config) -> None:
        self.num_experts = cfg.num_experts
        self.granularity = cfg.balance_loss_granularity
        self.group: Optional[dist.ProcessGroup] = None
        self.step_counts: Optional[torch.Tensor] = None  # (L, E) int64, assignments so far in this step
        self.step_probs: Optional[torch.Tensor] = None  # (L, E) fp32, sum of this rank's micro-batch P_i

    def start_step(self) -> None:
        """Forget the counts of the previous optimizer step."""
        self.step_counts = None
        self.step_probs = None

    def step_balance_loss(self, probs_mean: torch.Tensor) -> torch.Tensor:
        """The balance loss of the whole step: E * sum_i f_i * P_i with f_i over all of the step's assignments and
        `probs_mean` (L, E) the step's mean router probability (all ranks), averaged over layers. Under "global"
        with gradient accumulation the micro-batches' own losses use partial counts, so their mean depends on how
        the global batch is split into ranks and micro-batches; this value does not."""
        return self._balance(self.expert_load().to(probs_mean), probs_mean)

    def _balance(self, f: torch.Tensor, probs_mean: torch.Tensor) -> torch.Tensor:
        """E * sum_i f_i * P_i per layer, averaged over layers; f (L, E) sums to 1 per row."""
        return (self.num_experts * (f * probs_mean).sum(dim=-1)).mean()

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
            summed = counts
            if self.group is not None:  # the global f_i, and the logged expert load, in either granularity
                summed = counts.clone()
                dist.all_reduce(summed, group=self.group)  # one collective for all layers
            if self.step_counts is None or self.step_counts.device != counts.device:
                self.step_counts = torch.zeros_like(counts)
            self.step_counts += summed
            probs = probs_mean.detach()
            self.step_probs = probs.clone() if self.step_probs is None else self.step_probs + probs
            if self.granularity == "global":
                counts = self.step_counts
        f = counts.to(torch.float32)
        f = f / f.sum(dim=-1, keepdim=True).clamp(min=1)  # (L, E), rows sum to 1
        return self._balance(f, probs_mean), z.mean()
