"""``adapter-merge``: merge saved adapters from the command line (also ``python -m adapter_merging``).

    adapter-merge DIR[:WEIGHT] ... --output OUT [--strategy S] [--module-weight DIR:GLOB=WEIGHT ...] [options]
    adapter-merge CONFIG.yaml [OUT] [options]

The same program as `adapter_merging.merge_saved_adapters`: a progress bar over modules on stderr, a
short summary at the end, exit status 0 on success, 1 with a one-line error (no traceback) on bad
input (a YAML's content included), 2 with a one-line error on bad usage. ``--help`` and ``--version``
import no torch, so they answer at once.
"""
from __future__ import annotations

import argparse
import difflib
import math
import os
import re
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

from . import __version__
from .strategy_names import SIGN_METHOD_NAMES, SPACE_NAMES, STRATEGY_NAMES

#: names the command line accepts for ``--strategy`` besides ours
ALIASES = ("task_arithmetic",)
#: PEFT's ``combination_type`` names → ours, for "did you mean" (PEFT's ``*_svd`` are our task-vector
#: strategies, which re-factorise a LoRA at --svd-rank / --svd-tol)
PEFT_NAMES = {
    "svd": "lora_delta_w_svd",
    "cat": "lora_delta_w_concat",
    "ties_svd": "ties",
    "dare_ties_svd": "dare_ties",
    "dare_linear_svd": "dare_linear",
    "magnitude_prune_svd": "magnitude_prune",
}

#: mergekit's merge_method names the YAML accepts (mergekit 0.1.5's definitions: `adapter_merging.mergekit`)
MERGEKIT_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
                    "della", "della_linear")
EXAMPLES = """examples:
  adapter-merge math/ code/ --output math_and_code/
  adapter-merge skills/:1 toxic/:-1 --no-normalize --strategy lora_delta_w_concat --output detoxified/
  adapter-merge a/ b/ c/ --strategy ties --density 0.3 --svd-tol 0.05 --output merged/ --report report.json
  adapter-merge a/ b/ c/ --strategy ties --space core --density 0.3 --output merged/
  adapter-merge a/ b/ c/ --strategy iso_cts --common-fraction 0.8 --output merged/
  adapter-merge math/:1 code/:1 --module-weight 'math/:*.layer.1.*=3' --output layered/
  adapter-merge org/lora-a@main:0.7 org/lora-b:0.3 --strategy lora_delta_w_svd --svd-rank 16 --output out/
  adapter-merge recipe.yaml merged/     (a mergekit-shaped YAML: models, merge_method, parameters)

Inputs are adapter folders in adapters' or PEFT's format (all of one), or Hugging Face Hub ids
(org/name[@revision]) resolved through the local cache (HF_HUB_OFFLINE=1 is respected).
"""


