"""Pure tensor math for merging: no knowledge of models or adapters."""
from .linear import combine_state_dicts, compute_dtype, linear_combination
from .lowrank import (
    LowRankSVD,
    factored_svd,
    lowrank_frobenius_norm,
    lowrank_relative_error,
    select_rank,
    split_factors,
    stack_factors,
    truncation_error,
)
from .weights import resolve_weights

__all__ = [
    "combine_state_dicts",
    "compute_dtype",
    "linear_combination",
    "LowRankSVD",
    "factored_svd",
    "lowrank_frobenius_norm",
    "lowrank_relative_error",
    "select_rank",
    "split_factors",
    "stack_factors",
    "truncation_error",
    "resolve_weights",
]
