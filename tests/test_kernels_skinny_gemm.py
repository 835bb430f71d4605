"""The skinny GEMM kernel (decode-step projections) against its torch reference.

CPU: the kernel runs under the Triton interpreter in a child process, at tiny shapes, unsplit and with
split-K (the last-arriving split sums the partials; every case runs twice, so the arrival counters must
be re-armed by the first launch). GPU (``-m gpu``): LLaDA-8B projection shapes in bf16, also replayed
from a CUDA graph.
"""

from __future__ import annotations

import pytest
import torch
from diffulex.kernels.skinny_gemm import skinny_gemm_reference

from tests.interpreter import run_interpreted

_CHILD = """
import sys
import torch
from diffulex.kernels.skinny_gemm import skinny_gemm_triton

cases = torch.load(sys.argv[1])
out = {}
for name, case in cases.items():
    first = skinny_gemm_triton(case["x"], case["w"], **case["kwargs"])
    second = skinny_gemm_triton(case["x"], case["w"], **case["kwargs"])
    out[name] = (first, second)
torch.save(out, sys.argv[2])
"""


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _cases() -> dict[str, dict]:
    cases = {}
    for m, n, k in ((1, 40, 48), (5, 96, 300), (32, 64, 128), (64, 33, 80)):
        x, w = _randn(m, k, seed=m + k), _randn(n, k, seed=n + k)
        for split_k in (1, 2, 3):
            kwargs = {"block_n": 16, "block_k": 16, "split_k": split_k, "num_warps": 1, "num_stages": 1}
            cases[f"m{m}-n{n}-k{k}-split{split_k}"] = {"x": x, "w": w, "kwargs": kwargs}
    wide = _randn(4, 100, seed=7)  # rows of a wider buffer: row stride 100, 64 columns used
    cases["strided-x"] = {
        "x": wide[:, :64],
        "w": _randn(24, 64, seed=8),
        "kwargs": {"block_n": 16, "block_k": 32, "split_k": 2, "num_warps": 1, "num_stages": 1},
    }
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def kernel_out(tmp_path_factory: pytest.TempPathFactory) -> dict:
    pytest.importorskip("triton")
    return run_interpreted(_CHILD, CASES, tmp_path_factory.mktemp("skinny_gemm"))


@pytest.mark.parametrize("name", list(CASES))
def test_skinny_gemm_interpreter_matches_reference(kernel_out: dict, name: str) -> None:
    case = CASES[name]
    first, second = kernel_out[name]
    expected = skinny_gemm_reference(case["x"], case["w"])
    torch.testing.assert_close(first, expected, atol=1e-4, rtol=1e-5)
    assert torch.equal(first, second)  # deterministic, and the counters were re-armed


def test_skinny_gemm_rejects_bad_shapes() -> None:
    from diffulex.kernels.skinny_gemm import MAX_ROWS, skinny_gemm_triton

    with pytest.raises(ValueError, match="columns"):
        skinny_gemm_triton(torch.zeros(2, 8), torch.zeros(4, 6))
    with pytest.raises(ValueError, match="at most"):
        skinny_gemm_triton(torch.zeros(MAX_ROWS + 1, 8), torch.zeros(4, 8))


def test_default_config_follows_the_sweep() -> None:
    """The rule picks the measured-best column tile and split of the H200 sweep for each 8B projection."""
    from diffulex.kernels.skinny_gemm import default_config

    expected = {  # (n, k): (block_n, split_k)
        (4096, 4096): (32, 1),
        (4096, 12288): (32, 1),
        (24576, 4096): (64, 1),
        (126464, 4096): (128, 1),
        (12288, 4096): (32, 1),
    }
    for (n, k), (block_n, split_k) in expected.items():
        config = default_config(32, n, k, sm_count=132)
        assert (config["block_n"], config["split_k"]) == (block_n, split_k), (n, k, config)


def test_weights_must_suit_a_tensor_descriptor() -> None:
    """The kernels load weights through tensor descriptors: 16-byte aligned start and rows, else a clear
    error (and ``skinny_eligible`` sends such a weight to the plain matmul instead)."""
    from diffulex.kernels.skinny_gemm import descriptor_compatible, skinny_gemm_triton

    aligned = torch.zeros(8, 16, dtype=torch.bfloat16)  # 32-byte rows
    assert descriptor_compatible(aligned)
    assert not descriptor_compatible(torch.zeros(8, 12, dtype=torch.bfloat16))  # 24-byte rows
    assert not descriptor_compatible(torch.zeros(8 * 16 + 1, dtype=torch.bfloat16)[1:].view(8, 16))  # start
    assert not descriptor_compatible(aligned.t())  # last dimension not contiguous
    with pytest.raises(ValueError, match="16-byte aligned rows"):
        skinny_gemm_triton(torch.zeros(2, 12, dtype=torch.bfloat16), torch.zeros(8, 12, dtype=torch.bfloat16))


def test_pipeline_stages_fit_shared_memory() -> None:
    """Requested stages are kept while their tiles fit one program's shared memory, cut down otherwise."""
    from diffulex.kernels.skinny_gemm import fit_stages

    cpu = torch.device("cpu")  # sized as a 99 KB GPU
    assert fit_stages(cpu, 4, 32, 32, 128, 2) == 4  # 16 KB per stage
    assert fit_stages(cpu, 4, 32, 64, 256, 2) == 2  # 48 KB per stage: one in flight besides the current
    assert fit_stages(cpu, 4, 64, 128, 256, 2) == 1  # 96 KB per stage, 40 KB kept free: no pipelining


# ---- GPU ------------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("m", [1, 32, 64])
@pytest.mark.parametrize("n,k", [(12288, 4096), (4096, 12288), (126464, 4096)])
def test_skinny_gemm_gpu_bf16(m: int, n: int, k: int) -> None:
    from diffulex.kernels.skinny_gemm import skinny_gemm_triton

    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    got = skinny_gemm_triton(x, w)
    torch.testing.assert_close(got.float(), skinny_gemm_reference(x, w).float(), atol=3e-2, rtol=2e-2)
    assert torch.equal(got, skinny_gemm_triton(x, w))


@pytest.mark.gpu
@gpu
def test_skinny_gemm_gpu_cuda_graph_replay() -> None:
    from diffulex.kernels.skinny_gemm import skinny_gemm_triton

    x = torch.randn(32, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, 12288 // 3, device="cuda", dtype=torch.bfloat16)[:, :4096].contiguous() / 64
    skinny_gemm_triton(x, w, split_k=4)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = skinny_gemm_triton(x, w, split_k=4)
    for seed in range(3):
        x.copy_(torch.randn(32, 4096, generator=torch.Generator().manual_seed(seed)).to(x))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out.float(), skinny_gemm_reference(x, w).float(), atol=3e-2, rtol=2e-2)
