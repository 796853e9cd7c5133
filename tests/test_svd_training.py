"""Tests for trp.svd_training: SVD-parametrized stock layers, the regularizers, pruning and plans."""

from __future__ import annotations

import copy
import math
import pickle
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import trp
from trp import schemes
from trp import svd_losses as sl
from trp import svd_training as st
from trp.errors import TRPError
from trp.models import create
from trp.plan import Plan, apply_plan

pytestmark = pytest.mark.usefixtures("one_thread")

CIFAR_DIR = Path(__file__).resolve().parents[1].parent / "shared/data/cifar10-mini/cifar-10-batches-py"
RESNET_INPUT = (3, 32, 32)


def _assert_close(out: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4, what: str = "") -> None:
    """max |out − ref| <= rel · max(1, max |ref|)."""
    out, ref = out.detach(), ref.detach()
    assert out.shape == ref.shape, what
    err = float((out - ref).abs().max())
    assert err <= rel * max(1.0, float(ref.abs().max())), f"{what} max abs error {err:.3g}"


def _resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create("resnet20").eval()


def _sgd_steps(model: nn.Module, steps: int = 3, seed: int = 1) -> None:
    """A few SGD steps on random data with strong regularization: factors leave orthonormality."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    cfg = sl.SVDTrainingConfig(orth=0.1, sparsity_kind="l1", sparsity=0.05)
    model.train()
    for _ in range(steps):
        x = torch.randn(8, 3, 16, 16, generator=gen)
        y = torch.randint(0, 10, (8,), generator=gen)
        loss = F.cross_entropy(model(x), y) + sl.regularization(model, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _prunable(model: nn.Module) -> None:
    """Zero all but a quarter of every layer's s and negate its largest: what sparsity training yields.

    A quarter, because at half rank a spatial 3×3 layer costs exactly its dense MACs and stays dense.
    """
    with torch.no_grad():
        for _, layer in st.svd_layers(model):
            s = st.factors(layer).s
            order = torch.argsort(s.abs(), descending=True)
            s[order[s.numel() // 4 :]] = 0.0
            s[order[0]] = -s[order[0]].abs()


# --------------------------------------------------------------------------------- layers at init

CONV_CASES = {
    "plain": dict(kernel_size=3, padding=1, bias=False),
    "stride2-bias": dict(kernel_size=3, stride=2, padding=1),
    "stride21-rect": dict(kernel_size=(3, 5), stride=(2, 1), padding=(1, 2)),
    "dilation": dict(kernel_size=3, padding=2, dilation=2),
    "same-even": dict(kernel_size=(2, 3), padding="same", dilation=(1, 2)),
    "valid": dict(kernel_size=3, padding="valid"),
    "reflect": dict(kernel_size=3, padding=1, padding_mode="reflect"),
    "reflect-same": dict(kernel_size=(2, 3), padding="same", padding_mode="reflect", dilation=(2, 1)),
    "replicate-stride": dict(kernel_size=3, stride=2, padding=(1, 2), padding_mode="replicate"),
    "circular": dict(kernel_size=(3, 1), padding=1, padding_mode="circular", bias=False),
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # torch's own note, for both
@pytest.mark.parametrize("case", list(CONV_CASES))
@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_conv_reproduces_dense_at_init(scheme: str, case: str) -> None:
    """Starting from the full-rank SVD, a parametrized conv must compute exactly what nn.Conv2d did."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, **CONV_CASES[case])
    layer = st.svd_parametrize_layer_(copy.deepcopy(conv), scheme)
    sch = schemes.get(scheme)
    m, n = sch.to_matrix(conv.weight.detach()).shape
    r = min(m, n)
    u, s, v = st.factors(layer)
    assert u.shape == (m, r) and s.shape == (r,) and v.shape == (n, r)
    assert layer.parametrizations.weight[0].scheme == scheme
    assert parametrize.type_before_parametrizations(layer) is nn.Conv2d and layer.padding_mode == conv.padding_mode
    _assert_close(layer.weight, conv.weight, 1e-5, "weight")
    _assert_close(sch.from_matrix((u * s) @ v.T, conv.weight.shape), conv.weight, 1e-5, "composed factors")
    x = torch.randn(2, 6, 11, 13)
    _assert_close(layer(x), conv(x), 1e-5, case)
    factor_names = {f"parametrizations.weight.original{i}" for i in range(3)}
    expected = factor_names | {"bias"} if conv.bias is not None else factor_names
    assert set(dict(layer.named_parameters())) == expected


