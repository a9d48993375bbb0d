"""Run a neighborhood-attention problem through natten_rs and through the dense reference.

``python -m natten_rs.profiler`` runs the default problem (2-D, B=8, heads=2, 56x56, head_dim=32,
kernel 7, dilations 1 and 4) through natten_rs's unfused ops (qk -> softmax -> av) and its fused
op, checks that both agree with the dense PyTorch reference, and prints a table of times,
speed-ups and errors. Exit status 1 when a result disagrees. ``--device cuda`` runs it on the GPU
(the reference too), ``--rpb`` adds a relative positional bias (NAT/DiNAT models).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable

import torch

from . import _core, functional, reference

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
# Largest max-abs error, relative to the output's scale, accepted per dtype.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m natten_rs.profiler",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument(
        "--size",
        type=int,
        nargs="+",
        default=[56, 56],
        help="spatial shape, 1 to 3 axes (default 56 56)",
    )
    p.add_argument("--dim", type=int, default=32, help="head dim")
    p.add_argument("--kernel", type=int, default=7)
    p.add_argument("--dilations", type=int, nargs="+", default=[1, 4])
    p.add_argument("--causal", action="store_true")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of natten_rs (best taken)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--rpb", action="store_true", help="with a relative positional bias")
    args = p.parse_args(argv)
    try:
        args.device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device: expected cpu or cuda[:N], got {args.device!r}")
    if args.device.type not in ("cpu", "cuda"):
        p.error(f"--device: expected cpu or cuda[:N], got {str(args.device)!r}")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device: cuda needs a CUDA GPU, but torch.cuda.is_available() is False")
    if args.rpb and (args.causal or args.kernel % 2 == 0):
        p.error("--rpb: expected an odd --kernel without --causal (as NATTEN's rpb)")
    return args


def best_time(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Best wall time of ``repeats`` calls, in seconds, after one warm-up call (on a GPU, until
    the device is done)."""

    def call():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def unfused_attention(q, k, v, kernel, dilation, causal, rpb):
    """Neighborhood attention through the unfused ops: heads-first ``[B, heads, *spatial, D]``,
    ``rpb`` ``[heads, 2 K - 1, ...]`` or None."""
    rank = q.dim() - 3
    qk = getattr(functional, f"na{rank}d_qk")
    av = getattr(functional, f"na{rank}d_av")
    attn = qk(q * q.shape[-1] ** -0.5, k, kernel, dilation, is_causal=causal, rpb=rpb)
    return av(attn.softmax(-1), v, kernel, dilation, is_causal=causal)


def heads_last(t):
    return t.movedim(1, -2)


def fused_attention(q, k, v, kernel, dilation, causal, rpb):
    """The same through the fused op (heads-last views of the same memory)."""
    na = getattr(functional, f"na{q.dim() - 3}d")
    qkv = (heads_last(q), heads_last(k), heads_last(v))
    out = na(*qkv, kernel, dilation=dilation, is_causal=causal, rpb=rpb)
    return out.movedim(-2, 1)


def reference_attention(q, k, v, kernel, dilation, causal, rpb):
    """The same through the dense oracle (heads-last, float64 inside)."""
    qkv = (heads_last(q), heads_last(k), heads_last(v))
    out = reference.na(*qkv, kernel, dilation=dilation, is_causal=causal, rpb=rpb)
    return out.movedim(-2, 1)


IMPLEMENTATIONS = {"unfused": unfused_attention, "fused": fused_attention}


def measure(problem: tuple, dtype: torch.dtype, repeats: int, device: torch.device) -> dict:
    """Times and errors of every implementation on one problem."""
    with torch.no_grad():
        expected = reference_attention(*problem).double()
        row = {"reference": best_time(lambda: reference_attention(*problem), 1, device)}
        scale = max(expected.abs().max().item(), 1.0)
        for name, fn in IMPLEMENTATIONS.items():
            row[name] = best_time(lambda fn=fn: fn(*problem), repeats, device)
            error = (fn(*problem).double() - expected).abs().max().item()
            row[f"{name} error"] = error
            row[f"{name} ok"] = error <= TOLERANCE[dtype] * scale
    return row


def run(args: argparse.Namespace) -> list[dict]:
    dtype = DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch, args.heads, *args.size, args.dim)
    q, k, v = (torch.randn(shape, generator=gen).to(args.device, dtype) for _ in range(3))
    rpb = None
    if args.rpb:
        bias = (args.heads, *[2 * args.kernel - 1] * len(args.size))
        rpb = torch.randn(bias, generator=gen).to(args.device, dtype)
    return [
        {
            "dilation": d,
            **measure(
                (q, k, v, args.kernel, d, args.causal, rpb), dtype, args.repeats, args.device
            ),
        }
        for d in args.dilations
    ]


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device}: {torch.cuda.get_device_name(device)}"
    return f"cpu: {torch.get_num_threads()} threads, CPU kernels {_core.cpu_isa()[0]}"


def print_table(args: argparse.Namespace, rows: list[dict]) -> None:
    tokens = math.prod(args.size)
    print(
        f"problem: {len(args.size)}-D {'x'.join(map(str, args.size))} ({tokens} tokens), "
        f"B={args.batch}, heads={args.heads}, head_dim={args.dim}, kernel={args.kernel}, "
        f"causal={args.causal}, rpb={args.rpb}, {args.dtype}, torch {torch.__version__}, "
        f"{describe_device(args.device)}"
    )
    print(
        "natten_rs unfused: qk -> softmax -> av; natten_rs fused: na*d; "
        "reference: dense masked attention (float64)"
    )
    header = (
        f"{'dilation':>8} {'path':>8} {'natten_rs ms':>13} {'reference ms':>13} "
        f"{'speed-up':>9} {'max error':>10}  agree"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        for name in IMPLEMENTATIONS:
            print(
                f"{r['dilation']:>8} {name:>8} {r[name] * 1e3:>13.2f} "
                f"{r['reference'] * 1e3:>13.1f} {r['reference'] / r[name]:>8.1f}x "
                f"{r[f'{name} error']:>10.2e}  {'yes' if r[f'{name} ok'] else 'NO'}"
            )


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = run(args)
    print_table(args, rows)
    return 0 if all(r[f"{name} ok"] for r in rows for name in IMPLEMENTATIONS) else 1


if __name__ == "__main__":
    sys.exit(main())
