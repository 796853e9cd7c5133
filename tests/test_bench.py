"""trp.bench: any model timed in every runtime, best against best, on scripted runtimes (no real-time assertions)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from trp import runtimes as rt
from trp.bench import bench, load_source, summary
from trp.errors import TRPError
from trp.models import create
from trp.saving import save_model
from trp.structure import ModelSpec


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every runtime's time from a script: dense (no BN left, 20 convs+) eager 10, torchscript 6 ms per 8 samples;
    a model with fewer parameters (the 'compressed' one) 0.5x in eager, 0.9x in torchscript."""
    calls: list = []

    def fake(model, shape, batch=1, runtime="eager", threads=None, min_run_time=0.3, compile_timeout=120.0):  # type: ignore[no-untyped-def]
        calls.append((runtime, batch, any(isinstance(m, nn.BatchNorm2d) for m in model.modules())))
        small = sum(p.numel() for p in model.parameters()) < 200_000
        base = {"eager": 10.0, "torchscript": 6.0}[runtime] * batch / 8
        return base * ((0.5 if runtime == "eager" else 0.9) if small else 1.0)

    monkeypatch.setattr(rt, "measure", fake)
    return calls


def test_bench_of_a_source_against_another_states_best_against_best(scripted: list, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The record holds both models' timings, each best runtime and the speed-up best vs best; BN is folded first."""
    small = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 10))
    lines: list[str] = []
    r = bench(small, (3, 32, 32), (1, 8), ("eager", "torchscript"), against="resnet20", out=tmp_path / "b.json",
              log=lines.append)
    assert (r["best_runtime_b8"], r["best_ms_b8"]) == ("eager", 5.0)
    assert (r["dense_best_runtime_b8"], r["dense_best_ms_b8"]) == ("torchscript", 6.0)
    assert r["best_speedup_b8"] == pytest.approx(1.2) and r["best_speedup_b1"] == pytest.approx(1.2)
    assert not any(bn for _, _, bn in scripted)  # every timed model had its BatchNorm folded
    assert json.loads((tmp_path / "b.json").read_text()) == json.loads(json.dumps(r))
    table = "\n".join(lines).splitlines()
    assert any(line.startswith("best") and line.endswith("(eager, eager)") for line in table)
    assert summary(r).startswith("batch 1: eager 0.625 ms (1.20x the dense model in its own fastest runtime)")


