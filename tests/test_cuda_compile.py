"""The CUDA kernels (unfused, and the fused forward and backward over strides, even kernels and head dims up
to the largest it takes) compile with NVRTC for sm_80 and sm_90a without warnings or spills (no GPU
needed: this runs in CI), the disk cache hits, survives damage and honours
$NATTEN_RS_CACHE_DIR, and a missing libnvrtc says what to install."""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import natten_rs
import pytest
import torch
from natten_rs import KernelError, _core, _cuda
from test_cuda import TUNINGS

ARCHS = ["sm_80", "sm_90a"]
# The kernels are simple enough to live in registers: any spill (or stack frame) is a regression.
MAX_SPILL_BYTES = 0
KERNELS = {
    "na_qk": ("na_pairwise", "na_bias_grad"),
    "na_av": ("na_gather", "na_scatter", "na_extra_grad"),
    "na_fused_fwd": ("na_fused_forward",),
    "na_fused_bwd": (
        "na_fused_backward_query",
        "na_fused_backward_keys",
        "na_fused_backward_extras",
        "na_fused_backward_bias",
    ),
}
DTYPES = ("float32", "float64", "float16", "bfloat16")
# The tensor-core kernels, for the half types only.
TENSOR_CORE_KERNELS = {
    "na_fused_tc": ("na_fused_forward_tc",),
    "na_fused_bwd_tc": (
        "na_fused_backward_query_tc",
        "na_fused_backward_keys_tc",
        "na_fused_backward_extras_tc",
        "na_fused_backward_bias_slices_tc",
        "na_fused_backward_bias_tc",
    ),
}
HALF_DTYPES = ("float16", "bfloat16")
# The tensor-core kernels that take warpgroup products (wgmma) on sm_90a where asked to.
WARPGROUP_KERNELS = (
    "na_fused_forward_tc",
    "na_fused_backward_query_tc",
    "na_fused_backward_keys_tc",
    "na_fused_backward_extras_tc",
)

if torch.version.cuda is None:
    pytest.skip("a CPU-only torch build brings no libnvrtc", allow_module_level=True)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A fresh, empty disk cache (and no compiled kernels in memory)."""
    directory = tmp_path / "nested" / "cache"
    monkeypatch.setenv("NATTEN_RS_CACHE_DIR", str(directory))
    _core.forget_compiled()
    yield directory
    _core.forget_compiled()


def _table(arch: str, rows) -> str:
    lines = [f"{'kernel (' + arch + ')':<100} {'registers':>9} {'spill bytes':>11}"]
    lines += [
        f"{name:<100} {registers!s:>9} {spills!s:>11}" for name, registers, spills, *_ in rows
    ]
    return "\n".join(lines)


KERNEL_SOURCES = sorted((Path(__file__).parents[1] / "kernels").glob("*.cu*"))
# A lambda with an `auto` parameter (generic): NVRTC 13.0 takes its call operator for a host
# function and refuses the source, while the NVRTC this suite may load (13.2) accepts it.
GENERIC_LAMBDA = re.compile(r"\[[&=]?\]\s*\([^)]*\bauto\b")


def test_kernels_hold_no_generic_lambdas():
    assert len(KERNEL_SOURCES) > 5, KERNEL_SOURCES
    assert GENERIC_LAMBDA.search("f(p, [&](const Row& r, auto& sum) {")
    found = [
        f"{path.name}:{number}: {line.strip()}"
        for path in KERNEL_SOURCES
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if GENERIC_LAMBDA.search(line)
    ]
    assert found == [], "\n".join(found)


# Other NVRTC libraries to compile with ($NATTEN_RS_TEST_NVRTC: paths of libnvrtc.so.<major>,
# separated as PATH is; .ci/run fetches the oldest of CUDA 12 and of CUDA 13 that torch's wheels
# ship): users run whichever their torch brings, and an older NVRTC may refuse what this
# suite's accepts (NVRTC 13.0 refused a generic lambda that 13.2 compiled).
OTHER_NVRTC = [p for p in os.environ.get("NATTEN_RS_TEST_NVRTC", "").split(os.pathsep) if p]
# Run in a process of its own without torch, which loads its own libnvrtc first: the core's
# extension is loaded from its file, and the library found on LD_LIBRARY_PATH.
OTHER_NVRTC_SCRIPT = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("natten_rs._core", sys.argv[1])
core = importlib.util.module_from_spec(spec)
spec.loader.exec_module(core)
rows = []
for arch in ("sm_80", "sm_90a"):
    rows += core.precompile(arch, 0, ["float32", "float16", "bfloat16"],
                            [([7, 7], [False, False])], [(32, 32), (128, 128)], True)
print(json.dumps({"version": core.nvrtc_version(), "rows": [[r[0], r[2], r[3]] for r in rows]}))
"""


