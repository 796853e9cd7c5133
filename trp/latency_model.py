"""A latency model of the deployment target: every decomposable layer timed at a ladder of ranks.

MACs are a poor proxy for time: two small kernels can be slower than one large one, and kernels
pad channel counts to their vector width. So every decomposable layer is *timed* alone, dense and
decomposed at a :func:`ladder` of ranks, at its traced input shape, on the :class:`Target` the
model will run on (batch size, runtime and memory format of :mod:`trp.runtimes`, threads, dtype).
Between measured ranks time is interpolated piecewise linearly (:meth:`LayerLatency.at`), and the
whole model's time at any ranks is predicted from one measurement of the dense model
(:meth:`LatencyTable.predict`): T = T_dense − Σ_l dense_l + Σ_l t_l(k_l) over decomposed layers.

Times are cached as JSON, one file per :func:`machine_key` (CPU model, cores, torch, runtime and
its version, threads, batch size, dtype, memory format) in :func:`cache_dir`, so a second
compression on the same machine times nothing. :mod:`trp.latency_budget` (``trp.latency(s)``) spends
a time budget on this model, on rank multiples the kernels prefer (:func:`preferred_multiple`).

Example:
    >>> import tempfile
    >>> model = nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1))
    >>> def fake(module, shape, batch):  # scripted: a dense layer 1 ms, rank k 0.2 + k/100 ms, the model 3 ms
    ...     if isinstance(module, nn.Conv2d):
    ...         return 1.0
    ...     return 0.2 + module[0].out_channels / 100 if len(module) == 2 else 3.0
    >>> t = latency_model(model, "channel", None, (8, 16, 16), Target(cache_dir=tempfile.mkdtemp(), timer=fake))
    >>> t.layers["2"].at(8), t.multiple, round(t.predict({"0": None, "2": 8}), 3)
    (0.28, 1, 2.28)
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import platform
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from trp import runtimes, schemes
from trp.errors import TRPError
from trp.io import atomic_write_text
from trp.tracing import layer_macs, sample_shape, trace_calls
from trp.surgery import FilterFn
from trp.validate import number, whole

__all__ = ["FORMAT", "MULTIPLES", "STEP_TOLERANCE", "Timer", "Target", "Layer", "LayerLatency", "LatencyTable",
           "cache_dir", "machine_key", "ladder", "max_rank", "trace_layers", "time_module", "preferred_multiple",
           "measure_layers", "time_forms", "model_time", "latency_model"]

FORMAT = "trp-latency/1"
#: Rank multiples a latency budget can round to.
MULTIPLES = (1, 4, 8, 16, 32)
#: Relative time within which ranks b+1 … b+m count as one step of the kernels.
STEP_TOLERANCE = 0.03

#: ``timer(module, input_shape, batch_size) -> ms``: how one layer or model is timed.
Timer = Callable[[nn.Module, Sequence[int], int], float]


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """``path``, else ``$TRP_CACHE_DIR/latency``, else ``$XDG_CACHE_HOME/trp/latency`` (``~/.cache/trp/latency``).

    Example:
        >>> str(cache_dir("/tmp/x"))
        '/tmp/x'
    """
    if path is not None:
        return Path(path)
    if os.environ.get("TRP_CACHE_DIR"):
        return Path(os.environ["TRP_CACHE_DIR"]) / "latency"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "trp" / "latency"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_key(runtime: str, threads: int, batch_size: int, dtype: torch.dtype = torch.float32,
                device: str = "cpu") -> dict[str, Any]:
    """Everything a layer's time depends on besides the layer: the cache's key.

    Example:
        >>> k = machine_key("channels_last", 2, 128)
        >>> k["memory_format"], k["threads"], k["dtype"], sorted(k)[:3]
        ('channels_last', 2, 'float32', ['batch_size', 'cores', 'cpu'])
    """
    rt = runtimes.get(runtime)
    return {"cpu": _cpu_model(), "cores": os.cpu_count() or 0, "torch": torch.__version__, "runtime": rt.name,
            "runtime_version": rt.version(), "threads": int(threads), "batch_size": int(batch_size),
            "dtype": str(dtype).replace("torch.", ""), "memory_format": rt.memory_format, "device": str(device)}


def ladder(top: int) -> list[int]:
    """Ranks timed for a layer whose decomposed MACs stay below dense up to rank ``top``: powers of
    two, multiples of a step (8, doubled until at most 16 fit), ``top``, and the probes b+1, b+4,
    b+8, b+16, b+32 (b = 32 when ``top`` >= 64, else 0) that :func:`preferred_multiple` reads.

    Example:
        >>> ladder(57), ladder(3)
        ([1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 57], [1, 2, 3])
    """
    if top < 1:
        return []
    step = 8
    while top / step > 16:
        step *= 2
    points = {1 << i for i in range(top.bit_length())} | set(range(step, top + 1, step)) | {top}
    points |= {_probe_base(top) + d for d in (1, 4, 8, 16, 32)}
    return sorted(p for p in points if p <= top)


def _probe_base(top: int) -> int:
    return 32 if top >= 64 else 0


@dataclass
class Layer:
    """A decomposable layer as the latency model sees it (a :class:`trp.plan.Candidate` fits too)."""

    name: str
    module: nn.Module
    scheme: schemes.Scheme
    calls: list[tuple[tuple[int, ...], tuple[int, ...]]]  # (input, output) shape of every call
    cost: int  # MACs per unit of rank over all calls
    dense: int  # dense MACs over all calls
    spectrum: Tensor | None = None


def max_rank(layer: Any) -> int:
    """The largest rank whose decomposed MACs stay below the dense layer's (at most full rank).

    Example:
        >>> max_rank(trace_layers(nn.Sequential(nn.Conv2d(64, 64, 3)), "channel", input_shape=(64, 8, 8))[0])
        57
    """
    if layer.cost <= 0:
        return 0
    return max(0, min(layer.scheme.full_rank(layer.module), math.ceil(layer.dense / layer.cost) - 1))


def trace_layers(model: nn.Module, scheme: str | Sequence[str] = "channel", filter_fn: FilterFn | None = None,
                 input_shape: Sequence[int] | None = None) -> list[Layer]:
    """The model's decomposable layers with their calls and MACs (shapes traced once, no SVD).

    Example:
        >>> [lay.name for lay in trace_layers(nn.Sequential(nn.Conv2d(3, 4, 3)), input_shape=(3, 4, 4))]
        ['0']
    """
    names = [scheme] if isinstance(scheme, str) else list(scheme)
    modules = dict(model.named_modules())
    found = []
    for name, shapes in trace_calls(model, sample_shape(model, input_shape)).items():
        module = modules[name]
        sch = schemes.applicable(module, names)[0] if filter_fn is None or filter_fn(module, name) else None
        if sch is not None:
            found.append(Layer(name, module, sch, list(shapes), sum(sch.macs_per_rank(module, i, o) for i, o in shapes),
                               sum(layer_macs(module, i, o) for i, o in shapes)))
    return found


def time_module(module: nn.Module, input_shape: Sequence[int], batch_size: int, runtime: str = "eager",
                threads: int | None = None, min_run_time: float = 0.05) -> float:
    """The default timer: :func:`trp.runtimes.measure` (checked against eager, random-normal input).

    Example:
        >>> time_module(nn.Linear(4, 4), (4,), 2, min_run_time=0.01) > 0
        True
    """
    return runtimes.measure(module, input_shape, batch_size, runtime, threads, min_run_time)


@dataclass
class LayerLatency:
    """One layer's measured times (all its calls summed): dense, and decomposed at ``ranks``."""

    name: str
    scheme: str
    dense_ms: float
    ranks: list[int]
    ms: list[float]
    top: int  # the largest rank whose MACs are below dense (max_rank)

    def at(self, k: int) -> float:
        """Decomposed time at rank ``k``: measured, or linear between the nearest measured ranks.

        Example:
            >>> LayerLatency("a", "channel", 5.0, [1, 8, 16], [1.0, 2.0, 4.0], 16).at(12)
            3.0
        """
        if not self.ranks:
            raise TRPError(f"layer {self.name!r} has no rank whose MACs are below dense; nothing was timed")
        i = bisect.bisect_left(self.ranks, k)
        if i < len(self.ranks) and self.ranks[i] == k or len(self.ranks) == 1:
            return self.ms[min(i, len(self.ms) - 1)]
        i = min(max(i, 1), len(self.ranks) - 1)  # beyond the ends: the nearest segment, extended
        (r0, r1), (t0, t1) = self.ranks[i - 1:i + 1], self.ms[i - 1:i + 1]
        return t0 + (t1 - t0) * (k - r0) / (r1 - r0)

    def allowed(self, multiple: int) -> list[int]:
        """The ranks a budget may pick: multiples of ``multiple`` up to :attr:`top`.

        Example:
            >>> LayerLatency("a", "channel", 5.0, [1], [1.0], 20).allowed(8)
            [8, 16]
        """
        return list(range(multiple, self.top + 1, multiple))


