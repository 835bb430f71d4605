"""Triton paged attention / K/V store against the plain-torch reference on the GPU (``-m gpu``): bf16 at
realistic shapes, the CPU cases in fp32 and half precision, CUDA-graph replays with new lengths, split-KV at
the LLaDA-8B shape; in process. Cases: tests/attention_cases.py.
"""

from __future__ import annotations

import pytest
import torch

from tests.attention_cases import (
    CPU_CASES,
    Case,
    _real_rows,
    _store_kv_error,
    build_case,
    kernel_and_reference,
    run_kernel,
    run_reference,
)

# ---- GPU tests (-m gpu) ---------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _realistic_case(kv_heads: int, mask: str) -> Case:
    return Case(
        f"realistic_{kv_heads}_{mask}",
        q_lens=[32, 32],
        ctx_lens=[1024, 1024],
        holes=[(0, 0), (992, 1024)] if mask == "bidirectional" else None,
        mask=mask,
        heads=32,
        kv_heads=kv_heads,
        head_dim=128,
        page_size=32,
        block_size=8,
        num_pad=3,
    )


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kv_heads", [32, 8])
@pytest.mark.parametrize("mask", ["bidirectional", "block_causal", "padding"])
def test_paged_attention_gpu_bf16(kv_heads: int, mask: str) -> None:
    data = build_case(_realistic_case(kv_heads, mask), torch.bfloat16, "cuda")
    got = run_kernel(data)
    ref = run_reference(data)
    assert not got.isnan().any()
    torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=0)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("case", CPU_CASES, ids=lambda case: case.name)
def test_paged_attention_gpu_small_cases_fp32(case: Case) -> None:
    got, ref = kernel_and_reference(case, torch.float32, "cuda")
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_paged_attention_gpu_half_small_cases(dtype: torch.dtype) -> None:
    for case in CPU_CASES:
        got, ref = kernel_and_reference(case, dtype, "cuda")
        torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=0, msg=case.name)


def _llada_case(name: str, q_len: int, ctx_len: int, mask: str, hole: tuple[int, int] = (0, 0)) -> Case:
    """The LLaDA-8B batch-1 denoise step: 32 heads of 128, no GQA, pages of 32: 32 programs unsplit."""
    return Case(
        name, [q_len], [ctx_len], holes=[hole], mask=mask, heads=32, kv_heads=32, head_dim=128, page_size=32,
        block_size=8, num_pad=3,
    )  # fmt: skip


def _replay_in_graph(datas: list[dict], num_splits: int | None, max_pages: int = 40) -> None:
    """Capture one launch on ``datas[0]``'s buffers, then replay it on each data set copied in: the grid
    depends only on (S, H, max_seqlen_q, num_splits), so one captured launch serves other lengths."""
    from diffulex.kernels.paged_attention import paged_attention_triton

    first, device = datas[0], "cuda"
    num_tokens, num_seqs = first["query"].shape[0], len(first["cu"]) - 1
    static = {
        "query": first["query"].clone(),
        "key": first["key"].clone(),
        "value": first["value"].clone(),
        "k_cache": first["k_cache"].clone(),
        "v_cache": first["v_cache"].clone(),
        "cu": torch.tensor(first["cu"], dtype=torch.int32, device=device),
        "ids": first["kernel_ids"].clone(),
        "ctx": torch.tensor(first["ctx_lens"], dtype=torch.int32, device=device),
        "holes": torch.tensor(first["holes"], dtype=torch.int32, device=device),
        "pt": torch.full((num_seqs, max_pages), -1, dtype=torch.int32, device=device),
    }

    def launch() -> torch.Tensor:
        return paged_attention_triton(
            static["query"], static["key"], static["value"], static["k_cache"], static["v_cache"],
            static["cu"], static["ids"], static["ctx"], static["holes"], static["pt"], first["scale"], 32,
            num_splits=num_splits,
        )  # fmt: skip

    # The warm-up launch really runs: give it the first case's page table (a table of -1 pages under
    # non-zero context lengths would read before the cache, an illegal address).
    static["pt"][:, : first["page_tables"].shape[1]].copy_(first["page_tables"])
    launch()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = launch()
    for data in datas:
        n = data["query"].shape[0]
        assert n <= num_tokens and len(data["cu"]) - 1 == num_seqs
        assert data["k_cache"].shape[0] <= static["k_cache"].shape[0]
        static["query"].zero_()
        static["query"][:n].copy_(data["query"])
        static["key"][:n].copy_(data["key"])
        static["value"][:n].copy_(data["value"])
        static["k_cache"][: data["k_cache"].shape[0]].copy_(data["k_cache"])
        static["v_cache"][: data["v_cache"].shape[0]].copy_(data["v_cache"])
        static["cu"].copy_(torch.tensor(data["cu"], dtype=torch.int32))
        static["ids"][:n].copy_(data["kernel_ids"])
        static["ctx"].copy_(torch.tensor(data["ctx_lens"], dtype=torch.int32))
        static["holes"].copy_(torch.tensor(data["holes"], dtype=torch.int32))
        static["pt"].fill_(-1)
        static["pt"][:, : data["page_tables"].shape[1]].copy_(data["page_tables"])
        graph.replay()
        torch.cuda.synchronize()
        rows = _real_rows(data)
        ref = run_reference(data)[rows]
        assert not out[rows].isnan().any()
        torch.testing.assert_close(out[rows].float(), ref.float(), atol=2e-2, rtol=0)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("num_splits", [None, 1, 16])
