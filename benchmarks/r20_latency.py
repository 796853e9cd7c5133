#!/usr/bin/env python
"""ResNet-20 trained by TRP for measured time, timed in every runtime (issue #14, targets 6 and 7).

For each seed and scheme, TRP + nuclear norm from scratch (the from-scratch recipe of
``benchmarks/finetune.py``: 30 epochs, lr 0.05, ramp 8, freeze 14, λ 1e-3, distilled from that
seed's dense baseline) with ``--latency-speedup S --latency-runtime onnxruntime --latency-batch 128``
instead of a MACs budget: every projection picks the ranks for S× less time in the latency table of
this machine (layers timed in ONNX Runtime at batch 128). Then the run is decomposed with no
fine-tuning (``trp.compress.compress``, value threshold: TRP ends on a projection, so this keeps its
ranks) and, with ``--bench``, the compressed model and the dense baseline (both BatchNorm folded) are
timed in every runtime in interleaved rounds (:func:`trp.bench.interleaved`) at batch 1 and 128.

The baselines are ``benchmarks/finetune.py``'s (``--runs``, same seeds and validation split); run
that first. Training and timing are separate steps so that timing can wait for an idle machine::

    python benchmarks/r20_latency.py --seeds 0,1,2                 # train and decompose (one thread per run)
    python benchmarks/r20_latency.py --seeds 0,1,2 --bench --threads 2 --out benchmarks/results/r20-latency

Writes ``results.json`` and ``results.md`` into ``--out``: per seed and scheme the test accuracy after
decomposition, the MACs speed-up, every runtime's times, each model's best runtime and
``best_speedup_b1`` / ``_b128`` (the dense model in its fastest runtime over this one in its
fastest); per scheme the mean and spread over seeds, and targets 6 and 7 checked on the means.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(HERE.parent))

from benchmarks import finetune  # noqa: E402
from benchmarks.finetune_report import spread  # noqa: E402
from benchmarks.targets import T_BEST_ACC, T_BEST_B1, T_BEST_B128, T_BEST_RATIO, best_runtime_shortfalls  # noqa: E402

__all__ = ["arm_name", "settings", "seed_entry", "summarize", "targets", "markdown", "main"]

RUNTIMES = "eager,channels_last,torchscript,onnxruntime"


def arm_name(scheme: str, s: float) -> str:
    """The run folder of one scheme's TRP run.

    Example:
        >>> arm_name("spatial", 2.0)
        'trp-latency2-spatial'
    """
    return f"trp-latency{s:g}-{scheme}"


def settings(args: argparse.Namespace, scheme: str) -> dict[str, Any]:
    """The from-scratch recipe with the scheme's measured-time budget in place of the MACs one."""
    return {**finetune.SCRATCH, "scheme": scheme, "latency_speedup": args.speedups[scheme],
            "latency_runtime": args.latency_runtime, "latency_batch": args.latency_batch}


def seed_entry(record: dict, report: dict, baseline_acc: float) -> dict:
    """One compressed model's figures from its compress report and its bench record against the baseline."""
    out = {"test_acc": report["acc_after"], "test_acc_trained": report["acc_before"],
           "delta_vs_baseline": round(report["acc_after"] - baseline_acc, 4),
           "macs_speedup": round(report["macs_before"] / report["macs_after"], 4),
           "layers_decomposed": report["layers_decomposed"], "threads": record["threads"],
           "runtimes": {"dense": record["against_timings"]["ms"], "compressed": record["timings"]["ms"]}}
    for b in (1, 128):
        for k in ("best_runtime", "best_ms", "dense_best_runtime", "dense_best_ms", "best_speedup"):
            out[f"{k}_b{b}"] = record[f"{k}_b{b}"]
    out["best_ratio_b128"] = round(out["best_speedup_b128"] / out["macs_speedup"], 4)
    return out


def summarize(per_seed: dict[str, dict[str, dict]]) -> dict[str, dict]:
    """Per scheme, mean and spread over seeds of every figure the targets read."""
    schemes = sorted({sch for arms in per_seed.values() for sch in arms})
    keys = ("test_acc", "delta_vs_baseline", "macs_speedup", "best_speedup_b1", "best_speedup_b128", "best_ratio_b128")
    return {sch: {k: spread([arms[sch][k] for arms in per_seed.values() if sch in arms]) for k in keys}
            for sch in schemes}


