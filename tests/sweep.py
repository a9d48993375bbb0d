"""Random problems through the CUDA kernels, against the CPU path and the oracle: a deeper sweep
than the test suite's, to run after a kernel change (through the host build of the kernels, no
GPU needed) or on a GPU.

    python tests/sweep.py --ops forward backward unfused --count 200
    python tests/sweep.py --device cuda --count 500 --dtypes float16 bfloat16 float32
    NATTEN_RS_WGMMA=1 python tests/sweep.py --reversed --grid 3 --large
    NATTEN_RS_WGMMA=1 NATTEN_RS_TMA=1 python tests/sweep.py --ops forward --count 300

Every problem is drawn from --seed with every feature (test_fused.random_case: ranks 1-3, odd and
even kernels, stride, dilation, causal per axis, GQA/MQA, Dv != D, additional tokens, rpb,
scales, layouts); head dims are multiples of 8 in the half types, so that the tensor-core
kernels take them where they can. A failing problem is printed with its error and the sweep goes
on; the exit status is the number of failures (capped at 100). Through the host build, the sweep
also says how many problems took bulk tensor copies (NATTEN_RS_TMA=1)."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch
from conftest import LAYOUTS
from natten_rs import _core
from test_cuda import check_fused_backward, check_fused_forward, check_unfused
from test_fused import random_case

# (axes, kernel limit) per rank: the test suite's scale, and --large's (several tiles and many
# slabs to an axis).
SHAPES = {1: ((90,), 33), 2: ((20, 22), 11), 3: ((7, 8, 9), 5)}
LARGE_SHAPES = {1: ((300,), 90), 2: ((40, 44), 23), 3: ((10, 12, 14), 9)}
HALF_DIMS = (8, 16, 24, 32, 48, 64, 96, 128, 256)


def unfused_case(rng: random.Random, rank: int, axes, max_kernel: int):
    """An unfused problem (test_cuda.CASES's form): odd kernels from 3, dilation, causal, rpb,
    additional tokens."""
    spatial, kernel, dilation = [], [], []
    for n in axes:
        k = rng.choice([k for k in range(3, max_kernel + 1, 2) if k <= n])
        d = rng.choice([d for d in (1, 2, 3) if k * d <= n])
        spatial.append(rng.randint(k * d, n))
        kernel.append(k)
        dilation.append(d)
    causal = tuple(rng.random() < 0.3 for _ in range(rank))
    return (tuple(spatial), tuple(kernel), tuple(dilation), causal, rng.random() < 0.5,
            rng.choice((0, 0, 0, 2)))  # fmt: skip


def draw(op: str, rng: random.Random, dtype, large: bool):
    """One problem for `op`: what it is, and the check of it on a device inside a context."""
    rank = rng.choice((1, 2, 2, 3))
    axes, max_kernel = (LARGE_SHAPES if large else SHAPES)[rank]
    half = dtype in (torch.float16, torch.bfloat16)
    if op == "unfused":
        case = unfused_case(rng, rank, axes, min(max_kernel, 13))
        dim, layout = rng.choice((8, 16, 32, 64) if half else (4, 8, 16)), rng.choice(LAYOUTS)
        return f"{case} D{dim} {layout}", lambda device, kernels: check_unfused(
            case, dtype, layout, device, kernels, dim=dim
        )
    # The backward's tensor-core kernels take head dims up to 128.
    dims = tuple(d for d in HALF_DIMS if op == "forward" or d <= 128) if half else (4, 8, 16)
    case = random_case(rng, rank, axes, max_kernel, dims, dims_v=(16, 40) if half else (6,))
    run = check_fused_forward if op == "forward" else check_fused_backward
    return str(case), lambda device, kernels: run(case, dtype, device, kernels)


def tensor_copies(directory: str, seen: dict) -> int:
    """Bulk tensor copies the host libraries built in `directory` have issued since the last
    call (`seen`: each library's count then; once opened here, a library stays loaded, so its
    count only grows)."""
    issued = 0
    for library in Path(directory).glob("*.so"):
        count = ctypes.c_ulonglong.in_dll(ctypes.CDLL(str(library)), "na_host_tensor_copies").value
        issued += count - seen.get(library, 0)
        seen[library] = count
    return issued


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", nargs="+", choices=["forward", "backward", "unfused"],
                        default=["forward", "backward", "unfused"])  # fmt: skip
    parser.add_argument("--count", type=int, default=100, help="problems per op")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"],
                        choices=["float16", "bfloat16", "float32", "float64"])  # fmt: skip
    parser.add_argument("--device", choices=["host", "cuda"], default="host",
                        help="the host build of the kernels (CPU tensors), or a GPU")  # fmt: skip
    parser.add_argument("--reversed", action="store_true",
                        help="host: a block's threads take their turns last first")  # fmt: skip
    parser.add_argument("--grid", type=int, default=None, help="host: at most this many blocks")
    parser.add_argument("--large", action="store_true", help="longer axes and wider windows")
    args = parser.parse_args()

    if args.device == "cuda":
        device, kernels = "cuda", contextlib.nullcontext
    else:
        device, directory = "cpu", tempfile.mkdtemp()
        options = {"reversed_threads": args.reversed}
        if args.grid is not None:
            options["max_grid"] = args.grid

        @contextlib.contextmanager
        def kernels():
            _core.run_cuda_kernels_on_host(directory, **options)
            try:
                yield
            finally:
                tally.append(tensor_copies(directory, seen))
                _core.run_cuda_kernels_on_host(None)

    tally, seen = [], {}  # per run on the host build: bulk tensor copies (NATTEN_RS_TMA=1)
    failures = 0
    for op in args.ops:
        rng = random.Random(f"{args.seed}-{op}")
        passed = 0
        for i in range(args.count):
            dtype = getattr(torch, rng.choice(args.dtypes))
            what, run = draw(op, rng, dtype, args.large)
            start = time.perf_counter()
            try:
                run(device, kernels)
            except Exception as error:  # noqa: BLE001 (reported; the sweep goes on)
                failures += 1
                print(f"FAIL {op} {i} {dtype} {what}: {error!r}"[:2000], flush=True)
                continue
            passed += 1
            print(f"ok {op} {i} {dtype} {what} ({time.perf_counter() - start:.1f} s)",
                  flush=True)  # fmt: skip
        print(f"{op}: {passed} of {args.count} passed", flush=True)
    if any(tally):
        print(f"host: {sum(n > 0 for n in tally)} runs took bulk tensor copies", flush=True)
    return min(failures, 100)


if __name__ == "__main__":
    sys.exit(main())
