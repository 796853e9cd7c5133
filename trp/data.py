"""Datasets as tensors, shuffled, sharded and augmented in whole batches.

The small datasets (scikit-learn's digits, CIFAR-10, CIFAR-100) are held entirely as ``uint8`` tensors,
moved to the training device once, and augmented a batch at a time there (random crop with padding and
horizontal flip), as in hlb-CIFAR10: no per-image Python work, no worker processes. Every random draw
comes from a CPU :class:`torch.Generator` seeded with ``seed * 100003 + epoch``, so an epoch's batches are
identical on CPU and GPU, independent of the global RNG, and a run resumed at epoch ``e`` sees exactly
the batches the original run would have seen.

ImageNet-style folders are too large for memory; :class:`FolderData` gives them the same interface
through a :class:`torch.utils.data.DataLoader`.

Distributed sharding is the same for both: every rank computes the same permutation, the tail is cut
so the length divides by ``world_size``, and rank ``r`` takes ``perm[r::world_size]``; all ranks therefore
run the same number of steps. Test data is sharded as ``idx[r::world_size]`` with nothing dropped or
repeated, so summing correct counts and totals over ranks gives exact results.

CIFAR batch files are pickles; they are read with a restricted unpickler that can only build numpy
arrays, so a planted file cannot run code.

Example:
    >>> data = load("digits")
    >>> data.input_shape, data.num_classes
    ((1, 8, 8), 10)
    >>> x, y = next(data.train_batches(batch_size=32, epoch=0, seed=0))
    >>> tuple(x.shape), x.dtype, y.dtype
    ((32, 1, 8, 8), torch.float32, torch.int64)
"""

from __future__ import annotations

import copy
import dataclasses
import http.client
import math
import os
import pickle
import re
import shutil
import sys
import tarfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from trp.errors import TRPError

