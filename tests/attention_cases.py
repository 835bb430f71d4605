"""Cases of the Triton paged attention / K/V store tests (tests/test_kernels_attention.py on the CPU,
tests/test_kernels_attention_gpu.py on the GPU): the case description, its random tensors, the kernel and
reference runs.

Run as a script (``TRITON_INTERPRET=1``; argv: shard, number of shards), this file is the interpreter
subprocess of the CPU tests: it runs its shard of the CPU checks and prints the errors as JSON. It imports
nothing from ``tests`` so that it runs by path.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

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


if __name__ == "__main__":  # the interpreter subprocess of the CPU tests
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    shard, num_shards = (int(arg) for arg in sys.argv[1:3]) if len(sys.argv) > 2 else (0, 1)
    print(json.dumps(run_cpu_checks(shard, num_shards)))
