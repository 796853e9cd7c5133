"""Model sources beyond trp's zoo: torchvision, timm, Hugging Face configs and the user's own factories.

A source is ``KIND:REST`` with KIND one of :data:`SOURCES`; :func:`trp.models.create` is the one
entry point that resolves a source (zoo names included) and calls :func:`build` for these kinds.
Every source is built with random weights: nothing is downloaded, and no checkpoint is ever read
(timm's ``checkpoint_path`` would unpickle one), so the kwargs that would do so are refused.

* ``torchvision:NAME``: ``torchvision.models.get_model(NAME, weights=None, num_classes=..., **kwargs)``,
  a classification model; for ``in_channels != 3`` the first conv is rebuilt.
* ``timm:NAME``: ``timm.create_model(NAME, pretrained=False, num_classes=..., in_chans=..., **kwargs)``.
* ``hf:CONFIG.json``: a transformers image classifier from a local config file (kwargs override its
  fields; ``config={...}`` holds the whole config instead of the file), wrapped in
  :class:`HFClassifier` so its forward returns the logits tensor. Never remote code.
* ``python:MODULE:FUNCTION``: the user's factory, called with the kwargs (plus ``num_classes`` and
  ``in_channels`` where its signature takes them). Building one imports and runs MODULE: a model
  file with a ``python:`` source carries the same trust as a script, so load only files you chose.
  Checking a source (:func:`check_name`) never imports it.

Example:
    >>> import torch
    >>> model = build("torchvision", "resnet18", 4, 1, {}).eval()
    >>> model.conv1.in_channels, model(torch.zeros(1, 1, 32, 32)).shape
    (1, torch.Size([1, 4]))
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from trp.errors import TRPError
from trp.surgery import replace_modules

__all__ = ["SOURCES", "HELP", "HFClassifier", "split", "check_name", "check_kwargs", "portable", "build",
           "first_conv_to"]

#: The source kinds beside the zoo's own names.
SOURCES = ("torchvision", "timm", "hf", "python")
#: How the sources are written, for messages and help texts.
HELP = "torchvision:NAME, timm:NAME, hf:CONFIG.json or python:MODULE:FUNCTION"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_PYTHON = re.compile(rf"{_IDENT}(\.{_IDENT})*:{_IDENT}")
_MAX_CHARS = 1_000_000  # kwargs or config text: far above any config (a ViT's is ~2 kB), far below a memory problem
_MAX_DEPTH = 32
# Keys a source's kwargs may not set: sizes come from the data, and weights are never loaded.
_FROM_DATA = "it comes from the data (num_classes, in_channels)"
_NO_WEIGHTS = "trp builds models with random weights and never loads or downloads any"
_NO_REMOTE = "remote code is never run"
_RESERVED: dict[str, dict[str, str]] = {
    "torchvision": {"weights": _NO_WEIGHTS, "weights_backbone": _NO_WEIGHTS},
    "timm": {"pretrained": _NO_WEIGHTS, "pretrained_cfg": _NO_WEIGHTS, "pretrained_cfg_overlay": _NO_WEIGHTS,
             "checkpoint_path": _NO_WEIGHTS, "cache_dir": _NO_WEIGHTS, "in_chans": _FROM_DATA},
    "hf": {"num_labels": _FROM_DATA, "num_channels": _FROM_DATA, "id2label": _FROM_DATA, "label2id": _FROM_DATA,
           "auto_map": _NO_REMOTE, "trust_remote_code": _NO_REMOTE},
    "python": {},
}
# Keys of a Hugging Face config file that name its writer rather than the model.
_HF_VOLATILE = ("transformers_version", "_name_or_path", "architectures")


def split(source: str) -> tuple[str, str]:
    """``(kind, rest)`` of a source; kind is ``""`` for a plain (zoo) name.

    Example:
        >>> split("python:my_models:make"), split("resnet20")
        (('python', 'my_models:make'), ('', 'resnet20'))
    """
    kind, sep, rest = source.partition(":")
    return (kind, rest) if sep else ("", source)


def _need(package: str, source: str) -> Any:
    try:
        return importlib.import_module(package)
    except ImportError:
        raise TRPError(f"model {source!r} needs the {package} package: pip install {package}") from None


def _unknown(what: str, name: str, known: Sequence[str], where: str) -> TRPError:
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return TRPError(f"unknown {what} {name!r}{hint}; {where}")


def check_name(kind: str, rest: str, source: str, what: str = "model") -> None:
    """Check the part after ``KIND:`` without running user code: torchvision and timm names against
    the installed package, an ``hf:`` path for being non-empty (and transformers for being installed),
    a ``python:`` reference for its syntax only (the module is imported by :func:`build`, never here).

    Example:
        >>> check_name("timm", "vit_tiny_patch16_224", "timm:vit_tiny_patch16_224")
        >>> check_name("python", "my models", "python:my models")
        Traceback (most recent call last):
        ...
        trp.errors.TRPError: model 'python:my models': python: needs MODULE:FUNCTION, e.g. python:my_models:make_net (the module importable from sys.path or the current folder)
    """
    if kind not in SOURCES:
        raise TRPError(f"unknown {what} source {kind + ':'!r} in {source!r}; use a zoo name or {HELP}")
    if kind in ("torchvision", "timm"):
        if not _NAME.fullmatch(rest):
            raise TRPError(f"{what} {source!r}: {kind}: needs a model name, e.g. {kind}:resnet18")
        if kind == "torchvision":
            tvm = _need("torchvision", source).models
            known = tvm.list_models(module=tvm)  # classification models only: trp's loops need logits
            if rest not in known:
                raise _unknown("torchvision classification model", rest, known,
                               "see torchvision.models.list_models(module=torchvision.models)")
        elif not _need("timm", source).is_model(rest):
            raise _unknown("timm model", rest, _need("timm", source).list_models(), "see timm.list_models()")
    elif kind == "hf":
        if not rest.strip():
            raise TRPError(f"{what} {source!r}: hf: needs the path of a config file, e.g. hf:vit_tiny.json")
        _need("transformers", source)
    elif not _PYTHON.fullmatch(rest):
        raise TRPError(f"{what} {source!r}: python: needs MODULE:FUNCTION, e.g. python:my_models:make_net "
                       "(the module importable from sys.path or the current folder)")


def _plain_json(value: Any, where: str, depth: int = 0) -> Any:
    """A deep copy of ``value`` made of JSON types only (tuples become lists)."""
    if depth > _MAX_DEPTH:
        raise TRPError(f"model-kwargs are nested more than {_MAX_DEPTH} levels deep")
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise TRPError(f"model-kwargs {where} must be finite, got {value!r}")
        return value
    if isinstance(value, (list, tuple)):
        return [_plain_json(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        bad = next((k for k in value if not isinstance(k, str)), None)
        if bad is not None:
            raise TRPError(f"model-kwargs keys must be strings, got {bad!r}")
        return {k: _plain_json(v, f"{where}.{k}" if where else k, depth + 1) for k, v in value.items()}
    raise TRPError(f"model-kwargs {where or 'value'} must be a JSON value (number, string, boolean, null, list or "
                   f"object), got {type(value).__name__}")


def check_kwargs(kind: str, kwargs: Any) -> dict:
    """A source's keyword arguments, checked: a JSON object (or its text, as ``--model-kwargs``
    gives it) of plain JSON values, without the keys the data or trp decide.

    Example:
        >>> check_kwargs("timm", '{"img_size": 32, "patch_size": 4}')
        {'img_size': 32, 'patch_size': 4}
        >>> check_kwargs("timm", {"pretrained": True})
        Traceback (most recent call last):
        ...
        trp.errors.TRPError: model-kwargs may not set 'pretrained': trp builds models with random weights and never loads or downloads any
    """
    if kwargs is None:
        return {}
    if isinstance(kwargs, str):
        if len(kwargs) > _MAX_CHARS:
            raise TRPError(f"model-kwargs are longer than {_MAX_CHARS:,} characters")
        try:
            kwargs = json.loads(kwargs)
        except ValueError as err:
            raise TRPError(f"model-kwargs must be a JSON object such as '{{\"width\": 32}}': {err}") from None
    if not isinstance(kwargs, Mapping):
        raise TRPError(f"model-kwargs must be a JSON object such as {{\"width\": 32}}, got {type(kwargs).__name__}")
    out = _plain_json(kwargs, "")
    if len(json.dumps(out)) > _MAX_CHARS:
        raise TRPError(f"model-kwargs are longer than {_MAX_CHARS:,} characters")
    reserved = {"num_classes": _FROM_DATA, "in_channels": _FROM_DATA, **_RESERVED.get(kind, {})}
    bad = sorted(set(out) & set(reserved))
    if bad:
        raise TRPError(f"model-kwargs may not set {bad[0]!r}: {reserved[bad[0]]}")
    if kind == "hf" and "config" in out:
        _hf_config(out["config"], "model-kwargs 'config'")
    return out


def _hf_config(config: Any, where: str) -> dict:
    if not isinstance(config, Mapping) or not isinstance(config.get("model_type"), str):
        raise TRPError(f"{where} must be a Hugging Face config: a JSON object with a 'model_type'")
    if "auto_map" in config:
        raise TRPError(f"{where} has an auto_map (code from the Hub); trp never runs remote code")
    return dict(config)


def _read_hf_config(path: str, source: str) -> dict:
    try:
        file = Path(path)
        if file.stat().st_size > _MAX_CHARS:
            raise TRPError(f"{source}: {path} is larger than {_MAX_CHARS:,} bytes; not a model config")
        doc = json.loads(file.read_text())
    except FileNotFoundError:
        raise TRPError(f"{source}: no such config file: {path}") from None
    except (OSError, ValueError) as err:
        raise TRPError(f"{source}: cannot read {path} as JSON: {err}") from None
    return _hf_config(_plain_json(doc, ""), f"{source}: {path}")


def portable(kind: str, rest: str, kwargs: dict) -> dict:
    """The (checked) kwargs to record in a model file, so that the file alone rebuilds the model:
    for ``hf:`` the config file's content with the overrides applied, as ``{"config": {...}}``.

    Example:
        >>> portable("timm", "resnet18", {"drop_rate": 0.1})
        {'drop_rate': 0.1}
    """
    if kind != "hf" or "config" in kwargs:
        return kwargs
    config = _read_hf_config(rest, f"hf:{rest}")
    config.update(kwargs)
    for key in _HF_VOLATILE:
        config.pop(key, None)
    return {"config": config}


class HFClassifier(nn.Module):
    """A Hugging Face image classifier whose ``forward(images)`` returns the logits tensor.

    transformers models take ``pixel_values=`` and return an output object; trp's loops, profile and
    ONNX export need a tensor. ``config`` is the wrapped model's (its ``image_size`` and
    ``num_channels`` give :func:`trp.tracing.default_input_shape`).

    Example:
        >>> import torch
        >>> vit = {"model_type": "vit", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
        ...        "intermediate_size": 32, "image_size": 16, "patch_size": 8}
        >>> m = build("hf", "vit.json", 3, 3, {"config": vit})
        >>> type(m).__name__, m(torch.zeros(2, 3, 16, 16)).shape
        ('HFClassifier', torch.Size([2, 3]))
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def first_conv_to(model: nn.Module, in_channels: int) -> nn.Module:
    """Replace the model's first Conv2d by one taking ``in_channels`` (torchvision builds RGB models).

    Example:
        >>> first_conv_to(nn.Sequential(nn.Conv2d(3, 4, 3)), 1)[0].in_channels
        1
    """
    name, old = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), ("", None))
    if old is None or old.groups != 1:
        raise TRPError(f"cannot give this model {in_channels} input channels: its first layer is no plain Conv2d")
    new = nn.Conv2d(in_channels, old.out_channels, kernel_size=old.kernel_size,  # type: ignore[arg-type]
                    stride=old.stride, padding=old.padding, dilation=old.dilation,  # type: ignore[arg-type]
                    bias=old.bias is not None, padding_mode=old.padding_mode)
    # torchvision's own init for convs, so the replacement is not the odd one out.
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    replace_modules(model, {name: new})
    return model