@pytest.mark.skipif(not OTHER_NVRTC, reason="set NATTEN_RS_TEST_NVRTC to other libnvrtc files")
@pytest.mark.parametrize("library", OTHER_NVRTC or [None])
def test_a_dinat_layers_kernels_compile_with_other_nvrtc_versions(library, tmp_path):
    # A DiNAT layer's kernels (unfused, fused, tensor-core with their warpgroup and bulk-copy
    # variants, a bias, three dtypes, head dims 32 and 128) for sm_80 and sm_90a.
    major = int(library.rsplit(".so.", 1)[1].split(".")[0])
    env = {
        "PATH": os.environ.get("PATH", ""),
        "LD_LIBRARY_PATH": os.path.dirname(library),
        "NATTEN_RS_CACHE_DIR": str(tmp_path),
        "NATTEN_RS_WGMMA": "1",
        "NATTEN_RS_TMA": "1",
    }
    command = [sys.executable, "-c", OTHER_NVRTC_SCRIPT, _core.__file__]
    result = subprocess.run(
        command, check=False, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout)
    assert report["version"][0] == major, (library, report["version"])
    names = [name for name, *_ in report["rows"]]
    assert any(", wgmma, tma]" in n for n in names), names
    print(f"\nNVRTC {report['version']}: {len(names)} kernels")
    for name, spills, log in report["rows"]:
        assert "warning" not in log.lower(), f"{name}:\n{log}"
        if spills:
            print(f"{name}: {spills} spill bytes")


@pytest.mark.parametrize("arch", ARCHS)
def test_every_kernel_variant_compiles_without_warnings_or_spills(arch, cache_dir):
    rows = _cuda.compile_kernels(arch)
    print(f"\nNVRTC {_core.nvrtc_version()}\n{_table(arch, rows)}")
    names = [row[0] for row in rows]
    expected = [
        *itertools.product(KERNELS.items(), DTYPES),
        *itertools.product(TENSOR_CORE_KERNELS.items(), HALF_DTYPES),
    ]
    for (source, functions), dtype in expected:
        for function in functions:
            assert any(n.startswith(f"{source}[{dtype},") and n.endswith(f"/{function}")
                       for n in names), f"{source}/{function} for {dtype} was not compiled"  # fmt: skip
    for name, registers, spills, log, origin in rows:
        assert origin == "compiled", f"{name}: {origin}"
        assert "warning" not in log.lower(), f"{name}:\n{log}"
        # ptxas's note that it serialized warpgroup products (wgmma) it could not keep in flight.
        assert "performance loss" not in log.lower(), f"{name}:\n{log}"
        assert registers is not None and registers > 0, f"{name}: no ptxas report\n{log}"
        assert spills is not None and spills <= MAX_SPILL_BYTES, f"{name}: {spills} spill bytes"
        # Nor do they keep anything in local memory: a stack frame without spills is an array
        # indexed at run time, or a parameter block copied out of parameter space.
        frames = re.findall(r"(\d+) bytes stack frame", log)
        assert frames and set(frames) == {"0"}, f"{name}: a stack frame\n{log}"
    _check_warpgroup_variants(arch, {name: log for name, _, _, log, _ in rows})
    _check_dynamic_shared_symbols(arch, cache_dir, names)


