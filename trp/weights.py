"""Trained weights from a source, for ``trp train --init`` and ``--teacher``: what was read, and its SHA-256.

A source is one of:

* a trp run folder (``checkpoint.safetensors``) or model folder (``model.safetensors``, from
  ``trp compress`` or :func:`trp.save`), or either file itself: read with the checksum check of
  :func:`trp.checkpoint.read_safetensors`; it carries its :class:`~trp.structure.ModelSpec`;
* any other ``.safetensors`` file (a plain ``state_dict``, as ``safetensors.torch.save_file`` writes);
* a ``torch.save``'d ``state_dict`` (or a dict holding one under ``state_dict`` or ``model``), read
  with ``torch.load(weights_only=True)``: tensors and plain containers only, never arbitrary objects.

Every source is read once, from bytes whose SHA-256 is recorded, so a run says exactly where it
started and a resumed run can check that its teacher is the same file.

Example:
    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "w.pt")
    >>> torch.save(nn.Linear(2, 2).state_dict(), p)
    >>> w = read_weights(p)
    >>> w.kind, sorted(w.state), len(w.sha256)
    ('state_dict', ['bias', 'weight'], 64)
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import safetensors.torch
import torch
from torch import Tensor, nn

from trp.bn import fold_bn_
from trp.checkpoint import (CHECKPOINT_FILE, MODEL_FILE, MODEL_PREFIX, check_finite, check_state, find_file,
                            is_trp_file, read_safetensors, strip_prefix)
from trp.errors import TRPError
from trp.structure import ModelSpec, build_model

__all__ = ["Weights", "read_weights", "init_weights_", "init_model", "build_teacher"]


@dataclass(frozen=True)
class Weights:
    """A source's weights: the file read, its SHA-256, the kind of file, the state and (trp files) the spec."""

    source: str
    file: Path
    sha256: str
    kind: str  # "trp", "safetensors" or "state_dict"
    state: Mapping[str, Tensor]
    spec: ModelSpec | None = None

    def record(self) -> dict[str, str]:
        """Where the weights came from, for ``config.json`` and the checkpoint.

        Example:
            >>> Weights("run", Path("run/checkpoint.safetensors"), "ab", "trp", {}).record()["sha256"]
            'ab'
        """
        out = {"source": self.source, "file": str(self.file), "sha256": self.sha256, "kind": self.kind}
        if self.structured:
            out["transforms"] = [t["kind"] for t in self.spec.transforms]  # type: ignore[union-attr]
        return out

    @property
    def structured(self) -> bool:
        """True for a trp model whose structure differs from its architecture's (decomposed, BN folded, ...).

        Example:
            >>> Weights("run", Path("m.safetensors"), "", "trp", {}).structured
            False
        """
        return self.spec is not None and bool(self.spec.transforms)


def _file_of(source: str | Path) -> Path:
    path = Path(source).expanduser()
    if not path.exists():
        raise TRPError(f"no such weights file or folder: {path}")
    return find_file(path, (CHECKPOINT_FILE, MODEL_FILE))  # a run's checkpoint holds its latest state


def _state_dict(obj: Any, file: Path) -> dict[str, Tensor]:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):  # common wrappers of a state_dict
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(k, str) and isinstance(v, Tensor)
                                                         for k, v in obj.items()):
        raise TRPError(f"{file} holds no state_dict (a mapping of names to tensors)")
    if all(k.startswith("module.") for k in obj):  # saved from a DistributedDataParallel wrapper
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def read_weights(source: str | Path, trust: bool = False) -> Weights:
    """Read a source's weights (see the module docstring for the kinds); a bad source is one TRPError line.

    Args:
        source: A folder or file.
        trust: Accept a trp file without trp's checksum.
    """
    file = _file_of(source)
    try:
        blob = file.read_bytes()
    except OSError as err:
        raise TRPError(f"cannot read {file}: {err.strerror or err}") from None
    sha = hashlib.sha256(blob).hexdigest()
    if is_trp_file(file):
        tensors, meta = read_safetensors(file, trust=trust)
        spec = ModelSpec.from_dict(meta["model"]) if isinstance(meta.get("model"), dict) else None
        return Weights(str(source), file, sha, "trp", strip_prefix(MODEL_PREFIX, tensors), spec)
    if file.suffix == ".safetensors":
        try:
            return Weights(str(source), file, sha, "safetensors", _state_dict(safetensors.torch.load(blob), file))
        except TRPError:
            raise
        except Exception as err:  # safetensors raises its own error types for damaged files
            raise TRPError(f"{file} is not a readable safetensors file ({str(err).splitlines()[0]})") from None
    try:
        obj = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as err:  # pickle/zip errors, or an object weights_only refuses to build
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TRPError(f"{file} is not a state_dict torch.load(weights_only=True) can read ({first[:200]})") from None
    return Weights(str(source), file, sha, "state_dict", _state_dict(obj, file))


