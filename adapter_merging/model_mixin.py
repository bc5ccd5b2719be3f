"""The ModelMixin: ``average_adapter`` and ``average_head`` on any ``adapters`` model.

Thin by design: validate, gather tensors, hand them to the engine, write the result back, and
restore the model exactly (`adapter_merging.rollback`) if anything fails.
"""
from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Union

import torch

from .engine import check_finite, merge_adapter_tensors
from .ops import combine_state_dicts, resolve_weights
from .ops.weights import check_flag
from .report import MergeReport
from .rollback import rollback_on_error
from .state import HEAD_CONTAINERS, Slot, adapter_tensors, model_tensors
from .strategies import CombineStrategy, SignMethod, get_strategy

logger = logging.getLogger("adapter_merging")

AdapterList = Union[Sequence[str], Mapping[str, float]]
Weights = Optional[Union[Sequence[float], Mapping[str, float]]]

# ----------------------------------------------------------------------------- public functions
def average_adapter(
    model: torch.nn.Module,
    adapter_name: str,
    adapter_list: AdapterList,
    weights: Weights = None,
    combine_strategy: CombineStrategy = "linear",
    normalize_weights: bool = True,
    overwrite_ok: bool = False,
    set_active: bool = False,
    svd_rank: Optional[int] = None,
    *,
    svd_tol: Optional[float] = None,
    density: Optional[float] = None,
    majority_sign_method: Optional[SignMethod] = None,
    gamma: Optional[float] = None,
    seed: Optional[int] = None,
) -> MergeReport:
    """Add ``adapter_name`` to ``model`` as a weighted combination of the adapters in ``adapter_list``.

    Drop-in for ``adapters``' ``model.average_adapter`` (same positional parameters), with the
    strategy options as keywords. On any error the model is left exactly as it was.

    :param model: an ``adapters`` model (``adapters.init(model)`` or ``AutoAdapterModel``).
    :param adapter_name: name of the new adapter.
    :param adapter_list: the adapters to merge, as a list of names, or a dict ``{name: weight}``
        (then ``weights`` must be None). Sets are refused (they have no order).
    :param weights: one weight per adapter (a list, a 1-D array or tensor), or a dict
        ``{name: weight}``. None gives each adapter 1/N.
    :param combine_strategy: how to merge; one of `adapter_merging.STRATEGIES` (see the guide):
        ``"linear"``, ``"lora_linear_only_negate_b"``, ``"lora_delta_w_svd"``,
        ``"lora_delta_w_concat"``, ``"ties"``, ``"dare_linear"``, ``"dare_ties"``,
        ``"magnitude_prune"``, ``"breadcrumbs"``.
    :param normalize_weights: divide the weights by their sum (which must be > 0). Pass False for
        task arithmetic and unlearning with negative weights.
    :param overwrite_ok: replace an existing adapter named ``adapter_name``.
    :param set_active: activate the new adapter.
    :param svd_rank: rank of a LoRA merged by ``lora_delta_w_svd`` or a task-vector strategy
        (None: the exact rank, resp. Σ rᵢ). Ignored with a warning by other strategies.
    :param svd_tol: instead of ``svd_rank``, the smallest rank whose relative error is at most
        ``svd_tol`` in every module (re-factorising strategies).
    :param density: fraction of the entries of each ΔWᵢ kept (``ties``, ``dare_*``,
        ``magnitude_prune``, ``breadcrumbs``; default 0.2).
    :param majority_sign_method: TIES sign election, ``"total"`` (default) or ``"frequency"``
        (``ties``, ``dare_ties``).
    :param gamma: fraction of the largest magnitudes dropped (``breadcrumbs``; default 0.01).
    :param seed: seed of the random drop mask (``dare_*``; default 0). Same seed, same result.
    :returns: the `MergeReport`: per module, the relative error of the merged update against its target.
    :raises ValueError: bad names, weights, configurations or options (the message names the fix).
    :raises TypeError: arguments of the wrong type (e.g. a flag that is not a bool).
    """
    _check_adapter_model(model)
    _check_new_name(adapter_name, "adapter")
    check_flag("overwrite_ok", overwrite_ok)
    check_flag("set_active", set_active)
    inputs = resolve_weights(adapter_list, weights, normalize_weights, kind="adapter")
    names = [name for name, _ in inputs]
    unknown = [n for n in names if n not in model.adapters_config]
    if unknown:
        available = sorted(model.adapters_config.adapters)
        raise ValueError(f"Unknown adapter(s) {unknown}. The model has: {available}. Add or load them first.")
    if adapter_name in model.adapters_config:
        if not overwrite_ok:
            raise ValueError(
                f"An adapter named '{adapter_name}' already exists. Pass overwrite_ok=True to replace it, "
                "or choose another name."
            )
        _check_not_merged_into_base(model, adapter_name)
    strategy = get_strategy(combine_strategy)
    given = dict(svd_tol=svd_tol, density=density, majority_sign_method=majority_sign_method, gamma=gamma, seed=seed)
    options = strategy.parse_options(svd_rank, {k: v for k, v in given.items() if v is not None})
    configs = [model.adapters_config.get(n) for n in names]
    named = model_tensors(model)
    tensors = {n: _input_tensors(adapter_tensors(named, n), n, "adapter") for n in names}
    report = MergeReport(adapter_name, combine_strategy, dict(inputs))
    if svd_rank is not None and "svd_rank" not in strategy.option_names:
        report.notes.append(f"svd_rank={svd_rank} was ignored: combine_strategy='{combine_strategy}' has no rank.")
    new_config, merged = merge_adapter_tensors(
        names, [w for _, w in inputs], configs, tensors, strategy, options, report
    )
    check_finite(adapter_name, names, tensors, merged, "adapter")
    with rollback_on_error(model):
        if adapter_name in model.adapters_config:
            model.delete_adapter(adapter_name)
        with torch.random.fork_rng(devices=[]):  # initialising the new modules must not move the caller's RNG
            model.add_adapter(adapter_name, config=new_config)
        _write(model, adapter_name, merged, names, "adapter")
        if set_active:
            model.set_active_adapters(adapter_name)
    logger.info("Merged adapter %s", report.summary())
    return report


