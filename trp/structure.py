"""A model's structure as data: the architecture plus an ordered list of transforms, replayed.

A trained or compressed model is stored without pickled modules: its file holds the weights and a
:class:`ModelSpec`, i.e. the architecture (``arch``: a source of :func:`trp.models.create` such as
``resnet20`` or ``timm:vit_tiny_patch16_224``, its JSON ``kwargs``, ``num_classes``,
``in_channels``; or ``"instance"`` for a model :func:`save` wrote from an instance, rebuilt on one
the user passes) and the structural changes made to it, in order, as JSON objects::

    {"kind": "unfuse-attention", "names": ["enc.attn"]} # nn.MultiheadAttention as 4 Linears (trp.attention)
    {"kind": "svd-parametrize", "scheme": "channel"}   # SVD training (trp.svd_training)
    {"kind": "fold-bn", "pairs": [["conv1", "bn1"]]}   # BatchNorm folded into convs (trp.bn)
    {"kind": "decompose", "plan": {...}}               # a trp.plan.Plan.to_dict() (trp.plan)

:func:`build_model` creates the architecture and replays every transform through
:data:`TRANSFORMS`, the one registry of kinds; each entry checks its JSON and calls the module that
owns the change. :mod:`trp.saving` writes and reads model files with it. A file is checked before anything is
allocated for it: every number in the spec is a whole number within sane limits, and the model's
shapes, built on PyTorch's ``meta`` device (shapes without storage), must be those of the file's
own tensors, so a crafted ``num_classes`` or plan rank of 1e10 is refused, not allocated.

Example:
    >>> spec = ModelSpec("resnet20", 10, 3, [3, 32, 32], dataset="cifar10").then({"kind": "fold-bn", "pairs": [["conv1", "bn1"]]})
    >>> type(build_model(spec).bn1).__name__
    'Identity'
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from trp import models, schemes
from trp.attention import unfuse_attention_
from trp.bn import fold_bn_structure_
from trp.checkpoint import check_state
from trp.errors import TRPError
from trp.plan import Plan, apply_plan
from trp.svd_training import svd_parametrize_, training_schemes
from trp.validate import boolean, choice, text, whole

__all__ = [
    "INSTANCE",
    "ModelSpec",
    "Transform",
    "TRANSFORMS",
    "FORMAT",
    "check_transform",
    "build_model",
    "replay",
    "check_fits",
    "MAX_CLASSES",
    "MAX_CHANNELS",
    "MAX_SIDE",
    "MAX_SAMPLE",
]

FORMAT = "trp-model/2"
#: The ``arch`` of a model saved from an instance (:func:`save`): rebuilt only on a given instance.
INSTANCE = "instance"
_FORMAT_V1 = "trp-model/1"  # svd_scheme / bn_folded / fold_after_plan / plan fields; still read

# Sane limits, checked before anything is built: far above any real classifier, far below what
# would take a machine's memory (ImageNet-21k has 21,841 classes; hyperspectral images ~400 bands).
MAX_CLASSES = 1_000_000
MAX_CHANNELS = 4096
MAX_SIDE = 16384
MAX_SAMPLE = 2**26  # values in one input sample (C·H·W), e.g. 3×4096×4096 fits
_MAX_TRANSFORMS = 64
_MAX_PAIRS = 100_000


# ------------------------------------------------------------------------------------ transforms


@dataclass(frozen=True)
class Transform:
    """One kind of structural change: how its JSON is checked and how it is replayed on a model.

    Calling it checks the parameters, then applies them: ``TRANSFORMS[kind](model, params)``.
    ``shapes_only`` says that applying it needs the weights' shapes, not their values, so it can
    be replayed on the meta device (an SVD, for instance, needs values).
    """

    check: Callable[[Mapping[str, Any]], dict]
    apply: Callable[[nn.Module, dict], nn.Module]
    shapes_only: bool

    def __call__(self, model: nn.Module, params: Mapping[str, Any]) -> nn.Module:
        return self.apply(model, self.check(params))


def _keys(t: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(t) - allowed)
    missing = sorted(allowed - set(t))
    if unknown or missing:
        what = f"unknown field {unknown[0]!r}" if unknown else f"no field {missing[0]!r}"
        raise TRPError(f"damaged transform {t.get('kind')!r}: {what}")


def _check_svd(t: Mapping[str, Any]) -> dict:
    _keys(t, {"kind", "scheme"})
    return {"kind": "svd-parametrize", "scheme": choice(t["scheme"], "SVD-training scheme", training_schemes())}


def _check_fold(t: Mapping[str, Any]) -> dict:
    _keys(t, {"kind", "pairs"})
    pairs = t["pairs"]
    if not isinstance(pairs, (list, tuple)) or len(pairs) > _MAX_PAIRS:
        raise TRPError(f"damaged transform 'fold-bn': pairs must be a list of [conv, bn] names, got {type(pairs).__name__}")
    out = []
    for pair in pairs:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(n, str) for n in pair):
            raise TRPError(f"damaged transform 'fold-bn': {pair!r} is not a [conv, bn] pair of names")
        out.append([pair[0], pair[1]])
    return {"kind": "fold-bn", "pairs": out}


def _full_rank(scheme: str, weight_shape: Any, name: str) -> int:
    """The largest rank a layer of this weight shape has in ``scheme``, computed on a meta tensor."""
    if not isinstance(weight_shape, list) or len(weight_shape) not in (2, 4):
        raise TRPError(f"damaged trp plan: layer {name!r} has weight shape {weight_shape!r}")
    shape = [whole(n, f"plan layer {name!r} weight shape", low=1) for n in weight_shape]
    try:  # meta: the layout's matrix shape without allocating the weight
        matrix = schemes.get(scheme).to_matrix(torch.empty(shape, device="meta"))
    except (RuntimeError, ValueError, IndexError):
        raise TRPError(f"damaged trp plan: layer {name!r} of shape {shape} has no {scheme} layout") from None
    return min(matrix.shape[-2], matrix.shape[-1])


def _check_decompose(t: Mapping[str, Any]) -> dict:
    _keys(t, {"kind", "plan"})
    plan = t["plan"].to_dict() if isinstance(t["plan"], Plan) else t["plan"]
    parsed = Plan.from_dict(plan)
    for lp in parsed.layers:
        # A rank above the layer's full rank is never planned; refusing it bounds what
        # apply_plan allocates by the (checked) size of the dense layer.
        if lp.decomposed and lp.rank > _full_rank(lp.scheme, lp.weight_shape, lp.name):
            raise TRPError(f"damaged trp plan: layer {lp.name!r} has rank {lp.rank}, above its full rank")
    return {"kind": "decompose", "plan": parsed.to_dict()}


def _apply_svd(model: nn.Module, t: dict) -> nn.Module:
    return svd_parametrize_(model, t["scheme"])


def _apply_fold(model: nn.Module, t: dict) -> nn.Module:
    try:
        return fold_bn_structure_(model, t["pairs"])
    except AttributeError:  # a pair naming a module that is no conv (e.g. a decomposed one)
        raise TRPError("the folded-BN list does not fit this model (a pair does not name a conv)") from None


def _apply_decompose(model: nn.Module, t: dict) -> nn.Module:
    return apply_plan(model, Plan.from_dict(t["plan"]))


#: The one registry of transform kinds (each calls the module that owns the change).
def _check_unfuse(t: Mapping[str, Any]) -> dict:
    _keys(t, {"kind", "names"})
    names = t["names"]
    if not isinstance(names, (list, tuple)) or len(names) > _MAX_PAIRS or not all(isinstance(n, str) for n in names):
        raise TRPError("damaged transform 'unfuse-attention': names must be a list of module names")
    return {"kind": "unfuse-attention", "names": list(names)}


def _apply_unfuse(model: nn.Module, t: dict) -> nn.Module:
    unfuse_attention_(model, t["names"])
    return model


TRANSFORMS: Mapping[str, Transform] = {
    "unfuse-attention": Transform(_check_unfuse, _apply_unfuse, shapes_only=True),
    "svd-parametrize": Transform(_check_svd, _apply_svd, shapes_only=False),
    "fold-bn": Transform(_check_fold, _apply_fold, shapes_only=True),
    "decompose": Transform(_check_decompose, _apply_decompose, shapes_only=True),
}


def check_transform(t: Any) -> dict:
    """A transform's JSON, checked strictly and normalized (a :class:`~trp.plan.Plan` becomes its dict).

    Example:
        >>> check_transform({"kind": "fold-bn", "pairs": [("conv1", "bn1")]})
        {'kind': 'fold-bn', 'pairs': [['conv1', 'bn1']]}
        >>> check_transform({"kind": "prune"})
        Traceback (most recent call last):
        ...
        trp.errors.TRPError: unknown transform kind 'prune'; choose one of: unfuse-attention, svd-parametrize, fold-bn, decompose
    """
    if not isinstance(t, Mapping):
        raise TRPError(f"a transform must be a JSON object, got {type(t).__name__}")
    return TRANSFORMS[choice(t.get("kind"), "transform kind", tuple(TRANSFORMS))].check(t)


# ------------------------------------------------------------------------------------ the spec


def _size(x: Any, what: str, high: int) -> int:
    if isinstance(x, str):  # whole() reads "1e3" from a command line; a file must hold a number
        raise TRPError(f"{what} must be a whole number, got {x!r}")
    return whole(x, what, low=1, high=high)


@dataclass(frozen=True)
class ModelSpec:
    """What is needed to rebuild a model's structure before loading its weights.

    Every field is checked on construction (also when read from a file); ``transforms`` holds the
    structural changes in the order they were made (see :data:`TRANSFORMS`).

    Example:
        >>> spec = ModelSpec("resnet20", 10, 3, [3, 32, 32]).then({"kind": "svd-parametrize", "scheme": "channel"})
        >>> spec.find("svd-parametrize")["scheme"], spec.find("decompose")
        ('channel', None)
        >>> ModelSpec.from_dict(spec.to_dict()) == spec
        True
    """

    arch: str
    num_classes: int
    in_channels: int
    input_shape: list[int]
    dataset: str = ""
    transforms: list[dict] = field(default_factory=list)
    kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        put = object.__setattr__  # frozen: normalize the fields once, here
        if self.arch == INSTANCE:
            if self.kwargs:
                raise TRPError("a model saved from an instance has no kwargs")
        else:  # no user code runs here: a python: source is imported only when the model is built
            put(self, "kwargs", models.check(self.arch, self.kwargs, "architecture"))
        put(self, "num_classes", _size(self.num_classes, "num_classes", MAX_CLASSES))
        put(self, "in_channels", _size(self.in_channels, "in_channels", MAX_CHANNELS))
        shape = self.input_shape
        # Image sources take [C, H, W]; a user's own model (instance, python:) any sample shape.
        ranks = (1, 2, 3, 4) if self.arch == INSTANCE or self.arch.startswith("python:") else (3,)
        if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence) or len(shape) not in ranks:
            raise TRPError(f"input_shape must be [channels, height, width], got {shape!r}")
        dims = [_size(n, "input_shape", MAX_SIDE) for n in shape]
        if len(dims) == 3 and dims[0] != self.in_channels:
            raise TRPError(f"input_shape {dims} does not start with in_channels {self.in_channels}")
        if math.prod(dims) > MAX_SAMPLE:
            raise TRPError(f"input_shape {dims} is too large (more than {MAX_SAMPLE:,} values per sample)")
        put(self, "input_shape", dims)
        put(self, "dataset", text(self.dataset, "dataset"))
        ts = self.transforms
        if isinstance(ts, (str, bytes, Mapping)) or not isinstance(ts, Sequence) or len(ts) > _MAX_TRANSFORMS:
            raise TRPError(f"transforms must be a list of at most {_MAX_TRANSFORMS} transforms, got {type(ts).__name__}")
        put(self, "transforms", [check_transform(t) for t in ts])

    def find(self, kind: str) -> dict | None:
        """The first transform of this kind (a copy), or None.

        Example:
            >>> ModelSpec("resnet20", 10, 3, [3, 32, 32]).find("fold-bn") is None
            True
        """
        choice(kind, "transform kind", tuple(TRANSFORMS))
        return next((copy.deepcopy(t) for t in self.transforms if t["kind"] == kind), None)

    def then(self, transform: Mapping[str, Any]) -> "ModelSpec":
        """A new spec with ``transform`` appended (checked; a ``plan`` may be a :class:`~trp.plan.Plan`).

        Example:
            >>> ModelSpec("resnet20", 10, 3, [3, 32, 32]).then({"kind": "fold-bn", "pairs": []}).transforms
            [{'kind': 'fold-bn', 'pairs': []}]
        """
        return replace(self, transforms=[*self.transforms, transform])

    def without(self, kind: str) -> "ModelSpec":
        """A new spec without the transforms of this kind (e.g. SVD factors turned back into dense weights).

        Example:
            >>> s = ModelSpec("resnet20", 10, 3, [3, 32, 32]).then({"kind": "svd-parametrize", "scheme": "channel"})
            >>> s.without("svd-parametrize").transforms
            []
        """
        choice(kind, "transform kind", tuple(TRANSFORMS))
        return replace(self, transforms=[t for t in self.transforms if t["kind"] != kind])

    def to_dict(self) -> dict:
        """The JSON document stored in a file's metadata (format ``trp-model/2``).

        Example:
            >>> ModelSpec("resnet20", 10, 3, [3, 32, 32]).to_dict()["format"]
            'trp-model/2'
        """
        kwargs = {"kwargs": copy.deepcopy(self.kwargs)} if self.kwargs else {}  # zoo files stay as they were
        return {"format": FORMAT, "arch": self.arch, "num_classes": self.num_classes, "in_channels": self.in_channels,
                "input_shape": list(self.input_shape), "dataset": self.dataset,
                "transforms": copy.deepcopy(self.transforms), **kwargs}

    @classmethod
    def from_dict(cls, d: Any) -> "ModelSpec":
        """Read a spec strictly: format ``trp-model/2``, or ``trp-model/1`` converted to transforms.

        Example:
            >>> old = {"format": "trp-model/1", "arch": "resnet20", "num_classes": 10, "in_channels": 3,
            ...        "input_shape": [3, 32, 32], "bn_folded": [["conv1", "bn1"]], "fold_after_plan": False}
            >>> ModelSpec.from_dict(old).transforms
            [{'kind': 'fold-bn', 'pairs': [['conv1', 'bn1']]}]
        """
        fmt = d.get("format") if isinstance(d, dict) else None
        if fmt == _FORMAT_V1:
            d = _from_v1(d)
        elif fmt != FORMAT:
            raise TRPError(f"not a trp model (its metadata has no known format: {FORMAT} or {_FORMAT_V1})")
        fields = {k: v for k, v in d.items() if k != "format"}
        unknown = sorted(set(fields) - {"arch", "num_classes", "in_channels", "input_shape", "dataset", "transforms",
                                        "kwargs"})
        missing = sorted({"arch", "num_classes", "in_channels", "input_shape"} - set(fields))
        if unknown:
            raise TRPError(f"damaged trp model metadata: unknown field {unknown[0]!r}")
        if missing:
            raise TRPError(f"damaged trp model metadata: no field {missing[0]!r}")
        return cls(**fields)


def _from_v1(d: dict) -> dict:
    """``trp-model/1``'s fields as transforms, in the order its loader applied them."""
    old = {"svd_scheme", "bn_folded", "fold_after_plan", "plan"}
    unknown = sorted(set(d) - old - {"format", "arch", "num_classes", "in_channels", "input_shape", "dataset"})
    if unknown:
        raise TRPError(f"damaged trp model metadata: unknown field {unknown[0]!r}")
    transforms: list[dict] = []
    if d.get("svd_scheme") is not None:
        transforms.append({"kind": "svd-parametrize", "scheme": d["svd_scheme"]})
    pairs = d.get("bn_folded") or []
    fold = [{"kind": "fold-bn", "pairs": pairs}] if pairs else []
    after = boolean(d.get("fold_after_plan", False), "fold_after_plan")
    if not after:
        transforms += fold
    if d.get("plan") is not None:
        transforms.append({"kind": "decompose", "plan": d["plan"]})
    if after:
        transforms += fold
    return {**{k: v for k, v in d.items() if k not in old}, "format": FORMAT, "transforms": transforms}


