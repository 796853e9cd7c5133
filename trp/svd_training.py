"""SVD training (Yang et al., CVPR Workshops 2020): train layers as U·diag(s)·Vᵀ, then prune s.

Where TRP (:mod:`trp.hook`) keeps dense weights and takes an SVD every few steps, SVD training
takes one SVD at the start and then trains the factors themselves (Yang et al., "Learning Low-rank
Deep Neural Networks via Singular Vector Orthogonality Regularization and Singular Value
Sparsification", Sec. 3):

* **Parametrization.** The stock ``nn.Conv2d`` / ``nn.Linear`` stays in place; its ``weight``
  becomes a ``torch.nn.utils.parametrize`` parametrization, :class:`SVDWeight`, with trainable
  ``U`` (m×r), ``s`` (r), ``V`` (n×r) and ``weight = from_matrix(U·diag(s)·Vᵀ)`` (Eq. 1) in a
  non-batched layout of :mod:`trp.schemes` (``channel``: N×(C·kh·kw), ``spatial``: (C·kh)×(N·kw),
  ``linear``). The factors start as the thin SVD of the weight, so the model computes exactly what
  it did. Stride, padding, ``padding_mode``, dilation and bias stay the stock layer's, and a layer
  reachable under several names is one module with one set of factors (tying for free). Each
  forward pass composes the kernel and runs one ``F.conv2d``, as the paper trains.
* **Regularization** (paper Eq. 2–4, :mod:`trp.svd_losses`): orthogonality of U and V and
  sparsity of s, added to the task loss, drive singular values to zero, i.e. lower the rank.
* **Pruning** at the end: small |s| are cut (by any per-layer criterion of :mod:`trp.rank`, energy
  by default), the parametrization is removed (``remove_parametrizations``) and each layer becomes
  the same two stock layers that :func:`trp.decompose_` builds, from the trained factors (no second
  SVD), with a :class:`~trp.plan.Plan` so the result saves and loads like any decomposed model.

The state dict of a parametrized layer holds ``parametrizations.weight.original0`` (U),
``original1`` (s) and ``original2`` (V) next to ``bias``; :func:`svd_parametrize_` on a fresh
model of the same architecture gives the same keys, which is how checkpoints rebuild it.

Example:
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1))
    >>> x = torch.randn(2, 3, 10, 10); before = model(x)
    >>> model = svd_parametrize_(model, "channel")
    >>> [name for name, _ in svd_layers(model)], factors(model[2]).U.shape
    (['2'], torch.Size([16, 16]))
    >>> torch.allclose(model(x), before, atol=1e-5)
    True
    >>> # ... train with trp.svd_losses.regularization(model, config) added to the loss, then:
    >>> model, plan = finalize_(model, 4, input_shape=(3, 10, 10))
    >>> [type(m).__name__ for m in model[2]]
    ['Conv2d', 'Conv2d']
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence, Union

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from trp import rank as rank_mod
from trp import schemes
from trp.errors import TRPError
from trp.tracing import layer_macs, sample_shape, trace_shapes
from trp.plan import LayerPlan, Plan
from trp.surgery import FilterFn, default_filter, replace_modules, unwrap
from trp.validate import choice

__all__ = [
    "SVDWeight", "SVDFactors", "training_schemes", "svd_parametrize_layer_",
    "svd_parametrize_", "svd_layers", "require_svd_layers", "factors", "sorted_factors", "ranks", "finalize_", "to_dense_",
    "truncate_to_dense_", "upgrade_state_dict",
]

RankArg = Union[rank_mod.Criterion, int, str, Mapping[str, int], None]



def training_schemes(module: nn.Module | None = None) -> tuple[str, ...]:
    """The schemes ``module`` can be SVD-trained in: those of :mod:`trp.schemes` that accept it and
    lay it out as *one* matrix (a batched layout such as ``decouple`` has no single U·diag(s)·Vᵀ).
    Without a module: the choices for a plain Conv2d, i.e. for the ``scheme`` of :func:`svd_parametrize_`.

    Example:
        >>> training_schemes(), training_schemes(nn.Linear(2, 2)), training_schemes(nn.Conv2d(4, 4, 3, groups=2))
        (('channel', 'spatial'), ('linear',), ())
    """
    if module is None:
        module = nn.Conv2d(1, 1, 1, device="meta")  # schemes check the type and groups only
    return tuple(n for n in schemes.names_for(module) if not schemes.get(n).batched)


class SVDWeight(nn.Module):
    """The parametrization ``weight = from_matrix(U·diag(s)·Vᵀ)`` of one layer (paper Eq. 1).

    ``right_inverse`` turns a dense weight into the thin SVD factors ``(U, s, V)``, which
    ``torch.nn.utils.parametrize`` stores as the layer's trainable tensors; ``forward`` composes them.

    ``scheme`` is a non-batched scheme of :mod:`trp.schemes`, ``name`` the layer's (for errors).

    Example:
        >>> lin = nn.Linear(6, 4)
        >>> p = SVDWeight("linear", lin.weight.shape)
        >>> u, s, v = p.right_inverse(lin.weight)
        >>> u.shape, s.shape, v.shape, torch.allclose(p(u, s, v), lin.weight, atol=1e-6)
        (torch.Size([4, 4]), torch.Size([4]), torch.Size([6, 4]), True)
    """

    def __init__(self, scheme: str, shape: Sequence[int], name: str = "layer") -> None:
        super().__init__()
        self.scheme = choice(scheme, "SVD-training scheme", schemes.names(batched=False))
        self.shape = tuple(int(d) for d in shape)
        self.name = name

    def forward(self, u: Tensor, s: Tensor, v: Tensor) -> Tensor:
        # W = U·diag(s)·Vᵀ (paper Eq. 1), laid back out as the layer's kernel.
        return schemes.get(self.scheme).from_matrix((u * s) @ v.mT, self.shape)

    def right_inverse(self, weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # The full-rank thin SVD: at r = min(m, n) the product is the weight itself, so training
        # starts from exactly the initial or pretrained network (paper Sec. 3.1).
        u, s, vh = schemes.get(self.scheme).factorize(weight, self.name)
        dtype = weight.dtype
        return u.to(dtype).contiguous(), s.to(dtype).contiguous(), vh.mT.to(dtype).contiguous()

    def extra_repr(self) -> str:
        return f"scheme={self.scheme!r}, shape={self.shape}"


class SVDFactors(NamedTuple):
    """A layer's trainable factors: U (m×r), s (r), V (n×r)."""

    U: nn.Parameter
    s: nn.Parameter
    V: nn.Parameter


