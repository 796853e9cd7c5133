"""CIFAR-10 and CIFAR-100 from the official python batch files, read safely.

The batch files are pickles. A pickle can name any importable callable and call it while loading, so
they are read with a restricted unpickler whose allow-list (:data:`ALLOWED_GLOBALS`) holds only what
numpy arrays, label lists and byte strings need: a file planted in the data folder cannot run code.
Only the official file names are read (``data_batch_1`` .. ``data_batch_5`` and ``test_batch`` for
CIFAR-10, ``train`` and ``test`` for CIFAR-100), so a stray copy such as ``data_batch_01`` is never
mixed in. Downloads, when asked for, go through a ``.part`` file and the archive is extracted only if
every member stays inside the data folder.

Example:
    >>> sorted(CIFAR)
    ['cifar10', 'cifar100']
    >>> ("numpy", "ndarray") in ALLOWED_GLOBALS, ("builtins", "eval") in ALLOWED_GLOBALS
    (True, False)
"""

from __future__ import annotations

import http.client
import os
import pickle
import shutil
import sys
import tarfile
import types
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from trp.data.tensors import TensorData, tensor_data
from trp.errors import TRPError
from trp.validate import boolean, choice

__all__ = ["ALLOWED_GLOBALS", "CIFAR", "CifarSpec", "load_cifar", "safe_extract"]


@dataclass(frozen=True)
class CifarSpec:
    """Where one CIFAR variant lives and how its files are named.

    Example:
        >>> CIFAR["cifar100"].train_files, CIFAR["cifar100"].labels_key
        (('train',), 'fine_labels')
    """

    title: str
    folder: str
    url: str
    labels_key: str
    num_classes: int
    train_files: tuple[str, ...]
    test_file: str


CIFAR: Mapping[str, CifarSpec] = types.MappingProxyType(
    {
        "cifar10": CifarSpec(
            "CIFAR-10",
            "cifar-10-batches-py",
            "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
            "labels",
            10,
            tuple(f"data_batch_{i}" for i in range(1, 6)),
            "test_batch",
        ),
        "cifar100": CifarSpec(
            "CIFAR-100",
            "cifar-100-python",
            "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
            "fine_labels",
            100,
            ("train",),
            "test",
        ),
    }
)


def _numpy_modules() -> tuple[Any, Any]:
    # numpy 2 moved these modules to numpy._core; going through numpy.core would raise a
    # DeprecationWarning on every file.
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    return multiarray, numeric


def _empty_bytes(*args: Any) -> bytes:
    # Python 3 writes an empty bytes value in a protocol 0-2 pickle as ``__builtin__.bytes()``
    # (non-empty ones go through _codecs.encode). The real ``bytes`` would also accept an integer, and
    # ``bytes(10**12)`` from a 30-byte file would allocate a terabyte: only the empty call is allowed.
    if args:
        raise pickle.UnpicklingError("__builtin__.bytes is allowed only without arguments (an empty bytes value)")
    return b""


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
        ("__builtin__", "bytes"): _empty_bytes,
    }
    # The official files name numpy.core (written by numpy 1); files rewritten by numpy 2 name numpy._core.
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = multiarray._reconstruct
        allowed[(module, "scalar")] = multiarray.scalar
    # Pickle protocol 5 (Python 3.8+ default for HIGHEST_PROTOCOL) stores arrays via _frombuffer.
    for module in ("numpy.core.numeric", "numpy._core.numeric"):
        allowed[(module, "_frombuffer")] = numeric._frombuffer
    return allowed


