"""What each strategy does: the implementations the strategy registry carries.

A strategy is either a `ParameterRule` — it merges an adapter's parameters themselves, Φ = Σ wᵢ Φᵢ
with weights that may depend on the parameter (``lora_linear_only_negate_b`` uses |λᵢ| for A) — or a
`DeltaWRule`, which merges the updates ΔWᵢ = sᵢ Bᵢ Aᵢ of LoRA modules and factors the result again:

* `ExactSVD` (``lora_delta_w_svd``): the exact factored SVD of Σ λᵢ sᵢ Bᵢ Aᵢ, truncated;
* `Concat` (``lora_delta_w_concat``): the stacked factors themselves, exact;
* `TaskVectors` (``ties``, ``dare_*``, ``magnitude_prune``, ``breadcrumbs``): a sparsification of
  each dense ΔWᵢ × a consensus of the survivors (mergekit's generalized task arithmetic), then a
  truncated SVD of the dense result.

The method modules (``methods/lora.py``) apply a rule to their tensors; they never look at a
strategy's name. Rules are pure math over tensors (``ops``); they know no model or file format.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple

import torch

from .ops import task_vectors
from .ops.dense_svd import dense_low_rank, dense_relative_error
from .ops.lowrank import (
    LowRankSVD,
    factored_svd,
    lowrank_frobenius_norm,
    pad_factors,
    rounding_floor,
    select_rank,
    split_factors,
    stack_factors,
)

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
@dataclass
class ModuleMerge:
    """One module's (one fused group's) merged update: how to store it at a rank, and how far that
    is from its target. Exact rules keep the target as stacked factors and the stored factors are
    measured against it; task-vector rules measure their stored factors against the dense merge
    when they make them, since the dense d × k target is not kept."""

    ref_sq: float  # ‖target‖²_F
    floor_sq: float  # squared rounding floor of the target (see ops.lowrank.rounding_floor)
    target: Optional[Factors] = None  # exact target (B_cat, A_cat), float64
    svd: Optional[LowRankSVD] = None  # SVD of the target (exact SVD) or of the dense merge (task vectors)
    stored: Optional[Factors] = None  # task vectors: factors at their own rank, in the stored dtype
    stored_error_sq: float = 0.0  # task vectors: ‖dense merge − s·B·A‖² of ``stored``, measured densely

    def factors(self, rank: int, scaling: float, dtype: torch.dtype) -> Factors:
        """(B, A) of rank ``rank`` with scaling·B·A the (truncated) merged update, in ``dtype``."""
        if self.stored is not None:  # own rank ≤ rank: pad with zeros (exact, unused)
            return pad_factors(*self.stored, rank)
        if self.svd is None:  # the stacked factors themselves (padded where other modules have more)
            b_cat, a_cat = self.target
            return pad_factors((b_cat / scaling).to(dtype), a_cat.to(dtype), rank)
        return split_factors(self.svd, rank, scaling, dtype)

    def energy_kept(self, rank: int) -> float:
        if self.svd is None:
            return 1.0
        kept = self.svd.S[:rank] if self.stored is None else self.svd.S
        return float((kept.to(torch.float64) ** 2).sum()) / self.ref_sq if self.ref_sq else 1.0

    def rank_for(self, tol: Optional[float]) -> int:
        """The rank this module needs: a re-factorised update was truncated to it already; an exact
        SVD is truncated by ``tol`` here (None: its exact rank)."""
        if self.stored is not None:
            return int(self.svd.S.numel())
        return select_rank(self.svd.S, None, tol) if tol is not None else int((self.svd.S > 0).sum())


class DeltaWRule(Rule):
    """Merges the updates ΔWᵢ = sᵢ Bᵢ Aᵢ of one module, then stores the result as factors."""

    #: whether the merged update is Σ λᵢ ΔWᵢ (the report's target) rather than a new dense target
    exact_target: bool = True

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
        and ranks rᵢ, to be stored with ``scaling`` in ``dtype``."""
        raise NotImplementedError  # pragma: no cover - every registered rule is a subclass that defines it

    def default_rank(self, merges: Sequence[ModuleMerge]) -> int:
        """The rank without ``svd_rank`` or ``svd_tol``."""
        return max(merge.svd.S.numel() for merge in merges)

    def choose_rank(self, merges: Sequence[ModuleMerge], options: Mapping[str, Any], notes: List[str]) -> int:
        """One rank for every module of the adapter (a LoRA configuration has a single r):
        ``svd_rank`` capped at what the updates have (with a note), else with ``svd_tol`` the largest
        rank a module needs, else `default_rank`."""
        svd_rank, tol = options.get("svd_rank"), options.get("svd_tol")
        available = max(merge.svd.S.numel() for merge in merges)
        if svd_rank is not None:
            if svd_rank > available:
                notes.append(f"svd_rank={svd_rank} exceeds the rank of the merged update ({available}); used {available}.")
            return max(1, min(svd_rank, available))
        if tol is not None:
            return max(1, max(merge.rank_for(tol) for merge in merges))
        return max(1, self.default_rank(merges))


