"""Skinny GEMMs with a SiLU-mul or RoPE epilogue against their unfused torch references, and the layer
functions that choose them.

CPU: the kernels run under the Triton interpreter in a child process at tiny shapes (float32). GPU
(``-m gpu``): LLaDA-8B shapes in bf16 against the unfused GPU kernels, also replayed from a CUDA graph,
and an LLaDA block whose fused and unfused paths agree.
"""

from __future__ import annotations

import pytest
import torch
from diffulex.kernels.fused_ops import inverse_frequencies
from diffulex.kernels.skinny_gemm_fused import gate_up_silu_reference, qkv_rope_reference

from tests.interpreter import run_interpreted

_CHILD = """
import sys
import torch
from diffulex.kernels.skinny_gemm_fused import gate_up_silu_triton, qkv_rope_triton

cases = torch.load(sys.argv[1])
out = {}
for name, case in cases.items():
    if case["kind"] == "silu":
        out[name] = gate_up_silu_triton(case["x"], case["w"], block_n=16, block_k=16, num_warps=1, num_stages=1)
    else:
        out[name] = qkv_rope_triton(
            case["x"], case["w"], case["positions"], case["inv_freq"], *case["heads"], block_k=16,
            num_warps=1, num_stages=1,
        )
torch.save(out, sys.argv[2])
"""


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _cases() -> dict[str, dict]:
    cases = {}
    for m, inter, k in ((1, 40, 48), (5, 32, 100), (32, 24, 64)):
        cases[f"silu-m{m}-i{inter}-k{k}"] = {
            "kind": "silu",
            "x": _randn(m, k, seed=m),
            "w": _randn(2 * inter, k, seed=k),
        }
    for m, heads, k in ((1, (2, 1, 32), 48), (7, (4, 2, 32), 40), (32, (2, 2, 64), 64)):
        num_heads, num_kv_heads, head_dim = heads
        rows = (num_heads + 2 * num_kv_heads) * head_dim
        cases[f"rope-m{m}-h{num_heads}-kv{num_kv_heads}-d{head_dim}"] = {
            "kind": "rope",
            "x": _randn(m, k, seed=m + 1),
            "w": _randn(rows, k, seed=k + 1) / k**0.5,
            "positions": torch.randint(0, 4096, (m,), generator=torch.Generator().manual_seed(m)),
            "inv_freq": inverse_frequencies(head_dim, 10000.0),
            "heads": heads,
        }
    wide = _randn(3, 80, seed=9)  # rows of a wider buffer: row stride 80, 48 columns used
    cases["silu-strided-x"] = {"kind": "silu", "x": wide[:, :48], "w": _randn(64, 48, seed=10)}
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def kernel_out(tmp_path_factory: pytest.TempPathFactory) -> dict:
    pytest.importorskip("triton")
    return run_interpreted(_CHILD, CASES, tmp_path_factory.mktemp("skinny_gemm_fused"))


@pytest.mark.parametrize("name", list(CASES))
def test_fused_skinny_gemm_interpreter_matches_reference(kernel_out: dict, name: str) -> None:
    case = CASES[name]
    if case["kind"] == "silu":
        expected = gate_up_silu_reference(case["x"], case["w"])
    else:
        expected = qkv_rope_reference(
            case["x"], case["w"], case["positions"], case["inv_freq"], *case["heads"]
        )
    assert kernel_out[name].shape == expected.shape
    torch.testing.assert_close(kernel_out[name], expected, atol=1e-4, rtol=1e-4)


def test_rope_reference_rotates_q_and_k_only() -> None:
    """The reference itself: v columns are the plain GEMM, q and k are not (positions are non-zero)."""
    x, w = _randn(3, 16, seed=1), _randn((2 + 2) * 32, 16, seed=2)
    positions = torch.tensor([5, 17, 300])
    got = qkv_rope_reference(x, w, positions, inverse_frequencies(32, 10000.0), 2, 1, 32)
    plain = x @ w.t()
    torch.testing.assert_close(got[:, 96:], plain[:, 96:])
    assert not torch.allclose(got[:, :96], plain[:, :96])
    # position 0 rotates by nothing
    zero = qkv_rope_reference(
        x, w, torch.zeros(3, dtype=torch.long), inverse_frequencies(32, 10000.0), 2, 1, 32
    )
    torch.testing.assert_close(zero, plain)


