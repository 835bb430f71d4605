"""Triton paged attention / K/V store against the plain-torch reference, on the CPU.

The kernels run under the Triton interpreter, which needs ``TRITON_INTERPRET=1`` before triton is
imported, so subprocesses (tests/attention_cases.py run as a script, one shard of the cases per CPU core)
run every CPU case and report the errors as JSON; the tests below only read that report. Every case runs
unsplit (``num_splits=1``) and split-KV (2 and 3 splits, with 16-key tiles unless the case sets
``block_n``, so that even short key ranges are cut across programs). GPU (``-m gpu``):
tests/test_kernels_attention_gpu.py.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys

import pytest

from tests import attention_cases
from tests.attention_cases import CPU_CASES, SPLITS

# ---- CPU tests: interpreter subprocesses, one per CPU core (at most 4), sharing the cases ---------------


@pytest.fixture(scope="module")
def cpu_report() -> dict[str, float | str]:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    num_shards = max(1, min(4, os.cpu_count() or 1))

    def run_shard(shard: int) -> dict[str, float | str]:
        proc = subprocess.run(
            [sys.executable, attention_cases.__file__, str(shard), str(num_shards)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert proc.returncode == 0, f"interpreter subprocess failed:\n{proc.stdout}\n{proc.stderr}"
        return json.loads(proc.stdout.strip().splitlines()[-1])

    report: dict[str, float | str] = {}
    with concurrent.futures.ThreadPoolExecutor(num_shards) as pool:
        for shard_report in pool.map(run_shard, range(num_shards)):
            report.update(shard_report)
    return report


@pytest.mark.parametrize("num_splits", SPLITS)
@pytest.mark.parametrize("case_name", [case.name for case in CPU_CASES])
def test_paged_attention_interpreter_matches_reference(
    cpu_report: dict, case_name: str, num_splits: int
) -> None:
    name = f"{case_name}/splits={num_splits}"
    error = cpu_report[name]
    assert isinstance(error, float), error
    assert error < 1e-4, f"{name}: max abs error {error}"


def test_store_kv_interpreter_matches_reference(cpu_report: dict) -> None:
    error = cpu_report["store_kv_fp32"]
    assert isinstance(error, float), error
    assert error == 0.0


def test_choose_num_splits_host_rule() -> None:
    pytest.importorskip("triton")
    from diffulex.kernels.paged_attention import MAX_NUM_SPLITS, choose_num_splits

    assert choose_num_splits(32 * 1 * 1, 132) == 6  # LLaDA-8B batch-1 denoise step: 192 programs
    assert choose_num_splits(32 * 1 * 4, 132) == 2
    assert choose_num_splits(32 * 1 * 8, 132) == 1
    assert choose_num_splits(32 * 1 * 9, 132) == 1  # 288 programs already fill the 132 SMs
    assert choose_num_splits(32 * 32 * 1, 132) == 1  # prefill: unsplit
    assert choose_num_splits(1, 132) == MAX_NUM_SPLITS
