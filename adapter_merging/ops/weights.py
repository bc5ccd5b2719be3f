"""Merge weights: from what the user passed to one validated ``[(name, weight), ...]`` list."""
from __future__ import annotations

import math
from numbers import Real
from typing import Mapping, Sequence

#: |Σ wᵢ| at most this fraction of Σ |wᵢ| is treated as zero when normalising.
ZERO_SUM_TOLERANCE = 1e-8


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
    """
    names, weights = _split_names_and_weights(names, weights, kind)
    if len(names) == 0:
        raise ValueError(f"No {kind}s to merge: pass at least one {kind} name.")
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"{kind.capitalize()} names must be strings, got {name!r} ({type(name).__name__}).")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(
            f"Duplicate {kind} names {duplicates}: each {kind} may appear once. "
            "To give one more weight, pass a single entry with the summed weight."
        )
    if weights is None:
        return [(name, 1.0 / len(names)) for name in names]
    if len(weights) != len(names):
        raise ValueError(
            f"Got {len(weights)} weights for {len(names)} {kind}s ({list(names)}): "
            f"pass exactly one weight per {kind}, or a dict {{name: weight}}."
        )
    values = []
    for name, weight in zip(names, weights):
        if isinstance(weight, (str, bytes, bool)) or type(weight).__name__ == "bool_":
            raise TypeError(f"The weight of {kind} '{name}' must be a real number, got {weight!r}.")
        if not isinstance(weight, Real):
            try:  # accept 0-d tensors and numpy scalars
                weight = float(weight)
            except (TypeError, ValueError):
                raise TypeError(f"The weight of {kind} '{name}' must be a real number, got {weight!r}.") from None
        weight = float(weight)
        if not math.isfinite(weight):
            raise ValueError(f"The weight of {kind} '{name}' is {weight}: weights must be finite numbers.")
        values.append(weight)
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


def _split_names_and_weights(names, weights, kind):
    if isinstance(names, str):
        raise TypeError(f"Pass the {kind}s to merge as a list or a dict {{name: weight}}, not the string {names!r}.")
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
        if isinstance(weights, str) or not hasattr(weights, "__len__"):
            raise TypeError(f"`weights` must be a list of numbers (one per {kind}) or a dict, got {weights!r}.")
        weights = list(weights.tolist() if hasattr(weights, "tolist") else weights)
    return names, weights
