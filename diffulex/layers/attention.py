"""Attention over the paged KV cache plus the step's own K/V (reads the per-step context)."""

from __future__ import annotations

import torch
from torch import nn

from diffulex.kernels import paged_attention_reference, store_kv_reference
from diffulex.layers.context import AttentionContext, get_context


class Attention(nn.Module):
    """Scaled dot-product attention of one layer; owns references to that layer's K/V cache tensors.

    Takes q ``[T, num_heads, head_dim]`` and k/v ``[T, num_kv_heads, head_dim]`` (after RoPE), stores the
    K/V of tokens that the step commits, and attends as the context says. The runner assigns
    ``k_cache``/``v_cache`` (``[num_pages, page_size, num_kv_heads, head_dim]``) after allocating them.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float | None = None):
        super().__init__()
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale if scale is not None else head_dim**-0.5
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        context = get_context()
        if context.use_triton:
            return self._forward_triton(query, key, value, context)
        if self.k_cache is not None and self.v_cache is not None:
            store_kv_reference(key, value, self.k_cache, self.v_cache, context.slot_mapping)
        return paged_attention_reference(
            query,
            key,
            value,
            self.k_cache,
            self.v_cache,
            context.cu_seqlens_q,
            context.block_ids,
            context.context_lens,
            context.context_holes,
            context.page_tables,
            self.scale,
        )

    def _forward_triton(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, context: AttentionContext
    ) -> torch.Tensor:
        from diffulex.kernels.paged_attention import paged_attention_triton, store_kv_triton

        if self.k_cache is not None and self.v_cache is not None:
            store_kv_triton(key, value, self.k_cache, self.v_cache, context.slot_mapping)
        assert context.page_tables is not None, "the Triton path always has a (possibly dummy) page table"
        return paged_attention_triton(
            query,
            key,
            value,
            self.k_cache,
            self.v_cache,
            context.cu_seqlens_q_t,
            context.block_ids,
            context.context_lens_t,
            context.context_holes_t,
            context.page_tables,
            self.scale,
            context.max_seqlen_q,
        )
