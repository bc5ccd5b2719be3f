"""Core space (Panariello et al., NeurIPS 2025, "Accurate and Efficient Low-Rank Model Merging in Core
Space"): the task-vector rules of `task_vectors` run on small core matrices instead of the d × k updates.

With the unscaled stacked factors B_cat = [B₁ … B_T] (d × R) and A_cat = [A₁; … ; A_T] (R × k),
R = Σ rᵢ, the reference bases are U_B, the left singular vectors of B_cat, and V_A, the right singular
vectors of A_cat. Every update lies in their span: ΔWᵢ = sᵢBᵢAᵢ = U_B Mᵢ V_Aᵀ with the core

    Mᵢ = U_Bᵀ (sᵢBᵢAᵢ) V_A = sᵢ (U_BᵀBᵢ)(AᵢV_A)        (p × q, p, q ≤ R),

computed from the factors. The rule (sparsification × consensus, with its λᵢ, density, convention …,
exactly as in full space) merges the Mᵢ into M, and the merged update U_B M V_Aᵀ has rank ≤ R; it is
stored from its factors (U_B M, V_Aᵀ) by `exact.store_factored`, with no re-factorisation loss.

Choices for LoRA inputs (following the authors' code, apanariello4/core-space-merging):

* the bases come from the stored, *unscaled* factors (the scalings sᵢ enter the cores, not the bases);
* rank-deficient stacks (e.g. an adapter given twice) keep the numerical rank of each basis: singular
  vectors whose singular value is at most max(d, R)·ε·σ_max (of B_cat; max(k, R)·ε·σ_max of A_cat) are
  left out — they carry no part of any update, and the cores stay square to the rank they span;
* the cores and bases are computed in float64 (they are small: p × q per task).

A linear rule (``magnitude_prune`` with density 1, …) gives U_B (Σ λᵢMᵢ) V_Aᵀ = Σ λᵢ ΔWᵢ to rounding.
No d × k matrix is formed: the largest are the bases and the factors of the result.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch

from ..ops import chunked
from .base import Factors


def numerical_rank(singular_values: torch.Tensor, rows: int, cols: int) -> int:
    """How many singular values exceed max(rows, cols)·ε·σ_max (float64): the numerical rank."""
    if singular_values.numel() == 0:
        return 0
    tol = max(rows, cols) * torch.finfo(torch.float64).eps * float(singular_values.max())
    return int((singular_values > tol).sum())


def left_basis(matrix: torch.Tensor) -> torch.Tensor:
    """The left singular vectors of a tall ``matrix`` (d × R) of nonzero singular values, at its
    numerical rank: a thin QR, then the SVD of the R × R triangle."""
    q, r = torch.linalg.qr(matrix.to(torch.float64), mode="reduced")
    u, s, _ = torch.linalg.svd(r, full_matrices=False)
    rank = max(1, numerical_rank(s, *matrix.shape))  # one (zero-weight) vector where everything is zero
    return q @ u[:, :rank]


def stacks(factors: Sequence[Factors]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The unscaled stacks B_cat = [B₁ … B_T] (d × R) and A_cat = [A₁; … ; A_T] (R × k), float64."""
    return (torch.cat([b.to(torch.float64) for b, _ in factors], dim=1),
            torch.cat([a.to(torch.float64) for _, a in factors], dim=0))


def core_bases(factors: Sequence[Factors]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(U_B d × p, V_A k × q): the left singular vectors of [B₁ … B_T] and the right singular vectors
    of [A₁; … ; A_T] (unscaled, float64), each at its numerical rank."""
    b_cat, a_cat = stacks(factors)
    return left_basis(b_cat), left_basis(a_cat.T)  # right singular vectors of A_cat = left ones of A_catᵀ


def core_matrices(factors: Sequence[Factors], scalings: Sequence[float], u_b: torch.Tensor, v_a: torch.Tensor,
                  stacked: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """The cores Mᵢ = sᵢ (U_BᵀBᵢ)(AᵢV_A), stacked (T, p, q), float64: two products with the stacks
    (U_Bᵀ B_cat, p × R, and A_cat V_A, R × q), then one small product per task."""
    b_cat, a_cat = stacked if stacked is not None else stacks(factors)
    left, right = u_b.T @ b_cat, a_cat @ v_a
    cores, start = [], 0
    for (b, _), s in zip(factors, scalings):
        block = slice(start, start + b.shape[1])
        cores.append(float(s) * (left[:, block] @ right[block]))
        start = block.stop
    return torch.stack(cores)


def to_core_space(factors: Sequence[Factors], scalings: Sequence[float]) -> Tuple[chunked.Tasks, Callable]:
    """The cores Mᵢ = U_Bᵀ sᵢBᵢAᵢ V_A as the rule's tasks, and the map from the merged core M to the
    factors (U_B M, V_Aᵀ) of the update it defines (stored exactly by `store_factored`)."""
    b_cat, a_cat = stacked = stacks(factors)
    u_b, v_a = left_basis(b_cat), left_basis(a_cat.T)
    cores = core_matrices(factors, scalings, u_b, v_a, stacked)
    return chunked.DenseTasks(cores), lambda merged: (u_b @ merged, v_a.T)


__all__ = ["numerical_rank", "left_basis", "stacks", "core_bases", "core_matrices", "to_core_space"]
