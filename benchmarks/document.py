"""The results document (``results.json``) assembled from the measurements of one benchmark run.

One entry per method and scheme (the dense baseline first), the settings, notes on how each number
was measured, and the targets checked from them. Folders are recorded as
:func:`benchmarks.common.shown_path` says: relative to the repository, or as the user gave them.

Example:
    >>> args = argparse.Namespace(runs_dir=Path("/r"), runs_dir_shown="runs/bench/x")
    >>> recorded(args, "/r/train/baseline")
    'runs/bench/x/train/baseline'
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import POSTHOC, under
from benchmarks.reporting import machine_info
from benchmarks.targets import Context, check_targets

__all__ = ["Measurements", "recorded", "baseline_entry", "method_entry", "settings", "notes", "build"]

SETTING_KEYS = ("model", "dataset", "data_dir", "epochs", "finetune", "finetune_lr", "lr", "batch_size", "seed", "device",
                "energy", "speedup", "energy_ramp", "freeze", "period", "nuclear", "nuclear_only", "orth", "sparsity",
                "jobs", "threads", "min_run_time", "latency_rounds", "timing_rounds", "timing_threads", "quick",
                "resume_existing", "runtimes", "compile_timeout", "latency_speedup", "latency_runtime")
METHOD_ORDER = ("posthoc", "posthoc+ft", "nuclear", "trp", "trp+nuclear", "svd")  # rows of each scheme


@dataclass
class Measurements:
    """Everything :mod:`benchmarks.running` measured, as the document is built from it."""

    train_info: dict[str, dict]
    reports: dict[tuple[str, str], dict]
    macs_source: dict[str, str]
    timing: dict[str, dict]
    dense_macs: int
    dense_params: int
    dense_latency: dict
    latency: dict[tuple[str, str], dict]
    test_images: int
    steps_per_epoch: int


def recorded(args: argparse.Namespace, path: str | Path) -> str:
    """A folder under ``--runs-dir`` as the results record it."""
    return under(path, args.runs_dir, args.runs_dir_shown)


def baseline_entry(args: argparse.Namespace, m: Measurements) -> dict:
    """The dense baseline's entry: the reference of every speed-up and accuracy difference."""
    base = m.train_info["baseline"]
    return {
        "method": "baseline", "scheme": "dense", "run": recorded(args, base["run"]), "compressed": None, "rank": None,
        "acc_before": base["acc"], "acc_after": base["acc"], "delta_vs_baseline": 0.0,
        "macs": m.dense_macs, "macs_before": m.dense_macs, "macs_speedup": 1.0,
        "params": m.dense_params, "params_before": m.dense_params, **m.dense_latency,
        "latency_speedup_b1": 1.0, "latency_speedup_b128": 1.0,
        "layers_decomposed": 0, "layers_dense": [], "finetune_epochs": 0,
        "epoch_time_s": m.timing["baseline"]["epoch_time_s"], "epoch_time_ratio": 1.0, "train_time_ratio": 1.0,
        "train_epoch_time_s_parallel": base["epoch_time_s_parallel"], "train_wall_s_parallel": base["wall_s_parallel"],
        "final_mean_rank": None, "train_acc": base["train_acc"],
        "notes": ["the dense network, BatchNorm folded into the convs for the latency measurement (params counted so too)"],
    }


