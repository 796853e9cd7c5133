"""The training steps every method shares: optimizer, learning-rate schedule, one epoch, evaluation.

:class:`Loop` runs one epoch of plain SGD steps (forward, cross-entropy plus the method's extra
loss, backward through the GradScaler, ``scaler.step``); what a method adds around the step comes
from its strategy object (:mod:`trp.methods`), through the optimizer's step hooks. ``trp train``
(:mod:`trp.train`) and ``trp compress --finetune`` (:mod:`trp.compress`) both train with it, on
the one cosine schedule :func:`cosine_lr`.

Example:
    >>> from trp.data import load
    >>> model, data = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), load("digits")
    >>> loop = Loop(model, make_optimizer(model, 0.05, 0.9, 1e-4), data, 256, seed=0)
    >>> stats = loop.epoch(0, lambda step: cosine_lr(0.05, step, loop.steps_per_epoch))
    >>> acc, loss = evaluate(model, data)
    >>> stats.seen, 0.0 <= acc <= 100.0
    (1437, True)
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trp import methods
from trp.dist import rank_and_world
from trp.distill import Teacher, distill_loss
from trp.errors import TRPError

__all__ = ["Loop", "EpochStats", "make_optimizer", "cosine_lr", "evaluate", "recalibrate_bn", "autocast", "resolve_device",
           "seed_everything", "StopRequest"]


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


def cosine_lr(lr: float, done: int, total: int) -> float:
    """Cosine decay (Loshchilov & Hutter, 2017, no restarts): ``lr·½(1 + cos(π·done/total))``.

    Example:
        >>> cosine_lr(0.1, 0, 10), cosine_lr(0.1, 5, 10), cosine_lr(0.1, 10, 10)
        (0.1, 0.05, 0.0)
    """
    return lr * 0.5 * (1.0 + math.cos(math.pi * (done / max(1, total))))


def make_optimizer(model: nn.Module, lr: float, momentum: float, weight_decay: float,
                   norm_decay: float = 0.0) -> torch.optim.SGD:
    """SGD (Nesterov when momentum > 0) with weight decay on weights and ``norm_decay`` on BN and biases.

    Weight decay on BatchNorm parameters and biases only fights the normalization; as in most
    CIFAR recipes they get none by default.

    Example:
        >>> make_optimizer(nn.Linear(2, 2), 0.1, 0.9, 1e-4).param_groups[1]["weight_decay"]
        0.0
    """
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.SGD([{"params": decay, "weight_decay": weight_decay},
                            {"params": no_decay, "weight_decay": norm_decay}],
                           lr=lr, momentum=momentum, nesterov=momentum > 0)


def autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    """Mixed precision when ``amp``: float16 on CUDA, bfloat16 on the CPU; else nothing.

    Example:
        >>> type(autocast(torch.device("cpu"), False)).__name__
        'nullcontext'
    """
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)


@torch.no_grad()
def evaluate(model: nn.Module, data: Any, batch_size: int = 500, amp: bool = False,
             split: str = "test") -> tuple[float, float]:
    """Accuracy (%) and mean loss on the ``test`` or ``val`` split; under torch.distributed, exact totals.

    Example:
        >>> from trp.data import load
        >>> from trp.models import create
        >>> acc, loss = evaluate(create("resnet20", in_channels=1), load("digits"))
        >>> 0.0 <= acc <= 100.0
        True
    """
    rank, world = rank_and_world()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # correct, loss sum, count
    if split not in ("test", "val"):
        raise TRPError(f"split must be 'test' or 'val', got {split!r}")
    batches = data.test_batches if split == "test" else data.val_batches
    for x, y in batches(batch_size, rank=rank, world_size=world):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, amp):
            out = model(x)
        totals[0] += (out.argmax(1) == y).sum()
        totals[1] += F.cross_entropy(out.float(), y, reduction="sum")
        totals[2] += y.numel()
    if world > 1:
        torch.distributed.all_reduce(totals)
    model.train(was_training)
    n = max(float(totals[2]), 1.0)
    return 100.0 * float(totals[0]) / n, float(totals[1]) / n


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


def _progress(iterable: Iterator, total: int, desc: str | None) -> Any:
    if desc is None:
        return iterable
    try:
        from tqdm import tqdm  # optional: only for a progress bar on a terminal
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, disable=None)


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM: finish the current step, save what is complete, then stop.

    Inside ``with StopRequest() as stop:``, the first signal only sets ``stop.requested`` (pass
    ``lambda: stop.requested`` to :meth:`Loop.epoch`); a second one stops at once.

    Example:
        >>> with StopRequest() as stop:
        ...     stop.requested
        False
    """

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
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


