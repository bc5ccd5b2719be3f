"""The ModelMixin: ``average_adapter`` and ``average_head`` on any ``adapters`` model.

Thin by design: validate, normalise weights, gather tensors, hand them to the engine, write the
result back, and roll everything back if anything fails.
"""
from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch

from .engine import check_finite, merge_adapter_tensors
from .ops import combine_state_dicts, resolve_weights
from .report import MergeReport
from .state import HEAD_CONTAINERS, Slot, adapter_tensors, model_tensors
from .strategies import get_strategy

logger = logging.getLogger("adapter_merging")

AdapterList = Union[Sequence[str], Mapping[str, float]]
Weights = Optional[Union[Sequence[float], Mapping[str, float]]]


# ----------------------------------------------------------------------------- public functions
def average_adapter(
    model: torch.nn.Module,
    adapter_name: str,
    adapter_list: AdapterList,
    weights: Weights = None,
    combine_strategy: str = "linear",
    normalize_weights: bool = True,
    overwrite_ok: bool = False,
    set_active: bool = False,
    svd_rank: Optional[int] = None,
    **strategy_options: Any,
) -> MergeReport:
    """Add ``adapter_name`` to ``model`` as a weighted combination of the adapters in ``adapter_list``.

    Drop-in for ``adapters``' ``model.average_adapter``: weights default to 1/N, a dict
    ``{name: weight}`` is honoured, ``normalize_weights`` divides by Σ wᵢ (which must be > 0; pass
    ``normalize_weights=False`` to unlearn with negative weights). ``combine_strategy`` is one of
    `adapter_merging.STRATEGIES`; ``svd_rank`` and ``**strategy_options`` are its options.
    On any error the model is left exactly as it was. Returns a `MergeReport`.
    """
    _check_adapter_model(model)
    _check_new_name(adapter_name, "adapter")
    inputs = resolve_weights(adapter_list, weights, normalize_weights, kind="adapter")
    names = [name for name, _ in inputs]
    unknown = [n for n in names if n not in model.adapters_config]
    if unknown:
        available = sorted(model.adapters_config.adapters)
        raise ValueError(f"Unknown adapter(s) {unknown}. The model has: {available}. Add or load them first.")
    if adapter_name in model.adapters_config and not overwrite_ok:
        raise ValueError(
            f"An adapter named '{adapter_name}' already exists. Pass overwrite_ok=True to replace it, "
            "or choose another name."
        )
    strategy = get_strategy(combine_strategy)
    options = strategy.parse_options(svd_rank, strategy_options)
    configs = [model.adapters_config.get(n) for n in names]
    named = model_tensors(model)
    tensors = {n: _detached(adapter_tensors(named, n)) for n in names}
    report = MergeReport(adapter_name, combine_strategy, dict(inputs))
    new_config, merged = merge_adapter_tensors(
        names, [w for _, w in inputs], configs, tensors, strategy, options, report
    )
    check_finite(adapter_name, names, tensors, merged, "adapter")
    with _rollback_adapter(model, adapter_name):
        if adapter_name in model.adapters_config:
            model.delete_adapter(adapter_name)
        with torch.random.fork_rng(devices=[]):  # initialising the new modules must not move the caller's RNG
            model.add_adapter(adapter_name, config=new_config)
        _write(model, adapter_name, merged, ("adapter", adapter_tensors))
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
) -> None:
    """Add the prediction head ``head_name`` as Σ λᵢ headᵢ of heads of one class and configuration
    (number of labels and label names included). Weights as in `average_adapter`. Weights tied
    to the input embeddings stay tied. On any error the model is left exactly as it was."""
    if not isinstance(getattr(model, "heads", None), torch.nn.ModuleDict):
        raise TypeError(
            f"{type(model).__name__} has no prediction heads: average_head needs a model with flexible heads, "
            "e.g. one created by adapters.AutoAdapterModel."
        )
    _check_new_name(head_name, "head")
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
    tensors = [_detached(adapter_tensors(named, n, containers=HEAD_CONTAINERS)) for n in names]
    merged = combine_state_dicts(tensors, [w for _, w in inputs])
    check_finite(head_name, names, dict(zip(names, tensors)), merged, "head")
    with _rollback_head(model, head_name):
        if head_name in model.heads:
            model.delete_head(head_name)
        new_head = copy.deepcopy(first)
        new_head.name = head_name
        model.add_prediction_head(new_head, overwrite_ok=True, set_active=set_active)
        _write(model, head_name, merged, ("head", lambda n, name: adapter_tensors(n, name, containers=HEAD_CONTAINERS)))


# ----------------------------------------------------------------------------- helpers
def _check_adapter_model(model) -> None:
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


def _detached(tensors: Dict[Slot, torch.Tensor]) -> Dict[Slot, torch.Tensor]:
    return {slot: t.detach() for slot, t in tensors.items()}


