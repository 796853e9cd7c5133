"""Any architecture through the CLI and ``trp.load`` (issue #13 item 4): model sources, instances, fresh processes.

Sources: ``torchvision:NAME``, ``timm:NAME``, ``hf:CONFIG.json`` and ``python:MODULE:FUNCTION``, each
with JSON kwargs, recorded in the run and in the model file so that a fresh process rebuilds the
model from the folder alone; ``trp.save`` / ``trp.load(model=...)`` for models held as instances.
Models are tiny and trained on the offline digits set (8×8, one channel) so the file stays fast.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import trp
from trp import saving
from trp import checkpoint as ckpt
from trp import models, structure
from trp.cli import main
from trp.errors import TRPError
from trp.export import export
from trp.structure import INSTANCE, ModelSpec
from trp.train import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
FAST = ["--dataset", "digits", "--epochs", "1", "--batch-size", "256", "--no-progress"]
# A ViT small enough for 8×8 digits and for 32×32 probes: 2 blocks of width 32.
TIMM_VIT = "timm:vit_tiny_patch16_224"
TIMM_KW = {"img_size": 8, "patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2}
HF_VIT = {"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
          "intermediate_size": 64, "image_size": 8, "patch_size": 4, "transformers_version": "5.0.0"}
FACTORY = """
from torch import nn

IMPORTED = True


def make(width=8, num_classes=10, in_channels=3):
    return nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, num_classes))
"""


def _x(shape: tuple[int, ...] = (1, 8, 8), n: int = 3) -> torch.Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(1))


def _cli(argv: list, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _fresh(code: str, cwd: Path | None = None) -> str:
    """Run ``code`` in a new interpreter (nothing imported or cached from this one); its stdout."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, env=ENV, cwd=cwd)
    assert done.returncode == 0, done.stderr
    return done.stdout


_LOAD_AND_EXPORT = """
    import json, sys, torch, trp
    from trp.export import export
    folder, shape = sys.argv[1] if len(sys.argv) > 1 else {folder!r}, {shape!r}
    model = trp.load(folder)
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        print(json.dumps(model(x).tolist()))
    print(export(folder, "onnx", folder + "/fresh.onnx"))
"""


def _check_in_fresh_process(folder: Path, shape: tuple[int, ...], cwd: Path | None = None) -> None:
    """The folder loads in a new process into the same function, and its ONNX export matches onnxruntime."""
    out = _fresh(_LOAD_AND_EXPORT.format(folder=str(folder), shape=shape), cwd).strip().split("\n")
    with torch.no_grad():
        here = trp.load(folder)(_x(shape))
    torch.testing.assert_close(torch.tensor(json.loads(out[0])), here, rtol=0, atol=1e-6)
    assert "onnxruntime matches PyTorch" in out[-1], out[-1]


# ------------------------------------------------------------------------------------ the CLI, end to end


@pytest.fixture()
def hf_config(tmp_path: Path) -> Path:
    pytest.importorskip("transformers")
    path = tmp_path / "vit.json"
    path.write_text(json.dumps(HF_VIT))
    return path


@pytest.mark.parametrize("source", ["torchvision", "timm", "hf"])
def test_cli_train_compress_eval_export(tmp_path: Path, capsys: pytest.CaptureFixture, request: pytest.FixtureRequest,
                                        source: str) -> None:
    """train, compress, eval, export on torchvision, timm and transformers models; the compressed folder
    loads in a fresh process (the hf config file deleted first: the folder is self-contained)."""
    run, small = tmp_path / "run", tmp_path / "small"
    if source == "torchvision":
        flags = ["--model", "torchvision:mobilenet_v2", "--method", "trp"]
    elif source == "timm":
        pytest.importorskip("timm")
        flags = ["--model", TIMM_VIT, "--model-kwargs", json.dumps(TIMM_KW), "--method", "baseline"]
    else:
        config = request.getfixturevalue("hf_config")
        flags = ["--model", f"hf:{config}", "--model-kwargs", '{"hidden_dropout_prob": 0.0}', "--method", "baseline"]
    rc, out, err = _cli(["train", *flags, *FAST, "--out", run], capsys)
    assert rc == 0, err
    recorded = json.loads((run / "config.json").read_text())["config"]
    assert recorded["model"] == flags[1] and isinstance(recorded["model_kwargs"], dict)
    rc, out, err = _cli(["compress", run, "--out", small, "--rank", "fixed:2", "--latency-batch", "2",
                         "--no-latency-check", "--json"], capsys)
    assert rc == 0, err
    report = json.loads(out)
    # The default filter takes convs (groups=1) but the first: mobilenet's pointwise convs; a ViT's only
    # conv is its patch embedding, the first, so nothing is decomposed there.
    assert (report["layers_decomposed"] > 0) == (source == "torchvision")
    rc, out, err = _cli(["eval", small, "--json"], capsys)
    assert rc == 0, err
    assert json.loads(out)["test_images"] == 360 and json.loads(out)["macs"] > 0
    if source != "hf":  # transformers models are not TorchScript-compilable (a one-line error); ONNX below
        rc, out, err = _cli(["export", small, "--format", "torchscript", "--out", tmp_path / "m.pt"], capsys)
        assert rc == 0 and "TorchScript matches PyTorch" in out, err
    spec = saving.load_model(small)[1]
    assert spec.arch == flags[1]
    if source == "hf":
        assert spec.kwargs["config"]["hidden_size"] == 32 and spec.kwargs["config"]["hidden_dropout_prob"] == 0.0
        assert "transformers_version" not in spec.kwargs["config"]
        (tmp_path / "vit.json").unlink()
    _check_in_fresh_process(small, (1, 8, 8))


