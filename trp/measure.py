"""Accounting and timing: MACs and parameters traced at a real input size, and measured latency.

MACs are counted for the layers that do the arithmetic (convolutions and Linear), per sample, from
the shapes a forward pass actually produces, never from an assumed 32×32 input. Latency is measured
with ``torch.utils.benchmark`` (warm-up, then the median of repeated blocks), so a speed-up can be
reported as measured, not only as counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor, nn

from trp.errors import TRPError

__all__ = ["COUNTED", "LayerCost", "Profile", "layer_macs", "trace_calls", "trace_shapes", "profile", "latency_ms"]

COUNTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)


def layer_macs(module: nn.Module, in_shape: Sequence[int], out_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one conv or Linear layer for one sample.

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
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        # Every input element is scattered into out_channels/groups kernels.
        return math.prod(in_shape) * (module.out_channels // module.groups) * math.prod(module.kernel_size)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return math.prod(out_shape) * (module.in_channels // module.groups) * math.prod(module.kernel_size)
    return 0


def _example_input(model: nn.Module, input_shape: Sequence[int]) -> Tensor:
    try:
        ref = next(model.parameters())
        device, dtype = ref.device, ref.dtype
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.float32
    return torch.zeros(1, *input_shape, device=device, dtype=dtype)


def trace_calls(
    model: nn.Module, input_shape: Sequence[int], types: tuple[type, ...] = COUNTED
) -> dict[str, list[tuple[tuple[int, ...], tuple[int, ...]]]]:
    """Input and output shapes (batch dimension dropped) of every call of every module of the given
    types: a module used twice in one forward pass (weight sharing) appears with two entries.

    The model runs once in eval mode on a zero batch of one; its training flag is restored.

    Example:
        >>> lin = nn.Linear(4, 4)
        >>> calls = trace_calls(nn.Sequential(lin, lin), (4,))
        >>> len(calls["0"])
        2
    """
    calls: dict[str, list[tuple[tuple[int, ...], tuple[int, ...]]]] = {}
    handles = []
    seen: dict[int, str] = {}
    for name, module in model.named_modules():  # named_modules lists a shared module once
        if isinstance(module, types) and id(module) not in seen:
            seen[id(module)] = name

            def hook(mod: nn.Module, args: tuple, out: Tensor, name: str = name) -> None:
                calls.setdefault(name, []).append((tuple(args[0].shape[1:]), tuple(out.shape[1:])))

            handles.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(_example_input(model, input_shape))
    except (RuntimeError, ValueError, IndexError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TRPError(f"the model cannot take input of shape {tuple(input_shape)}: {first}") from None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return calls


def trace_shapes(
    model: nn.Module, input_shape: Sequence[int], types: tuple[type, ...] = COUNTED
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Input and output shapes (batch dimension dropped) of the first call of every module of the
    given types (see :func:`trace_calls` for every call).

    Example:
        >>> shapes = trace_shapes(nn.Sequential(nn.Conv2d(3, 4, 3, stride=2)), (3, 9, 9))
        >>> shapes["0"]
        ((3, 9, 9), (4, 4, 4))
    """
    return {name: calls[0] for name, calls in trace_calls(model, input_shape, types).items()}


@dataclass
class LayerCost:
    """One counted layer: its name, type, shapes, MACs and own parameters."""

    name: str
    type: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    macs: int
    params: int