def _times(args: argparse.Namespace, m: Measurements, method: str, scheme: str, r: dict) -> tuple[float, float, float, list]:
    """Epoch time, its ratio to the baseline's, the whole-training ratio, and notes on how they were counted."""
    t_base = m.timing["baseline"]["epoch_time_s"]
    kept: list[str] = []
    if method in POSTHOC:
        train_ratio = 1.0 + (args.finetune / args.epochs if method == "posthoc+ft" else 0.0)
        kept.append(f"truncated SVD of the baseline at speedup:{r['macs_target']:.3f}, the MACs of "
                     f"{m.macs_source[scheme]} ({scheme}); per-layer latency check off so that the MACs match")
        if method == "posthoc+ft":
            kept.append(f"{args.finetune} fine-tuning epoch(s) at lr {args.finetune_lr:g} (cosine); train_time_ratio "
                         "counts them as baseline epochs")
        return t_base, 1.0, train_ratio, kept
    t = m.timing[f"{method}-{scheme}"]
    # The whole run: every epoch plus the one-off end of training, against the baseline's.
    train_ratio = ((args.epochs * t["epoch_time_s"] + t["finish_time_s"])
                   / (args.epochs * t_base + m.timing["baseline"]["finish_time_s"]))
    if r["layers_dense"]:
        kept.append(f"{len(r['layers_dense'])} planned layer(s) kept dense: "
                     + "; ".join(f"{n} ({why})" for n, why in r["layers_dense"][:3])
                     + (" …" if len(r["layers_dense"]) > 3 else ""))
    return t["epoch_time_s"], t["epoch_time_s"] / t_base, train_ratio, kept


def prediction(r: dict, la: dict) -> dict:
    """A latency budget's predicted whole-model time beside the latency phase's measurement of the same
    runtime and batch (``predicted_error`` = predicted / measured − 1); nothing without a prediction.

    Example:
        >>> prediction({"predicted_ms_after": 11.0, "predicted_runtime": "eager", "predicted_batch_size": 128},
        ...            {"runtimes": {"eager": {"latency_ms_b128": 10.0}}})["predicted_error"]
        0.1
    """
    if r.get("predicted_ms_after") is None:
        return {}
    runtime, batch = r["predicted_runtime"], r["predicted_batch_size"]
    measured = la.get("runtimes", {}).get(runtime, {}).get(f"latency_ms_b{batch}")
    return {"predicted_ms_after": r["predicted_ms_after"], "predicted_runtime": runtime, "predicted_batch_size": batch,
            "measured_ms_after": measured,
            "predicted_error": None if measured is None else round(r["predicted_ms_after"] / measured - 1, 4)}


def method_entry(args: argparse.Namespace, m: Measurements, method: str, scheme: str) -> dict:
    """The entry of one compressed method and scheme, its speed-ups against the dense baseline."""
    r = m.reports[(method, scheme)]
    ti = m.train_info["baseline" if method in POSTHOC else f"{method}-{scheme}"]
    epoch_time_s, ratio, train_ratio, method_notes = _times(args, m, method, scheme, r)
    la, dense = m.latency[(method, scheme)], m.dense_latency
    return {
        "method": method, "scheme": scheme, "run": recorded(args, ti["run"]), "compressed": recorded(args, r["folder"]),
        "rank": r["rank"], "acc_before": r["acc_before"], "acc_after": r["acc_after"],
        "delta_vs_baseline": round(r["acc_after"] - m.train_info["baseline"]["acc"], 4),
        "macs": r["macs_after"], "macs_before": r["macs_before"], "macs_speedup": r["flops_speedup"],
        "params": r["params_after"], "params_before": r["params_before"], **la,
        "latency_speedup_b1": round(dense["latency_ms_b1"] / la["latency_ms_b1"], 4),
        "latency_speedup_b128": round(dense["latency_ms_b128"] / la["latency_ms_b128"], 4),
        "compress_latency_speedup_b128": r["latency_speedup"],
        "layers_decomposed": r["layers_decomposed"], "layers_dense": r["layers_dense"],
        "finetune_epochs": r["finetune_epochs"],
        "epoch_time_s": epoch_time_s, "epoch_time_ratio": round(ratio, 4), "train_time_ratio": round(train_ratio, 4),
        "train_epoch_time_s_parallel": ti["epoch_time_s_parallel"], "train_wall_s_parallel": ti["wall_s_parallel"],
        "final_mean_rank": None if method in POSTHOC else ti["final_mean_rank"],
        "train_acc": None if method in POSTHOC else ti["train_acc"], "notes": method_notes, **prediction(r, la),
    }


def settings(args: argparse.Namespace) -> dict:
    """The options of the run, folders recorded relative to the repository or as given."""
    out = {k: getattr(args, k) for k in SETTING_KEYS}
    out.update(data_dir=args.data_dir_shown, schemes=args.scheme_list, methods=args.method_list,
               rank=args.rank_criterion, svd_rank=args.svd_rank_criterion, runs_dir=args.runs_dir_shown)
    return out


