"""Host overhead of one engine step, with a null model that returns random logits.

Everything but the model runs as in serving: scheduling, planning, packing the StepPlan, copying it to
tensors, sampling (top-1 and confidence on the device), the strategy's update and the stop checks. The
null model costs nothing, so the time per step is the engine's own overhead.

    python scripts/bench_host.py [--requests 1 16 64] [--strategy block_diffusion] [--steps 200] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from diffulex import LLM, SamplingParams
from diffulex.models.tiny_checkpoint import write_tiny_checkpoint


class NullModel(nn.Module):
    """Returns zero hidden states and random logits: the cost of a model without its compute."""

    def __init__(self, vocab_size: int, hidden: int = 8):
        super().__init__()
        self.vocab_size = vocab_size
        self.hidden = hidden
        self.seconds = 0.0  # time spent inside the null model itself (subtracted: "excluding the model")

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = torch.zeros(input_ids.shape[0], self.hidden)
        self.seconds += time.perf_counter() - start
        return out

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = torch.randn(hidden.shape[0], self.vocab_size) * 4
        self.seconds += time.perf_counter() - start
        return out


def measure(checkpoint: Path, strategy: str, family_block: int, num_requests: int, steps: int) -> dict:
    llm = LLM(
        str(checkpoint),
        strategy=strategy,
        block_size=family_block,
        buffer_size=2 if strategy in ("multi_bd", "d2f") else None,
        device="cpu",
        dtype="float32",
        max_num_reqs=max(num_requests, 1),
        enable_prefix_caching=False,
        # One forward per engine step, as this table has always measured (the device loop would put up
        # to denoise_iterations_per_sync forwards in one step).
        denoise_iterations_per_sync=1,
    )
    engine = llm.engine
    null_model = NullModel(engine.spec.vocab_size)
    engine.runner.model = null_model
    # Long generations so every request stays running for the whole measurement.
    params = SamplingParams(
        max_tokens=4096, ignore_eos=True, threshold=0.9 if strategy != "block_diffusion" else None
    )
    for index in range(num_requests):
        engine.add_request([10 + index % 50] * 32, params)
    for _ in range(5):  # admission and prefill steps are not the steady state
        engine.step()
    assert engine.scheduler.num_running == num_requests
    execute = engine.runner.execute
    runner_time = 0.0

    def timed_execute(*args, **kwargs):
        nonlocal runner_time
        start = time.perf_counter()
        result = execute(*args, **kwargs)
        runner_time += time.perf_counter() - start
        return result

    engine.runner.execute = timed_execute  # type: ignore[method-assign]
    null_model.seconds = 0.0
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    total = time.perf_counter() - start
    # A step that raised fails its requests (the engine keeps serving): then nothing was measured.
    assert engine.scheduler.num_running == num_requests, "requests failed during the timed steps"
    for request_id in list(engine.requests):
        engine.abort(request_id)
    return {
        "strategy": strategy,
        "num_requests": num_requests,
        "step_ms": 1000 * total / steps,
        "model_ms": 1000 * null_model.seconds / steps,
        "host_ms": 1000 * (total - null_model.seconds) / steps,
        "runner_ms": 1000 * (runner_time - null_model.seconds) / steps,
        "engine_ms": 1000 * (total - runner_time) / steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--strategy", nargs="+", default=["block_diffusion", "multi_bd"])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = write_tiny_checkpoint("sdar", Path(tmp) / "sdar", seed=0, with_tokenizer=False)
        for strategy in args.strategy:
            for count in args.requests:
                results.append(measure(checkpoint, strategy, 32, count, args.steps))
    print(f"host overhead per step, null model, block 32 ({platform.processor() or platform.machine()})")
    print(
        f"{'strategy':<16}{'requests':>9}{'step ms':>10}{'null model':>11}{'host ms':>10}"
        f"{'engine':>9}{'runner':>9}"
    )
    for row in results:
        print(
            f"{row['strategy']:<16}{row['num_requests']:>9}{row['step_ms']:>10.3f}{row['model_ms']:>11.3f}"
            f"{row['host_ms']:>10.3f}{row['engine_ms']:>9.3f}{row['runner_ms']:>9.3f}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