# ------------------------------------------------------------------------------------ compressed folders, API


def _linear_plan(model: nn.Module, shape: tuple[int, ...]) -> trp.Plan:
    return trp.plan(model, "linear", trp.fixed(4), filter_fn=lambda m, name: type(m) is nn.Linear, input_shape=shape)


@pytest.mark.parametrize("source, kwargs", [
    ("torchvision:resnet18", {}),
    (TIMM_VIT, {**TIMM_KW, "img_size": 32, "patch_size": 8}),
    ("hf:vit.json", {"config": {**HF_VIT, "image_size": 32, "patch_size": 8}}),
])
def test_decomposed_source_loads_in_fresh_process_and_exports(tmp_path: Path, source: str, kwargs: dict) -> None:
    """A torchvision, timm and transformers model decomposed (convs / every Linear) and saved with its
    source loads from the folder alone in a new process, and its ONNX export matches onnxruntime."""
    pytest.importorskip({"timm": "timm", "hf": "transformers"}.get(source.split(":")[0], "torchvision"))
    torch.manual_seed(0)
    model = models.create(source, num_classes=5, **kwargs).eval()
    shape = (3, 32, 32)
    p = trp.plan(model, rank=trp.fixed(4), input_shape=shape) if "resnet" in source else _linear_plan(model, shape)
    assert sum(lp.decomposed for lp in p.layers) >= (15 if "resnet" in source else 9)
    trp.decompose_(model, p)
    trp.save(model, tmp_path, p, source=source, kwargs=kwargs)  # input shape: what the model declares (32×32)
    spec = saving.load_model(tmp_path)[1]
    assert spec.input_shape == [3, 32, 32] and spec.num_classes == 5 and spec.arch == source
    assert trp.Plan.from_json(tmp_path / "plan.json").to_dict() == p.to_dict()
    _check_in_fresh_process(tmp_path, shape)


def test_declared_input_size_is_the_default(tmp_path: Path) -> None:
    """trp.save without input_shape takes the size the model declares (timm img_size, HF image_size/num_channels)."""
    pytest.importorskip("timm")
    pytest.importorskip("transformers")
    vit = models.create(TIMM_VIT, num_classes=3, **{**TIMM_KW, "img_size": 24, "patch_size": 8})
    hf = models.create("hf:x.json", num_classes=4, in_channels=1, config={**HF_VIT, "image_size": 16})
    for i, (model, shape, classes) in enumerate(((vit, [3, 24, 24], 3), (hf, [1, 16, 16], 4))):
        trp.save(model, tmp_path / str(i))
        spec = ModelSpec.from_dict(ckpt.read_safetensors(tmp_path / str(i) / ckpt.MODEL_FILE)[1]["model"])
        assert (spec.arch, spec.input_shape, spec.num_classes) == (INSTANCE, shape, classes)


# ------------------------------------------------------------------------------------ instances


class UserNet(nn.Module):
    """A model trp knows nothing about: its own forward, a conv stem, a Linear head used twice."""

    def __init__(self, width: int = 12) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.body = nn.Conv2d(width, width, 3, padding=1)
        self.head = nn.Linear(width, width)
        self.out = nn.Linear(width, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.body(torch.relu(self.stem(x)))).mean(dim=(2, 3))
        return self.out(torch.tanh(self.head(torch.tanh(self.head(h)))))


