"""Merging saved adapters without a model: adapter folders (``adapters`` or PEFT format) in, one merged
folder of the same format out, with a ``merge_report.json`` that says where it came from.

The merge is the engine's (`adapter_merging.engine.merge`), the same as ``average_adapter``'s; this
module only reads the inputs (lazily, safely), writes the output (atomically), and records the recipe.
"""
from __future__ import annotations

import json
import os
from importlib import metadata
import platform
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .. import __version__
from .._progress import Progress, progress_reporter
from ..engine import merge
from ..ops.weights import check_flag
from ..report import MergeReport
from ..strategies import CombineStrategy, SignMethod
from .formats import SavedAdapter, read_adapter, write_adapters_format, write_peft_format
from .io import InputError, atomic_folder, check_output, placed, resolve_folder, sha256

__all__ = ["merge_saved_adapters", "InputError", "REPORT_NAME"]

Source = Union[str, "os.PathLike[str]"]
#: the recipe and report written into every output folder
REPORT_NAME = "merge_report.json"


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
    device: Optional[str] = None,
    dtype: Optional[Union[str, "torch.dtype"]] = None,
    progress: Progress = None,
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
    :param device: where to compute (e.g. ``"cuda"``); the output is written from the CPU.
    :param dtype: the dtype of the merged adapter (``"float32"``, ``"float16"``, ``"bfloat16"``,
        ``"float64"`` or a torch dtype); the inputs are cast to it as they are read. None: theirs.
    :param progress: a progress bar over modules on stderr: None (default) shows one if the merge
        takes longer than 2 s, True always, False never; or a callable ``progress(modules done,
        modules in all)``.
    :returns: the `MergeReport` (also written to ``merge_report.json``).
    :raises ValueError: bad inputs (a missing folder or weights file, an unreadable or unsafe file,
        mixed formats, mismatched shapes, an existing output, …), weights or options.
    """
    check_flag("overwrite_ok", overwrite_ok)
    check_flag("normalize_weights", normalize_weights)
    sources, weights = _sources_and_weights(inputs, weights)
    output = Path(os.fspath(output_dir)).expanduser()
    name = name if name is not None else output.name
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"The merged adapter's name must be a non-empty string without '.', got {name!r}: pass name=.")
    folders = [resolve_folder(source) for source in sources]
    check_output(output, overwrite_ok, [folder for folder, _ in folders])
    names = _input_names([given for _, given in folders])
    saved = [read_adapter(folder, n, given) for (folder, given), n in zip(folders, names)]
    formats = {item.format for item in saved}
    if len(formats) > 1:
        listing = ", ".join(f"'{item.source}': {item.format}" for item in saved)
        raise InputError(f"The inputs mix formats ({listing}): merge adapters of one format (adapters or PEFT).")
    torch_dtype = _torch_dtype(dtype)
    for item in saved:
        item.adapter.tensors = placed(item.adapter.tensors, device, torch_dtype)
        if item.head is not None:
            item.head.tensors = placed(item.head.tensors, device, torch_dtype)
    if combine_strategy == "task_arithmetic":
        combine_strategy = exact_sum_strategy(saved[0].adapter.config)
    options = dict(svd_tol=svd_tol, density=density, majority_sign_method=majority_sign_method, gamma=gamma, seed=seed)
    options = {k: v for k, v in options.items() if v is not None}
    started = time.perf_counter()
    callback, finished = progress_reporter(progress)
    try:
        result = merge(
            [item.adapter for item in saved], weights, combine_strategy, normalize_weights, svd_rank, options,
            name=name, progress=callback,
        )
    finally:
        finished()
    report = result.report
    head = None
    with_head = [item for item in saved if item.head is not None]
    if with_head and len(with_head) == len(saved):
        head = merge([item.head for item in saved], weights, "linear", normalize_weights, name=name, kind="head")
    elif with_head:
        what = "a prediction head" if saved[0].format == "adapters" else "modules_to_save"
        report.notes.append(
            f"Merged without {what}: only {[i.source for i in with_head]} of the {len(saved)} inputs hold one."
        )
    with atomic_folder(output, overwrite_ok) as staging:
        if saved[0].format == "adapters":
            files = write_adapters_format(staging, name, saved[0], result, head)
        else:
            files = write_peft_format(staging, saved, result, head)
        recipe = _recipe(saved, report, combine_strategy, normalize_weights, svd_rank, options, files, name, head)
        recipe["seconds"] = round(time.perf_counter() - started, 3)
        (staging / REPORT_NAME).write_text(json.dumps(recipe, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return report


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
        "files": files + [REPORT_NAME],
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
        },
        "versions": versions,
        "machine": {"python": platform.python_version(), "system": platform.system()},
        "report": report.to_dict(),
    }
