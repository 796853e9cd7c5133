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

This file is the command line: options, their checks, and the order of the phases. The phases
themselves are in :mod:`benchmarks.running` (train, compress, time, latency), the results document
in :mod:`benchmarks.document`, the targets in :mod:`benchmarks.targets`, and ``results.md`` and
the plot in :mod:`benchmarks.reporting`. ``results.json``, ``results.md`` and
``accuracy_vs_speedup.png`` go under ``--out-root/--name``.

Bad input gives one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as `python benchmarks/run.py` from a checkout that is not installed
    sys.path.insert(0, str(HERE.parent))

from benchmarks import document, running  # noqa: E402
from benchmarks.common import (ALL_METHODS, CONV_SCHEMES, DEFAULT_DATA, MACS_SOURCES, POSTHOC, REPO,  # noqa: E402
                               REQUIRED_KEYS, SINGLE_MATRIX_SCHEMES, Log, shown_path)
from benchmarks.reporting import markdown, plot  # noqa: E402
from trp import rank as rank_mod  # noqa: E402
from trp import runtimes as rt  # noqa: E402
from trp.data import load as load_data  # noqa: E402
from trp.errors import TRPError  # noqa: E402
from trp.io import atomic_write_text  # noqa: E402
from trp.validate import argtype, number, whole  # noqa: E402

__all__ = ["REQUIRED_KEYS", "QUICK", "DEFAULTS", "build_parser", "resolve", "run", "main"]

# What --quick changes (a flag given explicitly still wins), and the defaults otherwise.
QUICK = {"dataset": "digits", "epochs": 2, "finetune": 1, "period": 5, "min_run_time": 0.02, "timing_rounds": 1,
         "latency_rounds": 1, "threads": 1, "runtimes": "eager,channels_last,torchscript"}
DEFAULTS = {"dataset": "cifar10", "epochs": 30, "finetune": 3, "period": 20, "min_run_time": 1.0, "timing_rounds": 3,
            "latency_rounds": 3, "threads": None, "runtimes": ",".join(rt.defaults())}

COUNT, POSITIVE_COUNT = argtype(whole, low=0), argtype(whole, low=1)
AMOUNT = argtype(number, low=0)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        raise TRPError(message)


