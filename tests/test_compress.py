"""trp.compress: the per-layer latency check, the memory-format choice, one SVD per layer, SVD-trained runs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import trp
from trp.compress import best_latency, keep_faster
from trp.errors import TRPError


def test_keep_faster_leaves_the_model_untouched_and_validates_rounds() -> None:
    """The check times copies (the model keeps its memory format and weights); rounds < 1 is refused."""
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
    report = compress(run, tmp_path / "small", "value:0.05", latency_batch=8, check_latency=False, log=lambda s: None)
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
             log=lambda s: None)
    small = trp.load(tmp_path / "small").eval()
    with torch.no_grad():
        want, got = reference(x), small(x)
    scale = max(1.0, float(want.abs().max()))
    assert float((want - unpruned).abs().max()) > 1e-2 * scale  # pruning to rank k changed the function
    assert float((got - want).abs().max()) <= 1e-4 * scale
