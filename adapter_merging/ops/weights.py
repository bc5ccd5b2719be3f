"""Merge weights: from what the user passed to one validated ``[(name, weight), ...]`` list."""
from __future__ import annotations

import fnmatch
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


# ----------------------------------------------------------------------------- per-module weights
#: the key of a per-module weights dict that gives the adapter's default weight (required)
DEFAULT_KEY = "*"


def module_name(slot) -> str:
    """The module a slot belongs to, as the merge report and per-module weights name it: the slot's
    module path (``bert.encoder.layer.0.attention.self.query``), or, for tensors stored outside the
    model's modules (Compacter's shared PHM parameters, heads, prefix tuning's prefixes), their
    container (``shared_parameters``, ``heads``, ``prefix_tunings``)."""
    return slot.prefix or slot.container


def has_module_weights(weights: Any) -> bool:
    """Whether ``weights`` (a list, a dict by name, or None) gives some input per-module weights (a dict)."""
    values = weights.values() if isinstance(weights, Mapping) else (weights if isinstance(weights, (list, tuple)) else ())
    return any(isinstance(v, (Mapping, Set)) for v in values)


def default_weights(names: Sequence[str], weights: Any, kind: str = "adapter") -> list:
    """Each input's default weight: its number, or the ``"*"`` entry of its per-module dict (checked by
    `resolve_module_weights`). Used where a merge has no modules to weight (heads)."""
    names, weights = split_names_and_weights(names, weights, kind)
    if weights is None:
        return None
    if len(weights) != len(names):
        raise ValueError(
            f"Got {len(weights)} weights for {len(names)} {kind}s ({list(names)}): "
            f"pass exactly one weight (or per-module dict) per {kind}, or a dict {{name: weight}}."
        )
    for name, weight in zip(names, weights):
        _check_spec_shape(name, weight, kind)
    return [w[DEFAULT_KEY] if isinstance(w, Mapping) else w for w in weights]


def _check_spec_shape(name: str, weight: Any, kind: str) -> None:
    """A per-module weights dict: keyed by non-empty strings, with ``"*"``; no sets."""
    if isinstance(weight, Set):
        raise TypeError(
            f"The weight of {kind} '{name}' is a {type(weight).__name__}: pass a number, or a dict "
            f"{{module name or pattern: number}} with a '{DEFAULT_KEY}' entry (its default weight)."
        )
    if not isinstance(weight, Mapping):
        return
    for key in weight:
        if not isinstance(key, str) or not key:
            raise TypeError(
                f"The per-module weights of {kind} '{name}' must be keyed by module names or glob patterns "
                f"(non-empty strings), got the key {key!r}."
            )
    if DEFAULT_KEY not in weight:
        raise ValueError(
            f"The per-module weights of {kind} '{name}' have no '{DEFAULT_KEY}' entry: add '{DEFAULT_KEY}': <number>, "
            "the weight of the modules no other entry matches."
        )


def resolve_module_weights(
    names: Sequence[str] | Mapping[str, Any],
    weights: Any,
    normalize_weights: bool,
    modules: Sequence[str],
    kind: str = "adapter",
) -> tuple[list[tuple[str, float]], dict[str, list[float]]]:
    """``[(name, default λᵢ)]`` and ``{module: [λᵢ of that module]}`` for the modules whose weights differ
    from the defaults.

    Each input's weight is a number, or a dict ``{module name or pattern: number}`` with a required
    ``"*"`` entry (the input's default). Patterns are shell-style globs (``fnmatch``, case-sensitive:
    ``*`` any characters dots included, ``?`` one, ``[...]`` a set) over the module names of the report
    (`module_name`). For a module: an entry naming it exactly wins; else the first pattern in the dict's
    order that matches it; else ``"*"``. A pattern that matches no module is an error.
    ``normalize_weights`` normalises per module: λᵢ,m = wᵢ,m / Σⱼ wⱼ,m (the defaults likewise among
    themselves)."""
    check_flag("normalize_weights", normalize_weights)
    names, weights = split_names_and_weights(names, weights, kind)
    if weights is None or not has_module_weights(weights):
        return resolve_weights(names, weights, normalize_weights, kind), {}
    if len(weights) != len(names):
        raise ValueError(
            f"Got {len(weights)} weights for {len(names)} {kind}s ({list(names)}): "
            f"pass exactly one weight (or per-module dict) per {kind}, or a dict {{name: weight}}."
        )
    modules = sorted(set(modules))
    specs = [_module_spec(name, weight, modules, kind) for name, weight in zip(names, weights)]
    defaults = resolve_weights(names, [s[DEFAULT_KEY] for s in specs], normalize_weights, kind)
    plain = [w for _, w in defaults]
    table: dict[str, list[float]] = {}
    for module in modules:
        raw = [_weight_of(spec, module) for spec in specs]
        try:
            values = [w for _, w in resolve_weights(names, raw, normalize_weights, kind)]
        except ValueError as error:
            raise ValueError(f"In module '{module}': {error} (normalize_weights=True normalises per module.)") from None
        if values != plain:
            table[module] = values
    return defaults, table


def _module_spec(name: str, weight: Any, modules: Sequence[str], kind: str) -> dict:
    """One input's weight as ``{key: float}`` with ``"*"``, every pattern checked to match a module."""
    _check_spec_shape(name, weight, kind)
    if not isinstance(weight, Mapping):
        return {DEFAULT_KEY: _real_weight(weight, f"{kind} '{name}'")}
    spec = {}
    for key, value in weight.items():
        spec[key] = _real_weight(value, f"{kind} '{name}' in '{key}'")
        if key != DEFAULT_KEY and key not in modules and not any(fnmatch.fnmatchcase(m, key) for m in modules):
            shown = ", ".join(modules[:4]) + (" …" if len(modules) > 4 else "")
            raise ValueError(
                f"The per-module weight pattern '{key}' of {kind} '{name}' matches no module of the merge. Patterns "
                f"are shell-style globs (fnmatch) over module names such as {shown}; see report.modules."
            )
    return spec


def _weight_of(spec: Mapping[str, float], module: str) -> float:
    if module in spec:
        return spec[module]
    for key, value in spec.items():
        if key != DEFAULT_KEY and fnmatch.fnmatchcase(module, key):
            return value
    return spec[DEFAULT_KEY]
