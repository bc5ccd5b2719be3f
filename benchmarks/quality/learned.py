"""Learned merge weights on the quality benchmark (issue 20's targets): rows of the "Merging all tasks"
table whose λ `adapter_merging.learn_weights` learns from a few examples, the gap to grid-searched task
arithmetic, and LoraHub's setting (an unseen task, a pool of the other adapters, 5 examples).

Rows (all 8 adapters merged with ``lora_delta_w_svd``, scored on test with each task's own head, the
learning's wall time — learn_weights' ``seconds``, the final merge included — in the time column):

- ``learned λ per adapter (gradient, loss)``, ``… per layer (gradient, loss)``: Adam on λ through the factored
  update, on ``examples`` labelled examples per task drawn (fixed seed) from each task's *train* split, the
  split the adapters were trained on; one batch per task ``{"input_ids", "attention_mask", "labels", "head": task}``;
- ``… per layer (gradient, entropy)``: the same inputs without their labels (AdaMerging);
- ``… per adapter (cma, loss)``: CMA-ES (LoraHub's way);
- ``… per layer (gradient, loss; validation examples)``: the per-layer row with its examples drawn from the
  validation split instead, at the configuration the train-split row chose (validation chooses the other
  rows' settings, so this row's examples are no held-out data for its own choice).

Each row's (init, lr, budget) is chosen per seed, like every other row's hyper-parameters, by the mean
validation accuracy of the merge it learns, from its grid in the settings (``learned.grids``).
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from benchmarks.quality import evaluate
from benchmarks.quality.evaluate import MERGED


@dataclass(frozen=True)
class LearnedRow:
    """One learned row: learn_weights' granularity, method and objective, and the split its examples come from
    (``copy``: the label of the row whose chosen configuration it reuses instead of choosing its own)."""
    label: str
    granularity: str
    method: str
    objective: str
    split: str = "train"
    copy: Optional[str] = None


PER_ADAPTER = "learned λ per adapter (gradient, loss)"
PER_LAYER = "learned λ per layer (gradient, loss)"
ENTROPY = "learned λ per layer (gradient, entropy)"
CMA = "learned λ per adapter (cma, loss)"
PER_LAYER_VALIDATION = "learned λ per layer (gradient, loss; validation examples)"
ROWS = (
    LearnedRow(PER_ADAPTER, "adapter", "gradient", "loss"),
    LearnedRow(PER_LAYER, "layer", "gradient", "loss"),
    LearnedRow(ENTROPY, "layer", "gradient", "entropy"),
    LearnedRow(CMA, "adapter", "cma", "loss"),
    LearnedRow(PER_LAYER_VALIDATION, "layer", "gradient", "loss", split="validation", copy=PER_LAYER),
)
LABELS = tuple(row.label for row in ROWS)
#: the issue's target: learned per-layer weights beat the best grid-searched task arithmetic by ≥ 3 points
TARGET_GAP = 0.03
#: the rows measured against it (labelled and unlabelled)
TARGET_ROWS = (PER_LAYER, ENTROPY)
#: the cost targets: learning wall time on 2 CPU cores, memory against one training step
TARGET_SECONDS = 120.0
TARGET_MEMORY = 1.5


def draw(data: Mapping[str, Mapping[str, Tuple]], tasks: Sequence[str], split: str, examples: int, seed: int,
         labels: bool = True) -> List[Dict[str, Any]]:
    """One batch per task: ``examples`` rows of its ``split`` drawn with ``seed`` (the same rows for every
    benchmark seed), cut to their longest input, ``head`` the task; ``labels`` only when asked."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    batches = []
    for task in tasks:
        ids, mask, targets = data[task][split]
        rows = torch.randperm(len(targets), generator=generator)[:examples]
        width = int(mask[rows].sum(1).max())
        batch = {"input_ids": ids[rows, :width], "attention_mask": mask[rows, :width], "head": task}
        if labels:
            batch["labels"] = targets[rows]
        batches.append(batch)
    return batches


def _drop_merged(model) -> None:
    if MERGED in model.adapters_config:
        model.delete_adapter(MERGED)


def learn(model, tasks: Sequence[str], batches: Sequence[Mapping[str, Any]], row: LearnedRow,
          config: Mapping[str, Any], seed: int, l1: float = 0.0):
    """learn_weights on ``batches`` for ``row`` at ``config`` ({init, lr, budget}), merged into MERGED."""
    from adapter_merging import learn_weights

    _drop_merged(model)
    options = dict(config)
    if row.method == "cma":
        options.pop("lr", None)
    return learn_weights(model, list(tasks), batches, strategy="lora_delta_w_svd", granularity=row.granularity,
                         method=row.method, objective=row.objective, seed=seed, l1=l1, adapter_name=MERGED,
                         progress=False, **options)


