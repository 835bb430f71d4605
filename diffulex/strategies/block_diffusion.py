"""``block_diffusion``: SDAR / Fast-dLLM-v2 style, one block at a time over a block-causal KV cache.

Blocks are absolute (``position // block_size``) and the generation region ends at the block boundary
after ``prompt + max_tokens`` (SDAR's ``ceil((P+gen)/B)·B``; the output is cut to ``max_tokens``). The
prompt's full blocks are prefilled in one block-causal forward (skipped where the prefix cache already
holds them); a partial last prompt block becomes the first decoded block with its prompt tokens fixed.
Each block is denoised with its K/V not stored (steps from ``even_schedule(B, steps_per_block)``), then
one more forward over the finished block stores its K/V (SDAR's ``store_kv`` forward, counted).
Remasking: ``static`` = top-k of the schedule count; ``dynamic`` = every token with confidence strictly
above ``threshold`` when there are at least the schedule count of them, else top-k; ``sequential`` = the
first masks in order. The count is clipped to the block's remaining masks (SDAR would overwrite prompt
tokens of a partial block otherwise).

With ``fuse_block_store`` the finished block's K/V (and the prompt's) are stored by the next block's
first forward instead of a forward of their own, and the last block is never stored: the same tokens
(attention is block-causal, so the stored K/V are the same), one forward per block fewer than SDAR.
"""

from __future__ import annotations

from diffulex.request import Request
from diffulex.sampling.selection import even_schedule, select_above, select_top_k
from diffulex.step import SequenceOutput, SequencePlan
from diffulex.strategies.base import BlockRegionStrategy, register_strategy

DEFAULT_DYNAMIC_THRESHOLD = 0.9
MAX_LOOP_ITERATIONS = 64  # device-loop counts stated per plan (the engine caps the loop length itself)


