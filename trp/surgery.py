"""Module surgery: find layers by name, replace them (under every name they are reachable by), roll back.

A module may be registered under several names (the same ``nn.Linear`` twice in a ``Sequential``,
tied layers): replacing it under one name only would break the sharing and leave the other call
site on the old layer, so every replacement here goes to all of a module's names. A batch of
replacements is all or nothing: if one fails, those already made are undone.

Example:
    >>> lin = nn.Linear(2, 2)
    >>> m = nn.Sequential(lin, nn.ReLU(), lin)
    >>> replace_modules(m, {"0": nn.Identity()})
    >>> m[0] is m[2]
    True
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

from torch import nn

from trp import schemes as schemes_mod
from trp.validate import choice

__all__ = ["FilterFn", "get_module", "set_module", "aliases", "replace_modules", "unwrap", "default_filter",
           "LAYERS", "layer_filter"]

FilterFn = Callable[[nn.Module, str], bool]


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule at a dotted name (``""`` is the model itself).

    Example:
        >>> get_module(nn.Sequential(nn.Linear(2, 2)), "0")
        Linear(in_features=2, out_features=2, bias=True)
    """
    return model.get_submodule(name) if name else model


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at one dotted name (see :func:`replace_modules` for every alias).

    Example:
        >>> m = nn.Sequential(nn.Linear(2, 2))
        >>> set_module(m, "0", nn.Identity()); m
        Sequential(
          (0): Identity()
        )
    """
    parent_name, _, child = name.rpartition(".")
    setattr(get_module(model, parent_name), child, new)


def aliases(model: nn.Module) -> dict[int, list[str]]:
    """Every name each module is reachable by, keyed by ``id(module)``, in registration order.

    Example:
        >>> lin = nn.Linear(2, 2)
        >>> list(aliases(nn.Sequential(lin, lin)).values())[1]
        ['0', '1']
    """
    out: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        out.setdefault(id(module), []).append(name)
    return out


def replace_modules(model: nn.Module, replacements: Mapping[str, nn.Module]) -> None:
    """Put each new module at its dotted name and at every other name of the module it replaces;
    if any replacement fails, undo those already made, leaving the model as it was.

    Example:
        >>> m = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
        >>> replace_modules(m, {"1": nn.Identity()}); m[1]
        Identity()
    """
    names_of = aliases(model)
    done: list[tuple[str, nn.Module]] = []
    try:
        for name, new in replacements.items():
            old = get_module(model, name)
            for alias in names_of.get(id(old), [name]):
                done.append((alias, get_module(model, alias)))
                set_module(model, alias, new)
    except Exception:
        for alias, old in reversed(done):  # roll back: the model is left as it was
            set_module(model, alias, old)
        raise


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


def default_filter(model: nn.Module) -> FilterFn:
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


#: The layer choices of :func:`layer_filter` (``trp train --layers``): the paper's convs, or all.
LAYERS: tuple[str, ...] = ("convs", "all")


def layer_filter(model: nn.Module, layers: str = "convs", scheme: str | Sequence[str] = "auto") -> FilterFn:
    """The layers a run trains and compresses: ``convs`` is :func:`default_filter` (the paper's);
    ``all`` is every layer one of ``scheme`` can decompose (convs and Linear layers alike), except
    the first Conv2d and the last Linear registered (the classifier), which the paper leaves dense.

    Example:
        >>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1), nn.Flatten(), nn.Linear(8, 8), nn.Linear(8, 2))
        >>> f = layer_filter(m, "all", ("auto",))
        >>> [name for name, mod in m.named_modules() if f(mod, name)]
        ['1', '3']
    """
    if choice(layers, "layers", LAYERS) == "convs":
        return default_filter(model)
    names = schemes_mod.parse_names(scheme)
    first = next((name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    last = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last = name

    def filter_fn(module: nn.Module, name: str) -> bool:
        return name not in (first, last) and schemes_mod.applicable(module, names)[0] is not None

    return filter_fn
