"""Static instruction counts of the tensor-core kernels' inner loops, from their machine code
(SASS): no GPU needed, only libnvrtc (torch's CUDA wheels) and NVIDIA's disassembler
(``pip install nvidia-cuda-nvdisasm``).

Each kernel walks its columns slab by slab; the slab loop is the innermost loop holding
tensor-core products (HMMA). Its instructions per HMMA say how much issue bandwidth goes to
masks, softmax, staging and addressing rather than to products: a warp scheduler issues one
instruction per cycle, so a loop far above a few instructions per HMMA is issue-bound, whatever
the memory system does. The counts are static: each instruction once, branches not taken
included (such as the bias path of a problem without one, or the mask that a slab inside every
row's window does without), and loops inside the slab loop as one pass, so they estimate the
executed ones rather than bound them. A warpgroup product (HGMMA 64xNx16, NATTEN_RS_WGMMA=1 on
sm_90a) counts as the N / 8 HMMA-sized products it does for each of its four warps' rows. With
``--lines N`` the kernels compile with line information (NATTEN_RS_LINEINFO=1) and the N source
lines with the most instructions in each loop are listed. Under NATTEN_RS_TUNE
(rust/src/cuda/tuning.rs) the forward compiles with those settings.

    python benches/kernel_instructions.py [--problems vision flux video] [--arch sm_90a]
        [--dtype bfloat16] [--lines 12] [--rpb]

Problems (odd kernels: the unfused ops are compiled beside the fused ones, and they take odd
sizes; the even kernels of the speed targets compile to the same loops):
  vision: 7x7, head dim 32;  flux: 79x79, head dim 128;  video: 17x23x23, head dim 128.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PROBLEMS = {"vision": ((7, 7), 32), "flux": ((79, 79), 128), "video": ((17, 23, 23), 128)}
# The tensor-core kernels' entry points: the fused forward, the backward's tiles and the
# unfused window products.
KERNELS = (
    "na_fused_forward_tc",
    "na_fused_backward_query_tc",
    "na_fused_backward_keys_tc",
    "na_pairwise_tc",
    "na_gather_tc",
)
ELF_MAGIC = b"\x7fELF"


def tool(name: str) -> str:
    """The path of NVIDIA's `name` (nvdisasm): on the PATH or from its pip package."""
    found = shutil.which(name)
    if found:
        return found
    for site in sys.path:
        for path in glob.glob(os.path.join(site, "nvidia", "*", "bin", name)):
            os.chmod(path, os.stat(path).st_mode | 0o111)  # wheels may drop the execute bit
            return path
    sys.exit(f"{name} not found: pip install nvidia-cuda-{name}")


def compile_problem(
    kernel: tuple[int, ...], dim: int, dtype, arch: str, rpb: bool = False
) -> list[Path]:
    """ELF images of every kernel natten_rs.precompile builds for the problem (a fresh cache);
    where `rpb`, the variants of problems with a relative positional bias come last, so that
    they take the place of their unbiased twins (the unfused kernels are built both ways)."""
    import natten_rs
    from natten_rs import _core

    cache = Path(tempfile.mkdtemp())
    os.environ["NATTEN_RS_CACHE_DIR"] = str(cache)
    _core.forget_compiled()
    images = []
    for with_rpb in [False, True] if rpb else [False]:
        # A program's file is named by its hash: one built on the first pass is not new on
        # the second.
        seen = {image.stem for image in images}
        natten_rs.precompile([kernel], dtypes=[dtype], arch=arch, head_dims=[dim], rpb=with_rpb)
        for entry in sorted(cache.glob("*.cubin")):
            if entry.stem in seen:
                continue
            # A cache entry is a header, NVRTC's log and the image (rust/src/cuda/cache.rs).
            data = entry.read_bytes()
            image = entry.with_suffix(".elf")
            image.write_bytes(data[data.index(ELF_MAGIC) :])
            images.append(image)
    return images


Instruction = tuple[int, str, tuple[str, int]]  # address, text, (source file, line)


