"""Tests of trp.data.tensors: digits, batch augmentation, sharding, validation of batching arguments."""

from __future__ import annotations

import pytest
import torch

from trp.data import Data, TensorData, crop_and_flip, load_digits_data
from trp.data.batching import check_batching, num_batches
from trp.errors import TRPError

def _labelled(n: int, pad: int = 4, flip: bool = True, size: int = 8) -> TensorData:
    """Each image is filled with its label value, so a label can be checked against its image."""
    y = torch.arange(n, dtype=torch.int64) % 200
    x = (y + 10).to(torch.uint8).view(n, 1, 1, 1).expand(n, 1, size, size).contiguous()
    return TensorData("toy", x, y, x.clone(), y.clone(), 200, (0.0,), (1.0,), pad=pad, flip=flip)


def _gradient_data(n: int = 16, pad: int = 2, flip: bool = True) -> TensorData:
    """Asymmetric images (a ramp along the width) so crops and flips change pixel values."""
    ramp = torch.arange(8, dtype=torch.uint8).view(1, 1, 1, 8) * 20 + 10
    x = (ramp + torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1)).expand(n, 1, 8, 8).contiguous()
    y = torch.arange(n, dtype=torch.int64)
    return TensorData("toy", x, y, x.clone(), y.clone(), n, (0.0,), (1.0,), pad=pad, flip=flip)


def _all_batches(data: TensorData, **kw: object) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*data.train_batches(**kw))
    return torch.cat(xs), torch.cat(ys)


# ------------------------------------------------------------------------------------------- digits


def test_digits_loads() -> None:
    """The bundled digits set is the test workhorse: its shapes, dtype, split and determinism must hold."""
    a = load_digits_data()
    assert isinstance(a, Data)
    assert a.name == "digits" and a.num_classes == 10 and a.input_shape == (1, 8, 8)
    assert a.x_train.shape == (1437, 1, 8, 8) and a.x_test.shape == (360, 1, 8, 8)
    assert a.x_train.dtype == torch.uint8 and a.y_train.dtype == torch.int64
    assert int(a.x_train.max()) == 240 and int(a.x_train.min()) == 0
    assert a.pad == 1 and a.flip is False
    assert sorted(a.y_test.unique().tolist()) == list(range(10))
    b = load_digits_data()
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.y_train, load_digits_data(seed=1).y_train)
    x, y = next(a.test_batches(64))
    assert x.dtype == torch.float32 and x.shape == (64, 1, 8, 8)
    # Normalized with the training statistics: roughly zero mean, unit spread.
    xs = torch.cat([x for x, _ in a.train_batches(512, epoch=0, seed=0, augment=False)])
    assert abs(float(xs.mean())) < 1e-4 and abs(float(xs.std()) - 1) < 1e-2


# ------------------------------------------------------------------------------------- augmentation


def test_augmentation_deterministic_per_seed_and_epoch() -> None:
    """Same seed and epoch give identical batches (resumable runs); another epoch or seed reshuffles."""
    data = _gradient_data(32)
    x1, y1 = _all_batches(data, batch_size=5, epoch=2, seed=7)
    torch.manual_seed(123)  # the global RNG must not matter
    x2, y2 = _all_batches(data, batch_size=5, epoch=2, seed=7)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x3, y3 = _all_batches(data, batch_size=5, epoch=3, seed=7)
    assert not torch.equal(y1, y3) and not torch.equal(x1, x3)
    _, y4 = _all_batches(data, batch_size=5, epoch=2, seed=8)
    assert not torch.equal(y1, y4)
    # Batch size does not change which augmentation a sample gets.
    x5, y5 = _all_batches(data, batch_size=32, epoch=2, seed=7)
    assert torch.equal(x1, x5) and torch.equal(y1, y5)
    assert sorted(y1.tolist()) == list(range(32))


def test_crop_shape_and_identity() -> None:
    """Crops keep the shape; an offset equal to pad is the identity; other offsets shift in zeros."""
    x = torch.randn(3, 2, 6, 5)
    pad = 3
    dy = torch.tensor([pad, 0, 2 * pad])
    dx = torch.tensor([pad, 2 * pad, 1])
    out = crop_and_flip(x, pad, dy, dx)
    assert out.shape == x.shape
    assert torch.equal(out[0], x[0])
    # Sample 1 moved down by 3 and left by 3: content shifts, top rows become zero padding.
    assert torch.equal(out[1, :, :pad], torch.zeros(2, pad, 5))
    assert torch.equal(out[1, :, pad:, : 5 - pad], x[1, :, : 6 - pad, pad:])
    flipped = crop_and_flip(x, pad, dy, dx, torch.tensor([True, False, False]))
    assert torch.equal(flipped[0], x[0].flip(-1))
    assert torch.equal(flipped[1:], out[1:])


