"""Datasets held as tensors: :class:`TensorData` and scikit-learn's digits.

Small datasets (scikit-learn's digits, CIFAR) live entirely as ``uint8`` tensors, are moved to the
training device once and are augmented a whole batch at a time there (random crop with padding and
horizontal flip, as in hlb-CIFAR10): no per-image Python work, no worker processes. Shuffling,
sharding and augmentation are those of :mod:`trp.data.batching`, reproducible from ``(seed, epoch)``.

Example:
    >>> data = load_digits_data()
    >>> [sum(len(y) for _, y in data.test_batches(100, rank=r, world_size=2)) for r in range(2)]
    [180, 180]
    >>> data.num_train_batches(100, world_size=2)  # 1437 // 2 = 718 training samples per rank
    8
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from trp.data.batching import (channel_stats, check_batching, chunks, crop_and_flip, epoch_generator, num_batches,
                               train_shard)
from trp.errors import TRPError
from trp.validate import number, whole

__all__ = ["TensorData", "load_digits_data", "tensor_data"]

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
