"""The merge report: what a merge cost, module by module."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional


@dataclass(frozen=True)
class ModuleReport:
    """One merged module.

    ``relative_error`` = ‖ΔW_merged − ΔW_target‖_F / ‖ΔW_target‖_F of the effective updates (with
    their scalings, as the model applies them); ``energy_kept`` = ‖ΔW_merged‖²/‖ΔW_target‖² share of
    the target's squared singular values kept by a truncation (1.0 when nothing was truncated).
    """

    module: str
    relative_error: float
    energy_kept: float = 1.0
    rank: Optional[int] = None


@dataclass
class MergeReport:
    """Returned by ``average_adapter``: per-module errors of the merged adapter against its target."""

    adapter_name: str
    combine_strategy: str
    weights: Dict[str, float]
    modules: List[ModuleReport] = field(default_factory=list)
    rank: Optional[int] = None
    alpha: Optional[float] = None
    target: str = "Σ λᵢ ΔWᵢ"
    notes: List[str] = field(default_factory=list)

    def add(self, module: str, relative_error: float, energy_kept: float = 1.0, rank: Optional[int] = None) -> None:
        self.modules.append(ModuleReport(module, float(relative_error), float(energy_kept), rank))

    @property
    def max_error(self) -> float:
        """Largest relative error over modules (0.0 when no module has an update to compare)."""
        return max((m.relative_error for m in self.modules), default=0.0)

    @property
    def mean_error(self) -> float:
        return sum(m.relative_error for m in self.modules) / len(self.modules) if self.modules else 0.0

    @property
    def min_energy_kept(self) -> float:
        return min((m.energy_kept for m in self.modules), default=1.0)

    def summary(self) -> str:
        weights = ", ".join(f"{n}: {w:+.4g}" for n, w in self.weights.items())
        text = f"'{self.adapter_name}' = {self.combine_strategy}({weights})"
        if self.rank is not None:
            text += f", rank {self.rank}"
        if self.modules:
            text += (
                f"; {len(self.modules)} modules, relative error vs {self.target}: "
                f"max {self.max_error:.3g}, mean {self.mean_error:.3g}; energy kept ≥ {self.min_energy_kept:.4f}"
            )
        return text

    def __str__(self) -> str:
        return self.summary()

    def to_rows(self) -> List[dict]:
        """One dict per module, for a table (e.g. ``pandas.DataFrame(report.to_rows())``)."""
        return [vars(m).copy() for m in self.modules]
