"""Tensor parallelism when a rank dies (CPU, gloo, two processes).

A worker killed with SIGKILL in the middle of a run: the requests it was serving and those still waiting
fail with ``tensor-parallel rank 1 died: exit code -9`` within a bounded time, new requests are refused
with 503, and ``/health`` answers 503 naming the dead rank, instead of the server hanging in a collective.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
from diffulex.server.app import create_app
from diffulex.server.engine_client import EngineClient

from diffulex import SamplingParams
from diffulex.config import load_engine_config
from diffulex.engine.engine import Engine

OPTIONS = {
    "device": "cpu",
    "dtype": "float32",
    "strategy": "block_diffusion",
    "block_size": 4,
    "page_size": 4,
    "num_kv_pages": 2048,
    "max_model_len": 4096,
    "distributed_timeout_s": 30,
}
DEATH_BOUND_S = 15.0  # the failed requests must all be answered within this after the kill


def test_a_killed_rank_fails_pending_requests_and_health(tiny_sdar: Path) -> None:
    engine = Engine(load_engine_config(model=str(tiny_sdar), tensor_parallel_size=2, **OPTIONS))
    worker = engine.runner.processes[0]
    client = EngineClient(engine, idle_wait_s=0.01)
    app = create_app(client)
    params = SamplingParams(max_tokens=2048, ignore_eos=True)  # far longer than the test runs

    async def final(prompt: list[int]):
        async for update in client.generate(prompt, params):
            if update.finished:
                return update.output

    async def run() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tp") as http:
            assert (await http.get("/health")).status_code == 200
            body = {"model": app.state.serving.model_name, "prompt": [5, 6, 7], "max_tokens": 64}
            # Two requests run, more wait behind them (max_num_reqs would admit them all: the waiting
            # ones are those added after the kill's step began).
            running = [asyncio.ensure_future(final([1 + i, 2, 3])) for i in range(3)]
            http_request = asyncio.ensure_future(http.post("/v1/completions", json=body, timeout=60))
            deadline = time.monotonic() + 30
            while client.num_steps < 5:
                assert time.monotonic() < deadline, "the engine did not start stepping"
                await asyncio.sleep(0.01)
            os.kill(worker.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            outputs = await asyncio.wait_for(asyncio.gather(*running), DEATH_BOUND_S)
            response = await asyncio.wait_for(http_request, DEATH_BOUND_S)
            assert time.monotonic() - killed_at < DEATH_BOUND_S
            for output in outputs:
                assert output.finish_reason == "error"
                assert "tensor-parallel rank 1 died: exit code -9" in output.error
            # The HTTP request either failed with the death (500) or had already finished (64 tokens).
            assert response.status_code in (200, 500), response.text
            if response.status_code == 500:
                assert "tensor-parallel rank 1 died" in response.text
            health = await http.get("/health")
            assert health.status_code == 503
            assert "tensor-parallel rank 1 died: exit code -9" in health.json()["reason"]
            refused = await http.post("/v1/completions", json=body, timeout=10)
            assert refused.status_code == 503 and "tensor-parallel rank 1 died" in refused.text

    try:
        asyncio.run(run())
    finally:
        client.shutdown(drain=False)
    assert not worker.is_alive()
