"""The issue's five targets, checked from the measured numbers of a results document.

Each target is one small function of a :class:`Context` and a scheme, returning one record per
checked run: ``id``, ``target``, ``scheme``, ``method``, ``measured``, ``status`` (``met``,
``missed`` or ``not run``), and for a miss ``missed_by`` and ``reason``. The reason states what
was measured next to the miss (training accuracies, per-run times, layers kept dense), not a
cause that the benchmark did not measure.

1. trp+nuclear at >= :data:`T_SPEEDUP` x MACs speed-up loses <= :data:`T_ACC_LOSS` pt, no fine-tuning;
2. decomposing a TRP-trained network changes its accuracy by <= :data:`T_DECOMP` pt;
3. at equal MACs trp+nuclear beats post-hoc SVD + fine-tuning by >= :data:`T_POSTHOC_GAP` pt;
4. TRP's training time per epoch is <= :data:`T_EPOCH` x the baseline's;
5. the measured CPU latency speed-up at batch 128 is >= :data:`T_LATENCY` x the MACs speed-up.

The targets of #14 (checked only for documents whose entries hold the runtime fields, so that
older results keep exactly the targets they were written with):

6. trp / trp+nuclear within :data:`T_BEST_ACC` pt of the baseline run, measured in each model's own
   best runtime, >= :data:`T_BEST_B128` x faster than the dense model at batch 128 and
   >= :data:`T_BEST_B1` x at batch 1;
7. that best-runtime speed-up at batch 128 is >= :data:`T_BEST_RATIO` x the MACs speed-up;
8. where a latency budget predicted the whole-model time, it is within :data:`T_PREDICT` of the measured.

:func:`resnet50_latency` checks the ResNet-50 target (measured >= :data:`T_R50_B1` x at batch 1 in
the best runtime) and the prediction on the document of ``benchmarks/resnet50_latency.py``.

Example:
    >>> base = {"method": "baseline", "scheme": "dense", "acc_after": 80.0, "train_acc": 90.0}
    >>> trp = {"method": "trp+nuclear", "scheme": "spatial", "acc_before": 79.0, "acc_after": 79.0,
    ...        "macs_speedup": 2.5, "train_acc": 88.0, "layers_dense": [], "final_mean_rank": 9.0, "rank": "value:0.05"}
    >>> ctx = Context(entries=[base, trp], baseline_acc=80.0, methods=("baseline", "trp+nuclear"), schemes=("spatial",))
    >>> [t["status"] for t in accuracy_at_speedup(ctx, "spatial")]
    ['met']
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from benchmarks.common import TRP_METHODS, entry, fmt

__all__ = ["T_SPEEDUP", "T_ACC_LOSS", "T_DECOMP", "T_POSTHOC_GAP", "T_EPOCH", "T_LATENCY", "Context", "TARGETS",
           "best_runtime_shortfalls", "check_targets", "accuracy_at_speedup", "decomposition_change", "beats_posthoc", "epoch_time",
           "latency_ratio", "T_BEST_B128", "T_BEST_B1", "T_BEST_ACC", "T_BEST_RATIO", "T_PREDICT", "T_R50_B1",
           "best_runtime_speedup", "best_runtime_ratio", "predicted_latency", "resnet50_latency"]

# Targets of the issue (ResNet-20 on cifar10-mini, equal epoch budgets).
T_SPEEDUP, T_ACC_LOSS, T_DECOMP, T_POSTHOC_GAP, T_EPOCH, T_LATENCY = 2.5, 1.0, 0.3, 2.0, 1.05, 0.8
# Targets of #14: real speed, each model in its own fastest runtime.
T_BEST_B128, T_BEST_B1, T_BEST_ACC, T_BEST_RATIO, T_PREDICT, T_R50_B1 = 1.8, 1.5, 1.0, 0.8, 0.10, 1.9


@dataclass(frozen=True)
class Context:
    """What the checks read: the entries of ``results.json`` and the settings they were run with."""

    entries: Sequence[dict]
    baseline_acc: float
    methods: Sequence[str]
    schemes: Sequence[str]
    test_images: int = 1000
    steps_per_epoch: int = 32
    epochs: int = 30
    speedup: float = 2.55  # 0: TRP kept an energy (--energy) instead of a MACs budget
    energy: float = 0.95
    period: int = 20
    finetune: int = 3

    @classmethod
    def from_doc(cls, doc: dict) -> "Context":
        """The context of a results document (``results.json``, with or without its ``targets``)."""
        s = doc["settings"]
        return cls(entries=doc["methods"], baseline_acc=doc["baseline_acc"], methods=s["methods"],
                   schemes=s["schemes"], test_images=doc["test_images"], steps_per_epoch=doc["steps_per_epoch"],
                   epochs=s["epochs"], speedup=s["speedup"], energy=s["energy"], period=s["period"],
                   finetune=s["finetune"])

    @property
    def one_image(self) -> float:
        """Accuracy points of one test image."""
        return 100.0 / max(self.test_images, 1)

    def entry(self, method: str, scheme: str) -> dict | None:
        return entry(self.entries, method, scheme)


def _record(tid: int, target: str, scheme: str, method: str, measured: str = "", met: bool | None = None,
            missed_by: str = "", reason: str = "") -> dict:
    return {"id": tid, "target": target, "scheme": scheme, "method": method, "measured": measured,
            "status": "not run" if met is None else "met" if met else "missed",
            "missed_by": missed_by if met is False else "", "reason": reason if met is False else ""}


def _kept_dense_slower(e: dict) -> int:
    return sum("measured slower" in why for _, why in e["layers_dense"])


def _speed_reasons(ctx: Context, tn: dict) -> str:
    slower = _kept_dense_slower(tn)
    dense_note = f"; {slower} layer(s) kept dense by the latency check" if slower else ""
    rank = fmt(tn.get("final_mean_rank"), ".1f")
    if ctx.speedup:
        return f"training chose ranks for {ctx.speedup:g}x (final mean rank {rank}){dense_note}; a larger --speedup lowers them"
    return (f"final mean rank {rank} after {ctx.epochs} epochs, decomposed with {tn['rank']}{dense_note}; "
            "more epochs, a lower --energy, a larger --nuclear or --speedup lower the ranks")


def _accuracy_reasons(ctx: Context, tn: dict) -> list[str]:
    trained_loss = ctx.baseline_acc - tn["acc_before"]
    if trained_loss > T_ACC_LOSS:
        reason = f"the loss is in the trained network already ({trained_loss:.2f} pt before decomposition)"
        base = ctx.entry("baseline", "dense")
        base_train, train = (base or {}).get("train_acc"), tn.get("train_acc")
        if base_train is not None and train is not None:
            reason += (f"; training accuracy in the last epoch {train:.2f}% against the baseline's "
                       f"{base_train:.2f}%")
        reasons = [reason]
    else:
        reasons = [f"decomposition itself cost {tn['acc_before'] - tn['acc_after']:.2f} pt (target 2)"]
    if ctx.one_image > 0.25:
        reasons.append(f"one test image is {ctx.one_image:.2f} pt")
    return reasons


def accuracy_at_speedup(ctx: Context, scheme: str) -> list[dict]:
    """Target 1: trp+nuclear at >= 2.5x MACs speed-up loses <= 1.0 pt against the baseline, no fine-tuning."""
    title = (f"trp+nuclear at >= {T_SPEEDUP}x MACs speed-up loses <= {T_ACC_LOSS} pt against the baseline, "
             "no fine-tuning")
    tn = ctx.entry("trp+nuclear", scheme)
    if tn is None:
        return [_record(1, title, scheme, "trp+nuclear")]
    loss = ctx.baseline_acc - tn["acc_after"]
    short, over = T_SPEEDUP - tn["macs_speedup"], loss - T_ACC_LOSS
    missed, reasons = [], []
    if short > 0:
        missed.append(f"{short:.2f}x of speed-up")
        reasons.append(_speed_reasons(ctx, tn))
    if over > 0:
        missed.append(f"{over:.2f} pt of accuracy")
        reasons += _accuracy_reasons(ctx, tn)
    measured = f"{tn['macs_speedup']:.2f}x MACs, {loss:+.2f} pt loss ({tn['acc_after']:.2f}% vs {ctx.baseline_acc:.2f}%)"
    return [_record(1, title, scheme, "trp+nuclear", measured, short <= 0 and over <= 0, " and ".join(missed),
                    "; ".join(reasons))]


def _per_trp_method(ctx: Context, scheme: str, tid: int, title: Callable[[str], str],
                    judge: Callable[[str, dict], tuple[str, bool, str, str]]) -> list[dict]:
    # Targets 2, 4 and 5 check trp+nuclear and trp alike; a method not asked for is left out.
    out = []
    for method in TRP_METHODS:
        e = ctx.entry(method, scheme)
        if e is None:
            if method in ctx.methods:
                out.append(_record(tid, title(method), scheme, method))
            continue
        out.append(_record(tid, title(method), scheme, method, *judge(method, e)))
    return out


def decomposition_change(ctx: Context, scheme: str) -> list[dict]:
    """Target 2: decomposing the trp+nuclear (and trp) network changes its accuracy by <= 0.3 pt."""

    def judge(method: str, e: dict) -> tuple[str, bool, str, str]:
        change = e["acc_after"] - e["acc_before"]
        kept = f"the ranks of {ctx.speedup:g}x" if ctx.speedup else f"energy {ctx.energy}"
        reason = (f"trained with projections to {kept}, decomposed with {e['rank']} (every singular value below its "
                  f"threshold cut), {e.get('layers_decomposed', '?')} layer(s) decomposed; "
                  f"one test image is {ctx.one_image:.2f} pt")
        return (f"{change:+.2f} pt ({e['acc_before']:.2f}% -> {e['acc_after']:.2f}%)", abs(change) <= T_DECOMP + 1e-9,
                f"{abs(change) - T_DECOMP:.2f} pt", reason)

    return _per_trp_method(ctx, scheme, 2, lambda m: f"decomposing the {m} network changes its accuracy by "
                           f"<= {T_DECOMP} pt", judge)


def beats_posthoc(ctx: Context, scheme: str) -> list[dict]:
    """Target 3: at equal MACs, trp+nuclear beats post-hoc SVD + fine-tuning by >= 2 pt."""
    title = f"trp+nuclear beats post-hoc SVD + {ctx.finetune} fine-tuning epochs by >= {T_POSTHOC_GAP} pt at equal MACs"
    tn, ph = ctx.entry("trp+nuclear", scheme), ctx.entry("posthoc+ft", scheme)
    if tn is None or ph is None:
        return [_record(3, title, scheme, "trp+nuclear")]
    gap = tn["acc_after"] - ph["acc_after"]
    plain = ctx.entry("posthoc", scheme)
    reason = (f"{ctx.finetune} fine-tuning epochs took the post-hoc network from "
              f"{fmt(plain['acc_after'] if plain else None)}% to {ph['acc_after']:.2f}%; trp+nuclear trained to "
              f"{tn['acc_before']:.2f}% ({tn['acc_before'] - ctx.baseline_acc:+.2f} pt against the baseline)")
    measured = (f"{gap:+.2f} pt ({tn['acc_after']:.2f}% vs {ph['acc_after']:.2f}%, "
                f"MACs speed-up {tn['macs_speedup']:.2f}x vs {ph['macs_speedup']:.2f}x)")
    return [_record(3, title, scheme, "trp+nuclear", measured, gap >= T_POSTHOC_GAP, f"{T_POSTHOC_GAP - gap:.2f} pt",
                    reason)]


def epoch_time(ctx: Context, scheme: str) -> list[dict]:
    """Target 4: TRP's training time per epoch is <= 1.05x the baseline's."""

    def judge(method: str, e: dict) -> tuple[str, bool, str, str]:
        r = e["epoch_time_ratio"]
        steps = ctx.steps_per_epoch
        reason = (f"{e['epoch_time_s']:.3f} s against the baseline's {e['epoch_time_s'] / r:.3f} s per epoch "
                  f"({100 * (r - 1):+.1f}%); the run adds an SVD of every eligible layer every {ctx.period} steps "
                  f"({steps / ctx.period:.1f} per epoch of {steps} steps)"
                  + (" and the nuclear sub-gradient every step" if method == "trp+nuclear" else "")
                  + "; a larger --period spreads the SVDs over more steps")
        return f"{r:.3f}x ({e['epoch_time_s']:.3f} s per epoch)", r <= T_EPOCH, f"{r - T_EPOCH:.3f}x", reason

    return _per_trp_method(ctx, scheme, 4, lambda m: f"{m} training time per epoch <= {T_EPOCH}x the baseline's", judge)


def latency_ratio(ctx: Context, scheme: str) -> list[dict]:
    """Target 5: the measured CPU latency speed-up at batch 128 is >= 0.8x the MACs speed-up."""

    def judge(method: str, e: dict) -> tuple[str, bool, str, str]:
        ratio = e["latency_speedup_b128"] / max(e["macs_speedup"], 1e-9)
        slower = _kept_dense_slower(e)
        reason = (f"{e['latency_ms_b128']:.2f} ms against {e['latency_ms_b128'] * e['latency_speedup_b128']:.2f} ms "
                  f"dense at batch 128, for {e['macs_speedup']:.2f}x fewer MACs"
                  + (f"; {slower} planned layer(s) kept dense because they measured slower decomposed" if slower else ""))
        return (f"{e['latency_speedup_b128']:.2f}x measured against {e['macs_speedup']:.2f}x MACs (ratio {ratio:.3f})",
                ratio >= T_LATENCY, f"{T_LATENCY - ratio:.3f} of the ratio", reason)

    return _per_trp_method(ctx, scheme, 5, lambda m: f"{m}: measured CPU latency speed-up at batch 128 >= {T_LATENCY} x "
                           "its MACs speed-up", judge)


def _runtimes_measured(ctx: Context) -> bool:
    return any("best_speedup_b128" in e for e in ctx.entries)


def _best_reason(e: dict) -> str:
    return (f"dense {e.get('dense_best_ms_b128', float('nan')):.2f} ms in {e.get('dense_best_runtime_b128')}, this model "
            f"{e.get('best_ms_b128', float('nan')):.2f} ms in {e.get('best_runtime_b128')} at batch 128; "
            f"{e.get('dense_best_ms_b1', float('nan')):.3f} ms in {e.get('dense_best_runtime_b1')} against "
            f"{e.get('best_ms_b1', float('nan')):.3f} ms in {e.get('best_runtime_b1')} at batch 1")


def best_runtime_shortfalls(b128: float, b1: float, loss: float) -> list[str]:
    """What target 6 misses by: speed-ups best against best at batch 128 and 1, accuracy loss in pt.

    Example:
        >>> best_runtime_shortfalls(1.9, 1.4, 0.5)
        ['0.10x at batch 1']
    """
    short = [f"{T_BEST_B128 - b128:.2f}x at batch 128"] if b128 < T_BEST_B128 else []
    short += [f"{T_BEST_B1 - b1:.2f}x at batch 1"] if b1 < T_BEST_B1 else []
    return short + ([f"{loss - T_BEST_ACC:.2f} pt of accuracy"] if loss > T_BEST_ACC else [])


def best_runtime_speedup(ctx: Context, scheme: str) -> list[dict]:
    """Target 6: within 1.0 pt of the baseline, >= 1.8x (b128) and >= 1.5x (b1) faster, best runtime vs best runtime."""
    if not _runtimes_measured(ctx):
        return []

    def judge(method: str, e: dict) -> tuple[str, bool, str, str]:
        b128, b1, loss = e["best_speedup_b128"], e["best_speedup_b1"], ctx.baseline_acc - e["acc_after"]
        short = best_runtime_shortfalls(b128, b1, loss)
        return (f"{b128:.2f}x (b128), {b1:.2f}x (b1), {loss:+.2f} pt loss", not short, " and ".join(short),
                f"{_best_reason(e)}; {e['macs_speedup']:.2f}x fewer MACs")

    return _per_trp_method(ctx, scheme, 6, lambda m: f"{m}: within {T_BEST_ACC} pt of the baseline, >= {T_BEST_B128}x "
                           f"at batch 128 and >= {T_BEST_B1}x at batch 1, each model in its best runtime", judge)


def best_runtime_ratio(ctx: Context, scheme: str) -> list[dict]:
    """Target 7: the best-runtime speed-up at batch 128 is >= 0.8x the MACs speed-up."""
    if not _runtimes_measured(ctx):
        return []

    def judge(method: str, e: dict) -> tuple[str, bool, str, str]:
        ratio = e["best_speedup_b128"] / max(e["macs_speedup"], 1e-9)
        return (f"{e['best_speedup_b128']:.2f}x measured against {e['macs_speedup']:.2f}x MACs (ratio {ratio:.3f})",
                ratio >= T_BEST_RATIO, f"{T_BEST_RATIO - ratio:.3f} of the ratio", _best_reason(e))

    return _per_trp_method(ctx, scheme, 7, lambda m: f"{m}: best-runtime speed-up at batch 128 >= {T_BEST_RATIO} x its "
                           "MACs speed-up", judge)


def _prediction(e: dict) -> tuple[str, bool | None, str, str]:
    err = e.get("predicted_error")
    if err is None:
        return "no latency budget predicted this model's time", None, "", ""
    return (f"predicted {e['predicted_ms_after']:.2f} ms, measured {e['measured_ms_after']:.2f} ms ({100 * err:+.1f}%)",
            abs(err) <= T_PREDICT + 1e-12, f"{100 * (abs(err) - T_PREDICT):.1f}% of the time",
            f"{e.get('predicted_runtime')} at batch {e.get('predicted_batch_size')}; the layer table sums each "
            "layer's time alone, the whole model adds what runs between them")


def predicted_latency(ctx: Context, scheme: str) -> list[dict]:
    """Target 8: a latency budget's predicted whole-model time is within 10 % of the measured one."""
    if not _runtimes_measured(ctx):
        return []
    return _per_trp_method(ctx, scheme, 8, lambda m: f"{m}: predicted whole-model time within {100 * T_PREDICT:g} % "
                           "of the measured", lambda method, e: _prediction(e))


