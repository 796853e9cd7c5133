"""`trp bench` and the runtime flags of `trp compress` from the command line."""

from __future__ import annotations

import json

import pytest

from trp.cli import main


def test_bench_times_a_model_source_and_prints_the_record(capsys, tmp_path, one_thread) -> None:
    """`trp bench resnet20 --json` times the named runtime at the named batch and writes the same record to --out."""
    out = tmp_path / "bench.json"
    rc = main(["bench", "resnet20", "--runtimes", "eager", "--batch-sizes", "2", "--min-run-time", "0.01",
               "--against", "resnet20", "--out", str(out), "--json"])
    record = json.loads(capsys.readouterr().out)
    assert rc == 0 and record["best_runtime_b2"] == "eager" and record["input_shape"] == [3, 32, 32]
    assert record["best_ms_b2"] > 0 and record["best_speedup_b2"] > 0 and record["threads"] == 1
    assert json.loads(out.read_text())["timings"]["ms"].keys() == {"eager"}


def test_bench_prints_a_summary_line_without_json(capsys, one_thread) -> None:
    """Without --json the table goes to stdout and the last line names the best runtime per batch."""
    assert main(["bench", "resnet20", "--runtimes", "eager,channels_last", "--batch-sizes", "1",
                 "--min-run-time", "0.01"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("batch 1: ") and "thread(s)" in last


@pytest.mark.parametrize("argv, message", [
    (["--batch-sizes", "1,x"], "batch sizes must be comma-separated whole numbers"),
    (["--runtimes", "tensorrt"], "runtime"),
    (["--input-shape", "3,0,32"], "input shape"),
    (["--min-run-time", "-1"], "min"),
])
def test_bench_bad_input_is_one_line(one_line_error, argv, message) -> None:
    """A bad batch list, runtime, shape or time is one line on stderr and a non-zero exit, never a traceback."""
    assert message in one_line_error(["bench", "resnet20", *argv])


def test_bench_never_overwrites_its_out_file(one_line_error, tmp_path) -> None:
    """An existing --out file is refused (and kept) unless --overwrite."""
    out = tmp_path / "bench.json"
    out.write_text("keep")
    assert "exists" in one_line_error(["bench", "resnet20", "--runtimes", "eager", "--batch-sizes", "1",
                                       "--min-run-time", "0.01", "--out", out])
    assert out.read_text() == "keep"
