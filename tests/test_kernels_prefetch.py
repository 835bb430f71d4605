"""The L2 prefetch hint: it never changes a value, on the CPU it does nothing, and the decoder blocks that
issue it compute exactly what they compute without it.

CPU: the ``load`` kernel (plain loads, no inline PTX) runs under the Triton interpreter in a child process
and leaves its tensor alone; ``bulk``/``line`` are PTX instructions the interpreter cannot run, so they are
covered by the GPU tests (``-m gpu``): every mode, eager and inside a CUDA-graph capture on a side stream,
and the tiny LLaDA engine's greedy tokens with each mode against prefetch off.
"""

from __future__ import annotations

import pytest
import torch
from diffulex.kernels.l2_prefetch import PREFETCH_MODES, l2_prefetch

from diffulex import SamplingParams
from diffulex.layers.prefetch import (
    WeightPrefetch,
    get_weight_prefetch,
    join_prefetches,
    prefetch_weight,
    set_weight_prefetch,
)
from tests.interpreter import run_interpreted

_CHILD = """
import sys
import torch
from diffulex.kernels.l2_prefetch import _load_prefetch_kernel

cases = torch.load(sys.argv[1])
out = []
for tensor, words_per_program in cases:
    before = tensor.clone()
    sink = torch.zeros(1, dtype=torch.int32)
    num_words = tensor.numel() * tensor.element_size() // 4
    grid = (-(-num_words // words_per_program),)
    _load_prefetch_kernel[grid](tensor, sink, num_words, WORDS_PER_PROGRAM=words_per_program, BLOCK=64)
    out.append((torch.equal(before, tensor), int(sink.item())))
torch.save(out, sys.argv[2])
"""


@pytest.fixture
def restore_prefetch():
    saved = get_weight_prefetch()
    yield
    set_weight_prefetch(saved)


def test_load_prefetch_kernel_interpreted_changes_nothing(tmp_path) -> None:
    cases = [
        (torch.randn(1000), 64),
        (torch.randn(3, 257, dtype=torch.float64), 128),
        (torch.arange(64.0), 64),
    ]
    results = run_interpreted(_CHILD, cases, tmp_path)
    assert results == [(True, 0)] * len(cases)


def test_prefetch_on_the_cpu_is_a_no_op_and_modes_are_checked(restore_prefetch) -> None:
    weight = torch.randn(8, 8)
    before = weight.clone()
    for mode in PREFETCH_MODES:
        l2_prefetch(weight, mode=mode)
    set_weight_prefetch(WeightPrefetch(True, "bulk"))
    prefetch_weight(weight)
    join_prefetches(weight.device)
    assert torch.equal(weight, before)
    with pytest.raises(ValueError, match="unknown prefetch mode 'tma'"):
        l2_prefetch(weight, mode="tma")
    with pytest.raises(ValueError, match="unknown prefetch mode 'tma'"):
        WeightPrefetch(True, "tma")


def test_cpu_engine_tokens_are_the_same_with_prefetch_on(tiny_paths, make_llm, restore_prefetch) -> None:
    prompts = [[17, 5, 42], [8, 9, 10, 11, 12, 13]]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    off = make_llm(tiny_paths["llada"]).generate(prompts, params)
    set_weight_prefetch(WeightPrefetch(True, "bulk"))
    on = make_llm(tiny_paths["llada"]).generate(prompts, params)
    assert [o.token_ids for o in on] == [o.token_ids for o in off]


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("mode", PREFETCH_MODES)
def test_prefetch_gpu_eager_and_captured_on_a_side_stream(mode: str) -> None:
    weight = torch.randn(4096, 1000, device="cuda", dtype=torch.bfloat16)
    before = weight.clone()
    for max_bytes in (None, 1 << 20, 48):
        l2_prefetch(weight, max_bytes, mode)
    torch.cuda.synchronize()
    x = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            l2_prefetch(weight, None, mode)
        out = x @ weight
        torch.cuda.current_stream().wait_stream(side)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(weight, before)
    assert torch.equal(out, x @ weight)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("mode", PREFETCH_MODES)
def test_prefetch_gpu_engine_tokens_unchanged(mode: str, tiny_paths, make_llm, restore_prefetch) -> None:
    prompts = [[17, 5, 42], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]]
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    options = {"device": "cuda", "dtype": "bfloat16", "page_size": 8}
    off = make_llm(tiny_paths["llada"], **options).generate(prompts, params)
    set_weight_prefetch(WeightPrefetch(True, mode))
    llm = make_llm(tiny_paths["llada"], **options)
    assert llm.engine.runner.use_triton
    on = llm.generate(prompts, params)
    assert [o.token_ids for o in on] == [o.token_ids for o in off]
