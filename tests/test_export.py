"""A compressed model leaves trp intact: trp.load in a fresh process, ONNX and TorchScript exports."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import trp
from trp import checkpoint as ckpt
from trp.cli import main
from trp.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}



def _inputs(n: int = 5) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def compressed(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Path:
    """A one-epoch digits TRP run, compressed by the CLI (every planned layer kept decomposed)."""
    root = tmp_path_factory.mktemp("export")
    train(TrainConfig(dataset="digits", epochs=1, batch_size=128), root / "run", progress=False, log=lambda s: None)
    # --no-latency-check: on 8x8 inputs the timing check may keep every layer dense, and then the
    # plan (the part trp.load must rebuild) would be empty.
    rc = main(["compress", str(root / "run"), "--rank", "energy:0.9", "--latency-batch", "8", "--no-latency-check",
               "--out", str(root / "c"), "--json"])
    assert rc == 0
    assert json.loads((root / "c" / "report.json").read_text())["layers_decomposed"] > 0
    return root / "c"


def test_load_in_fresh_process_from_folder_alone(compressed: Path, tmp_path: Path) -> None:
    """trp.load rebuilds the decomposed model in a new interpreter from model.safetensors alone, same outputs."""
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(compressed / ckpt.MODEL_FILE, alone / ckpt.MODEL_FILE)
    with torch.no_grad():
        expected = trp.load(compressed)(_inputs())
    script = (
        "import sys, torch, trp\n"
        "from safetensors.torch import save_file\n"
        "m = trp.load(sys.argv[1])\n"
        "x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))\n"
        "with torch.no_grad():\n"
        "    save_file({'y': m(x)}, sys.argv[2])\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(alone), str(tmp_path / "y.safetensors")],
                          capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    from safetensors.torch import load_file

    got = load_file(str(tmp_path / "y.safetensors"))["y"]
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    decomposed = trp.load(compressed)
    assert sum(p.numel() for p in decomposed.parameters()) < sum(
        p.numel() for p in trp.load(compressed.parent / "run").parameters())


def test_export_onnx_matches_pytorch(compressed: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`trp export --format onnx` writes a file whose onnxruntime outputs match PyTorch's, at any batch size."""
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "m.onnx"
    assert main(["export", str(compressed), "--format", "onnx", "--out", str(out)]) == 0
    assert "onnxruntime matches PyTorch" in capsys.readouterr().out
    x = _inputs(7)  # exported at batch 1: the batch dimension must be dynamic
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    with torch.no_grad():
        expected = trp.load(compressed)(x)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_export_torchscript_matches_pytorch(compressed: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`trp export --format torchscript` writes a module that reproduces the PyTorch outputs."""
    out = tmp_path / "m.pt"
    assert main(["export", str(compressed), "--format", "torchscript", "--out", str(out)]) == 0
    assert "TorchScript matches PyTorch" in capsys.readouterr().out
    x = _inputs(3)
    with torch.no_grad():
        assert torch.allclose(torch.jit.load(str(out))(x), trp.load(compressed)(x), atol=1e-5, rtol=1e-5)


def test_export_bad_input(compressed: Path, tmp_path: Path, one_line_error) -> None:
    """Unknown format, bad batch size, damaged model, unwritable output: one-line errors, no file written."""
    out = tmp_path / "m.onnx"
    assert "invalid choice: 'bogus'" in one_line_error(["export", compressed, "--format", "bogus", "--out", out])
    assert "batch-size" in one_line_error(["export", compressed, "--format", "onnx", "--batch-size", "0",
                                                    "--out", out])
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    data = bytearray((compressed / ckpt.MODEL_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (damaged / ckpt.MODEL_FILE).write_bytes(bytes(data))
    for fmt in ("onnx", "torchscript"):
        assert "damaged" in one_line_error(["export", damaged, "--format", fmt, "--out", out])
    assert not out.exists()
    (tmp_path / "a_file").write_text("x")
    one_line_error(["export", compressed, "--format", "torchscript", "--out", tmp_path / "a_file" / "m.pt"])
