"""Data parallelism on CPU: two engine replicas (child processes) behind one client and the HTTP app.

The replicas start once for the module (spawn + import torch take seconds). The tests run in file
order: the last two take the replicas down one after the other (terminated, then frozen) and check
that only their own requests fail, that the other replica keeps serving, and that /health says why.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from diffulex.server.app import create_app
from diffulex.server.replica_client import DataParallelClient
from fastapi import FastAPI

from diffulex import SamplingParams
from diffulex.config import load_engine_config
from diffulex.llm import LLM

OPTIONS = {
    "strategy": "block_diffusion",
    "block_size": 4,
    "device": "cpu",
    "dtype": "float32",
    "page_size": 4,
    "num_kv_pages": 1024,
    "max_model_len": 2048,
}
HEARTBEAT_TIMEOUT_S = 3.0
WAIT_S = 20.0  # the longest any test waits for the replicas


class DataParallel:
    """The module's client, its HTTP app and the served model name."""

    def __init__(self, client: DataParallelClient, app: FastAPI):
        self.client = client
        self.app = app
        self.model = app.state.serving.model_name

    def replica(self, index: int) -> dict:
        return self.client.stats()["replicas"][index]

    def http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://dp")


@pytest.fixture(scope="module")
def dp(tiny_sdar: Path) -> Iterator[DataParallel]:
    config = load_engine_config(model=str(tiny_sdar), data_parallel_size=2, **OPTIONS)
    client = DataParallelClient(config, heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S, startup_timeout_s=120)
    try:
        yield DataParallel(client, create_app(client))
    finally:
        client.shutdown(drain=False)
    assert not any(replica.process.is_alive() for replica in client.replicas)


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def prompts(count: int) -> list[list[int]]:
    """Distinct token-id prompts of 1 to 12 tokens (ids below the tiny vocabulary's special tokens)."""
    return [[1 + (i * 7 + j * 13) % 90 for j in range(1 + i % 12)] for i in range(count)]


async def complete(http: httpx.AsyncClient, model: str, prompt: list[int], max_tokens: int) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True}
    return await http.post("/v1/completions", json=body, timeout=WAIT_S)


async def generate(client: DataParallelClient, prompt: list[int], max_tokens: int):
    """The final output of one request through the client (bounded by WAIT_S)."""

    async def run():
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        async for update in client.generate(prompt, params):
            if update.finished:
                return update.output

    return await asyncio.wait_for(run(), WAIT_S)


# ----- config and CLI (no processes) -------------------------------------------------------------------
def test_a_replica_that_cannot_build_its_engine_stops_the_launch(tiny_sdar: Path) -> None:
    config = load_engine_config(model=str(tiny_sdar), data_parallel_size=2, **{**OPTIONS, "strategy": "nope"})
    with pytest.raises(RuntimeError, match=r"replica 0 failed to start: .*nope"):
        DataParallelClient(config, startup_timeout_s=60)


# ----- two live replicas ---------------------------------------------------------------------------------
def test_hundred_concurrent_requests_spread_match_offline_and_free_pages(
    dp: DataParallel, make_llm: Callable[..., LLM]
) -> None:
    # 10 distinct prompts, each sent 10 times (the offline reference needs only the 10): a replica's
    # greedy output must not depend on which requests share its steps, nor on the replica.
    distinct = prompts(10)
    batch = [distinct[i % 10] for i in range(100)]
    offline = make_llm(dp.client.engine.config.model, **OPTIONS)
    reference = offline.generate(distinct, SamplingParams(max_tokens=8, ignore_eos=True))
    expected = [reference[i % 10].token_ids for i in range(100)]
    before = [dp.replica(i)["num_routed"] for i in range(2)]

    async def run() -> list[httpx.Response]:
        async with dp.http() as http:
            return await asyncio.gather(*(complete(http, dp.model, prompt, 8) for prompt in batch))

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * 100, responses[0].text
    assert [r.json()["choices"][0]["token_ids"] for r in responses] == expected
    served = [dp.replica(i)["num_routed"] - before[i] for i in range(2)]
    # Least-loaded routing splits a burst evenly; a replica that finishes early may take a few more.
    assert sum(served) == 100 and min(served) >= 35, f"unfair routing: {served}"

    def pages_whole(index: int) -> bool:
        stats = dp.replica(index)
        return stats["num_unfinished"] == 0 and stats["kv_pages_free"] == stats["kv_pages_total"]

    wait_for(lambda: pages_whole(0) and pages_whole(1), "both replicas to free their pages")
    stats = dp.client.stats()
    assert stats["kv_pages_total"] == 2 * 1024 and stats["kv_pages_free"] == 2 * 1024
    assert stats["num_running"] == 0 and stats["num_steps"] > 0
    assert dp.client.counts["finished"] >= 100


