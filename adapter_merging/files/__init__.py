"""Merging saved adapters without a model: adapter folders (``adapters`` or PEFT format) in, one merged
folder of the same format out, with a ``merge_report.json`` that says where it came from.

The merge is the engine's (`adapter_merging.engine.merge`), the same as ``average_adapter``'s; this
module only reads the inputs (lazily, safely), writes the output (atomically), and records the recipe.
"""
from __future__ import annotations

import json
import os
import re
from importlib import metadata
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Union

if TYPE_CHECKING:
    import torch

from .. import __version__
from .._progress import Progress, progress_reporter
from .._warnings import warn
from ..engine import check_option_names, full_weights_note, merge
from ..ops.weights import check_flag, default_weights, has_module_weights
from ..report import MergeReport
from ..strategies import CombineStrategy, SignMethod
from ..strategy_names import Space
from .formats import SavedAdapter, read_adapter, write_adapters_format, write_peft_format
from .io import (
    InputError, atomic_folder, check_distinct, check_output, hub_commit, placed, remove_stale, resolve_folder, sha256,
)

__all__ = ["merge_saved_adapters", "InputError", "REPORT_NAME", "CARD_NAME"]

Source = Union[str, "os.PathLike[str]"]
#: the recipe and report written into every output folder
REPORT_NAME = "merge_report.json"
#: the model card written into every output folder
CARD_NAME = "README.md"


