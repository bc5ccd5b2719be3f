"""The merge report: what a merge cost, module by module."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union


#: a rounding floor above this is worth saying in the summary (it exceeds float32 storage rounding)
ROUNDING_WORTH_SAYING = 1e-9


@dataclass(frozen=True)
class ModuleReport:
    """One merged module.

    ``relative_error`` = ‖ΔW_merged − ΔW_target‖_F / ‖ΔW_target‖_F of the effective updates (with
    their scalings, as the model applies them), measured from what is stored (its dtype included);
    ``energy_kept`` = ‖ΔW_merged‖²/‖ΔW_target‖² share of the target's squared singular values kept by
    a truncation (1.0 when nothing was truncated); ``rounding_floor`` = the relative size of the
    float64 rounding of the inputs' own factors (max(d, k, R)·ε·‖B_cat‖‖A_cat‖/‖ΔW_target‖): the true
    error lies within ``relative_error`` ± ``rounding_floor``. It is negligible (≈ 1e-15) unless the
    target nearly cancels (e.g. weights [1, −1] on nearly equal adapters); 0.0 where the stored factors
    are proven to reproduce the target exactly; 1.0 where the target itself is below the rounding.
    """

    module: str
    relative_error: float
    energy_kept: float = 1.0
    rank: Optional[int] = None
    rounding_floor: float = 0.0

    @property
    def limited_by_rounding(self) -> bool:
        """Whether the rounding of the inputs limits this module's result and its measurement beyond
        the float32 storage level (a rounding floor above 1e-9: its target nearly cancels)."""
        return self.rounding_floor > ROUNDING_WORTH_SAYING


@dataclass
class MergeReport:
    """Returned by ``average_adapter`` and ``average_head``: per-module errors of the merged adapter
    against its target, and what was merged."""

    adapter_name: str
    combine_strategy: str
    weights: Dict[str, float]
    modules: List[ModuleReport] = field(default_factory=list)
    rank: Optional[int] = None
    alpha: Optional[float] = None
    target: str = "Σ λᵢ ΔWᵢ"
    notes: List[str] = field(default_factory=list)
    #: dtype the merged tensors are stored in (the widest of the inputs')
    dtype: Optional[str] = None
    #: what was merged: "adapter" or "head"
    kind: str = "adapter"
    #: per-module weights, {module: {input: λ}}, for the modules whose weights differ from ``weights``
    #: (each input's default: its number, or its ``"*"`` entry)
    module_weights: Dict[str, Dict[str, float]] = field(default_factory=dict)

    def add(
        self,
        module: str,
        relative_error: float,
        energy_kept: float = 1.0,
        rank: Optional[int] = None,
        rounding_floor: float = 0.0,
    ) -> None:
        self.modules.append(ModuleReport(module, float(relative_error), float(energy_kept), rank, float(rounding_floor)))

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
        """One paragraph: the merge, the errors over modules, and every note."""
        weights = ", ".join(f"{n}: {w:+.4g}" for n, w in self.weights.items())
        text = f"'{self.adapter_name}' = {self.combine_strategy}({weights})"
        if self.module_weights:
            text += f" with other weights in {len(self.module_weights)} modules (report.module_weights)"
        if self.rank is not None:
            text += f", rank {self.rank}"
        if self.modules:
            text += (
                f"; {len(self.modules)} modules, relative error vs {self.target}: "
                f"max {self.max_error:.3g}, mean {self.mean_error:.3g}"
            )
            if self.min_energy_kept < 1.0:  # only a truncation keeps less (the field means nothing otherwise)
                text += f"; energy kept ≥ {self.min_energy_kept:.4f}"
            floored = [m for m in self.modules if m.limited_by_rounding]
            if floored:
                text += (
                    f"; {len(floored)} modules have a rounding floor up to {max(m.rounding_floor for m in floored):.3g} "
                    "(their target nearly cancels: errors that small cannot be measured or avoided in float64)"
                )
        for note in self.notes:
            text += f". {note}"
        return text

    def __str__(self) -> str:
        return self.summary()

    def to_rows(self) -> List[dict]:
        """One dict per module, for a table (e.g. ``pandas.DataFrame(report.to_rows())``)."""
        return [asdict(m) for m in self.modules]

    def to_dict(self) -> Dict[str, Any]:
        """Everything in the report as plain JSON types; an infinite error becomes None."""
        data = asdict(self)
        data["max_error"], data["mean_error"] = self.max_error, self.mean_error
        data["min_energy_kept"] = self.min_energy_kept
        return _finite_or_none(data)

    def to_json(self, indent: Optional[int] = 2) -> str:
        """`to_dict` as standard JSON (no NaN or Infinity)."""
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False, allow_nan=False)

    def save(self, path: Union[str, Path]) -> Path:
        """Write `to_json` to ``path`` (parent folders are created); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n", encoding="utf-8")
        return path


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value
