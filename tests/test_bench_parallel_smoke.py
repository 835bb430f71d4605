"""scripts/bench_parallel.py --cpu-smoke: the multi-GPU benchmark's plumbing on tiny shapes, CPU, gloo.

Checkpoints in the official layout, TP=1 and TP=2 engines in their own processes, greedy tokens compared
for the dense model and the MoE (also with expert parallelism), speed rows and the JSON report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_parallel.py"


def test_cpu_smoke_tp2_equals_tp1(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(out), "--workdir", str(tmp_path / "work")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    data = json.loads((out / "bench_parallel.json").read_text())
    assert data["gpu_count"] == 2 and data["device"].startswith("cpu")
    assert data["environment"] == {
        "NCCL_NVLS_ENABLE": "0",
        "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
        "NVSHMEM_DISABLE_NVLS": "1",
    }
    for name, cases in (("dense", {(2, 1)}), ("moe", {(2, 1), (2, 2)})):
        section = data["correctness"][name]
        reference = section["reference_float32"]
        assert "error" not in reference and all(len(t) == 16 for t in reference["tokens_head"])
        assert {(c["tp"], c["ep"]) for c in section["cases"]} == cases
        for case in section["cases"]:
            result = case["float32"]
            assert result["equal"] and result["first_diff"] is None, (name, case)
            assert result["equal_fraction"] == 1.0
            assert result["logits"]["top1_agree"] == 1.0 and result["logits"]["relative"] < 1e-4
    speed = data["speed"]["tp"]
    assert set(speed) == {"1", "2"}
    for row in speed.values():
        assert row["b1_forward_ms"] > 0 and 0 < row["b1_efficiency"]
        assert [r["requests"] for r in row["batched"]] == [1, 4]
        for r in row["batched"]:
            assert r["step_ms"] > 0 and r["tokens_per_s"] > 0 and r["efficiency"] > 0
            assert r["running"] == r["requests"]
    assert speed["1"]["b1_efficiency"] == 1.0
    assert "skipped" in data["speed"]["dp"]
    assert "TP" in run.stdout and "b1 ms/fwd" in run.stdout  # the table, printed last
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())  # work folder removed


def test_refuses_multicast_on(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NCCL_NVLS_ENABLE": "1"},
    )
    assert run.returncode != 0 and "NCCL_NVLS_ENABLE='1'" in run.stderr
    assert not (tmp_path / "bench_parallel.json").exists()
