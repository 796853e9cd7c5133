"""Safe artifacts: safetensors + JSON only, nothing unpickled, damage detected, every write atomic."""

from __future__ import annotations

import errno
import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from torch import nn

import trp
from trp import checkpoint as ckpt
from trp import io as trp_io
from trp.cli import main
from trp.errors import TRPError
from trp.models import create

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = ckpt.ModelSpec("resnet20", 10, 1, [1, 8, 8], dataset="digits")


class _Evil:
    """Unpickling this object calls os.mkdir(marker): proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # noqa: ANN204
        return (os.mkdir, (self.marker,))



def _model() -> nn.Module:
    torch.manual_seed(0)
    return create("resnet20", num_classes=10, in_channels=1).eval()


@pytest.fixture()
def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    ckpt.save_model(d / ckpt.MODEL_FILE, _model(), SPEC)
    return d


def test_malicious_payload_is_live(tmp_path: Path) -> None:
    """The crafted pickle really runs code when unpickled, so the refusal tests below mean something."""
    canary = tmp_path / "canary"
    pickle.loads(pickle.dumps(_Evil(canary)))
    assert canary.exists()


@pytest.mark.parametrize("as_file", [ckpt.MODEL_FILE, ckpt.CHECKPOINT_FILE])
def test_pickle_disguised_as_safetensors_is_refused(tmp_path: Path, one_line_error, as_file: str) -> None:
    """A pickle named model/checkpoint.safetensors must be refused by eval, trp.load, export and resume, never run."""
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    run.mkdir()
    (run / as_file).write_bytes(pickle.dumps(_Evil(marker), protocol=2))
    with pytest.raises(TRPError, match="not a trp checkpoint"):
        trp.load(run)
    assert "not a trp checkpoint" in one_line_error(["eval", run])
    assert "not a trp checkpoint" in one_line_error(["export", run, "--format", "torchscript", "--out", tmp_path / "m.pt"])
    if as_file == ckpt.CHECKPOINT_FILE:
        assert "not a trp checkpoint" in one_line_error(["train", "--resume", run, "--no-progress"])
    assert not marker.exists()
    assert not (tmp_path / "m.pt").exists()


def test_torch_save_file_is_refused(tmp_path: Path, one_line_error) -> None:
    """A torch.save'd .pt (a zip of pickles) given to trp.load or trp eval is refused without unpickling."""
    marker = tmp_path / "pwned"
    pt = tmp_path / "model.pt"
    torch.save({"state": _Evil(marker), "w": torch.ones(2)}, pt)
    with pytest.raises(TRPError, match="not a trp checkpoint"):
        trp.load(pt)
    one_line_error(["eval", pt])
    assert not marker.exists()


def test_model_round_trip_and_plain_safetensors(model_dir: Path) -> None:
    """A saved model reloads to identical outputs, and the file is ordinary safetensors any reader opens."""
    from safetensors import safe_open

    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(trp.load(model_dir)(x), _model()(x))
    with safe_open(str(model_dir / ckpt.MODEL_FILE), "pt") as f:
        meta = f.metadata()
        assert json.loads(meta["trp"])["model"]["arch"] == "resnet20"
        assert len(meta["trp_sha256"]) == 64
        assert "model.conv1.weight" in list(f.keys())


@pytest.mark.parametrize("keep", [0, 5, 8, 100, 0.5, -1])
def test_truncated_checkpoint_is_refused(model_dir: Path, one_line_error, keep: float) -> None:
    """A file cut at any length (empty, inside the header, inside the data, one byte short) is a one-line error."""
    f = model_dir / ckpt.MODEL_FILE
    data = f.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep if keep >= 0 else len(data) - 1
    f.write_bytes(data[:n])
    with pytest.raises(TRPError, match="not a trp checkpoint|damaged|truncated"):
        trp.load(model_dir)
    one_line_error(["eval", model_dir])


