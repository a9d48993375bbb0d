"""The fused CUDA kernels (``na1d``/``na2d``/``na3d``) against dense attention, this project's
unfused CUDA path and NATTEN's flex backend, on the same GPU.

Side by side in one process, interleaved round by round, median of the rounds, timed with CUDA
events (benches/rounds.py). For each problem and pass (forward; forward + backward) it prints:
  * natten_rs: the fused op, its time and effective TFLOP/s: 4 B heads tokens window D / time
    for the forward, 2.5 times that for forward + backward (window: the kernel's volume);
  * sdpa: ``scaled_dot_product_attention`` over all tokens, and ``vs flop share``: the fused
    time over sdpa's scaled by window / tokens, the time a kernel as efficient as dense attention
    would take (1.0 is as efficient; lower is better);
  * with ``--unfused`` (the vision problems): na{n}d_qk -> softmax -> na{n}d_av on CUDA,
    and unfused / fused;
  * with NATTEN importable (installed, or its source tree given by ``--natten``): its flex
    backend (compiled by torch.compile), and natten / fused;
  * on an sm_90 device (unless NATTEN_RS_WGMMA is set already): ``wgmma``, the fused op on
    warpgroup products (NATTEN_RS_WGMMA=1: the forward and the backward's tile kernels), its
    time and the mma.sync time over it (above 1: the warpgroup products are faster); and
    ``tma``, the same with bulk tensor copies (NATTEN_RS_TMA=1 too: the forward's and the
    d_query kernel's slabs), its time and the wgmma time over it (above 1: the copies pay);
  * for each ``--tune LABEL=SETTINGS``: the fused op with its forward compiled under those
    settings (NATTEN_RS_TUNE=SETTINGS, rust/src/cuda/tuning.rs lists them), its time and the
    default's time over it (above 1: the settings pay);
  * for the forward, the bytes the fused kernel moves at the least (q, k, v read once, out and
    lse written once) over its time, against the device's memory bandwidth.

    python benches/bench_cuda_fused.py [--problems flux video vision vision-d4 vision-rpb]
        [--rounds 10] [--natten path/to/natten/src] [--peak-gbs 3350]
        [--tune keys32="NA_TC_KEYS=32" --tune blocks4="NA_TC_FORWARD_MIN_BLOCKS=4" ...]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass

import natten_rs
import torch
import torch.nn.functional as F
from bench_cuda import environment, one_pass, peak_bandwidth, timed
from natten_rs import functional as nf
from rounds import interleaved


@dataclass
class Problem:
    name: str
    batch: int
    heads: int
    size: tuple
    dim: int
    kernel: tuple
    dilation: int = 1
    dtype: torch.dtype = torch.bfloat16
    unfused: bool = False  # whether the unfused path is a contender (its weights must fit)
    rpb: bool = False  # with a relative positional bias (NAT/DiNAT models); sdpa goes without

    @property
    def rank(self) -> int:
        return len(self.size)

    @property
    def tokens(self) -> int:
        return math.prod(self.size)

    @property
    def window(self) -> int:
        return math.prod(self.kernel)

    def flops(self, backward: bool) -> float:
        forward = 4 * self.batch * self.heads * self.tokens * self.window * self.dim
        return forward * (3.5 if backward else 1.0)

    def forward_bytes(self) -> int:
        element = torch.finfo(self.dtype).bits // 8
        rows = self.batch * self.heads * self.tokens
        return rows * (4 * self.dim * element + 4)

    def inputs(self, grad: bool):
        """Heads-last q, k, v, and the bias (or None)."""
        shape = (self.batch, *self.size, self.heads, self.dim)
        bias = (self.heads, *(2 * k - 1 for k in self.kernel))

        def make(shape):
            return torch.randn(shape, device="cuda", dtype=self.dtype, requires_grad=grad)

        return [make(shape) for _ in range(3)] + [make(bias) if self.rpb else None]


PROBLEMS = {
    "flux": Problem("2-D FLUX-like 256x256 K80", 1, 24, (256, 256), 128, (80, 80)),
    "video": Problem("3-D video 30x48x80 K18x24x24", 1, 24, (30, 48, 80), 128, (18, 24, 24)),
    "vision": Problem("vision 56x56 K7", 128, 4, (56, 56), 32, (7, 7), unfused=True),
    "vision-d4": Problem("vision 56x56 K7 d4", 128, 4, (56, 56), 32, (7, 7), 4, unfused=True),
    "vision-rpb": Problem(
        "vision 56x56 K7 rpb", 128, 4, (56, 56), 32, (7, 7), unfused=True, rpb=True
    ),
}


def fused(p: Problem, q, k, v, rpb):
    op = (natten_rs.na1d, natten_rs.na2d, natten_rs.na3d)[p.rank - 1]
    return op(q, k, v, p.kernel, dilation=p.dilation, rpb=rpb)


# Contenders that run under environment variables of their own, forward and backward: "wgmma",
# the fused op on warpgroup products (NATTEN_RS_WGMMA=1, read at each call; sm_90a: the forward
# and the backward's tile kernels), and "tma", those with bulk tensor copies as well.
ENVIRONMENTS = {
    "wgmma": {"NATTEN_RS_WGMMA": "1"},
    "tma": {"NATTEN_RS_WGMMA": "1", "NATTEN_RS_TMA": "1"},
}


def sdpa(p: Problem, q, k, v, rpb):
    heads_first = [t.flatten(1, p.rank).transpose(1, 2) for t in (q, k, v)]
    return F.scaled_dot_product_attention(*heads_first)


def unfused(p: Problem, q, k, v, rpb):
    qk = (nf.na1d_qk, nf.na2d_qk, nf.na3d_qk)[p.rank - 1]
    av = (nf.na1d_av, nf.na2d_av, nf.na3d_av)[p.rank - 1]
    # The unfused ops take heads-first tensors [B, heads, *spatial, D].
    q, k, v = (t.movedim(-2, 1) for t in (q, k, v))
    attn = qk(q * p.dim**-0.5, k, p.kernel, p.dilation, rpb=rpb).softmax(-1)
    return av(attn, v, p.kernel, p.dilation)


def natten_flex(natten):
    def call(p: Problem, q, k, v, rpb):
        op = (natten.na1d, natten.na2d, natten.na3d)[p.rank - 1]
        return op(q, k, v, p.kernel, dilation=p.dilation, backend="flex-fna", torch_compile=True)

    return call


def import_natten(path: str | None):
    """NATTEN (its Python package runs its flex backend without its compiled library), or the
    reason it is not there."""
    if path:
        sys.path.insert(0, path)
    try:
        import natten
    except Exception as e:  # noqa: BLE001 - any import failure just drops the contender
        return None, f"{type(e).__name__}: {e}"
    # NATTEN 0.21 refuses torch_compile=True until told otherwise; compiled is its fast flex
    # path, forward and backward, so that is the one timed.
    if hasattr(natten, "allow_flex_compile"):
        natten.allow_flex_compile(True, backprop=True)
    return natten, None


def calls_for(p: Problem, contenders: dict, backward: bool, environments: dict) -> dict:
    """A call per contender, each under its environment (`environments`, by name)."""
    q, k, v, rpb = p.inputs(grad=backward)

    def run(name, fn):
        with environment(environments.get(name, {})):
            return one_pass(lambda: fn(p, q, k, v, rpb), backward)

    return {name: (lambda name=name, fn=fn: run(name, fn)) for name, fn in contenders.items()}


def report(p: Problem, backward: bool, times: dict, peak: float | None, tuned: list) -> str:
    ours = times["natten_rs"]
    pass_name = "fwd+bwd" if backward else "fwd"
    share = times["sdpa"] * p.window / p.tokens
    parts = [
        f"{p.name:>30} {pass_name:>7}",
        f"natten_rs {ours * 1e3:9.3f} ms {p.flops(backward) / ours / 1e12:6.1f} TFLOP/s",
        f"sdpa {times['sdpa'] * 1e3:9.3f} ms",
        f"vs flop share {ours / share:5.2f}",
    ]
    if "wgmma" in times:
        parts.append(f"wgmma {times['wgmma'] * 1e3:9.3f} ms ({ours / times['wgmma']:4.2f}x)")
    if "tma" in times:
        parts.append(f"tma {times['tma'] * 1e3:9.3f} ms ({times['wgmma'] / times['tma']:4.2f}x)")
    for label in tuned:
        parts.append(f"{label} {times[label] * 1e3:9.3f} ms ({ours / times[label]:4.2f}x)")
    for name in ("unfused", "natten"):
        if name in times:
            parts.append(f"{name}/natten_rs {times[name] / ours:5.2f}x")
    if not backward:
        gbs = p.forward_bytes() / ours / 1e9
        parts.append(f"{gbs:6.0f} GB/s" + (f" ({gbs / peak:.0%} of peak)" if peak else ""))
    return "  ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", nargs="+", choices=PROBLEMS, default=list(PROBLEMS))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--natten", default=None, help="NATTEN's source tree (its src folder)")
    parser.add_argument("--no-backward", action="store_true", help="forward only")
    parser.add_argument("--peak-gbs", type=float, default=None, help="device bandwidth, GB/s")
    parser.add_argument("--tune", action="append", default=[], metavar="LABEL=SETTINGS",
                        help="also time the fused op under NATTEN_RS_TUNE=SETTINGS")  # fmt: skip
    args = parser.parse_args()
    environments = dict(ENVIRONMENTS)
    for item in args.tune:
        label, _, settings = item.partition("=")
        if not settings or label in environments or label in ("natten_rs", "sdpa", "unfused"):
            parser.error(f"--tune: expected a new LABEL=SETTINGS, got {item!r}")
        environments[label] = {"NATTEN_RS_TUNE": settings}
    tuned = [item.partition("=")[0] for item in args.tune]
    if not torch.cuda.is_available():
        raise SystemExit("bench_cuda_fused: no CUDA device (torch.cuda.is_available() is False)")
    peak = peak_bandwidth(args.peak_gbs)
    natten, why = import_natten(args.natten)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, median of {args.rounds}")
    print(f"memory bandwidth: {f'{peak:.0f} GB/s' if peak else 'unknown (--peak-gbs)'}")
    print(f"NATTEN: {natten.__version__ if natten else f'not timed ({why})'}")
    for key in args.problems:
        p = PROBLEMS[key]
        contenders = {"natten_rs": fused, "sdpa": sdpa, **{label: fused for label in tuned}}
        if torch.cuda.get_device_capability() == (9, 0) and "NATTEN_RS_WGMMA" not in os.environ:
            contenders["wgmma"] = fused
            contenders["tma"] = fused
        if p.unfused:
            contenders["unfused"] = unfused
        if natten is not None and not p.rpb:  # NATTEN 0.20 on has no rpb
            contenders["natten"] = natten_flex(natten)
            try:
                calls_for(p, {"natten": contenders["natten"]}, False, environments)["natten"]()
            except Exception as e:  # noqa: BLE001 - NATTEN may not take the problem
                print(f"{p.name}: NATTEN not timed ({type(e).__name__}: {e})")
                del contenders["natten"]
        for backward in (False,) if args.no_backward else (False, True):
            calls = calls_for(p, contenders, backward, environments)
            times = interleaved(calls, args.rounds, timer=timed, warmups=2)
            print(report(p, backward, times, peak, tuned))


if __name__ == "__main__":
    main()
