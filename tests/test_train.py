"""Training runs, resuming, compression and the command line, end to end on real data."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch

import trp
from trp.cli import main
from trp.compress import compress
from trp.errors import TRPError
from trp.train import TrainConfig, lr_at, train

CIFAR_MINI = Path(__file__).resolve().parents[1].parent / "shared/data/cifar10-mini/cifar-10-batches-py"
needs_cifar = pytest.mark.skipif(not CIFAR_MINI.is_dir(), reason=f"needs the CIFAR-10 subset at {CIFAR_MINI} (../shared from the repo root)")

QUIET = {"progress": False, "log": lambda s: None}


def _metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


pytestmark = pytest.mark.usefixtures("one_thread")  # two OpenMP threads on a shared 2-core machine are slower


def test_config_validation() -> None:
    """Out-of-range and non-finite settings are refused when the config is built."""
    cases = [({"energy": 0}, "energy must be > 0, got 0"), ({"energy": 1.01}, "energy must be <= 1, got 1.01"),
             ({"period": 0}, "period must be >= 1, got 0"), ({"nuclear": -1e-4}, "nuclear must be >= 0, got -0.0001"),
             ({"epochs": 0}, "epochs must be >= 1, got 0"), ({"lr": float("nan")}, "lr must be finite, got nan"),
             ({"batch_size": 0}, "batch-size must be >= 1, got 0"), ({"model": "resnet21"}, "unknown model 'resnet21'"),
             ({"dataset": "mnist"}, "unknown dataset 'mnist'"), ({"method": "prune"}, "unknown method 'prune'"),
             ({"scheme": "tucker"}, "unknown scheme 'tucker'"),
             ({"method": "svd", "scheme": "decouple"}, "method svd does not train in scheme 'decouple'"),
             ({"method": "nuclear", "nuclear": 0.0}, "method nuclear needs --nuclear > 0"),
             ({"epochs": 2.5}, "epochs must be a whole number, got 2.5"), ({"speedup": 0.9}, "speedup must be >= 1, got 0.9"),
             ({"speedup": float("inf")}, "speedup must be finite, got inf"), ({"freeze": -1}, "freeze must be >= 0, got -1"),
             ({"freeze": float("nan")}, "freeze must be finite, got nan"),
             ({"method": "baseline", "speedup": 2.0}, "speedup, latency-speedup and freeze shape TRP's ranks; method baseline has none"),
             ({"method": "svd", "freeze": 1.0}, "speedup, latency-speedup and freeze shape TRP's ranks; method svd has none")]
    for bad, message in cases:
        with pytest.raises(TRPError, match=f"^{re.escape(message)}"):
            TrainConfig(**bad)


def test_lr_schedules() -> None:
    """Cosine decays from lr to ~0 over the run; step multiplies by 0.1 at each listed epoch."""
    c = TrainConfig(epochs=4, lr=0.2)
    assert lr_at(c, 0, 0, 10) == pytest.approx(0.2)
    assert lr_at(c, 2, 0, 10) == pytest.approx(0.1)
    assert lr_at(c, 3, 9, 10) < 0.01
    s = TrainConfig(epochs=164, lr=0.1, schedule="step", lr_steps=(81, 122))
    assert [round(lr_at(s, e, 0, 1), 6) for e in (80, 81, 121, 122)] == [0.1, 0.01, 0.01, 0.001]


def test_digits_run_writes_its_folder(tmp_path: Path) -> None:
    """A run folder holds config.json, metrics.csv (one row per epoch) and a loadable checkpoint."""
    run = tmp_path / "run"
    summary = train(TrainConfig(dataset="digits", epochs=2, method="trp", period=5), run, **QUIET)
    assert summary["epochs_done"] == 2 and not summary["stopped"]
    rows = _metrics(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert float(rows[-1]["test_acc"]) == pytest.approx(summary["test_acc"])
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["config"]["method"] == "trp" and cfg["global_batch"] == 128
    model = trp.load(run)
    assert model(torch.zeros(1, 1, 8, 8)).shape == (1, 10)


@pytest.mark.slow
def test_resume_after_interruption_matches_uninterrupted(tmp_path: Path) -> None:
    """Stopping after epoch 1 and resuming ends with exactly the metrics of a run never stopped."""
    config = TrainConfig(dataset="digits", epochs=3, method="trp", period=4, energy=0.8, batch_size=64)
    train(config, tmp_path / "whole", **QUIET)
    part = train(config, tmp_path / "part", stop_after_epoch=1, **QUIET)
    assert part["stopped"] and part["epochs_done"] == 1
    train(config, tmp_path / "part", resume=True, **QUIET)
    keys = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "mean_rank")
    whole = [{k: r[k] for k in keys} for r in _metrics(tmp_path / "whole")]
    resumed = [{k: r[k] for k in keys} for r in _metrics(tmp_path / "part")]
    assert resumed == whole


@pytest.mark.slow
def test_trp_run_ranks_fall_and_compression_is_lossless_on_digits(tmp_path: Path) -> None:
    """TRP lowers the ranks during training, and value:0.05 decomposition keeps the accuracy exactly."""
    run = tmp_path / "trp"
    train(TrainConfig(dataset="digits", epochs=4, method="trp", period=4, energy=0.8, lr=0.05), run, **QUIET)
    rows = _metrics(run)
    assert float(rows[-1]["mean_rank"]) < float(rows[0]["mean_rank"])
    report = compress(run, tmp_path / "small", "value:0.05", latency_batch=8, check_latency=False, **{"log": lambda s: None})
    assert report["macs_after"] < report["macs_before"]
    assert abs(report["acc_after"] - report["acc_before"]) <= 0.5
    assert (tmp_path / "small" / "plan.json").is_file()
    keys = {"acc_before", "acc_after", "macs_before", "macs_after", "flops_speedup", "params_before", "params_after",
            "latency_ms_before", "latency_ms_after"}
    assert keys <= set(json.loads((tmp_path / "small" / "report.json").read_text()))


@pytest.mark.slow
@needs_cifar
def test_cifar_mini_trp_then_compress_value_threshold(tmp_path: Path) -> None:
    """A short TRP run on real CIFAR-10 images decomposes with value:0.05 within 0.5 pt, with fewer MACs."""
    run, out = tmp_path / "run", tmp_path / "small"
    code = main(["train", "--dataset", "cifar10", "--data-dir", str(CIFAR_MINI), "--method", "trp", "--epochs", "1",
                 "--batch-size", "256", "--period", "4", "--lr", "0.05", "--out", str(run), "--no-progress"])
    assert code == 0
    code = main(["compress", str(run), "--rank", "value:0.05", "--latency-batch", "8", "--no-latency-check", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert abs(report["acc_after"] - report["acc_before"]) <= 0.5
    assert report["macs_after"] < report["macs_before"] == 40_551_040
    assert main(["eval", str(out), "--json"]) == 0


def test_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Success exits 0; bad input exits 2 with one 'trp: error:' line and no traceback."""
    run = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--method", "baseline", "--out", str(run), "--no-progress"]) == 0
    assert main(["eval", str(run)]) == 0
    capsys.readouterr()
    for argv in (["train", "--energy", "1.5", "--out", str(tmp_path / "x")],
                 ["train", "--epochs", "1", "--out", str(run)],  # already holds a run
                 ["eval", str(tmp_path / "missing")],
                 ["compress", str(run), "--rank", "bogus:1", "--out", str(tmp_path / "c")],
                 ["train", "--nuclear", "nan", "--out", str(tmp_path / "y")],
                 ["train", "--speedup", "500", "--epochs", "1", "--out", str(tmp_path / "z")],  # out of reach
                 ["frobnicate"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("trp: error:") and err.count("\n") == 1 and "Traceback" not in err, err


def test_config_file_with_flag_override(tmp_path: Path) -> None:
    """--config reads a JSON recipe and flags override its values."""
    cfg = tmp_path / "recipe.json"
    cfg.write_text(json.dumps({"model": "resnet20", "dataset": "digits", "method": "nuclear", "epochs": 5, "lr": 0.05}))
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--epochs", "1", "--out", str(run), "--no-progress"]) == 0
    saved = json.loads((run / "config.json").read_text())["config"]
    assert saved["epochs"] == 1 and saved["method"] == "nuclear" and saved["lr"] == 0.05
    run2 = tmp_path / "run2"  # the TRP budget flags reach the config
    assert main(["train", "--config", str(cfg), "--method", "trp", "--epochs", "1", "--speedup", "1.5", "--freeze", "0.5",
                 "--out", str(run2), "--no-progress"]) == 0
    saved = json.loads((run2 / "config.json").read_text())["config"]
    assert saved["speedup"] == 1.5 and saved["freeze"] == 0.5


def test_paper_recipes_parse() -> None:
    """The committed recipes are valid configs: the paper's schedule, and the fine-tuning recipe of issue #16."""
    from trp.train import load_config_file

    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.glob("*.json"))
    assert files
    for f in files:
        c = TrainConfig.from_dict(load_config_file(f))
        if f.name.endswith("_finetune.json"):  # from trained weights: a few epochs, for >= 3x fewer MACs
            assert c.epochs <= 10 and c.speedup >= 3.0 and c.val_split > 0 and c.init is None
            continue
        assert c.epochs == 164 and c.lr_steps == (81, 122) and c.weight_decay == 1e-4


def test_report_writes_plots(tmp_path: Path) -> None:
    """trp report prints a per-layer table and writes the spectra and rank-history PNGs."""
    run = tmp_path / "run"
    train(TrainConfig(dataset="digits", epochs=1, method="trp", period=3), run, **QUIET)
    assert main(["report", str(run)]) == 0
    assert (run / "report" / "spectra.png").stat().st_size > 1000
    assert (run / "report" / "ranks.png").stat().st_size > 1000


def test_recalibrate_bn_matches_batch_statistics() -> None:
    """BN running statistics after recalibration are the average of the batches' own statistics."""
    from trp.data import load
    from trp.models import create
    from trp.loop import recalibrate_bn

    torch.manual_seed(0)
    model, data = create("resnet20", in_channels=1), load("digits")
    model.bn1.running_mean.fill_(5.0)  # stale statistics, as after a projection
    used = recalibrate_bn(model, data, 128, epoch=3, seed=0, max_batches=2)
    assert used == 2
    batches = [x for x, _ in data.train_batches(128, 1_000_000 + 3, 0)][:2]
    with torch.no_grad():
        means = torch.stack([model.conv1(x).mean(dim=(0, 2, 3)) for x in batches])
    assert torch.allclose(model.bn1.running_mean, means.mean(0), atol=1e-5)
    assert model.bn1.momentum == 0.1  # restored


def test_trp_final_state_is_low_rank_and_consistent(tmp_path: Path) -> None:
    """A TRP run ends on a projection with fresh BN statistics: its saved accuracy is what eval measures."""
    run = tmp_path / "run"
    summary = train(TrainConfig(dataset="digits", epochs=2, method="trp", period=5, energy=0.8), run, **QUIET)
    from trp.data import load
    from trp.loop import evaluate

    model = trp.load(run)
    acc, _ = evaluate(model, load("digits"))
    assert acc == pytest.approx(summary["test_acc"], abs=1e-3)  # metrics.csv rounds to 4 decimals
    w = model.layer3[2].conv2.weight.detach()
    rank = int(torch.linalg.matrix_rank(w.reshape(w.shape[0], -1).double(), rtol=1e-5))
    assert rank < w.shape[0]


@pytest.mark.slow
def test_speedup_target_with_freeze_trains_to_the_budget_and_resumes(tmp_path: Path) -> None:
    """--speedup S ranks give S x fewer MACs on decomposition; a run resumed past --freeze matches one never stopped."""
    config = TrainConfig(dataset="digits", epochs=3, method="trp", period=4, speedup=2.0, energy_ramp=1.0, freeze=1.5,
                         lr=0.05, batch_size=64)
    train(config, tmp_path / "whole", **QUIET)
    rows = _metrics(tmp_path / "whole")
    ranks = [float(r["mean_rank"]) for r in rows]
    assert ranks[0] >= ranks[1] == ranks[2]  # ramped over epoch 1, fixed from epoch 1.5 on
    train(config, tmp_path / "part", stop_after_epoch=2, **QUIET)
    train(config, tmp_path / "part", resume=True, **QUIET)
    keys = ("train_loss", "test_acc", "mean_rank")
    assert [{k: r[k] for k in keys} for r in _metrics(tmp_path / "part")] == [{k: r[k] for k in keys} for r in rows]
    report = compress(tmp_path / "whole", tmp_path / "small", "value:1e-4", latency_batch=8, check_latency=False,
                      log=lambda s: None)
    assert abs(report["flops_speedup"] / 2.0 - 1) < 0.03  # digits' 8x8 images count the same MACs per rank
    assert report["acc_after"] == pytest.approx(report["acc_before"], abs=0.2)


@pytest.mark.slow
def test_epoch_time_excludes_the_one_off_final_projection(tmp_path: Path) -> None:
    """Per-epoch time counts the steps only: TRP's final projection and BN recalibration are timed apart."""
    train(TrainConfig(dataset="digits", epochs=2, method="trp", period=4, energy=0.8), tmp_path / "trp", **QUIET)
    train(TrainConfig(dataset="digits", epochs=2, method="baseline"), tmp_path / "base", **QUIET)
    trp_rows, base_rows = _metrics(tmp_path / "trp"), _metrics(tmp_path / "base")
    finish = [float(r["finish_time_s"]) for r in trp_rows]
    assert finish[-1] > 0 and finish[-1] > 20 * finish[0]  # recalibration is a pass over the data; epoch 1 has none
    assert all(float(r["finish_time_s"]) < finish[-1] for r in base_rows)  # the baseline has no end-of-training work


def test_methods_registry_is_the_one_list() -> None:
    """trp.methods.METHODS names every method once: the config accepts exactly those, the CLI lists them."""
    from trp import methods
    from trp.cli import build_parser
    from trp.train import METHODS

    assert METHODS == tuple(methods.METHODS) == ("baseline", "trp", "nuclear", "svd")
    for name in METHODS:
        extra = {"nuclear": 1e-3} if name == "nuclear" else {}
        assert TrainConfig(method=name, **extra).method == name
        assert methods.get(name).name == name
    with pytest.raises(TRPError, match="unknown method 'prune'; choose one of: baseline, trp, nuclear, svd"):
        TrainConfig(method="prune")
    train_help = build_parser()._subparsers._group_actions[0].choices["train"].format_help()  # noqa: SLF001
    assert "baseline, trp, nuclear, svd" in " ".join(train_help.split())
    with pytest.raises(TRPError, match="method svd does not train in scheme 'decouple'; choose one of: channel, spatial"):
        TrainConfig(method="svd", scheme="decouple")


def test_trp_method_hooks_come_off_with_detach() -> None:
    """The TRP method works through optimizer hooks: steps count while attached, not after detach()."""
    from trp import methods
    from trp.data import load
    from trp.loop import make_optimizer
    from trp.models import create

    config = TrainConfig(dataset="digits", period=2, energy=0.8)
    model = create("resnet20", in_channels=1)
    method = methods.get("trp")(config)
    method.prepare(model, load("digits"), 12)
    opt = make_optimizer(model, 0.05, 0.9, 1e-4)
    method.attach(opt)
    model(torch.randn(4, 1, 8, 8)).sum().backward()
    opt.step()
    opt.step()
    assert method.reg.steps == 2 and method.reg.history[-1][0] == 2  # the second step projected
    method.detach()
    opt.step()
    assert method.reg.steps == 2
    tensors, meta = method.state_dict()
    assert int(tensors["trp.steps"]) == 2 and meta["rank_history"][-1][0] == 2


def test_svd_training_run_loads_and_compresses(tmp_path: Path) -> None:
    """An SVD-training run records its parametrization in the spec; it loads, and compresses by its own factors."""
    run = tmp_path / "svd"
    summary = train(TrainConfig(dataset="digits", epochs=1, method="svd", scheme="spatial", sparsity="l1:1e-4"), run,
                    **QUIET)
    meta = trp.checkpoint.read_safetensors(run / "checkpoint.safetensors")[1]
    assert meta["model"]["transforms"] == [{"kind": "svd-parametrize", "scheme": "spatial"}]
    assert float(_metrics(run)[0]["mean_rank"]) > 0
    from trp.data import load
    from trp.loop import evaluate

    assert evaluate(trp.load(run), load("digits"))[0] == pytest.approx(summary["test_acc"], abs=1e-3)
    report = compress(run, tmp_path / "small", "fixed:4", latency_batch=8, check_latency=False, log=lambda s: None)
    assert report["scheme"] == "spatial" and report["layers_decomposed"] > 0 and report["flops_speedup"] > 1
    small = trp.load(tmp_path / "small")
    assert evaluate(small, load("digits"))[0] == pytest.approx(report["acc_after"], abs=1e-3)
    assert trp.profile(small, (1, 8, 8)).macs == report["macs_after"]


def test_finetune_runs_the_training_loop_on_its_cosine(monkeypatch: pytest.MonkeyPatch) -> None:
    """compress's fine-tuning is the training Loop with the one cosine schedule: lr from peak towards 0."""
    import trp.compress
    from trp.data import load
    from trp.loop import cosine_lr
    from trp.models import create

    seen: list[tuple[float, int, int]] = []

    def recording(lr: float, done: int, total: int) -> float:
        seen.append((lr, done, total))
        return cosine_lr(lr, done, total)

    monkeypatch.setattr(trp.compress, "cosine_lr", recording)
    trp.compress.finetune(create("resnet20", in_channels=1), load("digits"), 2, 0.02, 256, 0, log=lambda s: None)
    steps = [done for _, done, _ in seen]
    assert {lr for lr, _, _ in seen} == {0.02} and {t for _, _, t in seen} == {12}  # 2 epochs of 6 batches
    assert sorted(set(steps)) == list(range(12))


@pytest.mark.slow
def test_demo_end_to_end(tmp_path: Path) -> None:
    """trp demo trains baseline and TRP, compresses both at equal MACs and writes the comparison."""
    from trp.demo import run_demo

    rows = run_demo(tmp_path / "demo", epochs=2, overwrite=True, log=lambda s: None)
    assert [r["method"] for r in rows] == ["baseline", "post-hoc SVD", "TRP"]
    assert rows[1]["macs_speedup"] == pytest.approx(rows[2]["macs_speedup"], rel=0.05)  # compared at equal MACs
    assert json.loads((tmp_path / "demo" / "comparison.json").read_text()) == rows
    assert (tmp_path / "demo" / "comparison.md").read_text().startswith("| method |")
    assert not (tmp_path / "demo" / ".trp.lock").exists()
