"""Low-rank algebra on LoRA factors, never forming the dense d × k update.

A LoRA update is ΔW = s·B·A with B ∈ ℝ^{d×r}, A ∈ ℝ^{r×k}. A weighted sum of updates is again a
product of stacked factors:

    Σᵢ λᵢ sᵢ Bᵢ Aᵢ = B_cat · A_cat,   B_cat = [λ₁s₁B₁ … λₙsₙBₙ] (d × R),  A_cat = [A₁; …; Aₙ] (R × k),

with R = Σ rᵢ, and its exact SVD costs O((d + k)·R²) through two thin QRs and an R × R SVD.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch



class LowRankSVD(NamedTuple):
    """ΔW = U · diag(S) · Vh with orthonormal columns of U (d × q) and rows of Vh (q × k)."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor


def stack_factors(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor]], coefficients: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """B_cat = [c₁B₁ … cₙBₙ], A_cat = [A₁; …; Aₙ], so that B_cat·A_cat = Σ cᵢ Bᵢ Aᵢ (float64)."""
    if len(factors) != len(coefficients) or not factors:
        raise ValueError("stack_factors needs one coefficient per (B, A) pair and at least one pair.")
    b_cat = torch.cat([b.to(torch.float64) * float(c) for (b, _), c in zip(factors, coefficients)], dim=1)
    a_cat = torch.cat([a.to(torch.float64) for _, a in factors], dim=0)
    return b_cat, a_cat


def factored_svd(b_cat: torch.Tensor, a_cat: torch.Tensor) -> LowRankSVD:
    """Exact thin SVD of B·A without the d × k product.

    QR(B) = Q_b R_b, QR(Aᵀ) = Q_a R_a, SVD(R_b R_aᵀ) = U' S V'ᵀ  ⇒  B·A = (Q_b U') S (Q_a V')ᵀ.
    Computed in float64; the rank of the result is q = min(d, k, R).
    """
    b = b_cat.to(torch.float64)
    a = a_cat.to(torch.float64)
    q_b, r_b = torch.linalg.qr(b, mode="reduced")  # d × m, m × R   (m = min(d, R))
    q_a, r_a = torch.linalg.qr(a.T, mode="reduced")  # k × n, n × R   (n = min(k, R))
    u_core, s, vh_core = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    return LowRankSVD(q_b @ u_core, s, vh_core @ q_a.T)


def select_rank(
    singular_values: torch.Tensor, svd_rank: Optional[int] = None, rel_tol: Optional[float] = None
) -> int:
    """Rank to keep: ``svd_rank`` (capped at the available rank), else the smallest k whose
    truncation error √(Σ_{j>k} σⱼ²)/‖σ‖ ≤ ``rel_tol``, else the full (exact) rank."""
    available = int(singular_values.numel())
    if svd_rank is not None:
        return min(int(svd_rank), available)
    if rel_tol is None:
        return available
    energy = singular_values.to(torch.float64) ** 2
    total = float(energy.sum())
    if total == 0.0:
        return 0
    # tail[k] = Σ_{j≥k} σⱼ²  (energy dropped when keeping k values)
    tail = torch.flip(torch.cumsum(torch.flip(energy, [0]), 0), [0])
    tail = torch.cat([tail, tail.new_zeros(1)])
    ok = torch.nonzero(torch.sqrt(tail / total) <= rel_tol).flatten()
    return int(ok[0]) if ok.numel() else available


def truncation_error(singular_values: torch.Tensor, rank: int) -> tuple[float, float]:
    """(relative Frobenius error, fraction of energy kept) of keeping the top ``rank`` values:
    error = √(Σ_{j>k} σⱼ²)/‖σ‖ (Eckart–Young), kept = Σ_{j≤k} σⱼ²/‖σ‖²."""
    energy = singular_values.to(torch.float64) ** 2
    total = float(energy.sum())
    if total == 0.0:
        return 0.0, 1.0
    kept = float(energy[:rank].sum()) / total
    # the tail summed directly: √(1 − kept) would lose the digits of a small error to cancellation
    return math.sqrt(float(energy[rank:].sum()) / total), kept


