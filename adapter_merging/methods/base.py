"""What every method module shares: the merge context and the linear rule over slots."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence

import torch

from ..ops import combine_state_dicts
from ..report import MergeReport
from ..state import Slot
from ..strategies import Strategy

Tensors = Dict[Slot, torch.Tensor]


@dataclass
class MergeContext:
    """The validated inputs of one merge, as the method modules see them."""

    names: List[str]
    weights: List[float]
    tensors: Dict[str, Tensors]  # input adapter name → {slot: tensor}
    strategy: Strategy
    options: Dict[str, Any] = field(default_factory=dict)
    report: MergeReport | None = None
    #: random stream of the randomised strategies, seeded once per merge from ``options["seed"]``
    generator: torch.Generator | None = None

    def inputs(self, slot: Slot) -> List[torch.Tensor]:
        """The tensor at ``slot`` of every input adapter, in input order."""
        return [self.tensors[name][slot] for name in self.names]


def linear_merge(ctx: MergeContext, slots: Sequence[Slot]) -> Tensors:
    """Φ = Σ λᵢ Φᵢ at every slot."""
    states = [{slot: ctx.tensors[name][slot] for slot in slots} for name in ctx.names]
    return combine_state_dicts(states, ctx.weights)


def group_by(slots: Sequence[Slot], unit) -> Dict[Any, List[Slot]]:
    """Slots grouped by ``unit(slot)``, in a stable order."""
    groups: Dict[Any, List[Slot]] = {}
    for slot in sorted(slots):
        groups.setdefault(unit(slot), []).append(slot)
    return groups


def merge_linearly(ctx: MergeContext, configs: Sequence[Any], slots: Sequence[Slot]):
    """The default rule of a method: keep the configuration, merge every tensor linearly."""
    return configs[0], linear_merge(ctx, slots)


@dataclass(frozen=True)
class Method:
    """One adapter method family as the engine sees it.

    ``merge(ctx, configs, slots) -> (new_config, {slot: tensor})`` gets the inputs' (sub-)configs of
    this method and the slots of its containers; it must not touch a model.
    """

    name: str
    config_types: tuple
    containers: tuple
    merge: Any = merge_linearly
    families: Any = None  # config -> set of family names; default {name}
    claims_shared_parameters: Any = None  # config -> bool
    ignored_config_fields: Any = None  # (config, strategy) -> set of fields that may differ

    def families_of(self, config) -> set:
        return set(self.families(config)) if self.families else {self.name}

    def claims_shared(self, config) -> bool:
        return bool(self.claims_shared_parameters(config)) if self.claims_shared_parameters else False

    def may_differ(self, config, strategy) -> set:
        return set(self.ignored_config_fields(config, strategy)) if self.ignored_config_fields else set()
