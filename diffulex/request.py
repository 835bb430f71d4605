"""A request: its tokens, its Block Buffer, its page table and its counters. Plain Python, picklable."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from diffulex.block_buffer import BlockBuffer
from diffulex.sampling_params import SamplingParams


class RequestStatus(str, Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    """One generation request as the engine tracks it.

    ``tokens`` holds the prompt followed by the generation region (the mask id where not yet decoded);
    positions ``[0, num_cached)`` have their K/V in the pages of ``page_table``. ``strategy_state`` is
    private to the decoding strategy. Counters: ``num_forwards`` model calls made for this request
    (a CFG step makes two; preempted work included), ``num_steps`` steps since the last (re)start (it
    seeds sampling, so a restarted request draws the same noise), ``num_preemptions``.
    """

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    mask_token_id: int
    eos_token_ids: tuple[int, ...]
    buffer_capacity: int = 1
    seed: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    tokens: list[int] = field(default_factory=list)
    num_cached: int = 0
    num_prefix_hit: int = 0
    page_table: list[int] = field(default_factory=list)
    buffer: BlockBuffer = field(init=False)
    num_prompt: int = field(init=False)
    strategy_state: dict[str, Any] = field(default_factory=dict)
    num_forwards: int = 0
    num_steps: int = 0
    stop_scanned: int = 0
    stop_text_cut: int | None = None
    num_preemptions: int = 0
    finish_reason: str | None = None
    error: str | None = None
    output_ids: list[int] = field(default_factory=list)
    first_block_time: float | None = None
    finish_time: float | None = None

    def __post_init__(self) -> None:
        self.num_prompt = len(self.prompt_ids)  # read on every step: a plain attribute, not a property
        self.buffer = BlockBuffer(capacity=self.buffer_capacity)
        self.reset()

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def reset(self) -> None:
        """Back to the state of a fresh request (used at admission and after preemption)."""
        self.tokens = list(self.prompt_ids)
        self.num_cached = 0
        self.num_prefix_hit = 0
        self.page_table = []
        self.buffer.clear()
        self.strategy_state = {}
        self.output_ids = []
        self.num_steps = 0
        self.stop_scanned = len(self.prompt_ids)
        self.stop_text_cut = None

    def decoded_prefix_end(self) -> int:
        """End of the longest run of decoded tokens from the start: tokens before it never change."""
        # Everything before stop_scanned is known decoded: start the search there.
        try:
            return self.tokens.index(self.mask_token_id, max(self.num_prompt, self.stop_scanned))
        except ValueError:
            return len(self.tokens)


@dataclass
class RequestOutput:
    """What a finished request returns: tokens after the prompt, text when a tokenizer is loaded.

    ``finish_reason``: "stop" (EOS, a stop id or a stop string), "length" (``max_tokens`` reached),
    "error" (``error`` says why) or "abort".
    """

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    finish_reason: str
    num_forwards: int
    text: str | None = None
    error: str | None = None
    num_preemptions: int = 0
    num_prefix_hit_tokens: int = 0
    latency_s: float = 0.0

    @property
    def tokens_per_forward(self) -> float:
        return len(self.token_ids) / self.num_forwards if self.num_forwards else 0.0