def test_save_and_load_an_instance_with_a_plan(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """trp.save(model, folder, plan) then trp.load(folder, model=fresh) replays the plan on the fresh
    instance and loads the weights: the same function; without an instance, or with the wrong one, one line."""
    torch.manual_seed(0)
    model = UserNet().eval()
    p = trp.plan(model, ("channel", "linear"), trp.fixed(3), filter_fn=lambda m, n: n != "stem", input_shape=(1, 8, 8))
    assert sorted(lp.name for lp in p.layers if lp.decomposed) == ["body", "head", "out"]
    with pytest.raises(TRPError, match="layer 'body' is still dense"):
        trp.save(model, tmp_path / "dense", p, (1, 8, 8))
    trp.decompose_(model, p)
    expected = model(_x())
    assert trp.save(model, tmp_path, p, (1, 8, 8)) == tmp_path / ckpt.MODEL_FILE
    torch.manual_seed(1)
    fresh = UserNet()
    loaded = trp.load(tmp_path, model=fresh)
    assert loaded is fresh and not loaded.training and isinstance(loaded.body, nn.Sequential)
    with torch.no_grad():
        torch.testing.assert_close(loaded(_x()), expected, rtol=0, atol=0)
    with pytest.raises(TRPError, match="saved from a model instance.*model=<a fresh instance"):
        trp.load(tmp_path)
    with pytest.raises(TRPError, match="does not fit"):
        trp.load(tmp_path, model=UserNet(width=8))
    with pytest.raises(TRPError, match="the plan does not fit this model"):
        trp.load(tmp_path, model=nn.Sequential(nn.Linear(2, 2)))
    rc, _, err = _cli(["eval", tmp_path], capsys)
    assert rc == 2 and err.count("\n") == 1 and "saved from a model instance" in err


def test_save_an_mlp_instance(tmp_path: Path) -> None:
    """Any sample shape for an instance (here one vector); num_classes read from one forward pass."""
    mlp = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 7))
    trp.save(mlp, tmp_path, input_shape=(20,))
    spec = saving.load_model(tmp_path, model=nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 7)))[1]
    assert (spec.input_shape, spec.num_classes, spec.in_channels) == ([20], 7, 1)
    with pytest.raises(TRPError, match="cannot run the model on an input of shape \\[3, 32, 32\\]"):
        trp.save(mlp, tmp_path / "b", input_shape=(3, 32, 32))


# ------------------------------------------------------------------------------------ python: sources


@pytest.fixture()
def factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A user module ``trp_user_nets`` in a folder that is the current one and not on sys.path."""
    folder = tmp_path / "code"
    folder.mkdir()
    (folder / "trp_user_nets.py").write_text(FACTORY)
    monkeypatch.chdir(folder)
    monkeypatch.delitem(sys.modules, "trp_user_nets", raising=False)
    yield folder
    sys.modules.pop("trp_user_nets", None)


def test_python_source_runs_only_when_built(factory: Path) -> None:
    """Checking a python: source (config, spec) never imports it; create() does, from the current folder."""
    TrainConfig(model="python:trp_user_nets:make", model_kwargs='{"width": 4}')
    spec = ModelSpec("python:trp_user_nets:make", 10, 1, [1, 8, 8], kwargs={"width": 4})
    assert "trp_user_nets" not in sys.modules and str(factory) not in sys.path
    model = structure.build_model(spec)
    assert sys.modules["trp_user_nets"].IMPORTED and str(factory) not in sys.path
    assert model[0].in_channels == 1 and model[0].out_channels == 4 and model[-1].out_features == 10
    with pytest.raises(TRPError, match="has no function 'nope'"):
        models.create("python:trp_user_nets:nope")
    with pytest.raises(TRPError, match="could not be built .*TypeError: make\\(\\) got an unexpected keyword"):
        models.create("python:trp_user_nets:make", depth=3)


def test_python_source_through_cli_and_fresh_process(factory: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    """trp train --model python:MODULE:FUNCTION --model-kwargs JSON, compress, then a fresh process in
    the module's folder loads the compressed model and exports it."""
    run, small = tmp_path / "run", tmp_path / "small"
    rc, _, err = _cli(["train", "--model", "python:trp_user_nets:make", "--model-kwargs", '{"width": 6}', *FAST,
                       "--out", run], capsys)
    assert rc == 0, err
    rc, out, err = _cli(["compress", run, "--out", small, "--rank", "fixed:2", "--latency-batch", "2",
                         "--no-latency-check", "--json"], capsys)
    assert rc == 0 and json.loads(out)["layers_decomposed"] == 1, err
    assert saving.load_model(small)[1].kwargs == {"width": 6}
    _check_in_fresh_process(small, (1, 8, 8), cwd=factory)


