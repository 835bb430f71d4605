"""Fused elementwise ops of a transformer layer: RoPE and SiLU-mul (RMSNorm is in ``fused_norm``).

Each op is one Triton launch instead of the handful of torch kernels its layer runs (casts, cat/neg, ...),
with no host synchronisation, so they can be captured in a CUDA graph. Each has a plain-torch reference
beside it with the exact math of the layer in ``diffulex.layers`` (which keeps its own torch code for CPU
tensors); the kernels follow the same order of operations and roundings:

* RoPE (rotate-half / NeoX, first ``rotary_dim`` channels): angles ``float32(position) * inv_freq`` in
  float32, ``out = x * cos + rotate_half(x) * sin`` in float32, cast back to the q/k dtype; the other
  channels are copied.
* SiLU-mul: ``silu(gate)`` in float32 rounded to the gate dtype, then multiplied by ``up`` (rounded).

Only the transcendental implementations differ from torch, so fp32 results agree to ~1e-6 and bf16
results to within one bf16 ulp. The wrapper helpers (``need_triton``, ``as_rows``) are shared with
:mod:`diffulex.kernels.fused_norm`.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is absent on some CPU-only platforms
    triton = None
    tl = None


# --------------------------------------------------------------------------------------------------------
# Torch references (the math of diffulex.layers, as functions)
# --------------------------------------------------------------------------------------------------------


def inverse_frequencies(
    rotary_dim: int, base: float, device: torch.device | str | None = None
) -> torch.Tensor:
    """``base ** (-2i / rotary_dim)`` in float32, as ``RotaryEmbedding`` builds them."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device) / rotary_dim
    return 1.0 / (float(base) ** exponents)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def rope_reference(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    rotary_dim: int,
    base: float = 10000.0,
    inv_freq: torch.Tensor | None = None,
    block_heads: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE of the first ``rotary_dim`` channels of ``q [T, H, D]`` and ``k [T, KVH, D]``."""
    if inv_freq is None:
        inv_freq = inverse_frequencies(rotary_dim, base, q.device)
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq
    angles = torch.cat((angles, angles), dim=-1).unsqueeze(1)
    cos, sin = angles.cos(), angles.sin()

    def rotate(x: torch.Tensor) -> torch.Tensor:
        rotated = x[..., :rotary_dim].float()
        rotated = rotated * cos + _rotate_half(rotated) * sin
        if rotary_dim == x.shape[-1]:
            return rotated.to(x.dtype)
        return torch.cat((rotated.to(x.dtype), x[..., rotary_dim:]), dim=-1)

    return rotate(q), rotate(k)


def silu_and_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``."""
    return torch.nn.functional.silu(gate) * up


# --------------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _rope_heads(
        src,
        dst,
        stride_h,
        stride_d,
        num_heads,
        D,
        HALF,
        cos,
        sin,
        BLOCK_H: tl.constexpr,
        BLOCK_HALF: tl.constexpr,
        HAS_PASS: tl.constexpr,
        BLOCK_PASS: tl.constexpr,
    ):
        """Rotate ``num_heads`` heads of one token: ``src`` strided, ``dst`` contiguous ``[num_heads, D]``."""
        h = tl.arange(0, BLOCK_H)[:, None]
        j = tl.arange(0, BLOCK_HALF)[None, :]
        m = (h < num_heads) & (j < HALF)
        x1 = tl.load(src + h * stride_h + j * stride_d, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(src + h * stride_h + (j + HALF) * stride_d, mask=m, other=0.0).to(tl.float32)
        # x * cos + rotate_half(x) * sin, rotate_half([x1, x2]) = [-x2, x1]
        o1 = x1 * cos + (-x2) * sin
        o2 = x2 * cos + x1 * sin
        tl.store(dst + h * D + j, o1.to(dst.dtype.element_ty), mask=m)
        tl.store(dst + h * D + j + HALF, o2.to(dst.dtype.element_ty), mask=m)
        if HAS_PASS:
            p = 2 * HALF + tl.arange(0, BLOCK_PASS)[None, :]
            pm = (h < num_heads) & (p < D)
            tl.store(dst + h * D + p, tl.load(src + h * stride_h + p * stride_d, mask=pm), mask=pm)

    @triton.jit
    def _rope_kernel(
        pos_ptr,
        inv_freq_ptr,
        q_ptr,
        k_ptr,
        q_out_ptr,
        k_out_ptr,
        stride_qt,
        stride_qh,
        stride_qd,
        stride_kt,
        stride_kh,
        stride_kd,
        H,
        KVH,
        D,
        HALF,
        Q_BLOCKS,
        BLOCK_HEADS: tl.constexpr,
        BLOCK_HALF: tl.constexpr,
        HAS_PASS: tl.constexpr,
        BLOCK_PASS: tl.constexpr,
    ):
        # Grid (tokens, head blocks): blocks [0, Q_BLOCKS) hold query heads, the rest key heads, so a
        # decode step's few tokens still spread over many programs (one program per token left most
        # SMs idle: 3.8 us per layer at 32 tokens x 64 heads on the H200).
        t = tl.program_id(0).to(tl.int64)
        block = tl.program_id(1)
        pos = tl.load(pos_ptr + t).to(tl.float32)
        j = tl.arange(0, BLOCK_HALF)
        inv_freq = tl.load(inv_freq_ptr + j, mask=j < HALF, other=0.0)
        angles = pos * inv_freq
        cos = tl.cos(angles)[None, :]
        sin = tl.sin(angles)[None, :]
        if block < Q_BLOCKS:
            first = block * BLOCK_HEADS
            src = q_ptr + t * stride_qt + first * stride_qh
            dst = q_out_ptr + (t * H + first) * D
            stride_h, stride_d, count = stride_qh, stride_qd, H - first
        else:
            first = (block - Q_BLOCKS) * BLOCK_HEADS
            src = k_ptr + t * stride_kt + first * stride_kh
            dst = k_out_ptr + (t * KVH + first) * D
            stride_h, stride_d, count = stride_kh, stride_kd, KVH - first
        _rope_heads(
            src,
            dst,
            stride_h,
            stride_d,
            count,
            D,
            HALF,
            cos,
            sin,
            BLOCK_HEADS,
            BLOCK_HALF,
            HAS_PASS,
            BLOCK_PASS,
        )

    @triton.jit
    def _silu_and_mul_kernel(
        gate_ptr,
        up_ptr,
        out_ptr,
        stride_gate,
        stride_up,
        stride_out,
        N,
        BLOCK_N: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = cols < N
        g = tl.load(gate_ptr + row * stride_gate + cols, mask=mask, other=0.0)
        u = tl.load(up_ptr + row * stride_up + cols, mask=mask, other=0.0)
        g32 = g.to(tl.float32)
        act = (g32 / (1.0 + tl.exp(-g32))).to(g.dtype)  # F.silu: float32 math, rounded to the gate dtype
        out = act.to(tl.float32) * u.to(tl.float32)
        tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------------
# Wrappers
# --------------------------------------------------------------------------------------------------------


def need_triton() -> None:
    if triton is None:
        raise RuntimeError("the fused Triton ops need triton")


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[rows, last]`` with a unit column stride (a view where possible)."""
    if x.dim() == 0 or x.stride(-1) != 1:
        x = x.contiguous()
    return x.reshape(-1, x.shape[-1])


def rope_triton(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    rotary_dim: int,
    base: float = 10000.0,
    inv_freq: torch.Tensor | None = None,
    block_heads: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE: new contiguous ``q [T, H, D]``, ``k [T, KVH, D]`` (inputs may be strided views).

    ``inv_freq`` (float32, ``[rotary_dim / 2]``) defaults to ``base ** (-2i / rotary_dim)``. One program
    per (token, block of ``block_heads`` q or k heads); ``block_heads`` defaults to 8.
    """
    need_triton()
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q [T, H, D] and k [T, KVH, D] expected, got {tuple(q.shape)}, {tuple(k.shape)}")
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if rotary_dim % 2 != 0 or not 0 < rotary_dim <= head_dim:
        raise ValueError(f"rotary_dim {rotary_dim} must be even and in (0, head_dim={head_dim}]")
    half = rotary_dim // 2
    if inv_freq is None:
        inv_freq = inverse_frequencies(rotary_dim, base, q.device)
    inv_freq = inv_freq.to(torch.float32).contiguous()
    if inv_freq.numel() != half:
        raise ValueError(f"inv_freq must have rotary_dim / 2 = {half} entries, got {inv_freq.numel()}")
    positions = positions.reshape(-1)
    if positions.numel() != num_tokens:
        raise ValueError(f"positions has {positions.numel()} entries for {num_tokens} tokens")
    q_out = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
    k_out = torch.empty((num_tokens, num_kv_heads, head_dim), dtype=k.dtype, device=k.device)
    if num_tokens == 0:
        return q_out, k_out
    pass_dim = head_dim - rotary_dim
    block_half = triton.next_power_of_2(half)
    block_heads = triton.next_power_of_2(max(1, min(block_heads, max(num_heads, num_kv_heads))))
    q_blocks = triton.cdiv(num_heads, block_heads)
    k_blocks = triton.cdiv(num_kv_heads, block_heads)
    _rope_kernel[(num_tokens, q_blocks + k_blocks)](
        positions,
        inv_freq,
        q,
        k,
        q_out,
        k_out,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        num_heads,
        num_kv_heads,
        head_dim,
        half,
        q_blocks,
        BLOCK_HEADS=block_heads,
        BLOCK_HALF=block_half,
        HAS_PASS=pass_dim > 0,
        BLOCK_PASS=triton.next_power_of_2(max(pass_dim, 1)),
        num_warps=4 if block_heads * block_half >= 1024 else 1,
    )
    return q_out, k_out


def silu_and_mul_triton(gate: torch.Tensor, up: torch.Tensor, block_n: int = 1024) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate``/``up`` of one shape ``[..., N]`` (rows may be strided)."""
    need_triton()
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have one shape")
    n = gate.shape[-1]
    out = torch.empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    g2, u2 = as_rows(gate), as_rows(up)
    rows = g2.shape[0]
    if rows == 0 or n == 0:
        return out
    out2 = out.view(-1, n)
    block_n = min(block_n, triton.next_power_of_2(n))
    _silu_and_mul_kernel[(rows, triton.cdiv(n, block_n))](
        g2,
        u2,
        out2,
        g2.stride(0),
        u2.stride(0),
        out2.stride(0),
        n,
        BLOCK_N=block_n,
        num_warps=4 if block_n >= 512 else 1,
    )
    return out
