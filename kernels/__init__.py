"""Compute kernels of Diffulex, each with a plain-torch reference beside it.

Installed as ``diffulex.kernels``. The torch references are the CPU path and the ground truth that the
Triton kernels (GPU fast path) are tested against.
"""

from diffulex.kernels.attention_ref import paged_attention_reference, store_kv_reference

__all__ = ["paged_attention_reference", "store_kv_reference"]
