"""Write a tiny random checkpoint of a model family in its official Hugging Face layout.

python scripts/make_tiny_checkpoint.py --family llada --out /tmp/tiny-llada [--seed 0] [--shards 2]
"""

from __future__ import annotations

import argparse

from diffulex.models.tiny_checkpoint import FAMILIES, write_tiny_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", required=True, choices=FAMILIES, help="model family")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument(
        "--shards", type=int, default=1, help="number of safetensors shards (1 = single file)"
    )
    parser.add_argument("--no-tokenizer", action="store_true", help="do not write tokenizer files")
    args = parser.parse_args()
    path = write_tiny_checkpoint(
        args.family, args.out, seed=args.seed, shards=args.shards, with_tokenizer=not args.no_tokenizer
    )
    print(path)


if __name__ == "__main__":
    main()
