"""Task-vector strategies on one layer: adapter_merging, a plain torch reference, and PEFT's ``*_svd``.

Setup: one linear layer of shape d × k (default 4096 × 11008, Llama-7B's ``down_proj``) holding n = 3
PEFT LoRA adapters, r 16, alpha 16 (scaling 1, so PEFT's and our weightings agree), random non-zero
seeded factors; weights [1, −1, 1]; density 0.2 (breadcrumbs: gamma 0.01), seed 0; re-factorised to
rank 48 (= Σ rᵢ).

* **ours**: ``adapter_merging.peft.add_weighted_adapter(model, ..., combination_type=<strategy>,
  svd_rank=48)`` on the PEFT model (reading the adapters, merging, writing the new one);
* **reference**: the same computation written plainly in torch, float32 — the dense ΔWᵢ = sᵢBᵢAᵢ,
  ``kthvalue`` of each |ΔWᵢ| for the trim, the masks, sign election and disjoint mean (or the sum),
  ``torch.svd_lowrank(q=58, niter=2)``; DARE's masks from ``torch.rand``;
* **peft**: PEFT's own ``model.add_weighted_adapter(..., combination_type="<strategy>_svd",
  svd_rank=48)`` (no breadcrumbs in PEFT).

Ours and the reference run in one process, interleaved (medians of ``repeats``); PEFT in another, once
per strategy. Peak memory: the resident memory above the one at the call's start. Errors (not timed):
each side's stored update s·B·A against its definition formed densely in float64 —
``adapter_merging.ops.task_vectors`` for ours and the reference (with the reference's own DARE masks),
``peft.utils.merge_utils`` for PEFT (with the masks its call drew, recorded) — next to the optimal
(Eckart–Young) error of that definition at rank 48, from the eigenvalues of its Gram matrix.
The definitions differ: PEFT elects the sign on the unweighted tasks and divides the agreeing sum by
their count (ours: on λᵢτᵢ, by the agreeing |λᵢ| mass, rescaled by Σ|λᵢ|), and keeps ⌊density·N⌋
entries (ours ⌈density·N⌉); ``definition_gap`` is ‖D_peft − D_ours‖ / ‖D_ours‖.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Sequence

from benchmarks.common import PeakRSS, in_subprocess, interleaved, log_to_stderr, median, random_factors

STRATEGIES = ("ties", "dare_ties", "magnitude_prune", "breadcrumbs")
#: PEFT's combination type for each strategy (None: PEFT has none)
PEFT_TYPES = {"ties": "ties_svd", "dare_ties": "dare_ties_svd", "magnitude_prune": "magnitude_prune_svd",
              "breadcrumbs": None, "dare_linear": "dare_linear_svd"}
DENSITY, GAMMA, SEED, WEIGHTS = 0.2, 0.01, 0, (1.0, -1.0, 1.0)
FULL = {"d": 4096, "k": 11008, "r": 16, "n": 3, "repeats": 3}
QUICK = {"d": 256, "k": 688, "r": 8, "n": 3, "repeats": 2}


def weights_for(n: int) -> List[float]:
    return [WEIGHTS[i % len(WEIGHTS)] for i in range(n)]


def options(strategy: str) -> Dict[str, Any]:
    if strategy == "breadcrumbs":
        return {"density": DENSITY, "gamma": GAMMA}
    if strategy.startswith("dare"):
        return {"density": DENSITY, "seed": SEED}
    return {"density": DENSITY}


# ----------------------------------------------------------------------------- the layer and its adapters
def peft_layer(d: int, k: int, r: int, n: int):
    """A PEFT model of one d × k linear layer with n LoRA adapters t0 … t{n−1} (seeded factors)."""
    import torch
    from peft import LoraConfig, get_peft_model

    class Layer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(k, d, bias=False)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    config = LoraConfig(r=r, lora_alpha=r, target_modules=["proj"], lora_dropout=0.0)
    model = get_peft_model(Layer(), config, adapter_name="t0")
    for i in range(1, n):
        model.add_adapter(f"t{i}", config)
    module = model.base_model.model.proj
    with torch.no_grad():
        for i in range(n):
            b, a = random_factors(i, "proj", r, d, k)
            module.lora_A[f"t{i}"].weight.copy_(a)
            module.lora_B[f"t{i}"].weight.copy_(b)
    return model


def factors(model, name: str):
    """(s, B, A) of adapter ``name`` on the layer."""
    module = model.base_model.model.proj
    return module.scaling[name], module.lora_B[name].weight.detach(), module.lora_A[name].weight.detach()


def dense_tasks(model, n: int, dtype):
    import torch

    return torch.stack([s * (b.to(dtype) @ a.to(dtype)) for s, b, a in (factors(model, f"t{i}") for i in range(n))])


# ----------------------------------------------------------------------------- the plain torch reference
def reference_merge(tasks_factors, weights: Sequence[float], strategy: str, rank: int, seed: int = SEED):
    """The strategy written plainly (float32): dense ΔWᵢ, kthvalue trims or torch.rand masks, sign
    election and disjoint mean, torch.svd_lowrank. Returns (B, A, masks) with ΔW ≈ B·A; ``masks`` are
    DARE's (else None)."""
    import torch

    tasks = [s * (b @ a) for s, b, a in tasks_factors]
    numel = tasks[0].numel()
    masks = None
    if strategy.startswith("dare"):
        generator = torch.Generator().manual_seed(seed)
        masks = [torch.rand(t.shape, generator=generator) < DENSITY for t in tasks]
        trimmed = [torch.where(m, t / DENSITY, torch.zeros_like(t)) for m, t in zip(masks, tasks)]
    else:
        trimmed = []
        for t in tasks:
            size = t.abs().flatten()
            start = math.ceil(GAMMA * numel) if strategy == "breadcrumbs" else 0
            keep = min(numel, start + math.ceil(DENSITY * numel))
            mask = size >= torch.kthvalue(size, numel - keep + 1).values
            if start:
                mask &= size < torch.kthvalue(size, numel - start + 1).values
            trimmed.append(torch.where(mask.view(t.shape), t, torch.zeros_like(t)))
    lam = torch.tensor(list(weights)).view(-1, 1, 1)
    weighted = torch.stack(trimmed) * lam
    if strategy in ("ties", "dare_ties"):
        sign = torch.sign(weighted.sum(0))
        agree = (torch.sign(weighted) == sign) & (weighted != 0)
        mass = (agree * lam.abs()).sum(0)
        merged = (weighted * agree).sum(0) * lam.abs().sum() / mass.clamp(min=float(lam.abs().min()))
    else:
        merged = weighted.sum(0)
    u, s, v = torch.svd_lowrank(merged, q=rank + 10, niter=2)
    return u[:, :rank] * s[:rank], v[:, :rank].T, masks


