"""trp.compress: the per-layer latency check, the memory-format choice, one SVD per layer, SVD-trained runs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import trp
from trp.compress import best_latency, keep_faster
from trp.errors import TRPError


def test_keep_faster_leaves_the_model_untouched_and_validates_rounds(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check times copies (the model keeps its memory format and weights); rounds < 1 is refused."""
    monkeypatch.setenv("TRP_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    p = trp.plan(m, rank=trp.fixed(2), input_shape=(8, 12, 12))
    out = keep_faster(m, p, 2, min_run_time=0.01, channels_last=True, rounds=2)
    assert [lp.name for lp in out.layers] == [lp.name for lp in p.layers]
    for lp in out.layers:  # either still decomposed, or dense with the measured reason
        assert lp.decomposed or lp.reason.startswith("decomposed form measured slower")
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    assert m[0].weight.is_contiguous()
    with pytest.raises(TRPError, match=r"^rounds must be >= 1, got 0$"):
        keep_faster(m, p, 2, rounds=0)


def test_best_latency_names_the_format_it_measured() -> None:
    """best_latency returns a positive time and one of the two memory formats, and restores the model."""
    m = nn.Sequential(nn.Conv2d(3, 4, 3))
    ms, fmt = best_latency(m, [3, 8, 8], 2, min_run_time=0.02)
    assert ms > 0 and fmt in ("contiguous", "channels_last")
    assert m[0].weight.is_contiguous()


def test_compress_takes_one_svd_per_decomposed_layer(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Compressing a TRP run factorizes each decomposed layer exactly once (planning needs singular values only)."""
    from trp import svd as svd_mod
    from trp.compress import compress
    from trp.train import TrainConfig, train

    torch.set_num_threads(1)
    run = tmp_path / "run"
    train(TrainConfig(dataset="digits", epochs=1, period=4, energy=0.8), run, progress=False, log=lambda s: None)
    calls: list[str] = []
    real = svd_mod.svd

    def counting(matrix, name="weight"):  # noqa: ANN001, ANN202
        calls.append(name)
        return real(matrix, name)

    monkeypatch.setattr(svd_mod, "svd", counting)
    report = compress(run, tmp_path / "small", "value:0.05", latency_batch=8, check_latency=False, log=lambda s: None,
                      runtimes=("eager",), min_run_time=0.02)
    assert report["layers_decomposed"] > 0
    assert len(calls) == report["layers_decomposed"], calls
    assert len(set(calls)) == len(calls)  # one each, not two of some and none of others


def test_svd_trained_run_compresses_to_its_own_pruned_factors(tmp_path) -> None:
    """compress of an SVD-trained run keeps each layer's k largest |s| of the trained (non-orthogonal)
    factors: the compressed model computes what an independent reference built from U_k·diag(s_k)·V_kᵀ
    computes. A re-SVD of the unpruned weight at the same ranks (a valid model, wrong values) fails here."""
    from torch.nn.utils import parametrize

    from trp import schemes
    from trp import svd_training as st
    from trp.checkpoint import MODEL_FILE
    from trp.compress import compress
    from trp.saving import load_model, save_model
    from trp.train import TrainConfig, train

    torch.set_num_threads(1)
    run = tmp_path / "run"
    train(TrainConfig(dataset="digits", epochs=1, method="svd", scheme="channel", batch_size=256), run, progress=False,
          log=lambda s: None)
    model, spec, _ = load_model(run)
    torch.manual_seed(0)
    with torch.no_grad():  # factors far from orthogonal, some s negative: pruning and re-factorizing then differ
        for _, layer in st.svd_layers(model):
            f = st.factors(layer)
            f.U.add_(0.3 * f.U.std() * torch.randn_like(f.U))
            f.V.add_(0.3 * f.V.std() * torch.randn_like(f.V))
            f.s.mul_(torch.where(torch.rand_like(f.s) < 0.3, -1.0, 1.0))
    save_model(tmp_path / "perturbed" / MODEL_FILE, model, spec)
    x = torch.randn(8, *spec.input_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        unpruned = model.eval()(x)
    k = 4
    # Loaded afresh, not deep-copied: a copy shares parametrize's generated class, whose property
    # remove_parametrizations deletes.
    reference = load_model(tmp_path / "perturbed")[0].eval()
    with torch.no_grad():
        for _, layer in st.svd_layers(reference):
            f = st.factors(layer)
            u, s, v = f.U.detach(), f.s.detach(), f.V.detach()
            keep = torch.argsort(s.abs(), descending=True)[:k]
            pruned = schemes.get("channel").from_matrix((u[:, keep] * s[keep]) @ v[:, keep].T, layer.weight.shape)
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
            layer.weight.copy_(pruned)
    compress(tmp_path / "perturbed", tmp_path / "small", f"fixed:{k}", latency_batch=8, check_latency=False,
             log=lambda s: None, runtimes=("eager",), min_run_time=0.02)
    small = trp.load(tmp_path / "small").eval()
    with torch.no_grad():
        want, got = reference(x), small(x)
    scale = max(1.0, float(want.abs().max()))
    assert float((want - unpruned).abs().max()) > 1e-2 * scale  # pruning to rank k changed the function
    assert float((got - want).abs().max()) <= 1e-4 * scale


# ------------------------------------------------------------------------------------------------
# #14: decisions on scripted timings (a patched timer), never on real time


def two_layers() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1))


def test_keep_faster_keeps_dense_exactly_the_layers_slower_decomposed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Layer "0" is faster decomposed (kept decomposed), "2" slower (dense, with both times); equal time counts as slower."""
    from trp.latency_model import Target

    m = two_layers()
    p = trp.plan(m, rank=trp.fixed(4), input_shape=(16, 8, 8))
    seen: list[tuple[str, int]] = []

    def timer(decomposed_2: float):  # type: ignore[no-untyped-def]
        def fake(module, shape, batch):  # type: ignore[no-untyped-def]
            seen.append((type(module).__name__, batch))
            if isinstance(module, nn.Conv2d):
                return 1.0
            return 0.5 if module[1].out_channels == 16 else decomposed_2
        return fake

    out = keep_faster(m, p, 8, target=Target(8, "torchscript", cache_dir=str(tmp_path / "a"), timer=timer(1.2)))
    layers = {lp.name: lp for lp in out.layers}
    assert layers["0"].decomposed
    assert layers["2"].reason == "decomposed form measured slower (1.200 ms >= 1.000 ms dense; torchscript, batch 8)"
    assert {b for _, b in seen} == {8}
    tie = keep_faster(m, p, 8, target=Target(8, cache_dir=str(tmp_path / "b"), timer=timer(1.0)))
    assert [lp.decomposed for lp in tie.layers] == [True, False]
    faster = keep_faster(m, p, 8, target=Target(8, cache_dir=str(tmp_path / "c"), timer=timer(0.9)))
    assert all(lp.decomposed for lp in faster.layers)


def test_keep_faster_times_nothing_the_cache_holds(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A second check on the same machine (same cache) calls the timer zero times."""
    from trp.latency_model import Target

    m = two_layers()
    p = trp.plan(m, rank=trp.fixed(4), input_shape=(16, 8, 8))
    calls = []
    target = Target(8, cache_dir=str(tmp_path), timer=lambda mod, s, b: calls.append(mod) or 1.0)
    keep_faster(m, p, 8, target=target)
    assert len(calls) == 4  # two layers, dense and decomposed
    keep_faster(m, p, 8, target=target)
    assert len(calls) == 4


def test_best_latency_picks_the_faster_memory_format(monkeypatch: pytest.MonkeyPatch) -> None:
    """best_latency returns the format with the smaller scripted time, whichever it is."""
    import trp.compress as comp

    for cl_ms, want in ((1.0, "channels_last"), (3.0, "contiguous")):
        monkeypatch.setattr(comp, "latency_ms", lambda model, shape, b, min_run_time=0.3, channels_last=False, _c=cl_ms:
                            _c if channels_last else 2.0)
        assert best_latency(nn.Sequential(nn.Conv2d(3, 4, 3)), [3, 8, 8], 2) == (min(cl_ms, 2.0), want)


def test_layer_target_is_the_dense_models_fastest_layer_runtime() -> None:
    """Layers are timed in the dense model's fastest runtime at the batch (torch.compile aside), or the one asked for."""
    from trp.compress import layer_target
    from trp.runtimes import Timings

    t = Timings({"eager": {1: 1.0, 8: 9.0}, "channels_last": {1: 2.0, 8: 7.0}, "onnxruntime": {1: 0.5, 8: 8.0},
                 "compile": {8: 1.0}})
    assert layer_target(t, 8).runtime == "channels_last"
    assert layer_target(t, 1).runtime == "onnxruntime"
    assert layer_target(t, 8, "torchscript").runtime == "torchscript"
    assert layer_target(Timings({"compile": {8: 1.0}}), 8).runtime == "eager"


def test_speedups_compare_each_model_in_its_own_best_runtime() -> None:
    """best_speedup = the dense model's best time over the compressed model's best, whichever runtimes they are."""
    from trp.bench import speedups
    from trp.runtimes import Timings

    dense = Timings({"eager": {1: 2.0, 8: 20.0}, "onnxruntime": {1: 1.0, 8: 12.0}})
    low = Timings({"eager": {1: 0.8, 8: 8.0}, "onnxruntime": {1: 0.9, 8: 10.0}})
    s = speedups(dense, low, [1, 8])
    assert (s["dense_best_runtime_b1"], s["best_runtime_b1"], s["best_speedup_b1"]) == ("onnxruntime", "eager", 1.25)
    assert (s["dense_best_runtime_b8"], s["best_runtime_b8"], s["best_speedup_b8"]) == ("onnxruntime", "eager", 1.5)
    assert speedups(dense, Timings({"eager": {1: 1.0}}), [8])["best_speedup_b8"] is None


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory, one_thread: None):  # type: ignore[no-untyped-def]
    from trp.train import TrainConfig, train

    run = tmp_path_factory.mktemp("c") / "run"
    train(TrainConfig(dataset="digits", epochs=1, batch_size=256), run, progress=False, log=lambda s: None)
    return run


def scripted_runtimes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whole models: dense 10/8/6 ms (eager/channels_last/torchscript) per 8 samples; a decomposed one
    (more convs) 0.5x that in eager and 0.9x elsewhere, so its best is eager and the dense model's torchscript."""
    from trp import runtimes as rt

    def fake(model, shape, batch=1, runtime="eager", threads=None, min_run_time=0.3, compile_timeout=120.0):  # type: ignore[no-untyped-def]
        convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
        base = {"eager": 10.0, "channels_last": 8.0, "torchscript": 6.0}[runtime] * batch / 8
        return base * ((0.5 if runtime == "eager" else 0.9) if convs > 21 else 1.0)

    monkeypatch.setattr(rt, "measure", fake)


def test_compress_reports_every_runtime_and_best_against_best(digits_run, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """report.json: both models' timings, each best runtime, best-vs-best speed-ups; layers checked in the dense best."""
    from trp.compress import compress

    scripted_runtimes(monkeypatch)
    layer_calls: list = []
    r = compress(digits_run, tmp_path / "c", "energy:0.9", latency_batch=8, log=lambda s: None,
                 runtimes=("eager", "channels_last", "torchscript"), cache_dir=str(tmp_path / "cache"),
                 timer=lambda m, s, b: layer_calls.append(b) or (1.0 if isinstance(m, nn.Conv2d) else 0.5))
    assert set(r["runtimes"]["dense"]["ms"]) == {"eager", "channels_last", "torchscript"}
    assert r["runtimes"]["compressed"]["ms"]["eager"] == {"1": 0.625, "8": 5.0}
    assert (r["dense_best_runtime_b8"], r["best_runtime_b8"]) == ("torchscript", "eager")
    assert r["best_speedup_b8"] == pytest.approx(6.0 / 5.0) and r["best_speedup_b1"] == pytest.approx(6.0 / 5.0)
    assert r["layer_check_runtime"] == "torchscript" and set(layer_calls) == {8}
    assert r["latency_ms_before"] == 8.0 and r["memory_format_before"] == "channels_last"  # eager's faster format
    assert r["latency_ms_after"] == 5.0 and r["memory_format_after"] == "contiguous"
    assert r["threads"] == torch.get_num_threads() and "predicted_ms_after" not in r


def test_compress_timing_rounds_time_the_two_models_in_turn(digits_run, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A dense model timed while the machine was busy (its first round at 2x) passes for a speed-up in one
    round; with 3 rounds the models take turns (dense, compressed | compressed, dense | dense, compressed)
    and each keeps its fastest, so the reported speed-up is the unloaded one."""
    from trp import runtimes as rt
    from trp.compress import compress

    order: list[str] = []

    def fake(model, shape, batch=1, runtime="eager", threads=None, min_run_time=0.3, compile_timeout=120.0):  # type: ignore[no-untyped-def]
        kind = "compressed" if sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 21 else "dense"
        if batch == 1:
            order.append(kind)
        return (5.0 if kind == "compressed" else 20.0 if order.count("dense") == 1 else 10.0) * batch / 8

    monkeypatch.setattr(rt, "measure", fake)
    kw = dict(latency_batch=8, check_latency=False, log=lambda s: None, runtimes=("eager",))
    one = compress(digits_run, tmp_path / "one", "energy:0.9", **kw)
    assert order == ["dense", "compressed"] and one["best_speedup_b8"] == pytest.approx(4.0)
    assert one["timing_rounds"] == 1
    order.clear()
    three = compress(digits_run, tmp_path / "three", "energy:0.9", timing_rounds=3, **kw)
    assert order == ["dense", "compressed", "compressed", "dense", "dense", "compressed"]
    assert three["best_speedup_b8"] == pytest.approx(2.0) and three["latency_ms_before"] == 10.0
    assert three["timing_rounds"] == 3
    with pytest.raises(TRPError, match=r"^timing rounds must be >= 1, got 0$"):
        compress(digits_run, tmp_path / "zero", "energy:0.9", timing_rounds=0, **kw)


def test_compress_with_a_latency_budget_predicts_beside_the_measured(digits_run, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """rank latency:S plans on the latency model in the layer runtime; the report holds predicted and measured ms;
    a second compression on the same cache times no layer."""
    from trp.compress import compress

    scripted_runtimes(monkeypatch)
    calls: list = []

    def timer(m, s, b):  # type: ignore[no-untyped-def]
        calls.append(m)
        if isinstance(m, nn.Conv2d):
            return 1.0
        return 0.2 + m[0].out_channels / 100 if isinstance(m, nn.Sequential) and len(m) == 2 else 40.0

    kw = dict(latency_batch=8, log=lambda s: None, runtimes=("eager", "torchscript"), cache_dir=str(tmp_path / "k"),
              timer=timer)
    r = compress(digits_run, tmp_path / "a", "latency:1.2", **kw)
    assert r["rank"] == "latency:1.2" and r["predicted_runtime"] == "torchscript" and r["predicted_batch_size"] == 8
    assert r["predicted_ms_before"] == 40.0 and r["predicted_ms_after"] <= 40.0 / 1.2 * 1.02
    assert r["measured_ms_after"] == r["runtimes"]["compressed"]["ms"]["torchscript"]["8"]
    assert r["predicted_error"] == pytest.approx(r["predicted_ms_after"] / r["measured_ms_after"] - 1, abs=1e-3)
    n = len(calls)
    r2 = compress(digits_run, tmp_path / "b", "latency:1.2", **kw)
    assert len(calls) == n and r2["predicted_ms_after"] == r["predicted_ms_after"]
