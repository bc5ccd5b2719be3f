"""The two saved-adapter formats, translated to the engine's (configuration, {slot: tensor}) and back.

* ``adapters``: what ``model.save_adapter`` writes — ``adapter_config.json`` (the configuration
  under ``"config"``, the adapter's ``"name"``) and ``pytorch_adapter.bin`` or
  ``adapter.safetensors`` whose keys hold the name (``…loras.<name>.lora_A``); optionally a head,
  ``head_config.json`` + ``pytorch_model_head.bin`` / ``model_head.safetensors``.
* ``peft``: what PEFT's ``save_pretrained`` writes for LoRA and IA³ — ``adapter_config.json``
  (``peft_type``, ``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``, ``use_rslora``,
  ``target_modules``, …) and ``adapter_model.safetensors`` / ``adapter_model.bin`` with keys
  ``base_model.model.<module>.lora_A.weight``. Embedding LoRAs (``lora_embedding_A/B``) and Conv2d
  LoRAs (4-D factors) are read as the 2-D factors of their update and written back in their shape;
  every module gets its own rank (from its tensors) and scaling (``alpha_pattern``, rsLoRA α/√r).
  ``modules_to_save`` (full trained copies, e.g. a classifier) are merged linearly like heads; the
  frozen base weights PEFT saves beside an embedding LoRA must be equal in every input and are copied.
"""
from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..engine import AdapterInput, MergeResult
from ..methods.heads import HeadConfig
from ..state import ADAPTER_CONTAINERS, HEAD_CONTAINERS, Slot, parse_key
from .io import InputError, LazyFile, Renamed, first_existing, write_safetensors

CONFIG = "adapter_config.json"


@dataclass
class SavedAdapter:
    """One input folder, read: its engine inputs (adapter, and head or modules to save) and what the
    writer needs to write a folder of the same format."""

    format: str
    folder: Path
    source: str
    name: str
    adapter: AdapterInput
    weights_file: Path
    metadata: Dict[str, Any]
    head: Optional[AdapterInput] = None
    head_file: Optional[Path] = None
    head_metadata: Optional[Dict[str, Any]] = None
    #: PEFT: per module, how its 2-D factors map back to the saved tensors
    layouts: Dict[str, "Layout"] = field(default_factory=dict)
    #: PEFT: frozen tensors saved beside the adapter (copied, must be equal in every input)
    frozen: Dict[str, torch.Tensor] = field(default_factory=dict)


def detect_format(folder: Path) -> str:
    """``"adapters"`` or ``"peft"``, from the folder's ``adapter_config.json``."""
    path = folder / CONFIG
    if not path.is_file():
        raise InputError(f"{folder} holds no {CONFIG}: it is not a saved adapter (adapters or PEFT format).")
    metadata = read_json(path)
    if "peft_type" in metadata:
        return "peft"
    if isinstance(metadata.get("config"), dict) and "name" in metadata:
        return "adapters"
    raise InputError(f"{path} is neither an adapters nor a PEFT adapter configuration (no 'config'/'name' or 'peft_type').")


def read_json(path: Path) -> Dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InputError(f"{path} is not readable JSON ({error}).") from None
    if not isinstance(data, dict):
        raise InputError(f"{path} does not hold a JSON object.")
    return data


def read_adapter(folder: Path, name: str, source: str) -> SavedAdapter:
    """Read an input folder of either format."""
    kind = detect_format(folder)
    return (read_adapters_format if kind == "adapters" else read_peft_format)(folder, name, source)


# ============================================================================ adapters format
ADAPTERS_WEIGHTS = ("adapter.safetensors", "pytorch_adapter.bin")
ADAPTERS_HEAD_WEIGHTS = ("model_head.safetensors", "pytorch_model_head.bin")


