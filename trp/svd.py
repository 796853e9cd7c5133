"""Robust SVD: the numerical core shared by planning, decomposition and training.

Matrix layouts belong to the schemes (:mod:`trp.schemes`); this module only factorizes. Every
routine works in float32 or wider, on a matrix or a batch of matrices, and names the layer when
LAPACK fails, so a failure is never silently turned into a zero sub-gradient or a skipped layer.
For a batch (the ``decouple`` layout) a layer's *spectrum* is ``sqrt(Σ_n σ_{n,i}²)``, so the energy
criterion and the Eckart–Young error ``sqrt(Σ_{i>k} spectrum_i²)`` read the same for every scheme.

Large matrices take two shortcuts, both checked: the singular values of a matrix with a large short
side come from the eigenvalues of its Gram matrix (σ_i² = λ_i(M·Mᵀ)), and a factorization of which
only the first k factors are kept (:func:`svd_rank`) is a randomized SVD (Halko, Martinsson & Tropp
2011) or the top eigenvectors of the Gram matrix, whose error is compared with the optimum, falling
back to the full SVD when it is short of it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from trp.errors import TRPError

__all__ = ["svd", "svdvals", "svd_rank", "spectrum", "truncate", "nuclear_subgradient", "GRAM_MIN",
           "RANDOMIZED_MIN", "RANDOMIZED_TOLERANCE"]

#: svdvals of a matrix at least this large on its short side goes through the Gram matrix.
GRAM_MIN = 512
#: svd_rank takes a cheap route (randomized below a quarter of the short side, Gram above) only for
#: matrices at least this large on the short side.
RANDOMIZED_MIN = 512
#: svd_rank's cheap factors are accepted when their Frobenius error is within this fraction of the
#: optimal rank-k error (Eckart–Young).
RANDOMIZED_TOLERANCE = 0.01


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
    _check_finite(matrix, name)
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


def _gram(matrix: Tensor) -> Tensor:
    """The Gram matrix of the short side (M·Mᵀ or Mᵀ·M) in float64, formed in the input's precision.

    A float32 product is BLAS-3 at full speed; its round-off (~1e-7·‖M‖_F² per entry) is far below
    the energies a plan compares. A float64 input keeps float64 throughout.
    """
    m = matrix if matrix.dtype == torch.float64 else matrix.to(torch.float32)
    gram = m @ m.mT if m.shape[-2] <= m.shape[-1] else m.mT @ m
    return gram.to(torch.float64)


def svdvals(matrix: Tensor, name: str = "weight") -> Tensor:
    """Singular values only, descending, with the fallbacks of :func:`svd`.

    Planning and budgets need only the spectrum; skipping the singular vectors is several times
    cheaper on large Linear layers. A matrix whose short side is at least :data:`GRAM_MIN` gets
    σ_i = sqrt(λ_i(G)) from its Gram matrix G (see ``_gram``), solved in float64: the λ_i are the σ²
    that energies and budgets add up, each accurate to ~1e-7·‖M‖_F², while LAPACK's
    bidiagonalization is BLAS-2 bound (on one thread, 23 s for a 4096² matrix against 8 s, and
    minutes for VGG's 4096×25088 classifier against 20 s).

    Example:
        >>> svdvals(torch.diag(torch.tensor([1.0, 3.0])))
        tensor([3., 1.])
    """
    _check_finite(matrix, name)
    out_dtype = torch.float64 if matrix.dtype == torch.float64 else torch.float32
    if matrix.dim() == 2 and min(matrix.shape) >= GRAM_MIN:
        try:
            eig = torch.linalg.eigvalsh(_gram(matrix))
        except (RuntimeError, torch.linalg.LinAlgError):
            eig = None  # fall through to LAPACK's svdvals
        if eig is not None and torch.isfinite(eig).all():
            return eig.flip(0).clamp_min(0).sqrt().to(out_dtype)
    last: Exception | None = None
    for dtype in (out_dtype, torch.float64):
        try:
            s = torch.linalg.svdvals(matrix.to(dtype))
        except (RuntimeError, torch.linalg.LinAlgError) as err:  # LAPACK convergence failure
            last = err
            continue
        if torch.isfinite(s).all():
            return s.to(out_dtype)
        last = RuntimeError("non-finite values")
    raise TRPError(f"SVD of layer {name!r} failed to converge ({last}); its weights may be ill-conditioned")


def _randomized(m: Tensor, k: int, niter: int = 4) -> tuple[tuple[Tensor, Tensor, Tensor], float] | None:
    """Rank-k factors by a randomized range finder with power iterations (Halko et al. 2011, Alg. 4.4
    and 5.1) and Σ_{i≤k} S_i², or None if it fails.

    Every product is a contiguous matrix times M (or M times one): MKL is several times slower on
    a transposed view of a large M. The seed is fixed on a private generator, so the factors are
    deterministic and the caller's random stream is untouched. ``U_k S_k V_kᵀ = P·M`` for an
    orthogonal projection P, so the kept energy gives the error exactly:
    ‖M − U_k S_k V_kᵀ‖² = ‖M‖² − Σ_{i≤k} S_i².
    """
    q = min(min(m.shape), k + max(10, k // 10))
    gen = torch.Generator(device=m.device).manual_seed(0)
    try:
        basis = torch.linalg.qr(m @ torch.randn(m.shape[1], q, generator=gen, device=m.device, dtype=m.dtype)).Q
        for _ in range(niter):  # power iterations sharpen a slowly decaying spectrum
            co = torch.linalg.qr((basis.mT.contiguous() @ m).mT).Q  # orthonormal basis of Mᵀ·Q
            basis = torch.linalg.qr(m @ co.contiguous()).Q
        ub, s, vh = torch.linalg.svd(basis.mT.contiguous() @ m, full_matrices=False)
    except (RuntimeError, torch.linalg.LinAlgError):
        return None
    factors = ((basis @ ub[:, :k]).contiguous(), s[:k].contiguous(), vh[:k].contiguous())
    return factors, float(s[:k].double().pow(2).sum())


def _gram_factors(m: Tensor, k: int) -> tuple[tuple[Tensor, Tensor, Tensor], float] | None:
    """Rank-k factors from the eigenvectors of the short side's Gram matrix, and the kept energy.

    With U_k the top-k eigenvectors of G = M·Mᵀ (orthonormal), B = U_kᵀ·M and M_k = U_k·B is the
    projection of M on their span, so ‖M − M_k‖² = ‖M‖² − ‖B‖². B's rows are S_k·V_kᵀ: S_i is the
    norm of row i. Formed and solved in float32 (BLAS-3 speed); the error check judges the result.
    """
    wide = m.shape[0] <= m.shape[1]
    a = m if wide else m.mT
    try:
        _, vecs = torch.linalg.eigh(a @ a.mT)
    except (RuntimeError, torch.linalg.LinAlgError):
        return None
    u = vecs[:, -k:].flip(1).contiguous()  # eigh sorts ascending
    b = u.mT @ a
    s = b.norm(dim=1)
    vh = b / s.clamp_min(torch.finfo(b.dtype).tiny)[:, None]
    factors = (u, s, vh) if wide else (vh.mT.contiguous(), s, u.mT.contiguous())
    return factors, float(b.double().pow(2).sum())


def svd_rank(matrix: Tensor, k: int, energy: float, name: str = "weight",
             tolerance: float = RANDOMIZED_TOLERANCE) -> tuple[Tensor, Tensor, Tensor]:
    """Factors ``(U, S, Vh)`` whose first k give the best rank-k approximation, taken the cheap way
    on a large matrix and checked, else by the full :func:`svd`.

    ``energy`` is the fraction ``Σ_{i≤k} σ_i² / ‖M‖_F²`` the optimal rank-k approximation keeps (what
    a plan computed from the singular values). On a matrix whose short side is at least
    :data:`RANDOMIZED_MIN`: for k below a quarter of it, a randomized SVD (Halko et al. 2011,
    k + max(10, k/10) columns, 4 power iterations, a fixed seed on a private generator); else, or if
    that falls short, the top-k eigenvectors of the Gram matrix (on one thread, 11 s for k = 1833 of
    a 4096² matrix against 33 s for the full SVD). Each result's error ‖M − U_k S_k V_kᵀ‖_F is known
    exactly from the energy it keeps, and is accepted when within ``tolerance`` of the optimum
    ``sqrt(1 − energy)·‖M‖`` (plus 1e-6·‖M‖² in the squares, for float32 round-off in the plan's
    energies); otherwise the full SVD is taken.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> m = torch.randn(600, 40, generator=g) @ torch.randn(40, 700, generator=g)
        >>> u, s, vh = svd_rank(m, 40, 1.0)
        >>> u.shape, bool(torch.allclose(u * s @ vh, m, atol=1e-3))
        (torch.Size([600, 40]), True)
    """
    short = min(matrix.shape[-2:])
    if matrix.dim() != 2 or short < RANDOMIZED_MIN or not 1 <= k <= short or not 0.0 <= energy <= 1.0:
        return svd(matrix, name)
    _check_finite(matrix, name)
    m = matrix.to(torch.float64 if matrix.dtype == torch.float64 else torch.float32)
    total = float(torch.linalg.vector_norm(m, dtype=torch.float64)) ** 2
    optimal = (1.0 - energy) * total  # ‖M − M_k‖² at the optimum (Eckart–Young)
    allowed = (1.0 + tolerance) ** 2 * optimal + 1e-6 * total
    routes = [_randomized, _gram_factors] if 4 * k < short else [_gram_factors]
    for route in routes:
        found = route(m, k)
        if found is None:
            continue
        (u, s, vh), kept = found
        finite = bool(torch.isfinite(u).all() and torch.isfinite(s).all() and torch.isfinite(vh).all())
        if finite and total - kept <= allowed:
            return u, s, vh
    return svd(matrix, name)


def _check_finite(matrix: Tensor, name: str) -> None:
    if not torch.isfinite(matrix).all():
        raise TRPError(f"layer {name!r} has non-finite weights (NaN or inf); cannot take its SVD")


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
