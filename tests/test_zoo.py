"""Any model: torchvision, timm and transformers models through profile, decomposition and TRP (issue #13).

Every model is built with random weights (no download), at a small input where the model allows it:
64×64 for the CNNs, 32×32 for the ViTs (built for that size; vit_b_16 keeps 2 of its 12 identical
encoder blocks, for CI time), 112×112 for swin_t (at 64×64 its windows are padded and the attention,
whose projections swin calls functionally, outweighs the rest: 2× would be out of reach), 32 tokens
for the transformers. A timm and two transformers models (GPT-2, whose
layers are HF ``Conv1D``, and BERT) run when those packages are installed (the test extra installs them).

The reference is PyTorch's ``FlopCounterMode`` (MACs = FLOPs / 2) with autograd on, as a user would
run it, plus the FLOP formula torch registers for its GPU attention kernels given to the CPU
flash-attention kernel, which it leaves uncounted.
"""

from __future__ import annotations

import copy
from typing import Callable

import pytest
import torch
from torch import Tensor, nn

import trp
import trp.schemes
from trp.attention import unfuse_attention_
from trp.tracing import example_input
from trp.surgery import get_module, replace_modules
from model_checks import flop_counter_macs

pytestmark = pytest.mark.usefixtures("one_thread")


def _torchvision(name: str, **kwargs) -> nn.Module:
    models = pytest.importorskip("torchvision.models")
    return getattr(models, name)(weights=None, **kwargs)


def _vit_b_16() -> nn.Module:
    """torchvision's vit_b_16 built for 32×32 inputs, with 2 of its 12 identical encoder blocks: every kind
    of layer it has is there, at a sixth of the SVD time."""
    model = _torchvision("vit_b_16", image_size=32)
    model.encoder.layers = model.encoder.layers[:2]
    return model


def _timm_vit() -> nn.Module:
    timm = pytest.importorskip("timm")
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, pretrained=False)


def _gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def _bert() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                     intermediate_size=128, vocab_size=1000, max_position_embeddings=64)
    return transformers.BertModel(config)


ZOO: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "resnet18": (lambda: _torchvision("resnet18"), (3, 64, 64)),
    "mobilenet_v2": (lambda: _torchvision("mobilenet_v2"), (3, 64, 64)),
    "convnext_tiny": (lambda: _torchvision("convnext_tiny"), (3, 64, 64)),
    "vit_b_16": (_vit_b_16, (3, 32, 32)),
    "swin_t": (lambda: _torchvision("swin_t"), (3, 112, 112)),
    "timm-vit_tiny": (_timm_vit, (3, 32, 32)),
    "hf-gpt2": (_gpt2, (32,)),
    "hf-bert": (_bert, (32,)),
}
NAMES = list(ZOO)


@pytest.fixture(scope="module")
def zoo() -> Callable[[str], tuple[nn.Module, tuple[int, ...]]]:
    """Build each model once per module (seeded, eval mode); tests that change it take a deep copy.

    A weight matrix initialized to zero (torchvision's ViT head) gets small random values, so that
    every layer shows in the output the exactness test compares.
    """
    built: dict[str, tuple[nn.Module, tuple[int, ...]]] = {}

    def get(name: str) -> tuple[nn.Module, tuple[int, ...]]:
        if name not in built:
            make, shape = ZOO[name]
            torch.manual_seed(0)
            model = make().eval()
            with torch.no_grad():
                for p in model.parameters():
                    if p.dim() >= 2 and not p.any():
                        p.normal_(0, 0.02)
            built[name] = (model, shape)
        return built[name]

    return get


def _eligible(module: nn.Module, name: str) -> bool:
    """Every layer a scheme can decompose: stock Conv2d with groups=1, stock Linear, HF Conv1D."""
    kind = type(module)
    conv1d = kind.__name__ == "Conv1D" and kind.__module__.startswith("transformers")
    return (kind is nn.Conv2d and module.groups == 1) or kind is nn.Linear or conv1d


