"""The ``trp`` command: train, compress, eval, report, export, and the offline demo.

Every user error is one line on stderr, ``trp: error: …``, and exit status 2 (bad flags and files,
unreadable or unwritable paths, a full disk); a value that is valid but far outside the sensible
range is one line ``trp: warning: …`` saying what was done with it; an interrupt exits with 130
after saving what is complete. No traceback reaches the user for bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

from trp import __version__, methods, runtimes, schemes, sources
from trp.bench import bench, parse_ints, report_text, summary
from trp.compress import compress
from trp.data import DATASETS
from trp.data import load as load_data
from trp.demo import run_demo
from trp.dist import init_from_env, rank_and_world, shutdown
from trp.errors import TRPError
from trp.export import export
from trp.loop import evaluate, resolve_device
from trp.measure import profile
from trp.models import check as check_model
from trp.models import names as model_names
from trp.report import write_report
from trp.saving import load_model
from trp.surgery import LAYERS
from trp.train import TrainConfig, load_config_file, train
from trp.validate import argtype, number, whole

__all__ = ["main", "build_parser"]

# argparse types: a finite number / a whole number (also 8.0 or 1e3); ranges are the library's checks.
NUMBER, WHOLE = argtype(number), argtype(whole)
# Train flags that map one to one onto TrainConfig fields.
TRAIN_KEYS = ("model", "model_kwargs", "dataset", "data_dir", "download", "skip_bad_images", "method", "scheme",
              "layers", "energy", "energy_ramp", "speedup", "freeze", "period", "nuclear", "orth", "sparsity", "epochs",
              "lr", "momentum", "weight_decay", "batch_size", "schedule", "seed", "device", "amp", "init", "teacher",
              "distill_weight", "distill_temperature", "val_split", "latency_speedup", "latency_runtime",
              "latency_batch")
_TRP_ROOT = str(Path(__file__).resolve().parent)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        raise TRPError(f"{self.prog.split()[-1] if ' ' in self.prog else 'trp'}: {message}")


def _add_train(sub: Any) -> None:
    svd_schemes = methods.SVDTraining.scheme_choices
    t = sub.add_parser("train", help=f"train a model ({', '.join(methods.names())})")
    t.add_argument("--config", help="JSON recipe (or a run's config.json); flags override it")
    t.add_argument("--model", help=f"{', '.join(model_names())}, or {sources.HELP} (random weights, never downloaded)")
    t.add_argument("--model-kwargs", metavar="JSON", help="the source's keyword arguments as a JSON object, e.g. "
                   "'{\"img_size\": 32, \"patch_size\": 4}' (python: sources run your module, as a script would)")
    t.add_argument("--dataset", help=f"{', '.join(DATASETS)} (default digits, offline)")
    t.add_argument("--data-dir")
    t.add_argument("--download", action="store_true", default=None, help="fetch CIFAR if the folder lacks it")
    t.add_argument("--skip-bad-images", action="store_true", default=None,
                   help="image folders: leave unreadable images out (counted) instead of refusing the folder")
    t.add_argument("--method", help=", ".join(methods.names()))
    t.add_argument("--scheme", help=f"{', '.join(schemes.names())}, {schemes.AUTO} (channel for convs, linear for "
                   "Linear layers) or several tried in order per layer, e.g. spatial,linear (default channel; "
                   f"svd: one of {', '.join(svd_schemes)})")
    t.add_argument("--layers", help=f"{' or '.join(LAYERS)}: the layers trp, nuclear and svd train and compress "
                   "decomposes; convs (default, the paper's) = every Conv2d with groups=1 but the first; all = every "
                   "conv and Linear layer a --scheme can handle, except the first conv and the last Linear (the "
                   "classifier), e.g. for transformers (not svd)")
    t.add_argument("--energy", type=NUMBER)
    t.add_argument("--energy-ramp", type=NUMBER,
                   help="epochs over which the projection tightens from dense to --energy (or --speedup)")
    t.add_argument("--speedup", type=NUMBER,
                   help="TRP: choose the ranks of all layers for this whole-model MACs speed-up instead of --energy")
    t.add_argument("--freeze", type=NUMBER, help="TRP: epochs after which the ranks stay fixed")
    t.add_argument("--period", type=WHOLE)
    t.add_argument("--nuclear", type=NUMBER)
    t.add_argument("--orth", type=NUMBER, help="SVD training: orthogonality weight")
    t.add_argument("--sparsity", help="SVD training: hoyer:W or l1:W per optimizer step, or hoyer:W/epoch (W spread "
                   "over an epoch's steps; default hoyer:10/epoch)")
    t.add_argument("--epochs", type=WHOLE, help="with --resume: train the run on to this many epochs")
    t.add_argument("--lr", type=NUMBER)
    t.add_argument("--momentum", type=NUMBER)
    t.add_argument("--weight-decay", type=NUMBER)
    t.add_argument("--batch-size", type=WHOLE, help="per process")
    t.add_argument("--schedule", help="cosine or step")
    t.add_argument("--lr-steps", help="comma-separated epochs for the step schedule, e.g. 81,122")
    t.add_argument("--seed", type=WHOLE)
    t.add_argument("--device", help="auto, cpu, cuda, cuda:1")
    t.add_argument("--amp", action="store_true", default=None)
    t.add_argument("--init", metavar="SOURCE", help="start from trained weights: a trp run or model folder, a "
                   ".safetensors file or a torch.save'd state_dict (read with weights_only=True); shapes must match")
    t.add_argument("--teacher", metavar="SOURCE", help="distil from this trained model (the same kinds of source as "
                   "--init; a trp folder may hold any architecture)")
    t.add_argument("--distill-weight", type=NUMBER, metavar="W",
                   help="W in [0, 1]: loss = (1-W)·CE + W·T²·KL(teacher || student) (default 0.5)")
    t.add_argument("--distill-temperature", type=NUMBER, metavar="T",
                   help="T > 0, the soft targets' temperature (default 4)")
    t.add_argument("--val-split", type=NUMBER, metavar="F", help="hold out a seeded, class-balanced fraction F of "
                   "the training images for validation; every epoch reports it, the test split is evaluated once "
                   "at the end")
    t.add_argument("--latency-speedup", type=NUMBER, metavar="S", help="TRP: choose the ranks for this speed-up "
                   "in measured time (a per-layer latency table timed on this machine) instead of --speedup")
    t.add_argument("--latency-runtime", metavar="NAME", help=f"the runtime --latency-speedup is timed in: "
                   f"{', '.join(runtimes.names())} (default eager)")
    t.add_argument("--latency-batch", type=WHOLE, metavar="N",
                   help="the batch size --latency-speedup is timed at (default 128)")
    t.add_argument("--out", help="run folder (required unless --resume)")
    t.add_argument("--resume", metavar="RUN", help="continue RUN from its last completed epoch "
                   "(other flags must agree with the run, except --epochs, --device, --data-dir, and --teacher if it "
                   "names the same file)")
    t.add_argument("--overwrite", action="store_true", help="replace whatever run --out holds")
    t.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests).

    Example:
        >>> build_parser().parse_args(["eval", "runs/x"]).command
        'eval'
    """
    p = _Parser(prog="trp", description="Trained Rank Pruning for PyTorch.")
    p.add_argument("--version", action="version", version=f"trp {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_train(sub)

    c = sub.add_parser("compress", help="decompose a trained run and measure it")
    c.add_argument("run")
    c.add_argument("--rank", default="value:0.05", help="value:T, energy:E, fixed:K, fraction:P, speedup:S (MACs) or "
                   "latency:S (measured time)")
    c.add_argument("--scheme", help=f"{', '.join(schemes.names())}, {schemes.AUTO} or a list such as spatial,linear "
                   "(default: the run's scheme; layers: the run's --layers)")
    c.add_argument("--finetune", type=WHOLE, default=0, metavar="EPOCHS")
    c.add_argument("--finetune-lr", type=NUMBER, default=0.01)
    c.add_argument("--data-dir")
    c.add_argument("--latency-batch", type=WHOLE, default=128)
    c.add_argument("--no-latency-check", action="store_true", help="keep layers even if they measure slower")
    c.add_argument("--runtimes", help=f"runtimes to time both models in: a list of {', '.join(runtimes.names())}, or "
                   "all (default: all available; $TRP_RUNTIMES overrides)")
    c.add_argument("--layer-runtime", help="runtime of the per-layer check and of latency:S (default: the dense "
                   "model's fastest, torch.compile aside)")
    c.add_argument("--compile-timeout", type=NUMBER, default=runtimes.COMPILE_TIMEOUT, metavar="SECONDS")
    c.add_argument("--timing-rounds", type=WHOLE, default=1, help="rounds of timing the dense and compressed models, "
                   "after the first in alternating order, each keeping its fastest (default 1)")
    c.add_argument("--out", required=True)
    c.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    c.add_argument("--trust", action="store_true", help="accept a model file without trp's checksum")
    c.add_argument("--json", action="store_true", help="print the report as JSON")

    e = sub.add_parser("eval", help="test accuracy of a trained or compressed model")
    e.add_argument("model")
    e.add_argument("--dataset")
    e.add_argument("--data-dir")
    e.add_argument("--skip-bad-images", action="store_true", help="image folders: leave unreadable images out")
    e.add_argument("--device", default="auto")
    e.add_argument("--trust", action="store_true", help="accept a model file without trp's checksum")
    e.add_argument("--json", action="store_true")

    r = sub.add_parser("report", help="per-layer ranks and energies, spectra and rank-history plots")
    r.add_argument("path", metavar="RUN_OR_MODEL")
    r.add_argument("--out", help="folder for the PNG plots (default: PATH/report)")
    r.add_argument("--scheme", help="matrix layout for the spectra (default: the run's)")
    r.add_argument("--trust", action="store_true", help="accept a model file without trp's checksum")

    x = sub.add_parser("export", help="export a model to ONNX or TorchScript")
    x.add_argument("model")
    x.add_argument("--format", required=True, choices=["onnx", "torchscript"])
    x.add_argument("--out", required=True)
    x.add_argument("--batch-size", type=WHOLE, default=1)
    x.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    x.add_argument("--trust", action="store_true", help="accept a model file without trp's checksum")

    b = sub.add_parser("bench", help="time a model in every runtime at batch 1 and a larger batch")
    b.add_argument("model", help="a run or compressed folder, or a model source (resnet20, torchvision:resnet50, ...)")
    b.add_argument("--against", help="a dense folder or source: speed-ups per runtime and best against best")
    b.add_argument("--input-shape", help="one sample's shape, e.g. 3,224,224 (default: the folder's or the model's)")
    b.add_argument("--batch-sizes", default="1,128")
    b.add_argument("--runtimes", help=f"a list of {', '.join(runtimes.names())}, or all (default: all available)")
    b.add_argument("--threads", type=WHOLE)
    b.add_argument("--min-run-time", type=NUMBER, default=0.3, metavar="SECONDS")
    b.add_argument("--rounds", type=WHOLE, default=1, help="with --against: timing rounds of the two models in "
                   "alternating order, each keeping its fastest (default 1)")
    b.add_argument("--compile-timeout", type=NUMBER, default=runtimes.COMPILE_TIMEOUT, metavar="SECONDS")
    b.add_argument("--model-kwargs", help="a model source's keyword arguments as a JSON object")
    b.add_argument("--out", help="a JSON file for the record")
    b.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    b.add_argument("--trust", action="store_true", help="accept a model file without trp's checksum")
    b.add_argument("--json", action="store_true", help="print the record as JSON")

    d = sub.add_parser("demo", help="offline end to end on digits: baseline and TRP, compression, comparison")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--epochs", type=WHOLE, default=30)
    d.add_argument("--overwrite", action="store_true")
    return p


def _train(args: argparse.Namespace) -> int:
    started = init_from_env()  # under torchrun: one process per GPU (NCCL) or per CPU worker (gloo)
    try:
        summary = _train_run(args)
        lead = rank_and_world()[0] == 0
    finally:
        if started:
            shutdown()
    if lead and summary["epochs_done"]:  # no summary of a run stopped before its first epoch ended
        _print_summary(summary)
    if summary["stopped"]:
        if lead:
            print(f"trp: interrupted; {_advice(summary)}", file=sys.stderr)
        return 130
    return 0


def _advice(summary: dict) -> str:
    """The command that carries on after an interrupt (paths quoted for the shell)."""
    run = summary["run"]
    if not summary["epochs_done"]:  # nothing saved yet: the run starts again from its own recorded settings
        return (f"no epoch was completed, so there is nothing to resume (start it again with: "
                f"trp train --config {shlex.quote(str(Path(run) / 'config.json'))} --out {shlex.quote(run)})")
    # A resume's new settings reach the checkpoint with the first epoch it completes; repeating them is
    # harmless after that and needed before it.
    flags = "".join(f" --{key.replace('_', '-')}" + ("" if value is True else f" {shlex.quote(str(value))}")
                    for key, value in summary.get("changed", {}).items() if value is not None and value is not False)
    return (f"{run} keeps the state after epoch {summary['epochs_done']} (continue with: "
            f"trp train --resume {shlex.quote(run)}{flags})")


def _train_values(args: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = load_config_file(args.config) if args.config else {}
    values.update({key: getattr(args, key) for key in TRAIN_KEYS if getattr(args, key) is not None})
    if args.lr_steps is not None:
        values["lr_steps"] = [whole(s.strip(), "lr-steps", low=0) for s in args.lr_steps.split(",") if s.strip()]
    return values


def _train_run(args: argparse.Namespace) -> dict:
    log = print if rank_and_world()[0] == 0 else (lambda s: None)
    values = _train_values(args)
    if args.resume:
        if args.out and Path(args.out).resolve() != Path(args.resume).resolve():
            raise TRPError("--out and --resume name different folders; --resume continues a run in its own folder")
        return train(None, args.resume, resume=True, overwrite=args.overwrite, progress=not args.no_progress, log=log,
                     changes=values)
    if not args.out:
        raise TRPError("train needs --out RUN (or --resume RUN)")
    return train(TrainConfig.from_dict(values), args.out, overwrite=args.overwrite, progress=not args.no_progress,
                 log=log)


def _print_summary(s: dict) -> None:
    # train() refuses a run whose replicas differ, so a summary always has identical replicas.
    ddp = f"  {s['world_size']} processes, replicas bitwise identical" if s.get("world_size", 1) > 1 else ""
    val = f"val acc {s['val_acc']:.2f}%  " if s.get("val_acc") is not None else ""
    test = f"test acc {s['test_acc']:.2f}%  " if s["test_acc"] == s["test_acc"] else "test not evaluated yet  "
    print(f"done: {s['run']}  method {s['method']} ({s['scheme']})  epochs {s['epochs_done']}  {val}{test}"
          f"{s['mean_epoch_time_s']:.2f} s/epoch  wall {s['wall_time_s']:.1f} s{ddp}")


def _report_table(r: dict) -> str:
    rows = [
        ("accuracy (%)", f"{r['acc_before']:.2f}", f"{r['acc_after']:.2f}",
         f"{r['acc_after'] - r['acc_before']:+.2f} pt"),
        ("MACs", f"{r['macs_before']:,}", f"{r['macs_after']:,}", f"{r['flops_speedup']:.2f}x fewer"),
        ("params", f"{r['params_before']:,}", f"{r['params_after']:,}",
         f"{r['params_before'] / max(r['params_after'], 1):.2f}x fewer"),
        (f"latency b{r['latency_batch_size']} (ms)", f"{r['latency_ms_before']:.3f}", f"{r['latency_ms_after']:.3f}",
         f"{r['latency_speedup']:.2f}x faster"),
    ]
    lines = [f"{'':<20} {'before':>14} {'after':>14}  change",
             *(f"{a:<20} {b:>14} {c:>14}  {d}" for a, b, c, d in rows)]
    return "\n".join(lines)


def _compress(args: argparse.Namespace) -> int:
    report = compress(args.run, args.out, args.rank, args.scheme, args.finetune, args.finetune_lr, args.data_dir,
                      args.latency_batch, not args.no_latency_check, args.overwrite, trust=args.trust,
                      runtimes=runtimes.parse_list(args.runtimes), layer_runtime=args.layer_runtime,
                      compile_timeout=args.compile_timeout, timing_rounds=args.timing_rounds,
                      log=(lambda line: print(line, file=sys.stderr)) if args.json else print)  # stdout: the JSON alone
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(_report_table(report))
        print(report_text(report))
        print(f"{report['layers_decomposed']} layers decomposed ({report['rank']}, {report['scheme']}); "
              f"latency on {report['latency_device']}, {report['latency_threads']} threads; wrote {args.out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    model, spec, meta = load_model(args.model, device, trust=args.trust)
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    dataset = args.dataset or spec.dataset
    data = load_data(dataset, args.data_dir or config.get("data_dir"), False, args.skip_bad_images).to(device)
    if list(data.input_shape) != list(spec.input_shape) or data.num_classes != spec.num_classes:
        raise TRPError(f"{dataset} ({data.num_classes} classes, input {list(data.input_shape)}) does not fit the model "
                       f"({spec.num_classes} classes, input {spec.input_shape})")
    acc, loss = evaluate(model, data)
    prof = profile(model, spec.input_shape)
    result = {"model": args.model, "dataset": dataset, "accuracy": round(acc, 4), "loss": round(loss, 6),
              "test_images": data.num_test, "macs": prof.macs, "params": prof.params}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.model}: {dataset} test accuracy {acc:.2f}% ({data.num_test} images), loss {loss:.4f}, "
              f"{prof.macs:,} MACs, {prof.params:,} params")
    return 0


def _report(args: argparse.Namespace) -> int:
    print(write_report(args.path, args.out, args.scheme, trust=args.trust))
    return 0


def _export(args: argparse.Namespace) -> int:
    print(export(args.model, args.format, args.out, args.batch_size, overwrite=args.overwrite, trust=args.trust))
    return 0


def _bench(args: argparse.Namespace) -> int:
    kwargs = check_model(args.model, args.model_kwargs) if args.model_kwargs else None
    record = bench(args.model, parse_ints(args.input_shape, "input shape"),
                   parse_ints(args.batch_sizes, "batch sizes") or (1, 128), runtimes.parse_list(args.runtimes),
                   args.threads, args.min_run_time, args.compile_timeout, args.against, args.out, args.overwrite,
                   kwargs, args.trust, log=(lambda line: None) if args.json else print, rounds=args.rounds)
    print(json.dumps(record, indent=1) if args.json else summary(record))
    return 0


def _demo(args: argparse.Namespace) -> int:
    run_demo(args.out, args.epochs, args.overwrite)
    return 0


_COMMANDS = {"train": _train, "compress": _compress, "eval": _eval, "report": _report, "export": _export,
             "bench": _bench, "demo": _demo}


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      file: Any = None, line: str | None = None) -> None:
    print(f"trp: warning: {message}", file=sys.stderr)


def _run(argv: Sequence[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return _COMMANDS[args.command](args)
    except TRPError as err:
        print(f"trp: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("trp: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("trp: error: out of memory; try a smaller --batch-size", file=sys.stderr)
        return 1
    except OSError as err:  # a disk or permission problem outside trp's own checks: a user error too
        where = f": {err.filename}" if getattr(err, "filename", None) else ""
        print(f"trp: error: {err.strerror or err}{where}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``trp`` command; returns the exit status.

    Example:
        >>> main(["train", "--energy", "2", "--out", "/tmp/never"])
        2
    """
    with warnings.catch_warnings():
        # trp's own warnings (a value far outside the sensible range) as one line each, every time.
        warnings.filterwarnings("always", category=UserWarning, module=r"trp(\.|$)")
        default = warnings.showwarning

        def show(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None,
                 line: str | None = None) -> None:
            own = str(Path(filename).resolve()).startswith(_TRP_ROOT + os.sep)
            (_one_line_warning if own else default)(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        return _run(argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
