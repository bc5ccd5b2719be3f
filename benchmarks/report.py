"""The suite's results as a markdown page and PNG plots (``python -m benchmarks.run`` writes them)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from benchmarks.common import format_ratio

#: the targets of the task-vector issue, checked in the page
TARGET_LAYER_S, TARGET_RATIO, TARGET_PEAK_MB, TARGET_7B_TIES_S = 1.0, 4.0, 1024, 180


# ----------------------------------------------------------------------------- formatting
def seconds(value: Optional[float]) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if value >= 100:
        return f"{value:.0f} s"
    if value >= 1:
        return f"{value:.2f} s"
    return f"{value * 1000:.0f} ms" if value >= 0.01 else f"{value * 1000:.1f} ms"


def megabytes(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.0f} MB"


def number(value: Optional[float], digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def scientific(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.1e}"


def ok(result: Optional[Dict[str, Any]]) -> bool:
    return bool(result) and result.get("status", "ok") == "ok"


def status(result: Optional[Dict[str, Any]]) -> str:
    """Why a side has no numbers: skipped (and why), timed out, failed, not run."""
    if not result:
        return "not run"
    if result.get("status") == "skipped":
        return f"skipped: {result.get('why', '')}"
    if result.get("status") == "timeout":
        return f"stopped after {result.get('timeout_s', 0):.0f} s"
    return str(result.get("status", "?"))


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def met(condition: bool) -> str:
    return "met" if condition else "**not met**"


# ----------------------------------------------------------------------------- sections
def task_vectors_section(result: Dict[str, Any]) -> List[str]:
    setup = result["setup"]
    both, peft = result.get("ours_and_reference", {}), result.get("peft", {})
    lines = [
        f"One {setup['d']} × {setup['k']} layer, {setup['n']} LoRA adapters of r {setup['r']} (alpha = r), weights "
        f"{setup['weights']}, density {setup['density']} (breadcrumbs: gamma {setup['gamma']}), re-factorised to rank "
        f"{setup['rank']}. **ours**: `adapter_merging.peft.add_weighted_adapter` on the PEFT model; **reference**: the "
        "same computation in plain torch (dense ΔWᵢ, `kthvalue`, masks, `torch.svd_lowrank`), in the same process, "
        f"interleaved with ours (medians of {setup['repeats']}); **PEFT**: its own `add_weighted_adapter` with the "
        "`*_svd` type, once. Errors: the stored update against the side's own definition formed in float64, with the "
        "optimal error of that definition at the same rank in brackets.",
        "",
    ]
    if not ok(both):
        return lines + [f"ours and the reference: {status(both)}", ""]
    rows, checks = [], []
    for strategy, sides in ((s, v) for s, v in both.items() if isinstance(v, dict) and "ours" in v):
        ours, reference = sides["ours"], sides["reference"]
        theirs = peft.get(strategy) if ok(peft) else None
        ratio = reference["seconds"] / ours["seconds"]
        rows.append([
            f"`{strategy}`", seconds(ours["seconds"]), seconds(reference["seconds"]), format_ratio(ratio),
            seconds(theirs["seconds"]) if theirs else "no such type" if ok(peft) else status(peft),
            format_ratio(theirs["seconds"] / ours["seconds"]) if theirs else "",
            f"{megabytes(ours['peak_extra_mb'])} / {megabytes(reference['peak_extra_mb'])}"
            + (f" / {megabytes(theirs['peak_extra_mb'])}" if theirs else ""),
            f"{number(ours['error'])} ({number(ours['optimal_error'])})",
            number(reference["error"]),
            f"{number(theirs['error'])} ({number(theirs['optimal_error'])})" if theirs else "",
            number(theirs.get("definition_gap"), 3) if theirs and theirs.get("definition_gap") is not None else "–",
        ])
        checks.append((strategy, ours["seconds"], ratio, ours["peak_extra_mb"]))
    lines += table(["strategy", "ours", "reference", "reference / ours", "PEFT", "PEFT / ours",
                    "peak extra memory (ours / ref. / PEFT)", "ours: error (optimal)", "reference: error",
                    "PEFT: error (optimal)", "PEFT's definition vs ours"], rows)
    lines += ["", "Targets (issue: ≤ 1.0 s per layer, ≥ 4× the reference, ≤ 1 GB extra memory):", ""]
    for strategy, time_s, ratio, peak in checks:
        lines.append(f"- `{strategy}`: {seconds(time_s)} ({met(time_s <= TARGET_LAYER_S)}), {format_ratio(ratio)} "
                     f"({met(ratio >= TARGET_RATIO)}), {megabytes(peak)} ({met(peak <= TARGET_PEAK_MB)})")
    lines += ["", "The reference's DARE masks come from `torch.rand`, so its DARE error is against its own masks. "
              "PEFT's definitions differ from ours (last column, ‖D_PEFT − D_ours‖ / ‖D_ours‖, DARE left out as the "
              "masks differ): PEFT elects the sign on the unweighted tasks and divides the agreeing sum by their count, "
              "so a negative weight does not vote against a skill; ours elects it on λᵢτᵢ and divides by the agreeing "
              "|λᵢ| mass. PEFT keeps ⌊density·N⌋ entries, ours ⌈density·N⌉.", ""]
    return lines


def lora_layer_section(result: Dict[str, Any]) -> List[str]:
    setup = result["setup"]
    lines = [
        f"One Llama layer (hidden h, intermediate h·11008/4096), three LoRA adapters of rank r (alpha r) on "
        f"{', '.join(setup['modules'])}, weights {setup['weights']}, merged at the exact rank 3r: ours and `adapters` "
        "`lora_delta_w_svd`, PEFT `svd`. Each library in its own process; ours the median of 5, the others one run. "
        "Error: the largest relative error of a module's merged update against Σ λᵢ sᵢ Bᵢ Aᵢ (float64). A peer run "
        f"longer than {setup['peer_timeout_s']:.0f} s is stopped and its larger runs skipped.",
        "",
    ]
    rows = []
    for point in result["points"]:
        sides = point["sides"]
        ours = sides.get("ours", {})
        row = [str(point["hidden"]), str(point["rank"])]
        for side in ("ours", "adapters", "peft"):
            got = sides.get(side)
            if ok(got):
                ratio = got["seconds"] / ours["seconds"] if ok(ours) and side != "ours" else None
                row += [seconds(got["seconds"]) + (f" ({format_ratio(ratio)})" if ratio else ""),
                        megabytes(got["peak_extra_rss_mb"]), scientific(got["max_relative_error"])]
            else:
                row += [status(got), "", ""]
        rows.append(row)
    lines += table(["hidden", "r", "ours", "peak", "error", "adapters (× ours)", "peak", "error", "PEFT (× ours)",
                    "peak", "error"], rows)
    return lines + [""]


def files_section(result: Dict[str, Any]) -> List[str]:
    setup = result["setup"]
    lines = [
        f"Three PEFT-format LoRA folders ({setup['layers']} layers × {', '.join(m.split('.')[-1] for m in setup['modules_per_layer'])}, "
        f"r {setup['rank']}, {result['input_mb']:.0f} MB in all) merged by `merge_saved_adapters` (weights "
        f"{setup['weights']}, not normalised) into a new folder: read, merge, measure, write. **Floor**: the same work "
        "done plainly — read every file (`safetensors.torch.load_file`), compute, write (`save_file`). For "
        "`lora_delta_w_svd` the compute floor is the factored SVD (two float64 QRs and a 48 × 48 SVD per module); for "
        "`ties` it is what no dense task-vector merge avoids: each ΔWᵢ formed once and one randomized range finder on "
        "their sum (no selection, no masks). Medians of interleaved runs.",
        "",
    ]
    rows = []
    for strategy in ("lora_delta_w_svd", "ties", "ties_core"):
        got = result.get(strategy)
        if not got:
            continue
        floor = got["floor_s"]
        cli = got.get("cli")
        rows.append([
            "`ties`, `space=\"core\"`" if strategy == "ties_core" else f"`{strategy}`", seconds(got["merge_s"]),
            f"{seconds(floor['total'])} = {seconds(floor['read'])} + {seconds(floor['compute'])} + {seconds(floor['write'])}",
            format_ratio(got["merge_over_floor"]), scientific(got["max_error"]),
            f"{seconds(cli['wall'])}, {cli['extra_mb']:.0f} MB" if cli else "–",
        ])
    lines += table(["strategy", "merge", "floor = read + compute + write", "merge / floor", "max error (report)",
                    "command line: wall, RSS above import"], rows)
    ties = result.get("ties")
    if ties and not setup.get("hidden_scale", 1) > 1:
        lines += ["", f"Target (issue: the whole set with `ties` ≤ 3 minutes): {seconds(ties['merge_s'])} "
                  f"({met(ties['merge_s'] <= TARGET_7B_TIES_S)})."]
    core = result.get("ties_core")
    if core and "over_lora_delta_w_svd" in core:
        lines += ["", f"Core Space (issue 18: `ties, space=\"core\"` ≤ 2× `lora_delta_w_svd` in the same run; its floor is "
                  f"the factored SVD): {format_ratio(core['over_lora_delta_w_svd'])} "
                  f"({met(core['over_lora_delta_w_svd'] <= 2)})."]
    lines += ["", "The `ties` error is against its own dense merge: re-factorising a pruned, sign-elected merge to rank "
              "48 loses that much of it (the report warns); `lora_delta_w_svd` is exact.", ""]
    return lines


def bottleneck_section(result: Dict[str, Any]) -> List[str]:
    setup = result["setup"]
    lines = [f"`{setup['model']}` with {setup['adapters']}, weights {setup['weights']}, `{setup['strategy']}`; each "
             "library in its own process, median of its merges.", ""]
    rows = []
    for side, label in (("ours", "adapter_merging"), ("adapters", "adapters 1.3.0")):
        got = result.get(side)
        if ok(got):
            error = result.get("parity", {}).get(f"{side}_relative_error")
            rows.append([label, seconds(got["seconds"]), megabytes(got["peak_extra_mb"]), scientific(error)])
        else:
            rows.append([label, status(got), "", ""])
    lines += table(["library", "merge time", "peak extra memory", "relative error vs Σ λᵢ θᵢ (float64)"], rows)
    parity = result.get("parity")
    if parity:
        lines += ["", f"Parity: {parity['bit_identical_tensors']} of {parity['tensors']} merged tensors bit-identical "
                  f"(largest difference {parity['max_abs_difference']:.1e})."]
    return lines + [""]


def scaling_section(result: Dict[str, Any]) -> List[str]:
    if not ok(result):
        return [f"not measured: {status(result)}", ""]
    setup = result["setup"]
    lines = [f"One {setup['d']} × {setup['k']} LoRA module through the engine, weights alternating ±1: "
             f"`lora_delta_w_svd` at the exact rank, `ties` (density {setup['density']}) at Σ rᵢ. Adapters of r "
             f"{setup['adapters_axis_rank']}, then {setup['rank_axis_adapters']} adapters of rank r. Median of "
             f"{setup.get('repeats', 3)} runs; peak: resident memory above the call's start.", ""]
    for axis, label in (("adapters", "adapters"), ("rank", "r")):
        rows = []
        values = sorted({row["n" if axis == "adapters" else "r"] for row in result["rows"] if row["axis"] == axis})
        for value in values:
            row = [str(value)]
            for strategy in setup["strategies"]:
                got = next(r for r in result["rows"] if r["axis"] == axis and r["strategy"] == strategy
                           and r["n" if axis == "adapters" else "r"] == value)
                row += [seconds(got["seconds"]), megabytes(got["peak_extra_mb"]), str(got["rank"])]
            rows.append(row)
        header = [label] + [f"{s}: {c}" for s in setup["strategies"] for c in ("time", "peak", "rank")]
        lines += table(header, rows) + [""]
    return lines


def refactorisation_section(result: Dict[str, Any]) -> List[str]:
    setup = result["setup"]
    lines = [f"Randomized SVD at rank {setup['rank']} ({setup['oversample']} oversampling columns) of task-vector "
             f"merges of {setup['updates']} updates: error above the optimal one (excess = error / optimal − 1) and "
             f"time (best of 2), for a fixed number of power iterations and for the adaptive stop the rules use "
             f"(tolerance {setup['tolerance']}, at most {setup['max_iterations']} iterations).", ""]
    methods = list(dict.fromkeys(row["method"] for row in result["rows"]))
    rows = []
    for shape in dict.fromkeys(row["shape"] for row in result["rows"]):
        for strategy in dict.fromkeys(row["strategy"] for row in result["rows"] if row["shape"] == shape):
            got = {r["method"]: r for r in result["rows"] if r["shape"] == shape and r["strategy"] == strategy}
            rows.append([shape, f"`{strategy}`"] + [f"{scientific(max(got[m]['excess'], 0.0))}, {seconds(got[m]['seconds'])}"
                                                    for m in methods])
    return lines + table(["shape", "strategy"] + [f"{m}: excess, time" for m in methods], rows) + [""]


def import_section(result: Dict[str, Any]) -> List[str]:
    setup = result["setup"]
    lines = [f"Fresh interpreters, the cases taking turns: median (range) of {setup['repeats']} "
             f"runs each, and which heavy modules each loaded. `adapter-merge --help` within "
             f"{setup['target_help_s']} s: {met(result['help_target_met'])}.", ""]
    rows = [[f"`{row['case']}`", f"{seconds(row['median_s'])} ({seconds(row['min_s'])}–{seconds(row['max_s'])})",
             ", ".join(row["loaded"]) or "none"] for row in result["rows"]]
    return lines + table(["case", "time", "torch / adapters / transformers loaded"], rows) + [""]


def lowrank_section(result: Dict[str, Any]) -> List[str]:
    setup = result["setup"]
    baseline = setup["baseline"]
    lines = [f"Each method's rule (`decompose`, the per-module entry point) on one {setup['d']} × {setup['k']} "
             f"module with {' and with '.join(str(n) for n in setup['counts'])} LoRA adapters of r {setup['r']}: "
             "seeded random float32 factors, scalings "
             f"{setup['scalings'][:max(setup['counts'])]}, weights {setup['weights'][:max(setup['counts'])]} (the "
             f"first n of each), density {setup['options']['ties, core']['density']}, seed 0, stored in float32. "
             f"Time: best (median) of {setup['repeats']} rounds after a warm-up round, the methods taking turns (full-space "
             f"`ties`: once); ratio of the best times to `{baseline}` at the exact rank on the same inputs (target ≤ "
             f"{setup['target_ratio']:g}×). Peak: resident "
             "memory above the call's start (allocations over "
             f"{setup['mmap_threshold'] // 2**20} MiB returned to the system when freed), next to the inputs' factors; "
             "largest: the largest tensor any torch operation of the call returned. Error: the stored update "
             f"against a dense float64 implementation of the method's definition at {setup['error_d']} × "
             f"{setup['error_k']} (same recipe), float64 factors stored in float64 / the float32 factors stored in "
             "float32; full-space `ties` is truncated to Σ rᵢ, its optimal error in brackets.", ""]
    checks = []
    for n, case in result["cases"].items():
        times, memory, errors = case.get("timings", {}), case.get("memory", {}), case.get("errors", {})
        lines += [f"**{n} adapters** (factors {case['factors_mb']:.1f} MB, one dense d × k float32 matrix "
                  f"{case['dense_mb']:.0f} MB):", ""]
        for name, part in (("time", times), ("memory", memory), ("error", errors)):
            if not ok(part):
                lines += [f"{name}: {status(part)}", ""]
        base = times[baseline]["seconds"] if ok(times) else None
        rows = []
        for label in setup["methods"]:
            t = times.get(label) if ok(times) else None
            m = memory.get(label) if ok(memory) else None
            e = errors.get(label) if ok(errors) else None
            ratio = t["seconds"] / base if t and base else None
            error = "–"
            if e:
                error = f"{scientific(e['error_float64'])} / {scientific(e['error_float32'])}"
                if e.get("optimal_error") is not None:
                    error = f"{number(e['error_float32'])} ({number(e['optimal_error'])})"
            rows.append([
                f"`{label}`", f"{seconds(t['seconds'])} ({seconds(t.get('median_s'))})" if t else "–",
                format_ratio(ratio) if ratio is not None else "–",
                f"{megabytes(m['peak_extra_mb'])} ({m['peak_extra_mb'] / case['factors_mb']:.1f}×)" if m else "–",
                f"{m['largest_tensor_mb']:.1f} MB {' × '.join(map(str, m['largest_tensor_shape']))}" if m else "–",
                str(t["rank"]) if t else "–", error,
            ])
            if ratio is not None and label != baseline and not label.endswith(", full"):
                checks.append((n, label, ratio))
        lines += table(["method", "time (median)", f"/ `{baseline}`", "peak extra (× factors)", "largest tensor", "rank",
                        "error vs dense definition (f64 / f32)"], rows) + [""]
    over = [f"`{label}` with {n} adapters ({format_ratio(ratio)})" for n, label, ratio in checks
            if ratio > setup["target_ratio"]]
    lines += [f"Target ≤ {setup['target_ratio']:g}× `{baseline}` for the factor-space methods: "
              + (met(True) + " by every one." if not over else f"{met(False)} by " + ", ".join(over) + "."), ""]
    return lines


SECTIONS: Dict[str, tuple] = {
    "task_vectors": ("Task-vector strategies on one layer", task_vectors_section, "task_vectors.png"),
    "lora_layer": ("LoRA delta-W SVD on one layer", lora_layer_section, "lora_layer.png"),
    "files_7b": ("A 7B-shaped set of saved adapters", files_section, None),
    "bottleneck": ("Bottleneck adapters, linear merge", bottleneck_section, None),
    "scaling": ("Scaling with the number of adapters and the rank", scaling_section, "scaling.png"),
    "refactorisation": ("Re-factorisation accuracy", refactorisation_section, "refactorisation.png"),
    "lowrank": ("LoRA-native methods against lora_delta_w_svd", lowrank_section, None),
    "import": ("Start-up: import and --help", import_section, None),
    "quality": ("Merge quality on real tasks", lambda result: quality_section(result), "quality.png"),
}


def quality_section(result: Dict[str, Any]) -> List[str]:
    from benchmarks.quality.report import lines

    return lines(result)


def markdown(results: Dict[str, Any], image_prefix: str = "", command: str = "python -m benchmarks.run") -> str:
    machine = results["machine"]
    lines = [
        "# Benchmark results",
        "",
        f"Measured on {machine['date_utc'][:10]} ({machine['date_utc']}) by `{command}`"
        f"{' (quick: smoke-test shapes, not results)' if results.get('quick') else ''}: {machine['cpu_model']}, "
        f"{machine['cpu_count']} CPU cores, {machine['torch_threads']} torch threads, Python {machine['python']}, "
        f"torch {machine['torch']}, adapters {machine['adapters']}, transformers {machine['transformers']}, "
        f"peft {machine['peft']}; load average {', '.join(f'{x:.1f}' for x in machine['load_average_at_start'])} at "
        f"the start and {', '.join(f'{x:.1f}' for x in machine.get('load_average_at_end', []))} at the end; the run "
        f"took {results.get('wall_s', 0) / 60:.0f} min. Times are wall-clock on a shared machine: compare the ratios "
        "measured in one run. Every number is in `benchmarks/results/suite.json`; how each is measured is in "
        "`benchmarks/README.md`.",
        "",
    ]
    for key, (title, render, image) in SECTIONS.items():
        if key not in results["sections"]:
            continue
        result = results["sections"][key]
        lines += [f"## {title}", ""]
        if result.get("status", "ok") != "ok":
            lines += [f"Not measured: {status(result)}.", ""]
            continue
        lines += render(result)
        if image and (results.get("images") or {}).get(key):
            lines += [f"![{title}]({image_prefix}{image})", ""]
    return "\n".join(lines).rstrip() + "\n"


# ----------------------------------------------------------------------------- plots
def plots(results: Dict[str, Any], folder: Path) -> Dict[str, str]:
    """PNG plots of the sections that have them, into ``folder``; {section: file name}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: Dict[str, str] = {}
    renderers: Dict[str, Callable] = {"task_vectors": _plot_task_vectors, "lora_layer": _plot_lora_layer,
                                      "scaling": _plot_scaling, "refactorisation": _plot_refactorisation}
    stamp = f"{results['machine']['cpu_count']} CPU cores, {results['machine']['date_utc'][:10]}"
    for key, render in renderers.items():
        result = results["sections"].get(key)
        if not result or result.get("status", "ok") != "ok":
            continue
        figure = render(plt, result)
        if figure is None:
            continue
        figure.text(0.99, 0.01, stamp, ha="right", va="bottom", fontsize=7, color="0.4")
        name = SECTIONS[key][2]
        figure.savefig(folder / name, dpi=110, bbox_inches="tight")
        plt.close(figure)
        made[key] = name
    quality = results["sections"].get("quality")
    if quality and quality.get("status", "ok") == "ok":
        from benchmarks.quality.report import plot

        plot(quality, folder / SECTIONS["quality"][2])
        made["quality"] = SECTIONS["quality"][2]
    return made


