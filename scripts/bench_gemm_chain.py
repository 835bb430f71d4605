"""One forward's chain of decode GEMMs, with and without programmatic dependent launch (device only).

    python scripts/bench_gemm_chain.py --out $OUT

The batch-1 step's GEMMs read 92% of the copy rate one at a time, yet the step is 1.5x the weight-read
floor: each of the ~450 kernels per forward pays a launch gap, a ramp-up and a tail during which HBM
idles. This benchmark isolates that cost. It builds the LLaDA-8B layer's four projections for 32 layers
(random bf16 weights, ~14 GB, read cold) and times one CUDA graph of the whole chain at M = 32 rows, each
GEMM preceded by a small Triton kernel standing in for the norm / attention / SiLU-mul between them
(it reads the GEMM's output and writes the next GEMM's input, like those kernels). Variants:

* ``cublas``: ``F.linear`` GEMMs (what the engine runs today);
* ``triton``: ``diffulex.kernels.skinny_gemm`` with the best tiles of the M = 32 sweep;
* ``triton-pdl``: the same launched as programmatic dependents (sm_90+): each kernel's programs may be
  scheduled while the previous kernel finishes and wait on it in-kernel (``griddepcontrol.wait``);
* ``triton-pdl-pfN``: and each GEMM program prefetches the first N weight columns of its slab into L2
  before that wait, so the next weight streams in during the previous kernel's tail;
* ``cublas-pdl``: cuBLAS GEMMs with PDL stand-ins (is PDL any use next to kernels that don't signal?).

Every Triton variant must produce the bit-identical result of ``triton`` (same kernels, same order):
a race introduced by an early launch would show up as a mismatch. Prints a table; writes
``bench_gemm_chain.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import triton
import triton.language as tl
from diffulex.kernels.skinny_gemm import skinny_gemm_triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gemm import copy_gbs  # noqa: E402

HIDDEN, INTERMEDIATE, LAYERS, ROWS = 4096, 12288, 32, 32
# name: (N, K, tiles at M = 32: best of scripts/bench_gemm.py --sweep, H200, 2026-11-24)
PROJECTIONS = {
    "qkv_proj": (3 * HIDDEN, HIDDEN, dict(block_n=128, block_k=256, split_k=1, num_stages=3)),
    "attn_out": (HIDDEN, HIDDEN, dict(block_n=32, block_k=256, split_k=1, num_stages=5)),
    "gate_up_proj": (2 * INTERMEDIATE, HIDDEN, dict(block_n=64, block_k=128, split_k=1, num_stages=3)),
    "ff_out": (HIDDEN, INTERMEDIATE, dict(block_n=32, block_k=128, split_k=2, num_stages=5)),
}
# the stand-in before each projection reads this many columns of the previous output
STANDIN_INPUT = {"qkv_proj": HIDDEN, "attn_out": HIDDEN, "gate_up_proj": HIDDEN, "ff_out": INTERMEDIATE}


@triton.jit
def _standin_kernel(src, dst, stride_src, cols, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    """dst[row, :cols] = 0.5 * src[row, :cols]: one program per row, like the norms and SiLU-mul."""
    row = tl.program_id(0)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    for start in range(0, cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < cols
        value = tl.load(src + row * stride_src + offs, mask=mask, other=0.0)
        tl.store(dst + row * cols + offs, (value.to(tl.float32) * 0.5).to(dst.dtype.element_ty), mask=mask)


def standin(src: torch.Tensor, cols: int, pdl: bool) -> torch.Tensor:
    dst = torch.empty((src.shape[0], cols), dtype=src.dtype, device=src.device)
    _standin_kernel[(src.shape[0],)](
        src,
        dst,
        src.stride(0),
        cols,
        BLOCK=1024,
        USE_PDL=pdl,
        num_warps=4,
        **({"launch_pdl": True} if pdl else {}),
    )
    return dst


def make_chain(weights: list[dict[str, torch.Tensor]], gemm: Callable, pdl_standin: bool) -> Callable:
    def forward(h: torch.Tensor) -> torch.Tensor:
        for layer in weights:
            for name in PROJECTIONS:
                h = gemm(name, standin(h, STANDIN_INPUT[name], pdl_standin), layer[name])
        return h

    return forward


def variants() -> dict[str, tuple[Callable, bool]]:
    def cublas(name: str, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, w)

    def triton_gemm(pdl: bool, prefetch_k: int) -> Callable:
        def gemm(name: str, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            tiles = PROJECTIONS[name][2]
            return skinny_gemm_triton(x, w, num_warps=4, pdl=pdl, prefetch_k=prefetch_k, **tiles)

        return gemm

    table = {
        "cublas": (cublas, False),
        "cublas-pdl": (cublas, True),
        "triton": (triton_gemm(False, 0), False),
        "triton-pdl": (triton_gemm(True, 0), True),
    }
    for prefetch_k in (256, 512, 1024, 2048):
        table[f"triton-pdl-pf{prefetch_k}"] = (triton_gemm(True, prefetch_k), True)
    return table


def time_graph(forward: Callable, h0: torch.Tensor, replays: int) -> tuple[list[float], torch.Tensor]:
    forward(h0)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = forward(h0)
    times = []
    for i in range(replays + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end))
    result = out.clone()
    del graph
    return times, result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--variant", nargs="+", default=None, help="variants to time (default: all)")
    args = parser.parse_args()
    torch.manual_seed(0)
    bandwidth = copy_gbs()
    weights = [
        {
            name: torch.randn(n, k, device="cuda", dtype=torch.bfloat16).mul_(k**-0.5)
            for name, (n, k, _) in PROJECTIONS.items()
        }
        for _ in range(LAYERS)
    ]
    weight_bytes = sum(w.numel() * w.element_size() for layer in weights for w in layer.values())
    floor_ms = weight_bytes / (bandwidth * 1e9) * 1e3
    h0 = torch.randn(ROWS, HIDDEN, device="cuda", dtype=torch.bfloat16)
    table = variants()
    chosen = args.variant or list(table)
    rows, reference = [], None
    for name in chosen:
        gemm, pdl_standin = table[name]
        times, result = time_graph(make_chain(weights, gemm, pdl_standin), h0, args.replays)
        if name == "triton":
            reference = result
        same = (
            None
            if reference is None or not name.startswith("triton")
            else bool(torch.equal(result, reference))
        )
        median = statistics.median(times)
        rows.append(
            {
                "variant": name,
                "ms": median,
                "min_ms": min(times),
                "ratio_to_floor": median / floor_ms,
                "equal_to_triton": same,
                "finite": bool(torch.isfinite(result).all()),
            }
        )
        print(
            f"{name:>20} {median:7.3f} ms (min {min(times):.3f})  {median / floor_ms:5.3f}x floor  same={same}"
        )
    result = {
        "device": torch.cuda.get_device_name(),
        "copy_gbs": bandwidth,
        "weight_bytes": weight_bytes,
        "floor_ms": floor_ms,
        "layers": LAYERS,
        "rows_m": ROWS,
        "kernels_per_forward": LAYERS * len(PROJECTIONS) * 2,
        "results": rows,
    }
    (args.out / "bench_gemm_chain.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{result['device']}: copy {bandwidth:.0f} GB/s, weights {weight_bytes / 1e9:.2f} GB, floor {floor_ms:.3f} ms"
    )


if __name__ == "__main__":
    main()
