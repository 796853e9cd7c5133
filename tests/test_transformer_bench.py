"""The transformer benchmark (benchmarks/run_transformers.py) on tiny sizes: data split, TRP's reach,
exact decomposition, and the results document of a quick run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import trp
from benchmarks import run_transformers as bench
from benchmarks.textdata import load_corpus, split_files, stdlib_files
from benchmarks.transformer_methods import linear_filter
from benchmarks.transformer_report import REQUIRED_KEYS
from benchmarks.transformer_tasks import carve_validation, gpt_task, vit_task
from trp.surgery import replace_modules

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(val_fraction=0.25, seed=3, max_files=24)


def test_split_is_by_file_and_disjoint(corpus):
    """Every file is on exactly one side, and each side's ids are exactly its own files' text."""
    train, val = set(corpus.train_files), set(corpus.val_files)
    assert not train & val and train | val == set(stdlib_files()[:24])
    texts = {f: (Path(corpus.root) / f).read_text(encoding="utf-8") for f in train | val}
    assert corpus.vocab.decode(corpus.train_ids) == "\n".join(texts[f] for f in corpus.train_files)
    assert torch.equal(corpus.val_ids, corpus.vocab.encode("\n".join(texts[f] for f in corpus.val_files)))


def test_split_is_seeded_and_hashed(corpus):
    """The same seed gives the same split and hashes; another seed another split."""
    again = load_corpus(val_fraction=0.25, seed=3, max_files=24)
    assert again.info["val_names_sha256"] == corpus.info["val_names_sha256"]
    assert again.info["train_content_sha256"] == corpus.info["train_content_sha256"]
    names = [f"f{i}.py" for i in range(40)]
    assert split_files(names, 0.25, 0) != split_files(names, 0.25, 1)
    assert corpus.info["train_names_sha256"] != corpus.info["val_names_sha256"]


def test_unknown_characters_map_to_one_id(corpus):
    """A character outside the train vocabulary encodes to id 0."""
    assert corpus.vocab.encode("\u2603a").tolist()[0] == 0 and corpus.vocab.encode("a").item() > 0


def test_validation_carved_from_training_images():
    """The ViT's validation images are training images not trained on; the test split is untouched."""
    data = trp.data.load("digits")
    train, test = carve_validation(data, 150, seed=0)
    assert train.num_train + train.num_test == data.num_train and train.num_test == 150
    seen = {bytes(x.numpy()) for x in train.x_train}
    assert not any(bytes(x.numpy()) in seen for x in train.x_test[:50] if (x != 0).any())
    assert torch.equal(test.x_test, data.x_test)


@pytest.mark.parametrize("name", ["vit", "gpt"])
def test_trp_touches_every_linear(name, corpus):
    """TRP lists every nn.Linear (attention projections included, no fused attention left), head too."""
    task = vit_task("", bench.QUICK_SIZE, 0, "digits") if name == "vit" else gpt_task(bench.QUICK_SIZE, 0, corpus=corpus)
    model = task.build()
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    reg = trp.TRP(model, "linear", filter_fn=linear_filter(True), input_shape=task.input_shape)
    assert sorted(layer.name for layer in reg.layers) == sorted(linears)
    assert len(linears) >= 5  # at least q, k, v, out and the MLP/head of one block
    without = trp.TRP(model, "linear", filter_fn=linear_filter(False), input_shape=task.input_shape)
    assert len(without.layers) == len(linears) - 1


@pytest.mark.parametrize("name", ["vit", "gpt"])
def test_full_rank_decomposition_is_exact(name, corpus):
    """Every Linear decomposed at full rank gives the dense model's output (relative error < 1e-4)."""
    task = vit_task("", bench.QUICK_SIZE, 0, "digits") if name == "vit" else gpt_task(bench.QUICK_SIZE, 0, corpus=corpus)
    torch.manual_seed(0)
    model = task.build().eval()
    for p in model.parameters():  # torchvision zero-initializes the ViT head: every output would be 0
        nn.init.normal_(p, 0.0, 0.2)
    x, _ = next(task.stream(0))
    with torch.no_grad():
        ref = model(x)
        layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        replace_modules(model, {n: trp.decompose_layer(m, "linear") for n, m in layers.items()})
        out = model(x)
    assert not any(isinstance(m, nn.Linear) and n in layers for n, m in model.named_modules())
    assert float((out - ref).norm() / ref.norm()) < 1e-4


@pytest.mark.slow
def test_quick_run_writes_the_document(tmp_path):
    """A quick run (one seed, eager) writes task files and results.md with every field the doc reads."""
    out, runs = tmp_path / "out", tmp_path / "runs"
    assert bench.main(["--quick", "--seeds", "0", "--runtimes", "eager", "--out", str(out), "--runs-dir", str(runs)]) == 0
    doc = json.loads((out / "results.json").read_text())
    for name in bench.TASKS:
        task_doc = doc["tasks"][name]
        seed = task_doc["seeds"]["0"]
        for method in ("dense", "trp", "posthoc", "posthoc+ft"):
            assert all(k in seed[method] for k in REQUIRED_KEYS), (name, method)
        # TRP decomposed at its own ranks: the decomposition changes nothing after the last projection
        split = "val"
        assert seed["trp"]["final"][split] == pytest.approx(seed["trp"]["projected"][split], rel=1e-4)
        assert seed["trp"]["macs"] < seed["dense"]["macs"]
        assert seed["posthoc"]["macs"] == pytest.approx(seed["trp"]["macs"], rel=0.03)  # same MACs budget
        lat = task_doc["latency"]["models"]
        assert set(lat) == {"dense", "trp", "posthoc"} and lat["dense"]["best"]["1"][0] == "eager"
    assert len(doc["tasks"]["gpt"]["data"]["val_names_sha256"]) == 64
    text = (out / "results.md").read_text()
    assert "## vit" in text and "## gpt" in text and "perplexity" in text
    assert bench.main(["--quick", "--seeds", "0", "--tasks", "gpt", "--phase", "train", "--out", str(out),
                       "--runs-dir", str(runs)]) == 2  # an existing result is not overwritten
