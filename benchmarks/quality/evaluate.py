"""Scoring merges: accuracy of an adapter on each task with the task's own head, the merge variants and
their validation grids, the choice of hyper-parameters on the validation splits, the negation
experiment, and the statistics over seeds (small functions; the model is an ``adapters`` model with
the adapter_merging mixin and one adapter + head per task, named after the task)."""
from __future__ import annotations

import itertools
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

MERGED = "merged"
TASK_VECTOR = ("ties", "dare_linear", "dare_ties", "magnitude_prune", "breadcrumbs", "breadcrumbs_ties", "della",
               "della_linear")
SPACES = ("full", "core", "knots")


@dataclass(frozen=True)
class Variant:
    """One row of the table: ``strategy`` with fixed ``options``, its hyper-parameters chosen from ``grid``
    ({option: values}; ``lam`` is the weight of every adapter, passed with normalize_weights=False)."""
    label: str
    strategy: str
    options: Mapping[str, Any] = field(default_factory=dict)
    grid: Optional[Mapping[str, Sequence[Any]]] = field(default_factory=dict)  # None: task arithmetic's λ
    normalize_weights: bool = False

    def configurations(self) -> List[Dict[str, Any]]:
        keys = list(self.grid or {})
        return [dict(zip(keys, values)) for values in itertools.product(*(self.grid[k] for k in keys))]


SUM_TYPE = ("dare_linear", "magnitude_prune", "breadcrumbs", "della_linear")  # Σ λᵢ τ̂ᵢ: λ like task arithmetic's


def variants(lams: Sequence[float], densities: Sequence[float], sum_lams: Sequence[float],
             ties_lams: Sequence[float]) -> List[Variant]:
    """Every strategy of the library (task-vector ones in each space) with its validation grid: ``lams``
    for the rules that add the updates, ``sum_lams`` / ``ties_lams`` × ``densities`` for the task-vector
    rules that sum / take TIES' disjoint mean. ``lora_delta_w_concat`` (the same update as task arithmetic)
    and the truncations of task arithmetic (svd_rank 8, 16) use the λ task arithmetic chose (grid None)."""
    lam = {"lam": tuple(lams)}
    rows = [
        Variant("simple average", "lora_delta_w_svd", normalize_weights=True),
        Variant("task arithmetic", "lora_delta_w_svd", grid=lam),
        Variant("lora_delta_w_svd, svd_rank 8", "lora_delta_w_svd", {"svd_rank": 8}, None),
        Variant("lora_delta_w_svd, svd_rank 16", "lora_delta_w_svd", {"svd_rank": 16}, None),
        Variant("lora_delta_w_concat", "lora_delta_w_concat", grid=None),
        Variant("linear", "linear", grid=lam),
        Variant("lora_linear_only_negate_b", "lora_linear_only_negate_b", grid=lam),
    ]
    for strategy in TASK_VECTOR:
        for space in SPACES:
            options = {"space": space}
            if strategy in ("dare_linear", "dare_ties", "della", "della_linear"):
                options["seed"] = 0
            grid = {"lam": tuple(sum_lams if strategy in SUM_TYPE else ties_lams), "density": tuple(densities)}
            rows.append(Variant(f"{strategy} ({space})", strategy, options, grid))
    rows += [Variant("tsv", "tsv", grid=lam), Variant("star", "star", grid=lam), Variant("iso_c", "iso_c", grid=lam),
             Variant("iso_cts", "iso_cts", grid=lam)]
    return rows


def accuracy(model, adapter: Optional[str], task: str, data: Tuple, chunk: int = 256) -> float:
    """Accuracy on ``data`` (encoded ids, mask, labels) with ``adapter`` active (None: the bare model) and
    head ``task``."""
    import torch

    model.set_active_adapters(adapter)
    ids, mask, labels = data
    lengths = mask.sum(1)
    order = torch.argsort(lengths)
    correct = 0
    with torch.inference_mode():  # chunks of similar length, each cut to its longest: less padding
        for rows in torch.split(order, chunk):
            width = int(lengths[rows].max())
            logits = model(input_ids=ids[rows, :width], attention_mask=mask[rows, :width], head=task).logits
            correct += int((logits.argmax(-1) == labels[rows]).sum())
    return correct / len(labels)