@dataclass
class Profile:
    """Totals and the per-layer table of :func:`profile`."""

    macs: int
    params: int
    input_shape: tuple[int, ...]
    layers: list[LayerCost] = field(default_factory=list)

    def table(self) -> str:
        """The per-layer table as aligned text."""
        width = max([len(layer.name) for layer in self.layers] + [5])
        lines = [f"{'layer':<{width}}  {'type':<8} {'output':<16} {'MACs':>14} {'params':>10}"]
        for layer in self.layers:
            out = "×".join(map(str, layer.out_shape))
            lines.append(f"{layer.name:<{width}}  {layer.type:<8} {out:<16} {layer.macs:>14,} {layer.params:>10,}")
        lines.append(f"{'total':<{width}}  {'':<8} {'':<16} {self.macs:>14,} {self.params:>10,}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def profile(model: nn.Module, input_shape: Sequence[int]) -> Profile:
    """Count MACs (conv and Linear) and parameters, traced at ``input_shape`` (no batch dim).

    Example:
        >>> from trp.models import create
        >>> p = profile(create("resnet20"), (3, 32, 32))
        >>> round(p.macs / 1e6, 2), round(p.params / 1e6, 2)
        (40.55, 0.27)
    """
    input_shape = tuple(int(d) for d in input_shape)
    calls = trace_calls(model, input_shape)
    modules = dict(model.named_modules())
    layers = []
    for name, shapes in calls.items():
        module = modules[name]
        own = sum(p.numel() for p in module.parameters(recurse=False))
        macs = sum(layer_macs(module, i, o) for i, o in shapes)  # every call of a shared layer counts
        layers.append(LayerCost(name, type(module).__name__, shapes[0][0], shapes[0][1], macs, own))
    params = sum(p.numel() for p in model.parameters())
    return Profile(sum(layer.macs for layer in layers), params, input_shape, layers)


def latency_ms(
    model: nn.Module,
    input_shape: Sequence[int],
    batch_size: int = 1,
    threads: int | None = None,
    min_run_time: float = 0.5,
    channels_last: bool = False,
) -> float:
    """Median wall time of one forward pass in milliseconds, measured with ``torch.utils.benchmark``.

    The model runs in eval mode under ``torch.inference_mode`` on its own device. After a warm-up,
    blocks of ``number`` calls (sized to about 20 ms each, so timer overhead is negligible) are
    repeated for ``min_run_time`` seconds, at least 5 times; the median block's mean is reported.

    Args:
        model: The model to time.
        input_shape: One sample's shape.
        batch_size: Samples per forward pass.
        threads: Torch intra-op threads during the measurement (default: the current setting).
        min_run_time: Seconds of measurement after warm-up.
        channels_last: Feed and run the model in channels-last memory format.

    Example:
        >>> ms = latency_ms(nn.Linear(8, 8), (8,), batch_size=4, min_run_time=0.05)
        >>> ms > 0
        True
    """
    import logging
    import statistics
    import time

    # Importing torch.utils.benchmark loads cpp_extension, which warns about CUDA_HOME on CPU-only
    # machines that merely have a CUDA toolkit folder; that warning says nothing about timing.
    ext_log = logging.getLogger("torch.utils.cpp_extension")
    level = ext_log.level
    ext_log.setLevel(logging.ERROR)
    try:
        from torch.utils import benchmark
    finally:
        ext_log.setLevel(level)

    if batch_size < 1:
        raise TRPError(f"batch size must be >= 1, got {batch_size}")
    try:
        x = _example_input(model, input_shape).expand(batch_size, *input_shape).contiguous()
    except RuntimeError as err:
        raise TRPError(f"the model cannot take input of shape {tuple(input_shape)}: {str(err).strip()}") from None
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            timer = benchmark.Timer(
                stmt="model(x)", globals={"model": model, "x": x}, num_threads=threads or torch.get_num_threads()
            )
            start = time.perf_counter()
            try:
                timer.timeit(3)  # warm-up: allocator, oneDNN primitive caches
            except RuntimeError as err:
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise TRPError(f"the model cannot take input of shape {tuple(input_shape)}: {first}") from None
            once = max((time.perf_counter() - start) / 3, 1e-7)
            number = max(1, int(0.02 / once))
            blocks = max(5, int(min_run_time / (number * once)))
            times = [timer.timeit(number).mean for _ in range(min(blocks, 200))]
    finally:
        model.train(was_training)
    return statistics.median(times) * 1e3
