"""PEFT users: an exact ``add_weighted_adapter`` for PEFT models in memory.

    from adapter_merging.peft import add_weighted_adapter
    add_weighted_adapter(model, ["a", "b"], [1.0, -1.0], "a_minus_b", combination_type="svd")

PEFT's own signature with the model first, so ``model.add_weighted_adapter(`` becomes
``add_weighted_adapter(model, ``, and PEFT's combination names. Every one is computed on the exact
updates ΔWᵢ = sᵢBᵢAᵢ by the same engine as ``average_adapter`` and ``merge_saved_adapters``:

* ``svd``, ``linear`` and ``cat`` are exact (``svd_rank=None``: the exact rank); PEFT's ``linear``
  combines A and B separately (cross-terms), and its ``svd`` defaults to the largest input rank;
* ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` (and their ``*_svd`` names) are the
  task-vector strategies on the ΔWᵢ, re-factorised (rank Σ rᵢ by default, with a warning when that
  loses more than 10 %);
* adapter_merging's own strategy names work too, those PEFT has no name for included (``tsv``,
  ``iso_c``, ``iso_cts``, ``star``, ``della``, ``della_linear``, ``breadcrumbs``, ``breadcrumbs_ties``),
  with their options as keywords (``space``, ``eta``, ``common_fraction``, ``epsilon``, …).

LoRA on Linear, Conv1D (``fan_in_fan_out``), Embedding and Conv1d/Conv2d/Conv3d layers and on raw
parameters (``target_parameters``, each expert of a mixture-of-experts weight its own LoRA), with
per-module ranks and scalings (rank_pattern, alpha_pattern, rsLoRA) and different target modules
(merged over their union); IA³ by its deviation from identity (``combination_type`` "linear", its
default); ``modules_to_save`` merged linearly. DoRA, LoRA biases and grouped convolutions are refused.
A weight may be per module, ``{module path or glob: weight, "*": default}`` (paths inside the LoraModel's
``model``). A failure leaves the model as it was.
"""
from __future__ import annotations

import copy
import dataclasses
import re
from typing import Any, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Union

try:
    import peft as _peft  # noqa: F401  (the optional dependency)
    from peft.tuners.ia3 import IA3Layer
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import ParamWrapper
    from peft.utils import ModulesToSaveWrapper
except ImportError as error:  # pragma: no cover - exercised in a subprocess without peft
    raise ImportError(
        'adapter_merging.peft needs PEFT, which is not installed: pip install "adapter_merging[peft]" '
        "(or pip install peft)."
    ) from error

import torch

from ._progress import Progress, progress_reporter
from ._warnings import warn
from .engine import AdapterInput, check_option_names, full_weights_note, merge
from .files.formats import Layout, merged_peft_fields, peft_adapter_input
from .methods.heads import HeadConfig
from .ops.weights import check_flag, default_weights, has_module_weights, split_names_and_weights
from .report import MergeReport
from .rollback import rollback_on_error
from .state import Slot
from .strategies import STRATEGIES, get_strategy
from .strategy_names import CombineStrategy, Space

__all__ = ["add_weighted_adapter", "COMBINATION_TYPES"]

#: PEFT's combination names → adapter_merging's strategies, each on the exact ΔWᵢ
COMBINATION_TYPES: Dict[str, str] = {
    "svd": "lora_delta_w_svd",
    "linear": "lora_delta_w_svd",
    "cat": "lora_delta_w_concat",
    "ties": "ties",
    "ties_svd": "ties",
    "dare_linear": "dare_linear",
    "dare_linear_svd": "dare_linear",
    "dare_ties": "dare_ties",
    "dare_ties_svd": "dare_ties",
    "magnitude_prune": "magnitude_prune",
    "magnitude_prune_svd": "magnitude_prune",
}
PeftCombination = Literal[
    "svd", "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd",
    "magnitude_prune", "magnitude_prune_svd",
]


