"""Training methods as strategy objects: what each method adds to the one plain SGD loop.

:func:`trp.train.train` runs the same loop for every method (forward, cross-entropy, backward,
``scaler.step(optimizer)``); a :class:`Method` says what differs, through one small interface:

* :meth:`~Method.check` (a class method): the method's own settings of a config are valid.
* :meth:`~Method.prepare`: change the model's structure (SVD training's parametrization) and set up
  what the method needs (TRP's regularizer); returns the model.
* :meth:`~Method.structure`: the structural change :meth:`~Method.prepare` made, as the record that
  a saved model replays on load (``{"kind": "svd-parametrize", ...}``), or None.
* :meth:`~Method.attach`: register on the optimizer (TRP's step hooks: the nuclear-norm
  sub-gradient before each step, the projection count after it, so a step that AMP skips does not
  count); :meth:`~Method.detach` removes what it registered.
* :meth:`~Method.extra_loss`: a term added to the task loss (SVD training's regularizers), or None.
* :meth:`~Method.finish`: the one-off end of training (TRP's final projection); True when it moved
  the weights, so that BatchNorm statistics must be recomputed.
* :meth:`~Method.ranks`, :meth:`~Method.summary`: per-layer ranks for the metrics.
* :meth:`~Method.state_dict` / :meth:`~Method.load_state_dict`: what a resumed run needs to continue
  bit for bit, as (tensors, JSON-able metadata).

:data:`METHODS` is the one registry of method names: the config's choices, the command line's and
the benchmark's come from it.

* ``baseline``: plain SGD.
* ``trp``: Trained Rank Pruning (Xu et al., 2020): projection every ``period`` steps plus the
  nuclear-norm sub-gradient (:class:`trp.hook.TRP`); ``nuclear = 0`` gives projection alone.
* ``nuclear``: the nuclear-norm sub-gradient alone, no projection (the paper's ablation).
* ``svd``: SVD training (Yang et al., 2020, :mod:`trp.svd_training`).

Example:
    >>> from types import SimpleNamespace
    >>> config = SimpleNamespace(scheme="channel", speedup=None, freeze=None)
    >>> method = get("baseline")(config)
    >>> method.extra_loss(nn.Linear(2, 2)) is None, method.finish()
    (True, False)
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

import torch
from torch import Tensor, nn

from trp import schemes
from trp import svd_losses, svd_training
from trp.errors import TRPError
from trp.hook import TRP, Attachment, ramp
from trp.latency_model import Target
from trp.surgery import LAYERS, FilterFn, layer_filter
from trp.validate import MAX_WHOLE, choice

__all__ = ["Method", "Baseline", "TrainedRankPruning", "NuclearNorm", "SVDTraining", "METHODS", "CONV_SCHEMES", "get",
           "names", "epochs_to_steps", "scheme_names", "run_filter"]

#: The conv schemes a method can train in (schemes check a layer's type and groups only).
CONV_SCHEMES: tuple[str, ...] = schemes.names_for(nn.Conv2d(1, 1, 1, device="meta"))


def scheme_names(scheme: str) -> tuple[str, ...]:
    """A run's ``scheme`` text (``channel``, ``auto``, ``spatial,linear``: tried in order per layer)
    as checked names of :data:`trp.schemes.SCHEMES`; an unknown name is a one-line TRPError.

    Example:
        >>> scheme_names("channel"), scheme_names("spatial, linear")
        (('channel',), ('spatial', 'linear'))
    """
    if not isinstance(scheme, str):
        raise TRPError(f"scheme must be text such as 'channel', 'auto' or 'spatial,linear', got {scheme!r}")
    return schemes.parse_names(tuple(part.strip() for part in scheme.split(",")))


def run_filter(model: nn.Module, config: Any) -> FilterFn:
    """The layers a run with ``config`` trains and compresses (:func:`trp.surgery.layer_filter` of its
    ``layers``, default ``convs``, and its ``scheme``).

    Example:
        >>> from types import SimpleNamespace
        >>> m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4, 4), nn.Linear(4, 2))
        >>> f = run_filter(m, SimpleNamespace(scheme="auto", layers="all"))
        >>> [name for name, mod in m.named_modules() if f(mod, name)]
        ['1', '3']
    """
    return layer_filter(model, getattr(config, "layers", "convs"), scheme_names(config.scheme))


def epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
    """A length in epochs (ramp, freeze) as optimizer steps, capped at :data:`trp.validate.MAX_WHOLE`.

    A cap, not an error: a ramp or freeze of 2**53 steps never ends in any run, as a longer one.

    Example:
        >>> epochs_to_steps(1.5, 12), epochs_to_steps(1e308, 12) == 2**53
        (18, True)
    """
    steps = epochs * steps_per_epoch
    return int(round(steps)) if steps < MAX_WHOLE else MAX_WHOLE  # also for inf: 1e308 epochs overflow


class Method:
    """Plain SGD: the loop as it is. The base of every method (see the module docstring).

    Args:
        config: The run's :class:`trp.train.TrainConfig` (any object with its fields).
    """

    #: The name in :data:`METHODS`, the config and the command line.
    name: ClassVar[str] = "baseline"
    #: The conv schemes the method trains in (a baseline has none, but keeps the run's choice).
    scheme_choices: ClassVar[tuple[str, ...]] = CONV_SCHEMES
    #: True when ``speedup`` and ``freeze`` shape the method's ranks (TRP's).
    shapes_ranks: ClassVar[bool] = False
    #: True when the method takes exactly one of :attr:`scheme_choices` and the paper's convs only
    #: (SVD training: its saved structure records one conv scheme); else any list of schemes and layers.
    one_scheme: ClassVar[bool] = False

    def __init__(self, config: Any) -> None:
        self.config = config

    @classmethod
    def check(cls, config: Any) -> None:
        """Raise a TRPError if ``config`` holds settings this method cannot use.

        Example:
            >>> from types import SimpleNamespace
            >>> Baseline.check(SimpleNamespace(scheme="channel", speedup=2.0, freeze=None))
            Traceback (most recent call last):
            ...
            trp.errors.TRPError: speedup, latency-speedup and freeze shape TRP's ranks; method baseline has none (use trp or nuclear)
        """
        names_ = scheme_names(config.scheme)  # an unknown name is named as such
        layers = choice(getattr(config, "layers", "convs"), "layers", LAYERS)
        if cls.one_scheme and (len(names_) != 1 or names_[0] not in cls.scheme_choices):
            raise TRPError(f"method {cls.name} does not train in scheme {config.scheme!r}; "
                           f"choose one of: {', '.join(cls.scheme_choices)}")
        if cls.one_scheme and layers != "convs":
            raise TRPError(f"method {cls.name} trains the paper's convs only (--layers convs), not --layers {layers}")
        if not cls.shapes_ranks and (config.speedup is not None or config.freeze is not None
                                     or getattr(config, "latency_speedup", None) is not None):
            raise TRPError(f"speedup, latency-speedup and freeze shape TRP's ranks; method {cls.name} has none "
                           "(use trp or nuclear)")

    def prepare(self, model: nn.Module, data: Any, steps_per_epoch: int) -> nn.Module:
        """Make ``model`` ready for this method (on its final device); returns it."""
        return model

    def structure(self) -> dict | None:
        """The structural change :meth:`prepare` made, as a transform record, or None."""
        return None

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Register what the method does around each optimizer step."""

    def detach(self) -> None:
        """Remove what :meth:`attach` registered."""

    def extra_loss(self, model: nn.Module) -> Tensor | None:
        """A term added to the task loss, or None."""
        return None

    def finish(self) -> bool:
        """The end of training, after the last step; True when the weights changed."""
        return False

    def ranks(self, model: nn.Module) -> dict[str, int]:
        """Each low-rank layer's current rank (empty for a method without ranks)."""
        return {}

    def summary(self, model: nn.Module) -> dict[str, Any]:
        """Per-epoch figures of the method: the mean rank of its layers ('' without ranks).

        Example:
            >>> Baseline(None).summary(nn.Linear(2, 2))
            {'mean_rank': ''}
        """
        ranks = self.ranks(model)
        return {"mean_rank": round(sum(ranks.values()) / len(ranks), 3) if ranks else ""}

    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """What a resumed run needs: (tensors, JSON-able metadata)."""
        return {}, {}

    def load_state_dict(self, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


class Baseline(Method):
    """Plain SGD (every hook of :class:`Method` left empty)."""


class TrainedRankPruning(Method):
    """TRP: periodic projection onto the truncated SVD plus the nuclear-norm sub-gradient.

    The energy (or ``speedup``) target ramps from dense over ``energy_ramp`` epochs, the ranks stop
    changing after ``freeze`` epochs, and training ends on a projection, so the trained network is
    exactly low-rank and its decomposition loses nothing.
    """

    name = "trp"
    shapes_ranks = True
    project = True

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.reg: TRP | None = None
        self._handle: Attachment | None = None

    def prepare(self, model: nn.Module, data: Any, steps_per_epoch: int) -> nn.Module:
        c = self.config
        energy: Any = c.energy
        speedup: Any = c.speedup
        latency: Any = getattr(c, "latency_speedup", None)
        if c.energy_ramp > 0:
            n = epochs_to_steps(c.energy_ramp, steps_per_epoch)
            energy = ramp(c.energy, n)
            speedup = ramp(c.speedup, n) if c.speedup is not None else None
            latency = ramp(latency, n) if latency is not None else None
        freeze = None if c.freeze is None else epochs_to_steps(c.freeze, steps_per_epoch)
        # The measured-time budget (trp.latency_budget over a per-layer latency table), passed only when
        # asked for, like speedup: ramped by energy_ramp and frozen by freeze (/tmp/team/latency_interface.md).
        timed = {} if latency is None else {"latency": latency, "latency_target": Target(
            batch_size=getattr(c, "latency_batch", 128), runtime=getattr(c, "latency_runtime", "eager"))}
        self.reg = TRP(model, scheme_names(c.scheme), energy, c.period, c.nuclear, filter_fn=run_filter(model, c),
                       project=self.project, speedup=speedup, freeze=freeze, input_shape=data.input_shape, **timed)
        return model

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        self._handle = self._reg().attach(optimizer)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def finish(self) -> bool:
        if not self.project:
            return False
        # End on a projection: the trained network is then exactly low-rank (TRP's output), and
        # decomposing it with the paper's value threshold loses nothing.
        self._reg().project_now()
        return True

    def ranks(self, model: nn.Module) -> dict[str, int]:
        return self._reg().ranks()

    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        reg = self._reg()
        return ({f"trp.{k}": v for k, v in reg.state_dict().items()},
                {"rank_history": [[s, r] for s, r in reg.history]})

    def load_state_dict(self, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
        reg = self._reg()
        reg.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("trp.")})
        reg.history = [(s, r) for s, r in meta.get("rank_history", [])]

    def _reg(self) -> TRP:
        if self.reg is None:
            raise TRPError(f"method {self.name}: prepare(model, data, steps_per_epoch) comes first")
        return self.reg


