"""The fine-tuning benchmark's bookkeeping (benchmarks/finetune.py): spreads, target checks, job slots."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the repository root, never benchmarks/ itself (its modules would shadow packages)
    sys.path.insert(0, str(ROOT))
from benchmarks import finetune as ft  # noqa: E402
from benchmarks import finetune_report as report  # noqa: E402


def _seed(base: float, tuned: float, posthoc: float, change: float = 0.0, speedup: float = 3.1) -> dict:
    arm = {"val_acc": 50.0, "test_acc": tuned, "test_acc_trained": tuned - change, "decomposition_change": change,
           "macs": 1, "macs_speedup": speedup, "rank": "value:1e-3", "layers_decomposed": 18, "recipe": "r"}
    return {"baseline": {"val_acc": 50.0, "test_acc": base, "macs": 3, "macs_speedup": 1.0}, "tune": {},
            "trp-ft": arm, "posthoc-ft": {"val_acc": 40.0, "test_acc": posthoc, "macs": 1, "macs_speedup": speedup,
                                          "rank": "speedup:3.1", "lr": "lr0.02"}}


def test_targets_are_checked_from_the_means() -> None:
    """A 0.3 pt loss at 3.1x meets the first target; a 0.2 pt decomposition change misses by 0.1 pt."""
    per_seed = {0: _seed(66.0, 65.8, 62.0), 1: _seed(67.0, 66.6, 63.0, change=-0.2), 2: _seed(66.0, 65.7, 63.0)}
    summary = report.summarize(per_seed)
    assert summary["trp-ft"]["test_acc"]["mean"] == pytest.approx(66.0333, abs=1e-3)
    checks = report.targets(summary, None)
    first, decomposition, versus = checks[:3]
    assert first["target"].startswith("(a) TRP fine-tuning") and first["met"] and first["missed_by"] is None
    assert decomposition["target"].startswith("(a) decomposition") and not decomposition["met"]
    assert decomposition["missed_by"] == "0.10 pt"
    assert versus["target"].startswith("(a) beats post-hoc") and versus["met"]


def test_timing_target_and_missing_arms() -> None:
    """A 1.4x epoch misses the time target by 0.1x; a benchmark without (c) checks no (c) target."""
    summary = report.summarize({0: _seed(66.0, 64.0, 63.5), 1: _seed(66.0, 64.0, 63.5)})
    timing = {"ratio": 1.4, "median_s": {"trp+distill": 14.0, "plain": 10.0}, "rounds": 2}
    checks = report.targets(summary, timing)
    assert not any(t["target"].startswith("(c)") for t in checks)
    assert checks[-1]["missed_by"] == "0.100x"
    assert not checks[0]["met"] and checks[0]["missed_by"].startswith("1.50 pt of accuracy")


def test_slots_run_the_lowest_priority_number_first() -> None:
    """With one slot busy, the waiting jobs get it in priority order, not in the order they asked."""
    slots, order = ft.Slots(1), []
    gate = threading.Event()

    def job(priority: int) -> None:
        with slots.take(priority):
            order.append(priority)

    with slots.take(0):
        threads = [threading.Thread(target=job, args=(p,)) for p in (4, 1, 3)]
        for t in threads:
            t.start()
            time.sleep(0.05)  # all three are waiting before the slot frees
        gate.set()
    for t in threads:
        t.join(5)
    assert order == [1, 3, 4]


def test_flags_and_in_use(tmp_path: Path) -> None:
    """Settings become CLI flags; a folder nobody locks is free."""
    assert ft.flags({"energy_ramp": 3, "lr": 0.01}) == ["--energy-ramp", "3", "--lr", "0.01"]
    assert not ft.in_use(tmp_path / "missing") and not ft.in_use(tmp_path)


def test_a_lone_candidate_needs_no_choice() -> None:
    """One from-scratch recipe is run on every seed at once; two or more wait for the validation split."""
    assert ft.lone(ft.SCRATCH_RECIPES) == "scratch" and ft.lone({"a": {}}) == "a"
    assert ft.lone(ft.POSTHOC_LRS) is None and ft.lone([]) is None


def test_a_post_hoc_model_made_for_other_macs_is_refused(tmp_path: Path) -> None:
    """The post-hoc folder is per seed: one left by an (a) of other MACs stops the benchmark, not compared silently."""
    (tmp_path / "posthoc.json").write_text('{"macs": 1000, "macs_dense": 3000, "criterion": "speedup:3"}')
    assert ft.posthoc_model(None, tmp_path / "baseline", tmp_path, 1005, 0)["macs"] == 1000  # within 1 %: reused
    with pytest.raises(RuntimeError, match="has 1000 MACs, \\(a\\) 1200"):
        ft.posthoc_model(None, tmp_path / "baseline", tmp_path, 1200, 0)


def test_a_recipes_distillation_weight_goes_with_the_teacher_and_to_post_hoc() -> None:
    """A recipe's distill_weight is a teacher flag (never a TRP flag); without one --distill-weight applies."""
    import argparse

    args = argparse.Namespace(ft_epochs=10, speedup=3.0, distill_weight=0.5, distill_temperature=4.0)
    recipe = {"lr": 0.02, "period": 5, "distill_weight": 0.9}
    settings = ft.ft_settings(args, recipe)
    assert "distill_weight" not in settings and (settings["period"], settings["lr"]) == (5, 0.02)
    assert ft.distill_flags(args, Path("t"), recipe) == ["--teacher", "t", "--distill-weight", "0.9",
                                                       "--distill-temperature", "4.0"]
    assert ft.distill_flags(args, Path("t"), {"lr": 0.02})[3] == "0.5" == str(ft.distill_weight(args))


