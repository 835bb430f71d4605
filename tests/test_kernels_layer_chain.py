"""The persistent layer chain (attention output projection, residual, RMSNorm, SwiGLU MLP, residual,
RMSNorm, next q|k|v + RoPE in one launch) against the unfused torch references.

CPU: the kernel runs under the Triton interpreter in a child process at tiny shapes (float32) with one
program (the interpreter runs programs one after another, so a grid barrier over several would wait
forever). GPU (``-m gpu``): one LLaDA-8B-shaped layer in bf16 against the per-op GPU kernels, with the
full grid, deterministic and replayed from a CUDA graph.
"""

from __future__ import annotations

import pytest
import torch
from diffulex.kernels.fused_ops import inverse_frequencies
from diffulex.kernels.layer_chain import layer_chain_reference

from tests.interpreter import run_interpreted

_CHILD = """
import sys
import torch
from diffulex.kernels.layer_chain import layer_chain_triton

cases = torch.load(sys.argv[1])
out = {}
for name, case in cases.items():
    out[name] = layer_chain_triton(
        *case["args"], case["next_layer"], programs=1, block_n=16, block_n_qkv=8, block_k=16,
        num_warps=1, stages_residual=1, stages_paired=1,
    )
torch.save(out, sys.argv[2])
"""

EPS = 1e-5


def _randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _case(m: int, hidden: int, inter: int, heads: tuple[int, int, int] | None, seed: int) -> dict:
    args = (
        _randn(m, hidden, seed=seed),  # attention output
        _randn(m, hidden, seed=seed + 1),  # residual
        _randn(hidden, hidden, seed=seed + 2, scale=hidden**-0.5),
        _randn(2 * inter, hidden, seed=seed + 3, scale=hidden**-0.5),
        _randn(hidden, inter, seed=seed + 4, scale=inter**-0.5),
        1 + _randn(hidden, seed=seed + 5, scale=0.1),
        EPS,
    )
    next_layer = None
    if heads is not None:
        num_heads, num_kv_heads, head_dim = heads
        rows = (num_heads + 2 * num_kv_heads) * head_dim
        next_layer = (
            _randn(rows, hidden, seed=seed + 6, scale=hidden**-0.5),
            1 + _randn(hidden, seed=seed + 7, scale=0.1),
            torch.randint(0, 4096, (m,), generator=torch.Generator().manual_seed(seed)),
            inverse_frequencies(head_dim, 10000.0),
            *heads,
        )
    return {"args": args, "next_layer": next_layer}


CASES = {
    "m1-qkv": _case(1, 64, 32, (2, 2, 32), seed=1),
    "m5-gqa": _case(5, 64, 48, (2, 1, 32), seed=2),
    "m32-last-layer": _case(32, 32, 64, None, seed=3),
    "m7-wide-heads": _case(7, 64, 32, (1, 1, 64), seed=4),
}


@pytest.fixture(scope="module")
def kernel_out(tmp_path_factory: pytest.TempPathFactory) -> dict:
    pytest.importorskip("triton")
    return run_interpreted(_CHILD, CASES, tmp_path_factory.mktemp("layer_chain"))


@pytest.mark.parametrize("name", list(CASES))
def test_layer_chain_interpreter_matches_reference(kernel_out: dict, name: str) -> None:
    case = CASES[name]
    expected_h2, expected_qkv = layer_chain_reference(*case["args"], case["next_layer"])
    got_h2, got_qkv = kernel_out[name]
    torch.testing.assert_close(got_h2, expected_h2, atol=1e-4, rtol=1e-4)
    if case["next_layer"] is None:
        assert got_qkv is None
    else:
        torch.testing.assert_close(got_qkv, expected_qkv, atol=1e-4, rtol=1e-4)


def test_layer_chain_reference_is_the_unfused_layer() -> None:
    """The reference itself against the model's own modules (RMSNorm, SwiGLU, RoPE, residual adds)."""
    from diffulex.layers.activation import silu_and_mul
    from diffulex.layers.norm import RMSNorm
    from diffulex.layers.rotary import RotaryEmbedding

    case = CASES["m5-gqa"]
    attn, residual, wo, wgu, wd, ff_w, eps = case["args"]
    wqkv, attn_w, positions, inv_freq, num_heads, num_kv_heads, head_dim = case["next_layer"]
    ff_norm, attn_norm = RMSNorm(64, eps), RMSNorm(64, eps)
    ff_norm.weight.data.copy_(ff_w)
    attn_norm.weight.data.copy_(attn_w)
    normed, h = ff_norm(attn @ wo.t(), residual)
    down = silu_and_mul(*(normed @ wgu.t()).chunk(2, dim=-1)) @ wd.t()
    normed, h2 = attn_norm(down, h)
    q, k, v = (normed @ wqkv.t()).split([64, 32, 32], dim=-1)
    q, k = RotaryEmbedding(32)(positions, q.reshape(5, 2, 32), k.reshape(5, 1, 32))
    got_h2, got_qkv = layer_chain_reference(*case["args"], case["next_layer"])
    torch.testing.assert_close(got_h2, h2)
    torch.testing.assert_close(got_qkv, torch.cat([q.reshape(5, -1), k.reshape(5, -1), v], dim=-1))


