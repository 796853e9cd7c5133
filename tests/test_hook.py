"""TRP in a training loop: projection, nuclear sub-gradient, optimizer hooks, AMP, schedules, state.

The sub-gradient and projection checks build every scheme's matrix layout here, from its
definition, independently of :mod:`trp.schemes`, so that a layout mix-up in TRP (say, the spatial
sub-gradient put back with the channel reshape: a valid shape with wrong values) fails them.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from trp.errors import TRPError
from trp.hook import TRP, Ramp, ramp
from trp.rank import energy_rank
from trp.schemes import names
from trp.surgery import default_filter


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(),
        nn.Conv2d(12, 12, (3, 1), padding=(1, 0)), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 4),
    )


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(108, 24), nn.ReLU(), nn.Linear(24, 20), nn.ReLU(), nn.Linear(20, 4))


def _model(scheme: str, seed: int = 0) -> tuple[nn.Module, dict]:
    """A model and the TRP arguments that make every layer of it suit ``scheme``."""
    if scheme == "linear":
        return _mlp(seed), {"scheme": "linear", "filter_fn": lambda m, n: isinstance(m, nn.Linear)}
    model = _net(seed)
    if scheme == "decouple":
        # Filters of unlike spectra: the shared rank must come from sqrt(Σ_n σ_{n,i}²), and one
        # filter's spectrum alone (here filter 0, nearly rank 1) would give a different rank.
        with torch.no_grad():
            for conv in (model[2], model[4]):
                _, c, kh, kw = conv.weight.shape
                one = torch.outer(torch.randn(c), torch.randn(kh * kw)).reshape(c, kh, kw)
                size = conv.weight[0].norm()
                conv.weight[0] = size * one / one.norm() + 0.1 * conv.weight[0]
    return model, {"scheme": scheme}


def _batch(seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 6, 6, generator=g), torch.randint(0, 4, (4,), generator=g)


def _step(model: nn.Module, reg: TRP, opt: torch.optim.Optimizer, seed: int) -> None:
    """One step of a custom loop: the manual calls."""
    x, y = _batch(seed)
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    reg.regularize()
    opt.step()
    reg.step()


def _plain_step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    """One step of a plain loop: TRP is attached to the optimizer."""
    x, y = _batch(seed)
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


# --------------------------------------------------------- each scheme's layout, from its definition


def _index(shape: torch.Size) -> tuple[Tensor, Tensor]:
    """Row and column of W[n, c, y, x] in the spatial matrix M[(c, y), (n, x)] (Jaderberg et al.)."""
    _, _, kh, kw = shape
    n, c, y, x = torch.meshgrid(*(torch.arange(d) for d in shape), indexing="ij")
    return c * kh + y, n * kw + x


def _to_matrix(w: Tensor, scheme: str) -> Tensor:
    if scheme == "linear":
        return w
    n, c, kh, kw = w.shape
    if scheme == "channel":  # one row per output filter
        return w.reshape(n, c * kh * kw)
    if scheme == "decouple":  # a batch of N matrices C × (kh·kw)
        return w.reshape(n, c, kh * kw)
    rows, cols = _index(w.shape)
    m = w.new_zeros(c * kh, n * kw)
    m[rows, cols] = w
    return m


def _from_matrix(m: Tensor, scheme: str, shape: torch.Size) -> Tensor:
    if scheme == "spatial":
        rows, cols = _index(shape)
        return m[rows, cols]
    return m.reshape(shape)


def _reference(w: Tensor, scheme: str, e: float) -> tuple[int, Tensor, Tensor]:
    """(k, U_k V_kᵀ, U_k S_k V_kᵀ) of a weight, in float64, back in the weight's shape."""
    u, s, vh = torch.linalg.svd(_to_matrix(w.detach().double(), scheme), full_matrices=False)
    spectrum = s if s.dim() == 1 else s.pow(2).sum(0).sqrt()  # decouple: one rank shared by the batch
    k = energy_rank(spectrum, e)
    sub = u[..., :, :k] @ vh[..., :k, :]
    low = (u[..., :, :k] * s[..., None, :k]) @ vh[..., :k, :]
    return k, _from_matrix(sub, scheme, w.shape), _from_matrix(low, scheme, w.shape)


