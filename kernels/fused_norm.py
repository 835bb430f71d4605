"""Fused RMSNorm and residual-add + RMSNorm of a transformer layer, each with a plain-torch reference.

The norm half of the fused elementwise ops (RoPE and SiLU-mul are in :mod:`diffulex.kernels.fused_ops`,
which also holds the wrapper helpers shared by both). Each op is one Triton launch instead of the handful
of torch kernels its layer runs (casts, pow/mean/rsqrt, ...), with no host synchronisation, so it can be
captured in a CUDA graph. The references have the exact math of ``diffulex.layers.norm`` (which keeps its
own torch code for CPU tensors); the kernel follows the same order of operations and roundings:

* RMSNorm: statistics in float32, the normalised value cast back to the input dtype, *then* multiplied by
  the weight (rounded to the output dtype), then the optional bias added (rounded again).
* add + RMSNorm: ``new_residual = x + residual`` rounded to the input dtype first, then RMSNorm of it.

Only the reduction order (the RMS sum) differs from torch, so fp32 results agree to ~1e-6 and bf16 results
to within one bf16 ulp.
"""

from __future__ import annotations

import torch
from diffulex.kernels.fused_ops import as_rows, need_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is absent on some CPU-only platforms
    triton = None
    tl = None


# --------------------------------------------------------------------------------------------------------
# Torch references (the math of diffulex.layers, as functions)
# --------------------------------------------------------------------------------------------------------


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``weight * (x32 * rsqrt(mean(x32²) + eps)).to(x.dtype) (+ bias)`` over the last dimension."""
    input_dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * x32.to(input_dtype)
    if bias is not None:
        out = out + bias
    return out


def add_rms_norm_reference(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual), x + residual)``."""
    new_residual = x + residual
    return rms_norm_reference(new_residual, weight, eps, bias), new_residual


# --------------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _rms_norm_kernel(
        x_ptr,
        res_ptr,
        w_ptr,
        b_ptr,
        out_ptr,
        res_out_ptr,
        stride_x,
        stride_res,
        stride_out,
        stride_res_out,
        D,
        eps,
        HAS_RESIDUAL: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
            # x + residual, rounded to the input dtype before the norm reads it.
            x = (x.to(tl.float32) + r.to(tl.float32)).to(res_out_ptr.dtype.element_ty)
            tl.store(res_out_ptr + row * stride_res_out + cols, x, mask=mask)
        x32 = x.to(tl.float32)
        mean_sq = tl.sum(x32 * x32, axis=0) / D
        normed = (x32 * tl.math.rsqrt(mean_sq + eps)).to(x.dtype)  # back to the input dtype first
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        out = (w.to(tl.float32) * normed.to(tl.float32)).to(out_ptr.dtype.element_ty)
        if HAS_BIAS:
            b = tl.load(b_ptr + cols, mask=mask, other=0.0)
            out = (out.to(tl.float32) + b.to(tl.float32)).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + row * stride_out + cols, out, mask=mask)


# --------------------------------------------------------------------------------------------------------
# Wrappers
# --------------------------------------------------------------------------------------------------------


def _norm_warps(block: int) -> int:
    return max(1, min(8, block // 512))


def _rms_norm_launch(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    need_triton()
    d = x.shape[-1]
    if weight.shape != (d,) or (bias is not None and bias.shape != (d,)):
        raise ValueError(f"weight/bias must be [{d}], got {tuple(weight.shape)}")
    shape = x.shape
    x2 = as_rows(x)
    new_residual = res2 = res_out = None
    input_dtype = x.dtype
    if residual is not None:
        if residual.shape != shape:
            raise ValueError(f"residual {tuple(residual.shape)} does not match x {tuple(shape)}")
        input_dtype = torch.promote_types(x.dtype, residual.dtype)
        res2 = as_rows(residual)
        new_residual = torch.empty(shape, dtype=input_dtype, device=x.device)
        res_out = new_residual.view(-1, d)
    out_dtype = torch.promote_types(weight.dtype, input_dtype)
    if bias is not None:
        out_dtype = torch.promote_types(out_dtype, bias.dtype)
    out = torch.empty(shape, dtype=out_dtype, device=x.device)
    rows = x2.shape[0]
    if rows == 0 or d == 0:
        return out, new_residual
    if x2.dtype != input_dtype:
        x2 = x2.to(input_dtype)  # mixed dtypes: the sum is taken in the promoted dtype
    weight = weight.contiguous()
    bias_arg = bias.contiguous() if bias is not None else weight
    out2 = out.view(-1, d)
    block_d = triton.next_power_of_2(d)
    _rms_norm_kernel[(rows,)](
        x2,
        res2 if res2 is not None else x2,
        weight,
        bias_arg,
        out2,
        res_out if res_out is not None else out2,
        x2.stride(0),
        res2.stride(0) if res2 is not None else 0,
        out2.stride(0),
        res_out.stride(0) if res_out is not None else 0,
        d,
        float(eps),
        HAS_RESIDUAL=residual is not None,
        HAS_BIAS=bias is not None,
        BLOCK_D=block_d,
        num_warps=_norm_warps(block_d),
    )
    return out, new_residual


def rms_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """RMSNorm of ``x [..., D]`` over its last dimension (any leading shape; rows may be strided)."""
    return _rms_norm_launch(x, None, weight, eps, bias)[0]


def add_rms_norm_triton(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual), x + residual)`` in one pass; the sum is rounded to the input dtype."""
    out, new_residual = _rms_norm_launch(x, residual, weight, eps, bias)
    assert new_residual is not None
    return out, new_residual
