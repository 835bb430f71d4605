"""GET /metrics: Prometheus text format. Engine gauges are read at scrape time; step latencies are drained
from ``EngineClient.step_latencies`` into a histogram; HTTP responses are counted by the app middleware."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .engine_client import EngineClient

router = APIRouter()
STEP_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class _EngineCollector(Collector):
    """Reads the engine's counters and gauges on every scrape (nothing to keep in sync)."""

    def __init__(self, client: EngineClient):
        self.client = client

    def collect(self) -> Iterator:
        client = self.client
        stats = client.stats()
        requests = CounterMetricFamily(
            "diffulex_requests", "Requests that left the engine, by how they ended.", labels=["status"]
        )
        for status, value in client.counts.items():
            requests.add_metric([status], value)
        yield requests
        gauges = {
            "diffulex_num_waiting_requests": ("Requests in the waiting queue.", stats["num_waiting"]),
            "diffulex_num_running_requests": ("Requests running in the engine.", stats["num_running"]),
            "diffulex_kv_pages_total": ("KV-cache pages in the pool.", stats["kv_pages_total"]),
            "diffulex_kv_pages_free": ("KV-cache pages free.", stats["kv_pages_free"]),
            "diffulex_kv_pages_used": (
                "KV-cache pages in use.",
                stats["kv_pages_total"] - stats["kv_pages_free"],
            ),
            "diffulex_prefix_cache_hit_rate": ("Prefix-cache hit rate (tokens).", stats["prefix_hit_rate"]),
        }
        for name, (help_text, value) in gauges.items():
            yield GaugeMetricFamily(name, help_text, value=value)
        yield CounterMetricFamily("diffulex_engine_steps", "Engine steps run.", value=client.num_steps)
        yield CounterMetricFamily(
            "diffulex_forwards", "Model forwards of finished requests.", value=client.num_forwards_total
        )
        yield CounterMetricFamily(
            "diffulex_generated_tokens",
            "Tokens returned by finished requests.",
            value=client.num_tokens_total,
        )


class Metrics:
    """One Prometheus registry per app (several apps in one process never collide)."""

    def __init__(self, client: EngineClient):
        self.client = client
        self.registry = CollectorRegistry()
        self.step_latency = Histogram(
            "diffulex_step_latency_seconds",
            "Engine step latency.",
            buckets=STEP_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_EngineCollector(client))
        self.http_responses = Counter(
            "diffulex_http_responses",
            "HTTP responses by route and status code.",
            ["path", "code"],
            registry=self.registry,
        )

    def drain_step_latencies(self) -> None:
        latencies = self.client.step_latencies
        count = len(latencies)  # the engine thread only appends: move exactly what was there
        for seconds in latencies[:count]:
            self.step_latency.observe(seconds)
        del latencies[:count]


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    state: Metrics = request.app.state.metrics
    state.drain_step_latencies()
    return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)