def test_layer_chain_rejects_what_it_cannot_do() -> None:
    from diffulex.kernels.layer_chain import layer_chain_triton

    attn, residual, wo, wgu, wd, ff_w, eps = CASES["m5-gqa"]["args"]
    with pytest.raises(ValueError, match="at most 32 rows"):
        layer_chain_triton(torch.zeros(33, 64), torch.zeros(33, 64), wo, wgu, wd, ff_w, eps, programs=1)
    with pytest.raises(ValueError, match="do not chain"):
        layer_chain_triton(attn, residual, wo, wgu[:-2], wd, ff_w, eps, programs=1)
    with pytest.raises(ValueError, match="multiples"):
        layer_chain_triton(attn, residual, wo, wgu, wd, ff_w, eps, programs=1, block_n=128)


# ---- GPU ------------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _gpu_layer(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape: int, scale: float) -> torch.Tensor:
        return (torch.randn(*shape, device="cuda", generator=g) * scale).to(torch.bfloat16)

    return {
        "wo": randn(4096, 4096, scale=4096**-0.5),
        "wgu": randn(2 * 12288, 4096, scale=4096**-0.5),
        "wd": randn(4096, 12288, scale=12288**-0.5),
        "wqkv": randn(3 * 4096, 4096, scale=4096**-0.5),
        "ff": 1 + randn(4096, scale=0.1),
        "attn": 1 + randn(4096, scale=0.1),
    }


def _per_op(layer: dict, attn: torch.Tensor, residual: torch.Tensor, positions: torch.Tensor):
    """The engine's per-op GPU kernels for the same span."""
    from diffulex.kernels.fused_norm import add_rms_norm_triton
    from diffulex.kernels.skinny_gemm import skinny_gemm_triton
    from diffulex.kernels.skinny_gemm_fused import gate_up_silu_triton, qkv_rope_triton

    normed, h = add_rms_norm_triton(skinny_gemm_triton(attn, layer["wo"]), residual, layer["ff"], EPS)
    down = skinny_gemm_triton(gate_up_silu_triton(normed, layer["wgu"]), layer["wd"])
    normed, h2 = add_rms_norm_triton(down, h, layer["attn"], EPS)
    inv_freq = inverse_frequencies(128, 500000.0, "cuda")
    return h2, qkv_rope_triton(normed, layer["wqkv"], positions, inv_freq, 32, 32, 128)


def _chain(layer: dict, attn: torch.Tensor, residual: torch.Tensor, positions: torch.Tensor):
    from diffulex.kernels.layer_chain import layer_chain_triton

    inv_freq = inverse_frequencies(128, 500000.0, "cuda")
    next_layer = (layer["wqkv"], layer["attn"], positions, inv_freq, 32, 32, 128)
    return layer_chain_triton(
        attn, residual, layer["wo"], layer["wgu"], layer["wd"], layer["ff"], EPS, next_layer
    )


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("m", [1, 13, 32])
def test_layer_chain_gpu_matches_per_op_kernels(m: int) -> None:
    layer = _gpu_layer(m)
    attn = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    residual = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    positions = torch.arange(1000, 1000 + m, device="cuda")
    h2, qkv = _chain(layer, attn, residual, positions)
    expected_h2, expected_qkv = _per_op(layer, attn, residual, positions)
    # Same roundings, different fp32 summation orders (tiles, norm partials): a few bf16 ulps at most.
    torch.testing.assert_close(h2, expected_h2, atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(qkv, expected_qkv, atol=3e-2, rtol=2e-2)
    again = _chain(layer, attn, residual, positions)
    assert torch.equal(h2, again[0]) and torch.equal(qkv, again[1])  # deterministic


@pytest.mark.gpu
@gpu
def test_layer_chain_gpu_cuda_graph_replay_chains_layers() -> None:
    """Three chained layers captured once and replayed on new inputs equal an eager run (the arrival
    counter re-arms itself between launches)."""
    layers = [_gpu_layer(seed) for seed in (5, 6, 7)]
    positions = torch.arange(32, device="cuda")
    attn = torch.randn(32, 4096, device="cuda", dtype=torch.bfloat16)
    residual = torch.randn(32, 4096, device="cuda", dtype=torch.bfloat16)

    def forward() -> tuple[torch.Tensor, torch.Tensor]:
        x, res = attn, residual
        for layer in layers:
            res, qkv = _chain(layer, x, res, positions)
            x = qkv[:, :4096]
        return res, qkv

    forward()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = forward()
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        attn.copy_(torch.randn(32, 4096, generator=gen).to(attn))
        residual.copy_(torch.randn(32, 4096, generator=gen).to(residual))
        graph.replay()
        eager = forward()
        assert torch.equal(out[0], eager[0]) and torch.equal(out[1], eager[1])
