"""Fused RMSNorm / add+RMSNorm / RoPE / SiLU-mul kernels (kernels/fused_norm.py, kernels/fused_ops.py)
against their torch twins.

CPU: the kernels run under the Triton interpreter, which needs ``TRITON_INTERPRET=1`` before triton is
imported, so every launch happens in one child process (spawned once per module with the variable in its
environment); the comparisons run here. GPU tests (bf16, LLaDA-8B / SDAR shapes) are marked ``gpu`` and
compare the layers' CUDA dispatch with their own torch code.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffulex.kernels.fused_norm import add_rms_norm_reference, rms_norm_reference
from diffulex.kernels.fused_ops import rope_reference, silu_and_mul_reference

from diffulex.layers.activation import SiluAndMul, silu_and_mul
from diffulex.layers.norm import RMSNorm
from diffulex.layers.rotary import RotaryEmbedding
from tests.interpreter import run_interpreted

REPO_ROOT = Path(__file__).resolve().parents[1]

_CHILD = """
import sys
import torch
from diffulex.kernels import fused_norm, fused_ops

cases = torch.load(sys.argv[1])
out = {}
for name, case in cases.items():
    module = fused_norm if case["op"] in ("rms_norm", "add_rms_norm") else fused_ops
    fn = getattr(module, case["op"] + "_triton")
    out[name] = fn(*case["args"], **case.get("kwargs", {}), **case.get("kernel_kwargs", {}))
