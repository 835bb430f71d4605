"""The decoding-strategy interface and its registry.

A strategy owns the per-request decoding algorithm: what a step queries (``plan``), what the step's
predictions commit (``update``), and how much K/V cache and query budget the next step needs (read by the
scheduler). It never touches tensors: plans and outputs are plain data (``diffulex.step``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from diffulex.request import Request
from diffulex.step import SampleSpec, SequenceOutput, SequencePlan


@dataclass(frozen=True)
class StrategyOptions:
    """The engine options a strategy reads (resolved: no None left except where documented)."""

    block_size: int
    buffer_size: int | None
    page_size: int
    native_attention: str  # "bidirectional" | "block_causal"
    vanilla_schedule: str  # "llada" | "dream"
    cache_mode: str = "prefix"
    block_add_threshold: float = 0.1
    decoded_token_threshold: float = 0.95
    remasking: str | None = None
    fuse_block_store: bool = False
    small_block_size: int | None = None
    use_block_cache: bool = False
    shift_logits: bool = False


class Strategy(ABC):
    """Base class of decoding strategies; subclasses register under ``name``.

    ``static_query_sizes()``: per-request query sizes that denoise steps fit in; the runner pads each
    request to the smallest that fits and replays that size's CUDA graph. ``uses_prefix_cache``: committed K/V
    of full pages may be shared across requests.
    """

    name: ClassVar[str]
    uses_prefix_cache: ClassVar[bool] = False

    def __init__(self, options: StrategyOptions):
        self.options = options
        self.block_size = options.block_size

    # ----- request life cycle -------------------------------------------------------------------------
    def validate(self, request: Request) -> None:
        """Raise ValueError with a clear message when the request's parameters do not fit the strategy."""
        return None

    @abstractmethod
    def generation_length(self, request: Request) -> int:
        """Length of the generation region appended to the prompt (may round ``max_tokens`` up)."""

    def static_query_sizes(self) -> list[int]:
        """Query sizes (tokens per request) that denoise steps never exceed: one CUDA graph set each."""
        return []

    def buffer_capacity(self, request: Request) -> int:
        """Blocks the request's Block Buffer holds at once."""
        return self.options.buffer_size or 1

    def prefix_cacheable_len(self, request: Request) -> int:
        """Prompt tokens whose K/V do not depend on later tokens (shareable across requests)."""
        return 0

    def start(self, request: Request) -> None:
        """Initialise a (re)admitted request: the region of masks and the strategy state.

        Runs before the prefix-cache lookup (which needs the region's length), so it must not depend on
        ``num_cached``; plan() reads the hits from ``num_cached`` afterwards.
        """
        request.tokens = list(request.prompt_ids) + [request.mask_token_id] * self.generation_length(request)

    @abstractmethod
    def plan(self, request: Request) -> SequencePlan:
        """This request's query for the next step."""

    @abstractmethod
    def update(self, request: Request, output: SequenceOutput) -> bool:
        """Apply a step's predictions; return True when the request has nothing left to decode."""

    @abstractmethod
    def kv_tokens_needed(self, request: Request) -> int:
        """Cache positions the request must own pages for before its next step."""

    @abstractmethod
    def num_query_tokens(self, request: Request) -> int:
        """Query tokens of the request's next step (for the scheduler's token budget)."""

    # ----- shared helpers -----------------------------------------------------------------------------
    def sample_spec(
        self, request: Request, softmax_dtype: str = "logits", policy: str | None = None
    ) -> SampleSpec:
        """The request's SampleSpec (built once per request; the runner adds the per-step seed)."""
        key = ("_spec", softmax_dtype, policy)
        spec = request.strategy_state.get(key)
        if spec is None:
            params = request.params
            spec = SampleSpec(
                temperature=params.temperature,
                top_k=params.top_k,
                top_p=params.top_p,
                policy=policy or params.unmask_policy,
                softmax_dtype=softmax_dtype,
                seed=request.seed,
                cfg_scale=params.cfg_scale,
            )
            request.strategy_state[key] = spec
        return spec

    def native_block_ids(self, positions: range | list[int], prompt_len: int = 0) -> list[int]:
        """Block ids for the model's own attention: all equal (bidirectional) or ``position // B``."""
        if self.options.native_attention == "block_causal":
            return [p // self.block_size for p in positions]
        return [0] * len(positions)

    def masked_positions(self, request: Request, start: int, end: int) -> list[int]:
        mask = request.mask_token_id
        tokens = request.tokens
        return [p for p in range(start, end) if tokens[p] == mask]

    @staticmethod
    def commit(request: Request, positions: list[int], output: SequenceOutput, chosen: np.ndarray) -> None:
        """Write the predicted tokens of ``positions[chosen]`` into the request."""
        for index in chosen.tolist():
            request.tokens[positions[index]] = int(output.token_ids[index])


class BlockRegionStrategy(Strategy):
    """A strategy that decodes absolute blocks (``position // block_size``) one after another.

    The generation region ends at the block boundary after ``prompt + max_tokens`` (the output is cut to
    ``max_tokens``); the prompt's whole blocks are prefilled together and are what the prefix cache may
    share. ``block_diffusion`` and ``fast_dllm_v2`` share this geometry.
    """

    uses_prefix_cache = True

    def _region_end(self, request: Request) -> int:
        total = request.num_prompt + request.params.max_tokens
        return -(-total // self.block_size) * self.block_size

    def _prefill_end(self, request: Request) -> int:
        return request.num_prompt // self.block_size * self.block_size

    def generation_length(self, request: Request) -> int:
        return self._region_end(request) - request.num_prompt

    def prefix_cacheable_len(self, request: Request) -> int:
        return self._prefill_end(request)


_REGISTRY: dict[str, type[Strategy]] = {}


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make a strategy available by its ``name``."""
    _REGISTRY[cls.name] = cls
    return cls


def strategy_names() -> list[str]:
    return sorted(_REGISTRY)


def create_strategy(name: str, options: StrategyOptions) -> Strategy:
    """Instantiate a registered strategy; unknown names list the known ones."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown strategy {name!r}; available: {', '.join(strategy_names())}")
    return _REGISTRY[name](options)