__all__ = [
    "DATASETS",
    "Data",
    "FolderData",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TensorData",
    "crop_and_flip",
    "load",
    "load_cifar",
    "load_digits_data",
    "load_image_folder",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Spreads seeds apart so that (seed, epoch) pairs do not collide for any realistic epoch count.
_SEED_STRIDE = 100003


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # A private CPU generator: identical draws on every device and every rank, untouched by whatever
    # else consumes the global RNG (model init, dropout), so a resumed run replays the same epoch.
    return torch.Generator(device="cpu").manual_seed(seed * _SEED_STRIDE + epoch)


def _check_shard(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise TRPError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise TRPError(f"batch size must be at least 1, got {batch_size}")


def _train_shard(n: int, generator: torch.Generator, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (sample indices, positions in the permutation) owned by ``rank`` this epoch."""
    perm = torch.randperm(n, generator=generator)
    # Cut the tail so every rank gets the same count: unequal counts would leave one rank waiting in
    # an all-reduce that the others never enter.
    usable = n - n % world_size
    positions = torch.arange(rank, usable, world_size)
    return perm[positions], positions


def _chunks(index: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    # The last partial batch is kept: with equal per-rank counts every rank still has the same
    # number of batches, and dropping it would silently skip samples.
    for start in range(0, index.numel(), batch_size):
        yield index[start : start + batch_size]


@runtime_checkable
class Data(Protocol):
    """What training and evaluation need from a dataset; :class:`TensorData` and :class:`FolderData` fit.

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


def _channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and (population) std in [0, 1] units of a uint8 ``[N, C, H, W]`` tensor."""
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
    _scale: torch.Tensor = field(init=False, repr=False)
    _shift: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            if x.dtype != torch.uint8 or x.dim() != 4:
                raise TRPError(f"{self.name}: {split} images must be uint8 [N, C, H, W], got {x.dtype} {list(x.shape)}")
            if y.dtype != torch.int64 or y.shape != (x.shape[0],):
                raise TRPError(
                    f"{self.name}: {split} labels must be int64 [{x.shape[0]}], got {y.dtype} {list(y.shape)}"
                )
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise TRPError(f"{self.name}: train and test images differ in shape")
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
        )

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float32).mul_(self._scale).sub_(self._shift)

    def num_train_batches(self, batch_size: int, world_size: int = 1) -> int:
        """Number of batches :meth:`train_batches` yields on each rank.

        Example:
            >>> load_digits_data().num_train_batches(100, world_size=2)  # 1437 // 2 = 718 per rank
            8
        """
        _check_batch_size(batch_size)
        return math.ceil((self.num_train // world_size) / batch_size)

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
        _check_batch_size(batch_size)
        _check_shard(rank, world_size)
        gen = _epoch_generator(seed, epoch)
        n = self.num_train
        index, positions = _train_shard(n, gen, rank, world_size)
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
        _check_batch_size(batch_size)
        _check_shard(rank, world_size)
        index = torch.arange(rank, self.num_test, world_size, device=self.device)
        for idx in _chunks(index, batch_size):
            yield self._normalize(self.x_test[idx]), self.y_test[idx]


def _tensor_data(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    num_classes: int,
    pad: int,
    flip: bool,
) -> TensorData:
    xt = torch.from_numpy(np.ascontiguousarray(x_train, dtype=np.uint8))
    mean, std = _channel_stats(xt)
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
        seed: Seed of the split.

    Returns:
        A :class:`TensorData` named "digits" with ``[N, 1, 8, 8]`` images and 10 classes.

    Example:
        >>> data = load_digits_data()
        >>> data.num_train, data.num_test, data.input_shape
        (1437, 360, (1, 8, 8))
    """
    if not 0.0 < test_fraction < 1.0:
        raise TRPError(f"test fraction must be in (0, 1), got {test_fraction}")
    # Imported here: scikit-learn takes a second to import and only this loader needs it.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images * 15).round().astype(np.uint8)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, stratify=labels, random_state=seed
    )
    return _tensor_data(
        "digits", images[train_idx], labels[train_idx], images[test_idx], labels[test_idx], 10, pad=1, flip=False
    )


# ---------------------------------------------------------------------------------------------- CIFAR


@dataclass(frozen=True)
class _CifarSpec:
    title: str
    folder: str
    url: str
    labels_key: str
    num_classes: int


_CIFAR: dict[str, _CifarSpec] = {
    "cifar10": _CifarSpec(
        "CIFAR-10", "cifar-10-batches-py", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "labels", 10
    ),
    "cifar100": _CifarSpec(
        "CIFAR-100", "cifar-100-python", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "fine_labels", 100
    ),
}


def _numpy_modules() -> tuple[Any, Any]:
    # numpy 2 moved these modules to numpy._core; going through numpy.core would raise a
    # DeprecationWarning on every file.
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    return multiarray, numeric


def _allowed_globals() -> dict[tuple[str, str], Any]:
    import _codecs
    import builtins

    multiarray, numeric = _numpy_modules()
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("builtins", "dict"): builtins.dict,
        ("builtins", "list"): builtins.list,
        # Python 3 writes bytes in protocol-2 pickles as _codecs.encode(str, "latin1"): a pure function.
        ("_codecs", "encode"): _codecs.encode,
    }
    # The official files name numpy.core (written by numpy 1); files rewritten by numpy 2 name numpy._core.
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = multiarray._reconstruct
        allowed[(module, "scalar")] = multiarray.scalar
    # Pickle protocol 5 (Python 3.8+ default for HIGHEST_PROTOCOL) stores arrays via _frombuffer.
    for module in ("numpy.core.numeric", "numpy._core.numeric"):
        allowed[(module, "_frombuffer")] = numeric._frombuffer
    return allowed


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that can only rebuild numpy arrays, lists and dicts.

    A pickle can name any importable callable and call it while loading; a file planted in the data
    folder must not be able to run ``os.system``, so every name outside the few a CIFAR batch file
    needs is refused.
    """

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file, encoding="latin1")  # the official files are Python 2 pickles
        self._path = path
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise TRPError(
                f"{self._path}: refuses to unpickle {module}.{name} (only numpy arrays, lists and dicts are allowed): "
                "not a CIFAR batch file"
            ) from None


# First bytes of a pickled dict: PROTO (protocol >= 2), MARK (protocol 0), EMPTY_DICT (protocol 1).
_PICKLE_STARTS = (b"\x80", b"(", b"}")


def _read_batch(path: Path, labels_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR batch file safely and return (uint8 [N, 3, 32, 32], int64 [N])."""
    try:
        with open(path, "rb") as f:
            head = f.read(1)
            if head not in _PICKLE_STARTS:
                raise TRPError(f"{path} is not a CIFAR batch file (not a Python pickle)")
            f.seek(0)
            obj = _CifarUnpickler(f, path).load()
    except TRPError:
        raise
    except (EOFError, pickle.UnpicklingError) as err:
        raise TRPError(f"truncated or damaged CIFAR batch file {path}: {err}") from None
    except OSError as err:
        raise TRPError(f"could not read {path}: {err.strerror or err}") from None
    except Exception as err:  # arbitrary bytes can make the unpickler fail in many ways
        raise TRPError(f"truncated or damaged CIFAR batch file {path}: {type(err).__name__}: {err}") from None

    if not isinstance(obj, dict):
        raise TRPError(f"{path} is not a CIFAR batch file: holds a {type(obj).__name__}, not a dict")
    missing = [k for k in ("data", labels_key) if k not in obj]
    if missing:
        raise TRPError(f"{path} is not a CIFAR batch file: missing key(s) {', '.join(missing)}")
    data = obj["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {list(data.shape)}" if isinstance(data, np.ndarray) else type(data).__name__
        raise TRPError(f"{path} is not a CIFAR batch file: 'data' must be uint8 [N, 3072], got {desc}")
    try:
        labels = np.asarray(obj[labels_key])
    except Exception:
        raise TRPError(f"{path} is not a CIFAR batch file: {labels_key!r} is not a list of integers") from None
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise TRPError(f"{path} is not a CIFAR batch file: {labels_key!r} is not a list of integers")
    labels = labels.astype(np.int64)
    if len(labels) != len(data):
        raise TRPError(f"{path}: {len(data)} images but {len(labels)} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise TRPError(f"{path}: labels must be in [0, {num_classes}), found {labels.min()}..{labels.max()}")
    # Channel-major rows: 1024 red, then 1024 green, then 1024 blue values.
    return data.reshape(-1, 3, 32, 32), labels


def _cifar_files(folder: Path, name: str) -> tuple[list[Path], Path] | None:
    """(train files, test file) found in ``folder``, or None if it holds no batch file at all."""
    if name == "cifar10":
        train = [p for p in folder.glob("data_batch_*") if re.fullmatch(r"data_batch_\d+", p.name)]
        train.sort(key=lambda p: int(p.name.rsplit("_", 1)[1]))
        test = folder / "test_batch"
    else:
        train = [folder / "train"] if (folder / "train").is_file() else []
        test = folder / "test"
    if not train and not test.is_file():
        return None
    return train, test


def _safe_extract(archive: Path, dest: Path) -> None:
    """Extract a .tar.gz, refusing members that could land outside ``dest`` or are not plain files."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for m in members:
                parts = PurePosixPath(m.name).parts
                if m.name.startswith(("/", "\\")) or ".." in parts or not (m.isfile() or m.isdir()):
                    raise TRPError(f"refusing to extract {archive}: unsafe member {m.name!r}")
            # The 'data' filter (Python 3.12, backported to 3.11.4+) re-checks the same at extraction.
            kwargs: dict[str, Any] = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(dest, members=members, **kwargs)
    except TRPError:
        raise
    except (tarfile.TarError, EOFError, OSError) as err:
        raise TRPError(f"could not extract {archive}: {err}") from None


def _download(url: str, target: Path) -> None:
    """Fetch ``url`` into ``target`` via a ``.part`` file, so an interrupted download leaves no archive."""
    part = target.with_name(target.name + ".part")
    print(f"trp: downloading {url} to {target}", file=sys.stderr, flush=True)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
    except (OSError, http.client.HTTPException, ValueError) as err:  # URLError and timeouts are OSErrors
        part.unlink(missing_ok=True)
        reason = getattr(err, "reason", None) or err
        raise TRPError(f"could not download {url}: {reason}") from None
    part.replace(target)


def load_cifar(data_dir: str | os.PathLike[str], name: str = "cifar10", download: bool = False) -> TensorData:
    """Load CIFAR-10 or CIFAR-100 from the standard python batch files.

    Args:
        data_dir: The ``cifar-10-batches-py`` / ``cifar-100-python`` folder itself, or its parent.
        name: "cifar10" (``data_batch_*`` + ``test_batch``; any number of training batches, at least
            one) or "cifar100" (``train`` + ``test``, fine labels).
        download: If no batch files are found, download and extract the official archive into
            ``data_dir``. Nothing is ever downloaded otherwise.

    Returns:
        A :class:`TensorData` with ``[N, 3, 32, 32]`` images; augmentation pads by 4 and flips.

    Raises:
        TRPError: Missing folder, no batch files, a file that is not a CIFAR batch (wrong format,
            truncated, or a pickle naming anything but numpy arrays), or a failed download.

    Example:
        >>> data = load_cifar("../shared/data/cifar10-mini")  # doctest: +SKIP
        >>> data.num_train, data.num_test, data.input_shape  # doctest: +SKIP
        (4085, 1000, (3, 32, 32))
    """
    if name not in _CIFAR:
        raise TRPError(f"unknown CIFAR variant {name!r}; choose from {', '.join(_CIFAR)}")
    spec = _CIFAR[name]
    root = Path(data_dir).expanduser()
    if root.exists() and not root.is_dir():
        raise TRPError(f"data folder {root} is not a folder")

    def find() -> tuple[list[Path], Path] | None:
        for folder in (root, root / spec.folder):
            found = _cifar_files(folder, name) if folder.is_dir() else None
            if found is not None:
                return found
        return None

    found = find()
    if found is None and download:
        root.mkdir(parents=True, exist_ok=True)
        archive = root / spec.url.rsplit("/", 1)[1]
        if not archive.is_file():  # a finished earlier download is reused
            _download(spec.url, archive)
        _safe_extract(archive, root)
        found = find()
    if found is None:
        if not root.exists():
            raise TRPError(f"data folder {root} does not exist (use --download to fetch {spec.title})")
        expected = "data_batch_1..5 and test_batch" if name == "cifar10" else "train and test"
        raise TRPError(f"no {spec.title} batch files in {root}: expected {expected} there or in {root / spec.folder}")

    train_files, test_file = found
    if not train_files:
        raise TRPError(f"no {spec.title} training batch files next to {test_file}")
    if not test_file.is_file():
        raise TRPError(f"missing {spec.title} test batch file {test_file}")
    train = [_read_batch(p, spec.labels_key, spec.num_classes) for p in train_files]
    x_test, y_test = _read_batch(test_file, spec.labels_key, spec.num_classes)
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    if len(x_train) == 0:
        raise TRPError(f"{spec.title} training files in {test_file.parent} hold no images")
    return _tensor_data(name, x_train, y_train, x_test, y_test, spec.num_classes, pad=4, flip=True)


# ------------------------------------------------------------------------------------- image folders


class _FolderView(torch.utils.data.Dataset):
    """One scanned ImageFolder seen through a transform; train and eval views share a single scan."""

    def __init__(self, base: Any, transform: Callable[[Any], torch.Tensor]) -> None:
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[i]
        return self.transform(image), label


class FolderData:
    """An ImageNet-style folder dataset, decoded and augmented by DataLoader workers.

    Offers the :class:`Data` interface. Training images get RandomResizedCrop and a horizontal flip,
    test images Resize(size * 256 / 224) and CenterCrop; both are normalized with ImageNet statistics.
    Shuffling and sharding follow :class:`TensorData`. Worker RNGs are seeded from ``(seed, epoch,
    rank)``, so augmentation is reproducible when ``num_workers > 0``; with ``num_workers=0`` the
    transforms draw from the global torch RNG.

    Example:
        >>> data = load_image_folder("/data/imagenet", image_size=224)  # doctest: +SKIP
        >>> data.input_shape  # doctest: +SKIP
        (3, 224, 224)
    """

    def __init__(
        self,
        train_set: Any,
        test_set: Any,
        image_size: int,
        train_transform: Callable[[Any], torch.Tensor],
        test_transform: Callable[[Any], torch.Tensor],
        num_workers: int,
        name: str = "imagenet",
    ) -> None:
        self.name = name
        self.num_classes = len(train_set.classes)
        self.classes: list[str] = list(train_set.classes)
        self.image_size = image_size
        self.mean = IMAGENET_MEAN
        self.std = IMAGENET_STD
        self.num_workers = num_workers
        self.device = torch.device("cpu")
        self._train_aug = _FolderView(train_set, train_transform)
        self._train_plain = _FolderView(train_set, test_transform)
        self._test = _FolderView(test_set, test_transform)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(3, image_size, image_size)."""
        return (3, self.image_size, self.image_size)

    @property
    def num_train(self) -> int:
        """Number of training images."""
        return len(self._train_aug)

    @property
    def num_test(self) -> int:
        """Number of validation images."""
        return len(self._test)

    def to(self, device: torch.device | str) -> FolderData:
        """Return a view delivering batches on ``device`` (images are decoded on CPU, then moved).

        Example:
            >>> data.to("cuda").device.type  # doctest: +SKIP
            'cuda'
        """
        other = copy.copy(self)
        other.device = torch.device(device)
        return other

    def num_train_batches(self, batch_size: int, world_size: int = 1) -> int:
        """Number of batches :meth:`train_batches` yields on each rank.

        Example:
            >>> data.num_train_batches(256, world_size=8)  # doctest: +SKIP
            626
        """
        _check_batch_size(batch_size)
        return math.ceil((self.num_train // world_size) / batch_size)

    def _loader(
        self, dataset: _FolderView, batches: Sequence[list[int]], seed: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        pin = self.device.type == "cuda"
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=batches,
            num_workers=self.num_workers,
            pin_memory=pin,
            # Seeds the workers' RNGs, which drive the random crops and flips.
            generator=torch.Generator().manual_seed(seed),
        )
        for x, y in loader:
            yield x.to(self.device, non_blocking=pin), y.to(self.device, non_blocking=pin)

    def train_batches(
        self, batch_size: int, epoch: int, seed: int, augment: bool = True, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield this rank's shuffled, normalized training batches (see :meth:`TensorData.train_batches`).

        Example:
            >>> x, y = next(data.train_batches(64, epoch=0, seed=0))  # doctest: +SKIP
        """
        _check_batch_size(batch_size)
        _check_shard(rank, world_size)
        index, _ = _train_shard(self.num_train, _epoch_generator(seed, epoch), rank, world_size)
        batches = [chunk.tolist() for chunk in _chunks(index, batch_size)]
        dataset = self._train_aug if augment else self._train_plain
        yield from self._loader(dataset, batches, (seed * _SEED_STRIDE + epoch) * 1009 + rank)

    def test_batches(
        self, batch_size: int, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield this rank's share (``idx[rank::world_size]``) of the validation images, in order.

        Example:
            >>> x, y = next(data.test_batches(64))  # doctest: +SKIP
        """
        _check_batch_size(batch_size)
        _check_shard(rank, world_size)
        index = torch.arange(rank, self.num_test, world_size)
        batches = [chunk.tolist() for chunk in _chunks(index, batch_size)]
        yield from self._loader(self._test, batches, rank)


def load_image_folder(
    data_dir: str | os.PathLike[str], image_size: int = 224, num_workers: int | None = None
) -> FolderData:
    """Load an ImageNet-style folder: ``train/<class>/*.jpg`` and ``val/<class>/*.jpg``.

    Args:
        data_dir: Folder holding ``train/`` and ``val/``, each with one sub-folder per class.
        image_size: Side of the square training and evaluation crops.
        num_workers: DataLoader worker processes; default ``min(4, os.cpu_count())``.

    Returns:
        A :class:`FolderData` named "imagenet".

    Raises:
        TRPError: Missing folder, missing ``train/`` or ``val/``, no images, different classes in the
            two splits, or torchvision not installed.

    Example:
        >>> data = load_image_folder("/data/imagenet", image_size=224)  # doctest: +SKIP
        >>> data.num_classes  # doctest: +SKIP
        1000
    """
    # Imported here: torchvision is an optional dependency and slow to import.
    try:
        from torchvision import datasets, transforms
    except ImportError as err:
        raise TRPError(f"image folders need torchvision (pip install 'trp[vision]'): {err}") from None
    if image_size < 1:
        raise TRPError(f"image size must be at least 1, got {image_size}")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise TRPError(f"data folder {root} does not exist")
    splits = {}
    for split in ("train", "val"):
        folder = root / split
        if not folder.is_dir():
            raise TRPError(f"image folder {root} has no {split}/ sub-folder (expected {split}/<class>/<images>)")
        try:
            splits[split] = datasets.ImageFolder(str(folder))
        except (FileNotFoundError, OSError) as err:
            raise TRPError(f"image folder {folder} has no images: {err}") from None
    if splits["train"].classes != splits["val"].classes:
        raise TRPError(f"image folder {root}: train/ and val/ have different class folders")
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalize,
        ]
    )
    test_tf = transforms.Compose(
        [
            transforms.Resize(int(image_size * 256 / 224)),  # the usual 0.875 centre-crop ratio
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            normalize,
        ]
    )
    if num_workers is None:
        num_workers = min(4, os.cpu_count() or 1)
    return FolderData(splits["train"], splits["val"], image_size, train_tf, test_tf, num_workers)


# ------------------------------------------------------------------------------------------- dispatch


def _load_digits(data_dir: str | None, download: bool) -> Data:
    return load_digits_data()  # bundled with scikit-learn: data_dir and download do not apply


def _load_cifar10(data_dir: str | None, download: bool) -> Data:
    return load_cifar(_need_dir("cifar10", data_dir), "cifar10", download)


def _load_cifar100(data_dir: str | None, download: bool) -> Data:
    return load_cifar(_need_dir("cifar100", data_dir), "cifar100", download)


def _load_imagenet(data_dir: str | None, download: bool) -> Data:
    if download:
        raise TRPError("imagenet cannot be downloaded automatically; point --data-dir at train/ and val/")
    return load_image_folder(_need_dir("imagenet", data_dir))


def _need_dir(name: str, data_dir: str | None) -> str:
    if not data_dir:
        raise TRPError(f"dataset {name} needs --data-dir")
    return data_dir


DATASETS: dict[str, Callable[[str | None, bool], Data]] = {
    "digits": _load_digits,
    "cifar10": _load_cifar10,
    "cifar100": _load_cifar100,
    "imagenet": _load_imagenet,
}


def load(name: str, data_dir: str | None = None, download: bool = False) -> Data:
    """Load a dataset by name: "digits", "cifar10", "cifar100" or "imagenet".

    Args:
        name: Dataset name.
        data_dir: Where the files are; required for all but "digits".
        download: Fetch CIFAR archives when absent.

    Raises:
        TRPError: Unknown name, missing ``data_dir``, or any loader error.

    Example:
        >>> load("digits").name
        'digits'
        >>> try:
        ...     load("mnist")
        ... except TRPError as err:
        ...     print(err)
        unknown dataset 'mnist'; choose from digits, cifar10, cifar100, imagenet
    """
    try:
        loader = DATASETS[name]
    except KeyError:
        raise TRPError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}") from None
    return loader(data_dir, download)
