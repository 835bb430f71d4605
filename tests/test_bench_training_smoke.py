"""scripts/bench_training.py on the CPU at the toy size: every (family, variant) prepared as train_tiny
does, timed, profiled, and reported in JSON; deterministic and non-deterministic eager runs of the same
batches agree."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_training.py"


def test_training_bench_reports_every_family_and_variant(tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = [sys.executable, str(SCRIPT), "--out", str(out), "--size", "toy", "--device", "cpu"]
    command += ["--train-per-task", "200", "--steps", "3", "--warmup", "2", "--batch-size", "8", "--profile"]
    command += ["--variant", "eager", "--variant", "eager-nondeterministic"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((out / "training_bench.json").read_text())
    assert report["device"] and report["date"]
    runs = {(r["family"], r["variant"]): r for r in report["runs"]}
    assert set(runs) == {(f, v) for f in ("llada", "sdar") for v in ("eager", "eager-nondeterministic")}
    for (family, variant), result in runs.items():
        assert result["step_ms"] > 0 and math.isfinite(result["loss"])
        assert (out / result["profile"]).read_text().count("\n") > 5, (family, variant)
    for family in ("llada", "sdar"):  # same seed, same batches: the mode changes no arithmetic on the CPU
        assert math.isclose(runs[family, "eager"]["loss"], runs[family, "eager-nondeterministic"]["loss"])