def _output(y: object) -> Tensor:
    """The tensor a model returns (HF models return an output object)."""
    if isinstance(y, Tensor):
        return y
    for key in ("logits", "last_hidden_state"):
        if getattr(y, key, None) is not None:
            return getattr(y, key)
    return y[0]


def _random_input(model: nn.Module, shape: tuple[int, ...], batch: int = 2) -> Tensor:
    g = torch.Generator().manual_seed(1)
    zeros = example_input(model, shape, batch)
    if zeros.dtype == torch.int64:  # token ids
        vocab = next(m for m in model.modules() if isinstance(m, nn.Embedding)).num_embeddings
        return torch.randint(0, vocab, zeros.shape, generator=g)
    return torch.randn(zeros.shape, generator=g)


@pytest.mark.parametrize("name", NAMES)
def test_profile_matches_flop_counter(zoo, name) -> None:
    """profile counts within 1 % of FlopCounterMode: attention, functional weights and products included."""
    model, shape = zoo(name)
    reference = flop_counter_macs(model, example_input(model, shape))
    prof = trp.profile(model, shape)
    assert abs(prof.macs - reference) <= 0.01 * reference, (prof.macs, reference)


@pytest.mark.parametrize("name", NAMES)
def test_speedup_two_is_measured_after_decomposition(zoo, name) -> None:
    """After unfusing attention, decompose_(speedup(2.0), scheme 'auto', every eligible layer) makes
    FlopCounterMode count half the MACs, within 2 %; unfusing alone changes no MAC."""
    model, shape = zoo(name)
    x = example_input(model, shape)
    fused = flop_counter_macs(model, x)
    model = copy.deepcopy(model)
    unfuse_attention_(model)
    before = flop_counter_macs(model, x)
    assert before == fused
    trp.decompose_(model, trp.speedup(2.0), _eligible, scheme="auto", input_shape=shape)
    after = flop_counter_macs(model, x)
    assert abs(before / after / 2.0 - 1) < 0.02, before / after
    assert _output(model(_random_input(model, shape))).isfinite().all()


@pytest.mark.parametrize("name", NAMES)
def test_full_rank_decomposition_is_exact(zoo, name) -> None:
    """Every layer the plan can decompose, replaced by its two layers at full rank, leaves the output
    unchanged (relative error < 1e-4); layers used functionally are not among them."""
    model, shape = zoo(name)
    x = _random_input(model, shape)
    with torch.no_grad():
        want = _output(model(x))
    model = copy.deepcopy(model)
    unfuse_attention_(model)
    p = trp.plan(model, "auto", trp.fixed(1), _eligible, shape)
    layers = [lp for lp in p.layers if lp.scheme is not None]
    assert layers and all(lp.decomposed for lp in layers)
    new = {}
    for lp in layers:  # at full rank: as decompose_ builds it, factorized at a known rank (energy 1)
        module, sch = get_module(model, lp.name), trp.schemes.get(lp.scheme)
        factors = sch.factorize(module.weight, lp.name, rank=lp.full_rank, energy=1.0)
        new[lp.name] = sch.build(module, lp.full_rank, factors)
    replace_modules(model, new)
    with torch.no_grad():
        got = _output(model(x))
    assert float((got - want).norm() / want.norm()) < 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_trp_takes_every_eligible_layer_and_steps(zoo, name) -> None:
    """trp.TRP(scheme='auto') lists every eligible conv, Linear and Conv1D (functionally used ones
    included: TRP only rewrites weights) and runs two optimizer steps with a projection."""
    model, shape = zoo(name)
    model = copy.deepcopy(model).train()
    unfuse_attention_(model)
    expected = {n for n, m in model.named_modules() if _eligible(m, n)}
    reg = trp.TRP(model, scheme="auto", energy=0.9, period=2, nuclear=1e-4, filter_fn=_eligible)
    assert set(reg.ranks()) == expected
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = _random_input(model, shape)
    with reg.attach(opt):
        for _ in range(2):
            opt.zero_grad()
            _output(model(x)).float().pow(2).mean().backward()
            opt.step()
    assert reg.steps == 2 and [step for step, _ in reg.history] == [0, 2]
    assert all(1 <= k for k in reg.ranks().values())
