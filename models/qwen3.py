"""Qwen3 decoder-only language model (dense and MoE), read top to bottom: norm, attention, MLP, block, model.

Module names are HF transformers' (`model.layers.{i}.self_attn.q_proj`, ...), so a state_dict maps 1:1 onto
HF's in-memory layout. Pure PyTorch: the MoE MLP is in models/moe.py, the fused output-head + cross-entropy
in models/loss.py, RoPE / YaRN tables in models/rope.py, HF import/export in models/hf.py, decoding in
models/decode.py.

Every parameter is used inside the forward of the module that owns it (the router and the output head are
modules for that reason), so ZeRO-3's per-module parameter gathering sees each use.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask
from torch.utils.checkpoint import checkpoint

from models.config import Qwen3Config
from models.dca import DualChunkAttention, dual_chunk_attention
from models.doc_mask import AttentionMask, document_mask, document_starts, flex_document_attention
from models.loss import fused_linear_cross_entropy
from models.moe import ExpertBalance, Qwen3MoeExperts, Qwen3SparseMoeBlock
from models.rope import apply_rope, rope_table_length, rope_tables

if TYPE_CHECKING:
    from models.decode import KVCache

RouterStats = Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def whole_already(p: nn.Parameter) -> ContextManager[bool]:
    """The `gather` context for an unpartitioned parameter: it is whole already, and this rank's writes are kept."""
    return nullcontext(True)


@dataclass
class ModelOutput(dict):
    """What `Qwen3ForCausalLM.forward` returns; loss fields are None without labels.

    A dict too (each field also an item, as HF's outputs are): DeepSpeed's engine finds the forward's output
    tensors only inside tensors, tuples, lists and dicts, and hooks its backward prologue onto them. Without it
    that prologue never ran: DeepSpeed's bf16 optimizer (ZeRO-1 with fp32 gradient accumulation) then kept each
    micro-batch's bf16 gradient and added the running sum to its fp32 buffer again at every micro-batch.
    """

    loss: Optional[torch.Tensor] = None
    """lm_loss + aux_loss: the scalar training backpropagates."""
    lm_loss: Optional[torch.Tensor] = None
    """Mean cross-entropy over the non-ignored labels."""
    aux_loss: Optional[torch.Tensor] = None
    """router_aux_loss_coef * balance_loss + router_z_loss_coef * z_loss; 0 for dense models."""
    balance_loss: Optional[torch.Tensor] = None
    """Unweighted load-balancing loss averaged over MoE layers (1 = perfectly uniform); detached."""
    z_loss: Optional[torch.Tensor] = None
    """Unweighted router z-loss averaged over MoE layers; detached."""
    logits: Optional[torch.Tensor] = None
    """(B, T, V) in the model dtype, only when no labels are given."""
    token_losses: Optional[torch.Tensor] = None
    """(B, T) fp32 detached per-token losses (0 where the label is -100), when asked."""

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        self[name] = value


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension, times a learned scale."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise over the last dimension (statistics in fp32 inside the kernel, output in x's dtype)."""
        # One fused call instead of HF's upcast / normalise / downcast / scale sequence; identical in fp32,
        # and in bf16 it rounds once instead of twice.
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


