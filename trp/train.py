"""The training run behind ``trp train``: a short straight loop, checkpointed after every epoch.

The loop is the same for every method: the steps of an epoch are :class:`trp.loop.Loop`'s (also
what ``trp compress --finetune`` trains with), and what a method adds (TRP's projection and
sub-gradient, SVD training's factors and losses) is a strategy object of :mod:`trp.methods`.
:func:`train` reads as the run it makes: check the folder, build data, model, method and optimizer,
take the folder, then per epoch train, finish (the last one), evaluate, checkpoint.

A run folder holds ``config.json``, ``metrics.csv`` and ``checkpoint.safetensors`` (model,
optimizer and method state after the last completed epoch, written atomically). ``--resume``
continues from it; with the per-epoch seeded data order the resumed run reproduces the
uninterrupted one. What a run folder guarantees (see :mod:`trp.runs`):

* One writer: a run holds ``.trp.lock`` (``fcntl.flock``, released by the kernel when the process
  dies, even by SIGKILL); a second process on the same folder stops with the holder's pid.
* Nothing mixed: ``--overwrite`` removes every file an earlier run or compression left (checkpoint,
  metrics, compressed model, plan, reports) and the temporaries a killed write left, before
  anything new is written; a plain rerun of a run that stopped before its first epoch ended
  starts it again.
* ``--resume`` refuses settings that contradict the saved run, except :data:`RESUMABLE` ones
  (train longer, move device or data), and records each change in the run (``changes`` in
  ``config.json`` and in the checkpoint).

A run may start from trained weights (``init``, :mod:`trp.weights`), learn from a teacher
(``teacher``, :mod:`trp.distill`: the loop's loss becomes the distillation loss) and hold out a
validation split (``val_split``, :mod:`trp.data.split`): then every epoch is evaluated on the
validation split and the test split once, after the last epoch (``final_test`` in ``config.json``).
``config.json`` and the checkpoint record both sources with their SHA-256; a resumed run reloads the
teacher and refuses a different file. :class:`TrainConfig` lives in :mod:`trp.config`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import time
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor, nn

from trp import checkpoint as ckpt
from trp import methods, models
from trp.config import METHODS, RESUMABLE, TrainConfig, load_config_file
from trp.data import load as load_data
from trp.data.split import hold_out
from trp.dist import any_rank, broadcast_buffers, rank_and_world, replicas_identical
from trp.distill import Teacher
from trp.errors import TRPError
from trp.io import atomic_write_text, remove_stale_temps
from trp.loop import (EpochStats, Loop, StopRequest, cosine_lr, evaluate, make_optimizer, recalibrate_bn,
                      resolve_device, seed_everything)
from trp.runs import check_free, check_writable, clear_run, contents, locked
from trp.structure import ModelSpec
from trp.validate import whole
from trp.weights import Weights, build_teacher, init_model, init_weights_, read_weights

__all__ = ["TrainConfig", "METHODS", "RESUMABLE", "train", "lr_at", "load_config_file"]

def lr_at(config: TrainConfig, epoch: int, step: int, steps_per_epoch: int) -> float:
    """Learning rate at a given step: cosine over the run, or ×0.1 at each ``lr_steps`` epoch.

    Example:
        >>> c = TrainConfig(epochs=10, lr=0.1, schedule="step", lr_steps=(5,))
        >>> lr_at(c, 4, 0, 10), round(lr_at(c, 5, 0, 10), 4)
        (0.1, 0.01)
    """
    if config.schedule == "step":
        return config.lr * 0.1 ** sum(epoch >= s for s in config.lr_steps)
    return cosine_lr(config.lr, epoch * steps_per_epoch + step, config.epochs * steps_per_epoch)


def _folder_config(out: Path) -> TrainConfig | None:
    with contextlib.suppress(ValueError, OSError, TRPError, KeyError, TypeError):
        return TrainConfig.from_dict(json.loads((out / "config.json").read_text())["config"])
    return None


def _check_out(out: Path, config: TrainConfig, overwrite: bool) -> None:
    """Read-only: may a new run start in ``out``?"""
    if out.exists() and not out.is_dir():
        raise TRPError(f"output {out} exists and is not a folder")
    check_writable(out)
    names = contents(out)
    if not names or overwrite:
        return
    same = _folder_config(out) == config
    if same and ckpt.CHECKPOINT_FILE in names:
        raise TRPError(f"{out} already holds this run; continue it with --resume {out}, or pass --overwrite")
    if same and names == {"config.json"}:
        return  # the same run, stopped before its first epoch ended: nothing to lose, it starts again
    raise TRPError(f"{out} already holds a different run or other files; choose another --out or pass --overwrite")


@dataclass
class _Saved:
    tensors: dict[str, Tensor]
    meta: dict
    epoch: int
    changes: list[dict]  # every change of settings on resume, this one last
    changed: dict[str, list]  # this resume's: {name: [saved, now]}


def _jsonable(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def _resume_state(out: Path, config: TrainConfig | None, overwrite: bool,
                  changes: Mapping[str, Any]) -> tuple[TrainConfig, _Saved]:
    """The saved run's state and the config to continue with; contradicting settings are refused."""
    if overwrite:
        raise TRPError("--resume continues the run in its folder and --overwrite would replace it; pass one of them")
    file = out / ckpt.CHECKPOINT_FILE
    if not file.is_file():
        hint = ""
        if (out / "config.json").is_file():
            hint = (": it stopped before its first epoch ended, so there is nothing to resume; start it again with "
                    f"trp train --config {out / 'config.json'} --out {out}")
        raise TRPError(f"cannot resume: {out} holds no {ckpt.CHECKPOINT_FILE}{hint}")
    tensors, meta = ckpt.read_safetensors(file)
    try:
        saved = TrainConfig.from_dict(meta["config"])
        epoch = whole(meta["epoch"], "the checkpoint's epoch", low=0)
    except KeyError:
        raise TRPError(f"{file} is not a training checkpoint") from None
    wanted = TrainConfig.from_dict({**(config or saved).to_dict(), **changes})
    diff = {f.name: (getattr(saved, f.name), getattr(wanted, f.name)) for f in fields(TrainConfig)
            if getattr(saved, f.name) != getattr(wanted, f.name)}
    refused = [f"{key.replace('_', '-')} {_jsonable(new)!r} (the run was trained with {_jsonable(old)!r})"
               for key, (old, new) in diff.items() if key not in RESUMABLE]
    if refused:
        raise TRPError(f"cannot resume {out} with {', '.join(refused)}; --resume may change only "
                       f"{', '.join(RESUMABLE)} (start a new run for other settings)")
    if wanted.epochs < epoch:
        raise TRPError(f"cannot resume {out} with epochs {wanted.epochs}: it has done {epoch} epochs already")
    changed = {k: [_jsonable(o), _jsonable(n)] for k, (o, n) in diff.items()}
    history = list(meta.get("changes") or []) + ([{"after_epoch": epoch, "changed": changed}] if changed else [])
    return wanted, _Saved(tensors, meta, epoch, history, changed)


