"""Async load generator for a running ``diffulex serve``: bounded request count and time.

    python scripts/load_test.py --url http://127.0.0.1:8000 --requests 500 --concurrency 64

Prints throughput, p50/p95/p99 latency, errors by status, and the KV pages free afterwards (/metrics).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import time
from collections import Counter

import httpx


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


async def run(args: argparse.Namespace) -> dict:
    async with httpx.AsyncClient(base_url=args.url, timeout=args.timeout) as http:
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        model = (await http.get("/v1/models", headers=headers)).json()["data"][0]["id"]
        rng = random.Random(0)
        semaphore = asyncio.Semaphore(args.concurrency)
        latencies: list[float] = []
        statuses: Counter = Counter()
        tokens = 0
        deadline = time.monotonic() + args.duration

        async def one() -> None:
            nonlocal tokens
            async with semaphore:
                if time.monotonic() > deadline:
                    statuses["skipped (time)"] += 1
                    return
                prompt = [rng.randrange(1, 90) for _ in range(rng.randrange(4, 32))]
                body = {"model": model, "prompt": prompt, "max_tokens": args.max_tokens, "ignore_eos": True}
                start = time.perf_counter()
                try:
                    response = await http.post("/v1/completions", json=body, headers=headers)
                except httpx.HTTPError as error:
                    statuses[type(error).__name__] += 1
                    return
                statuses[response.status_code] += 1
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - start)
                    tokens += response.json()["usage"]["completion_tokens"]

        start = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(args.requests)))
        elapsed = time.perf_counter() - start
        metrics = (await http.get("/metrics")).text
        free = re.search(r"^diffulex_kv_pages_free (\S+)", metrics, re.M)
        total = re.search(r"^diffulex_kv_pages_total (\S+)", metrics, re.M)
    return {
        "requests": args.requests,
        "completed": len(latencies),
        "statuses": {str(k): v for k, v in statuses.items()},
        "elapsed_s": round(elapsed, 3),
        "requests_per_s": round(len(latencies) / elapsed, 2),
        "tokens_per_s": round(tokens / elapsed, 1),
        "latency_p50_s": round(percentile(latencies, 50), 4),
        "latency_p95_s": round(percentile(latencies, 95), 4),
        "latency_p99_s": round(percentile(latencies, 99), 4),
        "kv_pages_free_after": f"{free.group(1) if free else '?'}/{total.group(1) if total else '?'}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--duration", type=float, default=120.0, help="Stop starting requests after this.")
    parser.add_argument("--timeout", type=float, default=300.0, help="Per-request timeout (s).")
    parser.add_argument("--api-key", default=None)
    print(json.dumps(asyncio.run(run(parser.parse_args())), indent=2))


if __name__ == "__main__":
    main()
