"""Scheduler on CPU with a fake strategy: admission, token budget, preemption, fairness, no leaks."""

from __future__ import annotations

from diffulex.engine.kv_cache import KVCacheManager
from diffulex.engine.scheduler import Scheduler
from diffulex.request import Request, RequestStatus
from diffulex.sampling_params import SamplingParams
from diffulex.step import SequenceOutput, SequencePlan
from diffulex.strategies.base import Strategy, StrategyOptions


class GrowingStrategy(Strategy):
    """Stores one 4-token block per step; done after ``max_tokens / 4`` steps."""

    name = "fake"

    def generation_length(self, request: Request) -> int:
        return request.params.max_tokens

    def plan(self, request: Request) -> SequencePlan:
        raise NotImplementedError

    def update(self, request: Request, output: SequenceOutput) -> bool:
        request.num_cached = self.kv_tokens_needed(request)
        request.strategy_state["steps"] = request.strategy_state.get("steps", 0) + 1
        return request.num_cached >= len(request.tokens)

    def kv_tokens_needed(self, request: Request) -> int:
        return min(len(request.tokens), request.num_prompt + 4 * (request.strategy_state.get("steps", 0) + 1))

    def num_query_tokens(self, request: Request) -> int:
        return 4


OPTIONS = StrategyOptions(
    block_size=4, buffer_size=1, page_size=4, native_attention="bidirectional", vanilla_schedule="llada"
)


def make_request(rid: str, prompt_len: int = 4, max_tokens: int = 16) -> Request:
    return Request(
        rid, [7] * prompt_len, SamplingParams(max_tokens=max_tokens), mask_token_id=0, eos_token_ids=(1,)
    )


def run_to_completion(scheduler: Scheduler, max_steps: int = 500) -> tuple[list[str], int]:
    finished: list[str] = []
    preemptions = 0
    for _ in range(max_steps):
        if not scheduler.has_unfinished():
            break
        result = scheduler.schedule()
        preemptions += len(result.preempted)
        assert result.scheduled, "scheduler made no progress"
        for request in result.scheduled:
            if scheduler.strategy.update(request, SequenceOutput(None, None)):  # type: ignore[arg-type]
                scheduler.finish(request)
                finished.append(request.request_id)
    return finished, preemptions


def test_fifo_and_max_num_reqs() -> None:
    kv = KVCacheManager(num_pages=64, page_size=4)
    scheduler = Scheduler(kv, GrowingStrategy(OPTIONS), max_num_reqs=2, max_num_batched_tokens=1000)
    for i in range(5):
        scheduler.add(make_request(f"r{i}"))
    first = scheduler.schedule()
    assert [r.request_id for r in first.scheduled] == ["r0", "r1"]
    assert scheduler.num_running == 2 and scheduler.num_waiting == 3
    finished, preemptions = run_to_completion(scheduler)
    assert sorted(finished) == [f"r{i}" for i in range(5)] and preemptions == 0
    assert kv.is_whole()


def test_token_budget_limits_a_step_but_always_runs_one() -> None:
    kv = KVCacheManager(num_pages=64, page_size=4)
    scheduler = Scheduler(kv, GrowingStrategy(OPTIONS), max_num_reqs=8, max_num_batched_tokens=8)
    for i in range(4):
        scheduler.add(make_request(f"r{i}"))
    assert len(scheduler.schedule().scheduled) == 2
    tiny = Scheduler(
        KVCacheManager(64, 4), GrowingStrategy(OPTIONS), max_num_reqs=8, max_num_batched_tokens=1
    )
    tiny.add(make_request("big"))
    assert [r.request_id for r in tiny.schedule().scheduled] == ["big"]


def test_preemption_under_page_pressure_requeues_newest_and_finishes_all() -> None:
    # Each request ends at 4 + 16 = 20 tokens = 5 pages; 8 pages cannot hold three of them.
    kv = KVCacheManager(num_pages=8, page_size=4)
    scheduler = Scheduler(kv, GrowingStrategy(OPTIONS), max_num_reqs=4, max_num_batched_tokens=1000)
    requests = [make_request(f"r{i}") for i in range(3)]
    for request in requests:
        scheduler.add(request)
    finished, preemptions = run_to_completion(scheduler)
    assert sorted(finished) == ["r0", "r1", "r2"]
    assert preemptions > 0
    assert requests[0].num_preemptions == 0  # the oldest request is never the victim
    assert all(r.status is RequestStatus.FINISHED for r in requests)
    assert kv.is_whole()


def test_finish_of_waiting_request_removes_it() -> None:
    kv = KVCacheManager(num_pages=8, page_size=4)
    scheduler = Scheduler(kv, GrowingStrategy(OPTIONS), max_num_reqs=1, max_num_batched_tokens=100)
    a, b = make_request("a"), make_request("b")
    scheduler.add(a)
    scheduler.add(b)
    scheduler.schedule()
    scheduler.finish(b)  # abort while waiting
    scheduler.finish(a)  # abort while running
    assert not scheduler.has_unfinished() and kv.is_whole()