@contextlib.contextmanager
def _claimed(out: Path, config: TrainConfig, resume: bool, overwrite: bool, rank: int,
             device: torch.device) -> Iterator[None]:
    """Rank 0 locks the folder and, for a new run, checks it again (no other process can write
    now) and clears what an earlier run left; every rank learns whether that worked."""
    with contextlib.ExitStack() as stack:
        error: TRPError | None = None
        if rank == 0:
            try:
                stack.enter_context(locked(out))
                if not resume:
                    _check_out(out, config, overwrite)
                    clear_run(out)
                else:
                    remove_stale_temps(out, before=math.inf)  # we hold the lock: every temporary is stale
            except TRPError as err:
                error = err
        if any_rank(error is not None, device):
            raise error or TRPError(f"rank 0 could not take {out}; its message says why")
        yield


# epoch_time_s: the epoch's training steps; finish_time_s: the one-off end of training that follows the
# last epoch's steps (TRP's final projection and BatchNorm recalibration), 0 elsewhere.
# With a validation split (val_split > 0) every epoch reports val_loss / val_acc and only the last one
# test_loss / test_acc: the test split is evaluated once, at the end.
METRIC_FIELDS = ["epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "epoch_time_s", "finish_time_s",
                 "mean_rank", "val_loss", "val_acc"]


