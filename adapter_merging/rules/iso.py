"""Iso-C and Iso-CTS (Marczak et al. 2025, "No Task Left Behind: Isotropic Model Merging with Common
and Task-Specific Subspaces", arXiv 2502.04959; authors' code: danielm1405/iso-merging), computed in
the span of the LoRA factors, never on a d × k matrix.

Both start from the weighted sum M = Σ λᵢ sᵢ Bᵢ Aᵢ = B_cat·A_cat (d × R, R × k, R = Σ rᵢ). Every
update, and every singular vector the methods use, lies in the column space of B_cat and the row space
of A_cat. With the thin QRs B_cat = Q_b R_b and A_catᵀ = Q_a R_a, each task is the small core
Cᵢ = R_b[:, Iᵢ]·R_a[:, Iᵢ]ᵀ (p × q, p, q ≤ R; Iᵢ: task i's columns), M = Q_b (Σ Cᵢ) Q_aᵀ, and the
methods run on the cores: a singular vector u of a core is the singular vector Q_b·u of the update,
and a projection or an orthogonalisation commutes with Q_b (orthonormal columns). So the result is
exact, not an approximation of the dense method.

* ``iso_c``: M = U S Vᵀ, every singular value replaced by their mean over the *exact* rank n of M
  (the singular values above its rounding floor; not over zeros): Iso-C(M) = mean(S₁..ₙ)·U_n V_nᵀ.
* ``iso_cts``: the authors' common and task-specific subspaces, with their dimension min(d, k) read as
  the exact rank n of M (a LoRA sum has no more directions; the Core Space paper's core dimension R is
  the same number whenever the sum does not cancel): k_c = ⌊n·f⌋ (f = ``common_fraction``), then
  m = round((n − k_c)/T) directions per task (at most ⌊n/T⌋) and k_c = n − T·m, as the authors make the
  task part divisible; the common subspace is the top k_c singular triplets of M; each task's update
  λᵢsᵢBᵢAᵢ projected off the common left subspace, (I − U_c U_cᵀ)·λᵢΔWᵢ, gives its top m triplets
  (only those above the rounding floor: a task with fewer directions gives fewer); the union of the
  left vectors and of the right vectors are each orthogonalised (polar factor W Zᵀ of X = W Σ Zᵀ, the
  nearest orthonormal matrix, as the authors do), and every singular value becomes the mean of the
  collected ones. T counts the tasks whose weighted update is not zero (a weight of 0 takes no slot).
  With f = 1 it is Iso-C.

The merged update's singular values are all equal, so every truncation is optimal: ``svd_rank`` /
``svd_tol`` keep the directions in the order of their singular values before the isotropic step (the
sum's for Iso-C, the collected ones for Iso-CTS), the value unchanged; the report measures against the
whole isotropic update. Where collected directions coincide (an adapter given twice), the dependent
part of the orthogonalisation is left out (the polar factor of the nonzero singular values only) rather
than filled with arbitrary vectors; the result is then stored by `exact.store_factored`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List, Mapping, Sequence, Tuple

import torch

from ..ops.lowrank import LowRankSVD, rounding_floor, split_and_measure, stack_factors
from .base import DeltaWRule, Factors, ModuleMerge, own_rank
from .exact import store_factored

#: columns of the collected left (right) vectors whose singular value is at most this are dependent:
#: they are unit vectors, so the values lie in [0, √n]; rounding leaves about 1e-15 where they coincide
DEPENDENT = 1e-9


def task_split(rank: int, tasks: int, common_fraction: float) -> Tuple[int, int]:
    """(k_c, m): the common subspace's dimension and each task's, for a sum of exact rank ``rank`` of
    ``tasks`` tasks, as the authors compute them (the task part a multiple of the number of tasks)."""
    if tasks == 0 or rank == 0:
        return rank, 0
    common = int(rank * common_fraction)
    per_task = min(round((rank - common) / tasks), rank // tasks)
    return rank - per_task * tasks, per_task


def _cores(factors: Sequence[Factors], coefficients: Sequence[float]):
    """(Q_b, Q_a, [Cᵢ], floor): the orthonormal bases of the stacked factors' column and row spaces,
    each task's core Cᵢ = R_b[:, Iᵢ] R_a[:, Iᵢ]ᵀ (so that cᵢBᵢAᵢ = Q_b Cᵢ Q_aᵀ) and the rounding floor
    of the sum."""
    b_cat, a_cat = stack_factors(factors, coefficients)
    floor = rounding_floor(b_cat, a_cat)
    q_b, r_b = torch.linalg.qr(b_cat, mode="reduced")
    q_a, r_a = torch.linalg.qr(a_cat.T, mode="reduced")
    cores, start = [], 0
    for b, _ in factors:
        stop = start + b.shape[1]
        cores.append(r_b[:, start:stop] @ r_a[:, start:stop].T)
        start = stop
    return q_b, q_a, cores, floor


def _polar(x: torch.Tensor) -> Tuple[torch.Tensor, bool]:
    """(W Zᵀ of x = W Σ Zᵀ over the singular values above `DEPENDENT`, whether none was dropped)."""
    w, sigma, zh = torch.linalg.svd(x, full_matrices=False)
    keep = int((sigma > DEPENDENT).sum())
    return w[:, :keep] @ zh[:keep], keep == sigma.numel()


def _store_isotropic(
    u: torch.Tensor, value: float, vh: torch.Tensor, floor: float, smallest: float,
    scaling: float, dtype: torch.dtype, options: Mapping[str, Any],
) -> ModuleMerge:
    """Store value·U·Vh (U d × n orthonormal columns, Vh n × k orthonormal rows: its exact SVD, in the
    order truncations keep), truncated to svd_rank / svd_tol, measured against the whole of it.

    Its rounding floor is the sum's floor carried to the singular vectors: value·floor/σ_min of the
    sum's directions used (they are fixed to floor/σ), never below the rounding of the result itself."""
    n = int(u.shape[1])
    svd = LowRankSVD(u, torch.full((n,), float(value), dtype=torch.float64, device=u.device), vh)
    rank = own_rank(svd.S, options, n)
    stored, diff_sq = split_and_measure(svd, rank, scaling, dtype)
    ref_sq = n * float(value) ** 2
    propagated = 2.0 * abs(value) * floor / smallest if smallest > 0 else 0.0
    own = max(u.shape[0], vh.shape[1], n) * torch.finfo(torch.float64).eps * math.sqrt(ref_sq)
    return ModuleMerge(stored, ref_sq, max(propagated, own) ** 2, diff_sq, rank * float(value) ** 2, n)


