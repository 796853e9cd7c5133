"""Model files: save a model with its :class:`~trp.structure.ModelSpec`, load it back in a fresh process.

``model.safetensors`` holds the weights and the spec (architecture + transforms, see
:mod:`trp.structure`) in the checksummed file format of :mod:`trp.checkpoint`; loading rebuilds the
structure from the spec, checks the file's tensors against it before anything is allocated, and
loads the weights. :func:`save` / :func:`load` with ``model=`` serve models you hold as instances.

Example:
    >>> import tempfile
    >>> from trp.models import create
    >>> spec = ModelSpec("resnet20", 10, 3, [3, 32, 32], dataset="cifar10")
    >>> d = tempfile.mkdtemp()
    >>> save_model(d + "/model.safetensors", create("resnet20"), spec)
    >>> model, loaded, meta = load_model(d)
    >>> loaded == spec, model.training
    (True, False)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from trp import models
from trp.attention import UnfusedMultiheadAttention
from trp.checkpoint import (MODEL_FILE, MODEL_PREFIX, check_finite, find_file, load_weights, read_safetensors,
                            strip_prefix, with_prefix, write_safetensors)
from trp.errors import TRPError
from trp.tracing import example_input, sample_shape
from trp.plan import Plan
from trp.structure import INSTANCE, ModelSpec, build_model, check_fits, replay
from trp.surgery import get_module
from trp.validate import boolean

__all__ = ["save_model", "load_model", "load", "save"]


def save_model(path: str | Path, model: nn.Module, spec: ModelSpec, extra: dict | None = None) -> None:
    """Save a model's weights and spec as one checksummed safetensors file (atomic).

    The weights are checked against the spec first, so a file trp writes always loads again.

    Example:
        >>> import tempfile, os
        >>> from trp.models import create
        >>> p = os.path.join(tempfile.mkdtemp(), "model.safetensors")
        >>> save_model(p, create("resnet20"), ModelSpec("resnet20", 10, 3, [3, 32, 32]))
        >>> type(load(p)).__name__
        'ResNetCifar'
    """
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"spec must be a ModelSpec, got {type(spec).__name__}")
    state = model.state_dict()
    check_fits(spec, state, f"the model to save as {path}")
    write_safetensors(path, with_prefix(MODEL_PREFIX, state), {"model": spec.to_dict(), **(extra or {})})


def load_model(path: str | Path, device: str | torch.device = "cpu", trust: bool = False,
               model: nn.Module | None = None) -> tuple[nn.Module, ModelSpec, dict]:
    """Rebuild a model from a model file, a training checkpoint, or a folder holding either.

    A file whose source is ``python:MODULE:FUNCTION`` imports and runs MODULE (it must be importable
    from ``sys.path`` or the current folder): load such files only when you chose them, as you would
    run a script. Nothing is ever unpickled.

    Args:
        path: The file, or a folder holding ``model.safetensors`` (else ``checkpoint.safetensors``).
        device: Where the model goes.
        trust: Accept a file without trp's checksum (see :func:`trp.checkpoint.read_safetensors`).
        model: A fresh instance of the architecture, used instead of building it (required for a
            file :func:`save` wrote from an instance); the transforms are replayed on it in place.

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
    file = find_file(path)
    tensors, meta = read_safetensors(file, trust=boolean(trust, "trust"))
    try:
        spec = ModelSpec.from_dict(meta.get("model"))
    except TRPError as err:
        raise TRPError(f"{file}: {err}") from None
    state = strip_prefix(MODEL_PREFIX, tensors)
    if model is None:
        check_fits(spec, state, file)  # before anything is allocated for the spec's sizes
        model = build_model(spec)
    else:  # the user's own instance: its sizes are the user's; the keys are checked strictly below
        model = replay(spec, model)
    load_weights(model, state, file)
    check_finite(model)
    return model.to(device).eval(), spec, meta


def load(path: str | Path, device: str | torch.device = "cpu", trust: bool = False,
         model: nn.Module | None = None) -> nn.Module:
    """Load a trained or compressed trp model from its folder or file, in a fresh process.

    ``model``: a fresh instance of the architecture, for files :func:`save` wrote from an instance
    (see :func:`load_model`, also for what loading a ``python:`` source runs).

    Example:
        >>> import tempfile, trp
        >>> from trp.models import create
        >>> d = tempfile.mkdtemp()
        >>> save_model(d + "/model.safetensors", create("resnet20"), ModelSpec("resnet20", 10, 3, [3, 32, 32]))
        >>> trp.load(d).training
        False
    """
    return load_model(path, device, trust, model)[0]


