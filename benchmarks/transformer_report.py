"""Summaries and ``results.md`` of the transformer benchmark (see :mod:`benchmarks.run_transformers`).

Per method and seed a task document holds ``trained`` and ``final`` metrics per split (``final`` is
after decomposition, and after fine-tuning for ``posthoc+ft``), ``macs``, ``params`` and
``macs_speedup``; :func:`summarize` gives each number's mean, sample standard deviation and count
over the seeds.

Example:
    >>> doc = {"seeds": {"0": {"dense": {"trained": {"val": {"acc": 50.0}}, "final": {"val": {"acc": 50.0}},
    ...                                  "macs": 10, "params": 5, "macs_speedup": 1.0}}}}
    >>> summarize(doc, ("val",), "acc")["dense"]["final"]["val"]["acc"]
    {'mean': 50.0, 'sd': None, 'n': 1}
"""

from __future__ import annotations

import statistics
from typing import Sequence

from benchmarks.common import fmt

__all__ = ["METHODS", "REQUIRED_KEYS", "stats", "summarize", "markdown"]

METHODS = ("dense", "trp", "posthoc", "posthoc+ft")
REQUIRED_KEYS = ("trained", "final", "macs", "params", "macs_speedup")
METRIC_NAMES = {"acc": "accuracy %", "loss": "loss (nats/char)", "ppl": "perplexity", "bpc": "bits/char"}


def stats(values: Sequence[float]) -> dict:
    """Mean, sample standard deviation (None for one value) and count."""
    vals = [float(v) for v in values]
    return {"mean": statistics.fmean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else None, "n": len(vals)}


def summarize(doc: dict, splits: Sequence[str], score: str) -> dict:
    """Mean and spread over the seeds of every method's metrics, MACs, params and MACs speed-up."""
    out: dict = {}
    runs = list(doc["seeds"].values())
    for method in METHODS:
        entries = [r[method] for r in runs if method in r]
        if not entries:
            continue
        row: dict = {k: stats([e[k] for e in entries]) for k in ("macs", "params", "macs_speedup")}
        for stage in ("trained", "final"):
            row[stage] = {split: {m: stats([e[stage][split][m] for e in entries]) for m in entries[0][stage][split]}
                          for split in splits}
        out[method] = row
    out["score"] = score
    return out


def _ms(s: dict, digits: str = ".2f") -> str:
    return fmt(s["mean"], digits) + (f" ± {s['sd']:{digits}}" if s.get("sd") is not None else "")


