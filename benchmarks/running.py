"""The measuring half of the benchmark: train every run, compress, time epochs, time inference.

(1) Every run trains as a ``python -m trp train`` subprocess, ``--jobs`` at a time, each on one
thread; (2) each trained low-rank run is compressed with :func:`trp.compress.compress`; (3) the
baseline is decomposed post hoc at the same MACs; (4) training epochs are timed again, one run at
a time in this process, so that the epoch-time ratios are not disturbed by parallel runs; (5)
inference of every model is timed at batch 1 and 128 in every runtime of :mod:`trp.runtimes`
(``--runtimes``: eager, channels-last, TorchScript, torch.compile, ONNX Runtime; warm-up, median of
repeated blocks), every model once per round, in alternating order, keeping per runtime and batch
its fastest round; each model's best runtime and its speed-up against the dense model in *its*
best runtime come from those times (:func:`runtime_fields`).

Example:
    >>> with torch_threads(1):
    ...     torch.get_num_threads()
    1
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from benchmarks.common import MACS_SOURCES, POSTHOC, REPO, TRAINED, folder
from trp.bn import fold_bn_
from trp.checkpoint import CHECKPOINT_FILE
from trp.saving import load_model
from trp import runtimes as rt
from trp.compress import compress
from trp.errors import TRPError
from trp.io import atomic_write_text
from trp.measure import Profile, profile
from trp.train import TrainConfig, train

__all__ = ["train_configs", "read_metrics", "run_state", "train_all", "compress_all", "time_epochs",
           "measure_latency", "runtime_fields", "latency_phase", "torch_threads"]

Logger = Callable[[str], None]
BATCHES = (1, 128)  # the batch sizes of the latency phase


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a block on ``n`` torch threads, restoring the previous count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_configs(args: argparse.Namespace) -> dict[str, TrainConfig]:
    """Every training run by key (``baseline``, ``trp+nuclear-channel``, …): same budget and seed."""
    common = dict(model=args.model, dataset=args.dataset, data_dir=args.data_dir, epochs=args.epochs, lr=args.lr,
                  batch_size=args.batch_size, seed=args.seed, device=args.device, energy=args.energy,
                  energy_ramp=args.energy_ramp, period=args.period)
    configs = {}
    # Longest runs first, so that the last run does not train alone on an idle core.
    for method in ("svd", "trp+nuclear", "trp", "nuclear"):
        if method not in args.method_list:
            continue
        for scheme in args.scheme_list:
            if method == "svd":
                c = TrainConfig(**common, method="svd", scheme=scheme, nuclear=0.0, orth=args.orth, sparsity=args.sparsity)
            elif method == "nuclear":
                c = TrainConfig(**common, method="nuclear", scheme=scheme, nuclear=args.nuclear_only)
            else:
                # --latency-speedup: ranks for measured time (trp.latency) instead of a MACs budget
                latency = getattr(args, "latency_speedup", None) or None
                c = TrainConfig(**common, method="trp", scheme=scheme, nuclear=args.nuclear if method == "trp+nuclear" else 0.0,
                                speedup=None if latency else args.speedup or None, freeze=args.freeze,
                                **({"latency_speedup": latency, "latency_runtime": args.latency_runtime}
                                   if latency else {}))
            configs[f"{method}-{scheme}"] = c
    # The baseline is always trained: the accuracy, latency and epoch-time references come from it.
    configs["baseline"] = TrainConfig(**common, method="baseline", nuclear=0.0)
    return configs


def read_metrics(run: Path) -> list[dict]:
    """The rows of a run's ``metrics.csv`` (none if it has not written one)."""
    try:
        with open(run / "metrics.csv", newline="") as f:
            return list(csv.DictReader(f))
    except OSError:
        return []


def run_state(run: Path, config: TrainConfig) -> str:
    """``done``, ``partial`` (same config, fewer epochs) or ``none``."""
    if not (run / CHECKPOINT_FILE).is_file() or not (run / "config.json").is_file():
        return "none"
    try:
        saved = TrainConfig.from_dict(json.loads((run / "config.json").read_text())["config"])
    except (OSError, ValueError, KeyError, TypeError, TRPError):
        return "none"
    if saved != config:
        return "none"
    rows = read_metrics(run)
    return "done" if len(rows) >= config.epochs else "partial" if rows else "none"


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").rstrip().splitlines()
    except OSError:
        return "    (no log)"
    return "\n".join("    " + line for line in text[-lines:]) or "    (empty log)"


