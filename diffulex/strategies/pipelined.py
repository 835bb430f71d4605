"""Pipelined multi-block decoding: ``d2f`` (Discrete Diffusion Forcing) and ``multi_bd`` (Diffulex MultiBD).

Several consecutive blocks denoise at once in the request's Block Buffer, under block-causal attention
(a block sees the prompt, earlier blocks and itself, never later blocks). Before each forward:
  * at most one new masked block is added, when the buffer has room, the newest block's decoded fraction
    is ≥ ``block_add_threshold`` (the prompt counts as decoded), the region is not exhausted and — unless
    ``ignore_eos`` — no EOS has been committed;
  * a block becomes *fully active* once its predecessor's decoded fraction is ≥
    ``decoded_token_threshold`` (the flag never resets; the first block is fully active at once).
Each step is one forward over every uncached position. Every masked position whose confidence is strictly
above ``threshold`` is committed; a fully active block where none passes commits its single most
confident position; a semi-active block commits nothing else. A block's K/V are stored in the first
forward after it and every earlier block are fully decoded (exact: attention is block-causal), and the
block then leaves the buffer.

``d2f``: the prompt is block 0 of its own length (bidirectional within itself); generated blocks follow it
(``max_tokens / block_size`` of them); the buffer is unbounded unless ``buffer_size`` is set.
``multi_bd``: blocks are absolute (``position // block_size``), the prompt's full blocks are cached
context (prefix caching on), a partial last prompt block is the first running block with its prompt
tokens fixed, and at most ``buffer_size`` blocks are in the buffer.
"""

from __future__ import annotations

from bisect import bisect_left

from diffulex.block_buffer import Block, BlockState
from diffulex.request import Request
from diffulex.sampling.selection import select_above, select_top_k
from diffulex.step import SequenceOutput, SequencePlan
from diffulex.strategies.base import Strategy, register_strategy

DEFAULT_ACCEPT_THRESHOLD = 0.9


