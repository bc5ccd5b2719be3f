"""Merge weights: from what the user passed to one validated ``[(name, weight), ...]`` list."""
from __future__ import annotations

import math
from collections.abc import Set
from numbers import Real
from typing import Any, Mapping, Sequence

#: |Σ wᵢ| at most this fraction of Σ |wᵢ| is treated as zero when normalising.
ZERO_SUM_TOLERANCE = 1e-8


def check_flag(name: str, value: Any) -> bool:
    """A keyword that must be a real ``bool``: ``"False"``, ``None`` or ``0`` are refused, not read by truthiness."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__}).")
    return value


def resolve_weights(
    names: Sequence[str] | Mapping[str, float],
    weights: Sequence[float] | Mapping[str, float] | None = None,
    normalize_weights: bool = True,
    kind: str = "adapter",
) -> list[tuple[str, float]]:
    """Validate names and weights and return ``[(name, λᵢ)]`` in the given order.

    * no weights → λᵢ = 1/N;
    * ``names`` (or ``weights``) as a dict ``{name: weight}`` is honoured;
    * ``normalize_weights`` → λᵢ = wᵢ / Σⱼ wⱼ, which needs Σ wⱼ > 0.

    Unordered collections (sets) are refused: positional weights would depend on their iteration order.
    """
    check_flag("normalize_weights", normalize_weights)
    names, weights = split_names_and_weights(names, weights, kind)
    if weights is None:
        return [(name, 1.0 / len(names)) for name in names]
    if len(weights) != len(names):
        raise ValueError(
            f"Got {len(weights)} weights for {len(names)} {kind}s ({list(names)}): "
            f"pass exactly one weight per {kind}, or a dict {{name: weight}}."
        )
    values = [_real_weight(weight, f"{kind} '{name}'") for name, weight in zip(names, weights)]
    if normalize_weights:
        try:
            total = math.fsum(values)
        except OverflowError:
            total = math.inf
        if not math.isfinite(total):
            raise ValueError(
                f"The weights {values} sum to more than a float can hold: pass smaller weights, "
                "or normalize_weights=False."
            )
        if abs(total) <= ZERO_SUM_TOLERANCE * math.fsum(abs(w) for w in values):
            raise ValueError(
                f"The weights {values} sum to (nearly) zero, so normalize_weights=True would divide by zero. "
                "For task arithmetic or unlearning with negative weights pass normalize_weights=False."
            )
        if total < 0:
            raise ValueError(
                f"The weights {values} sum to {total:g} < 0: normalising would flip the sign of every weight. "
                "For unlearning with negative weights pass normalize_weights=False."
            )
        values = [w / total for w in values]
    return list(zip(names, values))


def split_names_and_weights(
    names: Sequence[str] | Mapping[str, float], weights: Any = None, kind: str = "adapter"
) -> tuple[list[str], Any]:
    """(names, weights) from what a user passed as ``adapter_list`` and ``weights``: the names checked
    (a non-empty list of distinct strings, in a defined order), the weights as a list, a dict by
    name, or None (their values are checked by `resolve_weights`)."""
    names, weights = _split_names_and_weights(names, weights, kind)
    if len(names) == 0:
        raise ValueError(  # adapters' first sentence, then ours
            f"No {kind}s to average. Pass at least one {kind} name (a list, or a dict {{name: weight}})."
        )
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"{kind.capitalize()} names must be strings, got {name!r} ({type(name).__name__}).")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(
            f"Duplicate {kind} names {duplicates}: each {kind} may appear once. "
            "To give one more weight, pass a single entry with the summed weight."
        )
    return names, weights


def _real_weight(weight: Any, owner: str) -> float:
    """``weight`` as a finite float: Python, numpy and 0-d tensor reals are fine; bools (also numpy's
    and bool tensors), complex numbers (whose imaginary part would be dropped) and strings are not."""
    dtype = str(getattr(weight, "dtype", ""))
    if (
        isinstance(weight, (str, bytes, bool, complex))
        or "bool" in dtype
        or "complex" in dtype
        or (not isinstance(weight, Real) and getattr(weight, "ndim", 0) != 0)
    ):
        raise TypeError(f"The weight of {owner} must be a real number, got {weight!r}.")
    try:  # Python reals, numpy scalars, 0-d arrays and 0-d tensors
        value = float(weight)
    except OverflowError:
        raise ValueError(f"The weight of {owner} is too large for a float: weights must be finite numbers.") from None
    except (TypeError, ValueError):
        raise TypeError(f"The weight of {owner} must be a real number, got {weight!r}.") from None
    if not math.isfinite(value):
        raise ValueError(f"The weight of {owner} is {value}: weights must be finite numbers.")
    return value


def _refuse_unordered(value: Any, what: str, kind: str) -> None:
    if isinstance(value, Set):
        raise TypeError(
            f"{what} is an unordered {type(value).__name__}, so which {kind} gets which weight would depend on "
            f"its iteration order. Pass a list (or a dict {{name: weight}})."
        )


def _split_names_and_weights(names, weights, kind):
    if isinstance(names, str):
        raise TypeError(f"Pass the {kind}s to merge as a list or a dict {{name: weight}}, not the string {names!r}.")
    _refuse_unordered(names, f"The {kind} list", kind)
    _refuse_unordered(weights, "`weights`", kind)
    if isinstance(names, Mapping):
        if weights is not None:
            raise ValueError(f"Pass weights either as a dict of {kind}s or as `weights`, not both.")
        return list(names.keys()), list(names.values())
    if isinstance(weights, Mapping):
        names = list(names)
        missing = [n for n in names if n not in weights]
        extra = [n for n in weights if n not in names]
        if missing or extra:
            raise ValueError(
                f"The weights dict must have one entry per {kind}: missing {missing}, unexpected {extra}."
            )
        return names, [weights[n] for n in names]
    try:
        names = list(names)
    except TypeError:
        raise TypeError(f"Pass the {kind}s to merge as a list or a dict {{name: weight}}, got {names!r}.") from None
    if weights is not None:
        weights = _weight_list(weights, kind)
    return names, weights


def _weight_list(weights: Any, kind: str) -> list:
    """The weights as a list: a sequence, or a 1-D array or tensor (one entry per input)."""
    ndim = getattr(weights, "ndim", None)
    if isinstance(weights, (str, bytes)) or ndim == 0 or not hasattr(weights, "__len__"):
        raise TypeError(
            f"`weights` must be a list of numbers (one weight per {kind}) or a dict, got {weights!r}; "
            f"for a single {kind} pass [{_plain(weights)}]."
        )
    if ndim is not None and ndim != 1:
        raise TypeError(
            f"`weights` must be 1-D (one weight per {kind}), got an array of shape {tuple(weights.shape)}."
        )
    return list(weights.tolist() if hasattr(weights, "tolist") else weights)


def _plain(value: Any) -> Any:
    try:
        return value.item() if hasattr(value, "item") else value
    except (TypeError, ValueError):
        return value
