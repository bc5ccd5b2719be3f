"""mergekit's YAML, read as mergekit 0.1.5 reads it: the one place that translates its language.

A mergekit configuration names full models; here every ``model:`` is an adapter folder (or Hub id) and
the merge is of their updates ΔWᵢ, which is what mergekit's methods compute on ``model − base_model``:

* ``linear`` — Σ wᵢ ΔWᵢ / Σ wᵢ (``normalize``, default true), the exact weighted average (LoRA: of the
  ΔWᵢ, never of A and B separately). Without ``normalize`` mergekit also scales the base model by Σ wᵢ,
  which no adapter can hold: refused unless Σ wᵢ = 1.
* ``task_arithmetic`` — λ·Σ wᵢ ΔWᵢ (divided by Σ wᵢ with ``normalize``, default false), exact.
* ``ties``, ``dare_ties``, ``dare_linear``, ``breadcrumbs``, ``breadcrumbs_ties``, ``della``,
  ``della_linear`` — our strategies of those names with ``convention="mergekit"``: mergekit's kept
  counts, its TIES divisor, its DARE and MAGPRUNE masks (without 1/p), its ``normalize``/``rescale``
  defaults per method, ``epsilon`` and ``lambda`` (our option ``scale``).
* this library's own strategy names that mergekit does not have (``tsv``, ``iso_c``, ``iso_cts``, ``star``,
  ``magnitude_prune``, ``lora_delta_w_svd``, …) — ours, as ``average_adapter`` means them: ``weight`` per
  model, ``normalize`` (our ``normalize_weights``, default true), and our option names as parameters
  (``space``, ``eta``, ``common_fraction``, ``svd_rank``, …; ``density``/``gamma`` also per model), checked by
  the strategy.

A ``weight`` may also be mergekit's per-layer list (a gradient, ``weight: [0, 0.5, 1]``) or its conditions
(``- filter: self_attn`` / ``value: …``): the plan then holds a `LayerWeights`, which `LayerWeights.resolve`
turns into the engine's per-module weights once the inputs' module names (and the number of layers) are
known. Every other parameter takes one number.

Nothing here imports torch. Errors are `ConfigError`: one line naming the file, the key and the fix.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

#: mergekit 0.1.5's per-method defaults (its registry): (normalize, rescale); and the parameters each has
DEFAULTS: Dict[str, Tuple[bool, bool]] = {
    "linear": (True, False),
    "task_arithmetic": (False, False),
    "ties": (True, False),
    "dare_ties": (False, True),
    "dare_linear": (False, True),
    "breadcrumbs": (False, False),
    "breadcrumbs_ties": (False, False),
    "della": (True, True),
    "della_linear": (False, True),
}
#: the generalized task arithmetic methods that sparsify (our strategy of the same name, convention "mergekit")
SPARSIFYING = ("ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear")
#: mergekit methods we know but do not compute
UNSUPPORTED_METHODS = ("slerp", "nuslerp", "multislerp", "karcher", "model_stock",
                       "sce", "nearswap", "arcee_fusion", "ram", "ramplus_tl", "passthrough")
#: keys of a mergekit configuration that concern the tokenizer: an adapter has none (ignored with a note)
TOKENIZER_KEYS = ("tokenizer_source", "tokenizer", "chat_template")
#: keys of a mergekit configuration we do not support (with why)
UNSUPPORTED_KEYS = {
    "slices": "layer slices (a mergekit layer-stacking feature)",
    "modules": "per-module definitions",
}
#: our own keys beside mergekit's
OWN_KEYS = ("output", "name")
#: our own global parameters (this library's strategy options) beside mergekit's in its methods
OWN_PARAMETERS = ("svd_rank", "svd_tol", "seed", "majority_sign_method", "space")
#: the parameters of a merge_method that is our own strategy name (besides every option of the strategy)
OWN_METHOD_PARAMETERS = ("weight", "normalize", "density", "gamma")


def own_method(method: Any) -> bool:
    """Whether ``method`` is one of this library's strategy names that mergekit does not have (read as ours)."""
    from .strategy_names import STRATEGY_NAMES

    return isinstance(method, str) and method in STRATEGY_NAMES and method not in DEFAULTS \
        and method not in UNSUPPORTED_METHODS
