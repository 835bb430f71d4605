"""``vanilla``: the reference loops, full recompute of the whole sequence at every step (no KV cache).

LLaDA schedule (ML-GSAI ``generate``): the region is split into blocks decoded left to right; each block
gets ``steps / num_blocks`` steps and its masks are split evenly over them (remainder first); exactly that
many forwards, zero-commit steps included. With ``threshold`` it follows Fast-dLLM's no-cache
``generate``: per block, loop until the block has no mask, committing the most confident token plus all
with confidence ≥ threshold (float64 softmax).
Dream schedule (``diffusion_generate``): no blocks; step i unmasks ``int(n·(1 − t[i+1]/t[i]))`` of the
row's ``n`` masks over ``linspace(1, 1e-3, steps+1)``, all remaining at the last step. With ``threshold``
it follows Dream's ``confidence_threshold`` (per-step quota, carry-over and extra steps).
"""

from __future__ import annotations

from diffulex.request import Request
from diffulex.sampling.selection import (
    dream_timesteps,
    dream_transfer_count,
    even_schedule,
    select_threshold_at_least_one,
    select_top_k,
)
from diffulex.step import SequenceOutput, SequencePlan
from diffulex.strategies.base import Strategy, register_strategy


@register_strategy
class VanillaStrategy(Strategy):
    """Full-recompute decoding with the family's published step schedule (see module docstring)."""

    name = "vanilla"

    def _block_length(self, request: Request) -> int:
        return min(self.block_size, request.params.max_tokens)

    def _schedule_kind(self) -> str:
        return self.options.vanilla_schedule

    def validate(self, request: Request) -> None:
        params = request.params
        if self._schedule_kind() == "dream":
            if params.threshold is not None and params.max_tokens % params.total_steps != 0:
                raise ValueError(
                    f"Dream threshold decoding needs steps ({params.total_steps}) to divide "
                    f"max_tokens ({params.max_tokens})"
                )
            return
        block = self._block_length(request)
        if params.max_tokens % block != 0:
            raise ValueError(f"block_size ({block}) must divide max_tokens ({params.max_tokens})")
        num_blocks = params.max_tokens // block
        if params.threshold is None and params.total_steps % num_blocks != 0:
            raise ValueError(
                f"steps ({params.total_steps}) must be a multiple of the number of blocks ({num_blocks})"
            )

    def generation_length(self, request: Request) -> int:
        return request.params.max_tokens

    def start(self, request: Request) -> None:
        super().start(request)
        params = request.params
        state = request.strategy_state
        state["step"] = 0
        if self._schedule_kind() == "dream":
            state["steps"] = params.total_steps
            state["timesteps"] = dream_timesteps(params.total_steps)
            state["quota"] = params.max_tokens // params.total_steps
            state["carry"] = 0
        else:
            block = self._block_length(request)
            state["block"] = 0
            state["num_blocks"] = params.max_tokens // block
            state["steps_per_block"] = params.total_steps // state["num_blocks"]

    # ----- planning -----------------------------------------------------------------------------------
    def _candidate_range(self, request: Request) -> tuple[int, int]:
        if self._schedule_kind() == "dream":
            return request.num_prompt, len(request.tokens)
        block = self._block_length(request)
        start = request.num_prompt + request.strategy_state["block"] * block
        return start, start + block

    def plan(self, request: Request) -> SequencePlan:
        length = len(request.tokens)
        positions = list(range(length))
        block_ids = self.native_block_ids(positions)
        start, end = self._candidate_range(request)
        candidates = self.masked_positions(request, start, end)
        request.strategy_state["candidates"] = candidates
        float64 = request.params.threshold is not None and self._schedule_kind() == "llada"
        spec = self.sample_spec(request, softmax_dtype="float64" if float64 else "logits")
        uncond = None
        if request.params.cfg_scale > 0:
            # Unconditional twin: the prompt replaced by masks (ML-GSAI's CFG).
            uncond_tokens = [request.mask_token_id] * request.num_prompt + request.tokens[
                request.num_prompt :
            ]
            uncond = SequencePlan(
                request.request_id,
                uncond_tokens,
                positions,
                block_ids,
                sample_indices=candidates,
                sample=spec,
            )
        return SequencePlan(
            request_id=request.request_id,
            token_ids=list(request.tokens),
            positions=positions,
            block_ids=block_ids,
            sample_indices=candidates,
            sample=spec,
            uncond=uncond,
        )

    def num_query_tokens(self, request: Request) -> int:
        factor = 2 if request.params.cfg_scale > 0 else 1
        return factor * (request.num_prompt + self.generation_length(request))

    def kv_tokens_needed(self, request: Request) -> int:
        return 0  # full recompute: nothing is cached

    # ----- update -------------------------------------------------------------------------------------
    def update(self, request: Request, output: SequenceOutput) -> bool:
        if self._schedule_kind() == "dream":
            return self._update_dream(request, output)
        return self._update_llada(request, output)

    def _update_llada(self, request: Request, output: SequenceOutput) -> bool:
        state = request.strategy_state
        candidates: list[int] = state["candidates"]
        threshold = request.params.threshold
        if threshold is not None:
            chosen = select_threshold_at_least_one(output.confidences, threshold)
            self.commit(request, candidates, output, chosen)
            start, end = self._candidate_range(request)
            if not self.masked_positions(request, start, end):
                state["block"] += 1
            return state["block"] >= state["num_blocks"]
        if state["step"] == 0:
            # The block's schedule is fixed at its start from its actual mask count.
            state["schedule"] = even_schedule(len(candidates), state["steps_per_block"])
        count = state["schedule"][state["step"]]
        self.commit(request, candidates, output, select_top_k(output.confidences, count))
        state["step"] += 1
        if state["step"] == state["steps_per_block"]:
            state["step"] = 0
            state["block"] += 1
        return state["block"] >= state["num_blocks"]

    def _update_dream(self, request: Request, output: SequenceOutput) -> bool:
        state = request.strategy_state
        candidates: list[int] = state["candidates"]
        step, steps = state["step"], state["steps"]
        threshold = request.params.threshold
        if threshold is None:
            count = dream_transfer_count(len(candidates), step, steps, state["timesteps"])
            self.commit(request, candidates, output, select_top_k(output.confidences, count))
        else:
            quota = state["quota"] + state["carry"]
            state["carry"] = 0
            order = select_top_k(output.confidences, quota)
            keep = output.confidences[order] >= threshold
            if keep.shape[0]:
                keep[0] = True  # the most confident candidate is always committed
            # Ranks past the real candidates have confidence -inf in Dream's topk and count as dropped;
            # rank 0 counts as committed even then (it rewrites a non-mask with itself).
            committed = int(keep.sum()) if keep.shape[0] else min(quota, 1)
            dropped = quota - committed
            self.commit(request, candidates, output, order[keep])
            state["carry"] = dropped
            if step == steps - 1 and dropped:
                # Dream grows the step count at the last step while tokens were held back.
                state["quota"] = 0
                state["steps"] += dropped
        state["step"] += 1
        return state["step"] >= state["steps"]
