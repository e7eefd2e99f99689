"""DistributedDataParallel on CPU (gloo) with torchrun: the Balancer under DDP.

Wrap the model in DDP as usual and build the Balancer over the *unwrapped* model's shared part;
nothing else changes. Every decision of a step is global: the strategies see the rank mean of
the losses, and the per-task gradients (at the parameters) or the Gramian (at a cut point) are
all-reduced, so with equal shards every rank solves the same problem, the replicas stay bitwise
identical, and training equals one process on the concatenated batch.

The script trains a 3-task model twice: first in one process on the full batches (the
reference, before the process group exists), then under DDP with each rank on its half of every
batch. At the end it checks that the ranks' parameters are identical and equal the reference.

Run (2 processes, a few seconds; synthetic data)::

    torchrun --standalone --nproc_per_node=2 examples/ddp_torchrun.py
    torchrun --standalone --nproc_per_node=2 examples/ddp_torchrun.py --steps 5 --at cut

``--at params`` (default) balances at the shared parameters (UPGrad on the all-reduced per-task
gradients); ``--at cut`` at the trunk's output (one all-reduced ``[m, m]`` Gramian per step).
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import mtlbal

TASKS = 3


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(16, 1) for _ in range(TASKS)])

    def forward(self, x: Tensor) -> list[Tensor]:
        z = self.trunk(x)
        return [head(z) for head in self.heads]


def make_data(n: int = 512) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 6, generator=g)
    y = torch.stack([x[:, 0] + x[:, 1], 3.0 * x[:, 2] * x[:, 3], torch.sin(2 * x[:, 4])], 1)
    return x, y


def train(steps: int, at: str, rank: int, world: int) -> tuple[Net, list[float]]:
    """Train from the same seeded initialisation; under DDP on this rank's shard of each batch."""
    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    net = Net()
    model: nn.Module = DistributedDataParallel(net) if world > 1 else net
    balancer = mtlbal.Balancer(
        net.trunk,  # the unwrapped model's shared part
        weighting=mtlbal.weighting.UncertaintyWeighting(TASKS),
        aggregator=mtlbal.aggregation.UPGrad(),
        at="params" if at == "params" else net.trunk,
    )
    opt = mtlbal.wrap(torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9), balancer)
    x, y = make_data()
    order = torch.Generator().manual_seed(2)  # the same batch order on every rank
    losses: list[float] = []
    for _ in range(steps):
        idx = torch.randperm(len(x), generator=order)[:64]  # the global batch
        idx = idx.chunk(world)[rank]  # this rank's equal shard of it
        out = model(x[idx])
        task_losses = {
            f"t{t}": nn.functional.mse_loss(out[t][:, 0], y[idx, t]) for t in range(TASKS)
        }
        opt.zero_grad()
        info = opt.backward(task_losses)
        opt.step()
        losses.append(float(info.losses.sum()))  # the global (rank-mean) losses
    return net, losses


def main(steps: int = 40, at: str = "params") -> None:
    # the reference: one process on the full batches, before the process group exists
    reference, _ = train(steps, at, rank=0, world=1)

    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    net, losses = train(steps, at, rank, world)

    # every rank holds the same parameters, bit for bit
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    identical = all(torch.equal(gathered[0], other) for other in gathered[1:])
    # ... and equal one process on the concatenated batches (up to float32 rounding)
    ref_flat = torch.cat([p.detach().reshape(-1) for p in reference.parameters()])
    max_diff = float((flat - ref_flat).abs().max())
    if rank == 0:
        print(f"world {world}, at={at}: summed task loss {losses[0]:.3f} -> {losses[-1]:.3f}")
        print(f"ranks' parameters identical: {identical}; max |DDP - one process| = {max_diff:.2e}")
    assert identical, "the replicas diverged"
    assert torch.allclose(flat, ref_flat, rtol=1e-4, atol=1e-5), max_diff
    assert losses[-1] < losses[0]
    dist.barrier()  # no rank tears gloo down while another still talks to it
    if rank == 0:
        print(f"ddp_torchrun: OK  {steps} steps on {world} ranks")
    dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--at", choices=["params", "cut"], default="params")
    args = parser.parse_args()
    main(steps=args.steps, at=args.at)