def test_fused_wrappers_reject_bad_shapes() -> None:
    from diffulex.kernels.skinny_gemm_fused import gate_up_silu_triton, qkv_rope_triton

    with pytest.raises(ValueError, match="even number"):
        gate_up_silu_triton(torch.zeros(2, 8), torch.zeros(5, 8))
    with pytest.raises(ValueError, match="at most"):
        gate_up_silu_triton(torch.zeros(65, 8), torch.zeros(4, 8))
    inv = inverse_frequencies(32, 10000.0)
    with pytest.raises(ValueError, match="rows"):
        qkv_rope_triton(torch.zeros(2, 8), torch.zeros(100, 8), torch.zeros(2), inv, 2, 1, 32)
    with pytest.raises(ValueError, match="power of two"):
        qkv_rope_triton(torch.zeros(2, 8), torch.zeros(4 * 24, 8), torch.zeros(2), inv, 2, 1, 24)


def test_skinny_eligibility_and_switch() -> None:
    """The CPU never takes the skinny path; the switch turns it off and on again."""
    from diffulex.layers import linear

    x, w = torch.zeros(4, 8, dtype=torch.bfloat16), torch.zeros(6, 8, dtype=torch.bfloat16)
    assert not linear.skinny_eligible(x, w)  # CPU tensors
    try:
        linear.set_skinny_gemms(False)
        assert not linear.skinny_gemms_enabled()
    finally:
        linear.set_skinny_gemms(True)
    assert linear.skinny_gemms_enabled()


def test_layer_functions_take_the_unfused_path_on_cpu() -> None:
    """``qkv_rope`` / ``gate_up_silu`` on the CPU equal the projection followed by the separate ops."""
    from diffulex.layers.activation import silu_and_mul
    from diffulex.layers.fused_projections import gate_up_silu, qkv_rope
    from diffulex.layers.linear import MergedLinear
    from diffulex.layers.rotary import RotaryEmbedding

    torch.manual_seed(0)
    qkv = MergedLinear(16, [("q", 64), ("k", 32), ("v", 32)])
    gate_up = MergedLinear(16, [("gate", 24), ("up", 24)])
    for layer in (qkv, gate_up):
        torch.nn.init.normal_(layer.weight)
    rotary = RotaryEmbedding(32)
    x, positions = torch.randn(5, 16), torch.arange(5) * 7
    query, key, value = qkv_rope(qkv, rotary, positions, x, 2, 1, 32)
    q, k, v = (t.reshape(5, -1, 32) for t in qkv(x))
    q, k = rotary(positions, q, k)
    torch.testing.assert_close(query, q)
    torch.testing.assert_close(key, k)
    torch.testing.assert_close(value, v)
    torch.testing.assert_close(gate_up_silu(gate_up, x), silu_and_mul(*gate_up(x)))


# ---- GPU ------------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("m", [1, 17, 32])
def test_fused_skinny_gemms_gpu_bf16(m: int) -> None:
    from diffulex.kernels.fused_ops import rope_triton, silu_and_mul_triton
    from diffulex.kernels.skinny_gemm import skinny_gemm_triton
    from diffulex.kernels.skinny_gemm_fused import gate_up_silu_triton, qkv_rope_triton

    torch.manual_seed(m)
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    gate_up = torch.randn(2 * 12288, 4096, device="cuda", dtype=torch.bfloat16) / 64
    gate, up = skinny_gemm_triton(x, gate_up).chunk(2, dim=-1)
    torch.testing.assert_close(
        gate_up_silu_triton(x, gate_up), silu_and_mul_triton(gate, up), atol=2e-2, rtol=2e-2
    )

    qkv = torch.randn(96 * 128, 4096, device="cuda", dtype=torch.bfloat16) / 64
    positions = torch.randint(0, 4096, (m,), device="cuda")
    inv_freq = inverse_frequencies(128, 10000.0, "cuda")
    fused = qkv_rope_triton(x, qkv, positions, inv_freq, 32, 32, 128)
    plain = skinny_gemm_triton(x, qkv)
    q, k = rope_triton(positions, plain[:, :4096].view(m, 32, 128), plain[:, 4096:8192].view(m, 32, 128), 128)
    expected = torch.cat([q.reshape(m, -1), k.reshape(m, -1), plain[:, 8192:]], dim=-1)
    torch.testing.assert_close(fused, expected, atol=2e-2, rtol=2e-2)
    assert torch.equal(fused, qkv_rope_triton(x, qkv, positions, inv_freq, 32, 32, 128))  # deterministic


