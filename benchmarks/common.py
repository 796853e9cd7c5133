"""What every part of the benchmark shares: the methods, the schemes, small helpers, recorded paths.

The scheme lists come from the registry (:func:`trp.schemes.names_for`), never spelled out here:
every conv scheme can be trained with TRP or the nuclear norm; SVD training and the post-hoc
baselines take the schemes with one matrix per layer (not the batched ``decouple``).

Paths in the results are recorded relative to the repository (the defaults, and anything under
it) or as the user gave them, so a committed ``results.json`` says nothing about the machine's
own folders.

Example:
    >>> "spatial" in SINGLE_MATRIX_SCHEMES and "decouple" in CONV_SCHEMES
    True
    >>> fmt(None), fmt(1.234, ".1f", "x")
    ('–', '1.2x')
"""

from __future__ import annotations

import math
import os
import posixpath
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from trp import schemes

__all__ = ["HERE", "REPO", "DEFAULT_DATA", "TRAINED", "POSTHOC", "ALL_METHODS", "TRP_METHODS", "MACS_SOURCES",
           "CONV_SCHEMES", "SINGLE_MATRIX_SCHEMES", "REQUIRED_KEYS", "Log", "folder", "entry", "fmt", "shown_path",
           "under"]

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10-mini" / "cifar-10-batches-py"

TRAINED = ("nuclear", "trp", "trp+nuclear", "svd")  # methods trained once per scheme
POSTHOC = ("posthoc", "posthoc+ft")
ALL_METHODS = ("baseline", *TRAINED, *POSTHOC)
TRP_METHODS = ("trp+nuclear", "trp")  # the runs the per-method targets (2, 4, 5) check
# The headline TRP result sets the MACs of the post-hoc baselines; the others stand in when it is not run.
MACS_SOURCES = ("trp+nuclear", "trp", "nuclear", "svd")

CONV_SCHEMES: tuple[str, ...] = schemes.names_for(torch.nn.Conv2d(2, 2, 3))
SINGLE_MATRIX_SCHEMES: tuple[str, ...] = tuple(n for n in CONV_SCHEMES if not schemes.get(n).batched)

REQUIRED_KEYS = ("method", "scheme", "acc_before", "acc_after", "macs_speedup", "params", "latency_speedup_b1",
                 "latency_speedup_b128", "epoch_time_ratio", "runtimes", "best_runtime", "best_runtime_b1",
                 "best_runtime_b128", "best_speedup_b1", "best_speedup_b128")


class Log:
    """Progress lines with the seconds since the benchmark started."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        print(f"[bench {time.perf_counter() - self.t0:7.1f}s] {msg}", flush=True)


def folder(key: str) -> str:
    """A run key as a folder name (``+`` is awkward in shell paths).

    Example:
        >>> folder("trp+nuclear-spatial")
        'trp_nuclear-spatial'
    """
    return key.replace("+", "_")


def entry(entries: Sequence[dict], method: str, scheme: str) -> dict | None:
    """The results entry of ``method`` and ``scheme``, or None if it was not run.

    Example:
        >>> entry([{"method": "trp", "scheme": "channel"}], "trp", "spatial") is None
        True
    """
    return next((e for e in entries if e["method"] == method and e["scheme"] == scheme), None)


def fmt(v: Any, spec: str = ".2f", suffix: str = "") -> str:
    """A number for a table, ``–`` for a missing or non-finite one."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:{spec}}{suffix}"


def shown_path(path: Path, given: str | None) -> str:
    """How a folder is recorded: relative to the repository if it is under it or a default, else as given.

    Example:
        >>> shown_path(REPO / "runs" / "bench" / "x", None)
        'runs/bench/x'
        >>> shown_path(Path("/elsewhere/runs").resolve(), "/elsewhere/runs")
        '/elsewhere/runs'
    """
    if given is None or path.is_relative_to(REPO):
        return Path(os.path.relpath(path, REPO)).as_posix()
    return given


def under(path: str | Path, root: Path, root_shown: str) -> str:
    """``path`` recorded the way ``root`` is (see :func:`shown_path`); paths outside ``root`` as they are.

    Example:
        >>> under(Path("/r/train/baseline"), Path("/r"), "runs/bench/x")
        'runs/bench/x/train/baseline'
    """
    try:
        rel = Path(path).relative_to(root)
    except ValueError:
        return str(path)
    return root_shown if rel == Path(".") else posixpath.join(root_shown, rel.as_posix())
