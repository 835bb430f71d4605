"""scripts/bench_host.py runs the real engine around a null model: a step that raises would fail the
requests and leave nothing measured, so the smoke test checks the measurement, not just the exit code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_host.py"


def test_bench_host_measures_steps(tmp_path: Path) -> None:
    out = tmp_path / "host.json"
    run = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--requests",
            "1",
            "4",
            "--strategy",
            "block_diffusion",
            "multi_bd",
            "--steps",
            "5",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [(r["strategy"], r["num_requests"]) for r in rows] == [
        ("block_diffusion", 1),
        ("block_diffusion", 4),
        ("multi_bd", 1),
        ("multi_bd", 4),
    ]
    for row in rows:
        assert row["model_ms"] > 0 and row["runner_ms"] > 0 and row["engine_ms"] > 0, row
        assert row["host_ms"] > row["runner_ms"] * 0.5, row
