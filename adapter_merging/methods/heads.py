"""Prediction heads: merged linearly, Φ = Σ λᵢ Φᵢ, when they are of one class and one configuration
(number of labels and label names included; dropout may differ)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict

from .base import Method, linear_merge


@dataclass(frozen=True)
class HeadConfig:
    """A head as the engine sees it: its class name and its configuration."""

    head_class: str
    config: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return {"head_class": self.head_class, **self.config}


def _difference(first: str, other: str, a: HeadConfig, b: HeadConfig, field_name: str, mine, theirs, others) -> str:
    if a.head_class != b.head_class:
        return f"Cannot average heads of different classes: '{first}' is a {a.head_class}, '{other}' is a {b.head_class}."
    return (
        f"Cannot average heads with different configurations: '{first}' has {field_name}={mine!r} but '{other}' has "
        f"{field_name}={theirs!r}{others}. Heads must predict the same labels with the same layout."
    )


def merge_heads(ctx, configs, slots):
    ctx.report.target = "Σ λᵢ Φᵢ over the head's parameters"
    return configs[0], linear_merge(ctx, slots)


METHOD = Method(
    name="head",
    config_types=(HeadConfig,),
    containers=("heads",),
    merge=merge_heads,
    ignored_config_fields=lambda config, strategy: {"dropout_prob"},
    describe_difference=_difference,
)
