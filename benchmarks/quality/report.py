"""The quality section's tables (markdown lines) and plot, for the suite's page and for
docs/quality_results.md."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Sequence

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
    header = ["method", "avg normalised", "avg absolute"] + names + ["merge time", "chosen (per seed)"]
    rows = []
    for label in list(SPECIAL) + ranked(result):
        row = table[label]
        t = row.get("merge_s")
        rows.append([f"`{label}`" if label not in SPECIAL and label not in ("simple average", "task arithmetic")
                     else f"**{label}**", pm(row["normalised"]), pm(row["absolute"])]
                    + [f"{100 * row['per_task'][n]:.1f}" for n in names]
                    + ["–" if t is None else f"{1000 * t:.0f} ms", _config(row.get("configs", []))])
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
    return out


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
    colors = ["0.6" if k == "pre-trained" else ("tab:orange" if k in ("simple average", "task arithmetic") else "tab:blue")
              for k in labels]
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
