"""``fast_dllm_v2``: Fast-dLLM v2's own decoding loop (blocks, sub-blocks, next-token store forward).

Reproduces NVlabs/Fast-dLLM ``v2/generation_functions.py: batch_sample`` and the checkpoint's
``generate`` (rules and sources in docs/strategies.md, section "fast_dllm_v2"), batch 1 semantics:

- The prompt's full blocks are prefilled (block-causal, stored). When the prompt ends on a block
  boundary the prefill's last row also gives the next token (autoregressively: logits are shifted).
- Blocks of B = ``block_size`` (the checkpoint's ``bd_size``) are decoded left to right, each one
  sub-block of S = ``small_block_size`` at a time. A denoise forward queries the whole block against the
  stored blocks (nothing stored) and commits, in the first sub-block that still has masks, every mask
  whose probability is strictly above ``threshold`` plus the most probable one.
- A decoded block gets one more forward (the store forward) that writes its K/V and, from its last
  row, decodes the first token of the next block.
- ``use_block_cache``: the first forward of each sub-block computes the whole block and stores its
  K/V (the "block cache"); the sub-block's later forwards, while its first token is decoded, query only
  the sub-block against them (the sub-block's own stale range hidden and replaced by its fresh K/V).

Why a strategy of its own and not a ``block_diffusion`` option: it differs from SDAR's loop in every
phase (the next-token prefill and store forwards, sub-block order, the threshold rule, the sub-block
queries of the block cache), so an option would fork almost every method of ``block_diffusion``.

The region ends at the block boundary after ``prompt + max_tokens``; the request is done as soon as
its first ``max_tokens`` positions are decoded, so its forwards are the official loop's, stopped there.
Shifted logits are the model adapter's (``StepPlan.pack``); the next token of a query is asked for
with the sample index one past its last token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diffulex.request import Request
from diffulex.sampling.selection import select_above, select_top_k
from diffulex.step import SequenceOutput, SequencePlan
from diffulex.strategies.base import BlockRegionStrategy, StrategyOptions, register_strategy

DEFAULT_THRESHOLD = 0.9  # v2/eval.py's default (the checkpoint's ``generate`` defaults to 1)
DEFAULT_SMALL_BLOCK_SIZE = 8  # v2/eval.py and ``generate``


@dataclass(frozen=True)
class _Query:
    """One forward of the loop: query ``[start, end)`` over the cache ``[0, context_len)`` minus ``hole``,
    storing ``[start, store_end)``; ``candidates`` are the masks it may commit, ``next_token`` whether it
    also predicts position ``end`` (prefill and store forwards)."""

    kind: str  # "prefill" | "full" | "sub" | "store"
    start: int
    end: int
    context_len: int
    store_end: int
    candidates: tuple[int, ...] = ()
    hole: tuple[int, int] = (0, 0)
    next_token: bool = False


def resolve_small_block_size(block_size: int, small_block_size: int | None) -> int:
    """The sub-block size: the configured one (it must divide the block), else 8 when it divides it."""
    if small_block_size is None:
        return DEFAULT_SMALL_BLOCK_SIZE if block_size % DEFAULT_SMALL_BLOCK_SIZE == 0 else block_size
    if small_block_size > block_size or block_size % small_block_size != 0:
        raise ValueError(
            f"small_block_size ({small_block_size}) must divide block_size ({block_size}) for fast_dllm_v2"
        )
    return small_block_size


@register_strategy
class FastDLLMV2Strategy(BlockRegionStrategy):
    """Fast-dLLM v2 block + sub-block decoding with the next-token store forward (see module docstring)."""

    name = "fast_dllm_v2"

    def __init__(self, options: StrategyOptions):
        super().__init__(options)
        if not options.shift_logits or options.native_attention != "block_causal":
            raise ValueError(
                "fast_dllm_v2 needs a block-causal model with shifted logits (Fast-dLLM v2 checkpoints): "
                "its store forwards predict the next block's first token from the last row"
            )
        self.small_block_size = resolve_small_block_size(self.block_size, options.small_block_size)
        self.use_block_cache = options.use_block_cache
        if self.use_block_cache:
            # Block-cache forwards write provisional K/V of the current block into the paged cache:
            # those pages must never be offered to other requests.
            self.uses_prefix_cache = False

    # ----- request life cycle -------------------------------------------------------------------------
    def validate(self, request: Request) -> None:
        params = request.params
        if params.cfg_scale > 0:
            raise ValueError("fast_dllm_v2 does not support cfg_scale; use strategy 'vanilla'")
        if params.unmask_policy != "probability":
            raise ValueError(
                f"fast_dllm_v2 ranks tokens by probability (the official rule); "
                f"unmask_policy {params.unmask_policy!r} is not supported"
            )

    def static_query_sizes(self) -> list[int]:
        if self.use_block_cache and self.small_block_size < self.block_size:
            return [self.small_block_size, self.block_size]
        return [self.block_size]

    def start(self, request: Request) -> None:
        super().start(request)
        # block_start: the block being decoded; block_cached: its block cache was computed (per block).
        request.strategy_state.update(block_start=self._prefill_end(request), block_cached=False)

    # ----- what the next forward is -------------------------------------------------------------------
    def _next_query(self, request: Request) -> _Query:
        prefill_end = self._prefill_end(request)
        prompt_len = request.num_prompt
        if request.num_cached < prefill_end:
            # The next token is predicted when the prompt ends on a block boundary.
            return _Query(
                "prefill",
                request.num_cached,
                prefill_end,
                request.num_cached,
                prefill_end,
                next_token=prompt_len == prefill_end,
            )
        state = request.strategy_state
        block_start = state["block_start"]
        block_end = block_start + self.block_size
        masks = self.masked_positions(request, max(block_start, prompt_len), block_end)
        if not masks:
            return _Query("store", block_start, block_end, block_start, block_end, next_token=True)
        sub_start = block_start + (masks[0] - block_start) // self.small_block_size * self.small_block_size
        sub_end = sub_start + self.small_block_size
        candidates = tuple(p for p in masks if p < sub_end)
        if not self.use_block_cache:
            return _Query("full", block_start, block_end, block_start, block_start, candidates)
        first_is_mask = sub_start >= prompt_len and request.tokens[sub_start] == request.mask_token_id
        if not state["block_cached"] or first_is_mask:
            return _Query("full", block_start, block_end, block_start, block_end, candidates)
        return _Query("sub", sub_start, sub_end, block_end, sub_start, candidates, hole=(sub_start, sub_end))

    def plan(self, request: Request) -> SequencePlan:
        query = self._next_query(request)
        request.strategy_state["query"] = query
        positions = list(range(query.start, query.end))
        sample_indices = [p - query.start for p in query.candidates]
        if query.next_token:
            sample_indices.append(query.end - query.start)  # one past the query: its last row, shifted
        return SequencePlan(
            request_id=request.request_id,
            token_ids=request.tokens[query.start : query.end],
            positions=positions,
            block_ids=[p // self.block_size for p in positions],
            context_len=query.context_len,
            context_hole=query.hole,
            store_range=(0, query.store_end - query.start),
            sample_indices=sample_indices,
            sample=self.sample_spec(request, policy="probability"),
        )

    def num_query_tokens(self, request: Request) -> int:
        query = self._next_query(request)
        return query.end - query.start

    def kv_tokens_needed(self, request: Request) -> int:
        prefill_end = self._prefill_end(request)
        if request.num_cached < prefill_end:
            return prefill_end
        return request.strategy_state["block_start"] + self.block_size

    # ----- applying a forward -------------------------------------------------------------------------
    def _threshold(self, request: Request) -> float:
        threshold = request.params.threshold
        return DEFAULT_THRESHOLD if threshold is None else threshold

    def _commit_sub_block(self, request: Request, query: _Query, output: SequenceOutput) -> None:
        """Every candidate strictly above the threshold, and always the most probable one."""
        confidences = np.asarray(output.confidences[: len(query.candidates)], dtype=np.float64)
        chosen = select_above(confidences, self._threshold(request))
        if chosen.shape[0] == 0:  # nothing above: the maximum (lowest position on ties) alone
            chosen = select_top_k(confidences, 1)
        self.commit(request, list(query.candidates), output, chosen)

    def update(self, request: Request, output: SequenceOutput) -> bool:
        state = request.strategy_state
        query: _Query = state["query"]
        if query.next_token and query.end < len(request.tokens):
            request.tokens[query.end] = int(output.token_ids[-1])
        if query.kind == "store":
            state["block_start"] = query.end
            state["block_cached"] = False
        elif query.kind in ("full", "sub"):
            if query.kind == "full" and self.use_block_cache:
                state["block_cached"] = True
            self._commit_sub_block(request, query, output)
        end = request.num_prompt + request.params.max_tokens
        return request.mask_token_id not in request.tokens[request.num_prompt : end]
