"""``trp export``: a trained or compressed model as ONNX or TorchScript, checked against PyTorch.

The decomposed layers are stock ``nn.Conv2d`` / ``nn.Linear``, so both exporters see ordinary ops;
SVD-trained layers (``torch.nn.utils.parametrize``) are exported as the dense weight they compute.
The exported model is serialized in memory, then written atomically (a full disk is a one-line
error, never a half-written file or an aborted interpreter), loaded back from the file and run on a
random batch; its outputs must match PyTorch's (ONNX through onnxruntime where it is installed),
otherwise the export is an error. An existing ``out`` is replaced only with ``overwrite=True``,
and never when it is one of the export's inputs (the model file, or any file of its folder or of
the run it was compressed from) or any trp model or checkpoint file (recognized by its header, so
also from another working directory or under another name). ``out`` may not take the name of a
file trp keeps in run and model folders (``model.safetensors``, ``config.json``, ...): an ONNX file
there would hide the run's own. Whether ``out`` can be written is checked before the model is read.
"""

from __future__ import annotations

import io
import json
import math
import os
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from trp.checkpoint import find_file, is_trp_file
from trp.errors import TRPError, first_line
from trp.io import atomic_write_bytes
from trp.runs import RUN_FILES, check_writable
from trp.saving import load_model
from trp.validate import boolean, choice, number, whole

__all__ = ["export", "FORMATS", "MAX_BATCH", "MAX_EXAMPLE"]

FORMATS = ("onnx", "torchscript")
MAX_BATCH = 4096  # the example batch only fixes a size: ONNX gets a dynamic batch dimension anyway
MAX_EXAMPLE = 2**28  # values in the example batch (1 GiB of float32)


def export(model_path: str | Path, fmt: str, out: str | Path, batch_size: int = 1, atol: float = 1e-4,
           overwrite: bool = False, trust: bool = False) -> str:
    """Export and verify; returns a one-line summary.

    Args:
        model_path: A model or run folder (or its safetensors file).
        fmt: ``onnx`` or ``torchscript``.
        out: The file to write (atomically).
        batch_size: Batch size of the example input (ONNX gets a dynamic batch dimension).
        atol: Largest allowed difference from PyTorch, relative to the output's scale.
        overwrite: Replace an existing ``out`` (never one of the export's inputs).
        trust: Accept a model file without trp's checksum.

    Example:
        >>> import tempfile
        >>> from trp.models import create
        >>> from trp.structure import ModelSpec
        >>> from trp.saving import save_model
        >>> d = tempfile.mkdtemp()
        >>> save_model(d + "/model.safetensors", create("resnet20"), ModelSpec("resnet20", 10, 3, [3, 32, 32]))
        >>> export(d, "torchscript", d + "/m.pt").startswith("wrote")
        True
    """
    fmt = choice(fmt, "export format", FORMATS)
    batch_size = whole(batch_size, "batch-size", low=1, high=MAX_BATCH)
    atol = number(atol, "atol", low=0)
    overwrite, trust = boolean(overwrite, "overwrite"), boolean(trust, "trust")
    out = Path(out)
    source = find_file(model_path)
    _check_out(out, [source, *_inputs(source, {})], overwrite)  # before the model is even read: nothing to undo
    # TorchScript's deprecation notices and the exporters' internal warnings are not the user's concern.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        model, spec, meta = load_model(source, trust=trust)
        _check_out(out, [source, *_inputs(source, meta)], overwrite)
        numel = batch_size * math.prod(spec.input_shape)
        if numel > MAX_EXAMPLE:
            raise TRPError(f"batch-size {batch_size} with input {spec.input_shape} needs {numel:,} values; "
                           f"use a smaller --batch-size (at most {MAX_EXAMPLE:,} values)")
        model = _plain(model).eval()
        x = torch.randn(batch_size, *spec.input_shape, generator=torch.Generator().manual_seed(0))
        expected = model(x)
        if fmt == "torchscript":
            got, checked = _torchscript(model, x, out), "TorchScript"
        else:
            got, checked = _onnx(model, x, out)
            if got is None:
                return f"wrote {out} (onnxruntime not installed: outputs not checked)"
    scale = max(1.0, float(expected.abs().max()))
    err = float((got - expected).abs().max()) / scale
    if not err <= atol:  # also catches NaN
        raise TRPError(f"the exported model differs from PyTorch by {err:.2e} (relative); {out} is not trustworthy")
    return f"wrote {out}: {checked} matches PyTorch (max relative difference {err:.1e}){_runtime_note(source, checked)}"