def test_post_hoc_is_tuned_over_learning_rates_around_the_previous_choice_and_reported() -> None:
    """(b)'s learning rates bracket the one the previous comparison chose (0.02); the report names the chosen
    one and each seed's."""
    lrs = sorted(ft.POSTHOC_LRS.values())
    assert lrs[0] < 0.02 < lrs[-1] and 0.02 in lrs
    per_seed = {0: _seed(66.0, 65.8, 62.0), 1: _seed(67.0, 66.6, 63.0)}
    summary = report.summarize(per_seed)
    names = list(ft.POSTHOC_LRS)
    doc = {"name": "t", "command": "python benchmarks/finetune.py", "wall_s": 60.0,
           "machine": {"cpu": "x86_64", "cores": 2, "torch": "2"},
           "settings": {"jobs": 2, "seeds": [0, 1], "tune_seeds": [0, 1]}, "summary": summary, "per_seed": per_seed,
           "recipes": ft.FT_RECIPES,
           "chosen": [next(iter(ft.FT_RECIPES)), {n: 60.0 for n in ft.FT_RECIPES}], "posthoc_lrs": ft.POSTHOC_LRS,
           "posthoc_chosen": [names[0], {n: 50.0 - i for i, n in enumerate(names)}],
           "targets": report.targets(summary, None)}
    text = report.markdown(doc)
    first = ft.POSTHOC_LRS[names[0]]
    assert f"post hoc (b) fine-tuned at lr {first:g}: mean val acc 50.00%" in text
    assert text.count("**chosen**") == 2  # one recipe, one post-hoc learning rate
    assert "| 0 | posthoc-ft | 40.00 | 62.00 | 3.10x | speedup:3.1, lr0.02 |" in text


def test_the_uncompressed_reference_is_reported_beside_the_arms() -> None:
    """(d), the baseline fine-tuned like (b) without compression, gets its own row at 1x MACs and its own choice."""
    final = {"epoch": 10, "val_acc": 67.0, "test_acc": 66.0}
    report_ = {"acc_before": 65.0, "acc_after": 65.0, "macs_before": 300, "macs_after": 100, "rank": "value:1e-3",
               "layers_decomposed": 18}
    raw = {"baseline": {"final_test": {"val_acc": 64.0, "test_acc": 65.5}}, "tune": {},
           "trp-ft": {"recipe": "r", "doc": {"final_test": {"val_acc": 66.0}}, "report": report_},
           "posthoc-ft": None, "trp-scratch": None, "dense-ft": {"lr": "lr0.02", "doc": {"final_test": final}}}
    fig = ft.seed_figures(raw)
    assert fig["dense-ft"] == {"val_acc": 67.0, "test_acc": 66.0, "macs": 300, "macs_speedup": 1.0, "lr": "lr0.02"}
    assert "dense-ft" not in ft.seed_figures({**raw, "dense-ft": None})
    summary = report.summarize({0: fig, 1: fig})
    doc = {"name": "t", "command": "c", "wall_s": 60.0, "machine": {"cpu": "x", "cores": 2, "torch": "2"},
           "settings": {"jobs": 2, "seeds": [0, 1], "tune_seeds": [0, 1]}, "summary": summary,
           "per_seed": {0: fig, 1: fig}, "recipes": {}, "dense_ft_lrs": ft.DENSE_FT_LRS,
           "dense_ft_chosen": ["lr0.02", {n: 60.0 for n in ft.DENSE_FT_LRS}], "targets": report.targets(summary, None)}
    text = report.markdown(doc)
    assert "| (d) reference: the baseline fine-tuned like (b), not compressed | 67.00 ± 0.00 | 66.00 ± 0.00" in text
    assert "reference (d), the dense baseline fine-tuned at lr 0.02: mean val acc 60.00% (seeds 0, 1)  **chosen**" in text


def test_timing_is_reused_only_for_the_recipe_it_timed(tmp_path: Path) -> None:
    """timing.json names its recipe; a missing file, an unreadable one, or one without a recipe names none."""
    path = tmp_path / "timing.json"
    assert ft.timed_recipe(path) is None
    path.write_text('{"ratio": 1.2}')
    assert ft.timed_recipe(path) is None
    path.write_text('{"recipe": "lr05-r2-f4-p5", "ratio": 1.2}')
    assert ft.timed_recipe(path) == "lr05-r2-f4-p5"
    path.write_text("{not json")
    assert ft.timed_recipe(path) is None


def test_committed_finetune_config_is_the_recipe_the_benchmark_chose() -> None:
    """configs/resnet20_cifar10_trp_finetune.json holds the settings of the recipe the committed results chose."""
    import argparse
    import json

    from trp.train import load_config_file

    results = json.loads((ROOT / "benchmarks/results/finetune-r20-c10mini/results.json").read_text())
    recipe = ft.FT_RECIPES[results["chosen"][0]]
    config = load_config_file(ROOT / "configs/resnet20_cifar10_trp_finetune.json")
    args = argparse.Namespace(**{k: results["settings"][k] for k in ("ft_epochs", "speedup", "distill_weight")})
    settings = ft.ft_settings(args, recipe)
    assert {k: config.get(k) for k in settings} == settings
    assert config["distill_weight"] == ft.distill_weight(args, recipe)
    assert config["distill_temperature"] == results["settings"]["distill_temperature"]
