"""Safe artifacts: weights in safetensors, everything else in JSON, every write atomic.

Nothing here unpickles: a checkpoint is a safetensors file whose header metadata holds one JSON
document (``"trp"``) with the model's specification (architecture, structure changes such as a
decomposition plan or SVD parametrization) and, for training checkpoints, the run's state. A file
crafted to execute code when unpickled is simply not a safetensors file and is refused. The header
also carries a SHA-256 of the header and the tensor bytes (``trp_sha256``), so a truncated or
corrupted file is refused instead of loading as wrong weights.

Files:

* ``model.safetensors``: a model (trained or compressed); ``trp.load(folder)`` rebuilds it.
* ``checkpoint.safetensors``: a training run's state after its last completed epoch: model
  weights, optimizer state and TRP state, written as one file so a crash can never pair the model
  of one epoch with the optimizer of another.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from trp.errors import TRPError
from trp.io import atomic_write_bytes

__all__ = [
    "ModelSpec",
    "build_model",
    "save_model",
    "load_model",
    "load",
    "read_safetensors",
    "write_safetensors",
    "optimizer_to_tensors",
    "optimizer_from_tensors",
    "check_finite",
    "load_weights",
    "MODEL_FILE",
    "CHECKPOINT_FILE",
]

MODEL_FILE = "model.safetensors"
CHECKPOINT_FILE = "checkpoint.safetensors"
_FORMAT = "trp-model/1"


@dataclass
class ModelSpec:
    """What is needed to rebuild a model's structure before loading its weights."""

    arch: str
    num_classes: int
    in_channels: int
    input_shape: list[int]
    dataset: str = ""
    svd_scheme: str | None = None  # SVD-training parametrization (trp.svd_training)
    bn_folded: list[list[str]] = field(default_factory=list)  # [conv, bn] pairs folded for inference
    fold_after_plan: bool = False  # BN was folded into the decomposed model (after fine-tuning)
    plan: dict | None = None  # trp.Plan.to_dict() of a decomposed model

    @classmethod
    def from_dict(cls, d: Any) -> "ModelSpec":
        if not isinstance(d, dict) or d.get("format") != _FORMAT:
            raise TRPError("not a trp model (its metadata lacks format 'trp-model/1')")
        try:
            return cls(**{k: v for k, v in d.items() if k != "format"})
        except TypeError as err:
            raise TRPError(f"damaged trp model metadata: {err}") from None

    def to_dict(self) -> dict:
        return {"format": _FORMAT, **asdict(self)}


def build_model(spec: ModelSpec) -> nn.Module:
    """The architecture with the spec's structure (folded BN, SVD layers, decomposition), untrained.

    Example:
        >>> m = build_model(ModelSpec("resnet20", 10, 3, [3, 32, 32]))
        >>> type(m).__name__
        'ResNetCifar'
    """
    from trp.decompose import Plan, apply_plan, fold_bn_structure_
    from trp.models import create

    model = create(spec.arch, num_classes=spec.num_classes, in_channels=spec.in_channels)
    if spec.svd_scheme:
        from trp.svd_training import svd_parametrize_

        svd_parametrize_(model, spec.svd_scheme)
    if spec.bn_folded and not spec.fold_after_plan:
        fold_bn_structure_(model, spec.bn_folded)
    if spec.plan:
        apply_plan(model, Plan.from_dict(spec.plan))
    if spec.bn_folded and spec.fold_after_plan:
        fold_bn_structure_(model, spec.bn_folded)
    return model


def write_safetensors(path: str | Path, tensors: dict[str, Tensor], meta: dict) -> None:
    """Write tensors and a JSON document (metadata key ``trp``) atomically.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "t.safetensors")
        >>> write_safetensors(p, {"w": torch.ones(2)}, {"hello": 1})
        >>> read_safetensors(p)[1]["hello"]
        1
    """
    from safetensors.torch import save

    # Copies: safetensors refuses tensors that share storage, and the caller's model may keep training.
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write_bytes(path, _add_checksum(save(flat, metadata={"trp": json.dumps(meta)})))


_CHECKSUM_KEY = "trp_sha256"


