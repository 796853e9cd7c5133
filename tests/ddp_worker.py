"""Worker for tests/test_dist.py: a few TRP steps under DDP (gloo) or in one process.

Run as ``torchrun --nproc-per-node 2 tests/ddp_worker.py OUT`` (per-rank batch 8) or
``python tests/ddp_worker.py OUT --single`` (one process, batch 16: the same global batch).
Each rank saves its final weights to OUT/rank{r}.safetensors.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import trp
from trp.dist import init_from_env, rank_and_world, replica_digest, shutdown

GLOBAL_BATCH, STEPS = 16, 6


def main() -> None:
    out, single = sys.argv[1], "--single" in sys.argv
    torch.set_num_threads(1)
    if not single:
        init_from_env()
    rank, world = rank_and_world()
    torch.manual_seed(0)  # identical initial weights on every rank
    # No BatchNorm: per-rank batch statistics would differ from the single process's by design.
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(16, 4))
    reg = trp.TRP(model, scheme="channel", energy=0.8, period=2, nuclear=1e-2)
    ddp = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    handle = reg.attach(opt)  # the sub-gradient before each step, the projection count after it
    data = torch.Generator().manual_seed(1)
    xs = torch.randn(STEPS, GLOBAL_BATCH, 3, 8, 8, generator=data)
    ys = torch.randint(0, 4, (STEPS, GLOBAL_BATCH), generator=data)
    for step in range(STEPS):
        x, y = xs[step][rank::world], ys[step][rank::world]  # this rank's share of the global batch
        loss = F.cross_entropy(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_file(state, f"{out}/rank{rank}.safetensors", metadata={"digest": replica_digest(model),
                                                                 "ranks": str(reg.ranks())})
    handle.remove()
    del ddp, reg, handle  # no DDP reference may outlive the process group (see trp.dist.shutdown)
    shutdown()


if __name__ == "__main__":
    main()