@pytest.mark.parametrize("bias", [True, False])
def test_linear_reproduces_dense_at_init(bias: bool) -> None:
    """An SVD-parametrized Linear must equal nn.Linear at initialization, on batched and sequence inputs."""
    torch.manual_seed(0)
    lin = nn.Linear(12, 5, bias=bias)
    layer = st.svd_parametrize_layer_(copy.deepcopy(lin), "linear")
    u, _, v = st.factors(layer)
    assert u.shape == (5, 5) and v.shape == (12, 5) and layer.parametrizations.weight[0].scheme == "linear"
    for x in (torch.randn(4, 12), torch.randn(2, 3, 12)):
        _assert_close(layer(x), lin(x), 1e-5)
    dense = st.to_dense_(layer)
    assert type(dense) is nn.Linear and isinstance(dense.weight, nn.Parameter)
    _assert_close(dense.weight, lin.weight, 1e-5)


def test_layer_constructors_and_errors() -> None:
    """Parametrizing single layers must give working layers; unsupported modules must raise TRPError."""
    conv = st.svd_parametrize_layer_(nn.Conv2d(4, 6, 3, padding=1), "spatial")
    assert conv(torch.randn(1, 4, 5, 5)).shape == (1, 6, 5, 5) and st.factors(conv).U.shape == (12, 12)
    assert st.svd_parametrize_layer_(nn.Linear(3, 7, bias=False), "linear")(torch.randn(2, 3)).shape == (2, 7)
    with pytest.raises(TRPError, match="groups"):
        st.svd_parametrize_layer_(nn.Conv2d(4, 4, 3, groups=2), "channel")
    with pytest.raises(TRPError, match="scheme"):
        st.svd_parametrize_layer_(nn.Conv2d(4, 4, 3), "decouple")
    with pytest.raises(TRPError, match="Linear is not handled by scheme 'channel'"):
        st.svd_parametrize_layer_(nn.Linear(4, 4), "channel")
    with pytest.raises(TRPError, match="Conv2d is not handled by scheme 'linear'"):
        st.svd_parametrize_layer_(nn.Conv2d(4, 4, 3), "linear")
    with pytest.raises(TRPError, match="parametrized already"):
        st.svd_parametrize_layer_(conv, "spatial")
    with pytest.raises(TRPError, match="not SVD-parametrized"):
        st.factors(nn.Linear(2, 2))
    bad = nn.Conv2d(4, 4, 3)
    with torch.no_grad():
        bad.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(TRPError, match="non-finite"):
        st.svd_parametrize_layer_(bad, "channel", name="bad")
    assert not parametrize.is_parametrized(bad)
    assert st.training_schemes() == tuple(n for n in schemes.names_for(nn.Conv2d(2, 2, 3))
                                          if not schemes.get(n).batched)


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_resnet20_reproduces_at_init(scheme: str) -> None:
    """Parametrizing a whole ResNet-20 must not change its function; first conv and fc stay dense."""
    model = _resnet()
    x = torch.randn(4, *RESNET_INPUT)
    before = model(x)
    assert st.svd_parametrize_(model, scheme) is model
    names = [name for name, _ in st.svd_layers(model)]
    assert len(names) == 18 and "conv1" not in names and "fc" not in names
    assert type(model.conv1) is nn.Conv2d and type(model.fc) is nn.Linear
    _assert_close(model(x), before, 1e-4, scheme)


def test_parametrize_filter_linear_grouped_and_idempotent() -> None:
    """filter_fn picks layers (Linear included); grouped convs stay dense; a second call is a no-op."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=2), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    x = torch.randn(2, 3, 8, 8)
    before = model(x)
    st.svd_parametrize_(model, filter_fn=lambda m, n: True)
    assert [parametrize.is_parametrized(m) for m in model] == [True, False, False, True]
    assert [parametrize.type_before_parametrizations(m) for m in model] == [nn.Conv2d, nn.Conv2d, nn.Flatten, nn.Linear]
    assert [layer.parametrizations.weight[0].scheme for _, layer in st.svd_layers(model)] == ["channel", "linear"]
    _assert_close(model(x), before, 1e-5)
    assert st.svd_parametrize_(model) is model and len(st.svd_layers(model)) == 2


def test_parametrize_shared_module_stays_shared() -> None:
    """A layer reachable under two names (weight tying) must become one SVD layer under both."""
    conv = nn.Conv2d(4, 4, 3, padding=1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), conv, conv)
    st.svd_parametrize_(model)
    assert parametrize.is_parametrized(model[1]) and model[1] is model[2]
    assert [name for name, _ in st.svd_layers(model)] == ["1"] and len(list(model.parameters())) == 2 + 4
    st.to_dense_(model)
    assert type(model[1]) is nn.Conv2d and model[1] is model[2]


def test_parametrize_rolls_back_and_validates() -> None:
    """A failing layer must leave the model untouched; bad schemes and empty models raise TRPError."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3))
    with torch.no_grad():
        model[2].weight[0, 0, 0, 0] = float("inf")
    before, weights = list(model), [m.weight for m in model]
    with pytest.raises(TRPError, match="'2'"):
        st.svd_parametrize_(model)
    assert list(model) == before and all(type(m) is nn.Conv2d for m in model)
    assert all(m.weight is w for m, w in zip(model, weights))  # the very same parameters, for the optimizer
    with pytest.raises(TRPError, match="scheme"):
        st.svd_parametrize_(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)), "decouple")
    with pytest.raises(TRPError, match="no eligible layer"):
        st.svd_parametrize_(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))
    with pytest.raises(TRPError, match="svd_parametrize_"):
        sl.orthogonality_loss(nn.Linear(2, 2))


