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
from trp import structure
from trp import saving
from trp.cli import main
from trp.errors import TRPError
from trp.export import export
from trp.models import create
from trp.svd_training import svd_parametrize_
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
    with pytest.MonkeyPatch.context() as mp:  # eager only: torch.compile would take ~20 s per model and batch
        mp.setenv("TRP_RUNTIMES", "eager")
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


# ------------------------------------------------------------------------------------ nothing overwritten


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_export_refuses_existing_out_unless_overwrite(compressed: Path, tmp_path: Path, one_line_error) -> None:
    """#15 item 1: an existing --out is kept unless the caller asks to overwrite it."""
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    line = one_line_error(["export", compressed, "--format", "torchscript", "--out", out])
    assert "exists" in line and "--overwrite" in line
    with pytest.raises(TRPError, match="exists; choose another --out or pass --overwrite"):
        export(compressed, "onnx", out)
    assert out.read_text() == "mine"
    assert export(compressed, "torchscript", out, overwrite=True).startswith(f"wrote {out}")
    assert torch.jit.load(str(out)) is not None


def test_export_never_writes_over_its_inputs(compressed: Path, tmp_path: Path, one_line_error) -> None:
    """#15 item 1: the model being exported, its folder's files and the source run's checkpoint are
    refused as --out even with --overwrite (by path, through a symlink or a hard link)."""
    run = compressed.parent / "run"
    before = {d: _snapshot(d) for d in (compressed, run)}
    link = tmp_path / "link.onnx"
    link.symlink_to(compressed / ckpt.MODEL_FILE)
    hard = tmp_path / "hard.onnx"
    os.link(run / ckpt.CHECKPOINT_FILE, hard)
    targets = [compressed / ckpt.MODEL_FILE, run / ckpt.CHECKPOINT_FILE, compressed / "report.json",
               compressed / "plan.json", link, hard]
    for out in targets:
        for fmt in ("onnx", "torchscript"):
            with pytest.raises(TRPError, match="refusing to write over"):
                export(compressed, fmt, out, overwrite=True)
    # Exporting a file (not the folder) protects the same inputs.
    with pytest.raises(TRPError, match="refusing to write over"):
        export(compressed / ckpt.MODEL_FILE, "onnx", compressed / ckpt.MODEL_FILE, overwrite=True)
    assert "refusing to write over" in one_line_error(["export", compressed, "--format", "onnx", "--out",
                                                      run / ckpt.CHECKPOINT_FILE, "--overwrite"])
    assert {d: _snapshot(d) for d in (compressed, run)} == before
    trp.load(compressed)
    trp.load(run)
    assert one_line_error(["export", compressed, "--format", "onnx", "--out", compressed]).endswith("is a folder; give the file to write")


def test_export_never_writes_over_a_trp_file_from_any_directory(compressed: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch, one_line_error) -> None:
    """A model compressed from a relative run path, exported from another working directory: the run's
    checkpoint (and a renamed copy of it) is still refused with --overwrite, by its header."""
    work = tmp_path / "work"
    shutil.copytree(compressed.parent / "run", work / "run")
    monkeypatch.chdir(work)
    assert main(["compress", "run", "--rank", "energy:0.9", "--latency-batch", "8", "--no-latency-check", "--out", "c"]) == 0
    monkeypatch.chdir(tmp_path)
    checkpoint = work / "run" / ckpt.CHECKPOINT_FILE
    backup = tmp_path / "backup.bin"
    shutil.copy(checkpoint, backup)
    before = checkpoint.read_bytes()
    for out in (checkpoint, backup):
        line = one_line_error(["export", work / "c", "--format", "onnx", "--out", out, "--overwrite"])
        assert "refusing to write over" in line and "trp model or checkpoint file" in line, line
    assert checkpoint.read_bytes() == before == backup.read_bytes()
    trp.load(work / "run")


def test_export_refuses_the_names_of_trp_files(compressed: Path, tmp_path: Path) -> None:
    """An ONNX file called model.safetensors in a run folder would hide the run's own files: refused by name."""
    run = tmp_path / "run"
    shutil.copytree(compressed.parent / "run", run)
    for name in (ckpt.MODEL_FILE, "config.json", "plan.json", "report.json", "metrics.csv"):
        with pytest.raises(TRPError, match=f"{name} is the name of a file trp keeps in run and model folders"):
            export(compressed, "onnx", run / name if name == ckpt.MODEL_FILE else tmp_path / name, overwrite=True)
    assert not (run / ckpt.MODEL_FILE).exists()
    assert trp.load(run) is not None  # still the run's checkpoint