def _svd_weight(module: nn.Module) -> SVDWeight | None:
    # Only a weight parametrized by SVDWeight alone: stacked parametrizations would make the
    # originals mean something else.
    if not parametrize.is_parametrized(module, "weight"):
        return None
    chain = module.parametrizations.weight
    return chain[0] if len(chain) == 1 and isinstance(chain[0], SVDWeight) else None


def factors(module: nn.Module) -> SVDFactors:
    """The ``(U, s, V)`` parameters of an SVD-parametrized layer (in-place edits train through).

    Example:
        >>> layer = svd_parametrize_layer_(nn.Linear(5, 3), "linear")
        >>> [tuple(t.shape) for t in factors(layer)]
        [(3, 3), (3,), (5, 3)]
    """
    if _svd_weight(module) is None:
        raise TRPError(f"{type(module).__name__} is not SVD-parametrized; call svd_parametrize_ first")
    chain = module.parametrizations.weight
    return SVDFactors(chain.original0, chain.original1, chain.original2)


@torch.no_grad()
def sorted_factors(module: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
    """``(u, σ, vh)`` with σ = |s| descending and the signs of s folded into u (detached).

    Training can push an s_i through zero; ``s_i u_i v_iᵀ = |s_i| (sign(s_i) u_i) v_iᵀ`` keeps the
    product while making the values the non-negative, sorted spectrum every rank criterion and
    :meth:`trp.schemes.Scheme.build` expect.

    Example:
        >>> layer = svd_parametrize_layer_(nn.Linear(4, 3), "linear")
        >>> with torch.no_grad():
        ...     _ = factors(layer).s.mul_(-1)
        >>> u, sv, vh = sorted_factors(layer)
        >>> bool((sv >= 0).all()), torch.allclose((u * sv) @ vh, layer.weight, atol=1e-6)
        (True, True)
    """
    u, s, v = (t.detach() for t in factors(module))
    sign = torch.where(s < 0, -1.0, 1.0).to(s.dtype)
    order = torch.argsort(s.abs(), descending=True, stable=True)
    return (u * sign)[:, order], s.abs()[order], v[:, order].mT


def svd_parametrize_layer_(module: nn.Module, scheme: str, name: str = "layer") -> nn.Module:
    """Register :class:`SVDWeight` on one stock layer's ``weight``, in place, and return the layer.

    Raises TRPError if the scheme is batched, unknown or does not accept the layer (e.g. groups≠1),
    the layer is parametrized already, or its weight cannot be factorized (non-finite).

    Example:
        >>> conv = nn.Conv2d(3, 6, (3, 1))
        >>> factors(svd_parametrize_layer_(conv, "spatial", "conv")).U.shape
        torch.Size([9, 6])
    """
    sch = schemes.get(choice(scheme, "SVD-training scheme", schemes.names(batched=False)))
    if parametrize.is_parametrized(module):
        raise TRPError(f"layer {name!r} is parametrized already; SVD training needs a plain layer")
    reason = sch.check(module)
    if reason:
        raise TRPError(f"layer {name!r}: {reason}")
    parametrize.register_parametrization(module, "weight", SVDWeight(sch.name, module.weight.shape, name))
    return module


def _tied_weights(net: nn.Module, chosen: Sequence[tuple[str, nn.Module, str]]) -> None:
    # Two *different* modules holding one weight tensor would each get their own factors and
    # silently stop being tied; refuse instead (one module under two names is fine).
    owner: dict[int, tuple[str, int]] = {}
    for name, module in net.named_modules():
        w = dict(module.named_parameters(recurse=False)).get("weight")  # None once parametrized
        if w is None:
            continue
        first = owner.setdefault(id(w), (name, id(module)))
        if first[1] != id(module) and any(n in (name, first[0]) for n, _, _ in chosen):
            raise TRPError(f"layers {first[0]!r} and {name!r} share one weight tensor; exclude them with filter_fn")


def svd_parametrize_(model: nn.Module, scheme: str = "channel", filter_fn: FilterFn | None = None) -> nn.Module:
    """SVD-parametrize the eligible layers of a model, in place, and return it.

    Eligible: every plain ``nn.Conv2d`` with groups=1 and every plain ``nn.Linear`` that
    ``filter_fn(module, name)`` accepts (default :func:`trp.surgery.default_filter`: every conv but
    the first, no Linear, as TRP does); others stay dense. If one layer fails (e.g. non-finite
    weights), the model is left as it was, with its very weight tensors. Build the optimizer
    afterwards: the factors are new parameters.

    ``scheme`` is the conv layout, one of :func:`training_schemes` (Linear layers use ``linear``); a
    DDP or compiled wrapper is looked through. Returns the same model, computing the same function.
    Raises TRPError for an unknown scheme, no eligible layer, two layers sharing one weight tensor
    (their factors would untie them) or a weight that cannot be factorized.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        >>> x = torch.randn(1, 3, 8, 8); before = model(x)
        >>> model = svd_parametrize_(model, "spatial")
        >>> model[2].parametrizations.weight[0].scheme, torch.allclose(model(x), before, atol=1e-5)
        ('spatial', True)
    """
    choice(scheme, "SVD-training scheme", training_schemes())
    net = unwrap(model)
    filter_fn = filter_fn or default_filter(net)
    chosen: list[tuple[str, nn.Module, str]] = []
    for name, module in net.named_modules():  # lists a shared module once: one set of factors for all its names
        own = training_schemes(module) if name else ()
        pick = scheme if scheme in own else own[0] if len(own) == 1 else None
        if pick is not None and filter_fn(module, name):
            chosen.append((name, module, pick))
    if not chosen:
        if svd_layers(net):  # already parametrized: calling twice is harmless
            return model
        raise TRPError("SVD training found no eligible layer (Conv2d with groups=1 or Linear accepted by filter_fn)")
    _tied_weights(net, chosen)
    done: list[tuple[nn.Module, nn.Parameter]] = []
    try:
        for name, module, pick in chosen:
            original = module.weight
            svd_parametrize_layer_(module, pick, name)
            done.append((module, original))
    except BaseException:
        for module, original in reversed(done):  # roll back to the very same weight tensors
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            module.weight = original
        raise
    return model


def upgrade_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename the keys of a state dict saved by the former SVDConv2d/SVDLinear modules (``layer.U``,
    ``layer.s``, ``layer.V``) to the parametrization's (``layer.parametrizations.weight.original0``…).

    Example:
        >>> old = {"1.U": torch.eye(2), "1.s": torch.ones(2), "1.V": torch.eye(2), "1.bias": torch.zeros(2)}
        >>> [k[-len("weight.original0"):] for k in sorted(upgrade_state_dict(old))[1:]]
        ['weight.original0', 'weight.original1', 'weight.original2']
    """
    out = dict(state)
    for key in [k for k in state if k == "U" or k.endswith(".U")]:
        prefix = key[:-1]
        if prefix + "s" in state and prefix + "V" in state:
            for i, factor in enumerate("UsV"):
                out[f"{prefix}parametrizations.weight.original{i}"] = out.pop(prefix + factor)
    return out


def svd_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The SVD-parametrized stock layers of a model (through DDP / compiled wrappers), by name;
    a layer reachable under several names is listed once.

    Example:
        >>> m = svd_parametrize_(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)))
        >>> [(name, type(layer).__name__) for name, layer in svd_layers(m)]
        [('1', 'ParametrizedConv2d')]
    """
    return [(name, m) for name, m in unwrap(model).named_modules() if _svd_weight(m) is not None]


def require_svd_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """:func:`svd_layers`, or a TRPError when there is none (a loss over no layer is a mistake).

    Example:
        >>> len(require_svd_layers(svd_parametrize_(nn.Sequential(nn.Linear(4, 4)), filter_fn=lambda m, n: True)))
        1
    """
    layers = svd_layers(model)
    if not layers:
        raise TRPError("the model has no SVD-parametrized layer; call svd_parametrize_(model) first")
    return layers


def ranks(model: nn.Module, energy: float = 0.99) -> dict[str, tuple[int, int]]:
    """Each SVD layer's ``(k, r)``: the energy rank of σ = |s| (smallest k with Σ_{i≤k} σ_i² ≥
    e·Σ σ_i², read off the trained values, no SVD) and its full rank.

    Example:
        >>> m = svd_parametrize_(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)))
        >>> with torch.no_grad():
        ...     _ = factors(m[1]).s[2:].zero_()
        >>> ranks(m, 1.0)
        {'1': (2, 8)}
    """
    criterion = rank_mod.energy(energy)
    return {name: (criterion.select(sorted_factors(m)[1]), factors(m).s.numel()) for name, m in svd_layers(model)}


def _criterion(rank: RankArg) -> rank_mod.Criterion | dict[str, int]:
    if isinstance(rank, str):  # the command line's NAME:NUMBER
        rank = rank_mod.parse(rank)
    criterion = rank_mod.resolve(rank, default=rank_mod.energy(0.99))
    if isinstance(criterion, rank_mod.Speedup):
        raise TRPError(
            "SVD training prunes each layer by its own singular values; a whole-model speed-up budget does not "
            "apply (use trp.energy, trp.value, trp.fixed or trp.fraction, or to_dense_ then trp.decompose_)"
        )
    return criterion


def _select(criterion: rank_mod.Criterion | Mapping[str, int], name: str, spectrum: Tensor) -> int:
    if isinstance(criterion, Mapping):
        k = criterion.get(name)
        return spectrum.numel() if k is None else rank_mod.fixed(k).select(spectrum)
    return int(criterion.select(spectrum))


@torch.no_grad()
def _prune_and_unparametrize(module: nn.Module, k: int | None) -> None:
    """Zero all but the k largest |s| (none for k=None), then make ``weight`` a plain dense parameter
    again holding ``U_k·diag(s_k)·V_kᵀ``: the stock layer, in place, under all its names."""
    f = factors(module)
    grad = f.U.requires_grad
    if k is not None:
        order = torch.argsort(f.s.abs(), descending=True, stable=True)
        f.s[order[k:]] = 0.0
    # copy.deepcopy shares torch's injected Parametrized<Layer> class between copies, and
    # remove_parametrizations deletes ``weight`` from that class: give this module a private copy
    # of it first, so finishing one copy leaves the others working.
    cls = type(module)
    own = {key: value for key, value in vars(cls).items() if key not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, own)
    parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    # remove_parametrizations leaves a frozen weight as a buffer; the stock layer has a parameter.
    module.weight = nn.Parameter(module.weight.detach(), requires_grad=grad)


def _own_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=False))