def preferred_multiple(layers: Iterable[LayerLatency], tolerance: float = STEP_TOLERANCE) -> int:
    """The rank multiple the kernels prefer, read from the measurements.

    A kernel that pads channels to blocks of m runs ranks b+1 … b+m in the same time, so a rank
    rounded up to a multiple of m keeps more energy for free. For m = 4, 8, 16, 32 in turn, the
    times at b+m and at b+1 (b of :func:`ladder`) are summed over the layers that measured both;
    the answer is the last m before the first whose sum exceeds the b+1 sum by more than
    ``tolerance`` (1 when already m = 4 costs time or nothing was measured).

    Example:
        >>> preferred_multiple([LayerLatency("a", "channel", 9.0, [1, 4, 8, 16, 32], [1.0, 1.0, 1.0, 2.0, 4.0], 40)])
        8
    """
    layers, chosen = list(layers), 1
    for m in MULTIPLES[1:]:
        one = more = 0.0
        for lay in layers:
            b = _probe_base(lay.top)
            if b + m <= lay.top and b + 1 in lay.ranks and b + m in lay.ranks:
                one, more = one + lay.at(b + 1), more + lay.at(b + m)
        if one <= 0 or more > one * (1 + tolerance):
            break
        chosen = m
    return chosen


@dataclass
class LatencyTable:
    """Measured times of a model's layers (and of the whole dense model) on one target."""

    key: dict[str, Any]
    layers: dict[str, LayerLatency]
    model_ms: float | None = None

    @property
    def multiple(self) -> int:
        """:func:`preferred_multiple` of these measurements."""
        return preferred_multiple(self.layers.values())

    def predict(self, ranks: Mapping[str, int | None], model_ms: float | None = None) -> float:
        """Whole-model ms with layers at ``ranks`` (None or absent: dense): T_dense − Σ dense_l + Σ t_l(k_l).

        Example:
            >>> lay = LayerLatency("a", "channel", 5.0, [1, 8], [1.0, 2.0], 8)
            >>> LatencyTable({}, {"a": lay}, 20.0).predict({"a": 8})
            17.0
        """
        total = self.model_ms if model_ms is None else model_ms
        if total is None:
            raise TRPError("no whole-model time to predict from: measure the dense model (model_time) or pass model_ms")
        for name, k in ranks.items():
            if k is not None and name not in self.layers:
                raise TRPError(f"layer {name!r} was not timed")
            if k is not None:
                total -= self.layers[name].dense_ms - self.layers[name].at(k)
        return total


