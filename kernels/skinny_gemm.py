"""Skinny GEMM ``x [M, K] @ weight[N, K].T`` for the few query rows of a decode step (Triton).

A batch-1 denoise step multiplies 32-64 rows by every weight matrix: the time is the time to stream the
weights from HBM, and what matters is keeping every SM's loads in flight to the end. The grid is
``(cdiv(N, BLOCK_N), SPLIT_K)``: each program reads a ``[BLOCK_N, K / SPLIT_K]`` slab of the weight in
``BLOCK_K`` steps (software-pipelined ``num_stages`` deep) against the whole of ``x`` (``BLOCK_M`` rows,
read from L2). With ``SPLIT_K`` > 1 each split writes an fp32 partial; the split that arrives last for
its column tile (an arrival counter per tile) sums the partials in split order and writes the output, so
the result is deterministic and needs no second launch; the counter is re-armed for the next launch, so
the kernel replays from a CUDA graph.

``skinny_gemm_reference`` is the plain torch computation (fp32 accumulation) it is tested against.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_ROWS = 64  # larger M: cuBLAS's tiled GEMMs are the right tool


def skinny_gemm_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` accumulated in fp32, returned in ``x``'s dtype."""
    return (x.float() @ weight.float().t()).to(x.dtype)


@triton.jit
def _skinny_gemm_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    part_ptr,  # [SPLIT_K, M, N] fp32 partials (split path)
    counter_ptr,  # int32 arrivals per column tile, zero between launches (split path)
    M,
    N,
    K,
    k_per_split,  # a multiple of BLOCK_K
    stride_xm,
    stride_wn,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    tile_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_valid = offs_m < M
    n_valid = offs_n < N
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        k_valid = (k + offs_k) < k_hi
        x = tl.load(x_rows + (k + offs_k)[None, :], mask=m_valid[:, None] & k_valid[None, :], other=0.0)
        w = tl.load(w_rows + (k + offs_k)[None, :], mask=n_valid[:, None] & k_valid[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(w))
    out_mask = m_valid[:, None] & n_valid[None, :]
    out_offs = offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        part_offs = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        tl.store(part_ptr + split * M * N + part_offs, acc, mask=out_mask)
        tl.debug_barrier()  # every thread's partial is issued before the arrival is published
        arrived = tl.atomic_add(counter_ptr + tile_n, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for other in range(SPLIT_K):  # split order: the same bits whichever split came last
                total += tl.load(
                    part_ptr + other * M * N + part_offs, mask=out_mask, other=0.0, cache_modifier=".cg"
                )
            tl.store(out_ptr + out_offs, total.to(out_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(counter_ptr + tile_n, 0)


# Arrival counters per device; never freed (a captured graph keeps the memory it was captured with).
_COUNTERS: dict[torch.device, list[torch.Tensor]] = {}


def _counters(device: torch.device, count: int) -> torch.Tensor:
    buffers = _COUNTERS.setdefault(device, [])
    if not buffers or buffers[-1].numel() < count:
        buffers.append(torch.zeros(max(count, 4096), dtype=torch.int32, device=device))
    return buffers[-1]


def default_config(m: int, n: int, k: int, sm_count: int = 132) -> dict[str, int]:
    """Tile sizes and split count, a rule read off the M = 32 sweep of ``scripts/bench_gemm.py --sweep``
    (H200, LLaDA-8B projections, 2026-11-24): the narrowest column tile (32, 64 or 128) that keeps the
    grid within about three programs per SM; a second K split only when that still leaves fewer than
    ~1.5 programs per SM over a long K (the 4,096 x 12,288 down projection); deeper pipelining for the
    narrow tiles. Measured there: 12.8 / 29.5 / 242 us for the 4,096 x 4,096, 4,096 x 12,288 and
    126,464 x 4,096 weights against cuBLAS's 13.9 / 30.2 / 251 us."""
    block_n = 32
    while triton.cdiv(n, block_n) > 3 * sm_count and block_n < 128:
        block_n *= 2
    tiles = triton.cdiv(n, block_n)
    split_k = 2 if 2 * tiles < 3 * sm_count and k >= 8192 else 1
    num_stages = 5 if block_n == 32 else 3
    return {"block_n": block_n, "block_k": 128, "split_k": split_k, "num_warps": 4, "num_stages": num_stages}


def skinny_gemm_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    block_n: int | None = None,
    block_k: int | None = None,
    split_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """``x [M, K] @ weight[N, K].T`` for M <= ``MAX_ROWS`` (see module docstring); tiles default to
    :func:`default_config` and can be overridden one by one."""
    m, k = x.shape
    n, k_w = weight.shape
    if k != k_w:
        raise ValueError(f"x has {k} columns but weight has {k_w}")
    if m > MAX_ROWS:
        raise ValueError(f"skinny_gemm_triton takes at most {MAX_ROWS} rows, got {m}")
    if x.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError("x and weight must be contiguous in their last dimension")
    config = default_config(m, n, k)
    block_n = block_n or config["block_n"]
    block_k = block_k or config["block_k"]
    split_k = split_k or config["split_k"]
    num_warps = num_warps or config["num_warps"]
    num_stages = num_stages or config["num_stages"]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    tiles = triton.cdiv(n, block_n)
    if split_k > 1:
        partials = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
        counters = _counters(x.device, tiles)
    else:
        partials = counters = out  # unused
    _skinny_gemm_kernel[(tiles, split_k)](
        x,
        weight,
        out,
        partials,
        counters,
        m,
        n,
        k,
        k_per_split,
        x.stride(0),
        weight.stride(0),
        out.stride(0),
        BLOCK_M=max(16, triton.next_power_of_2(m)),
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        SPLIT_K=split_k,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


__all__ = ["MAX_ROWS", "default_config", "skinny_gemm_reference", "skinny_gemm_triton"]
