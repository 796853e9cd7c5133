"""Conversions: a model turned into a call in each runtime :mod:`trp.runtimes` measures.

Each converter takes ``(model, x, threads, timeout)`` — the eval-mode model (a copy the converter
may change), the input it will be run on, intra-op threads and the seconds a compilation may take —
and returns a call without arguments that runs the model on ``x``. The checks say why a runtime
cannot run on this machine. Nothing here times anything, so lower modules (the distillation
teacher, :mod:`trp.distill`) can convert a model without the timing layer.

Example:
    >>> from torch import nn
    >>> run = torchscript(nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval(), torch.ones(2, 4), 1, 1.0)
    >>> run().shape
    torch.Size([2, 4])
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import shutil
import signal
import threading
import time
import warnings
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from trp.errors import TRPError, first_line

__all__ = ["Run", "compile_check", "ort_check", "eager", "channels_last", "frozen_trace", "torchscript",
           "torch_compile", "onnx_bytes", "onnxruntime"]

#: A prepared model: calling it runs one forward pass on the converter's input.
Run = Callable[[], Any]


def compile_check() -> str | None:
    """Why ``torch.compile`` cannot run here (no TorchDynamo for this Python, no C++ compiler), or None.

    Example:
        >>> compile_check() is None or isinstance(compile_check(), str)
        True
    """
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    try:
        import torch._dynamo as dynamo
    except Exception as err:  # a broken install: say why rather than crash
        return f"TorchDynamo does not import: {first_line(err)}"
    if not dynamo.is_dynamo_supported():
        return "TorchDynamo does not support this Python"
    if not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        return "Inductor needs a C++ compiler (g++, c++ or clang++) on PATH"
    return None


def ort_check() -> str | None:
    """Why ONNX Runtime cannot run here (a package missing, no CPU provider), or None.

    Example:
        >>> ort_check() is None or "onnx" in ort_check()
        True
    """
    for package in ("onnx", "onnxruntime"):
        if importlib.util.find_spec(package) is None:
            return f"{package} is not installed (pip install onnx onnxruntime onnxscript)"
    import onnxruntime as ort

    if "CPUExecutionProvider" not in ort.get_available_providers():
        return "onnxruntime has no CPUExecutionProvider"
    return None


def eager(model: nn.Module, x: Tensor, threads: int, timeout: float) -> Run:
    """PyTorch eager mode as it is. Every converter takes (eval-mode model, input, threads, compile time
    limit) and returns a call that runs the model on that input.

    Example:
        >>> eager(nn.Linear(3, 2).eval(), torch.zeros(1, 3), 1, 1.0)().shape
        torch.Size([1, 2])
    """
    return lambda: model(x)


def channels_last(model: nn.Module, x: Tensor, threads: int, timeout: float) -> Run:
    """Eager mode with the model (in place) and a 4-D input in channels-last (NHWC) memory format.

    Example:
        >>> channels_last(nn.Conv2d(3, 4, 3).eval(), torch.zeros(1, 3, 8, 8), 1, 1.0)().shape
        torch.Size([1, 4, 6, 6])
    """
    if x.dim() != 4:
        raise TRPError(f"channels_last needs a 4-D (N, C, H, W) input, got {x.dim()}-D")
    model.to(memory_format=torch.channels_last)
    xc = x.contiguous(memory_format=torch.channels_last)
    return lambda: model(xc)


def frozen_trace(model: nn.Module, x: Tensor, optimize: bool = False) -> torch.jit.ScriptModule:
    """``torch.jit.trace`` on ``x``, then ``torch.jit.freeze`` (weights and attributes folded in as
    constants), then with ``optimize`` ``torch.jit.optimize_for_inference`` (conv + BatchNorm folding,
    oneDNN layouts on CPU). The model must be in eval mode; the caller checks the graph's output
    (tracing records one path through Python control flow).

    Example:
        >>> graph = frozen_trace(nn.Linear(3, 2).eval(), torch.zeros(1, 3))
        >>> graph(torch.ones(4, 3)).shape
        torch.Size([4, 2])
    """
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.compile; it still runs
        graph = torch.jit.freeze(torch.jit.trace(model, x, check_trace=False))
        return torch.jit.optimize_for_inference(graph) if optimize else graph


def torchscript(model: nn.Module, x: Tensor, threads: int, timeout: float) -> Run:
    """The model as a frozen TorchScript graph (:func:`frozen_trace`).

    Example:
        >>> torchscript(nn.Linear(3, 2).eval(), torch.zeros(1, 3), 1, 1.0)().shape
        torch.Size([1, 2])
    """
    frozen = frozen_trace(model, x)
    return lambda: frozen(x)


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Interrupt the block after ``seconds`` (SIGALRM; only in the main thread, else no limit here)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"did not compile within {seconds:g} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def torch_compile(model: nn.Module, x: Tensor, threads: int, timeout: float) -> Run:
    """``torch.compile`` (Inductor, static shapes), compiled by a first call that must end within
    ``timeout`` seconds; a failure or a timeout is a TRPError. Slow: no doctest.
    """
    import torch._dynamo as dynamo
    import torch._inductor.compile_fx  # noqa: F401  imported before the alarm: an interrupted import stays broken

    # Dynamo caches compiled code per forward() code object, shared by every instance of a class;
    # past its recompile limit it would silently run eager. A reset gives each measurement its own.
    dynamo.reset()
    compiled = torch.compile(model, dynamic=False)
    start = time.perf_counter()
    try:
        with _deadline(timeout), torch.inference_mode():
            compiled(x)  # the first call compiles
    except Exception as err:
        dynamo.reset()
        if time.perf_counter() - start >= timeout:
            raise TRPError(f"did not compile within {timeout:g} s") from None
        raise TRPError(f"torch.compile failed: {first_line(err)}") from None
    if time.perf_counter() - start > timeout:  # outside the main thread the alarm cannot interrupt
        dynamo.reset()
        raise TRPError(f"did not compile within {timeout:g} s")
    return lambda: compiled(x)


def onnx_bytes(model: nn.Module, x: Tensor) -> bytes:
    """The model as ONNX, exported in memory (fixed input shape): the dynamo exporter, else the legacy
    one; a TRPError names why each failed. Slow: no doctest."""
    errors = []
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice says nothing here
        try:
            return torch.onnx.export(model, (x,), dynamo=True, verbose=False).model_proto.SerializeToString()
        except Exception as err:  # onnxscript missing, an op torch.export cannot capture
            errors.append(f"dynamo exporter: {first_line(err)}")
        try:
            buf = io.BytesIO()
            torch.onnx.export(model, (x,), buf, dynamo=False)
            return buf.getvalue()
        except Exception as err:
            errors.append(f"legacy exporter: {first_line(err)}")
    raise TRPError("ONNX export failed (" + "; ".join(errors) + ")")


def onnxruntime(model: nn.Module, x: Tensor, threads: int, timeout: float) -> Run:
    """An ONNX Runtime ``InferenceSession`` on the CPU provider with ``threads`` intra-op threads, one
    inter-op thread and every graph optimization; the call returns the first output (numpy).
    Slow: no doctest.
    """
    import onnxruntime as ort

    data = onnx_bytes(model, x)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.detach().cpu().numpy()}
    return lambda: session.run(None, feed)[0]
