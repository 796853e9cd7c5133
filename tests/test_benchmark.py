"""The benchmark harness (benchmarks/run.py) end to end in its --quick mode."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load_run():
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _numbers(value):
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _numbers(v)


def test_quick_benchmark_writes_complete_results(tmp_path):
    """The harness must not rot: a tiny run of every method and scheme writes the full schema, table and plot."""
    bench = _load_run()
    rc = bench.main(["--quick", "--out-root", str(tmp_path), "--runs-dir", str(tmp_path / "runs"), "--name", "quick",
                     "--speedup", "2", "--freeze", "1", "--latency-rounds", "2"])
    assert rc == 0
    out = tmp_path / "quick"
    doc = json.loads((out / "results.json").read_text())

    assert math.isfinite(doc["baseline_acc"]) and 0 < doc["baseline_acc"] <= 100
    assert doc["command"].startswith("python benchmarks/run.py --quick")
    assert doc["settings"]["speedup"] == 2.0 and doc["settings"]["freeze"] == 1.0
    assert doc["machine"]["torch"] and doc["machine"]["threads"] >= 1 and doc["wall_time_s"] > 0
    combos = {(e["method"], e["scheme"]) for e in doc["methods"]}
    expected = {("baseline", "dense")} | {(m, s) for m in ("posthoc", "posthoc+ft", "nuclear", "trp", "trp+nuclear", "svd")
                                          for s in ("channel", "spatial")}
    assert combos == expected and len(doc["methods"]) == len(expected)
    for e in doc["methods"]:
        for key in bench.REQUIRED_KEYS:
            assert key in e, (e["method"], e["scheme"], key)
        assert all(math.isfinite(x) for x in _numbers(e)), (e["method"], e["scheme"])
        assert e["macs_speedup"] >= 1.0 and e["params"] > 0
        assert e["latency_speedup_b1"] > 0 and e["latency_speedup_b128"] > 0 and e["epoch_time_ratio"] > 0
    base = next(e for e in doc["methods"] if e["method"] == "baseline")
    assert base["acc_after"] == doc["baseline_acc"] and base["epoch_time_ratio"] == 1.0
    for scheme in ("channel", "spatial"):  # post-hoc SVD runs at the MACs of TRP + nuclear norm
        tn = next(e for e in doc["methods"] if (e["method"], e["scheme"]) == ("trp+nuclear", scheme))
        ph = next(e for e in doc["methods"] if (e["method"], e["scheme"]) == ("posthoc", scheme))
        assert abs(ph["macs_speedup"] - tn["macs_speedup"]) / tn["macs_speedup"] < 0.05
    assert {t["id"] for t in doc["targets"]} == {1, 2, 3, 4, 5}
    assert all(t["status"] in ("met", "missed") for t in doc["targets"])

    md = (out / "results.md").read_text()
    assert "| method | scheme | acc before (%) | acc after (%) |" in md
    assert "| trp+nuclear | spatial |" in md and "## Targets" in md and "wall time" in md
    png = (out / "accuracy_vs_speedup.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