def _metrics_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


@dataclass
class _Run:
    """One run's moving parts, so that the loop below reads as the steps it takes."""

    out: Path
    config: TrainConfig
    spec: ModelSpec
    loop: Loop
    device: torch.device
    rows: list[dict]
    changes: list[dict]
    log: Callable[[str], None]
    progress: bool
    sources: dict[str, dict | None]  # where the weights started ("init") and the teacher, with SHA-256s
    final_test: dict | None = None  # the one test evaluation at the end of the run


def _create(config: TrainConfig, data: Any) -> tuple[nn.Module, dict]:
    """A fresh instance of the run's architecture for ``data`` (the global RNG seeds its weights)."""
    kwargs = models.portable_kwargs(config.model, config.model_kwargs)  # hf: the config file's content
    return models.create(config.model, num_classes=data.num_classes, in_channels=data.input_shape[0], **kwargs), kwargs


def _build(config: TrainConfig, data: Any, method: methods.Method, device: torch.device,
           world: int, init: Weights | None) -> tuple[nn.Module, ModelSpec]:
    """The run's model (seeded init or ``init``'s weights, prepared for its method) and its spec."""
    c, h, w = data.input_shape
    torch.manual_seed(config.seed)
    if init is not None and init.structured:  # a decomposed (or otherwise transformed) model trains as it is
        if config.method != "baseline":
            raise TRPError(f"--init {init.source} is a transformed model ({', '.join(init.record()['transforms'])}); "
                           "it fine-tunes with --method baseline only")
        model, spec = init_model(init, config.model, data.num_classes, [c, h, w])
        return model.to(device), spec
    model, kwargs = _create(config, data)
    if init is not None:  # before the method's prepare: SVD training factors the trained weights
        init_weights_(model, init)
    model = method.prepare(model.to(device), data, data.num_train_batches(config.batch_size, world))
    spec = ModelSpec(config.model, data.num_classes, c, [c, h, w], dataset=config.dataset, kwargs=kwargs)
    structure = method.structure()
    return model, spec.then(structure) if structure else spec


def _restore(model: nn.Module, optimizer: torch.optim.Optimizer, method: methods.Method, saved: _Saved, out: Path,
             config: TrainConfig) -> list[dict]:
    spec = saved.meta.get("model")
    if not isinstance(spec, dict) or spec.get("arch") != config.model:
        raise TRPError(f"{out} was trained with another architecture")
    ckpt.load_weights(model, ckpt.strip_prefix(ckpt.MODEL_PREFIX, saved.tensors), out)
    ckpt.check_finite(model)
    if not isinstance(saved.meta.get("optimizer"), dict):
        raise TRPError(f"{out / ckpt.CHECKPOINT_FILE} is not a training checkpoint (no optimizer state)")
    ckpt.optimizer_from_tensors(optimizer, saved.tensors, saved.meta["optimizer"])
    method.load_state_dict(saved.tensors, saved.meta)
    return list(saved.meta.get("metrics") or [])


def _write_config(run: _Run, world: int) -> None:
    c = run.config
    doc = {"config": c.to_dict(), "world_size": world, "per_rank_batch": c.batch_size, "global_batch": c.batch_size * world,
           "device": str(run.device), "torch": torch.__version__, "changes": run.changes, **run.sources}
    if run.final_test is not None:
        doc["final_test"] = run.final_test
    atomic_write_text(run.out / "config.json", json.dumps(doc, indent=1))