def position_ids_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 where the document id changes: (B, T) int -> (B, T) int64."""
    b, t = doc_ids.shape
    idx = torch.arange(t, device=doc_ids.device).expand(b, t)
    starts = document_starts(doc_ids)
    # Index of the latest document start at or before each position.
    last_start = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - last_start


_SDPA_KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                 "cudnn_mha": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "math": SDPBackend.MATH}


def sdpa_priority(attention_backend: str) -> Optional[List[SDPBackend]]:
    """SDPA kernels in the order tried for a config's `attention_backend`; None keeps torch's own order."""
    if attention_backend == "auto":
        return None
    first = _SDPA_KERNELS[attention_backend]
    return [first] + [k for k in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                                  SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH) if k != first]


class Qwen3Attention(nn.Module):
    """Grouped-query attention with QK-Norm (RMSNorm per head, before RoPE) and no biases."""

    def __init__(self, cfg: Qwen3Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=False)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.dca: Optional[DualChunkAttention] = None  # inference option, set by Qwen3ForCausalLM.set_attention_mode
        self.expand_kv = cfg.attention_backend == "cudnn_mha"  # cuDNN without GQA support: give it H heads
        self.sdpa_priority = sdpa_priority(cfg.attention_backend)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Optional[AttentionMask],
                kv_cache: Optional["KVCache"] = None) -> torch.Tensor:
        """x (B, T, d); cos/sin (B or 1, 1, T, D/2); mask (B, 1, T, S) bool, a document BlockMask, or None (causal)."""
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, self.n_heads, self.head_dim)).transpose(1, 2)  # (B, H, T, D)
        k = self.k_norm(self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim)).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        if self.dca is not None:  # cos/sin are then whole tables: DCA assigns positions itself (models/dca.py)
            y = dual_chunk_attention(q, k, v, cos, sin, self.dca, kv_cache, self.layer_idx)  # (B, H, T, D)
            return self.o_proj(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, Hkv, S, D) with S = cached + T
        if isinstance(mask, BlockMask):  # document masking through FlexAttention (models/doc_mask.py)
            y = flex_document_attention(q, k, v, mask)  # (B, H, T, D)
            return self.o_proj(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))
        gqa = self.n_heads != self.n_kv_heads
        if (mask is not None or self.expand_kv) and gqa:
            # Flash kernels take GQA natively but no arbitrary mask; the masked (memory-efficient) kernels
            # want equal head counts, so expand k/v only on this path.
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, H, S, D)
            gqa = False
        # is_causal only when queries and keys are the same positions (training, prefill of an empty cache);
        # a single decoding query attends to the whole cache.
        is_causal = mask is None and q.shape[2] == k.shape[2]
        with sdpa_kernel(self.sdpa_priority, set_priority=True) if self.sdpa_priority else nullcontext():
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))  # (B, T, d)


class Qwen3MLP(nn.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, cfg: Qwen3Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, d) -> (B, T, d)."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen3DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x)); the MLP is dense or MoE."""

    def __init__(self, cfg: Qwen3Config, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Qwen3Attention(cfg, layer_idx)
        self.mlp = Qwen3SparseMoeBlock(cfg) if cfg.is_moe else Qwen3MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Optional[AttentionMask],
                kv_cache: Optional["KVCache"] = None) -> Tuple[torch.Tensor, RouterStats]:
        """x (B, T, d) -> (B, T, d) and the MoE router statistics (None for a dense block)."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache)
        h = self.mlp(self.post_attention_layernorm(x))
        if isinstance(h, tuple):  # MoE: (output, router stats)
            return x + h[0], h[1]
        return x + h, None


class Qwen3Model(nn.Module):
    """Embedding, decoder blocks and final norm (HF's `model.` prefix)."""

    def __init__(self, cfg: Qwen3Config) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen3DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen3LMHead(nn.Linear):
    """Output head d -> V; given labels it returns the fused chunked cross-entropy instead of the logits."""

    def __init__(self, cfg: Qwen3Config) -> None:
        super().__init__(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.chunk_size = cfg.loss_chunk_size
        self.compiled = cfg.compile  # the per-chunk softmax of the loss under torch.compile

    def forward(self, h: torch.Tensor, labels: Optional[torch.Tensor] = None):  # type: ignore[override]
        """h (N, d) -> logits (N, V), or with labels (N,) -> (mean loss, per-token losses (N,) fp32)."""
        if labels is None:
            return F.linear(h, self.weight)
        return fused_linear_cross_entropy(h, self.weight, labels, self.chunk_size, self.compiled)


class Qwen3ForCausalLM(nn.Module):
    """Qwen3 causal LM; `__init__` works under `with torch.device("meta"):`, then `to_empty` + `init_weights`."""

    def __init__(self, cfg: Union[Qwen3Config, Mapping[str, Any]]) -> None:
        super().__init__()
        # A private copy (a plain or OmegaConf mapping is accepted too): set_rope_theta / set_rope_scaling
        # change it without touching the caller's config.
        self.config = cfg = Qwen3Config.from_dict(cfg if isinstance(cfg, Mapping) else cfg.to_dict())
        self.model = Qwen3Model(cfg)
        self.lm_head = Qwen3LMHead(cfg)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.balance = ExpertBalance(cfg) if cfg.is_moe else None
        self.dca: Optional[DualChunkAttention] = None  # set_attention_mode("dca", ...) at inference
        if cfg.compile:
            # Regional compilation: every block runs the same code on the same shapes, so one compiled graph
            # (fusing norms, RoPE, SwiGLU and residual adds) serves all of them; `Module.compile` keeps the
            # module tree and the state_dict names unchanged. Static shapes: a new shape (a stage's seq_len)
            # compiles its own kernels instead of turning every dimension symbolic.
            for layer in self.model.layers:
                layer.compile(dynamic=False)
        # RoPE tables: non-persistent (never in the state_dict), recomputed from the config on every
        # device move, so this __init__ running on the meta device (!!) is harmless.
        length = rope_table_length(cfg.max_position_embeddings, cfg.rope_scaling)
        self.register_buffer("rope_cos", torch.empty(length, cfg.head_dim // 2), persistent=False)
        self.register_buffer("rope_sin", torch.empty(length, cfg.head_dim // 2), persistent=False)
        if self.rope_cos.device.type != "meta":
            self._reset_rope()

    # ----------------------------------------------------------------------------------------------------
    # Derived state: RoPE tables and weight tying survive `to_empty` / `.to()`.

    def _reset_rope(self) -> None:
        """Recompute the RoPE tables (fp32) from the config on the tables' current device."""
        cfg = self.config
        length = rope_table_length(cfg.max_position_embeddings, cfg.rope_scaling)
        cos, sin = rope_tables(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, length, self.rope_cos.device)
        self.rope_cos, self.rope_sin = cos, sin

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        # `to_empty` re-creates parameters one by one, which unties shared weights and leaves the RoPE
        # tables uninitialised; `.half()` would round the tables. Restore both after any conversion.
        super()._apply(fn, recurse)
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if self.rope_cos.device.type != "meta":
            self._reset_rope()
        return self

    def set_rope_theta(self, theta: float) -> None:
        """Change the RoPE base (the Long Context stage raises it to 1e6) and recompute the tables."""
        # checked as the config checks model.rope_theta, before any change: NaN or a negative base made NaN tables,
        # and a base of 1 under YaRN raised only after the config had changed
        checked = Qwen3Config.from_dict({**self.config.to_dict(), "rope_theta": theta})
        self.config.rope_theta = checked.rope_theta
        self._reset_rope()

    def set_rope_scaling(self, scaling: Optional[Dict[str, Any]]) -> None:
        """Set (e.g. YaRN for evaluation beyond the trained length) or clear RoPE scaling; recompute the tables."""
        checked = Qwen3Config.from_dict({**self.config.to_dict(), "rope_scaling": scaling})  # before any change
        length = rope_table_length(checked.max_position_embeddings, checked.rope_scaling)
        if self.dca is not None and self.dca.chunk_size > length:
            raise ValueError(f"the RoPE tables would shrink to {length} positions, below the active DCA chunk_size "
                             f"{self.dca.chunk_size}; set_attention_mode('full') first")
        self.config.rope_scaling = checked.rope_scaling
        self._reset_rope()

    def set_attention_mode(self, mode: str = "full", chunk_size: int = 0, local_size: int = 0) -> None:
        """"full" (training and default) or "dca": Dual Chunk Attention for inference beyond the trained length.

        chunk_size: the largest relative position DCA uses (the trained length); local_size: see models/dca.py.
        A KV cache filled in one mode is not valid in the other.
        """
        if mode not in ("full", "dca"):
            raise ValueError(f"attention mode must be 'full' or 'dca', got {mode!r}")
        dca = DualChunkAttention(chunk_size, local_size) if mode == "dca" else None
        if dca is not None and dca.chunk_size > self.rope_cos.shape[0]:  # refused before anything changes
            raise ValueError(f"dca chunk_size {chunk_size} exceeds the RoPE tables ({self.rope_cos.shape[0]})")
        self.dca = dca
        for layer in self.model.layers:
            layer.self_attn.dca = self.dca

    # ----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self, seed: Optional[int] = None,
                     gather: Optional[Callable[[nn.Parameter], ContextManager[bool]]] = None) -> None:
        """Initialise every parameter; deterministic for a given seed and device (works after `to_empty`).

        gather(p): a context in which a partitioned parameter is whole (ZeRO-3's partitioned construction passes
        one; see `whole_already`); every parameter is drawn whole, in the same order, so the values do not depend
        on how the weights are laid out across ranks.

        Scheme (std = cfg.initializer_range = sigma, L = num_hidden_layers):
        - embed_tokens, untied lm_head, q/k/v_proj, gate_proj/up_proj, expert gate_up_proj, router: N(0, sigma)
        - o_proj, down_proj, expert down_proj (the projections writing into the residual stream):
          N(0, sigma / sqrt(2 L)), so the residual stream's variance does not grow with depth (GPT-2 / Megatron)
        - every RMSNorm weight (blocks, q_norm / k_norm, final norm): 1
        """
        cfg = self.config
        device = self.model.embed_tokens.weight.device
        gen = None
        if seed is not None:
            gen = torch.Generator(device=device)
            gen.manual_seed(seed)
        residual_std = cfg.initializer_range / math.sqrt(2 * cfg.num_hidden_layers)
        for name, p in self.named_parameters():  # fixed order, shared (tied) weights once
            owner = self.get_submodule(name.rsplit(".", 1)[0])
            with (gather or whole_already)(p):
                # a bf16 weight is drawn in fp32 and rounded once: it then holds what an fp32 model cast to bf16
                # (DeepSpeed's `.bfloat16()`) holds, whether it was built in bf16 or partitioned by zero.Init
                draw = p.dtype if p.dtype in (torch.float32, torch.float64) else torch.float32
                target = p if p.dtype == draw else torch.empty_like(p, dtype=draw)
                if isinstance(owner, Qwen3MoeExperts) and owner.num_local_experts < owner.num_experts:
                    # expert parallelism: draw every expert, as an unsharded model does, and keep this rank's
                    target = p.new_empty((owner.num_experts, *p.shape[1:]), dtype=draw)
                if isinstance(owner, RMSNorm):
                    target.fill_(1.0)
                elif name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
                    target.normal_(0.0, residual_std, generator=gen)
                else:
                    target.normal_(0.0, cfg.initializer_range, generator=gen)
                if target.shape != p.shape:
                    p.copy_(target[owner.first_expert: owner.first_expert + owner.num_local_experts])
                elif target is not p:
                    p.copy_(target)
        self._reset_rope()
        if self.balance is not None:
            self.balance.start_step()

    # ----------------------------------------------------------------------------------------------------
    # MoE balance API used by the trainer.

    def set_balance_group(self, group: Optional[dist.ProcessGroup]) -> None:
        """Process group over which expert counts are summed for the global-batch balance loss (None: local)."""
        if self.balance is not None:
            self.balance.group = group

    def start_step(self) -> None:
        """Call at the start of each optimizer step: empties the per-step expert count buffer."""
        if self.balance is not None:
            self.balance.start_step()

    def expert_load(self) -> Optional[torch.Tensor]:
        """(layers, experts) fraction of routed assignments per expert this step (None for dense / no step yet)."""
        return None if self.balance is None else self.balance.expert_load()

    def router_probs_sum(self) -> Optional[torch.Tensor]:
        """(layers, experts) sum of this process's training micro-batches' mean router probabilities this step."""
        return None if self.balance is None else self.balance.step_probs

    def step_balance_loss(self, probs_mean: torch.Tensor) -> torch.Tensor:
        """MoE only: the step's global-batch balance loss from its (layers, experts) mean router probability."""
        return self.balance.step_balance_loss(probs_mean)

    # ----------------------------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, doc_ids: Optional[torch.Tensor] = None,
                return_token_losses: bool = False, kv_cache: Optional["KVCache"] = None,
                logits_to_keep: Optional[int] = None) -> ModelOutput:
        """Run the model on input_ids (B, T).

        labels (B, T): already shifted (labels[t] is the target at position t), -100 = ignore; the loss is the
        mean over the non-ignored tokens. doc_ids (B, T): when given, attention stays inside each document
        (block-diagonal causal) and, unless position_ids are given, positions restart at each document.
        Without doc_ids, packed documents attend across boundaries (plain packing). kv_cache: decoding only.
        logits_to_keep: without labels, compute logits for the last n positions only (decoding needs one).
        """
        b, t = input_ids.shape
        given_positions = position_ids is not None
        if self.dca is not None:
            if position_ids is not None or doc_ids is not None:
                raise ValueError("dual chunk attention takes neither position_ids nor doc_ids (one sequence per row)")
            cos, sin = self.rope_cos[: self.dca.chunk_size], self.rope_sin[: self.dca.chunk_size]  # (C, D/2)
        else:
            if position_ids is None:
                if doc_ids is not None:
                    position_ids = position_ids_from_doc_ids(doc_ids)
                elif kv_cache is not None:
                    position_ids = torch.arange(kv_cache.length, kv_cache.length + t, device=input_ids.device)[None]
            if position_ids is None:
                if t > self.rope_cos.shape[0]:
                    raise ValueError(f"sequence length {t} exceeds the RoPE tables ({self.rope_cos.shape[0]} "
                                     "positions); raise max_position_embeddings, set YaRN rope_scaling or use DCA")
                cos, sin = self.rope_cos[:t][None, None], self.rope_sin[:t][None, None]  # (1, 1, T, D/2)
            else:
                if kv_cache is not None and kv_cache.length + t > self.rope_cos.shape[0]:  # decoding past them
                    raise ValueError(f"position {kv_cache.length + t - 1} is beyond the RoPE tables "
                                     f"({self.rope_cos.shape[0]} positions); raise max_position_embeddings, set "
                                     "YaRN rope_scaling or use DCA")
                # Positions the caller gives are checked, outside training on an accelerator (two host syncs; the
                # training loop's come from the loader and stay below the sequence length). Those made here from
                # the KV cache or doc_ids are in range by construction.
                if given_positions and (not self.training or position_ids.device.type == "cpu") and (
                        position_ids.numel()) and (int(position_ids.max()) >= self.rope_cos.shape[0]
                                                   or int(position_ids.min()) < 0):
                    raise ValueError(f"position_ids span {int(position_ids.min())}..{int(position_ids.max())}, "
                                     f"outside the RoPE tables (0..{self.rope_cos.shape[0] - 1}); raise "
                                     "max_position_embeddings or set YaRN rope_scaling")
                cos, sin = self.rope_cos[position_ids][:, None], self.rope_sin[position_ids][:, None]  # (B, 1, T, D/2)
        dtype = self.model.embed_tokens.weight.dtype
        cos, sin = cos.to(dtype), sin.to(dtype)

        mask: Optional[AttentionMask] = None
        if doc_ids is not None:
            if kv_cache is not None:
                raise ValueError("doc_ids and kv_cache cannot be combined")
            # Built once here, shared by every layer: (B, 1, T, T) bool for SDPA, or a FlexAttention BlockMask.
            mask = document_mask(doc_ids, self.config.doc_mask_implementation)
        elif kv_cache is not None and kv_cache.length > 0 and t > 1:
            # Extending a non-empty cache by several tokens: causal with the queries at the end.
            s = kv_cache.length + t
            mask = torch.ones(t, s, dtype=torch.bool, device=input_ids.device).tril(diagonal=s - t)[None, None]

        x = self.model.embed_tokens(input_ids)  # (B, T, d)
        stats: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        checkpointing = self.config.activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.model.layers:
            if checkpointing:
                x, s = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x, s = layer(x, cos, sin, mask, kv_cache)
            if s is not None:
                stats.append(s)
        if kv_cache is not None:
            kv_cache.advance(t)
        h = self.model.norm(x)  # (B, T, d)

        out = ModelOutput()
        zero = h.new_zeros((), dtype=torch.float32)
        aux, balance, z = zero, zero, zero
        if stats:
            probs_mean, counts, zs = (torch.stack(v) for v in zip(*stats))  # (L, E), (L, E), (L,)
            balance, z = self.balance.losses(probs_mean, counts, zs, training=self.training)
            aux = self.config.router_aux_loss_coef * balance
            if self.config.router_z_loss_coef > 0:
                aux = aux + self.config.router_z_loss_coef * z
        out.aux_loss, out.balance_loss, out.z_loss = aux, balance.detach(), z.detach()

        if labels is None:
            if logits_to_keep is not None:
                h = h[:, -logits_to_keep:]
            out.logits = self.lm_head(h)  # (B, T or logits_to_keep, V)
            return out
        lm_loss, token_losses = self.lm_head(h.reshape(b * t, -1), labels.reshape(b * t))
        out.lm_loss = lm_loss
        out.loss = lm_loss + aux
        if return_token_losses:
            out.token_losses = token_losses.view(b, t)
        return out
