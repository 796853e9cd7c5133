"""Attention whose projections are ordinary layers, so they can be decomposed.

``nn.MultiheadAttention`` keeps its q/k/v projections in one ``in_proj_weight`` parameter and hands
it, with ``out_proj.weight``, to ``F.multi_head_attention_forward``: no ``nn.Linear`` is ever
called, so nothing can be swapped for two smaller layers (plans list it as dense, with that reason).
:class:`UnfusedMultiheadAttention` is a drop-in replacement built from four stock ``nn.Linear``
(``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``) with the forward contract of
``nn.MultiheadAttention`` (query/key/value, ``key_padding_mask``, ``need_weights``, ``attn_mask``,
``average_attn_weights``, ``is_causal``, ``batch_first``, ``add_bias_kv``, ``add_zero_attn``,
dropout, unbatched inputs), computing what ``F.multi_head_attention_forward`` computes, step for
step. :func:`unfuse_attention_` swaps every ``nn.MultiheadAttention`` of a model in place (under
every name it is registered by). It changes the ``state_dict`` keys (``in_proj_weight`` becomes
``q_proj.weight``, ``k_proj.weight``, ``v_proj.weight``), so a saved model records it as a
structural transform (kind ``unfuse-attention``), replayed before its weights are loaded.

Example:
    >>> mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    >>> x = torch.randn(2, 5, 16)
    >>> flat = UnfusedMultiheadAttention.from_fused(mha)
    >>> torch.allclose(flat(x, x, x)[0], mha(x, x, x)[0], atol=1e-6)
    True
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trp.errors import TRPError
from trp.surgery import replace_modules

__all__ = ["UnfusedMultiheadAttention", "unfuse_attention_"]


def _canonical(mask: Tensor | None, name: str, dtype: torch.dtype) -> Tensor | None:
    """A boolean mask (True: not allowed to attend) as an additive float mask, as torch does."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise TRPError(f"{name} must be a bool or float tensor, got {mask.dtype}")
    return mask


class UnfusedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with its projections as four ``nn.Linear`` layers.

    Takes the constructor arguments of ``nn.MultiheadAttention``; :meth:`from_fused` copies an
    existing one exactly. ``forward`` follows ``F.multi_head_attention_forward`` (torch 2.x): masks
    are made additive (True = masked), a 2-D ``attn_mask`` is (L, S) and a 3-D one (N·heads, L, S),
    ``key_padding_mask`` is (N, S); without ``need_weights`` the attention runs in
    ``F.scaled_dot_product_attention`` and None is returned for the weights.

    Example:
        >>> attn = UnfusedMultiheadAttention(8, 2)
        >>> out, weights = attn(torch.randn(3, 1, 8), torch.randn(4, 1, 8), torch.randn(4, 1, 8))
        >>> tuple(out.shape), tuple(weights.shape)
        ((3, 1, 8), (1, 3, 4))
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise TRPError(f"embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads})")
        dd = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.dropout, self.batch_first = embed_dim, num_heads, dropout, batch_first
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self.head_dim = embed_dim // num_heads
        self.add_zero_attn = add_zero_attn
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **dd)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias, **dd)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias, **dd)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **dd)
        self.bias_k: nn.Parameter | None = None
        self.bias_v: nn.Parameter | None = None
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, embed_dim, **dd))
            self.bias_v = nn.Parameter(torch.empty(1, 1, embed_dim, **dd))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialize as ``nn.MultiheadAttention`` does: Xavier-uniform projections (over the packed
        3E×E matrix when k and v have the embedding's width), zero biases, Xavier-normal bias_k/v."""
        projections = (self.q_proj, self.k_proj, self.v_proj)
        if self.kdim == self.embed_dim and self.vdim == self.embed_dim:
            bound = math.sqrt(6.0 / (4 * self.embed_dim))  # xavier on the fused (3E, E) matrix
            for lin in projections:
                nn.init.uniform_(lin.weight, -bound, bound)
        else:
            for lin in projections:
                nn.init.xavier_uniform_(lin.weight)
        for lin in (*projections, self.out_proj):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        for b in (self.bias_k, self.bias_v):
            if b is not None:
                nn.init.xavier_normal_(b)

    @classmethod
    def from_fused(cls, mha: nn.MultiheadAttention) -> "UnfusedMultiheadAttention":
        """An exact copy of ``mha`` (weights, options, training flag) on its device and dtype.

        Example:
            >>> UnfusedMultiheadAttention.from_fused(nn.MultiheadAttention(8, 2, kdim=4)).k_proj
            Linear(in_features=4, out_features=8, bias=True)
        """
        ref = mha.out_proj.weight
        new = cls(mha.embed_dim, mha.num_heads, mha.dropout, mha.in_proj_bias is not None, mha.bias_k is not None,
                  mha.add_zero_attn, mha.kdim, mha.vdim, mha.batch_first, device=ref.device, dtype=ref.dtype)
        e = mha.embed_dim
        if mha.in_proj_weight is not None:
            weights = mha.in_proj_weight.detach().split(e)
        else:
            weights = (mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach())
        biases = mha.in_proj_bias.detach().split(e) if mha.in_proj_bias is not None else (None,) * 3
        with torch.no_grad():
            for lin, w, b in zip((new.q_proj, new.k_proj, new.v_proj), weights, biases):
                lin.weight.copy_(w)
                if b is not None:
                    lin.bias.copy_(b)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
            if mha.bias_k is not None:
                new.bias_k.copy_(mha.bias_k)
                new.bias_v.copy_(mha.bias_v)
        return new.train(mha.training)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"

    def _masks(self, attn_mask: Tensor | None, key_padding_mask: Tensor | None, is_causal: bool, need_weights: bool,
               dtype: torch.dtype, tgt: int, src: int, bsz: int) -> tuple[Tensor | None, Tensor | None, bool]:
        """Additive (attn_mask (1 or N·h, L, S), key_padding_mask (N, S)) and the SDPA causal hint."""
        key_padding_mask = _canonical(key_padding_mask, "key_padding_mask", dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                               "module method `generate_square_subsequent_mask` to create this mask.")
        if is_causal and key_padding_mask is None and not need_weights:
            return None, None, True  # SDPA applies the causal mask itself
        attn_mask = _canonical(attn_mask, "attn_mask", dtype)
        if key_padding_mask is not None:
            is_causal = False  # the merged mask is no longer causal
        if attn_mask is not None:
            expected = (tgt, src) if attn_mask.dim() == 2 else (bsz * self.num_heads, tgt, src)
            if attn_mask.dim() not in (2, 3) or tuple(attn_mask.shape) != expected:
                raise RuntimeError(f"attn_mask of shape {tuple(attn_mask.shape)} should be {expected}")
            if attn_mask.dim() == 2:
                attn_mask = attn_mask.unsqueeze(0)
        return attn_mask, key_padding_mask, is_causal

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        """Attention output (and weights when ``need_weights``), as ``nn.MultiheadAttention.forward``."""
        batched = query.dim() == 3
        if self.batch_first and batched:
            query, key, value = (t.transpose(1, 0) for t in (query, key, value))
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt, bsz, e = query.shape
        h, hd = self.num_heads, self.head_dim
        attn_mask, kpm, is_causal = self._masks(attn_mask, key_padding_mask, is_causal, need_weights, query.dtype,
                                                tgt, key.shape[0], bsz)
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        if self.bias_k is not None:  # one learned key/value appended to the sequence
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            kpm = None if kpm is None else F.pad(kpm, (0, 1))
        q = q.view(tgt, bsz * h, hd).transpose(0, 1)
        k = k.view(k.shape[0], bsz * h, hd).transpose(0, 1)
        v = v.view(v.shape[0], bsz * h, hd).transpose(0, 1)
        if self.add_zero_attn:  # one all-zero key/value appended
            zeros = torch.zeros(bsz * h, 1, hd, dtype=k.dtype, device=k.device)
            k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            kpm = None if kpm is None else F.pad(kpm, (0, 1))
        src = k.shape[1]
        if kpm is not None:
            kpm = kpm.view(bsz, 1, 1, src).expand(-1, h, -1, -1).reshape(bsz * h, 1, src)
            attn_mask = kpm if attn_mask is None else attn_mask + kpm
        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = q * math.sqrt(1.0 / float(hd))
            scores = (torch.baddbmm(attn_mask, scores, k.transpose(-2, -1)) if attn_mask is not None
                      else torch.bmm(scores, k.transpose(-2, -1)))
            weights = F.softmax(scores, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt * bsz, e)
            weights = weights.view(bsz, h, tgt, src)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        else:
            if attn_mask is not None:
                attn_mask = (attn_mask.unsqueeze(0) if attn_mask.size(0) == 1
                             else attn_mask.view(bsz, h, -1, src))
            out = F.scaled_dot_product_attention(q.view(bsz, h, tgt, hd), k.view(bsz, h, src, hd),
                                                 v.view(bsz, h, src, hd), attn_mask, dropout_p, is_causal)
            out = out.permute(2, 0, 1, 3).reshape(bsz * tgt, e)
        out = self.out_proj(out).view(tgt, bsz, -1)
        if not batched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(1, 0)
        return out, weights


def unfuse_attention_(model: nn.Module, names: Sequence[str] | None = None) -> list[str]:
    """Replace every ``nn.MultiheadAttention`` of ``model`` (or those at ``names``) by an exact
    :class:`UnfusedMultiheadAttention`, in place, under every name it is registered by; returns the
    names replaced (one per module). Works on the meta device too (shapes only).

    Subclasses of ``nn.MultiheadAttention`` are left alone: their forward may differ. A name that
    already holds an :class:`UnfusedMultiheadAttention` is skipped, so replaying the transform on a
    model that was unfused before (``trp.load(folder, model=instance)``) does nothing.

    Example:
        >>> model = nn.Sequential(nn.MultiheadAttention(8, 2))
        >>> unfuse_attention_(model), type(model[0]).__name__
        (['0'], 'UnfusedMultiheadAttention')
    """
    modules = dict(model.named_modules(remove_duplicate=False))
    if names is None:
        names = [n for n, m in model.named_modules() if type(m) is nn.MultiheadAttention]  # one name per module
    chosen: dict[int, str] = {}
    for name in names:
        module = modules.get(str(name))
        if isinstance(module, UnfusedMultiheadAttention):
            continue
        if type(module) is not nn.MultiheadAttention:
            raise TRPError(f"no nn.MultiheadAttention named {name!r} in this model")
        chosen.setdefault(id(module), str(name))
    replace_modules(model, {name: UnfusedMultiheadAttention.from_fused(modules[name]) for name in chosen.values()})
    return list(chosen.values())
