"""A model's structure as a spec plus an ordered list of transforms: strict JSON, old files, crafted sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import trp
from trp import checkpoint as ckpt
from trp import structure
from trp import saving
from trp.bn import fold_bn_
from trp.errors import TRPError
from trp.models import create
from trp.structure import TRANSFORMS, ModelSpec

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (1, 8, 8)
BASE = ModelSpec("resnet20", 10, 1, list(SHAPE), dataset="digits")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return create("resnet20", num_classes=10, in_channels=1).eval()


def _x(n: int = 3) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(2))


def _compressed(fold_first: bool) -> tuple[nn.Module, list, trp.Plan]:
    """A resnet20 with BN folded (before or after) and decomposed at rank 2, as compress makes it."""
    model = _model()
    pairs = fold_bn_(model) if fold_first else []
    p = trp.plan(model, ("channel", "linear"), trp.fixed(2), input_shape=SHAPE)
    trp.decompose_(model, p)
    if not fold_first:
        pairs = fold_bn_(model)
    return model, pairs, p


# ------------------------------------------------------------------------------------ spec


def test_registry_calls_owning_modules() -> None:
    """Every kind is registered once; replaying transforms gives the same structure as the owners' functions."""
    assert set(TRANSFORMS) == {"unfuse-attention", "svd-parametrize", "fold-bn", "decompose"}
    model, pairs, p = _compressed(fold_first=True)
    spec = BASE.then({"kind": "fold-bn", "pairs": pairs}).then({"kind": "decompose", "plan": p})
    built = structure.build_model(spec)
    assert list(built.state_dict()) == list(model.state_dict())
    assert all(built.state_dict()[k].shape == v.shape for k, v in model.state_dict().items())


def test_spec_helpers_and_json_round_trip() -> None:
    """then() appends (a new spec), find() returns the first transform or None, the JSON round-trips."""
    _, pairs, p = _compressed(fold_first=True)
    spec = BASE.then({"kind": "fold-bn", "pairs": pairs})
    assert BASE.transforms == [] and spec is not BASE
    spec = spec.then({"kind": "decompose", "plan": p})  # a Plan object is stored as its dict
    assert spec.find("decompose")["plan"] == p.to_dict()
    assert spec.find("svd-parametrize") is None
    assert [t["kind"] for t in spec.transforms] == ["fold-bn", "decompose"]
    assert spec.without("fold-bn").transforms == [spec.find("decompose")]
    d = spec.to_dict()
    assert d["format"] == structure.FORMAT == "trp-model/2"
    assert ModelSpec.from_dict(d) == spec
    found = spec.find("fold-bn")
    found["pairs"].clear()  # a copy: the spec does not change
    assert spec.find("fold-bn")["pairs"] == pairs


