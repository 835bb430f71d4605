"""Plain-torch twin of Triton's ``tl.rand``: Philox-4x32-10 in integer arithmetic, bit for bit.

``tl.rand(seed, offset)`` runs Philox-4x32 with 10 rounds on the counter ``(offset_lo, offset_hi, 0, 0)``
(the low and high 32 bits of a 64-bit offset; ``offset_hi = 0`` for a 32-bit offset) and the key
``(seed_lo, seed_hi)``, keeps the first output word, reads it as an int32 ``x``, folds the negative half
onto the positive one (``x < 0 → ~x``) and multiplies by an fp32 constant just below 2⁻³¹, so the
result lies in [0, 1 − 2⁻²⁴]: never 1, and 0 for two of the 2³² words.

Torch has no unsigned 32-bit multiply-high, so every word is held in an int64 tensor and each
32×32-bit product is assembled from two 16×32-bit partial products (each below 2⁴⁸, so nothing
overflows). This exists to test kernels that draw noise with ``tl.rand``: a reference fed with
``philox_uniform`` sees exactly the kernel's noise.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFF_FFFF
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_ROUNDS = 10
# Triton's int32 → [0, 1) scale; as an fp32 value it is 2⁻³¹·(1 − 2⁻²⁴), so (2³¹ − 1)·scale < 1.
_UNIFORM_SCALE = 4.6566127342e-10


def _mul_hi_lo(constant: int, word: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of ``constant · word`` for a 32-bit constant and int64-held 32-bit words."""
    high_part = constant * (word >> 16)  # < 2⁴⁸
    low_part = constant * (word & 0xFFFF)  # < 2⁴⁸
    carry = high_part + (low_part >> 16)  # constant·word = carry·2¹⁶ + (low_part mod 2¹⁶)
    hi = carry >> 16
    lo = ((carry & 0xFFFF) << 16) | (low_part & 0xFFFF)
    return hi, lo


def philox_words(seed: int | torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The first Philox-4x32-10 output word (as int64 in [0, 2³²)) of ``tl.randint(seed, offsets)``.

    ``seed``: an int, or an int64 tensor broadcastable to ``offsets`` (one key per element).
    ``offsets``: int64 tensor of 64-bit counters (the low word is counter 0, the high one counter 1).
    Both are read as 64-bit patterns, as Triton reads them (a negative int64 is its two's complement).
    """
    if offsets.dtype != torch.int64:
        raise ValueError(f"offsets must be int64, got {offsets.dtype}")
    seed = torch.as_tensor(seed, dtype=torch.int64, device=offsets.device)
    c0 = offsets & _MASK32
    c1 = (offsets >> 32) & _MASK32  # >> is arithmetic on int64: drop the sign extension
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0 = (seed & _MASK32).expand_as(c0)
    k1 = ((seed >> 32) & _MASK32).expand_as(c0)
    for _ in range(_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0


def philox_uniform(seed: int | torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """float32 uniforms in [0, 1), equal bit for bit to ``tl.rand(seed, offsets)``."""
    word = philox_words(seed, offsets)
    as_int32 = torch.where(word >= 1 << 31, word - (1 << 32), word)
    folded = torch.where(as_int32 < 0, ~as_int32, as_int32)  # in [0, 2³¹)
    scale = torch.tensor(_UNIFORM_SCALE, dtype=torch.float32, device=offsets.device)
    return folded.to(torch.float32) * scale