BOOLEANS = ("normalize", "rescale", "int8_mask")
NUMBERS = ("weight", "density", "gamma", "epsilon", "lambda")
#: mergekit 0.1.5's default epsilon of della and della_linear (per model)
EPSILON_DEFAULT = 0.15
#: parameters mergekit reads only from the global ``parameters:`` (its SHARED scope): under a model it ignores them
GLOBAL_ONLY = ("normalize", "rescale", "lambda", "int8_mask")
#: the ranges of the numbers a YAML gives (checked here, so that an error names the file and the key):
#: key → (test, what the value must be)
RANGES = {
    "density": (lambda v: 0 < v <= 1, "a finite number in (0, 1]"),
    "gamma": (lambda v: 0 <= v < 1, "a finite number in [0, 1)"),
    "svd_tol": (lambda v: 0 < v < 1, "a finite number in (0, 1)"),
}


class ConfigError(ValueError):
    """A mergekit-shaped YAML whose content is wrong: one line naming the file and the key."""


# ----------------------------------------------------------------------------- per-layer weights
#: the keys of a model's config.json that give its number of layers, in the order they are tried
#: (``num_hidden_layers``: what mergekit reads for the architectures it knows; the others: GPT-2's, T5's, …)
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


@dataclass(frozen=True)
class Gradient:
    """mergekit's per-layer list (``weight: [0, 0.5, 1]``): values from the first layer (t = 0) to the last (t = 1)."""

    values: Tuple[float, ...]

    def at(self, t: float) -> float:
        """The value at position t ∈ [0, 1], as mergekit 0.1.5's ``evaluate_setting`` computes it: the list at
        t·(n − 1), linearly between its two neighbours (one value: that value everywhere)."""
        scaled = t * (len(self.values) - 1)
        low = int(scaled)
        high = min(len(self.values) - 1, low + 1)
        frac = scaled - low
        return (1 - frac) * self.values[low] + frac * self.values[high]


@dataclass(frozen=True)
class Conditions:
    """mergekit's conditional parameter (``- filter: self_attn`` / ``value: …``): for a tensor, the first
    condition whose ``filter`` is absent, ``"*"`` or part of the tensor's name gives the value (a number or a
    `Gradient`); when none matches, the next scope (the global ``parameters``) is asked."""

    items: Tuple[Tuple[Optional[str], Union[float, Gradient]], ...]


#: one scope's ``weight``: a number, a per-layer list, or conditions
Setting = Union[float, Gradient, Conditions]


def evaluate(setting: Setting, tensor: str, t: float) -> Optional[float]:
    """A setting's value for the tensor named ``tensor`` at layer position ``t`` (None: no condition matches;
    ``tensor=""`` matches only the conditions without a filter, as in mergekit)."""
    if isinstance(setting, Gradient):
        return setting.at(t)
    if isinstance(setting, Conditions):
        for filter_, value in setting.items:
            if filter_ is None or filter_ == "*" or (tensor and filter_ in tensor):
                return evaluate(value, tensor, t)
        return None
    return float(setting)


def layer_index(module: str) -> Optional[int]:
    """The layer a module lies in: its first path component that is an integer (``model.layers.3.mlp`` → 3,
    ``bert.encoder.layer.0.attention.self.query`` → 0); None outside numbered layers (embeddings, heads)."""
    return next((int(part) for part in module.split(".") if part.isascii() and part.isdigit()), None)


def layer_position(index: Optional[int], num_layers: Optional[int]) -> float:
    """mergekit's t of a layer: index / (L − 1), 1 in a one-layer model; 0 outside numbered layers (mergekit
    plans the embeddings and the head with t = 0)."""
    if index is None or num_layers is None:
        return 0.0
    return index / (num_layers - 1) if num_layers > 1 else 1.0


