"""ImageNet-style image folders: checked before training, decoded and augmented by DataLoader workers.

``train/<class>/*.jpg`` and ``val/<class>/*.jpg`` are too large for memory; :class:`FolderData` gives
them the :class:`~trp.data.batching.Data` interface through a :class:`torch.utils.data.DataLoader`,
with the shuffling and sharding of :mod:`trp.data.batching`.

A bad file must not stop a run mid-epoch with a worker traceback. Before anything trains,
:func:`load_image_folder` checks every file of both splits (:func:`check_image`: the header, PIL's
``verify()``, and for a JPEG whether it ends where the data ends) and either refuses the folder with a
one-line :class:`~trp.errors.TRPError` naming the first bad file, or, with ``skip_bad_images=True``,
leaves the bad files out and counts them (:attr:`FolderData.skipped`). A file that still fails while
a worker decodes it (changed on disk, or damaged where the check cannot see) is reported the same
way: the worker hands back the file's name and the reason instead of raising, so the user gets one
line naming the file, or, when skipping, the sample is dropped from its batch and counted.

Example:
    >>> data = load_image_folder("/data/imagenet", image_size=224)  # doctest: +SKIP
    >>> data.input_shape, data.skipped  # doctest: +SKIP
    ((3, 224, 224), 0)
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import default_collate

from trp.data.batching import SEED_STRIDE, check_batching, chunks, epoch_generator, num_batches, train_shard
from trp.errors import TRPError
from trp.validate import boolean, whole

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "FolderData", "check_image", "check_images", "load_image_folder"]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Above this many files the check (a few minutes for ImageNet) announces itself, so the wait is explained.
_ANNOUNCE_CHECK = 10_000
# Files per task of the checking thread pool: few enough futures for 1.3 M files, enough tasks to share.
_CHECK_CHUNK = 256


def _reason(err: BaseException) -> str:
    """One line for an exception: its type and the first line of its message."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def _unreadable(path: str, reason: str, more: int = 0) -> TRPError:
    also = f" (and {more} more)" if more else ""
    return TRPError(f"unreadable image {path}: {reason}{also}; --skip-bad-images skips such files")


def _ends_with_eoi(path: str | os.PathLike[str]) -> bool:
    with open(path, "rb") as f:
        f.seek(-2, os.SEEK_END)
        return f.read(2) == b"\xff\xd9"  # JPEG's End Of Image marker


def check_image(path: str | os.PathLike[str]) -> str | None:
    """A cheap check of one image file: None if it looks readable, else a one-line reason.

    Opens the header and runs PIL's ``verify()`` (which, for PNG, walks every chunk and its CRC). A
    JPEG cut short passes both, so a JPEG must also end with its End Of Image marker; one that does
    not (cut short, or followed by trailing bytes) is decoded at 1/8 scale to tell the two apart,
    which is rare and still far cheaper than a full decode.

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = Path(tmp) / "a.jpg"
        ...     Image.new("RGB", (16, 16)).save(path)
        ...     ok = check_image(path)
        ...     _ = path.write_bytes(path.read_bytes()[:-60])
        ...     print(ok, check_image(path))
        None OSError: Truncated File Read
    """
    from PIL import Image  # with torchvision, an optional dependency

    try:
        with Image.open(path) as img:
            fmt = img.format
            img.verify()
        if fmt == "JPEG" and not _ends_with_eoi(path):
            with Image.open(path) as img:
                img.draft(img.mode, (1, 1))
                img.load()
    except Exception as err:  # a damaged file can fail in any part of a decoder
        return _reason(err)
    return None


def check_images(paths: Sequence[str], threads: int | None = None) -> list[tuple[str, str]]:
    """Check many files with :func:`check_image` on a thread pool; return ``(path, reason)`` of the bad ones.

    The result keeps the order of ``paths``. Threads overlap the file reads, which dominate on a
    network file system.

    Example:
        >>> check_images([])
        []
    """

    def check_chunk(chunk: Sequence[str]) -> list[tuple[str, str]]:
        return [(p, reason) for p in chunk if (reason := check_image(p)) is not None]

    groups = [paths[i : i + _CHECK_CHUNK] for i in range(0, len(paths), _CHECK_CHUNK)]
    with ThreadPoolExecutor(threads) as pool:
        return [bad for found in pool.map(check_chunk, groups) for bad in found]