def _save_checkpoint(run: _Run, epoch: int) -> None:
    loop = run.loop
    opt_tensors, opt_doc = ckpt.optimizer_to_tensors(loop.optimizer)
    method_tensors, method_meta = loop.method.state_dict()
    tensors = {**ckpt.with_prefix(ckpt.MODEL_PREFIX, loop.model.state_dict()), **opt_tensors, **method_tensors}
    meta = {"model": run.spec.to_dict(), "config": run.config.to_dict(), "epoch": epoch, "optimizer": opt_doc,
            "metrics": run.rows, "rank_history": [], **method_meta, "changes": run.changes, "sources": run.sources,
            "final_test": run.final_test}
    # One file holds the whole state, written atomically: never a model of one epoch with the
    # optimizer of another. metrics.csv is a convenience copy written after it.
    ckpt.write_safetensors(run.out / ckpt.CHECKPOINT_FILE, tensors, meta)
    atomic_write_text(run.out / "metrics.csv", _metrics_csv(run.rows))


def _epoch_row(run: _Run, epoch: int, stats: EpochStats, finish_time: float) -> dict:
    loop = run.loop
    if not torch.isfinite(stats.loss_sum):
        raise TRPError(f"training diverged in epoch {epoch + 1} (loss is not finite); try a lower --lr")
    if loop.world > 1:  # training metrics over every rank's samples, not only rank 0's
        broadcast_buffers(loop.model)
        sums = torch.stack([stats.loss_sum, stats.correct,
                            torch.tensor(float(stats.seen), dtype=torch.float64, device=run.device)])
        torch.distributed.all_reduce(sums)
        stats = EpochStats(sums[0], sums[1], int(sums[2]), stats.lr, stats.seconds)
    held_out = run.config.val_split > 0  # then the test split waits for the end of the run
    acc, loss = evaluate(loop.model, loop.data, amp=run.config.amp, split="val" if held_out else "test")
    scores = {"val_loss": round(loss, 6), "val_acc": round(acc, 4), "test_loss": "", "test_acc": ""} if held_out \
        else {"test_loss": round(loss, 6), "test_acc": round(acc, 4), "val_loss": "", "val_acc": ""}
    return {"epoch": epoch + 1, "lr": round(stats.lr, 8), "train_loss": round(stats.loss, 6),
            "train_acc": round(stats.acc, 4), **scores, "epoch_time_s": round(stats.seconds, 4),
            "finish_time_s": round(finish_time, 4), **loop.method.summary(loop.model)}


def _final_test(run: _Run, row: dict) -> None:
    """The one evaluation of the test split, after the last epoch: into the row, config.json and checkpoint."""
    if run.config.val_split > 0:
        acc, loss = evaluate(run.loop.model, run.loop.data, amp=run.config.amp, split="test")
        row.update(test_loss=round(loss, 6), test_acc=round(acc, 4))
    run.final_test = {"epoch": row["epoch"], "test_acc": row["test_acc"], "test_loss": row["test_loss"],
                      "test_images": run.loop.data.num_test, "val_acc": row["val_acc"], "val_loss": row["val_loss"]}


def _kept(out: Path, epoch: int) -> str:
    return f"{out} keeps the state after epoch {epoch}" if epoch else "no epoch was completed, so nothing is saved"


