"""The HTTP server end to end on CPU: a real uvicorn server on 127.0.0.1 in a background thread, driven by
the official ``openai`` client and raw httpx. Checks outputs against the offline LLM, concurrency, page
accounting after disconnects, back-pressure (429), input errors (4xx, never 500) and the API key."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from diffulex import SamplingParams
from diffulex.config import load_serve_config
from diffulex.llm import LLM
from tests.server_fixtures import Served, serve, wait_until_whole

# block_diffusion on SDAR uses KV pages (so page accounting is checked) and is fast on CPU.
PAGED = {
    "strategy": "block_diffusion",
    "block_size": 4,
    "device": "cpu",
    "dtype": "float32",
    "page_size": 4,
    "num_kv_pages": 1024,
    "max_model_len": 2048,
}
SMALL_QUEUE = {
    "strategy": "vanilla",
    "block_size": 4,
    "device": "cpu",
    "dtype": "float32",
    "max_num_reqs": 1,
    "max_waiting_reqs": 2,
}
API_KEY = "secret-key"


@pytest.fixture(scope="module")
def served(tiny_sdar: Path) -> Iterator[Served]:
    yield from serve(tiny_sdar, PAGED)


@pytest.fixture(scope="module")
def guarded(tiny_llada: Path) -> Iterator[Served]:
    yield from serve(tiny_llada, SMALL_QUEUE, api_key=API_KEY, served_model_name="tiny")


# ----- the official client ----------------------------------------------------------------------------
def test_openai_client_completions_chat_and_streaming(served: Served) -> None:
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == [served.model]

    knobs = {"extra_body": {"ignore_eos": True, "steps": 12}}
    text = client.completions.create(model=served.model, prompt="Hello", max_tokens=12, **knobs)
    choice = text.choices[0]
    assert isinstance(choice.text, str) and choice.text and choice.finish_reason == "length"
    assert text.usage.completion_tokens == 12 and text.usage.prompt_tokens == 5
    assert text.model_extra["diffusion"]["strategy"] == "block_diffusion"

    ids = client.completions.create(model=served.model, prompt=[5, 6, 7], max_tokens=8, **knobs)
    assert len(ids.choices[0].model_extra["token_ids"]) == 8

    # Streaming (block_append) concatenates to the non-streamed answer; the last chunk has finish_reason.
    chunks = list(
        client.completions.create(model=served.model, prompt="Hello", max_tokens=12, stream=True, **knobs)
    )
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])

    messages = [{"role": "user", "content": "Hi there"}]
    chat = client.chat.completions.create(model=served.model, messages=messages, max_tokens=8, **knobs)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    streamed = client.chat.completions.create(
        model=served.model, messages=messages, max_tokens=8, stream=True, **knobs
    )
    content = "".join(c.choices[0].delta.content or "" for c in streamed)
    assert content == chat.choices[0].message.content

    with pytest.raises(openai.BadRequestError, match="unknown field 'frobnicate'"):
        client.completions.create(model=served.model, prompt="x", extra_body={"frobnicate": 1})
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")


def test_denoise_streaming_shows_masks_then_the_answer(served: Served) -> None:
    body = {
        "model": served.model,
        "prompt": "Hello",
        "max_tokens": 8,
        "stream": True,
        "stream_mode": "denoise",
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", f"{served.url}/v1/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert any("▒" in e["choices"][0]["text"] for e in events if e["choices"])
    final = [e for e in events if e["choices"]][-1]["choices"][0]
    assert final["finish_reason"] == "length" and "▒" not in final["text"]
    assert events[-1]["usage"]["completion_tokens"] == 8


# ----- raw HTTP: endpoints and errors -----------------------------------------------------------------
def test_health_models_and_metrics(served: Served) -> None:
    assert httpx.get(f"{served.url}/health").json()["status"] == "ok"
    models = httpx.get(f"{served.url}/v1/models").json()
    assert models["data"][0]["id"] == served.model
    httpx.post(
        f"{served.url}/v1/completions", json={"model": served.model, "prompt": [1, 2], "max_tokens": 4}
    )
    metrics = httpx.get(f"{served.url}/metrics").text
    for name in (
        "diffulex_requests_total",
        "diffulex_num_waiting_requests",
        "diffulex_num_running_requests",
        "diffulex_kv_pages_free",
        "diffulex_kv_pages_used",
        "diffulex_prefix_cache_hit_rate",
        "diffulex_forwards_total",
        "diffulex_generated_tokens_total",
        "diffulex_step_latency_seconds_count",
    ):
        assert name in metrics, name
    assert 'diffulex_http_responses_total{code="200",path="/v1/completions"}' in metrics


@pytest.mark.parametrize(
    ("change", "status", "param", "message"),
    [
        ({"frobnicate": 1}, 400, "frobnicate", "unknown field 'frobnicate'"),
        ({"max_tokens": "many"}, 400, "max_tokens", "max_tokens"),
        ({"max_tokens": 0}, 400, "max_tokens", "max_tokens must be a positive integer"),
        ({"prompt": [7] * 2100}, 400, "prompt", "exceeds max_model_len"),
        ({"prompt": [999999]}, 400, "prompt", "token ids must be integers"),
        ({"prompt": []}, 400, "prompt", "empty"),
        ({"model": "nope"}, 404, "model", "does not exist"),
        ({"n": 2}, 400, "n", "only n=1"),
        ({"echo": True}, 400, "echo", "echo"),
        ({"temperature": -1}, 400, "temperature", "temperature must be >= 0"),
        ({"stream_mode": "sideways"}, 400, "stream_mode", "stream_mode"),
        ({"steps": 10**9}, 400, "steps", "steps must be <= max_model_len"),
    ],
)
def test_bad_requests_get_openai_errors(served: Served, change, status, param, message) -> None:
    body = {"model": served.model, "prompt": [1, 2, 3], "max_tokens": 4} | change
    response = httpx.post(f"{served.url}/v1/completions", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["param"] == param and error["type"]


def test_malformed_json_and_missing_fields_are_400(served: Served) -> None:
    response = httpx.post(
        f"{served.url}/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400 and "error" in response.json()
    response = httpx.post(f"{served.url}/v1/chat/completions", json={"model": served.model})
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
    messages = [{"role": "user", "content": [{"type": "image_url"}]}]
    response = httpx.post(
        f"{served.url}/v1/chat/completions", json={"model": served.model, "messages": messages}
    )
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == "messages"
    assert error["type"] == "invalid_request_error"


# ----- concurrency, parity with offline, pages --------------------------------------------------------
def test_200_concurrent_requests_match_offline_and_free_every_page(served: Served, tiny_sdar: Path) -> None:
    prompts = [[(i * 7 + j) % 90 + 1 for j in range(3 + i % 9)] for i in range(200)]

    async def run_all() -> list[dict]:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(base_url=served.url, timeout=60, limits=limits) as http:

            async def one(prompt: list[int]) -> dict:
                body = {"model": served.model, "prompt": prompt, "max_tokens": 8}
                response = await http.post("/v1/completions", json=body)
                assert response.status_code == 200, response.text
                return response.json()

            return await asyncio.wait_for(asyncio.gather(*(one(p) for p in prompts)), 45)

    results = asyncio.run(run_all())
    offline = LLM(str(tiny_sdar), **PAGED).generate(prompts, SamplingParams(max_tokens=8))
    for result, expected in zip(results, offline):
        choice = result["choices"][0]
        assert choice["token_ids"] == expected.token_ids
        assert choice["finish_reason"] == expected.finish_reason
    wait_until_whole(served)


def test_client_disconnect_mid_stream_frees_its_pages(served: Served) -> None:
    # 1000 tokens take ~2 s on CPU: the hang-up comes long before the end.
    body = {
        "model": served.model,
        "prompt": [3, 4, 5],
        "max_tokens": 1000,
        "ignore_eos": True,
        "stream": True,
    }
    finished_before = served.client.counts["finished"]
    with httpx.stream("POST", f"{served.url}/v1/completions", json=body, timeout=30) as response:
        # Keep the line iterator alive: dropping it closes the response, i.e. hangs up already.
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        assert not served.pages_whole(), "the request should still be running"
    # Leaving the block closes the connection mid-stream.
    wait_until_whole(served)
    assert served.client.counts["finished"] == finished_before  # aborted, not run to the end


def test_client_disconnect_before_a_non_streamed_answer_aborts_it(served: Served) -> None:
    # 2000 tokens take several seconds on CPU; the client hangs up after 0.3 s, long before the end.
    body = json.dumps(
        {"model": served.model, "prompt": [3, 4, 5], "max_tokens": 2000, "ignore_eos": True}
    ).encode()
    finished_before = served.client.counts["finished"]
    aborted_before = served.client.counts["abort"]
    host, port = served.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        deadline = time.monotonic() + 5
        while served.pages_whole():  # wait until the engine has taken the request
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.01)
        time.sleep(0.3)
        assert not served.pages_whole(), "the request should still be running"
    # Closing the socket hangs up with no answer read; the server must notice and abort the request.
    wait_until_whole(served, timeout_s=5)
    assert served.client.counts["abort"] == aborted_before + 1
    assert served.client.counts["finished"] == finished_before  # aborted, not run to the end


# ----- back-pressure and the API key ------------------------------------------------------------------
def test_flood_beyond_the_waiting_queue_gets_429_and_the_rest_complete(guarded: Served) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": guarded.model, "prompt": [5, 6, 7], "max_tokens": 16, "ignore_eos": True}

    async def flood() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=guarded.url, timeout=60, headers=headers) as http:
            calls = [http.post("/v1/completions", json=body) for _ in range(30)]
            return await asyncio.wait_for(asyncio.gather(*calls), 45)

    responses = asyncio.run(flood())
    rejected = [r for r in responses if r.status_code == 429]
    accepted = [r for r in responses if r.status_code == 200]
    assert rejected and accepted and len(rejected) + len(accepted) == 30
    assert rejected[0].headers["Retry-After"] and rejected[0].json()["error"]["type"] == "rate_limit_error"
    assert all(len(r.json()["choices"][0]["token_ids"]) == 16 for r in accepted)


def test_api_key_is_enforced_when_configured(guarded: Served) -> None:
    url = f"{guarded.url}/v1/models"
    assert httpx.get(url).status_code == 401
    wrong = httpx.get(url, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(url, headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    assert httpx.get(f"{guarded.url}/health").status_code == 200  # probes need no key
    client = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key=API_KEY, max_retries=0)
    out = client.completions.create(model="tiny", prompt=[1, 2, 3], max_tokens=4)
    assert out.choices[0].finish_reason in ("length", "stop")


# ----- configuration ----------------------------------------------------------------------------------
def test_serve_config_file_flags_and_overrides(tmp_path: Path, tiny_llada: Path) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text(
        f"engine:\n  model: {tiny_llada}\n  block_size: 8\nserver:\n  port: 9000\n  host: 0.0.0.0\n"
    )
    engine, server = load_serve_config(path, overrides={"port": 9100, "max_num_reqs": 3}, host="127.0.0.1")
    assert (engine.block_size, engine.max_num_reqs, server.port, server.host) == (8, 3, 9100, "127.0.0.1")
    with pytest.raises(ValueError, match="unknown key 'prot'"):
        load_serve_config(path, overrides={"server.prot": 1})