def _inputs(source: Path, meta: dict) -> list[Path]:
    """Files the export reads or that belong to its inputs: the model's folder and its source run's."""
    folders = [source.parent]
    origin = meta.get("source")
    if isinstance(origin, str) and origin:
        run = Path(origin)
        folders.append(run if run.is_dir() else run.parent)
    files: list[Path] = []
    for folder in folders:
        try:
            files += [p for p in folder.iterdir() if p.is_file()]
        except OSError:  # a source run that moved or is unreadable holds nothing we could overwrite
            continue
    return files


def _check_out(out: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse, before any work, an ``out`` that is a folder, an input, a trp file, or exists (unless overwrite)."""
    if out.is_dir():
        raise TRPError(f"--out {out} is a folder; give the file to write")
    if out.exists():
        for p in inputs:
            try:
                same = os.path.samefile(out, p)
            except OSError:
                continue
            if same:
                raise TRPError(f"refusing to write over {p}: it belongs to the exported model's folder or to the run "
                               "it came from; choose another --out")
        if is_trp_file(out):  # e.g. a run's checkpoint named from another working directory
            raise TRPError(f"refusing to write over {out}: it is a trp model or checkpoint file; choose another --out")
    if out.name in RUN_FILES:
        raise TRPError(f"refusing to write {out}: {out.name} is the name of a file trp keeps in run and model folders; "
                       "give the exported model another name (e.g. model.onnx)")
    check_writable(out.parent, out)
    if out.exists() and not overwrite:
        raise TRPError(f"{out} exists; choose another --out or pass --overwrite")


def _plain(model: nn.Module) -> nn.Module:
    """The model with every parametrization (SVD training) baked into a plain weight.

    Parametrized modules are not scriptable; the weight they compute is what inference needs.
    """
    for module in model.modules():
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return model


def _torchscript(model: nn.Module, x: torch.Tensor, out: Path) -> torch.Tensor:
    try:
        scripted = torch.jit.script(model)
    except Exception as err:  # TorchScript's compiler raises many types; one line for the user
        raise TRPError(f"TorchScript cannot compile this model: {first_line(err)}") from None
    # In memory first: torch.jit.save writing a file on a full disk terminates the interpreter.
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    atomic_write_bytes(out, buf.getvalue())
    return torch.jit.load(str(out))(x)


def _onnx(model: nn.Module, x: torch.Tensor, out: Path) -> tuple[torch.Tensor | None, str]:
    try:
        import onnx  # noqa: F401 - optional dependency: only this format needs it
    except ImportError:
        raise TRPError("ONNX export needs the onnx package: pip install onnx onnxscript") from None
    buf = io.BytesIO()
    try:
        torch.onnx.export(model, (x,), buf, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    except Exception as err:  # the exporter raises many types; one line for the user
        raise TRPError(f"ONNX export failed: {first_line(err)}") from None
    atomic_write_bytes(out, buf.getvalue())
    try:
        import onnxruntime as ort
    except ImportError:
        return None, ""
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"input": x.numpy()})[0]), "onnxruntime"


def _runtime_note(source: Path, checked: str) -> str:
    """Where a compressed model's latency figures were measured, from its report.json (if any):
    the runtime of ``latency_ms_*`` and each batch's best runtime, with the thread count."""
    try:
        report = json.loads((source.parent / "report.json").read_text())
    except (OSError, ValueError):
        return ""
    if not isinstance(report, dict):
        return ""
    device, threads = report.get("latency_device"), report.get("latency_threads")
    runtime = report.get("latency_runtime")
    fmt = report.get("memory_format_after")
    where = runtime if isinstance(runtime, str) else f"PyTorch on {device}" if isinstance(device, str) else None
    if where is None:
        return ""
    where += f" ({fmt})" if isinstance(fmt, str) else ""
    bests = sorted((int(k[len("best_runtime_b"):]), v) for k, v in report.items()
                   if k.startswith("best_runtime_b") and k[len("best_runtime_b"):].isdigit() and isinstance(v, str))
    if bests:
        where += "; its fastest runtime " + ", ".join(
            f"at batch {b}: {name} ({report.get(f'best_speedup_b{b}')}x the dense model in its own fastest)"
            for b, name in bests)
    if isinstance(threads, int):
        where += f"; {threads} thread(s)"
    return f"; report.json's latency was measured in {where}, not in {checked}"
