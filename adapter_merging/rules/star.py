"""STAR, Spectral Truncation And Rescale (Lee et al., NAACL 2025, arXiv 2502.10339), from the LoRA factors.

Each task's update ΔWᵢ = sᵢBᵢAᵢ = Σⱼ σⱼ uⱼ vⱼᵀ (exact SVD from its factors: two thin QRs and an
rᵢ × rᵢ SVD) keeps its first κᵢ singular components, κᵢ the smallest count whose singular values sum
to at least η % of the nuclear norm ‖ΔWᵢ‖_* = Σⱼ σⱼ (the authors' rule: their cumulative sum searched
for η/100·‖ΔWᵢ‖_*, plus one); the kept values are rescaled by ‖ΔWᵢ‖_* / Σ_{j≤κᵢ} σⱼ so that the
truncated update keeps the nuclear norm. The merge is Σ λᵢ·STAR(ΔWᵢ), stored through `store_factored`
from the stacked truncated factors [λᵢ U_{i,κ} diag(σ̃ᵢ)] and [V_{i,κ}ᵀ]: no d × k matrix.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch

from ..ops.lowrank import factored_svd
from .base import DeltaWRule, ModuleMerge
from .exact import store_factored

#: the authors' default η (per cent of each task's nuclear norm the kept singular values reach)
DEFAULT_ETA = 40.0


def kept_count(singular_values: torch.Tensor, eta: float) -> int:
    """κ: the number of leading singular values (sorted descending) STAR keeps, the smallest whose
    sum reaches ``eta`` per cent of the sum of all (searchsorted-left + 1, as the authors), capped at
    their number."""
    values = singular_values.to(torch.float64)
    cumulative = torch.cumsum(values, dim=0)
    target = float(values.sum()) * eta / 100.0
    return min(int((cumulative < target).sum()) + 1, int(values.numel()))


def star_factors(b: torch.Tensor, a: torch.Tensor, eta: float):
    """(B̃, Ã) with B̃·Ã = STAR(B·A) at ``eta`` (float64), or None where B·A = 0."""
    svd = factored_svd(b, a)
    total = float(svd.S.sum())
    if total == 0.0:
        return None
    kappa = kept_count(svd.S, eta)
    kept = svd.S[:kappa]
    return svd.U[:, :kappa] * (kept * (total / float(kept.sum()))), svd.Vh[:kappa]


@dataclass(frozen=True)
class SpectralTruncation(DeltaWRule):
    """STAR: Σ λᵢ·STAR(ΔWᵢ) at ``eta`` (see the module docstring), stored exactly by default, truncated
    to ``svd_rank`` / ``svd_tol``."""

    option_names = ("eta", "svd_rank", "svd_tol")
    exact_target = False

    def decompose(self, factors, weights, scalings, ranks, scaling, dtype, options, generator) -> ModuleMerge:
        eta = float(options.get("eta", DEFAULT_ETA))
        bs: List[torch.Tensor] = []
        as_: List[torch.Tensor] = []
        for (b, a), weight, s in zip(factors, weights, scalings):
            if weight == 0:
                continue
            truncated = star_factors(b.to(torch.float64) * float(s), a.to(torch.float64), eta)
            if truncated is not None:
                bs.append(float(weight) * truncated[0])
                as_.append(truncated[1])
        if not bs:  # every task weighted 0 or zero: ΔW = 0
            d, k = factors[0][0].shape[0], factors[0][1].shape[1]
            bs, as_ = [torch.zeros(d, 1, dtype=torch.float64)], [torch.zeros(1, k, dtype=torch.float64)]
        return store_factored((torch.cat(bs, dim=1), torch.cat(as_, dim=0)), scaling, dtype, options)
