"""What every method module shares: the merge context, the linear rule over slots, and `Method`."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..ops import linear_combination
from ..ops.weights import module_name
from ..report import MergeReport
from ..state import Slot
from ..strategies import Strategy

Tensors = Mapping[Slot, torch.Tensor]


@dataclass
class MergeContext:
    """The validated inputs of one merge, as the method modules see them."""

    names: List[str]
    weights: List[float]
    tensors: Dict[str, Tensors]  # input adapter name → {slot: tensor}
    strategy: Strategy
    options: Dict[str, Any] = field(default_factory=dict)
    report: MergeReport = field(default_factory=lambda: MergeReport("<merged>", "linear", {}))
    #: random stream of the randomised strategies, seeded once per merge from ``options["seed"]``
    generator: Optional[torch.Generator] = None
    #: per input, per module (a slot prefix): LoRA rank and scaling where they differ from the
    #: input's configuration (PEFT's rank_pattern / alpha_pattern / rsLoRA)
    module_ranks: Dict[str, Dict[str, int]] = field(default_factory=dict)
    module_scalings: Dict[str, Dict[str, float]] = field(default_factory=dict)
    #: per module of the result, (rank, scaling) where they differ from the merged configuration
    merged_modules: Dict[str, Tuple[int, float]] = field(default_factory=dict)
    #: called with a module (slot prefix) each time one is merged (a progress bar)
    progress: Optional[Callable[[str], None]] = None
    #: the dtype the merged tensors are stored in (None: the inputs'); merges are computed from the
    #: inputs as stored and measured as stored in this dtype
    out_dtype: Optional[torch.dtype] = None
    #: per-module weights {module name (`module_name`): [λᵢ]} where they differ from ``weights``
    module_weights: Dict[str, List[float]] = field(default_factory=dict)

    def weights_at(self, module: str) -> List[float]:
        """The weights λᵢ of one module (a slot's `module_name`): its own, or the adapter's."""
        return self.module_weights.get(module, self.weights)

    def every_weights(self) -> List[List[float]]:
        """The adapter's weights and every module's own (for checks over the whole merge)."""
        return [self.weights, *self.module_weights.values()]

    def at_module(self, module: str) -> "MergeContext":
        """This context with one module's weights as ``weights`` (report, progress and per-module results
        shared with this one)."""
        if not self.module_weights:
            return self
        return replace(self, weights=list(self.weights_at(module)), module_weights={})

    def advance(self, module: str) -> None:
        if self.progress is not None:
            self.progress(module)

    def inputs(self, slot: Slot) -> List[torch.Tensor]:
        """The tensor at ``slot`` of every input adapter, in input order."""
        return [self.tensors[name][slot] for name in self.names]

    def with_weights(self, weights: Sequence[float]) -> "MergeContext":
        """The same inputs with other weights (e.g. |λᵢ| for one parameter)."""
        return MergeContext(self.names, list(weights), self.tensors, self.strategy, self.options, self.report,
                            out_dtype=self.out_dtype)

    def stored_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype a merged tensor computed from inputs of ``dtype`` is stored in: ``out_dtype`` for
        floating tensors where one is asked for, else ``dtype``."""
        return self.out_dtype if self.out_dtype is not None and dtype.is_floating_point else dtype


def dtype_of(tensors: Tensors, slot: Slot) -> torch.dtype:
    """The dtype of one input tensor, without reading it where the mapping knows it (lazy inputs)."""
    known = getattr(tensors, "dtype_of", None)
    return known(slot) if known else tensors[slot].dtype


def linear_merge(ctx: MergeContext, slots: Sequence[Slot], weights_for: Optional[Callable] = None) -> Dict[Slot, torch.Tensor]:
    """Φ = Σ wᵢ Φᵢ at every slot, with wᵢ = ``weights_for(param, λ)`` (default: λᵢ)."""
    merged = {}
    for slot in slots:
        tensors = ctx.inputs(slot)
        shapes = [tuple(t.shape) for t in tensors]
        if len(set(shapes)) > 1:
            listing = ", ".join(f"'{n}': {s}" for n, s in zip(ctx.names, shapes))
            raise ValueError(
                f"The inputs' tensors {slot.key('<name>')} have different shapes ({listing}): they were trained on "
                "different base models or with different configurations, and cannot be merged."
            )
        weights = ctx.weights_at(module_name(slot))
        value = linear_combination(tensors, weights_for(slot.param, weights) if weights_for else weights)
        merged[slot] = value.to(ctx.stored_dtype(value.dtype))
        ctx.advance(slot.prefix)
    return merged