def build_parser() -> argparse.ArgumentParser:
    """The options; ``None`` defaults are filled in by :func:`resolve` (``--quick`` or the full run)."""
    p = _Parser(prog="run.py", description="Benchmark TRP against the decomposition baselines (see benchmarks/README.md).")
    a = p.add_argument
    batched = [s for s in CONV_SCHEMES if s not in SINGLE_MATRIX_SCHEMES]
    a("--data-dir", help=f"CIFAR-format folder (default for cifar10: {DEFAULT_DATA})")
    a("--dataset", help="cifar10 (default), cifar100 or digits (bundled; what --quick uses)")
    a("--model", default="resnet20")
    a("--epochs", type=POSITIVE_COUNT, help="training epochs of every method (default 30; --quick 2)")
    a("--finetune", type=COUNT, help="K: fine-tuning epochs of posthoc+ft (default 3; --quick 1)")
    a("--finetune-lr", type=AMOUNT, default=0.01, help="peak lr of that fine-tuning (cosine)")
    a("--lr", type=AMOUNT, default=0.05)
    a("--batch-size", type=POSITIVE_COUNT, default=128)
    a("--seed", type=COUNT, default=0)
    a("--device", default="cpu", help="training device (latency is always measured on the CPU)")
    a("--schemes", default=",".join(SINGLE_MATRIX_SCHEMES),
      help=f"comma-separated: {', '.join(SINGLE_MATRIX_SCHEMES)}" + (f" ({', '.join(batched)}: trained methods only)"
                                                                    if batched else ""))
    a("--methods", default=",".join(ALL_METHODS), help=f"comma-separated subset of {','.join(ALL_METHODS)}")
    a("--energy", type=AMOUNT, default=0.95,
      help="TRP energy kept by each projection when --speedup is 0; also sets the nuclear method's sub-gradient rank")
    a("--speedup", type=AMOUNT, default=2.55,
      help="trp, trp+nuclear: choose the ranks of all layers for this MACs speed-up instead of --energy (0: use --energy)")
    a("--energy-ramp", type=AMOUNT,
      help="epochs over which the projection tightens from dense to --energy or --speedup (default 4/15 of --epochs)")
    a("--freeze", type=argtype(number),
      help="trp, trp+nuclear: epochs after which the ranks stay fixed (default 7/15 of --epochs; -1: never)")
    a("--period", type=POSITIVE_COUNT, help="optimizer steps between TRP projections (default 20; --quick 5)")
    # The paper's 3e-4 goes with 164 epochs of 391 steps; the sub-gradient acts once per step, so
    # over a budget of a few hundred steps the same weight adds up to a far smaller total pull.
    a("--nuclear", type=AMOUNT, default=1e-3,
      help="nuclear-norm weight of trp+nuclear (default 1e-3; the paper's 3e-4 is for 164 full CIFAR epochs)")
    a("--nuclear-only", type=AMOUNT, default=1e-3, help="nuclear-norm weight of the nuclear method (no projection)")
    a("--orth", type=AMOUNT, default=1.0, help="SVD training: orthogonality weight")
    a("--sparsity", default="hoyer:0.3", help="SVD training: KIND:WEIGHT")
    a("--rank", default="value:0.05", help="decomposition criterion of the trp, trp+nuclear and nuclear runs")
    a("--svd-rank", default="value:0.05", help="pruning criterion of the svd runs")
    a("--jobs", type=POSITIVE_COUNT, default=2, help="training runs in parallel, one thread each")
    a("--name", help="results folder name (default MODEL-DATASET-eEPOCHS)")
    a("--out-root", default=str(HERE / "results"), help="where the results folder goes (default benchmarks/results)")
    a("--runs-dir", help="where the run folders go (default: REPO/runs/bench/NAME, not committed)")
    a("--resume-existing", action="store_true",
      help="reuse finished training runs with the same config, continue unfinished ones")
    a("--min-run-time", type=argtype(number, low=0, low_open=True),
      help="seconds per latency measurement (default 1.0; --quick 0.02)")
    a("--threads", type=POSITIVE_COUNT, help="torch threads of the timing and latency phases (default: this process's; --quick 1)")
    a("--latency-rounds", type=POSITIVE_COUNT, help="rounds of the latency phase, each timing every model (default 3; --quick 1)")
    a("--timing-rounds", type=POSITIVE_COUNT,
      help="rounds of the timing phase; each trains every run 2 epochs, the first warm-up (default 3; --quick 1)")
    a("--timing-threads", type=POSITIVE_COUNT, default=1,
      help="torch threads of the timing phase (default 1, as the training runs; steadier than 2 on a small machine)")
    a("--runtimes", help=f"comma-separated runtimes of the latency phase (default: {','.join(rt.names())}; --quick "
      f"{QUICK['runtimes']}; unavailable ones are recorded as skipped with the reason)")
    a("--compile-timeout", type=argtype(number, low=0, low_open=True), default=rt.COMPILE_TIMEOUT,
      help="seconds torch.compile may take to compile a model before the runtime is skipped")
    a("--latency-speedup", type=AMOUNT, default=0.0,
      help="trp, trp+nuclear: train for this speed-up in measured time (trp.latency) instead of --speedup (0: off)")
    a("--latency-runtime", default="eager", help="the runtime --latency-speedup is timed in (default eager)")
    a("--quick", action="store_true", help="tiny budget on digits: checks the harness in about a minute")
    return p