def combine_weights(method: str, weights: Sequence[float], base_weight: Optional[float], normalize: bool,
                    scale: float, where: str) -> List[float]:
    """The engine's weights from mergekit's wᵢ (at one tensor, or everywhere): ``linear`` divides by Σ wᵢ
    (the base model's weight included: an input with ΔW = 0) with ``normalize``, and without it needs
    Σ wᵢ = 1; ``task_arithmetic`` multiplies by λ = ``scale`` and, with ``normalize``, divides by Σ wᵢ
    (|Σ wᵢ| < 1e-8: by 1); every other method takes wᵢ as they are (its strategy applies its own rule).
    ``where`` starts an error's message (the file, and the module)."""
    weights = [float(w) for w in weights]
    if method == "linear":
        total = math.fsum(weights) + (base_weight or 0.0)
        if normalize:
            if total == 0:
                raise ConfigError(f"{where}the weights {weights} sum to 0, so linear with normalize: true divides "
                                  "by zero (mergekit gives NaN): change the weights.")
            return [w / total for w in weights]
        if not math.isclose(total, 1.0, rel_tol=1e-9, abs_tol=1e-12):
            raise ConfigError(f"{where}linear with normalize: false and weights summing to {total:g} scales the base "
                              "model by that sum, which an adapter cannot hold: use normalize: true, weights summing "
                              "to 1, or merge_method: task_arithmetic (the update alone).")
        return weights
    if method == "task_arithmetic":
        total = math.fsum(weights)
        divisor = total if normalize and abs(total) >= 1e-8 else 1.0
        return [w * scale / divisor for w in weights]
    return weights


@dataclass(frozen=True)
class LayerWeights:
    """The weights of a YAML in which some ``weight`` is a per-layer list or conditions: what the plan holds
    until the inputs' modules are known (`resolve` then gives the engine's per-module weights).

    ``chains``: per input, its ``weight`` settings from its own ``parameters`` to the global ones (the first
    that gives a value wins, as in mergekit); ``base``: linear's base model among the models, likewise (an
    input with ΔW = 0 whose weight counts in the normalisation), or empty; ``method``, ``normalize``,
    ``scale``: what `combine_weights` does with the values."""

    chains: Tuple[Tuple[Setting, ...], ...]
    base: Tuple[Setting, ...]
    method: str
    normalize: bool
    scale: float
    source: str

    def values_at(self, tensor: str, t: float) -> List[float]:
        """mergekit's wᵢ for a tensor at layer position t."""
        return [_first_value(chain, tensor, t) for chain in self.chains]

    def weights_at(self, tensor: str, t: float, where: str = "") -> List[float]:
        """The engine's weights for a tensor at layer position t (`combine_weights`)."""
        base = _first_value(self.base, tensor, t) if self.base else None
        return combine_weights(self.method, self.values_at(tensor, t), base, self.normalize, self.scale,
                               f"{self.source}: {where}")

    def resolve(self, modules: Iterable[str], num_layers: Optional[int] = None,
                counted: str = "") -> Tuple[List[Dict[str, float]], str, Optional[int]]:
        """Per input, the engine's per-module weights ``{"*": default, module: weight, …}`` over ``modules``
        (names as `adapter_merging.ops.weights.module_name` gives them), a note for the report, and L.

        A module in layer i (`layer_index`) takes t = i / (L − 1) (`layer_position`), L = ``num_layers``
        (the base model's, said by ``counted``), or when None the highest layer index among ``modules`` + 1.
        Conditions are matched against the module's name + ``.weight`` (the tensor of the full model its
        update changes). Every module is listed by its exact name (which wins over any pattern, so a name
        holding glob characters is never read as one); ``"*"`` (heads, ``modules_to_save``) is the value at
        t = 0 without a filter."""
        modules = sorted(set(modules))
        indices = {m: layer_index(m) for m in modules}
        found = [i for i in indices.values() if i is not None]
        if num_layers is not None and found and max(found) >= num_layers:
            deepest = max((m for m in modules if indices[m] is not None), key=lambda m: indices[m])
            raise ConfigError(f"{self.source}: the module {deepest} lies in layer {indices[deepest]}, but {counted} "
                              f"gives {num_layers} layers (0 to {num_layers - 1}): is it the adapters' base model?")
        if num_layers is None and found:
            num_layers = max(found) + 1
            counted = ("the adapters' highest layer index + 1; mergekit counts the base model's layers, more where the "
                       "adapters leave the last ones out: give `base_model:` its folder to count those")
        defaults = self.weights_at("", 0.0, "at t = 0 (the modules outside numbered layers, and heads): ")
        resolved: List[Dict[str, float]] = [{"*": w} for w in defaults]
        for module in modules:
            t = layer_position(indices[module], num_layers)
            where = f"module {module} (layer {indices[module]}, t = {t:g}): " if indices[module] is not None \
                else f"module {module} (outside numbered layers, t = 0): "
            for spec, weight in zip(resolved, self.weights_at(f"{module}.weight", t, where)):
                spec[module] = weight
        if num_layers is None:
            note = "weight: no module lies in a numbered layer, so every module takes t = 0 (each list's first value)."
        else:
            note = (f"weight: per-layer values over L = {num_layers} layers ({counted}); layer i takes t = i/(L − 1) "
                    f"as in mergekit, modules outside numbered layers (and heads) t = 0.")
        return resolved, note, num_layers


