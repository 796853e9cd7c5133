"""benchmarks/resnet50_latency.py end to end on a small model and scripted timings (no real-time assertions)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import resnet50_latency as r50  # noqa: E402
from benchmarks import targets as T  # noqa: E402
from trp import runtimes as rt  # noqa: E402


def scripted_ms(model: nn.Module, runtime: str) -> float:
    """3 ms plus each dense conv 1 ms and each decomposed pair 0.2 + k/100 ms; torchscript 20 % faster than eager."""
    total, seen = 3.0, set()
    for m in model.modules():
        if isinstance(m, nn.Sequential) and len(m) == 2 and all(isinstance(c, nn.Conv2d) for c in m):
            total += 0.2 + m[0].out_channels / 100
            seen.update(id(c) for c in m)
        elif isinstance(m, nn.Conv2d) and id(m) not in seen:
            total += 1.0
    return total * (0.8 if runtime == "torchscript" else 1.0)


def test_the_script_predicts_and_measures_in_the_best_runtime(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """Layers are timed in the dense model's best runtime; the prediction of a model that is the sum of its layers
    equals the measured time; the speed-up is best against best; the targets are checked from the document."""
    timed: list[str] = []

    def fake(model, shape, batch=1, runtime="eager", threads=None, min_run_time=0.3, compile_timeout=120.0):  # type: ignore[no-untyped-def]
        timed.append(runtime)
        return scripted_ms(model, runtime)

    monkeypatch.setattr(rt, "measure", fake)
    out = tmp_path / "r" / "results.json"
    rc = r50.main(["--model", "resnet20", "--input", "3,32,32", "--speedup", "1.3", "--runtimes", "eager,torchscript",
                   "--rounds", "2", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["layer_runtime"] == "torchscript" and doc["rank"] == "latency:1.3"
    assert doc["predicted_error"] == pytest.approx(0.0, abs=1e-3)  # the scripted model is exactly its layers' sum
    assert doc["predicted_ms_after"] <= doc["predicted_ms_before"] / 1.3 * 1.02
    assert doc["best_runtime_b1"] == doc["dense_best_runtime_b1"] == "torchscript"
    assert doc["best_speedup_b1"] == pytest.approx(doc["dense_best_ms_b1"] / doc["best_ms_b1"], rel=1e-3)
    assert T.resnet50_latency(doc) == doc["targets"] and doc["targets"][1]["status"] == "met" and doc["rounds"] == 2
    n = len(timed)
    r50.main(["--model", "resnet20", "--input", "3,32,32", "--speedup", "1.3", "--runtimes", "eager,torchscript",
              "--rounds", "2", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "again.json")])
    # the second run times only whole models: the dense one once to pick the layer runtime, then both models in
    # 2 interleaved rounds, two runtimes each; every layer comes from the cache
    assert len(timed) - n == 2 + 2 * 2 * 2


def test_bad_input_is_one_line_and_status_2(capsys: pytest.CaptureFixture) -> None:
    """An unknown runtime is a one-line error, exit status 2."""
    assert r50.main(["--runtimes", "tensorrt"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("resnet50_latency.py: error: unknown runtime")