def add_weighted_adapter(
    model: torch.nn.Module,
    adapters: Sequence[str],
    weights: Union[Sequence[Union[float, Mapping[str, float]]], Mapping[str, Union[float, Mapping[str, float]]], None],
    adapter_name: str,
    combination_type: Optional[Union[PeftCombination, CombineStrategy, str]] = None,
    svd_rank: Optional[int] = None,
    svd_clamp: Optional[float] = None,
    svd_full_matrices: bool = True,
    svd_driver: Optional[str] = None,
    density: Optional[float] = None,
    majority_sign_method: Literal["total", "frequency"] = "total",
    *,
    svd_tol: Optional[float] = None,
    gamma: Optional[float] = None,
    seed: Optional[int] = None,
    space: Optional[Space] = None,
    eta: Optional[float] = None,
    common_fraction: Optional[float] = None,
    epsilon: Optional[float] = None,
    progress: Progress = None,
) -> MergeReport:
    """Add ``adapter_name`` to the PEFT model as the weighted combination of ``adapters``, exactly.

    :param model: a ``PeftModel`` (or its ``LoraModel``/``IA3Model``) holding the adapters.
    :param adapters: names of the adapters to merge (LoRA adapters, or IA³ adapters), a list (or a dict
        ``{name: weight}`` with ``weights=None``); a set is refused (its order would pair names and weights).
    :param weights: one weight per adapter, used as given (PEFT's semantics: not normalised); any sign. A list,
        or a dict ``{name: weight}``. An adapter's weight may be per module: a dict ``{module path or glob: weight}``
        with a ``"*"`` entry, its default (``{"*": 1.0, "model.layers.1.*": 0.5}``). Module paths are those inside
        the LoraModel's ``model`` (``model.layers.0.self_attn.q_proj``; an expert of a ``target_parameters``
        weight is ``experts.gate_up_proj[0]``), as ``report.modules`` lists them; globs are shell-style
        (``fnmatch``): an exact path wins, else the first matching glob, else ``"*"``. A glob matching no LoRA
        module is an error. ``modules_to_save`` are merged with each adapter's ``"*"`` weight.
    :param adapter_name: the new adapter's name; it must not exist yet.
    :param combination_type: None (default): what PEFT's own method of the adapters' type does by default,
        ``"svd"`` for LoRA (``LoraModel.add_weighted_adapter``) and ``"linear"`` for IA³
        (``IA3Model.add_weighted_adapter`` has no ``combination_type``). Or PEFT's names (``svd``,
        ``linear``, ``cat``, ``ties``, ``ties_svd``, ``dare_linear``, ``dare_linear_svd``, ``dare_ties``,
        ``dare_ties_svd``, ``magnitude_prune``, ``magnitude_prune_svd``; see `COMBINATION_TYPES`) or any of adapter_merging's
        strategies, among them those PEFT has no name for (``tsv``, ``iso_c``, ``iso_cts``, ``star``, ``della``,
        ``della_linear``, ``breadcrumbs``, ``breadcrumbs_ties``; and ``space="core"``/``"knots"`` on the task-vector types).
        IA³ adapters merge by ``linear`` (their deviation from identity).
    :param svd_rank: the merged LoRA's rank; None: the exact rank (``svd``, ``linear``) or Σ rᵢ
        (the task-vector types); capped at the rank the merged update has.
    :param svd_clamp: PEFT's clamping of the SVD factors; not done here (the factored SVD is exact, and
        clamping would only add error): a value other than None is ignored with a warning.
    :param svd_full_matrices: PEFT's option of its dense SVD; no dense SVD is done here (ignored; it must
        still be a bool).
    :param svd_driver: PEFT's cuSOLVER driver of its dense SVD; ignored with a warning when given.
    :param density: fraction of the entries of each ΔWᵢ kept (task-vector types; default 0.2).
    :param majority_sign_method: TIES sign election (``ties``, ``dare_ties``): ``"total"`` or ``"frequency"``.
    :param svd_tol: the smallest rank whose relative error is at most this, in every module.
    :param gamma: breadcrumbs' dropped top fraction (with ``combination_type="breadcrumbs"``).
    :param seed: seed of DARE's (and DELLA's) random masks (default 0).
    :param space: where a task-vector type merges: ``"full"`` (default: the dense updates), ``"core"`` (Core
        Space of the stacked factors) or ``"knots"`` (KnOTS' aligned space); see `adapter_merging.average_adapter`.
    :param eta: ``combination_type="star"``: the percentage of each update's nuclear norm kept (default 40).
    :param common_fraction: ``combination_type="iso_cts"``: the common subspace's fraction of the rank (default 0.8).
    :param epsilon: ``combination_type="della"`` or ``"della_linear"``: MAGPRUNE's spread of keep probabilities.
    :param progress: a progress bar over modules on stderr: None (default) shows one if the merge
        takes longer than 2 s, True always, False never; or a callable ``progress(modules done,
        modules in all)``.
    :returns: the `MergeReport`: per module, the relative error of the merged update against its target.
    :raises ValueError: unknown adapters, an existing ``adapter_name``, adapters of another PEFT type,
        DoRA or LoRA-bias adapters, bad weights or options.
    """
    root = _lora_root(model)
    check_flag("svd_full_matrices", svd_full_matrices)
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise TypeError(f"adapter_name must be a non-empty string without '.', got {adapter_name!r}.")
    if adapter_name in root.peft_config:
        raise ValueError(
            f"An adapter named '{adapter_name}' already exists (PEFT's add_weighted_adapter would silently do "
            "nothing). Choose another name, or delete it first (model.delete_adapter)."
        )
    names, weights = split_names_and_weights(adapters, weights)
    if weights is None:
        raise TypeError(
            f"Pass one weight per adapter ({names}) as `weights` (PEFT's semantics: used as given, not "
            "normalised), or the adapters as a dict {name: weight}."
        )
    unknown = [n for n in names if n not in root.peft_config]
    if unknown:
        raise ValueError(f"Unknown adapter(s) {unknown}. The model has: {sorted(root.peft_config)}.")
    configs = [root.peft_config[n] for n in names]
    peft_type = _peft_type(names, configs)
    strategy = _strategy(combination_type, peft_type)
    if svd_clamp is not None:
        warn(f"svd_clamp={svd_clamp!r} is ignored: the factored SVD is exact, and clamping its factors would only add error.")
    if svd_driver is not None:
        warn(f"svd_driver={svd_driver!r} is ignored: no dense SVD is computed (the SVD is taken from the factors).")
    options: Dict[str, Any] = dict(svd_tol=svd_tol, density=density, gamma=gamma, seed=seed, space=space, eta=eta,
                                   common_fraction=common_fraction, epsilon=epsilon)
    if "majority_sign_method" in get_strategy(strategy).option_names or majority_sign_method != "total":
        options["majority_sign_method"] = majority_sign_method
    if combination_type is None:
        chosen = f"combination_type=None (PEFT's default for {peft_type}: adapter_merging's {strategy})"
    else:
        chosen = f"combination_type={combination_type!r}" + (f" (adapter_merging's {strategy})" if strategy != combination_type else "")
    check_option_names(strategy, [k for k, v in options.items() if v is not None], chosen)
    inputs, layouts = zip(*(_read(root, n, c, peft_type) for n, c in zip(names, configs)))
    merged_layouts: Dict[str, Layout] = {}
    for own in layouts:
        for module, layout in own.items():
            merged_layouts.setdefault(module, layout)
    callback, finished = progress_reporter(progress)
    try:
        result = merge(list(inputs), list(weights), strategy, False, svd_rank,
                       {k: v for k, v in options.items() if v is not None}, name=adapter_name, progress=callback)
    finally:
        finished()
    saved = _modules_to_save(root, names)
    # modules_to_save: each adapter's default ("*") weight; per-module patterns name LoRA modules
    head_weights = default_weights(names, weights) if has_module_weights(weights) else list(weights)
    heads = merge(saved, head_weights, "linear", False, name=adapter_name, kind="head") if saved else None
    head_note = heads and full_weights_note(heads.report.weights, "modules_to_save", (
        "For usable modules_to_save, merge them with weights summing to 1 into another adapter and copy them, or "
        "keep one input's copy."))
    forward = [f for c in configs for f in (getattr(c, "feedforward_modules", None) or [])]
    fields = merged_peft_fields(peft_type, result, forward)
    _parameter_fields(fields, configs, merged_layouts, result)
    new_config = dataclasses.replace(copy.deepcopy(configs[0]), **{k: v for k, v in fields.items() if hasattr(configs[0], k)})
    if heads is None and getattr(new_config, "modules_to_save", None):
        result.report.notes.append("modules_to_save are not merged: not every input holds them.")
    if head_note:
        result.report.notes.append(head_note)
    with rollback_on_error(model):
        with torch.random.fork_rng(devices=[]):  # initialising the new adapter must not move the caller's RNG
            _add(model, root, adapter_name, new_config)
        _write(root, adapter_name, result.tensors, merged_layouts)
        _write_parameters(root, adapter_name, result, merged_layouts)
        if heads is not None:
            _write_modules_to_save(root, adapter_name, heads.tensors)
    return result.report