def _lams(learned) -> Dict[str, Any]:
    values = [v for row in learned.table.values() for v in row.values()]
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "table": learned.table}


def run_row(model, data, tasks: Sequence[str], row: LearnedRow, config: Mapping[str, Any], seed: int,
            learn_settings: Mapping[str, Any]) -> Dict[str, Any]:
    """One learning run of ``row`` at ``config``: its time, the learned λ, the validation mean and the test
    scores of the merge."""
    batches = draw(data, tasks, row.split, learn_settings["examples"], learn_settings["draw_seed"],
                   labels=row.objective != "entropy")
    learned = learn(model, tasks, batches, row, config, seed)
    return {"config": dict(config), "seconds": learned.seconds, "evaluations": learned.evaluations,
            "objective": [learned.history[0], learned.best], "lams": _lams(learned),
            "validation_mean": evaluate.mean(evaluate.scores(model, MERGED, data, "validation", tasks).values()),
            "test": evaluate.scores(model, MERGED, data, "test", tasks)}


def evaluate_rows(model, data, tasks: Sequence[str], seed: int, learn_settings: Mapping[str, Any],
                  only: Optional[Sequence[str]] = None, log=lambda message: None) -> Dict[str, Dict[str, Any]]:
    """Every learned row: each configuration of its grid learned and scored, the one with the best mean
    validation accuracy kept (rows with ``copy`` take that row's choice). Rows in the format of
    ``evaluate.evaluate_variant`` (``merge_s``: the learning's wall time)."""
    rows: Dict[str, Dict[str, Any]] = {}
    for row in ROWS:
        if only is not None and row.label not in only:
            continue
        try:
            if row.copy is not None:
                if rows.get(row.copy, {}).get("status") != "ok":
                    continue
                configs = [rows[row.copy]["config"]]
            else:
                configs = [dict(c) for c in learn_settings["grids"][row.label]]
            runs = [run_row(model, data, tasks, row, config, seed, learn_settings) for config in configs]
        except Exception as error:  # a row that fails is recorded, the others still run
            rows[row.label] = {"status": "failed", "error": f"{type(error).__name__}: {error}"}
            continue
        best = max(runs, key=lambda run: run["validation_mean"])  # first of equals: the grid's order
        rows[row.label] = {
            "status": "ok", "config": best["config"], "merge_s": best["seconds"], "test": best["test"],
            "learned": {k: best[k] for k in ("evaluations", "objective", "lams", "validation_mean")},
            "grid": [{"config": r["config"], "validation_mean": r["validation_mean"], "seconds": r["seconds"]}
                     for r in runs],
        }
        log(f"seed {seed}: {row.label}: {best['config']}, {best['seconds']:.0f} s, validation "
            f"{best['validation_mean']:.3f}, test mean {evaluate.mean(best['test'].values()):.3f}")
    return rows


# ----------------------------------------------------------------------------- LoraHub's setting
BARE = "bare model"
OWN = "the task's own adapter (not in the pool; reference)"
SINGLE = "best single pool adapter (chosen on the 5 examples)"
ORACLE = "best single pool adapter (oracle: chosen on test)"
UNIFORM = "uniform merge, λ = 1/(pool size) each"
UNIFORM_TA = "uniform merge, task arithmetic's λ each"
HUB_CMA = "learned λ per adapter (cma, loss, l1 0.05: LoraHub)"
HUB_GRADIENT = "learned λ per adapter (gradient, loss, l1 0.05)"
HUB_ROWS = (BARE, SINGLE, ORACLE, UNIFORM, UNIFORM_TA, HUB_CMA, HUB_GRADIENT, OWN)


def _few_shot(model, adapter: Optional[str], batch: Mapping[str, Any]) -> Tuple[float, float]:
    """(accuracy, loss) of ``adapter`` on the labelled ``batch``."""
    import torch

    model.set_active_adapters(adapter)
    with torch.inference_mode():
        out = model(**batch)
    return float((out.logits.argmax(-1) == batch["labels"]).float().mean()), float(out.loss)