def test_paged_attention_gpu_cuda_graph_replay_with_new_lengths(num_splits: int | None) -> None:
    first = build_case(_realistic_case(8, "block_causal"), torch.bfloat16, "cuda", seed=1)
    second = build_case(
        Case("second", [17, 32], [70, 1000], holes=[(32, 64), (0, 0)], mask="padding", heads=32, kv_heads=8,
             head_dim=128, page_size=32, block_size=8),
        torch.bfloat16,
        "cuda",
        seed=2,
    )  # fmt: skip
    _replay_in_graph([first, second], num_splits)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("mask", ["bidirectional", "block_causal", "padding"])
@pytest.mark.parametrize("num_splits", [None, 1, 2, 4, 9, 16])
def test_paged_attention_gpu_split_llada_shape(mask: str, num_splits: int | None) -> None:
    """Split-KV at the shape it exists for: 1 sequence x 32 heads x 1 query tile over 1,024 cached keys."""
    from diffulex.kernels.paged_attention import choose_num_splits

    sm_count = torch.cuda.get_device_properties(0).multi_processor_count
    assert choose_num_splits(32, sm_count) > 1  # the default takes the split path at this shape
    hole = (992, 1024) if mask == "bidirectional" else (0, 0)
    data = build_case(_llada_case("llada", 32, 1024, mask, hole), torch.bfloat16, "cuda", seed=4)
    got = run_kernel(data, num_splits=num_splits)
    ref = run_reference(data)
    assert not got.isnan().any()
    torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=0)
    unsplit = run_kernel(data, num_splits=1)
    torch.testing.assert_close(got.float(), unsplit.float(), atol=1e-2, rtol=0)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("num_splits", [None, 16])
def test_paged_attention_gpu_split_cuda_graph_llada_shape(num_splits: int | None) -> None:
    """One captured split launch replayed on contexts of 1,024 keys, 5 keys (most splits empty), none,
    and a context that is all hole (the context splits see nothing)."""
    datas = [
        build_case(_llada_case("full", 32, 1024, "block_causal"), torch.bfloat16, "cuda", seed=5),
        build_case(_llada_case("short", 32, 5, "padding"), torch.bfloat16, "cuda", seed=6),
        build_case(_llada_case("empty", 20, 0, "bidirectional"), torch.bfloat16, "cuda", seed=7),
        build_case(
            _llada_case("all_hole", 32, 1000, "bidirectional", (0, 1000)), torch.bfloat16, "cuda", seed=8
        ),
        build_case(_llada_case("hole", 32, 1000, "padding", (480, 520)), torch.bfloat16, "cuda", seed=9),
    ]
    _replay_in_graph(datas, num_splits)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float32])
def test_store_kv_gpu(cache_dtype: torch.dtype) -> None:
    assert _store_kv_error(torch.bfloat16, cache_dtype, "cuda") == 0.0
