"""The LoRA-native merge methods (issue 18) on one module, side by side with ``lora_delta_w_svd``.

The methods computed from the factors, never dense: ``tsv``, ``star`` (eta 40), ``iso_c``, ``iso_cts``
(the default common_fraction), and ``ties``, ``dare_ties`` and ``della`` with ``space="core"`` and
``space="knots"``; ``ties`` in full space (dense ΔWᵢ, then a randomized re-factorisation to Σ rᵢ) for
contrast, and ``lora_delta_w_svd`` at the exact rank as the yardstick. Each is its rule's
``decompose`` — the per-module entry point every front end reaches — on the same inputs: seeded random
factors (``common.random_factors``, float32, r 16), scalings 2, 0.5, 1, 1.5, … (one per adapter),
weights 1, −0.5, 0.8, … (the second negative), density 0.2, seed 0, stored in float32.

* **time** (one d × k module, default 4096 × 11008, with 3 and with 8 adapters): the best (and the
  median) of ``repeats`` rounds after a warm-up round, the methods taking turns within a round; the ratio
  of the best times to ``lora_delta_w_svd``'s (the issue's target: ≤ 3×) — on a loaded machine a round
  now and then waits for a descheduled thread, which the best time leaves out. Full-space ``ties`` once.
  Own process.
* **memory** (same shapes, another process, with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed at 1 MiB so
  that every large buffer is returned to the system when freed and the resident memory follows the live
  tensors): the peak resident memory above the call's start (sampled every 2 ms; a warm-up call first),
  next to the inputs' factors (Σ (d + k)·rᵢ float32) — the target is a small multiple of them, and no
  d × k matrix; and the largest tensor any torch operation of the call returned (a dispatch mode sees
  every one; numpy buffers are not seen, the resident memory is), against d·k.
* **error** (a smaller shape, default 512 × 1376, 3 and 8 adapters, the same recipe): the stored update
  scaling·B·A against a plain dense float64 implementation of each method's definition, written here
  from the tests' references (TSV-M, STAR, Iso-C/Iso-CTS, Core Space, KnOTS, MAGPRUNE entry rules, TIES):
  with float64 factors stored in float64 (the implementation's error) and with the float32 factors
  stored in float32 (what a user gets). Full-space ``ties`` is a rank-Σ rᵢ truncation of a full-rank
  merge: its error is next to the optimal (Eckart–Young) error of its definition at that rank.
"""
from __future__ import annotations

import math
import os
import time
import warnings
from fractions import Fraction
from typing import Any, Callable, Dict, List, Sequence, Tuple

from benchmarks.common import PeakRSS, in_subprocess, log_to_stderr, median, random_factors

#: label → (strategy, options); the first is the yardstick
METHODS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "lora_delta_w_svd": ("lora_delta_w_svd", {}),
    "tsv": ("tsv", {}),
    "star": ("star", {}),
    "iso_c": ("iso_c", {}),
    "iso_cts": ("iso_cts", {}),
    "ties, core": ("ties", {"space": "core"}),
    "ties, knots": ("ties", {"space": "knots"}),
    "dare_ties, core": ("dare_ties", {"space": "core"}),
    "dare_ties, knots": ("dare_ties", {"space": "knots"}),
    "della, core": ("della", {"space": "core"}),
    "della, knots": ("della", {"space": "knots"}),
    "ties, full": ("ties", {"space": "full"}),
}
BASELINE = "lora_delta_w_svd"
#: timed once, without a warm-up, and measured for memory once: the dense contrast
CONTRAST = ("ties, full",)
SCALINGS = (2.0, 0.5, 1.0, 1.5, 0.25, 1.0, 4.0, 0.75)
WEIGHTS = (1.0, -0.5, 0.8, 0.6, 0.9, 0.7, 0.5, 1.2)
DENSITY, SEED = 0.2, 0
TARGET_RATIO = 3.0
MMAP_THRESHOLD = 1 << 20
FULL = {"d": 4096, "k": 11008, "r": 16, "counts": [3, 8], "repeats": 5, "error_d": 512, "error_k": 1376}
QUICK = {"d": 96, "k": 200, "r": 4, "counts": [3, 8], "repeats": 1, "error_d": 24, "error_k": 40}


