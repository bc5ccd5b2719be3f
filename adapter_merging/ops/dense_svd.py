"""Re-factorise a dense (e.g. pruned or sign-merged) d × k update into low rank.

A dense merge result ΔW has no factor structure left, so it is compressed by a truncated SVD,
ΔW ≈ U_q diag(S_q) Vh_q, optimal in Frobenius norm (Eckart–Young). Small matrices, or a rank
chosen from the spectrum (``rel_tol`` / full rank), use the exact SVD; a large matrix with a fixed
``svd_rank`` uses the randomized range finder of Halko, Martinsson & Tropp (2011).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .lowrank import LowRankSVD, select_rank


def _check_count(name: str, value: int, minimum: int) -> int:
    """An integer option ≥ ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer ≥ {minimum}, got {value!r}.")
    return value


def randomized_svd(
    delta_w: torch.Tensor,
    rank: int,
    oversample: int = 10,
    n_iter: int = 2,
    generator: Optional[torch.Generator] = None,
) -> LowRankSVD:
    """Randomized truncated SVD (Halko et al. 2011, Alg. 4.4 + 5.1), in float64:

    Ω ~ N(0, 1)^{k×ℓ} with ℓ = rank + oversample (drawn on the CPU from ``generator``),
    Q = qr(ΔW Ω); ``n_iter`` times: Q = qr(ΔW · qr(ΔWᵀ Q)) (power iterations, re-orthonormalised);
    SVD(Qᵀ ΔW) = Û S Vh  ⇒  ΔW ≈ (Q Û) S Vh, truncated to ``rank``.

    This is the algorithm of ``torch.svd_lowrank`` (which re-orthonormalises the same way; measured
    side by side in ``benchmarks/compare_randomized_svd.py``: the same error and the same time in
    float64). It is kept because its sketch comes from ``generator``. ``torch.svd_lowrank`` has no
    generator argument and draws from the global RNG of the tensor's device, so a seeded call would
    have to re-seed that RNG inside ``fork_rng``; but other threads share it (measured: repeated
    calls stop being deterministic and a concurrent thread's random stream is rewound), and on CUDA
    it is another stream than on the CPU. Here the global RNG is never touched when a ``generator``
    is given, and one seed gives the same sketch on every device.
    """
    w = delta_w.to(torch.float64)
    d, k = w.shape
    width = min(rank + oversample, d, k)
    omega = torch.randn(k, width, generator=generator, dtype=torch.float64, device="cpu").to(w.device)
    q, _ = torch.linalg.qr(w @ omega, mode="reduced")
    for _ in range(n_iter):
        z, _ = torch.linalg.qr(w.T @ q, mode="reduced")
        q, _ = torch.linalg.qr(w @ z, mode="reduced")
    u_small, s, vh = torch.linalg.svd(q.T @ w, full_matrices=False)
    keep = min(rank, s.numel())
    return LowRankSVD((q @ u_small[:, :keep]).contiguous(), s[:keep].contiguous(), vh[:keep].contiguous())


def dense_low_rank(
    delta_w: torch.Tensor,
    svd_rank: Optional[int] = None,
    rel_tol: Optional[float] = None,
    randomized_threshold: int = 1024,
    oversample: int = 10,
    n_iter: int = 2,
    generator: Optional[torch.Generator] = None,
) -> LowRankSVD:
    """Truncated SVD ΔW ≈ U diag(S) Vh with U (d × q), S (q), Vh (q × k), all float64.

    * exact: ``torch.linalg.svd`` of ΔW, truncated to q = select_rank(S, svd_rank, rel_tol)
      (``svd_rank`` wins over ``rel_tol``; neither keeps the full rank). Used when
      min(d, k) ≤ ``randomized_threshold``, when ``svd_rank`` is None, or when
      svd_rank + oversample ≥ min(d, k) (a sketch that wide saves nothing);
    * randomized: `randomized_svd` with q = svd_rank otherwise.
    """
    if delta_w.ndim != 2:
        raise ValueError(f"dense_low_rank needs a 2-D update (d × k), got shape {tuple(delta_w.shape)}.")
    if svd_rank is not None:
        _check_count("svd_rank", svd_rank, 0)
    if rel_tol is not None and not (isinstance(rel_tol, (int, float)) and math.isfinite(rel_tol) and rel_tol >= 0):
        raise ValueError(f"rel_tol must be a finite number ≥ 0 (e.g. 1e-3), got {rel_tol!r}.")
    _check_count("randomized_threshold", randomized_threshold, 0)
    _check_count("oversample", oversample, 0)
    _check_count("n_iter", n_iter, 0)

    w = delta_w.to(torch.float64)
    small = min(w.shape)
    if svd_rank is None or small <= randomized_threshold or svd_rank + oversample >= small:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        q = select_rank(s, svd_rank, rel_tol)
        return LowRankSVD(u[:, :q].contiguous(), s[:q].contiguous(), vh[:q].contiguous())
    if svd_rank == 0:
        return LowRankSVD(w.new_zeros(w.shape[0], 0), w.new_zeros(0), w.new_zeros(0, w.shape[1]))
    return randomized_svd(w, svd_rank, oversample=oversample, n_iter=n_iter, generator=generator)


def dense_relative_error(
    delta_w: torch.Tensor, b: torch.Tensor, a: torch.Tensor, scaling: float = 1.0
) -> float:
    """‖ΔW − s·B·A‖_F / ‖ΔW‖_F in float64; 0 when ΔW = 0 and s·B·A = 0, ∞ when only ΔW = 0."""
    w = delta_w.to(torch.float64)
    approx = float(scaling) * (b.to(device=w.device, dtype=torch.float64) @ a.to(device=w.device, dtype=torch.float64))
    ref_norm = float(torch.linalg.matrix_norm(w))
    diff_norm = float(torch.linalg.matrix_norm(w - approx))
    if ref_norm == 0.0:
        return 0.0 if diff_norm == 0.0 else math.inf
    return diff_norm / ref_norm


__all__ = ["dense_low_rank", "randomized_svd", "dense_relative_error"]