@pytest.mark.parametrize("field, value, message", [
    ("num_classes", 10**10, "num_classes must be <= (1e\\+06|1000000)"),
    ("num_classes", 1e10, "num_classes must be <= (1e\\+06|1000000)"),
    ("num_classes", 1e400, "num_classes must be a whole number"),
    ("num_classes", "10", "num_classes must be a whole number"),
    ("num_classes", True, "num_classes must be a whole number"),
    ("num_classes", 2.5, "num_classes must be a whole number"),
    ("num_classes", 0, "num_classes must be >= 1"),
    ("in_channels", 10**6, "in_channels must be <= 4096"),
    ("input_shape", [1, 8], "input_shape must be \\[channels, height, width\\]"),
    ("input_shape", "1,8,8", "input_shape must be \\[channels, height, width\\]"),
    ("input_shape", [3, 8, 8], "does not start with in_channels 1"),
    ("input_shape", [1, 10**5, 8], "input_shape must be <= 16384"),
    ("input_shape", [1, 16384, 16384], "too large"),
    ("arch", "resnet9000", "unknown architecture 'resnet9000'"),
    ("arch", 5, "unknown architecture 5"),
    ("dataset", 5, "dataset must be a string"),
    ("transforms", {"kind": "fold-bn"}, "transforms must be a list"),
    ("transforms", [{"kind": "prune"}], "unknown transform kind 'prune'"),
    ("transforms", ["fold-bn"], "a transform must be a JSON object"),
    ("transforms", [{"kind": "fold-bn", "pairs": [["a", "b"]], "extra": 1}], "unknown field 'extra'"),
    ("transforms", [{"kind": "fold-bn"}], "no field 'pairs'"),
    ("transforms", [{"kind": "fold-bn", "pairs": [["a", 5]]}], "is not a \\[conv, bn\\] pair"),
    ("transforms", [{"kind": "fold-bn", "pairs": "conv1,bn1"}], "pairs must be a list"),
    ("transforms", [{"kind": "svd-parametrize", "scheme": "decouple"}], "unknown SVD-training scheme 'decouple'"),
    ("transforms", [{"kind": "decompose", "plan": {"layers": []}}], "not a trp plan"),
    ("transforms", [{"kind": "fold-bn", "pairs": []}] * 65, "at most 64"),
])
def test_spec_is_checked_strictly(field: str, value: object, message: str) -> None:
    """Types, whole numbers within sane limits, known kinds and fields: in Python and in a file alike."""
    doc = {**BASE.to_dict(), field: value}
    with pytest.raises(TRPError, match=message):
        ModelSpec(**{k: v for k, v in doc.items() if k != "format"})
    with pytest.raises(TRPError, match=message):
        ModelSpec.from_dict(doc)


@pytest.mark.parametrize("doc, message", [
    (None, "not a trp model"),
    ({"format": "trp-model/9"}, "not a trp model"),
    ({**BASE.to_dict(), "plan": None}, "unknown field 'plan'"),
    ({k: v for k, v in BASE.to_dict().items() if k != "num_classes"}, "no field 'num_classes'"),
    ({"format": "trp-model/1", "arch": "resnet20", "num_classes": 10, "in_channels": 1, "input_shape": [1, 8, 8],
      "transforms": []}, "unknown field 'transforms'"),
    ({"format": "trp-model/1", "arch": "resnet20", "num_classes": 10, "in_channels": 1, "input_shape": [1, 8, 8],
      "fold_after_plan": "no"}, "fold_after_plan must be true or false"),
])
def test_damaged_metadata_is_refused(doc: object, message: str) -> None:
    with pytest.raises(TRPError, match=message):
        ModelSpec.from_dict(doc)


# ------------------------------------------------------------------------------------ old files


@pytest.mark.parametrize("fold_first", [True, False])
def test_old_format_files_still_load(tmp_path: Path, fold_first: bool) -> None:
    """A trp-model/1 file (bn_folded, fold_after_plan, plan fields) loads with the transforms in the old order."""
    model, pairs, p = _compressed(fold_first)
    old = {"format": "trp-model/1", "arch": "resnet20", "num_classes": 10, "in_channels": 1, "input_shape": [1, 8, 8],
           "dataset": "digits", "svd_scheme": None, "bn_folded": pairs, "fold_after_plan": not fold_first,
           "plan": p.to_dict()}
    ckpt.write_safetensors(tmp_path / ckpt.MODEL_FILE, ckpt.with_prefix("model.", model.state_dict()), {"model": old})
    loaded, spec, _ = saving.load_model(tmp_path)
    kinds = [t["kind"] for t in spec.transforms]
    assert kinds == (["fold-bn", "decompose"] if fold_first else ["decompose", "fold-bn"])
    with torch.no_grad():
        assert torch.equal(loaded(_x()), model(_x()))
    # Saved again, it is written in the new format and loads the same.
    saving.save_model(tmp_path / "again" / ckpt.MODEL_FILE, loaded, spec)
    again, spec2, meta = saving.load_model(tmp_path / "again")
    assert meta["model"]["format"] == "trp-model/2" and spec2 == spec
    with torch.no_grad():
        assert torch.equal(again(_x()), model(_x()))


# ------------------------------------------------------------------------------------ crafted sizes


