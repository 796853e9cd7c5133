"""The latency model and trp.latency(s), on scripted timings (a patched timer): no real-time assertions."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from torch import nn

import trp
from trp import latency_model as lat
from trp import rank as rank_mod
from trp.errors import TRPError
from trp.latency_model import LayerLatency, Target, ladder, latency_model, preferred_multiple
from trp.latency_budget import Latency, latency, solve_time
from trp.rank import kept_energy

SHAPE = (16, 8, 8)
DENSE = {(16, 16): 1.0, (16, 64): 4.0, (64, 64): 10.0}  # dense layer ms by (in, out) channels
MODEL_MS = 20.0  # the whole dense model: 5 ms outside the three layers


def with_spectrum(conv: nn.Conv2d, s: torch.Tensor) -> nn.Conv2d:
    """Give a conv the channel-layout singular values ``s`` (random orthogonal vectors, seeded)."""
    n, c, kh, kw = conv.weight.shape
    gen = torch.Generator().manual_seed(n * 1000 + c)
    u = torch.linalg.qr(torch.randn(n, n, generator=gen))[0][:, : len(s)]
    v = torch.linalg.qr(torch.randn(c * kh * kw, len(s), generator=gen))[0]
    with torch.no_grad():
        conv.weight.copy_(((u * s) @ v.T).reshape(n, c, kh, kw))
    return conv


def three_layers() -> nn.Sequential:
    """Layers "0" (16→16), "2" (16→64, fast-decaying spectrum), "4" (64→64, flat spectrum)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        with_spectrum(nn.Conv2d(16, 64, 3, padding=1), 0.9 ** torch.arange(64.0)), nn.ReLU(),
        with_spectrum(nn.Conv2d(64, 64, 3, padding=1), 1 - torch.arange(64.0) / 128),
    )


def scripted(step: int = 8, calls: list | None = None):  # type: ignore[no-untyped-def]
    """Dense layers take DENSE ms; the 16→16 layer's decomposed form is slower than dense at every
    rank; the others run in steps of ``step`` ranks (a kernel padding channels); the model 20 ms."""

    def timer(module: nn.Module, shape, batch: int) -> float:  # type: ignore[no-untyped-def]
        if calls is not None:
            calls.append((type(module).__name__, tuple(shape), batch))
        if isinstance(module, nn.Conv2d):
            return DENSE[(module.in_channels, module.out_channels)]
        if len(module) != 2:
            return MODEL_MS
        c, k, n = module[0].in_channels, module[0].out_channels, module[1].out_channels
        padded = math.ceil(k / step) * step
        return {(16, 16): 2.0 + 0.01 * k, (16, 64): 0.5 + 0.05 * padded, (64, 64): 1.0 + 0.1 * padded}[(c, n)]

    return timer


def decomposed_ms(name: str, k: int, step: int = 8) -> float:
    padded = math.ceil(k / step) * step
    return {"2": 0.5 + 0.05 * padded, "4": 1.0 + 0.1 * padded}[name]


def candidates(model: nn.Module) -> list:
    """The real ``plan.Candidate`` records plan() hands a whole-model budget (spectra filled in)."""
    seen = []

    class Capture(rank_mod.Speedup):
        def solve(self, layers, total, **context):  # type: ignore[no-untyped-def, override]
            seen.extend(layers)
            return {c.name: None for c in layers}

    trp.plan(model, "channel", Capture(1.0), input_shape=SHAPE)
    return seen


def test_ladder_stays_below_the_dense_macs_and_holds_the_probes() -> None:
    assert ladder(0) == [] and ladder(1) == [1]
    assert ladder(44) == [1, 2, 4, 8, 16, 24, 32, 40, 44]
    big = ladder(460)
    assert max(big) == 460 and {33, 36, 40, 48, 64} <= set(big) and len(big) < 30
    layers = lat.trace_layers(three_layers(), "channel", input_shape=SHAPE)
    assert [(lay.name, lat.max_rank(lay)) for lay in layers] == [("0", 14), ("2", 44), ("4", 57)]
    for lay in layers:  # the last timed rank still lowers the MACs, one more would not
        top = lat.max_rank(lay)
        assert top * lay.cost < lay.dense <= (top + 1) * lay.cost or top == lay.scheme.full_rank(lay.module)


