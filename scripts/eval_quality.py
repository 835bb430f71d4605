"""Exact-match accuracy versus speed of every decoding strategy on the task suite's test split.

python scripts/eval_quality.py --model diffulex/assets/tiny-llada --model diffulex/assets/tiny-sdar \
    [--strategies vanilla,fast_dllm,d2f,multi_bd,block_diffusion] [--thresholds 0.5,0.7,0.8,0.9,0.95] \
    [--limit N] [--device auto] [--out docs/quality.md]

Writes the markdown report (--out), a JSON file and a plot (same stem, .json / .png). Each strategy runs
only on the families it applies to (diffulex/quality/evaluate.py: LINES).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from diffulex.quality.checkpoint import family_of
from diffulex.quality.evaluate import THRESHOLDS, evaluate, settings_for
from diffulex.quality.report import ModelReport, write_report
from diffulex.quality.tasks import make_suite


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", action="append", required=True, help="checkpoint folder (repeatable)")
    parser.add_argument("--strategies", default=None, help="comma-separated strategy names (default: all)")
    parser.add_argument(
        "--thresholds", default=",".join(map(str, THRESHOLDS)), help="comma-separated threshold sweep"
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="first N test examples (all tasks interleaved)"
    )
    parser.add_argument("--suite-seed", type=int, default=0, help="seed of the task suite (as in training)")
    parser.add_argument("--device", default="auto", help="engine device: auto, cpu, cuda")
    parser.add_argument("--dtype", default="auto", help="engine dtype: auto, float32, bfloat16")
    parser.add_argument("--out", default="docs/quality.md", help="markdown report (json/png beside it)")
    return parser.parse_args()


class Progress:
    """A tqdm bar when tqdm is installed, else a printed line per 10%."""

    def __init__(self, total: int):
        self.total, self.done, self.printed = total, 0, -1
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="answer", mininterval=2.0)
        except ImportError:
            self.bar = None

    def __call__(self, count: int) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
            return
        decile = 10 * self.done // max(1, self.total)
        if decile > self.printed:
            self.printed = decile
            print(f"{self.done}/{self.total} answers", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def main() -> None:
    args = parse_args()
    strategies = args.strategies.split(",") if args.strategies else None
    thresholds = [float(value) for value in args.thresholds.split(",") if value]
    _, test = make_suite(args.suite_seed, train_per_task=1)
    examples = test[: args.limit] if args.limit else test
    plans = []
    for model in args.model:
        family = family_of(json.loads((Path(model) / "config.json").read_text()))
        plans.append((model, family, settings_for(family, strategies, thresholds)))
    progress = Progress(sum(len(settings) for _, _, settings in plans) * len(examples))
    engine_options = {"device": args.device, "dtype": args.dtype}
    reports = []
    for model, family, settings in plans:
        results = evaluate(model, settings, examples, engine_options, on_chunk=progress)
        reports.append(ModelReport(Path(model).name, model, family, results))
    progress.close()
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and torch.cuda.is_available():
        device = torch.cuda.get_device_name(torch.device(device))
    meta = {"num_examples": len(examples), "suite_seed": args.suite_seed, "device": device}
    for path in write_report(reports, Path(args.out), meta):
        print(f"wrote {path}")
    for report in reports:
        for result in report.results:
            print(
                f"{report.name}: {result.setting.label}: {100 * result.accuracy:.1f}% exact match, "
                f"{result.forwards_per_answer:.2f} forwards/answer, {result.tokens_per_forward:.2f} tokens/forward"
            )


if __name__ == "__main__":
    main()