def _digest(header: dict, payload: bytes | memoryview) -> str:
    """SHA-256 of the header (without the checksum itself, keys sorted) and the tensor bytes."""
    header = dict(header)
    header["__metadata__"] = {k: v for k, v in header.get("__metadata__", {}).items() if k != _CHECKSUM_KEY}
    h = hashlib.sha256(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
    h.update(payload)
    return h.hexdigest()


def _add_checksum(blob: bytes) -> bytes:
    # safetensors has no checksum: a flipped byte in the tensor data would load as wrong weights.
    # The digest goes into the header's metadata, so the file stays a plain safetensors file.
    (header_len,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + header_len])
    payload = memoryview(blob)[8 + header_len :]
    header.setdefault("__metadata__", {})[_CHECKSUM_KEY] = _digest(header, payload)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the tensor data 8-byte aligned, as safetensors does
    return struct.pack("<Q", len(raw)) + raw + payload


def read_safetensors(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    """Read what :func:`write_safetensors` wrote; anything else is refused with a TRPError.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "t.safetensors")
        >>> write_safetensors(p, {"w": torch.ones(2)}, {})
        >>> read_safetensors(p)[0]["w"]
        tensor([1., 1.])
    """
    from safetensors.torch import load as st_load

    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TRPError(f"no such file: {path}") from None
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
    expected = header["__metadata__"].get(_CHECKSUM_KEY)  # absent only in files written before checksums
    if expected is not None and _digest(header, memoryview(data)[8 + header_len :]) != expected:
        raise TRPError(f"{path} is damaged (checksum mismatch: its bytes changed after it was written)")
    try:
        tensors = st_load(data)
    except Exception as err:  # safetensors raises its own error types for damaged payloads
        raise TRPError(f"{path} is damaged: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    return tensors, meta


def check_finite(model: nn.Module) -> None:
    """Refuse a model with NaN or infinite weights, naming the first such tensor.

    Example:
        >>> check_finite(nn.Linear(2, 2))
    """
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise TRPError(f"the model has non-finite values (NaN or inf) in {name}")


def load_weights(model: nn.Module, state: dict[str, Tensor], path: Path | str) -> None:
    """Load a state dict strictly; a mismatch is a one-line TRPError naming the first offending key.

    Example:
        >>> m = nn.Linear(2, 2)
        >>> load_weights(m, nn.Linear(2, 2).state_dict(), "example")
    """
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or bad:
        what = (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}" if unexpected
                else f"{bad[0]} has shape {tuple(state[bad[0]].shape)}, the model expects {tuple(own[bad[0]].shape)}")
        raise TRPError(f"{path} does not fit this architecture ({what})")
    model.load_state_dict(state)


def save_model(path: str | Path, model: nn.Module, spec: ModelSpec, extra: dict | None = None) -> None:
    """Save a model's weights and spec as one safetensors file (atomic).

    Example:
        >>> import tempfile, os
        >>> from trp.models import create
        >>> p = os.path.join(tempfile.mkdtemp(), "model.safetensors")
        >>> save_model(p, create("resnet20"), ModelSpec("resnet20", 10, 3, [3, 32, 32]))
        >>> type(load(p)).__name__
        'ResNetCifar'
    """
    meta = {"model": spec.to_dict(), **(extra or {})}
    write_safetensors(path, {f"model.{k}": v for k, v in model.state_dict().items()}, meta)


def _resolve(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        for name in (MODEL_FILE, CHECKPOINT_FILE):
            if (path / name).is_file():
                return path / name
        raise TRPError(f"{path} holds no {MODEL_FILE} or {CHECKPOINT_FILE}")
    if not path.exists():
        raise TRPError(f"no such file or folder: {path}")
    return path


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelSpec, dict]:
    """Rebuild a model from a model file, a training checkpoint, or a folder holding either.

    Returns:
        ``(model, spec, meta)``: the model in eval mode on ``device``, its spec and the file's
        whole metadata document.

    Example:
        >>> import tempfile
        >>> from trp.models import create
        >>> d = tempfile.mkdtemp()
        >>> save_model(d + "/model.safetensors", create("resnet20"), ModelSpec("resnet20", 10, 3, [3, 32, 32]))
        >>> load_model(d)[1].arch
        'resnet20'
    """
    file = _resolve(path)
    tensors, meta = read_safetensors(file)
    spec = ModelSpec.from_dict(meta.get("model"))
    model = build_model(spec)
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    load_weights(model, state, file)
    check_finite(model)
    return model.to(device).eval(), spec, meta


def load(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Load a trained or compressed trp model from its folder or file, in a fresh process.

    Example:
        >>> import tempfile, trp
        >>> from trp.models import create
        >>> d = tempfile.mkdtemp()
        >>> save_model(d + "/model.safetensors", create("resnet20"), ModelSpec("resnet20", 10, 3, [3, 32, 32]))
        >>> trp.load(d).training
        False
    """
    return load_model(path, device)[0]


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