def _count_classes(model: nn.Module, shape: list[int]) -> int:
    """The size of the model's output's last dimension on one example (its number of classes)."""
    was = model.training
    try:
        with torch.no_grad():
            out = model.eval()(example_input(model, shape))
    except Exception as err:  # any failure of the user's forward: one line, the cause chained
        raise TRPError(f"cannot run the model on an input of shape {shape} ({type(err).__name__}); pass "
                       "input_shape (one sample's shape) and num_classes") from err
    finally:
        model.train(was)
    out = getattr(out, "logits", out)
    if not isinstance(out, Tensor) or out.dim() < 1:
        raise TRPError(f"the model's output is a {type(out).__name__}, not logits; pass num_classes")
    return int(out.shape[-1])


def save(model: nn.Module, folder: str | Path, plan: Plan | None = None, input_shape: Sequence[int] | None = None,
         *, num_classes: int | None = None, source: str | None = None, kwargs: Mapping[str, Any] | None = None,
         dataset: str = "") -> Path:
    """Save a model you hold (any ``nn.Module``) as ``folder/model.safetensors``, plus ``plan.json``.

    Without ``source`` the spec's architecture is ``"instance"``: ``trp.load(folder,
    model=fresh_instance)`` replays the plan on your fresh instance and loads the weights (every key
    checked). With ``source`` (a :func:`trp.models.create` source, with its ``kwargs``),
    ``trp.load(folder)`` alone rebuilds it, as ``trp eval`` and ``trp export`` do.

    Args:
        model: The model, already decomposed with ``plan`` if one is given (``trp.decompose_``).
        folder: Where to write (created if missing).
        plan: The plan the model was decomposed with, or None.
        input_shape: One sample's shape; default what the model declares (torchvision ``image_size``,
            timm ``img_size``, Hugging Face ``config.image_size``, see
            :func:`trp.tracing.default_input_shape`).
        num_classes: Output classes; default the last dimension of the model's output on one example.
        source, kwargs: How to build the architecture, if :func:`trp.models.create` can.
        dataset: A name recorded for ``trp eval`` (optional).

    Returns:
        The model file's path.

    Example:
        >>> import tempfile, trp
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.LazyLinear(4))
        >>> p = trp.plan(net, rank=trp.fixed(2), input_shape=(3, 16, 16))
        >>> d = tempfile.mkdtemp()
        >>> _ = save(trp.decompose_(net, p), d, p, (3, 16, 16))
        >>> fresh = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(1152, 4))
        >>> type(trp.load(d, model=fresh)[2]).__name__
        'Sequential'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise TRPError(f"{folder} exists and is not a folder")
    shape = list(sample_shape(model, input_shape))
    classes = _count_classes(model, shape) if num_classes is None else num_classes
    spec = ModelSpec(INSTANCE if source is None else source, classes, shape[0] if len(shape) == 3 else 1, shape,
                     dataset=dataset, kwargs=models.portable_kwargs(source, kwargs) if source is not None else {})
    unfused = [name for name, m in model.named_modules() if isinstance(m, UnfusedMultiheadAttention)]
    if unfused:  # trp.unfuse_attention_ was applied: the fresh model needs it replayed first
        spec = spec.then({"kind": "unfuse-attention", "names": unfused})
    if plan is not None:
        if not isinstance(plan, Plan):
            raise TypeError(f"plan must be a trp.Plan, got {type(plan).__name__}")
        for lp in plan.layers:
            if lp.decomposed and type(get_module(model, lp.name)).__name__ == lp.type:
                raise TRPError(f"layer {lp.name!r} is still dense: decompose the model with trp.decompose_(model, "
                               "plan) before saving it")
        spec = spec.then({"kind": "decompose", "plan": plan})
    folder.mkdir(parents=True, exist_ok=True)
    save_model(folder / MODEL_FILE, model, spec)
    if plan is not None:
        plan.to_json(folder / "plan.json")
    return folder / MODEL_FILE
