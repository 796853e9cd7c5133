"""Tests for trp.svd: weight layouts, the robust SVD with its fallbacks, spectra and truncation."""

from __future__ import annotations

import pytest
import torch

from trp import svd as svd_mod
from trp.errors import TRPError

pytestmark = pytest.mark.usefixtures("one_thread")

CONV_SHAPES = [(8, 6, 3, 3), (8, 6, 5, 5), (8, 6, 1, 3), (4, 12, 3, 1), (1, 1, 1, 1)]


@pytest.mark.parametrize("shape", CONV_SHAPES)
@pytest.mark.parametrize("layout", ["channel", "spatial", "decouple"])
def test_to_from_matrix_roundtrip(layout: str, shape: tuple[int, ...]) -> None:
    """from_matrix must invert to_matrix exactly, or a full-rank decomposition could not be exact."""
    w = torch.randn(shape)
    m = svd_mod.to_matrix(w, layout)
    n, c, kh, kw = shape
    expected = {"channel": (n, c * kh * kw), "spatial": (c * kh, n * kw), "decouple": (n, c, kh * kw)}[layout]
    assert tuple(m.shape) == expected
    assert torch.equal(svd_mod.from_matrix(m, layout, w.shape), w)


def test_layouts_index_the_documented_entries() -> None:
    """Each layout must put W[n,c,y,x] where the scheme's factorization expects it."""
    n, c, kh, kw = 4, 3, 2, 5
    w = torch.arange(n * c * kh * kw, dtype=torch.float64).reshape(n, c, kh, kw)
    ch, sp, de = (svd_mod.to_matrix(w, lay) for lay in ("channel", "spatial", "decouple"))
    for i in range(n):
        for j in range(c):
            for y in range(kh):
                for x in range(kw):
                    v = w[i, j, y, x]
                    assert ch[i, (j * kh + y) * kw + x] == v
                    assert sp[j * kh + y, i * kw + x] == v
                    assert de[i, j, y * kw + x] == v


def test_linear_layout_is_identity() -> None:
    """A Linear weight is already the matrix; the linear layout must not copy or permute it."""
    w = torch.randn(5, 7)
    assert svd_mod.to_matrix(w, "linear") is w
    assert torch.equal(svd_mod.from_matrix(w, "linear", w.shape), w)


@pytest.mark.parametrize("fn", ["to_matrix", "from_matrix"])
def test_unknown_layout_raises(fn: str) -> None:
    """A misspelt scheme must be a TRPError listing the choices, not a silent reshape."""
    w = torch.randn(4, 3, 3, 3)
    with pytest.raises(TRPError, match="unknown scheme 'bogus'"):
        if fn == "to_matrix":
            svd_mod.to_matrix(w, "bogus")
        else:
            svd_mod.from_matrix(w.reshape(4, 27), "bogus", w.shape)


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
