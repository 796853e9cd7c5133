"""Shared fixtures for the trp test suite."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

# Real-data tests skip when the shared data folder next to the repository is missing; their skip
# reasons name a path below it. Under CI=true such a skip is a failure, so CI cannot pass without them.
SHARED = Path(__file__).resolve().parents[1].parent / "shared"

# Compression times the models in every runtime by default; torch.compile alone takes 20-30 s per model
# on the 2-core machine, and the suite compresses dozens. Tests that mean a runtime name it; subprocesses
# inherit these. The latency cache goes to a fresh folder, so no test reads timings another run left.
os.environ.setdefault("TRP_RUNTIMES", "eager,channels_last")
os.environ.setdefault("TRP_CACHE_DIR", tempfile.mkdtemp(prefix="trp-test-cache-"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):  # type: ignore[no-untyped-def]
    """Turn a skip for missing shared data into a failure when the environment says ``CI=true``."""
    outcome = yield
    report = outcome.get_result()
    if (
        report.skipped
        and not hasattr(report, "wasxfail")
        and os.environ.get("CI", "").lower() == "true"
        and str(SHARED) in str(report.longrepr)
    ):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"CI=true: a real-data test may not skip ({reason})"


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one intra-op thread, restoring the setting afterwards.

    With two OpenMP threads on a loaded 2-core machine, MKL's SVD of a 64×576 matrix can take a
    whole second of spin-waiting instead of ~2 ms; one thread keeps the suite fast and deterministic.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def one_line_error(capsys: pytest.CaptureFixture):
    """Run the CLI in-process; require exit != 0, exactly one stderr line 'trp: error: …', no traceback."""
    from trp.cli import main

    def run(argv: list) -> str:
        rc = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        assert rc != 0
        lines = err.strip("\n").split("\n")
        assert len(lines) == 1 and lines[0].startswith("trp: error:"), err
        assert "Traceback" not in out + err
        return lines[0]

    return run