# ----------------------------------------------------------------------------- errors (not timed)
def optimal_error(definition, rank: int) -> float:
    """√(Σ_{j>rank} σⱼ²) / ‖D‖: the eigenvalues of the smaller Gram matrix, float64."""
    import torch

    d = definition.double()
    gram = d @ d.T if d.shape[0] <= d.shape[1] else d.T @ d
    eigenvalues = torch.linalg.eigvalsh(gram).flip(0).clamp(min=0)
    total = float(eigenvalues.sum())
    return math.sqrt(max(0.0, total - float(eigenvalues[:rank].sum())) / total)


def relative_error(stored, definition) -> float:
    import torch

    return float(torch.linalg.matrix_norm(stored - definition) / torch.linalg.matrix_norm(definition))


def our_definition(tasks64, weights, strategy: str, masks=None):
    """adapter_merging's definition on the float64 tasks; with ``masks``, DARE with those masks."""
    import torch
    from adapter_merging.ops import task_vectors as tv

    if masks is not None:
        trimmed = torch.stack([torch.where(m, t / DENSITY, torch.zeros_like(t)) for m, t in zip(masks, tasks64)])
        if strategy == "dare_ties":
            return tv.sign_consensus(trimmed, weights)
        return tv.weighted_sum(trimmed, weights)
    generator = torch.Generator().manual_seed(SEED)
    if strategy == "ties":
        return tv.ties(tasks64, weights, DENSITY)
    if strategy == "dare_ties":
        return tv.dare_ties(tasks64, weights, DENSITY, generator)
    if strategy == "dare_linear":
        return tv.dare_linear(tasks64, weights, DENSITY, generator)
    if strategy == "magnitude_prune":
        return tv.magnitude_prune(tasks64, weights, DENSITY)
    if strategy == "breadcrumbs":
        return tv.breadcrumbs(tasks64, weights, DENSITY, GAMMA)
    raise ValueError(strategy)


def peft_definition(tasks64, weights, peft_type: str, masks=None):
    """PEFT's definition (``peft.utils.merge_utils``) on the float64 tasks, replaying DARE's ``masks``."""
    import torch
    from peft.utils import merge_utils

    function = {"ties_svd": merge_utils.ties, "dare_ties_svd": merge_utils.dare_ties,
                "magnitude_prune_svd": merge_utils.magnitude_prune, "dare_linear_svd": merge_utils.dare_linear}[peft_type]
    lam = torch.tensor(list(weights), dtype=torch.float64)
    args = (list(tasks64), lam, DENSITY) + (("total",) if "ties" in peft_type else ())
    if masks is None:
        return function(*args)
    replay = iter(masks)
    original = torch.bernoulli
    torch.bernoulli = lambda p, *a, **k: next(replay).to(p.dtype)
    try:
        return function(*args)
    finally:
        torch.bernoulli = original


