"""Tracing: what a forward pass multiplies, attributed to the modules that own it, and the probe input.

The model runs once, in eval mode without autograd, on a zero batch of one. Module hooks record
every conv/Linear layer (and Hugging Face ``Conv1D``) called through its own forward, and every
``nn.MultiheadAttention`` call (counted from its arguments: q/k/v projections and the products
QKᵀ and AV; its output projection is attributed to ``out_proj``); a
``torch.overrides.TorchFunctionMode`` sees the functional calls made anywhere else: a weight passed
to ``F.linear``/``F.conv*`` (swin's ``F.linear(x, self.qkv.weight)``) is attributed to the module
owning it, and products of activations (``matmul``, ``bmm``, ``F.scaled_dot_product_attention``,
two-operand ``einsum``) to the module computing them. The probe's shape comes from the user, or
from what the model declares about itself (:func:`default_input_shape`); a model that rejects it is
a one-line TRPError asking for ``input_shape``.

Example:
    >>> t = trace(nn.Sequential(nn.Linear(4, 3)), (4,))
    >>> [(u.name, u.kind, u.macs) for u in t.uses]
    [('0', 'module', 12)]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from trp.errors import TRPError
from trp.schemes import is_hf_conv1d

__all__ = ["COUNTED", "DEFAULT_TOKENS", "Shapes", "Use", "Trace", "layer_macs", "attention_macs",
           "default_input_shape", "sample_shape", "example_input", "first_embedding", "cannot_take", "trace",
           "trace_calls", "trace_shapes"]

COUNTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
#: The sequence length of a token model (one whose first parametrized layer is an nn.Embedding)
#: when it declares none shorter.
DEFAULT_TOKENS = 128

Shapes = tuple[tuple[int, ...], tuple[int, ...]]


def _counted(module: nn.Module, types: tuple[type, ...]) -> bool:
    return isinstance(module, types) or (types is COUNTED and is_hf_conv1d(module))


def layer_macs(module: nn.Module, in_shape: Sequence[int], out_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one conv or Linear layer (or HF ``Conv1D``) for one sample.

    Args:
        module: The layer.
        in_shape: Its input shape without the batch dimension.
        out_shape: Its output shape without the batch dimension.

    Example:
        >>> layer_macs(nn.Conv2d(16, 32, 3, padding=1), (16, 8, 8), (32, 8, 8))
        294912
    """
    if isinstance(module, nn.Linear):
        return math.prod(out_shape) * module.in_features
    if is_hf_conv1d(module):  # weight in×out: y = x·W + b
        return math.prod(out_shape) * module.weight.shape[0]
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        # Every input element is scattered into out_channels/groups kernels.
        return math.prod(in_shape) * (module.out_channels // module.groups) * math.prod(module.kernel_size)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return math.prod(out_shape) * (module.in_channels // module.groups) * math.prod(module.kernel_size)
    return 0


def attention_macs(mha: nn.MultiheadAttention, query: Sequence[int], key: Sequence[int]) -> tuple[int, int]:
    """MACs of one ``nn.MultiheadAttention`` call: (q/k/v projections + QKᵀ + AV, output projection).

    ``query`` and ``key`` are the full shapes passed in ((L, E), (L, N, E), or (N, L, E) with
    ``batch_first``). With L queries, S keys (plus one for ``add_bias_kv`` and one for
    ``add_zero_attn``), N batch and embedding E: q L·E², k S·kdim·E, v S·vdim·E, QKᵀ and AV
    L·S·E each (summed over heads of width E/h), output projection L·E², all times N.

    Example:
        >>> attention_macs(nn.MultiheadAttention(8, 2, batch_first=True), (1, 5, 8), (1, 7, 8))
        (1776, 320)
    """
    e = mha.embed_dim
    if len(query) == 2:
        n, tgt, src = 1, query[0], key[0]
    else:
        n, tgt, src = (query[0], query[1], key[1]) if mha.batch_first else (query[1], query[0], key[0])
    extra = int(mha.bias_k is not None) + int(mha.add_zero_attn)
    inner = tgt * e * e + src * (mha.kdim + mha.vdim) * e + 2 * tgt * (src + extra) * e
    return n * inner, n * tgt * e * e


def _declared_image(model: nn.Module) -> tuple[int, ...] | None:
    """(C, H, W) from what the model says about itself: torchvision's ``image_size``, a Hugging Face
    ``config.image_size``, timm's ``patch_embed.img_size`` (the size it was built for) or timm's
    ``pretrained_cfg``/``default_cfg`` ``input_size``."""
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    channels = first.in_channels if first is not None else 3
    config = getattr(model, "config", None)
    patch = getattr(model, "patch_embed", None)
    for size, ch in ((getattr(model, "image_size", None), channels),
                     (getattr(config, "image_size", None), getattr(config, "num_channels", channels)),
                     (getattr(patch, "img_size", None), channels)):
        if isinstance(size, int) and not isinstance(size, bool) and size > 0:
            return (int(ch), size, size)
        if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(d, int) and d > 0 for d in size):
            return (int(ch), int(size[0]), int(size[1]))
    for cfg in (getattr(model, "pretrained_cfg", None), getattr(model, "default_cfg", None)):
        size = cfg.get("input_size") if isinstance(cfg, dict) else None
        if isinstance(size, (tuple, list)) and len(size) == 3 and all(isinstance(d, int) and d > 0 for d in size):
            return tuple(int(d) for d in size)
    return None


