#!/usr/bin/env python
"""TRP against the decomposition baselines, trained, compressed and measured side by side in one run.

    python benchmarks/run.py                       # ResNet-20 on ../shared/data/cifar10-mini, 30 epochs
    python benchmarks/run.py --quick --out-root /tmp/b --runs-dir /tmp/b/runs   # the harness check (digits)

Every method gets the same model, data, epoch budget, learning rate, batch size and seed:

* ``baseline``: plain SGD;
* ``posthoc`` / ``posthoc+ft``: truncated SVD of the baseline (Zhang et al. 2016 for the channel
  scheme, Jaderberg et al. 2014 for the spatial one) at the MACs of the TRP + nuclear-norm result of
  the same scheme, without and with ``--finetune`` epochs of fine-tuning;
* ``nuclear``: the nuclear-norm sub-gradient alone (no projection);
* ``trp``: TRP projection alone (nuclear weight 0);
* ``trp+nuclear``: TRP with the nuclear-norm sub-gradient (the paper's method);
* ``svd``: SVD training (Yang et al. 2020).

Steps: (1) train every run as a ``python -m trp train`` subprocess, ``--jobs`` at a time, each on
one thread; (2) compress each trained low-rank run with :func:`trp.compress.compress`; (3)
decompose the baseline post hoc at the same MACs; (4) time training epochs again, one run at a time
in this process, so that the epoch-time ratios are not disturbed by parallel runs; (5) time
inference of every model at batch 1 and 128 (``torch.utils.benchmark``, warm-up, median of
repeated blocks); (6) write ``results.json``, ``results.md`` and ``accuracy_vs_speedup.png`` under
``--out-root/--name``. The targets of the issue are checked from the measured numbers.

Bad input gives one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:  # run as `python benchmarks/run.py` from a checkout that is not installed
    sys.path.insert(0, str(REPO))

from trp.cli import finite_float, whole_number  # noqa: E402
from trp.errors import TRPError  # noqa: E402
from trp.io import atomic_write, atomic_write_text  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10-mini" / "cifar-10-batches-py"
TRAINED = ("nuclear", "trp", "trp+nuclear", "svd")  # methods trained once per scheme
POSTHOC = ("posthoc", "posthoc+ft")
ALL_METHODS = ("baseline", *TRAINED, *POSTHOC)
SCHEMES = ("channel", "spatial", "decouple")
# The headline TRP result sets the MACs of the post-hoc baselines; the others stand in when it is not run.
MACS_SOURCES = ("trp+nuclear", "trp", "nuclear", "svd")
REQUIRED_KEYS = ("method", "scheme", "acc_before", "acc_after", "macs_speedup", "params", "latency_speedup_b1",
                 "latency_speedup_b128", "epoch_time_ratio")

# Targets of the issue (ResNet-20 on cifar10-mini, equal epoch budgets).
T_SPEEDUP, T_ACC_LOSS, T_DECOMP, T_POSTHOC_GAP, T_EPOCH, T_LATENCY = 2.5, 1.0, 0.3, 2.0, 1.05, 0.8

# What --quick changes (a flag given explicitly still wins), and the defaults otherwise.
QUICK = {"dataset": "digits", "epochs": 2, "finetune": 1, "period": 5, "min_run_time": 0.02, "timing_rounds": 1,
         "latency_rounds": 1, "threads": 1}
DEFAULTS = {"dataset": "cifar10", "epochs": 30, "finetune": 3, "period": 20, "min_run_time": 1.0, "timing_rounds": 3,
            "latency_rounds": 3, "threads": None}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        raise TRPError(message)


def _pos_float(text: str) -> float:
    v = finite_float(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number >= 0")
    return v


def _int(text: str) -> int:
    v = whole_number(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="run.py", description="Benchmark TRP against the decomposition baselines (see benchmarks/README.md).")
    a = p.add_argument
    a("--data-dir", help=f"CIFAR-format folder (default for cifar10: {DEFAULT_DATA})")
    a("--dataset", help="cifar10 (default), cifar100 or digits (bundled; what --quick uses)")
    a("--model", default="resnet20")
    a("--epochs", type=_int, help="training epochs of every method (default 30; --quick 2)")
    a("--finetune", type=_int, help="K: fine-tuning epochs of posthoc+ft (default 3; --quick 1)")
    a("--finetune-lr", type=_pos_float, default=0.01, help="peak lr of that fine-tuning (cosine)")
    a("--lr", type=_pos_float, default=0.05)
    a("--batch-size", type=_int, default=128)
    a("--seed", type=_int, default=0)
    a("--device", default="cpu", help="training device (latency is always measured on the CPU)")
    a("--schemes", default="channel,spatial", help="comma-separated: channel, spatial (decouple: trained methods only)")
    a("--methods", default=",".join(ALL_METHODS), help=f"comma-separated subset of {','.join(ALL_METHODS)}")
    a("--energy", type=_pos_float, default=0.95,
      help="TRP energy kept by each projection when --speedup is 0; also sets the nuclear method's sub-gradient rank")
    a("--speedup", type=_pos_float, default=2.55,
      help="trp, trp+nuclear: choose the ranks of all layers for this MACs speed-up instead of --energy (0: use --energy)")
    a("--energy-ramp", type=_pos_float,
      help="epochs over which the projection tightens from dense to --energy or --speedup (default 4/15 of --epochs)")
    a("--freeze", type=finite_float,
      help="trp, trp+nuclear: epochs after which the ranks stay fixed (default 7/15 of --epochs; -1: never)")
    a("--period", type=_int, help="optimizer steps between TRP projections (default 20; --quick 5)")
    # The paper's 3e-4 goes with 164 epochs of 391 steps; the sub-gradient acts once per step, so a
    # budget of a few hundred steps needs a larger weight for the same pull on the spectrum.
    a("--nuclear", type=_pos_float, default=1e-3,
      help="nuclear-norm weight of trp+nuclear (default 1e-3; the paper's 3e-4 is for 164 full CIFAR epochs)")
    a("--nuclear-only", type=_pos_float, default=1e-3,
      help="nuclear-norm weight of the nuclear method (without projection a larger weight is needed to lower ranks)")
    a("--orth", type=_pos_float, default=1.0, help="SVD training: orthogonality weight")
    a("--sparsity", default="hoyer:0.3", help="SVD training: KIND:WEIGHT")
    a("--rank", default="value:0.05", help="decomposition criterion of the trp, trp+nuclear and nuclear runs")
    a("--svd-rank", default="value:0.05", help="pruning criterion of the svd runs")
    a("--jobs", type=_int, default=2, help="training runs in parallel, one thread each")
    a("--name", help="results folder name (default MODEL-DATASET-eEPOCHS)")
    a("--out-root", default=str(HERE / "results"), help="where the results folder goes (default benchmarks/results)")
    a("--runs-dir", help="where the run folders go (default: REPO/runs/bench/NAME, not committed)")
    a("--resume-existing", action="store_true",
      help="reuse finished training runs with the same config, continue unfinished ones")
    a("--min-run-time", type=_pos_float, help="seconds per latency measurement (default 1.0; --quick 0.02)")
    a("--threads", type=_int, help="torch threads of the timing and latency phases (default: this process's; --quick 1)")
    a("--latency-rounds", type=_int, help="rounds of the latency phase, each timing every model (default 3; --quick 1)")
    a("--timing-rounds", type=_int,
      help="rounds of the timing phase; each trains every run 2 epochs, the first warm-up (default 3; --quick 1)")
    a("--timing-threads", type=_int, default=1,
      help="torch threads of the timing phase (default 1, as the training runs; steadier than 2 on a small machine)")
    a("--quick", action="store_true", help="tiny budget on digits: checks the harness in about a minute")
    return p


class _Log:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        print(f"[bench {time.perf_counter() - self.t0:7.1f}s] {msg}", flush=True)


def _split(text: str, allowed: Sequence[str], what: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise TRPError(f"--{what} is empty")
    bad = [s for s in items if s not in allowed]
    if bad:
        raise TRPError(f"unknown {what[:-1]} {bad[0]!r} in --{what}; choose from {', '.join(allowed)}")
    return list(dict.fromkeys(items))


def resolve(argv: Sequence[str]) -> argparse.Namespace:
    """Parse and validate the options; --quick fills in the tiny budget where a flag was not given."""
    import torch

    from trp import rank as rank_mod

    args = build_parser().parse_args(list(argv))
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads is None:
        args.threads = torch.get_num_threads()
    if args.data_dir is None and args.dataset == "cifar10":
        args.data_dir = str(DEFAULT_DATA)
    if args.data_dir is not None:
        args.data_dir = str(Path(args.data_dir).expanduser().resolve())
    if args.energy_ramp is None:
        args.energy_ramp = round(args.epochs * 4 / 15, 4)
    if args.freeze is None:
        args.freeze = round(args.epochs * 7 / 15, 4)
    elif args.freeze < 0:
        args.freeze = None  # never
    if 0 < args.speedup < 1:
        raise TRPError(f"--speedup must be >= 1 (or 0 for --energy), got {args.speedup}")
    for name, low in (("epochs", 1), ("jobs", 1), ("threads", 1), ("timing_rounds", 1), ("timing_threads", 1),
                      ("latency_rounds", 1),
                      ("period", 1), ("batch_size", 1)):
        if getattr(args, name) < low:
            extra = ""
            raise TRPError(f"--{name.replace('_', '-')} must be >= {low}{extra}, got {getattr(args, name)}")
    if args.min_run_time <= 0:
        raise TRPError("--min-run-time must be > 0")
    args.method_list = _split(args.methods, ALL_METHODS, "methods")
    args.scheme_list = _split(args.schemes, SCHEMES, "schemes")
    if "decouple" in args.scheme_list and {"svd", *POSTHOC} & set(args.method_list):
        raise TRPError("svd and post-hoc baselines support the channel and spatial schemes only; drop decouple")
    if set(POSTHOC) & set(args.method_list) and not set(MACS_SOURCES) & set(args.method_list):
        raise TRPError("posthoc needs a low-rank method (trp+nuclear, trp, nuclear or svd) to set its MACs target")
    if "trp+nuclear" in args.method_list and args.nuclear <= 0:
        raise TRPError("--nuclear must be > 0 for trp+nuclear (trp is the run without it)")
    if "nuclear" in args.method_list and args.nuclear_only <= 0:
        raise TRPError("--nuclear-only must be > 0")
    args.rank_criterion = str(rank_mod.parse(args.rank))
    svd_rank = rank_mod.parse(args.svd_rank)
    if isinstance(svd_rank, rank_mod.Speedup):
        raise TRPError("--svd-rank cannot be a speedup: SVD-trained runs are pruned by their singular values")
    args.svd_rank_criterion = str(svd_rank)
    args.name = args.name or f"{args.model}-{args.dataset}-e{args.epochs}"
    if "/" in args.name or args.name in (".", ".."):
        raise TRPError(f"--name must be a plain folder name, got {args.name!r}")
    args.runs_dir = Path(args.runs_dir).expanduser().resolve() if args.runs_dir else REPO / "runs" / "bench" / args.name
    args.results_dir = Path(args.out_root).expanduser().resolve() / args.name
    return args


# ---------------------------------------------------------------------------------------------
# (1) training


def train_configs(args: argparse.Namespace) -> dict[str, Any]:
    """Every training run by key (``baseline``, ``trp+nuclear-channel``, …): same budget and seed."""
    from trp.train import TrainConfig

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
                c = TrainConfig(**common, method="trp", scheme=scheme, nuclear=args.nuclear if method == "trp+nuclear" else 0.0,
                                speedup=args.speedup or None, freeze=args.freeze)
            configs[f"{method}-{scheme}"] = c
    # The baseline is always trained: the accuracy, latency and epoch-time references come from it.
    configs["baseline"] = TrainConfig(**common, method="baseline", nuclear=0.0)
    return configs


def _folder(key: str) -> str:
    return key.replace("+", "_")


def read_metrics(run: Path) -> list[dict]:
    try:
        with open(run / "metrics.csv", newline="") as f:
            return list(csv.DictReader(f))
    except OSError:
        return []


def _run_state(run: Path, config: Any) -> str:
    """``done``, ``partial`` (same config, fewer epochs) or ``none``."""
    from trp.checkpoint import CHECKPOINT_FILE
    from trp.train import TrainConfig

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


def train_all(args: argparse.Namespace, configs: dict[str, Any], log: Callable[[str], None]) -> dict[str, dict]:
    """Train every run as a subprocess, --jobs at a time, each on one thread; returns per-run info."""
    runs_dir = args.runs_dir / "train"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    info: dict[str, dict] = {}
    pending = []
    for key, config in configs.items():
        run = runs_dir / _folder(key)
        info[key] = {"run": str(run), "reused": False, "wall_s_parallel": None}
        state = _run_state(run, config) if args.resume_existing else "none"
        if state == "done":
            log(f"reusing finished run {key} ({run})")
            info[key]["reused"] = True
            continue
        run.mkdir(parents=True, exist_ok=True)
        cfg_file = args.runs_dir / "configs" / f"{_folder(key)}.json"
        atomic_write_text(cfg_file, json.dumps(config.to_dict(), indent=1))
        cmd = [sys.executable, "-m", "trp", "train"]
        cmd += ["--resume", str(run)] if state == "partial" else ["--config", str(cfg_file), "--out", str(run), "--overwrite"]
        cmd += ["--no-progress"]
        pending.append((key, cmd, run, state))
    running: dict[str, tuple[subprocess.Popen, Any, float, Path]] = {}
    try:
        while pending or running:
            while pending and len(running) < args.jobs:
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


# ---------------------------------------------------------------------------------------------
# (4) timing and (5) latency


def time_epochs(args: argparse.Namespace, configs: dict[str, Any], log: Callable[[str], None]) -> dict[str, dict]:
    """Time training epochs of every config in this process, in interleaved rounds; keep the fastest warm epoch.

    Each round trains every config for 2 epochs (the first is warm-up), in forward order in even rounds
    and backward in odd ones, so that a slow spell of the machine does not land on one config only;
    ``--timing-rounds`` sets how many. An epoch's time is its training steps; the one-off end of
    training (TRP's final projection and BatchNorm recalibration) is kept apart as ``finish_time_s``. The learning-rate schedule follows the short run,
    which changes the numbers but not the cost of a step.
    """
    from trp.train import train

    keys = ["baseline", *[k for k in configs if k != "baseline"]]
    warm: dict[str, list[float]] = {k: [] for k in keys}
    first: dict[str, list[float]] = {k: [] for k in keys}
    finish: dict[str, list[float]] = {k: [] for k in keys}
    for rnd in range(args.timing_rounds):
        for key in keys if rnd % 2 == 0 else keys[::-1]:
            run = args.runs_dir / "timing" / _folder(key)
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


def measure_latency(model: Any, input_shape: list[int], min_run_time: float) -> dict:
    from trp.compress import best_latency

    out = {}
    for batch in (1, 128):
        ms, fmt = best_latency(model, input_shape, batch, min_run_time=min_run_time)
        out[f"latency_ms_b{batch}"] = round(ms, 5)
        out[f"memory_format_b{batch}"] = fmt
    return out


# ---------------------------------------------------------------------------------------------
# (6) report


def _fmt(v: Any, spec: str = ".2f", suffix: str = "") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:{spec}}{suffix}"


def _entry(entries: list[dict], method: str, scheme: str) -> dict | None:
    return next((e for e in entries if e["method"] == method and e["scheme"] == scheme), None)


def check_targets(entries: list[dict], baseline_acc: float, args: argparse.Namespace, n_test: int,
                  steps_per_epoch: int) -> list[dict]:
    """The issue's five targets, checked from the measured numbers, with a likely reason where one is missed."""
    one_image = 100.0 / max(n_test, 1)
    out: list[dict] = []

    def add(tid: int, target: str, scheme: str, method: str, measured: str, met: bool | None, missed_by: str = "",
            reason: str = "") -> None:
        out.append({"id": tid, "target": target, "scheme": scheme, "method": method, "measured": measured,
                    "status": "not run" if met is None else "met" if met else "missed",
                    "missed_by": missed_by if met is False else "", "reason": reason if met is False else ""})

    for scheme in args.scheme_list:
        tn = _entry(entries, "trp+nuclear", scheme)

        # 1. TRP + nuclear norm at >= 2.5x MACs speed-up loses <= 1.0 pt, no fine-tuning.
        t1 = f"trp+nuclear at >= {T_SPEEDUP}x MACs speed-up loses <= {T_ACC_LOSS} pt against the baseline, no fine-tuning"
        if tn is None:
            add(1, t1, scheme, "trp+nuclear", "", None)
        else:
            loss = baseline_acc - tn["acc_after"]
            short, over = T_SPEEDUP - tn["macs_speedup"], loss - T_ACC_LOSS
            missed, reasons = [], []
            if short > 0:
                missed.append(f"{short:.2f}x of speed-up")
                slower = sum("measured slower" in why for _, why in tn["layers_dense"])
                dense_note = f"; {slower} layer(s) kept dense by the latency check" if slower else ""
                if args.speedup:
                    reasons.append(f"training chose ranks for {args.speedup:g}x (final mean rank "
                                   f"{_fmt(tn.get('final_mean_rank'), '.1f')}){dense_note}; a larger --speedup lowers them")
                else:
                    reasons.append(f"the ranks did not fall far enough in {args.epochs} epochs (final mean rank "
                                   f"{_fmt(tn.get('final_mean_rank'), '.1f')}, decomposed with {tn['rank']}{dense_note}); "
                                   "more epochs, a lower --energy, a larger --nuclear or --speedup lower them")
            if over > 0:
                missed.append(f"{over:.2f} pt of accuracy")
                trained_loss = baseline_acc - tn["acc_before"]
                base_train = _entry(entries, "baseline", "dense")["train_acc"]
                if trained_loss > T_ACC_LOSS:
                    where = f"the loss is in the trained network already ({trained_loss:.2f} pt before decomposition)"
                    if tn["train_acc"] < base_train - T_ACC_LOSS:
                        # Fitting the training set worse than the dense network is a capacity limit, not overfitting.
                        reasons.append(f"{where}, and it fits the training set less well too ({tn['train_acc']:.2f}% "
                                       f"training accuracy in the last epoch against the baseline's {base_train:.2f}%): in "
                                       f"{args.epochs} epochs on this data the dense network is not over-parameterized, so "
                                       "the rank that pruning removes is capacity it still uses")
                    else:
                        reasons.append(f"{where}: in {args.epochs} epochs training does not recover from the projections")
                else:
                    reasons.append(f"decomposition itself cost {tn['acc_before'] - tn['acc_after']:.2f} pt (target 2)")
                if one_image > 0.25:
                    reasons.append(f"one test image is {one_image:.2f} pt")
            add(1, t1, scheme, "trp+nuclear", f"{tn['macs_speedup']:.2f}x MACs, {loss:+.2f} pt loss "
                f"({tn['acc_after']:.2f}% vs {baseline_acc:.2f}%)", short <= 0 and over <= 0, " and ".join(missed),
                "; ".join(reasons))

        # 2. Decomposing the TRP-trained network changes its accuracy by <= 0.3 pt.
        for method in ("trp+nuclear", "trp"):
            e = _entry(entries, method, scheme)
            t2 = f"decomposing the {method} network changes its accuracy by <= {T_DECOMP} pt"
            if e is None:
                if method in args.method_list:
                    add(2, t2, scheme, method, "", None)
                continue
            change = e["acc_after"] - e["acc_before"]
            reason = (f"{e['rank']} dropped singular values that the last projection kept (it keeps "
                      f"{f'the ranks of {args.speedup:g}x' if args.speedup else f'energy {args.energy}'}, "
                      f"the threshold cuts every sigma below it), so the decomposed network is not the trained one; "
                      f"one test image is {one_image:.2f} pt")
            add(2, t2, scheme, method, f"{change:+.2f} pt ({e['acc_before']:.2f}% -> {e['acc_after']:.2f}%)",
                abs(change) <= T_DECOMP + 1e-9, f"{abs(change) - T_DECOMP:.2f} pt", reason)

        # 3. At equal MACs, beats post-hoc SVD + fine-tuning by >= 2 pt.
        ph = _entry(entries, "posthoc+ft", scheme)
        t3 = f"trp+nuclear beats post-hoc SVD + {args.finetune} fine-tuning epochs by >= {T_POSTHOC_GAP} pt at equal MACs"
        if tn is None or ph is None:
            add(3, t3, scheme, "trp+nuclear", "", None)
        else:
            gap = tn["acc_after"] - ph["acc_after"]
            plain = _entry(entries, "posthoc", scheme)
            if ph["acc_after"] >= tn["acc_after"]:
                reason = (f"{args.finetune} fine-tuning epochs repaired the post-hoc truncation "
                          f"({_fmt(plain['acc_after'] if plain else None)}% -> {ph['acc_after']:.2f}%), while trp+nuclear "
                          f"trained to {tn['acc_before']:.2f}% ({tn['acc_before'] - baseline_acc:+.2f} pt against the baseline): "
                          "on a short budget the projections cost TRP more than truncation costs the baseline")
            else:
                reason = (f"trp+nuclear is ahead by {gap:.2f} pt only: without fine-tuning the post-hoc network had "
                          f"{_fmt(plain['acc_after'] if plain else None)}%, and fine-tuning recovered most of that loss")
            add(3, t3, scheme, "trp+nuclear", f"{gap:+.2f} pt ({tn['acc_after']:.2f}% vs {ph['acc_after']:.2f}%, "
                f"MACs speed-up {tn['macs_speedup']:.2f}x vs {ph['macs_speedup']:.2f}x)", gap >= T_POSTHOC_GAP,
                f"{T_POSTHOC_GAP - gap:.2f} pt", reason)

        # 4. TRP training time per epoch <= 1.05x the baseline's.
        for method in ("trp+nuclear", "trp"):
            e = _entry(entries, method, scheme)
            t4 = f"{method} training time per epoch <= {T_EPOCH}x the baseline's"
            if e is None:
                if method in args.method_list:
                    add(4, t4, scheme, method, "", None)
                continue
            r = e["epoch_time_ratio"]
            reason = (f"an SVD of every eligible layer each {args.period} steps ({steps_per_epoch / args.period:.1f} per epoch "
                      f"of {steps_per_epoch} steps)" + (" and the nuclear sub-gradient added every step" if method == "trp+nuclear"
                                                        else "")
                      + f" cost {100 * (r - 1):.1f}% here; a larger --period amortizes it over more steps")
            add(4, t4, scheme, method, f"{r:.3f}x ({e['epoch_time_s']:.3f} s per epoch)", r <= T_EPOCH,
                f"{r - T_EPOCH:.3f}x", reason)

        # 5. Measured CPU latency speed-up at batch 128 >= 0.8x the MACs speed-up.
        for method in ("trp+nuclear", "trp"):
            e = _entry(entries, method, scheme)
            t5 = f"{method}: measured CPU latency speed-up at batch 128 >= {T_LATENCY} x its MACs speed-up"
            if e is None:
                if method in args.method_list:
                    add(5, t5, scheme, method, "", None)
                continue
            ratio = e["latency_speedup_b128"] / max(e["macs_speedup"], 1e-9)
            reason = ("the work MACs do not count (residual adds, ReLUs, pooling, memory traffic) does not shrink, and the "
                      "thin factor convs run at lower arithmetic efficiency on the CPU "
                      f"({e['latency_ms_b128']:.2f} ms against {e['latency_ms_b128'] * e['latency_speedup_b128']:.2f} ms dense)")
            add(5, t5, scheme, method, f"{e['latency_speedup_b128']:.2f}x measured against {e['macs_speedup']:.2f}x MACs "
                f"(ratio {ratio:.3f})", ratio >= T_LATENCY, f"{T_LATENCY - ratio:.3f} of the ratio", reason)
    return out


COLUMNS = ("method", "scheme", "acc before (%)", "acc after (%)", "Δ vs baseline (pt)", "MACs speed-up", "params",
           "latency speed-up b1", "latency speed-up b128", "epoch time ratio")


def markdown(doc: dict) -> str:
    s, m = doc["settings"], doc["machine"]
    data = f" ({s['data_dir']})" if s["data_dir"] else ""
    lines = [f"# Benchmark `{doc['name']}`", "",
             f"{s['model']} on {s['dataset']}{data}, {s['epochs']} epochs for every method, lr {s['lr']} (cosine), "
             f"batch {s['batch_size']}, seed {s['seed']}. Baseline accuracy **{doc['baseline_acc']:.2f}%** "
             f"({doc['test_images']} test images).", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(COLUMNS) - 2)) + "|"]
    for e in doc["methods"]:
        lines.append("| " + " | ".join([
            e["method"], e["scheme"], _fmt(e["acc_before"]), _fmt(e["acc_after"]), _fmt(e["delta_vs_baseline"], "+.2f"),
            _fmt(e["macs_speedup"], ".2f", "x"), f"{e['params']:,}", _fmt(e["latency_speedup_b1"], ".2f", "x"),
            _fmt(e["latency_speedup_b128"], ".2f", "x"), _fmt(e["epoch_time_ratio"], ".3f", "x")]) + " |")
    lines += ["", "## Targets", ""]
    for t in doc["targets"]:
        line = f"- **{t['status']}** ({t['id']}, {t['scheme']}): {t['target']}"
        if t["measured"]:
            line += f" — {t['measured']}"
        if t["status"] == "missed":
            line += f". Missed by {t['missed_by']}. Likely reason: {t['reason']}."
        lines.append(line)
    lines += ["", "## Details", "",
              "| method | scheme | rank criterion | MACs | latency b1 (ms) | latency b128 (ms) | memory format b1 / b128 | "
              "layers decomposed | train acc, last epoch (%) | epoch time (s) | epoch time, parallel runs (s) |",
              "|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for e in doc["methods"]:
        lines.append(f"| {e['method']} | {e['scheme']} | {e['rank'] or '–'} | {e['macs']:,} | {_fmt(e['latency_ms_b1'], '.3f')} | "
                     f"{_fmt(e['latency_ms_b128'], '.2f')} | {e['memory_format_b1']} / {e['memory_format_b128']} | "
                     f"{e['layers_decomposed']} | {_fmt(e['train_acc'])} | {_fmt(e['epoch_time_s'], '.3f')} | "
                     f"{_fmt(e['train_epoch_time_s_parallel'], '.2f')} |")
    lines += ["", "## Notes", "", *(f"- {n}" for n in doc["notes"])]
    for e in doc["methods"]:
        lines += [f"- {e['method']} ({e['scheme']}): {n}" for n in e["notes"]]
    lines += ["", "## Run", "",
              f"- command: `{doc['command']}`",
              f"- machine: {m['cpu'] or 'unknown CPU'}, {m['cores']} cores ({m['cores_usable']} usable), {m['platform']}, "
              f"Python {m['python']}, torch {m['torch']}",
              f"- threads: training runs {m['training_threads_per_run']} each, {m['parallel_training_runs']} in parallel; "
              f"timing and latency phases {m['threads']}",
              f"- wall time: {doc['wall_time_s'] / 60:.1f} min ({doc['wall_time_s']:.0f} s)", ""]
    return "\n".join(lines)


MARKERS = {"posthoc": "v", "posthoc+ft": "^", "nuclear": "s", "trp": "o", "trp+nuclear": "D", "svd": "P"}
COLORS = {"channel": "tab:blue", "spatial": "tab:orange", "decouple": "tab:green"}


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    ax.axhline(doc["baseline_acc"], color="gray", linestyle="--", linewidth=1, label=f"baseline {doc['baseline_acc']:.2f}%")
    for e in doc["methods"]:
        if e["method"] == "baseline":
            continue
        ax.scatter(e["macs_speedup"], e["acc_after"], marker=MARKERS.get(e["method"], "o"), s=60,
                   color=COLORS.get(e["scheme"], "tab:red"), label=f"{e['method']} ({e['scheme']})", zorder=3)
    s = doc["settings"]
    ax.set_xlabel("MACs speed-up (×)")
    ax.set_ylabel("test accuracy after decomposition (%)")
    ax.set_title(f"{s['model']} on {s['dataset']}, {s['epochs']} epochs each")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        plt.close(fig)


def machine_info(args: argparse.Namespace) -> dict:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu, "cores": os.cpu_count(),
            "cores_usable": usable, "torch": torch.__version__, "threads": args.threads,
            "training_threads_per_run": 1, "parallel_training_runs": args.jobs}


