"""The settings of a training run: :class:`TrainConfig`, validated on construction, and JSON recipes.

:mod:`trp.train` runs what a :class:`TrainConfig` describes; the command line (:mod:`trp.cli`) and
recipe files (``configs/*.json``) both end here, so every check lives in one place. Besides the
method's own settings a run may start from trained weights (``init``), learn from a teacher
(``teacher``, :mod:`trp.distill`), hold out a validation split (``val_split``, :mod:`trp.data.split`)
and, for TRP, aim at a measured-time speed-up (``latency_speedup``).

Example:
    >>> TrainConfig(init="runs/dense", val_split=0.1, epochs=5).to_dict()["init"]
    'runs/dense'
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import torch

from trp import methods, models, runtimes
from trp.data import DATASETS
from trp.distill import check_settings
from trp.svd_losses import DEFAULT_SPARSITY
from trp.errors import TRPError
from trp.validate import MAX_WHOLE, boolean, choice, number, text, whole

__all__ = ["TrainConfig", "METHODS", "RESUMABLE", "SEED_LIMIT", "load_config_file"]

METHODS = methods.names()
#: Settings ``--resume`` may change: train longer, or continue on another device or data copy.
#: The teacher may move too: a resumed run reloads it from its source and checks its SHA-256.
RESUMABLE = ("epochs", "device", "data_dir", "download", "teacher")
SEED_LIMIT = 2**32 - 1  # the data order seeds a generator with seed·100003 + epoch, which must fit 64 bits

# Number fields: (low, high, low_open); whole-number fields: (low, high).
_NUMBERS = {"energy": (0.0, 1.0, True), "energy_ramp": (0.0, MAX_WHOLE, False), "nuclear": (0.0, None, False),
            "orth": (0.0, None, False), "lr": (0.0, None, True), "momentum": (0.0, None, False),
            "weight_decay": (0.0, None, False), "val_split": (0.0, 1.0, False)}
_WHOLES = {"period": (1, None), "epochs": (1, None), "batch_size": (1, None), "seed": (0, SEED_LIMIT),
           "latency_batch": (1, None)}
_DISTILL_DEFAULTS = (0.5, 4.0)  # (weight, temperature): Hinton et al.'s soft targets, T = 4 as common on CIFAR


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run; validated on construction (:mod:`trp.validate`).

    Example:
        >>> TrainConfig(model="resnet20", dataset="digits", epochs=2).method
        'trp'
    """

    model: str = "resnet20"  # a zoo name, torchvision:NAME, timm:NAME, hf:CONFIG.json or python:MODULE:FUNCTION
    model_kwargs: Mapping[str, Any] | None = None  # the source's keyword arguments (JSON object or its text)
    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    skip_bad_images: bool = False  # image folders: leave unreadable files out (counted) instead of refusing
    method: str = "trp"
    scheme: str = "channel"  # a scheme, "auto", or several tried in order per layer: "spatial,linear"
    layers: str = "convs"  # "convs": every conv but the first (the paper's); "all": also Linear, bar the classifier
    energy: float = 0.9
    energy_ramp: float = 0.0  # epochs over which the target tightens from dense to `energy` (or `speedup`)
    speedup: float | None = None  # TRP ranks for this whole-model MACs speed-up instead of `energy`
    freeze: float | None = None  # epochs after which TRP's ranks stay fixed (None: they never do)
    period: int = 20
    nuclear: float = 3e-4
    orth: float = 1.0  # SVD training: orthogonality weight
    sparsity: str = DEFAULT_SPARSITY  # SVD training: KIND:WEIGHT per step, or KIND:WEIGHT/epoch
    epochs: int = 30
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 128
    schedule: str = "cosine"  # or "step"
    lr_steps: tuple[int, ...] = ()  # epochs where a step schedule multiplies lr by 0.1
    seed: int = 0
    device: str = "auto"
    amp: bool = False
    deterministic: bool = True
    init: str | None = None  # start from these trained weights (trp run/model folder, .safetensors, state_dict file)
    teacher: str | None = None  # distil from this model (same kinds of source as init)
    distill_weight: float = _DISTILL_DEFAULTS[0]  # W: the soft targets' share of the loss
    distill_temperature: float = _DISTILL_DEFAULTS[1]  # T: the softmax temperature of the soft targets
    val_split: float = 0.0  # hold out this class-balanced fraction of the training images for validation
    latency_speedup: float | None = None  # TRP ranks for this whole-model speed-up in measured time
    latency_runtime: str = "eager"  # the runtime the latency budget is timed in (trp.runtimes)
    latency_batch: int = 128  # the batch size the latency budget is timed at

    def __post_init__(self) -> None:
        put = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        put("model_kwargs", models.check(self.model, self.model_kwargs))
        choice(self.dataset, "dataset", tuple(DATASETS))
        choice(self.method, "method", METHODS)
        choice(self.schedule, "schedule", ("cosine", "step"))
        for name in ("download", "skip_bad_images", "amp", "deterministic"):
            boolean(getattr(self, name), name.replace("_", "-"))
        optional = tuple(n for n in ("data_dir", "init", "teacher") if getattr(self, n) is not None)
        for name in ("scheme", "layers", "sparsity", "device", "latency_runtime") + optional:
            text(getattr(self, name), name.replace("_", "-"))
        # Numbers must be numbers: a recipe's "lr": "0.1" is a mistake to point out, not to guess at.
        for name in (*_NUMBERS, *_WHOLES, "speedup", "freeze", "latency_speedup", "distill_weight",
                     "distill_temperature"):
            if isinstance(getattr(self, name), (str, bytes)):
                kind = "a whole number" if name in _WHOLES else "a number"
                raise TRPError(f"{name.replace('_', '-')} must be {kind}, got {getattr(self, name)!r}")
        for name, (low, high, low_open) in _NUMBERS.items():
            put(name, number(getattr(self, name), name.replace("_", "-"), low=low, high=high, low_open=low_open))
        for name, (low, high) in _WHOLES.items():
            put(name, whole(getattr(self, name), name.replace("_", "-"), low=low, high=high))
        if self.speedup is not None:
            put("speedup", number(self.speedup, "speedup", low=1.0))
        if self.freeze is not None:
            put("freeze", number(self.freeze, "freeze", low=0.0, high=MAX_WHOLE))
        if self.val_split >= 1:
            raise TRPError(f"val-split must be a fraction in [0, 1), got {self.val_split:g}")
        self._check_extras(put)
        if not isinstance(self.lr_steps, (list, tuple)) or any(isinstance(s, (str, bytes)) for s in self.lr_steps):
            raise TRPError(f"lr-steps must be a list of whole numbers, got {self.lr_steps!r}")
        put("lr_steps", tuple(whole(s, "lr-steps", low=0) for s in self.lr_steps))
        methods.get(self.method).check(self)
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError:
                raise TRPError(f"unknown device {self.device!r}") from None

    def _check_extras(self, put: Any) -> None:
        """Distillation and the latency budget: valid values, and only where they apply."""
        weight, temperature = check_settings(self.distill_weight, self.distill_temperature)
        put("distill_weight", weight)
        put("distill_temperature", temperature)
        if self.teacher is None and (self.distill_weight, self.distill_temperature) != _DISTILL_DEFAULTS:
            raise TRPError("distill-weight and distill-temperature need a --teacher")
        put("latency_runtime", runtimes.get(self.latency_runtime).name)
        if self.latency_speedup is not None:
            put("latency_speedup", number(self.latency_speedup, "latency-speedup", low=1.0))
            if self.speedup is not None:
                raise TRPError("speedup (MACs) and latency-speedup (measured time) are two budgets; give one")

    def warnings(self) -> list[str]:
        """Values that are valid but far outside the sensible range, each with what training does.

        Example:
            >>> TrainConfig(momentum=5).warnings()[0][:30]
            'momentum 5 is outside [0, 1): '
        """
        out = []
        if self.momentum >= 1:
            out.append(f"momentum {self.momentum:g} is outside [0, 1): every step then adds more than the one before, "
                       "so SGD diverges; training with it as given")
        if methods.get(self.method).shapes_ranks:
            if self.energy_ramp > self.epochs:
                out.append(f"energy-ramp {self.energy_ramp:g} is longer than the run's {self.epochs} epochs: the "
                           "projection never reaches its target; training with it as given")
            if self.freeze is not None and self.freeze > self.epochs:
                out.append(f"freeze {self.freeze:g} is past the run's {self.epochs} epochs: the ranks never freeze")
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lr_steps"] = list(self.lr_steps)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        if not isinstance(d, Mapping):
            raise TRPError(f"a config must be a JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise TRPError(f"unknown config key {unknown[0]!r}")
        return cls(**d)


def load_config_file(path: str | Path) -> dict:
    """Read a JSON recipe (e.g. ``configs/resnet20_cifar10_trp.json``) as a dict of config keys.

    A run's own ``config.json`` works too (its ``config`` object is the recipe), so
    ``trp train --config RUN/config.json --out RUN`` starts a run again exactly as it was started.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "c.json"); _ = open(p, "w").write('{"epochs": 3}')
        >>> load_config_file(p)
        {'epochs': 3}
    """
    try:
        d = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise TRPError(f"no such config file: {path}") from None
    except (OSError, ValueError) as err:
        raise TRPError(f"cannot read config file {path}: {err}") from None
    if isinstance(d, dict) and isinstance(d.get("config"), dict):  # a run folder's config.json
        d = d["config"]
    if not isinstance(d, dict):
        raise TRPError(f"config file {path} must hold a JSON object")
    return {k.replace("-", "_"): v for k, v in d.items() if not k.startswith("_")}