# ---------------------------------------------------------------------------------- regularizers


def _random_linear_layer(seed: int = 0) -> nn.Linear:
    """An SVD-parametrized Linear in float64 whose factors are random: far from orthonormal, s of both signs."""
    gen = torch.Generator().manual_seed(seed)
    layer = st.svd_parametrize_layer_(nn.Linear(7, 5, dtype=torch.float64), "linear")
    f = st.factors(layer)
    with torch.no_grad():
        f.U.copy_(torch.randn(5, 5, generator=gen, dtype=torch.float64))
        f.V.copy_(torch.randn(7, 5, generator=gen, dtype=torch.float64))
        f.s.copy_(torch.tensor([2.0, -1.5, 0.7, -0.3, 0.1], dtype=torch.float64))
    return layer


def test_orthogonality_gradient_matches_closed_form() -> None:
    """d/dU ‖UᵀU−I‖²_F = 4U(UᵀU−I), divided by r as the loss is; same for V."""
    layer = _random_linear_layer()
    f = st.factors(layer)
    sl.orthogonality_loss(layer).backward()
    u, v = f.U.detach(), f.V.detach()
    r = f.s.numel()
    eye = torch.eye(r, dtype=torch.float64)
    value = (torch.linalg.matrix_norm(u.T @ u - eye) ** 2 + torch.linalg.matrix_norm(v.T @ v - eye) ** 2) / r
    assert torch.allclose(sl.orthogonality_loss(layer).detach(), value)
    assert torch.allclose(f.U.grad, 4 * u @ (u.T @ u - eye) / r)
    assert torch.allclose(f.V.grad, 4 * v @ (v.T @ v - eye) / r)
    assert f.s.grad is None or not f.s.grad.any()


def test_sparsity_gradients_match_closed_form() -> None:
    """d/ds ‖s‖₁ = sign(s) and d/ds ‖s‖₁/‖s‖₂ = sign(s)/‖s‖₂ − ‖s‖₁·s/‖s‖₂³, for s of both signs."""
    layer = _random_linear_layer()
    f = st.factors(layer)
    s = f.s.detach()
    sl.sparsity_loss(layer, "l1").backward()
    assert torch.allclose(f.s.grad, torch.sign(s))
    f.s.grad = None
    sl.sparsity_loss(layer, "hoyer").backward()
    l1, l2 = s.abs().sum(), s.norm()
    assert torch.allclose(f.s.grad, torch.sign(s) / l2 - l1 * s / l2**3)
    assert torch.allclose(sl.sparsity_loss(layer, "hoyer").detach(), l1 / l2)
    assert f.U.grad is None and f.V.grad is None


