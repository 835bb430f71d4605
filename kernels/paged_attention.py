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

Block ids are read in their own dtype (int32 or int64: the kernel is specialised per dtype), so padding
ids as large as ``2**40`` need no host-side clamping.

Softmax is online, in fp32, in two loops per (sequence, head, query tile): the paged context in tiles of
``BLOCK_N`` positions, then the step's own keys in tiles of ``BLOCK_N`` tokens. ``head_dim`` up to 256 is
padded to a power of two (>= 16) with masked loads.

Split-KV (flash-decoding): a grid too small to fill the GPU (a batch-1 denoise step: 32 heads x 1 query
tile x 1 sequence = 32 programs) splits each (sequence, head, query tile)'s keys, numbered context
positions first and the step's own keys after them, into ``NUM_SPLITS`` chunks of whole ``BLOCK_N``
tiles, one program each (grid ``(H, q_tiles * NUM_SPLITS, S)``). Each program sizes its chunk from the
sequence's actual key count, read on the device, so the grid still depends on host values only. It
writes its un-normalised fp32 accumulator, running max (base 2) and running sum to scratch; a split with
no keys, or seeing none, writes max -inf and sum 0 and contributes nothing. ``_combine_splits_kernel``
then rescales and sums the partials per (token, head) (log-sum-exp). ``num_splits`` is chosen on the host
by :func:`choose_num_splits`.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _paged_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    part_acc_ptr,  # split path: [T, H, NUM_SPLITS, HEAD_DIM] fp32 un-normalised partial outputs
    part_ml_ptr,  # split path: [T, H, NUM_SPLITS, 2] fp32 (running max in base 2, running sum)
    cu_seqlens_ptr,
    block_ids_ptr,
    context_lens_ptr,
    holes_ptr,
    page_tables_ptr,
    qk_scale,  # softmax scale * log2(e): the kernel works in base 2
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kcp,
    stride_kcr,
    stride_kch,
    stride_vcp,
    stride_vcr,
    stride_vch,
    stride_ot,
    stride_oh,
    stride_holes,
    stride_pt,
    HEAD_DIM: tl.constexpr,
    NUM_HEADS: tl.constexpr,
    GROUP: tl.constexpr,  # query heads per kv head
    PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    head = tl.program_id(0)
    tile_m = tl.program_id(1) // NUM_SPLITS
    split = tl.program_id(1) % NUM_SPLITS
    seq = tl.program_id(2)

    q_start = tl.load(cu_seqlens_ptr + seq)
    q_len = tl.load(cu_seqlens_ptr + seq + 1) - q_start
    if tile_m * BLOCK_M >= q_len:
        return
    kv_head = head // GROUP

    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < q_len
    d_valid = offs_d < HEAD_DIM

    tok_m = (q_start + offs_m).to(tl.int64)
    context_len = tl.load(context_lens_ptr + seq)
    # The keys of the sequence in one index space: context positions [0, context_len), then the step's
    # own keys [context_len, context_len + q_len). Split `split` takes the chunk [key_lo, key_hi) of it,
    # a whole number of BLOCK_N tiles sized from the actual key count (read here, on the device).
    if NUM_SPLITS == 1:
        ctx_lo = 0
        ctx_hi = context_len
        own_lo = 0
        own_hi = q_len
    else:
        num_keys = context_len + q_len
        chunk = tl.cdiv(tl.cdiv(num_keys, NUM_SPLITS), BLOCK_N) * BLOCK_N
        key_lo = split * chunk
        key_hi = tl.minimum(key_lo + chunk, num_keys)
        ctx_lo = key_lo
        ctx_hi = tl.minimum(key_hi, context_len)
        own_lo = tl.maximum(key_lo - context_len, 0)
        own_hi = key_hi - context_len  # may be < own_lo: then the split has no own keys
        if key_lo >= num_keys:  # nothing to see (short sequence): contribute nothing, skip the rest
            part = (tok_m * NUM_HEADS + head) * NUM_SPLITS + split
            tl.store(part_ml_ptr + part * 2, tl.full([BLOCK_M], float("-inf"), tl.float32), mask=m_valid)
            tl.store(part_ml_ptr + part * 2 + 1, tl.zeros([BLOCK_M], tl.float32), mask=m_valid)
            return

    q = tl.load(
        q_ptr + tok_m[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
        mask=m_valid[:, None] & d_valid[None, :],
        other=0.0,
    )
    q_ids = tl.load(block_ids_ptr + tok_m, mask=m_valid, other=0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # ---- loop 1: the cached context, read page by page --------------------------------------------------
    hole_start = tl.load(holes_ptr + seq * stride_holes)
    hole_end = tl.load(holes_ptr + seq * stride_holes + 1)
    page_row_ptr = page_tables_ptr + seq.to(tl.int64) * stride_pt
    for start_n in range(ctx_lo, ctx_hi, BLOCK_N):
        pos = start_n + offs_n
        in_ctx = pos < ctx_hi
        visible = in_ctx & ((pos < hole_start) | (pos >= hole_end))
        page = tl.load(page_row_ptr + pos // PAGE_SIZE, mask=in_ctx, other=0).to(tl.int64)
        row = pos % PAGE_SIZE
        kc_off = page * stride_kcp + row * stride_kcr + kv_head * stride_kch
        vc_off = page * stride_vcp + row * stride_vcr + kv_head * stride_vch
        # Hole positions are not even loaded: whatever stale (even non-finite) values sit there can't
        # leak into the result through 0 * NaN.
        kt = tl.load(  # [BLOCK_D, BLOCK_N]
            k_cache_ptr + kc_off[None, :] + offs_d[:, None],
            mask=visible[None, :] & d_valid[:, None],
            other=0.0,
        ).to(q.dtype)
        v = tl.load(  # [BLOCK_N, BLOCK_D]
            v_cache_ptr + vc_off[:, None] + offs_d[None, :],
            mask=visible[:, None] & d_valid[None, :],
            other=0.0,
        ).to(q.dtype)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(visible[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # ---- loop 2: the step's own keys of this sequence, block id <= the query's ------------------------
    # Keys that no row of the tile sees (e.g. padding, later blocks) are not loaded either (rows past the
    # sequence count as id 0, which can only widen this set, never hide a key some row sees).
    max_q_id = tl.max(q_ids, axis=0)
    for start_n in range(own_lo, own_hi, BLOCK_N):
        idx = start_n + offs_n
        n_valid = idx < own_hi
        tok_n = (q_start + idx).to(tl.int64)
        k_ids = tl.load(block_ids_ptr + tok_n, mask=n_valid, other=0)
        n_load = n_valid & (k_ids <= max_q_id)
        kt = tl.load(
            k_ptr + tok_n[None, :] * stride_kt + kv_head * stride_kh + offs_d[:, None],
            mask=n_load[None, :] & d_valid[:, None],
            other=0.0,
        ).to(q.dtype)
        v = tl.load(
            v_ptr + tok_n[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :],
            mask=n_load[:, None] & d_valid[None, :],
            other=0.0,
        ).to(q.dtype)
        visible = n_load[None, :] & (k_ids[None, :] <= q_ids[:, None])
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]  # nothing visible: acc is 0, so the row is 0
        tl.store(
            out_ptr + tok_m[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=m_valid[:, None] & d_valid[None, :],
        )
    else:
        # Every split writes its max and sum, even one that saw nothing (max -inf, sum 0): the reduction
        # skips the acc of a split whose sum is 0 (an empty split above returned without writing it).
        part = (tok_m * NUM_HEADS + head) * NUM_SPLITS + split
        tl.store(
            part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :],
            acc,
            mask=m_valid[:, None] & d_valid[None, :],
        )
        tl.store(part_ml_ptr + part * 2, m_i, mask=m_valid)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=m_valid)


@triton.jit
def _combine_splits_kernel(
    part_acc_ptr,
    part_ml_ptr,
    out_ptr,
    cu_seqlens_ptr,
    num_seqs,
    stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    NUM_HEADS: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per (token, BLOCK_H heads): the log-sum-exp combination of the splits' partials."""
    tok = tl.program_id(0).to(tl.int64)
    if tok >= tl.load(cu_seqlens_ptr + num_seqs):  # a token outside every sequence (a padded batch)
        return
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    hs_valid = (offs_h[:, None] < NUM_HEADS) & (offs_s[None, :] < NUM_SPLITS)
    part = (tok * NUM_HEADS + offs_h[:, None]) * NUM_SPLITS + offs_s[None, :]  # [BLOCK_H, BLOCK_S]
    m = tl.load(part_ml_ptr + part * 2, mask=hs_valid, other=float("-inf"))
    l_s = tl.load(part_ml_ptr + part * 2 + 1, mask=hs_valid, other=0.0)
    m_max = tl.max(m, axis=1)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)  # no split saw anything
    scale = tl.math.exp2(m - m_safe[:, None])  # 0 for a split that saw nothing (max -inf)
    total = tl.sum(l_s * scale, axis=1)
    d_valid = offs_d[None, None, :] < HEAD_DIM
    acc = tl.load(  # [BLOCK_H, BLOCK_S, BLOCK_D]
        part_acc_ptr + part[:, :, None] * HEAD_DIM + offs_d[None, None, :],
        mask=(hs_valid & (l_s > 0.0))[:, :, None] & d_valid,  # an empty split's acc is never written
        other=0.0,
    )
    out = tl.sum(acc * scale[:, :, None], axis=1) / tl.where(total > 0.0, total, 1.0)[:, None]
    tl.store(
        out_ptr + tok * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=(offs_h[:, None] < NUM_HEADS) & (offs_d[None, :] < HEAD_DIM),
    )


@triton.jit
def _store_kv_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kc_slot,
    stride_kch,
    stride_vc_slot,
    stride_vch,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot < 0:
        return
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(key_ptr + tok * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(value_ptr + tok * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    tl.store(
        k_cache_ptr + slot * stride_kc_slot + offs_h[:, None] * stride_kch + offs_d[None, :],
        k.to(k_cache_ptr.dtype.element_ty),
        mask=mask,
    )
    tl.store(
        v_cache_ptr + slot * stride_vc_slot + offs_h[:, None] * stride_vch + offs_d[None, :],
        v.to(v_cache_ptr.dtype.element_ty),
        mask=mask,
    )


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