def case_inputs(d: int, k: int, r: int, n: int):
    """([(Bᵢ, Aᵢ)] float32, scalings, weights) of one case."""
    factors = [random_factors(i, "lowrank", r, d, k) for i in range(n)]
    return factors, [SCALINGS[i % len(SCALINGS)] for i in range(n)], [WEIGHTS[i % len(WEIGHTS)] for i in range(n)]


def parsed_options(label: str) -> Dict[str, Any]:
    from adapter_merging.strategies import get_strategy

    strategy, options = METHODS[label]
    chosen = get_strategy(strategy)
    given = dict(options)
    if "density" in chosen.option_names:
        given["density"] = DENSITY
    if "seed" in chosen.option_names:
        given["seed"] = SEED
    return chosen.parse_options(None, given)


def merge_call(label: str, factors, scalings, weights, dtype) -> Callable[[], Any]:
    """The rule's ``decompose`` as the engine calls it (merged scaling, a fresh seeded generator)."""
    import torch
    from adapter_merging.strategies import get_strategy

    rule = get_strategy(METHODS[label][0]).rule
    options = parsed_options(label)
    ranks = [b.shape[1] for b, _ in factors]
    # the engine's merged scaling (methods.lora.merged_scaling, not imported: it pulls in adapters and
    # transformers, seconds per process): the largest |sᵢ| with a non-zero weight
    scaling = max(abs(s) for s, w in zip(scalings, weights) if w != 0)

    def call():
        generator = torch.Generator().manual_seed(options["seed"]) if "seed" in options else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return rule.decompose(factors, list(weights), list(scalings), ranks, scaling, dtype, options, generator)

    call.scaling = scaling  # type: ignore[attr-defined]
    return call


# ----------------------------------------------------------------------------- time (own process)
def timings(d: int, k: int, r: int, n: int, repeats: int, methods: Sequence[str]) -> Dict[str, Any]:
    """Best and median of ``repeats`` rounds after a warm-up round, the methods taking turns; the contrast
    (full-space ``ties``, seconds to minutes) once, without a warm-up."""
    import torch

    factors, scalings, weights = case_inputs(d, k, r, n)
    calls = {label: merge_call(label, factors, scalings, weights, torch.float32) for label in methods}
    ranks: Dict[str, int] = {}
    runs: Dict[str, List[float]] = {label: [] for label in methods}
    for round_ in range(repeats + 1):
        for label, call in calls.items():
            if round_ and label in CONTRAST:
                continue
            start = time.perf_counter()
            ranks[label] = call().rank
            if round_ or label in CONTRAST:  # round 0 warms the others up
                runs[label].append(time.perf_counter() - start)
    return {label: {"seconds": min(runs[label]), "median_s": median(runs[label]), "runs_s": runs[label],
                    "rank": ranks[label]} for label in methods}


# ----------------------------------------------------------------------------- memory (own process)
class LargestTensor:
    """The largest tensor (in bytes) any torch operation returns while active: a dispatch mode."""

    def __enter__(self) -> "LargestTensor":
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        recorder = self
        self.bytes, self.shape = 0, ()

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor) and t.numel() * t.element_size() > recorder.bytes:
                        recorder.bytes, recorder.shape = t.numel() * t.element_size(), tuple(t.shape)
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)


