"""Tensor parallelism on two GPUs (NCCL, rank r on cuda:r): the greedy tokens of one GPU, CUDA graphs
captured with the all-reduces inside, the device loop's token broadcast, and close logits.

Tiny random checkpoints in float32 (no TF32), as in test_gpu_engine.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from diffulex import SamplingParams
from diffulex.llm import LLM

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA devices"
    ),
]
OPTIONS = {"device": "cuda", "dtype": "float32", "page_size": 8, "block_size": 4}


@pytest.mark.parametrize(
    ("family", "strategy"), [("sdar", "block_diffusion"), ("llada2_moe", "d2f"), ("llada", "vanilla")]
)
def test_two_gpus_match_one(
    family: str, strategy: str, tiny_paths: dict[str, Path], make_llm: Callable[..., LLM]
) -> None:
    prompts = [[17, 5, 42], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [30 + i for i in range(21)]]
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    path = tiny_paths[family]
    one = make_llm(path, strategy=strategy, **OPTIONS)
    expected = [o.token_ids for o in one.generate(prompts, params)]
    expected_logits = one.forward_logits(prompts[2])
    with LLM(str(path), strategy=strategy, tensor_parallel_size=2, **OPTIONS) as two:
        assert str(two.engine.runner.device) == "cuda:0"
        if strategy == "block_diffusion" and family != "llada2_moe":  # dense: capturable
            assert two.engine.runner.graph_sets
        assert [o.token_ids for o in two.generate(prompts, params)] == expected
        torch.testing.assert_close(two.forward_logits(prompts[2]), expected_logits, atol=1e-4, rtol=1e-4)
