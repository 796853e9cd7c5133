"""Faults and bad input: one-line errors, kill/Ctrl-C recovery, full disks, failing SVDs.

Every bad input must end as exactly one stderr line ``trp: error: …``, a non-zero exit and no
traceback; SIGKILL and Ctrl-C must lose at most the running epoch, and a resumed run must end with
the same metrics as an uninterrupted one.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import trp
from trp import checkpoint as ckpt
from trp import io as trp_io
from trp.cli import main
from trp.errors import TRPError
from trp.hook import TRP
from trp.saving import load_model
from trp.models import create
from trp.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")

# One intra-op thread in every child: faster on a shared 2-core machine, and the killed, resumed and
# reference runs must use the same thread count to be bitwise comparable.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
FAST = ["--dataset", "digits", "--batch-size", "128", "--no-progress"]



def _check_subprocess_error(proc: subprocess.CompletedProcess | subprocess.Popen, err: str, out: str = "") -> str:
    assert proc.returncode == 2, err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("trp: error:"), err
    assert "Traceback" not in out + err
    return lines[0]


def _write_cifar(folder: Path, n: int = 24) -> Path:
    """A tiny CIFAR-10 folder in the official format (protocol-2 pickles of dicts)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in ("data_batch_1", "test_batch"):
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": [int(v) for v in rng.integers(0, 10, n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return folder


def _rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("epoch_time_s", "finish_time_s")} for r in rows]  # timings vary


def _ckpt_epoch(run: Path) -> int:
    return int(ckpt.read_safetensors(run / ckpt.CHECKPOINT_FILE)[1]["epoch"])


def _rewrite_checkpoint(src: Path, dst: Path, edit) -> Path:  # noqa: ANN001
    """Copy a run folder, letting ``edit(tensors, meta)`` change its checkpoint (re-written validly)."""
    shutil.copytree(src, dst)
    tensors, meta = ckpt.read_safetensors(dst / ckpt.CHECKPOINT_FILE)
    edit(tensors, meta)
    ckpt.write_safetensors(dst / ckpt.CHECKPOINT_FILE, tensors, meta)
    return dst


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # noqa: ANN204
        return (os.mkdir, (self.marker,))


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Path:
    """One epoch of TRP on digits (batch 128): a valid training checkpoint to damage."""
    run = tmp_path_factory.mktemp("robust") / "run"
    train(TrainConfig(dataset="digits", epochs=1, batch_size=128), run, progress=False, log=lambda s: None)
    return run


# ------------------------------------------------------------------------------------------ bad flags

BAD_FLAGS = [
    (["--energy", "0"], "energy must be > 0, got 0"),
    (["--energy", "1.5"], "energy must be <= 1, got 1.5"),
    (["--energy", "nan"], "--energy: must be finite, got 'nan'"),
    (["--energy", "inf"], "--energy: must be finite, got 'inf'"),
    (["--period", "0"], "period must be >= 1, got 0"),
    (["--period", "2.5"], "--period: must be a whole number, got '2.5'"),
    (["--nuclear", "-1"], "nuclear must be >= 0, got -1"),
    (["--epochs", "0"], "epochs must be >= 1, got 0"),
    (["--lr", "nan"], "--lr: must be finite, got 'nan'"),
    (["--lr", "0"], "lr must be > 0"),
    (["--batch-size", "inf"], "--batch-size: must be finite, got 'inf'"),
    (["--batch-size", "0"], "batch-size must be >= 1"),
    (["--model", "bogus"], "unknown model 'bogus'"),
    (["--scheme", "bogus"], "unknown scheme 'bogus'"),
    (["--dataset", "bogus"], "unknown dataset 'bogus'"),
    (["--method", "bogus"], "unknown method 'bogus'"),
    (["--device", "bogus"], "unknown device 'bogus'"),
    (["--lr-steps", "x"], "lr-steps must be a number, got 'x'"),
    (["--bogus-flag", "1"], "unrecognized arguments: --bogus-flag"),
]