def _empty(factors: Sequence[Factors], scaling: float, dtype: torch.dtype) -> ModuleMerge:
    """The merge of updates that sum to zero (below their rounding floor): zero, rank 0."""
    b, a = factors[0]
    stored = (b.new_zeros(b.shape[0], 0, dtype=dtype), a.new_zeros(0, a.shape[1], dtype=dtype))
    return ModuleMerge(stored, 0.0, 0.0, 0.0, 0.0, 0, exact=True)


def _sum_in_cores(factors, weights, scalings):
    """(Q_B, Q_A, the tasks' cores, the rounding floor, the SVD of the sum of the cores, the exact rank of
    Σ λᵢ sᵢ Bᵢ Aᵢ): what Iso-C and Iso-CTS both start from."""
    q_b, q_a, cores, floor = _cores(factors, [w * s for w, s in zip(weights, scalings)])
    svd = torch.linalg.svd(sum(cores), full_matrices=False)
    return q_b, q_a, cores, floor, svd, int((svd.S > floor).sum())


@dataclass(frozen=True)
class IsoC(DeltaWRule):
    """Iso-C: M = Σ λᵢ sᵢ Bᵢ Aᵢ = U S Vᵀ (exact, from the factors), S replaced by its mean over the
    exact rank of M: mean(S)·U Vᵀ (see the module docstring)."""

    exact_target = False
    option_names = ("svd_rank", "svd_tol")

    def decompose(self, factors, weights, scalings, ranks, scaling, dtype, options, generator) -> ModuleMerge:
        q_b, q_a, cores, floor, (u, s, vh), n = _sum_in_cores(factors, weights, scalings)
        if n == 0:
            return _empty(factors, scaling, dtype)
        return _store_isotropic(
            q_b @ u[:, :n], float(s[:n].mean()), vh[:n] @ q_a.T, floor, float(s[n - 1]), scaling, dtype, options
        )


@dataclass(frozen=True)
class IsoCTS(DeltaWRule):
    """Iso-CTS: the common subspace of M = Σ λᵢ sᵢ Bᵢ Aᵢ (its top ``common_fraction`` of the exact
    rank) and each task's top directions off it, orthogonalised, with isotropic singular values (see
    the module docstring)."""

    exact_target = False
    option_names = ("common_fraction", "svd_rank", "svd_tol")

    def decompose(self, factors, weights, scalings, ranks, scaling, dtype, options, generator) -> ModuleMerge:
        q_b, q_a, cores, floor, (u, s, vh), n = _sum_in_cores(factors, weights, scalings)
        if n == 0:
            return _empty(factors, scaling, dtype)
        tasks = [c for c in cores if float(torch.linalg.matrix_norm(c)) > floor]
        common, per_task = task_split(n, len(tasks), options["common_fraction"])
        u_c = u[:, :common]
        lefts: List[torch.Tensor] = [u_c]
        values: List[torch.Tensor] = [s[:common]]
        rights: List[torch.Tensor] = [vh[:common]]
        smallest = float(s[n - 1])
        if per_task:
            for core in tasks:
                u_t, s_t, vh_t = torch.linalg.svd(core - u_c @ (u_c.T @ core), full_matrices=False)
                keep = min(per_task, int((s_t > floor).sum()))
                lefts.append(u_t[:, :keep])
                values.append(s_t[:keep])
                rights.append(vh_t[:keep])
                if keep:
                    smallest = min(smallest, float(s_t[keep - 1]))
        collected = torch.cat(values)
        order = torch.argsort(collected, descending=True, stable=True)  # the order truncations keep
        value = float(collected.mean())
        left, left_full = _polar(torch.cat(lefts, dim=1)[:, order])
        right, right_full = _polar(torch.cat(rights, dim=0)[order].T)
        if left_full and right_full:
            return _store_isotropic(q_b @ left, value, right.T @ q_a.T, floor, smallest, scaling, dtype, options)
        # coinciding directions: the partial isometries' product is no longer an SVD; store it exactly
        return store_factored((q_b @ left * value, right.T @ q_a.T), scaling, dtype, options)