def _shared_bytes(log: str, function: str) -> int:
    """Static shared memory of `function` in a module's ptxas report (none reported: 0)."""
    report = log.split(f"Compiling entry function '{function}'")[1].split("Compiling entry")[0]
    match = re.search(r"(\d+) bytes smem", report)
    return 0 if match is None else int(match.group(1))


def _check_warpgroup_variants(arch: str, logs: dict[str, str]):
    # The warpgroup variants (NATTEN_RS_WGMMA=1) of the forward and of the backward's query and
    # key-row kernels stage their rows in dynamic shared memory, whose size the host reads from
    # the `_dynamic_shared` array's (in the report's global memory), where the target has
    # wgmma (sm_90a); elsewhere they are the mma.sync kernels, whose static shared memory does
    # not depend on it.
    warpgroup = [name for name in logs if ", wgmma]" in name]
    kernels = {name.split("/")[-1] for name in warpgroup}
    assert kernels >= set(WARPGROUP_KERNELS), kernels
    # Three head dims of each half type, two of them with a bias as well.
    assert len([n for n in warpgroup if n.endswith("/na_fused_forward_tc")]) == 10, warpgroup
    assert len([n for n in warpgroup if n.endswith("/na_fused_forward_tc") and ", rpb" in n]) == 4
    for name in warpgroup:
        twin = name.replace(", wgmma]", "]")
        function = name.split("/")[-1]
        shared, twin_shared = (_shared_bytes(logs[n], function) for n in (name, twin))
        if arch == "sm_90a" and function in WARPGROUP_KERNELS:
            assert shared < twin_shared, logs[name]
            assert re.search(r"[1-9]\d* bytes gmem", logs[name]), logs[name]
        else:
            assert shared == twin_shared, logs[name]
    # Their bulk-copy variants (NATTEN_RS_TMA=1 too; rows dense), one per warpgroup variant: on
    # sm_90a the forward, the d_query and the key kernel keep one 8-byte barrier per ring buffer
    # (at least five, five and four buffers) in static shared memory beside their twin's (within
    # its 128-byte granule where it has a bias table); the other kernels, and every kernel
    # elsewhere, are their twins.
    bulk = [name for name in logs if ", wgmma, tma]" in name]
    assert len(bulk) == len(warpgroup), bulk
    ring_buffers = {
        "na_fused_forward_tc": 5,
        "na_fused_backward_query_tc": 5,
        "na_fused_backward_keys_tc": 4,
    }
    for name in bulk:
        twin = name.replace(", wgmma, tma]", ", wgmma]")
        function = name.split("/")[-1]
        shared, twin_shared = (_shared_bytes(logs[n], function) for n in (name, twin))
        if arch == "sm_90a" and function in ring_buffers:
            assert shared >= max(twin_shared, 8 * ring_buffers[function]), logs[name]
        else:
            assert shared == twin_shared, logs[name]


def _elf_sizes(image: bytes) -> tuple[dict[str, int], dict[str, int]]:
    """Name -> size of every symbol of an ELF64 image's symbol table, and of every section."""
    (section_at,) = struct.unpack_from("<Q", image, 0x28)
    entry_size, count, names_index = struct.unpack_from("<HHH", image, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", image, section_at + i * entry_size)
                for i in range(count)]  # fmt: skip

    def name(table: int, at: int) -> str:
        start = sections[table][4] + at
        return image[start : image.index(b"\0", start)].decode()

    symbols = {}
    for _, kind, _, _, at, length, link, _, _, symbol_size in sections:
        if kind != 2:  # SHT_SYMTAB
            continue
        for offset in range(at, at + length, symbol_size):
            (name_at,) = struct.unpack_from("<I", image, offset)
            (size,) = struct.unpack_from("<Q", image, offset + 16)
            symbols[name(link, name_at)] = size
    section_sizes = {name(names_index, s[0]): s[5] for s in sections}
    return symbols, section_sizes


