"""The unfused CUDA path (qk -> softmax -> av) against dense attention on the same GPU.

Side by side in one process, interleaved round by round, median of the rounds, timed with CUDA
events. For each problem and pass (forward, forward + backward) it prints:
  * natten_rs: ``na2d_qk`` -> softmax -> ``na2d_av`` (heads-first, scaled query)
  * sdpa: ``torch.nn.functional.scaled_dot_product_attention`` over all tokens
and the ratio sdpa / natten_rs. For the forward it also prints the bytes the three unfused
kernels and the softmax move at the least (inputs read once, outputs written once, the attention
weights written, read and written by softmax, read again) divided by the time, against the
device's memory bandwidth (from its clock and bus width, or ``--peak-gbs``).

With ``--rpb``, natten_rs's logits take a relative positional bias (as NAT/DiNAT models call
``na2d_qk``; its gradient too in forward + backward); sdpa goes without. The forward's line ends
with its three parts timed alone (``qk``, ``softmax``, ``av``; each with its inputs ready), so
that it says which one to work on. Each ``--tune LABEL=SETTINGS`` also times the unfused ops with
their tensor-core kernels compiled under those settings (NATTEN_RS_TUNE=SETTINGS,
rust/src/cuda/tuning.rs), printing its time and the default's over it (above 1: they pay).

    python benches/bench_cuda.py [--problems p1 p2] [--rounds 20] [--dilations 1 4] [--rpb]
        [--tune blocks4="NA_TC_UNFUSED_MIN_BLOCKS=4" ...]
"""

from __future__ import annotations

import argparse
import functools
import math
import os
from dataclasses import dataclass
from unittest import mock

import torch
import torch.nn.functional as F
from natten_rs.functional import na2d_av, na2d_qk
from rounds import interleaved


@dataclass
class Problem:
    name: str
    batch: int
    heads: int
    size: tuple
    dim: int
    kernel: int
    dtype: torch.dtype

    @property
    def tokens(self) -> int:
        return math.prod(self.size)

    def inputs(self, grad: bool):
        shape = (self.batch, self.heads, *self.size, self.dim)
        return [
            torch.randn(shape, device="cuda", dtype=self.dtype, requires_grad=grad)
            for _ in range(3)
        ]

    def forward_bytes(self) -> int:
        """Least traffic of the unfused forward: q, k, v read, out written, and the weights
        written by qk, read and written by softmax, read by av."""
        element = torch.finfo(self.dtype).bits // 8
        rows = self.batch * self.heads * self.tokens
        return element * rows * (4 * self.dim + 4 * self.kernel**2)


PROBLEMS = {
    "p1": Problem("P1 56x56 K7 fp32", 8, 2, (56, 56), 32, 7, torch.float32),
    "p2": Problem("P2 56x56 K7 bf16", 128, 4, (56, 56), 32, 7, torch.bfloat16),
}


def natten_rs_fwd(p: Problem, q, k, v, dilation: int, rpb=None):
    attn = na2d_qk(q * p.dim**-0.5, k, p.kernel, dilation, rpb=rpb).softmax(-1)
    return na2d_av(attn, v, p.kernel, dilation)


def sdpa_fwd(p: Problem, q, k, v, dilation: int):
    return F.scaled_dot_product_attention(q.flatten(2, 3), k.flatten(2, 3), v.flatten(2, 3))


def timed(call) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    call()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def measure(calls: dict, rounds: int) -> dict:
    # Two warm-up calls: first-use compiles, the allocator, autotuning.
    return interleaved(calls, rounds, timer=timed, warmups=2)


def environment(values: dict):
    """The environment variables `values` set for the calls inside, then restored (natten_rs
    reads NATTEN_RS_TUNE and NATTEN_RS_WGMMA at each call)."""
    return mock.patch.dict(os.environ, values)


def one_pass(call, backward: bool):
    """`call()`'s output: without autograd for a forward; with the backward of a gradient of
    ones for forward + backward."""
    if not backward:
        with torch.no_grad():
            return call()
    out = call()
    out.backward(torch.ones_like(out))
    return out


