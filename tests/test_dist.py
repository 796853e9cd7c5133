"""Multi-process training with torchrun (gloo on CPU): identical replicas, exact totals, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
# Every test here starts torchrun with two processes: integration tests, kept out of the quick loop.
pytestmark = pytest.mark.slow
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _torchrun(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV)


def _why(r: subprocess.CompletedProcess) -> str:
    """The workers' own messages come first in torchrun's stderr, its summary last: show both."""
    err = r.stderr
    return err if len(err) <= 3000 else err[:1800] + "\n[…]\n" + err[-1200:]


def test_replicas_bitwise_identical_and_match_single_process(tmp_path: Path) -> None:
    """Two gloo ranks stay bitwise equal through TRP projections and match one process on the same global batch."""
    multi, single = tmp_path / "multi", tmp_path / "single"
    multi.mkdir(), single.mkdir()
    r = _torchrun(str(HERE / "ddp_worker.py"), str(multi))
    assert r.returncode == 0, _why(r)
    s = subprocess.run([sys.executable, str(HERE / "ddp_worker.py"), str(single), "--single"], capture_output=True,
                       text=True, timeout=120, env=ENV)
    assert s.returncode == 0, _why(s)
    digests = []
    for rank in (0, 1):
        with safe_open(str(multi / f"rank{rank}.safetensors"), "pt") as f:
            digests.append(f.metadata()["digest"])
    assert digests[0] == digests[1], "replicas differ"
    a, b = load_file(str(multi / "rank0.safetensors")), load_file(str(single / "rank0.safetensors"))
    # Tolerance: DDP averages two half-batch gradients where one process averages one full batch;
    # float32 summation order differs, nothing else. 1e-4 relative to the weight scale.
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-4 * max(1.0, float(b[k].abs().max()))), k


def test_torchrun_cli_run_writes_once_and_states_batches(tmp_path: Path) -> None:
    """`torchrun -m trp train` runs two ranks, only rank 0 writes, config.json states per-rank and global batch."""
    run = tmp_path / "run"
    r = _torchrun("-m", "trp", "train", "--dataset", "digits", "--method", "trp", "--epochs", "1", "--period", "4",
                  "--batch-size", "64", "--out", str(run), "--no-progress")
    assert r.returncode == 0, _why(r)
    assert "2 processes, replicas bitwise identical" in r.stdout
    assert r.stdout.count("done:") == 1  # rank 1 stays quiet
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["world_size"], cfg["per_rank_batch"], cfg["global_batch"]) == (2, 64, 128)
    rows = (run / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 2  # header + one epoch, written once
    # Evaluation sums correct answers over both ranks' halves of the test set: the saved model,
    # evaluated in one process, gives the same accuracy.
    from trp.cli import main

    acc = float(rows[1].split(",")[5])
    code = main(["eval", str(run), "--json"])
    assert code == 0
    single = pytest.approx(acc, abs=1e-3)
    out = subprocess.run([sys.executable, "-m", "trp", "eval", str(run), "--json"], capture_output=True, text=True, env=ENV)
    assert json.loads(out.stdout)["accuracy"] == single


def test_resume_under_torchrun(tmp_path: Path) -> None:
    """A torchrun run stopped by SIGTERM after an epoch resumes under torchrun and completes."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "trp",
           "train", "--dataset", "digits", "--method", "trp", "--epochs", "3", "--period", "5", "--batch-size", "8",
           "--out", str(run), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        metrics = run / "metrics.csv"
        if metrics.is_file() and len(metrics.read_text().strip().splitlines()) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    done = len((run / "metrics.csv").read_text().strip().splitlines()) - 1
    assert 1 <= done < 3
    r = _torchrun("-m", "trp", "train", "--resume", str(run), "--no-progress")
    assert r.returncode == 0, _why(r)
    assert f"resuming {run} after epoch {done}/3" in r.stdout
    assert len((run / "metrics.csv").read_text().strip().splitlines()) - 1 == 3
