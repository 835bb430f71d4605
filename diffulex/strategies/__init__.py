"""Decoding strategies, one file each, registered by name."""

from diffulex.strategies import block_diffusion, fast_dllm, pipelined, vanilla  # noqa: F401  (registration)
from diffulex.strategies.base import Strategy, StrategyOptions, create_strategy, strategy_names

__all__ = ["Strategy", "StrategyOptions", "create_strategy", "strategy_names"]
