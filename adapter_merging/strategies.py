"""The strategy registry: every ``combine_strategy`` is declared once, here, with its implementation.

A declaration gives the strategy's name, the adapter families that accept it, its options
(defaults and validation) and its `rules.Rule`, the implementation. A strategy without a rule, or a
rule reading an option the strategy does not declare, cannot be registered. The engine, the method
modules, the front ends and the docs all read this one declaration.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from ._warnings import warn
from .ops.task_vectors import MERGEKIT, OURS, check_convention, check_density, check_gamma, check_sign_method
from .ops.task_vectors import check_epsilon, check_magprune_window
from .rules import (
    DROP_AND_RESCALE,
    KEEP_BAND,
    KEEP_LARGEST,
    SIGN_ELECTION,
    SUM,
    Concat,
    DeltaWRule,
    ExactSVD,
    ParameterRule,
    Rule,
    TaskVectors,
)

from .rules.task_vectors import FULL as FULL_SPACE, check_space
from .rules.della import MAGPRUNE
from .rules.star import DEFAULT_ETA, SpectralTruncation
from .rules.tsv import TaskSingularVectors
from .rules.iso import IsoC, IsoCTS
from .strategy_names import CombineStrategy, SignMethod  # noqa: F401 (re-exported: the names live without torch, for the CLI)

#: Families of adapters, as named in errors and docs.
FAMILY_DESCRIPTIONS: Dict[str, str] = {
    "bottleneck": "bottleneck adapters (seq_bn, par_bn, Compacter, invertible adapters)",
    "prefix_tuning": "prefix tuning",
    "prompt_tuning": "prompt tuning",
    "reft": "ReFT (LoReFT, NoReFT, DiReFT)",
    "lora": "LoRA",
    "lora_gated": "LoRA with gating (UniPELT)",
    "ia3": "IA³",
    "vera": "VeRA",
    "dora": "DoRA",
    "mtl_lora": "MTL-LoRA",
    "head": "prediction heads",
}
ALL_FAMILIES = frozenset(FAMILY_DESCRIPTIONS)


@dataclass(frozen=True)
class Option:
    """One option of a strategy: its default and a validator returning the cleaned value."""

    name: str
    default: Any
    validate: Callable[[str, Any], Any]
    doc: str


@dataclass(frozen=True)
class Strategy:
    """One ``combine_strategy``: its name, the adapter families that accept it, its options and its
    implementation ``rule``."""

    name: str
    families: frozenset
    doc: str
    rule: Rule
    options: Tuple[Option, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.rule, (ParameterRule, DeltaWRule)):
            raise TypeError(f"Strategy '{self.name}' needs a rule (a ParameterRule or a DeltaWRule), got {self.rule!r}.")
        undeclared = sorted(set(self.rule.option_names) - set(self.option_names))
        if undeclared:
            raise TypeError(f"Strategy '{self.name}': its rule reads the undeclared option(s) {undeclared}.")

    @property
    def option_names(self) -> Tuple[str, ...]:
        return tuple(o.name for o in self.options)

    @property
    def merges_delta_w(self) -> bool:
        """Whether the strategy merges the updates ΔW = s·B·A (so ranks and alphas may differ)."""
        return isinstance(self.rule, DeltaWRule)

    @property
    def exact(self) -> bool:
        """Whether the merged adapter is exactly Σ λᵢ ΔWᵢ by construction (no truncation)."""
        return isinstance(self.rule, Concat)

    def parse_options(self, svd_rank: Optional[int], options: Mapping[str, Any], notes: Optional[list] = None) -> Dict[str, Any]:
        """Validate ``svd_rank`` and the strategy options against this declaration, fill defaults.

        ``svd_rank`` with a strategy that has no rank is ignored with a warning (and a note), as
        ``adapters`` does; any other option the strategy does not have is an error."""
        given = dict(options)
        if svd_rank is not None:
            if "svd_rank" in self.option_names:
                given["svd_rank"] = svd_rank
            else:
                warn(
                    f"svd_rank={svd_rank!r} has no effect with combine_strategy='{self.name}' and is ignored. "
                    f"Remove it, or use one of {strategies_with_option('svd_rank')}."
                )
                if notes is not None:
                    notes.append(f"svd_rank={svd_rank} was ignored: combine_strategy='{self.name}' has no rank.")
        unknown = sorted(set(given) - set(self.option_names))
        if unknown:
            valid = ", ".join(self.option_names) or "none"
            raise TypeError(
                f"Unknown option(s) {unknown} for combine_strategy='{self.name}'. Its options are: {valid}."
            )
        parsed = {o.name: o.validate(o.name, given[o.name]) if o.name in given else o.default for o in self.options}
        if parsed.get("normalize") and parsed.get("convention") != MERGEKIT:
            raise ValueError(
                "normalize=True is mergekit's own normalisation and needs convention='mergekit'; "
                "with this library's definitions use normalize_weights=True."
            )
        if parsed.get("svd_rank") is not None and parsed.get("svd_tol") is not None:
            raise ValueError(
                f"Pass either svd_rank (a fixed rank) or svd_tol (the smallest rank whose relative error is at most "
                f"svd_tol), not both: got svd_rank={parsed['svd_rank']}, svd_tol={parsed['svd_tol']}."
            )
        if "epsilon" in parsed and "density" in parsed:  # DELLA: density ± epsilon within [0, 1]
            check_magprune_window(parsed["density"], parsed["epsilon"])
        # breadcrumbs: drop the top gamma, keep the next density (mergekit's convention shrinks the top dropped)
        if "gamma" in parsed and "density" in parsed and parsed.get("convention") != MERGEKIT:
            densities = parsed["density"] if isinstance(parsed["density"], tuple) else (parsed["density"],)
            gamma = max(parsed["gamma"]) if isinstance(parsed["gamma"], tuple) else parsed["gamma"]
            if max(densities) + gamma > 1:
                raise ValueError(
                    f"combine_strategy='{self.name}' drops the largest gamma={gamma:g} of the entries and keeps "
                    f"the next density={max(densities):g}: together more than all of them (density + gamma > 1). "
                    f"Pass density ≤ {1 - gamma:g} (or a smaller gamma)."
                )
        return parsed

    def check_families(self, families) -> None:
        refused = sorted(set(families) - self.families)
        if refused:
            what = ", ".join(FAMILY_DESCRIPTIONS[f] for f in refused)
            supported = strategies_for(families)
            raise ValueError(
                f"{adapters_refusal(self.name, refused)} combine_strategy='{self.name}' does not support {what}. "
                f"Strategies that support these adapters: {supported}."
            )


def adapters_refusal(strategy: str, families) -> str:
    """The sentence ``adapters`` 1.3.0 refuses ``strategy`` with for these families: ours starts with
    it, so that scripts matching it keep working."""
    if "vera" in families:
        return "VeRA only supports linear averaging. The combine_strategy must be 'linear'."
    if "prefix_tuning" in families:
        return f"Combine strategy {strategy} not supported for prefix tuning."
    return f"Combine strategy {strategy} not supported for the chosen adapter methods."


# ---------------------------------------------------------------------------- validators
def _optional_positive_int(name: str, value: Any) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be a positive integer or None, got {value!r}.")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer (or None for the exact rank), got {value}.")
    return int(value)


def _optional_fraction(name: str, value: Any) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number in (0, 1) or None, got {value!r}.")
    if not 0 < value < 1:  # NaN fails this too
        raise ValueError(f"{name} must lie in (0, 1) (a relative Frobenius error), got {value}.")
    return float(value)


#: the seeds a torch.Generator accepts
SEED_RANGE = (-(2**63), 2**64)


def _seed(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}.")
    if not SEED_RANGE[0] <= value < SEED_RANGE[1]:
        raise ValueError(f"{name} must be an integer in [-2**63, 2**64) (a torch.Generator seed), got {value}.")
    return int(value)


SVD_RANK = Option("svd_rank", None, _optional_positive_int, "rank of the merged LoRA (None: exact rank)")
SVD_TOL = Option(
    "svd_tol", None, _optional_fraction, "smallest rank whose relative truncation error is ≤ svd_tol"
)
# the task-vector options are validated by the same functions the tensor operations use
def _density(name: str, value: Any):
    """A density, or one per input (checked against the number of inputs when merging)."""
    if isinstance(value, (list, tuple)):
        return tuple(check_density(v) for v in value)
    return check_density(value)


DENSITY = Option("density", 0.2, _density, "fraction of entries of each ΔWᵢ kept (one number, or one per input)")
SIGN_METHOD = Option(
    "majority_sign_method", "total", lambda name, value: check_sign_method(value), "TIES sign election: 'total' or 'frequency'"
)
def _gamma(name: str, value: Any):
    """A gamma, or one per input (checked against the number of inputs when merging)."""
    if isinstance(value, (list, tuple)):
        return tuple(check_gamma(v) for v in value)
    return check_gamma(value)


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}.")
    return value


def _finite_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}.")
    return float(value)


GAMMA = Option("gamma", 0.01, _gamma, "fraction of largest magnitudes dropped (breadcrumbs; one number, or one per input)")
SEED = Option("seed", 0, _seed, "seed of the random drop mask (same seed, same result)")


def _in_range(high: float, what: str, why: str) -> Callable[[str, Any], float]:
    """A validator of a number in (0, ``high``]: TypeError for a value that is not a number, ValueError
    (saying ``why`` the range is what it is) for one outside it, NaN included."""

    def validate(name: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, Real):
            raise TypeError(f"{name} must be a number in (0, {high:g}]{what}, got {value!r}.")
        if not 0 < value <= high:  # NaN fails this too
            raise ValueError(f"{name} must lie in (0, {high:g}]: {why}, got {value}.")
        return float(value)

    return validate


_common_fraction = _in_range(
    1, "", "the fraction of the merged update's exact rank given to the common subspace (1 is Iso-C)"
)


COMMON_FRACTION = Option(
    "common_fraction", 0.8, _common_fraction,
    "iso_cts: fraction of the exact rank of Σ λᵢ ΔWᵢ spanned by its common subspace, the rest split "
    "evenly among the tasks (the authors' default 0.8; 1 is Iso-C)",
)
def _epsilon(name: str, value: Any):
    """An epsilon, or one per input (checked against the number of inputs when merging)."""
    if isinstance(value, (list, tuple)):
        return tuple(check_epsilon(v) for v in value)
    return check_epsilon(value)


EPSILON = Option(
    "epsilon", 0.15, _epsilon,
    "DELLA: keep probabilities spread over [density − epsilon, density + epsilon] by magnitude rank "
    "(mergekit's default 0.15; one number, or one per input)",
)
# the conventions of the task-vector strategies (their options, declared once here)
CONVENTION = Option(
    "convention", OURS, lambda name, value: check_convention(value),
    "'adapter_merging' (this library's definitions) or 'mergekit' (mergekit 0.1.5's: kept counts "
    "max(1, ⌊density·N⌋), breadcrumbs ⌊gamma·N⌋, TIES sums of the agreeing λᵢτ̂ᵢ, DARE masks without 1/density)",
)
NORMALIZE = Option(
    "normalize", False, _flag,
    "convention='mergekit' only: mergekit's `normalize` (TIES: divide each entry by the signed Σ λᵢ of the "
    "entries kept; others: by Σ λᵢ); pass the weights with normalize_weights=False",
)
SCALE = Option("scale", 1.0, _finite_number, "multiplies the merged update (mergekit's `lambda`)")
RESCALE = Option(
    "rescale", False, _flag, "multiply each sparsified ΔWᵢ by ‖ΔWᵢ‖₁ / ‖sparsified‖₁ (mergekit's `rescale`)"
)
_CONVENTIONS = (CONVENTION, NORMALIZE, SCALE, RESCALE)
#: the merge space of the task-vector strategies (every strategy whose rule is a `TaskVectors` declares it)
SPACE = Option(
    "space", FULL_SPACE, lambda name, value: check_space(value),
    "which matrices the rule merges: 'full' (the dense updates ΔWᵢ, then a truncated SVD), 'core' (Core Space: "
    "the cores U_Bᵀ·sᵢBᵢAᵢ·V_A, Panariello et al. 2025) or 'knots' (KnOTS: the parts diag(S)·Vᵢᵀ of the SVD of "
    "[ΔW₁ … ΔW_T], Stoica et al. 2025); 'core' and 'knots' are stored exactly at rank ≤ Σ rᵢ",
)



_eta = _in_range(
    100, " (a percentage of each update's nuclear norm)",
    "the percentage of each update's nuclear norm that the kept singular values reach (100 keeps every one)",
)


ETA = Option(
    "eta", DEFAULT_ETA, _eta,
    "star: per cent of each ΔWᵢ's nuclear norm the kept leading singular values reach (the authors' default 40)",
)

# ---------------------------------------------------------------------------- registry
STRATEGIES: Dict[str, Strategy] = {}


def register_strategy(strategy: Strategy) -> Strategy:
    if strategy.name in STRATEGIES:
        raise ValueError(f"Strategy '{strategy.name}' is already registered.")
    STRATEGIES[strategy.name] = strategy
    return strategy


def get_strategy(name: str) -> Strategy:
    if not isinstance(name, str) or name not in STRATEGIES:
        # adapters' wording, for scripts that match it
        raise ValueError(f"Invalid combine_strategy {name!r}. Must be one of {list(STRATEGIES)}.")
    return STRATEGIES[name]


def strategies_for(families) -> list:
    """Names of the strategies that accept every family in ``families``."""
    return [s.name for s in STRATEGIES.values() if set(families) <= s.families]


def strategies_with_option(option: str) -> list:
    return [s.name for s in STRATEGIES.values() if option in s.option_names]


LORA = frozenset({"lora"})
_REFACTOR = (SVD_RANK, SVD_TOL)

register_strategy(Strategy(
    "linear", ALL_FAMILIES,
    "Φ = Σ λᵢ Φᵢ over the adapter's parameters (IA³: 1 + Σ λᵢ(lᵢ − 1)). For LoRA, A and B are "
    "combined separately, which adds cross-terms Bᵢ·Aⱼ to the update.",
    ParameterRule(),
))
register_strategy(Strategy(
    "lora_linear_only_negate_b", LORA,
    "A = Σ |λᵢ| Aᵢ, B = Σ λᵢ Bᵢ (Zhang et al. 2023).",
    ParameterRule(absolute=frozenset({"lora_A"})),
))
register_strategy(Strategy(
    "lora_delta_w_svd", LORA,
    "ΔW = Σ λᵢ sᵢ Bᵢ Aᵢ, re-factorised by an exact factored SVD truncated to svd_rank.",
    ExactSVD(), options=_REFACTOR,
))
register_strategy(Strategy(
    "lora_delta_w_concat", LORA,
    "Exact: B = [λ₁s₁B₁ … λₙsₙBₙ]/s, A = [A₁; …; Aₙ], rank Σ rᵢ.",
    Concat(),
))
register_strategy(Strategy(
    "ties", LORA,
    "TIES on the updates ΔWᵢ: trim to `density`, elect signs, disjoint mean; then re-factorise.",
    TaskVectors(KEEP_LARGEST, SIGN_ELECTION), options=(DENSITY, SIGN_METHOD) + _CONVENTIONS + (SPACE,) + _REFACTOR,
))
register_strategy(Strategy(
    "dare_linear", LORA,
    "DARE on the updates ΔWᵢ: drop entries with probability 1 − density, rescale by 1/density, sum.",
    TaskVectors(DROP_AND_RESCALE, SUM), options=(DENSITY, SEED) + _CONVENTIONS + (SPACE,) + _REFACTOR,
))
register_strategy(Strategy(
    "dare_ties", LORA,
    "DARE drop and rescale, then TIES sign election and disjoint mean.",
    TaskVectors(DROP_AND_RESCALE, SIGN_ELECTION), options=(DENSITY, SIGN_METHOD, SEED) + _CONVENTIONS + (SPACE,) + _REFACTOR,
))
register_strategy(Strategy(
    "magnitude_prune", LORA,
    "Keep the top `density` magnitudes of each ΔWᵢ, then Σ λᵢ ΔŴᵢ.",
    TaskVectors(KEEP_LARGEST, SUM), options=(DENSITY,) + _CONVENTIONS + (SPACE,) + _REFACTOR,
))
register_strategy(Strategy(
    "breadcrumbs", LORA,
    "Drop the top `gamma` and keep the next `density` magnitudes of each ΔWᵢ, then Σ λᵢ ΔŴᵢ.",
    TaskVectors(KEEP_BAND, SUM), options=(DENSITY, GAMMA) + _CONVENTIONS + (SPACE,) + _REFACTOR,
))
register_strategy(Strategy(
    "breadcrumbs_ties", LORA,
    "Breadcrumbs' band of each ΔWᵢ (drop the top `gamma`, keep the next `density`), then TIES sign election "
    "and disjoint mean.",
    TaskVectors(KEEP_BAND, SIGN_ELECTION), options=(DENSITY, GAMMA, SIGN_METHOD) + _CONVENTIONS + (SPACE,) + _REFACTOR,
))
register_strategy(Strategy(
    "della", LORA,
    "DELLA on the updates ΔWᵢ: MAGPRUNE (per row, keep probabilities over [density − epsilon, density + "
    "epsilon] by magnitude rank, survivors ÷ their probability), then TIES sign election and disjoint mean.",
    TaskVectors(MAGPRUNE, SIGN_ELECTION),
    options=(DENSITY, EPSILON, SIGN_METHOD, SEED) + _CONVENTIONS + (SPACE,) + _REFACTOR,
))
register_strategy(Strategy(
    "della_linear", LORA,
    "DELLA's MAGPRUNE of each ΔWᵢ (per row, keep probabilities over [density − epsilon, density + epsilon] "
    "by magnitude rank, survivors ÷ their probability), then Σ λᵢ ΔŴᵢ.",
    TaskVectors(MAGPRUNE, SUM), options=(DENSITY, EPSILON, SEED) + _CONVENTIONS + (SPACE,) + _REFACTOR,
))
register_strategy(Strategy(
    "tsv", LORA,
    "TSV-M (Gargiulo et al. 2025): each ΔWᵢ's exact SVD at its own rank, singular values scaled by λᵢ; the "
    "concatenated singular vectors decorrelated (orthogonal Procrustes), U⊥·diag(λᵢSᵢ)·V⊥ᵀ stored exactly.",
    TaskSingularVectors(), options=_REFACTOR,
))
register_strategy(Strategy(
    "star", LORA,
    "STAR (Lee et al. 2025): each ΔWᵢ truncated to the leading singular values that reach `eta` % of its "
    "nuclear norm, rescaled to keep it; Σ λᵢ·STAR(ΔWᵢ) stored exactly.",
    SpectralTruncation(), options=(ETA,) + _REFACTOR,
))
register_strategy(Strategy(
    "iso_c", LORA,
    "Iso-C (Marczak et al. 2025): Σ λᵢ ΔWᵢ = U S Vᵀ with every singular value replaced by their mean over "
    "its exact rank, mean(S)·U Vᵀ, computed from the factors and stored exactly.",
    IsoC(), options=_REFACTOR,
))
register_strategy(Strategy(
    "iso_cts", LORA,
    "Iso-CTS (Marczak et al. 2025): the top `common_fraction` of the singular directions of Σ λᵢ ΔWᵢ and each "
    "task's top directions off them, orthogonalised, with isotropic singular values; stored exactly.",
    IsoCTS(), options=(COMMON_FRACTION,) + _REFACTOR,
))
