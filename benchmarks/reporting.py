"""The human-readable side of a results document: ``results.md``, the plot, the machine description.

Example:
    >>> doc = {"name": "x", "settings": {"model": "resnet20", "dataset": "digits", "data_dir": None, "epochs": 2,
    ...        "lr": 0.05, "batch_size": 128, "seed": 0}, "baseline_acc": 80.0, "test_images": 360, "methods": [],
    ...        "targets": [], "notes": [], "command": "python benchmarks/run.py --quick", "wall_time_s": 60.0,
    ...        "machine": {"cpu": "", "cores": 2, "cores_usable": 2, "platform": "Linux", "python": "3.11",
    ...                    "torch": "2.14", "training_threads_per_run": 1, "parallel_training_runs": 2, "threads": 1}}
    >>> print(markdown(doc).splitlines()[0])
    # Benchmark `x`
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import torch

from benchmarks.common import CONV_SCHEMES, fmt
from trp.io import atomic_write

__all__ = ["COLUMNS", "markdown", "plot", "machine_info"]

COLUMNS = ("method", "scheme", "acc before (%)", "acc after (%)", "Δ vs baseline (pt)", "MACs speed-up", "params",
           "latency speed-up b1", "latency speed-up b128", "epoch time ratio")

MARKERS = {"posthoc": "v", "posthoc+ft": "^", "nuclear": "s", "trp": "o", "trp+nuclear": "D", "svd": "P"}
COLORS = dict(zip(CONV_SCHEMES, ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown")))


def _summary(doc: dict) -> list[str]:
    s = doc["settings"]
    data = f" ({s['data_dir']})" if s["data_dir"] else ""
    lines = [f"# Benchmark `{doc['name']}`", "",
             f"{s['model']} on {s['dataset']}{data}, {s['epochs']} epochs for every method, lr {s['lr']} (cosine), "
             f"batch {s['batch_size']}, seed {s['seed']}. Baseline accuracy **{doc['baseline_acc']:.2f}%** "
             f"({doc['test_images']} test images).", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(COLUMNS) - 2)) + "|"]
    for e in doc["methods"]:
        lines.append("| " + " | ".join([
            e["method"], e["scheme"], fmt(e["acc_before"]), fmt(e["acc_after"]), fmt(e["delta_vs_baseline"], "+.2f"),
            fmt(e["macs_speedup"], ".2f", "x"), f"{e['params']:,}", fmt(e["latency_speedup_b1"], ".2f", "x"),
            fmt(e["latency_speedup_b128"], ".2f", "x"), fmt(e["epoch_time_ratio"], ".3f", "x")]) + " |")
    return lines


def _targets(doc: dict) -> list[str]:
    lines = ["", "## Targets", ""]
    for t in doc["targets"]:
        line = f"- **{t['status']}** ({t['id']}, {t['scheme']}): {t['target']}"
        if t["measured"]:
            line += f" — {t['measured']}"
        if t["status"] == "missed":
            line += f". Missed by {t['missed_by']}: {t['reason']}."
        lines.append(line)
    return lines


def _details(doc: dict) -> list[str]:
    # Results written before the training accuracy was recorded have no such column.
    train = all("train_acc" in e for e in doc["methods"])
    head = ["method", "scheme", "rank criterion", "MACs", "latency b1 (ms)", "latency b128 (ms)",
            "memory format b1 / b128", "layers decomposed", *(["train acc, last epoch (%)"] if train else []),
            "epoch time (s)", "epoch time, parallel runs (s)"]
    lines = ["", "## Details", "", "| " + " | ".join(head) + " |",
             "|---|---|---|" + "---:|" * 3 + "---|" + "---:|" * (len(head) - 7)]
    for e in doc["methods"]:
        cells = [e["method"], e["scheme"], e["rank"] or "–", f"{e['macs']:,}", fmt(e["latency_ms_b1"], ".3f"),
                 fmt(e["latency_ms_b128"], ".2f"), f"{e['memory_format_b1']} / {e['memory_format_b128']}",
                 str(e["layers_decomposed"]), *([fmt(e["train_acc"])] if train else []),
                 fmt(e["epoch_time_s"], ".3f"), fmt(e["train_epoch_time_s_parallel"], ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _runtimes(doc: dict) -> list[str]:
    """Each model in every runtime and in its best (only for results that measured the runtimes)."""
    if not any("best_speedup_b128" in e for e in doc["methods"]):
        return []
    names = list(dict.fromkeys(name for e in doc["methods"] for name in e.get("runtimes", {})))
    head = ["method", "scheme", *(f"{n} b1 / b128 (ms)" for n in names), "best b1", "best b128",
            "best-runtime speed-up b1", "best-runtime speed-up b128", "predicted vs measured"]
    lines = ["", "## Runtimes", "", "Each model in every runtime; the speed-ups are the dense baseline in *its* fastest "
             "runtime over the model in its fastest.", "", "| " + " | ".join(head) + " |",
             "|---|---|" + "---:|" * (len(head) - 2)]
    for e in doc["methods"]:
        per = [f"{fmt(e['runtimes'][n].get('latency_ms_b1'), '.3f')} / {fmt(e['runtimes'][n].get('latency_ms_b128'))}"
               if n in e.get("runtimes", {}) else "–" for n in names]
        pred = (f"{e['predicted_ms_after']:.2f} / {fmt(e.get('measured_ms_after'))} ms "
                f"({fmt(100 * e['predicted_error'] if e.get('predicted_error') is not None else None, '+.1f', '%')})"
                if e.get("predicted_ms_after") is not None else "–")
        lines.append("| " + " | ".join([e["method"], e["scheme"], *per,
                                         f"{e['best_runtime_b1']} {fmt(e['best_ms_b1'], '.3f')} ms",
                                         f"{e['best_runtime_b128']} {fmt(e['best_ms_b128'])} ms",
                                         fmt(e.get("best_speedup_b1"), ".2f", "x"),
                                         fmt(e.get("best_speedup_b128"), ".2f", "x"), pred]) + " |")
    return lines


def _run(doc: dict) -> list[str]:
    m = doc["machine"]
    lines = ["", "## Notes", "", *(f"- {n}" for n in doc["notes"])]
    for e in doc["methods"]:
        lines += [f"- {e['method']} ({e['scheme']}): {n}" for n in e["notes"]]
    return lines + [
        "", "## Run", "",
        f"- command: `{doc['command']}`",
        f"- machine: {m['cpu'] or 'unknown CPU'}, {m['cores']} cores ({m['cores_usable']} usable), {m['platform']}, "
        f"Python {m['python']}, torch {m['torch']}",
        f"- threads: training runs {m['training_threads_per_run']} each, {m['parallel_training_runs']} in parallel; "
        f"timing and latency phases {m['threads']}",
        f"- wall time: {doc['wall_time_s'] / 60:.1f} min ({doc['wall_time_s']:.0f} s)", ""]


def markdown(doc: dict) -> str:
    """``results.md``: the summary table, the targets, details per run, notes and how it was run."""
    return "\n".join(_summary(doc) + _targets(doc) + _details(doc) + _runtimes(doc) + _run(doc))


def plot(doc: dict, path: Path) -> None:
    """``accuracy_vs_speedup.png``: accuracy after decomposition against MACs speed-up, the baseline as a line."""
    import matplotlib  # the optional [plot] extra, loaded only when a plot is written

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    ax.axhline(doc["baseline_acc"], color="gray", linestyle="--", linewidth=1, label=f"baseline {doc['baseline_acc']:.2f}%")
    for e in doc["methods"]:
        if e["method"] == "baseline":
            continue
        ax.scatter(e["macs_speedup"], e["acc_after"], marker=MARKERS.get(e["method"], "o"), s=60,
                   color=COLORS.get(e["scheme"], "tab:red"), label=f"{e['method']} ({e['scheme']})", zorder=3)
    s = doc["settings"]
    ax.set_xlabel("MACs speed-up (×)")
    ax.set_ylabel("test accuracy after decomposition (%)")
    ax.set_title(f"{s['model']} on {s['dataset']}, {s['epochs']} epochs each")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        plt.close(fig)


def machine_info(args: argparse.Namespace) -> dict:
    """The CPU, cores, Python and torch versions, and the thread settings of the run."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu, "cores": os.cpu_count(),
            "cores_usable": usable, "torch": torch.__version__, "threads": args.threads,
            "training_threads_per_run": 1, "parallel_training_runs": args.jobs}
