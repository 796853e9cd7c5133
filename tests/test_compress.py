"""trp.compress helpers: the per-layer latency check and the memory-format choice."""

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
    with pytest.raises(TRPError):
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
