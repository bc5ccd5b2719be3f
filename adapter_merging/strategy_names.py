"""The names of the strategies and of their enumerated options, importable without torch.

The command line's ``--help`` reads them from here, so it starts in a fraction of a second; the
registry (`adapter_merging.strategies`, which imports torch) declares the strategies themselves,
and a test keeps these names equal to it.
"""
from __future__ import annotations

from typing import Literal, Tuple, get_args

#: the names of the registered strategies, for type checkers and IDEs (a test keeps it equal to the registry)
CombineStrategy = Literal[
    "linear",
    "lora_linear_only_negate_b",
    "lora_delta_w_svd",
    "lora_delta_w_concat",
    "ties",
    "dare_linear",
    "dare_ties",
    "magnitude_prune",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "tsv",
    "star",
    "iso_c",
    "iso_cts",
]
#: TIES sign election (``majority_sign_method``)
SignMethod = Literal["total", "frequency"]

#: whose definitions the task-vector strategies follow (``convention``)
Convention = Literal["adapter_merging", "mergekit"]

#: where a task-vector rule runs (``space``): the full d × k updates, the Core Space of the stacked
#: factors (Panariello et al. 2025), or KnOTS' aligned space (Stoica et al. 2025)
Space = Literal["full", "core", "knots"]

#: the strategy names in the registry's order
STRATEGY_NAMES: Tuple[str, ...] = get_args(CombineStrategy)
#: the sign election methods
SIGN_METHOD_NAMES: Tuple[str, ...] = get_args(SignMethod)
#: the merge spaces
SPACE_NAMES: Tuple[str, ...] = get_args(Space)