# Every global a CIFAR batch file may name, (module, name) -> the object handed to the unpickler.
ALLOWED_GLOBALS: Mapping[tuple[str, str], Any] = types.MappingProxyType(_allowed_globals())


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that can only rebuild numpy arrays, lists, dicts and byte strings.

    ``find_class`` receives the names exactly as written in the file (protocol 2's ``__builtin__`` is
    not translated to ``builtins`` here), and anything outside :data:`ALLOWED_GLOBALS` is refused.
    """

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file, encoding="latin1")  # the official files are Python 2 pickles
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise TRPError(
                f"{self._path}: refuses to unpickle {module}.{name} (only numpy arrays, lists and dicts are allowed): "
                "not a CIFAR batch file"
            ) from None


# First bytes of a pickled dict: PROTO (protocol >= 2), MARK (protocol 0), EMPTY_DICT (protocol 1).
_PICKLE_STARTS = (b"\x80", b"(", b"}")


def _unpickle(path: Path) -> Any:
    """Load one pickle through the restricted unpickler; every failure is a TRPError naming ``path``."""
    try:
        with open(path, "rb") as f:
            if f.read(1) not in _PICKLE_STARTS:
                raise TRPError(f"{path} is not a CIFAR batch file (not a Python pickle)")
            f.seek(0)
            return _CifarUnpickler(f, path).load()
    except TRPError:
        raise
    except (EOFError, pickle.UnpicklingError) as err:
        raise TRPError(f"truncated or damaged CIFAR batch file {path}: {err}") from None
    except OSError as err:
        raise TRPError(f"could not read {path}: {err.strerror or err}") from None
    except Exception as err:  # arbitrary bytes can make the unpickler fail in many ways
        raise TRPError(f"truncated or damaged CIFAR batch file {path}: {type(err).__name__}: {err}") from None


def _read_batch(path: Path, labels_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR batch file safely and return (uint8 [N, 3, 32, 32], int64 [N])."""
    obj = _unpickle(path)
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


def _cifar_files(folder: Path, spec: CifarSpec) -> tuple[list[Path], Path] | None:
    """(train files, test file) found in ``folder``, or None if it holds no batch file at all.

    Only the official names count: ``data_batch_01`` or ``data_batch_6`` beside the real files would
    otherwise add their images a second time.
    """
    train = [folder / n for n in spec.train_files if (folder / n).is_file()]
    test = folder / spec.test_file
    if not train and not test.is_file():
        return None
    return train, test


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract a .tar.gz, refusing members that could land outside ``dest`` or are not plain files.

    Example:
        >>> safe_extract(Path("/nonexistent.tar.gz"), Path("/tmp"))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        trp.errors.TRPError: could not extract /nonexistent.tar.gz: ...
    """
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


def _find_or_fetch(root: Path, spec: CifarSpec, download: bool) -> tuple[list[Path], Path]:
    """The batch files under ``root`` (or its ``spec.folder``), downloading them first if allowed."""

    def find() -> tuple[list[Path], Path] | None:
        for folder in (root, root / spec.folder):
            found = _cifar_files(folder, spec) if folder.is_dir() else None
            if found is not None:
                return found
        return None

    found = find()
    if found is None and download:
        root.mkdir(parents=True, exist_ok=True)
        archive = root / spec.url.rsplit("/", 1)[1]
        if not archive.is_file():  # a finished earlier download is reused
            _download(spec.url, archive)
        safe_extract(archive, root)
        found = find()
    if found is None:
        if not root.exists():
            raise TRPError(f"data folder {root} does not exist (use --download to fetch {spec.title})")
        expected = f"{', '.join(spec.train_files)} and {spec.test_file}"
        raise TRPError(f"no {spec.title} batch files in {root}: expected {expected} there or in {root / spec.folder}")
    return found


def load_cifar(data_dir: str | os.PathLike[str], name: str = "cifar10", download: bool = False) -> TensorData:
    """Load CIFAR-10 or CIFAR-100 from the standard python batch files.

    Args:
        data_dir: The ``cifar-10-batches-py`` / ``cifar-100-python`` folder itself, or its parent.
        name: "cifar10" (whichever of ``data_batch_1`` .. ``data_batch_5`` exist, at least one, plus
            ``test_batch``) or "cifar100" (``train`` + ``test``, fine labels). Other files are ignored.
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
    spec = CIFAR[choice(name, "CIFAR variant", tuple(CIFAR))]
    download = boolean(download, "download")
    root = Path(data_dir).expanduser()
    if root.exists() and not root.is_dir():
        raise TRPError(f"data folder {root} is not a folder")
    train_files, test_file = _find_or_fetch(root, spec, download)
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
    return tensor_data(name, x_train, y_train, x_test, y_test, spec.num_classes, pad=4, flip=True)
