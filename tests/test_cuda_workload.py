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


def test_a_failed_sanitizer_run_reports_its_first_errors_first():
    frames = "".join(f"=========         Host Frame: f{i} [0x1] in lib.so\n" for i in range(400))
    output = (
        "========= COMPUTE-SANITIZER\n"
        "========= Invalid __global__ read of size 4 bytes\n"
        "=========     at na_gather+0x10\n"
        f"{frames}=========\n"
        "========= Program hit CUDA_ERROR_NOT_FOUND on CUDA API call to cuModuleGetGlobal_v2.\n"
        f"{frames}=========\n"
        "80 workloads ran on cuda\n========= ERROR SUMMARY: 2 errors\n"
    )
    report = sanitizer_report(output)
    first, _, end = report.partition("\n...\n")
    assert first.splitlines() == [
        "========= Invalid __global__ read of size 4 bytes",
        "=========     at na_gather+0x10",
        "========= Program hit CUDA_ERROR_NOT_FOUND on CUDA API call to cuModuleGetGlobal_v2.",
    ]
    assert end.endswith("ERROR SUMMARY: 2 errors\n")


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
    report = sanitizer_report(result.stdout + result.stderr)
    # --error-exitcode turns any error the tool reports into a failed exit.
    assert result.returncode == 0, report
    assert "workloads ran on cuda" in result.stdout, report


def sanitizer_report(output: str, errors: int = 3) -> str:
    """The first `errors` of compute-sanitizer's error records without their host frames (what
    failed, where, in which kernel), then the end of the output (its summary)."""
    records, current = [], None
    for line in output.splitlines():
        body = line.removeprefix("=========").strip()
        banner = body == "COMPUTE-SANITIZER" or body.startswith("ERROR SUMMARY")
        if not line.startswith("=========") or not body or banner:
            current = None
        elif current is None and len(records) < errors:
            current = [line]
            records.append(current)
        elif current is not None and not body.startswith("Host Frame"):
            current.append(line)
    first = "\n".join("\n".join(record) for record in records)
    return f"{first}\n...\n{output[-3000:]}"
