"""The quality section's tables (markdown lines) and plot, for the suite's page and for
docs/quality_results.md."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Sequence

from benchmarks.quality.learned import LABELS as LEARNED

SPECIAL = ("pre-trained", "individual")


def pm(pair: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    mean, std = pair
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _config(configs: Sequence[Any]) -> str:
    if not configs or not configs[0]:
        return "–"
    keys = list(configs[0])
    return "; ".join(f"{k} " + "/".join(f"{c.get(k):g}" for c in configs) for k in keys)


def ranked(result: Dict[str, Any]) -> List[str]:
    """The merge rows (not pre-trained / individual), best average normalised accuracy first."""
    table = result["summary"]["table"]
    rows = [k for k, v in table.items() if k not in SPECIAL and v.get("status") == "ok"]
    return sorted(rows, key=lambda k: -table[k]["normalised"][0])


def lines(result: Dict[str, Any]) -> List[str]:
    setup, summary = result["setup"], result["summary"]
    table, names = summary["table"], list(setup["tasks"])
    settings, recipe = setup["settings"], setup["recipe"]
    seeds = len(result["seeds"])
    out = [f"Model: {setup['model']}. One LoRA adapter (r {recipe['r']}, alpha {recipe['alpha']}, query and value) "
           f"and one classification head per task, trained {recipe['steps']} steps of {recipe['batch_size']} with "
           f"AdamW (lr {recipe['lr']:g}), base model frozen; {seeds} seed(s) {settings['seeds']} (the adapters are "
           "retrained per seed, the splits are fixed). Every merge combines all "
           f"{len(names)} adapters; a merged adapter is scored on task t with task t's own head. Hyper-parameters "
           f"chosen per seed by mean validation accuracy over the grid λ (the weight of every adapter, "
           f"normalize_weights=False) ∈ {settings['lams']}; task-vector strategies: λ ∈ {settings['sum_lams'] or 'task arithmetic’s'} "
           f"(those that sum) or {settings['ties_lams']} (TIES' disjoint mean) × density ∈ {settings['densities']}; "
           "`lora_delta_w_concat` and the svd_rank rows at task arithmetic's λ; other options at their defaults; "
           "scores on test. Normalised accuracy: merged / individual "
           f"accuracy per task, then averaged; mean ± std over seeds. Section wall time {result['wall_s'] / 60:.1f} min "
           f"({setup['settings'].get('processes', 1)} process(es) of {setup['torch_threads']} torch thread(s), the seeds in parallel; load average {result['load_average_at_start'][0]:.1f} at the "
           f"start, {result['load_average_at_end'][0]:.1f} at the end).", "",
           "**Tasks** (every one balanced: chance 50 %):", ""]
    out += _table(["task", "data", "train", "validation", "test"],
                  [[n, t["source"], str(t["sizes"]["train"]), str(t["sizes"]["validation"]), str(t["sizes"]["test"])]
                   for n, t in setup["tasks"].items()]) + [""]
    out += ["**Merging all tasks** (test accuracy, %; rows by average normalised accuracy):", ""]
    header = ["method", "avg normalised", "avg absolute"] + names + ["merge time (learned: learning)",
                                                                     "chosen (per seed)"]
    rows = []
    for label in list(SPECIAL) + ranked(result):
        row = table[label]
        t = row.get("merge_s")
        rows.append([_label(label), pm(row["normalised"]), pm(row["absolute"])]
                    + [f"{100 * row['per_task'][n]:.1f}" for n in names]
                    + [_seconds(t), _config(row.get("configs", []))])
    out += _table(header, rows) + [""]
    failed = [k for k, v in table.items() if v.get("status") != "ok"]
    if failed:
        out += ["Failed: " + "; ".join(f"`{k}` ({table[k].get('error')})" for k in failed), ""]
    out += ["**Negation** (Ilharco et al.): for each task, the exact merge (`lora_delta_w_svd`) of the other tasks "
            "with the weight task arithmetic chosen, plus the task's adapter with weight −λ; λ from "
            f"{settings['negative_lams']} chosen on validation (target nearest chance among the λ that keep the "
            "others' mean validation accuracy ≥ 95 % of the merge without the negated adapter). Test accuracy, %:", ""]
    neg = summary["negation"]
    out += _table(["task", "target: without → with −λ (chance 50)", "others: without → with", "others kept",
                   "λ (per seed)"],
                  [[n, f"{pm(neg[n]['target_without'])} → {pm(neg[n]['target_with'])}",
                    f"{pm(neg[n]['others_without'])} → {pm(neg[n]['others_with'])}", pm(neg[n]["others_kept"]),
                    "/".join(f"{x:g}" for x in neg[n]["lams"])] for n in names]) + [""]
    return out + learned_lines(result)


def _label(label: str) -> str:
    if label in SPECIAL or label in ("simple average", "task arithmetic"):
        return f"**{label}**"
    return f"*{label}*" if label in LEARNED else f"`{label}`"


def _seconds(t) -> str:
    """A merge time in ms, a learning time (≥ 10 s) in s."""
    if t is None:
        return "–"
    return f"{t:.0f} s" if t >= 10 else f"{1000 * t:.0f} ms"


def _points(pair: Sequence[float]) -> str:
    mean, std = pair
    return f"{100 * mean:+.1f} ± {100 * std:.1f}"


def learned_lines(result: Dict[str, Any]) -> List[str]:
    """The learned rows' section: the data and the choice of their settings, the issue's targets (gap to
    task arithmetic, time, memory), the settings tried, and LoraHub's table."""
    setup, summary = result["setup"], result["summary"]
    settings = setup["settings"]
    table = summary["table"]
    learn = settings.get("learned")
    present = [label for label in LEARNED if table.get(label, {}).get("status") == "ok"]
    if not learn or not present:
        return []
    from benchmarks.quality.learned import TARGET_SECONDS

    seeds = len(result["seeds"])
    out = ["**Learned weights** (issue 20; the *italic* rows of the table \"Merging all tasks\"): `adapter_merging.learn_weights(model, tasks, batches, "
           "strategy=\"lora_delta_w_svd\", granularity=…, method=…, objective=…, adapter_name=\"merged\")` on "
           f"{learn['examples']} labelled examples per task drawn (fixed seed {learn['draw_seed']}, the same for every "
           "benchmark seed) from each task's **train** split — the split its adapter and head were trained on — "
           "one batch per task `{input_ids, attention_mask, labels, head: task}`; the entropy row gets the same "
           "inputs without their labels. The last row draws its examples from the **validation** split instead, "
           "at the settings the train-split row chose (so validation both teaches it and chose its settings: it "
           "shows what held-out examples change, not a clean score). Each row's init (λ of every adapter at the "
           "start), Adam's lr and budget (gradient steps, each a pass over the batches; CMA-ES evaluations) "
           + ("are chosen per seed from its grid below by the mean validation accuracy of the merge it learns, as "
              "every other row's hyper-parameters. " if any(len(g) > 1 for g in learn["grids"].values()) else
              "are the ones in the \"chosen\" column: the best on validation among the settings tried before "
              "the run (below; a learning run takes minutes here, so the run itself learns each row once per "
              "seed). ")
           + "The time column is learn_weights' wall time (the final merge included), "
           f"median over the {seeds} seed(s), each seed in its own process of one torch thread, the seeds in "
           "parallel on this machine's cores.", ""]
    targets = summary.get("learned_targets", {})
    rows = []
    for label, target in targets.items():
        rows.append([f"*{label}* − **task arithmetic** (λ from the grid on validation), avg normalised accuracy, "
                     "points (mean ± std over seeds of the per-seed gap)",
                     f"{_points(target['gap'])} (per seed " + ", ".join(f"{100 * g:+.1f}" for g in target["gaps"]) + ")",
                     f"≥ +{100 * target['target']:.0f}", "**yes**" if target["met"] else "**no**"])
    for label in present:
        t = table[label].get("merge_s")
        rows.append([f"learning wall time, *{label}* (1 thread per seed, seeds in parallel)", _seconds(t),
                     f"≤ {TARGET_SECONDS / 60:.0f} min on 2 cores", "yes" if t is not None and t <= TARGET_SECONDS else "no"])
    measured = [(cost, "") for cost in [result.get("cost")] if cost]
    measured += [(cost, f" — {cost['note']}") for cost in [result.get("cost_rerun")] if cost]
    for cost, where in measured:
        rows += _cost_rows(cost, where)
    out += ["**Targets** (issue 20):", ""] + _table(["what", "measured", "target", "met?"], rows) + [""]
    if any(cost.get("status") == "ok" for cost, _ in measured):
        step = next(cost for cost, _ in measured if cost.get("status") == "ok")["step"]
        out += ["Cost set-up (`benchmarks/quality/cost.py`, each in a fresh process, one after the other after the "
                "seeds): the model with 8 seeded-random LoRA adapters and heads (not trained, so that no training "
                "run raises the peak first; the arithmetic does not depend on the values) and the same batches; "
                "the training step is one adapter and its head trained on the same 8 batches (forward and backward "
                f"of each, gradients accumulated, AdamW's step: {step['seconds']:.1f} s with {step['threads']} "
                "threads), both in eval mode. Other work on the machine (its load average is given, 2 cores) slows "
                "the times, and two torch threads slow down far more than one when the cores are shared.", ""]
    explored = learn.get("explored")
    if explored:
        out += [f"Settings tried before this run ({explored['how']}); the row uses the one marked:", ""]
        out += _table(["row", "init; lr; budget", "validation accuracy, %", "used"],
                      [[f"*{label}*", _config([entry["config"]]), f"{100 * entry['validation']:.1f}",
                        "✓" if entry["config"] in learn["grids"].get(label, []) else ""]
                       for label, entries in explored["rows"].items() for entry in entries]) + [""]
    grid = {label: entries for label, entries in summary.get("learned_grid", {}).items() if len(entries) > 1}
    grid_rows = [[f"*{label}*", _config([entry["config"]]), pm(entry["validation_mean"]), _seconds(entry["seconds"]),
                  f"{entry['chosen']} of {seeds}"] for label, entries in grid.items() for entry in entries]
    if grid_rows:
        out += ["Settings chosen in this run (mean validation accuracy of the merge, %, mean ± std over seeds; median "
                "learning time):", ""] + _table(["row", "init; lr; budget", "validation", "time", "chosen"], grid_rows) + [""]
    out += lorahub_lines(result)
    return out