def _plot_task_vectors(plt, result):
    both, peft = result["ours_and_reference"], result.get("peft", {})
    strategies = [s for s, v in both.items() if isinstance(v, dict) and "ours" in v]
    figure, axis = plt.subplots(figsize=(7, 3.6))
    width = 0.27
    for j, (label, get) in enumerate((
        ("adapter_merging", lambda s: both[s]["ours"]["seconds"]),
        ("plain torch reference", lambda s: both[s]["reference"]["seconds"]),
        ("PEFT *_svd", lambda s: (peft.get(s) or {}).get("seconds") if ok(peft) else None),
    )):
        values = [get(s) for s in strategies]
        xs = [i + (j - 1) * width for i, v in enumerate(values) if v]
        axis.bar(xs, [v for v in values if v], width, label=label)
    axis.set_xticks(range(len(strategies)), strategies)
    axis.set_yscale("log")
    axis.set_ylabel("seconds (log)")
    setup = result["setup"]
    axis.set_title(f"Task-vector merge of one {setup['d']} × {setup['k']} layer, {setup['n']} adapters, rank {setup['rank']}")
    axis.legend(fontsize=8)
    return figure


def _plot_lora_layer(plt, result):
    figure, axis = plt.subplots(figsize=(7, 3.8))
    ranks = sorted({p["rank"] for p in result["points"]})
    markers = {"ours": "o", "adapters": "s", "peft": "^"}
    labels = {"ours": "adapter_merging", "adapters": "adapters 1.3.0", "peft": "PEFT svd"}
    for side in ("ours", "adapters", "peft"):
        for rank in ranks:
            points = [(p["hidden"], p["sides"][side]["seconds"]) for p in result["points"]
                      if p["rank"] == rank and ok(p["sides"].get(side))]
            if points:
                axis.plot(*zip(*points), marker=markers[side], label=f"{labels[side]}, r {rank}", alpha=0.85)
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel("hidden size")
    axis.set_ylabel("merge time, s (log)")
    axis.set_title("LoRA delta-W SVD, one Llama layer, 3 adapters")
    axis.legend(fontsize=7, ncol=3)
    return figure


