"""adapter_merging: task arithmetic with adapters.

Combine trained adapters (bottleneck, LoRA, IA³, VeRA, DoRA, prefix/prompt tuning, ReFT, …) of the
``adapters`` library into one new adapter — average skills, add them, unlearn them with negative
weights — and average prediction heads.

    >>> import adapter_merging
    >>> adapter_merging.init(model)                                  # doctest: +SKIP
    >>> model.average_adapter("avg", ["a", "b"], weights=[0.5, 0.5])  # doctest: +SKIP
"""
__version__ = "0.1.0"

from .model_mixin import ModelMixin, average_adapter, average_head, init
from .report import MergeReport, ModuleReport
from .strategies import STRATEGIES, CombineStrategy, SignMethod, Strategy, get_strategy, strategies_for
from .files import merge_saved_adapters

__all__ = [
    "init",
    "average_adapter",
    "average_head",
    "merge_saved_adapters",
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
