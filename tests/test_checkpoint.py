"""Safe artifacts: safetensors + JSON only, nothing unpickled, damage detected, every write atomic."""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import trp
from trp import checkpoint as ckpt
from trp import io as trp_io
from trp import structure
from trp import saving
from trp.cli import main
from trp.errors import TRPError
from trp.models import create

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = structure.ModelSpec("resnet20", 10, 1, [1, 8, 8], dataset="digits")


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
    saving.save_model(d / ckpt.MODEL_FILE, _model(), SPEC)
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


def test_file_without_checksum_loads_only_when_trusted(tmp_path: Path, one_line_error) -> None:
    """A file without trp_sha256 (plain safetensors with trp metadata) is refused unless trusted (#15 item 11)."""
    from safetensors.torch import save_file

    model = _model()
    meta = {"model": SPEC.to_dict()}
    save_file({f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / ckpt.MODEL_FILE),
              metadata={"trp": json.dumps(meta)})
    with pytest.raises(TRPError, match="has no trp checksum"):
        trp.load(tmp_path)
    assert "no trp checksum" in one_line_error(["eval", tmp_path])
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(saving.load(tmp_path, trust=True)(x), model(x))


def test_edited_weight_with_checksum_stripped_is_refused(model_dir: Path, one_line_error) -> None:
    """Tampering: a weight edited and trp_sha256 deleted used to load as an older format (#15 item 11)."""
    from safetensors.torch import load_file, save_file

    f = model_dir / ckpt.MODEL_FILE
    with open(f, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        metadata = json.loads(fh.read(header_len))["__metadata__"]
    assert set(metadata) == {"trp", ckpt.CHECKSUM_KEY}  # every file trp writes carries the checksum
    tensors = load_file(str(f))
    tensors["model.fc.weight"][0, 0] += 1.0  # a changed prediction, still finite and well-formed
    save_file(tensors, str(f), metadata={"trp": metadata["trp"]})
    with pytest.raises(TRPError, match="has no trp checksum"):
        trp.load(model_dir)
    with pytest.raises(TRPError, match="has no trp checksum"):
        ckpt.read_safetensors(f)
    assert "no trp checksum" in one_line_error(["eval", model_dir])
    # Trusting it is the user's explicit decision, and then the edited weight is what loads.
    assert float(saving.load(model_dir, trust=True).fc.weight[0, 0].detach()) == pytest.approx(float(tensors["model.fc.weight"][0, 0]))
    ckpt.read_safetensors(f, trust=True)


def test_non_finite_weights_are_refused(tmp_path: Path, one_line_error) -> None:
    """A model with a NaN weight loads nowhere: trp.load and trp eval name the tensor."""
    model = _model()
    with torch.no_grad():
        model.layer1[0].conv1.weight[0, 0, 0, 0] = float("nan")
    saving.save_model(tmp_path / ckpt.MODEL_FILE, model, SPEC)
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

    with pytest.raises(TRPError, match=f"^cannot write {re.escape(str(target))}: I/O error$"):
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
        saving.save_model(model_dir / ckpt.MODEL_FILE, other, SPEC)
    monkeypatch.undo()
    assert renames and renames[0][1] == str(model_dir / ckpt.MODEL_FILE)
    assert (model_dir / ckpt.MODEL_FILE).read_bytes() == before
    assert _temp_files(model_dir) == []
    trp.load(model_dir)


# ------------------------------------------------------------------------------------ stale temporaries

_KILLED_WRITER = """
import sys, time
from pathlib import Path
from trp.io import atomic_write

def write(tmp):
    with open(tmp, "wb") as f:
        f.write(b"x" * 4096)  # half a checkpoint
        f.flush()
    Path(sys.argv[2]).write_text("ready")
    time.sleep(60)  # killed here, mid-write

atomic_write(Path(sys.argv[1]) / "checkpoint.safetensors", write)
"""


def test_sigkill_mid_write_leaves_temp_that_a_later_process_removes(tmp_path: Path) -> None:
    """#15 item 10: SIGKILL while writing leaves .checkpoint.safetensors.*.tmp; remove_stale_temps clears it."""
    run = tmp_path / "run"
    run.mkdir()
    (run / ckpt.CHECKPOINT_FILE).write_bytes(b"the previous epoch")
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(run), str(ready)])
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the writer did not start"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    left = _temp_files(run)
    assert len(left) == 1 and left[0].startswith(".checkpoint.safetensors.") and trp_io.is_temp_name(left[0])
    # In this process the temporary is newer than the process: it could be a write of ours, so it stays.
    assert trp_io.remove_stale_temps(run) == []
    assert _temp_files(run) == left
    # A later process (a resume, an --overwrite) removes it, and only it.
    code = "import sys; from trp.io import remove_stale_temps; print(len(remove_stale_temps(sys.argv[1])))"
    proc2 = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True, timeout=120)
    assert proc2.returncode == 0, proc2.stderr
    assert proc2.stdout.strip() == "1"
    assert _temp_files(run) == []
    assert (run / ckpt.CHECKPOINT_FILE).read_bytes() == b"the previous epoch"


def test_remove_stale_temps_touches_only_trp_temporaries(tmp_path: Path) -> None:
    """Only old regular files of atomic_write's naming go; user files, new temps and folders stay."""
    old = time.time() - 3600
    stale = [tmp_path / ".checkpoint.safetensors.ab_cd123.tmp", tmp_path / ".metrics.csv.0a1b2c3d.tmp"]
    keep = [tmp_path / "notes.tmp", tmp_path / ".hidden.tmp", tmp_path / "checkpoint.safetensors",
            tmp_path / ".model.safetensors.ab-cd123.tmp"]
    for p in stale + keep:
        p.write_text("x")
        os.utime(p, (old, old))
    fresh = tmp_path / ".config.json.zz99yy88.tmp"
    fresh.write_text("being written")
    folder = tmp_path / ".report.json.abcdefgh.tmp"
    folder.mkdir()
    os.utime(folder, (old, old))
    removed = trp_io.remove_stale_temps(tmp_path, before=time.time() - 60)
    assert sorted(removed) == sorted(stale)
    assert all(p.exists() for p in keep + [fresh, folder])
    assert not any(p.exists() for p in stale)
    assert trp_io.remove_stale_temps(tmp_path / "missing") == []


def test_atomic_write_temporaries_are_recognized(tmp_path: Path) -> None:
    """The names atomic_write really creates are the ones remove_stale_temps looks for."""
    seen: list[str] = []

    def write(tmp: str) -> None:
        seen.append(Path(tmp).name)
        Path(tmp).write_text("x")

    for _ in range(20):  # mkstemp's random part varies: several draws
        trp_io.atomic_write(tmp_path / ckpt.CHECKPOINT_FILE, write)
    assert len(seen) == 20
    assert all(trp_io.is_temp_name(n) and n.startswith(f".{ckpt.CHECKPOINT_FILE}.") for n in seen)