def scores(model, adapter: Optional[str], data: Mapping[str, Mapping[str, Tuple]], split: str,
           tasks: Optional[Sequence[str]] = None) -> Dict[str, float]:
    """{task: accuracy on its ``split``} with ``adapter`` active and each task's own head."""
    return {t: accuracy(model, adapter, t, data[t][split]) for t in (tasks or list(data))}


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def merge(model, weights: Mapping[str, float], variant: Variant, config: Mapping[str, Any]) -> float:
    """Merge ``weights`` ({adapter: weight}, each multiplied by config's ``lam``) into MERGED with
    ``variant`` at ``config``; returns the merge call's wall seconds."""
    options = dict(variant.options)
    options.update({k: v for k, v in config.items() if k != "lam"})
    lam = config.get("lam", 1.0)
    scaled = {name: lam * w for name, w in weights.items()}
    with warnings.catch_warnings():  # cross-terms and re-factorisation warnings: the table shows the outcome
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        model.average_adapter(MERGED, scaled, combine_strategy=variant.strategy,
                              normalize_weights=variant.normalize_weights, overwrite_ok=True, progress=False,
                              **options)
        return time.perf_counter() - start


def choose(model, data, tasks: Sequence[str], variant: Variant) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    """The configuration of ``variant`` with the best mean validation accuracy over ``tasks`` (merging all
    of them with weight lam each), and every configuration's validation mean."""
    tried = []
    for config in variant.configurations() or [{}]:
        merge(model, {t: 1.0 for t in tasks}, variant, config)
        tried.append({"config": config, "validation_mean": mean(scores(model, MERGED, data, "validation", tasks).values())})
    best = max(tried, key=lambda row: row["validation_mean"])  # first of equals: the grid's order
    return best["config"], tried


def evaluate_variant(model, data, tasks: Sequence[str], variant: Variant,
                     fixed: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Choose on validation (or take ``fixed`` when the variant has no grid of its own), then merge at the
    chosen configuration (timed) and score on test."""
    try:
        if variant.grid is None:
            config, tried = dict(fixed or {}), []
        else:
            config, tried = choose(model, data, tasks, variant)
        seconds = merge(model, {t: 1.0 for t in tasks}, variant, config)
        test = scores(model, MERGED, data, "test", tasks)
    except Exception as error:  # a strategy that fails is recorded, the others still run
        return {"status": "failed", "error": f"{type(error).__name__}: {error}"}
    return {"status": "ok", "config": config, "grid": tried, "merge_s": seconds, "test": test}


def normalised(merged: Mapping[str, float], individual: Mapping[str, float]) -> Dict[str, float]:
    """Per task merged / individual accuracy."""
    return {t: merged[t] / individual[t] for t in merged}


def negation(model, data, tasks: Sequence[str], lam_others: float, negative_lams: Sequence[float],
             keep: float = 0.95) -> Dict[str, Dict[str, Any]]:
    """For each task t: the exact merge (lora_delta_w_svd) of the other tasks with weight ``lam_others``
    each, without and with t's adapter at −λ. λ is chosen on validation: among the λ whose merge keeps
    the other tasks' mean validation accuracy ≥ ``keep`` × the merge's without t, the one whose target
    validation accuracy is nearest chance (0.5); if none keeps it, the smallest λ."""
    exact = Variant("exact", "lora_delta_w_svd")
    rows = {}
    for target in tasks:
        others = [t for t in tasks if t != target]
        base = {t: lam_others for t in others}
        merge(model, base, exact, {})
        base_val = mean(scores(model, MERGED, data, "validation", others).values())
        base_test = scores(model, MERGED, data, "test", tasks)
        candidates = []
        for lam in negative_lams:
            merge(model, {**base, target: -lam}, exact, {})
            val = scores(model, MERGED, data, "validation", tasks)
            others_val = mean(val[t] for t in others)
            candidates.append({"lam": lam, "target_validation": val[target], "others_validation": others_val,
                               "kept": others_val >= keep * base_val})
        kept = [c for c in candidates if c["kept"]]
        chosen = min(kept, key=lambda c: abs(c["target_validation"] - 0.5))["lam"] if kept else min(negative_lams)
        merge(model, {**base, target: -chosen}, exact, {})
        test = scores(model, MERGED, data, "test", tasks)
        rows[target] = {
            "lam": chosen, "candidates": candidates,
            "target_without": base_test[target], "target_with": test[target],
            "others_without": mean(base_test[t] for t in others), "others_with": mean(test[t] for t in others),
        }
    return rows


def spread(values: Sequence[float]) -> Tuple[float, float]:
    """(mean, sample standard deviation; 0 for one value)."""
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)
