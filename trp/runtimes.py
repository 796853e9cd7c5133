"""Runtimes: one model timed in every way it can be deployed on this machine.

A decomposition that lowers the MACs is worth what it saves on the clock of the runtime the model
will run in, and the runtime alone can matter more than the decomposition (ONNX Runtime runs a
dense ResNet-20 about twice as fast as eager PyTorch on a 2-core CPU). :data:`RUNTIMES` is the one
registry of the runtimes trp measures:

* ``eager``: PyTorch eager mode, contiguous (NCHW) tensors.
* ``channels_last``: eager mode with model and input in channels-last (NHWC) memory format
  (4-D inputs only); oneDNN's convolutions often prefer it on CPUs.
* ``torchscript``: ``torch.jit.trace`` then ``torch.jit.freeze`` (weights folded as constants).
* ``compile``: ``torch.compile`` (TorchDynamo + Inductor, which needs a C++ compiler on CPU),
  skipped with a reason when the first call does not compile within ``compile_timeout`` seconds.
* ``onnxruntime``: exported in memory with ``torch.onnx.export`` (the ``dynamo=True`` exporter,
  the legacy TorchScript exporter as a fallback), run by an ``InferenceSession`` on the
  ``CPUExecutionProvider`` with ``intra_op_num_threads`` = the thread count and every graph
  optimization on.

Every runtime is timed the same way (:func:`time_call`: warm-up, then the median of blocks of
calls sized to ~20 ms, as :func:`trp.measure.latency_ms`) on the same random-normal input
(``torch.randn`` from a generator seeded with :data:`SEED`), and its output is checked against
eager mode once before any timing, so a broken conversion is reported, never timed.

Example:
    >>> from torch import nn
    >>> t = measure_all(nn.Sequential(nn.Conv2d(3, 4, 3)), (3, 8, 8), batch_sizes=(2,),
    ...                 runtimes=("eager", "channels_last"), min_run_time=0.01)
    >>> sorted(t), t.threads == torch.get_num_threads()
    (['channels_last', 'eager'], True)
    >>> best({"eager": {1: 2.0}, "onnxruntime": {1: 0.5}}, 1)
    ('onnxruntime', 0.5)
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from trp import conversions
from trp.conversions import Run
from trp.errors import TRPError, first_line
from trp.measure import benchmark_module
from trp.tracing import first_embedding, sample_shape
from trp.validate import choice, number, whole

__all__ = ["Runtime", "RUNTIMES", "SEED", "COMPILE_TIMEOUT", "Timings", "names", "get", "defaults", "parse_list",
           "available", "example_input", "time_call", "measure", "measure_all", "best", "table"]

#: Seed of the random-normal inputs every runtime is timed (and checked) on.
SEED = 0
#: Seconds ``torch.compile`` may take for its first call before the runtime is skipped.
COMPILE_TIMEOUT = 120.0
# Loose on purpose: runtimes reorder float sums and fuse ops, a broken conversion is far off.
RTOL, ATOL = 1e-3, 1e-3



@dataclass(frozen=True)
class Runtime:
    """One way to run a model: how to check it is usable here and how to prepare a timed call."""

    name: str
    about: str
    memory_format: str  # of the input and the weights: "contiguous" or "channels_last"
    check: Callable[[], str | None]  # why the runtime cannot run on this machine, or None
    prepare: Callable[[nn.Module, Tensor, int, float], Run]  # (eval model, input, threads, timeout) -> call
    package: str = "torch"  # whose version the results depend on

    def version(self) -> str:
        """``package version`` of what runs the model.

        Example:
            >>> RUNTIMES["eager"].version().startswith("torch ")
            True
        """
        try:
            return f"{self.package} {getattr(__import__(self.package), '__version__', '?')}"
        except ImportError:
            return f"{self.package} (not installed)"


#: Every runtime by name, in the order they are measured and listed.
RUNTIMES: Mapping[str, Runtime] = {r.name: r for r in (
    Runtime("eager", "PyTorch eager, contiguous", "contiguous", lambda: None, conversions.eager),
    Runtime("channels_last", "PyTorch eager, channels-last", "channels_last", lambda: None, conversions.channels_last),
    Runtime("torchscript", "TorchScript trace + freeze", "contiguous", lambda: None, conversions.torchscript),
    Runtime("compile", "torch.compile (Inductor)", "contiguous", conversions.compile_check, conversions.torch_compile),
    Runtime("onnxruntime", "ONNX Runtime, CPU", "contiguous", conversions.ort_check, conversions.onnxruntime,
            "onnxruntime"),
)}


def names() -> tuple[str, ...]:
    """Registered runtime names.

    Example:
        >>> names()[:2]
        ('eager', 'channels_last')
    """
    return tuple(RUNTIMES)


def get(name: str) -> Runtime:
    """The runtime registered under ``name``.

    Example:
        >>> get("torchscript").about
        'TorchScript trace + freeze'
    """
    return RUNTIMES[choice(name, "runtime", tuple(RUNTIMES))]


def defaults() -> tuple[str, ...]:
    """The runtimes measured when none are named: ``$TRP_RUNTIMES`` (comma-separated names, e.g. to
    leave out torch.compile's ~20 s per model and batch on a small CPU), else every registered one.

    Example:
        >>> import os
        >>> defaults() == names() or "TRP_RUNTIMES" in os.environ
        True
    """
    text = os.environ.get("TRP_RUNTIMES", "").strip()
    if not text:
        return names()
    return tuple(dict.fromkeys(get(name.strip()).name for name in text.split(",") if name.strip()))


def parse_list(text: str | None) -> tuple[str, ...] | None:
    """Runtime names from the command line: ``"eager,onnxruntime"``, ``"all"`` (every one), or
    None / empty for :func:`defaults` (returned as None).

    Example:
        >>> parse_list("eager, onnxruntime"), parse_list(None), parse_list("all") == names()
        (('eager', 'onnxruntime'), None, True)
    """
    if text is None or not str(text).strip():
        return None
    if str(text).strip() == "all":
        return names()
    return tuple(dict.fromkeys(get(name.strip()).name for name in str(text).split(",") if name.strip()))


def available() -> dict[str, str | None]:
    """Every runtime with the reason it cannot run here, or None when it can (no model is run).

    Example:
        >>> available()["eager"] is None
        True
    """
    return {name: rt.check() for name, rt in RUNTIMES.items()}


def example_input(model: nn.Module, input_shape: Sequence[int], batch_size: int) -> Tensor:
    """A random-normal batch (seeded with :data:`SEED`) on the model's device, in its dtype; for a
    token model (an ``nn.Embedding`` first) uniformly random ids below its vocabulary size.

    Example:
        >>> example_input(nn.Linear(3, 2), (3,), 2).shape
        torch.Size([2, 3])
        >>> x = example_input(nn.Sequential(nn.Embedding(5, 4)), (7,), 2)
        >>> x.dtype, int(x.max()) < 5
        (torch.int64, True)
    """
    ref = next(model.parameters(), None)
    device, dtype = (ref.device, ref.dtype) if ref is not None else (torch.device("cpu"), torch.float32)
    gen = torch.Generator().manual_seed(SEED)
    embedding = first_embedding(model)
    if embedding is not None:
        return torch.randint(embedding.num_embeddings, (batch_size, *input_shape), generator=gen).to(device)
    return torch.randn(batch_size, *input_shape, generator=gen).to(device=device, dtype=dtype)


def time_call(run: Run, threads: int | None = None, min_run_time: float = 0.3) -> float:
    """Median wall time of one ``run()`` in milliseconds: the method of :func:`trp.measure.latency_ms`.

    After a warm-up of 3 calls, blocks of ``number`` calls (sized to about 20 ms, so the timer's
    overhead is negligible) are repeated for ``min_run_time`` seconds, at least 5 and at most 200
    times; the median block's mean is reported. The caller picks the grad mode (inference mode
    for the torch runtimes).

    Example:
        >>> time_call(lambda: sum(range(100)), min_run_time=0.01) > 0
        True
    """
    benchmark = benchmark_module()
    timer = benchmark.Timer(stmt="run()", globals={"run": run}, num_threads=threads or torch.get_num_threads())
    start = time.perf_counter()
    timer.timeit(3)  # warm-up: allocator, oneDNN primitive caches, TorchScript's profiling runs
    once = max((time.perf_counter() - start) / 3, 1e-7)
    number = max(1, int(0.02 / once))
    blocks = max(5, int(min_run_time / (number * once)))
    return statistics.median(timer.timeit(number).mean for _ in range(min(blocks, 200))) * 1e3


def _as_tensor(out: Any) -> Tensor:
    out = out[0] if isinstance(out, (tuple, list)) and out else out  # the first output is compared
    try:
        return torch.as_tensor(out).detach().float().cpu()
    except (TypeError, RuntimeError, ValueError):
        raise TRPError(f"the model returned {type(out).__name__}, not a tensor") from None


def _check_output(name: str, out: Any, ref: Any) -> None:
    got, want = _as_tensor(out), _as_tensor(ref)
    if got.shape != want.shape:
        raise TRPError(f"{name} output has shape {tuple(got.shape)}, eager {tuple(want.shape)}")
    scale = float(want.abs().max()) if want.numel() else 0.0
    if not torch.allclose(got, want, rtol=RTOL, atol=ATOL * max(scale, 1e-6)):
        err = float((got - want).abs().max())
        raise TRPError(f"{name} output differs from eager (max abs error {err:.3g}, output scale {scale:.3g})")


def measure(model: nn.Module, input_shape: Sequence[int], batch_size: int = 1, runtime: str = "eager",
            threads: int | None = None, min_run_time: float = 0.3, compile_timeout: float = COMPILE_TIMEOUT) -> float:
    """Milliseconds per forward pass of ``model`` in one runtime, checked against eager first.

    The model is copied (the original is not touched), put in eval mode and run on a random-normal
    batch; the runtime's output must match eager's (``allclose``, rtol 1e-3, atol 1e-3 × the
    output's scale) or a TRPError says how it differs. Threads are set for the whole measurement.

    Args:
        model: The model (or a single layer).
        input_shape: One sample's shape (a leading batch dimension of a 4-D conv input is dropped).
        batch_size: Samples per forward pass.
        runtime: A name of :data:`RUNTIMES`.
        threads: Intra-op threads (default: ``torch.get_num_threads()``).
        min_run_time: Seconds of timed blocks after the warm-up.
        compile_timeout: Seconds ``torch.compile`` may take for the first call.

    Example:
        >>> measure(nn.Linear(8, 8), (8,), 4, "torchscript", min_run_time=0.01) > 0
        True
    """
    rt = get(runtime)
    batch_size = whole(batch_size, "batch size", low=1)
    threads = torch.get_num_threads() if threads is None else whole(threads, "threads", low=1)
    min_run_time = number(min_run_time, "min_run_time", low=0.0, low_open=True)
    compile_timeout = number(compile_timeout, "compile timeout", low=0.0, low_open=True)
    reason = rt.check()
    if reason is not None:
        raise TRPError(f"runtime {rt.name} is not available: {reason}")
    shape = sample_shape(model, input_shape)
    x = example_input(model, shape, batch_size)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        work = copy.deepcopy(model).eval()
        try:
            with torch.inference_mode():
                ref = work(x)
        except (RuntimeError, ValueError, IndexError) as err:
            raise TRPError(f"the model cannot take input of shape {shape}: {first_line(err)}") from None
        try:
            run = rt.prepare(work, x, threads, compile_timeout)
            with torch.inference_mode():
                out = run()
        except TRPError:
            raise
        except Exception as err:  # a conversion that fails is a reason, not a crash
            raise TRPError(f"{rt.name}: {first_line(err)}") from None
        _check_output(rt.name, out, ref)
        with torch.inference_mode():
            return time_call(run, threads, min_run_time)
    finally:
        torch.set_num_threads(before)


class Timings(dict):
    """``timings[runtime][batch] = ms`` for every runtime that ran, with how they were measured.

    Attributes:
        skipped: ``{runtime: reason}`` for the runtimes that are unavailable or failed.
        threads: Intra-op threads of every measurement.
        input_shape: One sample's shape.

    Example:
        >>> t = Timings({"eager": {1: 2.0}}, {"compile": "no compiler"}, threads=2, input_shape=(3, 8, 8))
        >>> t.to_dict()["ms"], t.skipped
        ({'eager': {'1': 2.0}}, {'compile': 'no compiler'})
    """

    def __init__(self, ms: Mapping[str, Mapping[int, float]] | None = None, skipped: Mapping[str, str] | None = None,
                 threads: int = 0, input_shape: Sequence[int] = ()) -> None:
        super().__init__({name: dict(by_batch) for name, by_batch in (ms or {}).items()})
        self.skipped: dict[str, str] = dict(skipped or {})
        self.threads = int(threads)
        self.input_shape = tuple(int(d) for d in input_shape)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Timings":
        """The timings :meth:`to_dict` wrote (e.g. read back from a ``report.json``).

        Example:
            >>> t = Timings({"eager": {1: 2.0}}, threads=2, input_shape=(3, 8, 8))
            >>> Timings.from_dict(t.to_dict()) == t, Timings.from_dict(t.to_dict()).threads
            (True, 2)
        """
        try:
            ms = {str(name): {int(b): float(v) for b, v in by_batch.items()} for name, by_batch in d["ms"].items()}
            return cls(ms, {str(k): str(v) for k, v in d.get("skipped", {}).items()}, int(d.get("threads", 0)),
                       [int(x) for x in d.get("input_shape", [])])
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise TRPError(f"not a timings record ({type(err).__name__}: {err})") from None

    def fastest(self, other: "Timings") -> "Timings":
        """Per runtime and batch the faster of two measurements of one model (rounds of a timing); a
        runtime skipped in one and timed in the other counts as timed.

        Example:
            >>> a = Timings({"eager": {1: 2.0, 8: 9.0}}, {"onnxruntime": "failed"}, threads=1)
            >>> b = Timings({"eager": {1: 3.0, 8: 8.0}, "onnxruntime": {1: 1.0}}, threads=1)
            >>> t = a.fastest(b)
            >>> dict(t), t.skipped
            ({'eager': {1: 2.0, 8: 8.0}, 'onnxruntime': {1: 1.0}}, {})
        """
        ms = {name: dict(by_batch) for name, by_batch in self.items()}
        for name, by_batch in other.items():
            for b, t in by_batch.items():
                ms.setdefault(name, {})[b] = min(t, ms.get(name, {}).get(b, float("inf")))
        skipped = {k: v for k, v in {**other.skipped, **self.skipped}.items() if k not in ms}
        return Timings(ms, skipped, self.threads, self.input_shape)

    def to_dict(self) -> dict:
        """JSON-ready: ``{"threads", "input_shape", "ms": {runtime: {"batch": ms}}, "skipped", "versions"}``."""
        return {"threads": self.threads, "input_shape": list(self.input_shape),
                "ms": {name: {str(b): round(ms, 4) for b, ms in by_batch.items()} for name, by_batch in self.items()},
                "skipped": dict(self.skipped),
                "versions": {name: RUNTIMES[name].version() for name in self if name in RUNTIMES}}


def measure_all(model: nn.Module, input_shape: Sequence[int], batch_sizes: Sequence[int] = (1, 128),
                runtimes: Sequence[str] | None = None, threads: int | None = None, min_run_time: float = 0.3,
                compile_timeout: float = COMPILE_TIMEOUT, log: Callable[[str], None] | None = None) -> Timings:
    """Time ``model`` in every runtime (default: :func:`defaults`, all of :data:`RUNTIMES`) at every batch size.

    A runtime that is unavailable or fails (a conversion error, an output that differs from eager,
    a compilation past ``compile_timeout``) goes to ``skipped`` with its reason; the batch sizes
    it measured before failing are kept.

    Example:
        >>> t = measure_all(nn.Linear(4, 4), (4,), (1,), ("channels_last",), min_run_time=0.01)
        >>> dict(t), t.skipped["channels_last"]
        ({}, 'channels_last needs a 4-D (N, C, H, W) input, got 2-D')
    """
    chosen = list(defaults()) if runtimes is None else [get(name).name for name in runtimes]
    threads = torch.get_num_threads() if threads is None else whole(threads, "threads", low=1)
    batches = [whole(b, "batch size", low=1) for b in batch_sizes]
    shape = sample_shape(model, input_shape)
    result = Timings(threads=threads, input_shape=shape)
    for name in chosen:
        reason = RUNTIMES[name].check()
        if reason is not None:
            result.skipped[name] = reason
            continue
        for b in batches:
            try:
                ms = measure(model, shape, b, name, threads, min_run_time, compile_timeout)
            except TRPError as err:
                result.skipped[name] = str(err) if b == batches[0] else f"batch {b}: {err}"
                break
            result.setdefault(name, {})[b] = ms
            if log is not None:
                log(f"{name:<14} batch {b:<5} {ms:10.3f} ms")
    return result


def best(results: Mapping[str, Mapping[int, float]], batch: int, exclude: Sequence[str] = ()) -> tuple[str, float]:
    """The fastest runtime at one batch size: ``(runtime, ms)`` (ties: the first listed), leaving out ``exclude``.

    Example:
        >>> best({"eager": {128: 95.0}, "channels_last": {128: 70.0}, "torchscript": {1: 1.0}}, 128)
        ('channels_last', 70.0)
        >>> best({"eager": {1: 3.0}, "compile": {1: 1.0}}, 1, exclude=("compile",))
        ('eager', 3.0)
    """
    measured = [(by_batch[batch], name) for name, by_batch in results.items()
                if batch in by_batch and name not in exclude]
    if not measured:
        raise TRPError(f"no runtime was measured at batch size {batch}")
    ms, name = min(measured, key=lambda pair: pair[0])
    return name, ms


def table(results: Timings, baseline: Timings | None = None) -> str:
    """The timings as aligned text, one row per runtime plus the best. With ``baseline`` (e.g. the
    dense model's timings) each time also shows its speed-up over the baseline in the same runtime,
    and the best row over the baseline's own best runtime.

    Example:
        >>> print(table(Timings({"eager": {1: 2.0}}, {"compile": "no compiler"}, threads=2)))
        runtime             b1 ms
        eager               2.000
        best                2.000  (eager)
        compile         skipped: no compiler
        threads: 2
    """
    batches = sorted({b for by_batch in results.values() for b in by_batch})

    def cell(ms: float | None, base: float | None) -> str:
        text = f"{ms:11.3f}" if ms is not None else f"{'-':>11}"
        if baseline is not None:
            text += f" ({base / ms:5.2f}x)" if ms is not None and base is not None else " " * 9
        return text

    def base_best(b: int) -> float | None:
        return best(baseline, b)[1] if baseline is not None and any(b in v for v in baseline.values()) else None

    width = 11 + (9 if baseline is not None else 0)
    lines = [f"{'runtime':<14}" + "".join(f"{'b' + str(b) + ' ms':>11}".ljust(width) for b in batches).rstrip()]
    for name, by_batch in results.items():
        bases = [baseline.get(name, {}).get(b) if baseline is not None else None for b in batches]
        lines.append(f"{name:<14}" + "".join(cell(by_batch.get(b), base) for b, base in zip(batches, bases)))
    if batches:
        picks = [best(results, b) for b in batches]
        row = "".join(cell(ms, base_best(b)) for (_, ms), b in zip(picks, batches))
        lines.append(f"{'best':<14}{row}  ({', '.join(name for name, _ in picks)})")
    lines += [f"{name:<14}  skipped: {reason}" for name, reason in results.skipped.items()]
    lines.append(f"threads: {results.threads}")
    return "\n".join(lines)