def _first_value(chain: Sequence[Setting], tensor: str, t: float) -> Optional[float]:
    for setting in chain:
        value = evaluate(setting, tensor, t)
        if value is not None:
            return value
    return None


def base_layer_count(candidates: Iterable[Optional[str]]) -> Tuple[Optional[int], str]:
    """The number of layers of the first base model in ``candidates`` whose ``config.json`` is at hand (a local
    folder holding one, or a Hub id whose ``config.json`` is in the local Hugging Face cache: nothing is
    downloaded), and where it was read; (None, "") when none is."""
    for name in candidates:
        if not isinstance(name, str) or not name.strip():
            continue
        path = _config_path(name.strip())
        if path is None:
            continue
        try:
            config = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for key in LAYER_COUNT_KEYS:
            value = config.get(key) if isinstance(config, dict) else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value, f"{key} of the base model {name}'s config.json"
    return None, ""


def _config_path(name: str) -> Optional[str]:
    folder = Path(name).expanduser()
    if folder.is_dir():
        return str(folder / "config.json") if (folder / "config.json").is_file() else None
    repo_id, _, revision = name.partition("@")
    if repo_id.count("/") > 1 or repo_id.startswith(("/", ".", "~")):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json", revision=revision or None)
    except Exception:  # not a valid repository id, or no huggingface_hub
        return None
    return found if isinstance(found, str) else None


def method_parameters(method: str) -> Tuple[str, ...]:
    """The parameters mergekit 0.1.5 gives ``method`` (global or per model)."""
    if method == "linear":
        return ("weight", "normalize")
    if own_method(method):  # ours: weight per model, normalize, and density/gamma where the strategy takes them
        from .strategies import get_strategy

        takes = get_strategy(method).option_names
        return ("weight", "normalize") + tuple(k for k in ("density", "gamma") if k in takes)
    gamma = ("gamma",) if method.startswith("breadcrumbs") else ()
    epsilon = ("epsilon",) if method.startswith("della") else ()
    return ("weight", "density", "normalize", "rescale", "lambda", "int8_mask") + gamma + epsilon