def _load(run: Dict[str, Any]) -> str:
    load = run.get("load_average")
    return f", load average {load[0]:.1f} → {load[1]:.1f}" if load else ""


def _cost_rows(cost: Dict[str, Any], where: str) -> List[List[str]]:
    """The cost measurement's rows of the targets table: each learning run's time, then memory."""
    if cost.get("status") != "ok":
        return [[f"cost measurement{where}", f"failed: {cost.get('error')}", "", ""]]
    from benchmarks.quality.learned import TARGET_MEMORY, TARGET_SECONDS

    learn_run, step = cost["learn"], cost["step"]
    rows = []
    for key in ["learn"] + sorted(k for k in cost if k.startswith("learn_") and k.endswith("_threads")):
        run = cost[key]
        rows.append([f"one learning run alone, *{LEARNED[1]}* at {_config([cost['config']])}, {run['threads']} "
                     f"thread(s), fresh process{_load(run)}{where}", f"{run['seconds']:.0f} s",
                     f"≤ {TARGET_SECONDS / 60:.0f} min on 2 cores", "yes" if run["seconds"] <= TARGET_SECONDS else "no"])
    rows.append([f"peak memory (ru_maxrss) of the {learn_run['threads']}-thread run / of one training step of one "
                 f"adapter on the same batches{where}",
                 f"{learn_run['peak_mib']:.0f} / {step['peak_mib']:.0f} MiB = {cost['peak_ratio']:.2f}×",
                 f"≤ {TARGET_MEMORY:g}×", "yes" if cost["peak_ratio"] <= TARGET_MEMORY else "no"])
    rows.append([f"increase over the loaded model (peak after loading: {learn_run['peak_loaded_mib']:.0f} / "
                 f"{step['peak_loaded_mib']:.0f} MiB){where}",
                 f"{learn_run['increase_mib']:.0f} / {step['increase_mib']:.0f} MiB = {cost['increase_ratio']:.2f}×",
                 f"≤ {TARGET_MEMORY:g}×", "yes" if cost["increase_ratio"] <= TARGET_MEMORY else "no"])
    return rows


