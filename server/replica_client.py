"""The data-parallel engine client: N engine replicas (child processes) behind the ``EngineClient`` API.

Each new request goes to the live replica with the fewest unfinished requests (ties: the one that was
given fewer so far). A replica's reports arrive on its reader thread (``diffulex.engine.replica``) and
cross to the event loop with ``call_soon_threadsafe``, exactly as the single-engine client's updates do.
A replica that dies fails only its own pending requests ("replica N died: ..."), is no longer routed to,
and makes ``unhealthy_reason`` say so (``/health`` answers 503 with that reason).
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from diffulex.config import EngineConfig
from diffulex.engine.engine import QueueFullError
from diffulex.engine.replica import ReplicaProcess
from diffulex.engine.replica_messages import AbortCommand, AddCommand, Rejection, ReplicaOptions, Report
from diffulex.models.loader import load_tokenizer
from diffulex.request import RequestOutput
from diffulex.sampling_params import SamplingParams

from .engine_client import RequestUpdate

logger = logging.getLogger(__name__)

# Engine gauges summed over the live replicas (a dead replica's last numbers no longer describe anything).
SUMMED_STATS = ("num_waiting", "num_running", "kv_pages_total", "kv_pages_free")


@dataclass
class ServedEngine:
    """What the routes read from ``client.engine`` when the engines live in replica processes: the
    launch config, the tokenizer (loaded in the server process) and the model facts replica 0 reported."""

    config: EngineConfig
    tokenizer: Any
    strategy_name: str
    mask_token_id: int
    max_model_len: int


@dataclass
class _Pending:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    replica: int
    prompt_ids: list[int]


def _rejection_error(rejection: Rejection) -> Exception:
    """The exception ``Engine.add_request`` would have raised in-process (the routes map it to 400/429)."""
    if rejection.kind == "queue_full":
        return QueueFullError(rejection.message)
    if rejection.kind == "invalid":
        return ValueError(rejection.message)
    return RuntimeError(rejection.message)


class DataParallelClient:
    """Owns ``config.data_parallel_size`` replica processes; same ``generate``/``abort``/``stats``/
    ``shutdown`` interface (and metrics counters) as ``EngineClient``."""

    def __init__(
        self,
        config: EngineConfig,
        heartbeat_timeout_s: float = 30.0,
        startup_timeout_s: float = 600.0,
        heartbeat_s: float = 0.2,
    ):
        size = config.data_parallel_size
        # On CPU the replicas share the host's cores; on GPUs each replica has its own device.
        options = ReplicaOptions(heartbeat_s=heartbeat_s, cpu_threads=max(1, (os.cpu_count() or 1) // size))
        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}
        self._ids = itertools.count()
        self._draining = False
        self._stopping = False
        self._stopped = False
        self.started_at = time.time()
        self.counts = {"finished": 0, "error": 0, "abort": 0}
        self.num_forwards_total = 0
        self.num_tokens_total = 0
        self.step_latencies: list[float] = []  # seconds, drained by the metrics endpoint
        self._load = [0] * size  # unfinished requests per replica, as this client sees them
        self._num_routed = [0] * size
        self._replica_stats: list[dict[str, Any]] = [{} for _ in range(size)]
        # The tokenizer first: a bad checkpoint fails here, before any process is started.
        tokenizer = load_tokenizer(config.model, base_model=config.base_model)
        self.replicas = [ReplicaProcess(i, config, options, heartbeat_timeout_s) for i in range(size)]
        try:
            infos = [replica.wait_ready(startup_timeout_s) for replica in self.replicas]  # built in parallel
        except BaseException:
            for replica in self.replicas:
                replica.stop(timeout_s=2.0)
            raise
        first = infos[0]
        self.engine = ServedEngine(
            config=config,
            tokenizer=tokenizer,
            strategy_name=first.strategy_name,
            mask_token_id=first.mask_token_id,
            max_model_len=first.max_model_len,
        )
        for replica in self.replicas:
            replica.start_reader(self._on_report, self._on_death)
        # Replica processes are not daemonic (a replica may later start TP workers): stop them at exit.
        atexit.register(self._stop_at_exit)

    # ----- public API ---------------------------------------------------------------------------------
    @property
    def accepting(self) -> bool:
        return not (self._stopping or self._draining)

    @property
    def alive(self) -> bool:
        """Whether every replica is alive (one dead replica makes the server unhealthy)."""
        return all(replica.alive for replica in self.replicas)

    @property
    def num_steps(self) -> int:
        return sum(stats.get("num_steps", 0) for stats in self._replica_stats)

    def unhealthy_reason(self) -> str | None:
        """Why ``/health`` should fail, or None when every replica serves."""
        if not self.accepting:
            return "the server is shutting down"
        dead = [f"replica {r.index} died: {r.death}" for r in self.replicas if r.death is not None]
        return "; ".join(dead) or None

    async def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        stream: str | None = None,
    ) -> AsyncIterator[RequestUpdate]:
        """Route one request to the least-loaded live replica and yield its updates; bad input raises
        ValueError (a full queue QueueFullError) before the first. Cancelling aborts the request."""
        if not self.accepting:
            raise RuntimeError("the server is shutting down")
        request_id = request_id or f"cmpl-{next(self._ids)}"
        pending = _Pending(asyncio.get_running_loop(), asyncio.Queue(), -1, list(prompt_ids))
        with self._lock:  # routing and sending under the lock: a replica's death is seen before or after
            if request_id in self._pending:
                raise ValueError(f"request id {request_id!r} is already in use")
            index = self._route()
            self.replicas[index].send(AddCommand(request_id, list(prompt_ids), params, stream))
            pending.replica = index
            self._pending[request_id] = pending
            self._load[index] += 1
            self._num_routed[index] += 1
        finished = False
        try:
            while True:
                item = await pending.queue.get()
                if isinstance(item, Rejection):
                    finished = True
                    raise _rejection_error(item)
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        with self._lock:
            pending = self._forget(request_id)
            replica = self.replicas[pending.replica] if pending is not None else None
            if replica is not None and replica.alive:
                replica.send(AbortCommand(request_id))  # its abort output comes back in a report

    def stats(self) -> dict[str, Any]:
        """Engine stats summed over the live replicas, plus ``replicas``: each one's own stats, liveness,
        and how many requests it holds (``num_pending``) and was given (``num_routed``)."""
        with self._lock:
            per_replica = [self._replica_entry(replica.index) for replica in self.replicas]
        live = [entry for entry in per_replica if entry["alive"]]
        totals: dict[str, Any] = {key: sum(entry.get(key, 0) for entry in live) for key in SUMMED_STATS}
        rates = [entry["prefix_hit_rate"] for entry in live if "prefix_hit_rate" in entry]
        totals["prefix_hit_rate"] = sum(rates) / len(rates) if rates else 0.0
        totals["num_steps"] = self.num_steps
        totals["replicas"] = per_replica
        return totals

    def shutdown(self, drain: bool = True, timeout_s: float = 30.0) -> None:
        """Stop accepting work; with ``drain`` let pending requests finish (up to ``timeout_s``); then stop
        every replica (what they still run is aborted and delivered as aborted)."""
        if self._stopped:
            return
        self._draining = True
        if drain:
            deadline = time.monotonic() + timeout_s
            while self._pending and time.monotonic() < deadline:
                time.sleep(0.01)
        self._stopping = True
        for replica in self.replicas:
            replica.request_stop()
        for replica in self.replicas:
            replica.stop()
        with self._lock:
            for request_id in list(self._pending):
                pending = self._forget(request_id)
                assert pending is not None
                self.counts["abort"] += 1
                output = RequestOutput(request_id, pending.prompt_ids, [], "abort", 0)
                self._deliver(pending, RequestUpdate(request_id, finished=True, output=output))
        self._stopped = True
        atexit.unregister(self._stop_at_exit)

    # ----- internals (the lock is held) -----------------------------------------------------------------
    def _route(self) -> int:
        live = [replica.index for replica in self.replicas if replica.alive]
        if not live:
            raise RuntimeError(f"no replica is serving: {self.unhealthy_reason()}")
        return min(live, key=lambda index: (self._load[index], self._num_routed[index]))

    def _forget(self, request_id: str) -> _Pending | None:
        pending = self._pending.pop(request_id, None)
        if pending is not None:
            self._load[pending.replica] -= 1
        return pending

    def _replica_entry(self, index: int) -> dict[str, Any]:
        replica = self.replicas[index]
        info = replica.info
        return {
            "index": index,
            "alive": replica.alive,
            "death": replica.death,
            "pid": replica.process.pid,
            "device": info.device if info is not None else None,
            "num_pending": self._load[index],
            "num_routed": self._num_routed[index],
            **self._replica_stats[index],
        }

    @staticmethod
    def _deliver(pending: _Pending, item: RequestUpdate | Rejection) -> None:
        pending.loop.call_soon_threadsafe(pending.queue.put_nowait, item)

    # ----- reader threads -----------------------------------------------------------------------------
    def _on_report(self, index: int, report: Report) -> None:
        with self._lock:
            if report.stats:
                self._replica_stats[index] = report.stats
            self.step_latencies.extend(report.step_latencies)
            for rejection in report.rejected:
                pending = self._pending.get(rejection.request_id)
                if pending is not None and pending.replica == index:
                    self._forget(rejection.request_id)
                    self._deliver(pending, rejection)
            for progress in report.progress:
                pending = self._pending.get(progress.request_id)
                if pending is not None and pending.replica == index:
                    update = RequestUpdate(progress.request_id, progress.new_token_ids, progress.snapshot)
                    self._deliver(pending, update)
            for output in report.finished:
                self._count(output)
                pending = self._pending.get(output.request_id)
                if pending is not None and pending.replica == index:
                    self._forget(output.request_id)
                    self._deliver(pending, RequestUpdate(output.request_id, finished=True, output=output))

    def _count(self, output: RequestOutput) -> None:
        reason = output.finish_reason
        self.counts["error" if reason == "error" else "abort" if reason == "abort" else "finished"] += 1
        if reason != "abort":
            self.num_forwards_total += output.num_forwards
            self.num_tokens_total += len(output.token_ids)
        if reason == "error":
            logger.error("request %s failed: %s", output.request_id, output.error)

    def _on_death(self, index: int, reason: str) -> None:
        """Fail the dead replica's pending requests; the others never see it."""
        message = f"replica {index} died: {reason}"
        with self._lock:
            for request_id, pending in list(self._pending.items()):
                if pending.replica != index:
                    continue
                self._forget(request_id)
                output = RequestOutput(request_id, pending.prompt_ids, [], "error", 0, error=message)
                self._count(output)
                self._deliver(pending, RequestUpdate(request_id, finished=True, output=output))

    def _stop_at_exit(self) -> None:
        self.shutdown(drain=False)
