"""The async engine client: the engine loop runs in its own thread, asyncio handlers await its results.

Many concurrent HTTP requests are batched together by the engine (continuous batching): handlers only
enqueue requests and await updates; the engine thread steps whenever work exists. Updates cross back
to the event loop with ``call_soon_threadsafe``. A request's updates end with one ``finished`` update.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from diffulex.engine.engine import Engine
from diffulex.engine.replica_messages import stream_progress
from diffulex.request import RequestOutput
from diffulex.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class RequestUpdate:
    """Progress of one request: tokens that became final since the last update, or the whole output.

    ``new_token_ids`` never change afterwards (``block_append`` streaming). ``snapshot`` is the whole
    answer region with the mask id where still undecoded (``denoise`` streaming only). The last update
    has ``finished=True`` and ``output``.
    """

    request_id: str
    new_token_ids: list[int] = field(default_factory=list)
    snapshot: list[int] | None = None
    finished: bool = False
    output: RequestOutput | None = None


@dataclass
class _Subscriber:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    stream: str | None  # None (final output only), "block_append" or "denoise"
    sent: int = 0  # final tokens already sent


class EngineClient:
    """Owns the engine thread; ``generate`` is the one entry point handlers use."""

    def __init__(self, engine: Engine, idle_wait_s: float = 0.05):
        self.engine = engine
        self.idle_wait_s = idle_wait_s
        self._lock = threading.Lock()  # the engine is not thread-safe: one caller at a time
        self._wakeup = threading.Event()
        self._subscribers: dict[str, _Subscriber] = {}
        self._ids = itertools.count()
        self._stopping = False
        self._draining = False
        self.started_at = time.time()
        self.num_steps = 0
        self.counts = {"finished": 0, "error": 0, "abort": 0}
        self.num_forwards_total = 0
        self.num_tokens_total = 0
        self.step_latencies: list[float] = []  # seconds, drained by the metrics endpoint
        self._thread = threading.Thread(target=self._run, name="diffulex-engine", daemon=True)
        self._thread.start()

    # ----- public API ---------------------------------------------------------------------------------
    @property
    def accepting(self) -> bool:
        return not (self._stopping or self._draining)

    @property
    def alive(self) -> bool:
        """Whether the engine thread is running (it stops only at shutdown)."""
        return self._thread.is_alive()

    def unhealthy_reason(self) -> str | None:
        """Why ``/health`` should fail, or None while the engine serves."""
        if not self.accepting:
            return "the server is shutting down"
        if not self.alive:
            return "the engine thread stopped"
        return self.engine.unhealthy_reason()  # e.g. a tensor-parallel rank died

    async def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        stream: str | None = None,
    ) -> AsyncIterator[RequestUpdate]:
        """Submit one request and yield its updates; bad input raises ValueError before the first.

        Cancelling the iteration (a client disconnect) aborts the request and frees its pages.
        """
        if not self.accepting:
            raise RuntimeError("the server is shutting down")
        broken = self.engine.unhealthy_reason()
        if broken is not None:
            raise RuntimeError(f"the engine cannot serve: {broken}")
        request_id = request_id or f"cmpl-{next(self._ids)}"
        subscriber = _Subscriber(asyncio.get_running_loop(), asyncio.Queue(), stream)
        with self._lock:
            self.engine.add_request(prompt_ids, params, request_id)  # raises on bad input
            self._subscribers[request_id] = subscriber
        self._wakeup.set()
        finished = False
        try:
            while True:
                update: RequestUpdate = await subscriber.queue.get()
                finished = update.finished
                yield update
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._subscribers.pop(request_id, None)
            if self.engine.abort(request_id) is not None:
                self.counts["abort"] += 1

    def stats(self) -> dict:
        with self._lock:
            return self.engine.stats()

    def shutdown(self, drain: bool = True, timeout_s: float = 30.0) -> None:
        """Stop accepting work; with ``drain`` let running requests finish (up to ``timeout_s``)."""
        self._draining = True
        if drain:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                with self._lock:
                    if not self.engine.has_unfinished():
                        break
                time.sleep(0.01)
        self._stopping = True
        self._wakeup.set()
        self._thread.join(timeout=5)
        with self._lock:
            for request_id in list(self.engine.requests):
                output = self.engine.abort(request_id)
                if output is not None:
                    self.counts["abort"] += 1
                    self._deliver(request_id, RequestUpdate(request_id, finished=True, output=output))
            self.engine.close()  # tensor-parallel workers, if any

    # ----- engine thread ------------------------------------------------------------------------------
    def _deliver(self, request_id: str, update: RequestUpdate) -> None:
        subscriber = self._subscribers.get(request_id)
        if subscriber is None:
            return
        if update.finished:
            del self._subscribers[request_id]
        subscriber.loop.call_soon_threadsafe(subscriber.queue.put_nowait, update)

    def _run(self) -> None:
        while not self._stopping:
            with self._lock:
                busy = self.engine.has_unfinished()
            if not busy:
                self._wakeup.wait(self.idle_wait_s)
                self._wakeup.clear()
                continue
            with self._lock:
                start = time.perf_counter()
                try:
                    finished = self.engine.step()
                except Exception:  # the engine isolates request faults; this is a bug: keep serving
                    logger.exception("engine step failed")
                    finished = []
                self.step_latencies.append(time.perf_counter() - start)
                self.num_steps += 1
                self._publish_progress()
                for output in finished:
                    reason = output.finish_reason
                    self.counts[
                        "error" if reason == "error" else "abort" if reason == "abort" else "finished"
                    ] += 1
                    self.num_forwards_total += output.num_forwards
                    self.num_tokens_total += len(output.token_ids)
                    if reason == "error":
                        logger.error("request %s failed: %s", output.request_id, output.error)
                    self._deliver(
                        output.request_id, RequestUpdate(output.request_id, finished=True, output=output)
                    )

    def _publish_progress(self) -> None:
        """Send newly final tokens (and denoise snapshots) of streaming requests."""
        for request_id, subscriber in list(self._subscribers.items()):
            if subscriber.stream is None:
                continue
            request = self.engine.requests.get(request_id)
            if request is None or request.is_finished:
                continue
            final, snapshot = stream_progress(request, subscriber.sent, subscriber.stream)
            if final or snapshot is not None:
                subscriber.sent += len(final)
                update = RequestUpdate(request_id, new_token_ids=list(final), snapshot=snapshot)
                subscriber.loop.call_soon_threadsafe(subscriber.queue.put_nowait, update)
