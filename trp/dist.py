"""Multi-process training under ``torchrun``: process group set-up and replica checks.

``torchrun --nproc-per-node N [--nnodes M ...] -m trp train ...`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; :func:`init_from_env` turns them into a process group (NCCL on GPUs, gloo on CPU)
and picks this process's device. Only rank 0 writes files; evaluation sums exact totals over ranks.

TRP's projection keeps replicas identical because every rank computes the SVD and then rank 0's
projected weights and sub-gradients are broadcast (see :class:`trp.hook.TRP`): LAPACK/cuSOLVER
results may differ in the last bit between processes, and a broadcast makes the replicas bitwise
equal for the cost of one copy of the eligible weights every ``period`` steps.
"""

from __future__ import annotations

import gc
import hashlib
import os

import torch
from torch import nn

from trp.errors import TRPError

__all__ = ["init_from_env", "shutdown", "rank_and_world", "any_rank", "replica_digest", "replicas_identical",
           "broadcast_buffers"]


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size (0, 1 without a process group).

    Example:
        >>> rank_and_world()
        (0, 1)
    """
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env() -> bool:
    """Start the process group when launched by torchrun; True if this call started one.

    On CUDA each process also takes its GPU (``LOCAL_RANK``) as the current device, which training
    then uses. Without torchrun (``WORLD_SIZE`` unset or 1), or with a group already running,
    nothing happens and the result is False, so the caller knows whether to :func:`shutdown`.

    Example:
        >>> init_from_env()  # not under torchrun
        False
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dist = torch.distributed
    if world <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    use_cuda = torch.cuda.is_available()
    try:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    except (RuntimeError, ValueError) as err:
        raise TRPError(f"could not start the process group: {str(err).splitlines()[0]}") from None
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return True


def shutdown() -> None:
    """Tear down the process group if one is running.

    Drop every reference to the ``DistributedDataParallel`` wrapper before calling this: the
    wrapper's reducer sits in reference cycles, and a gloo group whose reducer is only freed at
    interpreter exit can abort the process there (torch 2.14: "terminate called without an active
    exception", exit code -6, after all work is done). A garbage collection before the group is
    destroyed frees it in order.

    Example:
        >>> shutdown()
    """
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True if ``flag`` is True on any rank (an all-reduce MAX; ``flag`` itself without a group).

    Under torch.distributed every rank must take the same branch at a collective point (stop at
    the same step, give up on the same error), or the others wait forever in the next all-reduce.

    Example:
        >>> any_rank(True), any_rank(False)
        (True, False)
    """
    if rank_and_world()[1] == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def replica_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter's and buffer's bytes, in order: equal digests mean bitwise equal.

    Example:
        >>> replica_digest(nn.Linear(2, 2)) == replica_digest(nn.Linear(2, 2))
        False
    """
    h = hashlib.sha256()
    for t in list(model.parameters()) + list(model.buffers()):
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def replicas_identical(model: nn.Module) -> bool:
    """True when every rank holds bitwise the same parameters and buffers (True without a group).

    Example:
        >>> replicas_identical(nn.Linear(2, 2))
        True
    """
    rank, world = rank_and_world()
    if world == 1:
        return True
    digest = replica_digest(model)
    gathered: list[str | None] = [None] * world
    torch.distributed.all_gather_object(gathered, digest)
    return all(d == digest for d in gathered)


def broadcast_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts buffers before each forward pass, so after the last training step of an epoch
    each rank holds the statistics of its own last batch. Evaluation and checkpoints use rank 0's.

    Example:
        >>> broadcast_buffers(nn.BatchNorm2d(2))  # no-op without a process group
    """
    if rank_and_world()[1] == 1:
        return
    for buf in model.buffers():
        torch.distributed.broadcast(buf.data, src=0)