def plan_from_config(data: Any, source: str) -> Dict[str, Any]:
    """The merge a mergekit-shaped configuration (already parsed from YAML) describes, as the CLI's plan:
    inputs, weights, strategy, options, normalize, output, dtype, name, notes, recipe_extra, base_model,
    linear_lora. ``weights`` is one number per input, or a `LayerWeights` where some ``weight`` is a
    per-layer list or conditions (`adapter_merging.cli.plan_weights` resolves it over the inputs' modules).
    Raises `ConfigError` (everything that is wrong, where it can be said in one line)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the file must be a mapping with `models:` and `merge_method:`, got {type(data).__name__}.")
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise ConfigError(f"{source}: needs a `models:` list (each with `model:` and `parameters: {{weight: …}}`).")
    method = data.get("merge_method", "linear")
    ours = own_method(method)
    if not ours and (not isinstance(method, str) or method not in DEFAULTS):
        known = "" if not isinstance(method, str) or method not in UNSUPPORTED_METHODS else " (a mergekit method this library does not compute)"
        raise ConfigError(f"{source}: merge_method {method!r} is not supported{known}; use one of {sorted(DEFAULTS)} "
                          f"(mergekit's) or one of this library's strategies {_own_methods()}.")
    notes: List[str] = []
    unsupported: List[str] = []  # every key we refuse, said at once
    ignored: List[str] = []
    for key in data:
        if key in UNSUPPORTED_KEYS:
            unsupported.append(f"`{key}` ({UNSUPPORTED_KEYS[key]})")
        elif key in TOKENIZER_KEYS:
            ignored.append(key)
            notes.append(f"`{key}` was ignored: an adapter has no tokenizer.")
        elif key not in ("models", "merge_method", "parameters", "dtype", "out_dtype", "base_model") + OWN_KEYS:
            unsupported.append(f"`{key}` (unknown key)")
    allowed = method_parameters(method)
    shared = _mapping(data.get("parameters"), "parameters", source)
    own = {k: _own_value(k, shared.pop(k), source) for k in (list(shared) if ours else OWN_PARAMETERS)
           if k in shared and k not in (OWN_METHOD_PARAMETERS if ours else ())}  # ours: every other key is an option
    if own.get("svd_rank") is not None and own.get("svd_tol") is not None:
        raise ConfigError(f"{source}: parameters: give svd_rank (a fixed rank) or svd_tol (the smallest rank within "
                          "that relative error), not both.")
    globals_ = _values(shared, "parameters", allowed, method, source, unsupported)
    base_model = data.get("base_model")
    if base_model is not None and not isinstance(base_model, str):
        raise ConfigError(f"{source}: base_model must be a model id or folder (a string), got {base_model!r}.")
    inputs, per_model, wheres = [], [], []
    base_weight: Tuple[Setting, ...] = ()
    base_where = ""
    for index, entry in enumerate(models):
        where = f"models[{index}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
            raise ConfigError(f"{source}: {where} needs a `model:` (an adapter folder or Hub id).")
        extra = sorted(set(entry) - {"model", "parameters"})
        if extra:
            unsupported.append(f"{where}: {extra} (unknown key)")
        given = _mapping(entry.get("parameters"), f"{where}.parameters", source)
        global_only = [k for k in given if (k in GLOBAL_ONLY and k in allowed) or (ours and k not in allowed
                                                                                    and k in _strategy_options(method))]
        if global_only:  # mergekit reads these from the global `parameters:` only, and ignores them under a model
            listing = ", ".join(f"{where}.parameters.{k}" for k in global_only)
            it = "it" if len(global_only) == 1 else "them"
            raise ConfigError(f"{source}: {listing}: {'a global parameter' if it == 'it' else 'global parameters'} of "
                              f"{method}, read only from the top-level `parameters:` (as mergekit does, which ignores "
                              f"{it} under a model): move {it} there.")
        values = _values(given, f"{where}.parameters", allowed, method, source, unsupported)
        if base_model is not None and entry["model"] == base_model:
            if method == "linear":  # mergekit's linear ignores the base: it is one more input, ΔW = 0
                base_weight, base_where = _chain(values, globals_), f"{where}.parameters"
                notes.append(f"models[{index}] is the base model: in linear it counts as an input with no update.")
            else:
                notes.append(f"models[{index}] is the base model: its update is zero, as in mergekit (left out).")
            continue
        inputs.append(entry["model"])
        per_model.append(values)
        wheres.append(f"{where}.parameters")
    if unsupported:
        raise ConfigError(f"{source}: not supported: " + "; ".join(unsupported) +
                          ". Give one number per key (mergekit's per-layer lists and filters are read for `weight` "
                          "only).")
    if not inputs:
        raise ConfigError(f"{source}: `models:` lists only the base model: add the adapters to merge.")

    def setting(key: str, index: int, default=None):
        return per_model[index].get(key, globals_.get(key, default))

    chains = [_chain(values, globals_) for values in per_model]
    missing = [f"models[{i}]" for i, chain in enumerate(chains) if not chain]
    if missing:
        raise ConfigError(f"{source}: {', '.join(missing)} have no `weight` (mergekit requires one): give "
                          "`parameters: {weight: …}` to every model, or a global `parameters: {weight: …}`.")
    for where, chain in list(zip(wheres, chains)) + [(base_where, base_weight)]:
        if chain and _first_value(chain, "", 0.0) is None:  # only conditions with filters, and no global weight
            raise ConfigError(f"{source}: {where}.weight: every condition has a filter, so the tensors no filter names "
                              "(embeddings, norms) get no weight, which mergekit refuses: end the list with "
                              "`- value: …` (no filter), or give a global `parameters: {weight: …}`.")
    layered = any(not isinstance(chain[0], Real) for chain in chains + ([base_weight] if base_weight else []))
    weights = [chain[0] for chain in chains]
    for where, values in [("parameters", globals_)] + list(zip(wheres, per_model)):
        for key, (valid, wanted) in RANGES.items():
            if key in values and not valid(values[key]):
                raise ConfigError(f"{source}: {where}.{key} must be {wanted}, got {values[key]!r}.")
    normalize_default, rescale_default = DEFAULTS[method] if not ours else (True, False)
    normalize = globals_.get("normalize")
    if normalize is None:
        normalize = normalize_default
        whose = "this library's default: weights divided by their sum" if ours else f"mergekit's default for {method}"
        notes.append(f"normalize: {str(normalize).lower()} ({whose}; the YAML does not say).")
    else:
        notes.append(f"normalize: {str(normalize).lower()} (as the YAML says).")
    if globals_.get("int8_mask") is not None:
        notes.append("int8_mask was ignored: it only saves memory in mergekit (the result is the same).")
    ignored += ["int8_mask"] if "int8_mask" in globals_ else []
    scale = globals_.get("lambda", 1.0)
    plan: Dict[str, Any] = {
        "inputs": inputs, "options": {}, "normalize": False, "output": data.get("output"),
        "dtype": data.get("out_dtype", data.get("dtype")), "name": data.get("name"), "notes": notes,
        "base_model": base_model, "linear_lora": "exact",
        "recipe_extra": {"merge_method": method, "ignored_keys": ignored, "config_file": source},
    }

    def final_weights(kind: str) -> Any:
        """The plan's weights: one number per model, or the per-layer weights resolved once the modules are known."""
        if layered:
            return LayerWeights(tuple(chains), base_weight, kind, bool(normalize), float(scale), source)
        base = float(base_weight[0]) if base_weight else None
        return combine_weights(kind, weights, base, bool(normalize), float(scale), f"{source}: ")

    if ours:  # this library's strategy: our weights, normalize_weights and options
        options = dict(own)
        for key in ("density", "gamma"):
            values = [setting(key, i) for i in range(len(inputs))]
            if any(v is not None for v in values):
                if any(v is None for v in values):
                    raise ConfigError(f"{source}: {key} is given for some models only: give it to every model, or "
                                      f"once in the global `parameters`.")
                options[key] = values[0] if len(set(values)) == 1 else values
        plan.update(weights=final_weights("as_given"), strategy=method, normalize=bool(normalize), options=options)
        return plan
    if method == "linear":
        plan.update(weights=final_weights("linear"), strategy="linear")
    elif method == "task_arithmetic":
        for key in ("density", "rescale"):
            if key in globals_ or any(key in values for values in per_model):
                notes.append(f"{key} has no effect with task_arithmetic (as in mergekit).")
        plan.update(weights=final_weights("task_arithmetic"), strategy="task_arithmetic")
    else:
        options: Dict[str, Any] = {
            "convention": "mergekit", "normalize": bool(normalize), "scale": float(scale),
            "rescale": bool(globals_.get("rescale", rescale_default)),
            "density": [float(setting("density", i, 1.0)) for i in range(len(inputs))],
        }
        if method.startswith("breadcrumbs"):
            gammas = [float(setting("gamma", i, 0.01)) for i in range(len(inputs))]
            options["gamma"] = gammas[0] if len(set(gammas)) == 1 else gammas
        if method.startswith("della"):
            epsilons = [float(setting("epsilon", i, EPSILON_DEFAULT)) for i in range(len(inputs))]
            for i, (density, epsilon) in enumerate(zip(options["density"], epsilons)):
                # mergekit 0.1.5 refuses a window touching 0 or 1 (della_magprune), density 1 keeps everything
                if density < 1 and not (density - epsilon > 0 and density + epsilon < 1):
                    raise ConfigError(f"{source}: models[{i}] has density {density:g} and epsilon {epsilon:g}: "
                                      f"mergekit needs density ± epsilon inside (0, 1), got [{density - epsilon:g}, "
                                      f"{density + epsilon:g}]; choose a smaller epsilon.")
            options["epsilon"] = epsilons[0] if len(set(epsilons)) == 1 else epsilons
        if method.startswith("dare") or method.startswith("della"):
            what = "DARE's" if method.startswith("dare") else "MAGPRUNE's"
            notes.append(f"{what} random masks follow mergekit's definition but not its random numbers (seed "
                         f"{own.get('seed', 0)} of this library).")
        options.update(own)
        plan.update(weights=final_weights("as_given"), strategy=method, options=options)
        return plan
    plan["options"].update(own)
    return plan


