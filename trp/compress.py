"""``trp compress``: decompose a trained run, evaluate before and after, measure, save.

Steps, in order: load the run's model; evaluate it; fold BatchNorm into the convs (exact at
inference, and it removes a memory-bound pass per layer); plan ranks with the chosen criterion on
the layers TRP trains (every conv but the first); measure each planned layer dense and decomposed
and keep dense any whose decomposed form is slower; decompose; optionally fine-tune; evaluate and
time again. The folder written holds ``model.safetensors`` (weights plus the spec and plan, so
``trp.load`` rebuilds it without pickles), ``plan.json`` and ``report.json``.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from trp import checkpoint as ckpt
from trp import decompose as dec
from trp import rank as rank_mod
from trp.errors import TRPError
from trp.io import atomic_write_text
from trp.measure import latency_ms, profile

__all__ = ["compress", "keep_faster", "finetune", "best_latency"]


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


def keep_faster(model: nn.Module, plan: dec.Plan, batch_size: int, min_run_time: float = 0.05,
                channels_last: bool = False, rounds: int = 3) -> dec.Plan:
    """Mark dense every planned layer whose decomposed form measures slower than the dense one.

    Fewer MACs do not always mean less time (two small kernels, a memory-bound 1×1 conv); this
    check keeps the measured speed-up honest. Layers are timed alone at their traced input shape,
    in the memory format the model will run in (channels-last changes the answer on CPUs). Dense
    and decomposed forms are timed in turn, ``rounds`` times each, and each keeps its fastest
    median: a slow spell of a shared machine then rarely decides a layer's fate.

    Example:
        >>> import trp
        >>> m = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1))
        >>> p = trp.plan(m, rank=trp.fixed(2), input_shape=(8, 16, 16))
        >>> isinstance(keep_faster(m, p, 1, min_run_time=0.01), trp.Plan)
        True
    """
    if rounds < 1:
        raise TRPError(f"rounds must be >= 1, got {rounds}")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    layers = []
    for lp in plan.layers:
        if lp.decomposed:
            dense = copy.deepcopy(dec.get_module(model, lp.name)).to(memory_format=fmt)
            low = dec.SCHEMES[lp.scheme].build(dense, lp.rank).to(memory_format=fmt)
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
    """A few epochs of SGD with a cosine schedule (for post-hoc decomposition baselines).

    Example:
        >>> from trp.data import load
        >>> from trp.models import create
        >>> finetune(create("resnet20", in_channels=1), load("digits"), 1, 0.01, 256, 0, log=lambda s: None)
    """
    import torch.nn.functional as F

    device = next(model.parameters()).device
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4, nesterov=True)
    steps = data.num_train_batches(batch_size)
    model.train()
    for epoch in range(epochs):
        for step, (x, y) in enumerate(data.train_batches(batch_size, 10_000 + epoch, seed)):
            for g in opt.param_groups:
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * (epoch * steps + step) / (epochs * steps)))
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        log(f"fine-tune epoch {epoch + 1}/{epochs}  loss {loss.item():.4f}")
    model.eval()


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
) -> dict:
    """Decompose a trained run (or model) and write the compressed model and its report.

    Args:
        run: A run folder (``checkpoint.safetensors``) or a model folder/file.
        out: Output folder.
        rank: A criterion or its text (``value:0.05``, ``energy:0.95``, ``fixed:8``, ``speedup:3``).
        scheme: ``channel``, ``spatial`` or ``decouple`` (default: the run's own scheme).
        finetune_epochs: Epochs of fine-tuning after decomposition (0: none, as TRP needs none).
        finetune_lr: Peak learning rate of that fine-tuning.
        data_dir: Data folder, if not the one the run was trained on.
        latency_batch: Batch size for the latency measurements.
        check_latency: Keep dense the layers whose decomposed form measures slower.
        overwrite: Allow ``out`` to hold a previous compression.
        log: Where progress lines go.
        min_run_time: Seconds per whole-model latency measurement (a third of it per layer check).

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
    from trp.data import load as load_data
    from trp.hook import default_filter
    from trp.train import evaluate, resolve_device

    criterion = rank_mod.parse(rank) if isinstance(rank, str) else rank
    if finetune_epochs < 0:
        raise TRPError(f"finetune must be >= 0 epochs, got {finetune_epochs}")
    if not (math.isfinite(finetune_lr) and finetune_lr > 0):
        raise TRPError(f"finetune-lr must be a finite number > 0, got {finetune_lr}")
    if latency_batch < 1:
        raise TRPError(f"latency-batch must be >= 1, got {latency_batch}")
    if scheme is not None and scheme not in dec.SCHEMES:
        raise TRPError(f"unknown scheme {scheme!r}; choose one of: {', '.join(dec.SCHEMES)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise TRPError(f"{out} is not empty; choose another --out or pass --overwrite")
    model, spec, meta = ckpt.load_model(run)
    if spec.plan:
        raise TRPError(f"{run} is already compressed")
    config = meta.get("config", {})
    device = resolve_device(config.get("device", "auto"))
    model.to(device)
    scheme = scheme or spec.svd_scheme or config.get("scheme", "channel")
    data = load_data(spec.dataset, data_dir or config.get("data_dir"), False).to(device)
    if list(data.input_shape) != list(spec.input_shape):
        raise TRPError(f"the data's input shape {list(data.input_shape)} is not the model's {spec.input_shape}")
    acc_before, _ = evaluate(model, data)
    layer_filter = default_filter(model)
    if spec.svd_scheme:
        # SVD training (Yang et al.) prunes by its own trained singular values: each layer becomes
        # the dense weight U_k diag(s_k) V_kᵀ, of rank k exactly, and then follows TRP's path, so
        # the decomposed modules and the plan are the same as for any other run.
        from trp.svd_training import truncate_to_dense_

        if isinstance(criterion, rank_mod.Speedup):
            raise TRPError("SVD-trained runs are pruned by their singular values: use value:, energy:, fixed: or fraction:")
        model, ranks = truncate_to_dense_(model, criterion)
        spec = replace(spec, svd_scheme=None)
        layer_filter = lambda module, name: name in ranks  # noqa: E731
        criterion_for_plan: Any = ranks
    else:
        criterion_for_plan = criterion
    model.eval()
    dense_ref = copy.deepcopy(model)
    dec.fold_bn_(dense_ref)
    # Counted like the result: the dense network with BatchNorm folded (MACs are the same either way).
    prof_before = profile(dense_ref, spec.input_shape)
    dense_ms, dense_fmt = best_latency(dense_ref, spec.input_shape, latency_batch, min_run_time)
    del dense_ref
    # Without fine-tuning, BN is folded first so the planner and the latency check see the layers
    # as they will run; fine-tuning wants BN, so then it is folded into the decomposed model after.
    fold_first = finetune_epochs == 0
    bn_pairs = dec.fold_bn_(model) if fold_first else []
    plan = dec.plan(model, scheme, criterion_for_plan, filter_fn=layer_filter, input_shape=spec.input_shape)
    plan.criterion = str(criterion)
    if check_latency:
        plan = keep_faster(model, plan, latency_batch, min_run_time / 3, channels_last=dense_fmt == "channels_last")
    dec.decompose_(model, plan=plan)
    if not fold_first:
        finetune(model, data, finetune_epochs, finetune_lr, config.get("batch_size", 128), config.get("seed", 0), log)
        bn_pairs = dec.fold_bn_(model.eval())
    spec = replace(spec, bn_folded=bn_pairs, fold_after_plan=not fold_first, plan=plan.to_dict())
    acc_after, _ = evaluate(model, data)
    prof_after = profile(model, spec.input_shape)
    low_ms, low_fmt = best_latency(model, spec.input_shape, latency_batch, min_run_time)

    out.mkdir(parents=True, exist_ok=True)
    ckpt.save_model(out / ckpt.MODEL_FILE, model, spec, extra={"source": str(run), "config": config})
    plan.to_json(out / "plan.json")
    report = {
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
        "layers_decomposed": sum(lp.decomposed for lp in plan.layers),
        "layers_dense": [[lp.name, lp.reason] for lp in plan.layers if not lp.decomposed],
    }
    atomic_write_text(out / "report.json", json.dumps(report, indent=1))
    return report
