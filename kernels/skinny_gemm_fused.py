"""Skinny GEMMs that finish the next elementwise op in their epilogue (decode-step projections, Triton).

A batch-1 denoise step runs ~14 kernels per layer; two of them only re-read what a GEMM just wrote:
SwiGLU's ``silu(gate) * up`` after the gate|up projection and rotate-half RoPE after the q|k|v projection.
Each program here reads *two* row blocks of the weight against all of ``x`` and combines the two
accumulators before anything is stored:

* ``gate_up_silu_triton``: weight ``[2 I, K]`` (gate rows then up rows); program ``t`` reads gate rows
  ``[t B, t B + B)`` and the same up rows, writes ``silu(gate) * up`` for those ``B`` columns of the
  ``[M, I]`` output (half the bytes of the unfused output, one kernel fewer).
* ``qkv_rope_triton``: weight ``[(H + 2 KVH) D, K]`` (q heads, k heads, v heads); program ``h`` reads both
  halves of head ``h``'s ``D`` rows and rotates them by the row's position (q and k heads) or stores them
  as they are (v heads), into one ``[M, (H + 2 KVH) D]`` output whose column slices are q, k and v.

The epilogues round exactly as the unfused ops do: the GEMM result is rounded to the output dtype first,
then SiLU-mul / RoPE run in float32 on those values (``diffulex.kernels.fused_ops``). The K loop is not
split (each program already streams two row blocks).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from diffulex.kernels.fused_ops import rope_reference, silu_and_mul_reference
from diffulex.kernels.skinny_gemm import (
    MAX_ROWS,
    block_rows,
    fit_stages,
    skinny_gemm_reference,
    weight_descriptor,
)

_SILU_MUL = tl.constexpr(0)
_ROPE = tl.constexpr(1)


@triton.jit
def _paired_gemm_kernel(
    x_ptr,
    w_desc,  # tensor descriptor of the weight, block [BLOCK_N, BLOCK_K]
    out_ptr,
    pos_ptr,  # rope: [M] positions
    inv_freq_ptr,  # rope: [BLOCK_N] float32 inverse frequencies
    M,
    K,
    first_rows,  # silu_mul: I (rows before the up block); rope: number of heads that rotate (H + KVH)
    stride_xm,
    stride_om,
    EPILOGUE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    tile = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_valid = offs_m < M
    # The first weight row of each of the program's two row blocks.
    if EPILOGUE == _SILU_MUL:
        start_1 = tile * BLOCK_N  # gate rows = output columns
        start_2 = first_rows + start_1  # the same up rows
    else:
        start_1 = tile * 2 * BLOCK_N  # head `tile`: first half, then second half of its D rows
        start_2 = start_1 + BLOCK_N
    row_1 = start_1 + offs_n
    row_2 = start_2 + offs_n
    if EPILOGUE == _SILU_MUL:
        n_valid = row_1 < first_rows  # the gate rows are the output columns
    else:
        n_valid = offs_n < BLOCK_N
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    acc_1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        k_valid = (k + offs_k) < K
        x = tl.load(x_rows + (k + offs_k)[None, :], mask=m_valid[:, None] & k_valid[None, :], other=0.0)
        # A gate tile past I reads up rows: harmless, those columns are never stored.
        acc_1 += tl.dot(x, tl.trans(w_desc.load([start_1, k])))
        acc_2 += tl.dot(x, tl.trans(w_desc.load([start_2, k])))
    # The unfused path stores the GEMM result in the output dtype and the next op reads it back.
    first = acc_1.to(out_ptr.dtype.element_ty).to(tl.float32)
    second = acc_2.to(out_ptr.dtype.element_ty).to(tl.float32)
    out_rows = out_ptr + offs_m[:, None].to(tl.int64) * stride_om
    mask = m_valid[:, None] & n_valid[None, :]
    if EPILOGUE == _SILU_MUL:
        act = (first / (1.0 + tl.exp(-first))).to(out_ptr.dtype.element_ty).to(tl.float32)  # F.silu
        tl.store(out_rows + row_1[None, :], (act * second).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        if tile < first_rows:  # a q or k head: x * cos + rotate_half(x) * sin
            pos = tl.load(pos_ptr + offs_m, mask=m_valid, other=0).to(tl.float32)
            angles = pos[:, None] * tl.load(inv_freq_ptr + offs_n)[None, :]
            cos = tl.cos(angles)
            sin = tl.sin(angles)
            rotated_1 = first * cos + (-second) * sin
            second = second * cos + first * sin
            first = rotated_1
        tl.store(out_rows + row_1[None, :], first.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_rows + row_2[None, :], second.to(out_ptr.dtype.element_ty), mask=mask)


def gate_up_silu_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The unfused computation: the gate|up GEMM in ``x``'s dtype, then ``silu(gate) * up``."""
    gate, up = skinny_gemm_reference(x, weight).chunk(2, dim=-1)
    return silu_and_mul_reference(gate, up)


