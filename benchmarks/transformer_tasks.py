"""The two transformer tasks of the benchmark: a small ViT on CIFAR-10 and a character-level GPT.

A :class:`Task` holds what the method code needs and nothing of how it was made: a fresh-model
factory (attention already unfused into stock ``nn.Linear`` layers), one sample's shape, an
endless seeded stream of training batches, the loss, and the evaluation on each split.

* ``vit``: torchvision's ``VisionTransformer`` built through trp's ``python:`` model source,
  ``trp.unfuse_attention_`` applied so every projection is an ``nn.Linear``; CIFAR-10 read with
  ``trp.data.load``, a seeded validation split carved from the training images (the test images are
  evaluated once per final model); batches augmented by trp's crop-and-flip.
* ``gpt``: a nanoGPT-style model (Radford et al. 2019 layout: pre-LayerNorm blocks, fused ``c_attn``
  projection, 4× GELU MLP, learned positions, untied ``lm_head``) on the standard library's ``.py``
  files (:mod:`benchmarks.textdata`), split by file; validation on fixed windows.

Example:
    >>> task = gpt_task(TaskSize(gpt_layers=1, gpt_dim=16, gpt_heads=2, gpt_ctx=8, gpt_batch=2,
    ...                 gpt_val_windows=4), seed=0, max_files=4)
    >>> x, y = next(task.stream(0))
    >>> tuple(task.build()(x).shape[:2]) == tuple(x.shape)
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import trp
from benchmarks.textdata import Corpus, eval_windows, load_corpus, random_windows
from trp.data import TensorData, load as load_data
from trp.data.batching import channel_stats
from trp.sources import first_conv_to

__all__ = ["VIT_SOURCE", "TaskSize", "Task", "CharGPT", "FloatTokens", "vit_task", "gpt_task", "carve_validation"]

VIT_SOURCE = "python:torchvision.models.vision_transformer:VisionTransformer"


@dataclass(frozen=True)
class TaskSize:
    """Model and batch sizes of both tasks (the defaults are the committed run's)."""

    vit_layers: int = 4
    vit_dim: int = 128
    vit_mlp: int = 256
    vit_heads: int = 4
    vit_patch: int = 4
    vit_batch: int = 128
    vit_val: int = 500
    gpt_layers: int = 4
    gpt_dim: int = 128
    gpt_heads: int = 4
    gpt_ctx: int = 128
    gpt_batch: int = 32
    gpt_val_windows: int = 512
    gpt_val_fraction: float = 0.1


@dataclass
class Task:
    """One benchmark task.

    ``evaluate(model, split)`` returns metrics (``vit``: ``acc`` %, ``loss``; ``gpt``: ``loss`` in
    nats per character, ``ppl``, ``bpc``); ``score`` names the metric that ranks models and
    ``higher`` says which way is better.
    """

    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    stream: Callable[[int], Iterator[tuple[Tensor, Tensor]]]
    loss: Callable[[nn.Module, Tensor, Tensor], Tensor]
    evaluate: Callable[[nn.Module, str], dict]
    splits: tuple[str, ...]
    score: str
    higher: bool
    latency_batches: tuple[int, ...]
    timing_wrap: Callable[[nn.Module], nn.Module] = lambda m: m
    fresh: Callable[[], nn.Module] | None = None  # the architecture before build's transforms (for trp.load)
    info: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------- ViT


def carve_validation(data: TensorData, n_val: int, seed: int) -> tuple[TensorData, TensorData]:
    """Carve a seeded validation split from the training images: ``(train, test)``, two TensorData
    normalized with the carved training images' statistics. ``train`` trains on the rest of the
    training images and holds the validation images as its ``x_test``; ``test`` holds the real test
    images (its training part is a one-image placeholder, never used).

    Example:
        >>> d = trp.data.load("digits")
        >>> train, test = carve_validation(d, 100, seed=0)
        >>> train.num_train + train.num_test == d.num_train, train.num_test, test.num_test == d.num_test
        (True, 100, True)
    """
    if not 0 < n_val < data.num_train:
        raise trp.TRPError(f"validation size must be in (0, {data.num_train}), got {n_val}")
    order = torch.randperm(data.num_train, generator=torch.Generator().manual_seed(seed))
    tr, va = order[n_val:], order[:n_val]
    mean, std = channel_stats(data.x_train[tr])
    common = dict(num_classes=data.num_classes, mean=mean, std=std, pad=data.pad, flip=data.flip)
    train = TensorData(data.name, data.x_train[tr], data.y_train[tr], data.x_train[va], data.y_train[va], **common)
    test = TensorData(data.name, data.x_train[tr][:1], data.y_train[tr][:1], data.x_test, data.y_test, **common)
    return train, test


@torch.no_grad()
def _classify(model: nn.Module, batches: Iterator[tuple[Tensor, Tensor]]) -> dict:
    was = model.training
    model.eval()
    correct, total, loss = 0, 0, 0.0
    for x, y in batches:
        out = model(x)
        loss += float(F.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
        total += int(y.numel())
    model.train(was)
    return {"acc": 100.0 * correct / total, "loss": loss / total}


def vit_task(data_dir: str, size: TaskSize, seed: int, dataset: str = "cifar10") -> Task:
    """The ViT task on a CIFAR folder; the validation split depends on ``seed``."""
    data = load_data(dataset, data_dir)
    train, test = carve_validation(data, size.vit_val, seed)
    c, h, _ = data.input_shape
    kwargs = dict(image_size=h, patch_size=size.vit_patch, num_layers=size.vit_layers, num_heads=size.vit_heads,
                  hidden_dim=size.vit_dim, mlp_dim=size.vit_mlp)

    def fresh() -> nn.Module:
        model = trp.models.create(VIT_SOURCE, num_classes=data.num_classes, in_channels=c, **kwargs)
        return first_conv_to(model, c) if c != 3 else model  # python: sources get in_channels only if they take it

    def build() -> nn.Module:
        model = fresh()
        trp.unfuse_attention_(model)  # nn.MultiheadAttention -> q/k/v/out nn.Linear, exact
        return model

    def stream(run_seed: int) -> Iterator[tuple[Tensor, Tensor]]:
        epoch = 0
        while True:
            yield from train.train_batches(size.vit_batch, epoch=epoch, seed=run_seed)
            epoch += 1

    def evaluate(model: nn.Module, split: str) -> dict:
        source = train if split == "val" else test
        # test images are normalized with the carved training statistics, as the validation images
        return _classify(model, source.test_batches(500))

    info = {"dataset": dataset, "source": VIT_SOURCE, "kwargs": kwargs, "train_images": train.num_train,
            "val_images": train.num_test, "test_images": test.num_test, "val_seed": seed,
            "steps_per_epoch": train.num_train_batches(size.vit_batch), "batch": size.vit_batch}
    return Task("vit", build, (c, h, h), stream, lambda m, x, y: F.cross_entropy(m(x), y), evaluate,
                ("val", "test"), "acc", True, (1, 128), fresh=fresh, info=info)


# ------------------------------------------------------------------------------------------- GPT


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.c_attn, self.attn_proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.c_fc, self.mlp_proj = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class CharGPT(nn.Module):
    """A nanoGPT-style decoder: ids ``[B, T]`` -> logits ``[B, T, vocab]``.

    Example:
        >>> CharGPT(10, 8, layers=1, dim=16, heads=2)(torch.zeros(2, 8, dtype=torch.long)).shape
        torch.Size([2, 8, 10])
    """

    def __init__(self, vocab: int, ctx: int, layers: int = 4, dim: int = 128, heads: int = 4) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(ctx, dim)
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.input_shape = (ctx,)
        for name, p in self.named_parameters():  # GPT-2 init: N(0, 0.02), residual projections scaled
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith("_proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: Tensor) -> Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class FloatTokens(nn.Module):
    """Takes the float input that ``trp.runtimes`` times every model on and turns it into valid ids
    (``|x|·7`` floored, clipped to the vocabulary): a work-around for runtimes that feed only floats.
    The cast costs one elementwise pass over ``[B, T]``, nothing beside the model's own work."""

    def __init__(self, model: CharGPT) -> None:
        super().__init__()
        self.model = model
        self.vocab = model.wte.num_embeddings

    def forward(self, x: Tensor) -> Tensor:
        return self.model((x.abs() * 7).long().clamp(max=self.vocab - 1))


def _lm_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def gpt_task(size: TaskSize, seed: int, max_files: int | None = None, corpus: Corpus | None = None) -> Task:
    """The character-GPT task; the file split is seeded with ``seed`` (0 in the committed run, for every
    training seed: one fixed split, so validation losses compare across seeds)."""
    corpus = corpus or load_corpus(size.gpt_val_fraction, seed, max_files=max_files)
    vx, vy = eval_windows(corpus.val_ids, size.gpt_ctx, size.gpt_val_windows)

    def build() -> nn.Module:
        return CharGPT(corpus.vocab.size, size.gpt_ctx, size.gpt_layers, size.gpt_dim, size.gpt_heads)

    def stream(run_seed: int) -> Iterator[tuple[Tensor, Tensor]]:
        gen = torch.Generator().manual_seed(run_seed)
        while True:
            yield random_windows(corpus.train_ids, size.gpt_batch, size.gpt_ctx, gen)

    @torch.no_grad()
    def evaluate(model: nn.Module, split: str) -> dict:
        was = model.training
        model.eval()
        total = sum(float(_lm_loss(model, vx[i:i + 64], vy[i:i + 64])) * len(vx[i:i + 64])
                    for i in range(0, len(vx), 64)) / len(vx)
        model.train(was)
        return {"loss": total, "ppl": math.exp(total), "bpc": total / math.log(2)}

    info = {**corpus.info, "ctx": size.gpt_ctx, "batch": size.gpt_batch, "val_windows": size.gpt_val_windows,
            "val_chars_scored": size.gpt_val_windows * size.gpt_ctx}
    return Task("gpt", build, (size.gpt_ctx,), stream, _lm_loss, evaluate, ("val",), "loss", False, (1, 32),
                timing_wrap=FloatTokens, fresh=build, info=info)
