"""Under CI=true, a real-data test that skips because ../shared is missing fails (see conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
SHARED = TESTS.parents[1] / "shared"


def test_ci_turns_missing_shared_data_skips_into_failures(tmp_path: Path) -> None:
    """Under CI=true, skips naming the shared data folder fail (an error when a skipif mark skips at
    setup; either way the run exits non-zero); other skips stay skips."""
    (tmp_path / "test_inner.py").write_text(
        "import pytest\n"
        "def test_real_data():\n"
        f"    pytest.skip('needs ../shared: {SHARED}/data/nothing-here not found')\n"
        f"@pytest.mark.skipif(True, reason='data not found at {SHARED}/data/x')\n"
        "def test_real_data_marked():\n"
        "    pass\n"
        "def test_unrelated_skip():\n"
        "    pytest.skip('no GPU')\n"
    )
    env = {**os.environ, "CI": "true"}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider", "test_inner.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith("1 failed, 1 skipped, 1 error"), done.stdout
    assert "FAILED test_inner.py::test_real_data - CI=true: a real-data test may not skip" in done.stdout
    assert "ERROR test_inner.py::test_real_data_marked - CI=true: a real-data test may not skip" in done.stdout