torch.save(out, sys.argv[2])
"""


def _randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def _packed_qkv(tokens: int, heads: int, kv_heads: int, head_dim: int, seed: int, dtype=torch.float32):
    """q [T, H, D] and k [T, KVH, D] as strided views of one packed [T, (H + 2 KVH) D] projection."""
    qkv = _randn(tokens, (heads + 2 * kv_heads) * head_dim, seed=seed, dtype=dtype)
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    return q, k


def _build_cases() -> dict[str, dict]:
    cases: dict[str, dict] = {}
    positions = torch.tensor([0, 1, 7, 100, 2047, 4095, 31, 5])
    for d in (64, 48):
        x, w, b = _randn(7, d, seed=d), _randn(d, seed=d + 1), _randn(d, seed=d + 2)
        res = _randn(7, d, seed=d + 3)
        cases[f"rms-D{d}"] = dict(op="rms_norm", args=(x, w, 1e-5))
        cases[f"rms-D{d}-bias"] = dict(op="rms_norm", args=(x, w, 1e-6), kwargs=dict(bias=b))
        cases[f"add_rms-D{d}"] = dict(op="add_rms_norm", args=(x, res, w, 1e-5))
        cases[f"add_rms-D{d}-bias"] = dict(op="add_rms_norm", args=(x, res, w, 1e-5), kwargs=dict(bias=b))
    # Rows of a wider buffer (row stride > D) and a per-head norm over [T, H, Dh] (SDAR's q_norm).
    wide = _randn(5, 80, seed=10)
    cases["rms-strided-rows"] = dict(op="rms_norm", args=(wide[:, 8:56], _randn(48, seed=11), 1e-5))
    cases["rms-per-head"] = dict(op="rms_norm", args=(_randn(3, 4, 16, seed=12), _randn(16, seed=13), 1e-6))
    cases["add_rms-strided"] = dict(
        op="add_rms_norm", args=(wide[:, 8:56], wide[:, 24:72], _randn(48, seed=14), 1e-5)
    )
    x16 = _randn(6, 64, seed=15, dtype=torch.bfloat16)
    r16 = _randn(6, 64, seed=16, dtype=torch.bfloat16)
    cases["add_rms-bf16"] = dict(
        op="add_rms_norm", args=(x16, r16, _randn(64, seed=17, dtype=torch.bfloat16), 1e-5)
    )
    # RoPE: full and partial rotary, MHA and GQA, strided views of a packed projection, non-pow2 sizes.
    for name, heads, kv_heads, head_dim, rotary_dim in (
        ("full-D64", 4, 4, 64, 64),
        ("full-D48-gqa", 6, 2, 48, 48),
        ("partial-D64-r32", 4, 2, 64, 32),
        ("partial-D48-r24", 3, 1, 48, 24),
    ):
        q, k = _packed_qkv(8, heads, kv_heads, head_dim, seed=head_dim + heads)
        cases[f"rope-{name}"] = dict(op="rope", args=(positions, q, k, rotary_dim), kwargs=dict(base=10000.0))
    q, k = _packed_qkv(8, 4, 2, 64, seed=20)
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    cases["rope-inv_freq-contiguous"] = dict(
        op="rope", args=(positions, q.contiguous(), k.contiguous(), 64), kwargs=dict(inv_freq=inv_freq)
    )
    # Head blocks smaller than the head counts: several q blocks, a ragged last one, a k block.
    q, k = _packed_qkv(8, 6, 3, 64, seed=22)
    cases["rope-head-blocks"] = dict(
        op="rope", args=(positions, q, k, 64), kwargs=dict(base=10000.0), kernel_kwargs=dict(block_heads=4)
    )
    q16, k16 = _packed_qkv(8, 4, 2, 48, seed=21, dtype=torch.bfloat16)
    cases["rope-bf16-partial"] = dict(op="rope", args=(positions, q16, k16, 32), kwargs=dict(base=10000.0))
    # SiLU-mul: several column tiles with a ragged last one, chunks of a fused gate|up projection.
    gu = _randn(5, 200, seed=30)
    cases["silu-tiles"] = dict(
        op="silu_and_mul", args=(gu[:, :100], gu[:, 100:]), kernel_kwargs=dict(block_n=32)
    )
    cases["silu-one-tile"] = dict(op="silu_and_mul", args=(_randn(4, 48, seed=31), _randn(4, 48, seed=32)))
    gu16 = _randn(3, 96, seed=33, dtype=torch.bfloat16)
    cases["silu-bf16"] = dict(op="silu_and_mul", args=(gu16[:, :48], gu16[:, 48:]))
    return cases


CASES = _build_cases()


@pytest.fixture(scope="module")
def kernel_out(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_interpreted(_CHILD, CASES, tmp_path_factory.mktemp("fused_kernels"))


def _reference(case: dict):
    fn = {
        "rms_norm": rms_norm_reference,
        "add_rms_norm": add_rms_norm_reference,
        "rope": rope_reference,
        "silu_and_mul": silu_and_mul_reference,
    }[case["op"]]
    return fn(*case["args"], **case.get("kwargs", {}))


def _close(got: torch.Tensor, ref: torch.Tensor) -> None:
    assert got.dtype == ref.dtype and got.shape == ref.shape
    if ref.dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    else:
        # The interpreter rounds fp32 -> bf16 toward zero (the GPU to nearest even), once per rounding
        # step of the op (up to three): a few bf16 ulps here; the GPU tests check bf16 precision.
        torch.testing.assert_close(got.float(), ref.float(), rtol=3 * 2**-7, atol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference(name: str, kernel_out: dict) -> None:
    case, got = CASES[name], kernel_out[name]
    ref = _reference(case)
    if case["op"] == "add_rms_norm":
        _close(got[0], ref[0])
        if ref[1].dtype == torch.float32:  # (bf16: the interpreter's rounding, see _close)
            assert torch.equal(got[1], ref[1]), "x + residual must be exact (one rounding)"
        else:
            _close(got[1], ref[1])
    elif case["op"] == "rope":
        for got_t, ref_t in zip(got, ref, strict=True):
            assert got_t.is_contiguous()
            _close(got_t, ref_t)
        rotary_dim = case["args"][3]
        for got_t, src in zip(got, case["args"][1:3], strict=True):  # pass-through channels copied exactly
            assert torch.equal(got_t[..., rotary_dim:], src[..., rotary_dim:])
    else:
        _close(got, ref)


def test_references_are_the_layers_math() -> None:
    """On CPU the layers keep their torch code: bit-identical to the references (and to each other)."""
    x, res = _randn(5, 48, seed=40), _randn(5, 48, seed=41)
    norm = RMSNorm(48, 1e-5, bias=True)
    with torch.no_grad():
        norm.weight.copy_(_randn(48, seed=42))
        norm.bias.copy_(_randn(48, seed=43))
        assert torch.equal(norm(x), rms_norm_reference(x, norm.weight, 1e-5, norm.bias))
        normed, new_res = norm(x, res)
        ref_normed, ref_res = add_rms_norm_reference(x, res, norm.weight, 1e-5, norm.bias)
        assert torch.equal(normed, ref_normed) and torch.equal(new_res, ref_res)
        assert torch.equal(new_res, res + x) and torch.equal(normed, norm(res + x))
    positions = torch.tensor([0, 3, 9, 4000])
    q, k = _packed_qkv(4, 4, 2, 48, seed=44)
    rotary = RotaryEmbedding(48, 24, base=10000.0)
    for got, ref in zip(rotary(positions, q, k), rope_reference(positions, q, k, 24, 10000.0), strict=True):
        assert torch.equal(got, ref)
    gu = _randn(3, 64, seed=45)
    assert torch.equal(silu_and_mul(gu[:, :32], gu[:, 32:]), silu_and_mul_reference(gu[:, :32], gu[:, 32:]))
    assert torch.equal(SiluAndMul()(gu), silu_and_mul_reference(gu[:, :32], gu[:, 32:]))


# ---------------------------------------------------------------------------------------------- GPU


def _need_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


def _bf16_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    assert got.dtype == ref.dtype == torch.bfloat16 and got.shape == ref.shape
    torch.testing.assert_close(got.float(), ref.float(), rtol=2**-7, atol=1e-2)


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_rms_norm_llada_shape() -> None:
    _need_cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(64, 4096, device="cuda", generator=g).bfloat16() * 3
    res = torch.randn(64, 4096, device="cuda", generator=g).bfloat16() * 10
    norm = RMSNorm(4096, 1e-5).cuda().bfloat16()
    norm.weight.copy_(torch.randn(4096, device="cuda", generator=g))
    _bf16_close(norm(x), norm._forward_torch(x))
    normed, new_res = norm(x, res)
    ref_normed, ref_res = norm._forward_torch(x, res)
    assert torch.equal(new_res, ref_res)
    _bf16_close(normed, ref_normed)
    # Per-head q/k norm of SDAR: [T, H, 128] views of the projection.
    head_norm = RMSNorm(128, 1e-6).cuda().bfloat16()
    head_norm.weight.copy_(torch.randn(128, device="cuda", generator=g))
    q = x.view(64, 32, 128)
    _bf16_close(head_norm(q), head_norm._forward_torch(q))


@pytest.mark.gpu
@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kv_heads,rotary_dim", [(32, 128), (8, 128), (8, 64)])
def test_gpu_rope(dtype: torch.dtype, kv_heads: int, rotary_dim: int) -> None:
    _need_cuda()
    g = torch.Generator(device="cuda").manual_seed(1)
    tokens, heads, head_dim = 64, 32, 128
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, device="cuda", generator=g).to(dtype)
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    positions = torch.randint(0, 8192, (tokens,), device="cuda", generator=g)
    positions[:4] = torch.tensor([0, 1, 4095, 8191], device="cuda")
    rotary = RotaryEmbedding(head_dim, rotary_dim, base=500000.0).cuda()
    for got, ref in zip(rotary(positions, q, k), rotary._forward_torch(positions, q, k), strict=True):
        if dtype == torch.float32:  # also checks that sin/cos are precise at angles of thousands of radians
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        else:
            _bf16_close(got, ref)
        assert torch.equal(got[..., rotary_dim:], ref[..., rotary_dim:])


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_silu_and_mul_llada_shape() -> None:
    _need_cuda()
    g = torch.Generator(device="cuda").manual_seed(2)
    gate = torch.randn(64, 12288, device="cuda", generator=g).bfloat16() * 4
    up = torch.randn(64, 12288, device="cuda", generator=g).bfloat16()
    _bf16_close(silu_and_mul(gate, up), silu_and_mul_reference(gate, up))
    gate_up = torch.cat([gate, up], dim=-1)
    _bf16_close(SiluAndMul()(gate_up), silu_and_mul_reference(gate, up))


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_fused_ops_capture_in_cuda_graph() -> None:
    """No host synchronisation: the fused ops replay from a CUDA graph with fresh inputs."""
    _need_cuda()
    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(64, 4096, device="cuda", generator=g).bfloat16()
    res = torch.randn(64, 4096, device="cuda", generator=g).bfloat16()
    positions = torch.arange(64, device="cuda")
    norm = RMSNorm(4096, 1e-5).cuda().bfloat16()
    rotary = RotaryEmbedding(128, 128, base=10000.0).cuda()

    def step():
        normed, new_res = norm(x, res)
        q, k = rotary(positions, normed.view(64, 32, 128), normed.view(64, 32, 128))
        return silu_and_mul(q.view(64, 4096), k.view(64, 4096)), new_res

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, new_res = step()
    x.copy_(torch.randn(64, 4096, device="cuda", generator=g))
    positions.add_(1000)
    graph.replay()
    torch.cuda.synchronize()
    ref_out, ref_res = step()
    assert torch.equal(out, ref_out) and torch.equal(new_res, ref_res)