@dataclass(frozen=True)
class Target:
    """The deployment target every time depends on, and how to time it: the batch size, a runtime of
    :data:`trp.runtimes.RUNTIMES` (``channels_last`` is the memory format), the threads (None: the
    current count), seconds of timed blocks per layer and for the whole model, the cache folder
    (:func:`cache_dir`), the timer (default :func:`time_module`) and ``rounds``: how often each form
    not yet cached is timed, the forms of a layer in turn, keeping each one's fastest (a load spike
    during one measurement then does not pass for a saving).

    Example:
        >>> Target(8, "channels_last").runtime
        'channels_last'
    """

    batch_size: int = 128
    runtime: str = "eager"
    threads: int | None = None
    min_run_time: float = 0.05
    model_run_time: float = 0.3
    cache_dir: str | None = None
    timer: Timer | None = field(default=None, compare=False, repr=False)
    rounds: int = 1

    def __post_init__(self) -> None:
        fix = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731  (a frozen dataclass)
        fix("rounds", whole(self.rounds, "timing rounds", low=1))
        fix("batch_size", whole(self.batch_size, "batch size", low=1))
        fix("runtime", runtimes.get(self.runtime).name)
        fix("threads", None if self.threads is None else whole(self.threads, "threads", low=1))
        fix("min_run_time", number(self.min_run_time, "min_run_time", low=0.0, low_open=True))
        fix("model_run_time", number(self.model_run_time, "model_run_time", low=0.0, low_open=True))
        fix("cache_dir", None if self.cache_dir is None else os.fspath(self.cache_dir))
        if self.timer is not None and not callable(self.timer):
            raise TRPError(f"timer must be callable, got {self.timer!r}")


