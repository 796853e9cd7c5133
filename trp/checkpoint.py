"""The trp file format: weights in safetensors, everything else in JSON, a checksum, atomic writes.

Nothing here unpickles: a trp file is a safetensors file whose header metadata holds one JSON
document (``"trp"``) and a SHA-256 of the header and the tensor bytes (``trp_sha256``). A file
crafted to execute code when unpickled is simply not a safetensors file and is refused; a truncated,
corrupted or edited file fails the checksum; a file without the checksum (edited and stripped, or
from an unknown writer) is refused unless the caller says it trusts it (``trust=True``).

This module only reads and writes files. What the JSON says about a model's structure, and
rebuilding the model from it, is :mod:`trp.structure`'s concern.

Files:

* ``model.safetensors``: a model (trained or compressed); ``trp.load(folder)`` rebuilds it.
* ``checkpoint.safetensors``: a training run's state after its last completed epoch: model
  weights, optimizer state and TRP state, written as one file so a crash can never pair the model
  of one epoch with the optimizer of another.

Example:
    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), MODEL_FILE)
    >>> write_safetensors(p, with_prefix("model.", {"w": torch.ones(2)}), {"note": "hi"})
    >>> tensors, meta = read_safetensors(p)
    >>> strip_prefix("model.", tensors)["w"], meta["note"]
    (tensor([1., 1.]), 'hi')
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from trp.errors import TRPError
from trp.io import atomic_write_bytes

__all__ = [
    "read_safetensors",
    "write_safetensors",
    "find_file",
    "is_trp_file",
    "with_prefix",
    "strip_prefix",
    "optimizer_to_tensors",
    "optimizer_from_tensors",
    "check_state",
    "check_finite",
    "load_weights",
    "MODEL_FILE",
    "CHECKPOINT_FILE",
    "MODEL_PREFIX",
    "CHECKSUM_KEY",
]

MODEL_FILE = "model.safetensors"
CHECKPOINT_FILE = "checkpoint.safetensors"
MODEL_PREFIX = "model."  # the model's state_dict keys are stored under this prefix
CHECKSUM_KEY = "trp_sha256"
_MAX_HEADER = 100_000_000  # safetensors' own limit on a header's size


def write_safetensors(path: str | Path, tensors: Mapping[str, Tensor], meta: dict) -> None:
    """Write tensors and a JSON document (metadata key ``trp``) atomically, with trp's checksum.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "t.safetensors")
        >>> write_safetensors(p, {"w": torch.ones(2)}, {"hello": 1})
        >>> read_safetensors(p)[1]["hello"]
        1
    """
    # Copies: safetensors refuses tensors that share storage, and the caller's model may keep training.
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write_bytes(path, _add_checksum(st_save(flat, metadata={"trp": json.dumps(meta)})))


def _digest(header: dict, payload: bytes | memoryview) -> str:
    """SHA-256 of the header (without the checksum itself, keys sorted) and the tensor bytes."""
    header = dict(header)
    header["__metadata__"] = {k: v for k, v in header.get("__metadata__", {}).items() if k != CHECKSUM_KEY}
    h = hashlib.sha256(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
    h.update(payload)
    return h.hexdigest()


def _add_checksum(blob: bytes) -> bytes:
    # safetensors has no checksum: a flipped byte in the tensor data would load as wrong weights.
    # The digest goes into the header's metadata, so the file stays a plain safetensors file.
    (header_len,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + header_len])
    payload = memoryview(blob)[8 + header_len :]
    header.setdefault("__metadata__", {})[CHECKSUM_KEY] = _digest(header, payload)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the tensor data 8-byte aligned, as safetensors does
    return struct.pack("<Q", len(raw)) + raw + payload


def read_safetensors(path: str | Path, trust: bool = False) -> tuple[dict[str, Tensor], dict]:
    """Read what :func:`write_safetensors` wrote; anything else is refused with a TRPError.

    Args:
        path: The file.
        trust: Accept a file that carries no ``trp_sha256`` (every file trp writes has one, so
            without it damage or tampering cannot be ruled out). A checksum that is present is
            always verified.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "t.safetensors")
        >>> write_safetensors(p, {"w": torch.ones(2)}, {})
        >>> read_safetensors(p)[0]["w"]
        tensor([1., 1.])
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TRPError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise TRPError(f"{path} is a folder, not a trp checkpoint") from None
    except OSError as err:
        raise TRPError(f"cannot read {path}: {err.strerror or err}") from None
    # Parse the header ourselves first: it gives a clear message for a truncated or foreign file.
    if len(data) < 8:
        raise TRPError(f"{path} is not a trp checkpoint (truncated or empty)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8:
        raise TRPError(f"{path} is not a trp checkpoint, or it is truncated (not a safetensors file)")
    try:
        header = json.loads(data[8 : 8 + header_len])
        meta = json.loads(header.get("__metadata__", {}).get("trp", "null"))
    except (ValueError, AttributeError, TypeError):
        raise TRPError(f"{path} is not a trp checkpoint (damaged safetensors header)") from None
    if not isinstance(meta, dict):
        raise TRPError(f"{path} is not a trp checkpoint (no trp metadata)")
    expected = header["__metadata__"].get(CHECKSUM_KEY)
    if expected is None and not trust:
        raise TRPError(f"{path} has no trp checksum ({CHECKSUM_KEY}), so damage or tampering cannot be ruled out; "
                       "if you trust the file, pass --trust (trust=True)")
    if expected is not None and _digest(header, memoryview(data)[8 + header_len :]) != expected:
        raise TRPError(f"{path} is damaged (checksum mismatch: its bytes changed after it was written)")
    try:
        tensors = st_load(data)
    except Exception as err:  # safetensors raises its own error types for damaged payloads
        raise TRPError(f"{path} is damaged: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    return tensors, meta


def is_trp_file(path: str | Path) -> bool:
    """True if ``path`` is a file whose safetensors header carries trp's metadata (reads the header only).

    For refusing to write over a model or checkpoint whatever it is called; never raises.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "backup.bin")
        >>> write_safetensors(p, {"w": torch.ones(2)}, {})
        >>> is_trp_file(p), is_trp_file(os.path.dirname(p)), is_trp_file(p + ".missing")
        (True, False, False)
    """
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return False
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(_MAX_HEADER, os.fstat(f.fileno()).st_size - 8):
                return False
            header = json.loads(f.read(header_len))
        return isinstance(header, dict) and "trp" in (header.get("__metadata__") or {})
    except (OSError, ValueError, TypeError, AttributeError):
        return False


def find_file(path: str | Path, names: Sequence[str] = (MODEL_FILE, CHECKPOINT_FILE)) -> Path:
    """The trp file a path names: the path itself, or a folder's first file of ``names`` (by default its
    model file, else its checkpoint).

    Example:
        >>> import tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> write_safetensors(os.path.join(d, CHECKPOINT_FILE), {}, {})
        >>> find_file(d).name
        'checkpoint.safetensors'
    """
    path = Path(path)
    if path.is_dir():
        for name in names:
            if (path / name).is_file():
                return path / name
        raise TRPError(f"{path} holds no {' or '.join(names)}")
    if not path.exists():
        raise TRPError(f"no such file or folder: {path}")
    return path


def with_prefix(prefix: str, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The tensors under ``prefix`` (one file holds the model, the optimizer and TRP's state).

    Example:
        >>> list(with_prefix(MODEL_PREFIX, nn.Linear(2, 2).state_dict()))
        ['model.weight', 'model.bias']
    """
    return {f"{prefix}{k}": v for k, v in tensors.items()}


def strip_prefix(prefix: str, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The tensors stored under ``prefix``, with the prefix removed (the inverse of :func:`with_prefix`).

    Example:
        >>> list(strip_prefix("model.", {"model.w": torch.ones(1), "optim.0.m": torch.ones(1)}))
        ['w']
    """
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def check_finite(model: nn.Module) -> None:
    """Refuse a model with NaN or infinite weights, naming the first such tensor.

    Example:
        >>> check_finite(nn.Linear(2, 2))
    """
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise TRPError(f"the model has non-finite values (NaN or inf) in {name}")


def check_state(own: Mapping[str, Tensor], state: Mapping[str, Tensor], path: Path | str) -> None:
    """Refuse ``state`` unless it has exactly ``own``'s keys and shapes; only shapes are read.

    ``own`` may live on the meta device (shapes without storage), which is how a file's sizes are
    checked before anything is allocated for it.

    Example:
        >>> check_state(nn.Linear(2, 3).state_dict(), nn.Linear(2, 4).state_dict(), "f")
        Traceback (most recent call last):
        ...
        trp.errors.TRPError: f does not fit this architecture (weight has shape (4, 2), the model expects (3, 2))
    """
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or bad:
        what = (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}" if unexpected
                else f"{bad[0]} has shape {tuple(state[bad[0]].shape)}, the model expects {tuple(own[bad[0]].shape)}")
        raise TRPError(f"{path} does not fit this architecture ({what})")


def load_weights(model: nn.Module, state: Mapping[str, Tensor], path: Path | str) -> None:
    """Load a state dict strictly; a mismatch is a one-line TRPError naming the first offending key.

    Example:
        >>> m = nn.Linear(2, 2)
        >>> load_weights(m, nn.Linear(2, 2).state_dict(), "example")
    """
    check_state(model.state_dict(), state, path)
    model.load_state_dict(dict(state))


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    """Split an optimizer's state into tensors (for safetensors) and JSON (everything else).

    Example:
        >>> opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1, momentum=0.9)
        >>> tensors, doc = optimizer_to_tensors(opt)
        >>> doc["param_groups"][0]["lr"]
        0.1
    """
    sd = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, Tensor):
                tensors[f"optim.{idx}.{key}"] = val
            else:
                scalars.setdefault(str(idx), {})[key] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], doc: dict) -> None:
    """Restore what :func:`optimizer_to_tensors` split.

    Example:
        >>> opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1, momentum=0.9)
        >>> optimizer_from_tensors(opt, *optimizer_to_tensors(opt))
    """
    state: dict[int, dict[str, Any]] = {}
    for key, val in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = val
    for idx, vals in doc.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(vals)
    try:
        optimizer.load_state_dict({"state": state, "param_groups": doc["param_groups"]})
    except (KeyError, ValueError, RuntimeError) as err:
        raise TRPError(f"the optimizer state does not fit this model: {err}") from None

