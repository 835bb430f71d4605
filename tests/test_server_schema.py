"""Property-based fuzzing of the live server from its own OpenAPI schema (schemathesis): whatever a
client sends, the answer is never a 5xx. Bad input must come back as a 4xx OpenAI error."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from tests.server_fixtures import Served, serve

# A small max_model_len: a generated max_tokens that does not fit is refused at once (400), and every
# request that fits stays short on 2 CPU cores.
SMALL = {
    "strategy": "block_diffusion",
    "block_size": 4,
    "device": "cpu",
    "dtype": "float32",
    "page_size": 4,
    "num_kv_pages": 256,
    "max_model_len": 64,
}


@pytest.fixture(scope="module")
def fuzzed(tiny_sdar: Path) -> Iterator[Served]:
    yield from serve(tiny_sdar, SMALL, request_timeout_s=10.0)


@pytest.fixture(scope="module")
def api_schema(fuzzed: Served):
    return schemathesis.openapi.from_url(f"{fuzzed.url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_no_input_gets_a_server_error(case, fuzzed: Served) -> None:
    # A random model name is a 404 before anything else is checked: name the served model in every other
    # body so that generated fields reach validation, the engine and generation.
    if isinstance(case.body, dict) and "model" in case.body and zlib.crc32(repr(case.body).encode()) % 2 == 0:
        case.body["model"] = fuzzed.model
    case.call_and_validate(checks=[not_a_server_error], timeout=30)