class _Session:
    """Timing on a target through its cache: one JSON file ``{signature: ms}`` per machine key."""

    def __init__(self, target: Target, ref: nn.Module) -> None:
        self.target, self.threads, self.timed = target, target.threads or torch.get_num_threads(), 0
        param = next(ref.parameters(), None)
        dtype, device = (param.dtype, param.device.type) if param is not None else (torch.float32, "cpu")
        self.key = machine_key(target.runtime, self.threads, target.batch_size, dtype, device)
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:16]
        self.path = cache_dir(target.cache_dir) / f"{target.runtime}-b{target.batch_size}-t{self.threads}-{digest}.json"
        self.entries = self._read()

    def _read(self) -> dict[str, float]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("key") != self.key:
                return {}
            entries = {str(k): float(v) for k, v in data["ms"].items()}
            if all(math.isfinite(v) and v > 0 for v in entries.values()):
                return entries
            raise ValueError("a time that is not a positive number")
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:  # measured again, not fatal
            warnings.warn(f"ignoring the damaged latency cache {self.path}: {err}", stacklevel=4)
            return {}

    def save(self) -> None:
        self.entries = {**self._read(), **self.entries}  # keep what another process added meanwhile
        atomic_write_text(self.path, json.dumps({"format": FORMAT, "key": self.key, "ms": self.entries}, indent=1))

    def ms(self, signature: str, make: Callable[[], nn.Module], shape: Sequence[int], run_time: float) -> float:
        if signature not in self.entries:
            self.fill([(signature, make, shape)], run_time)
        return self.entries[signature]

    def fill(self, forms: Sequence[tuple[str, Callable[[], nn.Module], Sequence[int]]], run_time: float) -> None:
        """Time the forms the cache lacks, all of them in each of ``target.rounds`` rounds, keeping the fastest."""
        t = self.target
        timer = t.timer or (lambda m, s, b: time_module(m, s, b, t.runtime, self.threads, run_time))
        missing = [(sig, make, shape) for sig, make, shape in forms if sig not in self.entries]
        best: dict[str, float] = {}
        for _ in range(t.rounds):
            for sig, make, shape in missing:
                best[sig] = min(best.get(sig, math.inf), float(timer(make(), tuple(shape), t.batch_size)))
        self.entries.update(best)
        self.timed += len(best)


def _forms_ms(session: _Session, lay: Any, ranks: Sequence[int]) -> tuple[float, list[float]]:
    """(dense ms, [ms at each rank]) of one layer, every call summed, through the session's cache."""
    run_time = session.target.min_run_time
    dense, low = 0.0, [0.0] * len(ranks)
    for shape, n in Counter(tuple(ins) for ins, _ in lay.calls).items():  # a shared layer pays per call
        sig = f"{lay.module!r} @ {list(shape)}"
        forms = [(sig, lambda: lay.module, shape)] + [  # untrained decomposed forms: weights do not change time
            (f"{sig} / {lay.scheme.name}:{k}", lambda k=k: lay.scheme.build(lay.module, k), shape) for k in ranks]
        session.fill(forms, run_time)
        dense += n * session.entries[sig]
        for j, (low_sig, _, _) in enumerate(forms[1:]):
            low[j] += n * session.entries[low_sig]
    return dense, low


def _layer_latency(session: _Session, lay: Any) -> LayerLatency:
    top = max_rank(lay)
    ranks = ladder(top)
    dense, low = _forms_ms(session, lay, ranks)
    return LayerLatency(lay.name, lay.scheme.name, dense, ranks, low, top)


