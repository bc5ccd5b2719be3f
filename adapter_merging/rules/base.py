"""The rule types every strategy's implementation is one of, and what a merged LoRA module holds.

A strategy is either a `ParameterRule` — it merges an adapter's parameters themselves, Φ = Σ wᵢ Φᵢ
with weights that may depend on the parameter (``lora_linear_only_negate_b`` uses |λᵢ| for A) — or a
`DeltaWRule`, which merges the updates ΔWᵢ = sᵢ Bᵢ Aᵢ of LoRA modules and stores the result as
factors (`ModuleMerge`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import torch

from ..ops.lowrank import pad_factors, select_rank

Factors = Tuple[torch.Tensor, torch.Tensor]  # (B, A)


class Rule:
    """How a strategy merges (see the module docstring)."""

    #: option names the rule reads (the strategy must declare them)
    option_names: Tuple[str, ...] = ()


# ----------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class ParameterRule(Rule):
    """Φ = Σ wᵢ Φᵢ over the parameters; ``absolute`` names the parameters merged with |λᵢ|."""

    absolute: frozenset = frozenset()

    def weights_for(self, param: str, weights: Sequence[float]) -> List[float]:
        return [abs(w) for w in weights] if param in self.absolute else list(weights)


# ----------------------------------------------------------------------------- updates ΔW
#: a target whose rounding floor is above this fraction of it is measured against its stacked factors
#: (QR-based, exact to the floor) instead of against its SVD (`split_and_measure`: products only)
CANCELLING = 1e-9


@dataclass
class ModuleMerge:
    """One module's (one fused group's) merged update, as stored: its factors at the module's own rank
    (in the stored dtype, for the merged scaling) and what they cost, measured when they were made,
    while the target was at hand. Other modules may need a higher rank: `factors` pads with zeros."""

    stored: Factors  # (B, A) at this module's own rank
    ref_sq: float  # ‖target‖²_F
    floor_sq: float  # squared rounding floor of the target (see ops.lowrank.rounding_floor)
    diff_sq: float  # ‖scaling·B·A − target‖²_F of ``stored``
    kept_sq: float  # ‖kept part of the target‖²: the energy a truncation kept
    available: int  # the rank the merged update has (the most a module could be given)
    exact: bool = False  # ``stored`` is proven to reproduce the target exactly

    @property
    def rank(self) -> int:
        return int(self.stored[0].shape[1])

    def factors(self, rank: int) -> Factors:
        """(B, A) of rank ``rank`` ≥ this module's own: zero columns of B and rows of A (the same update)."""
        return pad_factors(*self.stored, rank)


class DeltaWRule(Rule):
    """Merges the updates ΔWᵢ = sᵢ Bᵢ Aᵢ of one module, then stores the result as factors."""

    #: whether the merged update is Σ λᵢ ΔWᵢ (the report's target) rather than a target of its own
    exact_target: bool = True

    def target(self, strategy: str, options: Mapping[str, Any]) -> Optional[str]:
        """What the report measures against, where it is not Σ λᵢ ΔWᵢ (None: it is)."""
        return None if self.exact_target else f"the {strategy} merge of the ΔWᵢ, computed from their factors"

    def truncation_cause(self, options: Mapping[str, Any]) -> str:
        """Why truncating the merged update loses (said in the warning when it loses more than 10 %)."""
        return "the merged update has a higher rank than the one asked"

    def decompose(
        self,
        factors: Sequence[Factors],
        weights: Sequence[float],
        scalings: Sequence[float],
        ranks: Sequence[int],
        scaling: float,
        dtype: torch.dtype,
        options: Mapping[str, Any],
        generator: Optional[torch.Generator],
    ) -> ModuleMerge:
        """The merged update of one module from its inputs' factors (Bᵢ, Aᵢ), weights λᵢ, scalings sᵢ
        and ranks rᵢ, stored with ``scaling`` in ``dtype`` at the rank the options give this module."""
        raise NotImplementedError  # pragma: no cover - every registered rule is a subclass that defines it

    def choose_rank(self, merges: Sequence[ModuleMerge], options: Mapping[str, Any], notes: List[str]) -> int:
        """One rank for every module of the adapter (a LoRA configuration has a single r): the largest a
        module was given; modules given fewer are zero-padded (exactly the same update)."""
        svd_rank = options.get("svd_rank")
        available = max(merge.available for merge in merges)
        if svd_rank is not None and svd_rank > available:
            notes.append(f"svd_rank={svd_rank} exceeds the rank of the merged update ({available}); used {available}.")
        return max(1, max(merge.rank for merge in merges))


def own_rank(singular_values: torch.Tensor, options: Mapping[str, Any], default: int) -> int:
    """The rank one module is given: ``svd_rank`` (capped at what it has), or the smallest whose relative
    error is ≤ ``svd_tol``, or ``default``."""
    if options.get("svd_rank") is not None:
        return min(int(options["svd_rank"]), int(singular_values.numel()))
    if options.get("svd_tol") is not None:
        return select_rank(singular_values, None, options["svd_tol"])
    return default

