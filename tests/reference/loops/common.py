"""Helpers shared by the reference loops: schedules, the deterministic top-k tie rule, greedy picks and
the block-causal mask over absolute blocks (conventions: the package docstring)."""

from __future__ import annotations

import torch

from ..plain_models import block_causal_mask


def sched(n: int, s: int) -> list[int]:
    """ALGORITHMS.md notation: s entries equal to n // s, +1 added to the FIRST n % s entries."""
    base, rem = divmod(int(n), int(s))
    return [base + 1 if i < rem else base for i in range(s)]


def ranked_positions(conf: torch.Tensor) -> list[int]:
    """All positions of a 1-D confidence tensor, best first: higher conf first, then lower position."""
    values = conf.tolist()
    return sorted(range(len(values)), key=lambda j: (-values[j], j))


def topk_positions(conf: torch.Tensor, k: int) -> list[int]:
    """Deterministic torch.topk(conf, k).indices (tie rule: see the package docstring)."""
    return ranked_positions(conf)[: int(k)]


def argmax_and_prob(logits: torch.Tensor, softmax_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x0 = argmax(logits) (first index on ties); p = softmax(logits in softmax_dtype)[x0]."""
    x0 = torch.argmax(logits, dim=-1)
    p = torch.softmax(logits.to(softmax_dtype), dim=-1)
    return x0, torch.gather(p, -1, x0.unsqueeze(-1)).squeeze(-1)


def _as_tensor(tokens) -> torch.Tensor:
    return torch.as_tensor(list(tokens), dtype=torch.long)


def block_causal_mask_abs(length: int, block_size: int) -> torch.Tensor:
    """Block-causal mask over absolute blocks (block id = position // block_size)."""
    return block_causal_mask(torch.arange(length) // block_size)
