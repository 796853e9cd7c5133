"""Runtimes: every available runtime computes what eager computes, failures are reasons, the best is the fastest."""

from __future__ import annotations

import copy
import importlib.util
import math
import shutil

import pytest
import torch
from torch import nn

from trp import runtimes
from trp.errors import TRPError
from trp.runtimes import RUNTIMES, Runtime, Timings, best, measure, measure_all


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2),
                         nn.Flatten(), nn.Linear(4 * 3 * 3, 5)).eval()


SHAPE = (3, 8, 8)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "compile" else n
                                  for n in runtimes.names()])
def test_every_available_runtime_matches_eager(name: str) -> None:
    reason = runtimes.available()[name]
    if reason is not None:
        pytest.skip(f"{name} unavailable here: {reason}")
    model = tiny()
    x = runtimes.example_input(model, SHAPE, 2)
    with torch.inference_mode():
        want = model(x)
    work = copy.deepcopy(model)
    run = RUNTIMES[name].prepare(work, x, 1, 120.0)
    with torch.inference_mode():
        got = torch.as_tensor(run()).float()
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), float((got - want).abs().max())
    ms = measure(model, SHAPE, 2, name, threads=1, min_run_time=0.01)
    assert math.isfinite(ms) and ms > 0
    assert model.training is False and next(model.parameters()).is_contiguous()  # the original is not converted


def _scripted(name: str, prepare) -> Runtime:  # type: ignore[no-untyped-def]
    return Runtime(name, "scripted for a test", "contiguous", lambda: None, prepare)


def test_a_wrong_output_is_reported_and_never_timed(monkeypatch: pytest.MonkeyPatch) -> None:
    timed = []
    monkeypatch.setattr(runtimes, "time_call", lambda run, threads, t: timed.append(1) or 1.0)
    monkeypatch.setitem(RUNTIMES, "off_by_one", _scripted("off_by_one", lambda m, x, th, to: lambda: m(x) + 1.0))
    with pytest.raises(TRPError, match="off_by_one output differs from eager"):
        measure(tiny(), SHAPE, 2, "off_by_one")
    assert timed == []
    t = measure_all(tiny(), SHAPE, (1, 4), ("eager", "off_by_one"))
    assert set(t) == {"eager"} and set(t["eager"]) == {1, 4}
    assert "differs from eager" in t.skipped["off_by_one"]


def test_a_failing_conversion_gives_a_reason_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(model, x, threads, timeout):  # type: ignore[no-untyped-def]
        raise RuntimeError("unsupported operator aten::frobnicate\nwith a long trace")

    monkeypatch.setitem(RUNTIMES, "boom", _scripted("boom", boom))
    with pytest.raises(TRPError, match=r"^boom: unsupported operator aten::frobnicate$"):
        measure(tiny(), SHAPE, 1, "boom", min_run_time=0.01)
    t = measure_all(tiny(), SHAPE, (1,), ("boom", "eager"), min_run_time=0.01)
    assert t.skipped == {"boom": "boom: unsupported operator aten::frobnicate"} and set(t) == {"eager"}


def test_every_runtime_goes_through_one_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []

    def fake(run, threads, min_run_time):  # type: ignore[no-untyped-def]
        seen.append((threads, torch.get_num_threads(), torch.is_inference_mode_enabled()))
        return 1.0 + len(seen)

    monkeypatch.setattr(runtimes, "time_call", fake)
    before = torch.get_num_threads()
    t = measure_all(tiny(), SHAPE, (1, 2), ("eager", "channels_last"), threads=1)
    assert dict(t) == {"eager": {1: 2.0, 2: 3.0}, "channels_last": {1: 4.0, 2: 5.0}}
    assert t.threads == 1 and t.input_shape == SHAPE and t.to_dict()["threads"] == 1
    assert seen == [(1, 1, True)] * 4  # the stated thread count, in inference mode
    assert torch.get_num_threads() == before


