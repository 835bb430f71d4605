"""Run Triton kernels under the interpreter in a child process (TRITON_INTERPRET must be set before
triton is imported, so it cannot be switched on inside the test session itself)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


def run_interpreted(child_code: str, cases: Any, workdir: Path, timeout_s: int = 300) -> Any:
    """Save ``cases``, run ``child_code`` (argv: cases path, output path) interpreted, load its output."""
    torch.save(cases, workdir / "cases.pt")
    proc = subprocess.run(
        [sys.executable, "-c", child_code, str(workdir / "cases.pt"), str(workdir / "out.pt")],
        cwd=REPO_ROOT,
        env=dict(os.environ, TRITON_INTERPRET="1"),
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert proc.returncode == 0, f"interpreted kernel run failed:\n{proc.stdout}\n{proc.stderr}"
    return torch.load(workdir / "out.pt")
