"""Analytic parameter counts and training FLOPs per token of a Qwen3 config (nothing is allocated)."""
from __future__ import annotations

from dataclasses import dataclass

from models.config import Qwen3Config


@dataclass
class ParamCounts:
    """Parameter counts of one model; tied embeddings are counted once."""

    total: int
    """Every parameter."""
    active: int
    """Parameters a token uses: all but the experts it is not routed to (= total for dense)."""
    embedding: int
    """Input embedding plus the untied output head (the input embedding alone when tied)."""
    non_embedding: int
    """total - embedding."""
    matmul_active: int
    """Active parameters that are matmul weights, output head included; no embedding lookup, no norms."""


def count_parameters(cfg: Qwen3Config) -> ParamCounts:
    """Total, active, embedding and matmul parameter counts of the model `cfg` describes."""
    d, hd, L = cfg.hidden_size, cfg.head_dim, cfg.num_hidden_layers
    attn = d * hd * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)  # q, k, v, o
    norms = 2 * d + 2 * hd  # input / post-attention norms, q_norm / k_norm
    if cfg.is_moe:
        expert = 3 * d * cfg.moe_intermediate_size
        router = d * cfg.num_experts
        mlp_total, mlp_active = cfg.num_experts * expert + router, cfg.num_experts_per_tok * expert + router
    else:
        mlp_total = mlp_active = 3 * d * cfg.intermediate_size
    head = cfg.vocab_size * d
    embedding = head if cfg.tie_word_embeddings else 2 * head
    total = L * (attn + norms + mlp_total) + d + embedding
    active = L * (attn + norms + mlp_active) + d + embedding
    matmul_active = L * (attn + mlp_active) + head
    return ParamCounts(total=total, active=active, embedding=embedding, non_embedding=total - embedding,
                       matmul_active=matmul_active)


def flops_per_token(cfg: Qwen3Config, seq_len: int, *, causal_halved: bool) -> float:
    """Training FLOPs per token: 6 * matmul_active + 12 * L * H * head_dim * seq_len (halved with `causal_halved`).

    The attention term counts QK^T and AV for forward and backward over a full seq_len x seq_len score matrix;
    with `causal_halved` only the lower triangle that causal attention needs is counted.
    """
    attention = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len
    if causal_halved:
        attention /= 2
    return 6.0 * count_parameters(cfg).matmul_active + float(attention)