def _run_epochs(run: _Run, start: int, stop: StopRequest, stop_after_epoch: int | None) -> bool:
    """Train from epoch ``start`` to the end, saving after each epoch; True if stopped early."""
    loop, config, world = run.loop, run.config, run.loop.world
    requested = lambda: any_rank(stop.requested, run.device)  # noqa: E731
    for epoch in range(start, config.epochs):
        if requested():  # Ctrl-C came during the last evaluation or write
            run.log(f"interrupted; {_kept(run.out, epoch)}")
            return True
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            return True
        bar = f"epoch {epoch + 1}/{config.epochs}" if run.progress and loop.rank == 0 else None
        stats = loop.epoch(epoch, lambda step: lr_at(config, epoch, step, loop.steps_per_epoch), stop=requested, bar=bar)
        if stats.halted:
            run.log(f"interrupted during epoch {epoch + 1}; {_kept(run.out, epoch)}")
            return True
        # An epoch's time is its steps; the one-off end of training is timed on its own (finish_time_s),
        # so that per-epoch costs compare like with like across methods.
        t0 = time.perf_counter()
        if epoch == config.epochs - 1 and loop.method.finish():
            # The weights moved under BatchNorm's running statistics, which no step follows to
            # re-estimate, so they are recomputed for the final weights.
            recalibrate_bn(loop.net, loop.data, config.batch_size, epoch, config.seed, loop.rank, world)
        row = _epoch_row(run, epoch, stats, time.perf_counter() - t0)
        last = epoch == config.epochs - 1
        if last:
            _final_test(run, row)
        run.rows.append(row)
        if loop.rank == 0:
            _save_checkpoint(run, epoch + 1)
            if last:
                _write_config(run, world)  # with the final test
            scores = (f"val {row['val_acc']:.2f}%" if row["val_acc"] != "" else "") + \
                (f"  test {row['test_acc']:.2f}%" if row["test_acc"] != "" else "")
            run.log(f"epoch {epoch + 1:>3}/{config.epochs}  loss {row['train_loss']:.4f}  train {row['train_acc']:.2f}%  "
                    f"{scores.strip()}  {stats.seconds:.1f}s"
                    + (f"  mean rank {row['mean_rank']}" if row.get("mean_rank") != "" else ""))
    return False


def _data(config: TrainConfig, device: torch.device) -> Any:
    """The run's data on ``device``, with its validation split held out (the same on every rank)."""
    data = load_data(config.dataset, config.data_dir, config.download, config.skip_bad_images)
    return (hold_out(data, config.val_split, config.seed) if config.val_split > 0 else data).to(device)


def _init(config: TrainConfig, saved: _Saved | None) -> Weights | None:
    """The ``init`` weights of a new run. A resumed run's weights come from its checkpoint, so the source
    is read again only when it gave the run its structure (a decomposed model), and must be unchanged."""
    if config.init is None:
        return None
    recorded = ((saved.meta.get("sources") or {}).get("init") or {}) if saved else {}
    if saved and not recorded.get("transforms"):
        return None
    weights = read_weights(config.init)
    if saved and weights.sha256 != recorded.get("sha256"):
        raise TRPError(f"--init {config.init} changed since the run started (its SHA-256 differs); the run's "
                       "structure came from it")
    return weights


def _teacher(config: TrainConfig, data: Any, device: torch.device,
             saved_sha: str | None) -> tuple[Teacher, dict] | None:
    """The teacher and its record; on resume it must be the file the run started with (same SHA-256)."""
    if config.teacher is None:
        return None
    weights = read_weights(config.teacher)
    if saved_sha is not None and weights.sha256 != saved_sha:
        raise TRPError(f"--teacher {config.teacher} is not the teacher this run was trained with "
                       f"(SHA-256 {weights.sha256[:12]}…, the run's {saved_sha[:12]}…)")
    with torch.random.fork_rng(devices=[]):  # building the teacher leaves the run's random stream alone
        model = build_teacher(weights, lambda: _create(config, data)[0], data.num_classes, device)
    return Teacher(model), weights.record()