def _numerical_rank(w: Tensor, scheme: str, tol: float = 1e-5) -> int:
    s = torch.linalg.svdvals(_to_matrix(w.detach().double(), scheme))
    spectrum = s if s.dim() == 1 else s.pow(2).sum(0).sqrt()
    return int((spectrum > tol * spectrum[0]).sum())


def test_test_layouts_are_the_definitions() -> None:
    """The test's own spatial layout puts W[n, c, y, x] at M[c·kh + y, n·kw + x], and inverts."""
    w = torch.randn(5, 4, 3, 2)
    m = _to_matrix(w, "spatial")
    assert m.shape == (12, 10) and m[2 * 3 + 1, 3 * 2 + 1] == w[3, 2, 1, 1]
    assert torch.equal(_from_matrix(m, "spatial", w.shape), w)


# --------------------------------------------------------- projection and sub-gradient, every scheme


@pytest.mark.parametrize("scheme", names())
def test_nuclear_subgradient_matches_independent_reference(scheme: str) -> None:
    """Each layer's sub-gradient is U_k V_kᵀ of its own layout, put back in place, and regularize()
    adds exactly λ times it to the gradient (Eq. 4-5); the other layers' gradients are untouched."""
    model, kwargs = _model(scheme)
    lam = 0.01
    reg = TRP(model, energy=0.9, period=5, nuclear=lam, **kwargs)
    x, y = _batch(0)
    nn.functional.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    reg.regularize()
    modules = dict(model.named_modules())
    for layer in reg.layers:
        k, sub, _ = _reference(layer.weight, scheme, 0.9)
        assert layer.rank == k
        assert torch.allclose(layer.subgradient.double(), sub, atol=1e-4), layer.name
        expected = grads[f"{layer.name}.weight"].double() + lam * sub
        assert torch.allclose(modules[layer.name].weight.grad.double(), expected, atol=1e-6), layer.name
    eligible = {f"{layer.name}.weight" for layer in reg.layers}
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters() if n not in eligible)


@pytest.mark.parametrize("scheme", names())
def test_projection_matches_reference_truncation(scheme: str) -> None:
    """The projected weight is U_k S_k V_kᵀ of the pre-projection weight in the scheme's own layout
    (Eckart-Young), at the energy rank of the pre-projection spectrum (Eq. 1-3)."""
    model, kwargs = _model(scheme)
    reg = TRP(model, energy=0.7, period=1, nuclear=0.0, **kwargs)
    before = {layer.name: layer.weight.detach().clone() for layer in reg.layers}
    reg.step()
    for layer in reg.layers:
        k, _, low = _reference(before[layer.name], scheme, 0.7)
        assert 1 <= k < _numerical_rank(before[layer.name], scheme)
        assert reg.ranks()[layer.name] == k
        assert torch.allclose(layer.weight.double(), low, atol=1e-5), layer.name
        assert _numerical_rank(layer.weight, scheme) == k


