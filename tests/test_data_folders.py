"""Tests of trp.data.folders and dispatch: image folders, the check of every file, skipping bad images."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from trp.data import Data, FolderData, load, load_image_folder
from trp.data.folders import check_image, check_images
from trp.errors import TRPError

# ------------------------------------------------------------------------------------- image folder


def _image_folder(
    root: Path, splits: tuple[str, ...] = ("train", "val"), per_class: int = 3, ext: str = "png"
) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in splits:
        for cls in ("cat", "dog"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.{ext}")
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


# --------------------------------------------------------------------- issue 15 item 4: bad image files


def _damage(path: Path, how: str) -> Path:
    raw = path.read_bytes()
    if how == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif how == "text":
        path.write_text("not an image\n")
    else:  # empty
        path.write_bytes(b"")
    return path


def _one_line_error(call: object, match: str) -> str:
    with pytest.raises(TRPError, match=match) as err:
        call()  # type: ignore[operator]
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message
    return message


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("ext, how", [("jpg", "truncated"), ("png", "truncated"), ("jpg", "text"), ("png", "empty")])
def test_bad_image_is_named_before_training(tmp_path: Path, split: str, ext: str, how: str) -> None:
    """One bad file in train/ or val/ (a truncated JPEG too) is a one-line error naming it, before any batch."""
    pytest.importorskip("torchvision")
    root = _image_folder(tmp_path, ext=ext)
    bad = _damage(root / split / "dog" / f"1.{ext}", how)
    message = _one_line_error(lambda: load_image_folder(root, image_size=32, num_workers=0),
                              f"^unreadable image {re.escape(str(bad))}: ")
    assert message.startswith(f"unreadable image {bad}: ") and "--skip-bad-images" in message
    if (ext, how) == ("jpg", "truncated"):
        assert "truncated" in message.lower()


def test_skip_bad_images_skips_and_counts(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """skip_bad_images=True leaves bad files of both splits out, counts them and says so on stderr."""
    pytest.importorskip("torchvision")
    root = _image_folder(tmp_path, ext="jpg")
    bad_train = _damage(root / "train" / "cat" / "0.jpg", "truncated")
    bad_val = _damage(root / "val" / "dog" / "2.jpg", "text")
    data = load_image_folder(root, image_size=32, num_workers=0, skip_bad_images=True)
    assert data.skipped == 2 and data.skipped_files == [str(bad_train), str(bad_val)]
    assert (data.num_train, data.num_test) == (5, 5)
    err = capsys.readouterr().err
    assert f"skipped 2 unreadable image(s) in {root}, first {bad_train}: " in err
    assert sum(len(y) for _, y in data.train_batches(2, epoch=0, seed=0)) == 5
    seen = torch.cat([y for _, y in data.test_batches(4)])
    assert seen.tolist() == [0, 0, 0, 1, 1]  # the class of each remaining file is kept
    via_load = load("imagenet", str(root), skip_bad_images=True)
    assert isinstance(via_load, FolderData) and via_load.skipped == 2
    with pytest.raises(TRPError, match="unreadable image"):
        load("imagenet", str(root))
    with pytest.raises(TRPError, match="skip_bad_images must be true or false"):
        load("imagenet", str(root), skip_bad_images="yes")  # type: ignore[arg-type]


def test_skip_leaves_a_split_empty(tmp_path: Path) -> None:
    """If every file of a split is bad, skipping them leaves nothing to train on: a clear error."""
    pytest.importorskip("torchvision")
    root = _image_folder(tmp_path, per_class=1)
    for path in (root / "val").rglob("*.png"):
        _damage(path, "empty")
    with pytest.raises(TRPError, match=f"image folder {root / 'val'} has no readable images"):
        load_image_folder(root, image_size=32, num_workers=0, skip_bad_images=True)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_error_while_decoding_is_one_line_naming_the_file(tmp_path: Path, num_workers: int) -> None:
    """A file damaged after the check fails in a DataLoader worker: the user sees one line naming it."""
    pytest.importorskip("torchvision")
    root = _image_folder(tmp_path, ext="jpg")
    data = load_image_folder(root, image_size=32, num_workers=num_workers).to("cpu")
    bad = _damage(root / "train" / "dog" / "0.jpg", "truncated")
    message = _one_line_error(lambda: [y for _, y in data.train_batches(2, epoch=0, seed=0)],
                              f"^unreadable image {re.escape(str(bad))}: ")
    assert message.startswith(f"unreadable image {bad}: ") and "truncated" in message.lower()
    # When skipping, the sample leaves its batch and is counted on the data and every view of it.
    skipping = load_image_folder(root, image_size=32, num_workers=num_workers, skip_bad_images=True)
    assert skipping.skipped == 1  # found by the check before training
    _damage(root / "train" / "cat" / "1.jpg", "truncated")
    view = skipping.to("cpu")
    assert sum(len(y) for _, y in view.train_batches(4, epoch=0, seed=0)) == 4
    assert view.skipped == skipping.skipped == 2


def test_check_image_cases(tmp_path: Path) -> None:
    """Good files pass; a JPEG with bytes after its end marker is fine; cut or foreign files are not."""
    pytest.importorskip("PIL")
    root = _image_folder(tmp_path, splits=("train",), per_class=1, ext="jpg")
    jpg = root / "train" / "cat" / "0.jpg"
    assert check_image(jpg) is None
    raw = jpg.read_bytes()
    trailing = tmp_path / "trailing.jpg"
    trailing.write_bytes(raw + b"\x00camera trailer" * 20)
    assert check_image(trailing) is None
    no_end = tmp_path / "no_end.jpg"
    no_end.write_bytes(raw[:-2])
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(raw[: len(raw) * 2 // 3])
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    for path in (no_end, cut, empty):
        reason = check_image(path)
        assert reason is not None and "\n" not in reason
    paths = [str(p) for p in (jpg, cut, trailing, empty)]
    assert [p for p, _ in check_images(paths, threads=2)] == [str(cut), str(empty)]


def test_image_folder_arguments_are_validated(tmp_path: Path) -> None:
    """image_size, num_workers and skip_bad_images are checked by trp.validate, in one line."""
    pytest.importorskip("torchvision")
    root = _image_folder(tmp_path, per_class=1)
    with pytest.raises(TRPError, match="image size must be >= 1, got 0"):
        load_image_folder(root, image_size=0)
    with pytest.raises(TRPError, match="num_workers must be >= 0, got -1"):
        load_image_folder(root, num_workers=-1)
    with pytest.raises(TRPError, match="image size must be a whole number, got True"):
        load_image_folder(root, image_size=True)  # type: ignore[arg-type]
