"""Spawn ``WORLD`` gloo processes on CPU, each running ``fn(rank, out, *args)``; collect what they
saved; fail (never hang) if a rank does not finish in time.

The workers write ``out/<rank>.pt``; a rank that hangs in a collective is terminated when the
deadline passes and the test fails with a ``TimeoutError`` naming the ranks that did not finish.
"""

from __future__ import annotations

import importlib
import os
import socket
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

WORLD = 2
PG_TIMEOUT = timedelta(seconds=60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, port: int, out: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=PG_TIMEOUT)
    try:
        result = fn(rank, *args)
        torch.save(result, f"{out}/{rank}.pt")
        dist.barrier()  # no rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


def spawn(
    fn: Callable[..., Any], *args: Any, deadline: float = 150.0, attempts: int = 3
) -> list[Any]:
    """Run ``fn`` on every rank; return each rank's result (``fn``'s return value).

    A worker killed by a signal (gloo's loopback transport occasionally aborts at teardown on a
    loaded machine) is retried with a fresh port; a worker that raises is not. A rank still
    running after ``deadline`` seconds is terminated and the test fails.
    """
    for attempt in range(attempts):
        with tempfile.TemporaryDirectory() as out:
            ctx = mp.start_processes(
                _entry,
                args=(_free_port(), out, fn, args),
                nprocs=WORLD,
                join=False,
                start_method="spawn",
            )
            stop = time.monotonic() + deadline
            try:
                while not ctx.join(timeout=1.0):
                    if time.monotonic() > stop:
                        alive = [r for r, p in enumerate(ctx.processes) if p.is_alive()]
                        for p in ctx.processes:
                            if p.is_alive():
                                p.terminate()
                        for p in ctx.processes:
                            p.join(10)
                            if p.is_alive():
                                p.kill()
                        raise TimeoutError(f"rank(s) {alive} still running after {deadline} s")
            except mp.ProcessExitedException as e:
                if e.signal_name is None or attempt == attempts - 1:
                    raise
                continue
            return [torch.load(f"{out}/{r}.pt", weights_only=False) for r in range(WORLD)]
    raise AssertionError("unreachable")


def run_modules(rank: int, modules: list[str]) -> dict[str, Any]:
    """Every listed test module's ``_worker(rank)``, in one pair of processes."""
    return {name: importlib.import_module(name)._worker(rank) for name in modules}


class Net(nn.Module):
    """The distributed tests' model: a trunk (5 → 8 → 6) and ``m`` linear heads."""

    def __init__(self, m: int = 3) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6))
        self.heads = nn.ModuleList([nn.Linear(6, 1) for _ in range(m)])

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        z = self.trunk(x)
        return z, [h(z) for h in self.heads]


def net_and_data(shard: int | None, m: int = 3) -> tuple[Net, nn.Module, Tensor, Tensor]:
    """The seeded float64 :class:`Net`, the module to call (wrapped in DDP when ``shard`` is a
    rank) and the batch of 16 (that rank's shard, or the whole batch for ``shard=None``)."""
    torch.manual_seed(0)
    net = Net(m).double()
    model: nn.Module = net
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 5, generator=g).double(), torch.randn(16, m, generator=g).double()
    if shard is not None:
        model = nn.parallel.DistributedDataParallel(net)
        x, y = x.chunk(WORLD)[shard], y.chunk(WORLD)[shard]
    return net, model, x, y