@pytest.mark.gpu
@gpu
def test_fused_skinny_gemms_gpu_cuda_graph_replay() -> None:
    from diffulex.kernels.skinny_gemm_fused import gate_up_silu_triton

    x = torch.randn(32, 1024, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2 * 2048, 1024, device="cuda", dtype=torch.bfloat16) / 32
    gate_up_silu_triton(x, w)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gate_up_silu_triton(x, w)
    for seed in range(3):
        x.copy_(torch.randn(32, 1024, generator=torch.Generator().manual_seed(seed)).to(x))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out.float(), gate_up_silu_reference(x, w).float(), atol=3e-2, rtol=3e-2)


@pytest.mark.gpu
@gpu
def test_skinny_eligibility_rules_gpu() -> None:
    from diffulex.layers.linear import SKINNY_MAX_WEIGHT_ROWS, SKINNY_ROWS, skinny_eligible

    w = torch.zeros(64, 32, device="cuda", dtype=torch.bfloat16)
    x = torch.zeros(SKINNY_ROWS, 32, device="cuda", dtype=torch.bfloat16)
    assert skinny_eligible(x, w)
    assert not skinny_eligible(torch.zeros(SKINNY_ROWS + 1, 32, device="cuda", dtype=torch.bfloat16), w)
    assert not skinny_eligible(x.float(), w.float())  # fp32 stays on cuBLAS
    assert not skinny_eligible(x, w, torch.zeros(64, device="cuda", dtype=torch.bfloat16))  # a bias
    big = torch.empty(SKINNY_MAX_WEIGHT_ROWS + 1, 32, device="cuda", dtype=torch.bfloat16)
    assert not skinny_eligible(x, big)  # an LM head


@pytest.mark.gpu
@gpu
def test_layer_functions_gpu_fused_equals_unfused() -> None:
    """The same merged projections on the GPU: skinny path on and off give the same values (within bf16)."""
    from diffulex.layers import linear
    from diffulex.layers.fused_projections import gate_up_silu, qkv_rope
    from diffulex.layers.rotary import RotaryEmbedding

    torch.manual_seed(0)
    qkv = linear.MergedLinear(1024, [("q", 1024), ("k", 256), ("v", 256)]).cuda().bfloat16()
    gate_up = linear.MergedLinear(1024, [("gate", 2048), ("up", 2048)]).cuda().bfloat16()
    for layer in (qkv, gate_up):
        torch.nn.init.normal_(layer.weight, std=1 / 32)
    rotary = RotaryEmbedding(128).cuda()
    x = torch.randn(32, 1024, device="cuda", dtype=torch.bfloat16)
    positions = torch.arange(32, device="cuda") + 1000
    fused = (*qkv_rope(qkv, rotary, positions, x, 8, 2, 128), gate_up_silu(gate_up, x))
    try:
        linear.set_skinny_gemms(False)
        plain = (*qkv_rope(qkv, rotary, positions, x, 8, 2, 128), gate_up_silu(gate_up, x))
    finally:
        linear.set_skinny_gemms(True)
    for got, expected in zip(fused, plain, strict=True):
        assert got.shape == expected.shape
        torch.testing.assert_close(got.float(), expected.float(), atol=2e-2, rtol=2e-2)
