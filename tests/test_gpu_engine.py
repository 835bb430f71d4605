"""On the GPU (Triton attention, fused sampling, CUDA graphs) the engine gives the CPU's greedy tokens.

Tiny random checkpoints in float32: both paths compute in fp32 (no TF32), so greedy tokens agree."""

from __future__ import annotations

import pytest
import torch

from diffulex import SamplingParams
from tests.strategy_cases import CASES

pytestmark = pytest.mark.gpu

GPU_CASES = [
    c for c in CASES if c.name in ("vanilla", "fast_dllm_dual", "block_diffusion", "multi_bd", "d2f")
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.name)
def test_gpu_matches_cpu(case, tiny_paths, make_llm) -> None:
    prompts = [[17, 5, 42], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [30 + i for i in range(21)]]
    params = SamplingParams(max_tokens=16, ignore_eos=True, **case.params)
    cpu = make_llm(tiny_paths[case.family], **case.options, page_size=8).generate(prompts, params)
    gpu_llm = make_llm(tiny_paths[case.family], **case.options, page_size=8, device="cuda", dtype="float32")
    assert gpu_llm.engine.runner.use_triton
    gpu = gpu_llm.generate(prompts, params)
    assert [o.token_ids for o in gpu] == [o.token_ids for o in cpu]
    assert [o.num_forwards for o in gpu] == [o.num_forwards for o in cpu]
    if gpu_llm.engine.strategy.static_query_sizes():
        assert gpu_llm.engine.runner.graphs is not None and gpu_llm.engine.runner.graphs.graphs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_memory_utilization_sizes_the_cache(tiny_paths, make_llm) -> None:
    llm = make_llm(
        tiny_paths["sdar"], device="cuda", dtype="bfloat16", gpu_memory_utilization=0.3, max_num_reqs=4
    )
    runner = llm.engine.runner
    total = torch.cuda.get_device_properties(0).total_memory
    assert 0 < runner.num_pages * runner._bytes_per_page() <= 0.3 * total
    out = llm.generate([[5, 6, 7, 8, 9]], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    assert len(out.token_ids) == 8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_dream_shifted_logits_match_cpu(tiny_paths, make_llm) -> None:
    prompts = [[17, 5, 42], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]]
    params = SamplingParams(max_tokens=16, steps=16, ignore_eos=True)
    cpu = make_llm(tiny_paths["dream"]).generate(prompts, params)
    gpu = make_llm(tiny_paths["dream"], device="cuda", dtype="float32").generate(prompts, params)
    assert [o.token_ids for o in gpu] == [o.token_ids for o in cpu]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["sdar_moe", "fast_dllm_v2"])
def test_gpu_other_families_match_cpu(family, tmp_path, make_llm, tiny_paths) -> None:
    from diffulex.models.tiny_checkpoint import write_tiny_checkpoint

    path = write_tiny_checkpoint(family, tmp_path / family, seed=5)
    prompts = [[17, 5, 42], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]]
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    cpu = make_llm(path).generate(prompts, params)
    gpu = make_llm(path, device="cuda", dtype="float32").generate(prompts, params)
    assert [o.token_ids for o in gpu] == [o.token_ids for o in cpu]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_llada2_moe_matches_cpu(tiny_paths, make_llm) -> None:
    prompts = [[17, 5, 42], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]]
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    cpu = make_llm(tiny_paths["llada2_moe"], block_size=8).generate(prompts, params)
    gpu = make_llm(tiny_paths["llada2_moe"], block_size=8, device="cuda", dtype="float32").generate(
        prompts, params
    )
    assert [o.token_ids for o in gpu] == [o.token_ids for o in cpu]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("strategy", ["vanilla", "block_diffusion", "fast_dllm"])
def test_gpu_one_request_steps_replay_graphs(strategy, tiny_paths, make_llm, monkeypatch) -> None:
    """Prefills and full-recompute steps of a single request replay the one-request graphs (padded to a
    captured size) and give the CPU's tokens; with an empty size list they run eagerly, same tokens."""
    from diffulex.engine.cuda_graphs import CudaGraphRunner

    family = "sdar" if strategy == "block_diffusion" else "llada"
    options = {"strategy": strategy, "page_size": 8, "cuda_graph_single_tokens": [16, 32, 64]}
    prompt = [[30 + i for i in range(21)]]
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    cpu = make_llm(tiny_paths[family], **options).generate(prompt, params)
    replays: list[int] = []
    original = CudaGraphRunner.replay

    def counting_replay(self, step):
        if self.buckets[-1] == 1 and self.tokens_per_seq in (16, 32, 64):
            replays.append(self.tokens_per_seq)
        return original(self, step)

    monkeypatch.setattr(CudaGraphRunner, "replay", counting_replay)
    gpu_llm = make_llm(tiny_paths[family], **options, device="cuda", dtype="float32")
    gpu = gpu_llm.generate(prompt, params)
    assert [o.token_ids for o in gpu] == [o.token_ids for o in cpu]
    assert [o.num_forwards for o in gpu] == [o.num_forwards for o in cpu]
    assert replays, "no one-request step replayed a graph"
    eager_llm = make_llm(
        tiny_paths[family], **{**options, "cuda_graph_single_tokens": []}, device="cuda", dtype="float32"
    )
    assert all(g.buckets[-1] > 1 for g in eager_llm.engine.runner.graph_sets)  # no one-request sets
    eager = eager_llm.generate(prompt, params)
    assert [o.token_ids for o in eager] == [o.token_ids for o in cpu]
