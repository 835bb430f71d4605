"""Expert parallelism on two GPUs (NCCL, rank r on cuda:r): the greedy tokens of one GPU on the tiny MoE
checkpoints, the MoE model left uncaptured (eager steps), close logits. Float32, as test_gpu_tensor_parallel.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from diffulex import SamplingParams
from diffulex.llm import LLM
from diffulex.models.tiny_checkpoint import write_tiny_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA devices"
    ),
]
OPTIONS = {"device": "cuda", "dtype": "float32", "page_size": 8, "block_size": 4}


@pytest.mark.parametrize(("family", "strategy"), [("llada2_moe", "block_diffusion"), ("sdar_moe", "d2f")])
def test_two_gpus_expert_parallel_match_one(
    family: str, strategy: str, tmp_path: Path, make_llm: Callable[..., LLM]
) -> None:
    path = write_tiny_checkpoint(family, tmp_path / family, seed=7)
    prompts = [[17, 5, 42], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [30 + i for i in range(21)]]
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    one = make_llm(path, strategy=strategy, **OPTIONS)
    expected = [o.token_ids for o in one.generate(prompts, params)]
    expected_logits = one.forward_logits(prompts[2])
    with LLM(str(path), strategy=strategy, tensor_parallel_size=2, expert_parallel_size=2, **OPTIONS) as two:
        assert not two.engine.runner.graph_sets  # host-side all-to-all sizes: eager steps
        assert [o.token_ids for o in two.generate(prompts, params)] == expected
        torch.testing.assert_close(two.forward_logits(prompts[2]), expected_logits, atol=1e-4, rtol=1e-4)
