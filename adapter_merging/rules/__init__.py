"""What each strategy does: the implementations the strategy registry carries, one module per family.

A strategy is either a `ParameterRule` — it merges an adapter's parameters themselves — or a
`DeltaWRule`, which merges the updates ΔWᵢ = sᵢ Bᵢ Aᵢ of LoRA modules and stores the result as
factors again (`base`). The families:

* `exact` — `ExactSVD` (``lora_delta_w_svd``: the exact factored SVD of Σ λᵢ sᵢ Bᵢ Aᵢ, truncated)
  and `Concat` (``lora_delta_w_concat``: the stacked factors themselves);
* `task_vectors` — `TaskVectors` (``ties``, ``dare_*``, ``magnitude_prune``, ``breadcrumbs``,
  ``breadcrumbs_ties``, ``della*``): a sparsification of each ΔWᵢ × a consensus of the survivors (mergekit's
  generalized task arithmetic), in the full d × k space or, with ``space=``, in
* `core_space` — Core Space (Panariello et al. 2025): small cores on the bases of the stacked factors, or
* `knots` — KnOTS (Stoica et al. 2025): the task parts of the SVD of the concatenated updates;
* `della` — DELLA's MAGPRUNE sparsification (Deep et al. 2024);
* `tsv` — TSV-M, task singular vectors (Gargiulo et al. 2025): `TaskSingularVectors`;
* `iso` — Iso-C and Iso-CTS (Marczak et al. 2025): `IsoC`, `IsoCTS`;
* `star` — STAR, spectral truncation and rescale (Lee et al. 2025): `SpectralTruncation`.

The method modules (``methods/lora.py``) apply a rule to their tensors; they never look at a
strategy's name. Rules are pure math over tensors (``ops``); they know no model or file format.
"""
from .base import CANCELLING, DeltaWRule, Factors, ModuleMerge, ParameterRule, Rule, own_rank
from .exact import Concat, ExactSVD, store_factored
from .iso import IsoC, IsoCTS
from .star import SpectralTruncation
from .tsv import TaskSingularVectors
from .task_vectors import (
    DROP_AND_RESCALE,
    FORMULA_ABOVE,
    KEEP_ALL,
    KEEP_BAND,
    KEEP_LARGEST,
    REFACTOR_POWER_ITERATIONS,
    REFACTOR_TOLERANCE,
    SIGN_ELECTION,
    SUM,
    Consensus,
    Sparsifier,
    TaskVectors,
    measure_refactorisation,
)

__all__ = [
    "Rule", "ParameterRule", "DeltaWRule", "ModuleMerge", "Factors", "CANCELLING", "own_rank",
    "ExactSVD", "Concat", "store_factored", "IsoC", "IsoCTS", "SpectralTruncation", "TaskSingularVectors",
    "TaskVectors", "Sparsifier", "Consensus", "KEEP_ALL", "KEEP_LARGEST", "KEEP_BAND", "DROP_AND_RESCALE", "SUM",
    "SIGN_ELECTION", "REFACTOR_TOLERANCE", "REFACTOR_POWER_ITERATIONS", "FORMULA_ABOVE", "measure_refactorisation",
]
