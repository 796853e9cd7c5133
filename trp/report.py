"""``trp report``: per-layer ranks and energies, singular-value spectra and rank-history plots.

Works on a training run (its checkpoint and logged rank history), a dense model, or a compressed
model (its decomposed layers are composed back to dense weights to read their spectra).
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from trp import rank as rank_mod
from trp import schemes
from trp.errors import TRPError
from trp.io import atomic_write_bytes
from trp.plan import Plan
from trp.saving import load_model

__all__ = ["layer_spectra", "write_report"]


def layer_spectra(model: nn.Module, layout: str, plan: Plan | None = None) -> dict[str, Tensor]:
    """Singular-value spectrum of every Conv2d (groups=1), SVD-trained and decomposed layer, in one layout.

    A decomposed layer is composed back into its dense weight by its own scheme; a 2-D weight is
    read in the ``linear`` layout whatever ``layout`` says.

    Example:
        >>> spectra = layer_spectra(nn.Sequential(nn.Conv2d(3, 4, 3)), "channel")
        >>> spectra["0"].shape
        torch.Size([4])
    """
    planned = {lp.name: lp.scheme for lp in (plan.layers if plan else []) if lp.decomposed}
    out: dict[str, Tensor] = {}
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in planned):  # the halves of a decomposed layer
            continue
        if name in planned:
            weight = schemes.get(planned[name]).compose(module)
        elif isinstance(module, nn.Conv2d) and module.groups == 1:
            weight = module.weight.detach()  # a parametrized (SVD-trained) conv composes its weight here
        elif isinstance(module, nn.Linear) and parametrize.is_parametrized(module, "weight"):
            weight = module.weight.detach()
        else:
            continue
        sch = schemes.get("linear" if weight.dim() == 2 else layout)
        out[name] = sch.singular_values(weight.float().cpu(), name)
    return out


def _save(plt: object, fig: object, ax: object, path: Path, series: int) -> Path:
    if series <= 20:  # beyond that a legend hides the lines
        ax.legend(fontsize=5, ncol=2)
    fig.tight_layout()
    png = io.BytesIO()  # rendered in memory, then written atomically: a crash leaves no half image
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, png.getvalue())
    return path


def write_report(path: str | Path, out: str | Path | None = None, scheme: str | None = None,
                 trust: bool = False) -> str:
    """Write ``spectra.png`` (and ``ranks.png`` for runs with a rank history); return the table.

    Example:
        >>> import tempfile
        >>> from trp.models import create
        >>> d = tempfile.mkdtemp()
        >>> from trp.structure import ModelSpec
        >>> from trp.saving import save_model
        >>> save_model(d + "/model.safetensors", create("resnet20"), ModelSpec("resnet20", 10, 3, [3, 32, 32]))
        >>> "layer1.0.conv1" in write_report(d)
        True
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise TRPError("trp report needs matplotlib: pip install matplotlib") from None
    path = Path(path)
    model, spec, meta = load_model(path, trust=trust)
    decomposed = spec.find("decompose")
    plan = Plan.from_dict(decomposed["plan"]) if decomposed else None
    conv_schemes = schemes.names_for(nn.Conv2d(1, 1, 3))
    trained = str(meta.get("config", {}).get("scheme") or "channel").split(",")  # "auto" or "spatial,linear" too
    layout = scheme or next((n for n in trained if n in conv_schemes), "channel")  # convs read in the run's layout
    if layout not in conv_schemes:
        raise TRPError(f"unknown scheme {layout!r}; choose one of: {', '.join(conv_schemes)}")
    spectra = layer_spectra(model, layout, plan)
    if not spectra:
        raise TRPError(f"{path} has no Conv2d or decomposed layer to report on")
    out = Path(out) if out else (path if path.is_dir() else path.parent) / "report"
    out.mkdir(parents=True, exist_ok=True)

    planned = {lp.name: lp for lp in plan.layers} if plan else {}
    width = max(len(n) for n in spectra)
    lines = [f"{'layer':<{width}}  {'full':>5} {'e=0.90':>6} {'e=0.95':>6} {'e=0.99':>6} {'σ>=0.05':>7} {'σ_max':>8}  kept"]
    for name, s in spectra.items():
        ks = [rank_mod.energy_rank(s, e) for e in (0.9, 0.95, 0.99)]
        kept = ""
        if name in planned and planned[name].decomposed:
            kept = f"rank {planned[name].rank}/{planned[name].full_rank} ({planned[name].scheme})"
        lines.append(f"{name:<{width}}  {s.numel():>5} {ks[0]:>6} {ks[1]:>6} {ks[2]:>6} {rank_mod.value(0.05).select(s):>7} "
                     f"{float(s[0]):>8.3f}  {kept}")
    lines.append(f"({layout} layout; ranks by the energy criterion at e and by the value threshold 0.05)")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, s in spectra.items():
        x = torch.arange(1, s.numel() + 1) / s.numel()
        ax.semilogy(x.numpy(), (s / s[0].clamp_min(1e-12)).clamp_min(1e-6).numpy(), lw=1, label=name)
    ax.set_xlabel("singular value index / full rank")
    ax.set_ylabel("σ_i / σ_1")
    ax.set_title(f"Singular-value spectra ({layout} layout): {path.name}")
    written = [_save(plt, fig, ax, out / "spectra.png", len(spectra))]

    history = meta.get("rank_history") or []
    if history:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        names = list(history[-1][1])
        steps = [h[0] for h in history]
        for name in names:
            ax.plot(steps, [h[1].get(name, float("nan")) for h in history], lw=1, label=name)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("rank at the energy criterion")
        ax.set_title(f"Rank over training: {path.name}")
        written.append(_save(plt, fig, ax, out / "ranks.png", len(names)))
    lines.append("wrote " + ", ".join(str(w) for w in written))
    return "\n".join(lines)
