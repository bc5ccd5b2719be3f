"""LoRA delta-W SVD on one Llama layer: a grid of hidden sizes and ranks, adapter_merging vs ``adapters``
1.3.0 vs PEFT.

Each point is ``bench_lora_svd``'s setup with one layer: a ``LlamaModel`` layer of hidden size h
(intermediate ⌊h · 11008 / 4096⌉, Llama-7B's ratio), three LoRA adapters of rank r (alpha r) on q, k, v,
up and down, weights [1, −1, 1], merged at the exact rank 3r (``lora_delta_w_svd``; PEFT: ``svd``).
Every library in its own process; ours the median of 5 runs, the others one run. A peer whose run
exceeds ``PEER_TIMEOUT`` seconds is stopped, and its runs at that hidden size with larger ranks and
at larger hidden sizes are skipped (their dense SVDs cost at least as much): the table says so.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List

from benchmarks import bench_lora_svd
from benchmarks.common import log_to_stderr

HIDDEN = (1024, 2048, 4096)
RANKS = (8, 16, 64)
QUICK_HIDDEN, QUICK_RANKS = (128,), (4,)
PEER_TIMEOUT = 300
SIDES = ("ours", "adapters", "peft")


def intermediate(hidden: int) -> int:
    return round(hidden * 11008 / 4096)


def run(quick: bool, log: Callable[[str], None] = log_to_stderr, peer_timeout: float = PEER_TIMEOUT) -> Dict[str, Any]:
    hidden_sizes, ranks = (QUICK_HIDDEN, QUICK_RANKS) if quick else (HIDDEN, RANKS)
    points: List[Dict[str, Any]] = []
    too_slow: Dict[str, str] = {}  # side → why it is skipped from here on
    for hidden in hidden_sizes:
        for rank in ranks:
            args = bench_lora_svd.parse_args([
                "--hidden", str(hidden), "--intermediate", str(intermediate(hidden)), "--layers", "1",
                "--rank", str(rank), "--alpha", str(rank), "--svd-rank", str(3 * rank), "--repeat", "5",
                "--timeout", str(int(peer_timeout)),
            ])
            point: Dict[str, Any] = {"hidden": hidden, "intermediate": intermediate(hidden), "rank": rank,
                                     "svd_rank": 3 * rank, "sides": {}}
            for side in SIDES:
                if side in too_slow:
                    point["sides"][side] = {"status": "skipped", "why": too_slow[side]}
                    continue
                log(f"LoRA layer, hidden {hidden}, r {rank}: {side}")
                result = bench_lora_svd.run_side(side, args)
                result.pop("relative_error_per_module", None)
                result.pop("modules", None)
                if result.get("status") == "timeout" and side != "ours":
                    too_slow[side] = f"its run at hidden {hidden}, r {rank} exceeded {peer_timeout:.0f} s"
                point["sides"][side] = result
            points.append(point)
    return {"setup": {"layers": 1, "adapters": 3, "weights": [1.0, -1.0, 1.0], "strategy": "lora_delta_w_svd",
                      "peer_timeout_s": peer_timeout, "modules": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]},
            "points": points}