def test_interpolation_is_piecewise_linear(tmp_path) -> None:  # type: ignore[no-untyped-def]
    lay = LayerLatency("a", "channel", 9.0, [1, 8, 16], [1.0, 2.0, 4.0], 20)
    assert lay.at(8) == 2.0 and lay.at(12) == 3.0 and lay.at(4) == pytest.approx(1 + 3 / 7)
    assert lay.at(20) == 5.0  # beyond the last measured rank: the last segment, extended
    t = latency_model(three_layers(), "channel", None, SHAPE, Target(cache_dir=tmp_path, timer=scripted()))
    two = t.layers["2"]
    assert two.at(12) == pytest.approx((decomposed_ms("2", 8) + decomposed_ms("2", 16)) / 2)
    assert two.at(24) == pytest.approx(decomposed_ms("2", 24))


def test_the_preferred_multiple_is_read_from_the_steps(tmp_path) -> None:  # type: ignore[no-untyped-def]
    def multiple(step: int) -> int:
        return latency_model(three_layers(), "channel", None, SHAPE,
                             Target(cache_dir=tmp_path / str(step), timer=scripted(step))).multiple

    assert (multiple(1), multiple(4), multiple(8), multiple(16)) == (1, 4, 8, 16)
    flat = LayerLatency("a", "channel", 9.0, [1, 4, 8, 16, 32], [1.0] * 5, 40)
    assert preferred_multiple([flat]) == 32
    assert preferred_multiple([]) == 1


def brute_force(model: nn.Module, m: int, budget: float) -> tuple[float, dict]:
    """The best energy over every combination of allowed ranks (and dense) within the budget."""
    spectra = {c.name: c.spectrum for c in candidates(model)}
    tops = {"2": 44, "4": 57}
    choices = {n: [None] + list(range(m, tops[n] + 1, m)) for n in tops}
    best = (-1.0, {})
    for k2, k4 in itertools.product(choices["2"], choices["4"]):
        ranks = {"2": k2, "4": k4}
        ms = MODEL_MS - sum(DENSE[key] for key in [(16, 64), (64, 64)]) + sum(
            decomposed_ms(n, k) if k else DENSE[{"2": (16, 64), "4": (64, 64)}[n]] for n, k in ranks.items())
        energy = sum(kept_energy(spectra[n], k) if k else 1.0 for n, k in ranks.items())
        if ms <= budget + 1e-9 and energy > best[0]:
            best = (energy, ranks)
    return best