def _queue(args: argparse.Namespace, configs: dict[str, TrainConfig], log: Logger) -> tuple[dict, list]:
    """Per-run info and the commands of the runs still to train (finished ones reused with --resume-existing)."""
    info: dict[str, dict] = {}
    pending = []
    for key, config in configs.items():
        run = args.runs_dir / "train" / folder(key)
        info[key] = {"run": str(run), "reused": False, "wall_s_parallel": None}
        state = run_state(run, config) if args.resume_existing else "none"
        if state == "done":
            log(f"reusing finished run {key} ({run})")
            info[key]["reused"] = True
            continue
        run.mkdir(parents=True, exist_ok=True)
        cfg_file = args.runs_dir / "configs" / f"{folder(key)}.json"
        atomic_write_text(cfg_file, json.dumps(config.to_dict(), indent=1))
        cmd = [sys.executable, "-m", "trp", "train"]
        cmd += ["--resume", str(run)] if state == "partial" else ["--config", str(cfg_file), "--out", str(run), "--overwrite"]
        cmd += ["--no-progress"]
        pending.append((key, cmd, run, state))
    return info, pending


def _run_queue(jobs: int, pending: list, info: dict[str, dict], log: Logger) -> None:
    """Run the queued training commands, ``jobs`` at a time; stop them all on an error or Ctrl-C."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    running: dict[str, tuple[subprocess.Popen, Any, float, Path]] = {}
    try:
        while pending or running:
            while pending and len(running) < jobs:
                key, cmd, run, state = pending.pop(0)
                log_path = run / "train.log"
                logf = open(log_path, "a" if state == "partial" else "w")
                logf.write("$ OMP_NUM_THREADS=1 " + shlex.join(cmd) + "\n")
                logf.flush()
                log(f"training {key}{' (continuing)' if state == 'partial' else ''}: log in {log_path}")
                proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
                running[key] = (proc, logf, time.perf_counter(), log_path)
            time.sleep(0.2)
            for key in list(running):
                proc, logf, t0, log_path = running[key]
                rc = proc.poll()
                if rc is None:
                    continue
                logf.close()
                del running[key]
                if rc != 0:
                    raise TRPError(f"training run {key} failed (exit status {rc}); the end of {log_path}:\n{_tail(log_path)}")
                info[key]["wall_s_parallel"] = round(time.perf_counter() - t0, 2)
                log(f"finished {key} in {info[key]['wall_s_parallel']:.1f} s")
    finally:
        for proc, _, _, _ in running.values():  # an error or Ctrl-C: stop the runs this harness started
            if proc.poll() is None:
                proc.terminate()
        for proc, logf, _, _ in running.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            logf.close()


def train_all(args: argparse.Namespace, configs: dict[str, TrainConfig], log: Logger) -> dict[str, dict]:
    """Train every run as a subprocess, --jobs at a time, each on one thread; returns per-run info."""
    info, pending = _queue(args, configs, log)
    _run_queue(args.jobs, pending, info, log)
    for key, config in configs.items():
        rows = read_metrics(Path(info[key]["run"]))
        if len(rows) < config.epochs:
            raise TRPError(f"training run {key} stopped after {len(rows)} of {config.epochs} epochs; "
                           f"see {info[key]['run']}/train.log")
        info[key]["acc"] = float(rows[-1]["test_acc"])
        info[key]["train_acc"] = float(rows[-1]["train_acc"])  # last epoch, augmented batches, as trained
        info[key]["epoch_time_s_parallel"] = round(sum(float(r["epoch_time_s"]) for r in rows) / len(rows), 4)
        mean_rank = rows[-1].get("mean_rank", "")
        info[key]["final_mean_rank"] = float(mean_rank) if mean_rank not in ("", None) else None
    return info


def compress_all(args: argparse.Namespace, train_info: dict[str, dict],
                 log: Logger) -> tuple[dict[tuple[str, str], dict], dict[str, str]]:
    """(2) Compress the low-rank runs; (3) decompose the baseline post hoc at their MACs.

    Returns the compression reports by (method, scheme), each with its ``folder``, and per scheme
    the method whose MACs the post-hoc runs matched.
    """
    reports: dict[tuple[str, str], dict] = {}
    comp_dir = args.runs_dir / "compressed"
    for method in TRAINED:
        if method not in args.method_list:
            continue
        for scheme in args.scheme_list:
            key = f"{method}-{scheme}"
            rank = args.svd_rank_criterion if method == "svd" else args.rank_criterion
            log(f"compressing {key} with {rank}")
            r = compress(train_info[key]["run"], comp_dir / folder(key), rank, latency_batch=128, check_latency=True,
                         overwrite=True, log=log, min_run_time=args.min_run_time, runtimes=layer_runtimes(args),
                         compile_timeout=args.compile_timeout)
            reports[(method, scheme)] = {**r, "folder": str(comp_dir / folder(key))}
    macs_source: dict[str, str] = {}
    if not set(POSTHOC) & set(args.method_list):
        return reports, macs_source
    for scheme in args.scheme_list:
        src = next(m for m in MACS_SOURCES if (m, scheme) in reports)
        macs_source[scheme] = src
        target = max(1.0, float(reports[(src, scheme)]["flops_speedup"]))
        for method, ft in (("posthoc", 0), ("posthoc+ft", args.finetune)):
            if method not in args.method_list:
                continue
            key = f"{method}-{scheme}"
            log(f"post-hoc SVD of the baseline ({scheme}) at the MACs of {src} ({target:.3f}x), {ft} fine-tuning epoch(s)")
            r = compress(train_info["baseline"]["run"], comp_dir / folder(key), f"speedup:{target!r}", scheme=scheme,
                         finetune_epochs=ft, finetune_lr=args.finetune_lr, latency_batch=128, check_latency=False,
                         overwrite=True, log=log, min_run_time=args.min_run_time, runtimes=layer_runtimes(args),
                         compile_timeout=args.compile_timeout)
            reports[(method, scheme)] = {**r, "folder": str(comp_dir / folder(key)), "macs_target": target}
    return reports, macs_source


def time_epochs(args: argparse.Namespace, configs: dict[str, TrainConfig], log: Logger) -> dict[str, dict]:
    """Time training epochs of every config in this process, in interleaved rounds; keep the fastest warm epoch.

    Each round trains every config for 2 epochs (the first is warm-up), in forward order in even rounds
    and backward in odd ones, so that a slow spell of the machine does not land on one config only;
    ``--timing-rounds`` sets how many. An epoch's time is its training steps; the one-off end of
    training (TRP's final projection and BatchNorm recalibration) is kept apart as ``finish_time_s``.
    The learning-rate schedule follows the short run, which changes the numbers but not the cost of a step.
    """
    keys = ["baseline", *[k for k in configs if k != "baseline"]]
    warm: dict[str, list[float]] = {k: [] for k in keys}
    first: dict[str, list[float]] = {k: [] for k in keys}
    finish: dict[str, list[float]] = {k: [] for k in keys}
    for rnd in range(args.timing_rounds):
        for key in keys if rnd % 2 == 0 else keys[::-1]:
            run = args.runs_dir / "timing" / folder(key)
            train(replace(configs[key], epochs=2), run, overwrite=True, progress=False, log=lambda s: None)
            rows = read_metrics(run)
            times = [float(r["epoch_time_s"]) for r in rows]
            first[key].append(times[0])
            warm[key].extend(times[1:])
            finish[key].append(float(rows[-1]["finish_time_s"]))
    out = {}
    for key in keys:
        out[key] = {"epoch_time_s": min(warm[key]), "warm_epoch_times_s": warm[key], "first_epoch_s": first[key][0],
                    "finish_time_s": min(finish[key])}
        log(f"timed {key}: {min(warm[key]):.3f} s/epoch (warm epochs: {', '.join(f'{t:.3f}' for t in warm[key])} s), "
            f"end of training {min(finish[key]):.3f} s once")
    return out


def layer_runtimes(args: argparse.Namespace) -> tuple[str, ...]:
    """The runtimes compress times in (the latency phase times every one of ``--runtimes``): all but
    torch.compile, whose ~20 s per model and batch the latency phase pays once per round instead."""
    return tuple(name for name in args.runtime_list if name != "compile") or ("eager",)


def measure_latency(model: torch.nn.Module, input_shape: list[int], min_run_time: float,
                    runtimes: tuple[str, ...] | None = None, compile_timeout: float = rt.COMPILE_TIMEOUT) -> rt.Timings:
    """The model in every runtime at each batch size of :data:`BATCHES` (see :func:`trp.runtimes.measure_all`)."""
    return rt.measure_all(model, input_shape, BATCHES, runtimes, min_run_time=min_run_time,
                          compile_timeout=compile_timeout)


def _eager_fields(t: rt.Timings) -> dict:
    """``latency_ms_bN`` / ``memory_format_bN``: PyTorch eager in its faster memory format (the fields of before #14)."""
    out = {}
    for b in BATCHES:
        eager = {name: t[name] for name in ("eager", "channels_last") if b in t.get(name, {})}
        name, ms = rt.best(eager or t, b)
        out[f"latency_ms_b{b}"] = round(ms, 5)
        out[f"memory_format_b{b}"] = rt.RUNTIMES[name].memory_format if eager else name
    return out


def runtime_fields(t: rt.Timings, dense: rt.Timings | None = None) -> dict:
    """A results entry's runtime fields: ``runtimes`` ({runtime: {latency_ms_b1, latency_ms_b128}}), each
    batch's best runtime and time, ``best_runtime`` (at batch 128) and, against ``dense``, its best runtime
    and time and ``best_speedup_bN`` = dense best / this best.

    Example:
        >>> d = rt.Timings({"eager": {1: 2.0, 128: 90.0}, "onnxruntime": {1: 0.5, 128: 45.0}})
        >>> c = rt.Timings({"eager": {1: 1.0, 128: 30.0}, "onnxruntime": {1: 0.4, 128: 36.0}})
        >>> f = runtime_fields(c, d)
        >>> f["best_runtime_b128"], f["best_speedup_b128"], f["best_speedup_b1"], f["runtimes"]["eager"]
        ('eager', 1.5, 1.25, {'latency_ms_b1': 1.0, 'latency_ms_b128': 30.0})
    """
    out: dict[str, Any] = {"runtimes": {name: {f"latency_ms_b{b}": round(ms, 5) for b, ms in sorted(by_b.items())}
                                        for name, by_b in t.items()},
                           "runtimes_skipped": dict(t.skipped), "threads": t.threads, **_eager_fields(t)}
    for b in BATCHES:
        name, ms = rt.best(t, b)
        out[f"best_runtime_b{b}"], out[f"best_ms_b{b}"] = name, round(ms, 5)
        if dense is not None:
            d_name, d_ms = rt.best(dense, b)
            out[f"dense_best_runtime_b{b}"], out[f"dense_best_ms_b{b}"] = d_name, round(d_ms, 5)
            out[f"best_speedup_b{b}"] = round(d_ms / ms, 4)
    out["best_runtime"] = out[f"best_runtime_b{BATCHES[-1]}"]
    return out


def _keep_fastest(best: rt.Timings | None, new: rt.Timings) -> rt.Timings:
    """Per runtime and batch the faster of two rounds (a runtime skipped in one round keeps the other's)."""
    if best is None:
        return new
    for name, by_b in new.items():
        for b, ms in by_b.items():
            if ms < best.setdefault(name, {}).get(b, float("inf")):
                best[name][b] = ms
    return best


def latency_phase(args: argparse.Namespace, train_info: dict[str, dict], reports: dict[tuple[str, str], dict],
                  log: Logger) -> tuple[Profile, dict, dict[tuple[str, str], dict]]:
    """(5) The dense baseline's profile and latency, and every compressed model's, in every runtime.

    BatchNorm is folded everywhere; every model is timed once per round, the order alternating,
    each keeping per runtime and batch its fastest round, so that a slow spell of the machine hits
    all models alike. Returns the dense model's and each compressed model's entry fields
    (:func:`runtime_fields`).
    """
    log(f"latency phase: batch 1 and 128 in {', '.join(args.runtime_list)}, {args.latency_rounds} round(s), "
        f"{args.min_run_time:g} s per measurement, {args.threads} thread(s)")
    dense, spec, _ = load_model(train_info["baseline"]["run"], "cpu")
    fold_bn_(dense.eval())
    dense_prof = profile(dense, spec.input_shape)
    models = {("baseline", "dense"): (dense, spec.input_shape)}
    for key, r in reports.items():
        model, mspec, _ = load_model(r["folder"], "cpu")
        models[key] = (model, mspec.input_shape)
    best: dict[tuple[str, str], rt.Timings] = {}
    order = list(models)
    for rnd in range(args.latency_rounds):
        for key in order if rnd % 2 == 0 else order[::-1]:
            model, shape = models[key]
            t = measure_latency(model, shape, args.min_run_time, tuple(args.runtime_list), args.compile_timeout)
            best[key] = _keep_fastest(best.get(key), t)
    dense_t = best.pop(("baseline", "dense"))
    dense_lat = runtime_fields(dense_t, dense_t)
    log(f"latency baseline: best b1 {dense_lat['best_ms_b1']:.3f} ms ({dense_lat['best_runtime_b1']}), best b128 "
        f"{dense_lat['best_ms_b128']:.2f} ms ({dense_lat['best_runtime_b128']})")
    out = {}
    for (method, scheme), t in best.items():
        la = out[(method, scheme)] = runtime_fields(t, dense_t)
        log(f"latency {method}-{scheme}: best b1 {la['best_ms_b1']:.3f} ms ({la['best_runtime_b1']}, "
            f"{la['best_speedup_b1']:.2f}x), best b128 {la['best_ms_b128']:.2f} ms ({la['best_runtime_b128']}, "
            f"{la['best_speedup_b128']:.2f}x)")
    return dense_prof, dense_lat, out