@pytest.mark.parametrize("scheme", ["channel", "spatial", "decouple"])
def test_projection_every_period_gives_energy_rank(scheme: str) -> None:
    """Every `period` steps each eligible weight becomes its truncated SVD at the energy rank (Eq. 1-3)."""
    model = _net()
    reg = TRP(model, scheme=scheme, energy=0.8, period=3, nuclear=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reg.attach(opt)
    for i in range(2):
        _plain_step(model, opt, i)
    before = {layer.name: layer.weight.detach().clone() for layer in reg.layers}
    _plain_step(model, opt, 2)  # third step: projection happens after the optimizer step
    for layer in reg.layers:
        k = layer.rank
        assert _numerical_rank(layer.weight, scheme) == k
        assert 1 <= k < _numerical_rank(before[layer.name], scheme)


def test_linear_scheme_lowers_mlp_ranks() -> None:
    """scheme='linear' trains an MLP's Linear layers into low rank."""
    model, kwargs = _model("linear")
    reg = TRP(model, energy=0.6, period=2, nuclear=1e-3, **kwargs)
    assert [layer.name for layer in reg.layers] == ["1", "3", "5"]
    full = {layer.name: min(layer.weight.shape) for layer in reg.layers}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reg.attach(opt)
    for i in range(4):
        _plain_step(model, opt, i)
    assert reg.steps == 4 and len(reg.history) == 3  # the initial SVD and two projections
    assert all(reg.ranks()[n] < full[n] for n in full)
    assert all(_numerical_rank(layer.weight, "linear") == layer.rank for layer in reg.layers)


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


# --------------------------------------------------------- layers and schemes


def test_default_filter_follows_paper_code() -> None:
    """Every conv except the first is eligible; Linear layers are not."""
    model = _net()
    f = default_filter(model)
    assert [n for n, m in model.named_modules() if f(m, n)] == ["2", "4"]
    reg = TRP(model, filter_fn=lambda m, n: n == "4")
    assert [layer.name for layer in reg.layers] == ["4"]


def test_layer_the_scheme_cannot_handle_is_an_error() -> None:
    """A layer filter_fn accepts but the scheme cannot decompose is named, not silently skipped."""
    with pytest.raises(TRPError, match=r"layer '8' \(Linear\) accepted by filter_fn: Linear is not handled by "
                                        r"scheme 'channel' \(use scheme 'linear'\)"):
        TRP(_net(), filter_fn=lambda m, n: isinstance(m, (nn.Conv2d, nn.Linear)) and n != "0")
    grouped = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 3, groups=8))
    with pytest.raises(TRPError, match=r"layer '1' \(Conv2d\) accepted by filter_fn: groups=8"):
        TRP(grouped, "spatial", filter_fn=lambda m, n: isinstance(m, nn.Conv2d))
    with pytest.raises(TRPError, match=r"layer '2' \(Conv2d\) .*not handled by scheme 'linear'"):
        TRP(_net(), "linear")


def test_every_registered_scheme_is_accepted() -> None:
    """The TRP scheme names are the registry's; an unknown one lists them all."""
    for scheme in names():
        model, kwargs = _model(scheme)
        assert TRP(model, **kwargs).scheme == scheme
    with pytest.raises(TRPError, match="unknown TRP scheme 'tucker'; choose one of: " + ", ".join(names())):
        TRP(_net(), "tucker")


# --------------------------------------------------------- the optimizer hooks