def _torchvision(name: str, num_classes: int, in_channels: int, kwargs: dict) -> nn.Module:
    tvm = _need("torchvision", f"torchvision:{name}").models
    model: nn.Module = tvm.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    return first_conv_to(model, in_channels) if in_channels != 3 else model


def _timm(name: str, num_classes: int, in_channels: int, kwargs: dict) -> nn.Module:
    timm = _need("timm", f"timm:{name}")
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs)


def _hf(path: str, num_classes: int, in_channels: int, kwargs: dict) -> nn.Module:
    transformers = _need("transformers", f"hf:{path}")
    config = dict(kwargs["config"]) if "config" in kwargs else _read_hf_config(path, f"hf:{path}")
    config.update({k: v for k, v in kwargs.items() if k != "config"})
    for key in (*_HF_VOLATILE, *_RESERVED["hf"]):
        config.pop(key, None)
    model_type = config.pop("model_type")
    try:
        cfg = transformers.AutoConfig.for_model(model_type, num_labels=num_classes, num_channels=in_channels, **config)
    except ValueError:
        raise TRPError(f"hf:{path}: transformers knows no model type {model_type!r}") from None
    try:
        model = transformers.AutoModelForImageClassification.from_config(cfg, trust_remote_code=False)
    except ValueError:
        raise TRPError(f"hf:{path}: model type {model_type!r} has no image-classification model in transformers "
                       "(trp trains image classifiers)") from None
    return HFClassifier(model)