def _first_layer(model: nn.Module) -> nn.Module | None:
    return next((m for m in model.modules() if any(True for _ in m.parameters(recurse=False))), None)


def first_embedding(model: nn.Module) -> nn.Embedding | None:
    """The model's first layer with parameters if it is an ``nn.Embedding`` (a token model takes ids,
    not floats), else None.

    Example:
        >>> first_embedding(nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))).num_embeddings
        10
    """
    first = _first_layer(model)
    return first if isinstance(first, nn.Embedding) else None


def _token_model(model: nn.Module) -> bool:
    return first_embedding(model) is not None


def default_input_shape(model: nn.Module) -> tuple[int, ...]:
    """A sample shape when none is given. In order: the model's ``input_shape`` attribute; the image
    size it declares (torchvision ``image_size``, HF ``config.image_size``/``num_channels``, timm's
    ``patch_embed.img_size`` or ``pretrained_cfg["input_size"]``); for a token model (an
    ``nn.Embedding`` first) a sequence of ``min(128, max positions)`` ids; else (C, 32, 32) from the
    first conv's input channels, or (in_features,) for a Linear-first model.

    Example:
        >>> default_input_shape(nn.Sequential(nn.Conv2d(1, 4, 3)))
        (1, 32, 32)
    """
    shape = getattr(model, "input_shape", None)
    if shape is not None:
        return tuple(int(d) for d in shape)
    declared = _declared_image(model)
    if declared is not None:
        return declared
    if _token_model(model):
        config = getattr(model, "config", None)
        limits = [getattr(config, a, None) for a in ("max_position_embeddings", "n_positions", "n_ctx")]
        return (min([DEFAULT_TOKENS] + [v for v in limits if isinstance(v, int) and v > 0]),)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return (module.in_channels, 32, 32)
        if isinstance(module, nn.Linear):
            return (module.in_features,)
    raise TRPError("cannot guess the input shape of a model with no Conv2d or Linear layer; pass input_shape")


def sample_shape(model: nn.Module, input_shape: Sequence[int] | None) -> tuple[int, ...]:
    """One sample's shape: ``input_shape`` as given, or :func:`default_input_shape` when None.

    A 4-D shape for a model whose first layer is a Conv2d is read as (batch, C, H, W), as fvcore and
    torchinfo users write it, and the batch dimension is dropped (MACs are counted per sample).

    Example:
        >>> sample_shape(nn.Sequential(nn.Conv2d(3, 4, 3)), (1, 3, 32, 32))
        (3, 32, 32)
    """
    if input_shape is None:
        return default_input_shape(model)
    try:
        shape = tuple(int(d) for d in input_shape)
    except (TypeError, ValueError):
        raise TRPError(f"input_shape must be a sequence of whole numbers, got {input_shape!r}") from None
    if not shape or min(shape) < 1:
        raise TRPError(f"input_shape must be non-empty with every size >= 1, got {shape}")
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))), None)
    if isinstance(first, nn.Conv2d) and len(shape) == 4:
        return shape[1:]
    return shape


def example_input(model: nn.Module, input_shape: Sequence[int], batch_size: int = 1) -> Tensor:
    """A zero batch for probing the model: token ids (int64) for a token model, else floats of the
    model's dtype, on its device.

    Example:
        >>> example_input(nn.Sequential(nn.Embedding(10, 4)), (6,)).dtype
        torch.int64
    """
    try:
        ref = next(model.parameters())
        device, dtype = ref.device, ref.dtype
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.float32
    if _token_model(model):
        dtype = torch.int64
    return torch.zeros(batch_size, *input_shape, device=device, dtype=dtype)


