"""Skinny GEMM ``x [M, K] @ weight[N, K].T`` for the few query rows of a decode step (Triton).

A batch-1 denoise step multiplies 32-64 rows by every weight matrix: the time is the time to stream the
weights from HBM, and what matters is keeping every SM's loads in flight to the end. The grid is
``(cdiv(N, BLOCK_N), SPLIT_K)``: each program reads a ``[BLOCK_N, K / SPLIT_K]`` slab of the weight in
``BLOCK_K`` steps (software-pipelined ``num_stages`` deep) against the whole of ``x`` (``BLOCK_M`` rows,
read from L2). Weight tiles are loaded through a tensor descriptor (the copy engine on Hopper, TMA): one
instruction per tile instead of one per thread and 16 bytes, and rows or columns past the end read as
zeros, so the weight needs 16-byte aligned rows (``descriptor_compatible``). With ``SPLIT_K`` > 1 each
split writes an fp32 partial; the split that arrives last for its column tile (an arrival counter per
tile) sums the partials in split order and writes the output, so the result is deterministic and needs
no second launch; the counter is re-armed for the next launch, so the kernel replays from a CUDA graph.

``skinny_gemm_reference`` is the plain torch computation (fp32 accumulation) it is tested against.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

MAX_ROWS = 64  # larger M: cuBLAS's tiled GEMMs are the right tool


def skinny_gemm_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` accumulated in fp32, returned in ``x``'s dtype."""
    return (x.float() @ weight.float().t()).to(x.dtype)


@triton.jit
def _skinny_gemm_kernel(
    x_ptr,
    w_desc,  # tensor descriptor of the [N, K] weight, block [BLOCK_N, BLOCK_K]
    out_ptr,
    part_ptr,  # [SPLIT_K, M, N] fp32 partials (split path)
    counter_ptr,  # int32 arrivals per column tile, zero between launches (split path)
    M,
    N,
    K,
    k_per_split,  # a multiple of BLOCK_K: a split never reads into the next one's columns
    stride_xm,
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
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        k_valid = (k + offs_k) < k_hi
        x = tl.load(x_rows + (k + offs_k)[None, :], mask=m_valid[:, None] & k_valid[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(w_desc.load([tile_n * BLOCK_N, k])))
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


def descriptor_compatible(weight: torch.Tensor) -> bool:
    """Whether a tensor descriptor can address ``weight``: a contiguous last dimension and 16-byte
    aligned start and rows."""
    return (
        weight.dim() == 2
        and weight.stride(-1) == 1
        and weight.data_ptr() % 16 == 0
        and weight.stride(0) * weight.element_size() % 16 == 0
    )


def weight_descriptor(weight: torch.Tensor, block_n: int, block_k: int) -> TensorDescriptor:
    """The ``[block_n, block_k]``-tile descriptor of ``weight`` the skinny GEMM kernels load through."""
    if not descriptor_compatible(weight):
        raise ValueError(
            f"the weight ({tuple(weight.shape)}, strides {weight.stride()}) needs a contiguous last "
            "dimension and 16-byte aligned rows for the skinny GEMMs"
        )
    return TensorDescriptor.from_tensor(weight, [block_n, block_k])


def default_config(m: int, n: int, k: int, sm_count: int = 132) -> dict[str, int]:
    """Tile sizes and split count, a rule read off the M = 32 sweeps of the LLaDA-8B projections (H200,
    cold weights, 2026-11-24; descriptor loads): the narrowest column tile (32, 64 or 128) that keeps the
    grid within about three programs per SM, 256-column K steps, no K split (with descriptor loads the
    4,096 x 12,288 down projection streams as fast unsplit: 29.4-29.6 vs 29.9 us), four stages (fewer
    where shared memory runs out, see ``fit_stages``). Measured: 12.6 / 29.6 us for the 4,096 x 4,096 and
    4,096 x 12,288 weights (pointer loads with the previous rule: 13.2 / 29.9 us)."""
    block_n = 32
    while triton.cdiv(n, block_n) > 3 * sm_count and block_n < 128:
        block_n *= 2
    return {"block_n": block_n, "block_k": 256, "split_k": 1, "num_warps": 4, "num_stages": 4}


def block_rows(m: int) -> int:
    """Rows of the x tile (``BLOCK_M``) the skinny GEMM kernels use for ``m`` rows: the next power of two,
    at least 16 (the smallest dot)."""
    return max(16, triton.next_power_of_2(m))


def fit_stages(
    device: torch.device, stages: int, block_m: int, block_n: int, block_k: int, itemsize: int
) -> int:
    """``stages`` or fewer: as many as fit in one program's shared memory on ``device``. Triton's pipeline
    of ``stages`` keeps ``stages - 1`` tiles of x (``block_m`` rows) and weight (``block_n`` rows, all
    weight tiles of a program together) by ``block_k`` in flight; the epilogue's fp32 layout change of the
    ``[block_m, block_n]`` accumulators and 8 KB of slack are kept free."""
    per_stage = (block_m + block_n) * block_k * itemsize
    reserved = block_m * block_n * 4 + 8192
    return max(1, min(stages, 1 + (_shared_memory(device) - reserved) // per_stage))


_SHARED: dict[torch.device, int] = {}


def _shared_memory(device: torch.device) -> int:
    """Bytes of shared memory one program may use (opt-in maximum; 99 KB off the GPU, e.g. under the
    interpreter)."""
    if device not in _SHARED:
        props = torch.cuda.get_device_properties(device) if device.type == "cuda" else None
        _SHARED[device] = int(getattr(props, "shared_memory_per_block_optin", 0) or 101376)
    return _SHARED[device]


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
    if x.stride(-1) != 1:
        raise ValueError("x must be contiguous in its last dimension")
    config = default_config(m, n, k)
    block_n = block_n or config["block_n"]
    block_k = block_k or config["block_k"]
    split_k = split_k or config["split_k"]
    num_warps = num_warps or config["num_warps"]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    block_m = block_rows(m)
    stages = fit_stages(
        x.device, num_stages or config["num_stages"], block_m, block_n, block_k, x.element_size()
    )
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    tiles = triton.cdiv(n, block_n)
    if split_k > 1:
        partials = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
        counters = _counters(x.device, tiles)
    else:
        partials = counters = out  # unused
    _skinny_gemm_kernel[(tiles, split_k)](
        x,
        weight_descriptor(weight, block_n, block_k),
        out,
        partials,
        counters,
        m,
        n,
        k,
        k_per_split,
        x.stride(0),
        out.stride(0),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        SPLIT_K=split_k,
        num_warps=num_warps,
        num_stages=stages,
    )
    return out


__all__ = [
    "MAX_ROWS",
    "block_rows",
    "default_config",
    "descriptor_compatible",
    "fit_stages",
    "skinny_gemm_reference",
    "skinny_gemm_triton",
    "weight_descriptor",
]
