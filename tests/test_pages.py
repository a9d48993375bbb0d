"""Large CPU outputs are backed by huge pages where Linux offers them (rust/src/cpu/pages.rs).

A fresh output of tens of megabytes faults on every 4 KiB page at the kernels' first write;
natten_rs asks the kernel for 2 MiB pages behind the whole huge pages inside each large output
(madvise MADV_HUGEPAGE), which Linux marks on the memory's mapping as the "hg" VmFlag of
/proc/self/smaps. These tests read that flag back for outputs of every op family, and check that
``NATTEN_RS_HUGE_PAGES=0`` turns the advice off and that small outputs are left alone.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import natten_rs
import natten_rs.functional as F
import pytest
import torch

SMAPS = pathlib.Path("/proc/self/smaps")
pytestmark = pytest.mark.skipif(
    not pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled").exists()
    or not SMAPS.exists()
    or "VmFlags:" not in SMAPS.read_text()
    # torch's own switch advises every allocation, which would hide natten_rs's advice.
    or os.environ.get("THP_MEM_ALLOC_ENABLE") == "1",
    reason="needs Linux with transparent huge pages (and VmFlags in smaps), torch's switch off",
)

HUGE_PAGE = 2 << 20
# Tokens of a 1-D problem whose [1, L, 4, 64] float32 tensors take 64 MiB.
LENGTH = 65536


def huge_page_advised(t: torch.Tensor) -> bool:
    """Whether the mapping holding the first whole huge page inside ``t`` carries "hg"."""
    address = -(-t.data_ptr() // HUGE_PAGE) * HUGE_PAGE
    assert address + HUGE_PAGE <= t.data_ptr() + t.nbytes, "the tensor holds no whole huge page"
    flags, inside = None, False
    for line in SMAPS.read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif head == "VmFlags:" and inside:
            flags = line.split()[1:]
    assert flags is not None, "no mapping holds the tensor"
    return "hg" in flags


def tokens(length: int, dim: int = 64, grad: bool = False) -> list[torch.Tensor]:
    """Heads-last [1, length, 4, dim] query, key and value."""
    gen = torch.Generator().manual_seed(0)
    shape = (1, length, 4, dim)
    return [torch.randn(shape, generator=gen).requires_grad_(grad) for _ in range(3)]


def test_fused_forward_and_backward_outputs_take_huge_pages():
    q, k, v = tokens(LENGTH, grad=True)
    out = natten_rs.na1d(q, k, v, 3)
    assert huge_page_advised(out)
    out.backward(torch.ones_like(out))
    for t in (q, k, v):
        assert huge_page_advised(t.grad)


def test_unfused_outputs_and_gradients_take_huge_pages():
    # Heads-first [1, 4, L, 16] (64 MiB) and attn [1, 4, L, 9] (36 MiB).
    q, k, v = (t.transpose(1, 2) for t in tokens(4 * LENGTH, dim=16, grad=True))
    attn = F.na1d_qk(q, k, 9)
    assert huge_page_advised(attn)
    out = F.na1d_av(attn.softmax(-1), v, 9)
    assert huge_page_advised(out)
    # The gradients of the ops' own inputs are the tensors the backward ops wrote.
    for grad in torch.autograd.grad(out, (q, k, v), torch.ones_like(out)):
        assert huge_page_advised(grad)


def advised_in_fresh_process(length: int, **env: str) -> bool:
    """Whether a fused forward's output of ``length`` tokens carries "hg" in a new process: there
    no earlier allocation can have been advised, and memory freed by one and handed out again
    (the test process runs many large problems first) would carry its advice along."""
    script = (
        "import natten_rs, test_pages as t\n"
        f"q, k, v = t.tokens({length})\n"
        "out = natten_rs.na1d(q, k, v, 3)\n"
        f"assert out.nbytes == {length} * 4 * 64 * 4\n"
        "print(t.huge_page_advised(out))\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), **env)
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        cwd=pathlib.Path(__file__).parent,
        check=True,
    )
    return {"True": True, "False": False}[result.stdout.strip()]


def test_small_outputs_are_left_alone():
    # Below 32 MiB (16 MiB here), outputs come back from malloc already mapped: no advice.
    assert advised_in_fresh_process(LENGTH)
    assert not advised_in_fresh_process(LENGTH // 4)


def test_the_advice_turns_off():
    assert not advised_in_fresh_process(LENGTH, NATTEN_RS_HUGE_PAGES="0")