def _check_dynamic_shared_symbols(arch: str, cache_dir, names: list[str]):
    # The runtime launches a kernel with as much dynamic shared memory as the size of its
    # `<kernel>_dynamic_shared` array (NA_DYNAMIC_SHARED): every warpgroup variant of the forward
    # and backward tile kernels defines one on sm_90a (their rings: more than static arrays may
    # take at head dims 128), and no kernel does elsewhere. With the kernel's static shared
    # memory (its `.nv.shared.<kernel>` section: the bias table) it is at most what a block may
    # take, 227 KiB: past that, the launch would fail.
    sizes = {kernel: [] for kernel in WARPGROUP_KERNELS}
    for entry in cache_dir.glob("*.cubin"):
        data = entry.read_bytes()
        symbols, sections = _elf_sizes(data[data.index(b"\x7fELF") :])
        for name, size in symbols.items():
            if name.endswith("_dynamic_shared"):
                # The runtime asks the driver for the array's size only where the CUBIN holds
                # its name as a whole string (runtime.rs, names_symbol).
                assert b"\0" + name.encode() + b"\0" in data, (entry.name, name)
                kernel = name.removesuffix("_dynamic_shared")
                sizes[kernel].append(size)
                static = sections.get(f".nv.shared.{kernel}", 0)
                assert static + size <= 227 * 1024, (entry.name, kernel, static, size)
    for kernel, found in sizes.items():
        if arch == "sm_90a":
            warpgroup = (", wgmma]", ", wgmma, tma]")
            variants = [
                n for n in names if n.endswith(f"/{kernel}") and any(w in n for w in warpgroup)
            ]
            assert len(found) == len(variants) > 0, (kernel, found, variants)
            assert 48 * 1024 < max(found) <= 227 * 1024, (kernel, found)
        else:
            assert found == [], (kernel, found)


@pytest.mark.parametrize("arch", ARCHS)
def test_tuned_variants_compile_without_warnings(arch, cache_dir, monkeypatch):
    # Each setting NATTEN_RS_TUNE takes (test_cuda.TUNINGS: every value at least once) compiles
    # into a vision layer's forward or window products (bfloat16, 7x7; head dims 32 and 128), a
    # variant of its own beside the default one, which takes only the settings it reads. Spills
    # are printed, not refused: bounding the registers for more blocks may spill, which is what
    # a benchmark would weigh.
    tuned_kernels = ("/na_fused_forward_tc", "/na_pairwise_tc", "/na_gather_tc")

    def tuned_rows():
        rows = _core.precompile(arch, 0, ["bfloat16"], [([7, 7], [False, False])],
                                [(32, 32), (128, 128)], False)  # fmt: skip
        return [row for row in rows if row[0].endswith(tuned_kernels)]

    assert len(tuned_rows()) == 6
    for tuning in TUNINGS:
        monkeypatch.setenv("NATTEN_RS_TUNE", tuning)
        rows = tuned_rows()
        asked = set(re.split("[ ,]", tuning))
        taken = set()
        for name, registers, spills, log, origin in rows:
            settings = set(name.split("dim ")[1].split("]")[0].split(", ")[1:])
            if not settings:  # a variant that reads none: the default one, in memory
                assert origin == "memory", (name, tuning, origin)
                continue
            assert settings <= asked, (name, tuning)
            taken |= settings
            assert origin == "compiled", f"{name}: {origin}"
            assert "warning" not in log.lower(), f"{name}:\n{log}"
            print(f"{name}: {registers} registers, {spills} spill bytes")
        assert taken == asked, (taken, asked)


def _precompile_f32(arch: str = "sm_80"):
    return _core.precompile(arch, 0, ["float32"], [([3], [False])])


