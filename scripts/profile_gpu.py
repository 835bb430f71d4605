"""Where a batch-1 denoise step spends its GPU time (LLaDA-8B shape, random bf16 weights, H200).

    python scripts/profile_gpu.py --out $OUT

Prints the top kernels of one eager step (torch.profiler) and the CUDA-event time of the graph replay.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from diffulex import SamplingParams

# `python scripts/profile_gpu.py` puts scripts/ (not the repository root) on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu_models import LLADA_8B, build_model, make_engine  # noqa: E402

# Kernel-name fragments of each kind, first match wins (cuBLAS/CUTLASS GEMM names vary by version).
CATEGORIES = {
    "attention": ("_paged_attention_kernel",),
    "attention_combine": ("_combine_splits",),
    "kv_store": ("_store_kv",),
    "sampling": ("greedy_confidence", "_sample"),
    "device_loop": ("_unmask_step",),
    "fused_elementwise": ("rms", "rope", "silu", "_fused"),
    "gemm": ("gemm", "cutlass", "xmma", "nvjet", "sm90", "cublas"),
}


def kernel_categories(averages, forwards: int) -> dict[str, float]:
    """Device milliseconds per forward of each kernel kind (``other``: everything unmatched)."""
    totals: dict[str, float] = {}
    for event in averages:
        if getattr(event, "device_type", None) is not None and "CUDA" not in str(event.device_type):
            continue
        device_us = getattr(event, "self_device_time_total", None)
        if device_us is None:
            device_us = getattr(event, "self_cuda_time_total", 0.0)
        if not device_us:
            continue
        lowered = event.key.lower()
        kind = next((k for k, parts in CATEGORIES.items() if any(p in lowered for p in parts)), "other")
        totals[kind] = totals.get(kind, 0.0) + device_us / 1000 / max(forwards, 1)
    totals["total"] = sum(totals.values())
    return {k: round(v, 4) for k, v in sorted(totals.items())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "config.json").write_text(json.dumps(LLADA_8B))
        model, _ = build_model()
        for eager in (True, False):
            engine = make_engine(
                model, folder, strategy="block_diffusion", block_size=32, max_num_reqs=8, enforce_eager=eager
            )
            engine.add_request([11] * 1024, SamplingParams(max_tokens=512, ignore_eos=True))
            for _ in range(5):
                engine.step()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(10):
                engine.step()
            end.record()
            torch.cuda.synchronize()
            print(
                f"{'eager' if eager else 'graphs'}: {start.elapsed_time(end) / 10:.3f} ms per engine step (events)"
            )
            request = next(iter(engine.requests.values()))
            forwards_before = request.num_forwards
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    engine.step()
                torch.cuda.synchronize()
            forwards = request.num_forwards - forwards_before
            averages = prof.key_averages()
            table = averages.table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70)
            name = "eager" if eager else "graphs"
            (args.out / f"profile_{name}.txt").write_text(table)
            summary = kernel_categories(averages, forwards)
            (args.out / f"profile_{name}_categories.json").write_text(json.dumps(summary, indent=2))
            print(f"{name}: {forwards} forwards profiled; GPU ms per forward by kernel kind: {summary}")
            print(table[:4000])
            for request_id in list(engine.requests):
                engine.abort(request_id)


if __name__ == "__main__":
    main()
