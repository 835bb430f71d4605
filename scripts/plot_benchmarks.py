"""Plot the newest GPU run of docs/benchmarks.json into docs/benchmarks_gpu.png.

python scripts/plot_benchmarks.py
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs"


def main() -> None:
    runs = json.loads((DOCS / "benchmarks.json").read_text())
    run = runs[-1]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for buffer, marker in ((1, "o"), (2, "s")):
        rows = [r for r in run["batched"] if r["buffer"] == buffer]
        counts = [r["requests"] for r in rows]
        left.plot(counts, [r["tokens_per_s"] / 1000 for r in rows], marker=marker, label=f"buffer {buffer}")
        right.plot(counts, [100 * r["gemm_fraction"] for r in rows], marker=marker, label=f"buffer {buffer}")
    left.set(
        xscale="log", xlabel="running requests (block 32)", ylabel="query tokens computed / s (thousands)"
    )
    right.axhline(65, color="grey", linestyle="--", label="target 65%")
    right.set(xscale="log", xlabel="running requests (block 32)", ylabel="% of measured bf16 GEMM rate")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend()
    fig.suptitle(
        f"{run['device']}, {run['date']}: LLaDA-8B shape, random bf16 weights; "
        f"b1 step {run['b1_step_ms']:.2f} ms (floor {run['floor_ms']:.2f} ms)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(DOCS / "benchmarks_gpu.png", dpi=110)


if __name__ == "__main__":
    main()
