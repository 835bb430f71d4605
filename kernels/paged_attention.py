"""Triton paged attention and K/V store: the GPU fast path of :mod:`diffulex.kernels.attention_ref`.

``paged_attention_triton`` computes exactly what ``paged_attention_reference`` computes: each packed query
token of sequence ``s`` sees

  * the cached context positions ``[0, context_lens[s])`` read through ``page_tables[s]`` (position ``p``
    lives in page ``page_tables[s, p // page_size]``, row ``p % page_size``), minus the positions in
    ``[context_holes[s, 0], context_holes[s, 1])``, and
  * the step's own keys of sequence ``s`` whose block id is <= the query's block id.

A query that sees nothing yields zeros (never NaN). Every per-sequence length is read from device tensors
inside the kernel; the launch grid ``(H, cdiv(max_seqlen_q, BLOCK_M) * NUM_SPLITS, S)`` depends only on the
number of heads, ``max_seqlen_q``, the number of sequences and the number of splits, so a launch can be
captured in a CUDA graph. Heads
are the fastest-varying grid axis: the programs that read the same K/V (the heads of one sequence, and
of one GQA group in particular) run side by side and share it through L2.

This module is the host side: the launch wrappers, the tile sizes (:func:`default_block_sizes`) and the
split-KV rule (``num_splits`` is chosen on the host by :func:`choose_num_splits`). The Triton kernels
(online softmax over the paged context and the step's own keys, split-KV partials and their log-sum-exp
combination, the K/V store) are in :mod:`diffulex.kernels.paged_attention_kernels`.
"""

from __future__ import annotations

import functools

import torch
import triton
from diffulex.kernels.paged_attention_kernels import (
    _combine_splits_kernel,
    _paged_attention_kernel,
    _store_kv_kernel,
)

_LOG2E = 1.4426950408889634


def _last_dim_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def default_block_sizes(head_dim: int, max_seqlen_q: int) -> dict[str, int]:
    """Tile sizes tuned for H100/H200 (FlashAttention-2 style): ``block_m``, ``block_n``, ``num_warps``,
    ``num_stages``.

    ``block_m`` follows the longest query of the step (16 / 32 / 64): diffusion decoding steps carry one
    block of 32 tokens or fewer per sequence, so a 64-row tile would be half empty. ``head_dim`` > 128
    halves ``block_n`` and doubles the warps to keep the fp32 accumulator in registers.
    """
    block_m = 16 if max_seqlen_q <= 16 else 32 if max_seqlen_q <= 32 else 64
    if head_dim <= 128:
        # block_n 128 measured best at 64 sequences x 32 queries over 1,024 cached keys on the H200
        # (357 us vs 425 us with 64; scripts/tune_attention.py, 2026-11-23).
        return {"block_m": block_m, "block_n": 128, "num_warps": 4, "num_stages": 2}
    return {"block_m": block_m, "block_n": 32, "num_warps": 8, "num_stages": 2}


_DEFAULT_SM_COUNT = 132  # H200
MAX_NUM_SPLITS = 16
# The split path aims at about this many programs per SM. Fewer, longer splits win at batch 1: H200,
# 32 heads x 32 queries over 1,056 keys, in-graph times (scripts/tune_attention.py, 2026-11-23): 6 splits
# (5 busy programs of two 128-key tiles per head) 13.3 us, 9 splits (one tile each) 17.9 us, 4 splits 15.8.
PROGRAMS_PER_SM = 1.25


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _DEFAULT_SM_COUNT


def choose_num_splits(num_programs: int, sm_count: int = _DEFAULT_SM_COUNT) -> int:
    """Key-range splits per (sequence, head, query tile), from host-known values only (no context length:
    those live on the device), so the launch stays capturable in a CUDA graph.

    ``num_programs`` is the unsplit grid size ``H * cdiv(max_seqlen_q, block_m) * S``. A grid of at least
    ``PROGRAMS_PER_SM * sm_count`` programs already fills the GPU: 1 (the unsplit path). A smaller one is
    split ``cdiv(PROGRAMS_PER_SM * sm_count, num_programs)`` ways, at most ``MAX_NUM_SPLITS``: e.g.
    32 heads x 1 tile x 1 sequence on 132 SMs -> 6 splits (192 programs).
    """
    target = int(PROGRAMS_PER_SM * sm_count)
    if num_programs <= 0 or num_programs >= target:
        return 1
    return min(MAX_NUM_SPLITS, triton.cdiv(target, num_programs))


