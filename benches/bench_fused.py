"""Fused neighborhood attention on the CPU against dense attention and the unfused ops.

Side by side in one process, interleaved round by round (machine noise hits every contender
alike), median of the rounds. For each problem it prints each contender's time and its ratio to
the fused forward (or forward + backward):
  * fused: ``natten_rs.na{1,2,3}d`` (heads-last)
  * sdpa: ``torch.nn.functional.scaled_dot_product_attention`` over all tokens
  * unfused: ``na*d_qk`` -> softmax -> ``na*d_av`` on the same memory (heads-first views)
and, in rounds of their own, the bf16 fused forward against the fp32 one (on the AMX tier, also
the bf16 forward capped at AVX-512, ``bf16 avx512``) and, where the CPU has AVX-512, the fp32
fused forward capped at the AVX2 tier (``fused avx2``).

    python benches/bench_fused.py [--problems p1 3d 1d dinat] [--rounds 5]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import natten_rs
import torch
import torch.nn.functional as F
from natten_rs import _core, functional
from rounds import interleaved


@dataclass
class Problem:
    name: str
    batch: int
    heads: int
    spatial: tuple
    dim: int
    kernel: int
    dilation: int = 1

    def inputs(self, dtype=torch.float32, grad=False):
        gen = torch.Generator().manual_seed(0)
        shape = (self.batch, *self.spatial, self.heads, self.dim)
        return [torch.randn(shape, generator=gen).to(dtype).requires_grad_(grad) for _ in range(3)]


PROBLEMS = {
    "p1": [
        Problem("P1 2-D 56x56 K7", 8, 2, (56, 56), 32, 7),
        Problem("P1 2-D 56x56 K7 d8", 8, 2, (56, 56), 32, 7, 8),
    ],
    "3d": [Problem("3-D 16x32x32 K7", 1, 4, (16, 32, 32), 64, 7)],
    "1d": [
        Problem("1-D L8192 K127 d1", 4, 8, (8192,), 64, 127, 1),
        Problem("1-D L8192 K127 d8", 4, 8, (8192,), 64, 127, 8),
    ],
    # Later stages of DiNAT models at 224x224 (head dim 32): small grids, many heads.
    "dinat": [
        Problem("28x28 K7 d4 4 heads", 8, 4, (28, 28), 32, 7, 4),
        Problem("14x14 K7 d2 8 heads", 8, 8, (14, 14), 32, 7, 2),
        Problem("14x14 K7 24 heads", 8, 24, (14, 14), 32, 7),
        Problem("7x7 K7 16 heads", 8, 16, (7, 7), 32, 7),
    ],
}


def fused(p, q, k, v):
    return getattr(natten_rs, f"na{len(p.spatial)}d")(q, k, v, p.kernel, dilation=p.dilation)


def sdpa(p, q, k, v):
    def heads_first(t):
        return t.flatten(1, -3).transpose(1, 2)

    return F.scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v))


def unfused(p, q, k, v):
    rank = len(p.spatial)
    qk = getattr(functional, f"na{rank}d_qk")
    av = getattr(functional, f"na{rank}d_av")

    def heads_first(t):
        return t.movedim(-2, 1)

    attn = qk(heads_first(q) * p.dim**-0.5, heads_first(k), p.kernel, p.dilation).softmax(-1)
    return av(attn, heads_first(v), p.kernel, p.dilation)


def forward_calls(p):
    q, k, v = p.inputs()
    return {
        name: (lambda fn=fn: fn(p, q, k, v))
        for name, fn in (("fused", fused), ("sdpa", sdpa), ("unfused", unfused))
    }


def variant_calls(p):
    """The fused forward against its bf16 and lower-tier variants, timed in rounds of their
    own: after torch's dense ops, its worker threads spin on for a while and take cores from
    whichever contender comes next, which on a small machine would weigh on a variant's
    ratio."""
    q, k, v = p.inputs()
    calls = {"fused": lambda: fused(p, q, k, v)}
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    calls["fused bf16"] = lambda: fused(p, qb, kb, vb)
    tier = _core.cpu_isa()[0]
    if tier == "amx":
        calls["bf16 avx512"] = lambda: capped("avx512", lambda: fused(p, qb, kb, vb))
    if tier in ("avx512", "amx"):
        calls["fused avx2"] = lambda: capped("avx2", lambda: fused(p, q, k, v))
    return calls


def capped(tier, fn):
    """``fn()`` with the CPU kernels capped at ``tier``."""
    previous = _core.set_cpu_isa(tier)
    try:
        return fn()
    finally:
        _core.set_cpu_isa(previous)


def backward_calls(p):
    q, k, v = p.inputs(grad=True)

    def step(fn):
        out = fn(p, q, k, v)
        out.backward(torch.ones_like(out))

    return {
        name: (lambda fn=fn: step(fn))
        for name, fn in (("fused", fused), ("sdpa", sdpa), ("unfused", unfused))
    }


def report(p, label, times):
    base = times["fused"]
    for name, t in times.items():
        print(f"{p.name:>20} {label:>8} {name:>11} {t * 1e3:>10.2f} ms {t / base:>8.3f}x fused")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", nargs="+", choices=PROBLEMS, default=list(PROBLEMS))
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU kernels "
        f"{_core.cpu_isa()[0]}, float32 unless marked, median of {args.rounds} rounds"
    )
    for key in args.problems:
        for p in PROBLEMS[key]:
            with torch.no_grad():
                report(p, "fwd", interleaved(forward_calls(p), args.rounds))
                report(p, "fwd", interleaved(variant_calls(p), args.rounds))
            report(p, "fwd+bwd", interleaved(backward_calls(p), args.rounds))


if __name__ == "__main__":
    main()
