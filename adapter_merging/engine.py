"""The one merge engine: inputs (configuration + tensors) in, configuration + tensors + report out.

    merge(inputs, weights, combine_strategy, normalize_weights, svd_rank, options) -> MergeResult

It does everything between gathering and writing: the weights, the strategy and its options, the
checks of the inputs' configurations, the merge itself (each configuration part by the method
module that owns it, ``methods/<method>.py``, applying the strategy's rule) and the finiteness
check. It never touches a model or a file: the front ends (the model mixin, the files on disk, the
CLI) translate their inputs to `AdapterInput` ({`Slot`: tensor} with an ``adapters``
configuration) and write the `MergeResult` back.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from adapters import ConfigUnion

from .methods import METHODS
from .methods.base import Method, MergeContext, dtype_of
from .ops import resolve_weights
from .ops.weights import default_weights, has_module_weights, module_name, resolve_module_weights
from .ops.linear import result_dtype
from .report import MergeReport
from .state import Slot
from .strategies import Strategy, get_strategy

#: configuration fields that do not change what a merged tensor means
ALWAYS_IGNORED = frozenset({"dropout", "init_weights", "init_weights_seed"})

Tensors = Mapping[Slot, torch.Tensor]


@dataclass
class AdapterInput:
    """One input of a merge, as every front end hands it to the engine.

    ``tensors`` may be lazy (a mapping that reads each tensor when it is asked for). LoRA modules whose
    rank or scaling differs from ``config`` are listed in ``module_ranks`` / ``module_scalings`` (by
    slot prefix). ``selects_modules``: the input's format chooses its modules itself (PEFT's
    ``target_modules``), so a module it lacks is a zero update; otherwise a lacking module is an error."""

    name: str
    config: Any
    tensors: Tensors
    module_ranks: Mapping[str, int] = field(default_factory=dict)
    module_scalings: Mapping[str, float] = field(default_factory=dict)
    selects_modules: bool = False


@dataclass
class MergeResult:
    """What the engine returns: the merged configuration, its tensors by slot, the report, and the
    (rank, scaling) of the LoRA modules where they differ from the configuration."""

    config: Any
    tensors: Dict[Slot, torch.Tensor]
    report: MergeReport
    module_overrides: Dict[str, Tuple[int, float]] = field(default_factory=dict)


def merge(
    inputs: Sequence[AdapterInput],
    weights: Any = None,
    combine_strategy: str = "linear",
    normalize_weights: bool = True,
    svd_rank: Optional[int] = None,
    options: Optional[Mapping[str, Any]] = None,
    *,
    name: str = "merged",
    kind: str = "adapter",
    progress: Optional[Callable[[int, int], None]] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> MergeResult:
    """Merge ``inputs`` into one adapter (or head, ``kind="head"``) called ``name``.

    ``weights`` as in ``average_adapter``: None (1/N), one per input, or a dict by input name; an input's
    weight may be a dict ``{module name or glob: number}`` with a ``"*"`` default (`resolve_module_weights`);
    ``options`` are the strategy's options (``svd_tol``, ``density``, …). ``progress(done, total)`` is
    called as modules are merged. ``out_dtype``: the dtype the merged floating tensors are stored in
    (None: the inputs', the widest where they differ); the merge is computed from the inputs as they are
    stored and the report measures the stored result against them. Every input tensor is checked for
    NaN and ±inf before a rule sees it. Raises ValueError/TypeError naming the problem and the fix; nothing
    is changed anywhere, so a failure needs no undo."""
    names = [item.name for item in inputs]
    per_module = has_module_weights(weights)
    # per-module weights: the defaults first (the report's weights); each module's once the modules are known
    resolved = resolve_weights(names, default_weights(names, weights, kind) if per_module else weights,
                               normalize_weights, kind=kind)
    strategy = get_strategy(combine_strategy)
    report = MergeReport(name, strategy.name, dict(resolved), kind=kind)
    parsed = strategy.parse_options(svd_rank, dict(options or {}), report.notes)
    configs = [item.config for item in inputs]
    parts = check_configs(names, configs, strategy)
    tensors = complete_modules(inputs, parts[0])
    tensors = {n: _Finite(n, tensors[n], kind) for n in names}  # every tensor checked as it is first read
    tensors = promote_dtypes(names, tensors, report, out_dtype)
    slots = set().union(*(set(tensors[n]) for n in names))  # methods may store a unit differently per input
    owners = _assign_slots(parts[0], slots)
    module_weights: Dict[str, List[float]] = {}
    if per_module:
        resolved, module_weights = resolve_module_weights(
            names, weights, normalize_weights, [module_name(s) for s in slots], kind=kind)
        report.module_weights = {m: dict(zip(names, ws)) for m, ws in module_weights.items()}
    generator = torch.Generator().manual_seed(parsed["seed"]) if "seed" in parsed else None
    ctx = MergeContext(
        names, [w for _, w in resolved], tensors, strategy, parsed, report, generator,
        module_ranks={i.name: dict(i.module_ranks) for i in inputs},
        module_scalings={i.name: dict(i.module_scalings) for i in inputs},
        progress=_counter({slot.prefix for slot in slots}, progress) if progress else None,
        out_dtype=out_dtype, module_weights=module_weights,
    )
    new_parts, merged = [], {}
    for j, part in enumerate(parts[0]):
        new_part, out = method_for(part).merge(ctx, [p[j] for p in parts], owners.get(j, []))
        new_parts.append(new_part)
        merged.update(out)
    if out_dtype is not None:  # a method that stores in its own dtype (prefix tuning, ReFT: not measured)
        merged = {k: t.to(out_dtype) if t.is_floating_point() else t for k, t in merged.items()}
    check_finite(name, names, tensors, merged, kind)
    return MergeResult(union_like(configs[0], new_parts), merged, report, dict(ctx.merged_modules))


def _counter(modules, callback: Callable[[int, int], None]) -> Callable[[str], None]:
    """A per-module callback that reports (modules done, modules in all) once per module."""
    done: set = set()

    def advance(module: str) -> None:
        if module not in done:
            done.add(module)
            callback(len(done), len(modules))

    return advance


# ----------------------------------------------------------------------------- configurations
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
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b), key=str) if k not in ignored and a.get(k) != b.get(k)]


def check_configs(names: Sequence[str], configs: Sequence[Any], strategy: Strategy) -> List[Tuple[Any, ...]]:
    """Validate that the inputs can be merged by ``strategy``; return their configuration parts.

    Refusals start with the sentence ``adapters`` 1.3.0 uses for them (scripts may match it)."""
    parts = [config_parts(c) for c in configs]
    for name, config, own in zip(names[1:], configs[1:], parts[1:]):
        if len(own) != len(parts[0]) or any(type(x) is not type(y) for x, y in zip(own, parts[0])):
            raise ValueError(
                f"Cannot average adapters with different configurations. '{names[0]}' ({_describe(configs[0])}) and "
                f"'{name}' ({_describe(config)}) are adapters of different methods or configuration types, which "
                "cannot be merged. Merge only adapters of one method (and one configuration), e.g. average the LoRA "
                "adapters and the bottleneck adapters separately."
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
                field_name, mine, theirs = diffs[0]
                others = f" (and {', '.join(f'{d[0]}={d[1]!r} vs {d[2]!r}' for d in diffs[1:])})" if len(diffs) > 1 else ""
                raise ValueError(method.difference(names[0], name, part, own[j], field_name, mine, theirs, others, strategy))
        families |= method.families_of(part)
    strategy.check_families(families)
    return parts


def union_like(config, parts: Sequence[Any]):
    """``parts`` as a configuration of the class of ``config``: a single part, or a union of the same
    class (``MAMConfig`` and ``UniPELTConfig`` stay themselves, so ``config.adapter`` keeps working)."""
    if not isinstance(config, ConfigUnion):
        return parts[0]
    union = type(config).__new__(type(config))
    ConfigUnion.__init__(union, *parts)
    return union


def _describe(config) -> str:
    return " + ".join(type(p).__name__ for p in config_parts(config))


# ----------------------------------------------------------------------------- tensors
def complete_modules(inputs: Sequence[AdapterInput], parts: Sequence[Any]) -> Dict[str, Tensors]:
    """{name: tensors} with every input holding the same units (`Method.unit_of`). An input that lacks
    one is an error naming the tensor (a module deleted by hand?), unless every input selects its own
    modules (``selects_modules``): then what it lacks is a zero update (`Method.absent`)."""
    units = {i.name: {_unit(parts, s): s for s in i.tensors} for i in inputs}
    every = {}
    for item in inputs:
        every.update({u: (s, item.name) for u, s in units[item.name].items() if u not in every})
    if all(units[i.name].keys() == every.keys() for i in inputs):
        return {i.name: i.tensors for i in inputs}
    if not all(i.selects_modules for i in inputs):
        first = inputs[0].name
        other = next(i.name for i in inputs if units[i.name].keys() != units[first].keys())
        _refuse_incomplete(first, other, units[first], units[other])
    completed = {}
    for item in inputs:
        own = _WithAbsent(item.tensors)
        for unit, (slot, holder) in every.items():
            if unit not in units[item.name]:
                present = next(i.tensors[slot] for i in inputs if i.name == holder)
                part = next((p for p in config_parts(item.config) if method_for(p).owns(slot, p)), item.config)
                own.absent[slot] = method_for(part).absent(slot, present, part)
        completed[item.name] = own
    return completed


class _WithAbsent(Mapping):
    """An input's tensors plus the zero updates of the modules it lacks (lazy inputs stay lazy)."""

    def __init__(self, tensors: Tensors) -> None:
        self.tensors, self.absent = tensors, {}

    def __getitem__(self, slot: Slot) -> torch.Tensor:
        return self.absent[slot] if slot in self.absent else self.tensors[slot]

    def __iter__(self):
        yield from self.tensors
        yield from self.absent

    def __len__(self) -> int:
        return len(self.tensors) + len(self.absent)


def _refuse_incomplete(first: str, other: str, mine: Mapping[Any, Slot], theirs: Mapping[Any, Slot]) -> None:
    """Two inputs of one configuration whose tensors differ: one lacks a module (deleted by hand?)."""
    lacking, holder, present, own = (other, first, mine, theirs) if set(mine) - set(theirs) else (first, other, theirs, mine)
    missing = sorted(present[u] for u in set(present) - set(own))
    keys = ", ".join(slot.key(lacking) for slot in missing[:3]) + (" …" if len(missing) > 3 else "")
    raise ValueError(
        f"Adapter '{lacking}' lacks {keys}, which '{holder}' has: a module was probably deleted from it by hand, "
        "or they were not created with the same configuration on the same model. Merge only complete adapters "
        f"(reload '{lacking}')."
    )


def promote_dtypes(names: Sequence[str], tensors: Mapping[str, Tensors], report: MergeReport,
                   out_dtype: Optional[torch.dtype] = None) -> Dict[str, Tensors]:
    """Inputs of different floating dtypes are merged in the widest (``result_dtype``), whatever their
    order, and stored in it (or in ``out_dtype``), and the report says so; inputs of one dtype are
    passed through as they are."""
    dtypes = {name: {dtype_of(tensors[name], s) for s in tensors[name]} for name in names}
    floating = {name: sorted({d for d in ds if d.is_floating_point}, key=str) for name, ds in dtypes.items()}
    found = sorted({d for ds in floating.values() for d in ds}, key=str)
    if not found:
        return dict(tensors)
    widest = result_dtype(found)
    report.dtype = _dtype_name(out_dtype if out_dtype is not None else widest)
    if out_dtype is not None and found != [out_dtype]:
        report.notes.append(
            f"Stored in {report.dtype} as asked; computed from the inputs as stored "
            f"({'/'.join(_dtype_name(d) for d in found)}), and the errors are measured against them, storage rounding included."
        )
    if len(found) == 1:
        return dict(tensors)
    listing = ", ".join(f"'{n}': {'/'.join(_dtype_name(d) for d in floating[n])}" for n in names)
    merged_in = _dtype_name(widest)
    stored = f"stored in {report.dtype}" if out_dtype is not None else "stored in it"
    report.notes.append(f"The inputs have different dtypes ({listing}); merged in {merged_in}, the widest, and {stored}.")
    return {name: _Cast(tensors[name], widest) for name in names}


class _Finite(Mapping):
    """An input's tensors, each checked for NaN and ±inf the first time it is read, before any rule sees
    it: one clear error naming the input and the tensor, whatever the strategy (a NaN would otherwise
    pass silently through a sign election, or reach an SVD as a LinAlgError). Lazy inputs stay lazy and
    are read once per check: a tensor is checked when the merge reads it, not in a pass of its own."""

    def __init__(self, name: str, tensors: Tensors, kind: str) -> None:
        self.name, self.tensors, self.kind, self.checked = name, tensors, kind, set()

    def __getitem__(self, slot: Slot) -> torch.Tensor:
        tensor = self.tensors[slot]
        if slot not in self.checked:
            if tensor.is_floating_point() or tensor.is_complex():
                if not bool(torch.isfinite(tensor).all()):
                    raise ValueError(non_finite_input(self.kind, self.name, slot, tensor))
            self.checked.add(slot)
        return tensor

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __contains__(self, slot) -> bool:
        return slot in self.tensors

    def dtype_of(self, slot: Slot) -> torch.dtype:
        return dtype_of(self.tensors, slot)


def non_finite_input(kind: str, name: str, slot: Slot, tensor: torch.Tensor) -> str:
    """The refusal of an input tensor that holds NaN or ±inf (counts of each, and where)."""
    nan = int(torch.isnan(tensor).sum())
    inf = int(torch.isinf(tensor).sum())
    found = ", ".join(f"{count} {what}" for count, what in ((nan, "NaN"), (inf, "±inf")) if count)
    return (
        f"The {kind} '{name}' has non-finite values (NaN or inf) in {slot.key(name)} ({found} of {tensor.numel()} "
        "entries), so the merge would be too, whatever its weight. Leave it out, or reload or retrain it (nothing was changed)."
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class _Cast(Mapping):
    """An input's tensors, floating ones cast to ``dtype`` when read."""

    def __init__(self, tensors: Tensors, dtype: torch.dtype) -> None:
        self.tensors, self.dtype = tensors, dtype

    def __getitem__(self, slot: Slot) -> torch.Tensor:
        tensor = self.tensors[slot]
        return tensor.to(self.dtype) if tensor.is_floating_point() else tensor

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def dtype_of(self, slot: Slot) -> torch.dtype:
        own = dtype_of(self.tensors, slot)
        return self.dtype if own.is_floating_point else own


def check_option_names(strategy: str, options: Any, chosen: str) -> None:
    """Refuse options ``strategy`` does not take, naming the strategy as the front end's user chose it
    (``chosen``, e.g. ``combine_strategy='linear' (lora_delta_w_svd for these adapters)``) and the strategies
    that do take each option."""
    from .strategies import strategies_with_option

    known = get_strategy(strategy).option_names
    unknown = sorted(set(options) - set(known))
    if unknown:
        takers = "; ".join(f"'{o}' is an option of {', '.join(strategies_with_option(o)) or 'no strategy'}" for o in unknown)
        raise TypeError(f"Unknown option(s) {unknown} for {chosen}. Its options are: {', '.join(known) or 'none'}. "
                        f"{takers}.")


def full_weights_note(weights: Mapping[str, float], what: str, fix: str) -> Optional[str]:
    """Heads (and PEFT's ``modules_to_save``) are full weights, merged as Σ λᵢ Wᵢ (``average_head``'s rule):
    with Σ λᵢ ≠ 1 (task arithmetic, unlearning) that is a scaled head or a difference of heads, not a head.
    Then warns (`MergeWarning`) and returns the report's note, which says so and what to do; else None."""
    total = math.fsum(weights.values())
    if math.isclose(total, 1.0, rel_tol=1e-6, abs_tol=1e-9):
        return None
    listing = ", ".join(f"{name}: {weight:+.4g}" for name, weight in weights.items())
    note = (f"The {what} were merged as Σ λᵢ Wᵢ with weights summing to {total:.4g}, not 1 ({listing}): they are full "
            "weights, not updates, so the result is that weighted sum (a difference for weights [1, -1], twice the "
            f"average for [1, 1]), not an average. {fix}")
    from ._warnings import warn

    warn(note)
    return note


def check_finite(new_name: str, names: Sequence[str], inputs: Mapping[str, Tensors], merged: Tensors, kind: str) -> None:
    """Refuse a merge whose result holds NaN or ±inf: name the input that has them, or else the
    merged tensor that overflowed its dtype. Runs before anything is written. (The inputs of `merge` are
    checked before any rule reads them, so there the result's check catches overflow.)"""
    if not merged or bool(torch.isfinite(torch.stack([t.sum().float().cpu() for t in merged.values()])).all()):
        return  # fast path: NaN and ±inf propagate into a sum (a finite sum means finite entries)
    bad = next((slot for slot in sorted(merged) if not bool(torch.isfinite(merged[slot]).all())), None)
    if bad is None:
        return  # only a sum overflowed
    for name in names:  # the engine's inputs are checked as they are read (`_Finite`): this is for direct callers
        for slot in sorted(inputs[name]):
            tensor = inputs[name][slot]
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(non_finite_input(kind, name, slot, tensor))
    raise ValueError(
        f"The merged value of {bad.key(new_name)} is not finite: the weights make it overflow "
        f"{merged[bad].dtype}. Use smaller weights (e.g. normalize_weights=True)."
    )


def _assign_slots(parts: Sequence[Any], slots) -> Dict[int, List[Slot]]:
    """Which configuration part (method) merges each slot (`Method.owns`)."""
    owners: Dict[int, List[Slot]] = {}
    for slot in sorted(slots):
        owner = next((j for j, p in enumerate(parts) if method_for(p).owns(slot, p)), None)
        if owner is None:
            raise ValueError(
                f"adapter_merging does not know which method owns '{slot.key('<name>')}'; "
                "please report this with your adapter configuration."
            )
        owners.setdefault(owner, []).append(slot)
    return owners


def _unit(parts: Sequence[Any], slot: Slot):
    """What must match across the inputs for ``slot``: the slot itself, or its method's unit of it (a
    prefix-tuning location, stored flat by one input and reparameterised by another)."""
    for part in parts:
        method = method_for(part)
        if method.owns(slot, part) or slot.container in method.containers:
            return method.unit_of(slot)
    return slot
