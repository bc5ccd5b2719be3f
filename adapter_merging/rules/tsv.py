"""TSV-M, Task Singular Vectors merging (Gargiulo et al., CVPR 2025), computed from the LoRA factors.

Each task's update has the exact SVD ΔWᵢ = sᵢBᵢAᵢ = Uᵢ Sᵢ Vᵢᵀ (from its factors: two thin QRs and an
rᵢ × rᵢ SVD). The task singular vectors are concatenated, U = [U₁ … U_T], V = [V₁ … V_T], with
S = diag(λ₁S₁, …, λ_TS_T), and decorrelated by replacing U and V by their nearest matrices with
orthonormal columns (orthogonal Procrustes: the polar factor U⊥ = P Qᵀ of U = P Σ Qᵀ). The merged
update U⊥ S V⊥ᵀ is stored through `store_factored` from the factors (U⊥ S, V⊥ᵀ): no d × k matrix.

Choices of the LoRA adaptation (see docs/strategies_tsv.md): every task keeps its own exact rank rᵢ
(the authors keep the top 1/T of each dense task's min(d, k) singular vectors; a LoRA's rᵢ is
already small); singular values at the rounding floor are dropped (their vectors are arbitrary), and
so is a task of weight 0 (its vectors would still rotate the others' through the decorrelation);
λᵢ scales the task's singular values (the authors sum the tasks and scale the merge by one α).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch

from ..ops.lowrank import factored_svd, rounding_floor
from .base import DeltaWRule, ModuleMerge
from .exact import store_factored


#: singular values of the concatenated singular vectors below this fraction of the largest mark
#: directions the tasks share (e.g. LoRAs trained from one A); their polar factor is not unique (any
#: completion is one), so the canonical one (Higham) is taken: orthonormal on the span, zero on them
SHARED_DIRECTION = 1e-8
#: the Gram matrix's smallest eigenvalue, relative to its largest, above which the polar factor is taken
#: from it (error ≲ ε/that ratio ≈ 1e-10); below it (task subspaces nearly shared, or more vectors
#: than dimensions) from a thin QR, backward stable at any conditioning
GRAM_CONDITION = 1e-6


def _inverse_sqrt(gram: torch.Tensor):
    """G^{-1/2} of a symmetric positive definite R × R ``gram`` (eigendecomposition), or None where it
    is too ill-conditioned for that to be accurate (`GRAM_CONDITION`)."""
    values, vectors = torch.linalg.eigh(gram)
    if not float(values[0]) > GRAM_CONDITION * float(values[-1]):
        return None
    return (vectors * values.rsqrt()) @ vectors.T


def orthogonal_polar(matrix: torch.Tensor) -> torch.Tensor:
    """The polar factor P Qᵀ of ``matrix`` = P Σ Qᵀ (thin SVD): the matrix with orthonormal columns
    (orthonormal rows when it is wider than tall) nearest to ``matrix`` in Frobenius norm (orthogonal
    Procrustes), float64. For a well-conditioned n × R matrix M it is M (MᵀM)^{-1/2} (one R × R
    eigendecomposition and two products); otherwise a thin QR M = QR and the SVD of R give Q·(P' Q'ᵀ).
    Where M's columns are linearly dependent (singular values ≤ `SHARED_DIRECTION`·σ₁) the polar factor
    is not unique; the canonical one, P_r Q_rᵀ over the others, is returned (a partial isometry)."""
    m = matrix.to(torch.float64)
    if m.shape[0] >= m.shape[1]:
        root = _inverse_sqrt(m.T @ m)
        if root is not None:
            return m @ root
    q, r = torch.linalg.qr(m, mode="reduced")
    p, values, qh = torch.linalg.svd(r, full_matrices=False)
    keep = values > SHARED_DIRECTION * values[0]  # the canonical polar factor: dependent directions dropped
    return q @ (p[:, keep] @ qh[keep])


def orthogonal_polar_rows(matrix: torch.Tensor) -> torch.Tensor:
    """`orthogonal_polar` of an R × k ``matrix`` with R ≤ k: orthonormal rows, (M Mᵀ)^{-1/2} M, returned
    contiguous (row-major, as a LoRA A)."""
    m = matrix.to(torch.float64)
    if m.shape[0] <= m.shape[1]:
        root = _inverse_sqrt(m @ m.T)
        if root is not None:
            return root @ m
    return orthogonal_polar(m.T).T.contiguous()


@dataclass(frozen=True)
class TaskSingularVectors(DeltaWRule):
    """TSV-M: U⊥ diag(λᵢSᵢ) V⊥ᵀ from the tasks' own SVDs (see the module docstring), stored exactly by
    default, truncated to ``svd_rank`` / ``svd_tol``."""

    option_names = ("svd_rank", "svd_tol")
    exact_target = False

    def decompose(self, factors, weights, scalings, ranks, scaling, dtype, options, generator) -> ModuleMerge:
        us: List[torch.Tensor] = []
        values: List[torch.Tensor] = []
        vhs: List[torch.Tensor] = []
        for (b, a), weight, s in zip(factors, weights, scalings):
            if weight == 0:
                continue
            b64 = b.to(torch.float64) * float(s)
            a64 = a.to(torch.float64)
            svd = factored_svd(b64, a64)
            keep = svd.S > rounding_floor(b64, a64)
            us.append(svd.U[:, keep])
            values.append(float(weight) * svd.S[keep])
            vhs.append(svd.Vh[keep])
        d, k = factors[0][0].shape[0], factors[0][1].shape[1]
        if not values or sum(v.numel() for v in values) == 0:  # every task weighted 0 or zero: ΔW = 0
            zero = torch.zeros(d, 1, dtype=torch.float64), torch.zeros(1, k, dtype=torch.float64)
            return store_factored(zero, scaling, dtype, options)
        u_perp = orthogonal_polar(torch.cat(us, dim=1))
        vh_perp = orthogonal_polar_rows(torch.cat(vhs, dim=0))
        return store_factored((u_perp * torch.cat(values), vh_perp), scaling, dtype, options)
