"""Time the training step of the bundled tiny models, variant by variant, in one process.

python scripts/bench_training.py --out /tmp/bench-training [--family llada --family sdar]
    [--variant eager --variant compile --variant eager-nondeterministic] [--steps 60] [--profile]

Each (family, variant) prepares the run exactly as ``train_tiny.py`` does (same rows, model, optimizer
and batch streams; the tokenized suite is shared across variants), runs ``--warmup`` steps (the compile
happens there), then times ``--steps`` steps (ms per step = wall time / steps, the device synchronised
at both ends). With ``--profile`` it also records ``--profile-steps`` steps with torch.profiler and
writes the kernel table (by device time). Writes ``training_bench.json`` (and the tables) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from diffulex.quality.checkpoint import FAMILIES, write_tokenizer_files
from diffulex.quality.trainer import TrainOptions, deterministic_algorithms, prepare, tokenized_suite
from diffulex.quality.training import TokenizedRows


@dataclass(frozen=True)
class Variant:
    """A training-step configuration to time."""

    compile: bool
    deterministic: bool


VARIANTS = {
    "eager": Variant(compile=False, deterministic=True),
    "compile": Variant(compile=True, deterministic=True),
    "eager-nondeterministic": Variant(compile=False, deterministic=False),
    "compile-nondeterministic": Variant(compile=True, deterministic=False),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="folder for training_bench.json and profiles")
    parser.add_argument("--family", action="append", choices=FAMILIES, help="default: both")
    parser.add_argument(
        "--variant", action="append", choices=sorted(VARIANTS), help="default: eager, compile"
    )
    parser.add_argument("--steps", type=int, default=60, help="timed steps per variant")
    parser.add_argument(
        "--warmup", type=int, default=30, help="untimed steps first (compiles each generation length)"
    )
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--train-per-task", type=int, default=100_000)
    parser.add_argument("--size", default="default")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--profile", action="store_true", help="also write a torch.profiler kernel table")
    parser.add_argument("--profile-steps", type=int, default=5)
    return parser.parse_args()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variant(
    name: str, options: TrainOptions, rows: TokenizedRows, args: argparse.Namespace, out: Path
) -> dict:
    with deterministic_algorithms(options.deterministic):
        session = prepare(options, rows=rows)
        device = session.device
        start = time.monotonic()
        for index in range(args.warmup):
            session.step(index)
        _sync(device)
        warmup_s = time.monotonic() - start
        losses = torch.zeros((), device=device)
        start = time.monotonic()
        for index in range(args.warmup, args.warmup + args.steps):
            losses += session.step(index)
        _sync(device)
        step_ms = 1000 * (time.monotonic() - start) / args.steps
        result = {
            "step_ms": round(step_ms, 2),
            "warmup_s": round(warmup_s, 1),
            "loss": losses.item() / args.steps,
        }
        if args.profile:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            with torch.profiler.profile(activities=activities) as profiler:
                for index in range(args.profile_steps):
                    session.step(args.warmup + args.steps + index)
                _sync(device)
            sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
            table = profiler.key_averages().table(sort_by=sort, row_limit=25)
            path = out / f"profile_{options.family}_{name}.txt"
            path.write_text(table)
            result["profile"] = path.name
    return result


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    families = args.family or list(FAMILIES)
    variants = args.variant or ["eager", "compile"]
    report: dict = {"device": "", "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "runs": []}
    with tempfile.TemporaryDirectory() as scratch:
        for family in families:
            base = TrainOptions(
                family=family,
                out_dir=str(Path(scratch) / family),
                steps=args.warmup + args.steps + args.profile_steps,
                batch_size=args.batch_size,
                size=args.size,
                device=args.device,
                train_per_task=args.train_per_task,
            )
            # Tokenized once per family, shared by its variants (what train_tiny.py would train on).
            rows = tokenized_suite(base, write_tokenizer_files(family, base.out_dir))
            for name in variants:
                variant = VARIANTS[name]
                options = replace(
                    base,
                    out_dir=f"{base.out_dir}-{name}",
                    compile=variant.compile,
                    deterministic=variant.deterministic,
                )
                result = {"family": family, "variant": name, **time_variant(name, options, rows, args, out)}
                report["runs"].append(result)
                print(json.dumps(result), flush=True)
    cuda = (torch.cuda.is_available() and args.device == "auto") or args.device.startswith("cuda")
    report["device"] = torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"
    (out / "training_bench.json").write_text(json.dumps(report, indent=1))
    print(f"\n{'family':8} {'variant':26} {'ms/step':>8} {'warmup s':>9} {'mean loss':>10}")
    for run in report["runs"]:
        print(
            f"{run['family']:8} {run['variant']:26} {run['step_ms']:8.2f} {run['warmup_s']:9.1f} {run['loss']:10.4f}"
        )


if __name__ == "__main__":
    main()
