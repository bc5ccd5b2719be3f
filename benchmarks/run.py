"""The benchmark suite of adapter_merging: one entry point, one run, every comparison side by side.

    python -m benchmarks.run                   # every section at full size (about 40 minutes on 2 cores)
    python -m benchmarks.run --quick           # tiny shapes: a smoke test of every section (about a minute)
    python -m benchmarks.run --only task_vectors,scaling
    python -m benchmarks.run --publish         # full run, and replace the committed results (see below)

Sections (``--only``): refactorisation, task_vectors, lora_layer, files_7b, bottleneck, scaling, lowrank, import, quality;
``benchmarks/README.md`` says what each measures.

A run writes ``results.json``, ``results.md`` (tables, the machine and the date) and PNG plots into
``--out`` (default: ``benchmarks/results/latest.tmp/``, or ``quick.tmp/`` with ``--quick``; git ignores
both). The committed results — ``docs/benchmark_results.md``, its plots in ``docs/img/benchmarks/``
and ``benchmarks/results/suite.json`` — change only with ``--publish``, which needs a full run of every
section.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from benchmarks.common import RESULTS_DIR, ROOT, in_subprocess, log_to_stderr, machine_info

#: section → (module in benchmarks/, its function taking ``quick``, timeout in seconds when the section runs
#: in its own process here, or None when the function runs its own subprocesses)
SECTIONS = {
    "refactorisation": ("refactorisation", "run", 3600),
    "task_vectors": ("task_vectors_layer", "run", None),
    "lora_layer": ("lora_layer", "run", None),
    "files_7b": ("bench_files_7b", "suite", 5400),
    "bottleneck": ("bottleneck", "run", None),
    "scaling": ("scaling", "run", None),
    "lowrank": ("lowrank_methods", "run", None),
    "import": ("import_time", "run", None),
    "quality": ("quality.run", "run", 7200),
}
SECTION_NAMES = tuple(SECTIONS)
DOCS_PAGE = ROOT / "docs" / "benchmark_results.md"
DOCS_IMAGES = ROOT / "docs" / "img" / "benchmarks"
PUBLISHED_JSON = RESULTS_DIR / "suite.json"


def section_runner(name: str) -> Callable[[bool], Dict[str, Any]]:
    """The function that measures section ``name`` (imported lazily: each pulls in torch and more)."""
    module, function, timeout = SECTIONS[name]
    if timeout is not None:
        return lambda quick: in_subprocess(module, function, {"quick": quick}, timeout=timeout)
    return getattr(importlib.import_module(f"benchmarks.{module}"), function)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test of every section")
    parser.add_argument("--only", default=",".join(SECTION_NAMES), metavar="SECTIONS",
                        help=f"comma-separated subset of {', '.join(SECTION_NAMES)}")
    parser.add_argument("--out", type=Path, default=None, help="folder for results.json, results.md and the plots")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in every process (default: torch's)")
    parser.add_argument("--publish", action="store_true",
                        help="after a full run of every section, replace docs/benchmark_results.md, its plots and "
                             "benchmarks/results/suite.json")
    return parser


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.sections = [s for s in args.only.split(",") if s]
    unknown = [s for s in args.sections if s not in SECTION_NAMES]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}: choose from {', '.join(SECTION_NAMES)}")
    quality_only = args.sections == ["quality"]  # the quality section has a published copy of its own
    if args.publish and (args.quick or (sorted(args.sections) != sorted(SECTION_NAMES) and not quality_only)):
        parser.error("--publish replaces the committed results, so it needs a full run of every section "
                     "(no --quick, no --only), or --only quality alone (docs/quality_results.md)")
    if args.out is None:
        args.out = RESULTS_DIR / ("quick.tmp" if args.quick else "latest.tmp")
    committed = {DOCS_PAGE.parent.resolve(), DOCS_IMAGES.resolve(), RESULTS_DIR.resolve(), ROOT.resolve()}
    if args.out.resolve() in committed:
        parser.error(f"--out {args.out} would mix a run's files with committed ones: name a folder of its own")
    return args


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Measure the sections, saving results.json after each (a later failure keeps the earlier ones)."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: Dict[str, Any] = {"machine": machine_info(), "quick": args.quick, "sections": {}}
    for name in args.sections:
        log_to_stderr(f"== {name}")
        section_started = time.perf_counter()
        try:
            results["sections"][name] = section_runner(name)(args.quick)
        except Exception as error:  # one section's failure is recorded, the others still run
            results["sections"][name] = {"status": "failed", "error": f"{type(error).__name__}: {error}"}
        results["sections"][name].setdefault("status", "ok")
        results["sections"][name]["section_wall_s"] = round(time.perf_counter() - section_started, 1)
        (args.out / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    results["machine"]["load_average_at_end"] = list(os.getloadavg())
    results["wall_s"] = round(time.perf_counter() - started, 1)
    return results


def write(results: Dict[str, Any], out: Path, publish: bool, command: str) -> List[Path]:
    """results.json, results.md and the plots into ``out``; with ``publish`` also the committed copies."""
    from benchmarks import report

    results["images"] = report.plots(results, out)
    (out / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "results.md").write_text(report.markdown(results, "", command), encoding="utf-8")
    written = [out / "results.json", out / "results.md"] + [out / name for name in results["images"].values()]
    if publish and list(results["sections"]) == ["quality"]:
        from benchmarks.quality.run import publish as publish_quality

        written += publish_quality(results, command)
    elif publish:
        DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
        for name in results["images"].values():
            shutil.copyfile(out / name, DOCS_IMAGES / name)
        DOCS_PAGE.write_text(report.markdown(results, "img/benchmarks/", command), encoding="utf-8")
        shutil.copyfile(out / "results.json", PUBLISHED_JSON)
        written += [DOCS_PAGE, PUBLISHED_JSON] + [DOCS_IMAGES / name for name in results["images"].values()]
    return written


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    command = "python -m benchmarks.run" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    results = run(args)
    written = write(results, args.out, args.publish, command)
    failed = [name for name, result in results["sections"].items() if result.get("status") != "ok"]
    for path in written:
        resolved = path.resolve()
        log_to_stderr(f"wrote {resolved.relative_to(ROOT) if resolved.is_relative_to(ROOT) else path}")
    if failed:
        log_to_stderr(f"failed: {', '.join(failed)} (see results.json)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