def _layer_plan(name: str, module: nn.Module, ins: Sequence[int], outs: Sequence[int],
                pruned: tuple[str, int, Tensor] | None) -> LayerPlan:
    # ``module`` is the stock layer again: what trp.plan would see on this model, and what
    # apply_plan will find in a fresh one. ``pruned`` is (scheme, k, |s| sorted) of an SVD layer.
    weight = getattr(module, "weight", None)
    lp = LayerPlan(name, type(module).__name__, list(weight.shape) if weight is not None else [], list(ins),
                   list(outs), layer_macs(module, ins, outs), _own_params(module))
    if pruned is None:
        lp.reason = "not SVD-parametrized"
        return lp
    scheme, k, spectrum = pruned
    sch = schemes.get(scheme)
    lp.scheme, lp.rank, lp.full_rank, lp.energy = scheme, k, spectrum.numel(), rank_mod.kept_energy(spectrum, k)
    lp.macs_after = k * sch.macs_per_rank(module, ins, outs)
    lp.params_after = k * sch.params_per_rank(module) + (module.bias.numel() if module.bias is not None else 0)
    if not name:
        lp.reason = "the model itself cannot be replaced in place"
    elif lp.macs_after >= lp.macs_before:
        lp.reason = f"rank {k} does not lower its MACs ({lp.macs_after:,} >= {lp.macs_before:,} dense)"
    return lp


