"""adapter_merging: task arithmetic with adapters.

Combine trained adapters (bottleneck, LoRA, IA³, VeRA, DoRA, prefix/prompt tuning, ReFT, …) of the
``adapters`` library into one new adapter — average skills, add them, unlearn them with negative
weights — and average prediction heads.

    >>> import adapter_merging
    >>> adapter_merging.init(model)                                  # doctest: +SKIP
    >>> model.average_adapter("avg", ["a", "b"], weights=[0.5, 0.5])  # doctest: +SKIP

Importing the package is fast: it imports neither torch, ``adapters`` nor ``transformers``. Each
name below is imported from its module the first time it is used (PEP 562).
"""
from typing import TYPE_CHECKING as _TYPE_CHECKING, Any as _Any, List as _List

__version__ = "0.1.0"

#: public name → the module (relative to this package) that defines it
_LAZY = {
    "init": ".model_mixin",
    "average_adapter": ".model_mixin",
    "average_head": ".model_mixin",
    "ModelMixin": ".model_mixin",
    "merge_saved_adapters": ".files",
    "learn_weights": ".learn",
    "LearnedWeights": ".learn",
    "MergeReport": ".report",
    "ModuleReport": ".report",
    "STRATEGIES": ".strategies",
    "Strategy": ".strategies",
    "get_strategy": ".strategies",
    "strategies_for": ".strategies",
    "CombineStrategy": ".strategy_names",
    "SignMethod": ".strategy_names",
}

if _TYPE_CHECKING:  # type checkers and IDEs see the names as if imported here
    from .files import merge_saved_adapters
    from .learn import LearnedWeights, learn_weights
    from .model_mixin import ModelMixin, average_adapter, average_head, init
    from .report import MergeReport, ModuleReport
    from .strategies import STRATEGIES, Strategy, get_strategy, strategies_for
    from .strategy_names import CombineStrategy, SignMethod


def __getattr__(name: str) -> _Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> _List[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "init",
    "average_adapter",
    "average_head",
    "merge_saved_adapters",
    "learn_weights",
    "LearnedWeights",
    "ModelMixin",
    "CombineStrategy",
    "SignMethod",
    "MergeReport",
    "ModuleReport",
    "STRATEGIES",
    "Strategy",
    "get_strategy",
    "strategies_for",
    "__version__",
]
