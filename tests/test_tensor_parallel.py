"""Tensor parallelism at two ranks on CPU (gloo): the same greedy tokens and float32-close logits as one rank.

One TP=2 runner (rank 0 here, rank 1 a spawned worker) serves each model for the whole module; engines
for the model's strategies are built over it in turn (``Engine(config, runner=...)``), so a model costs
one worker start-up. Cases: a dense model (LLaDA), an MoE model (LLaDA2-MoE: routed plus shared experts,
a dense first layer), and a grouped-query SDAR with one KV head (replicated on both ranks), a vocabulary
that does not split evenly (padded shards) and a head tied to the embedding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from diffulex import SamplingParams
from diffulex.config import load_engine_config
from diffulex.engine.engine import Engine
from diffulex.engine.tp_runner import TensorParallelRunner
from diffulex.llm import LLM
from diffulex.models.tiny_checkpoint import write_tiny_checkpoint
from tests.parallel_helpers import CPU_OPTIONS, PARAMS, prompts, run_engine

OPTIONS = CPU_OPTIONS
# family, checkpoint overrides, the strategies compared
CASES = {
    "llada-dense": ("llada", {}, ("vanilla", "fast_dllm")),
    "llada2-moe": ("llada2_moe", {}, ("block_diffusion", "d2f")),
    "sdar-one-kv-head": (
        "sdar",
        {"num_key_value_heads": 1, "vocab_size": 251, "tie_word_embeddings": True},
        ("block_diffusion",),
    ),
}


@dataclass
class TPCase:
    path: Path
    strategies: tuple[str, ...]
    runner: TensorParallelRunner


@pytest.fixture(scope="module", params=list(CASES))
def tp_case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TPCase]:
    family, overrides, strategies = CASES[request.param]
    path = write_tiny_checkpoint(family, tmp_path_factory.mktemp("tp") / family, seed=7, **overrides)
    runner = TensorParallelRunner(load_engine_config(model=str(path), tensor_parallel_size=2, **OPTIONS))
    try:
        yield TPCase(path, strategies, runner)
    finally:
        runner.close()
    assert not any(process.is_alive() for process in runner.processes)


def test_greedy_outputs_equal_one_rank(
    tp_case: TPCase, make_llm: Callable[..., LLM], monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = prompts()
    rank0 = tp_case.runner.runner
    loops = []  # block_diffusion steps run the device loop, its tokens broadcast to the worker
    original_loop = rank0._execute_loop
    monkeypatch.setattr(rank0, "_execute_loop", lambda *args: loops.append(args[2]) or original_loop(*args))
    for strategy in tp_case.strategies:
        reference = make_llm(tp_case.path, strategy=strategy, **OPTIONS)
        config = load_engine_config(
            model=str(tp_case.path), strategy=strategy, tensor_parallel_size=2, **OPTIONS
        )
        engine = Engine(config, runner=tp_case.runner)  # type: ignore[arg-type]
        # The batch, then one request alone (its denoise steps are device loops with block_diffusion).
        for prompts_run in (batch, batch[-1:]):
            expected = [output.token_ids for output in reference.generate(prompts_run, PARAMS)]
            assert run_engine(engine, prompts_run) == expected, strategy
        assert engine.kv_cache.is_whole()
        assert engine.unhealthy_reason() is None
    assert bool(loops) == ("block_diffusion" in tp_case.strategies), loops


def test_seeded_temperature_sampling_on_rank_0_equals_one_rank(
    tp_case: TPCase, make_llm: Callable[..., LLM]
) -> None:
    strategy = tp_case.strategies[0]
    params = SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.8, seed=5)
    reference = make_llm(tp_case.path, strategy=strategy, **OPTIONS)
    expected = [o.token_ids for o in reference.generate(prompts()[:3], params)]
    config = load_engine_config(model=str(tp_case.path), strategy=strategy, tensor_parallel_size=2, **OPTIONS)
    engine = Engine(config, runner=tp_case.runner)  # type: ignore[arg-type]
    ids = [engine.add_request(prompt, params) for prompt in prompts()[:3]]
    done = {}
    while engine.has_unfinished():
        done.update((output.request_id, output.token_ids) for output in engine.step())
    assert [done[i] for i in ids] == expected


def test_logits_within_float32_tolerance(tp_case: TPCase, make_llm: Callable[..., LLM]) -> None:
    reference = make_llm(tp_case.path, **OPTIONS)
    tokens = prompts()[4]
    block_ids = [position // 4 for position in range(len(tokens))]
    expected = reference.engine.runner.full_logits(tokens, block_ids)
    logits = tp_case.runner.full_logits(tokens, block_ids)
    assert logits.shape == expected.shape == (len(tokens), reference.engine.spec.vocab_size)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    # The rank-0 runner holds half the KV heads of the model (or the one KV head, replicated).
    spec = reference.engine.spec
    assert tp_case.runner.runner.num_kv_heads == max(1, spec.num_kv_heads // 2)