@pytest.mark.parametrize("where", ["data", "header"])
def test_corrupted_bytes_are_detected(model_dir: Path, one_line_error, where: str) -> None:
    """Changed bytes that leave the file parseable (safetensors has no checksum) are caught by trp's digest."""
    f = model_dir / ckpt.MODEL_FILE
    data = bytearray(f.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    if where == "data":
        mid = 8 + header_len + (len(data) - 8 - header_len) // 2
        data[mid : mid + 16] = bytes(b ^ 0x55 for b in data[mid : mid + 16])
    else:  # a digit of the JSON metadata: still valid JSON, a different model description
        header = data[8 : 8 + header_len]
        pos = header.index(b'num_classes\\": 10') + len(b'num_classes\\": 1')
        data[8 + pos] = ord("1")  # 10 -> 11
    f.write_bytes(bytes(data))
    with pytest.raises(TRPError, match="damaged"):
        trp.load(model_dir)
    assert "checksum" in one_line_error(["eval", model_dir])


def test_file_without_checksum_still_loads(tmp_path: Path) -> None:
    """Files written before checksums existed (plain safetensors with trp metadata) still load."""
    from safetensors.torch import save_file

    model = _model()
    meta = {"model": SPEC.to_dict()}
    save_file({f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / ckpt.MODEL_FILE),
              metadata={"trp": json.dumps(meta)})
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(trp.load(tmp_path)(x), model(x))


def test_non_finite_weights_are_refused(tmp_path: Path, one_line_error) -> None:
    """A model with a NaN weight loads nowhere: trp.load and trp eval name the tensor."""
    model = _model()
    with torch.no_grad():
        model.layer1[0].conv1.weight[0, 0, 0, 0] = float("nan")
    ckpt.save_model(tmp_path / ckpt.MODEL_FILE, model, SPEC)
    with pytest.raises(TRPError, match="non-finite.*layer1.0.conv1.weight"):
        trp.load(tmp_path)
    assert "layer1.0.conv1.weight" in one_line_error(["eval", tmp_path])


def test_foreign_safetensors_is_refused(tmp_path: Path) -> None:
    """A safetensors file without trp metadata (e.g. from another library) is refused, not guessed at."""
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / ckpt.MODEL_FILE))
    with pytest.raises(TRPError, match="no trp metadata"):
        trp.load(tmp_path)


# ------------------------------------------------------------------------------------------ atomicity


def _temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_interrupted_write_keeps_old_file(tmp_path: Path) -> None:
    """A writer failing midway (disk full) leaves the old file as it was and no temp file behind."""
    target = tmp_path / "metrics.csv"
    trp_io.atomic_write_text(target, "old content\n")

    def half_then_enospc(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write("new conte")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(TRPError, match="cannot write .*metrics.csv: No space left on device"):
        trp_io.atomic_write(target, half_then_enospc)
    assert target.read_text() == "old content\n"
    assert _temp_files(tmp_path) == []


def test_keyboard_interrupt_mid_write_keeps_old_file(tmp_path: Path) -> None:
    """Ctrl-C in the middle of a write propagates, the old file stays, the temp file is removed."""
    target = tmp_path / "config.json"
    trp_io.atomic_write_text(target, "{}")

    def interrupted(tmp: str) -> None:
        Path(tmp).write_text('{"half": ')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trp_io.atomic_write(target, interrupted)
    assert target.read_text() == "{}"
    assert _temp_files(tmp_path) == []


def test_failed_write_creates_nothing(tmp_path: Path) -> None:
    """A failed first write must not leave a target file that looks valid (or any file at all)."""
    target = tmp_path / ckpt.MODEL_FILE

    def fail(tmp: str) -> None:
        Path(tmp).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
        raise OSError(errno.EIO, "I/O error")

    with pytest.raises(TRPError):
        trp_io.atomic_write(target, fail)
    assert list(tmp_path.iterdir()) == []


def test_safetensors_never_partially_visible(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If the final rename fails, write_safetensors leaves the previous model intact and loadable."""
    before = (model_dir / ckpt.MODEL_FILE).read_bytes()
    renames: list[tuple[str, str]] = []

    def no_rename(src: str, dst: str) -> None:
        renames.append((str(src), str(dst)))
        ckpt.read_safetensors(src)  # the temp file is complete before it would become visible
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(trp_io.os, "replace", no_rename)
    other = create("resnet20", num_classes=10, in_channels=1)
    with pytest.raises(TRPError, match="No space left on device"):
        ckpt.save_model(model_dir / ckpt.MODEL_FILE, other, SPEC)
    monkeypatch.undo()
    assert renames and renames[0][1] == str(model_dir / ckpt.MODEL_FILE)
    assert (model_dir / ckpt.MODEL_FILE).read_bytes() == before
    assert _temp_files(model_dir) == []
    trp.load(model_dir)
