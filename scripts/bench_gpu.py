"""The H200 benchmark: Diffulex vs a Hugging Face eager baseline at the LLaDA-8B shape, random bf16 weights.

One command on the device (`device` tool, nvidia-h200); every number comes from the same run:
  0. ceilings: device copy bandwidth (bytes read + written) and the bf16 GEMM rate;
  1. batch-1 step: one 32-token block over a 1,024-token cached context, vs the weight-read floor;
  2. batch-1 end to end: 128-token prompt, 256 tokens, a fixed schedule of 4 tokens per forward,
     Diffulex (block_diffusion over the paged cache) vs HF LLaMA eager with a bidirectional mask and the
     LLaDA loop (full recompute every step). Random weights: confidences mean nothing, so both run the
     fixed schedule; only speed is compared;
  3. batched denoising at 1, 8, 32, 64, 128 running requests, block 32, buffer 1 and 2;
  4. step time with CUDA graphs on and off.
Writes <out>/bench_gpu.json and prints a table last.

The shape, the device and timing helpers, the model builders and the Hugging Face baseline live in
bench_gpu_models.py (beside this file).

    python scripts/bench_gpu.py --out $OUT [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from diffulex import SamplingParams
from diffulex.engine.engine import Engine

# `python scripts/bench_gpu.py` puts scripts/ (not the repository root) on sys.path; so does this, when
# this file is imported from elsewhere.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gpu_models  # noqa: E402
from bench_gpu_models import (  # noqa: E402
    LLADA_8B,
    REPEATS,
    TINY,
    bench_e2e_hf,
    build_model,
    ceilings,
    make_engine,
    median_ms,
    sync,
)


def steady_step_ms(engine: Engine, steps: int) -> float:
    def one() -> None:
        engine.step()

    return median_ms(one, steps, warmup=2)


def drain(engine: Engine) -> None:
    for request_id in list(engine.requests):
        engine.abort(request_id)


def forward_ms(engine: Engine, forwards: int) -> float:
    """Wall time per forward of the running request over the next ``forwards`` or more forwards."""
    request = next(iter(engine.requests.values()))
    engine.step()  # warm-up (the device loop's first launch)
    sync()
    start_forwards, start = request.num_forwards, time.perf_counter()
    while request.num_forwards - start_forwards < forwards:
        engine.step()
    sync()
    return 1000 * (time.perf_counter() - start) / (request.num_forwards - start_forwards)


def bench_b1(
    model, folder: Path, weight_bytes: int, bandwidth: float, eager: bool, iterations_per_sync: int
) -> dict:
    """Batch-1 denoise of 32-token blocks over >= 1,024 cached tokens, one token per forward: the time
    per forward. With ``iterations_per_sync`` > 1 the device loop runs that many forwards per host sync
    (the host work of one sync is spread over them); with 1 every forward returns to the host."""
    engine = make_engine(
        model,
        folder,
        strategy="block_diffusion",
        block_size=32,
        max_num_reqs=8,
        enforce_eager=eager,
        denoise_iterations_per_sync=iterations_per_sync,
    )
    engine.add_request([11] * 1024, SamplingParams(max_tokens=512, ignore_eos=True))
    for _ in range(3):  # prefill, then denoise steps over 1,024 cached tokens
        engine.step()
    assert engine.requests and next(iter(engine.requests.values())).num_cached >= 1024
    step_ms = forward_ms(engine, 96)
    drain(engine)
    floor_ms = 1000 * weight_bytes / bandwidth
    return {"b1_step_ms": step_ms, "floor_ms": floor_ms, "ratio_to_floor": step_ms / floor_ms}


def bench_e2e_diffulex(model, folder: Path, fuse_block_store: bool) -> dict:
    engine = make_engine(
        model,
        folder,
        strategy="block_diffusion",
        block_size=32,
        max_num_reqs=8,
        fuse_block_store=fuse_block_store,
    )
    params = SamplingParams(max_tokens=256, steps=64, ignore_eos=True)  # 8 blocks x 8 steps = 4 tokens/step
    prompt = list(range(1000, 1128))
    engine.add_request(prompt, params)
    while engine.has_unfinished():
        engine.step()  # warm-up run (Triton JIT, graph replay paths)
    runs = []
    for _ in range(REPEATS):
        sync()
        start = time.perf_counter()
        engine.add_request(prompt, params)
        outputs = []
        while engine.has_unfinished():
            outputs += engine.step()
        sync()
        runs.append(time.perf_counter() - start)
    seconds = statistics.median(runs)
    suffix = "" if fuse_block_store else "_sdar_store"
    return {
        f"e2e_tps_diffulex{suffix}": 256 / seconds,
        f"e2e_s_diffulex{suffix}": seconds,
        f"e2e_s_runs_diffulex{suffix}": runs,
        f"e2e_forwards_diffulex{suffix}": outputs[0].num_forwards,
    }


def bench_batched(
    model,
    folder: Path,
    counts: list[int],
    buffer: int,
    gemm_tflops: float,
    params_nonembed: int,
    eager: bool = False,
) -> list[dict]:
    strategy = "block_diffusion" if buffer == 1 else "multi_bd"
    options = {"buffer_size": buffer} if buffer > 1 else {}
    engine = make_engine(
        model,
        folder,
        strategy=strategy,
        block_size=32,
        max_num_reqs=max(counts),
        kv_gb=60.0,
        cuda_graph_max_reqs=max(counts),
        enforce_eager=eager,
        block_add_threshold=0.1,
        denoise_iterations_per_sync=1,  # one forward per engine step: the step time is a forward's
        **options,
    )
    rows = []
    for count in counts:
        for index in range(count):
            engine.add_request(
                [100 + index] * 128, SamplingParams(max_tokens=512, ignore_eos=True, threshold=0.99)
            )
        for _ in range(6):  # admission + prefill + reach the steady buffer
            engine.step()
        step_ms = steady_step_ms(engine, 10)
        tokens = count * 32 * buffer
        flops = 2 * params_nonembed * tokens
        rows.append(
            {
                "buffer": buffer,
                "requests": count,
                "step_ms": step_ms,
                "tokens_per_s": tokens / (step_ms / 1000),
                "gemm_fraction": flops / (step_ms / 1000) / (gemm_tflops * 1e12),
                "graphs": not eager,
            }
        )
        drain(engine)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--quick", action="store_true", help="fewer batch sizes (smoke test)")
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="tiny shape on the CPU: checks the script runs"
    )
    args = parser.parse_args()
    if args.cpu_smoke:
        bench_gpu_models.DEVICE = "cpu"
        LLADA_8B.update(TINY, embedding_size=TINY["vocab_size"])
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict = {
        "device": torch.cuda.get_device_name() if bench_gpu_models.DEVICE == "cuda" else "cpu (smoke test)",
        "date": datetime.date.today().isoformat(),
        "model_shape": "LLaDA-8B (d_model 4096, 32 layers, 32 heads, MLP 12288, vocab 126464), random bf16 weights",
        "torch": torch.__version__,
    }
    result.update(
        ceilings() if bench_gpu_models.DEVICE == "cuda" else {"copy_bandwidth_gbs": 10.0, "gemm_tflops": 1.0}
    )
    print(json.dumps(result), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "config.json").write_text(json.dumps(LLADA_8B))
        model, weight_bytes = build_model()
        result["weight_gb"] = weight_bytes / 1e9
        embed = LLADA_8B["vocab_size"] * LLADA_8B["d_model"]
        params_nonembed = weight_bytes // 2 - 2 * embed  # the per-token GEMM work: layers only
        bandwidth = result["copy_bandwidth_gbs"] * 1e9
        graphs = bench_b1(model, folder, weight_bytes, bandwidth, eager=False, iterations_per_sync=8)
        synced = bench_b1(model, folder, weight_bytes, bandwidth, eager=False, iterations_per_sync=1)
        whole_block = bench_b1(model, folder, weight_bytes, bandwidth, eager=False, iterations_per_sync=32)
        result["b1_step_ms_loop32"] = whole_block["b1_step_ms"]
        eager = bench_b1(model, folder, weight_bytes, bandwidth, eager=True, iterations_per_sync=1)
        result.update(graphs)
        result["b1_step_ms_sync_each"] = synced["b1_step_ms"]
        result["b1_step_ms_eager"] = eager["b1_step_ms"]
        print(json.dumps(result), flush=True)
        result.update(bench_e2e_diffulex(model, folder, fuse_block_store=True))
        result.update(bench_e2e_diffulex(model, folder, fuse_block_store=False))
        counts = [1, 8, 64] if args.quick else [1, 8, 32, 64, 128]
        batched = bench_batched(model, folder, counts, 1, result["gemm_tflops"], params_nonembed)
        batched += bench_batched(model, folder, counts, 2, result["gemm_tflops"], params_nonembed)
        result["batched"] = batched
        at64 = [r for r in batched if r["requests"] == 64 and r["buffer"] == 1]
        result["gemm_fraction_at_64"] = at64[0]["gemm_fraction"] if at64 else None
        del model
        torch.cuda.empty_cache()
    result.update(bench_e2e_hf())
    result["e2e_speedup"] = result["e2e_tps_diffulex"] / result["e2e_tps_hf"]
    (args.out / "bench_gpu.json").write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(f"{result['device']}  {result['date']}  {result['model_shape']}")
    print(
        f"copy {result['copy_bandwidth_gbs']:.0f} GB/s   bf16 GEMM {result['gemm_tflops']:.0f} TFLOP/s   weights {result['weight_gb']:.2f} GB"
    )
    print(
        f"b1 step (32 tok / 1024 ctx): {result['b1_step_ms']:.2f} ms graphs + device loop, "
        f"{result['b1_step_ms_loop32']:.2f} ms with 32 per sync, "
        f"{result['b1_step_ms_sync_each']:.2f} ms graphs syncing every forward, {result['b1_step_ms_eager']:.2f} ms eager; "
        f"floor {result['floor_ms']:.2f} ms; ratio {result['ratio_to_floor']:.2f}"
    )
    print(
        f"e2e b1 (128+256, 4 tok/fwd): Diffulex {result['e2e_tps_diffulex']:.1f} tok/s ({result['e2e_forwards_diffulex']} fwd), HF {result['e2e_tps_hf']:.1f} tok/s ({result['e2e_forwards_hf']} fwd), x{result['e2e_speedup']:.2f}"
    )
    print(
        f"  (SDAR's separate store forward: {result['e2e_tps_diffulex_sdar_store']:.1f} tok/s, "
        f"{result['e2e_forwards_diffulex_sdar_store']} fwd)"
    )
    print(f"{'buffer':>6} {'reqs':>5} {'step ms':>9} {'tok/s':>10} {'GEMM frac':>9}")
    for row in result["batched"]:
        print(
            f"{row['buffer']:>6} {row['requests']:>5} {row['step_ms']:>9.2f} {row['tokens_per_s']:>10.0f} {row['gemm_fraction']:>9.2f}"
        )


if __name__ == "__main__":
    main()
