"""RMSNorm as LLaDA (OLMo ``RMSLayerNorm``) and Qwen3/SDAR (``RMSNorm``) compute it."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square normalisation over the last dimension, with a learned ``weight`` (and optional ``bias``).

    The statistics are computed in float32 and the normalised value is cast back to the input dtype
    *before* the affine step, which is the order both official implementations use; keeping it makes
    bf16 outputs match theirs bit for bit rather than only approximately.
    """

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-6,
        bias: bool = False,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        if bias:
            self.bias = nn.Parameter(torch.zeros(hidden_size, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``norm(x)``; with ``residual``, ``(norm(x + residual), x + residual)`` (the sum in the input dtype).

        CUDA tensors take one fused Triton kernel (``diffulex.kernels.fused_norm``); others the torch code.
        """
        if x.is_cuda:
            from diffulex.kernels.fused_norm import add_rms_norm_triton, rms_norm_triton

            if residual is None:
                return rms_norm_triton(x, self.weight, self.eps, self.bias)
            return add_rms_norm_triton(x, residual, self.weight, self.eps, self.bias)
        return self._forward_torch(x, residual)

    def _forward_torch(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is not None:
            x = residual + x  # the models' ``hidden + sublayer(...)``
            return self._forward_torch(x), x
        input_dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * x32.to(input_dtype)
        if self.bias is not None:
            out = out + self.bias
        return out

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, bias={self.bias is not None}"