def memory(d: int, k: int, r: int, n: int, methods: Sequence[str]) -> Dict[str, Any]:
    import torch

    factors, scalings, weights = case_inputs(d, k, r, n)
    out: Dict[str, Any] = {"mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_")}
    for label in methods:
        call = merge_call(label, factors, scalings, weights, torch.float32)
        if label not in CONTRAST:
            call()  # warm-up: lazy imports and first-use buffers are not the method's
        with PeakRSS() as peak:
            call()
        with LargestTensor() as largest:
            call()
        out[label] = {"peak_extra_mb": peak.extra_mb, "largest_tensor_mb": largest.bytes / 2**20,
                      "largest_tensor_shape": list(largest.shape)}
    return out


# ----------------------------------------------------------------------------- dense float64 references
EPS = 2.0**-52


def _svd(matrix):
    import torch

    return torch.linalg.svd(matrix, full_matrices=False)


def _exact_rank(s, rows: int, cols: int) -> int:
    return int((s > max(rows, cols) * EPS * float(s.max())).sum()) if s.numel() and float(s.max()) > 0 else 0


def tsv_reference(deltas, weights, ranks):
    """TSV-M: each task's top rᵢ singular triplets with λᵢ on its values; [U₁ … U_T], [V₁ … V_T] replaced by
    their polar factors (over the singular values > 1e-8·σ₁); U⊥ diag(λS) V⊥ᵀ."""
    import torch

    def polar(matrix):
        p, s, qh = _svd(matrix)
        keep = s > 1e-8 * s[0]
        return p[:, keep] @ qh[keep]

    us, ss, vhs = [], [], []
    for delta, w, r in zip(deltas, weights, ranks):
        if w == 0:
            continue
        u, s, vh = _svd(delta)
        us.append(u[:, :r])
        ss.append(w * s[:r])
        vhs.append(vh[:r])
    return polar(torch.cat(us, 1)) @ torch.diag(torch.cat(ss)) @ polar(torch.cat(vhs, 0))


def star_reference(deltas, weights, ranks, eta: float):
    """STAR: per task its rᵢ leading singular values, the count reaching eta % of their sum (+1), the kept
    values rescaled to the full sum; Σ λᵢ·STAR(ΔWᵢ)."""
    import torch

    total = 0
    for delta, w, r in zip(deltas, weights, ranks):
        u, s, vh = _svd(delta)
        u, s, vh = u[:, :r], s[:r], vh[:r]
        keep = int(torch.searchsorted(torch.cumsum(s, 0), s.sum() * eta / 100)) + 1
        total = total + w * (u[:, :keep] * (s[:keep] * (s.sum() / s[:keep].sum()))) @ vh[:keep]
    return total


def _iso_rank(matrix) -> int:
    import torch

    s = torch.linalg.svdvals(matrix)
    return int((s > 1e-10 * float(s[0])).sum()) if s.numel() and float(s[0]) > 0 else 0


def iso_c_reference(tasks):
    """Iso-C: the sum's SVD, every singular value replaced by their mean over its exact rank."""
    total = sum(tasks)
    u, s, vh = _svd(total)
    n = _iso_rank(total)
    return s[:n].mean() * u[:, :n] @ vh[:n]


def iso_cts_reference(tasks, common_fraction: float):
    """Iso-CTS (the authors' split, min(d, k) read as the exact rank of the sum): the common subspace, each
    task's top directions off it, both sides orthogonalised (polar), one isotropic value."""
    import torch

    combined = sum(tasks)
    dim, count = _iso_rank(combined), len(tasks)
    common = int(dim * common_fraction)
    common = dim - round((dim - common) / count) * count
    u, s, vh = _svd(combined)
    u_c, s_c, vh_c = u[:, :common], s[:common], vh[:common]
    per_task = (dim - common) // count
    lefts, values, rights = [], [], []
    for w in tasks:
        off = w - u_c @ u_c.T @ w
        u_t, s_t, vh_t = _svd(off)
        keep = min(per_task, _iso_rank(off))
        lefts.append(u_t[:, :keep])
        values.append(s_t[:keep])
        rights.append(vh_t[:keep])
    left, right = torch.cat(lefts + [u_c], 1), torch.cat(rights + [vh_c], 0)
    value = torch.cat(values + [s_c]).mean()
    w_l, _, z_l = _svd(left)
    w_r, _, z_r = _svd(right)
    return (w_l @ z_l) @ (value * (w_r @ z_r))