class UsageError(Exception):
    """Bad command-line usage (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line (not the usage block), then where to read more."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def strategy_name(text: str) -> str:
    """``--strategy``'s value: one of ours or ``task_arithmetic``; PEFT's names and typos get "did you mean"."""
    known = tuple(STRATEGY_NAMES) + ALIASES
    if text in known:
        return text
    if text in PEFT_NAMES:
        ours = PEFT_NAMES[text]
        hint = f"did you mean {ours}? ('{text}' is PEFT's name for it"
        hint += ", with --svd-rank N)" if text.endswith("_svd") else ")"
    else:
        close = difflib.get_close_matches(text, known, n=2, cutoff=0.6)
        hint = f"did you mean {' or '.join(close)}?" if close else f"choose from {', '.join(known)}"
    raise argparse.ArgumentTypeError(f"invalid choice '{text}': {hint}")


from .mergekit import ConfigError  # noqa: E402  (a YAML's content is wrong: exit status 1; no torch imported)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="adapter-merge",
        description="Merge saved adapters (adapters or PEFT format) into one adapter folder, without loading a model.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("inputs", nargs="+", metavar="DIR[:WEIGHT]",
                        help="adapter folders or Hub ids, each with an optional weight (default: 1/N each); "
                             "or one mergekit-shaped CONFIG.yaml, optionally followed by the output folder")
    parser.add_argument("-o", "--output", help="the folder to write (created; must be empty unless --force)")
    parser.add_argument("-s", "--strategy", default=None, type=strategy_name, metavar="STRATEGY",
                        help="combine_strategy (default: linear, which for LoRA is the exact weighted sum of the "
                             "updates, as in mergekit); one of " + ", ".join(STRATEGY_NAMES) +
                             ", or task_arithmetic (the exact sum: lora_delta_w_svd for LoRA, linear otherwise)")
    parser.add_argument("--svd-rank", type=int, help="rank of a re-factorised LoRA (default: the exact rank)")
    parser.add_argument("--svd-tol", type=float, help="the smallest rank whose relative error is at most this")
    parser.add_argument("--density", type=float, help="fraction of entries kept (task-vector strategies)")
    parser.add_argument("--majority-sign-method", choices=SIGN_METHOD_NAMES, help="TIES sign election")
    parser.add_argument("--gamma", type=float, help="fraction of the largest magnitudes dropped (breadcrumbs)")
    parser.add_argument("--seed", type=int, help="seed of DARE's (and DELLA's) random masks")
    parser.add_argument("--space", metavar="{" + ",".join(SPACE_NAMES) + "}",
                        help="where a task-vector strategy merges: full (the dense updates, default), core (Core "
                             "Space of the stacked factors: exact storage, no dense matrix) or knots (KnOTS' "
                             "aligned space)")
    parser.add_argument("--eta", type=float,
                        help="star: the percentage of each update's nuclear norm kept (default 40)")
    parser.add_argument("--common-fraction", type=float,
                        help="iso_cts: the common subspace's fraction of the merged rank (default 0.8)")
    parser.add_argument("--epsilon", type=float, help="della, della_linear: the spread of the keep probabilities "
                                                      "around --density (mergekit's epsilon)")
    parser.add_argument("--module-weight", action="append", metavar="DIR:GLOB=WEIGHT",
                        help="a per-module weight (repeatable): WEIGHT for the modules of input DIR whose path "
                             "matches GLOB, a shell-style pattern such as '*.layer.1.*' (quote it); for a module an "
                             "exact path wins, else DIR's first matching GLOB in the order given, else DIR's own "
                             "weight (DIR:WEIGHT, or 1/N); with normalisation each module's weights are divided by "
                             "their sum")
    parser.add_argument("--no-normalize", action="store_true",
                        help="use the weights as given (task arithmetic, unlearning); default: divide by their sum")
    parser.add_argument("--name", help="the adapter's name inside the output (default: the output folder's name)")
    parser.add_argument("-f", "--force", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--allow-different-bases", action="store_true",
                        help="merge inputs trained on different base models (a warning instead of an error)")
    parser.add_argument("--report", metavar="FILE.json", help="also write merge_report.json to this file")
    parser.add_argument("--device", help="compute device, e.g. cuda (default: cpu)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16", "float64"],
                        help="dtype of the merged adapter (default: the inputs')")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def parse_input(text: str) -> Tuple[str, Optional[float]]:
    """``DIR:WEIGHT`` → (DIR, WEIGHT). A ``:`` whose tail is not a number is part of the path only when
    the whole text is an existing path or the tail holds a path separator; otherwise the tail was
    meant as a weight and is refused."""
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            weight = float(tail)
        except ValueError:
            if os.path.exists(text) or "/" in tail or os.sep in tail:
                return text, None
            raise UsageError(f"the weight of {head} is '{tail}': '{tail}' is not a number "
                             f"(DIR:WEIGHT, e.g. {head}:0.5)") from None
        if not math.isfinite(weight):
            raise UsageError(f"the weight of {head} is {tail}: weights must be finite numbers")
        return head, weight
    return text, None


def parse_module_weight(text: str, inputs: Sequence[str]) -> Tuple[int, str, float]:
    """``--module-weight DIR:GLOB=WEIGHT`` → (DIR's index among ``inputs``, GLOB, WEIGHT). DIR is one of the
    inputs as given, compared as paths (``a`` and ``a/`` are one folder); the longest input that fits comes
    first, so a DIR may hold a ``:``. GLOB runs from there to the last ``=``."""
    head, sep, tail = text.rpartition("=")
    if not sep or ":" not in head:
        raise UsageError(f"--module-weight {text}: expected DIR:GLOB=WEIGHT, e.g. --module-weight 'a/:*.layer.1.*=0.5'")
    known = {os.path.normpath(source): i for i, source in enumerate(inputs)}
    colons = [i for i, char in enumerate(head) if char == ":"]
    cut = next((i for i in reversed(colons) if i and os.path.normpath(head[:i]) in known), None)
    if cut is None:
        folder = head[: colons[-1]]
        raise UsageError(f"--module-weight {text}: {folder or repr(folder)} is not one of the inputs "
                         f"({', '.join(inputs)}); name DIR as among the inputs")
    folder, pattern = head[:cut], head[cut + 1:]
    if not pattern:
        raise UsageError(f"--module-weight {text}: no module pattern between '{folder}:' and '=' "
                         f"(e.g. {folder}:*.layer.1.*={tail})")
    if pattern == "*":
        raise UsageError(f"--module-weight {text}: '*' is every module, {folder}'s own weight: give it as "
                         f"{folder}:{tail} among the inputs")
    try:
        weight = float(tail)
    except ValueError:
        raise UsageError(f"--module-weight {text}: the weight '{tail}' is not a number") from None
    if not math.isfinite(weight):
        raise UsageError(f"--module-weight {text}: the weight is {tail}: weights must be finite numbers")
    return known[os.path.normpath(folder)], pattern, weight


def module_weights(inputs: Sequence[str], weights: Optional[Sequence[float]], given: Sequence[str]) -> list:
    """The inputs' weights with the ``--module-weight`` options: an input they name gets the engine's per-module
    dict ``{"*": its weight (DIR:WEIGHT, or 1/N), GLOB: WEIGHT, …}``, its GLOBs in the order given."""
    defaults = list(weights) if weights is not None else [1.0 / len(inputs)] * len(inputs)
    specs: list = [None] * len(inputs)
    for text in given:
        index, pattern, weight = parse_module_weight(text, inputs)
        spec = specs[index] = specs[index] or {"*": defaults[index]}
        if pattern in spec:
            raise UsageError(f"--module-weight {text}: {inputs[index]}:{pattern} is given twice ({spec[pattern]:g} "
                             f"and {weight:g}): give each pattern once")
        spec[pattern] = weight
    return [spec or default for spec, default in zip(specs, defaults)]


def plan_from_arguments(args: argparse.Namespace) -> Dict[str, Any]:
    """The merge described by the command line: inputs, weights and options. A YAML may be followed by
    the output folder (mergekit's ``mergekit-yaml config.yml OUT_DIR``)."""
    if args.inputs[0].endswith((".yaml", ".yml")):
        if len(args.inputs) > 2:
            raise UsageError(f"a YAML config takes one more argument at most, the output folder; got "
                             f"{' '.join(args.inputs[1:])} (the inputs go in its `models:`)")
        if len(args.inputs) == 2 and args.output and args.output != args.inputs[1]:
            raise UsageError(f"two output folders, {args.inputs[1]} and --output {args.output}: give one")
        for flag, given in (("--strategy", args.strategy), ("--no-normalize", args.no_normalize)):
            if given:
                raise UsageError(f"{flag} does not apply to a YAML config: its merge_method and "
                                 "`parameters: {normalize: …}` say how to merge")
        plan = plan_from_yaml(Path(args.inputs[0]))
        if len(args.inputs) == 2:
            plan["output"] = args.inputs[1]
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
            "linear_lora": "exact",  # `linear` on LoRA is the exact Σ λᵢ ΔWᵢ here, as in mergekit
        }
    if args.module_weight:  # the command line's per-module weights
        if args.inputs[0].endswith((".yaml", ".yml")):
            raise UsageError("--module-weight does not apply to a YAML config: its models' `weight` says how to "
                             "weigh them (mergekit's per-layer lists included)")
        plan["weights"] = module_weights(plan["inputs"], plan["weights"], args.module_weight)
    if args.strategy:
        plan["strategy"] = args.strategy
    for option in ("svd_rank", "svd_tol", "density", "majority_sign_method", "gamma", "seed", "space", "eta",
                   "common_fraction", "epsilon"):
        value = getattr(args, option)
        if value is not None:
            plan["options"][option] = value
    if args.no_normalize:
        plan["normalize"] = False
    plan["output"] = args.output or plan["output"]
    if not plan["output"]:
        raise UsageError("pass --output OUT (with a YAML: CONFIG.yaml OUT, or an `output:` key in it)")
    plan["dtype"] = args.dtype or plan["dtype"]
    return plan


def plan_from_yaml(path: Path) -> Dict[str, Any]:
    """A mergekit-shaped YAML, read as mergekit 0.1.5 reads it (`adapter_merging.mergekit`): ``models`` (each
    ``model`` with ``parameters: {weight, density, gamma}``), ``merge_method``, ``base_model``,
    ``parameters`` (``normalize``, ``lambda``, ``rescale``, ``int8_mask``, …), ``dtype``, and our
    ``output``/``name``. Content errors raise `ConfigError` (one line naming the file and the key)."""
    import yaml

    from .mergekit import plan_from_config

    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
    return plan_from_config(data, str(path))


def plan_weights(plan: Dict[str, Any]) -> Any:
    """The weights to merge the plan's inputs with: the plan's own, or, where a YAML gives mergekit's per-layer
    lists or conditions (`adapter_merging.mergekit.LayerWeights`), per-module weights over the inputs' modules.
    The number of layers L is the base model's (its ``config.json``: the YAML's ``base_model``, else a base an
    input records, when it is a local folder or in the local Hugging Face cache), else counted from the modules.
    Adds a note to the plan's notes and L to its recipe. Raises `ConfigError` (the YAML) or ValueError (an input)."""
    from .mergekit import LayerWeights, base_layer_count

    weights = plan["weights"]
    if not isinstance(weights, LayerWeights):
        return weights
    from .files import recorded_base
    from .files.formats import read_adapter
    from .files.io import resolve_folder
    from .ops.weights import module_name

    saved = [read_adapter(folder, f"input{i}", given)
             for i, (folder, given) in enumerate(resolve_folder(source) for source in plan["inputs"])]
    modules = {module_name(slot) for item in saved for slot in item.adapter.tensors}
    num_layers, counted = base_layer_count([plan.get("base_model")] + [recorded_base(item) for item in saved])
    resolved, note, num_layers = weights.resolve(modules, num_layers, counted)
    plan.setdefault("notes", []).append(note)
    plan.setdefault("recipe_extra", {})["num_layers"] = num_layers
    return resolved


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        plan = plan_from_arguments(args)
    except UsageError as error:
        parser.error(str(error))
    except ConfigError as error:  # a YAML's content: bad input, not bad usage; it names the file's keys, not flags
        return _fail(error, shell_words=False)
    try:
        check_device(args.device)
        report_copy = check_report_path(args.report, plan, (plan.get("recipe_extra") or {}).get("config_file"))
    except ValueError as error:
        return _fail(error)
    from .files import REPORT_NAME, merge_saved_adapters

    started = time.perf_counter()
    warnings.showwarning = _show_warning if not args.quiet else (lambda *a, **k: None)
    try:
        weights = plan_weights(plan)  # a YAML's per-layer weights: per module, once the inputs' modules are read
        report = merge_saved_adapters(
            plan["inputs"], plan["output"], weights=weights, combine_strategy=plan["strategy"],
            normalize_weights=bool(plan["normalize"]), overwrite_ok=args.force, name=args.name or plan.get("name"),
            progress=not args.quiet, device=args.device, dtype=plan["dtype"],
            allow_different_bases=args.allow_different_bases, base_model=plan.get("base_model"),
            linear_lora=plan.get("linear_lora", "exact"), recipe_extra=plan.get("recipe_extra"),
            notes=plan.get("notes", ()), **plan["options"],
        )
    except KeyboardInterrupt:
        print("adapter-merge: interrupted; nothing was written", file=sys.stderr)
        return 130
    except ConfigError as error:  # the YAML's per-layer weights, once the modules are known: names the file itself
        return _fail(error, shell_words=False)
    except (ValueError, TypeError, OSError) as error:
        config_file = (plan.get("recipe_extra") or {}).get("config_file")
        if config_file:  # a YAML's merge: its keys, not flags, and the file named
            return _fail(f"{config_file}: {_one_line(error)}", shell_words=False)
        return _fail(error, default_strategy=None if args.strategy else plan["strategy"])
    if report_copy:  # the same file as the output's merge_report.json
        try:
            write_copy(Path(plan["output"]) / REPORT_NAME, Path(args.report))
        except OSError as error:
            return _fail(f"merged into {plan['output']}, but --report {args.report} could not be written: {error}")
    if not args.quiet:
        print(_summary(report, plan["output"], time.perf_counter() - started, plan["strategy"]), file=sys.stderr)
    return 0


def check_report_path(report: Optional[str], plan: Dict[str, Any], config_file: Optional[str] = None) -> bool:
    """Refuse, before anything is written, a ``--report`` path that would overwrite an input (a file of an
    input folder, the YAML, followed through symlinks) or a file of the output, or that is a folder. Returns
    whether a copy is to be written: not when the path is the output's own ``merge_report.json``."""
    if not report:
        return False
    path = Path(report).expanduser()
    if path.is_dir():
        raise ValueError(f"--report {report} is a folder: name the JSON file to write")
    real = Path(os.path.realpath(path))
    output = Path(os.path.realpath(Path(plan["output"]).expanduser()))
    if real == output / "merge_report.json":  # REPORT_NAME: the merge writes that very file
        return False
    if real == output or output in real.parents:
        raise ValueError(f"--report {report} lies in the output folder {plan['output']}, whose files the merge writes "
                         f"(its own merge_report.json is there anyway): name a file outside it")
    sources = [source for source in plan["inputs"] if os.path.exists(source)] + ([config_file] if config_file else [])
    for source in sources:
        protected = Path(os.path.realpath(source))
        if real == protected or protected in real.parents:
            via = f" (it resolves to {real})" if real != Path(os.path.abspath(path)) else ""
            raise ValueError(f"--report {report} would write into the input {source}{via}: name a file outside the inputs")
    return True


def write_copy(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` through a temporary file renamed into place: a hard link or symlink at
    ``target`` is replaced, never written through."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        shutil.copyfile(source, partial)
        os.replace(partial, target)
    finally:
        if partial.exists():
            partial.unlink()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """adapter_merging's warnings as one line each; other libraries' notices are not shown."""
    from ._warnings import MergeWarning

    if issubclass(category, MergeWarning):
        print(f"adapter-merge: warning: {for_the_shell(_one_line(message))}", file=sys.stderr)


def _one_line(error: Any) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def check_device(device: Optional[str]) -> None:
    """Refuse a ``--device`` torch does not know or this machine lacks, with one line and the fix."""
    if device is None:
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as error:
        raise ValueError(f"--device {device} is not a device: {_one_line(error)}") from None
    if parsed.type == "cpu":
        return
    if parsed.type == "mps":
        available, count = torch.backends.mps.is_available(), 1
    else:
        backend = getattr(torch, parsed.type, None)
        available = bool(backend is not None and hasattr(backend, "is_available") and backend.is_available())
        count = backend.device_count() if available and hasattr(backend, "device_count") else 1
    if not available:
        why = " (this torch is built without CUDA)" if parsed.type == "cuda" and torch.version.cuda is None else ""
        raise ValueError(f"--device {device}: no {parsed.type} device is available on this machine{why}; "
                         "leave --device out to compute on the CPU")
    if parsed.index is not None and parsed.index >= count:
        raise ValueError(f"--device {device}: this machine has {count} {parsed.type} device(s), "
                         f"{parsed.type}:0 to {parsed.type}:{count - 1}")


#: the engine's parameter names → the command line's flags, for its errors: (flag, the parameter's value
#: that the flag gives, words for the other value) for switches; the flag alone for options with a value
SWITCHES = {
    "normalize_weights": ("--no-normalize", "False", "the default normalisation (no --no-normalize)"),
    "overwrite_ok": ("--force", "True", "without --force"),
    "allow_different_bases": ("--allow-different-bases", "True", "without --allow-different-bases"),
}
FLAGS = {
    "combine_strategy": "--strategy",
    "svd_rank": "--svd-rank",
    "svd_tol": "--svd-tol",
    "density": "--density",
    "majority_sign_method": "--majority-sign-method",
    "gamma": "--gamma",
    "seed": "--seed",
    "space": "--space",
    "eta": "--eta",
    "common_fraction": "--common-fraction",
    "epsilon": "--epsilon",
    "dtype": "--dtype",
    "device": "--device",
    "name": "--name",
}


def for_the_shell(message: str) -> str:
    """An engine error in a shell user's words: ``pass normalize_weights=False`` → ``pass --no-normalize``,
    ``svd_rank=4`` → ``--svd-rank 4``, a bare ``overwrite_ok`` → ``--force``."""

    def switch(match: "re.Match[str]") -> str:
        flag, on, off = SWITCHES[match.group(1)]
        return flag if match.group(2) in (None, on) else off

    def option(match: "re.Match[str]") -> str:
        value = next((v for v in match.group(2, 3, 4) if v is not None), "")
        return f"{FLAGS[match.group(1)]} {value}" if value else FLAGS[match.group(1)]

    names = "|".join(SWITCHES)
    message = re.sub(rf"\b({names})(?:=(True|False)\b)?", switch, message)
    # a value is quoted, or runs to a space or punctuation (a sentence's final '.' is not part of it)
    message = re.sub(rf"\b({'|'.join(FLAGS)})=(?:'([^']*)'|\"([^\"]*)\"|([^\s,;:)]*[^\s,;:).]))?", option, message)
    message = re.sub(rf"'({'|'.join(FLAGS)})'", lambda match: f"'{FLAGS[match.group(1)]}'", message)  # ['--density']
    message = re.sub(rf"\b({'|'.join(name for name in FLAGS if '_' in name)})\b",
                     lambda match: FLAGS[match.group(1)], message)
    # a validation message or a list of options that starts with a bare name: "eta must …", "Its options are: eta, …"
    message = re.sub(rf"(^|: )({'|'.join(FLAGS)}) must\b", lambda match: f"{match.group(1)}{FLAGS[match.group(2)]} must",
                     message)
    message = re.sub(r"(options are: )([\w, -]+)", lambda match: match.group(1) + ", ".join(
        FLAGS.get(item.strip(), item.strip()) for item in match.group(2).split(",")), message)
    # per-module weights: the command line's option, and where to see module paths
    message = message.replace("The per-module weight pattern", "The --module-weight pattern")
    message = message.replace("; see report.modules.", "; for LoRA, a merge's merge_report.json lists every module "
                                                       "(report → modules).")
    # "--force (--force on the command line)" → "--force"
    return re.sub(r"(--[\w-]+) \(\1(?: on the command line)?\)", r"\1", message)


def _fail(error: Any, shell_words: bool = True, default_strategy: Optional[str] = None) -> int:
    """One line on stderr, in the shell's words (unless ``shell_words`` is False: a YAML's keys); exit status 1.
    ``default_strategy``: the strategy the user did not choose (no --strategy), said as the default."""
    line = _one_line(error)
    if shell_words:
        line = for_the_shell(line)
    if default_strategy:
        line = line.replace(f"--strategy {default_strategy}", f"the default --strategy {default_strategy}")
    print(f"adapter-merge: error: {line}", file=sys.stderr)
    return 1


def _summary(report, output, seconds: float, asked: Optional[str] = None) -> str:
    lines = [f"merged {len(report.weights)} adapters into {output} in {seconds:.1f} s"]
    weights = ", ".join(f"{n}: {w:+.4g}" for n, w in report.weights.items())
    strategy = report.combine_strategy if asked in (None, report.combine_strategy) else f"{asked} → {report.combine_strategy}"
    lines.append(f"  strategy   {strategy} ({weights})")
    if report.module_weights:
        module, own = min(report.module_weights.items())
        total = f" of {len(report.modules)}" if report.modules else ""
        shown = ", ".join(f"{n}: {w:+.4g}" for n, w in own.items())
        lines.append(f"  per module {len(report.module_weights)}{total} modules have their own weights, e.g. {module} "
                     f"({shown}); each in {Path(output) / 'merge_report.json'}")
    if report.rank is not None:
        lines.append(f"  rank       {report.rank} (alpha {report.alpha:g})")
    if report.modules:
        lines.append(f"  error      max {report.max_error:.3g}, mean {report.mean_error:.3g} (relative, vs {report.target})")
    lines += [f"  note       {for_the_shell(note)}" for note in report.notes]
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