def test_attach_is_bit_identical_to_the_manual_loop() -> None:
    """attach(opt) + a plain loop gives exactly the weights, ranks and state of regularize()/step()."""
    manual_model, hooked_model = _net(), _net()
    manual = TRP(manual_model, energy=0.8, period=2, nuclear=1e-2)
    hooked = TRP(hooked_model, energy=0.8, period=2, nuclear=1e-2)
    manual_opt = torch.optim.SGD(manual_model.parameters(), lr=0.1, momentum=0.9)
    hooked_opt = torch.optim.SGD(hooked_model.parameters(), lr=0.1, momentum=0.9)
    hooked.attach(hooked_opt)
    for i in range(5):
        _step(manual_model, manual, manual_opt, i)
        _plain_step(hooked_model, hooked_opt, i)
    assert hooked.steps == manual.steps == 5 and hooked.history == manual.history and len(hooked.history) == 3
    for a, b in zip(manual_model.parameters(), hooked_model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(manual.layers, hooked.layers):
        assert torch.equal(a.subgradient, b.subgradient)


def test_remove_stops_the_hooks() -> None:
    """After remove() opt.step() is plain SGD: no sub-gradient, no counting, no projection."""
    model = _net()
    reg = TRP(model, energy=0.5, period=1, nuclear=1e-2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = reg.attach(opt)
    _plain_step(model, opt, 0)
    assert reg.steps == 1 and handle.attached
    handle.remove()
    handle.remove()  # idempotent
    assert not handle.attached
    x, y = _batch(1)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    expected = {n: p.detach().clone().add_(p.grad, alpha=-0.1) for n, p in model.named_parameters()}
    opt.step()
    assert reg.steps == 1 and len(reg.history) == 2
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())
    assert all(torch.equal(p, expected[n]) for n, p in model.named_parameters())
    reg.step()  # the manual calls work again
    assert reg.steps == 2
    with reg.attach(opt) as again:  # and it can be attached anew; the context manager removes it
        assert again.attached
    assert not again.attached


def test_manual_calls_while_attached_are_refused() -> None:
    """Attached and stepped by hand would count twice: refused, as is attaching twice or to the wrong optimizer."""
    model = _net()
    reg = TRP(model, period=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reg.attach(opt)
    with pytest.raises(TRPError, match=r"attached to an optimizer, which calls step\(\) itself"):
        reg.step()
    with pytest.raises(TRPError, match=r"attached to an optimizer, which calls regularize\(\) itself"):
        reg.regularize()
    with pytest.raises(TRPError, match="already attached"):
        reg.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    other = TRP(_net(), period=1)
    with pytest.raises(TRPError, match="does not update the weight of layer '2'"):
        other.attach(torch.optim.SGD(model[8].parameters(), lr=0.1))
    not_an_optimizer: Any = object()
    with pytest.raises(TRPError, match="needs a torch.optim.Optimizer"):
        other.attach(not_an_optimizer)


def _amp_step(model: nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, seed: int,
              poison: bool = False) -> None:
    x, y = _batch(seed)
    opt.zero_grad()
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    if poison:  # an overflow in one gradient: the scaler must skip this step
        model[4].weight.grad[0, 0, 0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()


@pytest.mark.parametrize("fused", [False, True])
def test_amp_skipped_step_is_not_counted(fused: bool) -> None:
    """Under a real GradScaler the sub-gradient goes in after unscaling (same weights as without
    AMP), and a step the scaler skips for an inf gradient is neither counted nor projected."""
    ref_model, model = _net(), _net()
    ref = TRP(ref_model, energy=0.8, period=1, nuclear=1e-2)
    reg = TRP(model, energy=0.8, period=1, nuclear=1e-2)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, fused=fused)
    reg.attach(opt)
    scaler = torch.amp.GradScaler("cpu")
    assert scaler.is_enabled()
    _step(ref_model, ref, ref_opt, 0)  # the reference: no AMP, the manual calls
    _amp_step(model, opt, scaler, 0)
    assert reg.steps == 1 and len(reg.history) == 2
    for a, b in zip(ref_model.parameters(), model.parameters()):
        # The scale is a power of two, so unscaling is exact: a sub-gradient added before it would be
        # 65536x too small, one added without unscaling (fused) 65536x too large.
        assert torch.allclose(a, b, atol=1e-6)

    weights = [p.detach().clone() for p in model.parameters()]
    scale, ranks = scaler.get_scale(), reg.ranks()
    _amp_step(model, opt, scaler, 1, poison=True)
    assert scaler.get_scale() == scale / 2  # the scaler saw the inf and skipped the step
    assert reg.steps == 1 and len(reg.history) == 2 and reg.ranks() == ranks  # not counted, no projection
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))

    _amp_step(model, opt, scaler, 2)
    assert reg.steps == 2 and len(reg.history) == 3


