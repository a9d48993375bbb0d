"""The sanitizer workload (cuda_workload.py): it runs on the CPU (so it keeps working without a
GPU), and on a GPU compute-sanitizer's memcheck and racecheck find nothing in any kernel it
launches."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import cuda_workload
import pytest
import torch

SCRIPT = Path(cuda_workload.__file__)
# compute-sanitizer slows kernels by one or two orders of magnitude; NVRTC compiles on the host.
SANITIZER_TIMEOUT_S = 1800


def test_workload_runs_every_problem_and_dtype_on_the_cpu():
    count = cuda_workload.run(torch.device("cpu"))
    assert count == cuda_workload.RUNS


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(shutil.which("compute-sanitizer") is None, reason="needs compute-sanitizer")
@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_kernels_are_clean_under_compute_sanitizer(tool):
    args = ["compute-sanitizer", "--tool", tool, "--error-exitcode", "1"]
    result = subprocess.run(
        [*args, sys.executable, str(SCRIPT)],
        check=False,
        capture_output=True,
        text=True,
        timeout=SANITIZER_TIMEOUT_S,
    )
    report = (result.stdout + result.stderr)[-6000:]
    # --error-exitcode turns any error the tool reports into a failed exit.
    assert result.returncode == 0, report
    assert "workloads ran on cuda" in result.stdout, report
