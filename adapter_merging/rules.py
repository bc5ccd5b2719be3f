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

import math
from dataclasses import dataclass
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple

import torch

from .ops import chunked
from .ops.dense_svd import dense_difference, dense_low_rank, squared_norm
from .ops.lowrank import (
    LowRankSVD,
    difference_norm,
    factored_svd,
    lowrank_frobenius_norm,
    pad_factors,
    rounding_floor,
    select_rank,
    split_and_measure,
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


@dataclass(frozen=True)
class ExactSVD(DeltaWRule):
    """ΔW = Σ λᵢ sᵢ Bᵢ Aᵢ = B_cat·A_cat, its exact SVD from the factors (two thin QRs and an R × R
    SVD), singular values below the rounding floor counted as zero; truncated to ``svd_rank``, to
    ``svd_tol``, or by default to the exact (numerical) rank, and split B = U√(S/s), A = √(S/s)Vh."""

    option_names = ("svd_rank", "svd_tol")

    def decompose(self, factors, weights, scalings, ranks, scaling, dtype, options, generator) -> ModuleMerge:
        target = stack_factors(factors, [w * s for w, s in zip(weights, scalings)])
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


@dataclass(frozen=True)
class Sparsifier:
    """Which entries of each task τᵢ survive (and how they are rescaled): ``make(options)`` gives the
    `ops.chunked.Sparsify` that plans it over whole tasks and applies it chunk by chunk."""

    name: str
    option_names: Tuple[str, ...]
    make: Callable[[Mapping[str, Any]], chunked.Sparsify]


@dataclass(frozen=True)
class Consensus:
    """How the surviving λᵢτ̂ᵢ are combined, entry by entry: ``make(options)`` gives the `ops.chunked.Consensus`."""

    name: str
    option_names: Tuple[str, ...]
    make: Callable[[Mapping[str, Any]], chunked.Consensus]


def _convention(options: Mapping[str, Any]) -> str:
    return options.get("convention", chunked.OURS)


def _mergekit(options: Mapping[str, Any]) -> bool:
    return _convention(options) == chunked.MERGEKIT


KEEP_ALL = Sparsifier("keep all", (), lambda o: chunked.KeepAll())
KEEP_LARGEST = Sparsifier(
    "magnitude", ("density", "convention"), lambda o: chunked.KeepWindow(o["density"], 0.0, _convention(o))
)
KEEP_BAND = Sparsifier(
    "breadcrumbs", ("density", "gamma", "convention"),
    lambda o: chunked.KeepWindow(o["density"], o["gamma"], _convention(o), band=True),
)
DROP_AND_RESCALE = Sparsifier(
    "DARE", ("density", "seed", "convention"), lambda o: chunked.DropAndRescale(o["density"], _convention(o))
)
# ours, or mergekit 0.1.5's (its `normalize` is applied by the consensus itself: per entry for TIES)
SUM = Consensus(
    "sum", ("convention", "normalize"),
    lambda o: chunked.mergekit_sum_consensus(o.get("normalize", False)) if _mergekit(o) else chunked.sum_consensus(),
)
SIGN_ELECTION = Consensus(
    "TIES sign election", ("majority_sign_method", "convention", "normalize"),
    lambda o: chunked.mergekit_ties_consensus(o["majority_sign_method"], o.get("normalize", False)) if _mergekit(o)
    else chunked.ties_consensus(o["majority_sign_method"]),
)


#: the randomized re-factorisation of a dense merge (10 oversampling columns) iterates until the error
#: would fall by less than about REFACTOR_TOLERANCE relatively (`dense_svd.randomized_svd`), at most
#: REFACTOR_POWER_ITERATIONS times. Chosen by the accuracy measured in ``python -m benchmarks.run --only
#: refactorisation`` (merges of three rank-16 LoRA updates at 512 × 1376, 1024 × 2752 and 4096 × 11008,
#: rank 48, every task-vector strategy): within 0.06 % of the optimal (Eckart–Young) error in every
#: case, where a fixed two iterations left up to 0.7 % (DARE, whose spectrum decays slowest, at
#: 1024 × 2752) and at 4096 × 11008 it stops after two (TIES) or three (DARE) iterations. The report
#: measures the error actually left.
REFACTOR_TOLERANCE = 5e-4
REFACTOR_POWER_ITERATIONS = 8
#: below this share of ‖τ_m‖², a truncation error is measured on the dense matrix rather than taken
#: from ‖τ_m‖² − ‖kept‖² (whose cancellation would lose its digits)
FORMULA_ABOVE = 1e-3


def measure_refactorisation(dense: torch.Tensor, svd: LowRankSVD, stored: Factors, cast_sq: float, scaling: float):
    """(‖τ_m − s·B̃·Ã‖², ‖τ_m‖², ‖kept‖²) of the stored factors of a truncated SVD of ``dense``.

    The SVD's U_q S_q Vh_q is the best rank-q part of Q·Qᵀ·τ_m (Q its orthonormal range), so
    ‖τ_m − U_q S_q Vh_q‖² = ‖τ_m‖² − Σ_{j≤q} Sⱼ²: a large truncation error costs no product with the
    d × k matrix; the factors' storage error (``cast_sq``, `split_and_measure`) is added by the triangle
    inequality (an upper bound: never less than the error). A small one is measured densely."""
    ref_sq = squared_norm(dense)
    kept_sq = float((svd.S.to(torch.float64) ** 2).sum())
    truncation_sq = ref_sq - kept_sq
    if truncation_sq > FORMULA_ABOVE * ref_sq:
        return (math.sqrt(truncation_sq) + math.sqrt(cast_sq)) ** 2, ref_sq, kept_sq
    diff_sq, ref_sq = dense_difference(dense, stored[0], stored[1], scaling)
    return diff_sq, ref_sq, kept_sq


@dataclass(frozen=True)
class TaskVectors(DeltaWRule):
    """τ_m = consensus(sparsify(τ), λ) of the updates τᵢ = ΔWᵢ of one module, computed chunk of rows by
    chunk (`ops.chunked`: the tasks are never all dense at once), then the truncated SVD of τ_m (rank
    Σ rᵢ by default), stored and measured as stored. The target is τ_m itself."""

    sparsify: Sparsifier
    consensus: Consensus
    exact_target = False

    @property
    def option_names(self) -> Tuple[str, ...]:  # type: ignore[override]
        return tuple(dict.fromkeys(
            self.sparsify.option_names + self.consensus.option_names + ("rescale", "scale", "svd_rank", "svd_tol")
        ))

    def decompose(self, factors, weights, scalings, ranks, scaling, dtype, options, generator) -> ModuleMerge:
        compute = torch.float64 if factors[0][0].dtype == torch.float64 else torch.float32
        tasks = chunked.FactoredTasks(factors, scalings, compute)  # τᵢ = sᵢBᵢAᵢ, a chunk of rows at a time
        dense = chunked.merge(tasks, weights, self.sparsify.make(options), self.consensus.make(options), generator,
                              rescale=bool(options.get("rescale", False)), scale=float(options.get("scale", 1.0)))
        rank = options.get("svd_rank")
        if rank is None and options.get("svd_tol") is None:
            rank = sum(ranks)
        # a fixed-seed stream for the randomized range finder of large layers: deterministic, and the
        # caller's global torch RNG is never drawn from
        sketch_seed = torch.Generator().manual_seed(int(options.get("seed", 0)))
        svd = dense_low_rank(dense, svd_rank=rank, rel_tol=options.get("svd_tol"), generator=sketch_seed,
                             n_iter=REFACTOR_POWER_ITERATIONS, tol=REFACTOR_TOLERANCE)
        stored, cast_sq = split_and_measure(svd, svd.S.numel(), scaling, dtype)  # what is written, measured as written
        diff_sq, ref_sq, kept_sq = measure_refactorisation(dense, svd, stored, cast_sq, scaling)
        # the dense merge is computed in `compute`: a product of rank rᵢ and a sum of n tasks per entry
        eps = torch.finfo(compute).eps
        floor = eps * sum(
            (r + len(factors)) * abs(c) * float(b.double().norm()) * float(a.double().norm())
            for (b, a), c, r in zip(factors, [w * s for w, s in zip(weights, scalings)], ranks)
        )
        available = min(dense.shape)
        return ModuleMerge(stored, ref_sq, floor**2, diff_sq, kept_sq, available)
