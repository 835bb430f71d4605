"""The block scheduler: which requests run this step. Pure Python, no tensors.

Running requests go first, oldest first (FIFO); each needs its next step's query tokens within the
step's token budget and pages for the K/V it will store. When pages run out, the most recently admitted
running request is preempted: its pages are freed and it goes back to the front of the waiting queue,
to restart from its prompt (greedy output is unchanged by construction). Waiting requests are admitted
while there is room (``max_num_reqs``, token budget, pages), adopting cached prefix pages first.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from diffulex.engine.kv_cache import KVCacheManager
from diffulex.request import Request, RequestStatus
from diffulex.strategies.base import Strategy


@dataclass
class ScheduleResult:
    """The hand-off to the engine: requests to run now, and those preempted while scheduling."""

    scheduled: list[Request] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    admitted: list[Request] = field(default_factory=list)


class Scheduler:
    """Owns the waiting queue and the running list; admits, preempts and frees."""

    def __init__(
        self,
        kv_cache: KVCacheManager,
        strategy: Strategy,
        max_num_reqs: int,
        max_num_batched_tokens: int,
    ):
        self.kv_cache = kv_cache
        self.strategy = strategy
        self.max_num_reqs = max_num_reqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    # ----- one step -----------------------------------------------------------------------------------
    def schedule(self) -> ScheduleResult:
        result = ScheduleResult()
        budget = self.max_num_batched_tokens
        for request in list(self.running):
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            tokens = self.strategy.num_query_tokens(request)
            if tokens > budget and result.scheduled:
                continue  # waits for a later step; never preempted for the token budget
            if not self._reserve(request, result):
                continue
            result.scheduled.append(request)
            budget -= tokens
        while self.waiting and len(self.running) < self.max_num_reqs:
            request = self.waiting[0]
            if not self._admit(request, budget, bool(result.scheduled)):
                break
            self.waiting.popleft()
            self.running.append(request)
            result.admitted.append(request)
            result.scheduled.append(request)
            budget -= self.strategy.num_query_tokens(request)
        return result

    def _reserve(self, request: Request, result: ScheduleResult) -> bool:
        """Ensure pages for the request's next step, preempting newer requests if needed."""
        needed = self.strategy.kv_tokens_needed(request)
        while not self.kv_cache.can_allocate(request, needed):
            victim = next(
                (r for r in reversed(self.running) if r is not request and r not in result.scheduled),
                request,
            )
            self.preempt(victim)
            result.preempted.append(victim)
            if victim is request:
                return False
        self.kv_cache.allocate(request, needed)
        return True

    def _admit(self, request: Request, budget: int, have_batch: bool) -> bool:
        """Start the request (prefix hits, first pages) when it fits now; leave it waiting otherwise."""
        request.reset()
        self.strategy.start(request)
        if self.strategy.uses_prefix_cache:
            request.num_cached = self.kv_cache.match_prefix(
                request, self.strategy.prefix_cacheable_len(request), align=self.strategy.block_size
            )
            request.num_prefix_hit = request.num_cached
        tokens = self.strategy.num_query_tokens(request)
        needed = self.strategy.kv_tokens_needed(request)
        if (tokens > budget and have_batch) or not self.kv_cache.can_allocate(request, needed):
            self.kv_cache.free(request)  # give back adopted prefix pages
            request.reset()
            return False
        self.kv_cache.allocate(request, needed)
        request.status = RequestStatus.RUNNING
        return True

    def preempt(self, request: Request) -> None:
        """Free the request's pages and requeue it at the front; it restarts from its prompt."""
        self.kv_cache.free(request)
        self.running.remove(request)
        request.reset()
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.waiting.appendleft(request)

    def finish(self, request: Request) -> None:
        """Release a finished (or failed, or aborted) request's pages and drop it from the queues."""
        self.kv_cache.free(request)
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = RequestStatus.FINISHED