def lorahub_lines(result: Dict[str, Any]) -> List[str]:
    """LoraHub's setting: per unseen task, the pool of the other adapters and 5 examples."""
    hub = result["summary"].get("lorahub")
    settings = result["setup"]["settings"].get("lorahub")
    if not hub or not settings:
        return []
    names = list(result["setup"]["tasks"])
    from benchmarks.quality.learned import HUB_CMA, HUB_GRADIENT

    n = len(names) - 1
    out = [f"**LoraHub's setting** (Huang et al. 2023): each task t in turn is the unseen task; the pool is the other "
           f"{n} adapters; {settings['examples']} labelled examples of t from its train split (drawn with a fixed "
           "seed). Test accuracy on t, %, mean over seeds (average: mean ± std over seeds). Every row uses t's own "
           "classification head, which was trained together with t's adapter: it carries some of t into every row "
           "(the bare model with it is already far above chance), so the rows compare merges under the same head, "
           "not a truly unseen task. The best single adapter is chosen on the "
           f"{settings['examples']} examples (accuracy, then loss); the oracle row picks it on test (not a method). "
           f"The learned rows start at λ = 1/{n} and run CMA-ES for {_budget(settings, 'cma', 100)} evaluations or "
           f"{_budget(settings, 'gradient', 40)} Adam steps of lr 0.05 (learn_weights' defaults: 100, 40) with "
           "LoraHub's L1 term "
           f"l1 = {settings['l1']:g} (both), granularity adapter; median learning time "
           f"{hub['seconds'][HUB_CMA]:.1f} s (cma) and {hub['seconds'][HUB_GRADIENT]:.1f} s (gradient). The chosen "
           f"single adapter was the oracle's in {hub['chosen_is_oracle']} of {hub['cases']} (task, seed) cases.", ""]
    rows = [[label if label.startswith(("bare", "the task")) else f"*{label}*" if label.startswith("learned") else label,
             pm(row["average"])] + [f"{100 * row['per_task'][t]:.1f}" for t in names]
            for label, row in hub["table"].items()]
    return out + _table(["pool of the other adapters → unseen task t", "average"] + names, rows) + [""]