# ------------------------------------------------------------------------------------ building


def replay(spec: ModelSpec, model: nn.Module) -> nn.Module:
    """Replay the spec's transforms, in order, on ``model`` (a fresh instance of its architecture).

    Example:
        >>> spec = ModelSpec("resnet20", 10, 3, [3, 32, 32]).then({"kind": "fold-bn", "pairs": [["conv1", "bn1"]]})
        >>> type(replay(spec, models.create("resnet20")).bn1).__name__
        'Identity'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for t in spec.transforms:
        model = TRANSFORMS[t["kind"]].apply(model, t)
    return model


def build_model(spec: ModelSpec) -> nn.Module:
    """The architecture with the spec's transforms replayed in order, untrained, on the CPU.

    The architecture is :func:`trp.models.create` of the spec's source and kwargs; a ``python:``
    source imports and runs the user's module here (see :func:`trp.models.create`).

    Example:
        >>> spec = ModelSpec("resnet20", 10, 3, [3, 32, 32]).then({"kind": "fold-bn", "pairs": [["conv1", "bn1"]]})
        >>> type(build_model(spec).bn1).__name__
        'Identity'
    """
    if spec.arch == INSTANCE:
        raise TRPError("this model was saved from a model instance (trp.save): load it with "
                       "trp.load(path, model=<a fresh instance of that model>)")
    return replay(spec, models.create(spec.arch, num_classes=spec.num_classes, in_channels=spec.in_channels,
                                      **spec.kwargs))


class _NoRandomInit(TorchFunctionMode):
    """Skip random initializers (``normal_``, ``uniform_``, ...) on meta tensors.

    A meta tensor has a shape and no values, so drawing random values into it changes nothing
    (these are in-place and keep the shape); running them would load PyTorch's Python meta kernels,
    about a second of start-up for every process that loads a model.
    """

    _SKIP = frozenset({"normal_", "uniform_", "trunc_normal_", "log_normal_", "exponential_", "geometric_",
                       "cauchy_", "random_", "bernoulli_", "orthogonal_"})

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if getattr(func, "__name__", "") in self._SKIP and args and isinstance(args[0], Tensor) and args[0].is_meta:
            return args[0]
        return func(*args, **(kwargs or {}))


def _skeleton(spec: ModelSpec) -> tuple[nn.Module | None, bool]:
    """The spec's model on the meta device (None if it cannot be built there), and whether every
    transform could be replayed there."""
    if spec.arch == INSTANCE:
        return None, False
    with torch.device("meta"), _NoRandomInit():
        try:
            model = models.create(spec.arch, num_classes=spec.num_classes, in_channels=spec.in_channels, **spec.kwargs)
        except TRPError:
            if spec.arch in models.MODELS:
                raise
            # A source whose constructor needs real values (``.item()``...): the real build is
            # checked instead, by load_weights; a bad source fails there with the same message.
            return None, False
        for t in spec.transforms:
            transform = TRANSFORMS[t["kind"]]
            if not transform.shapes_only:
                return model, False
            model = transform.apply(model, t)
    return model, True


def check_fits(spec: ModelSpec, state: Mapping[str, Tensor], where: str | Path) -> None:
    """Refuse a state dict whose keys or shapes are not the spec's model's, before allocating it.

    The model is built on PyTorch's meta device (shapes only), so a spec that describes a huge
    model next to small tensors costs nothing to refuse. From the first transform that needs real
    values (see :attr:`Transform.shapes_only`) on, only the tensors under the same name in both
    are compared; the limits of :class:`ModelSpec` bound what the real build allocates. A model
    saved from an instance, or a source that cannot be built on the meta device, is checked
    after its real build (:func:`trp.checkpoint.load_weights`).

    Example:
        >>> from trp.models import create
        >>> big = ModelSpec("resnet20", 100_000, 3, [3, 32, 32])
        >>> check_fits(big, create("resnet20").state_dict(), "f")
        Traceback (most recent call last):
        ...
        trp.errors.TRPError: f does not fit this architecture (fc.weight has shape (10, 64), the model expects (100000, 64))
    """
    skeleton, complete = _skeleton(spec)
    if skeleton is None:
        return
    own = skeleton.state_dict()
    if not complete:
        shared = own.keys() & state.keys()
        own, state = {k: own[k] for k in shared}, {k: state[k] for k in shared}
    check_state(own, state, where)


# ------------------------------------------------------------------------------------ files