def split_factors(
    svd: LowRankSVD, rank: int, scaling: float = 1.0, dtype: Optional[torch.dtype] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """New LoRA factors with ``scaling``·B·A = U_k S_k Vh_k: B = U_k √(S_k/s), A = √(S_k/s) Vh_k.

    The singular values are split symmetrically for well-conditioned factors. When fewer than
    ``rank`` singular values exist, B and A are padded with zero columns / rows (exact, unused).
    """
    if scaling == 0:
        raise ValueError("The LoRA scaling of the merged adapter must not be zero.")
    kept = min(rank, svd.S.numel())
    root = torch.sqrt(svd.S[:kept] / abs(scaling))
    b = svd.U[:, :kept] * root * math.copysign(1.0, scaling)
    a = root[:, None] * svd.Vh[:kept]
    if kept < rank:
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - kept)], dim=1)
        a = torch.cat([a, a.new_zeros(rank - kept, a.shape[1])], dim=0)
    if dtype is not None:
        b, a = b.to(dtype), a.to(dtype)
    return b.contiguous(), a.contiguous()


def lowrank_frobenius_norm(b: torch.Tensor, a: torch.Tensor) -> float:
    """‖B·A‖_F from the factors, in O((d + k)·r²): with B = Q_b R_b and Aᵀ = Q_a R_a (thin QRs),
    ‖B·A‖_F = ‖R_b R_aᵀ‖_F. Backward stable, so the norm of a difference that cancels (a merged
    update against its target) is accurate to ε·‖B‖‖A‖; the Gram form Σ (BᵀB) ⊙ (AAᵀ) would only
    be accurate to √ε·‖B‖‖A‖ there."""
    b64, a64 = b.to(torch.float64), a.to(torch.float64)
    if b64.numel() == 0 or a64.numel() == 0:
        return 0.0
    r_b = torch.linalg.qr(b64, mode="r").R
    r_a = torch.linalg.qr(a64.T, mode="r").R
    return float(torch.linalg.matrix_norm(r_b @ r_a.T))


def split_and_measure(
    svd: LowRankSVD, rank: int, scaling: float, dtype: torch.dtype
) -> tuple[tuple[torch.Tensor, torch.Tensor], float]:
    """(`split_factors` of ``svd`` at ``rank`` stored in ``dtype``, ‖scaling·B̃·Ã − U·diag(S)·Vh‖²_F).

    With B = U_q D, A = D Vh_q (D = √(S_q/s), float64) and their stored roundings B̃ = B + δB,
    Ã = A + δA, the difference is s(δB·A + B·δA + δB·δA) − U_tail S_tail Vh_tail, whose first part is
    orthogonal to the tail; and since U_q has orthonormal columns and Vh_q orthonormal rows,
    ‖δB·A‖ = ‖δB·D‖, ‖B·δA‖ = ‖D·δA‖ and ⟨δB·A, B·δA⟩ = ±tr(D·(δBᵀU_q)·D·(δA·Vh_qᵀ)). So the error
    costs two q × q products, not a product of the d × k matrices; the second-order δB·δA, which need
    not be orthogonal to the tail, is bounded by ‖δB‖‖δA‖ and added to the norm in full (never less
    than the true error)."""
    kept = min(rank, svd.S.numel())
    b64, a64 = split_factors(svd, rank, scaling)
    b, a = b64.to(dtype), a64.to(dtype)
    tail_sq = float((svd.S[kept:].to(torch.float64) ** 2).sum())
    if dtype == torch.float64:
        return (b, a), tail_sq
    delta_b, delta_a = (b.to(torch.float64) - b64)[:, :kept], (a.to(torch.float64) - a64)[:kept]
    root = torch.sqrt(svd.S[:kept].to(torch.float64) / abs(scaling))
    u, vh = svd.U[:, :kept].to(torch.float64), svd.Vh[:kept].to(torch.float64)
    first = float(torch.linalg.vector_norm(delta_b * root)) ** 2 + float(torch.linalg.vector_norm(root[:, None] * delta_a)) ** 2
    # B = sign(s)·U_q·D: the cross term Σᵢⱼ DᵢXᵢⱼDⱼYⱼᵢ carries the sign
    cross = math.copysign(1.0, scaling) * float((root[:, None] * (delta_b.T @ u) * root * (delta_a @ vh.T).T).sum())
    second = float(delta_b.norm()) * float(delta_a.norm())
    # ‖T + s·F + s·δB·δA‖ ≤ √(‖T‖² + s²‖F‖²) + |s|·‖δB‖‖δA‖ (F ⟂ T; δB·δA need not be)
    bound = math.sqrt(tail_sq + scaling**2 * max(0.0, first + 2.0 * cross)) + abs(scaling) * second
    return (b, a), bound**2