def paged_attention_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor | None,
    v_cache: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor,
    block_ids: torch.Tensor,
    context_lens: torch.Tensor,
    context_holes: torch.Tensor,
    page_tables: torch.Tensor,
    scale: float,
    max_seqlen_q: int,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Attention of packed query tokens over their paged context plus their own K/V (see module doc).

    query ``[T, H, D]``; key/value ``[T, KVH, D]``; caches ``[P, page_size, KVH, D]`` or None (then every
    context length must be 0); ``cu_seqlens_q`` int32 ``[S + 1]``; ``block_ids`` int32/int64 ``[T]``;
    ``context_lens`` int32 ``[S]``; ``context_holes`` int32 ``[S, 2]``; ``page_tables`` int32
    ``[S, max_pages]`` (a ``[S, 1]`` dummy when nothing is cached); ``max_seqlen_q`` >= every sequence's
    query length (the grid covers ``cdiv(max_seqlen_q, block_m)`` tiles per sequence and head). Returns
    ``[T, H, D]`` in the query dtype; rows of tokens outside ``cu_seqlens_q`` are left uninitialised.
    The tile sizes default to :func:`default_block_sizes` and can be overridden one by one.

    ``num_splits`` (default :func:`choose_num_splits` of the grid and the device's SM count) splits each
    sequence's key range (context then own keys) into that many chunks, one program each, writing fp32
    partials to scratch that a second kernel combines (split-KV / flash-decoding); 1 is the unsplit path.
    """
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if head_dim > 256:
        raise ValueError(f"head_dim {head_dim} > 256 is not supported")
    num_seqs = cu_seqlens_q.shape[0] - 1
    out = torch.empty((num_tokens, num_heads, head_dim), dtype=query.dtype, device=query.device)
    if num_seqs <= 0 or max_seqlen_q <= 0 or num_tokens == 0:
        return out

    query, key, value = (_last_dim_contiguous(t) for t in (query, key, value))
    if k_cache is None or v_cache is None:
        # Nothing is cached (every context length is 0): the context loop never runs, so the step's own
        # K/V stand in as valid pointers, with zero strides and a page of one row.
        k_cache_arg, v_cache_arg, cache_strides, page_size = key, value, (0, 0, 0, 0, 0, 0), 1
    else:
        assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "caches must be contiguous in head_dim"
        k_cache_arg, v_cache_arg, page_size = k_cache, v_cache, k_cache.shape[1]
        cache_strides = (*k_cache.stride()[:3], *v_cache.stride()[:3])
    assert context_holes.stride(-1) == 1 and page_tables.stride(-1) == 1

    config = default_block_sizes(head_dim, max_seqlen_q)
    block_m = block_m or config["block_m"]
    block_n = block_n or config["block_n"]
    num_warps = num_warps or config["num_warps"]
    stages_given = num_stages
    num_stages = num_stages or config["num_stages"]
    block_d = max(16, triton.next_power_of_2(head_dim))
    # fp32 inputs get true fp32 dot products (no TF32), so the fp32 path matches the reference closely.
    dot_precision = "ieee" if query.dtype == torch.float32 else "tf32"

    num_tiles_m = triton.cdiv(max_seqlen_q, block_m)
    if num_splits is None:
        num_splits = choose_num_splits(num_heads * num_tiles_m * num_seqs, _sm_count(query.device))
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    if num_splits > 1 and stages_given is None:
        num_stages = 1  # a split walks two or three tiles: prefetching buys nothing (13.3 vs 14.5 us)
    if num_splits > 1:
        part_acc = torch.empty(
            (num_tokens, num_heads, num_splits, head_dim), dtype=torch.float32, device=query.device
        )
        part_ml = torch.empty(
            (num_tokens, num_heads, num_splits, 2), dtype=torch.float32, device=query.device
        )
    else:
        part_acc = part_ml = out  # unused

    grid = (num_heads, num_tiles_m * num_splits, num_seqs)
    _paged_attention_kernel[grid](
        query,
        key,
        value,
        k_cache_arg,
        v_cache_arg,
        out,
        part_acc,
        part_ml,
        cu_seqlens_q,
        block_ids,
        context_lens,
        context_holes,
        page_tables,
        float(scale) * _LOG2E,
        query.stride(0),
        query.stride(1),
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        *cache_strides,
        out.stride(0),
        out.stride(1),
        context_holes.stride(0),
        page_tables.stride(0),
        HEAD_DIM=head_dim,
        NUM_HEADS=num_heads,
        GROUP=num_heads // num_kv_heads,
        PAGE_SIZE=page_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        DOT_PRECISION=dot_precision,
        NUM_SPLITS=num_splits,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if num_splits > 1:
        block_s = triton.next_power_of_2(num_splits)
        # A few heads per program, ~4K fp32 partial elements: 2 heads at 9 splits x 128 dims.
        block_h = min(triton.next_power_of_2(num_heads), max(1, 4096 // (block_s * block_d)))
        _combine_splits_kernel[(num_tokens, triton.cdiv(num_heads, block_h))](
            part_acc,
            part_ml,
            out,
            cu_seqlens_q,
            num_seqs,
            out.stride(0),
            out.stride(1),
            HEAD_DIM=head_dim,
            NUM_HEADS=num_heads,
            NUM_SPLITS=num_splits,
            BLOCK_H=block_h,
            BLOCK_S=block_s,
            BLOCK_D=block_d,
            num_warps=4,
        )
    return out


def store_kv_triton(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write the K/V of tokens with ``slot >= 0`` into the flat slots of the paged cache (one program
    per token; slot -1 is skipped inside the kernel, so the launch needs no host sync).

    key/value ``[T, KVH, D]``; caches ``[P, page_size, KVH, D]`` with pages laid out back to back (flat
    slot ``s`` is page ``s // page_size``, row ``s % page_size``, as in ``store_kv_reference``).
    """
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    key, value = _last_dim_contiguous(key), _last_dim_contiguous(value)
    for cache in (k_cache, v_cache):
        assert cache.stride(-1) == 1 and cache.stride(0) == cache.shape[1] * cache.stride(1), (
            "the cache's pages must be contiguous slots"
        )
    _store_kv_kernel[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(1),
        v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4,
    )
