"""The one configuration schema of a Qwen3 model (dense or MoE).

Field names follow HF transformers' `Qwen3Config` / `Qwen3MoeConfig`, so importing and exporting a model is a
key map, not a translation. Only OmegaConf-compatible types are used: train/ registers this dataclass in
Hydra's ConfigStore as the schema of the `model` config group, and the numbers live in `conf/model/*.yaml`.
"""
from __future__ import annotations

import math

from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, Mapping, Optional

BALANCE_GRANULARITIES = ("micro", "global")
MOE_IMPLEMENTATIONS = ("auto", "grouped_mm", "loop")
ATTENTION_BACKENDS = ("auto", "flash", "cudnn", "cudnn_mha", "efficient", "math")
DOC_MASK_IMPLEMENTATIONS = ("auto", "flex", "dense")


@dataclass
class Qwen3Config:
    """Shape and training options of a Qwen3 model; `num_experts == 0` means dense."""

    name: str
    """Preset name, e.g. `qwen3_0_6b`; informational."""
    vocab_size: int
    """Rows of the embedding and of the output head (151,936 for the released tokenizer)."""
    hidden_size: int
    """Width d of the residual stream."""
    intermediate_size: int
    """Hidden width of the dense SwiGLU MLP (unused when every layer is MoE)."""
    num_hidden_layers: int
    """Number of decoder blocks L."""
    num_attention_heads: int
    """Query heads H."""
    num_key_value_heads: int
    """Key/value heads (grouped-query attention); must divide `num_attention_heads`."""
    head_dim: int = 128
    """Width of one attention head; Qwen3 decouples it from hidden_size / heads."""
    rms_norm_eps: float = 1e-6
    """Epsilon of every RMSNorm (blocks, QK-Norm, final norm)."""
    rope_theta: float = 10000.0
    """RoPE base; 10,000 in the General stage, raised to 1,000,000 for Long Context (ABF)."""
    rope_scaling: Optional[Dict[str, Any]] = None
    """HF-style RoPE scaling, e.g. {rope_type: yarn, factor: 4.0, original_max_position_embeddings: 32768}."""
    max_position_embeddings: int = 40960
    """Length of the RoPE tables; positions must stay below it (YaRN extends it by its factor)."""
    tie_word_embeddings: bool = False
    """Share the embedding matrix with the output head."""
    num_experts: int = 0
    """Routed experts per MoE layer; 0 builds a dense model."""
    num_experts_per_tok: int = 0
    """Experts each token is routed to (top-k)."""
    moe_intermediate_size: int = 0
    """Hidden width of one expert's SwiGLU MLP."""
    norm_topk_prob: bool = True
    """Renormalise the top-k router probabilities to sum to 1 (Qwen3-MoE does)."""
    router_aux_loss_coef: float = 0.001
    """Weight of the load-balancing loss (1 at an even load; transformers' is k times it: see models/hf.py)."""
    router_z_loss_coef: float = 0.0
    """Weight of the router z-loss (mean squared logsumexp of router logits); 0 turns it off."""
    balance_loss_granularity: str = "global"
    """'global': expert counts summed over data-parallel ranks and micro-batches of a step; 'micro': per micro-batch."""
    moe_implementation: str = "auto"
    """Expert matmuls: 'grouped_mm' (CUDA bf16), 'loop' (per-expert matmuls, any device), 'auto' picks."""
    initializer_range: float = 0.02
    """Std of the normal init of embeddings and linear layers (see `Qwen3ForCausalLM.init_weights`)."""
    activation_checkpointing: bool = False
    """Recompute each decoder block in the backward pass instead of storing its activations."""
    loss_chunk_size: int = 2048
    """Tokens per chunk of the fused output-head + cross-entropy; bounds the logits held at once."""
    compile: bool = False
    """torch.compile each decoder block and the loss's per-chunk softmax (fuses norms, RoPE, SwiGLU; same results)."""
    attention_backend: str = "auto"
    """SDPA kernel to use first: 'auto' (torch's order), 'flash', 'cudnn', 'cudnn_mha' (cuDNN on K/V expanded to
    every query head, for builds whose cuDNN path lacks GQA), 'efficient' or 'math'; others stay as fallbacks."""
    doc_mask_implementation: str = "auto"
    """Attention under document masking (`doc_ids`, `data.doc_masking`): 'flex' (FlexAttention with a BlockMask of
    (T/128)^2 tiles, compiled on CUDA), 'dense' (SDPA with a (B, 1, T, T) bool mask), 'auto' = flex on CUDA, dense
    elsewhere (torch has no FlexAttention backward on the CPU). Same attention either way; see models/doc_mask.py."""
    bos_token_id: Optional[int] = None
    """Beginning-of-sequence token id, written to the HF config when set."""
    eos_token_id: Optional[int] = None
    """End-of-sequence token id, written to the HF config when set."""

    def __post_init__(self) -> None:
        # the presets' `rope_scaling: {}` (an empty mapping, into which Hydra can merge an override) means none
        if self.rope_scaling is not None and len(self.rope_scaling) == 0:
            self.rope_scaling = None

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "model config") -> "Qwen3Config":
        """Validated config from a mapping (YAML dict, OmegaConf DictConfig, ...); unknown keys are an error."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"{source}: unknown keys {unknown}")
        plain: Dict[str, Any] = {}
        for key in values:
            v = values[key]
            if known[key].type in ("float", float):
                # YAML 1.1 reads `1e-6` (no dot) as a string and `10000` as an int: strict on floats.
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise ValueError(f"{source}: {key} must be a number, got {v!r}")
                v = float(v)
            elif isinstance(v, Mapping):
                v = {k: v[k] for k in v}  # a plain dict, also from a DictConfig
            plain[key] = v
        return cls(**plain).validate()

    @property
    def is_moe(self) -> bool:
        """True when the MLP of every block is a mixture of experts."""
        return self.num_experts > 0

    def to_dict(self) -> Dict[str, Any]:
        """Plain dict of all fields (YAML / JSON friendly)."""
        return asdict(self)

    def validate(self) -> "Qwen3Config":
        """Raise ValueError naming the first inconsistent field; return self."""
        positive = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "max_position_embeddings", "loss_chunk_size"]
        for f in positive:
            if int(getattr(self, f)) <= 0:
                raise ValueError(f"{f} must be positive, got {getattr(self, f)}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not self.rope_theta > 1.0 or math.isinf(self.rope_theta):  # NaN is not <= 1: it made NaN tables
            raise ValueError(f"rope_theta must be a finite number > 1, got {self.rope_theta}")
        if not 0 < self.rms_norm_eps < math.inf:
            raise ValueError(f"rms_norm_eps must be positive and finite, got {self.rms_norm_eps}")
        if not 0 < self.initializer_range < math.inf:  # NaN passed '<= 0' and made every weight NaN
            raise ValueError(f"initializer_range must be positive and finite, got {self.initializer_range}")
        if self.num_experts < 0:
            raise ValueError(f"num_experts must be >= 0, got {self.num_experts}")
        for key in ("bos_token_id", "eos_token_id"):  # an id past the vocabulary went into the exported configs
            value = getattr(self, key)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(f"{key} must be a token id in [0, vocab_size={self.vocab_size}), got {value}")
        if self.is_moe:
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise ValueError(
                    f"num_experts_per_tok ({self.num_experts_per_tok}) must be in [1, num_experts={self.num_experts}]")
            if self.moe_intermediate_size <= 0:
                raise ValueError(f"moe_intermediate_size must be positive for MoE, got {self.moe_intermediate_size}")
        elif self.intermediate_size <= 0:
            raise ValueError(f"intermediate_size must be positive, got {self.intermediate_size}")
        for key in ("router_aux_loss_coef", "router_z_loss_coef"):
            # NaN passed '< 0' and made every step's loss NaN (each update skipped until the run gave up)
            if not 0 <= getattr(self, key) < math.inf:
                raise ValueError(f"{key} must be a finite number >= 0, got {getattr(self, key)}")
        if self.balance_loss_granularity not in BALANCE_GRANULARITIES:
            raise ValueError(
                f"balance_loss_granularity must be one of {BALANCE_GRANULARITIES}, "
                f"got {self.balance_loss_granularity!r}")
        if self.moe_implementation not in MOE_IMPLEMENTATIONS:
            raise ValueError(
                f"moe_implementation must be one of {MOE_IMPLEMENTATIONS}, got {self.moe_implementation!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        if self.doc_mask_implementation not in DOC_MASK_IMPLEMENTATIONS:
            raise ValueError(f"doc_mask_implementation must be one of {DOC_MASK_IMPLEMENTATIONS}, "
                             f"got {self.doc_mask_implementation!r}")
        if self.rope_scaling is not None:
            self.rope_scaling = checked_rope_scaling(self.rope_scaling, self.max_position_embeddings,
                                                     self.rope_theta)
        return self


YARN_KEYS = ("rope_type", "type", "factor", "original_max_position_embeddings", "attention_factor", "beta_fast",
             "beta_slow", "mscale", "mscale_all_dim", "truncate", "partial_rotary_factor")


def checked_rope_scaling(scaling: Mapping[str, Any], max_position_embeddings: int,
                         rope_theta: float) -> Dict[str, Any]:
    """A YaRN scaling dict with every key this model reads checked, and the two HF leaves implicit filled in as
    transformers does: `original_max_position_embeddings` defaults to max_position_embeddings, and a null
    `factor` is max_position_embeddings / original. A `rope_theta` inside (transformers 5 keeps it in
    `rope_parameters`) is dropped when it is the model's. Raises ValueError naming the key."""
    s = {k: scaling[k] for k in scaling}
    if "rope_theta" in s:
        if s["rope_theta"] != rope_theta:
            raise ValueError(f"rope_scaling: rope_theta {s['rope_theta']} differs from the model's rope_theta "
                             f"{rope_theta}; set it there")
        del s["rope_theta"]
    kind = s.get("rope_type", s.get("type"))
    if kind == "default":
        return s
    if kind != "yarn":
        raise ValueError(f"rope_scaling: only rope_type 'yarn' is supported, got {kind!r}")
    unknown = sorted(set(s) - set(YARN_KEYS))
    if unknown:
        raise ValueError(f"rope_scaling: unsupported keys {unknown} (known: {list(YARN_KEYS)})")

    def number(key: str) -> Optional[float]:
        v = s.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ValueError(f"rope_scaling: {key} must be a number, got {v!r}")
        return v

    for key in ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
        number(key)
    if number("partial_rotary_factor") not in (None, 1, 1.0):
        raise ValueError(f"rope_scaling: partial_rotary_factor {s['partial_rotary_factor']} is not supported "
                         f"(Qwen3 rotates the whole head)")
    original = s.get("original_max_position_embeddings")
    if original is None:
        original = max_position_embeddings
    if isinstance(original, bool) or not isinstance(original, int) or original <= 0:
        raise ValueError(f"rope_scaling: original_max_position_embeddings must be a positive integer, "
                         f"got {original!r}")
    factor = number("factor")
    if factor is None:
        factor = max_position_embeddings / original
    if factor < 1.0:
        raise ValueError(f"rope_scaling: yarn factor must be >= 1, got {factor}")
    s["original_max_position_embeddings"], s["factor"] = original, float(factor)
    return s