def init_weights_(model: nn.Module, weights: Weights) -> nn.Module:
    """Load ``weights`` into ``model`` in place: same keys and shapes, or a TRPError naming the first mismatch.

    Example:
        >>> w = Weights("x", Path("x.pt"), "", "state_dict", nn.Linear(2, 3).state_dict())
        >>> init_weights_(nn.Linear(2, 4), w)
        Traceback (most recent call last):
        ...
        trp.errors.TRPError: --init x does not fit this architecture (weight has shape (3, 2), the model expects (4, 2))
    """
    check_state(model.state_dict(), weights.state, f"--init {weights.source}")
    with torch.no_grad():
        model.load_state_dict(dict(weights.state))
    check_finite(model)
    return model


def init_model(weights: Weights, arch: str, num_classes: int, input_shape: list[int]) -> tuple[nn.Module, ModelSpec]:
    """The model a structured ``--init`` source records (e.g. decomposed by ``trp compress`` or
    :func:`trp.save`), built from its spec with its weights: fine-tuning continues in that structure.

    The architecture, classes and input shape must be the run's. Example:
        >>> from trp.models import create
        >>> spec = ModelSpec("resnet20", 10, 3, [3, 32, 32]).then({"kind": "fold-bn", "pairs": [["conv1", "bn1"]]})
        >>> m = build_model(spec)
        >>> w = Weights("m", Path("m"), "", "trp", m.state_dict(), spec)
        >>> type(init_model(w, "resnet20", 10, [3, 32, 32])[0].bn1).__name__
        'Identity'
    """
    spec = weights.spec
    if spec is None:
        raise TRPError(f"--init {weights.source} records no model structure")
    if (spec.arch, spec.num_classes, list(spec.input_shape)) != (arch, num_classes, list(input_shape)):
        raise TRPError(f"--init {weights.source} holds {spec.arch} for {spec.num_classes} classes of "
                       f"{list(spec.input_shape)} inputs; the run trains {arch} for {num_classes} classes of "
                       f"{list(input_shape)}")
    return init_weights_(build_model(spec), weights), spec


def build_teacher(weights: Weights, build: Callable[[], nn.Module], num_classes: int,
                  device: torch.device | str) -> nn.Module:
    """The teacher model, in eval mode on ``device``.

    A trp file rebuilds the model it records (any architecture and structure: dense, SVD-trained or
    compressed); a plain state_dict is loaded into ``build()``, the run's own architecture. A teacher
    only ever runs in eval mode, so its BatchNorm layers are folded into the convs before them
    (:func:`trp.bn.fold_bn_`): the same logits, one memory-bound pass less per layer and batch.

    Example:
        >>> w = Weights("t", Path("t.pt"), "", "state_dict", nn.Linear(2, 3).state_dict())
        >>> build_teacher(w, lambda: nn.Linear(2, 3), 3, "cpu").training
        False
    """
    if weights.spec is not None:
        if weights.spec.num_classes != num_classes:
            raise TRPError(f"--teacher {weights.source} predicts {weights.spec.num_classes} classes; "
                           f"the data has {num_classes}")
        model = build_model(weights.spec)
    else:
        model = build()
    check_state(model.state_dict(), weights.state, f"--teacher {weights.source}")
    model.load_state_dict(dict(weights.state))
    check_finite(model)
    model.eval()
    fold_bn_(model)
    return model.to(device)