# ----------------------------------------------------------------------------- reading a live PEFT model
def _lora_root(model):
    """The tuner model (``LoraModel``/``IA3Model``) of a ``PeftModel``, or the model itself if it is one."""
    root = getattr(model, "base_model", None)
    if root is not None and hasattr(root, "peft_config") and hasattr(root, "inject_adapter"):
        return root
    if hasattr(model, "peft_config") and hasattr(model, "inject_adapter"):
        return model
    raise TypeError(
        f"{type(model).__name__} is not a PEFT model: pass the model that get_peft_model or "
        "PeftModel.from_pretrained returned (for adapters' models use model.average_adapter)."
    )


def _peft_type(names: Sequence[str], configs) -> str:
    types = {str(getattr(c.peft_type, "value", c.peft_type)) for c in configs}
    if len(types) > 1:
        raise ValueError(f"The adapters {names} are of different PEFT types {sorted(types)}: merge adapters of one type.")
    peft_type = types.pop()
    if peft_type not in ("LORA", "IA3"):
        raise ValueError(f"PEFT type {peft_type} is not supported: LoRA and IA³ adapters are.")
    for name, config in zip(names, configs):
        for flag, what in (("use_dora", "DoRA"), ("lora_bias", "LoRA biases (lora_bias)")):
            if getattr(config, flag, False):
                raise ValueError(
                    f"'{name}' has {flag}=True. {what} adapters are not merged: their update is not s·B·A, so no "
                    "combination of them is exact."
                )
    return peft_type


