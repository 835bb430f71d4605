"""Plain-torch paged attention: the reference (and CPU path) for the Triton kernel.

One step packs the query tokens of several sequences back to back. Each query token sees
  * the sequence's cached context: positions ``[0, context_len)`` of its pages, except the positions in
    ``[hole_start, hole_end)`` (Fast-dLLM's dual cache keeps a stale suffix in the cache and replaces the
    current block by the step's own K/V: the block's range is the hole), and
  * the step's own keys of the same sequence whose block id is <= its own block id. One integer per
    token expresses every mask mode: equal ids are bidirectional, increasing ids are block-causal, and a
    dummy (padding) token carries a huge id so that no real token ever sees it.
Keys in the cache are stored after RoPE, so a key's position is baked into it.
"""

from __future__ import annotations

import torch


def store_kv_reference(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write the K/V of tokens with ``slot >= 0`` into the flat slots of the paged cache.

    key/value: ``[num_tokens, num_kv_heads, head_dim]``; caches: ``[num_pages, page_size, kv_heads, dim]``.
    """
    keep = slot_mapping >= 0
    if not bool(keep.any()):
        return
    slots = slot_mapping[keep]
    flat_k = k_cache.view(-1, *k_cache.shape[2:])
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    flat_k[slots] = key[keep].to(k_cache.dtype)
    flat_v[slots] = value[keep].to(v_cache.dtype)


def _gather_context(cache: torch.Tensor, page_table_row: torch.Tensor, context_len: int) -> torch.Tensor:
    """Positions ``[0, context_len)`` of one sequence, read page by page: ``[context_len, heads, dim]``."""
    page_size = cache.shape[1]
    num_pages = (context_len + page_size - 1) // page_size
    pages = page_table_row[:num_pages].long()
    return cache[pages].reshape(-1, *cache.shape[2:])[:context_len]


def paged_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor | None,
    v_cache: torch.Tensor | None,
    cu_seqlens_q: list[int],
    block_ids: torch.Tensor,
    context_lens: list[int],
    context_holes: list[tuple[int, int]],
    page_tables: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Attention of packed query tokens over their paged context plus their own K/V.

    query ``[T, H, D]``; key/value ``[T, KVH, D]`` (the step's own, after RoPE); ``cu_seqlens_q`` has
    ``num_seqs + 1`` offsets into the packed tokens; ``block_ids`` ``[T]`` int64 (see module docstring).
    Returns ``[T, H, D]`` in the query dtype. Each sequence is computed on its own, so a sequence's
    result does not depend on which other sequences share the step (batch invariance).
    """
    num_heads, num_kv_heads = query.shape[1], key.shape[1]
    group = num_heads // num_kv_heads
    out = torch.empty_like(query)
    for seq, (start, end) in enumerate(zip(cu_seqlens_q[:-1], cu_seqlens_q[1:])):
        if end == start:
            continue
        q = query[start:end].float()
        k_own = key[start:end].float()
        v_own = value[start:end].float()
        ids = block_ids[start:end]
        own_visible = ids.unsqueeze(0) <= ids.unsqueeze(1)  # [q, k]: key block id <= query block id
        context_len = context_lens[seq]
        if context_len > 0:
            assert k_cache is not None and v_cache is not None and page_tables is not None
            k_ctx = _gather_context(k_cache, page_tables[seq], context_len).float()
            v_ctx = _gather_context(v_cache, page_tables[seq], context_len).float()
            hole_start, hole_end = context_holes[seq]
            ctx_visible = torch.ones(context_len, dtype=torch.bool, device=query.device)
            if hole_end > hole_start:
                ctx_visible[hole_start:hole_end] = False
            keys = torch.cat([k_ctx, k_own])
            values = torch.cat([v_ctx, v_own])
            visible = torch.cat([ctx_visible.unsqueeze(0).expand(end - start, -1), own_visible], dim=1)
        else:
            keys, values, visible = k_own, v_own, own_visible
        keys = keys.repeat_interleave(group, dim=1)  # GQA: each kv head serves `group` query heads
        values = values.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, keys) * scale
        scores = scores.masked_fill(~visible.unsqueeze(0), float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        # A query that sees nothing (only possible for padding) yields NaN rows: zero them.
        probs = torch.nan_to_num(probs, nan=0.0)
        out[start:end] = torch.einsum("hqk,khd->qhd", probs, values).to(query.dtype)
    return out