@dataclass(frozen=True)
class _BadImage:
    """What a worker hands back instead of raising: an exception would reach the user as a traceback."""

    path: str
    reason: str


class _FolderView(torch.utils.data.Dataset):
    """One scanned ImageFolder seen through a transform; train and eval views share a single scan."""

    def __init__(self, base: Any, transform: Callable[[Any], torch.Tensor]) -> None:
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | _BadImage:
        try:
            image, label = self.base[i]
            return self.transform(image), label
        except Exception as err:  # decoding a damaged file can fail anywhere
            return _BadImage(str(self.base.samples[i][0]), _reason(err))


def _collate(items: list[Any]) -> tuple[Any, list[_BadImage]]:
    """Collate the good samples of a batch and pass the bad ones on by name (None if none is good)."""
    bad = [item for item in items if isinstance(item, _BadImage)]
    good = [item for item in items if not isinstance(item, _BadImage)]
    return (default_collate(good) if good else None), bad


class FolderData:
    """An ImageNet-style folder dataset, decoded and augmented by DataLoader workers.

    Offers the :class:`~trp.data.batching.Data` interface. Training images get RandomResizedCrop and a
    horizontal flip, test images Resize(size * 256 / 224) and CenterCrop; both are normalized with
    ImageNet statistics. Shuffling and sharding follow :class:`~trp.data.tensors.TensorData`. Worker
    RNGs are seeded from ``(seed, epoch, rank)``, so augmentation is reproducible when
    ``num_workers > 0``; with ``num_workers=0`` the transforms draw from the global torch RNG.

    Attributes:
        skip_bad_images: Drop (and count) a file that fails to decode instead of stopping.
        skipped_files: Paths left out as unreadable, by the check before training and while decoding.

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
        *,
        skip_bad_images: bool = False,
        skipped_files: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.num_classes = len(train_set.classes)
        self.classes: list[str] = list(train_set.classes)
        self.image_size = image_size
        self.mean = IMAGENET_MEAN
        self.std = IMAGENET_STD
        self.num_workers = num_workers
        self.device = torch.device("cpu")
        self.skip_bad_images = skip_bad_images
        # One list shared by every copy from to(), so files skipped while decoding count everywhere.
        self.skipped_files: list[str] = list(skipped_files)
        self._train_aug = _FolderView(train_set, train_transform)
        self._train_plain = _FolderView(train_set, test_transform)
        self._test = _FolderView(test_set, test_transform)

    @property
    def skipped(self) -> int:
        """Number of unreadable files left out so far."""
        return len(self.skipped_files)

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
        return num_batches(self.num_train, batch_size, world_size)

    def _bad_samples(self, bad: list[_BadImage]) -> None:
        if not self.skip_bad_images:
            raise _unreadable(bad[0].path, bad[0].reason, len(bad) - 1)
        for item in bad:
            self.skipped_files.append(item.path)
            print(f"trp: skipped unreadable image {item.path}: {item.reason}", file=sys.stderr, flush=True)

    def _loader(
        self, dataset: _FolderView, batches: Sequence[list[int]], seed: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        pin = self.device.type == "cuda"
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=batches,
            num_workers=self.num_workers,
            collate_fn=_collate,
            pin_memory=pin,
            # Seeds the workers' RNGs, which drive the random crops and flips.
            generator=torch.Generator().manual_seed(seed),
        )
        for batch, bad in loader:
            if bad:
                self._bad_samples(bad)
            if batch is None:
                # An empty batch would leave this rank a step short of the others in distributed runs.
                raise TRPError(f"every image of a batch is unreadable, e.g. {bad[0].path}: {bad[0].reason}")
            x, y = batch
            yield x.to(self.device, non_blocking=pin), y.to(self.device, non_blocking=pin)

    def train_batches(
        self, batch_size: int, epoch: int, seed: int, augment: bool = True, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield this rank's shuffled, normalized training batches (see ``TensorData.train_batches``).

        Example:
            >>> x, y = next(data.train_batches(64, epoch=0, seed=0))  # doctest: +SKIP
        """
        batch_size, rank, world_size = check_batching(batch_size, rank, world_size)
        index, _ = train_shard(self.num_train, epoch_generator(seed, epoch), rank, world_size)
        batches = [chunk.tolist() for chunk in chunks(index, batch_size)]
        dataset = self._train_aug if augment else self._train_plain
        yield from self._loader(dataset, batches, (seed * SEED_STRIDE + epoch) * 1009 + rank)

    def test_batches(
        self, batch_size: int, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield this rank's share (``idx[rank::world_size]``) of the validation images, in order.

        Example:
            >>> x, y = next(data.test_batches(64))  # doctest: +SKIP
        """
        batch_size, rank, world_size = check_batching(batch_size, rank, world_size)
        index = torch.arange(rank, self.num_test, world_size)
        batches = [chunk.tolist() for chunk in chunks(index, batch_size)]
        yield from self._loader(self._test, batches, rank)


def _scan(root: Path, split: str, datasets: Any) -> Any:
    folder = root / split
    if not folder.is_dir():
        raise TRPError(f"image folder {root} has no {split}/ sub-folder (expected {split}/<class>/<images>)")
    try:
        return datasets.ImageFolder(str(folder))
    except (FileNotFoundError, OSError) as err:
        raise TRPError(f"image folder {folder} has no images: {err}") from None


def _drop_bad(root: Path, splits: dict[str, Any], skip: bool) -> list[tuple[str, str]]:
    """Check every file of every split; refuse the folder, or leave the bad files out and report them."""
    paths = [path for ds in splits.values() for path, _ in ds.samples]
    if len(paths) > _ANNOUNCE_CHECK:
        print(f"trp: checking {len(paths)} images in {root}", file=sys.stderr, flush=True)
    bad = check_images(paths)
    if not bad:
        return []
    if not skip:
        raise _unreadable(*bad[0], more=len(bad) - 1)
    names = {path for path, _ in bad}
    for split, ds in splits.items():
        kept = [(path, label) for path, label in ds.samples if path not in names]
        if not kept:
            raise TRPError(f"image folder {root / split} has no readable images")
        ds.samples = ds.imgs = kept
        ds.targets = [label for _, label in kept]
    print(f"trp: skipped {len(bad)} unreadable image(s) in {root}, first {bad[0][0]}: {bad[0][1]}", file=sys.stderr)
    return bad


def load_image_folder(
    data_dir: str | os.PathLike[str],
    image_size: int = 224,
    num_workers: int | None = None,
    skip_bad_images: bool = False,
) -> FolderData:
    """Load an ImageNet-style folder: ``train/<class>/*.jpg`` and ``val/<class>/*.jpg``.

    Every file of both splits is checked (:func:`check_image`) before this returns, so a bad image is
    found before the first epoch, not in the middle of one.

    Args:
        data_dir: Folder holding ``train/`` and ``val/``, each with one sub-folder per class.
        image_size: Side of the square training and evaluation crops.
        num_workers: DataLoader worker processes; default ``min(4, os.cpu_count())``.
        skip_bad_images: Leave unreadable files out (counted in ``skipped``, reported on stderr) instead
            of refusing the folder.

    Returns:
        A :class:`FolderData` named "imagenet".

    Raises:
        TRPError: Missing folder, missing ``train/`` or ``val/``, no images, different classes in the
            two splits, an unreadable image (naming it) unless skipped, or torchvision not installed.

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
    image_size = whole(image_size, "image size", low=1)
    num_workers = min(4, os.cpu_count() or 1) if num_workers is None else whole(num_workers, "num_workers", low=0)
    skip_bad_images = boolean(skip_bad_images, "skip_bad_images")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise TRPError(f"data folder {root} does not exist")
    splits = {split: _scan(root, split, datasets) for split in ("train", "val")}
    if splits["train"].classes != splits["val"].classes:
        raise TRPError(f"image folder {root}: train/ and val/ have different class folders")
    bad = _drop_bad(root, splits, skip_bad_images)
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = transforms.Compose(
        [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize]
    )
    test_tf = transforms.Compose(
        [
            transforms.Resize(int(image_size * 256 / 224)),  # the usual 0.875 centre-crop ratio
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            normalize,
        ]
    )
    return FolderData(
        splits["train"],
        splits["val"],
        image_size,
        train_tf,
        test_tf,
        num_workers,
        skip_bad_images=skip_bad_images,
        skipped_files=[path for path, _ in bad],
    )
