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
* adapter_merging's own strategy names work too.

LoRA on Linear, Conv1D (``fan_in_fan_out``), Embedding and Conv2d layers, with per-module ranks and
scalings (rank_pattern, alpha_pattern, rsLoRA) and different target modules (merged over their
union); IA³ by its deviation from identity (``combination_type="linear"``); ``modules_to_save``
merged linearly. DoRA and LoRA biases are refused. A failure leaves the model as it was.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Union

try:
    import peft as _peft  # noqa: F401  (the optional dependency)
    from peft.tuners.ia3 import IA3Layer
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper
except ImportError as error:  # pragma: no cover - exercised in a subprocess without peft
    raise ImportError(
        'adapter_merging.peft needs PEFT, which is not installed: pip install "adapter_merging[peft]" '
        "(or pip install peft)."
    ) from error

import torch

from ._progress import Progress, progress_reporter
from ._warnings import warn
from .engine import AdapterInput, merge
from .files.formats import Layout, merged_peft_fields, peft_adapter_input
from .methods.heads import HeadConfig
from .report import MergeReport
from .rollback import rollback_on_error
from .state import Slot
from .strategies import STRATEGIES, get_strategy

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
    weights: Sequence[float],
    adapter_name: str,
    combination_type: Union[PeftCombination, str] = "svd",
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
    progress: Progress = None,
) -> MergeReport:
    """Add ``adapter_name`` to the PEFT model as the weighted combination of ``adapters``, exactly.

    :param model: a ``PeftModel`` (or its ``LoraModel``/``IA3Model``) holding the adapters.
    :param adapters: names of the adapters to merge (LoRA adapters, or IA³ adapters).
    :param weights: one weight per adapter, used as given (PEFT's semantics: not normalised); any sign.
    :param adapter_name: the new adapter's name; it must not exist yet.
    :param combination_type: PEFT's names (``svd``, ``linear``, ``cat``, ``ties``, ``ties_svd``,
        ``dare_linear``, ``dare_linear_svd``, ``dare_ties``, ``dare_ties_svd``, ``magnitude_prune``,
        ``magnitude_prune_svd``; see `COMBINATION_TYPES`) or any of adapter_merging's strategies.
        IA³ adapters merge by ``linear`` (their deviation from identity).
    :param svd_rank: the merged LoRA's rank; None: the exact rank (``svd``, ``linear``) or Σ rᵢ
        (the task-vector types); capped at the rank the merged update has.
    :param svd_clamp: PEFT's clamping of the SVD factors; not done here (the factored SVD is exact, and
        clamping would only add error): a value other than None is ignored with a warning.
    :param svd_full_matrices: PEFT's option of its dense SVD; no dense SVD is done here (ignored).
    :param svd_driver: PEFT's cuSOLVER driver of its dense SVD; ignored with a warning when given.
    :param density: fraction of the entries of each ΔWᵢ kept (task-vector types; default 0.2).
    :param majority_sign_method: TIES sign election (``ties``, ``dare_ties``): ``"total"`` or ``"frequency"``.
    :param svd_tol: the smallest rank whose relative error is at most this, in every module.
    :param gamma: breadcrumbs' dropped top fraction (with ``combination_type="breadcrumbs"``).
    :param seed: seed of DARE's random masks (default 0).
    :param progress: a progress bar over modules on stderr: None (default) shows one if the merge
        takes longer than 2 s, True always, False never; or a callable ``progress(modules done,
        modules in all)``.
    :returns: the `MergeReport`: per module, the relative error of the merged update against its target.
    :raises ValueError: unknown adapters, an existing ``adapter_name``, adapters of another PEFT type,
        DoRA or LoRA-bias adapters, bad weights or options.
    """
    root = _lora_root(model)
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise TypeError(f"adapter_name must be a non-empty string without '.', got {adapter_name!r}.")
    if adapter_name in root.peft_config:
        raise ValueError(
            f"An adapter named '{adapter_name}' already exists (PEFT's add_weighted_adapter would silently do "
            "nothing). Choose another name, or delete it first (model.delete_adapter)."
        )
    names = list(adapters)
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
    options: Dict[str, Any] = dict(svd_tol=svd_tol, density=density, gamma=gamma, seed=seed)
    if "majority_sign_method" in get_strategy(strategy).option_names or majority_sign_method != "total":
        options["majority_sign_method"] = majority_sign_method
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
    heads = merge(saved, list(weights), "linear", False, name=adapter_name, kind="head") if saved else None
    forward = [f for c in configs for f in (getattr(c, "feedforward_modules", None) or [])]
    fields = merged_peft_fields(peft_type, result, forward)
    new_config = dataclasses.replace(copy.deepcopy(configs[0]), **{k: v for k, v in fields.items() if hasattr(configs[0], k)})
    if heads is None and getattr(new_config, "modules_to_save", None):
        result.report.notes.append("modules_to_save are not merged: not every input holds them.")
    with rollback_on_error(model):
        with torch.random.fork_rng(devices=[]):  # initialising the new adapter must not move the caller's RNG
            _add(model, root, adapter_name, new_config)
        _write(root, adapter_name, result.tensors, merged_layouts)
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


def _strategy(combination_type: str, peft_type: str) -> str:
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
        if isinstance(module, LoraLayer) and peft_type == "LORA":
            if name in module.lora_A:
                a, b = module.lora_A[name].weight, module.lora_B[name].weight
                layout = Layout("conv", tuple(a.shape[1:]), tuple(b.shape[2:])) if a.ndim == 4 else Layout("linear")
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
        if f".{adapter_name}." in f".{key}." or key.endswith(f".{adapter_name}"):
            param.requires_grad_(False)


def _write(root, adapter_name: str, merged: Dict[Slot, torch.Tensor], layouts: Dict[str, Layout]) -> None:
    with torch.no_grad():
        for slot, value in merged.items():
            module = root.model.get_submodule(slot.prefix)
            layout = layouts[slot.prefix]
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
