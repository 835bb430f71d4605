"""The engine: the step loop that ties scheduler, strategy and runner together.

One ``step()``: the scheduler picks the requests (admission, preemption), the strategy plans each
request's query, the engine packs them into one StepPlan, the runner executes it, the strategy applies
the predictions, and the engine finishes requests (stop conditions, errors) and frees their pages.
"""

from __future__ import annotations

import itertools
import logging
import time
import zlib
from typing import Any

import numpy as np

from diffulex.config import EngineConfig
from diffulex.engine.kv_cache import KVCacheManager
from diffulex.engine.model_runner import ModelRunner
from diffulex.engine.scheduler import Scheduler
from diffulex.engine.stop_checker import find_stop
from diffulex.engine.tp_runner import TensorParallelRunner, create_runner
from diffulex.models.loader import load_tokenizer
from diffulex.request import Request, RequestOutput, RequestStatus
from diffulex.sampling_params import SamplingParams
from diffulex.step import SequenceOutput, SequencePlan, StepPlan
from diffulex.strategies import StrategyOptions, create_strategy

logger = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The waiting queue is at ``max_waiting_reqs``; retry later."""


class Engine:
    """Owns the runner, the KV-cache manager, the scheduler, the strategy and every live request."""

    def __init__(self, config: EngineConfig, runner: ModelRunner | TensorParallelRunner | None = None):
        self.config = config
        self.runner = runner or create_runner(config)
        try:
            self._set_up(config)
        except BaseException:
            if runner is None:  # ours: its tensor-parallel workers must not outlive a failed start
                self.close()
            raise

    def _set_up(self, config: EngineConfig) -> None:
        """Strategy, CUDA graphs, KV-cache manager, scheduler and tokenizer over the built runner."""
        spec = self.runner.spec
        self.spec = spec
        self.max_model_len = self.runner.max_model_len
        self.mask_token_id = config.mask_token_id if config.mask_token_id is not None else spec.mask_token_id
        self.eos_token_ids = tuple(spec.eos_token_ids)
        self.strategy_name = config.strategy or spec.default_strategy
        block_size = config.block_size or spec.default_block_size
        schedule = spec.vanilla_schedule if config.vanilla_schedule == "auto" else config.vanilla_schedule
        self.strategy = create_strategy(
            self.strategy_name,
            StrategyOptions(
                block_size=block_size,
                buffer_size=config.buffer_size,
                page_size=config.page_size,
                native_attention=spec.native_attention,
                vanilla_schedule=schedule,
                cache_mode=config.cache_mode,
                block_add_threshold=config.block_add_threshold,
                decoded_token_threshold=config.decoded_token_threshold,
                remasking=config.remasking,
                fuse_block_store=config.fuse_block_store,
                small_block_size=config.small_block_size,
                use_block_cache=config.use_block_cache,
                shift_logits=spec.shift_logits,
            ),
        )
        self.block_size = block_size
        # Fixed denoise sizes (may be none: then only one-request steps are captured).
        self.runner.enable_cuda_graphs(self.strategy.static_query_sizes(), self.mask_token_id)
        self.kv_cache = KVCacheManager(self.runner.num_pages, config.page_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            self.kv_cache, self.strategy, config.max_num_reqs, config.max_num_batched_tokens
        )
        self.tokenizer = load_tokenizer(config.model, base_model=config.base_model)
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self.num_steps = 0

    # ----- requests -----------------------------------------------------------------------------------
    def add_request(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> str:
        """Validate and enqueue a request; bad input raises ValueError and changes nothing, a broken engine
        (``unhealthy_reason``) RuntimeError."""
        broken = self.unhealthy_reason()
        if broken is not None:
            raise RuntimeError(f"the engine cannot serve: {broken}")
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        vocab = self.spec.vocab_size
        bad = [t for t in prompt_ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids must be integers in [0, {vocab}); got {bad[:5]}")
        if self.scheduler.num_waiting >= self.config.max_waiting_reqs:
            raise QueueFullError(f"the waiting queue is full ({self.config.max_waiting_reqs} requests)")
        # A stable hash (Python's str hash changes per process): the same id and engine seed, the same noise.
        seed = (
            params.seed
            if params.seed is not None
            else zlib.crc32(f"{self.config.seed}:{request_id}".encode())
        )
        request = Request(
            request_id=request_id,
            prompt_ids=list(prompt_ids),
            params=params,
            mask_token_id=self.mask_token_id,
            eos_token_ids=self.eos_token_ids,
            seed=seed,
        )
        self.strategy.validate(request)
        total = request.num_prompt + self.strategy.generation_length(request)
        if total > self.max_model_len:
            raise ValueError(
                f"prompt ({request.num_prompt} tokens) plus the generation region ({total - request.num_prompt} "
                f"tokens) exceeds max_model_len ({self.max_model_len})"
            )
        if self.kv_cache.pages_for(total) > self.kv_cache.num_pages:
            raise ValueError(
                f"the request needs {self.kv_cache.pages_for(total)} KV pages but the cache has "
                f"{self.kv_cache.num_pages}; raise kv_cache_memory_gb or lower max_tokens"
            )
        request.buffer.capacity = self.strategy.buffer_capacity(request)
        self.requests[request_id] = request
        self.scheduler.add(request)
        return request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its pages (no-op for unknown or finished ids)."""
        request = self.requests.get(request_id)
        if request is None or request.is_finished:
            return None
        return self._finish(request, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def unhealthy_reason(self) -> str | None:
        """Why the engine cannot run steps any more (a tensor-parallel rank died), or None."""
        return getattr(self.runner, "failure", None)

    def close(self) -> None:
        """Release what the runner holds outside this process (tensor-parallel workers); idempotent."""
        close = getattr(self.runner, "close", None)
        if close is not None:
            close()

    # ----- one step -----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one step; return the requests that finished in it."""
        broken = self.unhealthy_reason()
        if broken is not None:  # nothing can run any more: every pending request fails now, not later
            pending = [r for r in self.requests.values() if not r.is_finished]
            return [self._fail(request, f"model step failed: {broken}") for request in pending]
        schedule = self.scheduler.schedule()
        requests = schedule.scheduled
        if not requests:
            return []
        finished: list[RequestOutput] = []
        plans: list[SequencePlan] = []
        for request in list(requests):
            try:
                plan = self.strategy.plan(request)
                plan.step_index = request.num_steps
                plans.append(plan)
            except Exception as error:  # a strategy bug fails one request, never the engine
                logger.exception("planning failed for %s", request.request_id)
                requests.remove(request)
                finished.append(self._fail(request, f"planning failed: {error}"))
        if not requests:
            return finished
        step_plan = StepPlan.pack(
            plans, [r.page_table for r in requests], self.config.page_size, self.spec.shift_logits
        )
        try:
            output = self.runner.execute(
                step_plan, self.mask_token_id, self.config.denoise_iterations_per_sync
            )
        except Exception as error:
            logger.exception("model step failed for %d requests", len(requests))
            return finished + [self._fail(r, f"model step failed: {error}") for r in requests]
        self.num_steps += 1
        uncond = set(step_plan.cfg_pairs.values())
        outputs = [out for index, out in enumerate(output.sequences) if index not in uncond]
        # (request, its loop plan, its index in the step, the output row of each of its sampled indices)
        looping: list[tuple[Request, SequencePlan, int, dict[int, int]]] = []
        for index, (request, plan, seq_output) in enumerate(zip(requests, plans, outputs)):
            result = self._apply(request, plan, seq_output)
            if result is not None:
                finished.append(result)
            elif output.iterations and self._device_agreed(request, plan, plan, seq_output):
                row_of = {query_index: row for row, query_index in enumerate(plan.sample_indices)}
                looping.append((request, plan, index, row_of))
        # Device-loop iterations: replayed one by one through the strategy, as if each were a step.
        for iteration in output.iterations:
            still: list[tuple[Request, SequencePlan, int, dict[int, int]]] = []
            for request, loop_plan, index, row_of in looping:
                plan = self._replan_in_loop(request, loop_plan, row_of)
                if plan is None:
                    continue
                rows = np.asarray([row_of[j] for j in plan.sample_indices], dtype=np.int64)
                loop_output = iteration[index]
                seq_output = SequenceOutput(
                    loop_output.token_ids[rows], loop_output.confidences[rows], failed=loop_output.failed
                )
                result = self._apply(request, plan, seq_output)
                if result is not None:
                    finished.append(result)
                elif self._device_agreed(request, loop_plan, plan, loop_output):
                    still.append((request, loop_plan, index, row_of))
            looping = still
        return finished

    def _apply(
        self, request: Request, plan: SequencePlan, seq_output: SequenceOutput
    ) -> RequestOutput | None:
        """One forward's predictions through the strategy; the request's output if it finished."""
        request.num_forwards += 2 if plan.uncond is not None else 1
        request.num_steps += 1
        if seq_output.failed:
            return self._fail(request, "the model produced NaN logits")
        try:
            self._advance_cache(request, plan)
            done = self.strategy.update(request, seq_output)
        except Exception as error:
            logger.exception("update failed for %s", request.request_id)
            return self._fail(request, f"update failed: {error}")
        return self._check_finished(request, done)

    def _replan_in_loop(
        self, request: Request, loop_plan: SequencePlan, row_of: dict[int, int]
    ) -> SequencePlan | None:
        """The strategy's plan for the next loop iteration, or None when it left the loop's query (the
        block finished): the device's remaining iterations for this request are then unused."""
        plan = self.strategy.plan(request)
        plan.step_index = request.num_steps
        same_query = plan.positions == loop_plan.positions and plan.store_range[1] <= plan.store_range[0]
        if not same_query or not plan.sample_indices or any(j not in row_of for j in plan.sample_indices):
            return None
        return plan

    def _device_agreed(
        self, request: Request, loop_plan: SequencePlan, plan: SequencePlan, output: SequenceOutput
    ) -> bool:
        """Whether the strategy committed exactly the positions the device accepted in this iteration, so
        the device's next iteration started from the request's real tokens."""
        if output.accepted is None:
            return False
        device = {
            loop_plan.positions[j] for j, taken in zip(loop_plan.sample_indices, output.accepted) if taken
        }
        mask = request.mask_token_id
        host = {plan.positions[j] for j in plan.sample_indices if request.tokens[plan.positions[j]] != mask}
        if device != host:
            logger.warning(
                "device loop diverged from the strategy for %s; continuing per step", request.request_id
            )
            return False
        return True

    def _advance_cache(self, request: Request, plan: SequencePlan) -> None:
        low, high = plan.store_range
        if high > low:
            request.num_cached = max(request.num_cached, plan.positions[high - 1] + 1)
            if self.strategy.uses_prefix_cache:
                self.kv_cache.register(request, request.num_cached)

    def _check_finished(self, request: Request, done: bool) -> RequestOutput | None:
        limit = min(request.decoded_prefix_end(), request.num_prompt + request.params.max_tokens)
        cut = find_stop(request, limit, self.tokenizer)
        if cut is not None:
            return self._finish(request, "stop", request.tokens[request.num_prompt : cut])
        if done:
            end = request.num_prompt + request.params.max_tokens
            return self._finish(request, "length", request.tokens[request.num_prompt : end])
        return None

    def _fail(self, request: Request, message: str) -> RequestOutput:
        request.error = message
        return self._finish(request, "error")

    def _finish(self, request: Request, reason: str, token_ids: list[int] | None = None) -> RequestOutput:
        self.scheduler.finish(request)
        request.finish_reason = reason
        request.finish_time = time.monotonic()
        request.output_ids = list(token_ids or [])
        self.requests.pop(request.request_id, None)
        text = None
        if self.tokenizer is not None and request.output_ids:
            text = self.tokenizer.decode(request.output_ids, skip_special_tokens=True)
        elif self.tokenizer is not None:
            text = ""
        if request.stop_text_cut is not None and text is not None:
            text = text[: request.stop_text_cut]
        return RequestOutput(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_ids,
            token_ids=request.output_ids,
            finish_reason=reason,
            num_forwards=request.num_forwards,
            text=text,
            error=request.error,
            num_preemptions=request.num_preemptions,
            num_prefix_hit_tokens=request.num_prefix_hit,
            latency_s=request.finish_time - request.arrival_time,
        )

    # ----- introspection ------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        return {
            "num_waiting": self.scheduler.num_waiting,
            "num_running": self.scheduler.num_running,
            "kv_pages_total": self.kv_cache.num_pages,
            "kv_pages_free": self.kv_cache.num_free_pages,
            "prefix_hit_rate": self.kv_cache.prefix_hit_rate,
            "num_steps": self.num_steps,
        }


__all__ = ["Engine", "QueueFullError", "RequestStatus"]