def test_best_picks_the_fastest_runtime() -> None:
    results = {"eager": {1: 1.31, 128: 95.0}, "channels_last": {1: 1.2, 128: 70.0}, "onnxruntime": {1: 0.47}}
    assert best(results, 1) == ("onnxruntime", 0.47)
    assert best(results, 128) == ("channels_last", 70.0)
    assert best({"a": {1: 2.0}, "b": {1: 2.0}}, 1) == ("a", 2.0)  # ties: the first listed
    with pytest.raises(TRPError, match="batch size 8"):
        best(results, 8)


def test_table_states_the_best_and_the_speedups() -> None:
    dense = Timings({"eager": {1: 2.0}, "onnxruntime": {1: 0.5}}, threads=2)
    low = Timings({"eager": {1: 1.0}, "onnxruntime": {1: 0.4}}, {"compile": "no compiler"}, threads=2)
    text = runtimes.table(low, dense)
    assert "( 2.00x)" in text and "( 1.25x)" in text  # eager 2.0/1.0; best 0.5/0.4
    assert text.splitlines()[3].startswith("best") and "(onnxruntime)" in text
    assert "compile         skipped: no compiler" in text and text.endswith("threads: 2")


def test_an_uninstalled_onnxruntime_gives_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    reason = runtimes.available()["onnxruntime"]
    assert reason is not None and "onnxruntime is not installed" in reason
    with pytest.raises(TRPError, match="runtime onnxruntime is not available: onnxruntime is not installed"):
        measure(tiny(), SHAPE, 1, "onnxruntime")
    t = measure_all(tiny(), SHAPE, (1,), ("onnxruntime",))
    assert dict(t) == {} and t.skipped["onnxruntime"] == reason


def test_compile_without_a_cxx_compiler_gives_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert "C++ compiler" in str(runtimes.available()["compile"])
    assert runtimes.available()["eager"] is None


def test_channels_last_needs_a_4d_input_and_names_are_checked() -> None:
    with pytest.raises(TRPError, match="4-D"):
        measure(nn.Linear(4, 4), (4,), 1, "channels_last")
    with pytest.raises(TRPError, match="unknown runtime 'tensorrt'"):
        measure(tiny(), SHAPE, 1, "tensorrt")
    with pytest.raises(TRPError, match="batch size must be >= 1"):
        measure(tiny(), SHAPE, 0)


def test_inputs_are_seeded_random_normal() -> None:
    a, b = runtimes.example_input(tiny(), SHAPE, 64), runtimes.example_input(tiny(), SHAPE, 64)
    assert torch.equal(a, b) and a.shape == (64, *SHAPE)
    assert abs(float(a.mean())) < 0.05 and abs(float(a.std()) - 1) < 0.05


@pytest.mark.slow
def test_compile_past_its_time_limit_is_skipped() -> None:
    if runtimes.available()["compile"] is not None:
        pytest.skip("torch.compile unavailable here")
    t = measure_all(tiny(), SHAPE, (1,), ("compile",), compile_timeout=0.01, min_run_time=0.01)
    assert dict(t) == {} and t.skipped["compile"] == "did not compile within 0.01 s"


def test_token_model_is_timed_on_ids_below_its_vocabulary(one_thread):
    """A model that starts with nn.Embedding gets random ids, not floats, in eager and in ONNX Runtime."""
    model = nn.Sequential(nn.Embedding(11, 8), nn.Flatten(), nn.Linear(8 * 6, 3))
    x = runtimes.example_input(model, (6,), 4)
    assert x.dtype == torch.int64 and 0 <= int(x.min()) and int(x.max()) < 11 and len(set(x.flatten().tolist())) > 1
    chosen = ["eager"] + (["onnxruntime"] if runtimes.RUNTIMES["onnxruntime"].check() is None else [])
    t = runtimes.measure_all(model, (6,), (2,), chosen, min_run_time=0.01)
    assert sorted(t) == sorted(chosen), t.skipped
