"""Datasets held as tensors: the :class:`Data` interface, batching, sharding and batch augmentation.

Small datasets (scikit-learn's digits, CIFAR) live entirely as ``uint8`` tensors, are moved to the
training device once and are augmented a whole batch at a time there (random crop with padding and
horizontal flip, as in hlb-CIFAR10): no per-image Python work, no worker processes.

Every random draw comes from a CPU :class:`torch.Generator` seeded with ``seed * SEED_STRIDE + epoch``
(:func:`epoch_generator`), so an epoch's batches are identical on CPU and GPU, independent of the global
RNG, and a run resumed at epoch ``e`` sees exactly the batches the original run would have seen.

Sharding (:func:`train_shard`, also used by image folders): every rank draws the same permutation, the
tail is cut so the length divides by ``world_size``, and rank ``r`` takes ``perm[r::world_size]``; all ranks
therefore run the same number of steps. Test data is sharded as ``idx[r::world_size]`` with nothing
dropped or repeated, so summing correct counts over ranks gives exact totals.

Example:
    >>> data = load_digits_data()
    >>> [sum(len(y) for _, y in data.test_batches(100, rank=r, world_size=2)) for r in range(2)]
    [180, 180]
    >>> data.num_train_batches(100, world_size=2)  # 1437 // 2 = 718 training samples per rank
    8
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from trp.errors import TRPError
from trp.validate import number, whole

__all__ = [
    "SEED_STRIDE",
    "Data",
    "TensorData",
    "channel_stats",
    "check_batching",
    "chunks",
    "crop_and_flip",
    "epoch_generator",
    "load_digits_data",
    "num_batches",
    "tensor_data",
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


@dataclass(eq=False)
class TensorData:
    """A whole dataset held as uint8 tensors, batched, sharded and augmented on its device.

    Attributes:
        name: "digits", "cifar10" or "cifar100".
        x_train: uint8 ``[N, C, H, W]``; kept as uint8 to save memory, converted per batch.
        y_train: int64 ``[N]``.
        x_test: uint8 ``[M, C, H, W]``.
        y_test: int64 ``[M]``.
        num_classes: Number of classes.
        mean: Per-channel mean of ``x_train`` in [0, 1] units.
        std: Per-channel standard deviation of ``x_train`` in [0, 1] units.
        pad: Random-crop padding for augmentation.
        flip: Whether augmentation flips images horizontally.

    Example:
        >>> x = torch.zeros(4, 1, 2, 2, dtype=torch.uint8)
        >>> y = torch.tensor([0, 1, 0, 1])
        >>> data = TensorData("toy", x, y, x, y, 2, (0.0,), (1.0,), pad=1, flip=False)
        >>> data.input_shape, data.num_train_batches(3)
        ((1, 2, 2), 2)
    """

    name: str
    x_train: torch.Tensor = field(repr=False)
    y_train: torch.Tensor = field(repr=False)
    x_test: torch.Tensor = field(repr=False)
    y_test: torch.Tensor = field(repr=False)
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pad: int
    flip: bool
    x_val: torch.Tensor | None = field(default=None, repr=False)  # a validation split held out of training
    y_val: torch.Tensor | None = field(default=None, repr=False)  # (:func:`trp.data.split.hold_out`), or None
    _scale: torch.Tensor = field(init=False, repr=False)
    _shift: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        splits = [("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)]
        if (self.x_val is None) != (self.y_val is None):
            raise TRPError(f"{self.name}: validation images and labels come together")
        if self.x_val is not None:
            splits.append(("validation", self.x_val, self.y_val))
        for split, x, y in splits:
            if x.dtype != torch.uint8 or x.dim() != 4:
                raise TRPError(f"{self.name}: {split} images must be uint8 [N, C, H, W], got {x.dtype} {list(x.shape)}")
            if y.dtype != torch.int64 or y.shape != (x.shape[0],):
                raise TRPError(
                    f"{self.name}: {split} labels must be int64 [{x.shape[0]}], got {y.dtype} {list(y.shape)}"
                )
        if any(x.shape[1:] != self.x_train.shape[1:] for _, x, _ in splits):
            raise TRPError(f"{self.name}: train, test and validation images differ in shape")
        c = self.x_train.shape[1]
        if len(self.mean) != c or len(self.std) != c:
            raise TRPError(f"{self.name}: mean and std need {c} values (one per channel)")
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, c, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, c, 1, 1)
        # (x / 255 - mean) / std folded into one multiply and one subtract per batch.
        self._scale = (1.0 / (255.0 * std)).to(self.x_train.device)
        self._shift = (mean / std).to(self.x_train.device)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        _, c, h, w = self.x_train.shape
        return (c, h, w)

    @property
    def num_train(self) -> int:
        """Number of training images."""
        return int(self.x_train.shape[0])

    @property
    def num_test(self) -> int:
        """Number of test images."""
        return int(self.x_test.shape[0])

    @property
    def num_val(self) -> int:
        """Number of validation images (0 without a validation split)."""
        return 0 if self.x_val is None else int(self.x_val.shape[0])

    @property
    def device(self) -> torch.device:
        """Device the tensors live on."""
        return self.x_train.device

    def to(self, device: torch.device | str) -> TensorData:
        """Return a copy whose tensors live on ``device`` (moved once, not per batch).

        Example:
            >>> load_digits_data().to("cpu").device.type
            'cpu'
        """
        return dataclasses.replace(
            self,
            x_train=self.x_train.to(device),
            y_train=self.y_train.to(device),
            x_test=self.x_test.to(device),
            y_test=self.y_test.to(device),
            x_val=None if self.x_val is None else self.x_val.to(device),
            y_val=None if self.y_val is None else self.y_val.to(device),
        )

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float32).mul_(self._scale).sub_(self._shift)

    def num_train_batches(self, batch_size: int, world_size: int = 1) -> int:
        """Number of batches :meth:`train_batches` yields on each rank.

        Example:
            >>> load_digits_data().num_train_batches(100, world_size=2)  # 1437 // 2 = 718 per rank
            8
        """
        return num_batches(self.num_train, batch_size, world_size)

    def train_batches(
        self, batch_size: int, epoch: int, seed: int, augment: bool = True, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield this rank's shuffled, normalized (and augmented) training batches for one epoch.

        Args:
            batch_size: Images per batch on this rank; the last batch may be smaller.
            epoch: Epoch number; with ``seed`` it fixes the shuffle and the augmentation.
            seed: Run seed.
            augment: Apply random crop (``pad``) and, if ``flip``, random horizontal flips.
            rank: This process's rank.
            world_size: Number of processes; all ranks get the same number of batches.

        Yields:
            ``(x, y)``: float32 ``[B, C, H, W]`` and int64 ``[B]`` on the data's device.

        Example:
            >>> data = load_digits_data()
            >>> a = [y for _, y in data.train_batches(64, epoch=3, seed=1)]
            >>> b = [y for _, y in data.train_batches(64, epoch=3, seed=1)]
            >>> all(torch.equal(p, q) for p, q in zip(a, b))
            True
        """
        batch_size, rank, world_size = check_batching(batch_size, rank, world_size)
        gen = epoch_generator(seed, epoch)
        n = self.num_train
        index, positions = train_shard(n, gen, rank, world_size)
        do_crop = augment and self.pad > 0
        do_flip = augment and self.flip
        if augment:
            # Drawn for every position of the full permutation, on CPU, so a sample's augmentation
            # depends only on (seed, epoch, its position), not on the device or the batch size.
            span = 2 * self.pad + 1
            dy_all = torch.randint(0, span, (n,), generator=gen)
            dx_all = torch.randint(0, span, (n,), generator=gen)
            flip_all = torch.rand(n, generator=gen) < 0.5
            dy, dx, flips = dy_all[positions], dx_all[positions], flip_all[positions]
        dev = self.device
        index_dev = index.to(dev)
        for start in range(0, index.numel(), batch_size):
            idx = index_dev[start : start + batch_size]
            # Normalize before padding, so the border is 0 in normalized space: the dataset's mean
            # colour, rather than a black frame far from anything in the data.
            x = self._normalize(self.x_train[idx])
            if do_crop or do_flip:
                sl = slice(start, start + batch_size)
                x = crop_and_flip(
                    x,
                    self.pad if do_crop else 0,
                    dy[sl],
                    dx[sl],
                    flips[sl] if do_flip else None,
                )
            yield x, self.y_train[idx]

    def test_batches(
        self, batch_size: int, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield this rank's share (``idx[rank::world_size]``) of the test set, in order, unaugmented.

        Nothing is dropped or repeated, so summing per-rank counts gives exact totals.

        Example:
            >>> data = load_digits_data()
            >>> sum(len(y) for r in range(3) for _, y in data.test_batches(50, rank=r, world_size=3))
            360
        """
        yield from self._in_order(self.x_test, self.y_test, batch_size, rank, world_size)

    def val_batches(
        self, batch_size: int, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield this rank's share of the validation split, like :meth:`test_batches`; a TRPError without one.

        Example:
            >>> from trp.data.split import hold_out
            >>> sum(len(y) for _, y in hold_out(load_digits_data(), 0.1, seed=0).val_batches(100))
            142
        """
        if self.x_val is None or self.y_val is None:
            raise TRPError(f"{self.name} has no validation split (hold one out with --val-split)")
        yield from self._in_order(self.x_val, self.y_val, batch_size, rank, world_size)

    def _in_order(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, rank: int,
                  world_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batch_size, rank, world_size = check_batching(batch_size, rank, world_size)
        index = torch.arange(rank, x.shape[0], world_size, device=self.device)
        for idx in chunks(index, batch_size):
            yield self._normalize(x[idx]), y[idx]


def tensor_data(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    num_classes: int,
    pad: int,
    flip: bool,
) -> TensorData:
    """Build a :class:`TensorData` from numpy arrays, normalized with the training images' own statistics.

    Example:
        >>> x = np.array([0, 255], dtype=np.uint8).reshape(2, 1, 1, 1)
        >>> data = tensor_data("toy", x, np.array([0, 1]), x, np.array([1, 0]), 2, pad=0, flip=False)
        >>> data.mean, data.std
        ((0.5,), (0.5,))
    """
    xt = torch.from_numpy(np.ascontiguousarray(x_train, dtype=np.uint8))
    mean, std = channel_stats(xt)
    return TensorData(
        name=name,
        x_train=xt,
        y_train=torch.from_numpy(np.ascontiguousarray(y_train, dtype=np.int64)),
        x_test=torch.from_numpy(np.ascontiguousarray(x_test, dtype=np.uint8)),
        y_test=torch.from_numpy(np.ascontiguousarray(y_test, dtype=np.int64)),
        num_classes=num_classes,
        mean=mean,
        std=std,
        pad=pad,
        flip=flip,
    )


def load_digits_data(test_fraction: float = 0.2, seed: int = 0) -> TensorData:
    """scikit-learn's bundled 8x8 handwritten digits, split into train and test.

    Needs no download, which makes it the dataset for tests and quick experiments. Pixel values
    0..16 are multiplied by 15 to give exact uint8 values 0..240. The split is stratified and fixed by
    ``seed``. Augmentation: 1-pixel random crops, no flips (a mirrored digit is another glyph).

    Args:
        test_fraction: Share of the 1,797 images held out for testing, in (0, 1).
        seed: Seed of the split, in [0, 2**32) as scikit-learn requires.

    Returns:
        A :class:`TensorData` named "digits" with ``[N, 1, 8, 8]`` images and 10 classes.

    Example:
        >>> data = load_digits_data()
        >>> data.num_train, data.num_test, data.input_shape
        (1437, 360, (1, 8, 8))
    """
    test_fraction = number(test_fraction, "test fraction", low=0, low_open=True)
    if test_fraction >= 1:
        raise TRPError(f"test fraction must be in (0, 1), got {test_fraction:g}")
    seed = whole(seed, "seed", low=0, high=2**32 - 1)
    # Imported here: scikit-learn takes a second to import and only this loader needs it.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images * 15).round().astype(np.uint8)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, stratify=labels, random_state=seed
    )
    return tensor_data(
        "digits", images[train_idx], labels[train_idx], images[test_idx], labels[test_idx], 10, pad=1, flip=False
    )