def test_streaming_errors_health_and_metrics_through_replicas(dp: DataParallel) -> None:
    async def run() -> tuple[httpx.Response, str, httpx.Response, httpx.Response, httpx.Response]:
        async with dp.http() as http:
            whole = await complete(http, dp.model, [5, 6, 7], 12)
            body = {"model": dp.model, "prompt": [5, 6, 7], "max_tokens": 12, "ignore_eos": True}
            streamed = await http.post("/v1/completions", json={**body, "stream": True}, timeout=WAIT_S)
            bad = await complete(http, dp.model, [10**6], 4)  # refused inside a replica
            return whole, streamed.text, bad, await http.get("/health"), await http.get("/metrics")

    whole, stream_text, bad, health, metrics = asyncio.run(run())
    assert whole.status_code == 200
    deltas = [line for line in stream_text.splitlines() if line.startswith("data: {")]
    text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in deltas)
    assert text == whole.json()["choices"][0]["text"] and len(deltas) > 1
    assert bad.status_code == 400 and "prompt token ids" in bad.json()["error"]["message"]
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert "diffulex_kv_pages_total 2048.0" in metrics.text
    assert "diffulex_step_latency_seconds_count" in metrics.text


# ----- failures (these take the replicas down: keep them last) ------------------------------------------
def test_killed_replica_fails_only_its_requests_and_health_says_why(dp: DataParallel) -> None:
    client = dp.client
    before = [dp.replica(i)["num_routed"] for i in range(2)]
    steps_before = dp.replica(1)["num_steps"]

    async def run() -> tuple[list, float]:
        # Long generations (one token per step), so replica 1's requests are mid-run when it is killed.
        tasks = [asyncio.ensure_future(generate(client, prompt, 384)) for prompt in prompts(6)]
        while dp.replica(1)["num_steps"] == steps_before:
            await asyncio.sleep(0.02)
        client.replicas[1].process.terminate()
        killed_at = time.monotonic()
        outputs = await asyncio.gather(*tasks)
        return outputs, killed_at

    outputs, killed_at = asyncio.run(asyncio.wait_for(run(), WAIT_S))
    routed = [dp.replica(i)["num_routed"] - before[i] for i in range(2)]
    failed = [o for o in outputs if o.finish_reason == "error"]
    done = [o for o in outputs if o.finish_reason == "length"]
    assert routed == [3, 3] and len(failed) == 3 and len(done) == 3, [o.finish_reason for o in outputs]
    assert all(o.error == "replica 1 died: the process was killed by SIGTERM" for o in failed)
    assert all(len(o.token_ids) == 384 for o in done)
    assert time.monotonic() - killed_at < WAIT_S

    async def after() -> tuple[httpx.Response, httpx.Response]:
        async with dp.http() as http:
            return await http.get("/health"), await complete(http, dp.model, [9, 9], 4)

    health, answer = asyncio.run(after())
    assert health.status_code == 503 and "replica 1 died" in health.json()["reason"]
    assert answer.status_code == 200  # served by replica 0
    stats = client.stats()
    assert [r["alive"] for r in stats["replicas"]] == [True, False]
    assert stats["kv_pages_total"] == 1024  # the live replica only


def test_frozen_replica_is_declared_dead_after_the_heartbeat_timeout(dp: DataParallel) -> None:
    client = dp.client
    frozen = client.replicas[0]
    os.kill(frozen.process.pid, signal.SIGSTOP)  # alive but silent: only the heartbeat can tell
    started = time.monotonic()
    output = asyncio.run(generate(client, [3, 4], 4))
    waited = time.monotonic() - started
    assert output.finish_reason == "error"
    assert output.error.startswith("replica 0 died: no report for") and "heartbeat timeout" in output.error
    assert HEARTBEAT_TIMEOUT_S <= waited < HEARTBEAT_TIMEOUT_S + 5
    wait_for(lambda: not frozen.process.is_alive(), "the frozen replica to be killed")

    async def after() -> tuple[httpx.Response, httpx.Response]:
        async with dp.http() as http:
            return await http.get("/health"), await complete(http, dp.model, [9, 9], 4)

    health, refused = asyncio.run(after())
    reason = health.json()["reason"]
    assert health.status_code == 503 and "replica 0 died" in reason and "replica 1 died" in reason
    assert refused.status_code == 503 and "no replica is serving" in refused.json()["error"]["message"]
