"""adapter_merging's randomized SVD vs ``torch.svd_lowrank``, side by side in one run.

``adapter_merging.ops.dense_svd.randomized_svd`` (the hand-written Halko–Martinsson–Tropp range
finder that re-factorises a large dense task-vector merge to a fixed ``svd_rank``) against the
maintained ``torch.svd_lowrank``, with the same parameters: rank r, sketch width q = r + oversample
(oversample 10), niter = 2 power iterations. Both re-orthonormalise (a QR) after every product with
A and Aᵀ, so they are the same algorithm (Halko et al. Alg. 4.4 + 5.1); they differ in the sketch
(ours: Gaussian from a ``torch.Generator`` on the CPU; torch: ``torch.randn`` from the global RNG
of the tensor's device, here wrapped in ``torch.random.fork_rng`` and seeded), in the orientation
(torch transposes a wide matrix to tall first) and in the dtype (ours always computes in float64;
torch computes in the input's dtype, so float32 input is shown both as is and converted to
float64).

Matrices (the first is the real use: re-factorising a task-vector merge of three LoRA updates to
rank 48; its float32 dtype is what the merge produces):

- ``ties d×k``: TIES merge (``adapter_merging.ops.task_vectors.ties``, density 0.2, i.e. 80 % of
  every update's entries zeroed by magnitude, weights [1, −1, 1]) of three rank-16 updates Bᵢ Aᵢ,
  B ~ N(0, 0.02²), A ~ N(0, 1/k), float32; shapes 4096 × 11008, 2048 × 5504, 1024 × 1024;
- ``slow decay``: 2048 × 2048 float64 with singular values σⱼ = j^(−1/2) (a hard case for any
  randomized method: the spectrum beyond rank 48 is almost flat).

Accuracy: relative Frobenius error ‖A − U S Vh‖_F / ‖A‖_F, its ratio to the optimal (Eckart–Young,
from the exact singular values) error √(Σ_{j>r} σⱼ²)/‖σ‖, and the largest relative error of the r
singular values, max_j |s̃ⱼ − σⱼ| / σⱼ. Time: wall time of one call, median of ``--repeat`` runs
(methods interleaved, so drifting load hits them alike), with one torch thread and with torch's
default number of threads.

    python -m benchmarks.compare_randomized_svd                # every case (minutes: exact SVDs)
    python -m benchmarks.compare_randomized_svd --quick        # small cases only (about a minute)
    python -m benchmarks.compare_randomized_svd --json out.json

It also checks isolation from the caller's RNG: each method called repeatedly while another
thread draws from the global RNG. ``torch.svd_lowrank`` has no ``generator`` argument, so it can be
deterministic only by seeding the global RNG inside ``fork_rng``, which other threads share.

Writes nothing unless ``--json`` is given.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import threading
import time
from typing import Callable, Dict, List, Tuple

import torch

from adapter_merging.ops import task_vectors
from adapter_merging.ops.dense_svd import randomized_svd

RANK, OVERSAMPLE, NITER, SEED = 48, 10, 2, 0

Factorisation = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


# ----------------------------------------------------------------------------- the two methods
def ours(a: torch.Tensor) -> Factorisation:
    res = randomized_svd(a, RANK, oversample=OVERSAMPLE, n_iter=NITER, generator=torch.Generator().manual_seed(SEED))
    return res.U, res.S, res.Vh


def torch_lowrank(dtype: torch.dtype) -> Callable[[torch.Tensor], Factorisation]:
    def run(a: torch.Tensor) -> Factorisation:
        x = a.to(dtype)
        # torch.svd_lowrank draws its sketch from the global RNG: seed it in a fork, so the result is
        # deterministic and the caller's RNG state is left as it was (CPU tensors: the CPU RNG only)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(SEED)
            u, s, v = torch.svd_lowrank(x, q=RANK + OVERSAMPLE, niter=NITER)
        return u[:, :RANK], s[:RANK], v[:, :RANK].mT

    return run


# ----------------------------------------------------------------------------- the matrices
def ties_merge(d: int, k: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    tasks = torch.stack([
        (0.02 * torch.randn(d, 16, generator=generator)) @ (torch.randn(16, k, generator=generator) / math.sqrt(k))
        for _ in range(3)
    ])
    return task_vectors.ties(tasks, [1.0, -1.0, 1.0], density=0.2)


def slow_decay(n: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    sigma = torch.arange(1, n + 1, dtype=torch.float64) ** -0.5
    return (u * sigma) @ v.T


def cases(quick: bool) -> List[Tuple[str, Callable[[], torch.Tensor]]]:
    if quick:
        return [
            ("ties 1024x1024 f32", lambda: ties_merge(1024, 1024)),
            ("ties 1024x2752 f32", lambda: ties_merge(1024, 2752)),
            ("slow decay 1024x1024 f64", lambda: slow_decay(1024)),
        ]
    return [
        ("ties 4096x11008 f32", lambda: ties_merge(4096, 11008)),
        ("ties 2048x5504 f32", lambda: ties_merge(2048, 5504)),
        ("ties 1024x1024 f32", lambda: ties_merge(1024, 1024)),
        ("slow decay 2048x2048 f64", lambda: slow_decay(2048)),
    ]


# ----------------------------------------------------------------------------- measuring
def accuracy(a: torch.Tensor, sigma: torch.Tensor, result: Factorisation) -> Dict[str, float]:
    u, s, vh = (t.to(torch.float64) for t in result)
    a64 = a.to(torch.float64)
    norm = float(torch.linalg.matrix_norm(a64))
    error = float(torch.linalg.matrix_norm(a64 - (u * s) @ vh)) / norm
    optimal = math.sqrt(float((sigma[RANK:] ** 2).sum())) / math.sqrt(float((sigma**2).sum()))
    sv_error = float(((s - sigma[: s.numel()]).abs() / sigma[: s.numel()]).max())
    orthogonality = max(
        float((u.T @ u - torch.eye(u.shape[1], dtype=torch.float64)).abs().max()),
        float((vh @ vh.T - torch.eye(vh.shape[0], dtype=torch.float64)).abs().max()),
    )
    return {
        "rel_error": error, "optimal_rel_error": optimal, "error_over_optimal": error / optimal,
        "max_rel_sv_error": sv_error, "orthogonality_error": orthogonality,
    }


def timings(methods: Dict[str, Callable], a: torch.Tensor, repeat: int) -> Dict[str, List[float]]:
    times: Dict[str, List[float]] = {name: [] for name in methods}
    for name, method in methods.items():  # warm-up, not timed
        method(a)
    for _ in range(repeat):
        for name, method in methods.items():
            start = time.perf_counter()
            method(a)
            times[name].append(time.perf_counter() - start)
    return times


def rng_isolation(calls: int = 300) -> Dict[str, Dict[str, int]]:
    """Each method ``calls`` times on a 600 × 400 matrix (rank 8) while another thread keeps drawing
    from the global CPU RNG, as a training loop or data loader of the caller would. Counts the
    results that differ from the first (the method is no longer deterministic) and the values the
    other thread drew more than once (its random stream was rewound under it). One thread each."""
    a = torch.randn(600, 400, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def small_ours():
        return randomized_svd(a, 8, oversample=10, n_iter=NITER, generator=torch.Generator().manual_seed(SEED)).S

    def small_torch():
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(SEED)
            return torch.svd_lowrank(a, q=18, niter=NITER)[1][:8]

    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, method in (("ours (f64)", small_ours), ("torch.svd_lowrank f64", small_torch)):
            torch.manual_seed(123)
            stop, draws = threading.Event(), []

            def other_thread():
                while not stop.is_set():
                    draws.append(torch.randn(1).item())

            worker = threading.Thread(target=other_thread)
            worker.start()
            try:
                first = method()
                differing = sum(not torch.equal(method(), first) for _ in range(calls - 1))
            finally:
                stop.set()
                worker.join()
            out[name] = {"calls": calls, "results_differing_from_first": differing,
                         "other_thread_draws": len(draws), "other_thread_repeated_values": len(draws) - len(set(draws))}
    finally:
        torch.set_num_threads(threads)
    return out


def main(argv=None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small cases only (about a minute)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per method (the median is reported)")
    parser.add_argument("--json", default=None, help="also write the results to this file (nothing is written otherwise)")
    args = parser.parse_args(argv)

    default_threads = torch.get_num_threads()
    thread_settings = [1] if default_threads == 1 else [1, default_threads]
    report = {
        "machine": {
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "default_threads": default_threads, "load_average_at_start": list(os.getloadavg()),
        },
        "setup": {"rank": RANK, "oversample": OVERSAMPLE, "q": RANK + OVERSAMPLE, "niter": NITER, "seed": SEED,
                  "repeat": args.repeat},
        "cases": {},
    }
    rows = []
    for label, build in cases(args.quick):
        torch.set_num_threads(default_threads)
        a = build()
        start = time.perf_counter()
        sigma = torch.linalg.svdvals(a.to(torch.float64))
        exact_s = time.perf_counter() - start
        methods = {"ours (f64)": ours, "torch.svd_lowrank f64": torch_lowrank(torch.float64)}
        if a.dtype == torch.float32:
            methods["torch.svd_lowrank f32"] = torch_lowrank(torch.float32)
        case = {"shape": list(a.shape), "dtype": str(a.dtype).replace("torch.", ""),
                "exact_svdvals_s_default_threads": exact_s, "methods": {}}
        for name, method in methods.items():
            first, second = method(a), method(a)
            deterministic = all(torch.equal(x, y) for x, y in zip(first, second))
            case["methods"][name] = {**accuracy(a, sigma, first), "deterministic": deterministic}
        for threads in thread_settings:
            torch.set_num_threads(threads)
            for name, runs in timings(methods, a, args.repeat).items():
                case["methods"][name][f"seconds_{threads}_threads"] = statistics.median(runs)
                case["methods"][name][f"runs_{threads}_threads"] = runs
        torch.set_num_threads(default_threads)
        report["cases"][label] = case
        for name, m in case["methods"].items():
            rows.append((
                label, name,
                *(f"{m[f'seconds_{t}_threads']:.3f}" for t in thread_settings),
                f"{m['rel_error']:.6f}", f"{m['optimal_rel_error']:.6f}", f"{m['error_over_optimal']:.6f}",
                f"{m['max_rel_sv_error']:.2e}", "yes" if m["deterministic"] else "NO",
            ))
        print(f"{label}: exact svdvals (reference) {exact_s:.1f} s", flush=True)
    report["rng_isolation"] = rng_isolation()
    report["machine"]["load_average_at_end"] = list(os.getloadavg())
    header = ("matrix", "method", *(f"time {t} thr (s)" for t in thread_settings), "rel. error", "optimal",
              "error/optimal", "max rel. σ error", "deterministic")
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = [" | ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in [header] + rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    report["table"] = "\n".join(lines)
    print()
    print(report["table"])
    print("\nWhile another thread draws from the global RNG (float32 normals repeat by chance too, a few per 1000):")
    for name, r in report["rng_isolation"].items():
        print(f"  {name}: {r['results_differing_from_first']} of {r['calls'] - 1} repeated calls differ from the "
              f"first; the other thread drew {r['other_thread_repeated_values']} of {r['other_thread_draws']} "
              "values more than once")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, ensure_ascii=False)
            f.write("\n")
        print(f"\nwrote {args.json}")
    return report


if __name__ == "__main__":
    main()