def _main_table(doc: dict) -> list[str]:
    summary, latency = doc["summary"], doc.get("latency", {}).get("models", {})
    splits = list(next(iter(summary["dense"]["final"].values())) and summary["dense"]["final"])
    metrics = [m for m in ("acc", "loss", "ppl", "bpc") if m in summary["dense"]["final"][splits[0]]]
    batches = doc.get("latency", {}).get("batch_sizes", [])
    names = {**METRIC_NAMES, "loss": "cross-entropy (nats)"} if summary["score"] == "acc" else METRIC_NAMES
    head = ["method"] + [f"{s} {names[m]} before → after" for s in splits for m in metrics[:1]]
    head += [f"{s} {names[m]} after" for s in splits for m in metrics[1:]]
    head += ["MACs (M)", "MACs speed-up", "params (k)"] + [f"best b{b} ms (runtime, × dense best)" for b in batches]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    digits = ".2f" if summary["score"] == "acc" else ".4f"
    for method in METHODS:
        row = summary.get(method)
        if row is None:
            continue
        cells = [method]
        cells += [f"{_ms(row['trained'][s][metrics[0]], digits)} → {_ms(row['final'][s][metrics[0]], digits)}"
                  for s in splits]
        cells += [_ms(row["final"][s][m], ".3f" if m != "ppl" else ".2f") for s in splits for m in metrics[1:]]
        cells += [fmt(row["macs"]["mean"] / 1e6, ".2f"), fmt(row["macs_speedup"]["mean"], ".2f", "×"),
                  fmt(row["params"]["mean"] / 1e3, ".1f")]
        lat = latency.get("posthoc" if method == "posthoc+ft" else method)
        for b in batches:
            if lat is None or str(b) not in lat["best"]:
                cells.append("–")
                continue
            rt, ms = lat["best"][str(b)]
            cells.append(f"{ms:.3f} ({rt}, {lat['speedup_vs_dense_best'][str(b)]:.2f}×)")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _latency_table(doc: dict) -> list[str]:
    lat = doc.get("latency")
    if not lat:
        return ["Latency: not measured (run `--phase latency`)."]
    batches = [str(b) for b in lat["batch_sizes"]]
    names = list(dict.fromkeys(rt for m in lat["models"].values() for rt in m["ms"]))
    head = ["model"] + [f"{rt} b{b} ms (× dense same runtime)" for rt in names for b in batches]
    lines = [f"Latency of seed {doc['saved_seed']}'s models, {lat['threads']} thread(s), median of blocks over "
             f"{lat['min_run_time_s']} s per cell (`trp.runtimes.measure_all`):", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, m in lat["models"].items():
        cells = [method]
        for rt in names:
            for b in batches:
                ms = m["ms"].get(rt, {}).get(b)
                up = m["speedup_same_runtime"].get(rt, {}).get(b)
                cells.append("–" if ms is None else f"{ms:.3f} ({fmt(up, '.2f', '×')})")
        lines.append("| " + " | ".join(cells) + " |")
    skipped = {f"{rt}: {why}" for m in lat["models"].values() for rt, why in m["skipped"].items()}
    lines += ["", *(f"- skipped {s}" for s in sorted(skipped))]
    if lat.get("load_average"):
        lines.append("- machine load average (1, 5, 15 min) when the measurements ended: "
                     + ", ".join(f"{v:.2f}" for v in lat["load_average"]))
    return lines


def _seed_table(doc: dict) -> list[str]:
    score = doc["summary"]["score"]
    split = next(iter(doc["seeds"].values()))["dense"]["final"]
    head = ["seed"] + [f"{m} {s}" for m in METHODS for s in split]
    lines = [f"Per seed ({METRIC_NAMES[score]}, after decomposition / fine-tuning):", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for seed, run in doc["seeds"].items():
        cells = [seed] + [fmt(run[m]["final"][s][score], ".2f" if score == "acc" else ".4f") for m in METHODS
                          for s in split if m in run]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _ranks_table(doc: dict) -> list[str]:
    seed = str(doc["saved_seed"])
    run = doc["seeds"][seed]
    names = list(run["trp"]["ranks"])
    lines = [f"Ranks of seed {seed}'s layers (kept / full; – = left dense), TRP against post-hoc SVD at the same MACs:", "",
             "| layer | TRP | post-hoc |", "|---|---|---|"]
    for name in names:
        cells = [run[m]["ranks"].get(name, [None, None]) for m in ("trp", "posthoc")]
        lines.append(f"| {name} | " + " | ".join(f"{fmt(k, 'd')} / {full}" for k, full in cells) + " |")
    return lines


def markdown(docs: dict) -> str:
    """``results.md``: per task the summary table, the latency per runtime and the per-seed scores."""
    lines = ["# Transformer benchmark results", "",
             "Generated by `benchmarks/run_transformers.py`; method and caveats in `benchmarks/TRANSFORMERS.md`.", ""]
    for name, doc in docs.items():
        r = doc["recipe"]
        lines += [f"## {name}", "", f"Command: `{doc['command']}`" + (f"; latency: `{doc['latency_command']}`"
                                                                    if "latency_command" in doc else ""), "",
                  f"Seeds {', '.join(doc['seeds'])} (mean ± sample sd); {r['steps']} training steps, TRP at "
                  f"{r['speedup']}× MACs (ramp over {r['ramp']:.0%} of the steps, ranks frozen after "
                  f"{r['freeze']:.0%}), nuclear {r['nuclear']:g}, period {r['period']}, head in TRP: {r['head']}; "
                  f"post-hoc fine-tuning {r['ft_steps']} steps; training on {doc['train_threads']} thread(s), "
                  f"{doc['wall_time_s']:.0f} s in all.", "", *_main_table(doc), "", *_latency_table(doc), "",
                  *_seed_table(doc), "", *_ranks_table(doc), ""]
    return "\n".join(lines)
