"""``trp export``: a trained or compressed model as ONNX or TorchScript, checked against PyTorch.

The decomposed layers are stock ``nn.Conv2d`` / ``nn.Linear``, so both exporters see ordinary ops.
After writing, the exported file is loaded back and run on a random batch; its outputs must match
PyTorch's (ONNX through onnxruntime where it is installed), otherwise the export is an error.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import torch

from trp import checkpoint as ckpt
from trp.errors import TRPError
from trp.io import atomic_write

__all__ = ["export"]


def export(model_path: str | Path, fmt: str, out: str | Path, batch_size: int = 1, atol: float = 1e-4) -> str:
    """Export and verify; returns a one-line summary.

    Args:
        model_path: A model or run folder (or its safetensors file).
        fmt: ``onnx`` or ``torchscript``.
        out: The file to write (atomically).
        batch_size: Batch size of the example input (ONNX gets a dynamic batch dimension).
        atol: Largest allowed difference from PyTorch, relative to the output's scale.

    Example:
        >>> import tempfile
        >>> from trp.models import create
        >>> d = tempfile.mkdtemp()
        >>> ckpt.save_model(d + "/model.safetensors", create("resnet20"), ckpt.ModelSpec("resnet20", 10, 3, [3, 32, 32]))
        >>> export(d, "torchscript", d + "/m.pt").startswith("wrote")
        True
    """
    # TorchScript's deprecation notices and the exporters' internal warnings are not the user's concern.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        return _export(model_path, fmt, out, batch_size, atol)


def _export(model_path: str | Path, fmt: str, out: str | Path, batch_size: int = 1, atol: float = 1e-4) -> str:
    if fmt not in ("onnx", "torchscript"):
        raise TRPError(f"unknown export format {fmt!r}; choose onnx or torchscript")
    if batch_size < 1:
        raise TRPError(f"batch-size must be >= 1, got {batch_size}")
    model, spec, _ = ckpt.load_model(model_path)
    model.eval()
    x = torch.randn(batch_size, *spec.input_shape, generator=torch.Generator().manual_seed(0))
    expected = model(x)  # the caller, export(), runs all of this under torch.no_grad
    out = Path(out)
    scale = max(1.0, float(expected.abs().max()))
    if fmt == "torchscript":
        scripted = torch.jit.script(model)

        def write(tmp: str) -> None:
            torch.jit.save(scripted, tmp)

        atomic_write(out, write)
        got = torch.jit.load(str(out))(x)
        checked = "TorchScript"
    else:
        try:
            import onnx  # noqa: F401
        except ImportError:
            raise TRPError("ONNX export needs the onnx package: pip install onnx onnxscript") from None

        def write(tmp: str) -> None:
            # The exporter picks the format from the name, so write beside the final file first.
            with tempfile.TemporaryDirectory(dir=out.parent) as d:
                path = os.path.join(d, "model.onnx")
                try:
                    torch.onnx.export(model, (x,), path, input_names=["input"], output_names=["logits"],
                                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
                except Exception as err:  # the exporter raises many types; one line for the user
                    raise TRPError(f"ONNX export failed: {str(err).splitlines()[0]}") from None
                os.replace(path, tmp)

        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, write)
        try:
            import onnxruntime as ort
        except ImportError:
            return f"wrote {out} (onnxruntime not installed: outputs not checked)"
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
        checked = "onnxruntime"
    err = float((got - expected).abs().max()) / scale
    if err > atol:
        raise TRPError(f"the exported model differs from PyTorch by {err:.2e} (relative); {out} is not trustworthy")
    return f"wrote {out}: {checked} matches PyTorch (max relative difference {err:.1e})"