@pytest.mark.parametrize("flags,message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_train_flag(tmp_path: Path, one_line_error, flags: list[str], message: str) -> None:
    """Every invalid train flag is one line naming the flag and value, and nothing is written."""
    line = one_line_error(["train", *FAST, *flags, "--out", tmp_path / "run"])
    assert message in line
    assert not (tmp_path / "run").exists()


NUMERIC_FLAGS = [
    ("train", flag) for flag in ("--energy", "--energy-ramp", "--period", "--nuclear", "--orth", "--epochs", "--lr",
                                 "--momentum", "--weight-decay", "--batch-size", "--seed")
] + [("compress", "--finetune"), ("compress", "--finetune-lr"), ("compress", "--latency-batch"),
     ("export", "--batch-size"), ("demo", "--epochs")]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("command,flag", NUMERIC_FLAGS)
def test_non_finite_numeric_flag(tmp_path: Path, one_line_error, command: str, flag: str, value: str) -> None:
    """NaN or ±infinity in any numeric flag of any command is refused before anything runs."""
    argv = {"train": ["train", "--out", tmp_path / "o"], "compress": ["compress", tmp_path, "--out", tmp_path / "o"],
            "export": ["export", tmp_path, "--format", "onnx", "--out", tmp_path / "o"],
            "demo": ["demo", "--out", tmp_path / "o"]}[command]
    line = one_line_error([*argv, f"{flag}={value}"])
    assert flag in line and value in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("rank,message", [("energy:nan", "energy must be finite"), ("energy:0", "energy must be > 0"),
                                          ("energy:1.5", "energy must be <= 1"), ("speedup:inf", "must be finite"),
                                          ("bogus:1", "rank must look like NAME:NUMBER")])
def test_bad_compress_rank(tmp_path: Path, one_line_error, rank: str, message: str) -> None:
    """A bad --rank criterion (non-finite, out of range, unknown method) is a one-line error."""
    assert message in one_line_error(["compress", tmp_path, "--rank", rank, "--out", tmp_path / "o"])


@pytest.mark.parametrize("flags,message", [(["--finetune", "-1"], "finetune must be >= 0"),
                                           (["--latency-batch", "0"], "latency-batch must be >= 1"),
                                           (["--scheme", "bogus"], "unknown scheme 'bogus'")])
def test_bad_compress_flag(digits_run: Path, tmp_path: Path, one_line_error, flags: list[str],
                           message: str) -> None:
    """Out-of-range compress flags are refused up front, before the model is loaded or measured."""
    assert message in one_line_error(["compress", digits_run, *flags, "--out", tmp_path / "o"])
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("doc,message", [('{"energy": NaN}', "energy must be finite"),
                                         ('{"lr": Infinity}', "lr must be finite"),
                                         ('{"epochs": 0}', "epochs must be >= 1"),
                                         ('{"model": "bogus"}', "unknown model 'bogus'"),
                                         ('{"energy": ', "cannot read config file")])
def test_bad_config_file(tmp_path: Path, one_line_error, doc: str, message: str) -> None:
    """A JSON recipe gets the same checks as flags (Python's JSON reader accepts NaN and Infinity)."""
    cfg = tmp_path / "cfg.json"
    cfg.write_text(doc)
    assert message in one_line_error(["train", "--config", cfg, "--out", tmp_path / "o"])


# ------------------------------------------------------------------------------------------- bad data


def test_missing_data_folder(tmp_path: Path, one_line_error) -> None:
    """A data folder that does not exist is named, and the run folder is not created."""
    line = one_line_error(["train", "--dataset", "cifar10", "--data-dir", tmp_path / "nonexistent",
                                    "--out", tmp_path / "run"])
    assert "nonexistent does not exist" in line
    assert not (tmp_path / "run").exists()


def test_empty_data_folder(tmp_path: Path, one_line_error) -> None:
    """An empty data folder says which files were expected where."""
    (tmp_path / "data").mkdir()
    line = one_line_error(["train", "--dataset", "cifar10", "--data-dir", tmp_path / "data", "--out", tmp_path / "run"])
    assert "no CIFAR-10 batch files" in line and "data_batch_1" in line


@pytest.mark.parametrize("content,message", [(b"hello, not a pickle", "not a Python pickle"),
                                             (pickle.dumps([1, 2, 3], protocol=2), "holds a list, not a dict"),
                                             (pickle.dumps({"x": 1}, protocol=2), "missing key")])
def test_wrong_format_data_files(tmp_path: Path, one_line_error, content: bytes, message: str) -> None:
    """Files named like CIFAR batches but holding something else are refused, naming the file."""
    data = _write_cifar(tmp_path / "data")
    (data / "data_batch_1").write_bytes(content)
    line = one_line_error(["train", "--dataset", "cifar10", "--data-dir", data, "--out", tmp_path / "run"])
    assert message in line and "data_batch_1" in line


def test_truncated_batch_file(tmp_path: Path, one_line_error) -> None:
    """A CIFAR test_batch cut in half is reported as truncated, naming the file."""
    data = _write_cifar(tmp_path / "data")
    raw = (data / "test_batch").read_bytes()
    (data / "test_batch").write_bytes(raw[: len(raw) // 2])
    line = one_line_error(["train", "--dataset", "cifar10", "--data-dir", data, "--out", tmp_path / "run"])
    assert "truncated" in line and "test_batch" in line


def test_malicious_batch_file_is_not_run(tmp_path: Path, one_line_error) -> None:
    """A planted pickle in the data folder is refused by the restricted unpickler; its code never runs."""
    data = _write_cifar(tmp_path / "data")
    marker = tmp_path / "pwned"
    (data / "data_batch_1").write_bytes(pickle.dumps({"data": _Evil(marker), "labels": []}, protocol=2))
    line = one_line_error(["train", "--dataset", "cifar10", "--data-dir", data, "--out", tmp_path / "run"])
    assert "refuses to unpickle" in line
    assert not marker.exists()


# ------------------------------------------------------------------------------------- bad checkpoints


def _relabel(arch_only: bool):  # noqa: ANN202
    def edit(tensors: dict, meta: dict) -> None:
        meta["model"]["arch"] = "resnet32"
        if not arch_only:
            meta["config"]["model"] = "resnet32"
    return edit


def test_checkpoint_of_another_architecture(digits_run: Path, tmp_path: Path, one_line_error) -> None:
    """resnet20 weights labelled resnet32 are refused by eval, compress, export and resume, naming a mismatch."""
    run = _rewrite_checkpoint(digits_run, tmp_path / "run", _relabel(arch_only=False))
    for argv in (["eval", run], ["compress", run, "--out", tmp_path / "c"],
                 ["export", run, "--format", "torchscript", "--out", tmp_path / "m.pt"],
                 ["train", "--resume", run, "--no-progress"]):
        assert "does not fit this architecture" in one_line_error(argv)
    assert not (tmp_path / "c").exists() and not (tmp_path / "m.pt").exists()
    with pytest.raises(TRPError, match="does not fit this architecture"):
        trp.load(run)
    other = _rewrite_checkpoint(digits_run, tmp_path / "other", _relabel(arch_only=True))
    assert "another architecture" in one_line_error(["train", "--resume", other, "--no-progress"])


@pytest.mark.parametrize("damage", ["truncated", "corrupted"])
def test_damaged_training_checkpoint(digits_run: Path, tmp_path: Path, one_line_error, damage: str) -> None:
    """A truncated checkpoint, or one with flipped bytes in the middle, is refused by resume and eval."""
    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    f = run / ckpt.CHECKPOINT_FILE
    data = bytearray(f.read_bytes())
    if damage == "truncated":
        data = data[: len(data) * 2 // 3]
    else:
        mid = len(data) // 2
        data[mid : mid + 8] = bytes(b ^ 0xA5 for b in data[mid : mid + 8])
    f.write_bytes(bytes(data))
    for argv in (["train", "--resume", run, "--no-progress"], ["eval", run]):
        assert "damaged" in one_line_error(argv)


def test_non_finite_weights_in_checkpoint(digits_run: Path, tmp_path: Path, one_line_error) -> None:
    """A checkpoint with a NaN or inf weight is refused by eval and by resume, naming the tensor."""

    def poison(tensors: dict, meta: dict) -> None:
        tensors["model.layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
        tensors["model.fc.bias"][0] = float("inf")

    run = _rewrite_checkpoint(digits_run, tmp_path / "run", poison)
    for argv in (["eval", run], ["train", "--resume", run, "--no-progress"]):
        assert "non-finite" in one_line_error(argv)
    assert _ckpt_epoch(run) == 1  # refused, not trained on


def test_resume_without_checkpoint(tmp_path: Path, one_line_error) -> None:
    """--resume on a folder with no checkpoint (or no folder) says so."""
    assert "holds no checkpoint.safetensors" in one_line_error(["train", "--resume", tmp_path, "--no-progress"])


# --------------------------------------------------------------------------------------- input shapes


@pytest.mark.parametrize("shape", [(3, 0, 0), (1, 32, 32), (3, -1, 8)])
def test_input_size_the_model_cannot_take(shape: tuple[int, ...]) -> None:
    """profile, plan and latency_ms on an impossible input shape raise TRPError naming the shape."""
    # vgg16 takes inputs as small as 1x1 (ceil-mode pools, global pooling): empty or wrong-channel inputs it cannot.
    model = create("vgg16")
    for call in (lambda: trp.profile(model, shape), lambda: trp.plan(model, rank=trp.energy(0.9), input_shape=shape),
                 lambda: trp.latency_ms(model, shape, 2, min_run_time=0.01)):
        with pytest.raises(TRPError, match=re.escape("(" + ", ".join(map(str, shape)) + ")")):
            call()


def test_eval_on_data_of_another_shape(digits_run: Path, tmp_path: Path, one_line_error) -> None:
    """Evaluating an 8x8 grey digits model on 32x32 colour CIFAR data is refused with both shapes named."""
    data = _write_cifar(tmp_path / "data")
    line = one_line_error(["eval", digits_run, "--dataset", "cifar10", "--data-dir", data])
    assert "[3, 32, 32]" in line and "[1, 8, 8]" in line


# --------------------------------------------------------------------------------------- output folder


def test_output_folder_holding_another_run(digits_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture, one_line_error) -> None:
    """train/compress refuse a folder holding a different run, point to --resume for the same one; --overwrite works."""
    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    before = (run / ckpt.CHECKPOINT_FILE).read_bytes()
    same = ["train", "--dataset", "digits", "--epochs", "1", "--batch-size", "128", "--no-progress", "--out", run]
    assert f"--resume {run}" in one_line_error(same)
    other = ["train", "--dataset", "digits", "--method", "baseline", "--epochs", "1", "--batch-size", "256",
             "--no-progress", "--out", run]
    assert "already holds a different run" in one_line_error(other)
    assert "not empty" in one_line_error(["compress", run, "--out", run])
    assert (run / ckpt.CHECKPOINT_FILE).read_bytes() == before  # refused means untouched
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    assert "other files" in one_line_error([*other[:-1], notes])

    assert main([str(a) for a in [*other, "--overwrite"]]) == 0
    capsys.readouterr()
    assert json.loads((run / "config.json").read_text())["config"]["method"] == "baseline"
    assert ckpt.read_safetensors(run / ckpt.CHECKPOINT_FILE)[1]["config"]["method"] == "baseline"
    assert len(_rows(run)) == 1


def test_overwrite_stopped_before_first_epoch_leaves_no_old_checkpoint(digits_run: Path, tmp_path: Path,
                                                                       one_line_error) -> None:
    """After --overwrite, a new run stopped before its first epoch must not resume into the old run's checkpoint."""
    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    config = TrainConfig(dataset="digits", method="baseline", epochs=1, batch_size=256)
    summary = train(config, run, overwrite=True, progress=False, log=lambda s: None, stop_after_epoch=0)
    assert summary["stopped"] and summary["epochs_done"] == 0
    assert not (run / ckpt.CHECKPOINT_FILE).exists() and not (run / "metrics.csv").exists()
    assert "holds no checkpoint" in one_line_error(["train", "--resume", run, "--no-progress"])


# ------------------------------------------------------------------------------------------- full disk


def test_no_space_left_while_checkpointing(tmp_path: Path, one_line_error,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC while writing epoch 2's checkpoint: one-line error; epoch 1's checkpoint intact, loadable, resumable."""
    real = trp_io.atomic_write
    writes = {"n": 0}

    def disk_fills(path, write):  # noqa: ANN001, ANN202
        if Path(path).name != ckpt.CHECKPOINT_FILE:
            return real(path, write)
        writes["n"] += 1
        if writes["n"] < 2:
            return real(path, write)

        def partial(tmp: str) -> None:
            write(tmp)
            with open(tmp, "r+b") as f:  # half the bytes reached the disk, then it was full
                f.truncate(os.path.getsize(tmp) // 2)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        return real(path, partial)

    monkeypatch.setattr(trp_io, "atomic_write", disk_fills)
    run = tmp_path / "run"
    argv = ["train", "--dataset", "digits", "--method", "baseline", "--epochs", "2", "--batch-size", "256",
            "--no-progress", "--out", run]
    line = one_line_error(argv)
    assert "No space left on device" in line and ckpt.CHECKPOINT_FILE in line
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.safetensors", "config.json", "metrics.csv"]
    model, spec, meta = load_model(run / ckpt.CHECKPOINT_FILE)
    assert meta["epoch"] == 1 and len(_rows(run)) == 1
    monkeypatch.undo()  # space freed: the run continues from epoch 1
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert _ckpt_epoch(run) == 2 and len(_rows(run)) == 2


# ------------------------------------------------------------------------------------------------ SVD


def test_trp_nan_weight_names_layer() -> None:
    """A NaN weight makes TRP raise a TRPError naming the layer, at construction and at a later projection."""
    torch.manual_seed(0)
    model = create("resnet20", in_channels=1)
    with torch.no_grad():
        model.layer2[1].conv2.weight[3, 0, 1, 1] = float("nan")
    with pytest.raises(TRPError, match="layer2.1.conv2"):
        TRP(model, period=1)
    with torch.no_grad():
        model.layer2[1].conv2.weight.nan_to_num_(0.0)
    reg = TRP(model, period=1)
    with torch.no_grad():
        model.layer3[0].conv1.weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(TRPError, match="layer3.0.conv1"):
        reg.step()


def test_trp_svd_float64_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """When the float32 SVD fails to converge, TRP falls back to float64: same, non-zero sub-gradients and projection."""
    torch.manual_seed(0)
    model = create("resnet20", in_channels=1)
    ref = TRP(model, energy=0.9, period=1)
    expected = {layer.name: layer.subgradient.clone() for layer in ref.layers}

    real = torch.linalg.svd
    dtypes: list[torch.dtype] = []

    def flaky(a: torch.Tensor, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        dtypes.append(a.dtype)
        if a.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge (simulated)")
        return real(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", flaky)
    reg = TRP(model, energy=0.9, period=1)
    assert torch.float64 in dtypes
    for layer in reg.layers:
        assert layer.subgradient.dtype == torch.float32
        assert layer.subgradient.abs().sum() > 0
        # U_k V_kᵀ of a matrix with distinct singular values is unique, so it matches the float32 one.
        assert torch.allclose(layer.subgradient, expected[layer.name], atol=1e-4)
    before = model.layer1[0].conv1.weight.detach().clone()
    reg.step()  # the projection also goes through the fallback
    after = model.layer1[0].conv1.weight.detach()
    assert torch.isfinite(after).all() and not torch.equal(before, after)
    assert ref.ranks() == reg.ranks()


def test_svd_failure_is_one_line_cli_error(tmp_path: Path, one_line_error,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """If every SVD attempt fails, trp train stops with one line naming the layer, not a zero sub-gradient."""

    def never(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge (simulated)")

    monkeypatch.setattr(torch.linalg, "svd", never)
    line = one_line_error(["train", *FAST, "--epochs", "1", "--out", tmp_path / "run"])
    assert "SVD of layer 'layer1.0.conv1' failed to converge" in line


# ------------------------------------------------------------------------------------------ processes


@pytest.mark.slow
def test_representative_errors_in_real_processes(digits_run: Path, tmp_path: Path) -> None:
    """`python -m trp` itself prints one line and exits 2 for a bad flag, missing data and a planted pickle."""
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / ckpt.CHECKPOINT_FILE).write_bytes(pickle.dumps(_Evil(marker)))
    commands = {
        "flag": ["train", "--energy", "1.5", "--out", str(tmp_path / "a")],
        "data": ["train", "--dataset", "cifar10", "--data-dir", str(tmp_path / "nonexistent"), "--out", str(tmp_path / "b")],
        "pickle": ["eval", str(evil)],
        "resume": ["train", "--resume", str(evil), "--no-progress"],
    }
    procs = {k: subprocess.Popen([sys.executable, "-m", "trp", *v], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env=ENV) for k, v in commands.items()}
    lines = {}
    for key, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        lines[key] = _check_subprocess_error(proc, err, out)
    assert "energy must be <= 1" in lines["flag"]
    assert "does not exist" in lines["data"]
    assert "not a trp checkpoint" in lines["pickle"] and "not a trp checkpoint" in lines["resume"]
    assert not marker.exists()


def _wait_for_rows(run: Path, n: int, proc: subprocess.Popen, timeout: float = 240.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run / "metrics.csv").is_file():
            rows = _rows(run)
            if len(rows) >= n:
                return rows
        assert proc.poll() is None, f"training exited early with {proc.returncode}"
        time.sleep(0.02)
    raise AssertionError(f"no {n} epochs in {run} after {timeout} s")


KILL_RUN = ["--dataset", "digits", "--method", "trp", "--epochs", "4", "--batch-size", "32", "--period", "7",
            "--no-progress"]


def _start(run: Path, log: Path, *flags: str) -> subprocess.Popen:
    with open(log, "w") as f:  # a file, not a pipe: nothing can block on a full pipe
        return subprocess.Popen([sys.executable, "-m", "trp", "train", *flags, "--out", str(run)], stdout=f,
                                stderr=subprocess.STDOUT, env=ENV)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path: Path) -> None:
    """SIGKILL during epoch 3, then --resume: same per-epoch metrics as a run never interrupted."""
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    ref_proc = _start(reference, tmp_path / "reference.log", *KILL_RUN)  # runs alongside, on the other core
    proc = _start(killed, tmp_path / "killed.log", *KILL_RUN)
    try:
        rows = _wait_for_rows(killed, 2, proc)
        time.sleep(0.4 * float(rows[-1]["epoch_time_s"]))  # well inside epoch 3's training steps
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    epoch_at_kill = _ckpt_epoch(killed)
    assert epoch_at_kill in (2, 3), epoch_at_kill  # killed before the run could finish
    resumed = subprocess.run([sys.executable, "-m", "trp", "train", "--resume", str(killed), "--no-progress"],
                             capture_output=True, text=True, env=ENV, timeout=240)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming {killed} after epoch {epoch_at_kill}/4" in resumed.stdout
    assert "Traceback" not in resumed.stderr
    assert ref_proc.wait(timeout=240) == 0, (tmp_path / "reference.log").read_text()
    got, want = _comparable(_rows(killed)), _comparable(_rows(reference))
    assert [r["epoch"] for r in got] == ["1", "2", "3", "4"]
    assert got == want
    # Not only the metrics: the final weights are bitwise the same.
    a = ckpt.read_safetensors(killed / ckpt.CHECKPOINT_FILE)[0]
    b = ckpt.read_safetensors(reference / ckpt.CHECKPOINT_FILE)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_ctrl_c_saves_completed_epochs_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """SIGINT mid-epoch: exit 130, one stderr line, last completed epoch saved intact, and the run resumes."""
    run = tmp_path / "run"
    flags = ["--dataset", "digits", "--method", "trp", "--epochs", "2", "--batch-size", "32", "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "trp", "train", *flags, "--out", str(run)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        rows = _wait_for_rows(run, 1, proc)
        time.sleep(0.3 * float(rows[-1]["epoch_time_s"]))
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out + err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("trp: interrupted"), err
    assert f"--resume {run}" in lines[0] and "Traceback" not in out + err
    assert _ckpt_epoch(run) == 1 and len(_rows(run)) == 1
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    load_model(run / ckpt.CHECKPOINT_FILE)
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert "resuming" in capsys.readouterr().out
    assert _ckpt_epoch(run) == 2 and [r["epoch"] for r in _rows(run)] == ["1", "2"]


# ------------------------------------------------------------------- issue 15: nothing overwritten or mixed

BASE_RUN = ["--dataset", "digits", "--method", "baseline", "--epochs", "1", "--batch-size", "256", "--no-progress"]


def test_train_overwrite_leaves_exactly_the_new_run(digits_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """train --overwrite into a folder holding a compressed model: only the new run remains, and eval reports it."""
    folder = tmp_path / "c"
    assert main(["compress", str(digits_run), "--latency-batch", "8", "--no-latency-check", "--out", str(folder)]) == 0
    (folder / ".checkpoint.safetensors.abc12345.tmp").write_bytes(b"left by a SIGKILL")
    assert main(["train", *BASE_RUN, "--out", str(folder), "--overwrite"]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint.safetensors", "config.json", "metrics.csv"]
    assert main(["eval", str(folder), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["accuracy"] == pytest.approx(float(_rows(folder)[0]["test_acc"]), abs=1e-3)
    assert result["macs"] == trp.profile(create("resnet20", in_channels=1), (1, 8, 8)).macs  # the dense new run


def test_compress_overwrite_leaves_exactly_the_compressed_model(digits_run: Path, tmp_path: Path,
                                                                one_line_error) -> None:
    """compress --out OTHER_RUN --overwrite replaces that run entirely; --out the source run itself is refused."""
    other = tmp_path / "other"
    shutil.copytree(digits_run, other)
    assert main(["compress", str(digits_run), "--latency-batch", "8", "--no-latency-check", "--out", str(other),
                 "--overwrite"]) == 0
    assert sorted(p.name for p in other.iterdir()) == ["model.safetensors", "plan.json", "report.json"]
    assert "holds no checkpoint.safetensors" in one_line_error(["train", "--resume", other, "--no-progress"])
    source = tmp_path / "source"
    shutil.copytree(digits_run, source)
    before = sorted(p.name for p in source.iterdir())
    assert "is the folder of the run being compressed" in one_line_error(
        ["compress", source, "--out", source, "--overwrite", "--no-latency-check"])
    assert sorted(p.name for p in source.iterdir()) == before


def test_second_writer_is_refused_naming_the_holder(tmp_path: Path, one_line_error) -> None:
    """While one process holds a run folder, train, compress and resume on it stop with one line naming its pid."""
    from trp.runs import locked

    run = tmp_path / "run"
    with locked(run):
        for argv in (["train", *BASE_RUN, "--out", run, "--overwrite"], ["train", *BASE_RUN, "--out", run]):
            line = one_line_error(argv)
            assert f"in use by another trp process (pid {os.getpid()})" in line
        assert sorted(p.name for p in run.iterdir()) == [".trp.lock"]  # nothing was written
    assert not run.exists()  # the lock made the folder and took it away again
    assert main(["train", *BASE_RUN, "--out", str(run)]) == 0  # released: the folder is free


@pytest.mark.slow
def test_lock_between_processes_is_released_when_the_holder_dies(tmp_path: Path) -> None:
    """Two real processes on one --out: the second exits 2 naming the first's pid; after SIGKILL the folder is free."""
    run = tmp_path / "run"
    # Long enough to be alive whatever the machine's load: it is killed, never finishes.
    first = _start(run, tmp_path / "first.log", "--dataset", "digits", "--method", "trp", "--epochs", "1000",
                   "--batch-size", "16", "--no-progress")
    try:
        deadline = time.monotonic() + 120
        while not (run / "config.json").is_file():
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()
            time.sleep(0.02)
        second = subprocess.run([sys.executable, "-m", "trp", "train", *BASE_RUN, "--out", str(run), "--overwrite"],
                                capture_output=True, text=True, env=ENV, timeout=120)
        line = _check_subprocess_error(second, second.stderr, second.stdout)
        assert f"in use by another trp process (pid {first.pid})" in line
        assert json.loads((run / "config.json").read_text())["config"]["method"] == "trp"  # untouched
        first.send_signal(signal.SIGKILL)
        assert first.wait(timeout=60) == -signal.SIGKILL
    finally:
        if first.poll() is None:
            first.kill()
    again = subprocess.run([sys.executable, "-m", "trp", "train", *BASE_RUN, "--out", str(run), "--overwrite"],
                           capture_output=True, text=True, env=ENV, timeout=240)
    assert again.returncode == 0, again.stderr
    assert ckpt.read_safetensors(run / ckpt.CHECKPOINT_FILE)[1]["config"]["method"] == "baseline"


# ---------------------------------------------------------------------------- issue 15: --resume and flags


def test_resume_refuses_contradicting_flags_and_records_allowed_changes(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                        one_line_error) -> None:
    """--resume with --lr or --scheme that differ from the run is refused; --epochs trains on and is recorded."""
    run = tmp_path / "run"
    assert main(["train", *BASE_RUN, "--out", str(run)]) == 0
    saved = ckpt.read_safetensors(run / ckpt.CHECKPOINT_FILE)[1]
    for flags, words in ((["--lr", "7"], ("lr 7", "0.1")), (["--scheme", "spatial"], ("scheme 'spatial'", "'channel'")),
                         (["--epochs", "5", "--method", "trp"], ("method 'trp'", "'baseline'")),
                         (["--overwrite"], ("--overwrite",)), (["--out", tmp_path / "elsewhere"], ("--out",))):
        line = one_line_error(["train", "--resume", run, "--no-progress", *flags])
        assert all(w in line for w in words), line
    assert ckpt.read_safetensors(run / ckpt.CHECKPOINT_FILE)[1] == saved  # refused means untouched
    assert main(["train", "--resume", str(run), "--no-progress", "--lr", "0.1", "--epochs", "2"]) == 0  # lr agrees
    assert "resuming" in capsys.readouterr().out
    assert [r["epoch"] for r in _rows(run)] == ["1", "2"]
    change = [{"after_epoch": 1, "changed": {"epochs": [1, 2]}}]
    assert json.loads((run / "config.json").read_text())["changes"] == change
    meta = ckpt.read_safetensors(run / ckpt.CHECKPOINT_FILE)[1]
    assert meta["changes"] == change and meta["config"]["epochs"] == 2
    assert "it has done 2 epochs already" in one_line_error(["train", "--resume", run, "--epochs", "1", "--no-progress"])


def test_resume_names_every_contradicting_flag(digits_run: Path, one_line_error) -> None:
    """All the settings --resume refuses are named in its one line, not only the first."""
    line = one_line_error(["train", "--resume", digits_run, "--no-progress", "--lr", "7", "--scheme", "spatial",
                           "--momentum", "0.5", "--epochs", "5"])
    for words in ("scheme 'spatial' (the run was trained with 'channel')", "lr 7.0 (the run was trained with 0.1)",
                  "momentum 0.5 (the run was trained with 0.9)"):
        assert words in line, line
    assert "epochs 5" not in line  # a change --resume allows is not among the refused ones


def test_folder_in_use_is_said_before_judging_its_run(digits_run: Path, tmp_path: Path, one_line_error) -> None:
    """While another process writes a run still in its first epoch (config.json, no checkpoint yet),
    --resume, a new run and compress --out on it say "in use" naming the pid, not "nothing to resume",
    "a different run" or "not empty"."""
    from trp.runs import locked

    run = tmp_path / "run"
    config = TrainConfig(dataset="digits", method="baseline", epochs=1, batch_size=256)
    assert train(config, run, progress=False, log=lambda s: None, stop_after_epoch=0)["stopped"]
    with locked(run):
        for argv in (["train", "--resume", run, "--no-progress"], ["train", *BASE_RUN, "--lr", "0.5", "--out", run],
                     ["compress", digits_run, "--out", run], ["demo", "--epochs", "1", "--out", run]):
            line = one_line_error(argv)
            assert f"is in use by another trp process (pid {os.getpid()})" in line, line
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]


def test_interrupted_resume_advice_keeps_its_changes(digits_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A resume with --epochs stopped before an epoch completed: the advice repeats --epochs (the checkpoint does
    not hold the change yet) and quotes a path with a space; the advised command then trains the run on."""
    import shlex

    import trp.cli

    run = tmp_path / "my run"
    shutil.copytree(digits_run, run)
    real = trp.cli.train
    monkeypatch.setattr(trp.cli, "train", lambda *a, **k: real(*a, stop_after_epoch=1, **k))  # stop at once
    assert main(["train", "--resume", str(run), "--epochs", "2", "--no-progress"]) == 130
    err = capsys.readouterr().err.strip("\n").split("\n")
    assert len(err) == 1 and err[0].startswith("trp: interrupted;"), err
    advice = err[0].split("continue with: ")[1].rstrip(")")
    assert advice == f"trp train --resume {shlex.quote(str(run))} --epochs 2"
    assert _ckpt_epoch(run) == 1
    monkeypatch.setattr(trp.cli, "train", real)
    assert main([*shlex.split(advice)[1:], "--no-progress"]) == 0
    assert _ckpt_epoch(run) == 2


def test_stop_before_the_first_epoch_prints_no_summary(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing completed, nothing summarized (no "test acc nan%"): only the one line of advice, which works."""
    import shlex

    import trp.cli

    run = tmp_path / "new run"
    real = trp.cli.train
    monkeypatch.setattr(trp.cli, "train", lambda *a, **k: real(*a, stop_after_epoch=0, **k))
    assert main(["train", *BASE_RUN, "--out", str(run)]) == 130
    out, err = capsys.readouterr()
    assert "done:" not in out and "nan" not in out + err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and "start it again with: " in lines[0], err
    advice = lines[0].split("start it again with: ")[1].rstrip(")")
    monkeypatch.setattr(trp.cli, "train", real)
    assert main([*shlex.split(advice)[1:], "--no-progress"]) == 0
    assert _ckpt_epoch(run) == 1


# ------------------------------------------------------------------ issue 15: bad numbers and config types

HUGE = [(["--seed", "1e30"], "--seed: is too large: '1e30'"), (["--seed", "5e9"], "seed must be <= 4294967295"), (["--energy-ramp", "1e308"], "energy-ramp must be <="),
        (["--freeze", "1e308"], "freeze must be <="), (["--seed", "-1"], "seed must be >= 0")]


@pytest.mark.parametrize("flags,message", HUGE, ids=[" ".join(f) for f, _ in HUGE])
def test_huge_numbers_are_one_line(tmp_path: Path, one_line_error, flags: list[str], message: str) -> None:
    """Numbers no run can use (seeds past 2**32, ramps and freezes of 1e308 epochs) are refused before training."""
    assert message in one_line_error(["train", *FAST, "--epochs", "1", *flags, "--out", tmp_path / "run"])
    assert not (tmp_path / "run").exists()


BAD_TYPES = [('{"epochs": 1e400}', "epochs must be a whole number, got inf"),
             ('{"period": 1e400}', "period must be a whole number, got inf"),
             ('{"lr_steps": 5}', "lr-steps must be a list of whole numbers, got 5"),
             ('{"data_dir": 5}', "data-dir must be a string, got 5"),
             ('{"amp": "no"}', "amp must be true or false, got 'no'"),
             ('{"epochs": true}', "epochs must be a whole number, got True"),
             ('{"deterministic": "maybe"}', "deterministic must be true or false, got 'maybe'"),
             ('{"method": ["trp"]}', "unknown method ['trp']"),
             ('{"lr": "0.1"}', "lr must be a number, got '0.1'"),
             ('{"epochs": "3"}', "epochs must be a whole number, got '3'"),
             ('{"speedup": "2"}', "speedup must be a number, got '2'"),
             ('{"lr_steps": ["5"]}', "lr-steps must be a list of whole numbers, got ['5']")]


@pytest.mark.parametrize("doc,message", BAD_TYPES, ids=[d for d, _ in BAD_TYPES])
def test_config_file_types(tmp_path: Path, one_line_error, doc: str, message: str) -> None:
    """A recipe's booleans must be booleans, its numbers numbers, its paths strings: one line, exit 2, no run."""
    cfg = tmp_path / "cfg.json"
    cfg.write_text(doc)
    assert message in one_line_error(["train", "--config", cfg, "--out", tmp_path / "run"])
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------- issue 15: advice after an interrupt


def test_run_stopped_in_its_first_epoch_starts_again(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                     one_line_error) -> None:
    """A run stopped before its first epoch ended: --resume says how to start again, and both that and the
    original command work (a stale temporary of the killed write does not block them)."""
    run = tmp_path / "run"
    argv = ["train", *BASE_RUN, "--out", str(run)]
    config = TrainConfig(dataset="digits", method="baseline", epochs=1, batch_size=256)
    assert train(config, run, progress=False, log=lambda s: None, stop_after_epoch=0)["stopped"]
    (run / ".checkpoint.safetensors.k2j_x9qa.tmp").write_bytes(b"\0" * 64)
    line = one_line_error(["train", "--resume", run, "--no-progress"])
    assert f"start it again with trp train --config {run / 'config.json'} --out {run}" in line
    assert main(argv) == 0  # the original command
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.safetensors", "config.json", "metrics.csv"]
    train(config, run, overwrite=True, progress=False, log=lambda s: None, stop_after_epoch=0)
    assert main(["train", "--config", str(run / "config.json"), "--out", str(run), "--no-progress"]) == 0  # the advice
    capsys.readouterr()
    assert _ckpt_epoch(run) == 1


@pytest.mark.slow
def test_ctrl_c_in_the_first_epoch_gives_advice_that_works(tmp_path: Path) -> None:
    """SIGINT during epoch 1: exit 130 and one line whose command then completes the run."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "trp", "train", *KILL_RUN, "--out", str(run)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        deadline = time.monotonic() + 120
        while not (run / "config.json").is_file():  # written once the run holds its folder, just before epoch 1
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out + err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("trp: interrupted; no epoch was completed"), err
    advice = lines[0].split("start it again with: ")[1].rstrip(")").split()
    assert advice[:2] == ["trp", "train"]
    again = subprocess.run([sys.executable, "-m", "trp", *advice[1:], "--no-progress"], capture_output=True, text=True,
                           env=ENV, timeout=240)
    assert again.returncode == 0, again.stderr
    assert _ckpt_epoch(run) == 4


def test_resume_removes_stale_temporaries(digits_run: Path, tmp_path: Path) -> None:
    """--resume sweeps the hidden temporaries a SIGKILL during a checkpoint write left; other files stay."""
    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    stale = run / ".checkpoint.safetensors.abcd1234.tmp"
    stale.write_bytes(b"\0" * 4096)
    (run / "notes.tmp").write_text("mine")
    assert main(["train", "--resume", str(run), "--epochs", "2", "--no-progress"]) == 0
    assert not stale.exists() and (run / "notes.tmp").read_text() == "mine"


# ------------------------------------------------------------------- issue 15: disk and permission messages


def test_output_inside_a_file_is_one_line_before_any_work(digits_run: Path, tmp_path: Path, one_line_error,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """--out under a file: train and compress say so in one line (exit 2) before loading data or evaluating."""
    import trp.compress

    blocker = tmp_path / "file"
    blocker.write_text("x")

    def no_work(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("evaluated before checking --out")

    monkeypatch.setattr(trp.compress, "evaluate", no_work)
    for argv in (["train", *BASE_RUN, "--out", blocker / "run"], ["compress", digits_run, "--out", blocker / "c"]):
        assert f"{blocker} is a file, not a folder" in one_line_error(argv)
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as root no folder is unwritable
    assert "is not writable (permission denied" in one_line_error(["compress", digits_run, "--out", tmp_path / "c"])


def test_os_errors_exit_2_naming_the_file(digits_run: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture) -> None:
    """An OSError from below trp's own checks (permission, disk) is a user error: exit 2, one line with the file."""
    import trp.cli

    def denied(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/data/cifar/test_batch")

    monkeypatch.setattr(trp.cli, "evaluate", denied)
    assert main(["eval", str(digits_run)]) == 2
    assert capsys.readouterr().err == f"trp: error: {os.strerror(errno.EACCES)}: /data/cifar/test_batch\n"


def test_far_out_values_warn_in_one_line(digits_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--momentum 5 and --rank value:1e9 run as asked, with one 'trp: warning:' line saying what happened."""
    code = main(["train", *BASE_RUN, "--momentum", "5", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip("\n").split("\n")
    assert err[0].startswith("trp: warning: momentum 5 is outside [0, 1)") and "SGD diverges" in err[0]
    assert code == 0 and len(err) == 1 or code == 2 and err[1].startswith("trp: error: training diverged")
    assert main(["compress", str(digits_run), "--rank", "value:1e9", "--latency-batch", "8", "--no-latency-check",
                 "--out", str(tmp_path / "c")]) == 0
    err = capsys.readouterr().err.strip("\n").split("\n")
    assert len(err) == 1 and err[0].startswith("trp: warning: --rank value:1e+09 cut every layer to rank 1"), err
    plan = json.loads((tmp_path / "c" / "plan.json").read_text())
    assert {lp["rank"] for lp in plan["layers"] if lp["scheme"]} == {1}  # it did what it said


def test_skip_bad_images_reaches_the_image_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--skip-bad-images is recorded in the run, passed to the image-folder loader, and used again by eval."""
    from PIL import Image

    data = tmp_path / "images"
    for split, n in (("train", 2), ("val", 1)):
        for label in ("a", "b"):
            (data / split / label).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (40, 40), (60 * i, 100, 200)).save(data / split / label / f"{i}.png")
    (data / "train" / "a" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    run = tmp_path / "run"
    argv = ["train", "--dataset", "imagenet", "--data-dir", str(data), "--method", "baseline", "--epochs", "1",
            "--batch-size", "4", "--no-progress", "--out", str(run)]
    assert main(argv) == 2
    assert "broken.jpg" in capsys.readouterr().err
    assert main([*argv, "--skip-bad-images"]) == 0
    assert "broken.jpg" in capsys.readouterr().err  # counted and named, not fatal
    assert json.loads((run / "config.json").read_text())["config"]["skip_bad_images"] is True
    assert main(["eval", str(run), "--skip-bad-images", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["test_images"] == 2


def test_compress_accepts_a_file_without_checksum_only_with_trust(digits_run: Path, tmp_path: Path,
                                                                    one_line_error) -> None:
    """The checksum error's advice (--trust) works for compress too; without it the file is refused."""
    import struct

    stripped = tmp_path / "stripped"
    stripped.mkdir()
    data = (digits_run / ckpt.CHECKPOINT_FILE).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    del header["__metadata__"][ckpt.CHECKSUM_KEY]
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    (stripped / ckpt.CHECKPOINT_FILE).write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    argv = ["compress", stripped, "--latency-batch", "8", "--no-latency-check", "--out", tmp_path / "c"]
    assert "has no trp checksum" in one_line_error(argv) and "--trust" in one_line_error(argv)
    assert not (tmp_path / "c").exists()
    assert main([str(a) for a in [*argv, "--trust"]]) == 0
    assert (tmp_path / "c" / ckpt.MODEL_FILE).is_file()


def test_export_refuses_an_existing_out_unless_overwrite(digits_run: Path, tmp_path: Path, one_line_error) -> None:
    """trp export --out an existing file is refused (the file untouched); --overwrite replaces it."""
    target = tmp_path / "m.pt"
    target.write_bytes(b"keep me")
    argv = ["export", digits_run, "--format", "torchscript", "--out", target]
    assert "m.pt" in one_line_error(argv)
    assert target.read_bytes() == b"keep me"
    assert main([str(a) for a in [*argv, "--overwrite"]]) == 0
    assert target.read_bytes() != b"keep me"