def qkv_rope_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> torch.Tensor:
    """The unfused computation: the q|k|v GEMM in ``x``'s dtype, then RoPE on q and k, as one
    ``[M, (H + 2 KVH) D]`` tensor."""
    m = x.shape[0]
    out = skinny_gemm_reference(x, weight)
    q_cols, k_cols = num_heads * head_dim, num_kv_heads * head_dim
    query = out[:, :q_cols].reshape(m, num_heads, head_dim)
    key = out[:, q_cols : q_cols + k_cols].reshape(m, num_kv_heads, head_dim)
    query, key = rope_reference(positions, query, key, head_dim, inv_freq=inv_freq)
    return torch.cat([query.reshape(m, -1), key.reshape(m, -1), out[:, q_cols + k_cols :]], dim=-1)


def _check(x: torch.Tensor, weight: torch.Tensor) -> int:
    """The row count of ``x`` after the shape and layout checks both wrappers need."""
    m, k = x.shape
    if weight.shape[1] != k:
        raise ValueError(f"x has {k} columns but weight has {weight.shape[1]}")
    if m > MAX_ROWS:
        raise ValueError(f"the fused skinny GEMMs take at most {MAX_ROWS} rows, got {m}")
    if x.stride(-1) != 1:
        raise ValueError("x must be contiguous in its last dimension")
    return m


def _launch(
    grid: int,
    x: torch.Tensor,
    weight: torch.Tensor,
    out: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    first_rows: int,
    epilogue: int,
    block_n: int,
    block_k: int,
    num_warps: int,
    num_stages: int,
) -> None:
    """One launch of ``_paired_gemm_kernel`` over ``grid`` programs (``positions``/``inv_freq``: RoPE only)."""
    m, k = x.shape
    block_m = block_rows(m)
    num_stages = fit_stages(x.device, num_stages, block_m, 2 * block_n, block_k, x.element_size())
    _paired_gemm_kernel[(grid,)](
        x,
        weight_descriptor(weight, block_n, block_k),
        out,
        positions,
        inv_freq,
        m,
        k,
        first_rows,
        x.stride(0),
        out.stride(0),
        EPILOGUE=epilogue,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=num_warps,
        num_stages=num_stages,
    )


def gate_up_silu_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    block_n: int = 128,
    block_k: int = 128,
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:
    """``silu(x @ gate.T) * (x @ up.T)`` for ``weight = [gate; up]`` (``[2 I, K]``) -> ``[M, I]``.

    Default tiles: the best of 18 at M = 32, I = 12,288, K = 4,096 on the H200 (50.8 us, cold weights,
    descriptor loads; ``block_n`` 64: 51.6 us; pointer loads at ``block_n`` 64: 51.2 us), 2026-11-24."""
    m = _check(x, weight)
    if weight.shape[0] % 2:
        raise ValueError(f"a gate|up weight has an even number of rows, got {weight.shape[0]}")
    inter = weight.shape[0] // 2
    out = torch.empty((m, inter), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    grid = triton.cdiv(inter, block_n)
    _launch(grid, x, weight, out, x, x, inter, _SILU_MUL.value, block_n, block_k, num_warps, num_stages)
    return out


def qkv_rope_supports(head_dim: int) -> bool:
    """Whether ``qkv_rope_triton`` takes heads of ``head_dim``: a power of two >= 32 (each half of a head is
    one column tile)."""
    return head_dim >= 32 and head_dim & (head_dim - 1) == 0


def qkv_rope_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    *,
    block_k: int = 256,
    num_warps: int = 8,
    num_stages: int = 3,
) -> torch.Tensor:
    """``x @ weight.T`` for a q|k|v weight ``[(H + 2 KVH) D, K]`` with q and k rotated (rotate-half RoPE
    over the whole head, ``inv_freq`` float32 ``[D / 2]``) by ``positions [M]`` -> ``[M, (H + 2 KVH) D]``.

    ``head_dim`` must be a power of two (>= 32): one program per head, each half a ``D / 2``-column tile.
    Default tiles: the best of 16 at M = 32, 96 heads of 128, K = 4,096 on the H200 (28.6 us, cold weights,
    descriptor loads; 4 warps: 30.0 us; pointer loads, 4 warps: 30.9 us), 2026-11-24.
    """
    m = _check(x, weight)
    heads = num_heads + 2 * num_kv_heads
    if weight.shape[0] != heads * head_dim:
        raise ValueError(f"a q|k|v weight of {heads} heads x {head_dim} has {heads * head_dim} rows")
    if not qkv_rope_supports(head_dim):
        raise ValueError(f"head_dim {head_dim} must be a power of two >= 32")
    if inv_freq.numel() != head_dim // 2 or inv_freq.dtype != torch.float32:
        raise ValueError(f"inv_freq must be float32 with head_dim / 2 = {head_dim // 2} entries")
    if positions.numel() != m:
        raise ValueError(f"positions has {positions.numel()} entries for {m} rows")
    out = torch.empty((m, heads * head_dim), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    rotated = num_heads + num_kv_heads
    positions, inv_freq = positions.reshape(-1), inv_freq.contiguous()
    _launch(
        heads,
        x,
        weight,
        out,
        positions,
        inv_freq,
        rotated,
        _ROPE.value,
        head_dim // 2,
        block_k,
        num_warps,
        num_stages,
    )
    return out


__all__ = [
    "gate_up_silu_reference",
    "gate_up_silu_triton",
    "qkv_rope_reference",
    "qkv_rope_supports",
    "qkv_rope_triton",
]