def _python(ref: str, num_classes: int, in_channels: int, kwargs: dict) -> nn.Module:
    module_name, _, func_name = ref.rpartition(":")
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:  # the `trp` command's sys.path lacks the current folder that `python script.py` users expect
        sys.path.append(cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise TRPError(f"python:{ref}: cannot import {module_name} ({err}); it must be importable from sys.path "
                       "or the current folder") from None
    finally:
        if added:
            sys.path.remove(cwd)
    factory = getattr(module, func_name, None)
    if not callable(factory):
        raise TRPError(f"python:{ref}: {module_name} has no function {func_name!r}")
    try:
        params = dict(inspect.signature(factory).parameters)
    except (TypeError, ValueError):  # no signature (a builtin): pass only the user's kwargs
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    sizes = {k: v for k, v in (("num_classes", num_classes), ("in_channels", in_channels)) if takes_any or k in params}
    return factory(**kwargs, **sizes)


_BUILDERS: dict[str, Callable[[str, int, int, dict], nn.Module]] = {
    "torchvision": _torchvision, "timm": _timm, "hf": _hf, "python": _python}


def _brief(kwargs: dict) -> str:
    text = json.dumps(kwargs)
    return text if len(text) <= 120 else text[:117] + "..."


def build(kind: str, rest: str, num_classes: int, in_channels: int, kwargs: dict) -> nn.Module:
    """Build a source's model with random weights (the arguments checked by the caller,
    :func:`trp.models.create`); whatever the library or the user's factory raises becomes one
    TRPError line, with the cause chained.

    Example:
        >>> build("torchvision", "resnet18", 10, 3, {"width_per_group": 3})
        Traceback (most recent call last):
        ...
        trp.errors.TRPError: torchvision:resnet18 could not be built with model-kwargs {"width_per_group": 3}: ValueError: BasicBlock only supports groups=1 and base_width=64
    """
    source = f"{kind}:{rest}"
    try:
        model = _BUILDERS[kind](rest, num_classes, in_channels, kwargs)
    except TRPError:
        raise
    except Exception as err:  # the library or the user's factory refused: one line, the cause chained
        first = (str(err).strip().splitlines() or [""])[0]
        raise TRPError(f"{source} could not be built with model-kwargs {_brief(kwargs)}: "
                       f"{type(err).__name__}: {first}") from err
    if not isinstance(model, nn.Module):
        raise TRPError(f"{source} returned a {type(model).__name__}, not a torch.nn.Module")
    return model
