"""``trp compress``: decompose a trained run, evaluate before and after, measure, save.

Steps, in order: check that ``out`` can be written; load the run's model and its data; take the
output folder (:func:`trp.runs.locked`); evaluate; fold BatchNorm into the convs (exact at
inference, and it removes a memory-bound pass per layer); plan ranks with the chosen criterion on
the layers TRP trains (every conv but the first), from singular values only; measure each planned
layer dense and decomposed and keep dense any whose decomposed form is slower; decompose (one SVD
per decomposed layer); optionally fine-tune (the training loop of :mod:`trp.loop`, on its cosine
schedule); evaluate and time again; write. The folder written holds ``model.safetensors`` (weights
plus the spec, whose transforms record the BN folding and the plan, so ``trp.load`` rebuilds it
without pickles), ``plan.json`` and ``report.json``; with ``overwrite``, nothing else trp wrote
there before stays.
"""

from __future__ import annotations

import copy
import json
import math
import os
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from trp import rank as rank_mod
from trp import schemes
from trp.bn import fold_bn_
from trp.checkpoint import MODEL_FILE
from trp.data import load as load_data
from trp.decompose import decompose_
from trp.errors import TRPError
from trp.io import atomic_write_text
from trp.loop import Loop, cosine_lr, evaluate, make_optimizer, resolve_device
from trp.measure import latency_ms, profile
from trp.methods import scheme_names
from trp.plan import Plan, plan
from trp.runs import check_free, check_writable, clear_run, contents, locked
from trp.structure import ModelSpec
from trp.saving import load_model, save_model
from trp.surgery import FilterFn, get_module, layer_filter
from trp.svd_training import truncate_to_dense_
from trp.validate import boolean, number, whole

__all__ = ["compress", "keep_faster", "finetune", "best_latency", "MAX_LATENCY_BATCH"]

#: Largest batch for the latency measurements: far above any useful one, far below the memory it would take.
MAX_LATENCY_BATCH = 65536


def best_latency(model: nn.Module, input_shape: list[int], batch_size: int, min_run_time: float = 0.3) -> tuple[float, str]:
    """The faster of contiguous and channels-last execution: (milliseconds, format name).

    Example:
        >>> ms, fmt = best_latency(nn.Sequential(nn.Conv2d(3, 4, 3)), [3, 8, 8], 2, min_run_time=0.02)
        >>> fmt in ("contiguous", "channels_last")
        True
    """
    results = {"contiguous": latency_ms(model, input_shape, batch_size, min_run_time=min_run_time)}
    if len(input_shape) == 3:
        cl = model.to(memory_format=torch.channels_last)
        results["channels_last"] = latency_ms(cl, input_shape, batch_size, min_run_time=min_run_time, channels_last=True)
        model.to(memory_format=torch.contiguous_format)
    fmt = min(results, key=results.get)
    return results[fmt], fmt


def keep_faster(model: nn.Module, plan: Plan, batch_size: int, min_run_time: float = 0.05,
                channels_last: bool = False, rounds: int = 3) -> Plan:
    """Mark dense every planned layer whose decomposed form measures slower than the dense one.

    Fewer MACs do not always mean less time (two small kernels, a memory-bound 1×1 conv); this
    check keeps the measured speed-up honest. Layers are timed alone at their traced input shape,
    in the memory format the model will run in (channels-last changes the answer on CPUs). Dense
    and decomposed forms are timed in turn, ``rounds`` times each, and each keeps its fastest
    median: a slow spell of a shared machine then rarely decides a layer's fate. The decomposed
    forms are timed untrained (no SVD is taken here; the values do not change the time).

    Example:
        >>> import trp
        >>> m = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1))
        >>> p = trp.plan(m, rank=trp.fixed(2), input_shape=(8, 16, 16))
        >>> isinstance(keep_faster(m, p, 1, min_run_time=0.01), trp.Plan)
        True
    """
    rounds = whole(rounds, "rounds", low=1)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    layers = []
    for lp in plan.layers:
        if lp.decomposed:
            dense = copy.deepcopy(get_module(model, lp.name)).to(memory_format=fmt)
            low = schemes.get(lp.scheme).build(dense, lp.rank).to(memory_format=fmt)
            t_dense = t_low = math.inf
            for _ in range(rounds):
                t_dense = min(t_dense, latency_ms(dense, lp.in_shape, batch_size, min_run_time=min_run_time,
                                                  channels_last=channels_last))
                t_low = min(t_low, latency_ms(low, lp.in_shape, batch_size, min_run_time=min_run_time,
                                              channels_last=channels_last))
            if t_low >= t_dense:
                lp = replace(lp, reason=f"decomposed form measured slower ({t_low:.3f} ms >= {t_dense:.3f} ms dense)")
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
        stats = loop.epoch(epoch, lambda step: cosine_lr(lr, epoch * steps + step, epochs * steps), order=10_000 + epoch)
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
    if isinstance(criterion, rank_mod.Speedup):
        raise TRPError("SVD-trained runs are pruned by their singular values: use value:, energy:, fixed: or fraction:")
    model, ranks = truncate_to_dense_(model, criterion)
    return model, spec.without("svd-parametrize"), ranks, lambda module, name: name in ranks