def test_regularizers_pass_gradcheck() -> None:
    """Finite differences in float64 must agree with autograd for every regularizer term."""
    gen = torch.Generator().manual_seed(3)
    u = torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(9, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    s = torch.tensor([1.3, -0.8, 0.4, -0.2], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(sl.orthogonality_penalty, (u, v))
    assert torch.autograd.gradcheck(lambda t: sl.sparsity_penalty(t, "l1"), (s,))
    assert torch.autograd.gradcheck(lambda t: sl.sparsity_penalty(t, "hoyer"), (s,))


def test_regularization_sums_the_weighted_terms() -> None:
    """regularization = λ_o·L_o + λ_s·L_s over all layers; zero weights drop a term; all-zero s stays finite."""
    model = st.svd_parametrize_(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 4, 1)))
    _sgd_steps_small(model)
    cfg = sl.SVDTrainingConfig(orth=0.5, sparsity_kind="hoyer", sparsity=0.25)
    expected = 0.5 * sl.orthogonality_loss(model) + 0.25 * sl.sparsity_loss(model, "hoyer")
    assert torch.allclose(sl.regularization(model, cfg), expected)
    manual = sum(sl.sparsity_penalty(st.factors(m).s, "l1") for _, m in st.svd_layers(model))
    assert torch.allclose(sl.sparsity_loss(model, "l1"), manual)
    zero = sl.regularization(model, sl.SVDTrainingConfig(orth=0.0, sparsity=0.0))
    assert float(zero) == 0.0
    with torch.no_grad():
        st.factors(model[1]).s.zero_()
    loss = sl.sparsity_loss(model, "hoyer")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(st.factors(model[1]).s.grad).all()


def _sgd_steps_small(model: nn.Module) -> None:
    """Move the factors of a small conv stack away from orthonormality."""
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        loss = model(torch.randn(2, 3, 8, 8, generator=gen)).pow(2).mean() + sl.sparsity_loss(model, "l1")
        opt.zero_grad()
        loss.backward()
        opt.step()


