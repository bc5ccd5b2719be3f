"""``adapter-merge``: merge saved adapters from the command line (also ``python -m adapter_merging``).

    adapter-merge DIR[:WEIGHT] ... --output OUT [--strategy S] [options]
    adapter-merge CONFIG.yaml [--output OUT]

The same program as `adapter_merging.merge_saved_adapters`: a progress bar over modules on stderr, a
short summary at the end, exit status 0 on success and 1 with a one-line error (no traceback) on bad
input, 2 on bad usage.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import __version__
from .strategies import STRATEGIES

#: mergekit's merge_method names → ours. "task_arithmetic" is the exact Σ λᵢ ΔWᵢ (chosen per method).
MERGEKIT_METHODS = {
    "task_arithmetic": "task_arithmetic",
    "ties": "ties",
    "dare_ties": "dare_ties",
    "dare_linear": "dare_linear",
    "breadcrumbs": "breadcrumbs",
    "linear": "linear",
}
EXAMPLES = """examples:
  adapter-merge math/ code/ --output math_and_code/
  adapter-merge skills/:1 toxic/:-1 --no-normalize --strategy lora_delta_w_concat --output detoxified/
  adapter-merge a/ b/ c/ --strategy ties --density 0.3 --svd-tol 0.05 --output merged/ --report report.json
  adapter-merge org/lora-a@main:0.7 org/lora-b:0.3 --strategy lora_delta_w_svd --svd-rank 16 --output out/
  adapter-merge recipe.yaml --output merged/     (a mergekit-shaped YAML: models, merge_method, parameters)

Inputs are adapter folders in adapters' or PEFT's format (all of one), or Hugging Face Hub ids
(org/name[@revision]) resolved through the local cache (HF_HUB_OFFLINE=1 is respected).
"""


class UsageError(Exception):
    """Bad command-line usage (exit status 2)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adapter-merge",
        description="Merge saved adapters (adapters or PEFT format) into one adapter folder, without loading a model.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("inputs", nargs="+", metavar="DIR[:WEIGHT]",
                        help="adapter folders or Hub ids, each with an optional weight (default: 1/N each); "
                             "or one mergekit-shaped CONFIG.yaml")
    parser.add_argument("-o", "--output", help="the folder to write (created; must be empty unless --force)")
    parser.add_argument("-s", "--strategy", default=None, choices=sorted(set(STRATEGIES) | {"task_arithmetic"}),
                        metavar="STRATEGY",
                        help="combine_strategy (default: linear); one of " + ", ".join(STRATEGIES) +
                             ", or task_arithmetic (the exact sum: lora_delta_w_svd for LoRA, linear otherwise)")
    parser.add_argument("--svd-rank", type=int, help="rank of a re-factorised LoRA (default: the exact rank)")
    parser.add_argument("--svd-tol", type=float, help="the smallest rank whose relative error is at most this")
    parser.add_argument("--density", type=float, help="fraction of entries kept (task-vector strategies)")
    parser.add_argument("--majority-sign-method", choices=["total", "frequency"], help="TIES sign election")
    parser.add_argument("--gamma", type=float, help="fraction of the largest magnitudes dropped (breadcrumbs)")
    parser.add_argument("--seed", type=int, help="seed of DARE's random masks")
    parser.add_argument("--no-normalize", action="store_true",
                        help="use the weights as given (task arithmetic, unlearning); default: divide by their sum")
    parser.add_argument("--name", help="the adapter's name inside the output (default: the output folder's name)")
    parser.add_argument("-f", "--force", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--report", metavar="FILE.json", help="also write the merge report to this file")
    parser.add_argument("--device", help="compute device, e.g. cuda (default: cpu)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16", "float64"],
                        help="dtype of the merged adapter (default: the inputs')")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def parse_input(text: str) -> Tuple[str, Optional[float]]:
    """``DIR:WEIGHT`` → (DIR, WEIGHT); a ``:`` not followed by a number is part of the path."""
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            weight = float(tail)
        except ValueError:
            return text, None
        if not math.isfinite(weight):
            raise UsageError(f"the weight of {head} is {tail}: weights must be finite numbers")
        return head, weight
    return text, None


def plan_from_arguments(args: argparse.Namespace) -> Dict[str, Any]:
    """The merge described by the command line: inputs, weights and options."""
    if len(args.inputs) == 1 and args.inputs[0].endswith((".yaml", ".yml")):
        plan = plan_from_yaml(Path(args.inputs[0]))
    else:
        parsed = [parse_input(text) for text in args.inputs]
        given = [w for _, w in parsed]
        if any(w is not None for w in given) and any(w is None for w in given):
            raise UsageError("give a weight to every input (DIR:WEIGHT) or to none")
        plan = {
            "inputs": [p for p, _ in parsed],
            "weights": given if given[0] is not None else None,
            "strategy": "linear",
            "options": {},
            "normalize": True,
            "output": None,
            "dtype": None,
        }
    if args.strategy:
        plan["strategy"] = args.strategy
    for option in ("svd_rank", "svd_tol", "density", "majority_sign_method", "gamma", "seed"):
        value = getattr(args, option)
        if value is not None:
            plan["options"][option] = value
    if args.no_normalize:
        plan["normalize"] = False
    plan["output"] = args.output or plan["output"]
    if not plan["output"]:
        raise UsageError("pass --output OUT (or an `output:` key in the YAML)")
    plan["dtype"] = args.dtype or plan["dtype"]
    return plan


