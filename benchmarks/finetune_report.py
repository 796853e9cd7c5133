"""The fine-tuning benchmark's report (benchmarks/finetune.py): spreads over seeds, the targets of
issue #16 checked from the measured means, and ``results.md`` from ``results.json``'s document.

Example:
    >>> spread([1.0, 3.0])["mean"]
    2.0
"""

from __future__ import annotations

import json
import statistics

__all__ = ["ARMS", "LABELS", "markdown", "spread", "summarize", "targets"]


ARMS = ("baseline", "trp-ft", "posthoc-ft", "trp-scratch", "dense-ft")
LABELS = {"baseline": "dense baseline (30 epochs)", "trp-ft": "(a) TRP fine-tuning + distillation, decomposed",
          "posthoc-ft": "(b) post-hoc SVD + fine-tuning + distillation",
          "trp-scratch": "(c) TRP from scratch + distillation",
          "dense-ft": "(d) reference: the baseline fine-tuned like (b), not compressed"}


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation, min and max.

    Example:
        >>> spread([1.0, 3.0])
        {'mean': 2.0, 'std': 1.4142, 'min': 1.0, 'max': 3.0, 'n': 2}
    """
    return {"mean": round(statistics.mean(values), 4),
            "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def summarize(per_seed: dict[int, dict]) -> dict:
    out: dict[str, dict] = {}
    for arm in ARMS:
        rows = [f[arm] for f in per_seed.values() if arm in f]
        if rows:
            out[arm] = {k: spread([r[k] for r in rows]) for k in ("val_acc", "test_acc", "macs_speedup")}
            if "decomposition_change" in rows[0]:
                out[arm]["decomposition_change"] = spread([r["decomposition_change"] for r in rows])
    return out


def targets(summary: dict, timing: dict | None) -> list[dict]:
    """The targets of issue #16, each checked from the measured means (met, or missed by how much)."""
    base = summary["baseline"]["test_acc"]["mean"]
    out = []

    def check(name: str, ok: bool, measured: str, miss: str) -> None:
        out.append({"target": name, "met": ok, "measured": measured, "missed_by": None if ok else miss})

    if "trp-ft" not in summary:
        return out
    def near_baseline(name: str, entry: dict, speedup: float) -> None:  # <= 0.5 pt below at >= `speedup`x MACs
        loss, s = base - entry["test_acc"]["mean"], entry["macs_speedup"]["mean"]
        check(name, loss <= 0.5 and s >= speedup, f"{entry['test_acc']['mean']:.2f}% vs {base:.2f}% ({-loss:+.2f} pt) "
              f"at {s:.2f}x", f"{max(loss - 0.5, 0):.2f} pt of accuracy, {max(speedup - s, 0):.2f}x of speed-up")

    ft = summary["trp-ft"]
    near_baseline("(a) TRP fine-tuning (<= 10 epochs): <= 0.5 pt below the baseline at >= 3.0x fewer MACs", ft, 3.0)
    worst = max(abs(ft["decomposition_change"]["min"]), abs(ft["decomposition_change"]["max"]))
    check("(a) decomposition changes accuracy by <= 0.1 pt (every seed)", worst <= 0.1,
          f"largest change {worst:.2f} pt (mean {ft['decomposition_change']['mean']:+.2f})", f"{worst - 0.1:.2f} pt")
    if ph := summary.get("posthoc-ft"):
        gap = ft["test_acc"]["mean"] - ph["test_acc"]["mean"]
        check("(a) beats post-hoc SVD + the same fine-tuning and distillation at the same MACs by >= 2 pt", gap >= 2.0,
              f"{gap:+.2f} pt ({ft['test_acc']['mean']:.2f}% vs {ph['test_acc']['mean']:.2f}%, "
              f"{ft['macs_speedup']['mean']:.2f}x vs {ph['macs_speedup']['mean']:.2f}x)", f"{2.0 - gap:.2f} pt")
    if "trp-scratch" in summary:
        near_baseline("(c) from scratch with distillation: <= 0.5 pt below the baseline at >= 2.5x",
                      summary["trp-scratch"], 2.5)
    if timing:
        check("fine-tuning epoch with TRP + distillation <= 1.3x a plain epoch", timing["ratio"] <= 1.3,
              f"{timing['ratio']:.3f}x ({timing['median_s']['trp+distill']:.2f} s vs "
              f"{timing['median_s']['plain']:.2f} s, "
              f"median of {timing['rounds']}, 1 thread)", f"{timing['ratio'] - 1.3:.3f}x")
    return out


