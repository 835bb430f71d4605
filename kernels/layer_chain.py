"""One persistent kernel for everything between two attention calls of a batch-1 denoise step (Triton).

A batch-1 step multiplies 32 rows by every weight: its time is the time to stream the weights. Run as one
kernel per op, each of the four projections of a layer pays a ramp-up and a drain of a few microseconds
(measured: the layer GEMMs back to back reach 1.23x their weight-read floor, docs/perf-notes.md), and the
two RMSNorms between them are kernels of their own. Here one launch of ``P`` programs (at most one per
SM, all resident at once) walks the phases

1. ``h = x @ Wo.T + residual``                       (attention output projection, residual add)
2. ``a = silu(n1 @ Wg.T) * (n1 @ Wu.T)``, ``n1 = rms_norm(h) * w_ff``   (gate|up, SwiGLU)
3. ``h2 = a @ Wd.T + h``                             (down projection, residual add)
4. ``q|k|v = n2 @ Wqkv.T`` with RoPE on q and k, ``n2 = rms_norm(h2) * w_attn``  (the next layer's
   projection; left out after the last layer)

with a grid barrier (an arrival counter) between phases. Every phase's column tiles are dealt out
round-robin so each program streams the same number of weight bytes (one software-pipelined K loop per
tile). A residual-add phase also writes, per column tile, the sum of squares of the rows it produced (as
rounded for storage); after the barrier a short norm pass adds those partials in a fixed order and writes
the normalised rows, rounding exactly where ``diffulex.layers.norm.RMSNorm`` does, and a second barrier
hands them to the next projection. Deterministic: no float atomics.

EXPERIMENT (docs/perf-notes.md, 2026-11-24): on the H200 this kernel streams slower than the per-op
kernels it replaces (4.65 vs 4.06 ms for 32 layers), so nothing calls it.

The barrier needs every program resident at once: ``programs`` must not exceed the SM count (each
program fits one SM). Under ``TRITON_INTERPRET=1`` programs run one after another, so tests use
``programs=1``. ``layer_chain_reference`` is the unfused torch computation it is tested against.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from diffulex.kernels.fused_norm import add_rms_norm_reference
from diffulex.kernels.skinny_gemm import skinny_gemm_reference
from diffulex.kernels.skinny_gemm_fused import gate_up_silu_reference, qkv_rope_reference

MAX_ROWS = 32  # one 32-token denoise block; more rows are cuBLAS work

_RESIDUAL = tl.constexpr(0)
_SILU_MUL = tl.constexpr(1)
_ROPE = tl.constexpr(2)


@triton.jit
def _grid_sync(sync_ptr, target):
    """Wait until ``target`` arrivals (all programs of this and every earlier barrier) are counted."""
    tl.debug_barrier()  # every thread's stores of this phase are issued before the arrival
    tl.atomic_add(sync_ptr, 1, sem="release", scope="gpu")
    while tl.load(sync_ptr, volatile=True) < target:
        pass
    tl.atomic_add(sync_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _phase(
    x_ptr,
    stride_x,
    w_ptr,
    K,
    out_ptr,
    stride_o,
    res_ptr,  # _RESIDUAL: the residual stream read (may alias out_ptr: each tile reads its own columns)
    ss_out_ptr,  # _RESIDUAL: [tiles, BLOCK_M] fp32 sums of squares per column tile
    pos_ptr,  # _ROPE: [M] positions
    inv_freq_ptr,  # _ROPE: [HALF] inverse frequencies
    pair_offset,  # _SILU_MUL: rows before the up block; _ROPE: heads that rotate
    M,
    tiles,
    pid,
    P: tl.constexpr,
    EPILOGUE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HALF: tl.constexpr,
    STAGES: tl.constexpr,
):
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_valid = offs_m < M
    dtype = out_ptr.dtype.element_ty
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_x
    for tile in range(pid, tiles, P):
        if EPILOGUE == _RESIDUAL:
            row_1 = tile * BLOCK_N + offs_n
            row_2 = row_1
        elif EPILOGUE == _SILU_MUL:
            row_1 = tile * BLOCK_N + offs_n
            row_2 = pair_offset + row_1
        else:
            head = tile // (HALF // BLOCK_N)
            row_1 = head * 2 * HALF + (tile % (HALF // BLOCK_N)) * BLOCK_N + offs_n
            row_2 = row_1 + HALF
        w_1 = w_ptr + row_1[:, None].to(tl.int64) * K + offs_k[None, :]
        w_2 = w_ptr + row_2[:, None].to(tl.int64) * K + offs_k[None, :]
        acc_1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for kk in tl.range(0, K, BLOCK_K, num_stages=STAGES):
            x = tl.load(
                x_rows + (kk + offs_k)[None, :], mask=m_valid[:, None], other=0.0, cache_modifier=".cg"
            )
            acc_1 += tl.dot(x, tl.trans(tl.load(w_1 + kk)))
            if EPILOGUE != _RESIDUAL:
                acc_2 += tl.dot(x, tl.trans(tl.load(w_2 + kk)))
        mask = m_valid[:, None]
        out_rows = out_ptr + offs_m[:, None].to(tl.int64) * stride_o
        first = acc_1.to(dtype).to(tl.float32)
        if EPILOGUE == _RESIDUAL:
            res = tl.load(
                res_ptr + offs_m[:, None].to(tl.int64) * stride_o + row_1[None, :],
                mask=mask,
                other=0.0,
                cache_modifier=".cg",
            )
            total = (first + res.to(tl.float32)).to(dtype)
            tl.store(out_rows + row_1[None, :], total, mask=mask)
            squares = total.to(tl.float32)
            tl.store(ss_out_ptr + tile * BLOCK_M + offs_m, tl.sum(squares * squares, axis=1))
        elif EPILOGUE == _SILU_MUL:
            second = acc_2.to(dtype).to(tl.float32)
            act = (first / (1.0 + tl.exp(-first))).to(dtype).to(tl.float32)  # F.silu, rounded
            tl.store(out_rows + row_1[None, :], (act * second).to(dtype), mask=mask)
        else:
            second = acc_2.to(dtype).to(tl.float32)
            if head < pair_offset:  # a q or k head: x * cos + rotate_half(x) * sin
                pos = tl.load(pos_ptr + offs_m, mask=m_valid, other=0).to(tl.float32)
                freq = tl.load(inv_freq_ptr + (tile % (HALF // BLOCK_N)) * BLOCK_N + offs_n)
                angles = pos[:, None] * freq[None, :]
                cos = tl.cos(angles)
                sin = tl.sin(angles)
                rotated = first * cos - second * sin
                second = second * cos + first * sin
                first = rotated
            tl.store(out_rows + row_1[None, :], first.to(dtype), mask=mask)
            tl.store(out_rows + row_2[None, :], second.to(dtype), mask=mask)


@triton.jit
def _norm_pass(
    h_ptr,
    ss_ptr,  # [NT, BLOCK_M] sums of squares per column tile of h
    w_ptr,
    out_ptr,
    hidden,
    eps,
    M,
    pid,
    NT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    COLS: tl.constexpr,
):
    """``out = rms_norm(h) * w`` for this program's ``COLS`` columns, rounded as ``RMSNorm`` rounds."""
    offs_m = tl.arange(0, BLOCK_M)
    m_valid = offs_m < M
    partials = tl.load(ss_ptr + tl.arange(0, NT)[:, None] * BLOCK_M + offs_m[None, :], cache_modifier=".cg")
    inv_rms = tl.rsqrt(tl.sum(partials, axis=0) / hidden + eps)
    cols = pid * COLS + tl.arange(0, COLS)
    offs = offs_m[:, None] * hidden + cols[None, :]
    h = tl.load(h_ptr + offs, mask=m_valid[:, None], other=0.0, cache_modifier=".cg")
    dtype = h_ptr.dtype.element_ty
    normed = (h.to(tl.float32) * inv_rms[:, None]).to(dtype).to(tl.float32)
    weight = tl.load(w_ptr + cols).to(tl.float32)
    tl.store(out_ptr + offs, (normed * weight[None, :]).to(dtype), mask=m_valid[:, None])