def average_head(
    model: torch.nn.Module,
    head_name: str,
    head_list: AdapterList,
    weights: Weights = None,
    normalize_weights: bool = True,
    overwrite_ok: bool = False,
    set_active: bool = False,
) -> MergeReport:
    """Add the prediction head ``head_name`` as Σ λᵢ headᵢ of heads of one class and configuration
    (number of labels and label names included). Weights as in `average_adapter`. Weights tied
    to the input embeddings stay tied. On any error the model is left exactly as it was.

    :param model: an ``adapters`` model with flexible heads (``AutoAdapterModel``).
    :param head_name: name of the new head.
    :param head_list: the heads to merge, as a list of names, or a dict ``{name: weight}``.
    :param weights: one weight per head, or a dict ``{name: weight}``; None gives each 1/N.
    :param normalize_weights: divide the weights by their sum (which must be > 0).
    :param overwrite_ok: replace an existing head named ``head_name``.
    :param set_active: activate the new head.
    :returns: a `MergeReport` of the merge (its weights; a linear merge of heads is exact).
    """
    if isinstance(model, _WRAPPERS):
        _check_adapter_model(model)
    if not isinstance(getattr(model, "heads", None), torch.nn.ModuleDict):
        raise TypeError(
            f"{type(model).__name__} has no prediction heads: average_head needs a model with flexible heads, "
            "e.g. one created by adapters.AutoAdapterModel."
        )
    _check_new_name(head_name, "head")
    check_flag("overwrite_ok", overwrite_ok)
    check_flag("set_active", set_active)
    inputs = resolve_weights(head_list, weights, normalize_weights, kind="head")
    names = [name for name, _ in inputs]
    unknown = [n for n in names if n not in model.heads]
    if unknown:
        raise ValueError(f"Unknown head(s) {unknown}. The model has: {sorted(model.heads.keys())}.")
    if head_name in model.heads and not overwrite_ok:
        raise ValueError(
            f"A head named '{head_name}' already exists. Pass overwrite_ok=True to replace it, or choose another name."
        )
    first = model.heads[names[0]]
    for name in names[1:]:
        head = model.heads[name]
        if type(head) is not type(first):
            raise ValueError(
                f"Cannot average heads of different classes: '{names[0]}' is a {type(first).__name__}, "
                f"'{name}' is a {type(head).__name__}."
            )
        diffs = _dict_differences(first.config, head.config, ignored={"dropout_prob"})
        if diffs:
            field, mine, theirs = diffs[0]
            raise ValueError(
                f"Cannot average heads with different configurations: '{names[0]}' has {field}={mine!r} but "
                f"'{name}' has {field}={theirs!r}. Heads must predict the same labels with the same layout."
            )
    named = model_tensors(model)
    tensors = [_input_tensors(adapter_tensors(named, n, containers=HEAD_CONTAINERS), n, "head") for n in names]
    merged = combine_state_dicts(tensors, [w for _, w in inputs])
    check_finite(head_name, names, dict(zip(names, tensors)), merged, "head")
    report = MergeReport(head_name, "linear", dict(inputs), target="Σ λᵢ Φᵢ over the head's parameters", kind="head")
    with rollback_on_error(model):
        if head_name in model.heads:
            model.delete_head(head_name)
        new_head = copy.deepcopy(first)
        new_head.name = head_name
        model.add_prediction_head(new_head, overwrite_ok=True, set_active=set_active)
        _write(model, head_name, merged, names, "head")
    logger.info("Merged head %s", report.summary())
    return report


