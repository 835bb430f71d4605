"""Write the synthetic task suite's train and test splits as JSONL, for inspection.

python scripts/make_task_data.py --out /tmp/tasks [--seed 0] [--train-per-task 10000] [--test-per-task 40]

Each line: {"task": ..., "prompt": ..., "answers": [...]} (several answers = graded by membership).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from diffulex.quality.tasks import DEFAULT_TEST_PER_TASK, DEFAULT_TRAIN_PER_TASK, Example, make_suite


def write_jsonl(examples: list[Example], path: Path) -> None:
    with path.open("w") as file:
        for example in examples:
            row = {"task": example.task, "prompt": example.prompt, "answers": list(example.answers)}
            file.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="output folder (created): train.jsonl, test.jsonl")
    parser.add_argument("--seed", type=int, default=0, help="suite seed")
    parser.add_argument(
        "--train-per-task", type=int, default=DEFAULT_TRAIN_PER_TASK, help="train rows per task"
    )
    parser.add_argument(
        "--test-per-task", type=int, default=DEFAULT_TEST_PER_TASK, help="test prompts per task"
    )
    args = parser.parse_args()
    train, test = make_suite(args.seed, train_per_task=args.train_per_task, test_per_task=args.test_per_task)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(train, out / "train.jsonl")
    write_jsonl(test, out / "test.jsonl")
    counts = Counter(example.task for example in test)
    print(f"{out}: {len(train)} train rows, {len(test)} test prompts ({dict(counts)})")


if __name__ == "__main__":
    main()
