"""How adapter_merging's time and memory grow with the number of adapters and with their rank.

One d × k LoRA module (default 4096 × 11008), seeded factors, weights alternating +1, −1, through
the engine (``adapter_merging.engine.merge``: the call every front end makes): ``lora_delta_w_svd`` at
the exact rank and ``ties`` (density 0.2) re-factorised to Σ rᵢ. The number of adapters n = 2 … 32 at
r 16, and the rank r = 4 … 128 at n = 3. Time: median of 3 runs; memory: peak resident memory above
the call's start. adapters' and PEFT's costs are dominated by a dense SVD of the d × k update, which
depends on neither n nor r (see the LoRA layer grid).
"""
from __future__ import annotations

import time
import warnings
from typing import Any, Callable, Dict, List

from benchmarks.common import PeakRSS, log_to_stderr, median, random_factors

COUNTS, RANKS = (2, 4, 8, 16, 32), (4, 8, 16, 32, 64, 128)
QUICK_COUNTS, QUICK_RANKS = (2, 4), (4, 8)
STRATEGIES = ("lora_delta_w_svd", "ties")


def inputs(d: int, k: int, n: int, r: int):
    from adapters import LoRAConfig
    from adapter_merging.engine import AdapterInput
    from adapter_merging.state import Slot

    prefix = "layers.0.mlp.down_proj"
    out = []
    for i in range(n):
        b, a = random_factors(i, prefix, r, d, k)
        tensors = {Slot(prefix, "loras", "lora_A"): a, Slot(prefix, "loras", "lora_B"): b}
        out.append(AdapterInput(f"a{i}", LoRAConfig(r=r, alpha=r), tensors))
    return out


def point(d: int, k: int, n: int, r: int, strategy: str, repeats: int) -> Dict[str, Any]:
    from adapter_merging.engine import merge

    items = inputs(d, k, n, r)
    weights = [1.0 if i % 2 == 0 else -1.0 for i in range(n)]
    options = {"density": 0.2} if strategy == "ties" else {}
    times, peak, report = [], 0.0, None
    for _ in range(repeats):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ties' truncation warning is expected here
            with PeakRSS() as memory:
                start = time.perf_counter()
                report = merge(items, weights, strategy, False, None, options).report
                times.append(time.perf_counter() - start)
        peak = max(peak, memory.extra_mb)
    return {"n": n, "r": r, "strategy": strategy, "seconds": median(times), "runs_s": times,
            "peak_extra_mb": peak, "rank": report.rank, "max_error": report.max_error}


def run_points(d: int, k: int, counts: List[int], ranks: List[int], repeats: int) -> Dict[str, Any]:
    """Every point, in this process (``in_subprocess`` runs it in its own)."""
    rows = []
    for strategy in STRATEGIES:
        for n in counts:
            rows.append(dict(point(d, k, n, 16, strategy, repeats), axis="adapters"))
        for r in ranks:
            rows.append(dict(point(d, k, 3, r, strategy, repeats), axis="rank"))
    return {"rows": rows}


def run(quick: bool, log: Callable[[str], None] = log_to_stderr, timeout: float = 3600) -> Dict[str, Any]:
    from benchmarks.common import in_subprocess

    d, k = (256, 688) if quick else (4096, 11008)
    counts, ranks = (QUICK_COUNTS, QUICK_RANKS) if quick else (COUNTS, RANKS)
    log(f"scaling with the number of adapters {list(counts)} and the rank {list(ranks)} at {d} × {k}")
    result = in_subprocess("scaling", "run_points", dict(d=d, k=k, counts=list(counts), ranks=list(ranks),
                                                          repeats=1 if quick else 3), timeout)
    result["setup"] = {"d": d, "k": k, "strategies": list(STRATEGIES), "density": 0.2, "repeats": 1 if quick else 3,
                       "rank_axis_adapters": 3, "adapters_axis_rank": 16}
    return result