def test_python_source_in_a_file_must_be_importable(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A model file naming a module that cannot be imported is refused in one line."""
    spec = ModelSpec("python:no_such_trp_module:make", 10, 1, [1, 8, 8])
    ckpt.write_safetensors(tmp_path / ckpt.MODEL_FILE, {}, {"model": spec.to_dict()})
    with pytest.raises(TRPError, match="cannot import no_such_trp_module .*importable from sys.path or the current"):
        trp.load(tmp_path)
    rc, _, err = _cli(["export", tmp_path, "--format", "onnx", "--out", tmp_path / "m.onnx"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "cannot import no_such_trp_module" in err


# ------------------------------------------------------------------------------------ bad sources


@pytest.mark.parametrize("flags, message", [
    (["--model", "torchvision:resnet9"], "unknown torchvision classification model 'resnet9' \\(did you mean"),
    (["--model", "torchvision:fasterrcnn_resnet50_fpn"], "unknown torchvision classification model"),
    (["--model", "timm:no_such_net"], "unknown timm model 'no_such_net'"),
    (["--model", "keras:resnet"], "unknown model source 'keras:'"),
    (["--model", "python:my models"], "python: needs MODULE:FUNCTION"),
    (["--model", "python:no_such_trp_module:make"], "cannot import no_such_trp_module"),
    (["--model", "hf:missing.json"], "no such config file: missing.json"),
    (["--model", "timm:resnet18", "--model-kwargs", "{width: 2}"], "model-kwargs must be a JSON object .*Expecting"),
    (["--model", "timm:resnet18", "--model-kwargs", "[1, 2]"], "model-kwargs must be a JSON object"),
    (["--model", "timm:resnet18", "--model-kwargs", '{"pretrained": true}'], "may not set 'pretrained'"),
    (["--model", "timm:resnet18", "--model-kwargs", '{"checkpoint_path": "x.pth"}'], "may not set 'checkpoint_path'"),
    (["--model", "torchvision:resnet18", "--model-kwargs", '{"weights": "DEFAULT"}'], "may not set 'weights'"),
    (["--model", "torchvision:resnet18", "--model-kwargs", '{"num_classes": 3}'], "may not set 'num_classes'"),
    (["--model", "torchvision:resnet18", "--model-kwargs", '{"zoom": 3}'], "could not be built .*TypeError"),
    (["--model", "resnet20", "--model-kwargs", '{"width": 2}'], "takes no model-kwargs"),
    (["--model", "timm:resnet18", "--model-kwargs", '{"drop_rate": NaN}'], "must be finite"),
])
def test_bad_source_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture, flags: list,
                                       message: str) -> None:
    rc, out, err = _cli(["train", *flags, *FAST, "--out", tmp_path / "run"], capsys)
    assert rc == 2 and err.count("\n") == 1 and err.startswith("trp: error: ") and "Traceback" not in out + err, err
    assert __import__("re").search(message, err), err


def test_missing_package_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """timm and transformers are optional: without them, one line saying what to install."""
    for package, source in (("timm", "timm:resnet18"), ("transformers", "hf:vit.json")):
        monkeypatch.setitem(sys.modules, package, None)  # import fails as if not installed
        rc, _, err = _cli(["train", "--model", source, *FAST, "--out", tmp_path / "run"], capsys)
        expected = f"trp: error: model '{source}' needs the {package} package: pip install {package}"
        assert rc == 2 and err.strip() == expected


def test_hf_config_is_checked(tmp_path: Path) -> None:
    """An hf: config must name a model type transformers knows, with an image classifier; no remote code."""
    pytest.importorskip("transformers")
    cases = [({"model_type": "no_such_type"}, "knows no model type 'no_such_type'"),
             ({"model_type": "gpt2", "n_layer": 1}, "has no image-classification model"),
             ({"model_type": "vit", "auto_map": {"AutoModel": "x.Y"}}, "never runs remote code"),
             ({"hidden_size": 8}, "with a 'model_type'")]
    for config, message in cases:
        path = tmp_path / "c.json"
        path.write_text(json.dumps(config))
        with pytest.raises(TRPError, match=message):
            models.create(f"hf:{path}")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(TRPError, match="cannot read .*bad.json as JSON"):
        models.create(f"hf:{tmp_path / 'bad.json'}")
