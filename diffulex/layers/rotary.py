"""Rotary position embedding, rotate-half (GPT-NeoX) layout as Llama, LLaDA and Qwen3/SDAR use it."""

from __future__ import annotations

import torch
from torch import nn


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dimension (its two halves)."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class RotaryEmbedding(nn.Module):
    """Rotates the first ``rotary_dim`` channels of each q/k head by its token's position.

    Frequencies are ``base ** (-2i / rotary_dim)`` for ``i < rotary_dim / 2``; channel ``j`` pairs with
    channel ``j + rotary_dim / 2`` (rotate-half). With ``rotary_dim < head_dim`` (partial rotary, e.g.
    LLaDA2's factor 0.5) the remaining channels pass through unchanged. Angles and the rotation are computed
    in float32 from the packed ``positions`` of the step (no cached table, so any position works and CUDA
    graphs only see the positions tensor), then cast back to the q/k dtype — LLaDA's
    ``rope_full_precision``.
    """

    def __init__(self, head_dim: int, rotary_dim: int | None = None, base: float = 10000.0):
        super().__init__()
        rotary_dim = head_dim if rotary_dim is None else rotary_dim
        if rotary_dim % 2 != 0 or not 0 < rotary_dim <= head_dim:
            raise ValueError(f"rotary_dim {rotary_dim} must be even and in (0, head_dim={head_dim}]")
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim
        self.base = float(base)
        # Not persistent: derived from the config, never part of a checkpoint.
        self.register_buffer("inv_freq", self._inverse_frequencies(None), persistent=False)

    def _inverse_frequencies(self, device: torch.device | None) -> torch.Tensor:
        exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.float32, device=device) / self.rotary_dim
        return 1.0 / (self.base**exponents)

    def _apply(self, fn, *args, **kwargs):
        # ``model.to(torch.bfloat16)`` would round the frequencies to bf16 (wrong angles at long
        # positions): after any move or cast, rebuild them in float32 on the new device.
        super()._apply(fn, *args, **kwargs)
        self.inv_freq = self._inverse_frequencies(self.inv_freq.device)
        return self

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rotated = x[..., : self.rotary_dim].float()
        rotated = rotated * cos + _rotate_half(rotated) * sin
        if self.rotary_dim == self.head_dim:
            return rotated.to(x.dtype)
        return torch.cat((rotated.to(x.dtype), x[..., self.rotary_dim :]), dim=-1)

    def forward(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``query [T, H, D]`` and ``key [T, KVH, D]`` by ``positions [T]``; returns new tensors.

        CUDA tensors take one fused Triton kernel (``diffulex.kernels.fused_ops``); others the torch code.
        """
        if query.is_cuda:
            from diffulex.kernels.fused_ops import rope_triton

            return rope_triton(positions, query, key, self.rotary_dim, self.base, self.inv_freq)
        return self._forward_torch(positions, query, key)

    def _forward_torch(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq
        angles = torch.cat((angles, angles), dim=-1).unsqueeze(1)  # [T, 1, rotary_dim], shared by heads
        cos, sin = angles.cos(), angles.sin()
        return self._rotate(query, cos, sin), self._rotate(key, cos, sin)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, base={self.base}"