@pytest.fixture()
def no_build(monkeypatch: pytest.MonkeyPatch) -> list:
    """Record every real model build: a refused file must be refused before one happens."""
    calls: list = []
    real = structure.build_model

    def recording(spec: ModelSpec) -> nn.Module:
        calls.append(spec)
        return real(spec)

    monkeypatch.setattr(structure, "build_model", recording)
    monkeypatch.setattr(saving, "build_model", recording)  # where loading calls it
    return calls


def _rewrite(folder: Path, edit) -> None:  # noqa: ANN001
    """Edit a model file's metadata and re-write it *validly* (the checksum is no signature)."""
    tensors, meta = ckpt.read_safetensors(folder / ckpt.MODEL_FILE)
    edit(meta["model"])
    ckpt.write_safetensors(folder / ckpt.MODEL_FILE, tensors, meta)


@pytest.mark.parametrize("num_classes, message", [(10**10, "num_classes must be <= (1e\\+06|1000000)"),
                                                 (100_000, "fc.weight has shape \\(10, 64\\), the model expects \\(100000, 64\\)")])
def test_crafted_num_classes_is_refused_before_allocation(tmp_path: Path, no_build: list, one_line_error,
                                                          num_classes: int, message: str) -> None:
    """#15 item 7: num_classes 1e10 in a valid file used to be allocated before anything was checked."""
    saving.save_model(tmp_path / ckpt.MODEL_FILE, _model(), BASE)

    def edit(m: dict) -> None:
        m["num_classes"] = num_classes

    _rewrite(tmp_path, edit)
    with pytest.raises(TRPError, match=message):
        trp.load(tmp_path)
    assert no_build == []
    assert "trp: error:" in one_line_error(["eval", tmp_path])


@pytest.mark.parametrize("rank, message", [(10**10, "rank 10000000000, above its full rank"),
                                           (1e10, "has scheme 'channel', rank 10000000000.0"),
                                           ("max", "does not fit this architecture")])
def test_crafted_plan_rank_is_refused_before_allocation(tmp_path: Path, no_build: list, rank: object,
                                                        message: str) -> None:
    """#15 item 7: a plan rank of 1e10 (or any rank the file's tensors do not have) is refused unbuilt."""
    model, pairs, p = _compressed(fold_first=True)
    spec = BASE.then({"kind": "fold-bn", "pairs": pairs}).then({"kind": "decompose", "plan": p})
    saving.save_model(tmp_path / ckpt.MODEL_FILE, model, spec)
    assert saving.load(tmp_path) is not None and len(no_build) == 1
    no_build.clear()

    def edit(m: dict) -> None:
        layer = next(lp for lp in m["transforms"][1]["plan"]["layers"] if lp["name"] == "layer1.0.conv1")
        layer["rank"] = layer["full_rank"] if rank == "max" else rank

    _rewrite(tmp_path, edit)
    with pytest.raises(TRPError, match=message):
        trp.load(tmp_path)
    assert no_build == []


def test_weights_that_do_not_fit_the_spec_are_not_saved(tmp_path: Path) -> None:
    """save_model checks the weights against the spec: a file trp writes always loads again."""
    model, pairs, p = _compressed(fold_first=True)
    with pytest.raises(TRPError, match="does not fit"):
        saving.save_model(tmp_path / ckpt.MODEL_FILE, model, BASE.then({"kind": "fold-bn", "pairs": pairs}))
    assert not (tmp_path / ckpt.MODEL_FILE).exists()


def test_folding_a_decomposed_layer_is_one_line(tmp_path: Path) -> None:
    """A fold-bn pair naming a module that is no conv (here a decomposed Sequential) is a TRPError."""
    _, _, p = _compressed(fold_first=True)
    spec = BASE.then({"kind": "decompose", "plan": p}).then({"kind": "fold-bn", "pairs": [["layer1.0.conv1", "layer1.0.bn1"]]})
    with pytest.raises(TRPError, match="folded-BN list does not fit"):
        structure.build_model(spec)


