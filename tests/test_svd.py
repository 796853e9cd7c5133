"""Tests for trp.svd: the robust SVD and svdvals with their fallbacks, spectra and truncation.

The weight layouts moved to the schemes (tests/test_schemes.py)."""

from __future__ import annotations

import pytest
import torch

from trp import svd as svd_mod
from trp.errors import TRPError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(5, 3), (3, 5), (4, 4), (8, 6, 9), (2, 3, 7, 4)])
def test_svd_reconstructs(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """svd must return a thin, descending, dtype-preserving factorization that reconstructs the input."""
    torch.manual_seed(0)
    m = torch.randn(shape, dtype=dtype)
    u, s, vh = svd_mod.svd(m)
    r = min(shape[-2:])
    assert u.shape == (*shape[:-1], r) and s.shape == (*shape[:-2], r) and vh.shape == (*shape[:-2], r, shape[-1])
    assert u.dtype == s.dtype == vh.dtype == dtype
    assert torch.all(s[..., :-1] >= s[..., 1:])
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert torch.allclose((u * s[..., None, :]) @ vh, m, atol=tol * 10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_svd_lifts_half_precision(dtype: torch.dtype) -> None:
    """Half-precision (AMP) weights must be decomposed in float32 rather than failing."""
    m = torch.randn(6, 4).to(dtype)
    u, s, vh = svd_mod.svd(m)
    assert u.dtype == s.dtype == vh.dtype == torch.float32
    assert torch.allclose((u * s) @ vh, m.float(), atol=1e-5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_svd_non_finite_names_layer(bad: float) -> None:
    """Non-finite weights must be reported with the layer's name instead of producing garbage factors."""
    m = torch.randn(4, 5)
    m[2, 3] = bad
    with pytest.raises(TRPError, match=r"layer 'layer2\.0\.conv1' has non-finite"):
        svd_mod.svd(m, "layer2.0.conv1")


def _real_svd():
    return torch.linalg.svd


@pytest.mark.parametrize("failure", ["runtime", "linalg", "nan_factors"])
def test_svd_float64_fallback(monkeypatch: pytest.MonkeyPatch, failure: str) -> None:
    """When the float32 SVD fails to converge (or returns NaN), the float64 retry must rescue it."""
    real = _real_svd()
    calls: list[torch.dtype] = []

    def flaky(a, *args, **kwargs):
        calls.append(a.dtype)
        if a.dtype == torch.float32:
            if failure == "runtime":
                raise RuntimeError("linalg.svd: The algorithm failed to converge")
            if failure == "linalg":
                raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
            u, s, vh = real(a, *args, **kwargs)
            return u, s * float("nan"), vh
        return real(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", flaky)
    m = torch.randn(6, 9)
    u, s, vh = svd_mod.svd(m, "fc")
    assert calls == [torch.float32, torch.float64]
    assert u.dtype == s.dtype == vh.dtype == torch.float32  # the result keeps the weight's dtype
    assert torch.allclose((u * s) @ vh, m, atol=1e-5)


@pytest.mark.parametrize("failure", ["raise", "nan_factors"])
def test_svd_all_attempts_fail_names_layer(monkeypatch: pytest.MonkeyPatch, failure: str) -> None:
    """If every driver fails, a TRPError must name the layer rather than skip it or zero its gradient."""
    real = _real_svd()

    def broken(a, *args, **kwargs):
        if failure == "raise":
            raise RuntimeError("linalg.svd: The algorithm failed to converge")
        u, s, vh = real(a, *args, **kwargs)
        return u * float("nan"), s, vh

    monkeypatch.setattr(torch.linalg, "svd", broken)
    with pytest.raises(TRPError, match=r"SVD of layer 'features\.3' failed"):
        svd_mod.svd(torch.randn(4, 4), "features.3")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("shape", [(5, 3), (3, 5), (8, 6, 9)])
def test_svdvals_matches_svd(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """svdvals gives svd's singular values (descending, float32 or wider) without the vectors."""
    torch.manual_seed(0)
    m = torch.randn(shape).to(dtype)
    s = svd_mod.svdvals(m)
    ref = svd_mod.svd(m)[1]
    assert s.dtype == ref.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert s.shape == ref.shape and torch.all(s[..., :-1] >= s[..., 1:])
    assert torch.allclose(s, ref, atol=1e-5 if dtype != torch.float64 else 1e-12)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_svdvals_non_finite_names_layer(bad: float) -> None:
    """Non-finite weights are reported with the layer's name by svdvals too."""
    m = torch.randn(4, 5)
    m[0, 0] = bad
    with pytest.raises(TRPError, match=r"layer 'fc' has non-finite"):
        svd_mod.svdvals(m, "fc")


@pytest.mark.parametrize("failure", ["runtime", "linalg", "nan_values"])
def test_svdvals_float64_fallback(monkeypatch: pytest.MonkeyPatch, failure: str) -> None:
    """When the float32 svdvals fails (or returns NaN), the float64 retry must rescue it."""
    real = torch.linalg.svdvals
    calls: list[torch.dtype] = []

    def flaky(a, *args, **kwargs):
        calls.append(a.dtype)
        if a.dtype == torch.float32:
            if failure == "runtime":
                raise RuntimeError("linalg.svd: The algorithm failed to converge")
            if failure == "linalg":
                raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
            return real(a, *args, **kwargs) * float("nan")
        return real(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svdvals", flaky)
    m = torch.randn(6, 9)
    s = svd_mod.svdvals(m, "fc")
    assert calls == [torch.float32, torch.float64]
    assert s.dtype == torch.float32
    assert torch.allclose(s, real(m), atol=1e-5)


def test_svdvals_all_attempts_fail_names_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """If every attempt fails, svdvals raises a TRPError naming the layer."""

    def broken(a, *args, **kwargs):
        raise RuntimeError("linalg.svd: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "svdvals", broken)
    with pytest.raises(TRPError, match=r"SVD of layer 'features\.3' failed"):
        svd_mod.svdvals(torch.randn(4, 4), "features.3")


def test_spectrum_single_and_batched() -> None:
    """A layer's spectrum is S for a matrix and the root-sum-square over filters for a decouple batch."""
    s = torch.tensor([3.0, 2.0, 1.0])
    assert svd_mod.spectrum(s) is s
    batch = torch.tensor([[3.0, 0.0], [4.0, 1.0]])
    assert torch.allclose(svd_mod.spectrum(batch), torch.tensor([5.0, 1.0]))


@pytest.mark.parametrize("k", [1, 2, 4, 6])
@pytest.mark.parametrize("shape", [(6, 9), (9, 6), (5, 6, 9)])
def test_truncate_is_eckart_young(shape: tuple[int, ...], k: int) -> None:
    """truncate(k) must have rank ≤ k and Frobenius error sqrt(Σ_{i>k} σ_i²), the optimum."""
    torch.manual_seed(k)
    m = torch.randn(shape, dtype=torch.float64)
    u, s, vh = svd_mod.svd(m)
    mk = svd_mod.truncate(u, s, vh, k)
    assert mk.shape == m.shape
    assert int(torch.linalg.matrix_rank(mk).max()) <= k
    err = float(torch.linalg.norm(m - mk))
    tail = float(s[..., k:].pow(2).sum().sqrt())
    assert err == pytest.approx(tail, rel=1e-9, abs=1e-12)
    # The same tail read from the layer spectrum (what the energy criterion sees).
    assert tail == pytest.approx(float(svd_mod.spectrum(s)[k:].pow(2).sum().sqrt()), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_nuclear_subgradient(k: int) -> None:
    """U_k V_kᵀ is the nuclear-norm sub-gradient: ⟨G, M⟩ equals the sum of the top-k singular values."""
    torch.manual_seed(1)
    m = torch.randn(5, 7, dtype=torch.float64)
    u, s, vh = svd_mod.svd(m)
    g = svd_mod.nuclear_subgradient(u, vh, k)
    assert g.shape == m.shape
    assert float((g * m).sum()) == pytest.approx(float(s[:k].sum()), rel=1e-10)
    assert float(torch.linalg.matrix_norm(g, ord=2)) == pytest.approx(1.0, rel=1e-10)