def read_adapters_format(folder: Path, name: str, source: str) -> SavedAdapter:
    from adapters import AdapterConfig

    metadata = read_json(folder / CONFIG)
    saved_name = metadata["name"]
    if not isinstance(saved_name, str) or not saved_name:
        raise InputError(f"{folder / CONFIG}: 'name' is {json.dumps(saved_name)}, but must be the adapter's name (a string).")
    try:
        config = AdapterConfig.load(metadata["config"])
    except Exception as error:  # a KeyError says only the key: say what is missing
        if isinstance(error, KeyError):
            why = f"'config' lacks the key {error.args[0]!r}" + (
                ", which lists the members of an 'architecture': 'union' configuration" if error.args[0] == "configs" else "")
        else:
            why = _one_line(error) or type(error).__name__
        raise InputError(f"{folder / CONFIG}: its configuration cannot be read by adapters ({why}): correct the file, "
                         "or re-save the adapter.") from None
    check_adapters_config(folder / CONFIG, config)
    weights_file = first_existing(folder, ADAPTERS_WEIGHTS)
    if weights_file is None:
        raise InputError(f"{folder} holds no weights file ({' or '.join(ADAPTERS_WEIGHTS)}).")
    tensors = _slots_of(LazyFile(weights_file), saved_name, ADAPTER_CONTAINERS, weights_file)
    saved = SavedAdapter("adapters", folder, source, name, AdapterInput(name, config, tensors), weights_file, metadata)
    head_config = folder / "head_config.json"
    head_file = first_existing(folder, ADAPTERS_HEAD_WEIGHTS)
    if head_config.is_file() and head_file is not None:
        head_metadata = read_json(head_config)
        head = head_metadata.get("config") or {}
        head_tensors = _slots_of(LazyFile(head_file), head_metadata.get("name", saved_name), HEAD_CONTAINERS, head_file)
        saved.head = AdapterInput(name, HeadConfig(str(head.get("head_type", "head")), dict(head)), head_tensors)
        saved.head_file, saved.head_metadata = head_file, head_metadata
    return saved


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def check_adapters_config(path: Path, config) -> None:
    """Refuse what ``adapters`` loads without a check but no merge can use: a LoRA ``r`` that is not a
    positive integer, an ``alpha`` that is not a number (one line naming the file and the key)."""
    from adapters import LoRAConfig

    from ..engine import config_parts

    for part in config_parts(config):
        if not isinstance(part, LoRAConfig):
            continue
        if not _positive_int(part["r"]):
            raise InputError(f"{path}: 'config.r' is {json.dumps(part['r'])}, but must be a positive integer (the LoRA rank): correct it in the file.")
        if not _finite_number(part["alpha"]):
            raise InputError(f"{path}: 'config.alpha' is {json.dumps(part['alpha'])}, but must be a number: correct it in the file.")


def _slots_of(weights: LazyFile, saved_name: str, containers, path: Path) -> Renamed:
    slots = {}
    for key in weights:
        slot = parse_key(key, saved_name, containers)
        if slot is None:
            raise InputError(
                f"{path} holds '{key}', which is not a tensor of the adapter '{saved_name}' named in its "
                f"{CONFIG}: the folder mixes files of different adapters."
            )
        slots[slot] = key
    return Renamed(weights, slots)


