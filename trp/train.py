"""The training run behind ``trp train``: a straight-line loop, checkpointed after every epoch.

Methods:

* ``baseline``: plain SGD.
* ``trp``: Trained Rank Pruning (projection every ``period`` steps + nuclear-norm sub-gradient,
  :class:`trp.TRP`); ``--nuclear 0`` gives projection alone.
* ``nuclear``: the nuclear-norm sub-gradient alone, no projection (the paper's ablation).
* ``svd``: SVD training (Yang et al., 2020, :mod:`trp.svd_training`).

A run folder holds ``config.json``, ``metrics.csv`` and ``checkpoint.safetensors`` (model,
optimizer and TRP state after the last completed epoch, written atomically). ``--resume`` continues
from it; with the per-epoch seeded data order the resumed run reproduces the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from trp import checkpoint as ckpt
from trp.errors import TRPError
from trp.io import atomic_write_text

__all__ = ["TrainConfig", "METHODS", "train", "evaluate", "lr_at", "recalibrate_bn", "resolve_device", "load_config_file",
           "seed_everything"]

METHODS = ("baseline", "trp", "nuclear", "svd")


def _num(value: Any, name: str, kind: type = float) -> Any:
    try:
        out = kind(value)
    except (TypeError, ValueError):
        raise TRPError(f"{name} must be a number, got {value!r}") from None
    if isinstance(out, float) and not math.isfinite(out):
        raise TRPError(f"{name} must be finite, got {value}")
    if kind is int and float(value) != out:
        raise TRPError(f"{name} must be a whole number, got {value}")
    return out


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run; validated on construction.

    Example:
        >>> TrainConfig(model="resnet20", dataset="digits", epochs=2).method
        'trp'
    """

    model: str = "resnet20"
    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    method: str = "trp"
    scheme: str = "channel"
    energy: float = 0.9
    energy_ramp: float = 0.0  # epochs over which the target tightens from dense to `energy` (or `speedup`)
    speedup: float | None = None  # TRP ranks for this whole-model MACs speed-up instead of `energy`
    freeze: float | None = None  # epochs after which TRP's ranks stay fixed (None: they never do)
    period: int = 20
    nuclear: float = 3e-4
    orth: float = 1.0  # SVD training: orthogonality weight
    sparsity: str = "hoyer:1e-3"  # SVD training: KIND:WEIGHT
    epochs: int = 30
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 128
    schedule: str = "cosine"  # or "step"
    lr_steps: tuple[int, ...] = ()  # epochs where a step schedule multiplies lr by 0.1
    seed: int = 0
    device: str = "auto"
    amp: bool = False
    deterministic: bool = True

    def __post_init__(self) -> None:
        from trp.data import DATASETS
        from trp.models import names

        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        if self.model not in names():
            raise TRPError(f"unknown model {self.model!r}; choose one of: {', '.join(names())}")
        if self.dataset not in DATASETS:
            raise TRPError(f"unknown dataset {self.dataset!r}; choose one of: {', '.join(DATASETS)}")
        if self.method not in METHODS:
            raise TRPError(f"unknown method {self.method!r}; choose one of: {', '.join(METHODS)}")
        schemes = ("channel", "spatial") if self.method == "svd" else ("channel", "spatial", "decouple")
        if self.scheme not in schemes:
            raise TRPError(f"unknown scheme {self.scheme!r} for method {self.method}; choose one of: {', '.join(schemes)}")
        for name in ("energy", "energy_ramp", "nuclear", "orth", "lr", "momentum", "weight_decay"):
            set_(name, _num(getattr(self, name), name.replace("_", "-")))
        for name in ("period", "epochs", "batch_size", "seed"):
            set_(name, _num(getattr(self, name), name.replace("_", "-"), int))
        if not 0.0 < self.energy <= 1.0:
            raise TRPError(f"energy must be in (0, 1], got {self.energy}")
        if self.speedup is not None:
            set_("speedup", _num(self.speedup, "speedup"))
            if self.speedup < 1.0:
                raise TRPError(f"speedup must be >= 1, got {self.speedup}")
        if self.freeze is not None:
            set_("freeze", _num(self.freeze, "freeze"))
            if self.freeze < 0:
                raise TRPError(f"freeze must be >= 0, got {self.freeze}")
        if (self.speedup is not None or self.freeze is not None) and self.method not in ("trp", "nuclear"):
            raise TRPError(f"speedup and freeze shape TRP's ranks; method {self.method} has none (use trp or nuclear)")
        if self.period < 1:
            raise TRPError(f"period must be >= 1, got {self.period}")
        if self.epochs < 1:
            raise TRPError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise TRPError(f"batch-size must be >= 1, got {self.batch_size}")
        for name in ("nuclear", "orth", "weight_decay", "momentum", "energy_ramp"):
            if getattr(self, name) < 0:
                raise TRPError(f"{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise TRPError(f"lr must be > 0, got {self.lr}")
        if self.schedule not in ("cosine", "step"):
            raise TRPError(f"schedule must be cosine or step, got {self.schedule!r}")
        set_("lr_steps", tuple(_num(s, "lr-steps", int) for s in self.lr_steps))
        if self.method == "nuclear" and self.nuclear == 0:
            raise TRPError("method nuclear needs --nuclear > 0")
        if self.method == "svd":
            from trp.svd_training import parse_sparsity

            parse_sparsity(self.sparsity)
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError:
                raise TRPError(f"unknown device {self.device!r}") from None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lr_steps"] = list(self.lr_steps)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TRPError(f"unknown config key {unknown[0]!r}")
        d = dict(d)
        if "lr_steps" in d:
            d["lr_steps"] = tuple(d["lr_steps"])
        return cls(**d)


def load_config_file(path: str | Path) -> dict:
    """Read a JSON recipe (e.g. ``configs/resnet20_cifar10_trp.json``) as a dict of config keys.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "c.json"); _ = open(p, "w").write('{"epochs": 3}')
        >>> load_config_file(p)
        {'epochs': 3}
    """
    try:
        d = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise TRPError(f"no such config file: {path}") from None
    except (OSError, ValueError) as err:
        raise TRPError(f"cannot read config file {path}: {err}") from None
    if not isinstance(d, dict):
        raise TRPError(f"config file {path} must hold a JSON object")
    return {k.replace("-", "_"): v for k, v in d.items() if not k.startswith("_")}


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when there is one, else CPU.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TRPError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TRPError("device cuda was asked for, but no CUDA device is available")
    return device


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed torch; in deterministic mode also ask for deterministic kernels.

    Example:
        >>> seed_everything(0, False)
    """
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def lr_at(config: TrainConfig, epoch: int, step: int, steps_per_epoch: int) -> float:
    """Learning rate at a given step: cosine over the run, or ×0.1 at each ``lr_steps`` epoch.

    Example:
        >>> c = TrainConfig(epochs=10, lr=0.1, schedule="step", lr_steps=(5,))
        >>> lr_at(c, 4, 0, 10), round(lr_at(c, 5, 0, 10), 4)
        (0.1, 0.01)
    """
    if config.schedule == "step":
        return config.lr * 0.1 ** sum(epoch >= s for s in config.lr_steps)
    t = (epoch * steps_per_epoch + step) / max(1, config.epochs * steps_per_epoch)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * t))


def _dist() -> tuple[int, int]:
    from trp.dist import rank_and_world

    return rank_and_world()


@torch.no_grad()
def evaluate(model: nn.Module, data: Any, batch_size: int = 500, amp: bool = False) -> tuple[float, float]:
    """Test accuracy (%) and mean loss; under torch.distributed, exact totals over all ranks.

    Example:
        >>> from trp.data import load
        >>> from trp.models import create
        >>> acc, loss = evaluate(create("resnet20", in_channels=1), load("digits"))
        >>> 0.0 <= acc <= 100.0
        True
    """
    rank, world = _dist()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # correct, loss sum, count
    for x, y in data.test_batches(batch_size, rank=rank, world_size=world):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with _autocast(device, amp):
            out = model(x)
        totals[0] += (out.argmax(1) == y).sum()
        totals[1] += F.cross_entropy(out.float(), y, reduction="sum")
        totals[2] += y.numel()
    if world > 1:
        torch.distributed.all_reduce(totals)
    model.train(was_training)
    n = max(float(totals[2]), 1.0)
    return 100.0 * float(totals[0]) / n, float(totals[1]) / n


def _autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)


# epoch_time_s: the epoch's training steps; finish_time_s: the one-off end of training that follows the
# last epoch's steps (TRP's final projection and BatchNorm recalibration), 0 elsewhere.
METRIC_FIELDS = ["epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "epoch_time_s", "finish_time_s",
                 "mean_rank"]


def _metrics_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


class _StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM: finish the current step, save what is complete, then stop."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_StopRequest":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _progress(iterable: Iterator, total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, disable=None)


def build_for(config: TrainConfig, data: Any) -> tuple[nn.Module, ckpt.ModelSpec]:
    """The run's model (seeded init; SVD-parametrized for method ``svd``) and its spec.

    Example:
        >>> from trp.data import load
        >>> model, spec = build_for(TrainConfig(dataset="digits"), load("digits"))
        >>> spec.input_shape
        [1, 8, 8]
    """
    from trp.models import create

    c, h, w = data.input_shape
    torch.manual_seed(config.seed)
    model = create(config.model, num_classes=data.num_classes, in_channels=c)
    spec = ckpt.ModelSpec(config.model, data.num_classes, c, [c, h, w], dataset=config.dataset)
    if config.method == "svd":
        from trp.svd_training import svd_parametrize_

        svd_parametrize_(model, config.scheme)
        spec.svd_scheme = config.scheme
    return model, spec


def _prepare_out(out: Path, config: TrainConfig, resume: bool, overwrite: bool) -> None:
    cfg_file = out / "config.json"
    if resume:
        if not (out / ckpt.CHECKPOINT_FILE).is_file():
            raise TRPError(f"cannot resume: {out} holds no {ckpt.CHECKPOINT_FILE}")
        return
    if out.exists() and not out.is_dir():
        raise TRPError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        same = False
        if cfg_file.is_file():
            with contextlib.suppress(ValueError, OSError, TRPError):
                same = TrainConfig.from_dict(json.loads(cfg_file.read_text())["config"]) == config
        if same and (out / ckpt.CHECKPOINT_FILE).is_file():
            raise TRPError(f"{out} already holds this run; continue it with --resume {out}, or pass --overwrite")
        raise TRPError(f"{out} already holds a different run or other files; choose another --out or pass --overwrite")


def train(
    config: TrainConfig,
    out: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    stop_after_epoch: int | None = None,
) -> dict:
    """Train (or resume) a run into folder ``out``; returns the run's summary.

    Args:
        config: The run's configuration.
        out: Run folder.
        resume: Continue from ``out/checkpoint.safetensors`` (the saved config wins).
        overwrite: Allow ``out`` to hold another run.
        progress: Show a progress bar on a terminal.
        log: Where the per-epoch lines go.
        stop_after_epoch: Stop after this many epochs in total (tests of resuming).

    Example:
        >>> import tempfile
        >>> summary = train(TrainConfig(dataset="digits", epochs=1, batch_size=256), tempfile.mkdtemp(),
        ...                 progress=False, log=lambda s: None)
        >>> 0.0 <= summary["test_acc"] <= 100.0
        True
    """
    from trp.data import load as load_data
    from trp.hook import TRP, default_filter, ramp

    out = Path(out)
    rank, world = _dist()
    state_meta: dict = {}
    tensors: dict = {}
    if resume:
        _prepare_out(out, config, True, overwrite)
        tensors, state_meta = ckpt.read_safetensors(out / ckpt.CHECKPOINT_FILE)
        try:
            config = TrainConfig.from_dict(state_meta["config"])
        except KeyError:
            raise TRPError(f"{out / ckpt.CHECKPOINT_FILE} is not a training checkpoint") from None
    else:  # read-only checks, on every rank so that no rank is left waiting for one that failed
        _prepare_out(out, config, False, overwrite)
    device = resolve_device(config.device)
    if world > 1 and device.type == "cuda" and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())  # torchrun: this rank's own GPU
    seed_everything(config.seed, config.deterministic)
    data = load_data(config.dataset, config.data_dir, config.download).to(device)
    model, spec = build_for(config, data)
    model.to(device)
    if resume and state_meta.get("model", {}).get("arch") != config.model:
        raise TRPError(f"{out} was trained with another architecture")

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        # Weight decay on BN and biases only fights the normalization; as in most CIFAR recipes.
        (no_decay if p.ndim <= 1 else decay).append(p)
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0,
    )
    steps_per_epoch = data.num_train_batches(config.batch_size, world)
    reg = None
    if config.method in ("trp", "nuclear"):
        energy, speedup = config.energy, config.speedup
        if config.energy_ramp > 0:
            ramp_steps = int(round(config.energy_ramp * steps_per_epoch))
            energy = ramp(config.energy, ramp_steps)
            speedup = ramp(config.speedup, ramp_steps) if config.speedup is not None else None
        freeze = None if config.freeze is None else int(round(config.freeze * steps_per_epoch))
        reg = TRP(model, config.scheme, energy, config.period, config.nuclear, filter_fn=default_filter(model),
                  project=config.method == "trp", speedup=speedup, freeze=freeze, input_shape=data.input_shape)
    svd_cfg = None
    if config.method == "svd":
        from trp.svd_training import SVDTrainingConfig, parse_sparsity, regularization

        kind, weight = parse_sparsity(config.sparsity)
        svd_cfg = SVDTrainingConfig(orth=config.orth, sparsity_kind=kind, sparsity=weight, scheme=config.scheme)

    start_epoch, rows, history = 0, [], []
    if resume:
        ckpt.load_weights(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, out)
        ckpt.check_finite(model)
        ckpt.optimizer_from_tensors(optimizer, tensors, state_meta["optimizer"])
        if reg is not None:
            reg.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("trp.")})
            reg.history = [(s, r) for s, r in state_meta.get("rank_history", [])]
        start_epoch = int(state_meta["epoch"])
        rows = state_meta.get("metrics", [])
    ddp_model: nn.Module = model
    if world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp and device.type == "cuda")

    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if not resume:  # --overwrite: a run stopped before its first epoch must not resume into the old one
            for stale in (ckpt.CHECKPOINT_FILE, "metrics.csv"):
                (out / stale).unlink(missing_ok=True)
        cfg_doc = {"config": config.to_dict(), "world_size": world, "per_rank_batch": config.batch_size,
                   "global_batch": config.batch_size * world, "device": str(device), "torch": torch.__version__}
        atomic_write_text(out / "config.json", json.dumps(cfg_doc, indent=1))
        if start_epoch:
            log(f"resuming {out} after epoch {start_epoch}/{config.epochs}")

    wall0 = time.perf_counter()
    stopped = False
    with _StopRequest() as stop:
        for epoch in range(start_epoch, config.epochs):
            if _agreed(stop.requested, world, device):  # Ctrl-C came during the last evaluation or write
                stopped = True
                log(f"interrupted; {out} keeps the state after epoch {epoch}")
                break
            if stop_after_epoch is not None and epoch >= stop_after_epoch:
                stopped = True
                break
            ddp_model.train()
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            correct = torch.zeros((), dtype=torch.float64, device=device)
            seen = 0
            batches = data.train_batches(config.batch_size, epoch, config.seed, rank=rank, world_size=world)
            lr = config.lr
            bar = _progress(batches, steps_per_epoch, f"epoch {epoch + 1}/{config.epochs}", progress and rank == 0)
            for step, (x, y) in enumerate(bar):
                lr = lr_at(config, epoch, step, steps_per_epoch)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with _autocast(device, config.amp):
                    logits = ddp_model(x)
                    loss = F.cross_entropy(logits, y)
                total_loss = loss
                if svd_cfg is not None:
                    total_loss = loss + regularization(model, svd_cfg)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(total_loss).backward()
                scaler.unscale_(optimizer)  # the nuclear sub-gradient is added to true-scale gradients
                if reg is not None:
                    reg.regularize()
                scaler.step(optimizer)
                scaler.update()
                if reg is not None:
                    reg.step()
                loss_sum += loss.detach().double() * y.numel()
                correct += (logits.detach().argmax(1) == y).sum()
                seen += y.numel()
                if step % 10 == 0 and hasattr(bar, "set_postfix"):  # a sync every 10 steps, only on a terminal
                    bar.set_postfix(loss=f"{float(loss_sum) / seen:.3f}", acc=f"{100.0 * float(correct) / seen:.1f}%")
                halt = _agreed(stop.requested, world, device)
                if halt:
                    break
            else:
                halt = False
            # An epoch's time is its steps; the one-off end of training below is timed on its own
            # (finish_time_s), so that per-epoch costs compare like with like across methods.
            epoch_time = time.perf_counter() - t0
            t_finish = time.perf_counter()
            if reg is not None and reg.project and epoch == config.epochs - 1 and not halt:
                # End on a projection: the trained network is then exactly low-rank (TRP's output),
                # and decomposing it with the paper's value threshold loses nothing. The projection
                # moves the weights under BatchNorm's running statistics, which no step follows to
                # re-estimate, so they are recomputed for the projected weights.
                reg.project_now()
                recalibrate_bn(ddp_model, data, config.batch_size, epoch, config.seed, rank, world)
            finish_time = time.perf_counter() - t_finish
            if halt:
                stopped = True
                log(f"interrupted during epoch {epoch + 1}; {out} keeps the state after epoch {epoch}")
                break
            if not torch.isfinite(loss_sum):
                raise TRPError(f"training diverged in epoch {epoch + 1} (loss is not finite); try a lower --lr")
            if world > 1:  # training metrics over every rank's samples, not only rank 0's
                from trp.dist import broadcast_buffers

                broadcast_buffers(model)
                sums = torch.stack([loss_sum, correct, torch.tensor(float(seen), dtype=torch.float64, device=device)])
                torch.distributed.all_reduce(sums)
                loss_sum, correct, seen = sums[0], sums[1], int(sums[2])
            test_acc, test_loss = evaluate(model, data, amp=config.amp)
            ranks = reg.ranks() if reg is not None else _svd_ranks(model) if svd_cfg is not None else {}
            if reg is not None:
                history = reg.history
            row = {
                "epoch": epoch + 1, "lr": round(lr, 8),
                "train_loss": round(float(loss_sum) / max(seen, 1), 6), "train_acc": round(100.0 * float(correct) / max(seen, 1), 4),
                "test_loss": round(test_loss, 6), "test_acc": round(test_acc, 4), "epoch_time_s": round(epoch_time, 4),
                "finish_time_s": round(finish_time, 4),
                "mean_rank": round(sum(ranks.values()) / len(ranks), 3) if ranks else "",
            }
            rows.append(row)
            if rank == 0:
                _save_checkpoint(out, model, spec, optimizer, reg, config, epoch + 1, rows, history)
                log(f"epoch {epoch + 1:>3}/{config.epochs}  loss {row['train_loss']:.4f}  train {row['train_acc']:.2f}%  "
                    f"test {row['test_acc']:.2f}%  {epoch_time:.1f}s" + (f"  mean rank {row['mean_rank']}" if ranks else ""))
    from trp.dist import replicas_identical

    identical = replicas_identical(model)
    if not identical:
        raise TRPError("the replicas' weights differ between ranks; the run is not trustworthy")
    summary = {
        "world_size": world, "replicas_identical": identical if world > 1 else None,
        "run": str(out), "method": config.method, "scheme": config.scheme, "epochs_done": len(rows),
        "test_acc": rows[-1]["test_acc"] if rows else float("nan"),
        "mean_epoch_time_s": sum(r["epoch_time_s"] for r in rows) / len(rows) if rows else float("nan"),
        "wall_time_s": time.perf_counter() - wall0, "stopped": stopped,
    }
    return summary


@torch.no_grad()
def recalibrate_bn(model: nn.Module, data: Any, batch_size: int, epoch: int, seed: int, rank: int = 0,
                   world: int = 1, max_batches: int = 50) -> int:
    """Re-estimate BatchNorm running statistics for the current weights; returns the batches used.

    The statistics are reset and averaged (momentum None) over up to ``max_batches`` training
    batches in train mode without gradients; nothing else changes. The batches come from their own
    seed, so a resumed run recomputes the same statistics.

    Example:
        >>> from trp.data import load
        >>> from trp.models import create
        >>> recalibrate_bn(create("resnet20", in_channels=1), load("digits"), 256, 0, 0)
        6
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    was_training = model.training
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches below
    model.train()
    used = 0
    for x, _ in data.train_batches(batch_size, 1_000_000 + epoch, seed, augment=True, rank=rank, world_size=world):
        model(x)
        used += 1
        if used >= max_batches:
            break
    for bn, m in zip(bns, momenta):
        bn.momentum = m
    model.train(was_training)
    return used


def _agreed(flag: bool, world: int, device: torch.device) -> bool:
    """Under torch.distributed every rank must stop at the same step, or the others would wait
    forever in the next all-reduce: a signal seen by any rank stops all of them."""
    if world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def _svd_ranks(model: nn.Module) -> dict[str, int]:
    from trp.svd_training import ranks

    return {name: k for name, (k, _) in ranks(model).items()}


def _save_checkpoint(out: Path, model: nn.Module, spec: ckpt.ModelSpec, optimizer: torch.optim.Optimizer,
                     reg: Any, config: TrainConfig, epoch: int, rows: list[dict], history: list) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt_tensors, opt_doc = ckpt.optimizer_to_tensors(optimizer)
    tensors.update(opt_tensors)
    if reg is not None:
        tensors.update({f"trp.{k}": v for k, v in reg.state_dict().items()})
    meta = {"model": spec.to_dict(), "config": config.to_dict(), "epoch": epoch, "optimizer": opt_doc,
            "metrics": rows, "rank_history": [[s, r] for s, r in history]}
    # One file holds the whole state, written atomically: never a model of one epoch with the
    # optimizer of another. metrics.csv is a convenience copy written after it.
    ckpt.write_safetensors(out / ckpt.CHECKPOINT_FILE, tensors, meta)
    atomic_write_text(out / "metrics.csv", _metrics_csv(rows))
