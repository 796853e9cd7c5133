"""The ``trp`` command: train, compress, eval, report, export, and the offline demo.

Every user error is one line on stderr, ``trp: error: …``, and exit status 2; an interrupt exits
with 130 after saving what is complete. No traceback reaches the user for bad input.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from trp.errors import TRPError

__all__ = ["main", "build_parser", "finite_float", "whole_number"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        raise TRPError(f"{self.prog.split()[-1] if ' ' in self.prog else 'trp'}: {message}")


def finite_float(text: str) -> float:
    """argparse type: a finite number (NaN and inf are refused with a one-line message)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return v


def whole_number(text: str) -> int:
    """argparse type: a whole number, also written as 8.0 or 1e3."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not math.isfinite(v) or v != int(v):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    return int(v)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests).

    Example:
        >>> build_parser().parse_args(["eval", "runs/x"]).command
        'eval'
    """
    p = _Parser(prog="trp", description="Trained Rank Pruning for PyTorch.")
    p.add_argument("--version", action="version", version=f"trp {__import__('trp').__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train a model (baseline, TRP, nuclear norm, SVD training)")
    t.add_argument("--config", help="JSON recipe; flags override it")
    t.add_argument("--model")
    t.add_argument("--dataset", help="digits (default, offline), cifar10, cifar100, imagenet")
    t.add_argument("--data-dir")
    t.add_argument("--download", action="store_true", default=None, help="fetch CIFAR if the folder lacks it")
    t.add_argument("--method", help="baseline, trp, nuclear or svd")
    t.add_argument("--scheme", help="channel, spatial or decouple (svd: channel or spatial)")
    t.add_argument("--energy", type=finite_float)
    t.add_argument("--energy-ramp", type=finite_float,
                   help="epochs over which the projection tightens from dense to --energy (or --speedup)")
    t.add_argument("--speedup", type=finite_float,
                   help="TRP: choose the ranks of all layers for this whole-model MACs speed-up instead of --energy")
    t.add_argument("--freeze", type=finite_float, help="TRP: epochs after which the ranks stay fixed")
    t.add_argument("--period", type=whole_number)
    t.add_argument("--nuclear", type=finite_float)
    t.add_argument("--orth", type=finite_float, help="SVD training: orthogonality weight")
    t.add_argument("--sparsity", help="SVD training: hoyer:W or l1:W")
    t.add_argument("--epochs", type=whole_number)
    t.add_argument("--lr", type=finite_float)
    t.add_argument("--momentum", type=finite_float)
    t.add_argument("--weight-decay", type=finite_float)
    t.add_argument("--batch-size", type=whole_number, help="per process")
    t.add_argument("--schedule", help="cosine or step")
    t.add_argument("--lr-steps", help="comma-separated epochs for the step schedule, e.g. 81,122")
    t.add_argument("--seed", type=whole_number)
    t.add_argument("--device", help="auto, cpu, cuda, cuda:1")
    t.add_argument("--amp", action="store_true", default=None)
    t.add_argument("--out", help="run folder (required unless --resume)")
    t.add_argument("--resume", metavar="RUN", help="continue RUN from its last completed epoch")
    t.add_argument("--overwrite", action="store_true")
    t.add_argument("--no-progress", action="store_true")

    c = sub.add_parser("compress", help="decompose a trained run and measure it")
    c.add_argument("run")
    c.add_argument("--rank", default="value:0.05", help="value:T, energy:E, fixed:K, fraction:P or speedup:S")
    c.add_argument("--scheme", help="default: the run's scheme")
    c.add_argument("--finetune", type=whole_number, default=0, metavar="EPOCHS")
    c.add_argument("--finetune-lr", type=finite_float, default=0.01)
    c.add_argument("--data-dir")
    c.add_argument("--latency-batch", type=whole_number, default=128)
    c.add_argument("--no-latency-check", action="store_true", help="keep layers even if they measure slower")
    c.add_argument("--out", required=True)
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--json", action="store_true", help="print the report as JSON")

    e = sub.add_parser("eval", help="test accuracy of a trained or compressed model")
    e.add_argument("model")
    e.add_argument("--dataset")
    e.add_argument("--data-dir")
    e.add_argument("--device", default="auto")
    e.add_argument("--json", action="store_true")

    r = sub.add_parser("report", help="per-layer ranks and energies, spectra and rank-history plots")
    r.add_argument("path", metavar="RUN_OR_MODEL")
    r.add_argument("--out", help="folder for the PNG plots (default: PATH/report)")
    r.add_argument("--scheme", help="matrix layout for the spectra (default: the run's)")

    x = sub.add_parser("export", help="export a model to ONNX or TorchScript")
    x.add_argument("model")
    x.add_argument("--format", required=True, choices=["onnx", "torchscript"])
    x.add_argument("--out", required=True)
    x.add_argument("--batch-size", type=whole_number, default=1)

    d = sub.add_parser("demo", help="offline end to end on digits: baseline and TRP, compression, comparison")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--epochs", type=whole_number, default=30)
    d.add_argument("--overwrite", action="store_true")
    return p