@triton.jit
def _layer_chain_kernel(
    attn_ptr,
    residual_ptr,  # in: the residual stream before this layer's attention output is added
    h_ptr,  # out: residual after attention ([M, hidden])
    normed_ptr,  # scratch: a normalised residual ([M, hidden])
    act_ptr,  # scratch: SwiGLU activations [M, inter]
    h2_ptr,  # out: residual after the MLP ([M, hidden])
    qkv_ptr,  # out (HAS_QKV): the next layer's rotated q|k|v [M, qkv_rows]
    wo_ptr,
    wgu_ptr,
    wd_ptr,
    wqkv_ptr,
    ff_norm_ptr,
    attn_norm_ptr,
    ss_ptr,  # scratch: [2, hidden / BN_RES, BLOCK_M] fp32
    sync_ptr,  # int32 arrival counter, zero between launches
    pos_ptr,
    inv_freq_ptr,
    M,
    stride_attn,
    hidden,
    inter,
    qkv_tiles,
    rot_heads,
    eps,
    P: tl.constexpr,
    HAS_QKV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BN_RES: tl.constexpr,
    BN_GU: tl.constexpr,
    BN_QKV: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HALF: tl.constexpr,
    NT_RES: tl.constexpr,
    NORM_COLS: tl.constexpr,
    STAGES_RES: tl.constexpr,
    STAGES_PAIR: tl.constexpr,
):
    pid = tl.program_id(0)
    ss_2 = ss_ptr + NT_RES * BLOCK_M
    _phase(attn_ptr, stride_attn, wo_ptr, hidden, h_ptr, hidden, residual_ptr, ss_ptr, pos_ptr, inv_freq_ptr,
           0, M, NT_RES, pid, P, _RESIDUAL, BLOCK_M, BN_RES, BLOCK_K, HALF, STAGES_RES)  # fmt: skip
    _grid_sync(sync_ptr, P)
    if pid * NORM_COLS < hidden:
        _norm_pass(h_ptr, ss_ptr, ff_norm_ptr, normed_ptr, hidden, eps, M, pid, NT_RES, BLOCK_M, NORM_COLS)
    _grid_sync(sync_ptr, 2 * P)
    _phase(normed_ptr, hidden, wgu_ptr, hidden, act_ptr, inter, h_ptr, ss_ptr, pos_ptr, inv_freq_ptr,
           inter, M, inter // BN_GU, pid, P, _SILU_MUL, BLOCK_M, BN_GU, BLOCK_K, HALF, STAGES_PAIR)  # fmt: skip
    _grid_sync(sync_ptr, 3 * P)
    _phase(act_ptr, inter, wd_ptr, inter, h2_ptr, hidden, h_ptr, ss_2, pos_ptr, inv_freq_ptr,
           0, M, NT_RES, pid, P, _RESIDUAL, BLOCK_M, BN_RES, BLOCK_K, HALF, STAGES_RES)  # fmt: skip
    if HAS_QKV:
        _grid_sync(sync_ptr, 4 * P)
        if pid * NORM_COLS < hidden:
            _norm_pass(
                h2_ptr, ss_2, attn_norm_ptr, normed_ptr, hidden, eps, M, pid, NT_RES, BLOCK_M, NORM_COLS
            )
        _grid_sync(sync_ptr, 5 * P)
        _phase(normed_ptr, hidden, wqkv_ptr, hidden, qkv_ptr, qkv_tiles * 2 * BN_QKV, h2_ptr, ss_ptr, pos_ptr,
               inv_freq_ptr, rot_heads, M, qkv_tiles, pid, P, _ROPE, BLOCK_M, BN_QKV, BLOCK_K, HALF,
               STAGES_PAIR)  # fmt: skip
        arrivals = 6 * P
    else:
        arrivals = 4 * P
    # Every program has left every barrier once it arrives here: the last one re-arms the counter.
    if tl.atomic_add(sync_ptr, 1, sem="acq_rel", scope="gpu") == arrivals - 1:
        tl.atomic_xchg(sync_ptr, 0)


def layer_chain_reference(
    attn: torch.Tensor,
    residual: torch.Tensor,
    wo: torch.Tensor,
    wgu: torch.Tensor,
    wd: torch.Tensor,
    ff_norm: torch.Tensor,
    eps: float,
    next_layer: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The unfused ops: ``(h2, qkv)`` (``qkv`` None without ``next_layer``); ``next_layer`` is
    ``(wqkv, attn_norm, positions, inv_freq, num_heads, num_kv_heads, head_dim)``."""
    normed, h = add_rms_norm_reference(skinny_gemm_reference(attn, wo), residual, ff_norm, eps)
    down = skinny_gemm_reference(gate_up_silu_reference(normed, wgu), wd)
    if next_layer is None:
        return down + h, None
    wqkv, attn_norm, positions, inv_freq, num_heads, num_kv_heads, head_dim = next_layer
    normed, h2 = add_rms_norm_reference(down, h, attn_norm, eps)
    qkv = qkv_rope_reference(normed, wqkv, positions, inv_freq, num_heads, num_kv_heads, head_dim)
    return h2, qkv


# Arrival counters per device; never freed (a captured graph keeps the memory it was captured with).
_SYNC: dict[torch.device, torch.Tensor] = {}


def _sync_counter(device: torch.device) -> torch.Tensor:
    if device not in _SYNC:
        _SYNC[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return _SYNC[device]


_RESIDENT_OK: set[tuple] = set()


def _check_resident(args: tuple, constants: dict, device: torch.device) -> None:
    """Raise unless all ``P`` programs fit on the GPU at once (else the first grid barrier waits forever):
    programs per SM from the compiled kernel's registers, shared memory and warps."""
    key = (device, tuple(sorted(constants.items())))
    if key in _RESIDENT_OK:
        return
    compiled = _layer_chain_kernel.warmup(*args, grid=(constants["P"],), **constants)
    compiled._init_handles()
    props = torch.cuda.get_device_properties(device)
    threads = constants["num_warps"] * 32
    # (older torch builds lack some fields: the Hopper values stand in)
    by_regs = getattr(props, "regs_per_multiprocessor", 65536) // max(1, compiled.n_regs * threads)
    smem = getattr(props, "shared_memory_per_multiprocessor", 233472)
    by_smem = smem // (compiled.metadata.shared + 1024)
    by_threads = getattr(props, "max_threads_per_multi_processor", 2048) // threads
    per_sm = min(by_regs, by_smem, by_threads)
    if constants["P"] > per_sm * props.multi_processor_count:
        raise ValueError(
            f"layer_chain_triton: {constants['P']} programs cannot all be resident ({per_sm} per SM x "
            f"{props.multi_processor_count} SMs: {compiled.n_regs} registers, "
            f"{compiled.metadata.shared} B shared memory per program); use fewer programs or stages"
        )
    _RESIDENT_OK.add(key)


def default_programs(device: torch.device) -> int:
    """One program per SM, rounded down to a multiple of 32 so the LLaDA-8B phases (128 / 384 column
    tiles) deal out evenly: 128 on the H200's 132 SMs."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, sms // 32 * 32)


def layer_chain_triton(
    attn: torch.Tensor,
    residual: torch.Tensor,
    wo: torch.Tensor,
    wgu: torch.Tensor,
    wd: torch.Tensor,
    ff_norm: torch.Tensor,
    eps: float,
    next_layer: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int, int] | None = None,
    *,
    programs: int | None = None,
    block_n: int = 32,
    block_n_qkv: int = 16,
    block_k: int = 256,
    num_warps: int = 4,
    stages_residual: int = 5,
    stages_paired: int = 4,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``layer_chain_reference`` in one persistent launch (module docstring): ``attn [M, H D]`` (rows may
    be strided), ``residual [M, hidden]``, ``wo [hidden, H D]``, ``wgu [2 inter, hidden]`` (gate rows then
    up rows), ``wd [hidden, inter]``, norm weights ``[hidden]``."""
    m = attn.shape[0]
    hidden, inter = wd.shape
    if m > MAX_ROWS:
        raise ValueError(f"layer_chain_triton takes at most {MAX_ROWS} rows, got {m}")
    if (
        wo.shape != (hidden, attn.shape[1])
        or wgu.shape != (2 * inter, hidden)
        or residual.shape != (m, hidden)
    ):
        raise ValueError(
            f"shapes do not chain: attn {tuple(attn.shape)}, residual {tuple(residual.shape)}, "
            f"wo {tuple(wo.shape)}, wgu {tuple(wgu.shape)}, wd {tuple(wd.shape)}"
        )
    if wo.shape[1] != hidden:
        raise ValueError(f"the attention output width {wo.shape[1]} must equal hidden {hidden}")
    tiles_res = hidden // block_n
    if hidden % block_n or inter % block_n or hidden % block_k or inter % block_k:
        raise ValueError(f"hidden {hidden} and inter {inter} must be multiples of {block_n} and {block_k}")
    if tiles_res & (tiles_res - 1):
        raise ValueError(f"hidden / block_n = {tiles_res} must be a power of two")
    device = attn.device
    programs = programs or default_programs(device)
    norm_cols = triton.next_power_of_2(triton.cdiv(hidden, programs))  # the norm pass's columns per program
    if hidden % norm_cols:
        raise ValueError(
            f"hidden {hidden} must be a multiple of {norm_cols} (columns per program of the norm)"
        )
    dtype = attn.dtype
    h = torch.empty((m, hidden), dtype=dtype, device=device)
    normed = torch.empty((m, hidden), dtype=dtype, device=device)
    h2 = torch.empty((m, hidden), dtype=dtype, device=device)
    act = torch.empty((m, inter), dtype=dtype, device=device)
    ss = torch.empty((2, tiles_res, MAX_ROWS), dtype=torch.float32, device=device)
    if next_layer is not None:
        wqkv, attn_norm, positions, inv_freq, num_heads, num_kv_heads, head_dim = next_layer
        heads = num_heads + 2 * num_kv_heads
        if wqkv.shape != (heads * head_dim, hidden):
            raise ValueError(f"wqkv must be [{heads * head_dim}, {hidden}], got {tuple(wqkv.shape)}")
        if (head_dim // 2) % block_n_qkv:
            raise ValueError(f"half a head ({head_dim // 2}) must be a multiple of {block_n_qkv}")
        qkv = torch.empty((m, heads * head_dim), dtype=dtype, device=device)
        qkv_tiles = heads * (head_dim // 2 // block_n_qkv)
        rot_heads, half = num_heads + num_kv_heads, head_dim // 2
        positions, inv_freq = positions.reshape(-1), inv_freq.contiguous()
    else:
        wqkv, attn_norm, positions, inv_freq, qkv = wo, ff_norm, h, ff_norm, None
        qkv_tiles, rot_heads, half = 0, 0, block_n_qkv
    if m == 0:
        return h2, qkv
    args = (
        attn, residual, h, normed, act, h2, qkv if qkv is not None else h2,
        wo, wgu, wd, wqkv, ff_norm, attn_norm, ss, _sync_counter(device), positions, inv_freq,
        m, attn.stride(0), hidden, inter, qkv_tiles, rot_heads, eps,
    )  # fmt: skip
    constants = dict(
        P=programs, HAS_QKV=qkv is not None, BLOCK_M=MAX_ROWS, BN_RES=block_n, BN_GU=block_n,
        BN_QKV=block_n_qkv, BLOCK_K=block_k, HALF=half, NT_RES=tiles_res, NORM_COLS=norm_cols,
        STAGES_RES=stages_residual, STAGES_PAIR=stages_paired, num_warps=num_warps,
    )  # fmt: skip
    if device.type == "cuda":
        _check_resident(args, constants, device)
    _layer_chain_kernel[(programs,)](*args, **constants)
    return h2, qkv


__all__ = ["MAX_ROWS", "default_programs", "layer_chain_reference", "layer_chain_triton"]
