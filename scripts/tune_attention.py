"""Sweep the paged-attention kernel's tile sizes and split counts at decode shapes (device only).

    python scripts/tune_attention.py --out $OUT [--sequences 1 64] [--layout token-major head-major]

Shapes: LLaDA-8B heads (32 x 128, no GQA), page 32, bf16; 32 query tokens per sequence over a 1,024-token
cache, at 1 and 64 sequences. Prints the best configurations per shape and the default's time.
``--layout head-major`` times the same kernel over a cache whose pages store each head's rows together
(the engine's pages are token-major): the kernel reads the cache through its strides, so the question
"would a head-major page layout lift the 1 TB/s of the batch-1 K/V gather?" costs no engine change.

Times are taken over CUDA-graph replays (``do_bench_cudagraph``), as the engine runs the kernel: a
separately launched call at batch 1 measures the host launch (35-50 us), not the kernel (~15 us).

The K/V are read cold from HBM, as in the model (each layer's cache is read once per forward, with the
weights of the other layers streaming through L2 in between): with ``--copies`` left at 0 the script
makes enough copies of the inputs to fill twice the L2 cache and times one graph that walks them in
turn. A single 17 MB batch-1 cache would otherwise sit in the H200's 50 MB L2 and be read from there.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
from diffulex.kernels.paged_attention import paged_attention_triton
from triton.testing import do_bench_cudagraph

LAYOUTS = ("token-major", "head-major")


def cache_tensor(pages: int, page: int, heads: int, dim: int, layout: str) -> torch.Tensor:
    """A ``[pages, page, heads, dim]`` cache view. token-major (the engine's): a page stores its rows one
    after the other, each row all heads; head-major: a page stores each head's rows together (its
    32 x 256 B = 8 KB contiguous instead of 256 B slices at an 8 KB stride), passed as a permuted view
    (the kernel reads the cache through its strides)."""
    dev, dt = "cuda", torch.bfloat16
    if layout == "head-major":
        return torch.randn(pages, heads, page, dim, device=dev, dtype=dt).permute(0, 2, 1, 3)
    return torch.randn(pages, page, heads, dim, device=dev, dtype=dt)


def inputs(
    num_seqs: int,
    q_len: int = 32,
    context: int = 1024,
    heads: int = 32,
    dim: int = 128,
    page: int = 32,
    layout: str = "token-major",
):
    torch.manual_seed(0)
    tokens = num_seqs * q_len
    pages_per_seq = -(-(context + q_len) // page)
    cache_pages = num_seqs * pages_per_seq
    dev, dt = "cuda", torch.bfloat16
    query = torch.randn(tokens, heads, dim, device=dev, dtype=dt)
    key = torch.randn(tokens, heads, dim, device=dev, dtype=dt)
    value = torch.randn(tokens, heads, dim, device=dev, dtype=dt)
    k_cache = cache_tensor(cache_pages, page, heads, dim, layout)
    v_cache = cache_tensor(cache_pages, page, heads, dim, layout)
    perm = torch.randperm(cache_pages, device=dev).to(torch.int32)
    tables = perm.view(num_seqs, pages_per_seq)
    cu = torch.arange(0, tokens + 1, q_len, device=dev, dtype=torch.int32)
    ids = torch.zeros(tokens, device=dev, dtype=torch.long)
    ctx = torch.full((num_seqs,), context, device=dev, dtype=torch.int32)
    holes = torch.zeros(num_seqs, 2, device=dev, dtype=torch.int32)
    return (query, key, value, k_cache, v_cache, cu, ids, ctx, holes, tables, dim**-0.5, q_len)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--sequences", type=int, nargs="+", default=[1, 64], help="batch sizes to sweep")
    parser.add_argument(
        "--layout", nargs="+", choices=LAYOUTS, default=["token-major"], help="K/V page layouts to sweep"
    )
    parser.add_argument(
        "--copies", type=int, default=0, help="input copies walked per timing (0: enough to exceed 2x L2)"
    )
    args = parser.parse_args()
    l2_bytes = torch.cuda.get_device_properties(0).L2_cache_size
    results = {}
    for num_seqs, layout in itertools.product(args.sequences, args.layout):
        first = inputs(num_seqs, layout=layout)
        cache_bytes = 2 * first[3].numel() * first[3].element_size()
        copies = args.copies or max(1, -(-2 * l2_bytes // cache_bytes))
        sets = [first] + [inputs(num_seqs, layout=layout) for _ in range(copies - 1)]

        def walk(config: dict, sets: list = sets) -> None:
            for data in sets:
                paged_attention_triton(*data, **config)

        def time_per_call(config: dict, rep: int, sets: list = sets) -> float:
            walk(config)  # compile outside the capture
            return do_bench_cudagraph(lambda: walk(config), rep=rep) / len(sets)

        default_ms = time_per_call({}, rep=50)
        rows = []
        splits = (4, 6, 8, 12, 16, 24, 32) if num_seqs == 1 else (1, 2)
        for ns, bm, bn, warps, stages in itertools.product(splits, (32,), (32, 64, 128), (4, 8), (1, 2, 3)):
            config = dict(num_splits=ns, block_m=bm, block_n=bn, num_warps=warps, num_stages=stages)
            try:
                ms = time_per_call(config, rep=30)
            except Exception as error:  # out of shared memory, etc.
                rows.append({**config, "ms": None, "error": type(error).__name__})
                continue
            rows.append({**config, "ms": ms})
        ok = sorted((r for r in rows if r["ms"] is not None), key=lambda r: r["ms"])
        kv_gb_per_s = cache_bytes / (ok[0]["ms"] * 1e-3) / 1e9 if ok else None
        results[f"{num_seqs}/{layout}"] = {
            "default_ms": default_ms,
            "copies": copies,
            "cache_bytes": cache_bytes,
            "best_kv_gb_per_s": kv_gb_per_s,
            "best": ok[:10],
            "all": rows,
        }
        print(
            f"{num_seqs} sequences, {layout} ({copies} copies, cold K/V): default {1000 * default_ms:.1f} us"
        )
        for r in ok[:8]:
            print(f"   {1000 * r['ms']:.1f} us  {r}")
    (args.out / "tune_attention.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