def notes(args: argparse.Namespace, n_test: int) -> list[str]:
    """How every number of the run was measured."""
    return [
        f"Every method trained {args.epochs} epochs: lr {args.lr:g} (cosine), batch {args.batch_size}, seed {args.seed}, "
        "the same data order. trp / trp+nuclear: "
        + (f"ranks for {args.latency_speedup:g}x less measured time ({args.latency_runtime}, batch 128), ramped up "
           "from 1x" if getattr(args, "latency_speedup", 0) else
           f"ranks for {args.speedup:g}x fewer MACs, ramped up from 1x" if args.speedup else
           f"energy {args.energy:g}, ramped down from 1.0")
        + f" over {args.energy_ramp:g} epochs, projection every {args.period} steps"
        + (f", ranks fixed after epoch {args.freeze:g}" if args.freeze is not None else "") + "; "
        f"trp+nuclear nuclear weight {args.nuclear:g}, trp none; nuclear (no projection) weight {args.nuclear_only:g}; "
        f"svd: orth {args.orth:g}, sparsity {args.sparsity}.",
        f"Decomposition without fine-tuning: {args.rank_criterion} for trp, trp+nuclear and nuclear, {args.svd_rank_criterion} "
        "for svd; planned layers whose decomposed form measured slower at batch 128 stay dense (trp.compress).",
        "posthoc / posthoc+ft: the baseline decomposed at speedup:<the MACs speed-up of trp+nuclear, same scheme> with the "
        "per-layer latency check off, so that the MACs really match.",
        f"Latency: on the CPU, random-normal input, warm-up then the median of repeated blocks ({args.min_run_time:g} s per "
        f"measurement), {args.threads} thread(s), BatchNorm folded, in every runtime of {', '.join(args.runtime_list)} "
        f"(torch.compile limited to {args.compile_timeout:g} s per compilation); every model in each of "
        f"{args.latency_rounds} round(s), order alternating, per runtime and batch its fastest round kept. "
        "latency_ms_* and latency_speedup_*: PyTorch eager in the faster of contiguous and channels-last, against the "
        "dense baseline measured the same way; best_speedup_*: the dense baseline in its own fastest runtime against "
        "the model in its fastest (runtimes lists each).",
        f"epoch_time_ratio: after all training, {args.timing_rounds} round(s) in this process, each training every run "
        f"for 2 epochs (the first warm-up), one run at a time, in alternating order, {args.timing_threads} thread(s); "
        "the fastest warm epoch of each run over the baseline's. An epoch is its training steps; TRP's one-off end of "
        "training (final projection, BatchNorm recalibration) is timed apart and counted once in train_time_ratio. "
        f"'epoch time, parallel runs' is the mean epoch time of the benchmark's own runs, {args.jobs} of them sharing the "
        "machine with one thread each: indicative only.",
        f"The test set has {n_test} images: one image is {100.0 / max(n_test, 1):.2f} pt of accuracy.",
    ]


def build(args: argparse.Namespace, command: str, m: Measurements, wall_time_s: float) -> dict:
    """The whole results document, targets checked from its own entries."""
    entries = [baseline_entry(args, m)]
    order = [x for x in METHOD_ORDER if x in args.method_list]
    entries += [method_entry(args, m, method, scheme) for scheme in args.scheme_list for method in order]
    training_runs = {k: {**v, "run": recorded(args, v["run"])} for k, v in m.train_info.items()}
    doc = {
        "name": args.name, "command": command, "machine": machine_info(args), "settings": settings(args),
        "baseline_acc": m.train_info["baseline"]["acc"], "test_images": m.test_images,
        "steps_per_epoch": m.steps_per_epoch, "methods": entries, "targets": [], "timing": m.timing,
        "training_runs": training_runs, "notes": notes(args, m.test_images), "wall_time_s": round(wall_time_s, 1),
    }
    doc["targets"] = check_targets(Context.from_doc(doc))
    return doc