def _strategy_options(method: str) -> Tuple[str, ...]:
    from .strategies import get_strategy

    return get_strategy(method).option_names


def _own_methods() -> List[str]:
    from .strategy_names import STRATEGY_NAMES

    return [name for name in STRATEGY_NAMES if own_method(name)]


def _mapping(value: Any, key: str, source: str) -> Dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: `{key}` must be a mapping (key: value), got {type(value).__name__} {value!r}.")
    return dict(value)


def _values(given: Mapping[str, Any], where: str, allowed, method: str, source: str, unsupported: List[str]) -> Dict[str, Any]:
    """The parameters in ``given``, each checked: booleans must be true/false, numbers numbers, a ``weight`` may
    also be a per-layer list or conditions (`_weight_setting`); lists and filters of other keys go to
    ``unsupported``, and so do keys ``method`` does not have."""
    out: Dict[str, Any] = {}
    for key, value in given.items():
        if key not in allowed:
            unsupported.append(f"{where}.{key} (not a parameter of {method}: it has {', '.join(allowed)})")
            continue
        if key == "weight" and isinstance(value, (list, dict)):
            out[key] = _weight_setting(value, f"{where}.{key}", source)
            continue
        if isinstance(value, (list, dict)):
            what = "a filter" if isinstance(value, dict) or any(isinstance(v, dict) for v in value) else "a per-layer list"
            unsupported.append(f"{where}.{key} ({what})")
            continue
        if key in BOOLEANS:
            if not isinstance(value, bool):
                raise ConfigError(f"{source}: {where}.{key} must be true or false, got {value!r}"
                                  f"{' (a string)' if isinstance(value, str) else ''}.")
        elif isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            raise ConfigError(f"{source}: {where}.{key} must be a finite number, got {value!r}{_string_hint(value)}.")
        out[key] = value
    return out


