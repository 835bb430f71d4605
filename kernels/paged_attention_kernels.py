"""Triton kernels of paged attention and the K/V store, launched by :mod:`diffulex.kernels.paged_attention`.

``_paged_attention_kernel`` runs one program per (head, query tile x split, sequence): grid
``(H, cdiv(max_seqlen_q, BLOCK_M) * NUM_SPLITS, S)``. Every per-sequence length (query length, context
length, hole, page table row) is read from device tensors inside the kernel.

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
then rescales and sums the partials per (token, head) (log-sum-exp).

``_store_kv_kernel`` writes one token's K/V per program into its flat slot of the paged cache (slot -1
is skipped).
"""

from __future__ import annotations

import triton
import triton.language as tl


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
