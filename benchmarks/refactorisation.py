"""How many power iterations the re-factorisation of a task-vector merge needs: the accuracy test
behind ``rules.REFACTOR_TOLERANCE``.

For merges of three rank-16 LoRA updates (seeded factors, weights [1, −1, 1], density 0.2, breadcrumbs
gamma 0.01, DARE seed 0) at several shapes, every task-vector strategy: the randomized SVD at rank 48
(10 oversampling columns) with a fixed 0, 1, 2 or 3 power iterations and with the adaptive stop the
rules use, against the optimal (Eckart–Young) error of the same rank. ``excess`` = error / optimal − 1.
Time: the best of two calls.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Dict, List, Tuple

from benchmarks.common import log_to_stderr

STRATEGIES = ("ties", "dare_ties", "dare_linear", "magnitude_prune", "breadcrumbs")
SHAPES: Tuple[Tuple[int, int], ...] = ((512, 1376), (1024, 2752), (4096, 11008))
QUICK_SHAPES: Tuple[Tuple[int, int], ...] = ((256, 688),)
FIXED = (0, 1, 2, 3)
RANK, R, WEIGHTS = 48, 16, [1.0, -1.0, 1.0]


def merged(d: int, k: int, strategy: str):
    """The strategy's dense merge (float32, as the rule computes it) of three seeded rank-16 updates."""
    import torch
    from adapter_merging.ops import chunked

    from benchmarks.common import random_factors

    tasks = chunked.FactoredTasks([random_factors(i, "proj", R, d, k) for i in range(3)], [1.0] * 3, torch.float32)
    sparsify = {"ties": chunked.KeepWindow(0.2), "magnitude_prune": chunked.KeepWindow(0.2),
                "breadcrumbs": chunked.KeepWindow(0.2, 0.01), "dare_ties": chunked.DropAndRescale(0.2),
                "dare_linear": chunked.DropAndRescale(0.2)}[strategy]
    consensus = chunked.SignElection("total") if strategy in ("ties", "dare_ties") else chunked.Sum()
    return chunked.merge(tasks, WEIGHTS, sparsify, consensus, torch.Generator().manual_seed(0))


def best_of_two(function: Callable[[], Any]) -> Tuple[float, Any]:
    times, result = [], None
    for _ in range(2):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return min(times), result


def run(quick: bool, log: Callable[[str], None] = log_to_stderr) -> Dict[str, Any]:
    import torch
    from adapter_merging import rules
    from adapter_merging.ops.dense_svd import randomized_svd, squared_norm

    from benchmarks.task_vectors_layer import optimal_error

    rows: List[Dict[str, Any]] = []
    for d, k in QUICK_SHAPES if quick else SHAPES:
        for strategy in STRATEGIES:
            log(f"re-factorisation of {strategy} at {d} × {k}")
            dense = merged(d, k, strategy)
            optimal = optimal_error(dense, RANK)
            total = squared_norm(dense)
            methods = {f"{n} iterations": dict(n_iter=n) for n in FIXED}
            methods["adaptive (ours)"] = dict(n_iter=rules.REFACTOR_POWER_ITERATIONS, tol=rules.REFACTOR_TOLERANCE)
            for method, kwargs in methods.items():
                seconds, svd = best_of_two(lambda: randomized_svd(dense, RANK, oversample=10,
                                                                   generator=torch.Generator().manual_seed(0), **kwargs))
                error = math.sqrt(max(0.0, total - float((svd.S**2).sum())) / total)
                rows.append({"shape": f"{d} × {k}", "strategy": strategy, "method": method, "seconds": seconds,
                             "error": error, "optimal": optimal, "excess": error / optimal - 1})
    return {"setup": {"rank": RANK, "oversample": 10, "updates": "3 × rank 16", "weights": WEIGHTS,
                      "tolerance": rules.REFACTOR_TOLERANCE, "max_iterations": rules.REFACTOR_POWER_ITERATIONS},
            "rows": rows}
