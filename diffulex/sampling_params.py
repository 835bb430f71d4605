"""Per-request sampling and decoding parameters (plain data, validated on construction)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

UnmaskPolicy = Literal["probability", "margin", "entropy", "random"]
UNMASK_POLICIES: tuple[str, ...] = ("probability", "margin", "entropy", "random")


@dataclass
class SamplingParams:
    """What to generate and how to unmask it.

    Defaults: ``max_tokens=64``, greedy (``temperature=0``), ``steps=None`` (= one token per step, i.e.
    ``max_tokens`` steps in total), ``threshold=None`` (fixed schedule), ``unmask_policy="probability"``.
    ``steps`` is the total number of denoising steps of the whole generation (LLaDA's convention):
    ``vanilla`` and ``fast_dllm`` give each block ``steps / num_blocks``; ``block_diffusion`` uses
    ``steps // num_blocks`` per block (``block_size`` when None); ``d2f``/``multi_bd`` ignore it.
    ``threshold`` switches ``vanilla``/``fast_dllm`` to confidence-threshold unmasking (at least one
    token per step), ``block_diffusion`` to dynamic remasking, and is the acceptance threshold of
    ``d2f``/``multi_bd`` (0.9 when None). ``ignore_eos=True`` never stops at EOS, so the output has
    ``max_tokens`` tokens unless a stop id or stop string cuts it.
    """

    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    steps: int | None = None
    threshold: float | None = None
    unmask_policy: UnmaskPolicy = "probability"
    cfg_scale: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.steps is not None and self.steps <= 0:
            raise ValueError(f"steps must be a positive integer, got {self.steps}")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.unmask_policy not in UNMASK_POLICIES:
            raise ValueError(
                f"unmask_policy must be one of {', '.join(UNMASK_POLICIES)}, got {self.unmask_policy!r}"
            )
        if self.cfg_scale < 0:
            raise ValueError(f"cfg_scale must be >= 0, got {self.cfg_scale}")

    @property
    def total_steps(self) -> int:
        """Denoising steps of the whole generation (default: one token per step)."""
        return self.steps if self.steps is not None else self.max_tokens