# ----------------------------------------------------------------------------- helpers
_WRAPPERS = (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)


def _check_adapter_model(model) -> None:
    if isinstance(model, _WRAPPERS):
        raise TypeError(
            f"The model is wrapped in {type(model).__name__}: pass the wrapped model, model.module, "
            "to adapter_merging (merging is not a parallel operation)."
        )
    if not hasattr(model, "adapters_config") or not hasattr(model, "add_adapter"):
        raise TypeError(
            f"{type(model).__name__} is not set up for adapters: call adapters.init(model) first, "
            "or create it with adapters.AutoAdapterModel."
        )


def _check_new_name(name, kind: str) -> None:
    if not isinstance(name, str) or not name:
        raise TypeError(f"The new {kind}'s name must be a non-empty string, got {name!r}.")
    if "." in name:
        raise ValueError(f"The new {kind}'s name {name!r} must not contain '.', which separates parameter names.")


def _check_not_merged_into_base(model, name: str) -> None:
    """Replacing an adapter whose update was added to the base weights (``merge_adapter``) would leave
    that update in the weights, and ``reset_adapter`` would then subtract the wrong one."""
    if any(getattr(module, "merged", None) == name for module in model.modules()):
        raise ValueError(
            f"The adapter '{name}' is merged into the model's weights (model.merge_adapter('{name}')), so replacing "
            "it would leave its update in the base weights. Call model.reset_adapter() first, then merge again."
        )


def _input_tensors(tensors: Dict[Slot, torch.Tensor], name: str, kind: str) -> Dict[Slot, torch.Tensor]:
    """The input's tensors, detached; refused if one has no data (the meta device)."""
    for slot, tensor in tensors.items():
        if tensor.is_meta:
            raise ValueError(
                f"The {kind} '{name}' has tensors on the meta device (e.g. {slot.key(name)}): they hold no values "
                f"to merge. Load its weights first (e.g. model.load_adapter(...) or load_state_dict)."
            )
    return {slot: t.detach() for slot, t in tensors.items()}


def _dict_differences(a: Mapping, b: Mapping, ignored) -> List[tuple]:
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b), key=str) if k not in ignored and a.get(k) != b.get(k)]


def _write(model, name: str, merged: Dict[Slot, torch.Tensor], inputs: Sequence[str], kind: str) -> None:
    """Copy the merged tensors into the freshly added module ``name`` (dtype and device of the inputs)."""
    containers = HEAD_CONTAINERS if kind == "head" else None
    found = model_tensors(model)
    targets = adapter_tensors(found, name, containers=containers) if containers else adapter_tensors(found, name)
    lacking = sorted(set(targets) - set(merged))
    if lacking:
        keys = ", ".join(slot.key(inputs[0]) for slot in lacking[:3])
        raise ValueError(
            f"The {kind} '{inputs[0]}' lacks {keys}{' …' if len(lacking) > 3 else ''}, which its configuration "
            f"creates: a module was probably deleted from it by hand. Merge only complete {kind}s (reload it)."
        )
    extra = sorted(set(merged) - set(targets))
    if extra:
        raise RuntimeError(
            f"The merged {kind} has tensors the model did not build ({[s.key(name) for s in extra[:3]]}). "
            "This is a bug in adapter_merging; please report it with your configuration."
        )
    with torch.no_grad():
        for slot, target in targets.items():
            value = merged[slot]
            if tuple(value.shape) != tuple(target.shape):
                raise RuntimeError(
                    f"Merged tensor {slot.key(name)} has shape {tuple(value.shape)}, the model expects "
                    f"{tuple(target.shape)}. This is a bug in adapter_merging; please report it."
                )
            target.data = value.detach().clone()