def resnet50_latency(doc: dict) -> list[dict]:
    """The ResNet-50 target on ``benchmarks/resnet50_latency.py``'s document: >= 1.9x at batch 1 in the best runtime
    (dense in its best against compressed in its best), and the prediction within 10 %.

    Example:
        >>> d = {"best_speedup_b1": 1.9, "dense_best_ms_b1": 19.0, "dense_best_runtime_b1": "onnxruntime",
        ...      "best_ms_b1": 10.0, "best_runtime_b1": "onnxruntime", "macs_speedup": 2.1, "predicted_error": None}
        >>> [r["status"] for r in resnet50_latency(d)]
        ['met', 'not run']
    """
    s = doc["best_speedup_b1"]
    reason = (f"dense {doc['dense_best_ms_b1']:.2f} ms in {doc['dense_best_runtime_b1']}, compressed "
              f"{doc['best_ms_b1']:.2f} ms in {doc['best_runtime_b1']}; {doc['macs_speedup']:.2f}x fewer MACs")
    first = _record(9, f"torchvision resnet50 at 224x224, {doc.get('rank', 'latency:2')}: >= {T_R50_B1}x at batch 1 "
                    "in the best runtime", "resnet50", "latency", f"{s:.2f}x", s >= T_R50_B1,
                    f"{T_R50_B1 - s:.2f}x", reason)
    return [first, _record(8, f"predicted whole-model time within {100 * T_PREDICT:g} % of the measured", "resnet50",
                           "latency", *_prediction(doc))]


TARGETS: tuple[Callable[[Context, str], list[dict]], ...] = (
    accuracy_at_speedup, decomposition_change, beats_posthoc, epoch_time, latency_ratio, best_runtime_speedup,
    best_runtime_ratio, predicted_latency)


def check_targets(ctx: Context) -> list[dict]:
    """Every target for every scheme, in the order scheme by scheme, target 1 to 8."""
    return [record for scheme in ctx.schemes for check in TARGETS for record in check(ctx, scheme)]