def _strategy(combination_type: Optional[str], peft_type: str) -> str:
    if combination_type is None:  # PEFT's own default for the type: LoraModel's "svd"; IA3Model has no choice
        return "linear" if peft_type == "IA3" else COMBINATION_TYPES["svd"]
    if peft_type == "IA3":
        if combination_type not in ("linear",):
            raise ValueError(
                f"combination_type={combination_type!r} does not apply to IA³ adapters: they merge by 'linear', "
                "1 + Σ λᵢ (lᵢ − 1) (their deviation from identity)."
            )
        return "linear"
    if combination_type in COMBINATION_TYPES:
        return COMBINATION_TYPES[combination_type]
    if combination_type in STRATEGIES:
        return combination_type
    raise ValueError(
        f"Invalid combination_type {combination_type!r}. Use one of PEFT's {sorted(COMBINATION_TYPES)} "
        f"or adapter_merging's {list(STRATEGIES)}."
    )


def _read(root, name: str, config, peft_type: str) -> Tuple[AdapterInput, Dict[str, Layout]]:
    """One adapter of the live model as the engine's input: its factors by module (2-D, as in a saved
    folder), each module's rank and scaling as PEFT applies them."""
    tensors: Dict[Slot, torch.Tensor] = {}
    layouts: Dict[str, Layout] = {}
    modules: Dict[str, Tuple[int, float]] = {}
    for path, module in root.model.named_modules():
        if isinstance(module, ParamWrapper) and peft_type == "LORA":
            if name in module.lora_A:
                _read_parameter(path, module, name, tensors, layouts, modules)
        elif isinstance(module, LoraLayer) and peft_type == "LORA":
            if name in module.lora_A:
                a, b = module.lora_A[name].weight, module.lora_B[name].weight
                if a.ndim >= 3:  # Conv1d, Conv2d, Conv3d: A (r, in, *kernel), B (out, r/groups, 1, …)
                    _check_groups(name, path, module)
                    layout = Layout("conv", tuple(a.shape[1:]), tuple(b.shape[2:]))
                else:
                    layout = Layout("linear")
            elif name in getattr(module, "lora_embedding_A", {}):
                a, b, layout = module.lora_embedding_A[name], module.lora_embedding_B[name], Layout("embedding")
            else:
                continue
            tensors[Slot(path, "loras", "lora_A")] = layout.to_matrix("lora_A", a.detach())
            tensors[Slot(path, "loras", "lora_B")] = layout.to_matrix("lora_B", b.detach())
            layouts[path] = layout
            modules[path] = (int(module.r[name]), float(module.scaling[name]))
        elif isinstance(module, IA3Layer) and peft_type == "IA3" and name in module.ia3_l:
            vector = module.ia3_l[name].detach()
            tensors[Slot(path, "loras", "lora_B")] = vector
            layouts[path] = Layout("ia3", b_shape=tuple(vector.shape))
    if not tensors:
        raise ValueError(f"The adapter '{name}' has no LoRA or IA³ module in the model.")
    return peft_adapter_input(name, peft_type, config.r if peft_type == "LORA" else 1,
                              getattr(config, "lora_alpha", 1), modules, tensors), layouts