def test_amp_step_keeps_float32_weights() -> None:
    """Under bfloat16 autocast the SVD still runs in float32 and the weights stay float32."""
    model = _net()
    reg = TRP(model, energy=0.8, period=1, nuclear=1e-3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reg.attach(opt)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(torch.randn(2, 3, 6, 6)).float().sum()
    loss.backward()
    opt.step()
    assert reg.steps == 1
    assert model[2].weight.dtype == torch.float32
    assert torch.isfinite(model[2].weight).all()


# --------------------------------------------------------- schedules


def test_energy_ramp_schedule() -> None:
    """A ramped energy starts at 1.0 (no truncation) and reaches e after the ramp."""
    f = ramp(0.6, 10)
    assert f(0) == 1.0 and f(10) == 0.6 and abs(f(5) - 0.8) < 1e-12 and f.end == 0.6
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
    """With speedup=s the projected ResNet-20 decomposes at s x fewer MACs or at most 2 % more."""
    import trp
    from trp.models import create

    torch.manual_seed(0)
    model = create("resnet20")
    reg = TRP(model, scheme, speedup=target, period=1, nuclear=0.0, input_shape=(3, 32, 32))
    reg.project_now()
    # The projected weights are exactly low-rank: decomposing at their numerical rank loses nothing.
    p = trp.plan(model, scheme, trp.value(1e-5), default_filter(model), (3, 32, 32))
    assert 1 <= p.speedup / target < 1.02
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
    full = sum(min(_to_matrix(layer.weight, "channel").shape) for layer in reg.layers)
    assert totals[0] == full  # step 0 of the ramp: 1x, nothing truncated
    assert totals[0] >= totals[1] >= totals[2] >= totals[3] and totals[0] > totals[3]
    assert all(r == reg.history[3][1] for _, r in reg.history[3:])  # selected at step 3, frozen after
    for layer in reg.layers:  # and the weights really sit at those ranks
        assert _numerical_rank(layer.weight, "channel", 1e-6) == layer.rank


def test_schedule_end_is_read_not_evaluated_far_ahead() -> None:
    """A schedule's reach is checked from its `end` at once; the schedule itself is only ever asked
    about steps that happen; a plain callable meets the check at the projection that needs it."""

    class Probe:
        end = 2.0

        def __init__(self) -> None:
            self.asked: list[int] = []

        def __call__(self, step: int) -> float:
            self.asked.append(step)
            return Ramp(2.0, 4)(step)

    probe = Probe()
    model = _net()
    reg = TRP(model, speedup=probe, period=1, nuclear=0.0, input_shape=(3, 6, 6))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reg.attach(opt)
    for i in range(3):
        _plain_step(model, opt, i)
    assert probe.asked == [0, 1, 2, 3]

    with pytest.raises(TRPError, match=r"speedup 1000x is out of reach"):
        TRP(_net(), speedup=ramp(1000.0, 10), input_shape=(3, 6, 6))
    with pytest.raises(TRPError, match=r"energy at the end of its schedule must be <= 1"):
        TRP(_net(), energy=ramp(1.5, 10))
    late = TRP(_net(), speedup=lambda step: 1.0 if step < 2 else 1000.0, period=1, input_shape=(3, 6, 6))
    late.step()
    with pytest.raises(TRPError, match=r"speed-up 1000x is out of reach"):
        late.step()
    with pytest.raises(TRPError, match=r"speedup schedule at step 0 must be >= 1, got 0.5"):
        TRP(_net(), speedup=lambda step: 0.5, input_shape=(3, 6, 6))


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


# --------------------------------------------------------- state and arguments


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
    with pytest.raises(TRPError, match="TRP state is missing 'rank.2'"):
        other.load_state_dict({"steps": torch.tensor(1)})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"energy": 0.0}, "energy must be > 0"), ({"energy": 1.5}, "energy must be <= 1"),
     ({"period": 0}, "period must be >= 1"), ({"nuclear": -1.0}, "nuclear weight must be >= 0"),
     ({"nuclear": float("inf")}, "nuclear weight must be finite"),
     ({"scheme": "linear"}, "not handled by scheme 'linear'"),
     ({"filter_fn": lambda m, n: False}, "no eligible layer"), ({"speedup": 0.5}, "speedup must be >= 1"),
     ({"speedup": float("inf")}, "speedup must be finite"), ({"speedup": 1000.0}, "1000x is out of reach"),
     ({"freeze": -1}, "freeze must be >= 0"), ({"freeze": 2.5}, "freeze must be a whole number"),
     ({"freeze": True}, "freeze must be a whole number"), ({"period": 1e400}, "period must be a whole number"),
     ({"project": "no"}, "project must be true or false"), ({"filter_fn": "conv"}, "filter_fn must be a function")]
)
def test_invalid_arguments_raise(kwargs: dict, match: str) -> None:
    """Bad settings are refused with a one-line TRPError that says which, not a crash later."""
    with pytest.raises(TRPError, match=match):
        TRP(_net(), **kwargs)


def test_wrapped_model_is_unwrapped() -> None:
    """A wrapper with `.module` (DataParallel/DDP style) is looked through."""

    class Wrapper(nn.Module):
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    inner = _net()
    reg = TRP(Wrapper(inner))
    assert reg.layers[0].weight is inner[2].weight