def test_interleaved_rounds_alternate_the_order_and_keep_each_fastest(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rounds run a, b then b, a; each model keeps per runtime its fastest round, so a slow spell falls on both."""
    from trp import bench as bench_mod

    order: list[str] = []
    script = {"a": iter([5.0, 3.0, 4.0, 6.0, 8.0]), "b": iter([9.0, 10.0, 7.0, 12.0, 11.0])}  # per model, its times in call order

    def fake(model, shape, batch_sizes=(1,), runtimes=None, threads=None, min_run_time=0.3,  # type: ignore[no-untyped-def]
             compile_timeout=120.0, log=None):
        key = "a" if model.out_features == 2 else "b"
        order.append(key)
        return rt.Timings({"eager": {1: next(script[key])}}, threads=1, input_shape=shape)

    monkeypatch.setattr(bench_mod, "bench_model", fake)
    t = bench_mod.interleaved({"a": nn.Linear(4, 2), "b": nn.Linear(4, 3)}, (4,), 3)
    assert order == ["a", "b", "b", "a", "a", "b"]
    assert (t["a"]["eager"][1], t["b"]["eager"][1]) == (3.0, 7.0)
    r = bench(nn.Linear(4, 2), (4,), (1,), ("eager",), against=nn.Linear(4, 3), rounds=2, log=lambda s: None)
    assert r["rounds"] == 2 and r["best_speedup_b1"] == pytest.approx(11.0 / 6.0, abs=1e-4)  # a: 6 then 8, b: 12 then 11
    with pytest.raises(TRPError, match="timing rounds"):
        bench_mod.interleaved({"a": nn.Linear(4, 2)}, (4,), 0)


def test_bench_reads_a_model_folder_with_its_input_shape(scripted: list, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A saved model is rebuilt from its folder and timed at its recorded input shape."""
    save_model(tmp_path / "m" / "model.safetensors", create("resnet20", in_channels=1), ModelSpec("resnet20", 10, 1, [1, 8, 8]))
    model, shape, name = load_source(tmp_path / "m")
    assert shape == [1, 8, 8] and not model.training
    r = bench(tmp_path / "m", batch_sizes=(2,), runtimes=("eager",), log=lambda s: None)
    assert r["input_shape"] == [1, 8, 8] and r["timings"]["ms"] == {"eager": {"2": 2.5}}


def test_bench_refuses_bad_input_in_one_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """An existing out, an unknown runtime, or a model no runtime can run are one-line TRPErrors."""
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(TRPError, match="exists; choose another --out or pass --overwrite"):
        bench("resnet20", out=tmp_path / "x.json", log=lambda s: None)
    with pytest.raises(TRPError, match="unknown runtime"):
        bench("resnet20", batch_sizes=(1,), runtimes=("tensorrt",), log=lambda s: None)
    with pytest.raises(TRPError, match="no runtime could time the model: channels_last: channels_last needs a 4-D"):
        bench(nn.Linear(4, 2), (4,), (1,), ("channels_last",), log=lambda s: None)
    assert torch.get_num_threads() >= 1


def test_report_text_puts_the_prediction_beside_the_measurement() -> None:
    """compress's printout: the runtime table, latency:S's predicted ms beside the measured, and the best line."""
    from trp.bench import report_text

    dense = rt.Timings({"eager": {1: 2.0, 8: 16.0}, "onnxruntime": {1: 1.0, 8: 12.0}}, threads=2).to_dict()
    low = rt.Timings({"eager": {1: 1.5, 8: 8.0}, "onnxruntime": {1: 0.8, 8: 10.0}}, threads=2).to_dict()
    report = {"runtimes": {"dense": dense, "compressed": low}, "rank": "latency:2", "predicted_ms_after": 7.6,
              "predicted_runtime": "eager", "predicted_batch_size": 8, "measured_ms_after": 8.0, "predicted_error": -0.05,
              "best_runtime_b1": "onnxruntime", "best_ms_b1": 0.8, "best_speedup_b1": 1.25, "best_runtime_b8": "eager",
              "best_ms_b8": 8.0, "best_speedup_b8": 1.5, "threads": 2}
    lines = report_text(report).splitlines()
    assert lines[0].startswith("runtime") and any(line.startswith("best") for line in lines)
    assert "latency:2 predicted 7.600 ms in eager at batch 8, measured 8.000 ms (-5.0%)" in lines
    assert lines[-1] == ("batch 1: onnxruntime 0.800 ms (1.25x the dense model in its own fastest runtime); batch 8: eager "
                         "8.000 ms (1.50x the dense model in its own fastest runtime); 2 thread(s)")


def test_runtime_lists_from_the_command_line() -> None:
    """--runtimes: names in order without repeats, 'all', or nothing for the defaults; an unknown name is an error."""
    assert rt.parse_list("onnxruntime,eager,eager") == ("onnxruntime", "eager")
    assert rt.parse_list("all") == rt.names() and rt.parse_list("") is None
    with pytest.raises(TRPError, match="unknown runtime 'tvm'"):
        rt.parse_list("eager,tvm")


def test_comma_lists_of_whole_numbers() -> None:
    """--input-shape / --batch-sizes: whole numbers >= 1, one-line errors otherwise."""
    from trp.bench import parse_ints

    assert parse_ints("1,128", "batch sizes") == [1, 128]
    with pytest.raises(TRPError, match=r"^batch sizes must be comma-separated whole numbers, got '1,x'$"):
        parse_ints("1,x", "batch sizes")
    with pytest.raises(TRPError, match="batch sizes must be >= 1"):
        parse_ints("0", "batch sizes")
