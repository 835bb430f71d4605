"""The strategy configurations the engine tests sweep (family, engine options, sampling overrides)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Case:
    name: str
    family: str
    options: dict[str, Any]
    params: dict[str, Any] = field(default_factory=dict)


CASES = [
    Case("vanilla", "llada", {"strategy": "vanilla", "block_size": 8}, {"steps": 8}),
    Case("vanilla_threshold", "llada", {"strategy": "vanilla", "block_size": 8}, {"threshold": 0.3}),
    Case(
        "vanilla_dream",
        "llada",
        {"strategy": "vanilla", "block_size": 8, "vanilla_schedule": "dream"},
        {"steps": 8},
    ),
    Case(
        "fast_dllm_prefix",
        "llada",
        {"strategy": "fast_dllm", "block_size": 8, "cache_mode": "prefix"},
        {"threshold": 0.3},
    ),
    Case(
        "fast_dllm_dual",
        "llada",
        {"strategy": "fast_dllm", "block_size": 8, "cache_mode": "dual"},
        {"steps": 8},
    ),
    Case("block_diffusion", "sdar", {"strategy": "block_diffusion", "block_size": 4}, {}),
    Case(
        "block_diffusion_fused",
        "sdar",
        {"strategy": "block_diffusion", "block_size": 4, "fuse_block_store": True},
        {},
    ),
    Case(
        "block_diffusion_dynamic",
        "sdar",
        {"strategy": "block_diffusion", "block_size": 4},
        {"threshold": 0.3},
    ),
    Case(
        "d2f",
        "llada",
        {"strategy": "d2f", "block_size": 4, "block_add_threshold": 0.5, "decoded_token_threshold": 0.75},
        {"threshold": 0.3},
    ),
    Case(
        "multi_bd",
        "sdar",
        {
            "strategy": "multi_bd",
            "block_size": 4,
            "buffer_size": 2,
            "block_add_threshold": 0.25,
            "decoded_token_threshold": 0.75,
        },
        {"threshold": 0.3},
    ),
    Case(
        "fast_dllm_v2",
        "fast_dllm_v2",
        {"strategy": "fast_dllm_v2", "block_size": 8, "small_block_size": 4},
        {"threshold": 0.3},
    ),
    Case(
        "fast_dllm_v2_block_cache",
        "fast_dllm_v2",
        {"strategy": "fast_dllm_v2", "block_size": 8, "small_block_size": 4, "use_block_cache": True},
        {"threshold": 0.3},
    ),
]
