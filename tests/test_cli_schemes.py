"""`trp train --scheme auto|LIST --layers convs|all` and `trp compress` of such runs, on digits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from torch import nn

from trp import methods
from trp.cli import main
from trp.models import create
from trp.surgery import default_filter, layer_filter
from trp.train import TrainConfig

VIT = ["--model", "timm:vit_tiny_patch16_224", "--model-kwargs",
       json.dumps({"img_size": 8, "patch_size": 4, "depth": 1, "embed_dim": 32, "num_heads": 2})]


pytestmark = pytest.mark.usefixtures("one_thread")  # two OpenMP threads on a shared 2-core machine are slower


def test_vit_trains_with_auto_on_all_layers_and_compresses_its_linears(tmp_path: Path) -> None:
    """A timm ViT trains with TRP on its Linear layers and compress decomposes them (stem and head stay)."""
    pytest.importorskip("timm")
    run, small = tmp_path / "vit", tmp_path / "vit-small"
    assert main(["train", *VIT, "--dataset", "digits", "--epochs", "1", "--method", "trp", "--scheme", "auto",
                 "--layers", "all", "--out", str(run), "--no-progress"]) == 0
    config = json.loads((run / "config.json").read_text())["config"]
    assert (config["scheme"], config["layers"]) == ("auto", "all")  # stored as given, JSON text
    assert main(["compress", str(run), "--rank", "fixed:4", "--no-latency-check", "--latency-batch", "8",
                 "--out", str(small)]) == 0
    report = json.loads((small / "report.json").read_text())
    assert report["layers_decomposed"] == 4  # qkv, proj, fc1, fc2: rank 4 lowers the MACs of each
    assert report["macs_after"] < report["macs_before"]
    dense = {name: reason for name, reason in report["layers_dense"]}
    assert set(dense) == {"patch_embed.proj", "head"}, dense  # the first conv and the classifier, as the paper
    plan = json.loads((small / "plan.json").read_text())
    assert {(lp["type"], lp["scheme"], lp["rank"]) for lp in plan["layers"] if lp["scheme"]} == {("Linear", "linear", 4)}
    pytest.importorskip("matplotlib")
    assert main(["report", str(run)]) == 0  # an "auto" run reports its convs in the channel layout


def test_vit_with_the_default_layers_still_finds_no_conv(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The default stays the paper's convs: a ViT (one conv, the stem) has nothing to train, in one line."""
    pytest.importorskip("timm")
    assert main(["train", *VIT, "--dataset", "digits", "--epochs", "1", "--out", str(tmp_path / "r"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("trp: error:") and err.count("\n") == 1 and "eligible" in err, err


def test_default_is_the_papers_convs() -> None:
    """Without --scheme/--layers a run trains the convs default_filter picks, in the channel scheme."""
    config = TrainConfig()
    assert (config.scheme, config.layers) == ("channel", "convs")
    assert TrainConfig.from_dict({k: v for k, v in config.to_dict().items() if k != "layers"}).layers == "convs"
    model = create("resnet20", num_classes=10, in_channels=1)
    picked = lambda f: [n for n, m in model.named_modules() if f(m, n)]  # noqa: E731
    assert picked(methods.run_filter(model, config)) == picked(default_filter(model))
    every = picked(layer_filter(model, "all", ("auto",)))
    assert every == picked(default_filter(model))  # resnet20's only Linear is its classifier
    assert "fc" not in every and "conv1" not in every


def test_scheme_lists_pick_per_layer_type() -> None:
    """spatial,linear: convs spatial, Linear layers linear; a scheme that fits no Linear leaves them out."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(16, 8), nn.Linear(8, 2))
    names = methods.scheme_names("spatial, linear")
    assert names == ("spatial", "linear")
    picked = lambda f: [n for n, m in model.named_modules() if f(m, n)]  # noqa: E731
    assert picked(layer_filter(model, "all", names)) == ["1", "3"]
    assert picked(layer_filter(model, "all", ("spatial",))) == ["1"]


@pytest.mark.parametrize("argv, words", [
    (["--scheme", "spatial,foo"], "unknown scheme 'foo'"),
    (["--scheme", "spatial,"], "unknown scheme ''"),
    (["--layers", "some"], "unknown layers 'some'"),
    (["--method", "svd", "--scheme", "auto"], "method svd does not train in scheme 'auto'"),
    (["--method", "svd", "--scheme", "channel,linear"], "method svd does not train in scheme"),
    (["--method", "svd", "--layers", "all"], "method svd trains the paper's convs only"),
])
def test_bad_scheme_or_layers_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, argv: list[str],
                                          words: str) -> None:
    """A bad scheme list or layer choice exits 2 with one 'trp: error:' line, before any training."""
    out = tmp_path / "r"
    assert main(["train", "--dataset", "digits", "--epochs", "1", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("trp: error:") and err.count("\n") == 1 and words in err, err
    assert not (out / "checkpoint.safetensors").exists()


def test_compress_refuses_a_bad_scheme_list(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """compress --scheme is checked against the registry before the run is read."""
    assert main(["compress", str(tmp_path / "no-run"), "--scheme", "linear,bogus", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("trp: error:") and err.count("\n") == 1 and "unknown scheme 'bogus'" in err, err
