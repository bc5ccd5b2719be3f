"""The ModelMixin: ``average_adapter`` and ``average_head`` on any ``adapters`` model.

Thin by design: validate, gather tensors, hand them to the engine, write the result back, and
restore the model exactly (`adapter_merging.rollback`) if anything fails.
"""
from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Sequence, Union

import torch

from ._progress import Progress, progress_reporter
from .engine import AdapterInput, merge
from .methods.heads import HeadConfig
from .ops.weights import check_flag, split_names_and_weights
from .report import MergeReport
from .rollback import rollback_on_error
from .state import HEAD_CONTAINERS, Slot, adapter_tensors, model_tensors
from .strategies import CombineStrategy, SignMethod
from .strategy_names import Convention, Space

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
    convention: Optional[Convention] = None,
    normalize: Optional[bool] = None,
    scale: Optional[float] = None,
    rescale: Optional[bool] = None,
    space: Optional[Space] = None,
    eta: Optional[float] = None,
    common_fraction: Optional[float] = None,
    epsilon: Optional[float] = None,
    progress: Progress = None,
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
        ``"magnitude_prune"``, ``"breadcrumbs"``, ``"breadcrumbs_ties"``, ``"della"``, ``"della_linear"``,
        ``"tsv"``, ``"iso_c"``, ``"iso_cts"``, ``"star"``.
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
    :param convention: whose definitions the task-vector strategies follow: ``"adapter_merging"``
        (default; see the guide) or ``"mergekit"`` (mergekit 0.1.5's kept counts, TIES divisor and DARE
        masks, as its YAML means them; see the command-line page).
    :param normalize: with ``convention="mergekit"`` only: mergekit's own ``normalize`` (TIES: each entry
        divided by the Σ λᵢ of the tasks kept there; the others: by Σ λᵢ). Pass the weights with
        ``normalize_weights=False`` then. Default False.
    :param scale: multiplies the merged update (mergekit's ``lambda``; task-vector strategies; default 1).
    :param rescale: multiply each sparsified ΔWᵢ by ‖ΔWᵢ‖₁ / ‖sparsified ΔWᵢ‖₁ (mergekit's ``rescale``;
        task-vector strategies; default False).
    :param space: where a task-vector rule (``ties``, ``dare_*``, ``magnitude_prune``, ``breadcrumbs*``,
        ``della*``) runs: ``"full"`` (default: on the dense updates ΔWᵢ, then re-factorised), ``"core"`` (on
        small core matrices in the Core Space of the stacked factors, Panariello et al. 2025: stored exactly at
        rank ≤ Σ rᵢ, never a dense d × k matrix) or ``"knots"`` (on the task parts of the SVD of the
        concatenated updates, KnOTS, Stoica et al. 2025).
    :param eta: ``star``: keep the leading singular values of each ΔWᵢ that hold ``eta`` percent of its
        nuclear norm, rescaled to keep the nuclear norm (the authors' default 40).
    :param common_fraction: ``iso_cts``: the fraction of the merged rank given to the common subspace (the
        rest to the task-specific ones; default 0.8).
    :param epsilon: ``della``, ``della_linear``: the spread of MAGPRUNE's keep probabilities around
        ``density`` (mergekit's ``epsilon``).
    :param progress: a progress bar over modules on stderr: None (default) shows one if the merge
        takes longer than 2 s, True always, False never; or a callable ``progress(modules done,
        modules in all)``.
    :returns: the `MergeReport`: per module, the relative error of the merged update against its target.
    :raises ValueError: bad names, weights, configurations or options (the message names the fix).
    :raises TypeError: arguments of the wrong type (e.g. a flag that is not a bool).
    """
    _check_adapter_model(model)
    _check_new_name(adapter_name, "adapter")
    _check_flags(overwrite_ok=overwrite_ok, set_active=set_active, normalize_weights=normalize_weights)
    names, weights = split_names_and_weights(adapter_list, weights, kind="adapter")
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
    named = model_tensors(model)
    inputs = [
        AdapterInput(n, model.adapters_config.get(n), _input_tensors(adapter_tensors(named, n), n, "adapter"))
        for n in names
    ]
    options = dict(svd_tol=svd_tol, density=density, majority_sign_method=majority_sign_method, gamma=gamma, seed=seed,
                   convention=convention, normalize=normalize, scale=scale, rescale=rescale, space=space, eta=eta,
                   common_fraction=common_fraction, epsilon=epsilon)
    callback, finished = progress_reporter(progress)
    try:
        result = merge(
            inputs, weights, combine_strategy, normalize_weights, svd_rank,
            {k: v for k, v in options.items() if v is not None}, name=adapter_name, progress=callback,
        )
    finally:
        finished()
    with rollback_on_error(model):
        if adapter_name in model.adapters_config:
            model.delete_adapter(adapter_name)
        with torch.random.fork_rng(devices=[]):  # initialising the new modules must not move the caller's RNG
            model.add_adapter(adapter_name, config=result.config)
        _write(model, adapter_name, result.tensors, names, "adapter")
        if set_active:
            model.set_active_adapters(adapter_name)
    logger.info("Merged adapter %s", result.report.summary())
    return result.report


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
    _check_flags(overwrite_ok=overwrite_ok, set_active=set_active, normalize_weights=normalize_weights)
    names, weights = split_names_and_weights(head_list, weights, kind="head")
    unknown = [n for n in names if n not in model.heads]
    if unknown:
        raise ValueError(f"Unknown head(s) {unknown}. The model has: {sorted(model.heads.keys())}.")
    if head_name in model.heads and not overwrite_ok:
        raise ValueError(
            f"A head named '{head_name}' already exists. Pass overwrite_ok=True to replace it, or choose another name."
        )
    named = model_tensors(model)
    inputs = [
        AdapterInput(
            n,
            HeadConfig(type(model.heads[n]).__name__, dict(model.heads[n].config)),
            _input_tensors(adapter_tensors(named, n, containers=HEAD_CONTAINERS), n, "head"),
        )
        for n in names
    ]
    result = merge(inputs, weights, "linear", normalize_weights, name=head_name, kind="head")
    with rollback_on_error(model):
        if head_name in model.heads:
            model.delete_head(head_name)
        new_head = copy.deepcopy(model.heads[names[0]])
        new_head.name = head_name
        model.add_prediction_head(new_head, overwrite_ok=True, set_active=set_active)
        _write(model, head_name, result.tensors, names, "head")
    logger.info("Merged head %s", result.report.summary())
    return result.report


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


def _check_flags(**flags: Any) -> None:
    for name, value in flags.items():
        check_flag(name, value)


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
        convention: Optional[Convention] = None,
        normalize: Optional[bool] = None,
        scale: Optional[float] = None,
        rescale: Optional[bool] = None,
        space: Optional[Space] = None,
        eta: Optional[float] = None,
        common_fraction: Optional[float] = None,
        epsilon: Optional[float] = None,
        progress: Progress = None,
    ) -> MergeReport:
        """Add ``adapter_name`` as a weighted combination of the adapters in ``adapter_list``:
        `adapter_merging.average_adapter` on this model (every parameter is documented there)."""
        return average_adapter(
            self, adapter_name, adapter_list, weights, combine_strategy, normalize_weights, overwrite_ok, set_active,
            svd_rank, svd_tol=svd_tol, density=density, majority_sign_method=majority_sign_method, gamma=gamma,
            seed=seed, convention=convention, normalize=normalize, scale=scale, rescale=rescale, space=space, eta=eta,
            common_fraction=common_fraction, epsilon=epsilon, progress=progress,
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
