"""Trained Rank Pruning inside any training loop (Xu et al., IJCAI 2020).

Two things happen to every eligible weight W while the network trains:

* **Projection** (paper Eq. 1–3): every ``period`` optimizer steps, W is replaced *in place* by its
  truncated SVD ``U_k S_k V_kᵀ`` in its scheme's matrix layout (:mod:`trp.schemes`), k being the
  smallest rank with Σ_{i≤k} σ_i² ≥ e·Σ σ_i². Between projections, plain SGD lets the weights move
  off the low-rank set, which is what makes the method *trained* rank pruning rather than projected
  training. Instead of a per-layer energy, ``speedup=s`` picks the ranks of all layers at once for
  a whole-model MACs budget (:func:`trp.rank.solve_budget`, as :func:`trp.speedup` does when
  decomposing), ``latency=s`` picks them for a whole-model budget in *measured* time (the latency
  table of :mod:`trp.latency_model`, timed once, and :func:`trp.latency_budget.allocate`, as
  :func:`trp.latency` does), and ``freeze=t`` stops the ranks from changing after step t, so that the rest of
  training adapts the network to them.
* **Nuclear-norm regularization** (paper Eq. 4–5): ‖W‖_* is not differentiable; its stochastic
  sub-gradient ``U_k V_kᵀ`` from the latest SVD is added, times λ, to W's gradient before each
  optimizer step.

Usage: attach it to the optimizer, and the plain loop stays as it was::

    reg = trp.TRP(model, scheme="channel", energy=0.9, period=20, nuclear=3e-4)
    handle = reg.attach(opt)  # opt.step() now regularizes before and projects after
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(); loss.backward()
        opt.step()            # pre-hook: grad += λ·U_k V_kᵀ; post-hook: every `period` steps W ← U_k S_k V_kᵀ
    handle.remove()

Under AMP, ``scaler.step(opt)`` unscales the gradients before it calls ``opt.step()``, so the
sub-gradient goes in at its true size, and a step the scaler skips (inf/NaN gradients) never reaches
the hooks, so it does not count toward ``period``. Loops that do not step a
``torch.optim.Optimizer`` call :meth:`TRP.regularize` after backward (after ``scaler.unscale_``)
and :meth:`TRP.step` after each real optimizer step instead.

Parameters are modified in place (``.data``), so their identity, and with it the optimizer's state
(momentum), is preserved.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from trp import schemes
from trp import svd as svd_mod
from trp.bn import fold_bn_
from trp.errors import TRPError
from trp.latency_budget import Allocation, allocate
from trp.latency_model import LatencyTable, Target, latency_model
from trp.plan import rank_costs
from trp.rank import BudgetLayer, energy_rank, rank_one_speedup, solve_budget
from trp.schedule import Ramp, Schedule, checked_schedule, ramp
from trp.surgery import FilterFn, default_filter, unwrap
from trp.validate import boolean, choice, number, whole

__all__ = ["TRP", "Attachment", "Ramp", "ramp", "Schedule"]

@dataclass
class _Layer:
    name: str
    weight: nn.Parameter
    scheme: schemes.Scheme
    subgradient: Tensor | None = None  # U_k V_kᵀ in the weight's shape
    rank: int | None = None
    spectrum: Tensor | None = None  # at the latest SVD


def _eligible(model: nn.Module, names: tuple[str, ...], filter_fn: FilterFn) -> list[_Layer]:
    """Every layer ``filter_fn`` accepts, each with the first of ``names`` that handles it; a layer no
    scheme can handle is an error, never skipped."""
    layers = []
    for name, module in model.named_modules():
        if not filter_fn(module, name):
            continue
        scheme, why = schemes.applicable(module, names)
        if scheme is None:
            raise TRPError(f"layer {name!r} ({type(module).__name__}) accepted by filter_fn: {why}")
        layers.append(_Layer(name, module.weight, scheme))
    if not layers:
        raise TRPError(f"TRP found no eligible layer: filter_fn accepted none (scheme {', '.join(map(repr, names))})")
    return layers


def _scheme_names(scheme: Any) -> tuple[str, ...]:
    """A scheme name or a list of them (tried in order per layer; ``auto`` allowed), checked."""
    names = tuple(scheme) if isinstance(scheme, (list, tuple)) else (scheme,)
    if not names:
        raise TRPError("TRP scheme must be a scheme name or a non-empty list of them")
    for name in names:
        if name != schemes.AUTO:
            choice(name, "TRP scheme", schemes.names() + (schemes.AUTO,))
    return names


class Attachment:
    """The handle :meth:`TRP.attach` returns: :meth:`remove` takes both optimizer hooks off.

    Also a context manager: ``with reg.attach(opt): ...`` removes them on exit.
    """

    def __init__(self, reg: TRP, handles: Sequence[RemovableHandle]) -> None:
        self._reg, self._handles = reg, list(handles)

    @property
    def attached(self) -> bool:
        """True until :meth:`remove` is called."""
        return bool(self._handles)

    def remove(self) -> None:
        """Remove the step pre- and post-hooks; the manual calls are allowed again. Idempotent."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._reg._detached(self)

    def __enter__(self) -> Attachment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class TRP:
    """Trained Rank Pruning: periodic low-rank projection plus nuclear-norm sub-gradient.

    Args:
        model: Any ``nn.Module`` (a DDP or compiled wrapper is looked through).
        scheme: A scheme of :data:`trp.schemes.SCHEMES`: ``channel`` (N × C·kh·kw), ``spatial``
            ((C·kh) × (N·kw)), ``decouple`` (per filter C × kh·kw) or ``linear`` (Linear and HF
            Conv1D weights); or several, tried in order per layer (``("spatial", "linear")``:
            convs spatial, Linears linear); ``"auto"`` gives each layer its
            :func:`trp.schemes.default_for` (``channel`` for convs, ``linear`` for Linears).
        energy: Energy e in (0, 1] kept by each projection, or a schedule ``step -> e``
            (see :func:`ramp`).
        period: Optimizer steps between projections (the paper's m).
        nuclear: λ of the nuclear-norm sub-gradient; 0 turns it off.
        filter_fn: ``filter_fn(module, name) -> bool`` picks layers (default
            :func:`trp.surgery.default_filter`); every layer it accepts must suit a scheme of
            ``scheme``.
        project: False gives the nuclear-norm-only method of the paper's ablation (the SVD is
            still taken every ``period`` steps to refresh the sub-gradient).
        speedup: Whole-model MACs speed-up s >= 1 (or a schedule ``step -> s``, see :func:`ramp`)
            that the ranks are chosen for, across all eligible layers at once, from the current
            singular values (as :func:`trp.speedup` does when decomposing); ``energy`` is then
            not used. Layers outside ``filter_fn`` count at their dense cost. A constant or a
            schedule with an ``end`` is checked against the model's reach at once; any other
            schedule at each projection.
        freeze: After this many optimizer steps the ranks stop changing: later projections keep
            each layer at the rank it had, so the rest of training recovers at fixed ranks
            instead of losing a little more rank (and accuracy) at every projection.
        input_shape: One sample's shape, for the MACs accounting of ``speedup`` and the timing of
            ``latency`` (default :func:`trp.tracing.default_input_shape`).
        latency: Whole-model speed-up s >= 1 in *measured* time (or a schedule ``step -> s``), on
            ``latency_target``: at construction every eligible layer is timed dense and decomposed
            at a ladder of ranks, and the whole model (BatchNorm folded, as it will run) once
            (:func:`trp.latency_model.measure_layers`, cached on disk per machine); each projection
            then spends the time budget where it keeps the most energy per millisecond
            (:func:`trp.latency_budget.allocate`). Exclusive with ``speedup``; checked against the
            model's reach like it; ``freeze`` works the same way.
        latency_target: The :class:`trp.latency_model.Target` of ``latency`` (default ``Target()``:
            batch 128, eager, the current threads).

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> reg = TRP(model, energy=0.5, period=1, nuclear=1e-3)
        >>> handle = reg.attach(opt)
        >>> model(torch.randn(2, 3, 8, 8)).sum().backward()
        >>> opt.step()  # the sub-gradient goes in before the update, the projection comes after it
        >>> reg.steps, reg.ranks()["2"] < 8
        (1, True)
        >>> handle.remove()
    """

    def __init__(
        self,
        model: nn.Module,
        scheme: str | Sequence[str] = "channel",
        energy: Schedule = 0.9,
        period: int = 20,
        nuclear: float = 3e-4,
        filter_fn: FilterFn | None = None,
        project: bool = True,
        speedup: Schedule | None = None,
        freeze: int | None = None,
        input_shape: Sequence[int] | None = None,
        latency: Schedule | None = None,
        latency_target: Target | None = None,
    ) -> None:
        names = _scheme_names(scheme)
        self.scheme: str | tuple[str, ...] = names[0] if len(names) == 1 else names
        self._names = names
        self.energy = checked_schedule(energy, "energy", low=0.0, high=1.0, low_open=True)
        self.period = whole(period, "period", low=1)
        self.nuclear = number(nuclear, "nuclear weight", low=0.0)
        self.project = boolean(project, "project")
        self.speedup = None if speedup is None else checked_schedule(speedup, "speedup", low=1.0)
        self.latency = None if latency is None else checked_schedule(latency, "latency speed-up", low=1.0)
        if self.speedup is not None and self.latency is not None:
            raise TRPError("give speedup (MACs) or latency (measured time), not both")
        if latency_target is not None and not isinstance(latency_target, Target):
            raise TRPError(f"latency_target must be a trp.latency_model.Target, got {type(latency_target).__name__}")
        if latency_target is not None and self.latency is None:
            raise TRPError("latency_target needs latency (the measured-time speed-up to train for)")
        self.latency_target = latency_target or Target()
        self.freeze = None if freeze is None else whole(freeze, "freeze", low=0)
        if filter_fn is not None and not callable(filter_fn):
            raise TRPError(f"filter_fn must be a function (module, name) -> bool, got {filter_fn!r}")
        self.model = unwrap(model)
        self.layers = _eligible(self.model, names, filter_fn or default_filter(self.model))
        self.steps = 0
        self.history: list[tuple[int, dict[str, int]]] = []
        self._attached: Attachment | None = None
        self._macs_total = 0
        self._costs: dict[str, tuple[int, int]] = {}  # name -> (MACs per unit of rank, dense MACs)
        self.latency_table: LatencyTable | None = None
        self.allocation: Allocation | None = None  # the latest latency allocation (ranks, predicted ms)
        if self.latency is not None:
            self.latency_table = self._measure_latency(input_shape)
        if self.speedup is not None:
            # Costs come from tracing shapes only; the spectra come from each projection's own SVD.
            chosen = {layer.name for layer in self.layers}
            self._macs_total, self._costs = rank_costs(self.model, names, lambda m, n: n in chosen, input_shape)
        # The sub-gradient is needed from the first step on, before any projection.
        self._svd(project=False)
        self._check_reach()

    # ------------------------------------------------------------------------------ rank choice

    def _budget_layers(self) -> list[BudgetLayer]:
        spectra = {layer.name: layer.spectrum for layer in self.layers if layer.spectrum is not None}
        return [BudgetLayer(name, spectra[name], cost, dense) for name, (cost, dense) in self._costs.items()]

    def _measure_latency(self, input_shape: Sequence[int] | None) -> LatencyTable:
        # Timed as it will run: a copy in eval mode with BatchNorm folded (the convs gain a bias, as
        # after compression, so compress finds the same entries in the cache).
        chosen = {layer.name for layer in self.layers}
        dense = copy.deepcopy(self.model).eval()
        fold_bn_(dense)
        return latency_model(dense, self._names, lambda module, name: name in chosen, input_shape, self.latency_target)

    def _latency_allocation(self, s: float) -> Allocation:
        if self.latency_table is None:
            raise TRPError("TRP has no latency table: it was built without latency=")
        spectra = {layer.name: layer.spectrum for layer in self.layers
                   if layer.spectrum is not None and layer.name in self.latency_table.layers}
        return allocate(self.latency_table, spectra, s)

    def _check_reach(self) -> None:
        # A constant target, or a schedule that states where it ends, is checked once, now, rather
        # than by evaluating the schedule at some far-off step; other schedules meet the same check
        # in the budget solver at each projection.
        if self.latency is not None:
            final = self.latency if not callable(self.latency) else getattr(self.latency, "end", None)
            if final is not None and float(final) > 1.0:
                self._latency_allocation(float(final))  # raises "out of reach" with the fastest prediction
            return
        final = self.speedup if not callable(self.speedup) else getattr(self.speedup, "end", None)
        if final is None:
            return
        best = rank_one_speedup(self._budget_layers(), self._macs_total)
        if best < float(final) / 1.02:  # the solver's own 2 % tolerance
            raise TRPError(f"speedup {float(final):g}x is out of reach: with every eligible layer at rank 1 the "
                           f"model runs {best:.2f}x fewer MACs")

    def current_speedup(self) -> float | None:
        """The MACs speed-up the next projection's ranks are chosen for (None: per-layer energy)."""
        if self.speedup is None:
            return None
        s = self.speedup(self.steps) if callable(self.speedup) else self.speedup
        return number(s, f"speedup schedule at step {self.steps}", low=1.0)

    def current_latency(self) -> float | None:
        """The measured-time speed-up the next projection's ranks are chosen for (None: not a latency target)."""
        if self.latency is None:
            return None
        s = self.latency(self.steps) if callable(self.latency) else self.latency
        return number(s, f"latency schedule at step {self.steps}", low=1.0)

    def current_energy(self) -> float:
        """The energy the next projection keeps (follows the schedule)."""
        e = self.energy(self.steps) if callable(self.energy) else self.energy
        return number(e, f"energy schedule at step {self.steps}", low=0.0, high=1.0, low_open=True)

    def frozen(self) -> bool:
        """True once the ranks no longer change (``freeze`` steps have passed and ranks are set)."""
        return self.freeze is not None and self.steps > self.freeze and all(layer.rank for layer in self.layers)

    def _choose_ranks(self) -> dict[str, int]:
        if self.frozen():
            return self.ranks()
        spectra = {layer.name: layer.spectrum for layer in self.layers if layer.spectrum is not None}
        t = self.current_latency()
        if t is not None:
            self.allocation = self._latency_allocation(t) if t > 1.0 else None
            chosen = self.allocation.ranks if self.allocation is not None else {}
            return {name: chosen.get(name) or int(spec.numel()) for name, spec in spectra.items()}
        s = self.current_speedup()
        if s is None:
            e = self.current_energy()
            return {name: energy_rank(spec, e) for name, spec in spectra.items()}
        chosen = solve_budget(self._budget_layers(), self._macs_total, s) if s > 1.0 else {}
        # A layer the budget leaves dense (or that no forward pass reaches) keeps its full rank.
        return {name: chosen.get(name) or int(spec.numel()) for name, spec in spectra.items()}

    # ------------------------------------------------------------------------------ SVD

    def _factorize(self) -> list[tuple[list[_Layer], Tensor, Tensor, Tensor]]:
        # Layers sharing a scheme and a matrix shape go through one batched SVD: far fewer LAPACK calls.
        groups: dict[tuple, list[tuple[_Layer, Tensor]]] = {}
        for layer in self.layers:
            mat = layer.scheme.to_matrix(layer.weight.detach())
            key = (layer.scheme.name, tuple(mat.shape), mat.device, mat.dtype)
            groups.setdefault(key, []).append((layer, mat))
        factors = []
        for members in groups.values():
            layers = [layer for layer, _ in members]
            try:
                u, s, vh = svd_mod.svd(torch.stack([mat for _, mat in members]), name=layers[0].name)
            except TRPError:  # find and name the failing layer
                for layer, mat in members:
                    svd_mod.svd(mat, name=layer.name)
                raise
            factors.append((layers, u, s, vh))
        return factors

    @torch.no_grad()
    def _svd(self, project: bool) -> None:
        factors = self._factorize()
        for layers, _, s, _ in factors:  # all spectra first: a MACs budget shares rank across layers
            for i, layer in enumerate(layers):
                layer.spectrum = svd_mod.spectrum(s[i])
        ranks = self._choose_ranks()
        for layers, u, s, vh in factors:
            for i, layer in enumerate(layers):
                k = min(ranks[layer.name], s.shape[-1])
                layer.rank = k
                scheme, shape = layer.scheme, layer.weight.shape
                if self.nuclear > 0:  # U_k V_kᵀ (Eq. 5), back in the scheme's layout
                    g = svd_mod.nuclear_subgradient(u[i], vh[i], k)
                    layer.subgradient = scheme.from_matrix(g, shape).to(layer.weight.dtype)
                if project:  # Eckart–Young: the best rank-k approximation (Eq. 1–3)
                    layer.weight.copy_(scheme.from_matrix(svd_mod.truncate(u[i], s[i], vh[i], k), shape))
        self._sync()
        self.history.append((self.steps, self.ranks()))

    def _sync(self) -> None:
        # Replicas must stay bitwise identical under DDP: LAPACK on different ranks may differ in
        # the last bit (threading, hardware), so rank 0's result is broadcast to all.
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        for layer in self.layers:
            dist.broadcast(layer.weight.data, src=0)
            if layer.subgradient is not None:
                dist.broadcast(layer.subgradient, src=0)
        ranks = torch.tensor([layer.rank for layer in self.layers], device=self.layers[0].weight.device)
        dist.broadcast(ranks, src=0)
        for layer, k in zip(self.layers, ranks.tolist()):
            layer.rank = int(k)

    # ------------------------------------------------------------------------------ the training loop

    def attach(self, optimizer: torch.optim.Optimizer) -> Attachment:
        """Register step hooks on ``optimizer``: before each step λ·U_k V_kᵀ goes into the gradients,
        after it the step is counted and every ``period`` steps the weights are projected.

        A step that AMP's ``GradScaler`` skips never calls ``optimizer.step()``, so it is not counted;
        a fused optimizer that skips inside its kernel (``found_inf``) is not counted either. While
        attached, calling :meth:`regularize` or :meth:`step` by hand is an error (it would count
        twice).

        Example:
            >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3))
            >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> with TRP(model, period=1).attach(opt) as handle:
            ...     handle.attached
            True
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TRPError(f"attach needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if self._attached is not None:
            raise TRPError("TRP is already attached to an optimizer; remove() that handle first")
        updated = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [layer.name for layer in self.layers if id(layer.weight) not in updated]
        if missing:
            raise TRPError(f"the optimizer does not update the weight of layer {missing[0]!r}, so TRP's "
                           "sub-gradient would never reach it; attach to the optimizer of the whole model")
        handles = [optimizer.register_step_pre_hook(self._pre_step), optimizer.register_step_post_hook(self._post_step)]
        self._attached = Attachment(self, handles)
        return self._attached

    def _detached(self, handle: Attachment) -> None:
        # Called by Attachment.remove: forget the handle if it is the current attachment.
        if self._attached is handle:
            self._attached = None

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        # GradScaler.step unscales before calling optimizer.step, so the gradients here are true ones.
        # An optimizer that unscales inside its fused kernel instead is handed the scale as
        # `grad_scale`: the sub-gradient is scaled alike, so that it comes out at λ after unscaling.
        scale = getattr(optimizer, "grad_scale", None)
        self._add_subgradient(scale if isinstance(scale, Tensor) else None)

    def _post_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        found_inf = getattr(optimizer, "found_inf", None)
        if isinstance(found_inf, Tensor) and bool(found_inf.sum() > 0):
            return  # a fused optimizer skipped this step itself (inf/NaN gradients under AMP)
        self._count_step()

    def _manual(self, what: str) -> None:
        if self._attached is not None:
            raise TRPError(f"TRP is attached to an optimizer, which calls {what}() itself; do not call it "
                           "by hand too (or remove() the attachment first)")

    @torch.no_grad()
    def _add_subgradient(self, scale: Tensor | None) -> None:
        if self.nuclear == 0:
            return
        for layer in self.layers:
            g = layer.subgradient
            if g is None:
                continue
            if scale is not None:
                g = g * scale.to(g.device, g.dtype)
            if layer.weight.grad is None:
                layer.weight.grad = self.nuclear * g
            else:
                layer.weight.grad.add_(g, alpha=self.nuclear)

    def regularize(self) -> None:
        """Add λ·U_k V_kᵀ to each eligible weight's gradient, for loops without :meth:`attach`:
        call after backward (and after ``scaler.unscale_(opt)`` under AMP), before the step."""
        self._manual("regularize")
        self._add_subgradient(None)

    def _count_step(self) -> None:
        self.steps += 1
        if self.steps % self.period == 0:
            self._svd(project=self.project)

    def step(self) -> None:
        """Count one optimizer step, for loops without :meth:`attach` (call it only for steps that
        really happened: not for one AMP skipped); every ``period`` steps project (or refresh the
        sub-gradient)."""
        self._manual("step")
        self._count_step()

    def project_now(self) -> None:
        """Project every eligible weight onto its truncated SVD now (e.g. after the last step).

        Ending training on a projection makes the trained network exactly low-rank, so that
        decomposing it afterwards loses nothing.
        """
        self._svd(project=True)

    # ------------------------------------------------------------------------------ state

    def ranks(self) -> dict[str, int]:
        """Each layer's rank at the latest SVD."""
        return {layer.name: int(layer.rank or 0) for layer in self.layers}

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors that let a resumed run continue bit for bit (step count and sub-gradients)."""
        state = {"steps": torch.tensor(self.steps)}
        for layer in self.layers:
            state[f"rank.{layer.name}"] = torch.tensor(int(layer.rank or 0))
            if layer.subgradient is not None:
                state[f"subgradient.{layer.name}"] = layer.subgradient.detach().cpu()
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore what :meth:`state_dict` saved."""
        try:
            self.steps = int(state["steps"])
            for layer in self.layers:
                layer.rank = int(state[f"rank.{layer.name}"])
                key = f"subgradient.{layer.name}"
                if key in state:
                    if tuple(state[key].shape) != tuple(layer.weight.shape):
                        raise TRPError(f"TRP state for layer {layer.name!r} has shape {tuple(state[key].shape)}")
                    layer.subgradient = state[key].to(layer.weight.device, layer.weight.dtype)
        except KeyError as err:
            raise TRPError(f"TRP state is missing {err.args[0]!r}") from None
