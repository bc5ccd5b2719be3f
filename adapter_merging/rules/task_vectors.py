"""Task vectors (``ties``, ``dare_*``, ``magnitude_prune``, ``breadcrumbs``, ``breadcrumbs_ties``):
a sparsification of each update τᵢ = ΔWᵢ × a consensus of the survivors (mergekit's generalized task
arithmetic). Its ``space`` option says which matrices the rule merges: ``"full"`` the dense updates,
chunk of rows by chunk, then a truncated SVD of the result; ``"core"`` the small core matrices of
`core_space`; ``"knots"`` the task parts of `knots` (both stored exactly from their factors)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Tuple

import torch

from ..ops import chunked
from ..ops.dense_svd import dense_difference, dense_low_rank, squared_norm
from ..ops.lowrank import LowRankSVD, split_and_measure
from .base import DeltaWRule, Factors, ModuleMerge
from .core_space import to_core_space
from .exact import store_factored
from .knots import to_knots_space

#: the merge spaces of the task-vector rules (their ``space`` option)
FULL, CORE, KNOTS = "full", "core", "knots"
SPACES = (FULL, CORE, KNOTS)
#: a merge space: the tasks' matrices in it, and the map from a merged one to its update's factors
SPACE_MAPS = {CORE: to_core_space, KNOTS: to_knots_space}


def check_space(space: Any) -> str:
    """Validate a ``space``: ``"full"``, ``"core"`` or ``"knots"`` (TypeError for a non-string)."""
    if not isinstance(space, str):
        raise TypeError(f"space must be one of {list(SPACES)} (a string), got {space!r}.")
    if space not in SPACES:
        raise ValueError(
            f"Unknown space {space!r}: use 'full' (merge the dense updates ΔWᵢ), 'core' (the core matrices of "
            "Core Space merging, Panariello et al. 2025) or 'knots' (the task parts of one shared SVD, KnOTS, "
            "Stoica et al. 2025)."
        )
    return space


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
    Σ rᵢ by default), stored and measured as stored. The target is τ_m itself.

    With ``space="core"`` or ``"knots"`` the same rule merges the tasks' matrices of that space
    (`core_space`, `knots`) and the target is the merged update they define (stored exactly)."""

    sparsify: Sparsifier
    consensus: Consensus
    exact_target = False

    @property
    def option_names(self) -> Tuple[str, ...]:  # type: ignore[override]
        return tuple(dict.fromkeys(
            self.sparsify.option_names + self.consensus.option_names
            + ("rescale", "scale", "space", "svd_rank", "svd_tol")
        ))

    def target(self, strategy, options):
        space = options.get("space", FULL)
        if space == FULL:
            return f"the dense {strategy} merge of the ΔWᵢ"
        return f"the {strategy} merge of the ΔWᵢ in {space} space"

    def truncation_cause(self, options):
        if options.get("space", FULL) == FULL:
            return "pruning and sign election make the dense merge high-rank"
        return "the merge in its space has rank up to Σ rᵢ"

    def merge_tasks(self, tasks: chunked.Tasks, weights, options, generator) -> torch.Tensor:
        """τ_m = scale · consensus(sparsify(τ), λ) of the stacked ``tasks`` (any merge space), in their dtype."""
        return chunked.merge(tasks, weights, self.sparsify.make(options), self.consensus.make(options), generator,
                             rescale=bool(options.get("rescale", False)), scale=float(options.get("scale", 1.0)))

    def decompose(self, factors, weights, scalings, ranks, scaling, dtype, options, generator) -> ModuleMerge:
        space = options.get("space", FULL)
        if space != FULL:  # the rule merges the tasks' small matrices of that space; their update is stored exactly
            tasks, factors_of = SPACE_MAPS[space](factors, scalings)
            return store_factored(factors_of(self.merge_tasks(tasks, weights, options, generator)), scaling, dtype, options)
        compute = torch.float64 if factors[0][0].dtype == torch.float64 else torch.float32
        tasks = chunked.FactoredTasks(factors, scalings, compute)  # τᵢ = sᵢBᵢAᵢ, a chunk of rows at a time
        dense = self.merge_tasks(tasks, weights, options, generator)
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
