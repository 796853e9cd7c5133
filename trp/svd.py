"""Weight reshaping and robust SVD: the numerical core shared by decomposition and training.

A conv kernel W of shape N×C×kh×kw is low-rank only after it is laid out as a matrix, and the
layout decides which two-layer factorization the rank buys:

* ``channel`` (Zhang et al., TPAMI 2016): ``M = W.reshape(N, C·kh·kw)``; M = U S Vᵀ gives a
  k×C×kh×kw conv followed by an N×k 1×1 conv.
* ``spatial`` (Jaderberg et al., 2014): ``M[(c,y), (n,x)] = W[n,c,y,x]``, a (C·kh)×(N·kw) matrix;
  gives a kh×1 conv with k filters followed by a 1×kw conv.
* ``decouple`` (Guo et al., BMVC 2018): every output filter ``W[n]`` as a C×(kh·kw) matrix, a
  *batch* of N matrices sharing one rank k; gives k pointwise→depthwise paths per filter.
* ``linear``: a Linear weight is already a matrix.

For the batched ``decouple`` layout a layer's *spectrum* is ``sqrt(Σ_n σ_{n,i}²)``, so the energy
criterion and the Eckart–Young error ``sqrt(Σ_{i>k} spectrum_i²)`` read the same for every scheme.
"""

from __future__ import annotations

import torch
from torch import Tensor

from trp.errors import TRPError

__all__ = ["LAYOUTS", "to_matrix", "from_matrix", "svd", "spectrum", "truncate", "nuclear_subgradient"]

LAYOUTS = ("channel", "spatial", "decouple", "linear")


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise TRPError(f"unknown scheme {layout!r}; choose one of: {', '.join(LAYOUTS)}")


def to_matrix(weight: Tensor, layout: str) -> Tensor:
    """Lay a weight out as the matrix (or batch of matrices) whose rank the scheme exploits.

    Args:
        weight: A conv kernel N×C×kh×kw, or a Linear weight out×in for ``linear``.
        layout: One of ``channel``, ``spatial``, ``decouple``, ``linear``.

    Returns:
        ``channel``: N×(C·kh·kw); ``spatial``: (C·kh)×(N·kw); ``decouple``: N×C×(kh·kw);
        ``linear``: the weight itself.

    Example:
        >>> w = torch.randn(8, 4, 3, 3)
        >>> to_matrix(w, "channel").shape, to_matrix(w, "spatial").shape
        (torch.Size([8, 36]), torch.Size([12, 24]))
    """
    _check_layout(layout)
    if layout == "linear":
        return weight
    n, c, kh, kw = weight.shape
    if layout == "channel":
        return weight.reshape(n, c * kh * kw)
    if layout == "spatial":
        return weight.permute(1, 2, 0, 3).reshape(c * kh, n * kw)
    return weight.reshape(n, c, kh * kw)


def from_matrix(matrix: Tensor, layout: str, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Invert :func:`to_matrix`: put a (possibly low-rank) matrix back into the weight's shape.

    Example:
        >>> w = torch.randn(8, 4, 3, 3)
        >>> torch.equal(from_matrix(to_matrix(w, "spatial"), "spatial", w.shape), w)
        True
    """
    _check_layout(layout)
    if layout == "linear":
        return matrix.reshape(shape)
    n, c, kh, kw = shape
    if layout == "spatial":
        return matrix.reshape(c, kh, n, kw).permute(2, 0, 1, 3).contiguous()
    return matrix.reshape(n, c, kh, kw)


def svd(matrix: Tensor, name: str = "weight") -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD ``matrix = U diag(S) Vh`` computed in float32 or wider, with fallbacks.

    Half-precision weights (AMP) are lifted to float32 first. If the default driver fails to
    converge or returns non-finite factors, the SVD is retried in float64 and, on CUDA, with the
    ``gesvd`` driver; if that fails too, a :class:`TRPError` names the layer, so a failure is never
    silently turned into a zero sub-gradient or a skipped layer.

    Args:
        matrix: A matrix or a batch of matrices (…×m×n).
        name: The layer's name, used in the error message.

    Returns:
        ``(U, S, Vh)`` in the input's dtype (float32 for half inputs), S descending.

    Example:
        >>> m = torch.randn(5, 3)
        >>> u, s, vh = svd(m)
        >>> torch.allclose(u @ torch.diag(s) @ vh, m, atol=1e-5)
        True
    """
    if not torch.isfinite(matrix).all():
        raise TRPError(f"layer {name!r} has non-finite weights (NaN or inf); cannot take its SVD")
    out_dtype = torch.float64 if matrix.dtype == torch.float64 else torch.float32
    attempts: list[tuple[torch.dtype, str | None]] = [(out_dtype, None), (torch.float64, None)]
    if matrix.is_cuda:
        attempts.append((torch.float64, "gesvd"))
    last: Exception | None = None
    for dtype, driver in attempts:
        try:
            u, s, vh = torch.linalg.svd(matrix.to(dtype), full_matrices=False, driver=driver)
        except (RuntimeError, torch.linalg.LinAlgError) as err:  # LAPACK convergence failure
            last = err
            continue
        if torch.isfinite(u).all() and torch.isfinite(s).all() and torch.isfinite(vh).all():
            return u.to(out_dtype), s.to(out_dtype), vh.to(out_dtype)
        last = RuntimeError("non-finite factors")
    raise TRPError(f"SVD of layer {name!r} failed to converge ({last}); its weights may be ill-conditioned")


def spectrum(s: Tensor) -> Tensor:
    """A layer's singular-value spectrum: S itself, or ``sqrt(Σ_n σ_{n,i}²)`` for a batch.

    Example:
        >>> spectrum(torch.tensor([[3.0, 0.0], [4.0, 1.0]]))
        tensor([5., 1.])
    """
    return s if s.dim() == 1 else s.pow(2).sum(0).sqrt()


def truncate(u: Tensor, s: Tensor, vh: Tensor, k: int) -> Tensor:
    """The best rank-k approximation ``U_k diag(S_k) Vh_k`` (Eckart–Young), batched.

    Example:
        >>> m = torch.randn(6, 4)
        >>> u, s, vh = svd(m)
        >>> float(torch.linalg.matrix_rank(truncate(u, s, vh, 2)))
        2.0
    """
    return (u[..., :, :k] * s[..., None, :k]) @ vh[..., :k, :]


def nuclear_subgradient(u: Tensor, vh: Tensor, k: int) -> Tensor:
    """``U_k Vh_k``: the stochastic sub-gradient of the nuclear norm ‖W‖_* (TRP paper, Eq. 4–5).

    Example:
        >>> u, s, vh = svd(torch.eye(3))
        >>> torch.allclose(nuclear_subgradient(u, vh, 3), torch.eye(3))
        True
    """
    return u[..., :, :k] @ vh[..., :k, :]