def _budget(settings: Dict[str, Any], method: str, default: int) -> int:
    return settings["configs"].get(method, {}).get("budget", default)


def plot(result: Dict[str, Any], path: Path) -> Path:
    """A horizontal bar chart of the average normalised accuracy (± std over seeds) of every row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = result["summary"]["table"]
    labels = ["pre-trained"] + ranked(result)
    means = [100 * table[k]["normalised"][0] for k in labels]
    stds = [100 * table[k]["normalised"][1] for k in labels]
    figure, axis = plt.subplots(figsize=(7.5, 0.28 * len(labels) + 1.2))
    colors = ["0.6" if k == "pre-trained" else ("tab:orange" if k in ("simple average", "task arithmetic") else
                                                "tab:green" if k in LEARNED else "tab:blue") for k in labels]
    axis.barh(range(len(labels)), means, xerr=stds, color=colors, capsize=2)
    axis.set_yticks(range(len(labels)), labels, fontsize=7)
    axis.invert_yaxis()
    axis.axvline(100, color="k", linewidth=0.8)
    axis.set_xlim(min(means) - 5, 102)
    axis.set_xlabel("average normalised accuracy, % of the individual adapters (mean ± std over seeds)")
    axis.set_title(f"Merging {len(result['setup']['tasks'])} LoRA adapters of all-MiniLM-L6-v2", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path
