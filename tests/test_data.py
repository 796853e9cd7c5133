"""Tests of trp.data: loaders, safe CIFAR reading, batch augmentation, sharding, dispatch."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from trp import data as D
from trp.data import (
    Data,
    FolderData,
    TensorData,
    crop_and_flip,
    load,
    load_cifar,
    load_digits_data,
    load_image_folder,
)
from trp.errors import TRPError

MINI_CIFAR = Path(__file__).resolve().parents[1].parent / "shared/data/cifar10-mini/cifar-10-batches-py"


# ------------------------------------------------------------------------------------------ helpers


def _batch(n: int, num_classes: int = 10, key: str = "labels", seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        key: rng.integers(0, num_classes, size=n).tolist(),
        "batch_label": "synthetic",
    }


def _write(path: Path, obj: object, protocol: int = 2) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


def _cifar10_dir(root: Path, n_train: tuple[int, ...] = (6, 5), n_test: int = 4) -> Path:
    folder = root / "cifar-10-batches-py"
    for i, n in enumerate(n_train, start=1):
        _write(folder / f"data_batch_{i}", _batch(n, seed=i))
    _write(folder / "test_batch", _batch(n_test, seed=99))
    return folder


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


# -------------------------------------------------------------------------------------------- CIFAR


def test_real_mini_cifar_loads() -> None:
    """The shared mini CIFAR-10 subset (real official-format files) must load from the folder and its parent."""
    if not MINI_CIFAR.is_dir():
        pytest.skip(f"needs ../shared/data/cifar10-mini: {MINI_CIFAR} not found")
    for where in (MINI_CIFAR, MINI_CIFAR.parent):
        data = load_cifar(where, "cifar10")
        assert (data.num_train, data.num_test) == (4085, 1000)
        assert data.input_shape == (3, 32, 32) and data.num_classes == 10
        assert data.pad == 4 and data.flip is True
        assert int(data.y_train.max()) <= 9
    assert load("cifar10", str(MINI_CIFAR)).num_train == 4085


def test_synthetic_cifar10_parent_and_folder(tmp_path: Path) -> None:
    """Whichever data_batch_* exist are loaded, whether given the batch folder or its parent."""
    folder = _cifar10_dir(tmp_path, n_train=(6, 5, 3))
    for where in (tmp_path, folder):
        data = load_cifar(where)
        assert data.num_train == 14 and data.num_test == 4
    # Channel-major rows become [3, 32, 32]: the first 1024 values are the red plane.
    raw = _batch(6, seed=1)["data"]
    assert torch.equal(data.x_train[0, 0].flatten(), torch.from_numpy(raw[0, :1024]))


def test_cifar100_layout(tmp_path: Path) -> None:
    """CIFAR-100 reads train/test from cifar-100-python with fine_labels and 100 classes."""
    folder = tmp_path / "cifar-100-python"
    _write(folder / "train", _batch(7, 100, "fine_labels"))
    _write(folder / "test", _batch(3, 100, "fine_labels", seed=5))
    data = load("cifar100", str(tmp_path))
    assert data.name == "cifar100" and data.num_classes == 100
    assert (data.num_train, data.num_test) == (7, 3)


def test_cifar_missing_folder(tmp_path: Path) -> None:
    """A missing data folder is a one-line error naming it, and nothing is downloaded."""
    missing = tmp_path / "nope"
    with pytest.raises(TRPError, match="does not exist") as err:
        load_cifar(missing)
    assert str(missing) in str(err.value)
    assert not missing.exists()


def test_cifar_empty_folder(tmp_path: Path) -> None:
    """An empty folder reports that no batch files were found."""
    with pytest.raises(TRPError, match="no CIFAR-10 batch files"):
        load_cifar(tmp_path)


def test_cifar_missing_test_batch(tmp_path: Path) -> None:
    """Training batches without test_batch are reported, not half-loaded."""
    folder = _cifar10_dir(tmp_path)
    (folder / "test_batch").unlink()
    with pytest.raises(TRPError, match="test_batch"):
        load_cifar(folder)


def test_cifar_not_a_pickle(tmp_path: Path) -> None:
    """A file that is not a pickle at all is rejected with its path."""
    folder = _cifar10_dir(tmp_path)
    (folder / "data_batch_1").write_text("hello, this is text\n")
    with pytest.raises(TRPError, match="not a CIFAR batch file") as err:
        load_cifar(folder)
    assert "data_batch_1" in str(err.value)


@pytest.mark.parametrize(
    "obj, message",
    [
        ({"data": np.zeros((2, 3072), np.uint8)}, "missing key"),
        ({"pixels": np.zeros((2, 3072), np.uint8), "labels": [0, 1]}, "missing key"),
        ([1, 2, 3], "not a dict"),
        ({"data": np.zeros((2, 3072), np.float32), "labels": [0, 1]}, "uint8"),
        ({"data": np.zeros((2, 1024), np.uint8), "labels": [0, 1]}, "3072"),
        ({"data": np.zeros((2, 3072), np.uint8), "labels": [0]}, "2 images but 1 labels"),
        ({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}, "labels must be in"),
        ({"data": np.zeros((2, 3072), np.uint8), "labels": ["a", "b"]}, "list of integers"),
    ],
)
def test_cifar_wrong_content(tmp_path: Path, obj: object, message: str) -> None:
    """Pickles with wrong keys, dtype, shape or labels are rejected with the reason."""
    folder = _cifar10_dir(tmp_path)
    _write(folder / "data_batch_2", obj)
    with pytest.raises(TRPError, match=message):
        load_cifar(folder)


def test_cifar_truncated(tmp_path: Path) -> None:
    """Half a valid batch file is reported as truncated or damaged, naming the file."""
    folder = _cifar10_dir(tmp_path)
    path = folder / "data_batch_1"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(TRPError, match="truncated or damaged CIFAR batch file") as err:
        load_cifar(folder)
    assert str(path) in str(err.value)


def _make_marker(path: str) -> None:  # pragma: no cover - must never run
    Path(path).write_text("pwned")


class _Evil:
    def __init__(self, marker: Path, how: str) -> None:
        self.marker, self.how = marker, how

    def __reduce__(self):  # type: ignore[no-untyped-def]
        if self.how == "system":
            return (os.system, (f"touch {self.marker}",))
        return (_make_marker, (str(self.marker),))


@pytest.mark.parametrize("how", ["system", "function"])
@pytest.mark.parametrize("protocol", [2, 4])
def test_cifar_malicious_pickle_refused(tmp_path: Path, how: str, protocol: int) -> None:
    """A pickle that would run code when loaded is refused and the code never runs."""
    folder = _cifar10_dir(tmp_path / "d")
    marker = tmp_path / "marker"
    _write(folder / "data_batch_1", {"data": _Evil(marker, how), "labels": [0]}, protocol=protocol)
    with pytest.raises(TRPError, match="refuses to unpickle") as err:
        load_cifar(folder)
    assert "not a CIFAR batch file" in str(err.value)
    assert not marker.exists()


def test_cifar_numpy_scalar_labels_and_protocols(tmp_path: Path) -> None:
    """Batches rewritten with numpy label arrays or other pickle protocols still load (allow-list is enough)."""
    folder = tmp_path / "cifar-10-batches-py"
    b = _batch(5)
    b["labels"] = np.array(b["labels"], dtype=np.int64)
    _write(folder / "data_batch_1", b, protocol=0)
    b2 = _batch(4, seed=3)
    b2["labels"] = [np.int64(v) for v in b2["labels"]]  # numpy scalars pickle via multiarray.scalar
    _write(folder / "data_batch_2", b2, protocol=1)
    _write(folder / "test_batch", _batch(2), protocol=pickle.HIGHEST_PROTOCOL)
    data = load_cifar(folder)
    assert data.num_train == 9 and data.y_train.tolist()[:5] == b["labels"].tolist()


def test_download_failure_becomes_trp_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With download=True a network failure is a one-line TRPError and leaves no partial archive."""

    def fail(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(urllib.request, "urlopen", fail)
    with pytest.raises(TRPError, match="could not download .*no network in tests"):
        load_cifar(tmp_path / "c", download=True)
    assert not list((tmp_path / "c").glob("*.part"))


def test_download_extracts_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """download=True fetches the archive once, extracts it and loads; existing files are never re-fetched."""
    src = tmp_path / "src"
    _cifar10_dir(src)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    calls: list[str] = []

    def fake_urlopen(url: str, timeout: float = 0) -> io.BytesIO:
        calls.append(url)
        return io.BytesIO(buf.getvalue())

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    dest = tmp_path / "dest"
    assert load_cifar(dest, download=True).num_train == 11
    assert load_cifar(dest, download=True).num_train == 11
    assert calls == ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"]


@pytest.mark.parametrize("member", ["../evil.txt", "/tmp/evil_abs.txt", "link"])
def test_safe_extract_rejects_escaping_members(tmp_path: Path, member: str) -> None:
    """Archive members with .. or absolute paths, or links, are refused before anything is extracted."""
    archive = tmp_path / "a.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo(member)
        if member == "link":
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
        else:
            payload = b"evil"
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(TRPError, match="unsafe member"):
        D._safe_extract(archive, dest)
    assert not list(dest.iterdir()) and not (tmp_path / "evil.txt").exists()


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
    with pytest.raises(TRPError):
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


# ------------------------------------------------------------------------------------- image folder


def _image_folder(root: Path, splits: tuple[str, ...] = ("train", "val"), per_class: int = 3) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in splits:
        for cls in ("cat", "dog"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def test_image_folder_batches(tmp_path: Path) -> None:
    """An ImageNet-style folder yields normalized batches of the requested size through the DataLoader."""
    pytest.importorskip("torchvision")
    data = load_image_folder(_image_folder(tmp_path), image_size=32, num_workers=0)
    assert isinstance(data, FolderData) and isinstance(data, Data)
    assert data.name == "imagenet" and data.num_classes == 2 and data.input_shape == (3, 32, 32)
    assert (data.num_train, data.num_test) == (6, 6)
    x, y = next(data.train_batches(4, epoch=0, seed=0))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert data.num_train_batches(4) == 2 == len(list(data.train_batches(4, epoch=0, seed=0)))
    ys = [torch.cat([y for _, y in data.train_batches(2, 1, 0, rank=r, world_size=2)]) for r in range(2)]
    assert len(ys[0]) == len(ys[1]) == 3
    seen = torch.cat([y for r in range(2) for _, y in data.to("cpu").test_batches(4, rank=r, world_size=2)])
    assert sorted(seen.tolist()) == [0, 0, 0, 1, 1, 1]


def test_image_folder_errors(tmp_path: Path) -> None:
    """A folder without val/, with no images, or missing altogether is a TRPError."""
    pytest.importorskip("torchvision")
    with pytest.raises(TRPError, match="no val/"):
        load_image_folder(_image_folder(tmp_path / "a", splits=("train",)), image_size=32)
    empty = tmp_path / "b"
    (empty / "train" / "cat").mkdir(parents=True)
    (empty / "val" / "cat").mkdir(parents=True)
    with pytest.raises(TRPError, match="no images"):
        load_image_folder(empty, image_size=32)
    with pytest.raises(TRPError, match="does not exist"):
        load_image_folder(tmp_path / "missing")


# ----------------------------------------------------------------------------------------- dispatch


def test_load_dispatch_errors(tmp_path: Path) -> None:
    """load() names the choices for an unknown dataset and asks for --data-dir where one is needed."""
    with pytest.raises(TRPError, match="choose from digits, cifar10, cifar100, imagenet"):
        load("mnist")
    for name in ("cifar10", "cifar100", "imagenet"):
        with pytest.raises(TRPError, match="--data-dir"):
            load(name)
    assert load("digits").name == "digits"
    assert load("imagenet", str(_image_folder(tmp_path)), download=False).num_classes == 2