def svd_difference_norm(svd: LowRankSVD, b: torch.Tensor, a: torch.Tensor, scaling: float = 1.0) -> float:
    """‖scaling·B·A − U·diag(S)·Vh‖_F with matrix products of width at most max(q, r), no QR.

    With P = UᵀB', B⊥ = B' − U·P (B' = scaling·B) and Pₐ = A·Vhᵀ, A⊥ = A − Pₐ·Vh, the difference is
    U(P·Pₐ − S)Vh + U·P·A⊥ + B⊥·Pₐ·Vh + B⊥·A⊥, four mutually orthogonal terms (UᵀB⊥ = 0, A⊥Vhᵀ = 0),
    so its squared norm is the sum of theirs. Measures factors cut from an SVD against that SVD: the
    first term carries the truncation, the others the rounding of the stored factors. The SVD differs
    from the product it decomposes by the rounding floor of that product (`rounding_floor`).
    """
    u, s, vh = (t.to(torch.float64) for t in svd)
    b64, a64 = b.to(torch.float64) * float(scaling), a.to(torch.float64)
    p = u.T @ b64
    b_perp = b64 - u @ p
    p_a = a64 @ vh.T
    a_perp = a64 - p_a @ vh
    core = p @ p_a - torch.diag(s)
    total = (
        float((core**2).sum())
        + float(((p @ a_perp) ** 2).sum())
        + float(((b_perp @ p_a) ** 2).sum())
        + max(0.0, float(((b_perp.T @ b_perp) * (a_perp @ a_perp.T)).sum()))  # second order: rounding²
    )
    return math.sqrt(total)


def lowrank_relative_error(
    b: torch.Tensor, a: torch.Tensor, b_ref: torch.Tensor, a_ref: torch.Tensor
) -> float:
    """‖B·A − B_ref·A_ref‖_F / ‖B_ref·A_ref‖_F from factors only: the difference is the product of
    [B, −B_ref] and [A; A_ref], whose Frobenius norm is the norm of its small core (float64)."""
    diff_norm = lowrank_frobenius_norm(torch.cat([b, -b_ref], 1), torch.cat([a, a_ref], 0))
    ref_norm = lowrank_frobenius_norm(b_ref, a_ref)
    if ref_norm == 0.0:
        return 0.0 if diff_norm == 0.0 else math.inf
    return diff_norm / ref_norm


def rounding_floor(b: torch.Tensor, a: torch.Tensor) -> float:
    """Size of the float64 rounding in any quantity computed from the factors of B·A:
    max(d, k, R)·ε·‖B‖_F‖A‖_F. Singular values below it are zero, and a target whose norm is below
    it is zero (e.g. an adapter merged with itself at weights 1 and −1)."""
    size = max(b.shape[0], a.shape[1], b.shape[1])
    return size * torch.finfo(torch.float64).eps * float(b.to(torch.float64).norm()) * float(a.to(torch.float64).norm())