def _chain(values: Mapping[str, Any], globals_: Mapping[str, Any]) -> Tuple[Setting, ...]:
    """A model's ``weight`` settings, its own first, then the global one (mergekit asks them in that order)."""
    return tuple(v for v in (values.get("weight"), globals_.get("weight")) if v is not None)


def _weight_setting(value: Any, key: str, source: str) -> Setting:
    """A ``weight`` given as a list or a mapping: mergekit's per-layer list (numbers, first layer to last), one
    condition ``{filter, value}``, or a list of conditions (each value a number or a per-layer list)."""
    if isinstance(value, dict):
        return Conditions((_condition(value, key, source),))
    if not value:
        raise ConfigError(f"{source}: {key} is an empty list: give a number, or a list of numbers (the values from "
                          "the first layer to the last, interpolated in between).")
    conditions = [isinstance(v, dict) for v in value]
    if all(conditions):
        return Conditions(tuple(_condition(v, f"{key}[{i}]", source) for i, v in enumerate(value)))
    if any(conditions):
        raise ConfigError(f"{source}: {key} mixes numbers and conditions: give a list of numbers (a per-layer list) "
                          "or a list of conditions (`- filter: …` / `value: …`).")
    return _gradient(value, key, source)


def _gradient(values: List[Any], key: str, source: str) -> Gradient:
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            raise ConfigError(f"{source}: {key}[{i}] must be a finite number, got {value!r}{_string_hint(value)}: a "
                              "per-layer list holds numbers, from the first layer to the last.")
    return Gradient(tuple(float(v) for v in values))