def group_by(slots: Sequence[Slot], unit) -> Dict[Any, List[Slot]]:
    """Slots grouped by ``unit(slot)``, in a stable order."""
    groups: Dict[Any, List[Slot]] = {}
    for slot in sorted(slots):
        groups.setdefault(unit(slot), []).append(slot)
    return groups


def merge_linearly(ctx: MergeContext, configs: Sequence[Any], slots: Sequence[Slot]):
    """The default rule of a method: keep the configuration, merge every tensor by the strategy's
    parameter rule (``linear``: Φ = Σ λᵢ Φᵢ)."""
    return configs[0], linear_merge(ctx, slots, ctx.strategy.rule.weights_for)


def _no_hint(field: str, strategy: Strategy) -> str:
    return ""


@dataclass(frozen=True)
class Method:
    """One adapter method family as the engine sees it, with its hooks.

    * ``merge(ctx, configs, slots) -> (new_config, {slot: tensor})`` gets the inputs' (sub-)configs of
      this method and the slots it owns; it must not touch a model.
    * ``families(config)``: the family names strategies declare support for (default ``{name}``).
    * ``owns(slot, config)``: whether a slot of one of ``containers`` belongs to this method (e.g.
      ``shared_parameters`` are Compacter's or VeRA's).
    * ``unit_of(slot)``: what must match across inputs (default: the slot itself).
    * ``may_differ(config, strategy)``: configuration fields that may differ between inputs.
    * ``hint(field, strategy)``: advice appended when inputs differ in ``field``.
    * ``absent(slot, present, config)``: what an input that lacks ``slot`` contributes when its format
      selects modules per input (a zero update; e.g. IA³'s identity).
    * ``difference(...)``: the refusal for inputs whose configurations differ in a field.
    """

    name: str
    config_types: tuple
    containers: tuple
    merge: Callable = merge_linearly
    families: Optional[Callable] = None
    owns_shared: Optional[Callable] = None  # config -> whether it owns ``shared_parameters``
    ignored_config_fields: Optional[Callable] = None  # (config, strategy) -> fields that may differ
    unit: Optional[Callable] = None  # slot -> unit
    hint: Callable[[str, Strategy], str] = _no_hint
    absent_value: Optional[Callable] = None  # (slot, present tensor, config) -> tensor
    #: (first name, other name, first config, other config, field, first value, other value, "and …")
    #: -> the refusal for inputs whose configurations differ (default: `different_configurations`)
    describe_difference: Optional[Callable] = None

    def families_of(self, config) -> set:
        return set(self.families(config)) if self.families else {self.name}

    def owns(self, slot: Slot, config) -> bool:
        if slot.container not in self.containers:
            return False
        if slot.container == "shared_parameters":
            return bool(self.owns_shared(config)) if self.owns_shared else False
        return True

    def unit_of(self, slot: Slot):
        return self.unit(slot) if self.unit else slot

    def may_differ(self, config, strategy) -> set:
        return set(self.ignored_config_fields(config, strategy)) if self.ignored_config_fields else set()

    def absent(self, slot: Slot, present: torch.Tensor, config) -> torch.Tensor:
        return self.absent_value(slot, present, config) if self.absent_value else torch.zeros_like(present)

    def difference(self, first: str, other: str, a, b, field: str, mine, theirs, others: str, strategy: Strategy) -> str:
        if self.describe_difference:
            return self.describe_difference(first, other, a, b, field, mine, theirs, others)
        return (
            f"{DIFFERENT_CONFIGURATIONS} '{first}' has {field}={mine!r} but '{other}' has {field}={theirs!r}{others}. "
            f"Merge adapters of one configuration.{self.hint(field, strategy)}"
        )


#: adapters 1.3.0's first sentence for inputs that cannot be merged
DIFFERENT_CONFIGURATIONS = "Cannot average adapters with different configurations."