class ModelMixin:
    """Mixed into a model's class by `adapter_merging.init`: ``average_adapter`` and
    ``average_head`` with the ``adapters`` signatures, done by `adapter_merging`.

    `init` returns the model typed as this class: for type checkers its other attributes (the
    model's own methods, calling it) are ``Any``, so ``init(model).average_adapter(...)`` and
    ``init(model).train_adapter(...)`` both type-check."""

    if TYPE_CHECKING:  # for type checkers only: at run time the model's own class answers these

        def __getattr__(self, name: str) -> Any: ...

        def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

    def average_adapter(
        self,
        adapter_name: str,
        adapter_list: AdapterList,
        weights: Weights = None,
        combine_strategy: CombineStrategy = "linear",
        normalize_weights: bool = True,
        overwrite_ok: bool = False,
        set_active: bool = False,
        svd_rank: Optional[int] = None,
        *,
        svd_tol: Optional[float] = None,
        density: Optional[float] = None,
        majority_sign_method: Optional[SignMethod] = None,
        gamma: Optional[float] = None,
        seed: Optional[int] = None,
    ) -> MergeReport:
        """Add ``adapter_name`` as a weighted combination of the adapters in ``adapter_list``:
        `adapter_merging.average_adapter` on this model (every parameter is documented there)."""
        return average_adapter(
            self, adapter_name, adapter_list, weights, combine_strategy, normalize_weights, overwrite_ok, set_active,
            svd_rank, svd_tol=svd_tol, density=density, majority_sign_method=majority_sign_method, gamma=gamma,
            seed=seed,
        )


    def average_head(
        self,
        head_name: str,
        head_list: AdapterList,
        weights: Weights = None,
        normalize_weights: bool = True,
        overwrite_ok: bool = False,
        set_active: bool = False,
    ) -> MergeReport:
        """Add the head ``head_name`` as Σ λᵢ headᵢ: `adapter_merging.average_head` on this model."""
        return average_head(self, head_name, head_list, weights, normalize_weights, overwrite_ok, set_active)



def _method_doc(function) -> str:
    """The function's docstring for the method of the same name: ``help(model.average_adapter)`` lists
    every parameter, written once (without ``model``, which is the method's ``self``)."""
    lines = (function.__doc__ or "").splitlines(keepends=True)
    return "".join(line for line in lines if not line.lstrip().startswith(":param model:"))


ModelMixin.average_adapter.__doc__ = _method_doc(average_adapter)
ModelMixin.average_head.__doc__ = _method_doc(average_head)

_MIXED_CLASSES: Dict[type, type] = {}


def init(model: torch.nn.Module) -> ModelMixin:
    """Give ``model`` the `ModelMixin` (idempotent) and return it.

    :param model: an ``adapters`` model (``adapters.init(model)`` or ``AutoAdapterModel``); its
        class is swapped for a subclass with the same name that adds ``average_adapter`` and
        ``average_head``.
    :returns: the same model object.
    :raises TypeError: the model is not set up for adapters, or is wrapped in ``DataParallel``."""
    if isinstance(model, ModelMixin):
        return model  # type: ignore[return-value]
    _check_adapter_model(model)
    cls = type(model)
    if cls not in _MIXED_CLASSES:
        mixed = type(cls.__name__, (ModelMixin, cls), {"__module__": cls.__module__, "__qualname__": cls.__qualname__})
        _MIXED_CLASSES[cls] = mixed
    model.__class__ = _MIXED_CLASSES[cls]
    return model  # type: ignore[return-value]