# ------------------------------------------------------------------------------------ the run

@dataclass
class EpochStats:
    """What one epoch of :meth:`Loop.epoch` measured (sums over this process's samples)."""

    loss_sum: Tensor
    correct: Tensor
    seen: int
    lr: float
    seconds: float
    halted: bool = False

    @property
    def loss(self) -> float:
        """Mean training loss."""
        return float(self.loss_sum) / max(self.seen, 1)

    @property
    def acc(self) -> float:
        """Training accuracy (%)."""
        return 100.0 * float(self.correct) / max(self.seen, 1)


@dataclass
class Loop:
    """The training steps every method shares, one epoch at a time (``train`` and ``compress --finetune``).

    Each step: forward (under autocast with ``amp``), cross-entropy plus the method's extra loss,
    backward through the GradScaler, ``scaler.step(optimizer)``. With a ``teacher`` the
    cross-entropy becomes the distillation loss of :func:`trp.distill.distill_loss` with
    ``distill = (weight, temperature)``, the teacher's logits computed once per batch. The method's optimizer hooks
    (:meth:`trp.methods.Method.attach`) run inside that step, on unscaled gradients, and not at all
    for a step the scaler skips.

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        >>> from trp.data import load
        >>> loop = Loop(model, make_optimizer(model, 0.05, 0.9, 1e-4), load("digits"), 256, seed=0)
        >>> stats = loop.epoch(0, lambda step: 0.05)
        >>> stats.seen, stats.halted
        (1437, False)
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    data: Any
    batch_size: int
    seed: int
    method: methods.Method = field(default_factory=lambda: methods.Baseline(None))
    amp: bool = False
    net: nn.Module | None = None  # what runs the forward pass: a DDP wrapper under torchrun (default: model)
    rank: int = 0
    world: int = 1
    teacher: Teacher | None = None
    distill: tuple[float, float] = (0.5, 4.0)  # (weight W, temperature T) of the distillation loss

    def __post_init__(self) -> None:
        self.device = next(self.model.parameters()).device
        self.net = self.net if self.net is not None else self.model
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp and self.device.type == "cuda")
        self.steps_per_epoch = self.data.num_train_batches(self.batch_size, self.world)

    def epoch(self, epoch: int, lr_at: Callable[[int], float], order: int | None = None,
              stop: Callable[[], bool] = lambda: False, bar: str | None = None) -> EpochStats:
        """Train one epoch; ``lr_at(step)`` sets each step's rate, ``order`` the data order (default ``epoch``).

        ``stop()`` is asked after every step; True ends the epoch early (``halted``).
        """
        net = self.net
        assert net is not None
        net.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.float64, device=self.device)
        seen, lr, halted = 0, lr_at(0), False
        batches = self.data.train_batches(self.batch_size, epoch if order is None else order, self.seed,
                                          rank=self.rank, world_size=self.world)
        bar_ = _progress(batches, self.steps_per_epoch, bar)
        for step, (x, y) in enumerate(bar_):
            lr = lr_at(step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            with autocast(self.device, self.amp):
                logits = net(x)
                if self.teacher is None:
                    loss = F.cross_entropy(logits, y)
                else:
                    loss = distill_loss(logits, self.teacher(x), y, *self.distill)
            extra = self.method.extra_loss(self.model)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss if extra is None else loss + extra).backward()
            self.scaler.step(self.optimizer)  # unscales first; the method's step hooks run inside
            self.scaler.update()
            loss_sum += loss.detach().double() * y.numel()
            correct += (logits.detach().argmax(1) == y).sum()
            seen += y.numel()
            if step % 10 == 0 and hasattr(bar_, "set_postfix"):  # a sync every 10 steps, only on a terminal
                bar_.set_postfix(loss=f"{float(loss_sum) / seen:.3f}", acc=f"{100.0 * float(correct) / seen:.1f}%")
            if stop():
                halted = True
                break
        return EpochStats(loss_sum, correct, seen, lr, time.perf_counter() - t0, halted)