# ---------------------------------------------------------------------------------------------


def run(args: argparse.Namespace, command: str, log: Callable[[str], None]) -> dict:
    """The whole benchmark; returns the results document (also written to disk)."""
    import torch

    from trp.checkpoint import load_model
    from trp.compress import compress
    from trp.data import load as load_data
    from trp.decompose import fold_bn_
    from trp.measure import profile

    wall0 = time.perf_counter()
    configs = train_configs(args)
    data = load_data(args.dataset, args.data_dir)  # fail early, and clearly, on a bad data folder
    n_test, steps_per_epoch = data.num_test, data.num_train_batches(args.batch_size)
    del data
    log(f"{len(configs)} training runs of {args.epochs} epochs ({args.model} on {args.dataset}), {args.jobs} at a time, "
        f"in {args.runs_dir}")
    train_info = train_all(args, configs, log)

    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        # (2) Compress the low-rank runs; (3) decompose the baseline post hoc at their MACs.
        reports: dict[tuple[str, str], dict] = {}
        comp_dir = args.runs_dir / "compressed"
        for method in TRAINED:
            if method not in args.method_list:
                continue
            for scheme in args.scheme_list:
                key = f"{method}-{scheme}"
                rank = args.svd_rank_criterion if method == "svd" else args.rank_criterion
                log(f"compressing {key} with {rank}")
                r = compress(train_info[key]["run"], comp_dir / _folder(key), rank, latency_batch=128, check_latency=True,
                             overwrite=True, log=log, min_run_time=args.min_run_time)
                reports[(method, scheme)] = {**r, "folder": str(comp_dir / _folder(key))}
        macs_source: dict[str, str] = {}
        if set(POSTHOC) & set(args.method_list):
            for scheme in args.scheme_list:
                src = next(m for m in MACS_SOURCES if (m, scheme) in reports)
                macs_source[scheme] = src
                target = max(1.0, float(reports[(src, scheme)]["flops_speedup"]))
                for method, ft in (("posthoc", 0), ("posthoc+ft", args.finetune)):
                    if method not in args.method_list:
                        continue
                    key = f"{method}-{scheme}"
                    log(f"post-hoc SVD of the baseline ({scheme}) at the MACs of {src} ({target:.3f}x), "
                        f"{ft} fine-tuning epoch(s)")
                    r = compress(train_info["baseline"]["run"], comp_dir / _folder(key), f"speedup:{target!r}",
                                 scheme=scheme, finetune_epochs=ft, finetune_lr=args.finetune_lr, latency_batch=128,
                                 check_latency=False, overwrite=True, log=log, min_run_time=args.min_run_time)
                    reports[(method, scheme)] = {**r, "folder": str(comp_dir / _folder(key)), "macs_target": target}

        # (4) Training time per epoch, one run at a time in this process, after all training.
        log(f"timing phase: {args.timing_rounds} round(s) of 2 epochs of each run, one at a time, "
            f"{args.timing_threads} thread(s)")
        torch.set_num_threads(args.timing_threads)
        timing = time_epochs(args, configs, log)
        torch.set_num_threads(args.threads)

        # (5) Latency at batch 1 and 128, BatchNorm folded everywhere; every model once per round,
        # alternating the order, each keeping its fastest round (a slow spell then hits all alike).
        log(f"latency phase: batch 1 and 128, {args.latency_rounds} round(s), {args.min_run_time:g} s per "
            f"measurement, {args.threads} thread(s)")
        dense, spec, _ = load_model(train_info["baseline"]["run"], "cpu")
        fold_bn_(dense.eval())
        dense_prof = profile(dense, spec.input_shape)
        models = {("baseline", "dense"): (dense, spec.input_shape)}
        for key, r in reports.items():
            model, mspec, _ = load_model(r["folder"], "cpu")
            models[key] = (model, mspec.input_shape)
        best: dict[tuple[str, str], dict] = {}
        order = list(models)
        for rnd in range(args.latency_rounds):
            for key in order if rnd % 2 == 0 else order[::-1]:
                model, shape = models[key]
                la = measure_latency(model, shape, args.min_run_time)
                b = best.setdefault(key, dict(la))
                for batch in (1, 128):
                    if la[f"latency_ms_b{batch}"] < b[f"latency_ms_b{batch}"]:
                        b[f"latency_ms_b{batch}"], b[f"memory_format_b{batch}"] = (la[f"latency_ms_b{batch}"],
                                                                                     la[f"memory_format_b{batch}"])
        del models
        dense_lat = best.pop(("baseline", "dense"))
        lat = best
        log(f"latency baseline: b1 {dense_lat['latency_ms_b1']:.3f} ms, b128 {dense_lat['latency_ms_b128']:.2f} ms")
        for (method, scheme), la in lat.items():
            log(f"latency {method}-{scheme}: b1 {la['latency_ms_b1']:.3f} ms, b128 {la['latency_ms_b128']:.2f} ms")
    finally:
        torch.set_num_threads(threads_before)

    # (6) Assemble, check the targets, write.
    base = train_info["baseline"]
    baseline_acc = base["acc"]
    t_base = timing["baseline"]["epoch_time_s"]
    entries = [{
        "method": "baseline", "scheme": "dense", "run": base["run"], "compressed": None, "rank": None,
        "acc_before": baseline_acc, "acc_after": baseline_acc, "delta_vs_baseline": 0.0,
        "macs": dense_prof.macs, "macs_before": dense_prof.macs, "macs_speedup": 1.0,
        "params": dense_prof.params, "params_before": dense_prof.params, **dense_lat,
        "latency_speedup_b1": 1.0, "latency_speedup_b128": 1.0,
        "layers_decomposed": 0, "layers_dense": [], "finetune_epochs": 0,
        "epoch_time_s": t_base, "epoch_time_ratio": 1.0, "train_time_ratio": 1.0,
        "train_epoch_time_s_parallel": base["epoch_time_s_parallel"], "train_wall_s_parallel": base["wall_s_parallel"],
        "final_mean_rank": None, "train_acc": base["train_acc"],
        "notes": ["the dense network, BatchNorm folded into the convs for the latency measurement (params counted so too)"],
    }]
    order = [m for m in ("posthoc", "posthoc+ft", "nuclear", "trp", "trp+nuclear", "svd") if m in args.method_list]
    for scheme in args.scheme_list:
        for method in order:
            r = reports[(method, scheme)]
            ti = train_info["baseline" if method in POSTHOC else f"{method}-{scheme}"]
            notes = []
            if method in POSTHOC:
                epoch_time_s, ratio = t_base, 1.0
                train_ratio = 1.0 + (args.finetune / args.epochs if method == "posthoc+ft" else 0.0)
                notes.append(f"truncated SVD of the baseline at speedup:{r['macs_target']:.3f}, the MACs of "
                             f"{macs_source[scheme]} ({scheme}); per-layer latency check off so that the MACs match")
                if method == "posthoc+ft":
                    notes.append(f"{args.finetune} fine-tuning epoch(s) at lr {args.finetune_lr:g} (cosine); train_time_ratio "
                                 "counts them as baseline epochs")
            else:
                epoch_time_s = timing[f"{method}-{scheme}"]["epoch_time_s"]
                ratio = epoch_time_s / t_base
                # The whole run: every epoch plus the one-off end of training, against the baseline's.
                train_ratio = ((args.epochs * epoch_time_s + timing[f"{method}-{scheme}"]["finish_time_s"])
                               / (args.epochs * t_base + timing["baseline"]["finish_time_s"]))
                if r["layers_dense"]:
                    notes.append(f"{len(r['layers_dense'])} planned layer(s) kept dense: "
                                 + "; ".join(f"{n} ({why})" for n, why in r["layers_dense"][:3])
                                 + (" …" if len(r["layers_dense"]) > 3 else ""))
            la = lat[(method, scheme)]
            entries.append({
                "method": method, "scheme": scheme, "run": ti["run"], "compressed": r["folder"], "rank": r["rank"],
                "acc_before": r["acc_before"], "acc_after": r["acc_after"],
                "delta_vs_baseline": round(r["acc_after"] - baseline_acc, 4),
                "macs": r["macs_after"], "macs_before": r["macs_before"], "macs_speedup": r["flops_speedup"],
                "params": r["params_after"], "params_before": r["params_before"], **la,
                "latency_speedup_b1": round(dense_lat["latency_ms_b1"] / la["latency_ms_b1"], 4),
                "latency_speedup_b128": round(dense_lat["latency_ms_b128"] / la["latency_ms_b128"], 4),
                "compress_latency_speedup_b128": r["latency_speedup"],
                "layers_decomposed": r["layers_decomposed"], "layers_dense": r["layers_dense"],
                "finetune_epochs": r["finetune_epochs"],
                "epoch_time_s": epoch_time_s, "epoch_time_ratio": round(ratio, 4), "train_time_ratio": round(train_ratio, 4),
                "train_epoch_time_s_parallel": ti["epoch_time_s_parallel"], "train_wall_s_parallel": ti["wall_s_parallel"],
                "final_mean_rank": None if method in POSTHOC else ti["final_mean_rank"],
                "train_acc": None if method in POSTHOC else ti["train_acc"], "notes": notes,
            })
    settings = {k: getattr(args, k) for k in (
        "model", "dataset", "data_dir", "epochs", "finetune", "finetune_lr", "lr", "batch_size", "seed", "device",
        "energy", "speedup", "energy_ramp", "freeze", "period", "nuclear", "nuclear_only", "orth", "sparsity", "jobs", "threads",
        "min_run_time", "latency_rounds", "timing_rounds", "timing_threads", "quick", "resume_existing")}
    settings.update(schemes=args.scheme_list, methods=args.method_list, rank=args.rank_criterion,
                    svd_rank=args.svd_rank_criterion, runs_dir=str(args.runs_dir))
    notes = [
        f"Every method trained {args.epochs} epochs: lr {args.lr:g} (cosine), batch {args.batch_size}, seed {args.seed}, "
        "the same data order. trp / trp+nuclear: "
        + (f"ranks for {args.speedup:g}x fewer MACs, ramped up from 1x" if args.speedup else
           f"energy {args.energy:g}, ramped down from 1.0")
        + f" over {args.energy_ramp:g} epochs, projection every {args.period} steps"
        + (f", ranks fixed after epoch {args.freeze:g}" if args.freeze is not None else "") + "; "
        f"trp+nuclear nuclear weight {args.nuclear:g}, trp none; nuclear (no projection) weight {args.nuclear_only:g}; "
        f"svd: orth {args.orth:g}, sparsity {args.sparsity}.",
        f"Decomposition without fine-tuning: {args.rank_criterion} for trp, trp+nuclear and nuclear, {args.svd_rank_criterion} "
        "for svd; planned layers whose decomposed form measured slower at batch 128 stay dense (trp.compress).",
        "posthoc / posthoc+ft: the baseline decomposed at speedup:<the MACs speed-up of trp+nuclear, same scheme> with the "
        "per-layer latency check off, so that the MACs really match.",
        f"Latency: torch.utils.benchmark on the CPU, warm-up then the median of repeated blocks ({args.min_run_time:g} s per "
        f"measurement), {args.threads} thread(s), inference_mode, BatchNorm folded, the faster of contiguous and "
        f"channels-last; every model in each of {args.latency_rounds} round(s), order alternating, its fastest round kept; "
        "speed-ups against the dense baseline measured the same way.",
        f"epoch_time_ratio: after all training, {args.timing_rounds} round(s) in this process, each training every run "
        f"for 2 epochs (the first warm-up), one run at a time, in alternating order, {args.timing_threads} thread(s); "
        "the fastest warm epoch of each run over the baseline's. An epoch is its training steps; TRP's one-off end of "
        "training (final projection, BatchNorm recalibration) is timed apart and counted once in train_time_ratio. "
        f"'epoch time, parallel runs' is the mean epoch time of the benchmark's own runs, {args.jobs} of them sharing the "
        "machine with one thread each: indicative only.",
        f"The test set has {n_test} images: one image is {100.0 / max(n_test, 1):.2f} pt of accuracy.",
    ]
    doc = {
        "name": args.name, "command": command, "machine": machine_info(args), "settings": settings,
        "baseline_acc": baseline_acc, "test_images": n_test, "steps_per_epoch": steps_per_epoch,
        "methods": entries, "targets": check_targets(entries, baseline_acc, args, n_test, steps_per_epoch),
        "timing": timing, "training_runs": train_info, "notes": notes,
        "wall_time_s": round(time.perf_counter() - wall0, 1),
    }
    out = args.results_dir
    atomic_write_text(out / "results.json", json.dumps(doc, indent=1) + "\n")
    atomic_write_text(out / "results.md", markdown(doc))
    plot(doc, out / "accuracy_vs_speedup.png")
    log(f"wrote results.json, results.md and accuracy_vs_speedup.png to {out} ({doc['wall_time_s'] / 60:.1f} min)")
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the exit status (2 and a one-line message for bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "python benchmarks/run.py" + (" " + shlex.join(argv) if argv else "")
    try:
        doc = run(resolve(argv), command, _Log())
    except TRPError as err:
        print(f"run.py: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("run.py: interrupted (finished training runs are reused with --resume-existing)", file=sys.stderr)
        return 130
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
