"""Datasets by name: tensors augmented in whole batches, CIFAR pickles read safely, image folders checked.

Five modules; the last four build on the first (directly or through :mod:`trp.data.tensors`) and on
nothing else of the package:

- :mod:`trp.data.batching`: the :class:`Data` interface every dataset offers, seeded shuffles
  reproducible from ``(seed, epoch)``, sharding across ranks, batch augmentation on the device.
- :mod:`trp.data.tensors`: :class:`TensorData` (a whole dataset as ``uint8`` tensors, shuffled,
  sharded and augmented a batch at a time on its device) and scikit-learn's digits.
- :mod:`trp.data.cifar`: CIFAR-10/100 from the official batch files through a restricted unpickler
  that can only build numpy arrays, so a planted file cannot run code; optional download.
- :mod:`trp.data.split`: a seeded, class-balanced validation split held out of the training images.
- :mod:`trp.data.folders`: ImageNet-style folders through DataLoader workers, every file checked
  before training, bad files refused by name or skipped and counted.

:func:`load` picks one by name; :data:`DATASETS` is the registry behind it.

Example:
    >>> data = load("digits")
    >>> data.input_shape, data.num_classes
    ((1, 8, 8), 10)
    >>> x, y = next(data.train_batches(batch_size=32, epoch=0, seed=0))
    >>> tuple(x.shape), x.dtype, y.dtype
    ((32, 1, 8, 8), torch.float32, torch.int64)
"""

from __future__ import annotations

from collections.abc import Callable

from trp.data.batching import Data, crop_and_flip
from trp.data.cifar import load_cifar
from trp.data.folders import IMAGENET_MEAN, IMAGENET_STD, FolderData, load_image_folder
from trp.data.split import hold_out
from trp.data.tensors import TensorData, load_digits_data
from trp.errors import TRPError
from trp.validate import boolean

__all__ = [
    "DATASETS",
    "Data",
    "FolderData",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TensorData",
    "crop_and_flip",
    "hold_out",
    "load",
    "load_cifar",
    "load_digits_data",
    "load_image_folder",
]


def _load_digits(data_dir: str | None, download: bool, skip_bad_images: bool = False) -> Data:
    return load_digits_data()  # bundled with scikit-learn: data_dir, download and skipping do not apply


def _load_cifar10(data_dir: str | None, download: bool, skip_bad_images: bool = False) -> Data:
    return load_cifar(_need_dir("cifar10", data_dir), "cifar10", download)


def _load_cifar100(data_dir: str | None, download: bool, skip_bad_images: bool = False) -> Data:
    return load_cifar(_need_dir("cifar100", data_dir), "cifar100", download)


def _load_imagenet(data_dir: str | None, download: bool, skip_bad_images: bool = False) -> Data:
    if download:
        raise TRPError("imagenet cannot be downloaded automatically; point --data-dir at train/ and val/")
    return load_image_folder(_need_dir("imagenet", data_dir), skip_bad_images=skip_bad_images)


def _need_dir(name: str, data_dir: str | None) -> str:
    if not data_dir:
        raise TRPError(f"dataset {name} needs --data-dir")
    return data_dir


# name -> loader(data_dir, download, skip_bad_images); skip_bad_images applies to image folders only.
DATASETS: dict[str, Callable[..., Data]] = {
    "digits": _load_digits,
    "cifar10": _load_cifar10,
    "cifar100": _load_cifar100,
    "imagenet": _load_imagenet,
}


def load(name: str, data_dir: str | None = None, download: bool = False, skip_bad_images: bool = False) -> Data:
    """Load a dataset by name: "digits", "cifar10", "cifar100" or "imagenet".

    Args:
        name: Dataset name.
        data_dir: Where the files are; required for all but "digits".
        download: Fetch CIFAR archives when absent.
        skip_bad_images: For image folders, leave unreadable files out and count them
            (``FolderData.skipped``) instead of refusing the folder; ignored by the tensor datasets.

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
    except (KeyError, TypeError):  # TypeError: an unhashable name such as a list from a config file
        raise TRPError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}") from None
    return loader(data_dir, boolean(download, "download"), boolean(skip_bad_images, "skip_bad_images"))