def measure_layers(layers: Sequence[Any], target: Target = Target(),
                   log: Callable[[str], None] | None = None) -> LatencyTable:
    """Time every layer dense and decomposed on its :func:`ladder` (only what the cache lacks);
    ``layers`` are :class:`Layer` or :class:`trp.plan.Candidate` records, ``log`` gets a line per
    newly timed layer.

    Example:
        >>> import tempfile
        >>> lays = trace_layers(nn.Sequential(nn.Linear(64, 64)), "linear", input_shape=(64,))
        >>> measure_layers(lays, Target(8, cache_dir=tempfile.mkdtemp(), timer=lambda m, s, b: 1.0)).layers["0"].ranks
        [1, 2, 4, 8, 16, 24, 31]
    """
    if not layers:
        threads = target.threads or torch.get_num_threads()
        return LatencyTable(machine_key(target.runtime, threads, target.batch_size), {})
    session, table = _Session(target, layers[0].module), {}
    for lay in layers:
        before = session.timed
        table[lay.name] = _layer_latency(session, lay)
        if session.timed > before:
            session.save()  # per layer, so an interrupted run keeps what it measured
            if log is not None:
                log(f"timed {lay.name}: dense {table[lay.name].dense_ms:.3f} ms, {len(table[lay.name].ranks)} ranks")
    return LatencyTable(session.key, table)


def time_forms(layers: Sequence[Any], ranks: Mapping[str, int], target: Target = Target(),
               log: Callable[[str], None] | None = None) -> dict[str, tuple[float, float]]:
    """``{name: (dense ms, decomposed ms at ranks[name])}`` on the target, through the same cache as
    :func:`measure_layers` (a rank on a layer's ladder is not timed again); ``layers`` as there.

    Example:
        >>> import tempfile
        >>> lays = trace_layers(nn.Sequential(nn.Linear(64, 64)), "linear", input_shape=(64,))
        >>> fake = lambda m, s, b: 2.0 if isinstance(m, nn.Linear) else 1.5
        >>> time_forms(lays, {"0": 5}, Target(8, cache_dir=tempfile.mkdtemp(), timer=fake))
        {'0': (2.0, 1.5)}
    """
    chosen = [lay for lay in layers if lay.name in ranks]
    if not chosen:
        return {}
    session, out = _Session(target, chosen[0].module), {}
    for lay in chosen:
        before = session.timed
        dense, (low,) = _forms_ms(session, lay, [int(ranks[lay.name])])
        out[lay.name] = (dense, low)
        if session.timed > before:
            session.save()
            if log is not None:
                log(f"timed {lay.name}: dense {dense:.3f} ms, rank {ranks[lay.name]} {low:.3f} ms ({target.runtime})")
    return out


def model_time(model: nn.Module, input_shape: Sequence[int] | None = None, target: Target = Target()) -> float:
    """The whole model's time on the target, cached under its structure (``repr``) and input shape.

    Example:
        >>> import tempfile
        >>> model_time(nn.Linear(4, 4), (4,), Target(2, cache_dir=tempfile.mkdtemp(), timer=lambda m, s, b: 3.0))
        3.0
    """
    shape = sample_shape(model, input_shape)
    session = _Session(target, model)
    digest = hashlib.sha256(repr(model).encode()).hexdigest()[:16]
    ms = session.ms(f"model {digest} @ {list(shape)}", lambda: model, shape, target.model_run_time)
    if session.timed:
        session.save()
    return ms


def latency_model(model: nn.Module, scheme: str | Sequence[str] = "channel", filter_fn: FilterFn | None = None,
                  input_shape: Sequence[int] | None = None, target: Target = Target(),
                  log: Callable[[str], None] | None = None) -> LatencyTable:
    """:func:`measure_layers` over the model's decomposable layers plus the dense model's own time
    (:func:`model_time`), ready to :meth:`~LatencyTable.predict`; see the module's example."""
    shape = sample_shape(model, input_shape)
    table = measure_layers(trace_layers(model, scheme, filter_fn, shape), target, log)
    table.model_ms = model_time(model, shape, target)
    return table
