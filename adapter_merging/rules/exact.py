"""The exact LoRA rules: the factored SVD of Σ λᵢ sᵢ Bᵢ Aᵢ (``lora_delta_w_svd``) and the stacked
factors themselves (``lora_delta_w_concat``). Neither forms a d × k matrix."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ..ops.lowrank import (
    difference_norm,
    factored_svd,
    lowrank_frobenius_norm,
    rounding_floor,
    split_and_measure,
    split_factors,
    stack_factors,
)
from .base import CANCELLING, DeltaWRule, Factors, ModuleMerge, own_rank


@dataclass(frozen=True)
class ExactSVD(DeltaWRule):
    """ΔW = Σ λᵢ sᵢ Bᵢ Aᵢ = B_cat·A_cat, its exact SVD from the factors (two thin QRs and an R × R
    SVD), singular values below the rounding floor counted as zero; truncated to ``svd_rank``, to
    ``svd_tol``, or by default to the exact (numerical) rank, and split B = U√(S/s), A = √(S/s)Vh."""

    option_names = ("svd_rank", "svd_tol")

    def decompose(self, factors, weights, scalings, ranks, scaling, dtype, options, generator) -> ModuleMerge:
        return store_factored(stack_factors(factors, [w * s for w, s in zip(weights, scalings)]), scaling, dtype, options)


def store_factored(target: Factors, scaling: float, dtype: torch.dtype, options: Mapping[str, Any]) -> ModuleMerge:
    """Store the update B_t·A_t given by its factors ``target`` (d × R, R × k): its exact SVD from the
    factors (two thin QRs and an R × R SVD; singular values below the rounding floor count as zero),
    truncated to ``svd_rank`` / ``svd_tol`` (default: the exact rank), split B = U√(S/s), A = √(S/s)Vh for
    the merged ``scaling`` in ``dtype``, and measured against the target as stored. Every rule whose
    merged update is known as factors (exact sums, core space, KnOTS, TSV, Iso, STAR) ends here, so
    its report is its error against its own definition."""
    floor = rounding_floor(*target)
    svd = factored_svd(*target)
    values = torch.where(svd.S > floor, svd.S, torch.zeros_like(svd.S))
    ref_sq = float((svd.S.to(torch.float64) ** 2).sum())
    rank = own_rank(values, options, int((values > 0).sum()))
    kept_sq = float((values[:rank].to(torch.float64) ** 2).sum())
    if floor**2 > CANCELLING**2 * ref_sq:  # nearly cancelling: measure against the stacked factors (QR)
        stored = split_factors(svd._replace(S=values), rank, scaling, dtype)
        diff, exact = difference_norm(*stored, *target, scaling)
        return ModuleMerge(stored, ref_sq, floor**2, diff**2, kept_sq, int(svd.S.numel()), exact)
    # against the SVD (the target to far below its rounding floor): truncation and storage, by products
    stored, diff_sq = split_and_measure(svd, rank, scaling, dtype)
    return ModuleMerge(stored, ref_sq, floor**2, diff_sq, kept_sq, int(svd.S.numel()))


@dataclass(frozen=True)
class Concat(DeltaWRule):
    """B = [λ₁s₁B₁ … λₙsₙBₙ]/s, A = [A₁; …; Aₙ]: exact, rank Σ rᵢ, no SVD."""

    def decompose(self, factors, weights, scalings, ranks, scaling, dtype, options, generator) -> ModuleMerge:
        b_cat, a_cat = target = stack_factors(factors, [w * s for w, s in zip(weights, scalings)])
        stored = ((b_cat / scaling).to(dtype), a_cat.to(dtype))
        diff, exact = difference_norm(*stored, *target, scaling)
        ref_sq = lowrank_frobenius_norm(*target) ** 2
        return ModuleMerge(stored, ref_sq, rounding_floor(*target) ** 2, diff**2, ref_sq, int(b_cat.shape[1]), exact)