def test_export_checks_out_before_reading_the_model(compressed: Path, tmp_path: Path, one_line_error,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """--out inside a file, or in a folder that cannot be written, is one line naming --out, before any load."""
    import trp.export

    def no_load(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("read the model before checking --out")

    monkeypatch.setattr(trp.export, "load_model", no_load)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    line = one_line_error(["export", compressed, "--format", "onnx", "--out", blocker / "m.onnx"])
    assert line == f"trp: error: cannot write {blocker / 'm.onnx'}: {blocker} is a file, not a folder"
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as root no folder is unwritable
    line = one_line_error(["export", compressed, "--format", "onnx", "--out", tmp_path / "m.onnx"])
    assert line.startswith(f"trp: error: cannot write {tmp_path / 'm.onnx'}: {tmp_path} is not writable"), line


# ------------------------------------------------------------------------------------ full disk, bad numbers

_FULL_DISK = """
import resource, signal, sys
from trp.cli import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, like a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
sys.exit(main(["export", sys.argv[1], "--format", sys.argv[2], "--out", sys.argv[3]]))
"""


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_on_full_disk_is_one_line(compressed: Path, tmp_path: Path, fmt: str) -> None:
    """#15 item 5: TorchScript's own file writer aborted Python (exit 134) on a full disk; now one line, no file."""
    out = tmp_path / "out" / "m.bin"
    out.parent.mkdir()
    proc = subprocess.run([sys.executable, "-c", _FULL_DISK, str(compressed), fmt, str(out)], capture_output=True,
                          text=True, env=ENV, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr  # a TRPError naming the file, as every other refusal
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("trp: error: cannot write") and "m.bin" in lines[0], proc.stderr
    assert list(out.parent.iterdir()) == []  # neither the file nor a temporary


def test_export_batch_size_is_checked(compressed: Path, tmp_path: Path, one_line_error) -> None:
    """#15 item 7: --batch-size 1e12 used to reach torch.randn; now a one-line error, exit 2."""
    out = tmp_path / "m.onnx"
    assert "batch-size must be <= 4096" in one_line_error(["export", compressed, "--format", "onnx",
                                                           "--batch-size", "1e12", "--out", out])
    for bad, message in [(10**12, "batch-size must be <= 4096"), (2.5, "whole number"), (True, "whole number"),
                         ("8", None)]:
        if message is None:
            assert export(compressed, "onnx", out, batch_size=bad, overwrite=True).startswith("wrote")
            continue
        with pytest.raises(TRPError, match=message):
            export(compressed, "onnx", out, batch_size=bad, overwrite=True)
    with pytest.raises(TRPError, match="unknown export format 'tflite'"):
        export(compressed, "tflite", out)


# ------------------------------------------------------------------------------------ SVD-trained models


@pytest.fixture(scope="module")
def svd_model(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Path:
    """A model file of an SVD-parametrized network (the structure an SVD-training run saves)."""
    folder = tmp_path_factory.mktemp("svd") / "run"
    torch.manual_seed(0)
    model = svd_parametrize_(create("resnet20", num_classes=10, in_channels=1), "channel")
    spec = structure.ModelSpec("resnet20", 10, 1, [1, 8, 8], dataset="digits").then(
        {"kind": "svd-parametrize", "scheme": "channel"})
    saving.save_model(folder / ckpt.MODEL_FILE, model, spec)
    return folder


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_svd_trained_model(svd_model: Path, tmp_path: Path, fmt: str, capsys: pytest.CaptureFixture) -> None:
    """#15 item 7: TorchScript export of an SVD-trained run was a traceback (parametrized modules do not script)."""
    out = tmp_path / f"m.{fmt}"
    assert main(["export", str(svd_model), "--format", fmt, "--out", str(out)]) == 0
    assert "matches PyTorch" in capsys.readouterr().out
    x = _inputs(4)
    with torch.no_grad():
        expected = trp.load(svd_model)(x)
        if fmt == "torchscript":
            got = torch.jit.load(str(out))(x)
        else:
            ort = pytest.importorskip("onnxruntime")
            got = torch.from_numpy(ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
                                   .run(None, {"input": x.numpy()})[0])
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
    assert any(p.__class__.__name__ == "ParametrizationList" for p in trp.load(svd_model).modules())  # source untouched


def test_export_names_the_runtime_of_the_latency_figures(compressed: Path, tmp_path: Path) -> None:
    """The summary says where report.json's latency was measured (runtime, format, best runtime per batch, threads),
    not to be read as the export's."""
    summary = export(compressed, "onnx", tmp_path / "m.onnx")
    r = json.loads((compressed / "report.json").read_text())
    assert summary.endswith(
        f"report.json's latency was measured in PyTorch eager, the faster memory format ({r['memory_format_after']}); "
        f"its fastest runtime at batch 1: eager ({r['best_speedup_b1']}x the dense model in its own fastest), "
        f"at batch 8: eager ({r['best_speedup_b8']}x the dense model in its own fastest); "
        f"{r['threads']} thread(s), not in onnxruntime")


def test_export_of_an_older_report_names_its_device(compressed: Path, tmp_path: Path) -> None:
    """A report.json from before the runtimes were measured still says where its latency came from."""
    old = tmp_path / "old"
    old.mkdir()
    for name in ("model.safetensors", "plan.json"):
        (old / name).write_bytes((compressed / name).read_bytes())
    (old / "report.json").write_text(json.dumps({"latency_device": "cpu"}))
    summary = export(old, "torchscript", tmp_path / "m.pt")
    assert summary.endswith("report.json's latency was measured in PyTorch on cpu, not in TorchScript")
