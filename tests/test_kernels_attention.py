"""Triton paged attention / K/V store against the plain-torch reference.

CPU: the kernels run under the Triton interpreter, which needs ``TRITON_INTERPRET=1`` before triton is
imported, so subprocesses (this file run as a script, one shard of the cases per CPU core) run every CPU
case and report the errors as JSON; the tests below only read that report. Every case runs unsplit (``num_splits=1``) and split-KV
(2 and 3 splits, with 16-key tiles unless the case sets ``block_n``, so that even short key ranges are
cut across programs). GPU (``-m gpu``): bf16 at a realistic shape, in process.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import torch
from diffulex.kernels.attention_ref import paged_attention_reference, store_kv_reference

PAD_ID = 2**40  # the block id of padding tokens: no real token ever sees them


@dataclass
class Case:
    """One attention step: per-sequence query lengths, context lengths, holes and block-id pattern."""

    name: str
    q_lens: list[int]
    ctx_lens: list[int]
    holes: list[tuple[int, int]] | None = None
    mask: str = "bidirectional"  # bidirectional | block_causal | padding
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    page_size: int = 4
    block_size: int = 2  # block-causal block length (in tokens)
    num_pad: int = 2  # padding tokens at the end of each sequence of length > num_pad ("padding" mode)
    extra_q: int = 0  # max_seqlen_q beyond the longest query (a grid padded for CUDA graphs)
    ids_dtype: torch.dtype = torch.int64
    strided_qkv: bool = False  # q/k/v as slices of one packed projection (non-contiguous)
    poison: bool = False  # NaN in cache slots no query sees (holes, page tails, spare pages): must not leak
    head_major_cache: bool = False  # cache storage [pages, kv_heads, rows, dim], passed as a permuted view
    kwargs: dict = field(default_factory=dict)  # tile-size overrides


CPU_CASES = [
    Case("no_context_bidirectional", [3, 1, 5], [0, 0, 0]),
    Case("context_partial_and_several_pages", [2, 1, 4, 3], [0, 3, 13, 8], mask="block_causal"),
    Case("hole_dual_cache", [4, 4], [12, 9], holes=[(4, 8), (8, 9)]),
    Case("hole_at_start_block_causal", [5, 2], [10, 6], holes=[(0, 4), (2, 2)], mask="block_causal"),
    Case("padding_huge_ids", [6, 4, 1], [5, 0, 7], mask="padding"),
    Case("padding_int32_ids", [5, 3], [4, 9], mask="padding", ids_dtype=torch.int32),
    Case("gqa_kv1", [3, 2], [6, 11], heads=4, kv_heads=1, mask="block_causal"),
    Case("mha_kv4", [2, 3], [7, 1], heads=4, kv_heads=4),
    Case("head_dim_24", [4, 1, 3], [9, 0, 5], holes=[(2, 5), (0, 0), (0, 0)], head_dim=24),
    Case("head_dim_32_page_8", [3, 6], [17, 8], head_dim=32, page_size=8, mask="block_causal", block_size=3),
    Case("multi_tile_queries_and_keys", [37, 20], [40, 3], mask="block_causal", block_size=8, page_size=8),
    Case(
        "head_major_cache",
        [4, 3],
        [13, 6],
        holes=[(4, 8), (0, 0)],
        mask="block_causal",
        head_major_cache=True,
    ),
    Case("empty_sequence_and_padded_grid", [3, 0, 2], [5, 4, 0], extra_q=20),
    Case("strided_qkv", [4, 2], [6, 10], strided_qkv=True, mask="block_causal"),
    Case("tiles_16x32_override", [18, 5], [33, 2], mask="padding", kwargs={"block_m": 16, "block_n": 32}),
    Case("nan_in_unseen_cache_slots", [6, 5], [12, 7], holes=[(4, 8), (0, 0)], mask="padding", poison=True),
    # Split-KV: fewer keys than splits (most splits empty), and 64-key tiles over a long context whose
    # holes cross split boundaries; sequence 2's context is all hole, so its context splits see nothing.
    Case("keys_fewer_than_splits", [1, 2, 1], [0, 1, 0], mask="block_causal", block_size=1),
    Case(
        "long_context_holes_across_splits",
        [5, 3, 1],
        [150, 0, 70],
        holes=[(60, 140), (0, 0), (0, 70)],
        mask="padding",
        page_size=8,
        poison=True,
        kwargs={"block_n": 64},
    ),
]
SPLITS = (1, 2, 3)  # num_splits run on every CPU case


def split_kwargs(case: Case, num_splits: int) -> dict:
    """The kernel overrides of a case at ``num_splits``: split runs default to 16-key tiles."""
    kwargs = {**case.kwargs, "num_splits": num_splits}
    if num_splits > 1:
        kwargs.setdefault("block_n", 16)
    return kwargs


def build_case(case: Case, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    """Random tensors for a case, in both the reference's (lists) and the kernel's (tensors) forms."""
    gen = torch.Generator().manual_seed(seed)
    num_seqs = len(case.q_lens)
    num_tokens = sum(case.q_lens)
    heads, kv_heads, dim, page = case.heads, case.kv_heads, case.head_dim, case.page_size

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    if case.strided_qkv:
        qkv = rand(num_tokens, (heads + 2 * kv_heads) * dim)
        query = qkv[:, : heads * dim].view(num_tokens, heads, dim)
        key = qkv[:, heads * dim : (heads + kv_heads) * dim].view(num_tokens, kv_heads, dim)
        value = qkv[:, (heads + kv_heads) * dim :].view(num_tokens, kv_heads, dim)
    else:
        query, key, value = (
            rand(num_tokens, heads, dim),
            rand(num_tokens, kv_heads, dim),
            rand(num_tokens, kv_heads, dim),
        )

    pages_needed = [(n + page - 1) // page for n in case.ctx_lens]
    num_pages = sum(pages_needed) + 3  # spare pages hold garbage that must never be read
    if case.head_major_cache:  # the kernel takes the cache's strides: a head's rows of a page contiguous
        k_cache, v_cache = (rand(num_pages, kv_heads, page, dim).permute(0, 2, 1, 3) for _ in range(2))
    else:
        k_cache, v_cache = rand(num_pages, page, kv_heads, dim), rand(num_pages, page, kv_heads, dim)
    order = torch.randperm(num_pages, generator=gen).tolist()  # scattered pages: exercises the page table
    max_pages = max(1, max(pages_needed))
    page_tables = torch.full((num_seqs, max_pages), -1, dtype=torch.int32)
    for seq, needed in enumerate(pages_needed):
        page_tables[seq, :needed] = torch.tensor(order[:needed], dtype=torch.int32)
        order = order[needed:]

    ids: list[int] = []
    for q_len in case.q_lens:
        for i in range(q_len):
            if case.mask == "bidirectional":
                ids.append(7)
            elif case.mask == "block_causal":
                ids.append(i // case.block_size)
            elif case.mask == "padding":
                real = q_len - case.num_pad if q_len > case.num_pad else q_len
                ids.append(i // case.block_size if i < real else PAD_ID)
            else:
                raise ValueError(case.mask)
    block_ids = torch.tensor(ids, dtype=torch.int64)
    holes = case.holes or [(0, 0)] * num_seqs
    cu = [0]
    for q_len in case.q_lens:
        cu.append(cu[-1] + q_len)
    max_seqlen_q = max(case.q_lens) + case.extra_q
    return {
        "query": query.to(device),
        "key": key.to(device),
        "value": value.to(device),
        "k_cache": k_cache.to(device),
        "v_cache": v_cache.to(device),
        "cu": cu,
        "block_ids": block_ids.to(device),
        "ctx_lens": list(case.ctx_lens),
        "holes": holes,
        "page_tables": page_tables.to(device),
        "scale": dim**-0.5,
        "max_seqlen_q": max_seqlen_q,
        "kernel_ids": (block_ids.clamp(max=2**31 - 1) if case.ids_dtype == torch.int32 else block_ids)
        .to(case.ids_dtype)
        .to(device),
    }


def run_reference(data: dict) -> torch.Tensor:
    return paged_attention_reference(
        data["query"],
        data["key"],
        data["value"],
        data["k_cache"],
        data["v_cache"],
        data["cu"],
        data["block_ids"],
        data["ctx_lens"],
        data["holes"],
        data["page_tables"],
        data["scale"],
    )


def run_kernel(data: dict, **kwargs) -> torch.Tensor:
    from diffulex.kernels.paged_attention import paged_attention_triton

    device = data["query"].device
    no_cache = not any(data["ctx_lens"])
    return paged_attention_triton(
        data["query"],
        data["key"],
        data["value"],
        None if no_cache else data["k_cache"],
        None if no_cache else data["v_cache"],
        torch.tensor(data["cu"], dtype=torch.int32, device=device),
        data["kernel_ids"],
        torch.tensor(data["ctx_lens"], dtype=torch.int32, device=device),
        torch.tensor(data["holes"], dtype=torch.int32, device=device).view(-1, 2),
        data["page_tables"][:, :1] if no_cache else data["page_tables"],
        data["scale"],
        data["max_seqlen_q"],
        **kwargs,
    )


def _real_rows(data: dict) -> torch.Tensor:
    return torch.arange(data["cu"][-1], device=data["query"].device)


def poison_unseen(case: Case, data: dict) -> None:
    """Put NaN in the cache where no query looks: hole positions, the unused tail of a sequence's last
    page, pages nobody owns. (Not in the step's own padding K/V: a padding row shares its tile with real
    rows, and a masked NaN key still poisons them through 0 * NaN, in the reference as in the kernel.)"""
    page = case.page_size
    for seq, ((start, end), ctx_len) in enumerate(zip(data["holes"], data["ctx_lens"])):
        num_pages = (ctx_len + page - 1) // page
        for pos in [*range(start, end), *range(ctx_len, num_pages * page)]:
            page_id = int(data["page_tables"][seq, pos // page])
            data["k_cache"][page_id, pos % page] = float("nan")
            data["v_cache"][page_id, pos % page] = float("nan")
    owned = set(data["page_tables"][data["page_tables"] >= 0].tolist())
    for page_id in range(data["k_cache"].shape[0]):
        if page_id not in owned:
            data["k_cache"][page_id] = float("nan")
            data["v_cache"][page_id] = float("nan")


def kernel_and_reference(
    case: Case, dtype: torch.dtype, device: str, seed: int = 0, kwargs: dict | None = None
) -> tuple:
    """The kernel's and the reference's outputs on the rows that are compared (kernel overrides:
    ``kwargs``, default the case's)."""
    data = build_case(case, dtype, device, seed)
    rows = _real_rows(data)
    ref = run_reference(data)
    if case.poison:  # the reference sees the clean values; the kernel must not depend on the poisoned ones
        poison_unseen(case, data)
    got = run_kernel(data, **(case.kwargs if kwargs is None else kwargs))
    return got[rows], ref[rows]


def _store_kv_error(dtype: torch.dtype, cache_dtype: torch.dtype, device: str) -> float:
    from diffulex.kernels.paged_attention import store_kv_triton

    gen = torch.Generator().manual_seed(3)
    num_tokens, kv_heads, dim, pages, page = 7, 2, 24, 4, 4
    key = torch.randn(num_tokens, kv_heads, dim, generator=gen).to(dtype).to(device)
    value = torch.randn(num_tokens, kv_heads, dim, generator=gen).to(dtype).to(device)
    slots = torch.tensor([5, -1, 0, 15, -1, 9, 2], dtype=torch.int64, device=device)
    caches = [
        torch.randn(pages, page, kv_heads, dim, generator=gen).to(cache_dtype).to(device) for _ in range(2)
    ]
    expected = [c.clone() for c in caches]
    store_kv_reference(key, value, expected[0], expected[1], slots)
    store_kv_triton(key, value, caches[0], caches[1], slots)
    return max((a.float() - b.float()).abs().max().item() for a, b in zip(caches, expected))


def run_cpu_checks(shard: int = 0, num_shards: int = 1) -> dict[str, float | str]:
    """The CPU checks of one shard (every ``num_shards``-th, from ``shard``) under the interpreter: name
    -> max abs error (or the error text)."""
    checks = [(f"{case.name}/splits={n}", case, n) for case in CPU_CASES for n in SPLITS]
    checks.append(("store_kv_fp32", None, 0))
    results: dict[str, float | str] = {}
    for name, case, num_splits in checks[shard::num_shards]:
        try:  # report, don't crash the whole batch
            if case is None:
                results[name] = _store_kv_error(torch.float32, torch.float32, "cpu")
                continue
            got, ref = kernel_and_reference(case, torch.float32, "cpu", kwargs=split_kwargs(case, num_splits))
            results[name] = "NaN in output" if got.isnan().any() else (got - ref).abs().max().item()
        except Exception as exc:
            results[name] = f"{type(exc).__name__}: {exc}"
    return results


# ---- CPU tests: interpreter subprocesses, one per CPU core (at most 4), sharing the cases ---------------


@pytest.fixture(scope="module")
def cpu_report() -> dict[str, float | str]:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    num_shards = max(1, min(4, os.cpu_count() or 1))

    def run_shard(shard: int) -> dict[str, float | str]:
        proc = subprocess.run(
            [sys.executable, __file__, str(shard), str(num_shards)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert proc.returncode == 0, f"interpreter subprocess failed:\n{proc.stdout}\n{proc.stderr}"
        return json.loads(proc.stdout.strip().splitlines()[-1])

    report: dict[str, float | str] = {}
    with concurrent.futures.ThreadPoolExecutor(num_shards) as pool:
        for shard_report in pool.map(run_shard, range(num_shards)):
            report.update(shard_report)
    return report


@pytest.mark.parametrize("num_splits", SPLITS)
@pytest.mark.parametrize("case_name", [case.name for case in CPU_CASES])
def test_paged_attention_interpreter_matches_reference(
    cpu_report: dict, case_name: str, num_splits: int
) -> None:
    name = f"{case_name}/splits={num_splits}"
    error = cpu_report[name]
    assert isinstance(error, float), error
    assert error < 1e-4, f"{name}: max abs error {error}"


def test_store_kv_interpreter_matches_reference(cpu_report: dict) -> None:
    error = cpu_report["store_kv_fp32"]
    assert isinstance(error, float), error
    assert error == 0.0


def test_choose_num_splits_host_rule() -> None:
    pytest.importorskip("triton")
    from diffulex.kernels.paged_attention import MAX_NUM_SPLITS, choose_num_splits

    assert choose_num_splits(32 * 1 * 1, 132) == 6  # LLaDA-8B batch-1 denoise step: 192 programs
    assert choose_num_splits(32 * 1 * 4, 132) == 2
    assert choose_num_splits(32 * 1 * 8, 132) == 1
    assert choose_num_splits(32 * 1 * 9, 132) == 1  # 288 programs already fill the 132 SMs
    assert choose_num_splits(32 * 32 * 1, 132) == 1  # prefill: unsplit
    assert choose_num_splits(1, 132) == MAX_NUM_SPLITS


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


if __name__ == "__main__":  # the interpreter subprocess of the CPU tests
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    shard, num_shards = (int(arg) for arg in sys.argv[1:3]) if len(sys.argv) > 2 else (0, 1)
    print(json.dumps(run_cpu_checks(shard, num_shards)))