def finalize_(
    model: nn.Module, rank: RankArg = None, input_shape: Sequence[int] | None = None
) -> tuple[nn.Module, Plan]:
    """Prune the singular values and turn every SVD layer into stock layers, in place.

    For each SVD layer (paper Sec. 3.3): sort by |s| (:func:`sorted_factors`), keep the k values the
    criterion picks, remove the parametrization, and build from the *trained* factors truncated to k
    the very modules :func:`trp.decompose_` would (``Scheme.build``): the kept layer is
    ``U_k·diag(|s|_k)·V_kᵀ`` itself, not a re-SVD. A layer where rank k would not lower the MACs (or
    that the forward pass never reaches) stays one stock layer with that pruned weight. The
    :class:`~trp.plan.Plan` has :func:`trp.plan`'s format: ``trp.apply_plan(fresh_model, plan)``
    then ``load_state_dict`` restores the result.

    Args:
        model: A model with SVD-parametrized layers.
        rank: A per-layer criterion (``trp.energy(0.99)`` by default, ``trp.value``, ``trp.fixed``,
            ``trp.fraction``), its command-line form (``"energy:0.99"``), an int rank, or
            ``{layer name: rank}``; not ``trp.speedup``.
        input_shape: One sample's shape for MACs accounting (default: as :func:`trp.plan`).

    Returns:
        ``(model, plan)``: the same model object, now free of SVD layers, and its plan.

    Raises:
        TRPError: No SVD layer, a speed-up criterion, or an ``input_shape`` the model rejects
            (then the model is unchanged).

    Example:
        >>> import trp
        >>> model = svd_parametrize_(nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 32, 3)))
        >>> with torch.no_grad():
        ...     _ = factors(model[1]).s[4:].zero_()  # as if the sparsity loss had driven them to zero
        >>> model, plan = finalize_(model, trp.energy(1.0), input_shape=(3, 12, 12))
        >>> model[1]
        Sequential(
          (0): Conv2d(16, 4, kernel_size=(3, 3), stride=(1, 1), bias=False)
          (1): Conv2d(4, 32, kernel_size=(1, 1), stride=(1, 1))
        )
        >>> [(lp.name, lp.rank, lp.decomposed) for lp in plan.layers]
        [('0', None, False), ('1', 4, True)]
    """
    net = unwrap(model)
    layers = require_svd_layers(net)
    criterion = _criterion(rank)
    input_shape = sample_shape(net, input_shape)
    shapes = trace_shapes(net, input_shape)  # before any change, so a rejected shape leaves the model as it was
    # The sorted factors and ranks are read off before the parametrizations go (one pass, no SVD).
    factors_of = {id(m): sorted_factors(m) for _, m in layers}
    pruned = {id(m): (_svd_weight(m).scheme, _select(criterion, name, factors_of[id(m)][1]), factors_of[id(m)][1])
              for name, m in layers}
    for _, module in layers:
        _prune_and_unparametrize(module, pruned[id(module)][1])
    modules = dict(net.named_modules())
    label = "per-layer ranks" if isinstance(criterion, Mapping) else str(criterion)
    result = Plan(list(input_shape), label, 0, sum(p.numel() for p in net.parameters()))
    built: dict[str, nn.Module] = {}
    for name, (ins, outs) in shapes.items():
        module = modules[name]
        lp = _layer_plan(name, module, ins, outs, pruned.get(id(module)))
        if lp.scheme is not None and lp.decomposed:
            new = schemes.get(lp.scheme).build(module, lp.rank, factors_of[id(module)]).train(module.training)
            for p in new.parameters():
                p.requires_grad_(module.weight.requires_grad)
            built[name] = new
        result.macs_before += lp.macs_before
        result.layers.append(lp)
    replace_modules(net, built)  # under every name of each layer (tying)
    return model, result


