"""Fused MoE kernels (kernels/fused_moe.py) on the GPU (``-m gpu``): LLaDA2-mini-shaped bf16 experts, batch
invariance, and MoE blocks replayed from a CUDA graph. CPU tests: tests/test_kernels_moe.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffulex.kernels.fused_moe import fused_moe_reference

from diffulex.layers.moe import GroupedSigmoidMoeBlock, SparseMoeBlock
from diffulex.models.tiny_checkpoint import write_tiny_checkpoint
from tests.model_helpers import _randomised

pytest.importorskip("triton")


# LLaDA2.0-mini's sparse layers: hidden 2048, 256 experts of 512, 8 per token.
MINI_HIDDEN, MINI_INTER, MINI_EXPERTS, MINI_TOP_K = 2048, 512, 256, 8


def _need_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


def _cuda_case(tokens: int, dtype: torch.dtype, seed: int, hidden: int = MINI_HIDDEN, inter: int = MINI_INTER,
               experts: int = MINI_EXPERTS, top_k: int = MINI_TOP_K):  # fmt: skip
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(tokens, hidden, device="cuda", generator=g).to(dtype)
    gate_up = (torch.randn(experts, 2 * inter, hidden, device="cuda", generator=g) * hidden**-0.5).to(dtype)
    down = (torch.randn(experts, hidden, inter, device="cuda", generator=g) * inter**-0.5).to(dtype)
    scores = torch.sigmoid(torch.randn(tokens, experts, device="cuda", generator=g))
    weights, ids = scores.topk(top_k, dim=-1)
    return x, weights / weights.sum(-1, keepdim=True) * 2.5, ids, gate_up, down


@pytest.mark.gpu
@torch.no_grad()
@pytest.mark.parametrize("tokens", [1, 32, 256])
def test_gpu_fused_moe_llada2_mini_shape_bf16(tokens: int) -> None:
    _need_cuda()
    from diffulex.kernels.fused_moe import fused_moe_triton

    args = _cuda_case(tokens, torch.bfloat16, seed=tokens)
    got, ref = fused_moe_triton(*args), fused_moe_reference(*args)
    assert got.dtype == torch.bfloat16 and got.shape == ref.shape
    # Both round the expert math to bf16 at the same points; the GEMMs' accumulation orders differ.
    scale = ref.float().abs().max().item()
    torch.testing.assert_close(got.float(), ref.float(), rtol=2**-6, atol=2**-7 * scale)
    rel = (got.float() - ref.float()).norm() / ref.float().norm()
    assert rel < 5e-3, f"relative error {rel:.2e}"


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_fused_moe_fp32_is_exact_math() -> None:
    """fp32 runs true fp32 products (no TF32): close to the reference at fp32 precision."""
    _need_cuda()
    from diffulex.kernels.fused_moe import fused_moe_triton

    args = _cuda_case(48, torch.float32, seed=7, hidden=512, inter=128, experts=32, top_k=4)
    torch.testing.assert_close(fused_moe_triton(*args), fused_moe_reference(*args), rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_fused_moe_is_batch_invariant() -> None:
    _need_cuda()
    from diffulex.kernels.fused_moe import fused_moe_triton

    x, w, ids, gate_up, down = _cuda_case(256, torch.bfloat16, seed=11)
    batch = fused_moe_triton(x, w, ids, gate_up, down)
    for t in (0, 100, 255):
        alone = fused_moe_triton(x[t : t + 1], w[t : t + 1], ids[t : t + 1], gate_up, down)
        assert torch.equal(alone[0], batch[t])
    assert torch.equal(fused_moe_triton(x[40:72], w[40:72], ids[40:72], gate_up, down), batch[40:72])


def _cuda_blocks() -> list[torch.nn.Module]:
    hidden, inter = 1024, 256
    sdar = SparseMoeBlock(hidden, inter, num_experts=64, top_k=8)
    llada2 = GroupedSigmoidMoeBlock(hidden, inter, 64, 8, 8, 4, 2.5, num_shared_experts=1)
    blocks = [_randomised(block, seed=i).cuda().bfloat16() for i, block in enumerate((sdar, llada2))]
    with torch.no_grad():
        blocks[1].gate.expert_bias.copy_(torch.randn(64, device="cuda") * 0.1)
    return blocks


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_moe_blocks_fused_equal_grouped_path() -> None:
    _need_cuda()
    g = torch.Generator(device="cuda").manual_seed(5)
    tokens = torch.randn(96, 1024, device="cuda", generator=g).bfloat16()
    for block in _cuda_blocks():
        assert block.cuda_graph_safe and block.experts.gate_up_weight.is_cuda
        weights, ids = block.route(tokens)
        fused = block(tokens)
        sum_dtype = torch.float32 if isinstance(block, GroupedSigmoidMoeBlock) else torch.bfloat16
        grouped = block.experts.grouped_forward(tokens, weights, ids, sum_dtype).to(torch.bfloat16)
        if isinstance(block, GroupedSigmoidMoeBlock):
            grouped = grouped + block.shared_experts(tokens)
        scale = grouped.float().abs().max().item()
        torch.testing.assert_close(fused.float(), grouped.float(), rtol=2**-6, atol=2**-6 * scale)


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_moe_blocks_replay_from_a_cuda_graph() -> None:
    """Router + fused experts capture (no host sync) and a replay on new inputs equals the eager call."""
    _need_cuda()
    g = torch.Generator(device="cuda").manual_seed(6)
    for block in _cuda_blocks():
        tokens = torch.randn(64, 1024, device="cuda", generator=g).bfloat16()
        block(tokens)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = block(tokens)
        tokens.copy_(torch.randn(64, 1024, device="cuda", generator=g))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, block(tokens))


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["sdar_moe", "llada2_moe"])
def test_gpu_moe_models_capture_graphs_and_match_cpu(family: str, tmp_path: Path, make_llm) -> None:
    """With the fused path the MoE models are graph-safe: the runner captures, and greedy tokens equal CPU."""
    _need_cuda()
    from diffulex import SamplingParams

    path = write_tiny_checkpoint(family, tmp_path / family, seed=5)
    prompts = [[17, 5, 42], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]]
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    cpu = make_llm(path, block_size=8).generate(prompts, params)
    gpu_llm = make_llm(path, block_size=8, device="cuda", dtype="float32")
    gpu = gpu_llm.generate(prompts, params)
    runner = gpu_llm.engine.runner
    assert all(getattr(m, "cuda_graph_safe", True) for m in runner.model.modules())
    assert runner.graphs is not None and runner.graphs.graphs
    assert [o.token_ids for o in gpu] == [o.token_ids for o in cpu]
    assert [o.num_forwards for o in gpu] == [o.num_forwards for o in cpu]
