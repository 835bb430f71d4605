"""SwiGLU's gate: ``silu(gate) * up``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for separate gate and up projections (same shape).

    CUDA tensors take one fused Triton kernel (``diffulex.kernels.fused_ops``); others the torch code.
    """
    if gate.is_cuda:
        from diffulex.kernels.fused_ops import silu_and_mul_triton

        return silu_and_mul_triton(gate, up)
    return F.silu(gate) * up


class SiluAndMul(nn.Module):
    """``silu(x[..., :d]) * x[..., d:]`` for a fused gate|up projection of width ``2 d``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return silu_and_mul(gate, up)