@register_strategy
class BlockDiffusionStrategy(BlockRegionStrategy):
    """SDAR block diffusion (see module docstring)."""

    name = "block_diffusion"

    def _remasking(self, request: Request) -> str:
        if self.options.remasking is not None:
            return self.options.remasking
        return "dynamic" if request.params.threshold is not None else "static"

    def static_query_sizes(self) -> list[int]:
        if self.options.fuse_block_store:
            return [self.block_size, 2 * self.block_size]  # a block alone, or stored block + next block
        return [self.block_size]

    def start(self, request: Request) -> None:
        super().start(request)
        params = request.params
        num_blocks = (self._region_end(request) - self._prefill_end(request)) // self.block_size
        steps = self.block_size if params.steps is None else max(1, params.steps // num_blocks)
        request.strategy_state.update(
            steps_per_block=steps, step=0, schedule=even_schedule(self.block_size, steps)
        )

    def _current_block(self, request: Request) -> tuple[int, int]:
        start = request.num_cached // self.block_size * self.block_size
        return start, start + self.block_size

    def _decode_block_start(self, request: Request) -> int:
        """Start of the block holding the first undecoded position (blocks decode left to right)."""
        first_mask = request.tokens.index(request.mask_token_id, request.num_prompt)
        return first_mask // self.block_size * self.block_size

    def _plan_fused(self, request: Request) -> SequencePlan:
        block_start = self._decode_block_start(request)
        state = request.strategy_state
        if state.get("block_start") != block_start:
            state["block_start"] = block_start
            state["step"] = 0
        state["phase"] = "denoise"
        query_end = block_start + self.block_size
        candidates = self.masked_positions(request, max(block_start, request.num_prompt), query_end)
        state["candidates"] = candidates
        return self._sequence(request, request.num_cached, query_end, block_start, candidates)

    def _sequence(
        self, request: Request, query_start: int, query_end: int, store_end: int, candidates: list[int]
    ) -> SequencePlan:
        """Query ``[query_start, query_end)`` over the cache before it; store ``[query_start, store_end)``."""
        positions = list(range(query_start, query_end))
        loop_counts, loop_threshold = (), None
        if store_end <= query_start and candidates:
            loop_counts, loop_threshold = self._loop(request, len(candidates))
        return SequencePlan(
            request_id=request.request_id,
            token_ids=request.tokens[query_start:query_end],
            positions=positions,
            block_ids=[p // self.block_size for p in positions],
            context_len=query_start,
            store_range=(0, store_end - query_start),
            sample_indices=[p - query_start for p in candidates],
            sample=self.sample_spec(request),
            loop_counts=loop_counts,
            loop_threshold=loop_threshold,
        )

    def _loop(self, request: Request, num_masked: int) -> tuple[tuple[int, ...], float | None]:
        """The unmask counts of this block's remaining denoise steps, for a device loop: the schedule
        from the current step until the block is surely decoded (each step takes at least its count)."""
        rule = self._remasking(request)
        if rule == "sequential":
            return (), None
        state = request.strategy_state
        schedule: list[int] = state["schedule"]
        counts: list[int] = []
        step = state["step"]
        while num_masked > 0 and len(counts) < MAX_LOOP_ITERATIONS:
            count = schedule[min(step, len(schedule) - 1)]
            if count <= 0 and step >= len(schedule) - 1:
                break  # a zero count from here on: the host would not progress either
            counts.append(count)
            num_masked -= min(count, num_masked)
            step += 1
        if rule != "dynamic":
            return tuple(counts), None
        threshold = request.params.threshold
        return tuple(counts), DEFAULT_DYNAMIC_THRESHOLD if threshold is None else threshold

    def plan(self, request: Request) -> SequencePlan:
        if self.options.fuse_block_store:
            return self._plan_fused(request)
        prefill_end = self._prefill_end(request)
        if request.num_cached < prefill_end:
            phase, query_start, query_end, candidates = "prefill", request.num_cached, prefill_end, []
        else:
            query_start, query_end = self._current_block(request)
            candidates = self.masked_positions(request, max(query_start, request.num_prompt), query_end)
            phase = "denoise" if candidates else "store"
        request.strategy_state["phase"] = phase
        request.strategy_state["candidates"] = candidates
        store_end = query_start if phase == "denoise" else query_end  # prefill and store forwards store
        return self._sequence(request, query_start, query_end, store_end, candidates)

    def num_query_tokens(self, request: Request) -> int:
        if self.options.fuse_block_store:
            return self._decode_block_start(request) + self.block_size - request.num_cached
        if request.num_cached < self._prefill_end(request):
            return self._prefill_end(request) - request.num_cached
        return self.block_size

    def kv_tokens_needed(self, request: Request) -> int:
        if self.options.fuse_block_store:
            return max(request.num_cached, self._decode_block_start(request))
        if request.num_cached < self._prefill_end(request):
            return self._prefill_end(request)
        return self._current_block(request)[1]

    def update(self, request: Request, output: SequenceOutput) -> bool:
        state = request.strategy_state
        phase = state["phase"]
        if phase == "prefill":
            return False
        if phase == "store":
            # The engine has advanced num_cached past the stored block: next block, fresh schedule.
            state["step"] = 0
            return request.num_cached >= self._region_end(request)
        candidates: list[int] = state["candidates"]
        count = min(state["schedule"][min(state["step"], len(state["schedule"]) - 1)], len(candidates))
        rule = self._remasking(request)
        if rule == "sequential":
            chosen = list(range(count))
            for index in chosen:
                request.tokens[candidates[index]] = int(output.token_ids[index])
        else:
            chosen_arr = select_top_k(output.confidences, count)
            if rule == "dynamic":
                threshold = request.params.threshold
                above = select_above(
                    output.confidences, DEFAULT_DYNAMIC_THRESHOLD if threshold is None else threshold
                )
                if above.shape[0] >= count:
                    chosen_arr = above
            self.commit(request, candidates, output, chosen_arr)
        state["step"] += 1
        if self.options.fuse_block_store:
            # Done once every position is decoded; the last block needs no store.
            return request.mask_token_id not in request.tokens[request.num_prompt :]
        return False
