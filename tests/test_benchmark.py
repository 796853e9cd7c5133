"""The benchmark harness (benchmarks/run.py): its command line, recorded folders, doctests, and a --quick run end to end."""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

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


@pytest.mark.slow
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
        # #14: every runtime of --quick measured at both batches, each best among them, best-vs-best speed-ups
        assert set(e["runtimes"]) == {"eager", "channels_last", "torchscript"}, e["runtimes_skipped"]
        for b in (1, 128):
            ms = {name: v[f"latency_ms_b{b}"] for name, v in e["runtimes"].items()}
            assert e[f"best_runtime_b{b}"] == min(ms, key=ms.get) and e[f"best_ms_b{b}"] == min(ms.values())
            assert e[f"best_speedup_b{b}"] == pytest.approx(e[f"dense_best_ms_b{b}"] / e[f"best_ms_b{b}"], rel=1e-3)
        assert e["latency_speedup_b1"] > 0 and e["latency_speedup_b128"] > 0 and e["epoch_time_ratio"] > 0
    base = next(e for e in doc["methods"] if e["method"] == "baseline")
    assert base["acc_after"] == doc["baseline_acc"] and base["epoch_time_ratio"] == 1.0
    for scheme in ("channel", "spatial"):  # post-hoc SVD runs at the MACs of TRP + nuclear norm
        tn = next(e for e in doc["methods"] if (e["method"], e["scheme"]) == ("trp+nuclear", scheme))
        ph = next(e for e in doc["methods"] if (e["method"], e["scheme"]) == ("posthoc", scheme))
        assert abs(ph["macs_speedup"] - tn["macs_speedup"]) / tn["macs_speedup"] < 0.05
    assert {t["id"] for t in doc["targets"]} == {1, 2, 3, 4, 5, 6, 7, 8}
    assert all(t["status"] in ("met", "missed") for t in doc["targets"] if t["id"] != 8)
    assert {t["status"] for t in doc["targets"] if t["id"] == 8} == {"not run"}  # no latency budget in this run

    # Folders are recorded as the user gave them (here absolute temporary paths), nothing of the repository's.
    text = (out / "results.json").read_text()
    assert doc["settings"]["runs_dir"] == str(tmp_path / "runs") and str(ROOT) not in text
    assert all(e["run"].startswith(str(tmp_path / "runs" / "train")) for e in doc["methods"])

    md = (out / "results.md").read_text()
    assert "| method | scheme | acc before (%) | acc after (%) |" in md
    assert "| trp+nuclear | spatial |" in md and "## Targets" in md and "wall time" in md and "## Runtimes" in md
    png = (out / "accuracy_vs_speedup.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_paths_recorded_relative_to_the_repository_or_as_given(tmp_path):
    bench = _load_run()
    args = bench.resolve(["--quick"])
    assert args.runs_dir == ROOT / "runs" / "bench" / "resnet20-digits-e2"  # absolute to work in
    assert args.runs_dir_shown == "runs/bench/resnet20-digits-e2" and args.data_dir_shown is None
    args = bench.resolve([])  # the full run's default data folder, next to the repository
    assert Path(args.data_dir).is_absolute()
    assert args.data_dir_shown == "../shared/data/cifar10-mini/cifar-10-batches-py"
    args = bench.resolve(["--data-dir", str(tmp_path / "d"), "--runs-dir", str(tmp_path / "r")])
    assert (args.data_dir_shown, args.runs_dir_shown) == (str(tmp_path / "d"), str(tmp_path / "r"))


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "--epochs: must be >= 1, got 0"),
    (["--lr", "nan"], "--lr: must be finite"),
    (["--seed", "1.5"], "--seed: must be a whole number"),
    (["--min-run-time", "0"], "--min-run-time: must be > 0"),
    (["--speedup", "0.5"], "--speedup must be >= 1"),
    (["--schemes", "bogus"], "choose from channel, spatial, decouple"),
    (["--schemes", "decouple"], "support the channel, spatial schemes only; drop decouple"),
    (["--methods", "posthoc"], "posthoc needs a low-rank method"),
    (["--svd-rank", "speedup:2"], "--svd-rank cannot be a speedup"),
    (["--name", "a/b"], "--name must be a plain folder name"),
    (["--runtimes", "eager,tensorrt"], "unknown runtime 'tensorrt' in --runtimes"),
    (["--latency-speedup", "0.5"], "--latency-speedup must be >= 1"),
    (["--latency-runtime", "bogus"], "unknown runtime"),
])
def test_bad_input_is_one_line_and_status_2(capsys, argv, message):
    rc = _load_run().main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("run.py: error: ") and message in err and err.count("\n") == 1


@pytest.mark.parametrize("name", ["common", "targets", "reporting", "running", "document"])
def test_benchmark_module_doctests(name):
    """benchmarks/ is outside the suite's doctest paths: run its examples here."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    result = doctest.testmod(importlib.import_module(f"benchmarks.{name}"))
    assert result.attempted > 0 and result.failed == 0
