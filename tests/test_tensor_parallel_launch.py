"""Launching tensor parallelism: the option and the CLI flag, a model that does not split, and a
``torchrun`` launch (two processes on this host standing in for two hosts: rank 0 runs the engine, rank 1
serves as its worker until rank 0 closes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diffulex import SamplingParams
from diffulex.cli import app as cli_app
from diffulex.config import ConfigError, load_engine_config, load_serve_config
from diffulex.engine.tp_runner import TensorParallelRunner
from diffulex.llm import LLM
from diffulex.models.tiny_checkpoint import write_tiny_checkpoint

OPTIONS = {"device": "cpu", "dtype": "float32", "page_size": 4, "num_kv_pages": 256, "max_model_len": 512}


@pytest.mark.parametrize(
    "option, flag, value",
    [
        ("tensor_parallel_size", "--tensor-parallel-size", 2),
        ("data_parallel_size", "--data-parallel-size", 3),
    ],
)
def test_parallel_size_options_and_flags(
    option: str, flag: str, value: int, tiny_sdar: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine option (default 1, checked), its ``--set`` override and its ``serve`` flag."""
    assert getattr(load_engine_config(model="m"), option) == 1
    with pytest.raises(ConfigError, match=option):
        load_engine_config(model="m", **{option: 0})
    engine, _ = load_serve_config(model="m", overrides={option: value})
    assert getattr(engine, option) == value

    launched = []
    monkeypatch.setattr("diffulex.server.app.build_and_run", lambda e, s: launched.append(e))
    for args in ([flag, str(value)], ["--set", f"{option}={value}"]):
        result = CliRunner().invoke(cli_app, ["serve", "--model", str(tiny_sdar), *args])
        assert result.exit_code == 0, result.output
    assert [getattr(config, option) for config in launched] == [value, value]


def test_a_model_that_does_not_split_stops_the_launch_with_its_value(tiny_llada: Path) -> None:
    # Heads: refused before any worker starts.
    config = load_engine_config(model=str(tiny_llada), tensor_parallel_size=3, **OPTIONS)
    with pytest.raises(ValueError, match=r"num_attention_heads=4 is not divisible by tensor_parallel_size=3"):
        TensorParallelRunner(config)
    # The MLP width (heads split fine): every rank fails to build its shard and rank 0 says which and why.
    odd = write_tiny_checkpoint("llada", tiny_llada.parent / "odd-mlp", seed=1, mlp_hidden_size=129)
    config = load_engine_config(model=str(odd), tensor_parallel_size=2, **OPTIONS)
    start = time.monotonic()
    with pytest.raises(
        RuntimeError, match=r"rank 0 failed to start: .*=129 is not divisible by tensor_parallel_size=2"
    ):
        TensorParallelRunner(config)
    assert time.monotonic() - start < 60


def test_torchrun_launch_generates_what_one_rank_does(tiny_llada: Path) -> None:
    prompt = "abc"
    args = ["--model", str(tiny_llada), "-p", prompt, "--raw", "--json", "--max-tokens", "8"]
    args += [f"--set={key}={value}" for key, value in {**OPTIONS, "strategy": "vanilla"}.items()]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["-m", "diffulex.cli", "generate", *args, "--set", "tensor_parallel_size=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(records) == 1, done.stdout  # only rank 0 prints
    with LLM(str(tiny_llada), strategy="vanilla", **OPTIONS) as llm:
        expected = llm.generate(prompt, SamplingParams(max_tokens=8))[0]
    assert records[0]["token_ids"] == expected.token_ids


def test_an_engine_that_fails_to_start_stops_its_workers(
    tiny_sdar: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch.distributed as dist

    from diffulex.engine.engine import Engine

    config = load_engine_config(model=str(tiny_sdar), tensor_parallel_size=2, strategy="nope", **OPTIONS)
    started = []
    start_workers = TensorParallelRunner._start_workers

    def remember(runner: TensorParallelRunner, *args) -> None:
        start_workers(runner, *args)
        started.extend(runner.processes)

    monkeypatch.setattr(TensorParallelRunner, "_start_workers", remember)
    with pytest.raises(ValueError, match="nope"):
        Engine(config)  # the runner starts, the strategy does not exist
    assert started and not any(process.is_alive() for process in started)
    assert not dist.is_initialized()  # the next tensor-parallel engine of this process can start


def test_data_parallel_replicas_each_run_a_tensor_parallel_group(tiny_sdar: Path) -> None:
    import asyncio

    from diffulex.server.replica_client import DataParallelClient

    options = {**OPTIONS, "strategy": "block_diffusion", "block_size": 4}
    config = load_engine_config(model=str(tiny_sdar), data_parallel_size=2, tensor_parallel_size=2, **options)
    client = DataParallelClient(config, startup_timeout_s=120)  # 2 replicas x 2 ranks: 4 processes
    batch = [[1 + (i * 7 + j * 13) % 90 for j in range(1 + i % 12)] for i in range(6)]
    params = SamplingParams(max_tokens=8, ignore_eos=True)

    async def final(prompt: list[int]) -> list[int]:
        async for update in client.generate(prompt, params):
            if update.finished:
                return update.output.token_ids
        raise AssertionError("no final update")

    async def run() -> list[list[int]]:
        return await asyncio.wait_for(asyncio.gather(*(final(prompt) for prompt in batch)), 60)

    try:
        outputs = asyncio.run(run())
        assert all(replica["num_routed"] > 0 for replica in client.stats()["replicas"])
    finally:
        client.shutdown(drain=False)
    with LLM(str(tiny_sdar), **options) as llm:
        assert outputs == [o.token_ids for o in llm.generate(batch, params)]