def targets(summary: dict[str, dict]) -> list[dict]:
    """Targets 6 and 7 of issue #14 per scheme, on the means over seeds (met, or missed by how much).

    Example:
        >>> m = lambda v: {"mean": v}
        >>> s = {"spatial": {"delta_vs_baseline": m(-0.5), "best_speedup_b128": m(1.9), "best_speedup_b1": m(1.4),
        ...                  "best_ratio_b128": m(0.85), "macs_speedup": m(2.2)}}
        >>> [(t["id"], t["met"], t["missed_by"]) for t in targets(s)]
        [(6, False, '0.10x at batch 1'), (7, True, None)]
    """
    out = []
    for sch, f in summary.items():
        loss, b128, b1 = -f["delta_vs_baseline"]["mean"], f["best_speedup_b128"]["mean"], f["best_speedup_b1"]["mean"]
        short = best_runtime_shortfalls(b128, b1, loss)
        out.append({"id": 6, "scheme": sch, "met": not short, "missed_by": " and ".join(short) or None,
                    "target": f"within {T_BEST_ACC} pt of the baseline, >= {T_BEST_B128}x at batch 128 and >= "
                              f"{T_BEST_B1}x at batch 1, each model in its best runtime",
                    "measured": f"{b128:.2f}x (b128), {b1:.2f}x (b1), {-loss:+.2f} pt"})
        ratio = f["best_ratio_b128"]["mean"]
        out.append({"id": 7, "scheme": sch, "met": ratio >= T_BEST_RATIO,
                    "missed_by": None if ratio >= T_BEST_RATIO else f"{T_BEST_RATIO - ratio:.3f} of the ratio",
                    "target": f"best-runtime speed-up at batch 128 >= {T_BEST_RATIO} x the MACs speed-up",
                    "measured": f"{b128:.2f}x measured against {f['macs_speedup']['mean']:.2f}x MACs (ratio {ratio:.3f})"})
    return out


