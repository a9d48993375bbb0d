"""Unfused neighborhood attention (qk -> softmax -> av) against dense attention, side by side.

Times, in one process and interleaved round by round (so that machine noise hits every
contender alike), on the profiler's default problem:
  * natten_rs: scaled ``na2d_qk`` -> softmax -> ``na2d_av`` (heads-first)
  * sdpa: ``torch.nn.functional.scaled_dot_product_attention`` over all tokens (no mask)
  * reference: the dense masked oracle (``natten_rs.reference.na``, float64 inside)
for the forward pass and for forward + backward, and prints each contender's median time and
its ratio to natten_rs.

    python benches/bench_unfused.py [--dilations 1 4] [--rounds 7] [--no-reference]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from natten_rs import reference
from natten_rs.functional import na2d_av, na2d_qk
from rounds import interleaved

B, HEADS, SIZE, DIM, KERNEL = 8, 2, (56, 56), 32, 7


def natten_rs_fwd(q, k, v, dilation):
    attn = na2d_qk(q * DIM**-0.5, k, KERNEL, dilation).softmax(-1)
    return na2d_av(attn, v, KERNEL, dilation)


def sdpa_fwd(q, k, v, dilation):
    return F.scaled_dot_product_attention(q.flatten(2, 3), k.flatten(2, 3), v.flatten(2, 3))


def reference_fwd(q, k, v, dilation):
    def heads_last(t):
        return t.movedim(1, -2)

    return reference.na(heads_last(q), heads_last(k), heads_last(v), KERNEL, dilation=dilation)


def measure(contenders: dict, rounds: int, backward: bool, inputs, dilation) -> dict:
    """Median seconds per contender over ``rounds`` interleaved rounds (after a warm-up)."""

    def call(fn):
        if backward:
            out = fn(*inputs, dilation)
            out.backward(torch.ones_like(out))
        else:
            with torch.no_grad():
                fn(*inputs, dilation)

    return interleaved({name: (lambda fn=fn: call(fn)) for name, fn in contenders.items()}, rounds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dilations", type=int, nargs="+", default=[1, 4])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--no-reference", action="store_true", help="skip the slow dense oracle")
    args = p.parse_args()
    torch.manual_seed(0)
    inputs = [torch.randn(B, HEADS, *SIZE, DIM, requires_grad=True) for _ in range(3)]
    contenders = {"natten_rs": natten_rs_fwd, "sdpa": sdpa_fwd}
    if not args.no_reference:
        contenders["reference"] = reference_fwd
    print(
        f"2-D {SIZE[0]}x{SIZE[1]}, B={B}, heads={HEADS}, head_dim={DIM}, kernel={KERNEL}, "
        f"float32, {torch.get_num_threads()} threads, median of {args.rounds} rounds"
    )
    print(f"{'dilation':>8} {'pass':>9} {'contender':>10} {'ms':>10} {'x natten_rs time':>17}")
    for dilation in args.dilations:
        for backward in (False, True):
            times = measure(contenders, args.rounds, backward, inputs, dilation)
            base = times["natten_rs"]
            for name, t in times.items():
                label = "fwd+bwd" if backward else "fwd"
                print(f"{dilation:>8} {label:>9} {name:>10} {t * 1e3:>10.2f} {t / base:>16.1f}x")


if __name__ == "__main__":
    main()