def markdown(doc: dict) -> str:
    s, lines = doc["summary"], []
    lines += [f"# Fine-tuning benchmark `{doc['name']}`", "",
              f"Command: `{doc['command']}`  ", f"Machine: {doc['machine']['cpu']}, {doc['machine']['cores']} cores, "
              f"torch {doc['machine']['torch']}; every training run one thread ({doc['settings']['jobs']} at a time); "
              f"wall time {doc['wall_s'] / 60:.0f} min.", "",
              "ResNet-20 on cifar10-mini: a class-balanced 10 % of the 4,085 training images held out for validation "
              "(every choice below was made on it); the 1,000 test images evaluated once per final model. "
              f"Seeds {', '.join(map(str, doc['settings']['seeds']))}; mean ± sample standard deviation [min, max].",
              "", "| method | val acc (%) | test acc (%) | Δ test vs baseline (pt) | MACs speed-up |",
              "|---|---:|---:|---:|---:|"]
    base = s["baseline"]["test_acc"]["mean"]
    for arm in ARMS:
        if arm not in s:
            continue
        v, t, m = s[arm]["val_acc"], s[arm]["test_acc"], s[arm]["macs_speedup"]
        lines.append(f"| {LABELS[arm]} | {v['mean']:.2f} ± {v['std']:.2f} | {t['mean']:.2f} ± {t['std']:.2f} "
                     f"[{t['min']:.1f}, {t['max']:.1f}] | {t['mean'] - base:+.2f} | {m['mean']:.2f}x |")
    lines += ["", "## Per seed", "", "| seed | method | val acc (%) | test acc (%) | MACs speed-up | note |",
              "|---|---|---:|---:|---:|---|"]
    for seed, f in doc["per_seed"].items():
        for arm in ARMS:
            if arm in f:
                r = f[arm]
                note = (f"recipe {r['recipe']}; trained {r['test_acc_trained']:.2f}%, decomposition "
                        f"{r['decomposition_change']:+.2f} pt" if arm in ("trp-ft", "trp-scratch")
                        else ", ".join(str(r[k]) for k in ("rank", "lr") if k in r))
                lines.append(f"| {seed} | {arm} | {r['val_acc']:.2f} | {r['test_acc']:.2f} | {r['macs_speedup']:.2f}x "
                             f"| {note} |")
    lines += ["", "## Choices made on the validation split", ""]
    seeds = ", ".join(map(str, doc["settings"]["tune_seeds"]))
    # Each choice: (its key in doc, the candidates, how one is described).
    choices = [("chosen", doc["recipes"], lambda n, r: f"`{n}` {json.dumps(r)}"),
               ("scratch_chosen", doc.get("scratch_recipes", {}),
                lambda n, r: f"from scratch `{n}` (period {r['period']})"),
               ("posthoc_chosen", doc.get("posthoc_lrs", {}), lambda n, lr: f"post hoc (b) fine-tuned at lr {lr:g}"),
               ("dense_ft_chosen", doc.get("dense_ft_lrs", {}),
                lambda n, lr: f"reference (d), the dense baseline fine-tuned at lr {lr:g}")]
    for key, candidates, describe in choices:
        if doc.get(key):
            chosen, vals = doc[key]
            lines += [f"- {describe(n, c)}: mean val acc {vals[n]:.2f}% (seeds {seeds})"
                      + ("  **chosen**" if n == chosen else "") for n, c in candidates.items()]
    lines += ["", "## Targets (issue #16)", ""]
    for t in doc["targets"]:
        lines.append(f"- **{'met' if t['met'] else 'missed'}**: {t['target']} — {t['measured']}"
                     + ("" if t["met"] else f"; missed by {t['missed_by']}"))
    if doc.get("timing"):
        tm = doc["timing"]
        lines += ["", "## Epoch time", "", f"One fine-tuning epoch, 1 thread, {tm['rounds']} rounds alternating: plain "
                  f"{tm['epoch_s']['plain']} s, TRP + distillation {tm['epoch_s']['trp+distill']} s; ratio of medians "
                  f"{tm['ratio']:.3f}. Load average (1, 5, 15 min) "
                  + (f"before timing {', '.join(f'{x:.2f}' for x in tm['load_average_before'])}, "
                     if "load_average_before" in tm else "")
                  + f"after {', '.join(f'{x:.2f}' for x in tm['load_average_after'])}."]
    return "\n".join(lines) + "\n"