class NuclearNorm(TrainedRankPruning):
    """The nuclear-norm sub-gradient alone: the SVD every ``period`` steps refreshes it, no projection."""

    name = "nuclear"
    project = False

    @classmethod
    def check(cls, config: Any) -> None:
        super().check(config)
        if config.nuclear == 0:
            raise TRPError("method nuclear needs --nuclear > 0")


class SVDTraining(Method):
    """SVD training: weights as trained factors ``U·diag(s)·Vᵀ`` with orthogonality and sparsity losses."""

    name = "svd"
    scheme_choices = svd_training.training_schemes()
    one_scheme = True

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.kind, self.weight, self.per_epoch = svd_losses.parse_sparsity_rate(config.sparsity)
        # The per-step weight of a per-epoch setting is known once prepare() knows the steps per epoch.
        self.losses = svd_losses.SVDTrainingConfig(orth=config.orth, sparsity_kind=self.kind,
                                                   sparsity=0.0 if self.per_epoch else self.weight)

    @classmethod
    def check(cls, config: Any) -> None:
        super().check(config)
        svd_losses.parse_sparsity_rate(config.sparsity)

    def prepare(self, model: nn.Module, data: Any, steps_per_epoch: int) -> nn.Module:
        weight = svd_losses.step_weight(self.weight, self.per_epoch, steps_per_epoch)
        self.losses = svd_losses.SVDTrainingConfig(orth=self.config.orth, sparsity_kind=self.kind, sparsity=weight)
        return svd_training.svd_parametrize_(model, self.config.scheme)

    def structure(self) -> dict | None:
        return {"kind": "svd-parametrize", "scheme": self.config.scheme}

    def extra_loss(self, model: nn.Module) -> Tensor | None:
        return svd_losses.regularization(model, self.losses)

    def ranks(self, model: nn.Module) -> dict[str, int]:
        return {name: k for name, (k, _) in svd_training.ranks(model).items()}


#: Every training method by name: the single source of truth for which methods exist.
METHODS: Mapping[str, type[Method]] = {m.name: m for m in (Baseline, TrainedRankPruning, NuclearNorm, SVDTraining)}


def get(name: str) -> type[Method]:
    """The method class registered under ``name``.

    Example:
        >>> get("nuclear").__name__
        'NuclearNorm'
    """
    return METHODS[choice(name, "method", tuple(METHODS))]


def names() -> tuple[str, ...]:
    """The registered method names, in order.

    Example:
        >>> names()
        ('baseline', 'trp', 'nuclear', 'svd')
    """
    return tuple(METHODS)
