"""A validation split carved from the training images: seeded, class-balanced, the same on every rank.

Choices made while training (λ, budgets, epochs) must not be made on the test images that report the
result. :func:`hold_out` moves a fraction of each class's training images into a validation split
(``x_val`` / ``y_val`` of :class:`~trp.data.tensors.TensorData`, read by ``val_batches``); the test
images stay untouched for one evaluation at the end.

The draw depends only on ``(labels, fraction, seed)`` (numpy's ``SeedSequence`` on ``[seed,
STREAM]``, a stream apart from the per-epoch shuffles), so every process of a distributed run and
every resume of a run holds out the same images. The normalization statistics are recomputed from
the images that remain for training: nothing of the validation images leaks into training.

Example:
    >>> from trp.data.tensors import load_digits_data
    >>> data = hold_out(load_digits_data(), 0.1, seed=0)
    >>> data.num_train, data.num_val, data.num_test
    (1295, 142, 360)
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from trp.data.batching import channel_stats
from trp.data.tensors import TensorData
from trp.errors import TRPError
from trp.validate import number, whole

__all__ = ["STREAM", "balanced_indices", "hold_out"]

#: The second word of the split's seed sequence: keeps it apart from every other seeded draw.
STREAM = 0x5A11


def balanced_indices(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training, validation) indices: ``round(fraction · n_c)`` random images of each class ``c`` held out.

    Each class is shuffled with the one seeded generator, in label order, so the draw is the same on
    every machine; both index lists come back sorted.

    Example:
        >>> train, val = balanced_indices(torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), 0.5, seed=3)
        >>> len(train), len(val), sorted(torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])[val].tolist())
        (4, 4, [0, 0, 1, 1])
    """
    fraction = number(fraction, "val-split", low=0.0, low_open=True)
    if fraction >= 1:
        raise TRPError(f"val-split must be a fraction in (0, 1), got {fraction:g}")
    seed = whole(seed, "seed", low=0)
    rng = np.random.default_rng([seed, STREAM])
    y = labels.cpu().numpy()
    held: list[np.ndarray] = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        held.append(rng.permutation(members)[: int(round(fraction * len(members)))])
    val = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    keep = np.ones(len(y), dtype=bool)
    keep[val] = False
    return torch.from_numpy(np.flatnonzero(keep)), torch.from_numpy(val.astype(np.int64))


def hold_out(data: TensorData, fraction: float, seed: int) -> TensorData:
    """``data`` with a class-balanced ``fraction`` of its training images moved to a validation split.

    Raises:
        TRPError: A fraction outside (0, 1), a split that leaves no validation or no training image,
            or data that already has a validation split.

    Example:
        >>> from trp.data.tensors import load_digits_data
        >>> a, b = (hold_out(load_digits_data(), 0.2, seed=1) for _ in range(2))
        >>> bool(torch.equal(a.y_val, b.y_val)), a.num_val
        (True, 287)
    """
    if not isinstance(data, TensorData):
        raise TRPError(f"--val-split needs a dataset held as tensors (digits, cifar10, cifar100), not {data.name}")
    if data.x_val is not None:
        raise TRPError(f"{data.name} already has a validation split")
    train, val = balanced_indices(data.y_train, fraction, seed)
    if len(val) == 0 or len(train) == 0:
        raise TRPError(f"val-split {fraction:g} of {data.num_train} training images leaves "
                       f"{len(val)} for validation and {len(train)} for training; choose another fraction")
    x_train = data.x_train[train.to(data.device)]
    mean, std = channel_stats(x_train)
    return dataclasses.replace(data, x_train=x_train, y_train=data.y_train[train.to(data.device)],
                               x_val=data.x_train[val.to(data.device)],
                               y_val=data.y_train[val.to(data.device)], mean=mean, std=std)
