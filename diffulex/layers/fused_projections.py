"""Projections fused with the elementwise op that follows them, on the GPU's skinny-GEMM path.

``gate_up_silu`` is SwiGLU's ``silu(gate) * up`` of a merged gate|up projection and ``qkv_rope`` the
rotated q, k and plain v of a merged q|k|v projection. A batch-1 denoise step (``SKINNY_ROWS`` rows or
fewer on the GPU) computes each in one Triton kernel (``diffulex.kernels.skinny_gemm_fused``): one
kernel and one round trip of the projection's output fewer per use. Everything else (the CPU, larger
steps, a bias, partial rotary) takes the unfused path, which computes the same values.
"""

from __future__ import annotations

import torch

from diffulex.layers.activation import silu_and_mul
from diffulex.layers.linear import MergedLinear, skinny_eligible
from diffulex.layers.rotary import RotaryEmbedding


def gate_up_silu(proj: MergedLinear, x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of the gate|up projection ``proj`` (shards: gate, then up) applied to ``x``."""
    sizes = proj.shard_sizes
    if len(sizes) == 2 and sizes[0] == sizes[1] and skinny_eligible(x, proj.weight, proj.bias):
        from diffulex.kernels.skinny_gemm_fused import gate_up_silu_triton

        return gate_up_silu_triton(x, proj.weight)
    return silu_and_mul(*proj(x))


def qkv_rope(
    proj: MergedLinear,
    rotary: RotaryEmbedding,
    positions: torch.Tensor,
    x: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(query [T, H, D], key [T, KVH, D], value [T, KVH, D])`` of the q|k|v projection ``proj`` of
    ``x [T, hidden]``, query and key rotated by ``positions [T]`` (views of one result where fused)."""

    def as_heads(parts: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        heads = (num_heads, num_kv_heads, num_kv_heads)
        query, key, value = (
            part.view(x.shape[0], count, head_dim) for part, count in zip(parts, heads, strict=True)
        )
        return query, key, value

    if rotary.rotary_dim == head_dim and skinny_eligible(x, proj.weight, proj.bias):
        from diffulex.kernels.skinny_gemm_fused import qkv_rope_supports, qkv_rope_triton

        if qkv_rope_supports(head_dim):
            out = qkv_rope_triton(
                x, proj.weight, positions, rotary.inv_freq, num_heads, num_kv_heads, head_dim
            )
            return as_heads(out.split(proj.shard_sizes, dim=-1))  # the column slices MergedLinear returns
    query, key, value = as_heads(proj(x))
    query, key = rotary(positions, query, key)
    return query, key, value