# ------------------------------------------------------------------------------------- finishing


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_finalize_energy_one_is_lossless(scheme: str) -> None:
    """Pruning at energy 1.0 must keep the function after SGD (non-orthogonal factors, negative s)."""
    model = st.svd_parametrize_(_resnet(), scheme)
    _sgd_steps(model)
    _prunable(model)
    assert any(float(st.factors(m).s.detach().min()) < 0 for _, m in st.svd_layers(model))
    x = torch.randn(4, *RESNET_INPUT)
    reference = model(x)
    model, plan = st.finalize_(model, trp.energy(1.0), input_shape=RESNET_INPUT)
    assert not st.svd_layers(model)
    _assert_close(model(x), reference, 1e-4, scheme)
    decomposed = [lp for lp in plan.layers if lp.decomposed]
    assert len(decomposed) == 18 and all(lp.rank == lp.full_rank // 4 for lp in decomposed)
    assert all(abs(lp.energy - 1.0) < 1e-9 for lp in decomposed)


def test_finalize_at_full_rank_falls_back_to_dense() -> None:
    """Where the kept rank does not lower MACs the layer must become one dense conv, still exact."""
    model = st.svd_parametrize_(_resnet())
    _sgd_steps(model)
    x = torch.randn(2, *RESNET_INPUT)
    reference = model(x)
    model, plan = st.finalize_(model, trp.energy(1.0), input_shape=RESNET_INPUT)
    assert all(type(m) is nn.Conv2d for name, m in model.named_modules() if name.endswith(("conv1", "conv2")))
    assert not any(lp.decomposed for lp in plan.layers)
    assert all("does not lower its MACs" in lp.reason for lp in plan.layers if lp.scheme is not None)
    _assert_close(model(x), reference, 1e-4)


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_finalize_prunes_the_trained_factors(scheme: str) -> None:
    """A fixed rank k keeps the k largest |s| of the trained (non-orthogonal) factors, not a re-SVD."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 16, 3, padding=1, bias=True))
    st.svd_parametrize_(model, scheme)
    layer = model[1]
    f = st.factors(layer)
    with torch.no_grad():
        f.U.add_(0.3 * torch.randn_like(f.U))
        f.V.add_(0.3 * torch.randn_like(f.V))
        f.s.mul_(torch.where(torch.rand_like(f.s) < 0.5, -1.0, 1.0))
    k = 3
    u, s, v = f.U.detach(), f.s.detach(), f.V.detach()
    keep = torch.argsort(s.abs(), descending=True)[:k]
    pruned = schemes.get(scheme).from_matrix((u[:, keep] * s[keep]) @ v[:, keep].T, layer.weight.shape)
    x = torch.randn(2, 3, 12, 12)
    expected = F.conv2d(model[0](x), pruned, layer.bias, padding=1)
    model, plan = st.finalize_(model, k, input_shape=(3, 12, 12))
    assert isinstance(model[1], nn.Sequential) and plan.layers[1].rank == k
    _assert_close(model(x), expected, 1e-5, scheme)


def test_finalize_outputs_stock_modules_and_plan_roundtrips() -> None:
    """finalize_ yields stock layers and a trp.plan-format plan that rebuilds a fresh model exactly."""
    model = st.svd_parametrize_(_resnet())
    _sgd_steps(model, steps=2)
    _prunable(model)
    model, plan = st.finalize_(model, trp.energy(0.999), input_shape=RESNET_INPUT)
    for name, module in model.named_modules():
        assert type(module).__module__.startswith("torch.nn") or type(module).__module__ == "trp.models", name
    for lp in plan.layers:
        if lp.decomposed:
            seq = model.get_submodule(lp.name)
            assert type(seq) is nn.Sequential and [type(m) for m in seq] == [nn.Conv2d, nn.Conv2d]
            assert seq[0].out_channels == lp.rank
    # Same layers, shapes and costs as trp.plan reports for the dense architecture.
    reference = trp.plan(create("resnet20"), "channel", trp.fixed(4), input_shape=RESNET_INPUT)
    assert [lp.name for lp in plan.layers] == [lp.name for lp in reference.layers]
    assert plan.macs_before == reference.macs_before and plan.params_before == reference.params_before
    assert plan.macs_after == trp.profile(model, RESNET_INPUT).macs
    assert plan.params_after == sum(p.numel() for p in model.parameters())
    assert plan.criterion == "energy:0.999"
    text = plan.to_json()
    again = Plan.from_json(text)
    assert again.to_json() == text
    fresh = apply_plan(_resnet(seed=5), again)
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(3, *RESNET_INPUT)
    _assert_close(fresh.eval()(x), model(x), 1e-6)


def test_finalize_rejects_bad_ranks() -> None:
    """A speed-up budget or a model without SVD layers must raise TRPError."""
    model = st.svd_parametrize_(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)))
    with pytest.raises(TRPError, match="speed-up"):
        st.finalize_(model, trp.speedup(2.0))
    with pytest.raises(TRPError, match=re.escape("rank must be an int, a {layer: rank} dict or a criterion")):
        st.finalize_(model, 1.5)  # type: ignore[arg-type]
    assert len(st.svd_layers(model)) == 1  # nothing was swapped
    with pytest.raises(TRPError, match="svd_parametrize_"):
        st.finalize_(nn.Sequential(nn.Conv2d(3, 8, 3)))


def test_finalize_per_layer_dict_and_value_criterion() -> None:
    """A {name: rank} dict and trp.value pick ranks from |s| like the per-layer criteria of trp.plan."""
    model = st.svd_parametrize_(nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 32, 3), nn.Conv2d(32, 32, 3)))
    with torch.no_grad():
        st.factors(model[2]).s.copy_(torch.linspace(-2.0, 1.0, 32))
    _, plan = st.finalize_(copy.deepcopy(model), {"1": 2}, input_shape=(3, 16, 16))
    assert [lp.rank for lp in plan.layers] == [None, 2, 32] and plan.criterion == "per-layer ranks"
    _, plan = st.finalize_(model, trp.value(1.5), input_shape=(3, 16, 16))
    assert plan.layers[2].rank == int((torch.linspace(-2.0, 1.0, 32).abs() >= 1.5).sum())


def test_to_dense_keeps_function_and_loads_into_fresh_model() -> None:
    """to_dense_ returns stock layers computing the same function, loadable into the plain architecture."""
    model = st.svd_parametrize_(_resnet())
    _sgd_steps(model, steps=2)
    x = torch.randn(2, *RESNET_INPUT)
    reference = model(x)
    assert st.to_dense_(model) is model and not st.svd_layers(model)
    _assert_close(model(x), reference, 1e-5)
    fresh = _resnet(seed=7)
    fresh.load_state_dict(model.state_dict())
    _assert_close(fresh(x), reference, 1e-5)


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_finalized_model_matches_the_truncated_reference(scheme: str) -> None:
    """finalize_'s decomposed model must compute what the pruned factors compose: the dense model whose
    weights are U_k·diag(s_k)·V_kᵀ (truncate_to_dense_ at the same rank), not the unpruned one."""
    model = st.svd_parametrize_(_resnet(), scheme)
    _sgd_steps(model)
    x = torch.randn(3, *RESNET_INPUT)
    unpruned = model(x)
    reference_model, chosen = st.truncate_to_dense_(copy.deepcopy(model), trp.fraction(0.25))
    reference = reference_model(x).detach()
    model, plan = st.finalize_(model, trp.fraction(0.25), input_shape=RESNET_INPUT)
    assert {lp.name: lp.rank for lp in plan.layers if lp.scheme is not None} == chosen
    assert sum(lp.decomposed for lp in plan.layers) == 18
    # Keeping a quarter of each spectrum changes the function, so agreeing with the reference is a real check.
    assert float((reference - unpruned.detach()).abs().max()) > 1e-2
    _assert_close(model(x), reference, 1e-4, scheme)


def test_tied_layer_trains_and_finalizes_as_one() -> None:
    """A layer used twice shares one set of factors: both names train together and finalize to one module."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), conv, nn.ReLU(), conv)
    st.svd_parametrize_(model)
    f = st.factors(model[2])
    assert st.factors(model[4]).U is f.U
    before = f.s.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(torch.randn(2, 3, 8, 8)).pow(2).mean() + sl.sparsity_loss(model, "l1")
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert not torch.equal(f.s.detach(), before) and torch.equal(st.factors(model[4]).s, f.s)
    keys = model.state_dict().keys()
    assert "2.parametrizations.weight.original1" in keys and "4.parametrizations.weight.original1" in keys
    x = torch.randn(2, 3, 8, 8)
    reference = st.truncate_to_dense_(copy.deepcopy(model), 2)[0](x)
    model, plan = st.finalize_(model, 2, input_shape=(3, 8, 8))
    assert type(model[2]) is nn.Sequential and model[2] is model[4]
    assert [lp.name for lp in plan.layers if lp.decomposed] == ["2"]
    _assert_close(model(x), reference, 1e-5)


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_state_dict_loads_into_fresh_parametrized_model(scheme: str) -> None:
    """A trained model's state dict must load into svd_parametrize_(fresh model) with every key matched."""
    model = st.svd_parametrize_(_resnet(), scheme)
    _sgd_steps(model, steps=2)
    state = model.state_dict()
    assert "layer1.0.conv1.parametrizations.weight.original0" in state and "layer1.0.conv1.weight" not in state
    fresh = st.svd_parametrize_(_resnet(seed=5), scheme)
    result = fresh.load_state_dict(state)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(3, *RESNET_INPUT)
    _assert_close(fresh.eval()(x), model(x), 1e-6, scheme)
    for (name, a), (_, b) in zip(st.svd_layers(model), st.svd_layers(fresh)):
        assert all(torch.equal(p, q) for p, q in zip(st.factors(a), st.factors(b))), name
    # A state dict of the former SVDConv2d modules (keys U, s, V) loads after upgrade_state_dict.
    legacy = {k.replace("parametrizations.weight.original0", "U").replace("parametrizations.weight.original1", "s")
              .replace("parametrizations.weight.original2", "V"): v for k, v in state.items()}
    assert "layer1.0.conv1.U" in legacy and "layer1.0.conv1.s" in legacy
    again = st.svd_parametrize_(_resnet(seed=6), scheme)
    again.load_state_dict(st.upgrade_state_dict(legacy))
    _assert_close(again.eval()(x), model(x), 1e-6, scheme)


def test_deep_copies_finish_independently() -> None:
    """Finishing a deep copy (an EMA or best-model snapshot) must leave the original SVD model working."""
    model = st.svd_parametrize_(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)))
    x = torch.randn(1, 3, 8, 8)
    before = model(x)
    copy_ = st.to_dense_(copy.deepcopy(model))
    assert type(copy_[1]) is nn.Conv2d and parametrize.is_parametrized(model[1])
    _assert_close(model(x), before, 1e-6)
    _assert_close(copy_(x), before, 1e-5)
    model, _ = st.finalize_(model, 2, input_shape=(3, 8, 8))
    assert type(model[1]) is nn.Sequential


