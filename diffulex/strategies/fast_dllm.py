"""``fast_dllm``: Fast-dLLM's block-wise decoding with an approximate KV cache (LLaDA flavour).

Each block starts with one full forward over the whole sequence whose K/V are stored: the prefix
``[0, block_start)`` (``cache_mode="prefix"``) or all positions (``"dual"``). Later steps of the block
query ``[block_start, end)`` against the stored prefix (prefix mode: the block plus every future block)
or only the block against everything stored, its own stale range replaced by the fresh block K/V (dual
mode). Each forward commits the schedule's count (``steps / num_blocks`` per block, even split) or, with
``threshold``, the most confident token plus every token with confidence ≥ threshold, in float64. The
block's loop always makes at least one forward after the block-start forward, as the official code does.
"""

from __future__ import annotations

from diffulex.request import Request
from diffulex.sampling.selection import even_schedule, select_threshold_at_least_one, select_top_k
from diffulex.step import SequenceOutput, SequencePlan
from diffulex.strategies.base import Strategy, register_strategy


@register_strategy
class FastDLLMStrategy(Strategy):
    """Fast-dLLM prefix/dual cache decoding (see module docstring)."""

    name = "fast_dllm"

    def _block_length(self, request: Request) -> int:
        return min(self.block_size, request.params.max_tokens)

    def validate(self, request: Request) -> None:
        params = request.params
        block = self._block_length(request)
        if params.max_tokens % block != 0:
            raise ValueError(f"block_size ({block}) must divide max_tokens ({params.max_tokens})")
        if params.cfg_scale > 0:
            raise ValueError("fast_dllm does not support cfg_scale; use strategy 'vanilla'")
        num_blocks = params.max_tokens // block
        if params.threshold is None:
            if params.total_steps % num_blocks != 0:
                raise ValueError(
                    f"steps ({params.total_steps}) must be a multiple of the number of blocks ({num_blocks})"
                )
            if params.total_steps // num_blocks < 2:
                raise ValueError("fast_dllm without a threshold needs at least 2 steps per block")

    def generation_length(self, request: Request) -> int:
        return request.params.max_tokens

    def start(self, request: Request) -> None:
        super().start(request)
        block = self._block_length(request)
        num_blocks = request.params.max_tokens // block
        request.strategy_state.update(
            block=0,
            step=0,
            num_blocks=num_blocks,
            steps_per_block=request.params.total_steps // num_blocks,
            schedule=[],
        )

    def _block_range(self, request: Request) -> tuple[int, int]:
        block = self._block_length(request)
        start = request.num_prompt + request.strategy_state["block"] * block
        return start, start + block

    def plan(self, request: Request) -> SequencePlan:
        state = request.strategy_state
        length = len(request.tokens)
        block_start, block_end = self._block_range(request)
        dual = self.options.cache_mode == "dual"
        if state["step"] == 0:
            # Block start: full forward, keep its K/V (prefix only, or everything for the dual cache).
            query_start, context_len, hole = 0, 0, (0, 0)
            query_end = length
            store = (0, length if dual else block_start)
        elif dual:
            query_start, query_end, context_len, hole = (
                block_start,
                block_end,
                length,
                (block_start, block_end),
            )
            store = (0, 0)
        else:
            query_start, query_end, context_len, hole = block_start, length, block_start, (0, 0)
            store = (0, 0)
        positions = list(range(query_start, query_end))
        candidates = self.masked_positions(request, block_start, block_end)
        state["candidates"] = candidates
        return SequencePlan(
            request_id=request.request_id,
            token_ids=request.tokens[query_start:query_end],
            positions=positions,
            block_ids=self.native_block_ids(positions),
            context_len=context_len,
            context_hole=hole,
            store_range=store,
            sample_indices=[p - query_start for p in candidates],
            sample=self.sample_spec(request, softmax_dtype="float64"),
        )

    def num_query_tokens(self, request: Request) -> int:
        length = request.num_prompt + request.params.max_tokens
        if request.strategy_state.get("step", 0) == 0:
            return length
        block_start, block_end = self._block_range(request)
        return block_end - block_start if self.options.cache_mode == "dual" else length - block_start

    def kv_tokens_needed(self, request: Request) -> int:
        if self.options.cache_mode == "dual":
            return request.num_prompt + request.params.max_tokens
        return self._block_range(request)[0]

    def update(self, request: Request, output: SequenceOutput) -> bool:
        state = request.strategy_state
        candidates: list[int] = state["candidates"]
        threshold = request.params.threshold
        if threshold is not None:
            chosen = select_threshold_at_least_one(output.confidences, threshold)
        else:
            if state["step"] == 0:
                state["schedule"] = even_schedule(len(candidates), state["steps_per_block"])
            chosen = select_top_k(output.confidences, state["schedule"][state["step"]])
        self.commit(request, candidates, output, chosen)
        state["step"] += 1
        block_start, block_end = self._block_range(request)
        # The block-start forward is always followed by at least one cached forward.
        if state["step"] >= 2 and not self.masked_positions(request, block_start, block_end):
            state["block"] += 1
            state["step"] = 0
        return state["block"] >= state["num_blocks"]
