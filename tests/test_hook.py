"""TRP in a training loop: projection, nuclear sub-gradient, parameter identity, schedules, state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trp import svd as svd_mod
from trp.errors import TRPError
from trp.hook import TRP, default_filter, ramp
from trp.rank import energy_rank


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(),
        nn.Conv2d(12, 12, (3, 1), padding=(1, 0)), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 4),
    )


def _step(model: nn.Module, reg: TRP, opt: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(4, 3, 6, 6, generator=g), torch.randint(0, 4, (4,), generator=g)
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    reg.regularize()
    opt.step()
    reg.step()


@pytest.mark.parametrize("scheme", ["channel", "spatial", "decouple"])
def test_projection_every_period_gives_energy_rank(scheme: str) -> None:
    """Every `period` steps each eligible weight becomes its truncated SVD at the energy rank (Eq. 1-3)."""
    model = _net()
    reg = TRP(model, scheme=scheme, energy=0.8, period=3, nuclear=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(2):
        _step(model, reg, opt, i)
    _step(model, reg, opt, 2)  # third step: projection happens after the optimizer step
    for layer in reg.layers:
        mat = svd_mod.to_matrix(layer.weight.detach().double(), scheme)
        s = torch.linalg.svdvals(mat)
        spec = svd_mod.spectrum(s)
        k = layer.rank
        assert int((spec > 1e-5 * spec[0]).sum()) == k
        assert 1 <= k < spec.numel()


def test_projection_matches_reference_truncation() -> None:
    """The projected weight equals U_k S_k V_kᵀ of the pre-projection weight (Eckart-Young optimum)."""
    model = _net()
    reg = TRP(model, energy=0.7, period=1, nuclear=0.0)
    w = model[2].weight.detach().clone()
    reg.step()
    mat = svd_mod.to_matrix(w.double(), "channel")
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    k = energy_rank(s, 0.7)
    ref = svd_mod.from_matrix(svd_mod.truncate(u, s, vh, k), "channel", w.shape)
    assert torch.allclose(model[2].weight.double(), ref, atol=1e-5)
    assert reg.ranks()["2"] == k


def test_parameter_identity_and_momentum_survive_projection() -> None:
    """Projection writes in place, so the optimizer keeps the same parameters and their momentum."""
    model = _net()
    ids = [id(p) for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    reg = TRP(model, energy=0.8, period=2, nuclear=3e-4)
    for i in range(4):
        _step(model, reg, opt, i)
    assert [id(p) for p in model.parameters()] == ids
    assert all("momentum_buffer" in opt.state[p] for p in model.parameters())
    assert model[2].weight is reg.layers[0].weight


def test_nuclear_subgradient_is_added_to_gradient() -> None:
    """regularize() adds exactly λ·U_k V_kᵀ of the latest SVD to each eligible gradient (Eq. 4-5)."""
    model = _net()
    lam = 0.01
    reg = TRP(model, energy=0.9, period=5, nuclear=lam)
    x = torch.randn(2, 3, 6, 6)
    model(x).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    reg.regularize()
    w = model[2].weight.detach().double()
    u, s, vh = torch.linalg.svd(svd_mod.to_matrix(w, "channel"), full_matrices=False)
    k = energy_rank(s, 0.9)
    expected = grads["2.weight"].double() + lam * svd_mod.from_matrix(u[:, :k] @ vh[:k], "channel", w.shape)
    assert torch.allclose(model[2].weight.grad.double(), expected, atol=1e-6)
    assert torch.equal(model[0].weight.grad, grads["0.weight"])  # the first conv is not regularized
    assert torch.equal(model[8].weight.grad, grads["8.weight"])  # nor the classifier


def test_nuclear_zero_and_nuclear_only() -> None:
    """nuclear=0 leaves gradients alone; project=False never changes weights outside the optimizer."""
    model = _net()
    reg = TRP(model, energy=0.5, period=1, nuclear=0.0)
    model(torch.randn(2, 3, 6, 6)).sum().backward()
    g = model[2].weight.grad.clone()
    reg.regularize()
    assert torch.equal(model[2].weight.grad, g)

    model = _net()
    reg = TRP(model, energy=0.5, period=1, nuclear=1e-2, project=False)
    w = model[2].weight.detach().clone()
    reg.step()
    assert torch.equal(model[2].weight, w)
    assert reg.layers[0].subgradient is not None and reg.layers[0].subgradient.abs().sum() > 0


def test_default_filter_follows_paper_code() -> None:
    """Every conv except the first is eligible; Linear layers are not."""
    model = _net()
    f = default_filter(model)
    assert [n for n, m in model.named_modules() if f(m, n)] == ["2", "4"]
    reg = TRP(model, filter_fn=lambda m, n: n == "4")
    assert [layer.name for layer in reg.layers] == ["4"]


def test_energy_ramp_schedule() -> None:
    """A ramped energy starts at 1.0 (no truncation) and reaches e after the ramp."""
    f = ramp(0.6, 10)
    assert f(0) == 1.0 and f(10) == 0.6 and abs(f(5) - 0.8) < 1e-12
    model = _net()
    reg = TRP(model, energy=ramp(0.5, 100), period=1, nuclear=0.0)
    full = reg.ranks()["4"]
    reg.step()  # energy ≈ 0.995: barely truncated
    assert reg.ranks()["4"] >= full - 2
    reg.steps = 200
    reg.step()
    assert reg.ranks()["4"] < full


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
@pytest.mark.parametrize("target", [1.5, 2.5])
def test_speedup_projection_meets_the_macs_budget(scheme: str, target: float) -> None:
    """With speedup=s the projected ResNet-20 decomposes at s x fewer MACs (within the solver's 2 %)."""
    import trp
    from trp.models import create

    torch.manual_seed(0)
    model = create("resnet20")
    reg = TRP(model, scheme, speedup=target, period=1, nuclear=0.0, input_shape=(3, 32, 32))
    reg.project_now()
    # The projected weights are exactly low-rank: decomposing at their numerical rank loses nothing.
    p = trp.plan(model, scheme, trp.value(1e-5), default_filter(model), (3, 32, 32))
    assert abs(p.speedup / target - 1) < 0.02
    assert {lp.name: lp.rank for lp in p.layers if lp.decomposed} == {
        name: k for name, k in reg.ranks().items() if k < next(lp.full_rank for lp in p.layers if lp.name == name)}


def test_speedup_schedule_ramps_and_freeze_fixes_ranks() -> None:
    """A ramped target lowers the total rank step by step; after `freeze` steps the ranks stay put."""
    model = _net()
    reg = TRP(model, speedup=ramp(3.0, 4), period=1, nuclear=1e-3, freeze=3, input_shape=(3, 6, 6))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(8):
        _step(model, reg, opt, i)
    totals = [sum(r.values()) for _, r in reg.history]
    full = sum(min(svd_mod.to_matrix(layer.weight, "channel").shape) for layer in reg.layers)
    assert totals[0] == full  # step 0 of the ramp: 1x, nothing truncated
    assert totals[0] >= totals[1] >= totals[2] >= totals[3] and totals[0] > totals[3]
    assert all(r == reg.history[3][1] for _, r in reg.history[3:])  # selected at step 3, frozen after
    for layer in reg.layers:  # and the weights really sit at those ranks
        s = torch.linalg.svdvals(svd_mod.to_matrix(layer.weight.detach().double(), "channel"))
        assert int((s > 1e-6 * s[0]).sum()) == layer.rank


def test_freeze_keeps_energy_ranks() -> None:
    """With per-layer energy, freezing stops the rank from falling further at later projections."""
    model = _net()
    reg = TRP(model, energy=0.6, period=1, nuclear=0.0, freeze=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for i in range(5):
        _step(model, reg, opt, i)
    assert all(r == reg.history[1][1] for _, r in reg.history[1:])
    free = TRP(_net(), energy=0.6, period=1, nuclear=0.0)
    opt = torch.optim.SGD(free.model.parameters(), lr=0.5)
    for i in range(5):
        _step(free.model, free, opt, i)
    assert sum(free.ranks().values()) < sum(reg.ranks().values())  # without freeze, e = 0.6 keeps cutting


def test_state_dict_round_trip() -> None:
    """The TRP state (step count, ranks, sub-gradients) restores exactly for resuming."""
    model = _net()
    reg = TRP(model, energy=0.7, period=2, nuclear=1e-3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(3):
        _step(model, reg, opt, i)
    state = reg.state_dict()
    other = TRP(model, energy=0.7, period=2, nuclear=1e-3)
    other.load_state_dict(state)
    assert other.steps == reg.steps and other.ranks() == reg.ranks()
    for a, b in zip(reg.layers, other.layers):
        assert torch.equal(a.subgradient, b.subgradient)
    with pytest.raises(TRPError):
        other.load_state_dict({"steps": torch.tensor(1)})


@pytest.mark.parametrize(
    "kwargs", [{"energy": 0.0}, {"energy": 1.5}, {"period": 0}, {"nuclear": -1.0}, {"nuclear": float("inf")},
               {"scheme": "linear"}, {"filter_fn": lambda m, n: False}, {"speedup": 0.5},
               {"speedup": float("inf")}, {"speedup": 1000.0}, {"freeze": -1}, {"freeze": 2.5}, {"freeze": True}]
)
def test_invalid_arguments_raise(kwargs: dict) -> None:
    """Bad settings are refused with a TRPError, not a crash later."""
    with pytest.raises(TRPError):
        TRP(_net(), **kwargs)


def test_amp_step_keeps_float32_weights() -> None:
    """Under bfloat16 autocast the SVD still runs in float32 and the weights stay float32."""
    model = _net()
    reg = TRP(model, energy=0.8, period=1, nuclear=1e-3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(torch.randn(2, 3, 6, 6)).float().sum()
    loss.backward()
    reg.regularize()
    opt.step()
    reg.step()
    assert model[2].weight.dtype == torch.float32
    assert torch.isfinite(model[2].weight).all()


def test_wrapped_model_is_unwrapped() -> None:
    """A wrapper with `.module` (DataParallel/DDP style) is looked through."""

    class Wrapper(nn.Module):
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    inner = _net()
    reg = TRP(Wrapper(inner))
    assert reg.layers[0].weight is inner[2].weight
