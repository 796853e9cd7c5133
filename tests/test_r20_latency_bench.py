"""benchmarks/r20_latency.py's bookkeeping: figures from a compress report and a bench record, targets 6-7 on means."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the repository root, never benchmarks/ itself (its modules would shadow packages)
    sys.path.insert(0, str(ROOT))
from benchmarks import r20_latency as r20  # noqa: E402
from benchmarks.targets import T_BEST_ACC, T_BEST_B1, T_BEST_B128, T_BEST_RATIO  # noqa: E402


def _entry(acc: float, b1: float, b128: float, macs: float = 2.0, base: float = 66.0) -> dict:
    """One seed's figures as seed_entry makes them from scripted records (dense 1 / 100 ms in onnxruntime)."""
    report = {"acc_after": acc, "acc_before": acc, "macs_before": int(1000 * macs), "macs_after": 1000,
              "layers_decomposed": 16}
    record = {"threads": 2, "timings": {"ms": {"onnxruntime": {"1": 1 / b1, "128": 100 / b128}}},
              "against_timings": {"ms": {"onnxruntime": {"1": 1.0, "128": 100.0}}}}
    for b, s, dense in ((1, b1, 1.0), (128, b128, 100.0)):
        record.update({f"best_runtime_b{b}": "onnxruntime", f"best_ms_b{b}": dense / s, f"dense_best_runtime_b{b}":
                       "onnxruntime", f"dense_best_ms_b{b}": dense, f"best_speedup_b{b}": s})
    return r20.seed_entry(record, report, base)


def test_seed_entry_states_loss_speed_ups_and_the_ratio_to_macs() -> None:
    """The entry holds the accuracy change, both best-against-best speed-ups and speed-up over MACs at b128."""
    e = _entry(65.5, 1.6, 1.9, macs=2.5)
    assert e["delta_vs_baseline"] == pytest.approx(-0.5) and e["macs_speedup"] == 2.5
    assert (e["best_speedup_b1"], e["best_speedup_b128"], e["best_ratio_b128"]) == (1.6, 1.9, 0.76)
    assert e["runtimes"]["dense"]["onnxruntime"]["128"] == 100.0


@pytest.mark.parametrize("change, met6, met7", [
    ({}, True, True),
    ({"b128": T_BEST_B128 - 0.01}, False, True),  # each threshold missed alone fails target 6 (or 7) only
    ({"b1": T_BEST_B1 - 0.01}, False, True),
    ({"acc": 66.0 - T_BEST_ACC - 0.01}, False, True),
    ({"macs": 1.9 / (T_BEST_RATIO - 0.01)}, True, False),
    ({"b128": T_BEST_B128, "b1": T_BEST_B1, "acc": 66.0 - T_BEST_ACC, "macs": T_BEST_B128 / T_BEST_RATIO}, True, True),
])
def test_targets_six_and_seven_on_both_sides_of_every_threshold(change: dict, met6: bool, met7: bool) -> None:
    """The means over seeds decide: just below a threshold misses, at it meets."""
    v = {"acc": 65.5, "b1": 1.6, "b128": 1.9, "macs": 2.0, **change}
    per_seed = {str(s): {"spatial": _entry(v["acc"] + d, v["b1"], v["b128"] + d / 10, v["macs"])}
                for s, d in zip(range(3), (-0.1, 0.0, 0.1))}  # a spread around each mean
    summary = r20.summarize(per_seed)
    assert summary["spatial"]["test_acc"]["n"] == 3
    found = {t["id"]: t for t in r20.targets(summary)}
    assert (found[6]["met"], found[7]["met"]) == (met6, met7)
    assert (found[6]["missed_by"] is None) == met6 and (found[7]["missed_by"] is None) == met7