def calls_for(p: Problem, dilation: int, backward: bool, rpb: bool, tunings: dict) -> dict:
    """natten_rs's unfused ops, under each of `tunings` (label -> settings) too, and sdpa; for
    the forward also its parts alone."""
    q, k, v = p.inputs(grad=backward)
    side = 2 * p.kernel - 1
    bias = (
        torch.randn(p.heads, side, side, device="cuda", dtype=p.dtype, requires_grad=backward)
        if rpb
        else None
    )

    def run(fn, settings=None):
        with environment({} if settings is None else {"NATTEN_RS_TUNE": settings}):
            return one_pass(lambda: fn(p, q, k, v, dilation), backward)

    ours = functools.partial(natten_rs_fwd, rpb=bias)
    calls = {"natten_rs": lambda: run(ours), "sdpa": lambda: run(sdpa_fwd)}
    for label, settings in tunings.items():
        calls[label] = lambda settings=settings: run(ours, settings)
    if not backward:
        with torch.no_grad():
            scaled = q * p.dim**-0.5
            logits = na2d_qk(scaled, k, p.kernel, dilation, rpb=bias)
            weights = logits.softmax(-1)
        calls["qk"] = torch.no_grad()(lambda: na2d_qk(scaled, k, p.kernel, dilation, rpb=bias))
        calls["softmax"] = torch.no_grad()(lambda: logits.softmax(-1))
        calls["av"] = torch.no_grad()(lambda: na2d_av(weights, v, p.kernel, dilation))
    return calls


def peak_bandwidth(override: float | None) -> float | None:
    """Device memory bandwidth in GB/s: double data rate times bus width, when torch says."""
    if override is not None:
        return override
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if not clock_khz or not bus_bits:
        return None
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", nargs="+", choices=PROBLEMS, default=list(PROBLEMS))
    parser.add_argument("--dilations", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--peak-gbs", type=float, default=None, help="device bandwidth, GB/s")
    parser.add_argument("--rpb", action="store_true", help="natten_rs's logits take a bias")
    parser.add_argument("--tune", action="append", default=[], metavar="LABEL=SETTINGS",
                        help="also time the unfused ops under NATTEN_RS_TUNE=SETTINGS")  # fmt: skip
    args = parser.parse_args()
    tunings = dict(item.partition("=")[::2] for item in args.tune)
    reserved = {"natten_rs", "sdpa", "qk", "softmax", "av"}
    if len(tunings) < len(args.tune) or not all(tunings.values()) or reserved & set(tunings):
        parser.error(f"--tune: expected distinct new LABEL=SETTINGS items, got {args.tune}")
    if not torch.cuda.is_available():
        raise SystemExit("bench_cuda: no CUDA device (torch.cuda.is_available() is False)")
    peak = peak_bandwidth(args.peak_gbs)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, median of {args.rounds}")
    print(f"memory bandwidth: {f'{peak:.0f} GB/s' if peak else 'unknown (--peak-gbs)'}")
    for key in args.problems:
        p = PROBLEMS[key]
        for dilation in args.dilations:
            for backward in (False, True):
                calls = calls_for(p, dilation, backward, args.rpb, tunings)
                times = measure(calls, args.rounds)
                ours, sdpa = times["natten_rs"], times["sdpa"]
                line = (
                    f"{p.name:>18}{' rpb' if args.rpb else ''} d{dilation} "
                    f"{'fwd+bwd' if backward else 'fwd':>7}  "
                    f"natten_rs {ours * 1e3:8.3f} ms  sdpa {sdpa * 1e3:8.3f} ms  "
                    f"sdpa/natten_rs {sdpa / ours:6.2f}x"
                )
                for label in tunings:
                    line += f"  {label} {times[label] * 1e3:8.3f} ms ({ours / times[label]:4.2f}x)"
                if not backward:
                    gbs = p.forward_bytes() / ours / 1e9
                    share = f" ({gbs / peak:.0%} of peak)" if peak else ""
                    line += f"  {gbs:7.0f} GB/s{share}"
                    parts = ", ".join(f"{n} {times[n] * 1e3:.3f}" for n in ("qk", "softmax", "av"))
                    line += f"  ({parts} ms)"
                print(line)


if __name__ == "__main__":
    main()