@dataclass(frozen=True)
class ExactSVD(DeltaWRule):
    """ΔW = Σ λᵢ sᵢ Bᵢ Aᵢ = B_cat·A_cat, its exact SVD from the factors (two thin QRs and an R × R
    SVD); singular values below the rounding floor are zero. Default rank: the exact (numerical) rank."""

    option_names = ("svd_rank", "svd_tol")

    def decompose(self, factors, weights, scalings, ranks, scaling, dtype, options, generator) -> ModuleMerge:
        stacked = stack_factors(factors, [w * s for w, s in zip(weights, scalings)])
        floor = rounding_floor(*stacked)
        svd = factored_svd(*stacked)
        svd = svd._replace(S=torch.where(svd.S > floor, svd.S, torch.zeros_like(svd.S)))
        return ModuleMerge(float((svd.S.to(torch.float64) ** 2).sum()), floor**2, target=stacked, svd=svd)

    def default_rank(self, merges) -> int:
        return max(merge.rank_for(None) for merge in merges)


@dataclass(frozen=True)
class Concat(DeltaWRule):
    """B = [λ₁s₁B₁ … λₙsₙBₙ]/s, A = [A₁; …; Aₙ]: exact, rank Σ rᵢ, no SVD."""

    def decompose(self, factors, weights, scalings, ranks, scaling, dtype, options, generator) -> ModuleMerge:
        stacked = stack_factors(factors, [w * s for w, s in zip(weights, scalings)])
        return ModuleMerge(lowrank_frobenius_norm(*stacked) ** 2, rounding_floor(*stacked) ** 2, target=stacked)

    def choose_rank(self, merges, options, notes) -> int:
        return max(merge.target[0].shape[1] for merge in merges)  # Σ rᵢ (the largest, if modules differ)


@dataclass(frozen=True)
class Sparsifier:
    """Which entries of each task τᵢ survive (and how they are rescaled): ``apply(tasks, options, generator)``."""

    name: str
    option_names: Tuple[str, ...]
    apply: Callable[[torch.Tensor, Mapping[str, Any], Optional[torch.Generator]], torch.Tensor]


@dataclass(frozen=True)
class Consensus:
    """How the surviving λᵢτ̂ᵢ are combined: ``apply(trimmed, weights, options)``."""

    name: str
    option_names: Tuple[str, ...]
    apply: Callable[[torch.Tensor, Sequence[float], Mapping[str, Any]], torch.Tensor]


KEEP_ALL = Sparsifier("keep all", (), lambda tasks, o, g: task_vectors.keep_all(tasks))
KEEP_LARGEST = Sparsifier("magnitude", ("density",), lambda tasks, o, g: task_vectors.keep_largest(tasks, o["density"]))
KEEP_BAND = Sparsifier(
    "breadcrumbs", ("density", "gamma"), lambda tasks, o, g: task_vectors.keep_band(tasks, o["density"], o["gamma"])
)
DROP_AND_RESCALE = Sparsifier(
    "DARE", ("density", "seed"), lambda tasks, o, g: task_vectors.drop_and_rescale(tasks, o["density"], g)
)
SUM = Consensus("sum", (), lambda trimmed, weights, o: task_vectors.weighted_sum(trimmed, weights))
SIGN_ELECTION = Consensus(
    "TIES sign election",
    ("majority_sign_method",),
    lambda trimmed, weights, o: task_vectors.sign_consensus(trimmed, weights, o["majority_sign_method"]),
)


@dataclass(frozen=True)
class TaskVectors(DeltaWRule):
    """τᵢ = ΔWᵢ dense (one module at a time), τ_m = consensus(sparsify(τ), λ), then the truncated SVD
    of τ_m (rank Σ rᵢ by default), stored and measured as stored. The target is τ_m itself."""

    sparsify: Sparsifier
    consensus: Consensus
    exact_target = False

    @property
    def option_names(self) -> Tuple[str, ...]:  # type: ignore[override]
        return tuple(dict.fromkeys(self.sparsify.option_names + self.consensus.option_names + ("svd_rank", "svd_tol")))

    def merge_dense(self, tasks: torch.Tensor, weights: Sequence[float], options, generator) -> torch.Tensor:
        return self.consensus.apply(self.sparsify.apply(tasks, options, generator), weights, options)

    def decompose(self, factors, weights, scalings, ranks, scaling, dtype, options, generator) -> ModuleMerge:
        compute = torch.float64 if factors[0][0].dtype == torch.float64 else torch.float32
        tasks = torch.stack([s * (b.to(compute) @ a.to(compute)) for (b, a), s in zip(factors, scalings)])
        dense = self.merge_dense(tasks, weights, options, generator)
        del tasks
        rank = options.get("svd_rank")
        if rank is None and options.get("svd_tol") is None:
            rank = sum(ranks)
        # a fixed-seed stream for the randomized range finder of large layers: deterministic, and the
        # caller's global torch RNG is never drawn from
        sketch_seed = torch.Generator().manual_seed(int(options.get("seed", 0)))
        svd = dense_low_rank(dense, svd_rank=rank, rel_tol=options.get("svd_tol"), generator=sketch_seed)
        stored = split_factors(svd, svd.S.numel(), scaling, dtype)  # what is written, measured as written
        error = dense_relative_error(dense, stored[0], stored[1], scaling)
        ref_sq = float((dense.to(torch.float64) ** 2).sum())
        # the dense merge is computed in `compute`: a product of rank rᵢ and a sum of n tasks per entry
        eps = torch.finfo(compute).eps
        floor = eps * sum(
            (r + len(factors)) * abs(c) * float(b.double().norm()) * float(a.double().norm())
            for (b, a), c, r in zip(factors, [w * s for w, s in zip(weights, scalings)], ranks)
        )
        return ModuleMerge(ref_sq, floor**2, svd=svd, stored=stored, stored_error_sq=(error**2) * ref_sq)
