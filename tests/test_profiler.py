"""The profiler (README's main job) runs, checks natten_rs against the reference, reports."""

import pytest
import torch
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


@pytest.mark.parametrize(
    "extra", [[], ["--causal"], ["--dtype", "bfloat16"], ["--rpb"], ["--device", "cpu"]]
)
def test_profiler_agrees_with_the_reference_and_prints_every_path(capsys, extra):
    assert profiler.main(SMALL + extra) == 0
    table = capsys.readouterr().out
    for path in ("unfused", "fused"):
        assert table.count(f" {path} ") == 2, table
    assert "NO" not in table


def test_profiler_reports_disagreement(monkeypatch, capsys):
    def broken(*problem):
        return profiler.fused_attention(*problem) + 1

    monkeypatch.setitem(profiler.IMPLEMENTATIONS, "fused", broken)
    assert profiler.main(SMALL) == 1
    assert "NO" in capsys.readouterr().out


def test_the_bias_reaches_every_path(monkeypatch, capsys):
    # A bias the reference sees but the fused op does not would make them disagree.
    def unbiased(q, k, v, kernel, dilation, causal, rpb):
        return profiler.fused_attention(q, k, v, kernel, dilation, causal, None)

    monkeypatch.setitem(profiler.IMPLEMENTATIONS, "fused", unbiased)
    assert profiler.main([*SMALL, "--rpb"]) == 1
    assert "rpb=True" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--device", "tpu"], "--device: expected cpu or cuda"),
        (["--device", "nonsense"], "--device: expected cpu or cuda"),
        (["--rpb", "--causal"], "--rpb: expected an odd --kernel without --causal"),
        (["--rpb", "--kernel", "4"], "--rpb: expected an odd --kernel without --causal"),
    ],
)
def test_bad_arguments_are_refused_naming_them(extra, message, capsys):
    with pytest.raises(SystemExit) as exit:
        profiler.main(SMALL + extra)
    assert exit.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_cuda_without_a_gpu_says_so(capsys):
    with pytest.raises(SystemExit):
        profiler.main([*SMALL, "--device", "cuda"])
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_profiler_runs_on_the_gpu(capsys):
    assert profiler.main([*SMALL, "--device", "cuda", "--rpb", "--dtype", "float16"]) == 0
    assert "NO" not in capsys.readouterr().out
