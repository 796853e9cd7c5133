#!/usr/bin/env python
"""Transformers trained with TRP on real data, offline: a small ViT on CIFAR-10 and a character GPT
on the Python standard library's own source, against post-hoc SVD ± fine-tuning at the same MACs.

    python benchmarks/run_transformers.py --tasks vit --seeds 0,1,2 --phase train     # one process per task
    python benchmarks/run_transformers.py --tasks gpt --seeds 0,1,2 --phase train
    python benchmarks/run_transformers.py --tasks vit,gpt --phase latency             # alone on the machine
    python benchmarks/run_transformers.py --tasks vit,gpt --phase report              # results.md
    python benchmarks/run_transformers.py --quick --out /tmp/tq --runs-dir /tmp/tq/runs   # tiny, < 30 s

Phases: ``train`` runs every method for every seed (:func:`benchmarks.transformer_methods.run_seed`)
and writes ``<out>/<task>.json`` after each seed; the first seed's models are saved with
``trp.save`` under ``<runs-dir>/<task>/``. ``latency`` loads them back (``trp.load(folder,
model=fresh)``) and times the dense, TRP and post-hoc structures with
``trp.runtimes.measure_all`` into ``<out>/<task>.latency.json``. ``report`` writes ``<out>/results.md`` from the task files
(:mod:`benchmarks.transformer_report`). ``all`` does the three in order. Bad input: one line on
stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as `python benchmarks/run_transformers.py` from an uninstalled checkout
    sys.path.insert(0, str(HERE.parent))

import trp  # noqa: E402
from benchmarks.common import DEFAULT_DATA, REPO, Log, shown_path  # noqa: E402
from benchmarks.transformer_methods import Recipe, run_seed  # noqa: E402
from benchmarks.transformer_report import REQUIRED_KEYS, markdown, summarize  # noqa: E402
from benchmarks.transformer_tasks import Task, TaskSize, gpt_task, vit_task  # noqa: E402
from trp import runtimes  # noqa: E402
from trp.errors import TRPError  # noqa: E402
from trp.io import atomic_write_text  # noqa: E402

__all__ = ["TASKS", "RECIPES", "QUICK_SIZE", "QUICK_RECIPES", "LATENCY_METHODS", "make_task", "train_phase",
           "latency_phase", "report_phase", "build_parser", "main"]

TASKS = ("vit", "gpt")
# Chosen before any run from the CPU budget (about 4 minutes of one core per training run), not tuned.
RECIPES = {
    "vit": Recipe(steps=15 * 28, lr=1e-3, warmup=28, ft_steps=2 * 28, ft_lr=1e-4),  # 15 epochs of 28 steps
    "gpt": Recipe(steps=600, lr=2e-3, warmup=30, ft_steps=60, ft_lr=2e-4),
}
QUICK_SIZE = TaskSize(vit_layers=1, vit_dim=16, vit_mlp=32, vit_heads=2, vit_patch=4, vit_batch=64, vit_val=100,
                      gpt_layers=1, gpt_dim=16, gpt_heads=2, gpt_ctx=16, gpt_batch=8, gpt_val_windows=16,
                      gpt_val_fraction=0.25)
QUICK_RECIPES = {name: Recipe(steps=20, lr=3e-3, warmup=2, ft_steps=4, ft_lr=1e-3, period=5, speedup=1.5)
                 for name in TASKS}
LATENCY_METHODS = ("dense", "trp", "posthoc")  # posthoc+ft has posthoc's structure, so its latency


def make_task(name: str, args: argparse.Namespace, seed: int) -> Task:
    """The task ``name`` at the run's sizes (``--quick``: digits and 40 stdlib files)."""
    size = QUICK_SIZE if args.quick else TaskSize()
    if name == "vit":
        if args.quick:
            return vit_task("", size, seed, dataset="digits")
        return vit_task(str(args.data_dir), size, seed)
    return gpt_task(size, seed=0, max_files=40 if args.quick else None)  # one file split for every seed


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _machine() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}


def train_phase(name: str, args: argparse.Namespace, log: Log) -> dict:
    """Every method for every seed of one task; ``<out>/<name>.json`` rewritten after each seed."""
    path = args.out / f"{name}.json"
    if path.exists() and not args.overwrite:
        raise TRPError(f"{shown_path(path, None)} exists; pass --overwrite to replace it")
    recipe = (QUICK_RECIPES if args.quick else RECIPES)[name]
    torch.set_num_threads(args.train_threads)
    doc: dict = {"task": name, "command": args.command, "machine": _machine(), "recipe": None, "seeds": {},
                 "train_threads": args.train_threads}
    start = time.perf_counter()
    for seed in args.seeds:
        task = make_task(name, args, seed)
        doc["data"] = task.info
        save_dir = args.runs_dir / name if seed == args.seeds[0] else None
        log(f"{name} seed {seed}: training")
        result = run_seed(task, recipe, seed, save_dir, log)
        doc["recipe"] = result.pop("recipe")
        doc["seeds"][str(seed)] = result
        doc["summary"] = summarize(doc, task.splits, task.score)
        doc["wall_time_s"] = round(time.perf_counter() - start, 1)
        doc["saved_seed"] = args.seeds[0]
        doc["runs_dir"] = shown_path(args.runs_dir, args.runs_dir_given)
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(doc, indent=1))
    return doc