def write_adapters_format(folder: Path, name: str, first: SavedAdapter, result: MergeResult, head: Optional[MergeResult]) -> List[str]:
    """Write ``result`` as ``model.save_adapter`` does (config + ``pytorch_adapter.bin``); returns the files."""
    import adapters

    metadata = copy.deepcopy(first.metadata)
    metadata.update(name=name, config=result.config.to_dict(), version=f"adapters.{adapters.__version__}")
    (folder / CONFIG).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    torch.save({slot.key(name): t.detach().cpu().contiguous() for slot, t in result.tensors.items()}, folder / "pytorch_adapter.bin")
    files = [CONFIG, "pytorch_adapter.bin"]
    if head is not None:
        head_metadata = copy.deepcopy(first.head_metadata)
        head_metadata["name"] = name
        (folder / "head_config.json").write_text(json.dumps(head_metadata, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        torch.save({slot.key(name): t.detach().cpu().contiguous() for slot, t in head.tensors.items()}, folder / "pytorch_model_head.bin")
        files += ["head_config.json", "pytorch_model_head.bin"]
    return files


# ============================================================================ PEFT format
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<param>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$")


@dataclass(frozen=True)
class Layout:
    """How one module's saved tensors map to its 2-D factors B (d × r) and A (r × k)."""

    kind: str  # "linear", "embedding", "conv", "ia3" or "parameter" (PEFT's target_parameters, in memory only)
    a_shape: Tuple[int, ...] = ()  # the saved A's shape after r (conv: in, *kernel, as (in, k) for Conv1d)
    b_shape: Tuple[int, ...] = ()  # the saved B's shape after (out, r) (conv: 1, …); IA³: the vector's shape
    wrapper: str = ""  # "parameter": the path of PEFT's ParamWrapper that holds the factors
    expert: int = 0  # "parameter": which expert of a 3-D (experts, …) parameter this module is
    experts: int = 1  # "parameter": the parameter's number of experts (1 for a 2-D parameter)

    def keys(self, module: str) -> Dict[str, str]:
        if self.kind == "ia3":
            return {"lora_B": f"{PEFT_PREFIX}{module}.ia3_l"}
        if self.kind == "embedding":
            return {"lora_A": f"{PEFT_PREFIX}{module}.lora_embedding_A", "lora_B": f"{PEFT_PREFIX}{module}.lora_embedding_B"}
        return {"lora_A": f"{PEFT_PREFIX}{module}.lora_A.weight", "lora_B": f"{PEFT_PREFIX}{module}.lora_B.weight"}

    def to_matrix(self, param: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.reshape(tensor.shape[0], -1) if self.kind == "conv" else tensor

    def to_saved(self, param: str, matrix: torch.Tensor) -> torch.Tensor:
        if self.kind == "conv":  # A: (r, in·k…) → (r, in, *kernel); B: (out, r) → (out, r, 1, …) (Conv1d/2d/3d)
            return matrix.reshape(matrix.shape[0], *self.a_shape) if param == "lora_A" else matrix.reshape(*matrix.shape, *self.b_shape)
        if self.kind == "ia3":
            return matrix.reshape(self.b_shape)
        return matrix


def peft_adapter_input(name: str, peft_type: str, r: int, alpha: float, modules: Mapping[str, Tuple[int, float]],
                       tensors: Mapping) -> AdapterInput:
    """A PEFT adapter as the engine's input, from a folder or a live model alike: a LoRA (``r``,
    ``lora_alpha``, and each module's own (rank, scaling) in ``modules``) or an IA³. PEFT chooses its
    modules per adapter (``target_modules``), so a module an input lacks is a zero update."""
    from adapters import IA3Config, LoRAConfig

    if peft_type == "IA3":
        return AdapterInput(name, IA3Config(alpha=1), tensors, selects_modules=True)
    default = float(alpha) / int(r)
    ranks = {m: rank for m, (rank, _) in modules.items() if rank != int(r)}
    scalings = {m: scaling for m, (_, scaling) in modules.items() if scaling != default}
    return AdapterInput(name, LoRAConfig(r=int(r), alpha=alpha), tensors, ranks, scalings, selects_modules=True)


def merged_peft_fields(peft_type: str, result: MergeResult, feedforward: Sequence[str] = ()) -> Dict[str, Any]:
    """The fields of the merged adapter's PEFT configuration (the rest is copied from the first input):
    its modules by full name, and for LoRA one r and lora_alpha (scaling alpha/r, ``use_rslora=False``),
    with rank_pattern / alpha_pattern where modules differ."""
    modules = sorted({slot.prefix for slot in result.tensors})
    fields: Dict[str, Any] = {"target_modules": modules, "layers_to_transform": None, "layers_pattern": None,
                              "exclude_modules": None}
    if peft_type == "IA3":
        fields["feedforward_modules"] = sorted(m for m in modules if any(m == f or m.endswith(f".{f}") for f in feedforward))
        return fields
    r = int(result.config["r"])
    scaling = float(result.config["alpha"]) / r
    fields.update(r=r, lora_alpha=result.config["alpha"], use_rslora=False)
    fields["rank_pattern"] = {m: rank for m, (rank, _) in result.module_overrides.items() if rank != r}
    fields["alpha_pattern"] = {m: rank * s for m, (rank, s) in result.module_overrides.items() if s != scaling}
    return fields


def read_peft_format(folder: Path, name: str, source: str) -> SavedAdapter:
    metadata = read_json(folder / CONFIG)
    peft_type = metadata.get("peft_type")
    if peft_type not in ("LORA", "IA3"):
        raise InputError(f"{folder}: PEFT type {peft_type!r} is not supported; LoRA and IA³ adapters are.")
    check_peft_config(folder / CONFIG, metadata)
    for flag, what in (("use_dora", "DoRA"), ("lora_bias", "LoRA biases (lora_bias)")):
        if metadata.get(flag):
            raise InputError(
                f"{folder}: {flag}=True. {what} adapters are not merged from files: their update is not s·B·A. "
                "Merge them in a model instead."
            )
    weights_file = first_existing(folder, PEFT_WEIGHTS)
    if weights_file is None:
        raise InputError(f"{folder} holds no weights file ({' or '.join(PEFT_WEIGHTS)}).")
    _refuse_target_parameters(folder, metadata)
    weights = LazyFile(weights_file)
    modules_to_save = set(metadata.get("modules_to_save") or [])  # a list (check_peft_config)
    slots: Dict[Slot, str] = {}
    layouts: Dict[str, Layout] = {}
    frozen: Dict[str, torch.Tensor] = {}
    saved_modules: Dict[Slot, str] = {}
    for key in weights:
        if not key.startswith(PEFT_PREFIX):
            raise InputError(f"{weights_file} holds '{key}', not a PEFT key (base_model.model.…).")
        rest = key[len(PEFT_PREFIX):]
        match = _LORA_KEY.match(rest)
        if peft_type == "IA3" and rest.endswith(".ia3_l"):
            module = rest[: -len(".ia3_l")]
            slots[Slot(module, "loras", "lora_B")] = key
            layouts[module] = Layout("ia3", b_shape=tuple(_shape(weights, key)))
        elif peft_type == "LORA" and match:
            module, param = match["module"], match["param"]
            target = "lora_A" if param in ("lora_A.weight", "lora_embedding_A") else "lora_B"
            slots[Slot(module, "loras", target)] = key
            shape = _shape(weights, key)
            if param.startswith("lora_embedding"):
                layouts[module] = Layout("embedding")
            elif len(shape) >= 3:  # Conv1d, Conv2d, Conv3d: A (r, in, *kernel), B (out, r, 1, …)
                previous = layouts.get(module, Layout("conv"))
                layouts[module] = Layout(
                    "conv",
                    a_shape=tuple(shape[1:]) if target == "lora_A" else previous.a_shape,
                    b_shape=tuple(shape[2:]) if target == "lora_B" else previous.b_shape,
                )
            else:
                layouts.setdefault(module, Layout("linear"))
        elif rest.endswith(".base_layer.weight"):
            frozen[key] = weights[key]  # the base embedding PEFT saves beside an embedding LoRA
        elif any(rest == f"{m}.weight" or rest.startswith(f"{m}.") or f".{m}." in f".{rest}" for m in modules_to_save):
            saved_modules[Slot("", "heads", rest)] = key
        else:
            raise InputError(
                f"{weights_file} holds '{key}', which is not a LoRA/IA³ factor this library merges (DoRA magnitudes, "
                "LoRA biases and trainable tokens are not supported from files)."
            )
    _check_conv_groups(weights_file, weights, slots, layouts)
    if isinstance(metadata.get("feedforward_modules"), str):  # PEFT's regex form: the modules it matches
        metadata["feedforward_modules"] = sorted(m for m in layouts if re.fullmatch(metadata["feedforward_modules"], m))
    transform = lambda slot, tensor: layouts[slot.prefix].to_matrix(slot.param, tensor)  # noqa: E731
    modules = _lora_modules(metadata, weights, slots) if peft_type == "LORA" else {}
    adapter = peft_adapter_input(name, peft_type, metadata.get("r", 8), metadata.get("lora_alpha", 8), modules,
                                 Renamed(weights, slots, transform))
    saved = SavedAdapter("peft", folder, source, name, adapter, weights_file, metadata, layouts=layouts, frozen=frozen)
    if saved_modules:
        saved.head = AdapterInput(name, HeadConfig("modules_to_save"), Renamed(weights, saved_modules), selects_modules=True)
        saved.head_file = weights_file
    return saved


def _refuse_target_parameters(folder: Path, metadata: Mapping[str, Any]) -> None:
    """PEFT's ``target_parameters`` (LoRA on raw parameters, e.g. mixture-of-experts weights) save their factors
    under the same keys as a module's LoRA, but interleaved by expert: read as one LoRA they would merge wrongly."""
    if metadata.get("target_parameters"):
        raise InputError(
            f"{folder}: LoRA on target_parameters ({', '.join(map(str, metadata['target_parameters']))}) is not merged "
            "from files: a saved folder does not say how its factors split into experts. Load the adapters into the "
            "model and merge them there with adapter_merging.peft.add_weighted_adapter."
        )


def _check_conv_groups(weights_file: Path, weights: LazyFile, slots: Mapping[Slot, str],
                       layouts: Mapping[str, "Layout"]) -> None:
    """A LoRA on a convolution with groups > 1 has a grouped lora_B (out, r/groups, 1, …): refused by name."""
    keys = {(slot.prefix, slot.param): key for slot, key in slots.items()}
    for module, layout in layouts.items():
        if layout.kind == "conv" and (module, "lora_A") in keys and (module, "lora_B") in keys:
            a_shape, b_shape = _shape(weights, keys[module, "lora_A"]), _shape(weights, keys[module, "lora_B"])
            if b_shape[1] != a_shape[0]:
                raise InputError(
                    f"{weights_file}: the LoRA on {module} is on a convolution with groups={a_shape[0] // max(b_shape[1], 1)} "
                    f"(lora_B {b_shape}, lora_A {a_shape}): it is not merged, its grouped lora_B makes the update no "
                    "s·B·A of one matrix."
                )


def check_peft_config(path: Path, metadata: Dict[str, Any]) -> None:
    """Refuse a PEFT configuration this library would misread, one line naming the file and the key:
    ``r`` and ``lora_alpha`` must be numbers (r a positive integer), ``rank_pattern`` / ``alpha_pattern``
    dicts of valid regular expressions to such numbers, ``use_rslora``, ``use_dora``, ``lora_bias`` and
    ``fan_in_fan_out`` booleans (or null). ``modules_to_save`` /
    ``target_modules`` given as one string mean that one name (``modules_to_save: "lm_head"`` is
    ``["lm_head"]``, and is written back as a list: PEFT would match every letter of a string)."""

    def refuse(key: str, value: Any, wanted: str) -> InputError:
        return InputError(f"{path}: '{key}' is {json.dumps(value)}, but must be {wanted}: correct it in the file.")

    lora = metadata.get("peft_type") == "LORA"
    if lora:
        if "r" in metadata and not _positive_int(metadata["r"]):
            raise refuse("r", metadata["r"], "a positive integer (the LoRA rank)")
        if "lora_alpha" in metadata and not _finite_number(metadata["lora_alpha"]):
            raise refuse("lora_alpha", metadata["lora_alpha"], "a number (the scaling is lora_alpha / r)")
        for key, valid, wanted in (("rank_pattern", _positive_int, "a positive integer"), ("alpha_pattern", _finite_number, "a number")):
            patterns = metadata.get(key)
            if patterns is None:
                continue
            if not isinstance(patterns, dict):
                raise refuse(key, patterns, "a dict {module name or regular expression: value} (or null)")
            for pattern, value in patterns.items():
                try:
                    re.compile(rf"(.*\.)?({pattern})$")
                except re.error as error:
                    raise InputError(
                        f"{path}: '{key}' has the key {json.dumps(pattern)}, which is not a valid regular expression "
                        f"({error}): correct it in the file."
                    ) from None
                if not valid(value):
                    raise refuse(f"{key}[{json.dumps(pattern)}]", value, wanted)
    for key in ("use_rslora", "use_dora", "lora_bias", "fan_in_fan_out"):  # a string "false" is not false
        if metadata.get(key) is not None and not isinstance(metadata[key], bool):
            raise refuse(key, metadata[key], "true or false")
    for key in ("modules_to_save", "target_modules", "feedforward_modules"):
        value = metadata.get(key)
        if key == "modules_to_save" and isinstance(value, str):
            metadata[key] = [value]
        elif value is not None and not isinstance(value, str) and (
            not isinstance(value, list) or not all(isinstance(v, str) for v in value)
        ):
            raise refuse(key, value, "a list of module names (or null)")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _shape(weights: LazyFile, key: str) -> Tuple[int, ...]:
    return tuple(weights.shape_of(key))


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that is a suffix of the module name
    as a whole name component (``re.match(rf"(.*\\.)?({key})$", module)``)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _lora_modules(metadata, weights: LazyFile, slots: Mapping[Slot, str]) -> Dict[str, Tuple[int, float]]:
    """Each module's (rank, scaling): the rank from its tensors, the scaling from alpha_pattern (or
    lora_alpha), divided by r (rsLoRA: by √r), as PEFT computes it."""
    alpha, rslora = float(metadata.get("lora_alpha", 8)), bool(metadata.get("use_rslora"))
    modules = {}
    for slot, key in slots.items():
        if slot.param == "lora_A":
            rank = int(_shape(weights, key)[0])
            if rank < 1:
                raise InputError(
                    f"{weights.path}: the LoRA of '{slot.prefix}' has rank 0 ({key} has shape {_shape(weights, key)}): "
                    "it holds no update. Re-save the adapter, or leave it out."
                )
            module_alpha = float(_pattern_value(metadata.get("alpha_pattern") or {}, slot.prefix, alpha))
            modules[slot.prefix] = (rank, module_alpha / (math.sqrt(rank) if rslora else rank))
    return modules


def check_frozen(inputs: List[SavedAdapter]) -> Dict[str, torch.Tensor]:
    """The frozen tensors PEFT saves beside an adapter (the base embedding of an embedding LoRA) must be
    the same in every input that holds them; they are copied."""
    frozen: Dict[str, torch.Tensor] = {}
    holder: Dict[str, str] = {}
    for item in inputs:
        for key, tensor in item.frozen.items():
            if key in frozen and not torch.equal(frozen[key], tensor):
                raise InputError(
                    f"'{holder[key]}' and '{item.name}' saved different frozen base weights beside their adapters "
                    f"({key}): they were trained on different base models."
                )
            frozen.setdefault(key, tensor)
            holder.setdefault(key, item.name)
    return frozen


def write_peft_format(folder: Path, inputs: List[SavedAdapter], result: MergeResult, saved_modules: Optional[MergeResult]) -> List[str]:
    """Write ``result`` as PEFT's ``save_pretrained`` does (``adapter_config.json`` +
    ``adapter_model.safetensors``), loadable by ``PeftModel.from_pretrained``."""
    first = inputs[0]
    metadata = copy.deepcopy(first.metadata)
    layouts: Dict[str, Layout] = {}
    for item in inputs:
        for module, layout in item.layouts.items():
            layouts.setdefault(module, layout)
    forward = [f for item in inputs for f in item.metadata.get("feedforward_modules") or []]
    metadata.update(merged_peft_fields(metadata["peft_type"], result, forward))
    tensors: Dict[str, torch.Tensor] = {}
    for slot, tensor in result.tensors.items():
        layout = layouts[slot.prefix]
        tensors[layout.keys(slot.prefix)[slot.param]] = layout.to_saved(slot.param, tensor).detach().cpu().contiguous()
    if saved_modules is not None:
        for slot, tensor in saved_modules.tensors.items():
            tensors[PEFT_PREFIX + slot.param] = tensor.detach().cpu().contiguous()
    else:
        metadata["modules_to_save"] = None
    tensors.update({k: v.contiguous() for k, v in check_frozen(inputs).items()})
    (folder / CONFIG).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    write_safetensors(folder / "adapter_model.safetensors", tensors, metadata={"format": "pt"})
    return [CONFIG, "adapter_model.safetensors"]