def train(
    config: TrainConfig | None,
    out: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    stop_after_epoch: int | None = None,
    changes: Mapping[str, Any] | None = None,
) -> dict:
    """Train (or resume) a run into folder ``out``; returns the run's summary.

    Args:
        config: The run's configuration; with ``resume``, None means the saved one, and a given one
            may differ from it only in :data:`RESUMABLE` settings.
        out: Run folder.
        resume: Continue from ``out/checkpoint.safetensors``.
        overwrite: Replace whatever run ``out`` holds (every file trp wrote there is removed).
        progress: Show a progress bar on a terminal.
        log: Where the per-epoch lines go.
        stop_after_epoch: Stop after this many epochs in total (tests of resuming).
        changes: With ``resume``: settings to change (e.g. ``{"epochs": 40}``), checked like ``config``.

    Example:
        >>> import tempfile
        >>> summary = train(TrainConfig(dataset="digits", epochs=1, batch_size=256), tempfile.mkdtemp(),
        ...                 progress=False, log=lambda s: None)
        >>> 0.0 <= summary["test_acc"] <= 100.0
        True
    """
    out = Path(out)
    rank, world = rank_and_world()
    saved: _Saved | None = None
    if world == 1:
        # A folder another process writes (maybe in its first epoch, no checkpoint yet) is "in use", not a
        # stopped or different run. Under torchrun rank 0's lock in _claimed answers for every rank.
        check_free(out)
    if resume:
        config, saved = _resume_state(out, config, overwrite, changes or {})
    elif not isinstance(config, TrainConfig) or changes:
        raise TRPError("a new run needs a TrainConfig (changes apply to resume=True only)")
    else:
        _check_out(out, config, overwrite)  # read-only, on every rank: no rank is left waiting for a failed one
    if rank == 0:
        for message in config.warnings():
            warnings.warn(message, stacklevel=2)
    device = resolve_device(config.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())  # torchrun: this rank's own GPU
    seed_everything(config.seed, config.deterministic)
    data = _data(config, device)
    method = methods.get(config.method)(config)
    init = _init(config, saved)
    model, spec = _build(config, data, method, device, world, init)
    optimizer = make_optimizer(model, config.lr, config.momentum, config.weight_decay)
    rows = _restore(model, optimizer, method, saved, out, config) if saved else []
    sources = dict(saved.meta.get("sources") or {}) if saved else {"init": init.record() if init else None}
    teacher = _teacher(config, data, device, (sources.get("teacher") or {}).get("sha256") if saved else None)
    sources["teacher"] = teacher[1] if teacher else None
    net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model
    loop = Loop(model, optimizer, data, config.batch_size, config.seed, method, config.amp, net, rank, world,
                teacher[0] if teacher else None, (config.distill_weight, config.distill_temperature))
    run = _Run(out, config, spec, loop, device, rows, saved.changes if saved else [], log, progress, sources,
               saved.meta.get("final_test") if saved else None)
    start = saved.epoch if saved else 0
    wall0 = time.perf_counter()
    with StopRequest() as stop, _claimed(out, config, resume, overwrite, rank, device):
        if rank == 0:
            _write_config(run, world)
            if saved:
                note = ", ".join(f"{k} {o!r} -> {n!r}" for k, (o, n) in saved.changed.items())
                log(f"resuming {out} after epoch {start}/{config.epochs}" + (f" (changed: {note})" if note else ""))
        method.attach(optimizer)
        try:
            stopped = _run_epochs(run, start, stop, stop_after_epoch)
        finally:
            method.detach()
    if not replicas_identical(model):
        raise TRPError("the replicas' weights differ between ranks; the run is not trustworthy")
    final = run.final_test if run.final_test and run.final_test["epoch"] == len(rows) else None
    return {
        "world_size": world, "replicas_identical": True if world > 1 else None,
        "run": str(out), "method": config.method, "scheme": config.scheme, "epochs_done": len(rows),
        "test_acc": rows[-1]["test_acc"] if rows and rows[-1]["test_acc"] != "" else float("nan"),
        "val_acc": rows[-1]["val_acc"] if rows and rows[-1]["val_acc"] != "" else None,
        "final_test_acc": final["test_acc"] if final else None,
        "mean_epoch_time_s": sum(r["epoch_time_s"] for r in rows) / len(rows) if rows else float("nan"),
        "wall_time_s": time.perf_counter() - wall0, "stopped": stopped, "resumed": saved is not None,
        "changed": {k: n for k, (_, n) in saved.changed.items()} if saved else {},  # this resume's new settings
    }
