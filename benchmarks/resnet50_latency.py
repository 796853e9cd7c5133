#!/usr/bin/env python
"""The ResNet-50 target of #14: torchvision resnet50 at 224x224, ``trp.latency(2.0)``, random weights.

    python benchmarks/resnet50_latency.py                         # writes benchmarks/results/resnet50-latency/
    python benchmarks/resnet50_latency.py --runtimes eager,onnxruntime --min-run-time 0.05

Steps: build the model (random weights, nothing downloaded), fold BatchNorm, time the dense model
in every runtime (``--runtimes``) at batch 1 (and ``--batches``); time every eligible layer (every
conv but the first, as TRP trains them) dense and decomposed at its ladder of ranks in the dense
model's fastest runtime at ``--latency-batch`` (torch.compile aside), through the latency cache;
plan with ``trp.latency(S)`` on that table; decompose; then time the dense and the compressed model
in every runtime in ``--rounds`` interleaved rounds (the order alternating), each keeping per
runtime and batch its fastest round, so that a change of the machine's load between the first
and the last measurement does not pass for a speed-up.
The results state the speed-up of the compressed model in its fastest runtime over the dense model
in its fastest, and the latency model's predicted whole-model time beside the measured one, with
the thread count and the versions; the targets are checked by
:func:`benchmarks.targets.resnet50_latency`. Bad input gives one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as `python benchmarks/resnet50_latency.py` from a checkout
    sys.path.insert(0, str(HERE.parent))

from benchmarks.common import Log  # noqa: E402
from benchmarks.reporting import machine_info  # noqa: E402
from benchmarks.targets import resnet50_latency  # noqa: E402
from trp import runtimes as rt  # noqa: E402
from trp.bench import interleaved, load_source, speedups  # noqa: E402
from trp.compress import LAYER_EXCLUDED  # noqa: E402
from trp.decompose import decompose_  # noqa: E402
from trp.errors import TRPError  # noqa: E402
from trp.io import atomic_write_text  # noqa: E402
from trp.latency_budget import latency  # noqa: E402
from trp.latency_model import measure_layers, model_time, trace_layers  # noqa: E402
from trp.measure import profile  # noqa: E402
from trp.plan import plan  # noqa: E402
from trp.surgery import default_filter  # noqa: E402
from trp.validate import argtype, number, whole  # noqa: E402

__all__ = ["build_parser", "run", "main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        raise TRPError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="resnet50_latency.py", description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--model", default="torchvision:resnet50")
    a("--input", default="3,224,224", help="one sample's shape (default 3,224,224)")
    a("--speedup", type=argtype(number, low=1), default=2.0, help="the trp.latency budget (default 2.0)")
    a("--scheme", default="spatial", help="decomposition scheme (default spatial)")
    a("--latency-batch", type=argtype(whole, low=1), default=1, help="batch the budget is measured at (default 1)")
    a("--batches", default="1", help="comma-separated batch sizes the two models are timed at (default 1)")
    a("--runtimes", default=",".join(rt.defaults()), help="comma-separated runtimes (default: all)")
    a("--layer-runtime", help="runtime the layers are timed in (default: the dense model's fastest, compile aside)")
    a("--multiple", type=argtype(whole, low=1), help="force a rank multiple (default: the measured one)")
    a("--min-run-time", type=argtype(number, low=0, low_open=True), default=0.3,
      help="seconds per whole-model measurement (default 0.3; a layer gets a sixth of it)")
    a("--compile-timeout", type=argtype(number, low=0, low_open=True), default=rt.COMPILE_TIMEOUT)
    a("--rounds", type=argtype(whole, low=1), default=3, help="interleaved timing rounds of the two models (default 3)")
    a("--layer-rounds", type=argtype(whole, low=1), default=2,
      help="rounds of the latency table: each layer's forms timed in turn, each keeping its fastest (default 2)")
    a("--threads", type=argtype(whole, low=1), help="torch threads (default: this process's)")
    a("--cache-dir", help="latency cache folder (default: trp's, ~/.cache/trp/latency)")
    a("--out", default=str(HERE / "results" / "resnet50-latency" / "results.json"))
    return p


def _batches(text: str) -> list[int]:
    try:
        return sorted({whole(int(b), "batch size", low=1) for b in text.split(",") if b.strip()})
    except ValueError:
        raise TRPError(f"--batches must be comma-separated whole numbers, got {text!r}") from None


def run(args: argparse.Namespace, command: str, log: Callable[[str], None]) -> dict:
    """The whole measurement; returns the results document (also written to ``--out``)."""
    t0 = time.perf_counter()
    shape = [whole(int(d), "input size", low=1) for d in args.input.split(",")]
    batches = sorted({*_batches(args.batches), args.latency_batch})
    names = [rt.get(n.strip()).name for n in args.runtimes.split(",") if n.strip()]
    if args.threads:
        torch.set_num_threads(args.threads)
    model, shape, _ = load_source(args.model, shape)
    opts = dict(runtimes=names, min_run_time=args.min_run_time, compile_timeout=args.compile_timeout,
                log=lambda line: log("  " + line))
    log(f"timing the dense {args.model} (BatchNorm folded) at {shape}, batch {batches}")
    first = rt.measure_all(model, shape, batches, **opts)  # only to choose the layer runtime
    dense = copy.deepcopy(model)
    usable = {n: v for n, v in first.items() if n not in LAYER_EXCLUDED}
    layer_rt = args.layer_runtime or rt.best(usable, args.latency_batch)[0]
    crit = latency(args.speedup, multiple=args.multiple, batch_size=args.latency_batch, runtime=layer_rt,
                   min_run_time=args.min_run_time / 6, cache_dir=args.cache_dir, rounds=args.layer_rounds)
    keep = default_filter(model)
    log(f"latency table: every eligible layer in {layer_rt} at batch {args.latency_batch} (cached in "
        f"{args.cache_dir or 'trp cache'})")
    table = measure_layers(trace_layers(model, args.scheme, keep, shape), crit.target, log)
    table.model_ms = model_time(model, shape, crit.target)
    before = profile(model, shape)
    p = plan(model, args.scheme, crit, filter_fn=keep, input_shape=shape)
    ranks = {lp.name: lp.rank if lp.decomposed else None for lp in p.layers if lp.name in table.layers}
    predicted = table.predict(ranks)
    decompose_(model, p)
    after = profile(model, shape)
    timed = interleaved({"dense": dense, "compressed": model}, shape, args.rounds, batch_sizes=batches, **opts)
    dense_t, low_t = timed["dense"], timed["compressed"]
    measured = low_t.get(layer_rt, {}).get(args.latency_batch)
    doc = {
        "kind": "resnet50-latency", "command": command, "model": args.model, "input_shape": shape,
        "rank": str(crit), "scheme": args.scheme, "rounds": args.rounds, "layer_rounds": args.layer_rounds, "layer_runtime": layer_rt, "latency_batch_size": args.latency_batch,
        "multiple": table.multiple if args.multiple is None else args.multiple, "threads": low_t.threads,
        "macs_before": before.macs, "macs_after": after.macs, "macs_speedup": round(before.macs / after.macs, 4),
        "layers_decomposed": sum(lp.decomposed for lp in p.layers),
        "layers_dense": [[lp.name, lp.reason] for lp in p.layers if not lp.decomposed and lp.name in table.layers],
        "ranks": {name: k for name, k in ranks.items() if k is not None},
        "predicted_ms_before": round(table.model_ms, 4), "predicted_ms_after": round(predicted, 4),
        "predicted_runtime": layer_rt, "predicted_batch_size": args.latency_batch,
        "measured_ms_after": None if measured is None else round(measured, 4),
        "predicted_error": None if measured is None else round(predicted / measured - 1, 4),
        **speedups(dense_t, low_t, batches),
        "runtimes": {"dense": dense_t.to_dict(), "compressed": low_t.to_dict()},
        "machine": machine_info(argparse.Namespace(jobs=1, threads=low_t.threads)),
        "notes": ["random weights (nothing downloaded); BatchNorm folded in both models; random-normal inputs; "
                  f"median of timed blocks, {args.rounds} interleaved rounds of both models, each keeping per runtime "
                  "its fastest; best_speedup_bN: the dense model in its own fastest runtime over the "
                  "compressed one in its fastest; predicted: the latency table's sum (dense model time minus each "
                  "decomposed layer's measured saving) in the layer runtime at the latency batch"],
    }
    doc["targets"] = resnet50_latency(doc)
    doc["wall_time_s"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    atomic_write_text(out, json.dumps(doc, indent=1) + "\n")
    log(rt.table(low_t, dense_t))
    log(f"wrote {out}")
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    shown = [("CACHE_DIR" if i and argv[i - 1] == "--cache-dir" else a) for i, a in enumerate(argv)]  # no machine folder
    command = "python benchmarks/resnet50_latency.py" + (" " + shlex.join(shown) if shown else "")
    try:
        doc = run(build_parser().parse_args(argv), command, Log())
    except TRPError as err:
        print(f"resnet50_latency.py: error: {err}", file=sys.stderr)
        return 2
    for t in doc["targets"]:
        print(f"{t['status']}: {t['target']} - {t['measured']}" + (f" (missed by {t['missed_by']})" if t["missed_by"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
