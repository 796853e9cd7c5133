"""Accounting and timing: MACs and parameters traced at a real input size, and measured latency.

MACs are counted per sample from the shapes a forward pass actually produces, never from an
assumed 32×32 input, for everything that multiplies (:mod:`trp.tracing`): conv and Linear layers
(and Hugging Face's ``Conv1D``) called through their forward; weights passed to functional calls
(swin's ``F.linear(x, self.qkv.weight)``, kind ``functional``); ``nn.MultiheadAttention``'s
projections and attention products (kind ``attention``); products of activations such as attention
scores (kind ``product``). :func:`cross_check` compares the total with PyTorch's
``torch.utils.flop_counter.FlopCounterMode`` (MACs = FLOPs / 2). Latency is measured with
``torch.utils.benchmark`` (warm-up, then the median of repeated blocks), so a speed-up can be
reported as measured, not only as counted.
"""

from __future__ import annotations

import logging
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from trp.errors import TRPError
from trp.tracing import cannot_take, example_input, sample_shape, trace

__all__ = ["LayerCost", "Profile", "profile", "reference_macs", "cross_check", "benchmark_module", "latency_ms"]


@dataclass
class LayerCost:
    """One counted row: a layer (or the module computing activation products), its shapes, MACs
    and own parameters; ``kind`` as in :class:`Use`."""

    name: str
    type: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    macs: int
    params: int
    kind: str = "module"


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
        tw = max([len(layer.type) for layer in self.layers] + [8])
        lines = [f"{'layer':<{width}}  {'type':<{tw}} {'output':<16} {'MACs':>14} {'params':>10}  note"]
        for layer in self.layers:
            out = "×".join(map(str, layer.out_shape))
            note = "" if layer.kind == "module" else layer.kind
            lines.append(f"{layer.name:<{width}}  {layer.type:<{tw}} {out:<16} {layer.macs:>14,} "
                         f"{layer.params:>10,}  {note}".rstrip())
        lines.append(f"{'total':<{width}}  {'':<{tw}} {'':<16} {self.macs:>14,} {self.params:>10,}".rstrip())
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def profile(model: nn.Module, input_shape: Sequence[int] | None = None, check: bool = False) -> Profile:
    """Count MACs and parameters, traced at ``input_shape`` (one sample; a leading batch dimension
    such as ``(1, 3, 32, 32)`` is understood, see :func:`sample_shape`; None: the model's
    :func:`trp.tracing.default_input_shape`).

    One row per layer (and per module computing activation products, kind ``product``); a layer
    called several times sums its calls. ``check=True`` also runs :func:`cross_check`, which warns
    when PyTorch's FlopCounterMode disagrees by more than 1 %.

    Example:
        >>> from trp.models import create
        >>> p = profile(create("resnet20"), (3, 32, 32))
        >>> round(p.macs / 1e6, 2), round(p.params / 1e6, 2)
        (40.55, 0.27)
    """
    input_shape = sample_shape(model, input_shape)
    traced = trace(model, input_shape)
    modules = dict(model.named_modules())
    rows: dict[tuple[str, str], LayerCost] = {}
    for u in traced.uses:
        row = rows.get((u.name, u.kind))
        if row is None:
            module = modules.get(u.name)
            own = sum(p.numel() for p in module.parameters(recurse=False)) if module is not None else 0
            kind_type = "matmul" if u.kind == "product" else type(module).__name__
            rows[(u.name, u.kind)] = LayerCost(u.name, kind_type, u.in_shape, u.out_shape, u.macs,
                                               0 if u.kind == "product" else own, u.kind)
        else:
            row.macs += u.macs
    layers = list(rows.values())
    seen: set[str] = set()
    for layer in layers:  # a layer used both ways shows its parameters once
        if layer.name in seen:
            layer.params = 0
        seen.add(layer.name)
    result = Profile(sum(layer.macs for layer in layers), sum(p.numel() for p in model.parameters()), input_shape,
                     layers)
    if check:
        cross_check(model, input_shape, result.macs)
    return result


class _PassThrough(TorchFunctionMode):
    """An active torch-function mode: PyTorch's attention fast paths (one fused kernel that
    FlopCounterMode cannot see into) step aside while any mode is active."""

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        return func(*args, **(kwargs or {}))


def _sdpa_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None,
                **kwargs: Any) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def reference_macs(model: nn.Module, input_shape: Sequence[int] | None = None) -> int:
    """The model's MACs as ``torch.utils.flop_counter.FlopCounterMode`` counts them (FLOPs / 2), on
    the same zero batch of one as :func:`profile`.

    Two things are arranged so that it counts everything: the forward runs under a pass-through
    torch-function mode, which turns off ``nn.MultiheadAttention``'s fused fast path (in eval mode
    without autograd FlopCounterMode would see one opaque kernel and count none of its MACs), and
    the CPU flash-attention kernel of ``F.scaled_dot_product_attention`` gets the formula PyTorch
    registers for the GPU attention kernels (it registers none for the CPU one).

    Example:
        >>> reference_macs(nn.Sequential(nn.Linear(8, 4)), (8,))
        32
    """
    from torch.utils.flop_counter import FlopCounterMode

    input_shape = sample_shape(model, input_shape)
    mapping = {}
    cpu_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_flash is not None:
        mapping[cpu_flash] = _sdpa_flops
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _PassThrough(), counter:
            model(example_input(model, input_shape))
    except Exception as err:  # noqa: BLE001 - as in trace()
        raise cannot_take(input_shape, err) from None
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def cross_check(model: nn.Module, input_shape: Sequence[int] | None = None, macs: int | None = None,
                tolerance: float = 0.01) -> float:
    """Compare :func:`profile`'s MACs (or ``macs``) with :func:`reference_macs`; warn in one line when
    they differ by more than ``tolerance`` (relative to the reference). Returns the relative difference.

    Example:
        >>> cross_check(nn.Sequential(nn.Conv2d(3, 4, 3)), (3, 8, 8))
        0.0
    """
    input_shape = sample_shape(model, input_shape)
    ours = profile(model, input_shape).macs if macs is None else int(macs)
    ref = reference_macs(model, input_shape)
    diff = abs(ours - ref) / ref if ref else float(ours != 0)
    if diff > tolerance:
        warnings.warn(f"trp.profile counts {ours:,} MACs at input {tuple(input_shape)}, PyTorch's FlopCounterMode "
                      f"{ref:,} ({100 * diff:.1f} % apart): some layer or product is counted by one only",
                      stacklevel=2)
    return diff


def benchmark_module() -> Any:
    """``torch.utils.benchmark``, imported quietly (every timing in trp goes through it).

    Importing it loads cpp_extension, which warns about CUDA_HOME on CPU-only machines that merely
    have a CUDA toolkit folder; that warning says nothing about timing.

    Example:
        >>> benchmark_module().Timer.__name__
        'Timer'
    """
    ext_log = logging.getLogger("torch.utils.cpp_extension")
    level = ext_log.level
    ext_log.setLevel(logging.ERROR)
    try:
        from torch.utils import benchmark
    finally:
        ext_log.setLevel(level)
    return benchmark


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
    benchmark = benchmark_module()

    if batch_size < 1:
        raise TRPError(f"batch size must be >= 1, got {batch_size}")
    try:
        x = example_input(model, input_shape).expand(batch_size, *input_shape).contiguous()
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
