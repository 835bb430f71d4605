"""Train a bundled tiny dLLM on the synthetic task suite and write it in the family's official layout.

python scripts/train_tiny.py --family llada --out diffulex/assets/tiny-llada [--steps 5000] [--seed 0]
python scripts/train_tiny.py --family sdar --out diffulex/assets/tiny-sdar --steps 20000 --time-budget-s 230

llada: LLaDA architecture, masked-diffusion SFT (bidirectional). sdar: SDAR/Qwen3 layout, block diffusion
(block-causal, block size 4). See diffulex/quality/training.py for the exact objectives. At the end the
saved checkpoint is loaded with the engine (diffulex.LLM) and scored greedily on the first test examples
with the family's default decoding at one token per step.
"""

from __future__ import annotations

import argparse

from diffulex.quality.checkpoint import FAMILIES, SIZES
from diffulex.quality.evaluate import default_setting, evaluate
from diffulex.quality.tasks import make_suite
from diffulex.quality.trainer import TrainOptions, resolve_device, train


def parse_args() -> argparse.Namespace:
    defaults = TrainOptions(family="llada", out_dir="")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", required=True, choices=FAMILIES, help="model family to train")
    parser.add_argument("--out", required=True, help="checkpoint folder to write (created)")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps (fixed)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="rows per step")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate")
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps, help="linear warmup")
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="AdamW decay")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of weights and batches")
    parser.add_argument("--suite-seed", type=int, default=defaults.suite_seed, help="seed of the task suite")
    parser.add_argument(
        "--train-per-task", type=int, default=defaults.train_per_task, help="training rows per task"
    )
    parser.add_argument("--size", default=defaults.size, choices=sorted(SIZES), help="model size preset")
    parser.add_argument("--device", default=defaults.device, help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--log-every", type=int, default=defaults.log_every, help="steps between log lines")
    parser.add_argument(
        "--time-limit-s",
        type=float,
        default=None,
        help="safety stop: save and stop after this many seconds (the LR schedule is then cut short)",
    )
    parser.add_argument(
        "--time-budget-s",
        type=float,
        default=None,
        help="fit the run to this time: steps 10-60 are timed and the LR schedule's total set to the steps "
        "that fit (at most --steps); the log and training.json give that count for an exact rerun",
    )
    parser.add_argument(
        "--d2f-fraction",
        type=float,
        default=defaults.d2f_fraction,
        help="llada: share of batches in D2F's block-causal pipelined layout (for d2f/multi_bd decoding)",
    )
    parser.add_argument(
        "--deterministic",
        action=argparse.BooleanOptionalAction,
        default=defaults.deterministic,
        help="deterministic kernels only, so that the same command gives the same weights (default: on)",
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the model (default: on when training on CUDA, where it halves the step time)",
    )
    parser.add_argument(
        "--eval-limit", type=int, default=100, help="test examples of the final check (0: skip)"
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    options = TrainOptions(
        family=args.family,
        out_dir=args.out,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        seed=args.seed,
        suite_seed=args.suite_seed,
        train_per_task=args.train_per_task,
        size=args.size,
        device=args.device,
        log_every=args.log_every,
        time_limit_s=args.time_limit_s,
        time_budget_s=args.time_budget_s,
        d2f_fraction=args.d2f_fraction,
        deterministic=args.deterministic,
        compile=resolve_device(args.device).type == "cuda" if args.compile is None else args.compile,
    )
    result = train(options, log=lambda line: print(line, flush=True))
    print(
        f"[{args.family}] wrote {result.out_dir} after {result.steps_done} steps in {result.elapsed_s:.0f}s"
    )
    if args.eval_limit <= 0:
        return
    _, test = make_suite(args.suite_seed, train_per_task=1)
    setting = default_setting(args.family)
    [score] = evaluate(str(result.out_dir), [setting], test[: args.eval_limit], {"device": args.device})
    tasks = ", ".join(f"{task} {accuracy:.0%}" for task, accuracy in score.per_task.items())
    print(
        f"[{args.family}] engine check, {setting.label}: exact match {score.accuracy:.1%} on "
        f"{score.num_examples} test examples, {score.forwards_per_answer:.1f} forwards/answer ({tasks})",
        flush=True,
    )


if __name__ == "__main__":
    main()