def markdown(doc: dict) -> str:
    """The results as a page: the per-scheme means, every seed, the targets."""
    lines = [f"# ResNet-20 trained for measured time: `{doc['name']}`", "", f"Command: `{doc['command']}` (after the "
             "same without --bench and its timing flags, which trains and decomposes)  ", f"Budgets: {doc['latency_speedup']} (S per scheme, timed in {doc['latency_runtime']} at "
             f"batch {doc['latency_batch']}, one thread).  ", f"Timing: {doc['threads']} thread(s), {doc['rounds']} interleaved rounds, "
             f"runtimes {doc['runtimes']}, batch 1 and 128, random-normal input; BatchNorm folded in both models.", "",
             f"Baseline test accuracy (mean of seeds {', '.join(doc['per_seed'])}): {doc['baseline_acc']['mean']:.2f} "
             f"± {doc['baseline_acc']['std']:.2f} %.", "",
             "| scheme | test acc (%) | Δ vs baseline (pt) | MACs speed-up | best b1 | best b128 | b128 / MACs |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for sch, f in doc["summary"].items():
        ms = lambda k, fm=".2f": f"{f[k]['mean']:{fm}} ± {f[k]['std']:{fm}}"  # noqa: E731
        lines.append(f"| {sch} | {ms('test_acc')} | {ms('delta_vs_baseline')} | {ms('macs_speedup')}x | "
                     f"{ms('best_speedup_b1')}x | {ms('best_speedup_b128')}x | {ms('best_ratio_b128', '.3f')} |")
    lines += ["", "| seed | scheme | test acc (%) | MACs | dense best b1 / b128 (ms) | TRP best b1 / b128 (ms) | "
              "speed-up b1 / b128 |", "|---|---|---:|---:|---|---|---:|"]
    for seed, arms in doc["per_seed"].items():
        for sch, e in arms.items():
            lines.append(f"| {seed} | {sch} | {e['test_acc']:.2f} | {e['macs_speedup']:.2f}x | "
                         f"{e['dense_best_ms_b1']:.3f} ({e['dense_best_runtime_b1']}) / {e['dense_best_ms_b128']:.2f} "
                         f"({e['dense_best_runtime_b128']}) | {e['best_ms_b1']:.3f} ({e['best_runtime_b1']}) / "
                         f"{e['best_ms_b128']:.2f} ({e['best_runtime_b128']}) | {e['best_speedup_b1']:.2f}x / "
                         f"{e['best_speedup_b128']:.2f}x |")
    lines += ["", "## Targets (issue #14)", ""]
    for t in doc["targets"]:
        lines.append(f"- **{'met' if t['met'] else 'missed'}** ({t['id']}, {t['scheme']}): {t['target']} — "
                     f"{t['measured']}" + ("" if t["met"] else f"; missed by {t['missed_by']}"))
    return "\n".join(lines) + "\n"


def _bench(args: argparse.Namespace, bench: finetune.Bench, command: str) -> dict:
    from trp.bench import bench as time_models

    per_seed: dict[str, dict[str, dict]] = {}
    base_acc = []
    for seed in args.seeds:
        baseline = bench.run_dir(seed, "baseline")
        acc = json.loads((baseline / "config.json").read_text())["final_test"]["test_acc"]
        base_acc.append(acc)
        for sch in args.schemes:
            folder = bench.run_dir(seed, "compressed-" + arm_name(sch, args.speedups[sch]))
            report = json.loads((folder / "report.json").read_text())
            record = time_models(folder, batch_sizes=(1, 128), runtimes=args.runtimes.split(","), threads=args.threads,
                                 min_run_time=args.min_run_time, against=baseline, rounds=args.rounds,
                                 log=lambda line: bench.log(line.strip()) if line.lstrip().startswith("round") else None)
            per_seed.setdefault(str(seed), {})[sch] = seed_entry(record, report, acc)
            bench.log(f"seed {seed} {sch}: {per_seed[str(seed)][sch]['best_speedup_b1']}x b1, "
                      f"{per_seed[str(seed)][sch]['best_speedup_b128']}x b128")
    summary = summarize(per_seed)
    return {"kind": "r20-latency", "name": Path(args.out).name, "command": command,
            "latency_speedup": args.speedups, "latency_runtime": args.latency_runtime,
            "latency_batch": args.latency_batch, "recipes": {sch: settings(args, sch) for sch in args.schemes},
            "threads": args.threads,
            "rounds": args.rounds, "runtimes": args.runtimes, "min_run_time": args.min_run_time,
            "baseline_acc": spread(base_acc), "per_seed": per_seed, "summary": summary,
            "targets": targets(summary)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--seeds", default="0,1,2")
    a("--schemes", default="spatial,channel")
    a("--latency-speedup", default="2.0,1.4", help="S per scheme, in the order of --schemes (default 2.0,1.4: "
      "the channel scheme's layers in ONNX Runtime at batch 128 reach at most ~1.46x here)")
    a("--latency-runtime", default="onnxruntime")
    a("--latency-batch", type=int, default=128)
    a("--rank", default="value:1e-3", help="compress's threshold (TRP ends on a projection: it keeps the trained ranks)")
    a("--jobs", type=int, default=1)
    a("--data-dir", default=finetune.DEFAULT_DATA)
    a("--val-split", type=float, default=0.1)
    a("--distill-weight", type=float, default=0.5)
    a("--distill-temperature", type=float, default=4.0)
    a("--runs", default="runs/finetune", help="benchmarks/finetune.py's runs (the baselines are read from there)")
    a("--bench", action="store_true", help="time the compressed models against their baselines and write --out")
    a("--threads", type=int, default=2, help="threads of the timing (default 2)")
    a("--rounds", type=int, default=3)
    a("--runtimes", default=RUNTIMES)
    a("--min-run-time", type=float, default=1.0)
    a("--out", default="benchmarks/results/r20-latency")
    args = p.parse_args(argv)
    args.seeds = [int(x) for x in args.seeds.split(",")]
    args.schemes = [x.strip() for x in args.schemes.split(",") if x.strip()]
    args.deadline = None
    speedups = [float(x) for x in args.latency_speedup.split(",")]
    if len(speedups) != len(args.schemes):
        print("r20_latency.py: error: give one --latency-speedup per scheme", file=sys.stderr)
        return 2
    args.speedups = dict(zip(args.schemes, speedups))
    bench = finetune.Bench(argparse.Namespace(**{**vars(args), "threads": 1}))
    command = shlex.join(["python", "benchmarks/r20_latency.py", *(sys.argv[1:] if argv is None else argv)])
    if not args.bench:
        for seed in args.seeds:
            baseline = bench.run_dir(seed, "baseline")
            if finetune.Bench.done(baseline) is None:
                print(f"r20_latency.py: error: no finished baseline in {baseline}: run benchmarks/finetune.py first",
                      file=sys.stderr)
                return 2
            for sch in args.schemes:
                name = arm_name(sch, args.speedups[sch])
                bench.train(seed, name, settings(args, sch), finetune.distill_flags(args, baseline))
                finetune.compress_run(bench, bench.run_dir(seed, name), bench.run_dir(seed, "compressed-" + name),
                                      args.rank)
        return 0
    t0 = time.perf_counter()
    doc = _bench(args, bench, command)
    doc["wall_s"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "results.md").write_text(markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