def _split(text: str, allowed: Sequence[str], what: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise TRPError(f"--{what} is empty")
    bad = [s for s in items if s not in allowed]
    if bad:
        raise TRPError(f"unknown {what[:-1]} {bad[0]!r} in --{what}; choose from {', '.join(allowed)}")
    return list(dict.fromkeys(items))


def _fill_defaults(args: argparse.Namespace) -> None:
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads is None:
        args.threads = torch.get_num_threads()
    if args.energy_ramp is None:
        args.energy_ramp = round(args.epochs * 4 / 15, 4)
    if args.freeze is None:
        args.freeze = round(args.epochs * 7 / 15, 4)
    elif args.freeze < 0:
        args.freeze = None  # never


def _check_methods(args: argparse.Namespace) -> None:
    if 0 < args.speedup < 1:
        raise TRPError(f"--speedup must be >= 1 (or 0 for --energy), got {args.speedup}")
    args.method_list = _split(args.methods, ALL_METHODS, "methods")
    args.runtime_list = _split(args.runtimes, rt.names(), "runtimes")
    args.latency_runtime = rt.get(args.latency_runtime).name
    if 0 < args.latency_speedup < 1:
        raise TRPError(f"--latency-speedup must be >= 1 (or 0 for none), got {args.latency_speedup}")
    args.scheme_list = _split(args.schemes, CONV_SCHEMES, "schemes")
    batched = [s for s in args.scheme_list if s not in SINGLE_MATRIX_SCHEMES]
    if batched and {"svd", *POSTHOC} & set(args.method_list):
        raise TRPError(f"svd and post-hoc baselines support the {', '.join(SINGLE_MATRIX_SCHEMES)} schemes only; "
                       f"drop {', '.join(batched)}")
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


def _resolve_paths(args: argparse.Namespace) -> None:
    """Absolute folders to work in, and ``*_shown``: how the results record them (no machine paths)."""
    if args.data_dir is None and args.dataset == "cifar10":
        args.data_dir = str(DEFAULT_DATA)
        given_data = None
    else:
        given_data = args.data_dir
    if args.data_dir is not None:
        args.data_dir = str(Path(args.data_dir).expanduser().resolve())
    args.data_dir_shown = None if args.data_dir is None else shown_path(Path(args.data_dir), given_data)
    args.name = args.name or f"{args.model}-{args.dataset}-e{args.epochs}"
    if "/" in args.name or args.name in (".", ".."):
        raise TRPError(f"--name must be a plain folder name, got {args.name!r}")
    given_runs = args.runs_dir
    args.runs_dir = Path(given_runs).expanduser().resolve() if given_runs else REPO / "runs" / "bench" / args.name
    args.runs_dir_shown = shown_path(args.runs_dir, given_runs)
    args.results_dir = Path(args.out_root).expanduser().resolve() / args.name


def resolve(argv: Sequence[str]) -> argparse.Namespace:
    """Parse and validate the options; --quick fills in the tiny budget where a flag was not given."""
    args = build_parser().parse_args(list(argv))
    _fill_defaults(args)
    _check_methods(args)
    _resolve_paths(args)
    return args


def run(args: argparse.Namespace, command: str, log: Callable[[str], None]) -> dict:
    """The whole benchmark; returns the results document (also written to disk)."""
    wall0 = time.perf_counter()
    configs = running.train_configs(args)
    data = load_data(args.dataset, args.data_dir)  # fail early, and clearly, on a bad data folder
    n_test, steps_per_epoch = data.num_test, data.num_train_batches(args.batch_size)
    del data
    log(f"{len(configs)} training runs of {args.epochs} epochs ({args.model} on {args.dataset}), {args.jobs} at a time, "
        f"in {args.runs_dir}")
    train_info = running.train_all(args, configs, log)
    with running.torch_threads(args.threads):
        reports, macs_source = running.compress_all(args, train_info, log)
        # (4) Training time per epoch, one run at a time in this process, after all training.
        log(f"timing phase: {args.timing_rounds} round(s) of 2 epochs of each run, one at a time, "
            f"{args.timing_threads} thread(s)")
        with running.torch_threads(args.timing_threads):
            timing = running.time_epochs(args, configs, log)
        dense_prof, dense_lat, lat = running.latency_phase(args, train_info, reports, log)
    measured = document.Measurements(
        train_info=train_info, reports=reports, macs_source=macs_source, timing=timing, dense_macs=dense_prof.macs,
        dense_params=dense_prof.params, dense_latency=dense_lat, latency=lat, test_images=n_test,
        steps_per_epoch=steps_per_epoch)
    doc = document.build(args, command, measured, time.perf_counter() - wall0)
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
        doc = run(resolve(argv), command, Log())
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
