"""What every dataset shares: the :class:`Data` interface, seeded shuffles, sharding and batch augmentation.

Every random draw comes from a CPU :class:`torch.Generator` seeded with ``seed * SEED_STRIDE + epoch``
(:func:`epoch_generator`), so an epoch's batches are identical on CPU and GPU, independent of the global
RNG, and a run resumed at epoch ``e`` sees exactly the batches the original run would have seen.

Sharding (:func:`train_shard`): every rank draws the same permutation, the tail is cut so the length
divides by ``world_size``, and rank ``r`` takes ``perm[r::world_size]``; all ranks therefore run the same
number of steps. Test data is sharded as ``idx[r::world_size]`` with nothing dropped or repeated, so
summing correct counts over ranks gives exact totals.

Augmentation (:func:`crop_and_flip`) works on a whole batch on its device, as in hlb-CIFAR10: random
crop with padding and horizontal flip, no per-image Python work.

Example:
    >>> index, _ = train_shard(10, epoch_generator(seed=0, epoch=3), rank=0, world_size=2)
    >>> [len(c) for c in chunks(index, 2)]
    [2, 2, 1]
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from trp.validate import whole

__all__ = [
    "SEED_STRIDE",
    "Data",
    "channel_stats",
    "check_batching",
    "chunks",
    "crop_and_flip",
    "epoch_generator",
    "num_batches",
    "train_shard",
]

# Spreads seeds apart so that (seed, epoch) pairs do not collide for any realistic epoch count.
SEED_STRIDE = 100003


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The CPU generator that fixes one epoch's shuffle and augmentation.

    A private generator gives identical draws on every device and every rank, untouched by whatever
    else consumes the global RNG (model init, dropout), so a resumed run replays the same epoch.

    Example:
        >>> a = torch.randperm(5, generator=epoch_generator(1, 2))
        >>> bool(torch.equal(a, torch.randperm(5, generator=epoch_generator(1, 2))))
        True
    """
    return torch.Generator(device="cpu").manual_seed(seed * SEED_STRIDE + epoch)


def check_batching(batch_size: int, rank: int = 0, world_size: int = 1) -> tuple[int, int, int]:
    """Validate ``(batch_size, rank, world_size)``: batch size and world size at least 1, rank in range.

    Example:
        >>> check_batching(32, rank=1, world_size=2)
        (32, 1, 2)
        >>> check_batching(8, rank=2, world_size=2)
        Traceback (most recent call last):
        ...
        trp.errors.TRPError: rank must be <= 1, got 2
    """
    batch_size = whole(batch_size, "batch size", low=1)
    world_size = whole(world_size, "world size", low=1)
    rank = whole(rank, "rank", low=0, high=world_size - 1)
    return batch_size, rank, world_size


def num_batches(n: int, batch_size: int, world_size: int = 1) -> int:
    """Batches per rank for ``n`` training samples: the shard is ``n // world_size``, the last batch partial.

    Example:
        >>> num_batches(1437, 100, world_size=2)  # 718 samples per rank
        8
    """
    batch_size, _, world_size = check_batching(batch_size, 0, world_size)
    return math.ceil((n // world_size) / batch_size)


def train_shard(n: int, generator: torch.Generator, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (sample indices, positions in the permutation) owned by ``rank`` this epoch.

    Example:
        >>> index, positions = train_shard(5, epoch_generator(0, 0), rank=1, world_size=2)
        >>> positions.tolist()
        [1, 3]
    """
    perm = torch.randperm(n, generator=generator)
    # Cut the tail so every rank gets the same count: unequal counts would leave one rank waiting in
    # an all-reduce that the others never enter.
    usable = n - n % world_size
    positions = torch.arange(rank, usable, world_size)
    return perm[positions], positions


def chunks(index: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Split ``index`` into consecutive batches; the last, partial batch is kept.

    With equal per-rank counts every rank still has the same number of batches, and dropping the
    partial batch would silently skip samples.

    Example:
        >>> [c.tolist() for c in chunks(torch.arange(5), 2)]
        [[0, 1], [2, 3], [4]]
    """
    for start in range(0, index.numel(), batch_size):
        yield index[start : start + batch_size]


@runtime_checkable
class Data(Protocol):
    """What training and evaluation need from a dataset; :class:`TensorData` and ``FolderData`` fit.

    Example:
        >>> from trp.data.tensors import load_digits_data
        >>> isinstance(load_digits_data(), Data)
        True
    """

    name: str
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one input image."""
        ...

    @property
    def num_train(self) -> int:
        """Number of training samples."""
        ...

    @property
    def num_test(self) -> int:
        """Number of test samples."""
        ...

    def to(self, device: torch.device | str) -> Data:
        """Return the data delivering batches on ``device``."""
        ...

    def train_batches(
        self, batch_size: int, epoch: int, seed: int, augment: bool = True, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield shuffled (and augmented) normalized training batches of this rank."""
        ...

    def test_batches(
        self, batch_size: int, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield this rank's share of the test set in order."""
        ...

    def num_train_batches(self, batch_size: int, world_size: int = 1) -> int:
        """Number of batches :meth:`train_batches` yields per rank."""
        ...


def crop_and_flip(
    x: torch.Tensor, pad: int, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor | None = None
) -> torch.Tensor:
    """Crop every image of a batch at its own offset inside a zero border, then flip some.

    Pads the whole batch once and gathers each sample's window with advanced indexing: one kernel
    for the batch instead of a Python loop over images.

    Args:
        x: Images ``[B, C, H, W]``.
        pad: Border width; offsets range over ``[0, 2 * pad]`` and ``pad`` means no shift.
        dy: Row offsets, int64 ``[B]``.
        dx: Column offsets, int64 ``[B]``.
        flip: Optional bool ``[B]``; True mirrors that image left to right.

    Returns:
        A tensor shaped like ``x``.

    Example:
        >>> x = torch.arange(16.0).view(1, 1, 4, 4)
        >>> same = crop_and_flip(x, 2, torch.tensor([2]), torch.tensor([2]))
        >>> bool(torch.equal(same, x))
        True
        >>> crop_and_flip(x, 1, torch.tensor([0]), torch.tensor([1]))[0, 0, 0].tolist()
        [0.0, 0.0, 0.0, 0.0]
    """
    b, c, h, w = x.shape
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad))
        dev = x.device
        rows = dy.to(dev)[:, None] + torch.arange(h, device=dev)  # [B, H]
        cols = dx.to(dev)[:, None] + torch.arange(w, device=dev)  # [B, W]
        bi = torch.arange(b, device=dev)[:, None, None, None]
        ci = torch.arange(c, device=dev)[None, :, None, None]
        x = padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]
    if flip is not None:
        x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(3), x)
    return x


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and (population) std in [0, 1] units of a uint8 ``[N, C, H, W]`` tensor.

    Example:
        >>> channel_stats(torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1))
        ((0.5,), (0.5,))
    """
    # A 256-bin histogram per channel is exact and needs no float copy of the dataset (which would be
    # 600 MB for CIFAR's training set).
    levels = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for ch in range(x.shape[1]):
        counts = torch.bincount(x[:, ch].reshape(-1).cpu(), minlength=256).to(torch.float64)
        total = counts.sum()
        if total == 0:
            means.append(0.0)
            stds.append(1.0)
            continue
        mean = float((counts * levels).sum() / total)
        var = float((counts * (levels - mean) ** 2).sum() / total)
        std = math.sqrt(var)
        # A constant channel would divide by zero; leaving it unscaled keeps the inputs finite.
        stds.append(std if std > 1e-8 else 1.0)
        means.append(mean)
    return tuple(means), tuple(stds)