def _origins(rows) -> set[str]:
    return {origin for *_, origin in rows}


def _cache_files(directory):
    return sorted(p.name for p in directory.iterdir())


def test_the_disk_cache_hits_after_the_first_compile(cache_dir):
    assert _origins(_precompile_f32()) == {"compiled"}
    files = _cache_files(cache_dir)
    assert len(files) == 2 and all(f.endswith(".cubin") for f in files), files
    assert _origins(_precompile_f32()) == {"memory"}
    _core.forget_compiled()
    assert _origins(_precompile_f32()) == {"disk"}
    assert _cache_files(cache_dir) == files


def test_variants_compile_side_by_side_each_once(cache_dir):
    # Variants compile concurrently; one listed four times compiles once, the other three
    # wait for it and find it in memory, and the rows keep the order asked for.
    # (The rows are per kernel: the two unfused sources' seven, for each of the four.)
    rows = _core.precompile("sm_80", 0, ["float32"], [([5], [False])] * 4)
    names = [name for name, *_ in rows]
    assert len(names) == 28 and names == names[:7] * 4, names
    origins = [origin for *_, origin in rows]
    for kernel in range(7):  # which of the four compiled depends on the threads
        assert sorted(origins[kernel::7]) == ["compiled"] + ["memory"] * 3, origins


def test_line_information_is_compiled_in_on_request(cache_dir, monkeypatch):
    # NATTEN_RS_LINEINFO=1 adds the line table profilers read; it is another cache entry, so a
    # plain binary is never taken for one with lines or the other way round.
    def line_tables():
        return [b".debug_line" in (cache_dir / f).read_bytes() for f in _cache_files(cache_dir)]

    _precompile_f32()
    assert line_tables() == [False, False]
    monkeypatch.setenv("NATTEN_RS_LINEINFO", "1")
    assert _origins(_precompile_f32()) == {"compiled"}
    assert sorted(line_tables()) == [False, False, True, True]


def test_another_arch_is_another_cache_entry(cache_dir):
    _precompile_f32("sm_80")
    assert _origins(_precompile_f32("sm_90a")) == {"compiled"}
    assert len(_cache_files(cache_dir)) == 4