def _check_groups(name: str, path: str, module) -> None:
    groups = getattr(module.get_base_layer(), "groups", 1)
    if groups != 1:
        raise ValueError(
            f"'{name}' has a LoRA on {path}, a {type(module.get_base_layer()).__name__} with groups={groups}: it is "
            "not merged. Its lora_B is a grouped convolution, so its update is not s·B·A of one matrix (PEFT cannot "
            "merge it into the layer either). Leave this layer out of the adapters' target_modules."
        )


def _parameter_key(path: str, module) -> str:
    """The key of the parameter a ``ParamWrapper`` adapts, as in ``target_parameters`` (``experts.gate_up_proj``):
    the wrapper's path without the ``base_layer`` steps of nested wrappers, then the parameter's name."""
    return f"{re.sub(r'[.]base_layer(?=[.]|$)', '', path)}.{module.parameter_name}"


def _read_parameter(path: str, module, name: str, tensors, layouts, modules) -> None:
    """A LoRA on a raw parameter (PEFT's ``target_parameters``): one LoRA of rank r per expert of a 3-D
    parameter (a 2-D one is one expert). PEFT stores the experts' factors interleaved: A (experts·r, in) by
    expert blocks of rows, B (out, r·experts) with expert e in the columns e, e + experts, …. Each expert is
    read as its own module ``<key>[e]`` (``<key>`` for a 2-D parameter): its update is s·B_e·A_e."""
    experts = int(module.num_experts)
    a, b = module.lora_A[name].weight.detach(), module.lora_B[name].weight.detach()
    r = int(module.r[name])
    a3, b3 = a.reshape(experts, r, a.shape[-1]), b.reshape(b.shape[0], r, experts)
    key = _parameter_key(path, module)
    for expert in range(experts):
        virtual = key if experts == 1 else f"{key}[{expert}]"
        tensors[Slot(virtual, "loras", "lora_A")] = a3[expert]
        tensors[Slot(virtual, "loras", "lora_B")] = b3[:, :, expert]
        layouts[virtual] = Layout("parameter", wrapper=path, expert=expert, experts=experts)
        modules[virtual] = (r, float(module.scaling[name]))