def _count(fraction: float, n: int) -> int:
    return min(n, math.ceil(Fraction(repr(float(fraction))) * n))


def _seeds(n: int, generator) -> List[int]:
    """One 63-bit seed per task, in task order (DARE's and MAGPRUNE's masks)."""
    import torch

    return [int(torch.randint(0, 2**63 - 1, (1,), generator=generator, dtype=torch.int64)) for _ in range(n)]


def _uniforms(seed: int, count: int):
    """The documented stream: PCG64(seed)'s raw 64-bit words as 32-bit halves, low half first."""
    import numpy as np

    return np.random.PCG64(seed).random_raw((count + 1) // 2).astype("<u8").view("<u4")[:count]


def _trim(matrix, density: float):
    """Keep the ⌈density·N⌉ largest magnitudes (ties: the lower flat index first)."""
    import numpy as np

    flat = matrix.reshape(-1)
    order = np.lexsort((np.arange(flat.size), -np.abs(flat)))
    keep = np.zeros(flat.size, bool)
    keep[order[: _count(density, flat.size)]] = True
    return np.where(keep, flat, 0.0).reshape(matrix.shape)


def _dare(matrix, density: float, seed: int):
    import numpy as np

    threshold = round(density * 2**32)
    keep = _uniforms(seed, matrix.size).reshape(matrix.shape) < threshold if threshold < 2**32 else True
    return np.where(keep, matrix / density, 0.0)


def _magprune(matrix, density: float, epsilon: float, seed: int):
    """MAGPRUNE: in each row the entries ranked by increasing |x| (equal: the higher column lower), kept with
    p = density − ε + 2ε·ρ/(k − 1) where u < round(p·2³²), survivors ÷ p."""
    import numpy as np

    rows, k = matrix.shape
    if density >= 1:
        return matrix.copy()
    columns = np.broadcast_to(np.arange(k), matrix.shape)
    order = np.lexsort((-columns, np.abs(matrix)), axis=-1)
    rho = np.empty_like(order)
    np.put_along_axis(rho, order, np.broadcast_to(np.arange(k), matrix.shape), axis=-1)
    p = (density - epsilon) + rho / (k - 1) * (2 * epsilon) if k > 1 else np.full(matrix.shape, density)
    keep = _uniforms(seed, matrix.size).reshape(matrix.shape) < np.round(p * 2**32)
    return np.where(keep, matrix / p, 0.0)


def _sign_merge(trimmed, weights):
    """TIES: sign elected on Σ λᵢτ̂ᵢ, the agreeing entries' sum ÷ their |λᵢ| mass × Σ|λᵢ|."""
    import numpy as np

    weighted = np.stack([w * t for w, t in zip(weights, trimmed)])
    elected = np.sign(weighted.sum(0))
    agree = (np.sign(weighted) == elected) & (weighted != 0) & (elected != 0)
    mass = (agree * np.abs(np.asarray(weights, float))[:, None, None]).sum(0)
    total = sum(abs(w) for w in weights)
    return np.where(mass > 0, total * (weighted * agree).sum(0) / np.where(mass > 0, mass, 1.0), 0.0)


def task_vector_rule(strategy: str, matrices, weights, options, generator):
    """``ties`` / ``dare_ties`` / ``della`` on a list of float64 matrices (one per task), entry by entry."""
    if strategy == "ties":
        trimmed = [_trim(m, options["density"]) for m in matrices]
    elif strategy == "dare_ties":
        trimmed = [_dare(m, options["density"], s) for m, s in zip(matrices, _seeds(len(matrices), generator))]
    elif strategy == "della":
        trimmed = [_magprune(m, options["density"], options["epsilon"], s)
                   for m, s in zip(matrices, _seeds(len(matrices), generator))]
    else:
        raise ValueError(strategy)
    return _sign_merge(trimmed, weights)


def core_reference(strategy, factors, scalings, weights, options, generator):
    """Core Space: bases from the SVDs of [B₁ … B_T] and [A₁; …; A_T], cores U_Bᵀ ΔWᵢ V_A, the rule, U_B M V_Aᵀ."""
    import numpy as np

    bs, as_ = [b for b, _ in factors], [a for _, a in factors]
    b_cat, a_cat = np.concatenate(bs, 1), np.concatenate(as_, 0)
    u, sb, _ = np.linalg.svd(b_cat, full_matrices=False)
    _, sa, vh = np.linalg.svd(a_cat, full_matrices=False)
    u_b = u[:, : int((sb > max(b_cat.shape) * EPS * sb.max()).sum())]
    v_a = vh[: int((sa > max(a_cat.shape) * EPS * sa.max()).sum())].T
    cores = [u_b.T @ (s * b @ a) @ v_a for (b, a), s in zip(factors, scalings)]
    return u_b @ task_vector_rule(strategy, cores, weights, options, generator) @ v_a.T


def knots_reference(strategy, factors, scalings, weights, options, generator):
    """KnOTS: the SVD of [ΔW₁ … ΔW_T], parts diag(S)·Vᵢᵀ, the rule, U·P."""
    import numpy as np

    updates = [s * b @ a for (b, a), s in zip(factors, scalings)]
    d, k = updates[0].shape
    u, s, vh = np.linalg.svd(np.concatenate(updates, 1), full_matrices=False)
    p = int((s > max(d, len(updates) * k) * EPS * s.max()).sum())
    parts = [s[:p, None] * vh[:p, i * k : (i + 1) * k] for i in range(len(updates))]
    return u[:, :p] @ task_vector_rule(strategy, parts, weights, options, generator)


def reference(label: str, factors64, scalings, weights):
    """(the dense float64 definition of ``label`` on the float64 factors, its rank or None)."""
    import torch

    strategy, _ = METHODS[label]
    options = parsed_options(label)
    ranks = [b.shape[1] for b, _ in factors64]
    deltas = [s * b @ a for (b, a), s in zip(factors64, scalings)]
    weighted = [w * x for w, x in zip(weights, deltas)]
    generator = torch.Generator().manual_seed(options["seed"]) if "seed" in options else None
    if strategy == "lora_delta_w_svd":
        return sum(weighted)
    if strategy == "tsv":
        return tsv_reference(deltas, weights, ranks)
    if strategy == "star":
        return star_reference(deltas, weights, ranks, options["eta"])
    if strategy == "iso_c":
        return iso_c_reference(weighted)
    if strategy == "iso_cts":
        return iso_cts_reference(weighted, options["common_fraction"])
    numpy_factors = [(b.numpy(), a.numpy()) for b, a in factors64]
    if options["space"] == "core":
        return torch.from_numpy(core_reference(strategy, numpy_factors, scalings, weights, options, generator))
    if options["space"] == "knots":
        return torch.from_numpy(knots_reference(strategy, numpy_factors, scalings, weights, options, generator))
    return torch.from_numpy(task_vector_rule(strategy, [x.numpy() for x in deltas], weights, options, generator))


def errors(d: int, k: int, r: int, n: int, methods: Sequence[str]) -> Dict[str, Any]:
    import torch

    factors, scalings, weights = case_inputs(d, k, r, n)
    factors64 = [(b.double(), a.double()) for b, a in factors]
    out: Dict[str, Any] = {}
    for label in methods:
        definition = reference(label, factors64, scalings, weights)
        norm = float(torch.linalg.matrix_norm(definition))
        row: Dict[str, Any] = {}
        for name, inputs, dtype in (("error_float64", factors64, torch.float64), ("error_float32", factors, torch.float32)):
            call = merge_call(label, inputs, scalings, weights, dtype)
            merge = call()
            b, a = merge.stored
            stored = call.scaling * (b.double() @ a.double())
            row[name] = float(torch.linalg.matrix_norm(stored - definition)) / norm
            row["rank"] = merge.rank
        if METHODS[label][1].get("space") == "full":
            s = torch.linalg.svdvals(definition)
            row["optimal_error"] = math.sqrt(float((s[row["rank"]:] ** 2).sum())) / norm
        out[label] = row
    return out


# ----------------------------------------------------------------------------- the section
def timings_of_cases(d: int, k: int, r: int, counts: Sequence[int], repeats: int, methods: Sequence[str]) -> Dict[str, Any]:
    """`timings` of every case, in this process (``in_subprocess`` runs it in its own)."""
    return {str(n): timings(d, k, r, n, repeats, methods) for n in counts}


def memory_and_errors(d: int, k: int, r: int, counts: Sequence[int], error_d: int, error_k: int,
                      methods: Sequence[str], log: Callable[[str], None] = log_to_stderr) -> Dict[str, Any]:
    """`memory` at d × k and `errors` at error_d × error_k of every case, in this process."""
    out: Dict[str, Any] = {}
    for n in counts:
        log(f"  {n} adapters: memory at {d} × {k}, error against the dense float64 definitions at {error_d} × {error_k}")
        out[str(n)] = {"memory": memory(d, k, r, n, methods), "errors": errors(error_d, error_k, r, n, methods)}
    return out


def _part(process: Dict[str, Any], n: int, key: str = "") -> Dict[str, Any]:
    """One case's part of a process's result, or the process's status when it has none."""
    if process.get("status") != "ok":
        return {k: v for k, v in process.items() if k in ("status", "timeout_s", "returncode", "stderr_tail")}
    part = process[str(n)][key] if key else process[str(n)]
    return dict(part, status="ok")


def run(quick: bool, log: Callable[[str], None] = log_to_stderr, timeout: float = 3600) -> Dict[str, Any]:
    """Two processes: the timings of every case, then (with the fixed mmap threshold) memory and errors."""
    setup = dict(QUICK if quick else FULL)
    methods = list(METHODS)
    shape = dict(d=setup["d"], k=setup["k"], r=setup["r"], counts=setup["counts"], methods=methods)
    log(f"LoRA-native methods against {BASELINE}, {setup['counts']} adapters of r {setup['r']} at "
        f"{setup['d']} × {setup['k']}: time")
    timed = in_subprocess("lowrank_methods", "timings_of_cases", dict(shape, repeats=setup["repeats"]), timeout)
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)  # read by glibc at the process's start
    try:
        measured = in_subprocess("lowrank_methods", "memory_and_errors",
                                 dict(shape, error_d=setup["error_d"], error_k=setup["error_k"]), timeout)
    finally:
        if saved is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved
    cases = {str(n): {"timings": _part(timed, n), "memory": _part(measured, n, "memory"),
                      "errors": _part(measured, n, "errors"),
                      "factors_mb": n * (setup["d"] + setup["k"]) * setup["r"] * 4 / 2**20,
                      "dense_mb": setup["d"] * setup["k"] * 4 / 2**20}
             for n in setup["counts"]}
    options = {label: {key: value for key, value in parsed_options(label).items()
                       if key in ("space", "density", "seed", "eta", "common_fraction", "epsilon")}
               for label in methods}
    return {"setup": dict(setup, methods=methods, baseline=BASELINE, target_ratio=TARGET_RATIO,
                          scalings=list(SCALINGS), weights=list(WEIGHTS), options=options,
                          mmap_threshold=MMAP_THRESHOLD),
            "cases": cases, "process_wall_s": {"timings": timed.get("process_wall_s"),
                                               "memory_and_errors": measured.get("process_wall_s")}}
