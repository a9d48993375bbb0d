"""The profiler (README's main job) runs, checks natten_rs against the reference, reports."""

import pytest
from natten_rs import profiler

SMALL = [
    "--batch",
    "1",
    "--heads",
    "2",
    "--size",
    "9",
    "11",
    "--dim",
    "8",
    "--kernel",
    "3",
    "--dilations",
    "1",
    "3",
    "--repeats",
    "1",
]


@pytest.mark.parametrize("extra", [[], ["--causal"], ["--dtype", "bfloat16"]])
def test_profiler_agrees_with_the_reference_and_prints_every_path(capsys, extra):
    assert profiler.main(SMALL + extra) == 0
    table = capsys.readouterr().out
    for path in ("unfused", "fused"):
        assert table.count(f" {path} ") == 2, table
    assert "NO" not in table


def test_profiler_reports_disagreement(monkeypatch, capsys):
    def broken(q, k, v, kernel, dilation, causal):
        return profiler.fused_attention(q, k, v, kernel, dilation, causal) + 1

    monkeypatch.setitem(profiler.IMPLEMENTATIONS, "fused", broken)
    assert profiler.main(SMALL) == 1
    assert "NO" in capsys.readouterr().out
