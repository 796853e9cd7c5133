"""Tests of trp.data.cifar: the batch files, the restricted unpickler, download and extraction."""

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

from trp.data import load, load_cifar
from trp.data.cifar import ALLOWED_GLOBALS, safe_extract
from trp.errors import TRPError

MINI_CIFAR = Path(__file__).resolve().parents[1].parent / "shared/data/cifar10-mini/cifar-10-batches-py"


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
        safe_extract(archive, dest)
    assert not list(dest.iterdir()) and not (tmp_path / "evil.txt").exists()



# ------------------------------------------------------------------- issue 15: names, bytes, allow-list


@pytest.mark.parametrize("protocol", [0, 1, 2])
def test_empty_bytes_value_loads(tmp_path: Path, protocol: int) -> None:
    """Protocols 0-2 write b"" as __builtin__.bytes(): such a batch is a CIFAR batch, not a refused file."""
    folder = tmp_path / "cifar-10-batches-py"
    batch = _batch(3)
    batch["batch_label"] = b""
    batch["filenames"] = [b"", b"a.png", b""]
    assert b"__builtin__\nbytes" in pickle.dumps(batch, protocol=protocol)  # the case under test
    _write(folder / "data_batch_1", batch, protocol=protocol)
    _write(folder / "test_batch", _batch(2), protocol=protocol)
    data = load_cifar(folder)
    assert data.num_train == 3 and data.y_train.tolist() == batch["labels"]


def test_bytes_with_an_argument_is_refused(tmp_path: Path) -> None:
    """Only the empty call is allowed: bytes(2**30) from a 30-byte file would allocate a gigabyte."""
    folder = _cifar10_dir(tmp_path)
    # PROTO 2; GLOBAL __builtin__.bytes; BININT 2**30; TUPLE1; REDUCE; STOP
    (folder / "data_batch_1").write_bytes(b"\x80\x02c__builtin__\nbytes\nJ\x00\x00\x00\x40\x85R.")
    with pytest.raises(TRPError, match="damaged CIFAR batch file .*data_batch_1: .*only without arguments"):
        load_cifar(folder)


def test_only_official_file_names_are_loaded(tmp_path: Path) -> None:
    """data_batch_01 beside data_batch_1 (or a data_batch_6) must not add its images a second time."""
    folder = _cifar10_dir(tmp_path, n_train=(6, 5))
    (folder / "data_batch_01").write_bytes((folder / "data_batch_1").read_bytes())
    _write(folder / "data_batch_6", _batch(7, seed=6))
    _write(folder / "data_batch_1.bak", _batch(8, seed=8))
    data = load_cifar(folder)
    assert data.num_train == 11 and data.num_test == 4
    # Only data_batch_2 present: the official names that exist are used, in order.
    (folder / "data_batch_1").unlink()
    assert load_cifar(folder).num_train == 5
    c100 = tmp_path / "c100" / "cifar-100-python"
    _write(c100 / "train", _batch(4, 100, "fine_labels"))
    _write(c100 / "train2", _batch(9, 100, "fine_labels"))
    _write(c100 / "test", _batch(2, 100, "fine_labels"))
    assert load_cifar(c100.parent, "cifar100").num_train == 4


def test_allow_list_is_pinned() -> None:
    """The unpickler's allow-list is exactly this set: a widened list must fail here, not in the field."""
    expected = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("builtins", "dict"),
        ("builtins", "list"),
        ("_codecs", "encode"),
        ("__builtin__", "bytes"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
    }
    assert set(ALLOWED_GLOBALS) == expected
    assert ALLOWED_GLOBALS[("__builtin__", "bytes")]() == b""
    assert ALLOWED_GLOBALS[("__builtin__", "bytes")] is not bytes
    with pytest.raises(TypeError):
        ALLOWED_GLOBALS[("builtins", "eval")] = eval  # type: ignore[index]


class _Call:
    """Pickles as a call of ``fn(*args)``: what a hostile batch file would carry."""

    def __init__(self, fn: object, *args: object) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (self.fn, self.args)


def _payload(how: str, marker: Path) -> bytes:
    """A pickled batch that writes ``marker`` when loaded by an unrestricted unpickler."""
    code = f"__import__('pathlib').Path({str(marker)!r}).write_text('pwned')"
    if how == "getattr":
        # getattr(getattr(__import__('pathlib'), 'Path')(marker), 'write_text')('pwned'), hand-assembled:
        # PROTO 2, then GLOBAL / MARK / UNICODE / TUPLE / REDUCE opcodes.
        return (
            b"\x80\x02cbuiltins\ngetattr\n(cbuiltins\ngetattr\n(cbuiltins\n__import__\n(Vpathlib\ntR"
            b"VPath\ntR(V" + str(marker).encode() + b"\ntRVwrite_text\ntR(Vpwned\ntR."
        )
    fn, protocol = {"eval": (eval, 4), "exec": (exec, 4), "__builtin__.eval": (eval, 2)}[how]
    return pickle.dumps({"data": _Call(fn, code), "labels": [0]}, protocol=protocol)


@pytest.mark.parametrize(
    "how, refused",
    [
        ("eval", "builtins.eval"),
        ("exec", "builtins.exec"),
        ("getattr", "builtins.getattr"),
        ("__builtin__.eval", "__builtin__.eval"),
    ],
)
def test_builtin_payloads_are_refused(tmp_path: Path, how: str, refused: str) -> None:
    """Payloads through builtins.eval / exec / getattr and protocol 2's __builtin__.eval never run."""
    live = tmp_path / "live"
    pickle.loads(_payload(how, live))  # the payload is real: an ordinary unpickler runs it
    assert live.read_text() == "pwned"
    folder = _cifar10_dir(tmp_path / "d")
    marker = tmp_path / "marker"
    (folder / "data_batch_1").write_bytes(_payload(how, marker))
    with pytest.raises(TRPError, match=f"refuses to unpickle {refused} ") as err:
        load_cifar(folder)
    assert "not a CIFAR batch file" in str(err.value) and "data_batch_1" in str(err.value)
    assert not marker.exists()
