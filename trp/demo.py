"""``trp demo``: the main job on the embedded offline dataset (scikit-learn's digits).

Trains a baseline and a TRP network with the same budget, decomposes the TRP network with the
paper's value threshold (no fine-tuning), decomposes the baseline post hoc at the same MACs, and
prints the comparison. Everything runs on the CPU in about a minute.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from trp.compress import compress
from trp.errors import TRPError
from trp.io import atomic_write_text
from trp.runs import check_free, check_writable, contents, locked
from trp.train import TrainConfig, train
from trp.validate import whole

__all__ = ["run_demo", "DEMO_SETTINGS"]

# Digits has 1,437 training images: an epoch is 12 steps of 128, so projections come every
# `period` = 10 steps and the energy ramps down over the first third of the run.
DEMO_SETTINGS = {"model": "resnet20", "dataset": "digits", "lr": 0.05, "batch_size": 128, "seed": 0}
TRP_SETTINGS = {"method": "trp", "scheme": "channel", "energy": 0.9, "period": 10, "nuclear": 3e-4}


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
    trp_report = compress(out / "trp", out / "trp-compressed", "value:0.05", check_latency=False, overwrite=True, log=log)
    speed = max(trp_report["flops_speedup"], 1.0)
    log(f"== post-hoc SVD of the baseline at the same MACs ({speed:.2f}x, no fine-tuning)")
    base_report = compress(out / "baseline", out / "baseline-posthoc", f"speedup:{speed}", check_latency=False,
                           overwrite=True, log=log)
    rows = [
        {"method": "baseline", "acc": base_report["acc_before"], "acc_after": base_report["acc_before"], "macs_speedup": 1.0,
         "latency_speedup": 1.0},
        {"method": "post-hoc SVD", "acc": base_report["acc_before"], "acc_after": base_report["acc_after"],
         "macs_speedup": base_report["flops_speedup"], "latency_speedup": base_report["latency_speedup"]},
        {"method": "TRP", "acc": trp_report["acc_before"], "acc_after": trp_report["acc_after"],
         "macs_speedup": trp_report["flops_speedup"], "latency_speedup": trp_report["latency_speedup"]},
    ]
    lines = ["| method | accuracy trained (%) | accuracy decomposed (%) | MACs speed-up | measured latency speed-up (b128) |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['acc']:.2f} | {r['acc_after']:.2f} | {r['macs_speedup']:.2f}x | {r['latency_speedup']:.2f}x |")
    table = "\n".join(lines)
    atomic_write_text(out / "comparison.md", table + "\n")
    atomic_write_text(out / "comparison.json", json.dumps(rows, indent=1))
    log(table)
    return rows
