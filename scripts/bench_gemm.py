"""How close cuBLAS's skinny GEMMs come to the weight-read floor at decode shapes (device only).

    python scripts/bench_gemm.py --out $OUT

LLaDA-8B projections (bf16, weights ``[N, K]``) at M = 32 and 64 query tokens (one or two batch-1 denoise
blocks): each GEMM is timed over CUDA-graph replays with its weights read cold from HBM (enough weight
copies to exceed twice the L2 cache, walked in turn), and compared with the time to read the weights at
the measured device-to-device copy rate of the same run. The Triton skinny GEMM
(``diffulex.kernels.skinny_gemm``) is timed the same way with its default tiles and, at M = 32, a sweep
of tiles and split counts. Prints a table; writes ``bench_gemm.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
from diffulex.kernels.skinny_gemm import skinny_gemm_triton
from triton.testing import do_bench, do_bench_cudagraph

SHAPES = {  # name: (N, K) of weight [N, K]
    "qkv_proj": (3 * 4096, 4096),
    "attn_out": (4096, 4096),
    "gate_up_proj": (2 * 12288, 4096),
    "ff_out": (4096, 12288),
    "lm_head": (126464, 4096),
}


def record(base: dict, kernel: str, ms: float, config: dict | None = None) -> dict:
    """One result row: the shape, the kernel, its time and its fraction of the weight-read floor."""
    floor_us = base["floor_us"]
    return {
        **base,
        "kernel": kernel,
        "us": 1000 * ms,
        "fraction_of_copy_rate": floor_us / (1000 * ms),
        "weight_read_gbs": base["n"] * base["k"] * 2 / (ms * 1e-3) / 1e9,
        "config": config,
    }


def copy_gbs() -> float:
    """Device-to-device copy rate (read + write bytes per second) of a 2 GB buffer, measured as
    ``scripts/bench_gpu.py`` does (median of separate launches; a graph-captured copy runs slower)."""
    src = torch.empty(2**30, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() * 2 / (ms * 1e-3) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--rows", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--sweep", action="store_true", help="sweep the Triton tiles at M = 32")
    args = parser.parse_args()
    torch.manual_seed(0)
    l2_bytes = torch.cuda.get_device_properties(0).L2_cache_size
    bandwidth = copy_gbs()
    rows = []
    for name, (n, k) in SHAPES.items():
        weight_bytes = n * k * 2
        copies = max(1, -(-2 * l2_bytes // weight_bytes))
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        floor_ms = weight_bytes / (bandwidth * 1e9) * 1e3
        for m in args.rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)

            def timed(gemm, x: torch.Tensor = x, weights: list = weights) -> float:
                def walk() -> None:
                    for w in weights:
                        gemm(x, w)

                walk()  # compile outside the capture
                return do_bench_cudagraph(walk, rep=30) / len(weights)

            base = {"gemm": name, "m": m, "n": n, "k": k, "floor_us": 1000 * floor_ms}
            rows.append(record(base, "cublas", timed(torch.nn.functional.linear)))
            rows.append(record(base, "triton", timed(skinny_gemm_triton)))
            if m != 32 or not args.sweep:
                continue
            for bn, bk, split, stages in itertools.product((32, 64, 128), (128, 256), (1, 2, 4, 8), (3, 5)):
                config = dict(block_n=bn, block_k=bk, split_k=split, num_stages=stages, num_warps=4)
                try:
                    ms = timed(lambda x, w, config=config: skinny_gemm_triton(x, w, **config))
                except Exception as error:  # out of shared memory, etc.
                    rows.append({"gemm": name, "m": m, "config": config, "error": type(error).__name__})
                    continue
                rows.append(record(base, "triton-sweep", ms, config))
        del weights
        torch.cuda.empty_cache()
    result = {"device": torch.cuda.get_device_name(), "copy_gbs": bandwidth, "rows": rows}
    (args.out / "bench_gemm.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['device']}: copy {bandwidth:.0f} GB/s")
    for row in rows:
        if row.get("kernel") in ("cublas", "triton"):
            print(
                f"{row['gemm']:>13} M={row['m']:<3} {row['kernel']:>7} {row['us']:8.1f} us  "
                f"floor {row['floor_us']:7.1f} us  {100 * row['fraction_of_copy_rate']:5.1f}% of copy rate"
            )
    for name in SHAPES:
        swept = sorted((r for r in rows if r["gemm"] == name and "us" in r and r["kernel"] == "triton-sweep"),
                       key=lambda r: r["us"])  # fmt: skip
        for row in swept[:3]:
            print(
                f"{name:>13} best sweep {row['us']:8.1f} us {100 * row['fraction_of_copy_rate']:5.1f}% {row['config']}"
            )


if __name__ == "__main__":
    main()
