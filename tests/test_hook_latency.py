"""TRP(latency=s): ranks chosen for measured time at every projection, on scripted timings (no real time)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trp.errors import TRPError
from trp.hook import TRP, ramp
from trp.latency_budget import allocate
from trp.latency_model import Target

SHAPE = (8, 8, 8)
MODEL_MS = 6.0  # the whole dense model: 3 ms outside the three timed layers


def model() -> nn.Sequential:
    """Layers "0" (first, never trained), "3" (8→32), "5" (32→32, decomposed form slower at every rank), "7" (32→32)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1))


def scripted():  # type: ignore[no-untyped-def]
    """Dense layers 1 ms, decomposed ones 0.1 + k/40 ms, the whole model 6 ms; records what it timed."""
    calls: list[nn.Module] = []

    def timer(module: nn.Module, shape, batch: int) -> float:  # type: ignore[no-untyped-def]
        calls.append(module)
        if isinstance(module, nn.Conv2d):
            return 1.0
        if isinstance(module, nn.Sequential) and len(module) == 2:
            return 0.1 + module[0].out_channels / 40
        return MODEL_MS

    return timer, calls


def target(tmp_path, timer) -> Target:  # type: ignore[no-untyped-def]
    return Target(batch_size=8, cache_dir=str(tmp_path), timer=timer)


def step(net: nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    net(torch.randn(2, *SHAPE)).pow(2).mean().backward()
    opt.step()


def slow_five(module: nn.Module, shape, batch: int) -> float:  # type: ignore[no-untyped-def]
    """Dense 1 ms; decomposed 32→32 layers 2 ms at every rank (so "5" and "7" stay dense), 8→32 0.1 + k/40; model 6 ms."""
    if isinstance(module, nn.Conv2d):
        return 1.0
    if isinstance(module, nn.Sequential) and len(module) == 2:
        return 2.0 if module[0].in_channels == 32 else 0.1 + module[0].out_channels / 40
    return MODEL_MS


def test_projections_take_the_ranks_of_the_time_budget(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Every projection's ranks are the time budget's allocation from the current spectra, within budget."""
    timer, calls = scripted()
    net = model()
    reg = TRP(net, latency=1.5, latency_target=target(tmp_path, timer), period=1, nuclear=0, input_shape=SHAPE)
    assert set(reg.latency_table.layers) == {"3", "5", "7"} and reg.latency_table.model_ms == MODEL_MS
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    with reg.attach(opt):
        step(net, opt)
    spectra = {layer.name: layer.spectrum for layer in reg.layers}
    want = allocate(reg.latency_table, spectra, 1.5)
    full = {layer.name: layer.spectrum.numel() for layer in reg.layers}
    assert reg.ranks() == {n: want.ranks[n] or full[n] for n in full}
    assert reg.allocation.predicted_ms <= MODEL_MS / 1.5 + 1e-9
    assert any(k < full[n] for n, k in reg.ranks().items())
    # the projected weights really have those ranks
    assert torch.linalg.matrix_rank(net[3].weight.detach().flatten(1)) == reg.ranks()["3"]


def test_a_layer_slower_decomposed_keeps_its_full_rank(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """With the 32→32 layers slower decomposed at every rank, only "3" is cut (within budget); the others keep full rank."""
    net = model()
    reg = TRP(net, latency=1.1, latency_target=target(tmp_path, slow_five), period=1, nuclear=0, input_shape=SHAPE)
    ranks = reg.ranks()
    assert ranks["5"] == 32 and ranks["7"] == 32 and ranks["3"] <= 14  # 0.1 + 14/40 ms fits 6 / 1.1 ms
    assert "no faster than dense" in reg.allocation.reasons["5"]


def test_out_of_reach_is_refused_at_once_for_constants_and_ramps(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A target beyond every layer's fastest measured form is one TRPError at construction, ramp end included."""
    timer, _ = scripted()
    for latency in (3.0, ramp(3.0, 100)):
        with pytest.raises(TRPError, match=r"^latency speed-up 3x is out of reach: .* predicted 1\.\d\dx faster"):
            TRP(model(), latency=latency, latency_target=target(tmp_path, timer), input_shape=SHAPE)


def test_ramp_and_freeze_work_as_with_speedup(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A ramp starts dense (full ranks) and tightens; after freeze the ranks stay whatever the schedule says."""
    timer, _ = scripted()
    net = model()
    reg = TRP(net, latency=ramp(1.5, 4), freeze=4, latency_target=target(tmp_path, timer), period=1, nuclear=0,
              input_shape=SHAPE)
    full = {layer.name: layer.spectrum.numel() for layer in reg.layers}
    assert reg.ranks() == full and reg.allocation is None  # s = 1 at step 0: nothing cut
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    with reg.attach(opt):
        for _ in range(4):
            step(net, opt)
        at_freeze = reg.ranks()
        assert at_freeze != full and reg.current_latency() == 1.5
        reg.latency = 1.0  # would restore full ranks if the ranks were not frozen
        for _ in range(3):
            step(net, opt)
    assert reg.frozen() and reg.ranks() == at_freeze


def test_latency_is_exclusive_with_speedup_and_checked() -> None:
    """speedup and latency together, a stray latency_target, a bad target type or s < 1 are one-line errors."""
    with pytest.raises(TRPError, match=r"^give speedup \(MACs\) or latency \(measured time\), not both$"):
        TRP(model(), speedup=2.0, latency=2.0, input_shape=SHAPE)
    with pytest.raises(TRPError, match="latency_target needs latency"):
        TRP(model(), latency_target=Target(), input_shape=SHAPE)
    with pytest.raises(TRPError, match="latency_target must be a trp.latency_model.Target, got dict"):
        TRP(model(), latency=2.0, latency_target={"batch_size": 8}, input_shape=SHAPE)  # type: ignore[arg-type]
    with pytest.raises(TRPError, match="latency speed-up must be >= 1"):
        TRP(model(), latency=0.5, input_shape=SHAPE)


def test_the_table_is_measured_once_on_the_folded_model_and_cached(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Construction times the eligible layers and the BN-folded model; a second TRP on the same machine times nothing."""
    timer, calls = scripted()
    TRP(model(), latency=1.2, latency_target=target(tmp_path, timer), input_shape=SHAPE)
    whole = [m for m in calls if isinstance(m, nn.Sequential) and len(m) > 2]
    assert len(whole) == 1 and not any(isinstance(m, nn.BatchNorm2d) for m in whole[0].modules())
    timed_convs = {(m.in_channels, m.out_channels) for m in calls if isinstance(m, nn.Conv2d)}
    assert timed_convs == {(8, 32), (32, 32)}  # the first conv is not trained by TRP, so not timed
    n = len(calls)
    TRP(model(), latency=1.2, latency_target=target(tmp_path, timer), input_shape=SHAPE)
    assert len(calls) == n