def latency_phase(name: str, args: argparse.Namespace, log: Log) -> dict:
    """Load the saved dense, TRP and post-hoc models of one task, time them in every runtime, and
    write ``<out>/<name>.latency.json`` (apart from the training document, so a task's latency can be
    measured while another task still trains)."""
    path = args.out / f"{name}.json"
    doc = _read(path)
    if not doc:
        raise TRPError(f"no {shown_path(path, None)}: run --phase train first")
    task = make_task(name, args, int(doc["saved_seed"]))
    batches = (1, 8) if args.quick else task.latency_batches
    out: dict = {"threads": args.threads, "batch_sizes": list(batches), "min_run_time_s": args.min_run_time,
                 "runtimes_asked": list(args.runtimes), "models": {}}
    for method in LATENCY_METHODS:
        model = trp.load(args.runs_dir / name / method, model=task.fresh())
        log(f"{name} latency: {method}")
        timings = runtimes.measure_all(task.timing_wrap(model), task.input_shape, batches, args.runtimes,
                                       args.threads, args.min_run_time, log=lambda m: log(f"  {m}"))
        entry = timings.to_dict()
        entry["best"] = {str(b): list(runtimes.best(timings, b)) for b in batches}
        out["models"][method] = entry
    dense_best = out["models"]["dense"]["best"]
    for method, entry in out["models"].items():
        entry["speedup_vs_dense_best"] = {b: dense_best[b][1] / ms for b, (_, ms) in entry["best"].items()}
        entry["speedup_same_runtime"] = {
            rt: {b: out["models"]["dense"]["ms"][rt][b] / ms for b, ms in by_b.items()
                 if b in out["models"]["dense"]["ms"].get(rt, {})} for rt, by_b in entry["ms"].items()}
    out["command"] = args.command
    out["load_average"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    atomic_write_text(args.out / f"{name}.latency.json", json.dumps(out, indent=1))
    return out


def report_phase(args: argparse.Namespace) -> str:
    """``results.md`` (and ``results.json``, the task documents side by side) from the task files."""
    docs = {name: _read(args.out / f"{name}.json") for name in TASKS}
    docs = {name: d for name, d in docs.items() if d}
    for name, doc in docs.items():
        latency = _read(args.out / f"{name}.latency.json")
        if latency:
            doc["latency"], doc["latency_command"] = latency, latency["command"]
    if not docs:
        raise TRPError(f"no task results under {shown_path(args.out, args.out_given)}")
    text = markdown(docs)
    atomic_write_text(args.out / "results.md", text)
    atomic_write_text(args.out / "results.json", json.dumps({"required_keys": list(REQUIRED_KEYS), "tasks": docs},
                                                            indent=1))
    return text


def _list(text: str, allowed: Sequence[str] | None, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if allowed is not None and t not in allowed]
    if not items or bad:
        raise argparse.ArgumentTypeError(f"{what}: {', '.join(bad) or 'empty'}; choose from {', '.join(allowed or [])}")
    return items


def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tasks", type=lambda t: _list(t, TASKS, "unknown task"), default=list(TASKS))
    p.add_argument("--seeds", type=lambda t: [int(s) for s in _list(t, None, "seeds")], default=[0, 1, 2])
    p.add_argument("--phase", choices=("train", "latency", "report", "all"), default="all")
    p.add_argument("--data-dir", default=None, help="CIFAR-10 folder (default ../shared/data/cifar10-mini/...)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/transformers)")
    p.add_argument("--runs-dir", default=None, help="saved models (default runs/transformers)")
    p.add_argument("--runtimes", type=lambda t: _list(t, runtimes.names(), "unknown runtime"),
                   default=["eager", "channels_last", "torchscript", "onnxruntime", "compile"])
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of the latency measurements")
    p.add_argument("--train-threads", type=int, default=1)
    p.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timed blocks per measurement")
    p.add_argument("--quick", action="store_true", help="tiny models, digits and 40 stdlib files (tests)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing <task>.json in --phase train")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.command = "python benchmarks/run_transformers.py " + shlex.join(argv)
    args.out_given, args.runs_dir_given = args.out, args.runs_dir
    args.out = Path(args.out or HERE / "results" / "transformers").resolve()
    args.runs_dir = Path(args.runs_dir or REPO / "runs" / "transformers").resolve()
    args.data_dir = Path(args.data_dir).resolve() if args.data_dir else DEFAULT_DATA
    if args.quick:
        args.min_run_time = min(args.min_run_time, 0.02)
    log = Log()
    try:
        if args.threads < 1 or args.train_threads < 1 or args.min_run_time <= 0:
            raise TRPError("--threads and --train-threads must be >= 1 and --min-run-time > 0")
        for name in args.tasks:
            if args.phase in ("train", "all"):
                train_phase(name, args, log)
            if args.phase in ("latency", "all"):
                latency_phase(name, args, log)
        if args.phase in ("report", "all"):
            print(report_phase(args))
    except TRPError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