def _fold(model: nn.Module, spec: ModelSpec) -> ModelSpec:
    pairs = fold_bn_(model)
    return spec.then({"kind": "fold-bn", "pairs": pairs}) if pairs else spec


def _decompose(model: nn.Module, spec: ModelSpec, scheme: tuple[str, ...], criterion: Any, filter_fn: FilterFn,
               label: str, check_latency: bool, latency_batch: int, min_run_time: float,
               channels_last: bool) -> tuple[ModelSpec, Plan]:
    p = plan(model, scheme[0] if len(scheme) == 1 else scheme, criterion, filter_fn=filter_fn,
             input_shape=spec.input_shape)
    p.criterion = label
    if check_latency:
        p = keep_faster(model, p, latency_batch, min_run_time / 3, channels_last=channels_last)
    decompose_(model, p)  # one SVD per decomposed layer: planning took singular values only
    return spec.then({"kind": "decompose", "plan": p}), p


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


def _measured(model: nn.Module, spec: ModelSpec, latency_batch: int, min_run_time: float) -> tuple[Any, float, str]:
    """(profile, milliseconds, memory format) of a model as it will run."""
    return (profile(model, spec.input_shape), *best_latency(model, spec.input_shape, latency_batch, min_run_time))


def _report(run: str | Path, criterion: Any, scheme: str, accs: tuple[float, float], before: tuple[Any, float, str],
            after: tuple[Any, float, str], latency_batch: int, device: torch.device, finetune_epochs: int,
            p: Plan) -> dict:
    (acc_before, acc_after), (prof_before, dense_ms, dense_fmt), (prof_after, low_ms, low_fmt) = accs, before, after
    return {
        "source": str(run), "rank": str(criterion), "scheme": scheme,
        "acc_before": round(acc_before, 4), "acc_after": round(acc_after, 4),
        "macs_before": prof_before.macs, "macs_after": prof_after.macs,
        "flops_speedup": round(prof_before.macs / max(prof_after.macs, 1), 4),
        "params_before": prof_before.params, "params_after": prof_after.params,
        "latency_ms_before": round(dense_ms, 4), "latency_ms_after": round(low_ms, 4),
        "latency_speedup": round(dense_ms / max(low_ms, 1e-9), 4),
        "latency_batch_size": latency_batch, "latency_device": str(device), "latency_threads": torch.get_num_threads(),
        "memory_format_before": dense_fmt, "memory_format_after": low_fmt,
        "latency_note": "both models with BatchNorm folded into the convs, eval mode, inference_mode; median of torch.utils.benchmark blocks",
        "params_note": "both counts with BatchNorm folded into the convs",
        "finetune_epochs": finetune_epochs,
        "layers_decomposed": sum(lp.decomposed for lp in p.layers),
        "layers_dense": [[lp.name, lp.reason] for lp in p.layers if not lp.decomposed],
    }


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
) -> dict:
    """Decompose a trained run (or model) and write the compressed model and its report.

    Args:
        run: A run folder (``checkpoint.safetensors``) or a model folder/file.
        out: Output folder.
        rank: A criterion or its text (``value:0.05``, ``energy:0.95``, ``fixed:8``, ``speedup:3``).
        scheme: A name of :data:`trp.schemes.SCHEMES`, ``auto``, or several tried in order per layer
            (``spatial,linear``); default: the run's own scheme. Layers: those the run trained
            (its config's ``layers``, :func:`trp.surgery.layer_filter`).
        finetune_epochs: Epochs of fine-tuning after decomposition (0: none, as TRP needs none).
        finetune_lr: Peak learning rate of that fine-tuning.
        data_dir: Data folder, if not the one the run was trained on.
        latency_batch: Batch size for the latency measurements.
        check_latency: Keep dense the layers whose decomposed form measures slower.
        overwrite: Replace what ``out`` holds (every file trp wrote there is removed).
        log: Where progress lines go.
        min_run_time: Seconds per whole-model latency measurement (a third of it per layer check).
        trust: Accept a model file without trp's checksum (see :func:`trp.checkpoint.read_safetensors`).

    Returns:
        The report dict (also written to ``out/report.json``).

    Example:
        >>> import tempfile
        >>> from trp.train import TrainConfig, train
        >>> run = tempfile.mkdtemp()
        >>> _ = train(TrainConfig(dataset="digits", epochs=1), run, progress=False, log=lambda s: None)
        >>> r = compress(run, tempfile.mkdtemp() + "/c", "speedup:2", latency_batch=8, check_latency=False,
        ...              overwrite=True, log=lambda s: None)
        >>> r["flops_speedup"] > 1.5
        True
    """
    criterion = rank_mod.parse(rank) if isinstance(rank, str) else rank
    finetune_epochs = whole(finetune_epochs, "finetune", low=0)
    finetune_lr = number(finetune_lr, "finetune-lr", low=0.0, low_open=True)
    latency_batch = whole(latency_batch, "latency-batch", low=1, high=MAX_LATENCY_BATCH)
    if scheme is not None:
        scheme_names(scheme)
    out = Path(out)
    _check_out(out, run, overwrite)
    model, spec, config, device, data = _load_run(run, data_dir, boolean(trust, "trust"))
    svd = spec.find("svd-parametrize")
    scheme = scheme or (svd["scheme"] if svd else None) or config.get("scheme", "channel")
    names = scheme_names(scheme)
    with locked(out):
        acc_before, _ = evaluate(model, data)
        model, spec, plan_rank, layers = _dense_form(model, spec, criterion, names, config.get("layers", "convs"))
        dense_ref = copy.deepcopy(model.eval())
        fold_bn_(dense_ref)  # counted and timed like the result, with BatchNorm folded (MACs are the same either way)
        before = _measured(dense_ref, spec, latency_batch, min_run_time)
        del dense_ref
        # Without fine-tuning, BN is folded first so the planner and the latency check see the layers
        # as they will run; fine-tuning wants BN, so then it is folded into the decomposed model after.
        if finetune_epochs == 0:
            spec = _fold(model, spec)
        spec, p = _decompose(model, spec, names, plan_rank, layers, str(criterion), check_latency,
                             latency_batch, min_run_time, before[2] == "channels_last")
        _warn_if_degenerate(criterion, p)
        if finetune_epochs:
            finetune(model, data, finetune_epochs, finetune_lr, config.get("batch_size", 128), config.get("seed", 0), log)
            spec = _fold(model.eval(), spec)
        acc_after, _ = evaluate(model, data)
        after = _measured(model, spec, latency_batch, min_run_time)
        report = _report(run, criterion, scheme, (acc_before, acc_after), before, after, latency_batch, device,
                         finetune_epochs, p)
        clear_run(out)  # with overwrite: nothing of what trp wrote there before stays beside the new model
        save_model(out / MODEL_FILE, model, spec, extra={"source": str(run), "config": config})
        p.to_json(out / "plan.json")
        atomic_write_text(out / "report.json", json.dumps(report, indent=1))
    return report