def test_augmented_batches_shape_and_change() -> None:
    """Augmented batches keep the image shape and actually differ from unaugmented ones."""
    data = _gradient_data(32)
    xa, ya = _all_batches(data, batch_size=8, epoch=0, seed=0)
    xp, yp = _all_batches(data, batch_size=8, epoch=0, seed=0, augment=False)
    assert xa.shape == xp.shape == (32, 1, 8, 8)
    assert torch.equal(ya, yp)
    assert not torch.equal(xa, xp)


def test_flip_false_never_flips() -> None:
    """With flip=False (digits) no image is ever mirrored, whatever the seed."""
    data = _gradient_data(64, pad=0, flip=False)
    for epoch in range(3):
        x, _ = _all_batches(data, batch_size=16, epoch=epoch, seed=epoch)
        # The ramp increases left to right in every row of every image.
        assert bool((x[..., 1:] > x[..., :-1]).all())
    flipping = _gradient_data(64, pad=0, flip=True)
    x, _ = _all_batches(flipping, batch_size=16, epoch=0, seed=0)
    mirrored = (x[..., 1:] < x[..., :-1]).all(dim=-1).all(dim=-1).squeeze(1)
    assert 0 < int(mirrored.sum()) < 64  # about half are flipped


def test_labels_follow_images() -> None:
    """After shuffling, cropping and flipping, each label still matches its own image."""
    data = _labelled(150, pad=2, flip=True)
    for x, y in data.train_batches(batch_size=16, epoch=1, seed=3):
        centre = x[:, 0, 4, 4] * 255  # never padding: the shift is at most 2 pixels
        assert torch.allclose(centre, (y + 10).float(), atol=1e-3)
    for x, y in data.test_batches(batch_size=16):
        assert torch.allclose(x[:, 0, 0, 0] * 255, (y + 10).float(), atol=1e-3)


# ----------------------------------------------------------------------------------------- sharding


def test_train_sharding_disjoint_equal() -> None:
    """Two ranks get disjoint, equal-size shards of one permutation, and the same number of batches."""
    data = _labelled(101, pad=1)
    per_rank = []
    for rank in range(2):
        batches = list(data.train_batches(batch_size=8, epoch=4, seed=2, rank=rank, world_size=2))
        assert len(batches) == data.num_train_batches(8, world_size=2)
        per_rank.append(torch.cat([y for _, y in batches]))
    a, b = per_rank
    assert len(a) == len(b) == 50
    assert not set(a.tolist()) & set(b.tolist())
    # Together they are the single-process permutation minus its last (odd) element, interleaved.
    _, full = _all_batches(data, batch_size=200, epoch=4, seed=2, augment=False)
    assert torch.equal(torch.stack([a, b], 1).flatten(), full[:100])
    with pytest.raises(TRPError, match=r"^rank must be <= 1, got 2$"):
        next(data.train_batches(8, 0, 0, rank=2, world_size=2))


def test_test_sharding_covers_each_sample_once() -> None:
    """Test shards cover every test sample exactly once, so gathered counts are exact."""
    data = _labelled(103)
    for world in (1, 2, 3):
        seen = torch.cat([y for r in range(world) for _, y in data.test_batches(10, rank=r, world_size=world)])
        assert sorted(seen.tolist()) == data.y_test.tolist()


def test_to_device_keeps_batches() -> None:
    """to() moves tensors once and gives the same batches (CPU here; same code path on GPU)."""
    data = _gradient_data(16)
    moved = data.to("cpu")
    assert moved.device.type == "cpu" and moved.mean == data.mean
    assert torch.equal(_all_batches(data, batch_size=4, epoch=0, seed=0)[0],
                       _all_batches(moved, batch_size=4, epoch=0, seed=0)[0])



def test_batching_arguments_are_validated() -> None:
    """Batch size, rank and world size go through trp.validate: whole numbers in range, never booleans."""
    data = _labelled(10)
    with pytest.raises(TRPError, match="batch size must be >= 1, got 0"):
        next(data.train_batches(0, 0, 0))
    with pytest.raises(TRPError, match="batch size must be a whole number, got 2.5"):
        next(data.test_batches(2.5))  # type: ignore[arg-type]
    with pytest.raises(TRPError, match="world size must be >= 1, got 0"):
        data.num_train_batches(4, world_size=0)
    with pytest.raises(TRPError, match="rank must be >= 0, got -1"):
        next(data.test_batches(4, rank=-1, world_size=2))
    with pytest.raises(TRPError, match="batch size must be a whole number, got True"):
        check_batching(True)  # type: ignore[arg-type]
    assert check_batching("8", 1, 2) == (8, 1, 2)  # type: ignore[arg-type]
    assert num_batches(101, 8, world_size=2) == 7  # 50 samples per rank, the last batch partial
    assert data.num_train_batches(8) == 2


def test_digits_split_arguments_are_validated() -> None:
    """The digits split refuses fractions outside (0, 1) and seeds scikit-learn cannot take, in one line."""
    for bad in (0, 1, 1.5, float("nan"), True):
        with pytest.raises(TRPError, match="test fraction"):
            load_digits_data(test_fraction=bad)
    with pytest.raises(TRPError, match="seed must be <= "):
        load_digits_data(seed=2**32)
