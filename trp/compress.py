"""``trp compress``: decompose a trained run, evaluate before and after, measure, save.

Steps, in order: check that ``out`` can be written; load the run's model and its data; take the
output folder (:func:`trp.runs.locked`); evaluate; fold BatchNorm into the convs (exact at
inference, and it removes a memory-bound pass per layer); plan ranks with the chosen criterion on
the layers TRP trains (every conv but the first), from singular values only; measure each planned
layer dense and decomposed, in the runtime the model will run in, and keep dense any whose
decomposed form is slower; decompose (one SVD per decomposed layer); optionally fine-tune (the
training loop of :mod:`trp.loop`, on its cosine schedule); evaluate and time again; write.

Both models (BatchNorm folded) are timed in every runtime of :mod:`trp.runtimes` that is
available (``runtimes=``) at batch 1 and the latency batch, and the report states each time, each
model's best runtime and the speed-up of the compressed model in *its* best runtime over the dense
model in *its* best (``best_speedup_b1`` / ``best_speedup_bN``). The per-layer check and a
``latency:S`` budget time layers on a :class:`trp.latency_model.Target` in the dense model's best
runtime at the latency batch (torch.compile aside: compiling every layer at every rank takes
minutes), through the latency model's cache, so a second compression on the machine times no layer.
The folder written holds ``model.safetensors`` (weights plus the spec, whose transforms record the
BN folding and the plan, so ``trp.load`` rebuilds it without pickles), ``plan.json`` and
``report.json``; with ``overwrite``, nothing else trp wrote there before stays.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from trp import rank as rank_mod
from trp import runtimes as rt
from trp import schemes
from trp.bench import bench_model, interleaved, speedups
from trp.bn import fold_bn_
from trp.checkpoint import MODEL_FILE
from trp.data import load as load_data
from trp.decompose import decompose_
from trp.errors import TRPError
from trp.io import atomic_write_text
from trp.latency_budget import Latency
from trp.latency_model import Layer, Target, Timer, model_time, time_forms
from trp.loop import Loop, cosine_lr, evaluate, make_optimizer, resolve_device
from trp.measure import latency_ms, profile
from trp.methods import scheme_names
from trp.plan import Plan, plan
from trp.runs import check_free, check_writable, clear_run, contents, locked
from trp.structure import ModelSpec
from trp.saving import load_model, save_model
from trp.surgery import FilterFn, get_module, layer_filter
from trp.svd_training import truncate_to_dense_
from trp.tracing import trace_calls
from trp.validate import boolean, number, whole

__all__ = ["compress", "keep_faster", "finetune", "best_latency", "layer_target", "MAX_LATENCY_BATCH",
           "LAYER_EXCLUDED"]

#: Runtimes never used to time single layers: torch.compile compiles each layer and rank for seconds.
LAYER_EXCLUDED = ("compile",)

#: Largest batch for the latency measurements: far above any useful one, far below the memory it would take.
MAX_LATENCY_BATCH = 65536


def best_latency(model: nn.Module, input_shape: list[int], batch_size: int,
                 min_run_time: float = 0.3) -> tuple[float, str]:
    """The faster of contiguous and channels-last execution: (milliseconds, format name).

    Example:
        >>> ms, fmt = best_latency(nn.Sequential(nn.Conv2d(3, 4, 3)), [3, 8, 8], 2, min_run_time=0.02)
        >>> fmt in ("contiguous", "channels_last")
        True
    """
    results = {"contiguous": latency_ms(model, input_shape, batch_size, min_run_time=min_run_time)}
    if len(input_shape) == 3:
        cl = model.to(memory_format=torch.channels_last)
        results["channels_last"] = latency_ms(cl, input_shape, batch_size, min_run_time=min_run_time,
                                              channels_last=True)
        model.to(memory_format=torch.contiguous_format)
    fmt = min(results, key=results.get)
    return results[fmt], fmt


def keep_faster(model: nn.Module, plan: Plan, batch_size: int, min_run_time: float = 0.05,
                channels_last: bool = False, rounds: int = 3, target: Target | None = None,
                log: Callable[[str], None] | None = None) -> Plan:
    """Mark dense every planned layer whose decomposed form measures no faster than the dense one.

    Fewer MACs do not always mean less time (two small kernels, a memory-bound 1×1 conv); this
    check keeps the measured speed-up honest. Layers are timed alone at their traced input shapes
    (every call of a shared layer), on ``target``: the runtime and memory format the model will
    run in (default: eager, channels-last if ``channels_last``, at ``batch_size``, ``rounds``
    rounds). Times go through the latency model's cache (:func:`trp.latency_model.time_forms`), so
    ranks already timed by a ``latency:S`` budget, or by an earlier compression on this machine,
    are not timed again; the target's rounds time the dense and the decomposed form in turn, each
    keeping its fastest, so a slow spell of a shared machine rarely decides a layer's fate. The
    decomposed forms are timed untrained (no SVD is taken here; the values do not change the time).

    Example:
        >>> import tempfile, trp
        >>> m = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1))
        >>> p = trp.plan(m, rank=trp.fixed(2), input_shape=(8, 16, 16))
        >>> fake = lambda module, shape, batch: 1.0 if isinstance(module, nn.Conv2d) else 1.5  # slower decomposed
        >>> keep_faster(m, p, 1, target=Target(1, cache_dir=tempfile.mkdtemp(), timer=fake)).layers[0].reason
        'decomposed form measured slower (1.500 ms >= 1.000 ms dense; eager, batch 1)'
    """
    rounds = whole(rounds, "rounds", low=1)
    if target is None:
        target = Target(batch_size, "channels_last" if channels_last else "eager", min_run_time=min_run_time,
                        rounds=rounds)
    ranks = {lp.name: int(lp.rank) for lp in plan.layers if lp.decomposed and lp.rank}
    calls = trace_calls(model, plan.input_shape) if ranks else {}
    lays = [Layer(lp.name, get_module(model, lp.name), schemes.get(lp.scheme), list(calls.get(lp.name, [])), 0, 0)
            for lp in plan.layers if lp.name in ranks and calls.get(lp.name)]
    times = time_forms(lays, ranks, target, log)
    layers = []
    for lp in plan.layers:
        if lp.name in times:
            t_dense, t_low = times[lp.name]
            if t_low >= t_dense:  # equal time for a lossy form buys nothing
                lp = replace(lp, reason=f"decomposed form measured slower ({t_low:.3f} ms >= {t_dense:.3f} ms dense; "
                                        f"{target.runtime}, batch {target.batch_size})")
        layers.append(lp)
    return replace(plan, layers=layers)


def finetune(model: nn.Module, data: Any, epochs: int, lr: float, batch_size: int, seed: int,
             log: Callable[[str], None] = print) -> None:
    """A few epochs of SGD on :func:`trp.loop.cosine_lr` (for post-hoc decomposition baselines).

    SGD with Nesterov momentum 0.9 and weight decay 1e-4 on every parameter, through the training
    loop's :class:`~trp.loop.Loop`; the data order is its own (epochs 10000, 10001, ... of the
    run's seed), apart from the training run's.

    Example:
        >>> from trp.data import load
        >>> from trp.models import create
        >>> finetune(create("resnet20", in_channels=1), load("digits"), 1, 0.01, 256, 0, log=lambda s: None)
    """
    loop = Loop(model, make_optimizer(model, lr, 0.9, 1e-4, norm_decay=1e-4), data, batch_size, seed)
    steps = loop.steps_per_epoch
    for epoch in range(epochs):
        stats = loop.epoch(epoch, lambda step: cosine_lr(lr, epoch * steps + step, epochs * steps),
                           order=10_000 + epoch)
        log(f"fine-tune epoch {epoch + 1}/{epochs}  loss {stats.loss:.4f}")
    model.eval()


def _check_out(out: Path, run: str | Path, overwrite: bool) -> None:
    """Before any work: ``out`` can be written, is empty (or ``overwrite``), and is not the source."""
    if out.exists() and not out.is_dir():
        raise TRPError(f"output {out} exists and is not a folder")
    check_writable(out)
    check_free(out)  # another process writing there: say so, naming it, rather than "not empty"
    if contents(out) and not overwrite:
        raise TRPError(f"{out} is not empty; choose another --out or pass --overwrite")
    source = Path(run) if Path(run).is_dir() else Path(run).parent
    if out.is_dir() and source.is_dir() and os.path.samefile(out, source):
        raise TRPError(f"--out {out} is the folder of the run being compressed, which --overwrite would replace; "
                       "choose another --out")


def _dense_form(model: nn.Module, spec: ModelSpec, criterion: Any, scheme: tuple[str, ...],
                layers: str) -> tuple[nn.Module, ModelSpec, Any, FilterFn]:
    """The model as dense layers, the criterion to plan with and the layers to plan (the run's
    ``layers`` choice, as it trained them)."""
    if spec.find("svd-parametrize") is None:
        return model, spec, criterion, layer_filter(model, layers, scheme)
    # SVD training (Yang et al.) prunes by its own trained singular values: each layer becomes
    # the dense weight U_k diag(s_k) V_kᵀ, of rank k exactly, and then follows TRP's path, so
    # the decomposed modules and the plan are the same as for any other run.
    if isinstance(criterion, (rank_mod.Speedup, Latency)):  # whole-model budgets re-rank by SVD; these runs do not
        raise TRPError("SVD-trained runs are pruned by their singular values: use value:, energy:, fixed: or fraction:")
    model, ranks = truncate_to_dense_(model, criterion)
    return model, spec.without("svd-parametrize"), ranks, lambda module, name: name in ranks


def _fold(model: nn.Module, spec: ModelSpec) -> ModelSpec:
    pairs = fold_bn_(model)
    return spec.then({"kind": "fold-bn", "pairs": pairs}) if pairs else spec


def _decompose(model: nn.Module, spec: ModelSpec, scheme: tuple[str, ...], criterion: Any, filter_fn: FilterFn,
               label: str, check_latency: bool, target: Target,
               log: Callable[[str], None]) -> tuple[ModelSpec, Plan, dict]:
    """Plan, check each layer's time, decompose; with a ``latency:S`` budget also the whole-model
    time its latency model predicts for the final plan (``{}`` otherwise)."""
    p = plan(model, scheme[0] if len(scheme) == 1 else scheme, criterion, filter_fn=filter_fn,
             input_shape=spec.input_shape)
    p.criterion = label
    if check_latency:
        p = keep_faster(model, p, target.batch_size, target=target, log=log)
    predicted = _predict(model, p, criterion) if isinstance(criterion, Latency) else {}
    decompose_(model, p)  # one SVD per decomposed layer: planning took singular values only
    return spec.then({"kind": "decompose", "plan": p}), p, predicted


def _predict(model: nn.Module, p: Plan, criterion: Latency) -> dict:
    """The latency model's whole-model time of the final plan on the budget's target (all cached by
    the planning: nothing new is timed unless the layer check changed a rank's neighbourhood)."""
    target = criterion.target
    calls = trace_calls(model, p.input_shape)
    lays = [Layer(lp.name, get_module(model, lp.name), schemes.get(lp.scheme), list(calls[lp.name]), 0, 0)
            for lp in p.layers if lp.decomposed and calls.get(lp.name)]
    ranks = {lp.name: lp.rank for lp in p.layers if lp.decomposed}
    dense_ms = model_time(model, p.input_shape, target)
    times = time_forms(lays, ranks, target)
    after = dense_ms - sum(d - low for d, low in times.values())
    return {"predicted_ms_before": round(dense_ms, 4), "predicted_ms_after": round(after, 4),
            "predicted_speedup": round(dense_ms / after, 4), "predicted_runtime": target.runtime,
            "predicted_batch_size": target.batch_size}


def _warn_if_degenerate(criterion: Any, p: Plan) -> None:
    planned = [lp for lp in p.layers if lp.scheme is not None]
    if isinstance(criterion, rank_mod.Value) and planned and all(lp.rank == 1 for lp in planned):
        warnings.warn(f"--rank {criterion} cut every layer to rank 1: the threshold is above nearly every singular "
                      "value (TRP runs are usually decomposed with value:0.05); wrote the rank-1 model as asked",
                      stacklevel=3)


def _load_run(run: str | Path, data_dir: str | None,
              trust: bool = False) -> tuple[nn.Module, ModelSpec, dict, torch.device, Any]:
    """The run's model (on its device), spec and config, and its data (checked to fit)."""
    model, spec, meta = load_model(run, trust=trust)
    if spec.find("decompose") is not None:
        raise TRPError(f"{run} is already compressed")
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    device = resolve_device(config.get("device", "auto"))
    data = load_data(spec.dataset, data_dir or config.get("data_dir"), False,
                     bool(config.get("skip_bad_images", False))).to(device)
    if list(data.input_shape) != list(spec.input_shape):
        raise TRPError(f"the data's input shape {list(data.input_shape)} is not the model's {spec.input_shape}")
    return model.to(device), spec, config, device, data


def layer_target(timings: rt.Timings, batch: int, runtime: str | None = None, min_run_time: float = 0.1,
                 cache_dir: str | None = None, timer: Timer | None = None, rounds: int = 2) -> Target:
    """The target single layers are timed on: ``runtime``, else the dense model's fastest runtime at
    ``batch`` among those that can time a layer (not :data:`LAYER_EXCLUDED`), else eager; each form
    timed in ``rounds`` interleaved rounds.

    Example:
        >>> t = rt.Timings({"eager": {8: 3.0}, "torchscript": {8: 2.0}, "compile": {8: 1.0}})
        >>> layer_target(t, 8).runtime
        'torchscript'
    """
    if runtime is None:
        usable = {name: ms for name, ms in timings.items() if name not in LAYER_EXCLUDED}
        runtime = rt.best(usable, batch)[0] if any(batch in v for v in usable.values()) else "eager"
    return Target(batch, runtime, min_run_time=min_run_time, cache_dir=cache_dir, timer=timer, rounds=rounds)


def _eager(t: rt.Timings, batch: int) -> tuple[float, str]:
    """PyTorch eager in its faster memory format (the report's historical latency figure)."""
    eager = {name: t[name] for name in ("eager", "channels_last") if batch in t.get(name, {})}
    name, ms = rt.best(eager or t, batch)
    return ms, rt.RUNTIMES[name].memory_format if eager else name


def _timings(model: nn.Module, spec: ModelSpec, batches: Sequence[int], opts: dict, what: str,
             log: Callable[[str], None]) -> tuple[Any, rt.Timings]:
    """(profile, timings in every runtime) of a model as it will run."""
    log(f"timing the {what} model in {', '.join(opts['runtimes'] or rt.defaults())} at batch "
        f"{', '.join(map(str, batches))}")
    t = bench_model(model, spec.input_shape, batches, opts["runtimes"], min_run_time=opts["min_run_time"],
                    compile_timeout=opts["compile_timeout"], log=lambda line: log("  " + line),
                    what=f"the {what} model")
    return profile(model, spec.input_shape), t


def _report(run: str | Path, criterion: Any, scheme: str, accs: tuple[float, float], before: tuple[Any, rt.Timings],
            after: tuple[Any, rt.Timings], latency_batch: int, device: torch.device, finetune_epochs: int,
            p: Plan, target: Target, predicted: dict, timing_rounds: int = 1) -> dict:
    (acc_before, acc_after), (prof_before, t_dense), (prof_after, t_low) = accs, before, after
    (dense_ms, dense_fmt), (low_ms, low_fmt) = _eager(t_dense, latency_batch), _eager(t_low, latency_batch)
    batches = sorted({1, latency_batch})
    report = {
        "source": str(run), "rank": str(criterion), "scheme": scheme,
        "acc_before": round(acc_before, 4), "acc_after": round(acc_after, 4),
        "macs_before": prof_before.macs, "macs_after": prof_after.macs,
        "flops_speedup": round(prof_before.macs / max(prof_after.macs, 1), 4),
        "params_before": prof_before.params, "params_after": prof_after.params,
        "latency_ms_before": round(dense_ms, 4), "latency_ms_after": round(low_ms, 4),
        "latency_speedup": round(dense_ms / max(low_ms, 1e-9), 4),
        "latency_batch_size": latency_batch, "latency_device": str(device), "latency_threads": t_low.threads,
        "latency_runtime": "PyTorch eager, the faster memory format",
        "memory_format_before": dense_fmt, "memory_format_after": low_fmt,
        "runtimes": {"dense": t_dense.to_dict(), "compressed": t_low.to_dict()},
        **speedups(t_dense, t_low, batches), "threads": t_low.threads,
        "layer_check_runtime": target.runtime,
        "latency_note": ("both models with BatchNorm folded into the convs, eval mode, random-normal input; median of "
                         "timed blocks, the fastest of timing_rounds rounds; latency_ms_*: PyTorch eager in the faster "
                         "memory format; best_*: every runtime of 'runtimes', each model in its own fastest"),
        "timing_rounds": timing_rounds,
        "params_note": "both counts with BatchNorm folded into the convs",
        "finetune_epochs": finetune_epochs,
        "layers_decomposed": sum(lp.decomposed for lp in p.layers),
        "layers_dense": [[lp.name, lp.reason] for lp in p.layers if not lp.decomposed],
    }
    if predicted:
        measured = t_low.get(predicted["predicted_runtime"], {}).get(predicted["predicted_batch_size"])
        report.update(predicted, measured_ms_after=None if measured is None else round(measured, 4),
                      predicted_error=None if measured is None
                      else round(predicted["predicted_ms_after"] / measured - 1, 4))
    return report


def compress(
    run: str | Path,
    out: str | Path,
    rank: str | rank_mod.Criterion = "value:0.05",
    scheme: str | None = None,
    finetune_epochs: int = 0,
    finetune_lr: float = 0.01,
    data_dir: str | None = None,
    latency_batch: int = 128,
    check_latency: bool = True,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
    min_run_time: float = 0.3,
    trust: bool = False,
    runtimes: Sequence[str] | None = None,
    layer_runtime: str | None = None,
    compile_timeout: float = rt.COMPILE_TIMEOUT,
    cache_dir: str | None = None,
    timer: Timer | None = None,
    timing_rounds: int = 1,
) -> dict:
    """Decompose a trained run (or model) and write the compressed model and its report.

    Args:
        run: A run folder (``checkpoint.safetensors``) or a model folder/file.
        out: Output folder.
        rank: A criterion or its text (``value:0.05``, ``energy:0.95``, ``fixed:8``, ``speedup:3``,
            ``latency:2``). Given as text, ``latency:S`` is measured at ``latency_batch`` in the
            layer runtime (see ``layer_runtime``); its predicted whole-model time is reported
            beside the measured one.
        scheme: A name of :data:`trp.schemes.SCHEMES`, ``auto``, or several tried in order per layer
            (``spatial,linear``); default: the run's own scheme. Layers: those the run trained
            (its config's ``layers``, :func:`trp.surgery.layer_filter`).
        finetune_epochs: Epochs of fine-tuning after decomposition (0: none, as TRP needs none).
        finetune_lr: Peak learning rate of that fine-tuning.
        data_dir: Data folder, if not the one the run was trained on.
        latency_batch: The larger batch size of the latency measurements (batch 1 is always timed).
        check_latency: Keep dense the layers whose decomposed form measures slower.
        overwrite: Replace what ``out`` holds (every file trp wrote there is removed).
        log: Where progress lines go.
        min_run_time: Seconds per whole-model latency measurement (a third of it per layer).
        trust: Accept a model file without trp's checksum (see :func:`trp.checkpoint.read_safetensors`).
        runtimes: Names of :data:`trp.runtimes.RUNTIMES` to time both models in (default:
            :func:`trp.runtimes.defaults`, every one; those unavailable here, or failing, are
            reported as skipped with the reason).
        layer_runtime: The runtime single layers are timed in (default: the dense model's fastest
            at ``latency_batch``, torch.compile aside; see :func:`layer_target`).
        compile_timeout: Seconds ``torch.compile`` may take for a model's first call.
        cache_dir: Folder of the latency model's cache (default :func:`trp.latency_model.cache_dir`).
        timer: A scripted layer timer (``timer(module, input_shape, batch) -> ms``; tests).
        timing_rounds: Rounds of whole-model timing. The dense model is timed before planning (its
            fastest runtime picks the layer runtime), the compressed one after; with more rounds the
            two are then timed in turn, the order alternating (:func:`trp.bench.interleaved`), each
            keeping per runtime and batch its fastest, so that a change of the machine's load between
            the two timings does not pass for a speed-up or hide one.

    Returns:
        The report dict (also written to ``out/report.json``).

    Example:
        >>> import tempfile
        >>> from trp.train import TrainConfig, train
        >>> run = tempfile.mkdtemp()
        >>> _ = train(TrainConfig(dataset="digits", epochs=1), run, progress=False, log=lambda s: None)
        >>> r = compress(run, tempfile.mkdtemp() + "/c", "speedup:2", latency_batch=8, check_latency=False,
        ...              overwrite=True, log=lambda s: None, min_run_time=0.02, runtimes=("eager",))
        >>> r["flops_speedup"] > 1.5, r["best_runtime_b8"]
        (True, 'eager')
    """
    criterion = rank_mod.parse(rank) if isinstance(rank, str) else rank
    finetune_epochs = whole(finetune_epochs, "finetune", low=0)
    finetune_lr = number(finetune_lr, "finetune-lr", low=0.0, low_open=True)
    latency_batch = whole(latency_batch, "latency-batch", low=1, high=MAX_LATENCY_BATCH)
    opts = {"runtimes": None if runtimes is None else tuple(rt.get(name).name for name in runtimes),
            "min_run_time": number(min_run_time, "min_run_time", low=0.0, low_open=True),
            "compile_timeout": number(compile_timeout, "compile timeout", low=0.0, low_open=True)}
    timing_rounds = whole(timing_rounds, "timing rounds", low=1)
    if layer_runtime is not None:
        layer_runtime = rt.get(layer_runtime).name
    if scheme is not None:
        scheme_names(scheme)
    out = Path(out)
    _check_out(out, run, overwrite)
    model, spec, config, device, data = _load_run(run, data_dir, boolean(trust, "trust"))
    svd = spec.find("svd-parametrize")
    scheme = scheme or (svd["scheme"] if svd else None) or config.get("scheme", "channel")
    names = scheme_names(scheme)
    batches = sorted({1, latency_batch})
    with locked(out):
        acc_before, _ = evaluate(model, data)
        model, spec, plan_rank, layers = _dense_form(model, spec, criterion, names, config.get("layers", "convs"))
        dense_ref = copy.deepcopy(model.eval())
        fold_bn_(dense_ref)  # counted and timed like the result, with BatchNorm folded (MACs are the same either way)
        before = _timings(dense_ref, spec, batches, opts, "dense", log)
        target = layer_target(before[1], latency_batch, layer_runtime, min_run_time / 3, cache_dir, timer)
        if isinstance(rank, str) and isinstance(plan_rank, Latency):  # measured where the model will run
            plan_rank = replace(plan_rank, batch_size=latency_batch, runtime=target.runtime, cache_dir=cache_dir,
                                timer=timer, min_run_time=target.min_run_time, rounds=target.rounds)
        # Without fine-tuning, BN is folded first so the planner and the latency check see the layers
        # as they will run; fine-tuning wants BN, so then it is folded into the decomposed model after.
        if finetune_epochs == 0:
            spec = _fold(model, spec)
        spec, p, predicted = _decompose(model, spec, names, plan_rank, layers, str(criterion), check_latency,
                                        target, log)
        _warn_if_degenerate(criterion, p)
        if finetune_epochs:
            finetune(model, data, finetune_epochs, finetune_lr, config.get("batch_size", 128), config.get("seed", 0),
                     log)
            spec = _fold(model.eval(), spec)
        acc_after, _ = evaluate(model, data)
        after = _timings(model, spec, batches, opts, "compressed", log)
        if timing_rounds > 1:  # rounds 2.. in turn, compressed first: the dense model's first round came first
            more = interleaved({"compressed": model, "dense": dense_ref}, spec.input_shape, timing_rounds - 1,
                               log=lambda line: log("  " + line), batch_sizes=batches, **opts)
            before = (before[0], before[1].fastest(more["dense"]))
            after = (after[0], after[1].fastest(more["compressed"]))
        del dense_ref
        report = _report(run, criterion, scheme, (acc_before, acc_after), before, after, latency_batch, device,
                         finetune_epochs, p, target, predicted, timing_rounds)
        clear_run(out)  # with overwrite: nothing of what trp wrote there before stays beside the new model
        save_model(out / MODEL_FILE, model, spec, extra={"source": str(run), "config": config})
        p.to_json(out / "plan.json")
        atomic_write_text(out / "report.json", json.dumps(report, indent=1))
    return report
