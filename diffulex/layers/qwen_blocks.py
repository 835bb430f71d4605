"""Qwen-style building blocks shared by the Qwen2/Qwen3-derived families (Dream, SDAR, SDAR-MoE, LLaDA2).

``SwiGLUMLP`` (``mlp.{gate,up,down}_proj``, gate and up merged), ``QwenAttention`` (``self_attn.{q,k,v,o}_proj``
with q/k/v merged, optional bias, optional per-head ``q_norm``/``k_norm`` before RoPE) and
``PreNormDecoderLayer`` (``input_layernorm`` -> attention -> ``post_attention_layernorm`` -> MLP, the
residual additions fused into the next norm). Module names are the official checkpoint names, so the
families' identity name maps keep holding.
"""

from __future__ import annotations

import torch
from torch import nn

from diffulex.layers.attention import Attention
from diffulex.layers.fused_projections import gate_up_silu
from diffulex.layers.linear import MergedLinear, RowParallelLinear, qkv_linear
from diffulex.layers.norm import RMSNorm
from diffulex.layers.parallel_state import split_heads
from diffulex.layers.rotary import RotaryEmbedding


class SwiGLUMLP(nn.Module):
    """SwiGLU MLP ``down(silu(gate(x)) * up(x))``; gate and up as one merged projection (official names kept
    as shards). Tensor parallel: the intermediate dimension is split (gate/up column-parallel, down
    row-parallel), one all-reduce at the end, or none with ``reduce=False`` (MoE experts: the block reduces
    once)."""

    def __init__(self, hidden_size: int, intermediate_size: int, reduce: bool = True):
        super().__init__()
        self.gate_up_proj = MergedLinear(
            hidden_size, [("gate_proj", intermediate_size), ("up_proj", intermediate_size)]
        )
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, reduce=reduce)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gate_up_silu(self.gate_up_proj, hidden))


class QwenAttention(nn.Module):
    """Self-attention with merged ``qkv_proj`` (bias with ``qkv_bias``), per-head q/k RMSNorm before RoPE
    when ``qk_norm`` (Qwen3), GQA through the paged attention, and ``o_proj`` (bias with ``o_bias``).

    ``num_heads * head_dim`` need not equal ``hidden_size`` (SDAR-4B: 32 x 128 = 4096 vs 2560). Tensor
    parallel: each rank keeps its query heads and the KV heads they read (``split_heads``), ``o_proj`` is
    row-parallel (the block's one all-reduce).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        rotary: RotaryEmbedding,
        *,
        qkv_bias: bool,
        o_bias: bool = False,
        qk_norm: bool = False,
        eps: float = 1e-6,
    ):
        super().__init__()
        split = split_heads(num_heads, num_kv_heads)
        self.num_heads, self.num_kv_heads, self.head_dim = split.num_heads, split.num_kv_heads, head_dim
        self.qkv_proj = qkv_linear(hidden_size, split, num_heads, num_kv_heads, head_dim, qkv_bias)
        self.o_proj = RowParallelLinear(num_heads * head_dim, hidden_size, o_bias)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = RMSNorm(head_dim, eps)  # over each head's channels, not the whole projection
            self.k_norm = RMSNorm(head_dim, eps)
        self.rotary_emb = rotary
        self.attn = Attention(self.num_heads, self.num_kv_heads, head_dim)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        query, key, value = self.qkv_proj(hidden)  # column views of one [T, q + 2 kv] result
        query = query.view(num_tokens, self.num_heads, self.head_dim)
        key = key.view(num_tokens, self.num_kv_heads, self.head_dim)
        value = value.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            query, key = self.q_norm(query), self.k_norm(key)
        query, key = self.rotary_emb(positions, query, key)
        attended = self.attn(query, key, value).reshape(num_tokens, self.num_heads * self.head_dim)
        return self.o_proj(attended)


class PreNormDecoderLayer(nn.Module):
    """Pre-norm layer: attention and MLP, each added to the residual stream (addition fused into the norm).

    The attention module is stored under ``attn_name`` (``self_attn`` for Qwen, ``attention`` for LLaDA2),
    the MLP (dense or MoE) under ``mlp``.
    """

    def __init__(
        self, attention: nn.Module, mlp: nn.Module, hidden_size: int, eps: float, attn_name: str = "self_attn"
    ):
        super().__init__()
        self._attn_name = attn_name
        self.add_module(attn_name, attention)
        self.mlp = mlp
        self.input_layernorm = RMSNorm(hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mlp_out, residual)``: the layer's output is ``residual + mlp_out``, whose addition is left to the
        next norm (fused with it on the GPU). ``residual`` None: ``hidden`` is the residual stream itself."""
        if residual is None:
            residual, normed = hidden, self.input_layernorm(hidden)
        else:
            normed, residual = self.input_layernorm(hidden, residual)
        attended = getattr(self, self._attn_name)(positions, normed)
        normed, residual = self.post_attention_layernorm(attended, residual)
        return self.mlp(normed), residual


def run_decoder_stack(
    layers: nn.ModuleList, norm: RMSNorm, hidden: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Embedded ``hidden`` through the ``PreNormDecoderLayer``s and the final ``norm`` (adding the last residual)."""
    residual = None
    for layer in layers:
        hidden, residual = layer(positions, hidden, residual)
    if residual is None:
        return norm(hidden)
    return norm(hidden, residual)[0]
