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
from .ops.linear import result_dtype
from .report import MergeReport
from .state import Slot
from .strategies import Strategy

#: adapters 1.3.0's first sentence for inputs that cannot be merged
DIFFERENT_CONFIGURATIONS = "Cannot average adapters with different configurations."
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
    """Validate that the inputs can be merged by ``strategy``; return their configuration parts.

    Refusals start with the sentence ``adapters`` 1.3.0 uses for them (scripts may match it)."""
    parts = [config_parts(c) for c in configs]
    for name, config, own in zip(names[1:], configs[1:], parts[1:]):
        if len(own) != len(parts[0]) or any(type(x) is not type(y) for x, y in zip(own, parts[0])):
            raise ValueError(
                f"{DIFFERENT_CONFIGURATIONS} '{names[0]}' ({_describe(configs[0])}) and '{name}' ({_describe(config)}) "
                "are adapters of different methods or configuration types, which cannot be merged. Merge only "
                "adapters of one method (and one configuration), e.g. average the LoRA adapters and the bottleneck "
                "adapters separately."
            )
    if isinstance(configs[0], ConfigUnion) and strategy.name != "linear":
        raise ValueError(
            "Combining adapters with ConfigUnion is only supported with the 'linear' combine_strategy. "
            f"'{names[0]}' is a {_describe(configs[0])} union; merge it with combine_strategy='linear'."
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
                    f"{DIFFERENT_CONFIGURATIONS} '{names[0]}' has {field}={mine!r} "
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
    report = report if report is not None else MergeReport("<merged>", strategy.name, dict(zip(names, weights)))
    units = {name: {_unit(parts[0], s): s for s in tensors[name]} for name in names}
    for name in names[1:]:
        if units[name].keys() != units[names[0]].keys():
            _refuse_incomplete(names[0], name, units[names[0]], units[name])
    tensors = promote_dtypes(names, tensors, report)
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
    return union_like(configs[0], new_parts), merged


def union_like(config, parts: Sequence[Any]):
    """``parts`` as a configuration of the class of ``config``: a single part, or a union of the same
    class (``MAMConfig`` and ``UniPELTConfig`` stay themselves, so ``config.adapter`` keeps working)."""
    if not isinstance(config, ConfigUnion):
        return parts[0]
    union = type(config).__new__(type(config))
    ConfigUnion.__init__(union, *parts)
    return union


def promote_dtypes(names: Sequence[str], tensors: Mapping[str, Tensors], report: MergeReport) -> Dict[str, Tensors]:
    """Inputs of different floating dtypes are merged and stored in the widest (``result_dtype``),
    whatever their order, and the report says so; inputs of one dtype are passed through as they are."""
    dtypes = {name: sorted({str(t.dtype) for t in tensors[name].values() if t.is_floating_point()}) for name in names}
    found = {d for ds in dtypes.values() for d in ds}
    floating = [t.dtype for name in names for t in tensors[name].values() if t.is_floating_point()]
    if not floating:
        return dict(tensors)
    widest = result_dtype(floating)
    report.dtype = str(widest).replace("torch.", "")
    if len(found) <= 1:
        return dict(tensors)
    listing = ", ".join(f"'{n}': {'/'.join(d.replace('torch.', '') for d in dtypes[n])}" for n in names)
    report.notes.append(f"The inputs have different dtypes ({listing}); merged and stored in {report.dtype}, the widest.")
    return {
        name: {s: t.to(widest) if t.is_floating_point() else t for s, t in tensors[name].items()} for name in names
    }


def _refuse_incomplete(first: str, other: str, mine: Mapping[Any, Slot], theirs: Mapping[Any, Slot]) -> None:
    """Two inputs of one configuration whose tensors differ: one lacks a module (deleted by hand?)."""
    lacking, holder, present = (other, first, mine) if set(mine) - set(theirs) else (first, other, theirs)
    missing = sorted(present[u] for u in set(present) - set(mine if lacking == first else theirs))
    keys = ", ".join(slot.key(lacking) for slot in missing[:3]) + (" …" if len(missing) > 3 else "")
    raise ValueError(
        f"Adapter '{lacking}' lacks {keys}, which '{holder}' has: a module was probably deleted from it by hand, "
        "or they were not created with the same configuration on the same model. Merge only complete adapters "
        f"(reload '{lacking}')."
    )


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