def _train(args: argparse.Namespace) -> int:
    from trp.dist import init_from_env, rank_and_world, shutdown

    init_from_env()  # under torchrun: one process per GPU (NCCL) or per CPU worker (gloo)
    try:
        summary = _train_run(args)
        lead = rank_and_world()[0] == 0
    finally:
        shutdown()
    if lead:
        _print_summary(summary)
    if summary["stopped"]:
        if lead:
            print(f"trp: interrupted; {summary['run']} keeps the state after epoch {summary['epochs_done']} "
                  f"(continue with: trp train --resume {summary['run']})", file=sys.stderr)
        return 130
    return 0


def _train_run(args: argparse.Namespace) -> dict:
    from trp.dist import rank_and_world
    from trp.train import TrainConfig, load_config_file, train

    log = print if rank_and_world()[0] == 0 else (lambda s: None)
    if args.resume:
        return train(TrainConfig(), args.resume, resume=True, progress=not args.no_progress, log=log)
    else:
        if not args.out:
            raise TRPError("train needs --out RUN (or --resume RUN)")
        values: dict[str, Any] = load_config_file(args.config) if args.config else {}
        for key in ("model", "dataset", "data_dir", "download", "method", "scheme", "energy", "energy_ramp", "speedup",
                    "freeze", "period", "nuclear", "orth", "sparsity", "epochs", "lr", "momentum", "weight_decay", "batch_size", "schedule",
                    "seed", "device", "amp"):
            if getattr(args, key) is not None:
                values[key] = getattr(args, key)
        if args.lr_steps is not None:
            values["lr_steps"] = [s for s in args.lr_steps.split(",") if s.strip()]
        if "lr_steps" in values:
            values["lr_steps"] = tuple(values["lr_steps"])
            if any(not str(s).strip().lstrip("-").isdigit() for s in values["lr_steps"]):
                raise TRPError(f"lr-steps must be whole numbers, got {','.join(map(str, values['lr_steps']))}")
        config = TrainConfig.from_dict(values)
        return train(config, args.out, overwrite=args.overwrite, progress=not args.no_progress, log=log)


def _print_summary(s: dict) -> None:
    ddp = ""
    if s.get("world_size", 1) > 1:
        ddp = f"  {s['world_size']} processes, replicas {'bitwise identical' if s['replicas_identical'] else 'DIFFER'}"
    print(f"done: {s['run']}  method {s['method']} ({s['scheme']})  epochs {s['epochs_done']}  "
          f"test acc {s['test_acc']:.2f}%  {s['mean_epoch_time_s']:.2f} s/epoch  wall {s['wall_time_s']:.1f} s{ddp}")


def _report_table(r: dict) -> str:
    rows = [
        ("accuracy (%)", f"{r['acc_before']:.2f}", f"{r['acc_after']:.2f}", f"{r['acc_after'] - r['acc_before']:+.2f} pt"),
        ("MACs", f"{r['macs_before']:,}", f"{r['macs_after']:,}", f"{r['flops_speedup']:.2f}x fewer"),
        ("params", f"{r['params_before']:,}", f"{r['params_after']:,}", f"{r['params_before'] / max(r['params_after'], 1):.2f}x fewer"),
        (f"latency b{r['latency_batch_size']} (ms)", f"{r['latency_ms_before']:.3f}", f"{r['latency_ms_after']:.3f}",
         f"{r['latency_speedup']:.2f}x faster"),
    ]
    lines = [f"{'':<20} {'before':>14} {'after':>14}  change", *(f"{a:<20} {b:>14} {c:>14}  {d}" for a, b, c, d in rows)]
    return "\n".join(lines)


def _compress(args: argparse.Namespace) -> int:
    from trp.compress import compress

    report = compress(args.run, args.out, args.rank, args.scheme, args.finetune, args.finetune_lr, args.data_dir,
                      args.latency_batch, not args.no_latency_check, args.overwrite)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(_report_table(report))
        print(f"{report['layers_decomposed']} layers decomposed ({report['rank']}, {report['scheme']}); "
              f"latency on {report['latency_device']}, {report['latency_threads']} threads; wrote {args.out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from trp.checkpoint import load_model
    from trp.data import load as load_data
    from trp.measure import profile
    from trp.train import evaluate, resolve_device

    device = resolve_device(args.device)
    model, spec, meta = load_model(args.model, device)
    dataset = args.dataset or spec.dataset
    data_dir = args.data_dir or meta.get("config", {}).get("data_dir")
    data = load_data(dataset, data_dir).to(device)
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
    from trp.report import write_report

    print(write_report(args.path, args.out, args.scheme))
    return 0


def _export(args: argparse.Namespace) -> int:
    from trp.export import export

    print(export(args.model, args.format, args.out, args.batch_size))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from trp.demo import run_demo

    run_demo(args.out, args.epochs, args.overwrite)
    return 0


_COMMANDS = {"train": _train, "compress": _compress, "eval": _eval, "report": _report, "export": _export, "demo": _demo}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``trp`` command; returns the exit status.

    Example:
        >>> main(["train", "--energy", "2", "--out", "/tmp/never"])
        2
    """
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
    except OSError as err:  # a disk or permission problem outside our own checks
        where = f" {err.filename}" if getattr(err, "filename", None) else ""
        print(f"trp: error: {err.strerror or err}{where}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