@pytest.mark.parametrize("damage", ["truncated", "flipped", "empty", "foreign"])
def test_a_damaged_cache_file_is_detected_and_rebuilt(damage, cache_dir):
    _precompile_f32()
    files = [cache_dir / name for name in _cache_files(cache_dir)]
    intact = {f: f.read_bytes() for f in files}
    for f, data in intact.items():
        if damage == "truncated":
            f.write_bytes(data[: len(data) // 2])
        elif damage == "flipped":
            f.write_bytes(data[:-100] + bytes([data[-100] ^ 0xFF]) + data[-99:])
        elif damage == "empty":
            f.write_bytes(b"")
        else:
            f.write_bytes(b"not a cache file at all" * 10)
    damaged = {f: f.read_bytes() for f in files}
    _core.forget_compiled()
    assert _origins(_precompile_f32()) == {"compiled"}
    # Rebuilt in place (the bytes differ from the first build only in ptxas's timing line).
    assert all(f.read_bytes() != damaged[f] and len(f.read_bytes()) > 1000 for f in files)
    _core.forget_compiled()
    assert _origins(_precompile_f32()) == {"disk"}


def test_cache_writes_leave_no_temporary_files(cache_dir):
    _precompile_f32()
    _precompile_f32("sm_90a")
    assert all(not n.startswith(".") and n.endswith(".cubin") for n in _cache_files(cache_dir))


def test_precompile_compiles_both_sources_per_shape_and_logs(cache_dir, caplog):
    caplog.set_level(logging.INFO, logger="natten_rs")
    rows = natten_rs.precompile([5, (3, 5)], dtypes=[torch.float16], is_causal=False,
                                arch="sm_80")  # fmt: skip
    names = [name for name, *_ in rows]
    assert len(names) == 2 * 7, names
    assert any("kernel 1x1x5" in n for n in names) and any("kernel 1x3x5" in n for n in names)
    assert all(registers > 0 and spills == 0 for _, registers, spills in rows)
    logged = [r.getMessage() for r in caplog.records if r.name == "natten_rs"]
    assert len(logged) == 4 and all("compiled with NVRTC" in m for m in logged), logged


def test_precompile_with_head_dims_builds_the_fused_kernels_each_gpu_would_run(cache_dir):
    rows = natten_rs.precompile([(3, 5)], dtypes=[torch.bfloat16, torch.float32],
                                head_dims=[32, (64, 48)], arch="sm_80")  # fmt: skip
    modules = {name.rsplit("/", 1)[0] for name, *_ in rows}
    for dims in ("dim 32/32", "dim 64/48"):
        # bfloat16 takes tensor cores on sm_80, float32 the warp forward; both get the backward.
        assert any(m.startswith("na_fused_tc[bfloat16") and dims in m for m in modules)
        assert any(m.startswith("na_fused_fwd[float32") and dims in m for m in modules)
        for dtype in ("bfloat16", "float32"):
            assert any(m.startswith(f"na_fused_bwd[{dtype}") and dims in m for m in modules)
    assert not any(m.startswith("na_fused_fwd[bfloat16") for m in modules)
    assert all(spills == 0 for _, _, spills in rows)
    older = natten_rs.precompile([(3, 5)], dtypes=[torch.float16], head_dims=[32], arch="sm_75")
    older = {name.rsplit("/", 1)[0] for name, *_ in older}
    assert any(m.startswith("na_fused_fwd[float16") for m in older), older
    assert not any(m.startswith("na_fused_tc") for m in older), older


@pytest.mark.parametrize("arch", ["sm_100", "sm_120"])
def test_the_kernels_of_a_dinat_layer_compile_for_blackwell(arch, cache_dir):
    # Blackwell GPUs (data-centre sm_100, workstation sm_120) take the kernels of sm_80 and later:
    # tensor cores by mma.sync, no warpgroup products (sm_90a's alone). A DiNAT layer's unfused
    # and fused kernels, with a bias, in both half types and float32, compile for them without
    # spills.
    dtypes = [torch.float16, torch.bfloat16, torch.float32]
    rows = natten_rs.precompile([(7, 7)], dtypes=dtypes, head_dims=[32, 128], arch=arch, rpb=True)
    modules = {name.rsplit("/", 1)[0] for name, *_ in rows}
    sources = {m.split("[")[0] for m in modules}
    assert sources >= {"na_qk", "na_av", "na_unfused_tc", "na_fused_tc", "na_fused_bwd_tc",
                       "na_fused_fwd", "na_fused_bwd"}, sources  # fmt: skip
    assert all(registers > 0 and spills == 0 for _, registers, spills in rows), rows
    assert not any("wgmma" in m for m in modules), modules


@pytest.mark.parametrize("tma", ["0", "1"])
def test_precompile_follows_the_warpgroup_and_bulk_copy_switches(tma, cache_dir, monkeypatch):
    # NATTEN_RS_WGMMA=1 (and NATTEN_RS_TMA=1): the tensor-core forward and backward variants
    # that problems of contiguous tensors would then take.
    monkeypatch.setenv("NATTEN_RS_WGMMA", "1")
    monkeypatch.setenv("NATTEN_RS_TMA", tma)
    rows = natten_rs.precompile([(3, 5)], dtypes=[torch.float16], head_dims=[32], arch="sm_90a")
    fused = {name.rsplit("/", 1)[0] for name, *_ in rows if name.startswith("na_fused_")}
    tensor_core = {m for m in fused if m.split("[")[0].endswith("_tc")}
    assert {m.split("[")[0] for m in tensor_core} == {"na_fused_tc", "na_fused_bwd_tc"}, fused
    ending = ", wgmma, tma]" if tma == "1" else ", wgmma]"
    assert all(m.endswith(ending) for m in tensor_core), tensor_core


def test_precompile_with_rpb_builds_the_tensor_core_kernels_of_biased_problems(cache_dir):
    # The tensor-core variants are specialised by the bias (those without compile no bias path).
    rows = natten_rs.precompile([(3, 5)], dtypes=[torch.bfloat16], head_dims=[32], arch="sm_80",
                                rpb=True)  # fmt: skip
    modules = {name.rsplit("/", 1)[0] for name, *_ in rows}
    tensor_core = {m for m in modules if m.split("[")[0].endswith("_tc")}
    assert {m.split("[")[0] for m in tensor_core} == {"na_fused_tc", "na_fused_bwd_tc",
                                                       "na_unfused_tc"}, modules  # fmt: skip
    fused = {m for m in tensor_core if m.startswith("na_fused")}
    assert len(fused) == 2 and all(", rpb" in m for m in fused), tensor_core
    # The unfused ops' window products take the bias, their weighted sums never.
    assert sorted(", rpb" in m for m in tensor_core - fused) == [False, True], tensor_core
    assert not any(", rpb" in m for m in modules - tensor_core), modules
    assert all(spills == 0 for _, _, spills in rows)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"kernel_sizes": [7], "rpb": 1, "arch": "sm_80"}, TypeError, "rpb"),
        ({"kernel_sizes": [7], "head_dims": [512], "arch": "sm_80"}, ValueError, "head_dims"),
        ({"kernel_sizes": [7], "head_dims": [(32, 0)], "arch": "sm_80"}, ValueError, "head_dims"),
        ({"kernel_sizes": [7], "head_dims": [2**70], "arch": "sm_80"}, ValueError, "head_dims"),
        ({"kernel_sizes": [7], "head_dims": [(32, 32, 32)]}, TypeError, "head_dims"),
        ({"kernel_sizes": [7], "head_dims": [32.0]}, TypeError, "head_dims"),
        ({"kernel_sizes": [4], "arch": "sm_80"}, ValueError, "kernel_size"),
        ({"kernel_sizes": [(3, 3)], "is_causal": (True,)}, ValueError, "is_causal"),
        ({"kernel_sizes": 7}, TypeError, "kernel_sizes"),
        ({"kernel_sizes": [7], "dtypes": [torch.int32], "arch": "sm_80"}, ValueError, "dtypes"),
        ({"kernel_sizes": [7], "dtypes": ["float16"]}, TypeError, "dtypes"),
        ({"kernel_sizes": [7], "arch": "sm80"}, ValueError, "arch"),
        ({"kernel_sizes": [7], "arch": "sm_20"}, ValueError, "arch"),
        ({"kernel_sizes": [7], "arch": 80}, TypeError, "arch"),
    ],
)
def test_precompile_names_bad_arguments(kwargs, error, match, cache_dir):
    with pytest.raises(error, match=match):
        natten_rs.precompile(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the default arch comes from the GPU here")
def test_precompile_without_a_gpu_needs_an_arch():
    with pytest.raises(ValueError, match="arch"):
        natten_rs.precompile([7])


def test_a_missing_libnvrtc_says_what_to_install(monkeypatch, tmp_path):
    bogus = tmp_path / "libnvrtc.so.13"
    with pytest.raises(KernelError, match="pip install nvidia-cuda-nvrtc"):
        _cuda.load_nvrtc(bogus)
    monkeypatch.setenv("NATTEN_RS_NVRTC", str(bogus))
    with pytest.raises(KernelError, match=r"libnvrtc .*could not be loaded.*pip install"):
        _cuda.load_nvrtc()


def test_libnvrtc_is_found_in_the_nvidia_wheels():
    path = _cuda.load_nvrtc()
    assert path is not None and "libnvrtc.so" in path
    assert _core.nvrtc_version()[0] >= 12
