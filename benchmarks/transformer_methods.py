"""The methods of the transformer benchmark, run for one task and one seed.

* ``dense``: AdamW (β = 0.9, 0.95; weight decay on matrices only), linear warm-up then cosine decay,
  gradient norm clipped at 1.
* ``trp``: the same loop with ``trp.TRP(model, "linear", speedup=ramp(S), freeze=..., nuclear=λ)``
  attached to the optimizer (projection every ``period`` steps, nuclear-norm sub-gradient before each
  step), on every ``nn.Linear`` that :func:`linear_filter` accepts. At the end one last projection
  (``project_now``) and ``trp.decompose_`` at the ranks TRP trained (``trp.plan`` with
  ``reg.ranks()``): no fine-tuning.
* ``posthoc``: the dense model, truncated SVD at ``trp.speedup(s)`` where ``s`` is the MACs
  speed-up that ``trp`` reached (same layers, same MACs within the solver's tolerance).
* ``posthoc+ft``: that, fine-tuned for ``ft_steps`` more steps (cosine from ``ft_lr``).

Both ``dense`` and ``trp`` start from the same initial weights (the seed) and see the same batches.

Example:
    >>> from torch import nn
    >>> linear_filter(True)(nn.Linear(2, 2), "head"), linear_filter(False)(nn.Linear(2, 2), "lm_head")
    (True, False)
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

import trp
from benchmarks.transformer_tasks import Task

__all__ = ["HEADS", "Recipe", "linear_filter", "train", "describe", "run_seed"]

HEADS = ("heads.head", "lm_head")  # the classifier of the ViT and the output layer of the GPT
Log = Callable[[str], None]


@dataclass(frozen=True)
class Recipe:
    """Training settings of one task (chosen before any run; see TRANSFORMERS.md)."""

    steps: int
    lr: float
    warmup: int
    ft_steps: int
    ft_lr: float
    speedup: float = 2.0
    nuclear: float = 3e-4
    period: int = 20
    ramp: float = 0.4  # fraction of the steps over which the MACs target ramps from 1x to `speedup`
    freeze: float = 0.7  # fraction of the steps after which TRP's ranks stay fixed
    head: bool = True  # the classifier / lm-head among TRP's layers
    weight_decay: float = 0.05


def linear_filter(head: bool) -> Callable[[nn.Module, str], bool]:
    """Every ``nn.Linear``; the output layer only if ``head``."""
    return lambda module, name: isinstance(module, nn.Linear) and (head or name not in HEADS)


def train(model: nn.Module, task: Task, steps: int, lr: float, warmup: int, seed: int, weight_decay: float,
          reg: trp.TRP | None = None, log: Log | None = None, label: str = "") -> dict:
    """Train ``model`` in place for ``steps`` AdamW steps on ``task.stream(seed)``; returns timings."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    warm = max(1, warmup)
    # linear warm-up, then cosine to zero (Loshchilov & Hutter 2017)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1.0 + math.cos(math.pi * min(s, steps) / steps)))
    handle = reg.attach(opt) if reg is not None else None
    stream = task.stream(seed)
    model.train()
    start, running = time.perf_counter(), 0.0
    for step in range(steps):
        x, y = next(stream)
        loss = task.loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()  # TRP's hooks: sub-gradient before, projection after
        sched.step()
        running = 0.98 * running + 0.02 * float(loss.detach()) if step else float(loss.detach())
        if log is not None and ((step + 1) % max(1, steps // 5) == 0 or step + 1 == steps):
            extra = f", TRP {reg.current_speedup() or 0:.2f}x target" if reg is not None else ""
            log(f"{label} step {step + 1}/{steps} train loss {running:.4f}{extra} ({time.perf_counter() - start:.0f}s)")
    if handle is not None:
        handle.remove()
    return {"steps": steps, "train_time_s": round(time.perf_counter() - start, 2), "train_loss_ema": round(running, 4)}


def _evaluate(model: nn.Module, task: Task) -> dict:
    return {split: task.evaluate(model, split) for split in task.splits}


def describe(model: nn.Module, task: Task, plan: trp.Plan | None, dense_macs: int) -> dict:
    """MACs (``trp.profile``), parameters and the plan's per-layer ranks of a final model."""
    prof = trp.profile(model, task.input_shape)
    out = {"macs": prof.macs, "params": prof.params, "macs_speedup": dense_macs / prof.macs}
    if plan is not None:
        out["ranks"] = {lp.name: [lp.rank if lp.decomposed else None, lp.full_rank] for lp in plan.layers
                        if lp.full_rank is not None}
        out["dense_layers"] = {lp.name: lp.reason for lp in plan.layers if not lp.decomposed}
        out["criterion"] = plan.criterion
    return out


def _save(model: nn.Module, folder: Path | None, plan: trp.Plan | None, task: Task) -> None:
    if folder is not None:
        trp.save(model, folder, plan=plan, input_shape=task.input_shape)


def _trp_model(task: Task, recipe: Recipe, seed: int, log: Log | None) -> tuple[nn.Module, trp.TRP, dict]:
    torch.manual_seed(seed)
    model = task.build()
    reg = trp.TRP(model, "linear", speedup=trp.ramp(recipe.speedup, max(1, round(recipe.ramp * recipe.steps))),
                  freeze=round(recipe.freeze * recipe.steps), period=recipe.period, nuclear=recipe.nuclear,
                  filter_fn=linear_filter(recipe.head), input_shape=task.input_shape)
    timing = train(model, task, recipe.steps, recipe.lr, recipe.warmup, seed, recipe.weight_decay, reg, log, "trp")
    timing["layers"] = [layer.name for layer in reg.layers]
    return model, reg, timing


def run_seed(task: Task, recipe: Recipe, seed: int, save_dir: Path | None = None, log: Log | None = None) -> dict:
    """Every method for one seed; models are saved (``trp.save``) under ``save_dir`` when given."""
    torch.manual_seed(seed)
    dense = task.build()
    dense_macs = trp.profile(dense, task.input_shape).macs
    timing = train(dense, task, recipe.steps, recipe.lr, recipe.warmup, seed, recipe.weight_decay, None, log, "dense")
    scores = _evaluate(dense, task)
    out = {"dense": {**timing, "trained": scores, "final": scores, **describe(dense, task, None, dense_macs)}}
    _save(dense, save_dir and save_dir / "dense", None, task)

    model, reg, timing = _trp_model(task, recipe, seed, log)
    trained = _evaluate(model, task)
    reg.project_now()  # the last projection: the weights are now exactly rank k
    projected = _evaluate(model, task)
    plan = trp.plan(model, "linear", reg.ranks(), linear_filter(recipe.head), task.input_shape)
    trp.decompose_(model, plan)
    final = _evaluate(model, task)
    out["trp"] = {**timing, "trained": trained, "projected": projected, "final": final,
                  **describe(model, task, plan, dense_macs)}
    _save(model, save_dir and save_dir / "trp", plan, task)
    if log is not None:
        log(f"trp: {out['trp']['macs_speedup']:.2f}x MACs, {task.score} trained {trained[task.splits[0]][task.score]:.4f}"
            f" -> decomposed {final[task.splits[0]][task.score]:.4f}")

    target = out["trp"]["macs_speedup"]
    posthoc = copy.deepcopy(dense)
    ph_plan = trp.plan(posthoc, "linear", trp.speedup(target), linear_filter(recipe.head), task.input_shape)
    trp.decompose_(posthoc, ph_plan)
    out["posthoc"] = {"trained": scores, "final": _evaluate(posthoc, task), **describe(posthoc, task, ph_plan, dense_macs)}
    _save(posthoc, save_dir and save_dir / "posthoc", ph_plan, task)
    timing = train(posthoc, task, recipe.ft_steps, recipe.ft_lr, 0, seed + 1000, recipe.weight_decay, None, log,
                   "posthoc+ft")
    out["posthoc+ft"] = {**timing, "trained": scores, "final": _evaluate(posthoc, task),
                         **describe(posthoc, task, ph_plan, dense_macs)}
    _save(posthoc, save_dir and save_dir / "posthoc_ft", ph_plan, task)
    out["recipe"] = asdict(recipe)
    return out