def cannot_take(input_shape: Sequence[int], err: BaseException) -> TRPError:
    """The one-line error for a model that failed on the probe input: its first line, and what to pass.

    Example:
        >>> print(cannot_take((3, 8, 8), AssertionError("Wrong image height!")))  # doctest: +ELLIPSIS
        the model cannot take input of shape (3, 8, 8): Wrong image height! (pass input_shape, one sample's...)
    """
    text = str(err).strip()
    first = text.splitlines()[0] if text else type(err).__name__
    return TRPError(f"the model cannot take input of shape {tuple(input_shape)}: {first} "
                    "(pass input_shape, one sample's shape without the batch dimension)")


@dataclass
class Use:
    """Arithmetic seen during a trace, attributed to one module.

    ``kind`` is ``module`` (a conv/Linear/Conv1D through its own forward), ``functional`` (its
    weight passed to ``F.linear``/``F.conv*`` by other code), ``attention`` (an
    ``nn.MultiheadAttention``'s projections and products, without its output projection) or
    ``product`` (a matmul/bmm/attention between activations). Shapes drop the leading dimension;
    ``count`` is that dimension (1 for the probe's batch of one, more when a model folds windows or
    heads into it), and ``macs`` covers all of them.
    """

    name: str
    kind: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    macs: int
    count: int = 1


@dataclass
class Trace:
    """Every :class:`Use` of one forward pass in order, and the counted layers never used."""

    uses: list[Use] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)

    @property
    def macs(self) -> int:
        return sum(u.macs for u in self.uses)

    def calls(self) -> dict[str, list[Shapes]]:
        """(input, output) shapes of every call of every layer used through its own forward."""
        out: dict[str, list[Shapes]] = {}
        for u in self.uses:
            if u.kind == "module":
                out.setdefault(u.name, []).extend([(u.in_shape, u.out_shape)] * u.count)
        return out

    def functional(self) -> dict[str, int]:
        """MACs per module whose weight was used through a functional call."""
        out: dict[str, int] = {}
        for u in self.uses:
            if u.kind == "functional":
                out[u.name] = out.get(u.name, 0) + u.macs
        return out


def _split(t: Any) -> tuple[tuple[int, ...], int]:
    shape = tuple(t.shape) if isinstance(t, Tensor) else ()
    return (shape[1:], shape[0]) if len(shape) >= 2 else (shape, 1)


def _arg(args: tuple, kwargs: dict, i: int, key: str) -> Any:
    return args[i] if len(args) > i else kwargs.get(key)


def _einsum_macs(args: tuple) -> int:
    """MACs of a two-operand einsum without ellipsis: the product of every index's size."""
    operands = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
    if len(operands) != 2 or not isinstance(args[0], str) or "." in args[0]:
        return 0
    sizes: dict[str, int] = {}
    for letters, t in zip(args[0].split("->")[0].split(","), operands):
        if not isinstance(t, Tensor) or len(letters.strip()) != t.dim():
            return 0
        sizes.update(zip(letters.strip(), t.shape))
    return math.prod(sizes.values())


_LINEAR = {F.linear}
_CONV = {F.conv1d, F.conv2d, F.conv3d}
_CONV_T = {F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}
_MATMUL = {torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.mm, Tensor.mm, torch.bmm, Tensor.bmm}
_ADD_MATMUL = {torch.addmm, Tensor.addmm, torch.baddbmm, Tensor.baddbmm}