# ------------------------------------------------------------------------------------ sources and instances (#13)


def test_source_kwargs_are_part_of_the_spec(tmp_path: Path) -> None:
    """A source's kwargs are stored in the file and rebuild the same model; zoo files hold no kwargs field."""
    assert "kwargs" not in BASE.to_dict()
    spec = ModelSpec("torchvision:mobilenet_v2", 10, 1, [1, 8, 8], kwargs={"width_mult": 0.25})
    assert spec.to_dict()["kwargs"] == {"width_mult": 0.25} and ModelSpec.from_dict(spec.to_dict()) == spec
    torch.manual_seed(0)
    model = structure.build_model(spec).eval()
    saving.save_model(tmp_path / ckpt.MODEL_FILE, model, spec)
    loaded = trp.load(tmp_path)
    assert loaded.features[0][0].in_channels == 1 and loaded.features[0][0].out_channels == 8
    with torch.no_grad():
        assert torch.equal(loaded(_x()), model(_x()))


@pytest.mark.parametrize("doc, message", [
    ({"arch": "resnet20", "kwargs": {"width": 2}}, "takes no model-kwargs"),
    ({"arch": "torchvision:resnet18", "kwargs": {"weights": "DEFAULT"}}, "may not set 'weights'"),
    ({"arch": "torchvision:resnet18", "kwargs": [1]}, "must be a JSON object"),
    ({"arch": "timm:resnet18", "kwargs": {"checkpoint_path": "model.pth"}}, "may not set 'checkpoint_path'"),
    ({"arch": "instance", "kwargs": {"width": 2}}, "saved from an instance has no kwargs"),
    ({"arch": "torchvision:resnet18", "input_shape": [8]}, "input_shape must be \\[channels, height, width\\]"),
])
def test_source_specs_are_checked_strictly(doc: dict, message: str) -> None:
    with pytest.raises(TRPError, match=message):
        ModelSpec.from_dict({**BASE.to_dict(), **doc})


def test_instance_and_python_specs_take_any_sample_shape() -> None:
    """A user's own model (instance, python:) may take vectors or sequences; image sources take [C, H, W]."""
    assert ModelSpec("instance", 5, 1, [20]).input_shape == [20]
    assert ModelSpec("python:pkg.mod:make", 5, 1, [4, 16]).input_shape == [4, 16]


def test_crafted_source_kwargs_are_refused_before_allocation(tmp_path: Path, no_build: list) -> None:
    """kwargs that size the model (width_mult 1e3) are checked on the meta device against the file's tensors."""
    spec = ModelSpec("torchvision:mobilenet_v2", 10, 1, [1, 8, 8], kwargs={"width_mult": 0.25})
    saving.save_model(tmp_path / ckpt.MODEL_FILE, structure.build_model(spec), spec)
    no_build.clear()

    def edit(m: dict) -> None:
        m["kwargs"] = {"width_mult": 1000.0}

    _rewrite(tmp_path, edit)
    with pytest.raises(TRPError, match="does not fit this architecture"):
        trp.load(tmp_path)
    assert no_build == []


class _Encoder(nn.Module):
    """A tiny attention model: MultiheadAttention then a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))


def test_unfused_attention_replays_and_loads(tmp_path) -> None:
    """An unfused, decomposed attention model saves and loads back (the unfuse-attention transform replays)."""
    import trp

    torch.manual_seed(0)
    model = _Encoder().eval()
    names = trp.unfuse_attention_(model)
    assert names == ["attn"]
    p = trp.plan(model, "linear", trp.fixed(4), input_shape=(5, 16))
    trp.decompose_(model, p)
    x = torch.randn(2, 5, 16)
    folder = trp.save(model, tmp_path / "m", plan=p, input_shape=(5, 16))
    loaded, spec, _ = saving.load_model(folder, model=_Encoder())
    assert [t["kind"] for t in spec.transforms] == ["unfuse-attention", "decompose"]
    assert torch.allclose(loaded(x), model(x), atol=1e-6)
