"""Time the fused MoE path against the grouped (host-routed) path at LLaDA2.0-mini's shape (device only).

    python scripts/bench_moe.py --out $OUT [--sweep]

One sparse layer: hidden 2048, 256 experts of 512, 8 per token, bf16, random weights and sigmoid-top-k
routing (close to uniform over the experts, so large batches touch every expert). For T in 1, 32, 256,
1024 tokens: the grouped path (``StackedExperts.grouped_forward``), the fused path launched eagerly, and
the fused path replayed from a CUDA graph (no launch overhead: what the runner's graphs see). The floor is
the bytes of the experts touched (plus activations) over the device copy rate measured in the same run.
``--sweep`` also times a few tile configurations of the fused path at 1 and 256 tokens (each one
compiles its own kernels, so it costs a few seconds per configuration). Prints a table; writes
``bench_moe.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
from pathlib import Path

import torch
from diffulex.kernels.fused_moe import MoeTileConfig, default_moe_config, fused_moe_triton
from triton.testing import do_bench, do_bench_cudagraph

from diffulex.layers.moe import StackedExperts

HIDDEN, INTER, EXPERTS, TOP_K = 2048, 512, 256, 8
TOKEN_COUNTS = (1, 32, 256, 1024)
DTYPE = torch.bfloat16


def copy_bandwidth_gbs() -> float:
    """Device copy rate (read + write bytes per second) of a 1 GiB buffer, GB/s."""
    src = torch.empty(1 << 29, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=5, rep=50, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def random_experts() -> StackedExperts:
    with torch.device("cuda"):
        experts = StackedExperts(EXPERTS, HIDDEN, INTER).to(DTYPE)
    g = torch.Generator(device="cuda").manual_seed(0)
    experts.gate_up_weight.normal_(generator=g).mul_(HIDDEN**-0.5)
    experts.down_weight.normal_(generator=g).mul_(INTER**-0.5)
    return experts


def routed_inputs(tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(tokens)
    hidden = torch.randn(tokens, HIDDEN, device="cuda", generator=g).to(DTYPE)
    scores = torch.sigmoid(torch.randn(tokens, EXPERTS, device="cuda", generator=g))
    weights, ids = scores.topk(TOP_K, dim=-1)
    return hidden, weights / weights.sum(-1, keepdim=True) * 2.5, ids


def step_cost(tokens: int, ids: torch.Tensor) -> tuple[int, int]:
    """Predicted (bytes, FLOPs) of one fused MoE step: touched experts' weights + activations and scratch."""
    element = torch.finfo(DTYPE).bits // 8
    touched = int(torch.unique(ids).numel())
    pairs = tokens * TOP_K
    weight_bytes = touched * 3 * HIDDEN * INTER * element
    # hidden read, intermediate write + read, fp32 slot outputs write + read, output write
    activation_bytes = tokens * HIDDEN * element * 2 + pairs * INTER * element * 2 + pairs * HIDDEN * 4 * 2
    return weight_bytes + activation_bytes, 2 * pairs * 3 * HIDDEN * INTER


def time_fused(experts: StackedExperts, inputs, config: MoeTileConfig | None = None) -> tuple[float, float]:
    """(eager ms, CUDA-graph replay ms) of the fused path."""
    hidden, weights, ids = inputs

    def run() -> torch.Tensor:
        return fused_moe_triton(hidden, weights, ids, experts.gate_up_weight, experts.down_weight, config)

    eager = do_bench(run, warmup=10, rep=100, return_mode="median")
    graph = do_bench_cudagraph(run, rep=100, return_mode="median")
    return eager, graph


def sweep_configs() -> list[MoeTileConfig]:
    base = default_moe_config(HIDDEN, INTER)
    variants = [
        dict(gate_up_block_n=16),
        dict(gate_up_block_n=64),
        dict(gate_up_block_k=64),
        dict(gate_up_block_k=256, gate_up_stages=3),
        dict(down_block_n=32),
        dict(down_block_n=128),
        dict(down_block_k=128),
        dict(gate_up_warps=8, down_warps=8),
        dict(gate_up_stages=3, down_stages=3),
        dict(block_m=32),
        dict(block_m=64, gate_up_block_n=64, down_block_n=128, gate_up_warps=8, down_warps=8),
    ]
    return [base] + [dataclasses.replace(base, **variant) for variant in variants]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--sweep", action="store_true", help="also time tile configurations at T=1, 256")
    args = parser.parse_args()
    bandwidth = copy_bandwidth_gbs()
    experts = random_experts()
    rows = []
    with torch.no_grad():
        for tokens in TOKEN_COUNTS:
            inputs = routed_inputs(tokens)
            hidden, weights, ids = inputs
            grouped = do_bench(
                lambda h=hidden, w=weights, i=ids: experts.grouped_forward(h, w, i, torch.float32),
                warmup=3,
                rep=30,
                return_mode="median",
            )
            eager, graph = time_fused(experts, inputs)
            num_bytes, flops = step_cost(tokens, ids)
            floor_ms = num_bytes / (bandwidth * 1e9) * 1e3
            rows.append(
                dict(
                    tokens=tokens,
                    grouped_ms=grouped,
                    fused_eager_ms=eager,
                    fused_graph_ms=graph,
                    bytes=num_bytes,
                    flops=flops,
                    floor_ms=floor_ms,
                    graph_over_floor=graph / floor_ms,
                    tflops=flops / (graph * 1e-3) / 1e12,
                )
            )
        sweep = []
        if args.sweep:
            for tokens in (1, 256):
                inputs = routed_inputs(tokens)
                for config in sweep_configs():
                    try:
                        _, graph = time_fused(experts, inputs, config)
                    except Exception as error:  # a configuration may not fit the device: report, go on
                        graph = float("nan")
                        print(f"config {config} failed at T={tokens}: {error}")
                    sweep.append(dict(tokens=tokens, config=dataclasses.asdict(config), fused_graph_ms=graph))
    result = dict(
        device=torch.cuda.get_device_name(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        shape=dict(hidden=HIDDEN, intermediate=INTER, experts=EXPERTS, top_k=TOP_K, dtype=str(DTYPE)),
        copy_gbs=bandwidth,
        default_config=dataclasses.asdict(default_moe_config(HIDDEN, INTER)),
        rows=rows,
        sweep=sweep,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_moe.json").write_text(json.dumps(result, indent=2))
    for tokens in (1, 256):
        timed = [r for r in sweep if r["tokens"] == tokens and r["fused_graph_ms"] == r["fused_graph_ms"]]
        best = sorted(timed, key=lambda r: r["fused_graph_ms"])[:3]  # (NaN: a configuration that failed)
        for r in best:
            print(f"sweep T={tokens}: {r['fused_graph_ms'] * 1e3:8.1f} us  {r['config']}")
    print(f"copy rate {bandwidth:.0f} GB/s; times in microseconds (median)")
    print(f"{'T':>5} {'grouped':>10} {'fused':>10} {'fused+graph':>12} {'floor':>8} {'x floor':>8} {'MB':>8}")
    for r in rows:
        print(
            f"{r['tokens']:>5} {r['grouped_ms'] * 1e3:>10.1f} {r['fused_eager_ms'] * 1e3:>10.1f} "
            f"{r['fused_graph_ms'] * 1e3:>12.1f} {r['floor_ms'] * 1e3:>8.1f} {r['graph_over_floor']:>8.2f} "
            f"{r['bytes'] / 1e6:>8.1f}"
        )


if __name__ == "__main__":
    main()