def _dict_differences(a: Mapping, b: Mapping, ignored) -> List[tuple]:
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b), key=str) if k not in ignored and a.get(k) != b.get(k)]


def _write(model, name: str, merged: Dict[Slot, torch.Tensor], finder) -> None:
    """Copy the merged tensors into the freshly added module ``name`` (dtype and device of the inputs)."""
    kind, find = finder
    targets = find(model_tensors(model), name)
    if set(targets) != set(merged):
        missing = sorted(s.key(name) for s in set(targets) - set(merged))[:3]
        extra = sorted(s.key(name) for s in set(merged) - set(targets))[:3]
        raise RuntimeError(
            f"The merged {kind} does not match the {kind} the model built (unmerged: {missing}, unexpected: {extra}). "
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


@contextmanager
def _rollback_adapter(model, adapter_name: str):
    """Undo every change to ``model`` if the block fails: remove the half-made adapter and restore a
    replaced one (configuration, tensors, active setup)."""
    old_config = model.adapters_config.get(adapter_name) if adapter_name in model.adapters_config else None
    live = adapter_tensors(model_tensors(model), adapter_name) if old_config is not None else {}
    old_tensors = {s: t.detach().clone() for s, t in live.items()} if old_config is not None else None
    old_requires_grad = {s: t.requires_grad for s, t in live.items()}
    config = model.adapters_config
    registry = (dict(config.adapters), dict(config.config_map))  # add_adapter registers the new config
    modes = {name: module.training for name, module in model.named_modules()}
    active = config.active_setup
    tied_keys = copy.copy(getattr(model, "_tied_weights_keys", None))
    try:
        yield
    except BaseException:
        if adapter_name in model.adapters_config:
            model.delete_adapter(adapter_name)
        if old_config is not None:
            with torch.random.fork_rng(devices=[]):
                model.add_adapter(adapter_name, config=old_config)
            _write(model, adapter_name, old_tensors, ("adapter", adapter_tensors))
            for slot, tensor in adapter_tensors(model_tensors(model), adapter_name).items():
                tensor.requires_grad_(old_requires_grad[slot])
        for mapping, saved in zip((config.adapters, config.config_map), registry):
            mapping.clear()
            mapping.update(saved)
        for name, module in model.named_modules():
            if name in modes:
                module.training = modes[name]
        config.active_setup = active
        if hasattr(model, "_tied_weights_keys"):
            model._tied_weights_keys = tied_keys
        raise


@contextmanager
def _rollback_head(model, head_name: str):
    old_head = model.heads[head_name] if head_name in model.heads else None
    old_config = model.config.prediction_heads.get(head_name) if old_head is not None else None
    active = model.active_head
    try:
        yield
    except BaseException:
        if head_name in model.heads:
            model.delete_head(head_name)
        if old_head is not None:
            model.heads[head_name] = old_head
            model.config.prediction_heads[head_name] = old_config
        model.active_head = active
        raise


class ModelMixin:
    """Mixed into a model's class by `adapter_merging.init`: ``average_adapter`` and
    ``average_head`` with the ``adapters`` signatures, done by `adapter_merging`."""

    def average_adapter(
        self,
        adapter_name: str,
        adapter_list: AdapterList,
        weights: Weights = None,
        combine_strategy: str = "linear",
        normalize_weights: bool = True,
        overwrite_ok: bool = False,
        set_active: bool = False,
        svd_rank: Optional[int] = None,
        **strategy_options: Any,
    ) -> MergeReport:
        return average_adapter(
            self, adapter_name, adapter_list, weights, combine_strategy, normalize_weights,
            overwrite_ok, set_active, svd_rank, **strategy_options,
        )

    average_adapter.__doc__ = globals()["average_adapter"].__doc__

    def average_head(
        self,
        head_name: str,
        head_list: AdapterList,
        weights: Weights = None,
        normalize_weights: bool = True,
        overwrite_ok: bool = False,
        set_active: bool = False,
    ) -> None:
        return average_head(self, head_name, head_list, weights, normalize_weights, overwrite_ok, set_active)

    average_head.__doc__ = globals()["average_head"].__doc__


_MIXED_CLASSES: Dict[type, type] = {}


def init(model: torch.nn.Module) -> torch.nn.Module:
    """Give ``model`` the `ModelMixin` (idempotent) and return it.

    The model must already be an ``adapters`` model (``adapters.init(model)`` or
    ``AutoAdapterModel``); its class is swapped for a subclass with the same name."""
    if isinstance(model, ModelMixin):
        return model
    _check_adapter_model(model)
    cls = type(model)
    if cls not in _MIXED_CLASSES:
        mixed = type(cls.__name__, (ModelMixin, cls), {"__module__": cls.__module__, "__qualname__": cls.__qualname__})
        _MIXED_CLASSES[cls] = mixed
    model.__class__ = _MIXED_CLASSES[cls]
    return model
