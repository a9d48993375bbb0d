"""Every kernel family once, on small problems, for a memory checker to watch.

``compute-sanitizer --tool memcheck --error-exitcode 1 python tests/cuda_workload.py`` (and
``--tool racecheck``) checks the CUDA kernels: the unfused ops forward and backward (rpb,
causal, dilation, a strided input; with additional tokens, and without them, which half types
take on tensor cores) and the fused forward and backward (GQA,
stride, additional tokens, rpb, head dims that differ; the half types on warpgroup products as
well, and with the forward's bulk tensor copies), at ranks 1-3, in every dtype. test_cuda.py runs
it so under ``pytest -m cuda`` when compute-sanitizer is on the PATH. ``--device cpu`` runs the
same calls on the CPU, so CI keeps the script itself working; test_cuda_host.py also runs them
through the host build of the kernels under AddressSanitizer, the memory check a machine without
a GPU can make.
"""

from __future__ import annotations

import argparse
import os
from unittest import mock

import natten_rs
import natten_rs.functional as F
import torch

# (spatial, kernel, dilation, causal): every rank, dilation, causal on some axes, and one
# problem causal nowhere (rpb).
PROBLEMS = [
    ((13,), (3,), (2,), (True,)),
    ((9, 10), (5, 3), (1, 3), (False, True)),
    ((5, 6, 7), (3, 3, 5), (1, 2, 1), (False, False, True)),
    ((12, 11), (7, 5), (1, 2), (False, False)),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
BATCH, HEADS, DIM, EXTRA = 2, 4, 16, 3


def unfused(spatial, kernel, dilation, causal, dtype, device, extra=True) -> None:
    """qk (+rpb, +extra keys where `extra`) -> softmax -> av (+extra values), forward and
    backward, with the query read through a transposed view."""
    rank = len(spatial)
    make = lambda *shape: torch.randn(*shape, dtype=dtype, device=device)
    tokens = (BATCH, HEADS, *spatial, DIM)
    q = make(*tokens[:-1][::-1], DIM).permute(*range(rank + 1, -1, -1), rank + 2)
    k, v = make(*tokens), make(*tokens)
    rpb = make(HEADS, *(2 * n - 1 for n in kernel)) if not any(causal) else None
    ek, ev = (make(BATCH, HEADS, EXTRA, DIM) for _ in range(2)) if extra else (None, None)
    leaves = [t.requires_grad_() for t in (q, k, v, ek, ev) if t is not None]
    if rpb is not None:
        leaves.append(rpb.requires_grad_())
    qk = getattr(F, f"na{rank}d_qk")
    av = getattr(F, f"na{rank}d_av")
    attn = qk(q, k, kernel, dilation, additional_keys=ek, is_causal=causal, rpb=rpb)
    out = av(attn.softmax(-1), v, kernel, dilation, additional_values=ev, is_causal=causal)
    out.backward(torch.randn_like(out))
    assert all(t.grad is not None for t in leaves)


def fused(spatial, kernel, dilation, causal, dtype, device) -> None:
    """The fused forward and backward (through out and lse) with GQA (two query heads per kv
    head), additional tokens, a value head dim unlike the query's, and rpb where nothing is
    causal (which takes stride 1), else stride 2 on the first axis."""
    rank = len(spatial)
    make = lambda *shape: torch.randn(*shape, dtype=dtype, device=device)
    q = make(BATCH, *spatial, HEADS, DIM)
    k = make(BATCH, *spatial, HEADS // 2, DIM)
    v = make(BATCH, *spatial, HEADS // 2, 2 * DIM)
    ek, ev = make(BATCH, EXTRA, HEADS // 2, DIM), make(BATCH, EXTRA, HEADS // 2, 2 * DIM)
    rpb = make(HEADS, *(2 * n - 1 for n in kernel)) if not any(causal) else None
    stride = (1 if rpb is not None else min(2, kernel[0]),) + (1,) * (rank - 1)
    leaves = [t.requires_grad_() for t in (q, k, v, ek, ev, rpb) if t is not None]
    na = getattr(natten_rs, f"na{rank}d")
    out, lse = na(q, k, v, kernel, stride, dilation, causal, None, ek, ev, rpb, True)
    assert out.shape[-1] == 2 * DIM and lse.dtype == torch.float32
    torch.autograd.backward((out, lse), (torch.randn_like(out), torch.randn_like(lse)))
    assert all(t.grad is not None for t in leaves)


def unfused_window_only(spatial, kernel, dilation, causal, dtype, device) -> None:
    """`unfused` without additional tokens (half types: the tensor-core window products)."""
    unfused(spatial, kernel, dilation, causal, dtype, device, extra=False)


def _fused_with(settings: dict, spatial, kernel, dilation, causal, dtype, device) -> None:
    """`fused` for the half types with the environment `settings` in force, then restored."""
    if dtype not in (torch.float16, torch.bfloat16):
        return
    with mock.patch.dict(os.environ, settings):
        fused(spatial, kernel, dilation, causal, dtype, device)


def fused_on_warpgroups(spatial, kernel, dilation, causal, dtype, device) -> None:
    """`fused` with NATTEN_RS_WGMMA=1, for the half types (on sm_90a, the tensor-core kernels on
    warpgroup products, with their rings in dynamic shared memory; elsewhere the kernels of
    `fused` again)."""
    _fused_with({"NATTEN_RS_WGMMA": "1"}, spatial, kernel, dilation, causal, dtype, device)


def fused_with_bulk_copies(spatial, kernel, dilation, causal, dtype, device) -> None:
    """`fused_on_warpgroups` with NATTEN_RS_TMA=1 too (on sm_90a, the forward's slabs staged by
    bulk tensor copies onto shared-memory barriers, where the layout allows)."""
    settings = {"NATTEN_RS_WGMMA": "1", "NATTEN_RS_TMA": "1"}
    _fused_with(settings, spatial, kernel, dilation, causal, dtype, device)


WORKLOADS = (unfused, unfused_window_only, fused, fused_on_warpgroups, fused_with_bulk_copies)
# Calls `run` makes: every workload on every problem in every dtype.
RUNS = len(WORKLOADS) * len(PROBLEMS) * len(DTYPES)


def run(device: torch.device) -> int:
    """Every workload on ``device``; returns how many ran."""
    torch.manual_seed(0)
    count = 0
    for problem in PROBLEMS:
        for dtype in DTYPES:
            for workload in WORKLOADS:
                workload(*problem, dtype, device)
                count += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    device = torch.device(parser.parse_args().device)
    print(f"{run(device)} workloads ran on {device}")


if __name__ == "__main__":
    main()