def test_frozen_layers_stay_parameters_and_shared_weights_are_refused() -> None:
    """A frozen layer keeps a (frozen) weight parameter when made dense; two modules sharing one weight
    tensor cannot be given separate factors without untying them, so that is a TRPError."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3))
    model.requires_grad_(False)
    st.svd_parametrize_(model)
    assert not st.factors(model[1]).U.requires_grad
    st.to_dense_(model)
    assert isinstance(model[1].weight, nn.Parameter) and not model[1].weight.requires_grad
    assert "weight" in dict(model[1].named_parameters())
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    with pytest.raises(TRPError, match="share one weight"):
        st.svd_parametrize_(nn.Sequential(a, nn.ReLU(), b), filter_fn=lambda m, n: True)
    assert not parametrize.is_parametrized(a) and b.weight is a.weight


def test_ranks_reads_the_trained_spectrum() -> None:
    """ranks() reports (energy rank of |s|, full rank) per layer, ignoring the signs of s."""
    model = st.svd_parametrize_(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 4, 3)))
    with torch.no_grad():
        st.factors(model[1]).s.copy_(torch.tensor([0.0, -3.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]))
    out = st.ranks(model, 0.9)
    assert out["1"] == (1, 8) and out["2"][1] == 4
    assert st.ranks(model, 1.0)["1"] == (2, 8)
    with pytest.raises(TRPError, match="^energy must be <= 1, got 1.5$"):
        st.ranks(model, 1.5)


# -------------------------------------------------------------------------------- real training


def _cifar_batches(batch_size: int):
    """Normalized CIFAR-10 training batches, through trp.data if it is there, else from the pickles."""
    try:
        from trp import data as trp_data
    except ImportError:
        trp_data = None
    if trp_data is not None and hasattr(trp_data, "load"):
        data = trp_data.load("cifar10", str(CIFAR_DIR))
        epoch = 0
        while True:
            yield from data.train_batches(batch_size, epoch, 0)
            epoch += 1
    else:
        xs, ys = [], []
        for path in sorted(CIFAR_DIR.glob("data_batch_*")):
            with open(path, "rb") as f:
                d = pickle.load(f, encoding="latin1")
            xs.append(torch.as_tensor(d["data"]).reshape(-1, 3, 32, 32))
            ys.append(torch.as_tensor(d["labels"]))
        x = torch.cat(xs).float() / 255
        x = (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True)
        y = torch.cat(ys).long()
        gen = torch.Generator().manual_seed(0)
        while True:
            order = torch.randperm(len(y), generator=gen)
            for i in range(0, len(y), batch_size):
                idx = order[i : i + batch_size]
                yield x[idx], y[idx]


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR_DIR.is_dir(), reason=f"CIFAR-10 mini data not found at {CIFAR_DIR}")
def test_training_on_cifar_lowers_ranks() -> None:
    """A short SVD-training run on real images must lower the energy ranks while the network learns.

    Images are average-pooled to 16×16 (ResNet-20 pools adaptively) so 60 steps fit in ~10 s on one
    core; the sparsity term does not depend on the resolution.
    """
    torch.manual_seed(0)
    model = st.svd_parametrize_(create("resnet20"), "channel")
    start = st.ranks(model, 0.99)
    start_mean = sum(k / r for k, r in start.values()) / len(start)
    cfg = sl.SVDTrainingConfig(orth=1.0, sparsity_kind="hoyer", sparsity=1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for step, (x, y) in zip(range(60), _cifar_batches(64)):
        loss = F.cross_entropy(model(F.avg_pool2d(x, 2)), y)
        total = loss + sl.regularization(model, cfg)
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(loss.item())
    end = st.ranks(model, 0.99)
    end_mean = sum(k / r for k, r in end.values()) / len(end)
    print(f"mean energy-0.99 rank fraction {start_mean:.3f} -> {end_mean:.3f}; last losses {losses[-10:]}")
    assert end_mean < start_mean - 0.15, (start_mean, end_mean)
    assert sum(k for k, _ in end.values()) < sum(k for k, _ in start.values())
    assert math.isfinite(losses[-1]) and sum(losses[-10:]) / 10 < math.log(10), losses[-10:]
    # The pruned network is what the ranks promise: fewer MACs than the dense ResNet-20.
    model.eval()
    x = torch.randn(2, *RESNET_INPUT)
    reference = model(x)
    model, plan = st.finalize_(model, trp.energy(0.99), input_shape=RESNET_INPUT)
    assert plan.speedup > 1.0
    assert torch.isfinite(model(x)).all() and reference.shape == (2, 10)


# ------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(orth=-1.0), "orthogonality weight"),
        (dict(orth=float("nan")), "orthogonality weight"),
        (dict(sparsity=float("inf")), "sparsity weight"),
        (dict(sparsity=-1e-3), "sparsity weight"),
        (dict(sparsity="a lot"), "sparsity weight"),
        (dict(orth=True), "orthogonality weight"),
        (dict(sparsity_kind="l2"), "sparsity regularizer"),
    ],
)
def test_config_validation(kwargs: dict, match: str) -> None:
    """Bad regularizer settings must fail early with a one-line TRPError naming the setting."""
    with pytest.raises(TRPError, match=match):
        sl.SVDTrainingConfig(**kwargs)


def test_config_defaults_and_frozen() -> None:
    """Defaults are the documented ones, numbers are normalized to float, and the config is frozen."""
    cfg = sl.SVDTrainingConfig(orth=1, sparsity=0)
    assert (cfg.orth, cfg.sparsity_kind, cfg.sparsity) == (1.0, "hoyer", 0.0)
    assert not hasattr(cfg, "scheme")  # the layout is svd_parametrize_'s argument, not a regularizer weight
    assert isinstance(cfg.orth, float)
    with pytest.raises(AttributeError):
        cfg.orth = 2.0  # type: ignore[misc]


@pytest.mark.parametrize("text, expected", [("hoyer:1e-3", ("hoyer", 1e-3)), ("l1:0.5", ("l1", 0.5)),
                                            (" HOYER:0 ", ("hoyer", 0.0))])
def test_parse_sparsity(text: str, expected: tuple) -> None:
    """The --sparsity flag parses KIND:WEIGHT."""
    assert sl.parse_sparsity(text) == expected


@pytest.mark.parametrize("text, message", [
    ("hoyer", "sparsity must look like KIND:WEIGHT"), ("1e-3", "sparsity must look like KIND:WEIGHT"),
    ("l2:1e-3", "sparsity must look like KIND:WEIGHT"), ("", "sparsity must look like KIND:WEIGHT"),
    ("hoyer:abc", "sparsity weight in 'hoyer:abc' must be a number"), ("hoyer:-1", "sparsity weight in 'hoyer:-1' must be >= 0"),
    ("l1:nan", "sparsity weight in 'l1:nan' must be finite"), ("hoyer:inf", "sparsity weight in 'hoyer:inf' must be finite")])
def test_parse_sparsity_rejects(text: str, message: str) -> None:
    """Malformed --sparsity values raise TRPError rather than a traceback."""
    with pytest.raises(TRPError, match=f"^{re.escape(message)}"):
        sl.parse_sparsity(text)


# ------------------------------------------------------------------------------------ per-epoch sparsity weight

@pytest.mark.parametrize("text, expected", [("hoyer:10/epoch", ("hoyer", 10.0, True)), ("l1:0.5", ("l1", 0.5, False)),
                                            (" HOYER:2 / Epoch ", ("hoyer", 2.0, True))])
def test_parse_sparsity_rate(text: str, expected: tuple) -> None:
    """--sparsity takes a weight per step (KIND:W) or per epoch (KIND:W/epoch)."""
    assert sl.parse_sparsity_rate(text) == expected


@pytest.mark.parametrize("text, message", [("hoyer:1/step", "sparsity must look like KIND:WEIGHT or KIND:WEIGHT/epoch"),
                                           ("hoyer:-1/epoch", "sparsity weight in 'hoyer:-1' must be >= 0")])
def test_parse_sparsity_rate_rejects(text: str, message: str) -> None:
    """A unit other than /epoch, or a bad weight, is a one-line TRPError."""
    with pytest.raises(TRPError, match=f"^{re.escape(message)}"):
        sl.parse_sparsity_rate(text)


def test_per_epoch_weight_is_spread_over_the_epochs_steps() -> None:
    """SVD training with W/epoch adds W / steps_per_epoch per step, so a pass over any dataset gets the same pull."""
    from types import SimpleNamespace

    from trp.methods import SVDTraining

    for steps in (12, 32):
        method = SVDTraining(SimpleNamespace(scheme="channel", orth=1.0, sparsity=sl.DEFAULT_SPARSITY, speedup=None,
                                             freeze=None))
        method.prepare(_resnet(), None, steps)
        assert method.losses.sparsity == pytest.approx(10.0 / steps) and method.losses.sparsity_kind == "hoyer"
    fixed = SVDTraining(SimpleNamespace(scheme="channel", orth=1.0, sparsity="l1:0.3", speedup=None, freeze=None))
    fixed.prepare(_resnet(), None, 12)
    assert fixed.losses.sparsity == 0.3  # a per-step weight means what it says


@pytest.mark.slow
def test_default_sparsity_compresses_digits_in_20_epochs(tmp_path: Path) -> None:
    """Issue #16: 20 epochs of --method svd on digits with the default weight compress at value:0.05 (was 1.00x)."""
    from trp.compress import compress
    from trp.train import TrainConfig, train

    run = tmp_path / "svd"
    summary = train(TrainConfig(dataset="digits", method="svd", epochs=20), run, progress=False, log=lambda s: None)
    report = compress(run, tmp_path / "small", "value:0.05", check_latency=False, runtimes=["eager"], min_run_time=0.05,
                      log=lambda s: None)
    assert report["flops_speedup"] > 1.5, report["flops_speedup"]
    assert report["acc_after"] > summary["test_acc"] - 2.0 and report["acc_after"] > 90
