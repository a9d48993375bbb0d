"""natten_rs under DistributedDataParallel: two CPU processes (gloo, loopback only).

Each rank builds the same small DiNAT-like block (same seed), wraps it in DDP and runs one
training step on its half of a fixed batch. DDP's averaged gradients (and the parameters after
one SGD step) must equal a single-process step on the full batch with the mean loss.

The ranks are this file run as a script (``python test_ddp.py RANK WORLD_SIZE OUT``), started
with ``subprocess`` and killed if they outlive their timeout.
"""

from __future__ import annotations

import datetime
import os
import pathlib
import socket
import subprocess
import sys

import natten_rs
import pytest
import torch
from torch import nn

WORLD_SIZE = 2
BATCH = 8
HEIGHT = WIDTH = 10
DIM = 16
LR = 0.1
TIMEOUT_S = 90


class Block(nn.Module):
    """LayerNorm -> NeighborhoodAttention2D -> residual -> LayerNorm -> MLP -> residual -> head."""

    def __init__(self):
        super().__init__()
        self.norm1 = nn.LayerNorm(DIM)
        self.attn = natten_rs.NeighborhoodAttention2D(
            DIM, 2, kernel_size=3, dilation=2, rel_pos_bias=True
        )
        self.norm2 = nn.LayerNorm(DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))
        self.head = nn.Linear(DIM, 3)

    def forward(self, x):  # x: [B, H, W, C]
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(dim=(1, 2)))


def build() -> Block:
    torch.manual_seed(0)
    model = Block()
    with torch.no_grad():  # rel_pos_bias starts near zero: make its gradient path matter
        model.attn.rpb.normal_(0.0, 0.5)
    return model


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, HEIGHT, WIDTH, DIM, generator=gen)
    y = torch.randint(0, 3, (BATCH,), generator=gen)
    return x, y


def step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One SGD step on the mean cross-entropy; returns the loss."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    opt.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss.detach()


def _rank_main(rank: int, world_size: int, out: pathlib.Path) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60)
    )
    try:
        model = DistributedDataParallel(build())
        x, y = batch()
        shard = BATCH // world_size
        x, y = x[rank * shard : (rank + 1) * shard], y[rank * shard : (rank + 1) * shard]
        loss = step(model, x, y)
        grads = {n: p.grad.clone() for n, p in model.module.named_parameters()}
        params = {n: p.detach().clone() for n, p in model.module.named_parameters()}
        losses = [torch.zeros(()) for _ in range(world_size)]
        dist.all_gather(losses, loss)
        torch.save(
            {"grads": grads, "params": params, "losses": torch.stack(losses)},
            out / f"rank{rank}.pt",
        )
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_ranks(out: pathlib.Path) -> None:
    env = dict(os.environ)
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        OMP_NUM_THREADS="1",
    )
    env.pop("GLOO_SOCKET_IFNAME", None)
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(rank), str(WORLD_SIZE), str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(WORLD_SIZE)
    ]
    logs = []
    try:
        for proc in procs:
            try:
                logs.append(proc.communicate(timeout=TIMEOUT_S)[0])
            except subprocess.TimeoutExpired:
                pytest.fail(f"a DDP rank ran past {TIMEOUT_S} s")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"rank {rank} exited {proc.returncode}:\n{log}"


def test_ddp_gradients_match_single_process(tmp_path):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    _run_ranks(tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]

    model = build()
    x, y = batch()
    loss = step(model, x, y)
    grads = {n: p.grad for n, p in model.named_parameters()}
    params = dict(model.named_parameters())

    assert set(grads) == set(ranks[0]["grads"])
    assert "attn.rpb" in grads and grads["attn.rpb"].abs().max() > 0
    # The mean of the shard losses is the full batch's mean loss (equal shards).
    torch.testing.assert_close(ranks[0]["losses"].mean(), loss, atol=1e-5, rtol=1e-5)
    for r, got in enumerate(ranks):
        torch.testing.assert_close(got["losses"], ranks[0]["losses"], atol=0, rtol=0)
        for name, grad in grads.items():
            # DDP all-reduces: every rank holds the same averaged gradient.
            torch.testing.assert_close(got["grads"][name], ranks[0]["grads"][name], atol=0, rtol=0)
            torch.testing.assert_close(
                got["grads"][name], grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}"
            )
            torch.testing.assert_close(
                got["params"][name],
                params[name].detach(),
                atol=1e-5,
                rtol=1e-4,
                msg=lambda m, n=name: f"{n} after step: {m}",
            )


if __name__ == "__main__":
    _rank_main(int(sys.argv[1]), int(sys.argv[2]), pathlib.Path(sys.argv[3]))