def difference_norm(
    b_new: torch.Tensor, a_new: torch.Tensor, b_ref: torch.Tensor, a_ref: torch.Tensor, scaling: float = 1.0
) -> tuple[float, bool]:
    """(‖s·B_new·A_new − B_ref·A_ref‖_F, whether it is exactly 0), from the factors, in float64.

    Where the stored A is the reference's A (concat, a single input), the difference is
    (s·B_new − B_ref)·A_ref: subtracting the factors first cancels exactly, so an exact merge
    measures 0 even where the target is far below ‖B_ref‖‖A_ref‖. Otherwise the difference is
    the product of [s·B_new, −B_ref] and [A_new; A_ref] (`lowrank_frobenius_norm`)."""
    b64, a64 = b_new.to(torch.float64) * float(scaling), a_new.to(torch.float64)
    b_ref, a_ref = b_ref.to(torch.float64), a_ref.to(torch.float64)
    if a64.shape == a_ref.shape and torch.equal(a64, a_ref):
        delta_b = b64 - b_ref
        if not bool(delta_b.any()):
            return 0.0, True
        return lowrank_frobenius_norm(delta_b, a_ref), False
    return lowrank_frobenius_norm(torch.cat([b64, -b_ref], dim=1), torch.cat([a64, a_ref], dim=0)), False


def relative_error(diff_sq: float, ref_sq: float, floor_sq: float = 0.0) -> tuple[float, float]:
    """(‖merged − target‖/‖target‖, rounding floor/‖target‖). The true error lies within the error ±
    the floor: the floor is what rounding of the inputs lets one measure (and compute). A target below
    the floor counts as zero: error 0 if the difference is below it too, else ∞; floor 1."""
    if ref_sq <= floor_sq:
        return (0.0 if diff_sq <= 4.0 * floor_sq else math.inf), 1.0
    return math.sqrt(diff_sq / ref_sq), min(1.0, math.sqrt(floor_sq / ref_sq))


def measured_error(
    stored: Sequence[tuple[torch.Tensor, torch.Tensor]],
    targets: Sequence[tuple[torch.Tensor, torch.Tensor]],
    scaling: float,
) -> tuple[float, float]:
    """(relative error, rounding floor) of stored factors (one (B, A) per group) against the target
    given as stacked float64 factors (B_cat, A_cat) per group (see `relative_error`); (0, 0) where the
    stored factors are proven to reproduce the target exactly."""
    diff_sq = ref_sq = floor_sq = 0.0
    exact = True
    for (b_new, a_new), (b_ref, a_ref) in zip(stored, targets):
        diff, proven = difference_norm(b_new, a_new, b_ref, a_ref, scaling)
        exact &= proven
        diff_sq += diff**2
        ref_sq += lowrank_frobenius_norm(b_ref, a_ref) ** 2
        floor_sq += rounding_floor(b_ref, a_ref) ** 2
    if exact:
        return 0.0, 0.0
    return relative_error(diff_sq, ref_sq, floor_sq)


def pad_factors(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) of rank q ≤ ``rank`` as rank ``rank``: zero columns of B and rows of A (the same update)."""
    extra = rank - b.shape[1]
    if extra <= 0:
        return b, a
    return torch.cat([b, b.new_zeros(b.shape[0], extra)], dim=1), torch.cat([a, a.new_zeros(extra, a.shape[1])], dim=0)


__all__ = [
    "LowRankSVD",
    "stack_factors",
    "factored_svd",
    "select_rank",
    "truncation_error",
    "split_factors",
    "lowrank_frobenius_norm",
    "lowrank_relative_error",
    "svd_difference_norm",
    "split_and_measure",
    "rounding_floor",
    "difference_norm",
    "relative_error",
    "measured_error",
    "pad_factors",
]