# ----------------------------------------------------------------------------- the sides (own processes)
def ours_and_reference(d: int, k: int, r: int, n: int, repeats: int, strategies: Sequence[str]) -> Dict[str, Any]:
    """Ours and the reference, interleaved per strategy; then their errors."""
    import torch
    from adapter_merging.peft import add_weighted_adapter

    model = peft_layer(d, k, r, n)
    weights, rank = weights_for(n), n * r
    inputs = [factors(model, f"t{i}") for i in range(n)]
    tasks64 = dense_tasks(model, n, torch.float64)
    out: Dict[str, Any] = {}
    for strategy in strategies:
        memory: Dict[str, float] = {}
        state: Dict[str, Any] = {}

        def ours():
            if "m" in model.peft_config:
                model.delete_adapter("m")
            with PeakRSS() as peak:
                state["report"] = add_weighted_adapter(model, [f"t{i}" for i in range(n)], weights, "m", strategy,
                                                       svd_rank=rank, progress=False, **options(strategy))
            memory["ours"] = max(memory.get("ours", 0.0), peak.extra_mb)

        def reference():
            with PeakRSS() as peak:
                state["reference"] = reference_merge(inputs, weights, strategy, rank)
            memory["reference"] = max(memory.get("reference", 0.0), peak.extra_mb)

        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the >10 % truncation warning: expected at rank Σ rᵢ
            times = interleaved({"ours": ours, "reference": reference}, repeats)
        s, b, a = factors(model, "m")
        stored = s * (b.double() @ a.double())
        definition = our_definition(tasks64, weights, strategy)
        ref_b, ref_a, masks = state["reference"]
        ref_definition = definition if masks is None else our_definition(tasks64, weights, strategy, masks)
        out[strategy] = {
            "ours": {"seconds": median(times["ours"]), "runs_s": times["ours"], "peak_extra_mb": memory["ours"],
                     "error": relative_error(stored, definition), "optimal_error": optimal_error(definition, rank),
                     "report_error": state["report"].max_error},
            "reference": {"seconds": median(times["reference"]), "runs_s": times["reference"],
                          "peak_extra_mb": memory["reference"],
                          "error": relative_error(ref_b.double() @ ref_a.double(), ref_definition),
                          "optimal_error": optimal_error(ref_definition, rank) if masks is not None else None},
        }
        del definition, ref_definition, stored
    return out


def peft_side(d: int, k: int, r: int, n: int, strategies: Sequence[str]) -> Dict[str, Any]:
    """PEFT's own ``*_svd`` merges, once each, with the masks its DARE drew recorded for its definition."""
    import torch

    model = peft_layer(d, k, r, n)
    weights, rank = weights_for(n), n * r
    tasks64 = dense_tasks(model, n, torch.float64)
    out: Dict[str, Any] = {}
    for strategy in strategies:
        peft_type = PEFT_TYPES.get(strategy)
        if peft_type is None:
            continue
        drawn: List[Any] = []
        original = torch.bernoulli

        def recording(p, *args, **kwargs):
            mask = original(p, *args, **kwargs)
            drawn.append(mask.detach().clone())
            return mask

        name = f"m_{strategy}"
        torch.bernoulli = recording
        try:
            with PeakRSS() as peak:
                import time

                start = time.perf_counter()
                model.add_weighted_adapter([f"t{i}" for i in range(n)], weights, name, combination_type=peft_type,
                                           svd_rank=rank, density=DENSITY)
                seconds = time.perf_counter() - start
        finally:
            torch.bernoulli = original
        s, b, a = factors(model, name)
        stored = s * (b.double() @ a.double())
        definition = peft_definition(tasks64, weights, peft_type, drawn or None)
        ours = our_definition(tasks64, weights, strategy)
        out[strategy] = {"seconds": seconds, "peak_extra_mb": peak.extra_mb, "combination_type": peft_type,
                         "error": relative_error(stored, definition), "optimal_error": optimal_error(definition, rank),
                         "definition_gap": relative_error(definition, ours) if not strategy.startswith("dare") else None}
        model.delete_adapter(name)
    return out


def run(quick: bool, timeout: float = 1800, log: Callable[[str], None] = log_to_stderr) -> Dict[str, Any]:
    """Both processes; the result for the report."""
    setup = dict(QUICK if quick else FULL)
    shape = {key: setup[key] for key in ("d", "k", "r", "n")}
    log(f"task vectors on one {setup['d']} × {setup['k']} layer, {setup['n']} adapters of r {setup['r']}: ours and the reference")
    both = in_subprocess("task_vectors_layer", "ours_and_reference",
                         dict(shape, repeats=setup["repeats"], strategies=list(STRATEGIES)), timeout)
    log("  PEFT's *_svd")
    peft = in_subprocess("task_vectors_layer", "peft_side", dict(shape, strategies=list(STRATEGIES)), timeout)
    return {"setup": dict(setup, weights=weights_for(setup["n"]), density=DENSITY, gamma=GAMMA, seed=SEED,
                          rank=setup["n"] * setup["r"]),
            "ours_and_reference": both, "peft": peft}