def to_dense_(model: nn.Module) -> nn.Module:
    """Remove every SVD parametrization, in place, unpruned: plain layers with weight ``U·diag(s)·Vᵀ``.

    The function is unchanged and the state dict is the plain architecture's: for plain checkpoints,
    or to decompose afterwards with any criterion (``trp.decompose_``).

    Example:
        >>> model = svd_parametrize_(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)))
        >>> type(to_dense_(model)[1]).__name__, sorted(model[1].state_dict())
        ('Conv2d', ['bias', 'weight'])
    """
    for _, module in svd_layers(model):
        _prune_and_unparametrize(module, None)
    return model


def truncate_to_dense_(model: nn.Module, rank: RankArg = None) -> tuple[nn.Module, dict[str, int]]:
    """Prune each SVD layer's singular values and turn it into a dense layer of exactly that rank.

    All but the k largest |s| are set to zero and the parametrization removed, so the weight is
    ``U_k diag(s_k) V_kᵀ`` of the trained factors and ``trp.decompose_`` at rank k reproduces it;
    ``trp compress`` uses this to treat SVD-trained runs like any other (fold BN, then the plan).

    Returns the model and the chosen rank of every pruned layer, by name.

    Example:
        >>> model = svd_parametrize_(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)))
        >>> _, chosen = truncate_to_dense_(model, 4)
        >>> chosen, int(torch.linalg.matrix_rank(model[1].weight.reshape(8, -1)))
        ({'1': 4}, 4)
    """
    criterion = _criterion(rank)
    chosen = {name: _select(criterion, name, sorted_factors(m)[1]) for name, m in svd_layers(model)}
    for name, module in svd_layers(model):
        _prune_and_unparametrize(module, chosen[name])
    return model, chosen
