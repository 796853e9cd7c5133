"""Trained Rank Pruning inside any training loop (Xu et al., IJCAI 2020).

Two things happen to every eligible weight W while the network trains:

* **Projection** (paper Eq. 1–3): every ``period`` optimizer steps, W is replaced *in place* by its
  truncated SVD ``U_k S_k V_kᵀ`` in the scheme's matrix layout, k being the smallest rank with
  Σ_{i≤k} σ_i² ≥ e·Σ σ_i². Between projections, plain SGD lets the weights move off the low-rank
  set, which is what makes the method *trained* rank pruning rather than projected training.
  Instead of a per-layer energy, ``speedup=s`` picks the ranks of all layers at once for a
  whole-model MACs budget (the allocation of :func:`trp.speedup`), and ``freeze=t`` stops the
  ranks from changing after step t, so that the rest of training adapts the network to them.
* **Nuclear-norm regularization** (paper Eq. 4–5): ‖W‖_* is not differentiable; its stochastic
  sub-gradient ``U_k V_kᵀ`` from the latest SVD is added, times λ, to W's gradient after each
  backward pass.

Usage in a plain loop::

    reg = trp.TRP(model, scheme="channel", energy=0.9, period=20, nuclear=3e-4)
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(); loss.backward()
        reg.regularize()      # λ·U_k V_kᵀ into .grad (after scaler.unscale_(opt) under AMP)
        opt.step()
        reg.step()            # every `period` steps: W ← truncated SVD, in place

Parameters are modified in place (``.data``), so their identity, and with it the optimizer's state
(momentum), is preserved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence, Union

import torch
from torch import Tensor, nn

from trp import svd as svd_mod
from trp.errors import TRPError
from trp.rank import energy_rank

if TYPE_CHECKING:
    from trp.decompose import _Candidate

__all__ = ["TRP", "default_filter", "ramp", "unwrap"]

EnergySchedule = Union[float, Callable[[int], float]]
SpeedupSchedule = Union[float, Callable[[int], float]]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / DataParallel / compiled wrapper.

    Example:
        >>> m = nn.Linear(2, 2)
        >>> unwrap(m) is m
        True
    """
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def default_filter(model: nn.Module) -> Callable[[nn.Module, str], bool]:
    """The paper code's choice of layers: every Conv2d with groups=1 except the first; no Linear.

    The first conv sees only the image's few channels: its rank is tiny already and decomposing it
    saves nothing. The classifier is left alone, as in the paper.

    Example:
        >>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.LazyLinear(2))
        >>> f = default_filter(m)
        >>> [name for name, mod in m.named_modules() if f(mod, name)]
        ['1']
    """
    first = next((name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)

    def filter_fn(module: nn.Module, name: str) -> bool:
        return type(module) is nn.Conv2d and module.groups == 1 and name != first

    return filter_fn


def ramp(end: float, steps: int, start: float = 1.0) -> Callable[[int], float]:
    """Energy or speed-up schedule: linear from ``start`` (1.0: dense) to ``end`` over ``steps`` steps.

    On short schedules a constant e = 0.9 projected every 20 steps costs accuracy before the
    network has learned anything worth keeping; ramping lets early training run nearly dense.
    The same schedule serves ``speedup``: from 1× (no truncation) up to the target.

    Example:
        >>> f = ramp(0.9, 100)
        >>> f(0), round(f(50), 3), f(100), f(1000)
        (1.0, 0.95, 0.9, 0.9)
    """
    if steps < 0:
        raise TRPError(f"ramp length must be >= 0, got {steps}")

    def schedule(step: int) -> float:
        if steps == 0 or step >= steps:
            return end
        return start + (end - start) * step / steps

    return schedule


@dataclass
class _Layer:
    name: str
    weight: nn.Parameter
    layout: str
    subgradient: Tensor | None = None  # U_k V_kᵀ in the weight's shape
    rank: int | None = None


class TRP:
    """Trained Rank Pruning: periodic low-rank projection plus nuclear-norm sub-gradient.

    Args:
        model: Any ``nn.Module`` (a DDP or compiled wrapper is looked through).
        scheme: Matrix layout: ``channel`` (N × C·kh·kw), ``spatial`` ((C·kh) × (N·kw)) or
            ``decouple`` (per filter C × kh·kw).
        energy: Energy e in (0, 1] kept by each projection, or a schedule ``step -> e``
            (see :func:`ramp`).
        period: Optimizer steps between projections (the paper's m).
        nuclear: λ of the nuclear-norm sub-gradient; 0 turns it off.
        filter_fn: ``filter_fn(module, name) -> bool`` picks layers (default :func:`default_filter`).
        project: False gives the nuclear-norm-only method of the paper's ablation (the SVD is
            still taken every ``period`` steps to refresh the sub-gradient).
        speedup: Whole-model MACs speed-up s >= 1 (or a schedule ``step -> s``, see :func:`ramp`)
            that the ranks are chosen for, across all eligible layers at once, from the current
            singular values (as :func:`trp.speedup` does when decomposing); ``energy`` is then
            not used. Layers outside ``filter_fn`` count at their dense cost.
        freeze: After this many optimizer steps the ranks stop changing: later projections keep
            each layer at the rank it had, so the rest of training recovers at fixed ranks
            instead of losing a little more rank (and accuracy) at every projection.
        input_shape: One sample's shape, for the MACs accounting of ``speedup`` (default
            :func:`trp.decompose.default_input_shape`).

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
        >>> reg = TRP(model, energy=0.5, period=1, nuclear=1e-3)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> model(torch.randn(2, 3, 8, 8)).sum().backward()
        >>> reg.regularize(); opt.step(); reg.step()
        >>> reg.ranks()["2"] < 8
        True
    """

    def __init__(
        self,
        model: nn.Module,
        scheme: str = "channel",
        energy: EnergySchedule = 0.9,
        period: int = 20,
        nuclear: float = 3e-4,
        filter_fn: Callable[[nn.Module, str], bool] | None = None,
        project: bool = True,
        speedup: SpeedupSchedule | None = None,
        freeze: int | None = None,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        if scheme not in ("channel", "spatial", "decouple"):
            raise TRPError(f"unknown TRP scheme {scheme!r}; choose one of: channel, spatial, decouple")
        if isinstance(period, bool) or not isinstance(period, int) or period < 1:
            raise TRPError(f"period must be a whole number >= 1, got {period!r}")
        nuclear = float(nuclear)
        if not (nuclear >= 0.0 and nuclear != float("inf")):
            raise TRPError(f"nuclear weight must be finite and >= 0, got {nuclear}")
        if not callable(energy):
            e = float(energy)
            if not 0.0 < e <= 1.0:
                raise TRPError(f"energy must be in (0, 1], got {energy}")
        if speedup is not None and not callable(speedup):
            s_ = float(speedup)
            if not (s_ >= 1.0 and s_ != float("inf")):
                raise TRPError(f"speedup must be a finite number >= 1, got {speedup}")
        if freeze is not None and (isinstance(freeze, bool) or not isinstance(freeze, int) or freeze < 0):
            raise TRPError(f"freeze must be a whole number of steps >= 0, got {freeze!r}")
        self.model = unwrap(model)
        self.scheme, self.energy, self.period, self.nuclear, self.project = scheme, energy, period, nuclear, project
        self.speedup, self.freeze = speedup, freeze
        filter_fn = filter_fn or default_filter(self.model)
        self.layers = [
            _Layer(name, m.weight, scheme)
            for name, m in self.model.named_modules()
            if filter_fn(m, name) and type(m) is nn.Conv2d and m.groups == 1
        ]
        if not self.layers:
            raise TRPError("TRP found no eligible layer (Conv2d with groups=1 accepted by filter_fn)")
        self.steps = 0
        self.history: list[tuple[int, dict[str, int]]] = []
        self._budget: dict[str, _Candidate] = {}
        self._macs_total = 0
        if speedup is not None:
            self._setup_budget(filter_fn, input_shape)
        # The sub-gradient is needed from the first step on, before any projection.
        self._svd(project=False)

    def _setup_budget(self, filter_fn: Callable[[nn.Module, str], bool], input_shape: Sequence[int] | None) -> None:
        # MACs per unit of rank of every eligible layer, from a rank-1 plan of the same layers; the
        # solver then only needs the spectra at each projection.
        from trp.decompose import _Candidate, plan
        from trp.rank import fixed

        names = {layer.name for layer in self.layers}
        p = plan(self.model, self.scheme, fixed(1), lambda m, n: n in names, input_shape)
        self._macs_total = p.macs_before
        self._budget = {lp.name: _Candidate(lp, None, None, None, torch.empty(0), lp.macs_after)  # type: ignore[arg-type]
                        for lp in p.layers if lp.name in names and lp.scheme is not None}
        final = self.speedup(10**12) if callable(self.speedup) else self.speedup
        best = self._macs_total - sum(c.lp.macs_before - c.cost for c in self._budget.values() if c.cost < c.lp.macs_before)
        if self._macs_total / max(best, 1) < float(final) / 1.02:
            raise TRPError(f"speedup {float(final):g}x is out of reach: with every eligible layer at rank 1 the model "
                           f"runs {self._macs_total / max(best, 1):.2f}x fewer MACs")

    def current_speedup(self) -> float | None:
        """The MACs speed-up the next projection's ranks are chosen for (None: per-layer energy)."""
        if self.speedup is None:
            return None
        s = float(self.speedup(self.steps)) if callable(self.speedup) else float(self.speedup)
        if not (s >= 1.0 and s != float("inf")):
            raise TRPError(f"speedup schedule gave {s} at step {self.steps}; it must be finite and >= 1")
        return s

    def frozen(self) -> bool:
        """True once the ranks no longer change (``freeze`` steps have passed and ranks are set)."""
        return self.freeze is not None and self.steps > self.freeze and all(layer.rank for layer in self.layers)

    def _choose_ranks(self, spectra: dict[str, Tensor]) -> dict[str, int]:
        if self.frozen():
            return {layer.name: int(layer.rank) for layer in self.layers}  # type: ignore[arg-type]
        s = self.current_speedup()
        if s is None:
            e = self.current_energy()
            return {name: energy_rank(spec, e) for name, spec in spectra.items()}
        from trp.decompose import _solve_speedup

        cands = []
        for name, c in self._budget.items():
            c.spectrum = spectra[name]
            cands.append(c)
        chosen = _solve_speedup(cands, self._macs_total, s) if s > 1.0 else {}
        # A layer the budget leaves dense (or that no forward pass reaches) keeps its full rank.
        return {name: chosen.get(name) or int(spec.numel()) for name, spec in spectra.items()}

    def current_energy(self) -> float:
        """The energy the next projection keeps (follows the schedule)."""
        e = float(self.energy(self.steps)) if callable(self.energy) else float(self.energy)
        if not 0.0 < e <= 1.0:
            raise TRPError(f"energy schedule gave {e} at step {self.steps}; it must stay in (0, 1]")
        return e

    @torch.no_grad()
    def _svd(self, project: bool) -> None:
        # Layers sharing a matrix shape go through one batched SVD: far fewer LAPACK calls.
        groups: dict[tuple, list[_Layer]] = {}
        for layer in self.layers:
            shape = tuple(svd_mod.to_matrix(layer.weight, layer.layout).shape)
            groups.setdefault((shape, layer.weight.device), []).append(layer)
        factors = []
        for members in groups.values():
            mats = torch.stack([svd_mod.to_matrix(layer.weight.detach(), layer.layout) for layer in members])
            try:
                u, s, vh = svd_mod.svd(mats, name=members[0].name)
            except TRPError:  # find and name the failing layer
                for layer in members:
                    svd_mod.svd(svd_mod.to_matrix(layer.weight.detach(), layer.layout), name=layer.name)
                raise
            factors.append((members, u, s, vh))
        # All spectra first: a MACs budget shares rank across layers.
        ranks = self._choose_ranks({layer.name: svd_mod.spectrum(s[i])
                                    for members, _, s, _ in factors for i, layer in enumerate(members)})
        for members, u, s, vh in factors:
            for i, layer in enumerate(members):
                k = min(ranks[layer.name], s.shape[-1])
                layer.rank = k
                shape = layer.weight.shape
                if self.nuclear > 0:
                    g = svd_mod.nuclear_subgradient(u[i], vh[i], k)
                    layer.subgradient = svd_mod.from_matrix(g, layer.layout, shape).to(layer.weight.dtype)
                if project:
                    low = svd_mod.truncate(u[i], s[i], vh[i], k)
                    layer.weight.copy_(svd_mod.from_matrix(low, layer.layout, shape))
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

    @torch.no_grad()
    def regularize(self) -> None:
        """Add λ·U_k V_kᵀ to each eligible weight's gradient (call after backward, before the step)."""
        if self.nuclear == 0:
            return
        for layer in self.layers:
            g = layer.subgradient
            if g is None:
                continue
            if layer.weight.grad is None:
                layer.weight.grad = self.nuclear * g
            else:
                layer.weight.grad.add_(g, alpha=self.nuclear)

    def step(self) -> None:
        """Count one optimizer step; every ``period`` steps project (or refresh the sub-gradient)."""
        self.steps += 1
        if self.steps % self.period == 0:
            self._svd(project=self.project)

    def project_now(self) -> None:
        """Project every eligible weight onto its truncated SVD now (e.g. after the last step).

        Ending training on a projection makes the trained network exactly low-rank, so that
        decomposing it afterwards loses nothing.
        """
        self._svd(project=True)

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
