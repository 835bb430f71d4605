"""Shared pieces of the CPU tests of tensor and expert parallelism (gloo ranks in spawned processes)."""

from __future__ import annotations

import datetime
import multiprocessing
import socket
import traceback
from collections.abc import Callable

import torch

from diffulex import SamplingParams
from diffulex.engine.engine import Engine

# Engine options of the parallel engine tests: small pages and a bounded collective timeout.
CPU_OPTIONS = {
    "device": "cpu",
    "dtype": "float32",
    "block_size": 4,
    "page_size": 4,
    "num_kv_pages": 512,
    "max_model_len": 512,
    "distributed_timeout_s": 60,
}
PARAMS = SamplingParams(max_tokens=16, ignore_eos=True)


def prompts() -> list[list[int]]:
    """Five prompts of different lengths (ids below the tiny vocabularies' special tokens)."""
    return [[1 + (i * 7 + j * 13) % 90 for j in range(1 + 3 * i)] for i in range(5)]


def run_engine(engine: Engine, batch: list[list[int]], params: SamplingParams = PARAMS) -> list[list[int]]:
    """Greedy token ids of ``batch`` stepped to the end on ``engine``; every request must end by length."""
    ids = [engine.add_request(prompt, params) for prompt in batch]
    done = {}
    while engine.has_unfinished():
        for output in engine.step():
            done[output.request_id] = output
    assert all(done[i].finish_reason == "length" for i in ids), [done[i].error for i in ids]
    return [done[i].token_ids for i in ids]


def _rank_main(check: Callable[[int], None], rank: int, world: int, port: int, results) -> None:
    import torch.distributed as dist

    try:
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=60),
        )
        check(rank)
        results.put((rank, None))
    except BaseException:
        results.put((rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_gloo_ranks(check: Callable[[int], None], world: int = 2, timeout_s: float = 120) -> None:
    """Run ``check(rank)`` (a module-level function: it is pickled by name) on ``world`` spawned gloo
    ranks; fail with every rank's traceback if any raised."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [
        context.Process(target=_rank_main, args=(check, rank, world, port, results)) for rank in range(world)
    ]
    for process in processes:
        process.start()
    try:
        reports = dict(results.get(timeout=timeout_s) for _ in range(world))
    finally:
        for process in processes:
            process.join(10)
            if process.is_alive():
                process.kill()
    failures = {rank: error for rank, error in reports.items() if error is not None}
    assert not failures, "\n".join(f"rank {rank}:\n{error}" for rank, error in failures.items())