def _condition(value: Dict[str, Any], key: str, source: str) -> Tuple[Optional[str], Union[float, Gradient]]:
    if "value" not in value or set(value) - {"filter", "value"}:
        raise ConfigError(f"{source}: {key} is a condition with the keys {sorted(map(str, value))}: a condition has "
                          "`value:` (a number or a per-layer list) and optionally `filter:` (text of the tensor "
                          "names it applies to).")
    filter_ = value.get("filter")
    if filter_ is not None and (not isinstance(filter_, str) or not filter_):
        raise ConfigError(f"{source}: {key}.filter must be text of the tensor names it applies to (e.g. self_attn), "
                          f"got {filter_!r}; leave it out for every tensor.")
    given = value["value"]
    if isinstance(given, list):
        if not given:
            raise ConfigError(f"{source}: {key}.value is an empty list: give a number, or a list of numbers (the "
                              "values from the first layer to the last).")
        return filter_, _gradient(given, f"{key}.value", source)
    if isinstance(given, bool) or not isinstance(given, Real) or not math.isfinite(given):
        raise ConfigError(f"{source}: {key}.value must be a finite number or a list of numbers, got "
                          f"{given!r}{_string_hint(given)}.")
    return filter_, float(given)


def _string_hint(value: Any) -> str:
    """Why a YAML value is a string: PyYAML (YAML 1.1) reads ``1e-3`` as text, ``1.0e-3`` as a number."""
    if not isinstance(value, str):
        return ""
    try:
        float(value)
    except ValueError:
        return " (a string)"
    match = re.fullmatch(r"\s*([-+]?[\d.]+)[eE]([-+]?\d+)\s*", value)
    if match:  # YAML 1.1 needs a dot in the mantissa and a sign in the exponent
        mantissa, exponent = match.groups()
        written = f"{mantissa if '.' in mantissa else mantissa + '.0'}e{exponent if exponent[0] in '+-' else '+' + exponent}"
        return f" (a string: YAML reads {value.strip()} as text; write {written})"
    return " (a string)"


def _own_value(key: str, value: Any, source: str) -> Any:
    """One of our own global parameters (``svd_rank``, ``svd_tol``, ``seed``, ``majority_sign_method``), checked
    here so that an error names the file and the key."""
    where = f"{source}: parameters.{key}"
    if value is None or key not in ("svd_rank", "seed", "svd_tol", "majority_sign_method"):
        return value  # another option of our strategy: the strategy checks it
    if key == "majority_sign_method":
        from .strategy_names import SIGN_METHOD_NAMES

        if value not in SIGN_METHOD_NAMES:
            raise ConfigError(f"{where} must be one of {', '.join(SIGN_METHOD_NAMES)}, got {value!r}.")
        return value
    if key in ("svd_rank", "seed"):
        if isinstance(value, bool) or not isinstance(value, Integral):
            raise ConfigError(f"{where} must be {'a positive integer' if key == 'svd_rank' else 'an integer'}, "
                              f"got {value!r}{_string_hint(value)}.")
        if key == "svd_rank" and value < 1:
            raise ConfigError(f"{where} must be a positive integer, got {value!r}.")
        return int(value)
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {value!r}{_string_hint(value)}.")
    if key in RANGES and not RANGES[key][0](value):
        raise ConfigError(f"{where} must be {RANGES[key][1]}, got {value!r}.")
    return float(value)