def test_the_budget_picks_energy_per_millisecond_on_rank_multiples(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = three_layers()
    a = latency(2.0, cache_dir=tmp_path, timer=scripted()).allocate(candidates(model), model, SHAPE)
    assert a.multiple == 8 and a.ranks == {"0": None, "2": 16, "4": 16}
    assert "no faster than dense at any rank" in a.reasons["0"] and set(a.reasons) == {"0"}
    # the predicted time is the dense model's minus what each decomposed layer saves
    want = MODEL_MS - (4.0 - decomposed_ms("2", 16)) - (10.0 - decomposed_ms("4", 16))
    assert a.predicted_ms == pytest.approx(want) and a.predicted_ms <= MODEL_MS / 2
    assert a.table.predict(a.ranks) == pytest.approx(want) and a.speedup == pytest.approx(MODEL_MS / want)
    energy = sum(kept_energy(c.spectrum, a.ranks[c.name]) for c in candidates(model) if a.ranks[c.name])
    assert energy + 1.0 == pytest.approx(brute_force(model, 8, MODEL_MS / 2)[0] + 1.0)
    # more time to spend: more rank where it pays, never less
    b = latency(1.6, cache_dir=tmp_path, timer=scripted()).allocate(candidates(model), model, SHAPE)
    assert all(b.ranks[n] is None or b.ranks[n] >= a.ranks[n] for n in ("2", "4")) and b.ranks != a.ranks
    assert b.predicted_ms <= MODEL_MS / 1.6 and b.ranks["0"] is None


def test_forced_multiples_round_every_rank(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = three_layers()
    for m in (4, 16):
        a = latency(2.0, multiple=m, cache_dir=tmp_path, timer=scripted()).allocate(candidates(model), model, SHAPE)
        assert a.multiple == m and all(k is None or k % m == 0 for k in a.ranks.values()), a.ranks
        assert a.predicted_ms <= MODEL_MS / 2
    # rank 32 at least: 5 + 1 + 2.1 + 4.2 ms, 2x is out of reach
    with pytest.raises(TRPError, match="predicted 1.63x faster"):
        latency(2.0, multiple=32, cache_dir=tmp_path, timer=scripted()).solve(candidates(model), model=model)
    # ranks between two steps cost as much as the next step: rounding up to 8 is free, so never 4 or 12
    four = latency(2.0, multiple=4, cache_dir=tmp_path, timer=scripted()).solve(candidates(model), model=model)
    assert all(k is None or k % 8 == 0 for k in four.values())


def test_a_layer_slower_decomposed_stays_dense_and_out_of_reach_says_the_best(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = three_layers()
    assert latency(1.0, cache_dir=tmp_path, timer=scripted()).solve(candidates(model), model=model) == {
        "0": None, "2": None, "4": None}
    # at the fastest, "0" stays dense (1 ms) and "2", "4" go to rank 8: 5 + 1 + 0.9 + 1.8 = 8.7 ms
    with pytest.raises(TRPError, match=r"^latency speed-up 2.5x is out of reach: .* predicted 2.30x faster "
                                       r"\(eager, batch 128\)$"):
        latency(2.5, cache_dir=tmp_path, timer=scripted()).solve(candidates(model), model=model)
    tight = latency(2.29, cache_dir=tmp_path, timer=scripted()).solve(candidates(model), model=model)
    assert tight == {"0": None, "2": 8, "4": 8}


def test_solve_time_takes_the_most_energy_within_budget() -> None:
    opts = {"x": [(10, 1.0, None), (2, 0.5, 1), (4, 0.8, 2), (6, 0.95, 3)],
            "y": [(10, 1.0, None), (2, 0.9, 1), (4, 0.95, 2), (6, 0.99, 3)],
            "slow": [(1, 1.0, None), (2, 0.6, 1), (3, 0.9, 2)]}
    assert solve_time(opts, 0.0, 9.0) == ({"x": 3, "y": 1, "slow": None}, 9.0)
    assert solve_time(opts, 0.0, 13.0) == ({"x": 3, "y": 3, "slow": None}, 13.0)
    assert solve_time(opts, 0.0, 21.0) == ({"x": None, "y": None, "slow": None}, 21.0)
    assert solve_time(opts, 0.0, 1.0) == ({"x": 1, "y": 1, "slow": None}, 5.0)  # unreachable: the fastest
    # rank 2 of "x" is off its concave hull; the time left after the threshold goes where it buys most
    gaps = {"x": [(100, 1.0, None), (1, 0.5, 1), (2, 0.6, 2), (3, 0.9, 3)],
            "y": [(100, 1.0, None), (1, 0.5, 1), (2, 0.55, 2)]}
    assert solve_time(gaps, 0.0, 3.5) == ({"x": 2, "y": 1}, 3.0)


def test_a_second_run_on_the_same_machine_times_nothing(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    model = three_layers()
    calls: list = []
    first = latency(2.0, cache_dir=tmp_path, timer=scripted(calls=calls)).allocate(candidates(model), model, SHAPE)
    # 5 + 9 + 11 ladder ranks, 3 dense layers and the model; every timing at batch 128 and the traced shape
    assert len(calls) == 29 and {c[2] for c in calls} == {128}
    assert ("Conv2d", (64, 8, 8), 128) in calls and ("Sequential", SHAPE, 128) in calls
    calls.clear()
    again = latency(2.0, cache_dir=tmp_path, timer=scripted(calls=calls)).allocate(candidates(model), model, SHAPE)
    assert calls == [] and again.ranks == first.ranks and again.predicted_ms == first.predicted_ms
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".json"  # atomic writes leave no temporaries
    data = json.loads(files[0].read_text())
    assert data["format"] == lat.FORMAT and data["key"]["batch_size"] == 128 and data["key"]["memory_format"] == "contiguous"
    assert {"cpu", "cores", "torch", "runtime", "runtime_version", "threads", "dtype"} <= set(data["key"])
    latency(2.0, batch_size=1, cache_dir=tmp_path, timer=scripted(calls=calls)).solve(candidates(model), model=model)
    assert len(calls) == 29 and len(list(tmp_path.iterdir())) == 2  # another target: another table
    # the module-level timer can be patched too, and $TRP_CACHE_DIR moves the default cache
    monkeypatch.setenv("TRP_CACHE_DIR", str(tmp_path / "env"))
    monkeypatch.setattr(lat, "time_module", lambda m, s, b, runtime, threads, t: scripted(calls=calls)(m, s, b))
    calls.clear()
    env = latency(2.0, runtime="channels_last").allocate(candidates(model), model, SHAPE)
    assert len(calls) == 29 and env.ranks == first.ranks
    assert [p.name.split("-")[0] for p in (tmp_path / "env" / "latency").iterdir()] == ["channels_last"]


def test_a_damaged_cache_is_measured_again(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model, calls = three_layers(), []
    latency(2.0, cache_dir=tmp_path, timer=scripted(calls=calls)).solve(candidates(model), model=model)
    (path,) = tmp_path.iterdir()
    path.write_text('{"format": "trp-latency/1", "key": ')
    calls.clear()
    with pytest.warns(UserWarning, match="damaged latency cache"):
        latency(2.0, cache_dir=tmp_path, timer=scripted(calls=calls)).solve(candidates(model), model=model)
    assert len(calls) == 29 and json.loads(path.read_text())["format"] == lat.FORMAT


def test_a_shared_layer_counts_per_call(tmp_path) -> None:  # type: ignore[no-untyped-def]
    lin = nn.Linear(64, 64)
    calls: list = []

    def timer(module, shape, batch):  # type: ignore[no-untyped-def]
        calls.append(module)
        return 3.0 if isinstance(module, nn.Linear) else 1.0

    t = latency_model(nn.Sequential(lin, nn.ReLU(), lin), "linear", None, (64,), Target(8, cache_dir=tmp_path, timer=timer))
    (lay,) = t.layers.values()
    assert lay.dense_ms == 6.0 and lay.ms == [2.0] * len(lay.ranks)  # two calls, each timed once
    assert len(calls) == 1 + len(lay.ranks) + 1


def test_arguments_are_checked_with_one_line_errors() -> None:
    with pytest.raises(TRPError, match="latency speed-up must be >= 1"):
        latency(0.5)
    with pytest.raises(TRPError, match="rank multiple must be one of 1, 4, 8, 16, 32, got 3"):
        latency(2, multiple=3)
    with pytest.raises(TRPError, match="unknown runtime"):
        latency(2, runtime="tensorrt")
    with pytest.raises(TRPError, match="batch size must be >= 1"):
        latency(2, batch_size=0)
    with pytest.raises(TRPError, match=r"^latency:2 needs the dense model's time"):
        Latency(2, timer=scripted(), cache_dir="/nonexistent").solve([])
    assert str(latency(2.5)) == "latency:2.5" and latency(2) == Latency(2.0)


def test_real_timings_fill_a_table(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    t = latency_model(model, "linear", None, (32,), Target(4, threads=1, min_run_time=0.01, model_run_time=0.01,
                                                           cache_dir=tmp_path))
    assert set(t.layers) == {"0", "2"} and t.model_ms > 0
    assert all(ms > 0 for lay in t.layers.values() for ms in [lay.dense_ms, *lay.ms])
    assert t.key["threads"] == 1 and t.predict({"0": None, "2": None}) == t.model_ms


def test_plan_takes_a_latency_budget(tmp_path) -> None:
    """trp.plan(model, rank=trp.latency(s)) allocates by measured time; a layer no faster decomposed stays dense, with why."""
    model = nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1),
                          nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1))

    def fake(module, shape, batch):  # dense convs 1 ms; "2" decomposed 0.2 + k/100 ms; "4" decomposed 1.5 ms
        if isinstance(module, nn.Conv2d):
            return 1.0
        if isinstance(module, nn.Sequential) and len(module) == 2:
            return 1.5 if module[1].out_channels == 64 else 0.2 + module[0].out_channels / 100
        return 3.0

    p = trp.plan(model, "channel", trp.latency(1.2, timer=fake, cache_dir=str(tmp_path), model_ms=3.0),
                 filter_fn=lambda m, n: n in ("2", "4"), input_shape=(8, 16, 16))
    layers = {lp.name: lp for lp in p.layers}
    assert p.criterion == "latency:1.2"
    assert layers["2"].decomposed and 0.2 + layers["2"].rank / 100 <= 0.5 + 1e-9  # within 3 ms / 1.2
    assert not layers["4"].decomposed and "latency:1.2 keeps it dense" in layers["4"].reason


def test_rounds_time_every_form_in_turn_and_keep_the_fastest(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """With rounds=2 a layer's forms are timed dense, ranks..., dense, ranks... and each keeps its minimum: a spike
    on the dense form in one round does not pass for a saving."""
    lays = lat.trace_layers(nn.Sequential(nn.Linear(16, 16)), "linear", input_shape=(16,))
    order: list[str] = []

    def timer(module, shape, batch):  # type: ignore[no-untyped-def]
        order.append("dense" if isinstance(module, nn.Linear) else f"r{module[0].out_features}")
        if isinstance(module, nn.Linear):
            return 9.0 if len(order) == 1 else 2.0  # a spike in round 1
        return 1.0 + module[0].out_features / 10 + (0.5 if order.count(order[-1]) == 1 else 0.0)  # round 1 slower

    t = lat.measure_layers(lays, Target(4, cache_dir=str(tmp_path), timer=timer, rounds=2)).layers["0"]
    ranks = [f"r{k}" for k in t.ranks]
    assert order == ["dense", *ranks, "dense", *ranks]
    assert t.dense_ms == 2.0 and t.ms == [1.0 + k / 10 for k in t.ranks]
    with pytest.raises(TRPError, match="timing rounds must be >= 1"):
        Target(rounds=0)
