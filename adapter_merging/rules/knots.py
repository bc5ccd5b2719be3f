"""KnOTS (Stoica et al., ICLR 2025, "Model merging with SVD to tie the KnOTS"): the task-vector rules of
`task_vectors` run on the tasks' parts of one shared SVD instead of the d × k updates.

The updates side by side have one SVD, [ΔW₁ … ΔW_T] = U diag(S) [V₁ᵀ … V_Tᵀ] (d × Tk), with
ΔWᵢ = sᵢBᵢAᵢ; task i's part is Pᵢ = diag(S)·Vᵢᵀ (p × k), so that ΔWᵢ = U Pᵢ. The rule (sparsification ×
consensus, with its λᵢ, density, convention …, exactly as in full space: ⌈density·N⌉ entries kept per
p × k part, λᵢ applied before the sign election) merges the Pᵢ into P, and the merged update is U·P, of
rank ≤ R = Σ rᵢ, stored from its factors (U, P) by `exact.store_factored`, with no re-factorisation loss.

The SVD comes from the factors, never the d × Tk matrix: with B_s = [s₁B₁ … s_TB_T] = Q_b R_b (thin QR)
and Aᵢᵀ = Qᵢ Rᵢ (thin QR per task), [ΔW₁ … ΔW_T] = Q_b · R_b·blockdiag(R₁ᵀ … R_Tᵀ) · blockdiag(Q₁ … Q_T)ᵀ,
so one SVD of the R × R middle, U_c diag(S) V_cᵀ, gives U = Q_b U_c and Vᵢᵀ = (block i of V_cᵀ)·Qᵢᵀ.

Choices for LoRA inputs (following the authors' code, gstoica27/KnOTS): the task updates are the
effective ones, scaling sᵢ included (their task vectors are fine-tuned minus base weights); the parts
carry the singular values, diag(S)·Vᵢᵀ; only the supported components are kept (theirs: S > 1e-5; here
the numerical rank, S > max(d, Tk)·ε·S_max, so the result does not depend on the updates' scale); the
task weights λᵢ are the rule's (theirs scale the disjoint merge by one coefficient). The SVD is computed
in float64; the parts are merged in float64 for float64 inputs and in float32 otherwise (as the full
space merges its updates); the largest matrices are the T parts of p × k (T times the size of A's stack).
"""
from __future__ import annotations

from typing import Callable, Sequence, Tuple

import torch

from ..ops import chunked
from .base import Factors
from .core_space import numerical_rank


def knots_parts(factors: Sequence[Factors], scalings: Sequence[float],
                dtype: torch.dtype = torch.float64) -> Tuple[torch.Tensor, torch.Tensor]:
    """(U d × p, the parts diag(S)·Vᵢᵀ stacked (T, p, k)) of the SVD of [s₁B₁A₁ … s_TB_TA_T], at its
    numerical rank p, from the factors: the SVD in float64, the parts' last product in ``dtype``."""
    b_s = torch.cat([b.to(torch.float64) * float(s) for (b, _), s in zip(factors, scalings)], dim=1)
    q_b, r_b = torch.linalg.qr(b_s, mode="reduced")  # d × m, m × R
    q_a, r_a = zip(*(torch.linalg.qr(a.to(torch.float64).T, mode="reduced") for _, a in factors))  # k × mᵢ, mᵢ × rᵢ
    middle = r_b @ torch.block_diag(*(r.T for r in r_a))  # m × Σmᵢ
    u_c, s, vh_c = torch.linalg.svd(middle, full_matrices=False)
    d, k = b_s.shape[0], factors[0][1].shape[1]
    p = max(1, numerical_rank(s, d, len(factors) * k))  # one (zero) component where every update is zero
    u = q_b @ u_c[:, :p]
    scaled = s[:p, None] * vh_c[:p]  # diag(S)·V_cᵀ, p × Σmᵢ
    parts, start = torch.empty(len(factors), p, k, dtype=dtype, device=b_s.device), 0
    for part, q in zip(parts, q_a):
        torch.mm(scaled[:, start : start + q.shape[1]].to(dtype), q.T.to(dtype), out=part)  # diag(S)·Vᵢᵀ, p × k
        start += q.shape[1]
    return u, parts


class Parts(chunked.DenseTasks):
    """The stacked parts as the rule's tasks; a sample of entries is gathered by flat index (`torch.take`),
    several times faster than two index tensors."""

    def entries(self, task, rows, cols):
        return torch.take(self.tasks[task], rows * self.shape[1] + cols)


def to_knots_space(factors: Sequence[Factors], scalings: Sequence[float]) -> Tuple[chunked.Tasks, Callable]:
    """The task parts diag(S)·Vᵢᵀ as the rule's tasks, and the map from the merged part P to the factors
    (U, P) of the update it defines. The parts are merged in the precision the full space uses (float64
    inputs in float64, others in float32); the SVD itself is float64."""
    compute = torch.float64 if factors[0][0].dtype == torch.float64 else torch.float32
    u, parts = knots_parts(factors, scalings, compute)
    return Parts(parts), lambda merged: (u, merged.to(torch.float64))


__all__ = ["knots_parts", "Parts", "to_knots_space"]
