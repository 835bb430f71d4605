"""Does warming L2 with ``attn_out``'s weight during attention shorten the batch-1 step? (H200, random bf16)

    python scripts/bench_prefetch.py --out $OUT

LLaDA-8B shape, the batch-1 case of ``scripts/bench_gpu.py`` (one 32-token block over 1,024 cached
tokens, CUDA graphs, 32 forwards per host sync) once per prefetch setting (``diffulex.layers.prefetch``):
off, and each mode × issuing programs × bytes. Each setting builds a fresh engine, since the prefetch is
recorded into the captured graphs. Writes ``prefetch.json`` and prints a table, best first.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
from pathlib import Path

import torch

from diffulex import SamplingParams
from diffulex.layers.prefetch import WeightPrefetch, set_weight_prefetch
from scripts.bench_gpu import LLADA_8B, build_model, ceilings, drain, forward_ms, make_engine

SETTINGS: list[WeightPrefetch] = [
    WeightPrefetch(),
    WeightPrefetch(True, "bulk", None, 4),
    WeightPrefetch(True, "bulk", None, 16),
    WeightPrefetch(True, "bulk", 16 << 20, 16),
    WeightPrefetch(True, "line", None, 16),
    WeightPrefetch(True, "line", None, 64),
    WeightPrefetch(True, "line", 16 << 20, 64),
    WeightPrefetch(True, "load", None, 16),
    WeightPrefetch(True, "load", None, 64),
    WeightPrefetch(),  # off again: the spread between the two is the noise
]


def label(setting: WeightPrefetch) -> str:
    if not setting.enabled:
        return "off"
    size = "all" if setting.max_bytes is None else f"{setting.max_bytes >> 20} MB"
    return f"{setting.mode}, {setting.programs} programs, {size}"


def measure(model, folder: Path, repeats: int) -> tuple[list[float], list[int]]:
    """Batch-1 ms per forward (``repeats`` times), and the greedy tokens of a short request (the prefetch
    must not change them)."""
    engine = make_engine(
        model,
        folder,
        strategy="block_diffusion",
        block_size=32,
        max_num_reqs=8,
        denoise_iterations_per_sync=32,
        cuda_graph_single_tokens=[],
        kv_gb=8.0,
    )
    engine.add_request(list(range(5, 69)), SamplingParams(max_tokens=64, ignore_eos=True))
    tokens: list[int] = []
    while engine.requests:
        for output in engine.step():
            tokens = list(output.token_ids)
    engine.add_request([11] * 1024, SamplingParams(max_tokens=512, ignore_eos=True))
    for _ in range(3):
        engine.step()
    times = [forward_ms(engine, 96) for _ in range(repeats)]
    drain(engine)
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return times, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--repeats", type=int, default=3, help="measurements per setting (the best is kept)")
    args = parser.parse_args()
    model, weight_bytes = build_model()
    bandwidth = ceilings()["copy_bandwidth_gbs"] * 1e9
    rows: list[dict] = []
    reference: list[int] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "config.json").write_text(json.dumps(LLADA_8B))
        for setting in SETTINGS:
            set_weight_prefetch(setting)
            times, tokens = measure(model, folder, args.repeats)
            reference = reference if rows else tokens
            same = tokens == reference
            rows.append(
                {"setting": label(setting), "b1_step_ms": min(times), "all_ms": times, "same_tokens": same}
            )
            print(
                f"{label(setting):32s} {min(times):.3f} ms  ({', '.join(f'{t:.3f}' for t in times)}) "
                f"tokens {'same' if same else 'DIFFERENT'}",
                flush=True,
            )
    set_weight_prefetch(WeightPrefetch())
    floor_ms = 1000 * weight_bytes / bandwidth
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prefetch.json").write_text(json.dumps({"floor_ms": floor_ms, "rows": rows}, indent=2))
    print(f"\nfloor {floor_ms:.3f} ms ({weight_bytes / 1e9:.2f} GB at {bandwidth / 1e12:.2f} TB/s)")
    for row in sorted(rows, key=lambda r: r["b1_step_ms"]):
        print(f"{row['setting']:32s} {row['b1_step_ms']:.3f} ms  {row['b1_step_ms'] / floor_ms:.3f}x floor")


if __name__ == "__main__":
    main()