def lorahub(model, data, tasks: Sequence[str], seed: int, lam_ta: float, hub: Mapping[str, Any],
            log=lambda message: None) -> Dict[str, Any]:
    """For each task t: the pool of the other adapters, ``hub["examples"]`` labelled examples of t (train split,
    drawn with ``hub["draw_seed"]``), and t's test accuracy, with t's own head, of every row of HUB_ROWS."""
    rows: Dict[str, Any] = {}
    for i, target in enumerate(tasks):
        pool = [t for t in tasks if t != target]
        batch = draw(data, [target], "train", hub["examples"], hub["draw_seed"] + i)[0]
        test = data[target]["test"]
        few = {a: _few_shot(model, a, batch) for a in pool}
        chosen = max(pool, key=lambda a: (few[a][0], -few[a][1]))  # accuracy on the 5, then the lower loss
        singles = {a: evaluate.accuracy(model, a, target, test) for a in pool}
        oracle = max(pool, key=lambda a: singles[a])
        scores = {BARE: evaluate.accuracy(model, None, target, test), OWN: evaluate.accuracy(model, target, target, test),
                  SINGLE: singles[chosen], ORACLE: singles[oracle]}
        for label, lam in ((UNIFORM, 1.0 / len(pool)), (UNIFORM_TA, lam_ta)):
            evaluate.merge(model, {a: lam for a in pool}, evaluate.Variant("uniform", "lora_delta_w_svd"), {})
            scores[label] = evaluate.accuracy(model, MERGED, target, test)
        learned = {}
        for label, method in ((HUB_CMA, "cma"), (HUB_GRADIENT, "gradient")):
            row = LearnedRow(label, "adapter", method, "loss")
            run = learn(model, pool, [batch], row, hub["configs"][method], seed, l1=hub["l1"])
            scores[label] = evaluate.accuracy(model, MERGED, target, test)
            learned[label] = {"seconds": run.seconds, "weights": run.table["*"]}
        _drop_merged(model)
        rows[target] = {"test": scores, "chosen": chosen, "oracle": oracle, "few_shot": few, "learned": learned,
                        "lam_ta": lam_ta}
        log(f"seed {seed}: LoraHub setting, unseen {target}: " + ", ".join(f"{k.split(' (')[0]} {v:.3f}"
                                                                            for k, v in scores.items()))
    return rows


# ----------------------------------------------------------------------------- over seeds
def targets(seeds: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Per target row: the gap (learned − task arithmetic) of average normalised accuracy, per seed and as
    mean ± std, against TARGET_GAP."""
    out = {}
    for label in TARGET_ROWS:
        gaps = []
        for s in seeds:
            rows = s["rows"]
            if rows.get(label, {}).get("status") != "ok" or rows.get("task arithmetic", {}).get("status") != "ok":
                continue
            ind = rows["individual"]["test"]
            norm = [evaluate.mean(evaluate.normalised(rows[k]["test"], ind).values()) for k in (label, "task arithmetic")]
            gaps.append(norm[0] - norm[1])
        if gaps:
            gap = evaluate.spread(gaps)
            out[label] = {"gaps": gaps, "gap": gap, "target": TARGET_GAP, "met": gap[0] >= TARGET_GAP}
    return out


def hub_summary(seeds: List[Dict[str, Any]], tasks: Sequence[str]) -> Dict[str, Any]:
    """LoraHub's table over seeds: per row, each task's mean test accuracy and the average over tasks
    (mean ± std over seeds); the learning times (median)."""
    runs = [s["lorahub"] for s in seeds if s.get("lorahub")]
    if not runs:
        return {}
    table = {}
    for label in HUB_ROWS:
        averages = [evaluate.mean(run[t]["test"][label] for t in tasks) for run in runs]
        table[label] = {"average": evaluate.spread(averages),
                        "per_task": {t: evaluate.spread([run[t]["test"][label] for run in runs])[0] for t in tasks}}
    seconds = {label: statistics.median(run[t]["learned"][label]["seconds"] for run in runs for t in tasks)
               for label in (HUB_CMA, HUB_GRADIENT)}
    chosen_is_oracle = sum(run[t]["chosen"] == run[t]["oracle"] for run in runs for t in tasks)
    return {"table": table, "seconds": seconds, "chosen_is_oracle": chosen_is_oracle, "cases": len(runs) * len(tasks)}


def grid_summary(seeds: List[Dict[str, Any]]) -> Dict[str, List[Dict[str, Any]]]:
    """Per learned row: each configuration of its grid with its mean validation accuracy over seeds and how
    often it was chosen."""
    out: Dict[str, List[Dict[str, Any]]] = {}
    for label in LABELS:
        runs = [s["rows"][label] for s in seeds if s["rows"].get(label, {}).get("status") == "ok"]
        if not runs:
            continue
        configs = [g["config"] for g in runs[0]["grid"]]
        out[label] = [{"config": c,
                       "validation_mean": evaluate.spread([r["grid"][i]["validation_mean"] for r in runs]),
                       "seconds": statistics.median(r["grid"][i]["seconds"] for r in runs),
                       "chosen": sum(r["config"] == c for r in runs)} for i, c in enumerate(configs)]
    return out