def _plot_scaling(plt, result):
    figure, axes = plt.subplots(1, 2, figsize=(8, 3.4))
    for axis, key, label in ((axes[0], "adapters", "number of adapters (r 16)"), (axes[1], "rank", "rank r (3 adapters)")):
        field = "n" if key == "adapters" else "r"
        for strategy in result["setup"]["strategies"]:
            points = sorted((r[field], r["seconds"]) for r in result["rows"] if r["axis"] == key and r["strategy"] == strategy)
            axis.plot(*zip(*points), marker="o", label=strategy)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel(label)
        axis.set_ylabel("seconds (log)")
        axis.legend(fontsize=8)
    setup = result["setup"]
    figure.suptitle(f"adapter_merging on one {setup['d']} × {setup['k']} module", fontsize=10)
    return figure


def _plot_refactorisation(plt, result):
    shapes = list(dict.fromkeys(r["shape"] for r in result["rows"]))
    fixed = [m for m in dict.fromkeys(r["method"] for r in result["rows"]) if m.endswith("iterations")]
    figure, axes = plt.subplots(1, len(shapes), figsize=(3.2 * len(shapes) + 1, 3.4), sharey=True, squeeze=False)
    for axis, shape in zip(axes[0], shapes):
        for strategy in dict.fromkeys(r["strategy"] for r in result["rows"] if r["shape"] == shape):
            rows = {r["method"]: r for r in result["rows"] if r["shape"] == shape and r["strategy"] == strategy}
            xs = [int(m.split()[0]) for m in fixed]
            line, = axis.plot(xs, [max(rows[m]["excess"], 1e-12) for m in fixed], marker=".", label=strategy)
            axis.axhline(max(rows["adaptive (ours)"]["excess"], 1e-12), color=line.get_color(), ls=":", lw=0.9)
        axis.set_yscale("log")
        axis.set_xticks(range(len(fixed)))
        axis.set_title(shape, fontsize=9)
        axis.set_xlabel("power iterations")
    axes[0][0].set_ylabel("error / optimal − 1 (log)")
    axes[0][-1].legend(fontsize=7)
    figure.suptitle("Randomized re-factorisation at rank 48 (dotted: the adaptive stop)", fontsize=10)
    return figure
