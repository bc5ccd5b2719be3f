"""The one merge engine: configurations + tensors in, configuration + tensors out.

It never touches a model; the model mixin (and any file-based front end) gathers the inputs'
tensors by `adapter_merging.state.Slot`, calls `merge_adapter_tensors`, and writes the
result. Each configuration part is handed to the method module that owns it
(``methods/<method>.py``), together with the slots of that method's containers.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence, Tuple

import torch
from adapters import ConfigUnion

from .methods import METHODS
from .methods.base import Method, MergeContext
from .report import MergeReport
from .state import Slot
from .strategies import Strategy

#: configuration fields that do not change what a merged tensor means
ALWAYS_IGNORED = frozenset({"dropout", "init_weights", "init_weights_seed"})

Tensors = Dict[Slot, torch.Tensor]


def config_parts(config) -> Tuple[Any, ...]:
    """The single-method configurations of ``config`` (the members of a ConfigUnion)."""
    return tuple(config.configs) if isinstance(config, ConfigUnion) else (config,)


def method_for(config) -> Method:
    for method in METHODS:
        if isinstance(config, method.config_types):
            return method
    raise ValueError(f"adapter_merging does not know how to merge adapters configured as {type(config).__name__}.")


def config_differences(first, other, ignored) -> List[Tuple[str, Any, Any]]:
    """[(field, value in first, value in other)] of the fields that differ, ignoring ``ignored``."""
    a, b = first.to_dict(), other.to_dict()
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if k not in ignored and a.get(k) != b.get(k)]


def check_configs(names: Sequence[str], configs: Sequence[Any], strategy: Strategy) -> List[Tuple[Any, ...]]:
    """Validate that the inputs can be merged by ``strategy``; return their configuration parts."""
    parts = [config_parts(c) for c in configs]
    for name, config, own in zip(names[1:], configs[1:], parts[1:]):
        if len(own) != len(parts[0]) or any(type(x) is not type(y) for x, y in zip(own, parts[0])):
            raise ValueError(
                f"Cannot merge '{names[0]}' ({_describe(configs[0])}) with '{name}' ({_describe(config)}): "
                "adapters of different methods or configuration types cannot be merged. Merge only adapters of one "
                "method (and one configuration), e.g. average the LoRA adapters and the bottleneck adapters separately."
            )
    families = set()
    for j, part in enumerate(parts[0]):
        method = method_for(part)
        ignored = ALWAYS_IGNORED | method.may_differ(part, strategy)
        for name, own in zip(names[1:], parts[1:]):
            diffs = config_differences(part, own[j], ignored)
            if diffs:
                field, mine, theirs = diffs[0]
                others = f" (and {', '.join(d[0] for d in diffs[1:])})" if len(diffs) > 1 else ""
                hint = ""
                if method.families_of(part) == {"lora"} and field in ("r", "alpha"):
                    hint = (
                        f" combine_strategy='{strategy.name}' combines the factors A and B entry by entry, so their "
                        "shapes (r) and scalings (alpha) must match; LoRA adapters of different r or alpha can be "
                        "merged with 'lora_delta_w_svd' or 'lora_delta_w_concat'."
                    )
                raise ValueError(
                    f"Cannot merge adapters with different configurations: '{names[0]}' has {field}={mine!r} "
                    f"but '{name}' has {field}={theirs!r}{others}. Merge adapters of one configuration.{hint}"
                )
        families |= method.families_of(part)
    strategy.check_families(families)
    return parts


def merge_adapter_tensors(
    names: Sequence[str],
    weights: Sequence[float],
    configs: Sequence[Any],
    tensors: Mapping[str, Tensors],
    strategy: Strategy,
    options: Mapping[str, Any],
    report: MergeReport | None = None,
) -> Tuple[Any, Tensors]:
    """Merge adapters given as configurations and {slot: tensor}; returns (config, {slot: tensor})."""
    parts = check_configs(names, configs, strategy)
    units = {name: {_unit(parts[0], s) for s in tensors[name]} for name in names}
    for name in names[1:]:
        if units[name] != units[names[0]]:
            missing = sorted(map(str, units[names[0]] - units[name]))[:3]
            extra = sorted(map(str, units[name] - units[names[0]]))[:3]
            raise ValueError(
                f"Adapters '{names[0]}' and '{name}' do not have the same tensors ('{name}' lacks {missing}, "
                f"has unexpected {extra}): they were not created with the same configuration on the same model."
            )
    slots = set().union(*(set(tensors[name]) for name in names))  # methods may store a unit differently per input
    owners = _assign_slots(parts[0], slots)
    generator = torch.Generator().manual_seed(options["seed"]) if "seed" in options else None
    ctx = MergeContext(list(names), list(weights), dict(tensors), strategy, dict(options), report, generator)
    new_parts, merged = [], {}
    for j, part in enumerate(parts[0]):
        method = method_for(part)
        new_part, out = method.merge(ctx, [p[j] for p in parts], owners.get(j, []))
        new_parts.append(new_part)
        merged.update(out)
    new_config = ConfigUnion(*new_parts) if isinstance(configs[0], ConfigUnion) else new_parts[0]
    return new_config, merged


def check_finite(new_name: str, names: Sequence[str], inputs: Mapping[str, Tensors], merged: Tensors, kind: str) -> None:
    """Refuse a merge whose result holds NaN or ±inf: name the input that has them, or else the
    merged tensor that overflowed its dtype. Runs before anything is written to the model."""
    if not merged or bool(torch.isfinite(torch.stack([t.sum().float().cpu() for t in merged.values()])).all()):
        return  # fast path: NaN and ±inf propagate into a sum (a finite sum means finite entries)
    bad = next((slot for slot in sorted(merged) if not bool(torch.isfinite(merged[slot]).all())), None)
    if bad is None:
        return  # only a sum overflowed
    for name in names:
        for slot in sorted(inputs[name]):
            if not bool(torch.isfinite(inputs[name][slot]).all()):
                raise ValueError(
                    f"The {kind} '{name}' has non-finite values (NaN or inf) in {slot.key(name)}, so the merge "
                    f"would be too. Leave it out, or reload or retrain it."
                )
    raise ValueError(
        f"The merged value of {bad.key(new_name)} is not finite: the weights make it overflow "
        f"{merged[bad].dtype}. Use smaller weights (e.g. normalize_weights=True)."
    )


def _assign_slots(parts: Sequence[Any], slots) -> Dict[int, List[Slot]]:
    """Which configuration part (method) merges each slot."""
    owners: Dict[int, List[Slot]] = {}
    for slot in sorted(slots):
        candidates = [j for j, p in enumerate(parts) if slot.container in method_for(p).containers]
        if slot.container == "shared_parameters":
            candidates = [j for j in candidates if method_for(parts[j]).claims_shared(parts[j])]
        if not candidates:
            raise ValueError(
                f"adapter_merging does not know which method owns '{slot.key('<name>')}'; "
                "please report this with your adapter configuration."
            )
        owners.setdefault(candidates[0], []).append(slot)
    return owners


def _unit(parts: Sequence[Any], slot: Slot):
    """What must match across the inputs for ``slot``: the slot itself, or the method's unit of it (a
    prefix-tuning location, stored flat by one input and reparameterised by another)."""
    for part in parts:
        method = method_for(part)
        if slot.container in method.containers and hasattr(method, "unit_of"):
            return method.unit_of(slot)
    return slot


def _describe(config) -> str:
    return " + ".join(type(p).__name__ for p in config_parts(config))
