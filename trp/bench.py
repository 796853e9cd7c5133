"""``trp bench``: time any model in every runtime at batch 1 and a larger batch.

The model comes from a run or compressed folder (:func:`trp.saving.load_model`, its own input
shape) or from a model source (``resnet20``, ``torchvision:resnet50``, ...; random weights, nothing
downloaded). It is timed as it would be deployed: eval mode, BatchNorm folded into the convs
(:func:`trp.bn.fold_bn_`), on random-normal input, in every runtime of :mod:`trp.runtimes`
(:func:`trp.runtimes.measure_all`). With ``against`` (a dense folder or source, e.g. the run a
compressed model came from) the same is measured for it, and the speed-ups are stated per runtime
and best against best: the dense model in *its* fastest runtime over this one in *its* fastest.
With ``rounds`` > 1 the two models are timed in turn (:func:`interleaved`), the order alternating,
each keeping per runtime and batch its fastest round, so that a change of the machine's load between
the first and the last measurement does not pass for a speed-up.

Example:
    >>> r = bench("resnet20", batch_sizes=(1,), runtimes=("eager",), min_run_time=0.01, log=lambda s: None)
    >>> r["best_runtime_b1"], r["input_shape"]
    ('eager', [3, 32, 32])
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from torch import nn

from trp import runtimes as rt
from trp.bn import fold_bn_
from trp.errors import TRPError
from trp.io import atomic_write_text
from trp.models import create
from trp.saving import load_model
from trp.tracing import sample_shape
from trp.validate import boolean, number, whole

__all__ = ["parse_ints", "load_source", "bench_model", "interleaved", "speedups", "bench", "summary", "report_text"]


def parse_ints(text: str | None, what: str) -> list[int] | None:
    """Comma-separated whole numbers >= 1 from the command line (``--input-shape 3,224,224``,
    ``--batch-sizes 1,128``); None or empty gives None.

    Example:
        >>> parse_ints("3, 224,224", "input shape"), parse_ints(None, "batch sizes")
        ([3, 224, 224], None)
    """
    if text is None or not str(text).strip():
        return None
    try:
        return [whole(int(part), what, low=1) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise TRPError(f"{what} must be comma-separated whole numbers, got {text!r}") from None


def load_source(source: str | os.PathLike | nn.Module, input_shape: Sequence[int] | None = None,
                model_kwargs: dict | None = None, trust: bool = False) -> tuple[nn.Module, list[int], str]:
    """``(model in eval mode with BatchNorm folded, one sample's shape, how it was named)``.

    ``source`` is a folder or file that :func:`trp.saving.load_model` reads (its recorded input
    shape unless ``input_shape`` is given), a model source for :func:`trp.models.create` (with
    ``model_kwargs``), or a module.

    Example:
        >>> model, shape, name = load_source("resnet20")
        >>> shape, name, model.training
        ([3, 32, 32], 'resnet20', False)
    """
    if isinstance(source, nn.Module):
        model, shape, name = source, input_shape, type(source).__name__
    elif Path(source).exists():
        model, spec, _ = load_model(source, trust=trust)
        model, shape, name = model, input_shape or spec.input_shape, str(source)
    else:
        model, shape, name = create(str(source), **(model_kwargs or {})), input_shape, str(source)
    model = model.eval()
    fold_bn_(model)  # as deployed; a compressed model's BN is folded already (nothing left to fold)
    return model, list(sample_shape(model, shape)), name


def bench_model(model: nn.Module, input_shape: Sequence[int], batch_sizes: Sequence[int] = (1, 128),
                runtimes: Sequence[str] | None = None, threads: int | None = None, min_run_time: float = 0.3,
                compile_timeout: float = rt.COMPILE_TIMEOUT, log: Callable[[str], None] | None = None,
                what: str = "the model") -> rt.Timings:
    """:func:`trp.runtimes.measure_all` of a model, refusing one that no runtime could run (``what``
    names it in that error).

    Example:
        >>> t = bench_model(nn.Linear(4, 2), (4,), (2,), ("eager",), min_run_time=0.01)
        >>> list(t)
        ['eager']
    """
    t = rt.measure_all(model, input_shape, batch_sizes, runtimes, threads, min_run_time, compile_timeout, log)
    if not t:
        raise TRPError(f"no runtime could time {what}: " + "; ".join(f"{k}: {v}" for k, v in t.skipped.items()))
    return t


def interleaved(models: Mapping[str, nn.Module], input_shape: Sequence[int], rounds: int = 3,
                log: Callable[[str], None] | None = None, **opts: Any) -> dict[str, rt.Timings]:
    """Every model in every runtime (:func:`bench_model` with ``opts``), ``rounds`` times in
    alternating order (forward, backward, ...); per model, runtime and batch the fastest round.

    Example:
        >>> t = interleaved({"a": nn.Linear(4, 4), "b": nn.Linear(4, 2)}, (4,), 2, batch_sizes=(1,),
        ...                 runtimes=("eager",), min_run_time=0.01)
        >>> sorted(t), list(t["a"]), t["b"].threads > 0
        (['a', 'b'], ['eager'], True)
    """
    rounds = whole(rounds, "timing rounds", low=1)
    keys, best = list(models), {}
    for r in range(rounds):
        for key in keys if r % 2 == 0 else keys[::-1]:
            if log is not None:
                log(f"round {r + 1}/{rounds}: {key}")
            t = bench_model(models[key], input_shape, log=log, **opts)
            best[key] = best[key].fastest(t) if key in best else t
    return {key: best[key] for key in keys}


def _bests(t: rt.Timings, batches: Sequence[int], prefix: str = "") -> dict:
    out: dict[str, Any] = {}
    for b in batches:
        name, ms = rt.best(t, b) if any(b in v for v in t.values()) else (None, None)
        out[f"{prefix}best_runtime_b{b}"], out[f"{prefix}best_ms_b{b}"] = name, None if ms is None else round(ms, 4)
    return out


def speedups(dense: rt.Timings, low: rt.Timings, batches: Sequence[int]) -> dict:
    """Per batch: each model's best runtime and time, and the speed-up best against best (None where
    either model has no time at that batch).

    Example:
        >>> d = rt.Timings({"eager": {1: 2.0}, "onnxruntime": {1: 1.0}})
        >>> c = rt.Timings({"eager": {1: 0.8}, "onnxruntime": {1: 0.9}})
        >>> speedups(d, c, [1])["best_speedup_b1"], speedups(d, c, [1])["best_runtime_b1"]
        (1.25, 'eager')
    """
    out = {**_bests(dense, batches, "dense_"), **_bests(low, batches)}
    for b in batches:
        both = any(b in v for v in dense.values()) and any(b in v for v in low.values())
        out[f"best_speedup_b{b}"] = round(rt.best(dense, b)[1] / rt.best(low, b)[1], 4) if both else None
    return out


def bench(source: str | os.PathLike | nn.Module, input_shape: Sequence[int] | None = None,
          batch_sizes: Sequence[int] = (1, 128), runtimes: Sequence[str] | None = None, threads: int | None = None,
          min_run_time: float = 0.3, compile_timeout: float = rt.COMPILE_TIMEOUT,
          against: str | os.PathLike | nn.Module | None = None, out: str | os.PathLike | None = None,
          overwrite: bool = False, model_kwargs: dict | None = None, trust: bool = False,
          log: Callable[[str], None] = print, rounds: int = 1) -> dict:
    """Time a model in every runtime; print the table (with speed-ups over ``against``); return the record.

    Args:
        source: A run or compressed folder, a model file, a model source or a module (see :func:`load_source`).
        input_shape: One sample's shape (default: the folder's recorded one, or the model's default).
        batch_sizes: Batch sizes to time (default 1 and 128).
        runtimes: Names of :data:`trp.runtimes.RUNTIMES` (default :func:`trp.runtimes.defaults`: all).
        threads: Intra-op threads (default: the current count).
        min_run_time: Seconds of timed blocks per runtime and batch.
        compile_timeout: Seconds torch.compile may take for its first call.
        against: A dense model (folder, source or module) measured the same way, for speed-ups.
        out: A JSON file to write the record to (refused if it exists, unless ``overwrite``).
        overwrite: Replace an existing ``out``.
        model_kwargs: Keyword arguments of a model source (for ``source`` and ``against``).
        trust: Accept model files without trp's checksum.
        log: Where the table and progress lines go.
        rounds: With ``against``, timing rounds of the two models in alternating order, each keeping
            per runtime and batch its fastest (:func:`interleaved`).

    Returns:
        ``{"source", "input_shape", "threads", "timings", "best_runtime_bN", "best_ms_bN", ...}``;
        with ``against`` also ``"against"``, ``"against_timings"``, ``"dense_best_runtime_bN"``,
        ``"dense_best_ms_bN"`` and ``"best_speedup_bN"``.
    """
    batches = sorted({whole(b, "batch size", low=1) for b in batch_sizes})
    if not batches:
        raise TRPError("give at least one batch size")
    min_run_time = number(min_run_time, "min_run_time", low=0.0, low_open=True)
    overwrite = boolean(overwrite, "overwrite")
    if out is not None:
        out = Path(out)
        if out.is_dir():
            raise TRPError(f"--out {out} is a folder; give the JSON file to write")
        if out.exists() and not overwrite:
            raise TRPError(f"{out} exists; choose another --out or pass --overwrite")
    model, shape, name = load_source(source, input_shape, model_kwargs, trust)
    opts = dict(batch_sizes=batches, runtimes=runtimes, threads=threads, min_run_time=min_run_time,
                compile_timeout=compile_timeout, log=lambda line: log("  " + line))
    rounds = whole(rounds, "timing rounds", low=1)
    dense = None
    if against is not None:
        dense, dense_shape, dense_name = load_source(against, shape, model_kwargs, trust)
        if list(dense_shape) != list(shape):
            raise TRPError(f"against {dense_name} takes input {dense_shape}, the model {shape}")
    log(f"timing {name} at input {shape}, batch {', '.join(map(str, batches))}"
        + (f", against {dense_name}, {rounds} interleaved round(s)" if dense is not None else ""))
    if dense is None:
        t, base = bench_model(model, shape, **opts), None
    else:
        timed = interleaved({"model": model, "against": dense}, shape, rounds, **opts)
        t, base = timed["model"], timed["against"]
    record: dict[str, Any] = {"source": name, "input_shape": shape, "threads": t.threads,
                              "timings": t.to_dict(), **_bests(t, batches)}
    if base is not None:
        record.update({"against": dense_name, "against_timings": base.to_dict(), "rounds": rounds,
                       **speedups(base, t, batches)})
    log(rt.table(t, base))
    if out is not None:
        atomic_write_text(out, json.dumps(record, indent=1) + "\n")
        log(f"wrote {out}")
    return record


def summary(record: dict) -> str:
    """One line per batch: the best runtime and time, and the best-against-best speed-up if measured.

    Example:
        >>> summary({"best_runtime_b1": "onnxruntime", "best_ms_b1": 0.5, "best_speedup_b1": 1.5, "threads": 2})
        'batch 1: onnxruntime 0.500 ms (1.50x the dense model in its own fastest runtime); 2 thread(s)'
    """
    parts = []
    for key in sorted((k for k in record if k.startswith("best_runtime_b")), key=lambda k: int(k.rsplit("b", 1)[1])):
        b = key.rsplit("b", 1)[1]
        if record[key] is None:
            continue
        text = f"batch {b}: {record[key]} {record[f'best_ms_b{b}']:.3f} ms"
        s = record.get(f"best_speedup_b{b}")
        parts.append(text + (f" ({s:.2f}x the dense model in its own fastest runtime)" if s is not None else ""))
    return "; ".join(parts) + f"; {record.get('threads', '?')} thread(s)"


def report_text(report: dict) -> str:
    """What ``trp compress`` prints about time from its report: every runtime with the speed-up over
    the dense model, each model's best, and a ``latency:S`` budget's prediction beside the measurement.

    Example:
        >>> d = rt.Timings({"eager": {1: 2.0}}, threads=2).to_dict()
        >>> c = rt.Timings({"eager": {1: 1.0}}, threads=2).to_dict()
        >>> print(report_text({"runtimes": {"dense": d, "compressed": c}, "best_runtime_b1": "eager", "best_ms_b1": 1.0,
        ...                    "best_speedup_b1": 2.0, "threads": 2}).splitlines()[-1])
        batch 1: eager 1.000 ms (2.00x the dense model in its own fastest runtime); 2 thread(s)
    """
    runs = report.get("runtimes") or {}
    lines = []
    if "dense" in runs and "compressed" in runs:
        lines.append(rt.table(rt.Timings.from_dict(runs["compressed"]), rt.Timings.from_dict(runs["dense"])))
    if report.get("predicted_ms_after") is not None:
        measured = report.get("measured_ms_after")
        lines.append(f"{report['rank']} predicted {report['predicted_ms_after']:.3f} ms in "
                     f"{report['predicted_runtime']} at batch {report['predicted_batch_size']}, measured "
                     + ("not measured there" if measured is None else f"{measured:.3f} ms "
                        f"({100 * report['predicted_error']:+.1f}%)"))
    lines.append(summary(report))
    return "\n".join(lines)
