"""trp.demo's comparison table: the speed-up in the best runtime, and the larger-input line (no training here)."""

from __future__ import annotations

from trp.demo import report_row, table


REPORT = {"acc_before": 99.0, "acc_after": 98.5, "flops_speedup": 3.2, "latency_speedup": 0.9, "latency_batch_size": 128,
          "best_speedup_b1": 1.1, "best_speedup_b128": 1.4, "best_runtime_b1": "onnxruntime",
          "best_runtime_b128": "channels_last", "dense_best_runtime_b1": "onnxruntime",
          "dense_best_runtime_b128": "onnxruntime"}


def test_rows_state_each_models_best_runtime_and_the_dense_row_its_own() -> None:
    """The dense row names the dense model's best runtimes at 1.00x; a compressed row its own best and speed-up."""
    text = table([report_row("baseline", REPORT, dense=True), report_row("TRP", REPORT)]).splitlines()
    assert text[2] == "| baseline | 99.00 | 99.00 | 1.00x | 1.00x | 1.00x (onnxruntime) | 1.00x (onnxruntime) |"
    assert text[3] == "| TRP | 99.00 | 98.50 | 3.20x | 0.90x | 1.10x (onnxruntime) | 1.40x (channels_last) |"
    assert "best-runtime speed-up b128" in text[0]


def test_the_larger_input_line_gives_both_best_runtimes_and_threads() -> None:
    """With the larger-input timing the table ends with its measured speed-up, both times and the thread count."""
    large = {"input_shape": [1, 64, 64], "batch_size": 32, "best_speedup": 1.5, "dense_best_ms": 30.0,
             "dense_best_runtime": "onnxruntime", "best_ms": 20.0, "best_runtime": "channels_last", "threads": 2}
    last = table([report_row("TRP", REPORT)], large).splitlines()[-1]
    assert last == ("At a 1×64×64 input, batch 32 (the same networks, random-normal input), TRP's measured speed-up, "
                    "each model in its fastest runtime: 1.50x (30.00 ms dense in onnxruntime, 20.00 ms TRP in "
                    "channels_last; 2 thread(s)).")
