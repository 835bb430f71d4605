"""Host side of unmasking: step schedules and the rules that pick which positions to commit.

Every rule takes confidences of the candidate positions (numpy float64) and returns the indices into
that array to commit. Ties are broken deterministically: higher confidence first, then lower position.
"""

from __future__ import annotations

import numpy as np
import torch


def even_schedule(num_tokens: int, steps: int) -> list[int]:
    """``steps`` counts summing to ``num_tokens``; the remainder goes to the FIRST steps (LLaDA)."""
    base, remainder = divmod(num_tokens, steps)
    return [base + (1 if i < remainder else 0) for i in range(steps)]


def dream_timesteps(steps: int, eps: float = 1e-3) -> list[float]:
    """Dream's ``linspace(1, eps, steps + 1)`` in float32, as Python floats (exact float32 values)."""
    return torch.linspace(1, eps, steps + 1, dtype=torch.float32).tolist()


def dream_transfer_count(num_masked: int, step: int, steps: int, timesteps: list[float]) -> int:
    """Dream's ``int(n · (1 − t[i+1]/t[i]))`` in float32 arithmetic; all remaining at the last step."""
    if step >= steps - 1:
        return int(num_masked)
    s, t = np.float32(timesteps[step + 1]), np.float32(timesteps[step])
    return int(np.float32(num_masked) * (np.float32(1.0) - s / t))


def rank(confidences: np.ndarray) -> np.ndarray:
    """Indices ordered by confidence, highest first; equal confidences by lower index first."""
    return np.lexsort((np.arange(confidences.shape[0]), -confidences))


def select_top_k(confidences: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` most confident candidates (all of them when ``k`` exceeds their number)."""
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    return rank(confidences)[:k]


def select_threshold_at_least_one(confidences: np.ndarray, threshold: float) -> np.ndarray:
    """Fast-dLLM: the most confident candidate always, plus every candidate with confidence ≥ threshold."""
    if confidences.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    order = rank(confidences)
    keep = confidences[order] >= threshold
    keep[0] = True
    return order[keep]


def select_above(confidences: np.ndarray, threshold: float) -> np.ndarray:
    """Candidates with confidence strictly above the threshold (SDAR dynamic, D2F), in rank order."""
    order = rank(confidences)
    return order[confidences[order] > threshold]