def merge_saved_adapters(
    inputs: Union[Sequence[Source], Mapping[Source, float]],
    output_dir: Source,
    *,
    weights: Optional[Union[Sequence[float], Mapping[Source, float]]] = None,
    combine_strategy: CombineStrategy = "linear",
    normalize_weights: bool = True,
    svd_rank: Optional[int] = None,
    overwrite_ok: bool = False,
    name: Optional[str] = None,
    svd_tol: Optional[float] = None,
    density: Optional[float] = None,
    majority_sign_method: Optional[SignMethod] = None,
    gamma: Optional[float] = None,
    seed: Optional[int] = None,
    space: Optional[Space] = None,
    eta: Optional[float] = None,
    common_fraction: Optional[float] = None,
    epsilon: Optional[float] = None,
    device: Optional[str] = None,
    dtype: Optional[Union[str, "torch.dtype"]] = None,
    progress: Progress = None,
    allow_different_bases: bool = False,
    base_model: Optional[str] = None,
    linear_lora: Literal["parameters", "exact"] = "parameters",
    recipe_extra: Optional[Mapping[str, Any]] = None,
    notes: Sequence[str] = (),
    **strategy_options: Any,
) -> MergeReport:
    """Merge saved adapters into ``output_dir``, with no base model loaded.

    Same weights, strategies, options and errors as `adapter_merging.average_adapter`. The inputs share
    one format, detected per folder: ``adapters`` (``model.save_adapter``; its prediction head is
    merged too when every input holds one) or PEFT (LoRA and IA³, ``save_pretrained``). The output
    has the same format, loads with ``model.load_adapter(output_dir)`` or
    ``PeftModel.from_pretrained(model, output_dir)``, and holds ``merge_report.json``.

    :param inputs: adapter folders (or Hugging Face Hub ids, ``org/name`` or ``org/name@revision``), as
        a list, or a dict ``{folder: weight}``.
    :param output_dir: the folder to write; created, or an existing empty one. It is written into a
        temporary folder and renamed into place when complete, so a failed run leaves none.
    :param weights: one weight per input, or a dict ``{folder: weight}``; None gives each 1/N.
    :param combine_strategy: see `adapter_merging.STRATEGIES`; also ``"task_arithmetic"`` (mergekit's
        name): the exact Σ λᵢ ΔWᵢ, ``lora_delta_w_svd`` at the exact rank for LoRA, ``linear`` for the
        methods whose linear merge is exact (bottleneck, prefix and prompt tuning, IA³, ReFT).
    :param normalize_weights: divide the weights by their sum (pass False for task arithmetic).
    :param svd_rank: rank of a re-factorised LoRA (None: the exact rank, resp. Σ rᵢ).
    :param overwrite_ok: replace a non-empty ``output_dir``.
    :param name: the adapter's name in the output (``adapters`` format); default: the folder's name.
    :param svd_tol: see `adapter_merging.average_adapter`.
    :param density: see `adapter_merging.average_adapter`.
    :param majority_sign_method: see `adapter_merging.average_adapter`.
    :param gamma: see `adapter_merging.average_adapter`.
    :param seed: see `adapter_merging.average_adapter`.
    :param space: see `adapter_merging.average_adapter` (``"full"``, ``"core"`` or ``"knots"``).
    :param eta: see `adapter_merging.average_adapter` (``star``).
    :param common_fraction: see `adapter_merging.average_adapter` (``iso_cts``).
    :param epsilon: see `adapter_merging.average_adapter` (``della``, ``della_linear``).
    :param device: where to compute (e.g. ``"cuda"``); the output is written from the CPU.
    :param dtype: the dtype of the merged adapter (``"float32"``, ``"float16"``, ``"bfloat16"``,
        ``"float64"`` or a torch dtype). The merge is computed from the inputs as stored and its report
        measures the stored result against them (storage rounding included). None: the inputs' dtype.
    :param progress: a progress bar over modules on stderr: None (default) shows one if the merge
        takes longer than 2 s, True always, False never; or a callable ``progress(modules done,
        modules in all)``.
    :param allow_different_bases: merge inputs whose recorded base models differ (a `MergeWarning`
        and a report note) instead of refusing them. The recorded base is ``base_model_name_or_path``
        (PEFT) or ``model_name`` (``adapters``); an input that records none never differs.
    :param base_model: the base model every input must have been trained on (mergekit's
        ``base_model:``): an input that records another is refused; one that records none gets a
        report note. Two names are the same base when equal, or when their last path components (the
        repository names) are equal, ignoring case (``org/bert-base`` = ``bert-base`` = ``…/bert-base/``).
    :param linear_lora: what ``combine_strategy="linear"`` means for LoRA inputs: ``"parameters"``
        (``adapters``' meaning: A and B combined separately, with cross-terms) or ``"exact"``
        (mergekit's: the exact Σ λᵢ ΔWᵢ, ``lora_delta_w_svd`` at the exact rank; families without an
        exact strategy keep ``linear``, with a note). The recipe records what it resolved to.
    :param recipe_extra: more JSON entries for the recipe (``merge_report.json``'s ``recipe``), e.g.
        the command line's ignored keys; they may not replace the recipe's own entries.
    :param notes: lines appended to the report's notes.
    :param strategy_options: any further option of the strategy (validated by it).
    :returns: the `MergeReport` (also written to ``merge_report.json``).
    :raises ValueError: bad inputs (a missing folder or weights file, an unreadable or unsafe file,
        mixed formats, mismatched shapes, an existing output, …), weights or options.
    """
    check_flag("overwrite_ok", overwrite_ok)
    check_flag("normalize_weights", normalize_weights)
    check_flag("allow_different_bases", allow_different_bases)
    if linear_lora not in ("parameters", "exact"):
        raise ValueError(f"linear_lora must be 'parameters' or 'exact', got {linear_lora!r}.")
    if base_model is not None and (not isinstance(base_model, str) or not base_model.strip()):
        raise TypeError(f"base_model must be a model name or path (a non-empty string) or None, got {base_model!r}.")
    extra = _checked_extra(recipe_extra)
    if isinstance(notes, str) or not all(isinstance(n, str) for n in notes):
        raise TypeError(f"notes must be a list of strings, got {notes!r}.")
    sources, weights = _sources_and_weights(inputs, weights)
    output = Path(os.fspath(output_dir)).expanduser()
    if name is not None:
        _check_name(name)
    folders = [resolve_folder(source) for source in sources]
    check_distinct(folders)
    target = check_output(output, overwrite_ok, [folder for folder, _ in folders])
    if name is None:  # the folder's name, '..' and '.' resolved ("d/a/.." is d), once the folder is known to be fine
        name = Path(os.path.abspath(output)).name or target.name
        _check_name(name)
    names = _input_names([given for _, given in folders])
    saved = [read_adapter(folder, n, given) for (folder, given), n in zip(folders, names)]
    formats = {item.format for item in saved}
    if len(formats) > 1:
        listing = ", ".join(f"'{item.source}': {item.format}" for item in saved)
        raise InputError(f"The inputs mix formats ({listing}): merge adapters of one format (adapters or PEFT).")
    bases = {item.name: recorded_base(item) for item in saved}
    base_notes = _check_bases(bases, base_model, allow_different_bases)
    torch_dtype = _torch_dtype(dtype)
    for item in saved:
        item.adapter.tensors = placed(item.adapter.tensors, device)  # read as stored: the engine stores in dtype
        if item.head is not None:
            item.head.tensors = placed(item.head.tensors, device)
    asked = combine_strategy
    strategy_notes: List[str] = []
    if combine_strategy == "task_arithmetic":
        combine_strategy = exact_sum_strategy(saved[0].adapter.config)
    elif combine_strategy == "linear" and linear_lora == "exact":
        combine_strategy, strategy_notes = _exact_linear(saved[0].adapter.config)
    options = dict(svd_tol=svd_tol, density=density, majority_sign_method=majority_sign_method, gamma=gamma, seed=seed,
                   space=space, eta=eta, common_fraction=common_fraction, epsilon=epsilon)
    options = {k: v for k, v in options.items() if v is not None}
    options.update(strategy_options)
    resolved = f" ({combine_strategy} for these adapters)" if combine_strategy != asked else ""
    check_option_names(combine_strategy, options, f"combine_strategy='{asked}'{resolved}")
    started = time.perf_counter()
    callback, finished = progress_reporter(progress)
    try:
        result = merge(
            [item.adapter for item in saved], weights, combine_strategy, normalize_weights, svd_rank, options,
            name=name, progress=callback, out_dtype=torch_dtype,
        )
    finally:
        finished()
    report = result.report
    head = None
    with_head = [item for item in saved if item.head is not None]
    if with_head and len(with_head) == len(saved):
        head_weights = (default_weights([item.head.name for item in saved], weights, "head")  # heads: the defaults
                        if has_module_weights(weights) else weights)
        head = merge([item.head for item in saved], head_weights, "linear", normalize_weights, name=name, kind="head",
                     out_dtype=torch_dtype)
        what = "prediction heads" if saved[0].format == "adapters" else "modules_to_save"
        head_note = full_weights_note(head.report.weights, what, (
            f"For usable {what}, merge them separately with weights summing to 1, or leave them out (inputs saved "
            "without them)."))
        report.notes.extend([head_note] if head_note else [])
    elif with_head:
        what = "a prediction head" if saved[0].format == "adapters" else "modules_to_save"
        report.notes.append(
            f"Merged without {what}: only {[i.source for i in with_head]} of the {len(saved)} inputs hold one."
        )
    report.notes.extend(strategy_notes + base_notes + list(notes))
    removed = remove_stale(target, ("partial",))
    if removed:
        report.notes.append(f"Removed {len(removed)} temporary folder(s) left by an interrupted run: {removed}.")
    with atomic_folder(target, overwrite_ok) as staging:
        if saved[0].format == "adapters":
            files = write_adapters_format(staging, name, saved[0], result, head)
        else:
            files = write_peft_format(staging, saved, result, head)
        recipe = _recipe(saved, report, combine_strategy, normalize_weights, svd_rank, options, files, name, head)
        recipe["recipe"].update(
            combine_strategy_asked=asked, linear_lora=linear_lora, base_model=base_model,
            allow_different_bases=allow_different_bases,
        )
        for item, entry in zip(saved, recipe["recipe"]["inputs"]):
            entry.update(base_model=bases[item.name], revision=hub_commit(item.folder))
        recipe["recipe"].update(extra)
        recipe["seconds"] = round(time.perf_counter() - started, 3)
        (staging / CARD_NAME).write_text(model_card(recipe, report), encoding="utf-8")
        (staging / REPORT_NAME).write_text(json.dumps(recipe, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return report


#: characters an adapter's name may not hold: it names modules ('.') and files
_UNSAFE_NAME = re.compile(r'[./\\:*?"<>|\x00-\x1f\x7f]')


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not name.strip() or _UNSAFE_NAME.search(name):
        raise ValueError(
            f"The merged adapter's name must be a non-empty string without '.', '/', '\\', ':', '*', '?', '\"', '<', "
            f"'>', '|' or control characters (it names modules and files), got {name!r}: pass another name=."
        )


def _checked_extra(extra: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    if extra is None:
        return {}
    if not isinstance(extra, Mapping) or not all(isinstance(k, str) for k in extra):
        raise TypeError(f"recipe_extra must be a dict with string keys, got {extra!r}.")
    clash = sorted(set(extra) & _RECIPE_KEYS)
    if clash:
        raise ValueError(f"recipe_extra may not replace the recipe's own entries {clash}: give them other names.")
    try:
        json.dumps(dict(extra), allow_nan=False)
    except (TypeError, ValueError) as error:
        raise TypeError(f"recipe_extra must hold JSON values only (strings, numbers, lists, dicts): {error}.") from None
    return dict(extra)


_RECIPE_KEYS = frozenset({
    "inputs", "combine_strategy", "combine_strategy_asked", "normalize_weights", "svd_rank", "options", "head_merged",
    "linear_lora", "base_model", "allow_different_bases", "module_weights",
})


def recorded_base(item: SavedAdapter) -> Optional[str]:
    """The base model an input folder records: PEFT's ``base_model_name_or_path``, ``adapters``'
    ``model_name``; None when it records none (an empty name included)."""
    key = "base_model_name_or_path" if item.format == "peft" else "model_name"
    value = item.metadata.get(key)
    return value.strip() if isinstance(value, str) and value.strip() else None


def same_base(a: str, b: str) -> bool:
    """Whether two recorded base model names mean one model: equal, or with equal last path components
    (repository names), ignoring case and trailing slashes; a Hugging Face cache folder
    (``…/models--org--name/snapshots/<commit>``) counts as ``org/name``."""
    return a == b or _base_key(a) == _base_key(b)


def _base_key(name: str) -> str:
    cached = re.search(r"models--(?:[^/\\]+?--)?([^/\\]+?)[/\\]snapshots(?:[/\\]|$)", name)
    if cached:
        return cached.group(1).lower()
    return re.split(r"[/\\]", name.rstrip("/\\"))[-1].lower()


def _check_bases(bases: Mapping[str, Optional[str]], base_model: Optional[str], allow_different: bool) -> List[str]:
    """Refuse inputs of different recorded base models (unless ``allow_different``: a warning and a
    note) and any that differs from ``base_model``; returns the report's notes."""
    notes: List[str] = []
    known = {name: base for name, base in bases.items() if base is not None}
    unknown = [name for name, base in bases.items() if base is None]
    if base_model is not None:
        wrong = {name: base for name, base in known.items() if not same_base(base, base_model)}
        if wrong:
            raise InputError(
                f"base_model is {base_model!r}, but {wrong} were trained on another base model (as their "
                "adapter_config.json records): merge adapters of that base model, or correct base_model."
            )
        if unknown:
            notes.append(f"{unknown} record no base model: they could not be checked against base_model {base_model!r}.")
        return notes
    groups: List[str] = []
    for base in known.values():
        if not any(same_base(base, g) for g in groups):
            groups.append(base)
    if len(groups) > 1:
        listing = ", ".join(f"'{name}': {base}" for name, base in known.items())
        if not allow_different:
            raise InputError(
                f"The inputs were trained on different base models ({listing}): their updates do not add up on one "
                "model. Merge adapters of one base model, or pass allow_different_bases=True "
                "(--allow-different-bases) if the bases share their weights."
            )
        message = f"The inputs were trained on different base models ({listing}); merged anyway (allow_different_bases)."
        warn(message)
        notes.append(message)
    return notes


def _exact_linear(config) -> Tuple[str, List[str]]:
    """``linear`` with ``linear_lora="exact"``: the exact Σ λᵢ ΔWᵢ where a strategy computes it."""
    try:
        resolved = exact_sum_strategy(config)
    except InputError:
        return "linear", [
            "linear_lora='exact': no strategy computes the exact Σ λᵢ ΔWᵢ for these adapters, so 'linear' combines "
            "their parameters (an approximation)."
        ]
    if resolved == "linear":
        return "linear", []
    return resolved, [f"combine_strategy 'linear' is the exact Σ λᵢ ΔWᵢ for LoRA here ({resolved} at the exact rank)."]


def exact_sum_strategy(config) -> str:
    """mergekit's ``task_arithmetic`` (the exact Σ λᵢ ΔWᵢ) for adapters of ``config``."""
    from adapters import LoRAConfig

    from ..engine import config_parts
    from ..methods.lora import family

    families = {family(part) for part in config_parts(config) if isinstance(part, LoRAConfig)}
    if families == {"lora"}:
        return "lora_delta_w_svd"
    inexact = families - {"ia3"}
    if inexact:
        raise InputError(
            f"merge_method task_arithmetic is the exact Σ λᵢ ΔWᵢ, which no strategy computes for {sorted(inexact)} "
            "adapters (their update is not a sum of their parameters). Use merge_method linear (an approximation)."
        )
    return "linear"


def _torch_dtype(dtype):
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
    if dtype not in names:
        raise ValueError(f"dtype must be one of {sorted(names)} (or a torch dtype), got {dtype!r}.")
    return names[dtype]


def _sources_and_weights(inputs, weights) -> Tuple[List[str], Any]:
    if isinstance(inputs, (str, os.PathLike)):
        raise TypeError(f"Pass the input folders as a list (or a dict {{folder: weight}}), not the single {inputs!r}.")
    if isinstance(inputs, Mapping):
        if weights is not None:
            raise ValueError("Pass weights either as a dict of input folders or as `weights`, not both.")
        return [os.fspath(k) for k in inputs], list(inputs.values())
    if isinstance(inputs, (set, frozenset)):
        raise TypeError("The inputs are an unordered set: pass a list, so that each weight goes to its folder.")
    sources = [os.fspath(s) if isinstance(s, (str, os.PathLike)) else s for s in inputs]
    bad = [s for s in sources if not isinstance(s, str)]
    if bad:
        raise TypeError(f"Input folders must be paths or strings, got {bad[0]!r}.")
    if isinstance(weights, Mapping):
        by_source = {os.fspath(k): v for k, v in weights.items()}
        missing = [s for s in sources if s not in by_source]
        if missing or len(by_source) != len(sources):
            raise ValueError(f"The weights dict must have one entry per input folder: missing {missing}.")
        weights = [by_source[s] for s in sources]
    return sources, weights


def _input_names(sources: Sequence[str]) -> List[str]:
    """A short name per input for messages and the report: the folder's (or Hub repo's) name, or the
    path as given where two share a name."""
    short = [Path(s.partition("@")[0]).name or s for s in sources]
    return [n if short.count(n) == 1 else s for n, s in zip(short, sources)]


def _recipe(saved: List[SavedAdapter], report: MergeReport, strategy, normalize, svd_rank, options, files, name, head) -> Dict:
    import adapters
    import torch

    versions = {"adapter_merging": __version__, "adapters": adapters.__version__, "torch": torch.__version__}
    try:  # its version without importing it (an import of peft takes a second)
        versions["peft"] = metadata.version("peft")
    except metadata.PackageNotFoundError:
        pass
    return {
        "schema": 1,
        "format": saved[0].format,
        "name": name,
        "files": files + [CARD_NAME, REPORT_NAME],
        "recipe": {
            "inputs": [
                {
                    "source": item.source,
                    "name": item.name,
                    "weight": report.weights[item.name],
                    "weights_file": item.weights_file.name,
                    "sha256": sha256(item.weights_file),
                }
                for item in saved
            ],
            "combine_strategy": strategy,
            "normalize_weights": normalize,
            "svd_rank": svd_rank,
            "options": options,
            "head_merged": head is not None,
            **({"module_weights": report.module_weights} if report.module_weights else {}),
        },
        "versions": versions,
        "machine": {"python": platform.python_version(), "system": platform.system()},
        "report": report.to_dict(),
    }


def model_card(recipe: Mapping[str, Any], report: MergeReport) -> str:
    """The output folder's ``README.md``: the recipe in words, the inputs, the error summary, versions
    (as PEFT's ``save_pretrained`` and mergekit write one); Hub metadata in its YAML header."""
    from ..strategies import STRATEGIES

    what = recipe["recipe"]
    inputs = what["inputs"]
    bases = {i["base_model"] for i in inputs if i.get("base_model")}
    library = "peft" if recipe["format"] == "peft" else "adapter-transformers"
    header = ["---", f"library_name: {library}"]
    if len(bases) == 1:
        header.append(f"base_model: {json.dumps(next(iter(bases)), ensure_ascii=False)}")
    header += ["tags:", "- adapter_merging", "- merge", "---", ""]
    asked, resolved = what.get("combine_strategy_asked", what["combine_strategy"]), what["combine_strategy"]
    strategy = STRATEGIES.get(resolved)
    lines = [f"# {recipe['name']}", ""]
    lines.append(
        f"{'An' if recipe['format'][:1] in 'aeiou' else 'A'} {recipe['format']}-format adapter merged from {len(inputs)} saved adapters by "
        f"adapter_merging {recipe['versions']['adapter_merging']}, "
        "with no base model loaded. `merge_report.json` beside this card holds the same recipe as JSON."
    )
    lines += ["", "## Recipe", ""]
    if asked != resolved:
        lines.append(f"- Strategy: `{asked}` as asked, resolved to `{resolved}`.")
    else:
        lines.append(f"- Strategy: `{resolved}`.")
    if strategy is not None:
        lines.append(f"  {strategy.doc}")
    if asked == "linear" and "linear_lora" in what:
        meaning = {"parameters": "A and B combined separately (adapters' meaning)",
                   "exact": "the exact Σ λᵢ ΔWᵢ (mergekit's meaning)"}
        lines.append(f"- `linear` on LoRA: {meaning.get(what['linear_lora'], what['linear_lora'])}.")
    normalised = "divided by their sum (normalize_weights)" if what["normalize_weights"] else "used as given (not normalised)"
    lines.append(f"- Weights: {normalised}; the weights below are those applied.")
    if what.get("svd_rank") is not None:
        lines.append(f"- Rank: {what['svd_rank']}.")
    for key, value in sorted((what.get("options") or {}).items()):
        lines.append(f"- `{key}`: {value}")
    lines.append(f"- Prediction head / modules_to_save merged: {'yes' if what.get('head_merged') else 'no'}.")
    if what.get("base_model"):
        lines.append(f"- Base model required: {what['base_model']}.")
    for key, value in what.items():
        if key not in _RECIPE_KEYS:
            lines.append(f"- {key.replace('_', ' ')}: {json.dumps(value, ensure_ascii=False)}")
    lines += ["", "## Inputs", "", "| source | weight | base model | weights file sha256 | Hub commit |", "|---|---|---|---|---|"]
    for item in inputs:
        cells = [f"`{item['source']}`", f"{item['weight']:+.6g}", item.get("base_model") or "(not recorded)",
                 f"`{item['sha256']}`", f"`{item['revision']}`" if item.get("revision") else "—"]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    lines += ["", "## What the merge cost", "", "Relative error of the merged update against its target over modules (`merge_report.json` has each module's):", "",
              "```text", report.summary(), "```", ""]
    versions = ", ".join(f"{k} {v}" for k, v in recipe["versions"].items())
    lines += ["## Versions", "", f"{versions}; Python {recipe['machine']['python']}.", ""]
    return "\n".join(header + lines)
