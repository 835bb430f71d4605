"""Decoding strategies, one file each, registered by name."""

from diffulex.strategies import (  # noqa: F401  (registration)
    block_diffusion,
    fast_dllm,
    fast_dllm_v2,
    pipelined,
    vanilla,
)
from diffulex.strategies.base import Strategy, StrategyOptions, create_strategy, strategy_names

__all__ = ["Strategy", "StrategyOptions", "create_strategy", "strategy_names"]
