"""``trp demo``: the main job on the embedded offline dataset (scikit-learn's digits).

Trains a baseline and a TRP network with the same budget, decomposes the TRP network with the
paper's value threshold (no fine-tuning), decomposes the baseline post hoc at the same MACs, and
prints the comparison. Everything runs on the CPU in about a minute.

Both compressions time the dense and the compressed model in every runtime (torch.compile aside:
it compiles each model for ~20 s on a small CPU), and the table states the speed-up in the best
runtime: the dense model in its own fastest runtime against the compressed one in its fastest.
Digits images are 8×8, where per-call overhead rather than arithmetic sets the time, so the demo
also times the same networks at a larger input (:data:`LARGE_INPUT`, random-normal, same weights:
ResNet-20 ends in global average pooling) and prints that speed-up beside the table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from trp import runtimes as rt
from trp.bench import bench_model, load_source
from trp.compress import compress
from trp.errors import TRPError
from trp.io import atomic_write_text
from trp.runs import check_free, check_writable, contents, locked
from trp.train import TrainConfig, train
from trp.validate import whole

__all__ = ["run_demo", "DEMO_SETTINGS", "DEMO_RUNTIMES", "LARGE_INPUT", "LARGE_BATCH", "larger_input", "report_row", "table"]

# Digits has 1,437 training images: an epoch is 12 steps of 128, so projections come every
# `period` = 10 steps and the energy ramps down over the first third of the run.
DEMO_SETTINGS = {"model": "resnet20", "dataset": "digits", "lr": 0.05, "batch_size": 128, "seed": 0}
TRP_SETTINGS = {"method": "trp", "scheme": "channel", "energy": 0.9, "period": 10, "nuclear": 3e-4}
#: Runtimes the demo times (every default one but torch.compile, which would add minutes).
DEMO_RUNTIMES = tuple(name for name in rt.defaults() if name != "compile")
#: The larger input the trained networks are also timed at, and its batch size.
LARGE_INPUT, LARGE_BATCH = (1, 64, 64), 32


def run_demo(out: str | Path = "runs/demo", epochs: int = 30, overwrite: bool = False,
             log: Callable[[str], None] = print) -> list[dict]:
    """Baseline vs TRP on digits, end to end; returns the comparison rows (also saved as JSON).

    Example (a minute of training; tests/test_train.py runs it):
        >>> import tempfile
        >>> rows = run_demo(tempfile.mkdtemp(), epochs=2, overwrite=True, log=lambda s: None)  # doctest: +SKIP
        >>> [r["method"] for r in rows]  # doctest: +SKIP
        ['baseline', 'post-hoc SVD', 'TRP']
    """
    epochs = whole(epochs, "epochs", low=1)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TRPError(f"output {out} exists and is not a folder")
    check_writable(out)  # before a minute of training, not after it
    check_free(out)
    if contents(out) and not overwrite:
        raise TRPError(f"{out} is not empty; pass --overwrite or choose another --out")
    with locked(out):  # one demo at a time in a folder; each run and compression also locks its own
        return _demo(out, epochs, log)


def _demo(out: Path, epochs: int, log: Callable[[str], None]) -> list[dict]:
    runs = {}
    for name, extra in (("baseline", {"method": "baseline"}),
                        ("trp", {**TRP_SETTINGS, "energy_ramp": epochs / 3})):
        log(f"== training {name} ({epochs} epochs on digits)")
        config = TrainConfig(**DEMO_SETTINGS, **extra, epochs=epochs)
        runs[name] = train(config, out / name, overwrite=True, progress=False, log=log)
    log("== compressing TRP with value:0.05 (no fine-tuning)")
    # Digits images are 8×8: per-call overhead, not arithmetic, decides each layer's time, so the
    # per-layer latency check would keep almost every layer dense. The demo compares MACs at equal
    # rank budgets and reports the whole model's measured latency as it is.
    timing = {"runtimes": DEMO_RUNTIMES, "min_run_time": 0.1}
    trp_report = compress(out / "trp", out / "trp-compressed", "value:0.05", check_latency=False, overwrite=True,
                          log=log, **timing)
    speed = max(trp_report["flops_speedup"], 1.0)
    log(f"== post-hoc SVD of the baseline at the same MACs ({speed:.2f}x, no fine-tuning)")
    base_report = compress(out / "baseline", out / "baseline-posthoc", f"speedup:{speed}", check_latency=False,
                           overwrite=True, log=log, **timing)
    rows = [report_row("baseline", base_report, dense=True), report_row("post-hoc SVD", base_report), report_row("TRP", trp_report)]
    log(f"== timing baseline and TRP at input {'x'.join(map(str, LARGE_INPUT))}, batch {LARGE_BATCH}")
    large = larger_input(out / "baseline", out / "trp-compressed", log)
    text = table(rows, large)
    atomic_write_text(out / "comparison.md", text + "\n")
    atomic_write_text(out / "comparison.json", json.dumps(rows, indent=1))
    atomic_write_text(out / "larger_input.json", json.dumps(large, indent=1))
    log(text)
    return rows


def report_row(method: str, r: dict, dense: bool = False) -> dict:
    """One line of the comparison from a compression report (the baseline's from its dense side).

    Example:
        >>> r = {"acc_before": 99.0, "latency_batch_size": 8, "dense_best_runtime_b1": "eager",
        ...      "dense_best_runtime_b8": "onnxruntime"}
        >>> report_row("baseline", r, dense=True)["best_runtime_b8"]
        'onnxruntime'
    """
    b = r["latency_batch_size"]
    if dense:
        return {"method": method, "acc": r["acc_before"], "acc_after": r["acc_before"], "macs_speedup": 1.0,
                "latency_speedup": 1.0, "best_speedup_b1": 1.0, f"best_speedup_b{b}": 1.0,
                "best_runtime_b1": r["dense_best_runtime_b1"], f"best_runtime_b{b}": r[f"dense_best_runtime_b{b}"]}
    return {"method": method, "acc": r["acc_before"], "acc_after": r["acc_after"], "macs_speedup": r["flops_speedup"],
            "latency_speedup": r["latency_speedup"], "best_speedup_b1": r["best_speedup_b1"],
            f"best_speedup_b{b}": r[f"best_speedup_b{b}"], "best_runtime_b1": r["best_runtime_b1"],
            f"best_runtime_b{b}": r[f"best_runtime_b{b}"]}


def larger_input(dense: Path, compressed: Path, log: Callable[[str], None]) -> dict:
    """Both networks at :data:`LARGE_INPUT` (batch :data:`LARGE_BATCH`), every demo runtime, best against best."""
    times = {}
    for name, folder in (("dense", dense), ("compressed", compressed)):
        model, shape, _ = load_source(folder, LARGE_INPUT)
        times[name] = bench_model(model, shape, (LARGE_BATCH,), DEMO_RUNTIMES, min_run_time=0.1)
    (d_rt, d_ms), (c_rt, c_ms) = rt.best(times["dense"], LARGE_BATCH), rt.best(times["compressed"], LARGE_BATCH)
    log(rt.table(times["compressed"], times["dense"]))
    return {"input_shape": list(LARGE_INPUT), "batch_size": LARGE_BATCH, "dense_best_runtime": d_rt,
            "dense_best_ms": round(d_ms, 4), "best_runtime": c_rt, "best_ms": round(c_ms, 4),
            "best_speedup": round(d_ms / c_ms, 4), "threads": times["compressed"].threads,
            "timings": {k: v.to_dict() for k, v in times.items()}}


def table(rows: list[dict], large: dict | None = None) -> str:
    """The comparison as Markdown, with a line on the larger input if it was timed.

    Example:
        >>> r = {"method": "TRP", "acc": 99.0, "acc_after": 98.9, "macs_speedup": 3.2, "latency_speedup": 0.9,
        ...      "best_speedup_b1": 1.1, "best_speedup_b128": 1.3, "best_runtime_b1": "onnxruntime",
        ...      "best_runtime_b128": "channels_last"}
        >>> print(table([r]).splitlines()[-1])
        | TRP | 99.00 | 98.90 | 3.20x | 0.90x | 1.10x (onnxruntime) | 1.30x (channels_last) |
    """
    b = max(int(k.rsplit("b", 1)[1]) for k in rows[0] if k.startswith("best_speedup_b"))
    lines = ["| method | accuracy trained (%) | accuracy decomposed (%) | MACs speed-up | latency speed-up (eager, b"
             f"{b}) | best-runtime speed-up b1 | best-runtime speed-up b{b} |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['acc']:.2f} | {r['acc_after']:.2f} | {r['macs_speedup']:.2f}x | "
                     f"{r['latency_speedup']:.2f}x | {r['best_speedup_b1']:.2f}x ({r['best_runtime_b1']}) | "
                     f"{r[f'best_speedup_b{b}']:.2f}x ({r[f'best_runtime_b{b}']}) |")
    if large is not None:
        shape = "×".join(map(str, large["input_shape"]))
        lines += ["", f"At a {shape} input, batch {large['batch_size']} (the same networks, random-normal input), TRP's "
                  f"measured speed-up, each model in its fastest runtime: {large['best_speedup']:.2f}x ({large['dense_best_ms']:.2f} ms "
                  f"dense in {large['dense_best_runtime']}, {large['best_ms']:.2f} ms TRP in {large['best_runtime']}; "
                  f"{large['threads']} thread(s))."]
    return "\n".join(lines)