class PipelinedStrategy(Strategy):
    """Shared machinery of ``d2f`` and ``multi_bd`` (see module docstring)."""

    prompt_is_block: bool = False

    # ----- geometry -----------------------------------------------------------------------------------
    def _first_block_start(self, request: Request) -> int:
        if self.prompt_is_block:
            return request.num_prompt
        return request.num_prompt // self.block_size * self.block_size

    def _region_end(self, request: Request) -> int:
        if self.prompt_is_block:
            return request.num_prompt + request.params.max_tokens // self.block_size * self.block_size
        total = request.num_prompt + request.params.max_tokens
        return -(-total // self.block_size) * self.block_size

    def _block_ids(self, request: Request, start: int, end: int) -> list[int]:
        """Block ids of positions ``[start, end)``: d2f's prompt is block 0, then one id per block."""
        size = self.block_size
        if not self.prompt_is_block:
            return [p // size for p in range(start, end)]
        prompt = request.num_prompt
        ids = [0] * max(0, min(end, prompt) - start)
        ids += [1 + (p - prompt) // size for p in range(max(start, prompt), end)]  # generated: 1, 2, ...
        return ids

    def generation_length(self, request: Request) -> int:
        return self._region_end(request) - request.num_prompt

    def static_query_sizes(self) -> list[int]:
        size = self._default_buffer_size()
        return [] if size is None else [size * self.block_size]

    def _default_buffer_size(self) -> int | None:
        return self.options.buffer_size

    def buffer_capacity(self, request: Request) -> int:
        if self.options.buffer_size is not None:
            return self.options.buffer_size
        # Unbounded (D2F's own loop): room for every block of the generation.
        return max(1, self.generation_length(request) // self.block_size + 1)

    def start(self, request: Request) -> None:
        super().start(request)
        first = self._first_block_start(request)
        request.strategy_state.update(eos_committed=False, added_end=first)
        if first < request.num_prompt:
            # A partial last prompt block is running from the start; it is not one of the step's adds.
            request.buffer.add(first, self.block_size, fully_active=True)
            request.strategy_state["added_end"] = first + self.block_size

    def _decoded_fraction(self, request: Request, block: Block) -> float:
        masked = request.tokens[block.start : block.end].count(request.mask_token_id)
        return 1.0 - masked / block.size

    def _threshold(self, request: Request) -> float:
        threshold = request.params.threshold
        return DEFAULT_ACCEPT_THRESHOLD if threshold is None else threshold

    # ----- before the forward -------------------------------------------------------------------------
    def _maybe_add_block(self, request: Request) -> None:
        state = request.strategy_state
        buffer = request.buffer
        start = state["added_end"]
        if not buffer.has_room or start >= self._region_end(request):
            return
        if state["eos_committed"] and not request.params.ignore_eos:
            return
        newest = buffer.newest
        if newest is not None and self._decoded_fraction(request, newest) < self.options.block_add_threshold:
            return
        first = start == self._first_block_start(request)
        buffer.add(start, self.block_size, fully_active=first)
        state["added_end"] = start + self.block_size

    def _activate(self, request: Request) -> None:
        # The predecessor of the oldest buffered block is cached (or the prompt): fully decoded.
        previous_fraction = 1.0
        for block in request.buffer.blocks:
            if not block.fully_active and previous_fraction >= self.options.decoded_token_threshold:
                block.fully_active = True
            previous_fraction = self._decoded_fraction(request, block)

    def plan(self, request: Request) -> SequencePlan:
        self._maybe_add_block(request)
        self._activate(request)
        blocks = request.buffer.blocks
        query_start = request.num_cached
        query_end = blocks[-1].end if blocks else query_start
        # Store the leading run of fully decoded positions: the uncached prompt and complete blocks.
        store_end = max(query_start, min(self._first_block_start(request), query_end))
        for block in blocks:
            if block.state is not BlockState.COMPLETE:
                break
            store_end = block.end
        positions = list(range(query_start, query_end))
        candidates = self.masked_positions(request, max(query_start, request.num_prompt), query_end)
        request.strategy_state["candidates"] = candidates
        request.strategy_state["store_end"] = store_end
        return SequencePlan(
            request_id=request.request_id,
            token_ids=request.tokens[query_start:query_end],
            positions=positions,
            block_ids=self._block_ids(request, query_start, query_end),
            context_len=query_start,
            store_range=(0, store_end - query_start),
            sample_indices=[p - query_start for p in candidates],
            sample=self.sample_spec(request),
        )

    def num_query_tokens(self, request: Request) -> int:
        blocks = request.buffer.blocks
        end = blocks[-1].end if blocks else request.strategy_state.get("added_end", request.num_cached)
        if request.buffer.has_room:
            end = min(end + self.block_size, self._region_end(request))
        return max(end - request.num_cached, 1)

    def kv_tokens_needed(self, request: Request) -> int:
        blocks = request.buffer.blocks
        end = self._first_block_start(request)
        for block in blocks:
            if block.state is not BlockState.COMPLETE:
                break
            end = block.end
        return max(end, request.num_cached)

    # ----- after the forward --------------------------------------------------------------------------
    def update(self, request: Request, output: SequenceOutput) -> bool:
        state = request.strategy_state
        candidates: list[int] = state["candidates"]
        threshold = self._threshold(request)
        eos_ids = set(request.eos_token_ids)
        mask = request.mask_token_id
        tokens = request.tokens
        index = 0
        for block in request.buffer.blocks:
            end = block.end
            if end <= state["store_end"]:
                block.state = BlockState.CACHED
            lo = index
            index = bisect_left(candidates, end, lo)  # candidates are sorted: this block's slice
            if index == lo:
                continue
            confidences = output.confidences[lo:index]
            chosen = select_above(confidences, threshold)
            if chosen.shape[0] == 0 and block.fully_active:
                chosen = select_top_k(confidences, 1)
            for choice in chosen.tolist():
                token = int(output.token_ids[lo + choice])
                tokens[candidates[lo + choice]] = token
                if token in eos_ids:
                    state["eos_committed"] = True
            if mask not in tokens[block.start : end]:
                block.state = BlockState.COMPLETE
        request.buffer.pop_cached()
        all_decoded = all(block.state is BlockState.COMPLETE for block in request.buffer.blocks)
        can_add = state["added_end"] < self._region_end(request) and not (
            state["eos_committed"] and not request.params.ignore_eos
        )
        return all_decoded and not can_add


@register_strategy
class D2FStrategy(PipelinedStrategy):
    """D2F pipelined decoding: the prompt is block 0; unbounded buffer unless ``buffer_size`` is set."""

    name = "d2f"
    prompt_is_block = True

    def validate(self, request: Request) -> None:
        if request.params.max_tokens % self.block_size != 0:
            raise ValueError(
                f"block_size ({self.block_size}) must divide max_tokens ({request.params.max_tokens})"
            )


@register_strategy
class MultiBDStrategy(PipelinedStrategy):
    """Diffulex MultiBD: absolute blocks, bounded buffer, prefix caching of the prompt's full blocks."""

    name = "multi_bd"
    uses_prefix_cache = True

    def _default_buffer_size(self) -> int | None:
        return self.options.buffer_size or 2

    def buffer_capacity(self, request: Request) -> int:
        return self.options.buffer_size or 2

    def prefix_cacheable_len(self, request: Request) -> int:
        return request.num_prompt // self.block_size * self.block_size