def disassemble(image: Path) -> dict[str, list[Instruction]]:
    """The instructions of each function in `image`, with their source lines where known."""
    text = subprocess.run(
        [tool("nvdisasm"), "-g", "-c", str(image)], capture_output=True, text=True, check=True
    ).stdout
    functions: dict[str, list[Instruction]] = {}
    current, where, labels = None, ("?", 0), []
    text_of_label: dict[str, int] = {}

    def resolve(instruction: str) -> str:
        return re.sub(r"`\((\.L_x_\d+)\)", lambda m: hex(text_of_label[m.group(1)]), instruction)

    for line in text.splitlines():
        if line.startswith(".text."):
            current = line.strip()[len(".text.") : -1]
            functions[current] = []
        elif m := re.match(r'\s*//## File "(.*?)", line (\d+)', line):
            where = (os.path.basename(m.group(1)), int(m.group(2)))
        elif m := re.match(r"(\.L_x_\d+):", line):
            labels.append(m.group(1))
        elif current and (m := re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)):
            address = int(m.group(1), 16)
            # Branches name labels: write each label's address in their place.
            for label in labels:
                text_of_label[label] = address
            labels = []
            functions[current].append((address, m.group(2), where))
    return {name: [(a, resolve(t), w) for a, t, w in code] for name, code in functions.items()}


def opcode(text: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]


def products(text: str) -> int:
    """The m16n8k16 products (per warp) of an instruction: 1 for HMMA, N / 8 for HGMMA.64xNx16."""
    if opcode(text) == "HMMA":
        return 1
    if m := re.search(r"HGMMA\.64x(\d+)x16", text):
        return int(m.group(1)) // 8
    return 0


def slab_loop(code: list[Instruction]) -> list[Instruction]:
    """The instructions of the innermost loop (a backward branch's span) that holds a product."""
    spans = []
    for address, text, _ in code:
        if opcode(text) == "BRA" and (m := re.search(r"0x([0-9a-f]+)", text)):
            target = int(m.group(1), 16)
            if target <= address:
                spans.append((target, address))
    for lo, hi in sorted(spans, key=lambda s: s[1] - s[0]):
        body = [i for i in code if lo <= i[0] <= hi]
        if any(products(t) for _, t, _ in body):
            return body
    return []


def report(name: str, body: list[Instruction], lines: int) -> None:
    ops = collections.Counter(opcode(t) for _, t, _ in body)
    count = sum(products(t) for _, t, _ in body)
    top = ", ".join(f"{op} {n}" for op, n in ops.most_common(8))
    print(f"  {name:<28} {len(body):>6} {count:>5} {len(body) / count:>9.1f}   {top}")
    for (source, line), n in collections.Counter(w for _, _, w in body).most_common(lines):
        print(f"      {n:>5}  {source}:{line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", nargs="+", choices=list(PROBLEMS), default=list(PROBLEMS))
    parser.add_argument("--arch", default="sm_90a")
    parser.add_argument("--dtype", choices=["float16", "bfloat16"], default="bfloat16")
    parser.add_argument("--lines", type=int, default=0, help="source lines listed per loop")
    parser.add_argument(
        "--rpb", action="store_true", help="the variants of problems with a bias (NAT/DiNAT)"
    )
    args = parser.parse_args()
    if args.lines:
        os.environ["NATTEN_RS_LINEINFO"] = "1"
    import torch

    tool("nvdisasm")  # fail early, before compiling, when it is missing
    for problem in args.problems:
        kernel, dim = PROBLEMS[problem]
        shape = "x".join(map(str, kernel))
        bias = ", rpb" if args.rpb else ""
        print(f"{problem}: kernel {shape}, head dim {dim}, {args.dtype}, {args.arch}{bias}")
        print(f"  {'slab loop of':<28} {'instrs':>6} {'HMMA':>5} {'per HMMA':>9}   most frequent")
        functions = {}
        images = compile_problem(kernel, dim, getattr(torch, args.dtype), args.arch, args.rpb)
        for image in images:
            functions.update(disassemble(image))
        for name in KERNELS:
            if name in functions and (body := slab_loop(functions[name])):
                report(name, body, args.lines)


if __name__ == "__main__":
    main()