class _Tracer(TorchFunctionMode):
    """Sees the torch functions the model calls and attributes their MACs (see the module docstring)."""

    def __init__(self, model: nn.Module, types: tuple[type, ...]) -> None:
        super().__init__()
        self.types = types
        self.names = {id(m): n for n, m in model.named_modules()}  # a shared module: its first name
        self.owner: dict[int, str] = {}
        for name, module in model.named_modules():
            for param in module.parameters(recurse=False):
                self.owner.setdefault(id(param), name)
        self.stack: list[nn.Module] = []
        self.opaque = 0  # > 0 inside a counted layer or an attention module: they count themselves
        self.trace = Trace()

    def use(self, name: str, kind: str, x: Any, out: Any, macs: int) -> None:
        (ins, _), (outs, count) = _split(x), _split(out)
        self.trace.uses.append(Use(name, kind, ins, outs, int(macs), count))

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.opaque or not isinstance(out, Tensor):
            return out
        here = self.names.get(id(self.stack[-1]), "") if self.stack else ""
        if func in _LINEAR or func in _CONV or func in _CONV_T:
            x, weight = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight")
            if not isinstance(x, Tensor) or not isinstance(weight, Tensor):
                return out
            per = math.prod(weight.shape[1:])  # in (Linear), or in/groups·k (conv), or out/groups·k (transposed)
            macs = (x.numel() if func in _CONV_T else out.numel()) * per
            owner = self.owner.get(id(weight))
            self.use(owner if owner is not None else here, "functional" if owner is not None else "product",
                     x, out, macs)
        elif func in _MATMUL or func in _ADD_MATMUL:
            first = _arg(args, kwargs, 1 if func in _ADD_MATMUL else 0, "mat1")
            inner = first.shape[-1] if isinstance(first, Tensor) and first.dim() else 1
            self.use(here, "product", first, out, out.numel() * inner)
        elif func is F.scaled_dot_product_attention:
            q, k, v = (_arg(args, kwargs, i, n) for i, n in enumerate(("query", "key", "value")))
            macs = math.prod(q.shape[:-1]) * k.shape[-2] * (q.shape[-1] + v.shape[-1])
            self.use(here, "product", q, out, macs)
        elif func is torch.einsum:
            self.use(here, "product", args[1] if len(args) > 1 else None, out, _einsum_macs(args))
        return out

    # -- module hooks: the stack of running modules, counted layers, attention
    def enter(self, module: nn.Module, args: tuple) -> None:
        self.stack.append(module)
        if _counted(module, self.types) or isinstance(module, nn.MultiheadAttention):
            self.opaque += 1

    def leave(self, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        if self.stack and self.stack[-1] is module:
            self.stack.pop()
        counted, attention = _counted(module, self.types), isinstance(module, nn.MultiheadAttention)
        if not (counted or attention):
            return
        self.opaque -= 1
        x = args[0] if args else next(iter(kwargs.values()), None)
        y = out[0] if isinstance(out, (tuple, list)) else out
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            return
        name = self.names[id(module)]
        if counted:
            (ins, _), (outs, count) = _split(x), _split(y)
            self.trace.uses.append(Use(name, "module", ins, outs, count * layer_macs(module, ins, outs), count))
        else:
            key = args[1] if len(args) > 1 else kwargs.get("key", x)
            inner, out_proj = attention_macs(module, tuple(x.shape), tuple(key.shape))
            self.use(name, "attention", x, y, inner)
            owner = self.owner.get(id(module.out_proj.weight), name + ".out_proj")
            self.use(owner, "functional", x, y, out_proj)


def trace(model: nn.Module, input_shape: Sequence[int], types: tuple[type, ...] = COUNTED) -> Trace:
    """Run the model once on a zero batch of one and record what it multiplies (see :class:`Use`).

    The model runs in eval mode under ``no_grad``; its training flag is restored. A model that
    cannot take the input (an exception of any kind from its forward) is a one-line TRPError asking
    for ``input_shape``.

    Example:
        >>> lin = nn.Linear(4, 4)
        >>> t = trace(nn.Sequential(lin, lin), (4,))
        >>> [(u.name, u.kind, u.macs) for u in t.uses]
        [('0', 'module', 16), ('0', 'module', 16)]
    """
    tracer = _Tracer(model, types)
    handles = []
    for module in {id(m): m for m in model.modules()}.values():
        handles.append(module.register_forward_pre_hook(tracer.enter))
        handles.append(module.register_forward_hook(tracer.leave, with_kwargs=True, always_call=True))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), tracer:
            model(example_input(model, input_shape))
    except TRPError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure inside a foreign forward means "wrong input"
        raise cannot_take(input_shape, err) from None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    seen = {u.name for u in tracer.trace.uses}
    tracer.trace.unused = [n for n, m in model.named_modules() if _counted(m, types) and n not in seen]
    return tracer.trace


def trace_calls(
    model: nn.Module, input_shape: Sequence[int], types: tuple[type, ...] = COUNTED
) -> dict[str, list[Shapes]]:
    """Input and output shapes (leading dimension dropped) of every call of every module of the given
    types through its own forward: a module used twice in one forward pass (weight sharing) appears
    with two entries, and one applied to a tensor whose leading dimension is n (windows or heads
    folded into the batch) with n entries.

    The model runs once in eval mode on a zero batch of one; its training flag is restored.

    Example:
        >>> lin = nn.Linear(4, 4)
        >>> calls = trace_calls(nn.Sequential(lin, lin), (4,))
        >>> len(calls["0"])
        2
    """
    return trace(model, input_shape, types).calls()


def trace_shapes(
    model: nn.Module, input_shape: Sequence[int], types: tuple[type, ...] = COUNTED
) -> dict[str, Shapes]:
    """Input and output shapes (batch dimension dropped) of the first call of every module of the
    given types (see :func:`trace_calls` for every call).

    Example:
        >>> shapes = trace_shapes(nn.Sequential(nn.Conv2d(3, 4, 3, stride=2)), (3, 9, 9))
        >>> shapes["0"]
        ((3, 9, 9), (4, 4, 4))
    """
    return {name: calls[0] for name, calls in trace_calls(model, input_shape, types).items()}