def plan_from_yaml(path: Path) -> Dict[str, Any]:
    """A mergekit-shaped YAML: ``models`` (each ``model`` with ``parameters: {weight, density}``),
    ``merge_method``, ``parameters`` (``normalize``, ``density``, …), ``dtype``, and ``output``."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist") from None
    except yaml.YAMLError as error:
        raise UsageError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(data, dict) or not isinstance(data.get("models"), list) or not data["models"]:
        raise UsageError(f"{path} needs a `models:` list (each with `model:` and optional `parameters:`)")
    known = {"models", "merge_method", "parameters", "dtype", "output", "base_model", "name"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UsageError(f"{path}: unknown key(s) {unknown}; known: {sorted(known)}")
    method = data.get("merge_method", "linear")
    strategy = MERGEKIT_METHODS.get(method, method)
    if strategy not in STRATEGIES and strategy != "task_arithmetic":
        raise UsageError(f"{path}: merge_method {method!r} is not supported; use one of "
                         f"{sorted(set(MERGEKIT_METHODS) | set(STRATEGIES))}")
    parameters = dict(data.get("parameters") or {})
    normalize = parameters.pop("normalize", True)
    inputs, weights, densities = [], [], []
    for index, entry in enumerate(data["models"]):
        if not isinstance(entry, dict) or "model" not in entry:
            raise UsageError(f"{path}: models[{index}] needs a `model:` (a folder or Hub id)")
        own = dict(entry.get("parameters") or {})
        inputs.append(str(entry["model"]))
        weights.append(own.pop("weight", None))
        densities.append(own.pop("density", None))
        if own:
            raise UsageError(f"{path}: models[{index}] has unsupported parameters {sorted(own)} (weight, density)")
    if any(w is None for w in weights) and any(w is not None for w in weights):
        raise UsageError(f"{path}: give a weight to every model or to none")
    options = {k: parameters.pop(k) for k in ("svd_rank", "svd_tol", "density", "majority_sign_method", "gamma", "seed")
               if k in parameters}
    if parameters:
        raise UsageError(f"{path}: unsupported parameters {sorted(parameters)}")
    if any(d is not None for d in densities):
        if any(d is None for d in densities) and "density" not in options:
            raise UsageError(f"{path}: give a density to every model, or a global `parameters: density`")
        options["density"] = [d if d is not None else options["density"] for d in densities]
    return {
        "inputs": inputs,
        "weights": None if weights[0] is None else weights,
        "strategy": strategy,
        "options": options,
        "normalize": normalize,
        "output": data.get("output"),
        "dtype": data.get("dtype"),
        "name": data.get("name"),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        plan = plan_from_arguments(args)
    except UsageError as error:
        parser.error(str(error))
    from .files import merge_saved_adapters

    started = time.perf_counter()
    warnings.showwarning = _show_warning if not args.quiet else (lambda *a, **k: None)
    try:
        report = merge_saved_adapters(
            plan["inputs"], plan["output"], weights=plan["weights"], combine_strategy=plan["strategy"],
            normalize_weights=bool(plan["normalize"]), overwrite_ok=args.force, name=args.name or plan.get("name"),
            progress=not args.quiet, device=args.device, dtype=plan["dtype"], **plan["options"],
        )
    except KeyboardInterrupt:
        print("adapter-merge: interrupted; nothing was written", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError) as error:
        print(f"adapter-merge: error: {_one_line(error)}", file=sys.stderr)
        return 1
    if args.report:
        report.save(args.report)
    if not args.quiet:
        print(_summary(report, plan["output"], time.perf_counter() - started), file=sys.stderr)
    return 0


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """adapter_merging's warnings as one line each; other libraries' notices are not shown."""
    from ._warnings import MergeWarning

    if issubclass(category, MergeWarning):
        print(f"adapter-merge: warning: {_one_line(message)}", file=sys.stderr)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _summary(report, output, seconds: float) -> str:
    lines = [f"merged {len(report.weights)} adapters into {output} in {seconds:.1f} s"]
    weights = ", ".join(f"{n}: {w:+.4g}" for n, w in report.weights.items())
    lines.append(f"  strategy   {report.combine_strategy} ({weights})")
    if report.rank is not None:
        lines.append(f"  rank       {report.rank} (alpha {report.alpha:g})")
    if report.modules:
        lines.append(f"  error      max {report.max_error:.3g}, mean {report.mean_error:.3g} (relative, vs {report.target})")
    lines += [f"  note       {note}" for note in report.notes]
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
