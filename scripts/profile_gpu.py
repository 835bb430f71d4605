"""Where a batch-1 denoise step spends its GPU time (LLaDA-8B shape, random bf16 weights, H200).

    python scripts/profile_gpu.py --out $OUT

Prints the top kernels of one eager step (torch.profiler) and the CUDA-event time of the graph replay.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from diffulex import SamplingParams
from scripts.bench_gpu import LLADA_8B, build_model, make_engine


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
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    engine.step()
                torch.cuda.synchronize()
            table = prof.key_averages().table(
                sort_by="cuda_time_total", row_limit=30, max_name_column_width=70
            )
            (args.out / f"profile_{'eager' if eager else 'graphs'}.txt").write_text(table)
            print(table[:6000])
            for request_id in list(engine.requests):
                engine.abort(request_id)


if __name__ == "__main__":
    main()