def _modules_to_save(root, names: Sequence[str]) -> List[AdapterInput]:
    """Each adapter's trained copies of its ``modules_to_save`` (heads, classifiers), when every adapter
    has them, as head-like inputs merged linearly."""
    wrappers = [(path, m) for path, m in root.model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    if not wrappers or not all(all(n in w.modules_to_save for _, w in wrappers) for n in names):
        return []
    inputs = []
    for name in names:
        tensors = {
            Slot("", "heads", f"{path}.{key}"): value.detach()
            for path, wrapper in wrappers
            for key, value in wrapper.modules_to_save[name].state_dict().items()
        }
        inputs.append(AdapterInput(name, HeadConfig("modules_to_save"), tensors))
    return inputs


# ----------------------------------------------------------------------------- writing the new adapter
def _add(model, root, adapter_name: str, config) -> None:
    """Inject the new adapter (PEFT's own way), frozen like PEFT's add_weighted_adapter leaves it."""
    if hasattr(model, "add_adapter") and model is not root:
        model.add_adapter(adapter_name, config)
    else:
        root.peft_config[adapter_name] = config
        root.inject_adapter(root.model, adapter_name)
    for key, param in root.model.named_parameters():
        if _holds_adapter(key, adapter_name):
            param.requires_grad_(False)
    for key, module in root.model.named_modules():  # new modules are made in training mode: take the model's
        if _holds_adapter(key, adapter_name):
            module.train(root.model.training)


#: the containers PEFT keeps an adapter's modules and parameters in, keyed by the adapter's name
_ADAPTER_CONTAINERS = frozenset({"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_dropout",
                                 "lora_magnitude_vector", "lora_variant", "ia3_l", "modules_to_save"})


def _holds_adapter(key: str, adapter_name: str) -> bool:
    """Whether the module or parameter path ``key`` is (inside) the adapter ``adapter_name``'s own entry of a PEFT
    container (``….lora_A.<name>.weight``), not a module that happens to share its name (``….value``)."""
    parts = key.split(".")
    return any(part == adapter_name and parts[i - 1] in _ADAPTER_CONTAINERS for i, part in enumerate(parts) if i)


def _parameter_fields(fields: Dict[str, Any], configs, layouts: Dict[str, Layout], result) -> None:
    """The merged configuration's ``target_parameters``: the inputs' (PEFT requires every adapter with
    target_parameters to target the same ones). Their per-expert modules leave target_modules and the
    patterns: every parameter gets the adapter's ``r``, raised to its experts' largest merged rank if needed
    (the modules then keep their rank and scaling by full-name patterns), and the adapter's scaling; an
    expert of lower rank is padded with zeros and its own scaling written into its B (PEFT's patterns are
    not used for parameters: it warns that they match no module, although it applies them)."""
    targeted = sorted({p for c in configs for p in (getattr(c, "target_parameters", None) or [])})
    if targeted:
        fields["target_parameters"] = targeted
    virtual = {m for m, layout in layouts.items() if layout.kind == "parameter"}
    if not virtual:
        return
    modules = [m for m in fields["target_modules"] if m not in virtual]
    ranks = {m: rank for m, rank in fields["rank_pattern"].items() if m not in virtual}
    alphas = {m: alpha for m, alpha in fields["alpha_pattern"].items() if m not in virtual}
    r, scale = int(fields["r"]), float(fields["lora_alpha"]) / int(fields["r"])
    merged_ranks = [int(t.shape[0]) for slot, t in result.tensors.items() if slot.prefix in virtual and slot.param == "lora_A"]
    rank = max([r] + merged_ranks)
    if rank > r:
        alphas = {m: alphas.get(m, ranks.get(m, r) * scale) for m in modules}
        ranks = {m: ranks.get(m, r) for m in modules}
        fields.update(r=rank, lora_alpha=rank * scale)
    fields.update(target_modules=modules, rank_pattern=ranks, alpha_pattern=alphas)


def _write_parameters(root, adapter_name: str, result, layouts: Dict[str, Layout]) -> None:
    """Each targeted parameter's merged experts back into PEFT's interleaved factors of the rank R it built:
    A (experts·R, in) by blocks of rows, B (out, R·experts) with expert e in the columns e, e + experts, …;
    an expert of lower rank is padded with zeros, and its scaling, divided by PEFT's, is written into its B."""
    modules = sorted(m for m, layout in layouts.items() if layout.kind == "parameter")
    default = float(result.config["alpha"]) / int(result.config["r"])
    with torch.no_grad():
        for wrapper in {layouts[m].wrapper for m in modules}:  # an expert of lower rank keeps zeros beyond it
            root.model.get_submodule(wrapper).lora_A[adapter_name].weight.zero_()
            root.model.get_submodule(wrapper).lora_B[adapter_name].weight.zero_()
        for module in modules:
            layout = layouts[module]
            wrapper = root.model.get_submodule(layout.wrapper)
            a_target, b_target = wrapper.lora_A[adapter_name].weight, wrapper.lora_B[adapter_name].weight
            rank, experts = int(wrapper.r[adapter_name]), layout.experts
            a = result.tensors[Slot(module, "loras", "lora_A")]
            b = result.tensors[Slot(module, "loras", "lora_B")]
            if a.shape[0] > rank or a_target.shape[0] != experts * rank or b_target.shape[1] != rank * experts:
                raise RuntimeError(
                    f"PEFT built factors {tuple(b_target.shape)}, {tuple(a_target.shape)} for the merged LoRA on "
                    f"{module}, not rank ≥ {a.shape[0]} × {experts} experts. This is a bug in adapter_merging; "
                    "please report it."
                )
            scale = result.module_overrides.get(module, (None, default))[1] / float(wrapper.scaling[adapter_name])
            a_target.view(experts, rank, -1)[layout.expert, : a.shape[0]] = a.to(a_target)
            b_target.view(b_target.shape[0], rank, experts)[:, : b.shape[1], layout.expert] = (b * scale).to(b_target)


def _write(root, adapter_name: str, merged: Dict[Slot, torch.Tensor], layouts: Dict[str, Layout]) -> None:
    with torch.no_grad():
        for slot, value in merged.items():
            layout = layouts[slot.prefix]
            if layout.kind == "parameter":
                continue  # written by _write_parameters, all experts of a parameter together
            module = root.model.get_submodule(slot.prefix)
            if layout.kind == "ia3":
                target = module.ia3_l[adapter_name]
            elif layout.kind == "embedding":
                target = (module.lora_embedding_A if slot.param == "lora_A" else module.lora_embedding_B)[adapter_name]
            else:
                target = (module.lora_A if slot.param == "lora_A" else module.lora_B)[adapter_name].weight
            value = layout.to_saved(slot.param, value)
            if tuple(value.shape) != tuple(target.shape):
                raise RuntimeError(
                    f"The merged {slot.param} of {slot.prefix} has shape {tuple(value.shape)}, PEFT built "
                    f"{tuple(target.shape)}. This is a bug in adapter_merging; please report it."
                )
            target.data = value.detach().to(target.device).clone()


def _write_modules_to_save(root, adapter_name: str, merged: Dict[Slot, torch.Tensor]) -> None:
    with torch.no_grad():
        for slot, value in merged.items():
            path, key = _split_saved(root, slot.param)
            module = root.model.get_submodule(path).modules_to_save[adapter_name]
            target = module.get_parameter(key) if key in dict(module.named_parameters()) else module.get_buffer(key)
            target.data = value.detach().to(target.device).clone()


def _split_saved(root, param: str) -> Tuple[str, str]:
    """('wrapper path', 'key inside its module') of a modules_to_save slot."""
    for path, module in root.model.named_modules():
        if isinstance(module, ModulesToSaveWrapper) and param.startswith(path + "."):
            return path, param[len(path) + 1:]
    raise RuntimeError(f"No modules_to_save wrapper holds {param}; please report this.")  # pragma: no cover
