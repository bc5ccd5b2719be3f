"""Task-vector strategies on LoRA updates ΔW (issue 4): TIES, DARE (linear, TIES), magnitude pruning,
Breadcrumbs — end to end through real tiny models.

Every merged adapter is checked against an INDEPENDENT reference computed here:

* each input's effective update ΔWᵢ is *measured* through the model's own LoRA layer in float64
  (output with the adapter active minus output with none, on the identity input), so the
  reference knows nothing about our factor layout, GPT-2's Conv1D transposition or DeBERTa's
  fused QKV;
* the strategy is applied by slow, loop-based references written in this file (entry by entry,
  on each projection matrix: a fused QKV layer is three row blocks);
* the merged adapter's effective ΔW is measured the same way and compared with the reference's
  optimal (Eckart–Young) re-factorisation, and with the report.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from adapters import DoRAConfig, IA3Config, LoRAConfig, VeraConfig
from adapters.methods.lora import LoRAMergedLinear

from adapter_merging.rules import task_vectors as lora_method  # where the re-factorisation runs
from adapter_merging.ops.dense_svd import dense_low_rank

from conftest import randomize_adapter, tiny_adapter_model
from lora_native_helpers import effective_updates

TASK_VECTOR_STRATEGIES = ["ties", "dare_linear", "dare_ties", "magnitude_prune", "breadcrumbs"]

# (r, alpha) of the inputs: different ranks and scalings on purpose (ΔW is what is merged)
SPECS3 = [(2, 4), (3, 3), (4, 16)]
WEIGHTS3 = [0.7, -0.4, 0.5]

# options per case (id → (strategy, options)); densities chosen so counts are not round
CASES = {
    "ties-total": ("ties", {"density": 0.3}),
    "ties-frequency": ("ties", {"density": 0.45, "majority_sign_method": "frequency"}),
    "magnitude_prune": ("magnitude_prune", {"density": 0.27}),
    "breadcrumbs": ("breadcrumbs", {"density": 0.4, "gamma": 0.05}),
    "dare_linear": ("dare_linear", {"density": 0.6, "seed": 7}),
    "dare_ties": ("dare_ties", {"density": 0.5, "seed": 3, "majority_sign_method": "total"}),
}



# =========================================================================== model helpers
def _model(arch="bert", specs=SPECS3, seed=0, **lora_kwargs):
    """A tiny adapters model with one randomised LoRA per (r, alpha) in ``specs``: l0, l1, …"""
    model = tiny_adapter_model(arch, seed=seed)
    names = []
    for i, (r, alpha) in enumerate(specs):
        name = f"l{i}"
        model.add_adapter(name, config=LoRAConfig(r=r, alpha=alpha, **lora_kwargs))
        randomize_adapter(model, name, seed=100 * seed + i)
        names.append(name)
    return model, names


def _lora_modules(model, name):
    """Paths of the modules holding adapter ``name``'s LoRA, sorted as strings."""
    key = f".loras.{name}.lora_A"
    return sorted(n[: -len(key)] for n, _ in model.named_parameters() if n.endswith(key))


_effective_updates = effective_updates  # measured through the layer's forward pass (lora_native_helpers)


def _blocks(model, path, matrix):
    """The projection matrices of a layer's update: a fused QKV layer is three row blocks."""
    return list(matrix.chunk(3, dim=0)) if isinstance(model.get_submodule(path), LoRAMergedLinear) else [matrix]


def _snapshot(model):
    return (
        sorted(model.adapters_config.adapters),
        str(model.adapters_config.active_setup),
        {k: v.detach().clone() for k, v in model.state_dict().items()},
    )


def _assert_unchanged(model, snapshot):
    names, active, state = snapshot
    assert sorted(model.adapters_config.adapters) == names
    assert str(model.adapters_config.active_setup) == active
    now = model.state_dict()
    assert set(now) == set(state)
    for key, value in state.items():
        assert torch.equal(now[key], value), key


def _merged_tensors(model, name):
    return {k.replace(f".{name}.", "."): v.detach().clone() for k, v in model.named_parameters() if f".{name}." in k}


# =========================================================================== slow references
def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def _count(fraction: float, n: int) -> int:
    """ceil(fraction·n) on the exact decimal value of ``fraction`` (0.3·10 = 3, not 4)."""
    return min(n, math.ceil(Fraction(repr(fraction)) * n))


def _band_keep(values, density, gamma=0.0):
    """Keep the entries of magnitude rank G < rank ≤ min(n, G + K), G = ⌈γn⌉, K = ⌈density·n⌉;
    ranks by decreasing |x|, equal |x| broken by the lower flat index."""
    n = len(values)
    order = sorted(range(n), key=lambda p: (-abs(values[p]), p))
    start = _count(gamma, n)
    stop = min(n, start + _count(density, n))
    keep = [False] * n
    for p in order[start:stop]:
        keep[p] = True
    return keep


def _ref_sign_merge(tasks, weights, method):
    """TIES election on the WEIGHTED tasks and our disjoint mean
    τ_m[p] = (Σ|λᵢ|)·Σ_{A_p} λᵢτ̂ᵢ[p] / Σ_{A_p}|λᵢ|, A_p = {i: λᵢτ̂ᵢ[p] ≠ 0 agreeing with the elected sign}."""
    total_mass = sum(abs(w) for w in weights)
    out = []
    for p in range(len(tasks[0])):
        values = [w * t[p] for w, t in zip(weights, tasks)]
        if method == "total":
            elected = _sign(sum(values))
        else:
            elected = _sign(sum(_sign(v) for v in values))
        numerator = mass = 0.0
        for v, w in zip(values, weights):
            if v != 0 and _sign(v) == elected:
                numerator += v
                mass += abs(w)
        out.append(total_mass * numerator / mass if mass > 0 else 0.0)
    return out


def _ref_block(strategy, blocks, weights, options, masks=None):
    """The strategy on one projection matrix; ``blocks`` = the n tasks' ΔWᵢ (float64), ``masks`` the
    DARE keep masks (one per task)."""
    shape = blocks[0].shape
    tasks = [b.reshape(-1).tolist() for b in blocks]
    density = options.get("density", 0.2)
    if strategy in ("ties", "magnitude_prune", "breadcrumbs"):
        gamma = options.get("gamma", 0.01) if strategy == "breadcrumbs" else 0.0
        trimmed = []
        for t in tasks:
            keep = _band_keep(t, density, gamma)
            trimmed.append([v if k else 0.0 for v, k in zip(t, keep)])
    else:  # DARE: drop with the given masks, rescale the survivors by 1/density
        trimmed = [[v / density if k else 0.0 for v, k in zip(t, m.reshape(-1).tolist())] for t, m in zip(tasks, masks)]
    if strategy in ("ties", "dare_ties"):
        merged = _ref_sign_merge(trimmed, weights, options.get("majority_sign_method", "total"))
    else:
        merged = [sum(w * t[p] for w, t in zip(weights, trimmed)) for p in range(len(tasks[0]))]
    return torch.tensor(merged, dtype=torch.float64).reshape(shape)


def _dare_reference_mask(shape, density, generator):
    """The documented DARE mask, the slow obvious way: a 63-bit seed drawn from ``generator``, the raw
    64-bit outputs of ``numpy.random.PCG64(seed)`` split into 32-bit halves (low half first), keep
    entry p (row-major) iff half p < round(density·2³²)."""
    numel = math.prod(shape)
    seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator, dtype=torch.int64))
    raw = np.random.PCG64(seed).random_raw((numel + 1) // 2)
    halves = []
    for word in raw.tolist():
        halves += [word & 0xFFFFFFFF, word >> 32]
    threshold = round(density * 2**32)
    return torch.tensor([h < threshold for h in halves[:numel]]).reshape(shape)


def _reference(model, names, weights, strategy, options):
    """{module path: (per-input ΔWᵢ blocks, reference merged blocks)} for every LoRA module.

    DARE masks are drawn as documented: one ``torch.Generator().manual_seed(seed)`` per merge, module
    by module (sorted paths), projection by projection (only those the adapter updates), input by
    input (see `_dare_reference_mask`)."""
    generator = torch.Generator().manual_seed(options.get("seed", 0))
    out = {}
    for path in _lora_modules(model, names[0]):
        updates = _effective_updates(model, path, names)
        per_task = [_blocks(model, path, updates[n]) for n in names]
        merged = []
        for j in range(len(per_task[0])):
            blocks = [t[j] for t in per_task]
            masks = None
            if strategy.startswith("dare"):
                if all(float(b.abs().max()) == 0.0 for b in blocks):  # a projection without LoRA
                    merged.append(torch.zeros_like(blocks[0]))
                    continue
                masks = [_dare_reference_mask(tuple(b.shape), options["density"], generator) for b in blocks]
            merged.append(_ref_block(strategy, blocks, weights, options, masks))
        out[path] = (per_task, merged)
    return out


def _optimal_error_sq(blocks, rank):
    """Σ over projections of the squared Eckart–Young error of keeping ``rank`` singular values."""
    total = 0.0
    for b in blocks:
        s = torch.linalg.svdvals(b)
        total += float((s[rank:] ** 2).sum())
    return total


def _frob(blocks) -> float:
    return math.sqrt(sum(float((b**2).sum()) for b in blocks))


def _check_against_reference(model, name, reference, report, optimal_rank=None):
    """Measured error of the merged adapter vs the reference: equal to the report (1e-5) and, if
    ``optimal_rank`` is given, to the optimal truncation of the reference at that rank (1e-5).
    Returns {path: (merged blocks, reference blocks)}."""
    by_module = {m.module: m for m in report.modules}
    assert set(by_module) == set(reference)
    got = {}
    for path, (_, ref_blocks) in reference.items():
        merged = _blocks(model, path, _effective_updates(model, path, [name])[name])
        ref_norm = _frob(ref_blocks)
        assert ref_norm > 0
        measured = _frob([m - r for m, r in zip(merged, ref_blocks)]) / ref_norm
        assert by_module[path].relative_error == pytest.approx(measured, abs=1e-5), path
        if optimal_rank is not None:
            optimal = math.sqrt(_optimal_error_sq(ref_blocks, optimal_rank)) / ref_norm
            assert measured == pytest.approx(optimal, abs=1e-5), path
            kept = _frob(merged) ** 2 / ref_norm**2
            assert by_module[path].energy_kept == pytest.approx(kept, abs=1e-5), path
        got[path] = (merged, ref_blocks)
    return got


# =========================================================================== against the reference
@pytest.mark.parametrize("case", list(CASES))
def test_bert_strategy_matches_reference_at_default_rank(case):
    """3 adapters of different r/alpha, mixed-sign weights, LoRA on q, v, intermediate and output
    (32×32, 37×32, 32×37): default rank Σrᵢ = 9, error = the optimal truncation, and the report is
    the measured error."""
    strategy, options = CASES[case]
    model, names = _model(intermediate_lora=True, output_lora=True)
    reference = _reference(model, names, WEIGHTS3, strategy, options)
    report = model.average_adapter(
        "merged", names, weights=WEIGHTS3, combine_strategy=strategy, normalize_weights=False, **options
    )
    rank = sum(r for r, _ in SPECS3)
    assert report.rank == rank and model.adapters_config.get("merged")["r"] == rank
    assert report.target == f"the dense {strategy} merge of the ΔWᵢ"
    got = _check_against_reference(model, "merged", reference, report, optimal_rank=rank)
    assert len(got) == 8
    assert 0.01 < report.max_error < 0.9  # a rank-9 truncation of a sparse merge: a real, reported cost


@pytest.mark.parametrize("case", list(CASES))
def test_bert_strategy_exact_rank_is_the_reference(case):
    """svd_rank ≥ min(d, k): no truncation, the merged update IS the reference merge (≤ 1e-5)."""
    strategy, options = CASES[case]
    model, names = _model(intermediate_lora=True, output_lora=True, seed=1)
    reference = _reference(model, names, WEIGHTS3, strategy, options)
    report = model.average_adapter(
        "merged", names, weights=WEIGHTS3, combine_strategy=strategy, normalize_weights=False, svd_rank=32, **options
    )
    assert report.rank == 32
    got = _check_against_reference(model, "merged", reference, report, optimal_rank=32)
    for path, (merged, ref) in got.items():
        error = _frob([m - r for m, r in zip(merged, ref)]) / _frob(ref)
        assert error <= 1e-5, path
        for m, r in zip(merged, ref):
            assert float((m - r).abs().max()) <= 1e-5 * float(r.abs().max()) + 1e-9, path
    assert report.max_error <= 1e-5
    assert min(m.energy_kept for m in report.modules) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "deberta"])
@pytest.mark.parametrize("case", ["ties-total", "ties-frequency", "magnitude_prune", "breadcrumbs", "dare_ties"])
def test_fused_qkv_strategy_matches_reference(arch, case):
    """GPT-2 (Conv1D, fan_in_fan_out, fused c_attn) and DeBERTa v1 (fused in_proj): the strategy
    acts on each projection (q and v rows) separately; default rank and exact rank."""
    strategy, options = CASES[case]
    model, names = _model(arch, seed=2)
    reference = _reference(model, names, WEIGHTS3, strategy, options)
    assert all(isinstance(model.get_submodule(p), LoRAMergedLinear) for p in reference)
    report = model.average_adapter(
        "merged", names, weights=WEIGHTS3, combine_strategy=strategy, normalize_weights=False, **options
    )
    _check_against_reference(model, "merged", reference, report, optimal_rank=9)
    report = model.average_adapter(
        "exact", names, weights=WEIGHTS3, combine_strategy=strategy, normalize_weights=False, svd_rank=64, **options
    )
    assert report.rank == 32 and any("exceeds" in n for n in report.notes)  # capped at min(d, k) of a projection
    got = _check_against_reference(model, "exact", reference, report, optimal_rank=32)
    for path, (merged, ref) in got.items():
        assert _frob([m - r for m, r in zip(merged, ref)]) / _frob(ref) <= 1e-5, path
        assert float(merged[1].abs().max()) == 0.0  # k is not adapted: its rows stay untouched


def test_normalized_weights_ties_is_the_mean_of_agreeing_entries():
    """Default weights 1/N with normalisation: Σ|λᵢ| = 1, so TIES is the plain disjoint mean of the
    agreeing trimmed entries (Yadav et al. 2023)."""
    model, names = _model(seed=3)
    report = model.average_adapter("merged", names, combine_strategy="ties", density=0.5, svd_rank=32)
    path = _lora_modules(model, names[0])[0]
    updates = _effective_updates(model, path, names + ["merged"])
    tasks = [updates[n].reshape(-1).tolist() for n in names]
    trimmed = [[v if k else 0.0 for v, k in zip(t, _band_keep(t, 0.5))] for t in tasks]
    merged = updates["merged"].reshape(-1).tolist()
    checked = 0
    for p in range(len(merged)):
        elected = _sign(sum(t[p] for t in trimmed))
        agreeing = [t[p] for t in trimmed if t[p] != 0 and _sign(t[p]) == elected]
        expected = sum(agreeing) / len(agreeing) if agreeing else 0.0
        assert merged[p] == pytest.approx(expected, abs=1e-6)
        checked += len(agreeing) == 2
    assert checked > 0 and report.max_error <= 1e-5


# =========================================================================== density = 1
def _task_arithmetic_blocks(model, names, weights):
    out = {}
    for path in _lora_modules(model, names[0]):
        updates = _effective_updates(model, path, names)
        out[path] = sum(w * updates[n] for n, w in zip(names, weights))
    return out


@pytest.mark.parametrize(
    "strategy, options",
    [
        ("magnitude_prune", {"density": 1.0}),
        ("breadcrumbs", {"density": 1.0, "gamma": 0.0}),
        ("dare_linear", {"density": 1.0, "seed": 5}),
    ],
)
def test_density_one_is_task_arithmetic(strategy, options):
    """Nothing trimmed or dropped: the merge is Σ λᵢ ΔWᵢ at the default rank Σrᵢ (exact), i.e. the
    same update as lora_delta_w_svd at the exact rank, to 1e-5."""
    model, names = _model(intermediate_lora=True, seed=4)
    report = model.average_adapter(
        "tv", names, weights=WEIGHTS3, combine_strategy=strategy, normalize_weights=False, **options
    )
    model.average_adapter("svd", names, weights=WEIGHTS3, combine_strategy="lora_delta_w_svd", normalize_weights=False)
    target = _task_arithmetic_blocks(model, names, WEIGHTS3)
    assert report.rank == 9 and report.max_error <= 1e-5
    for path, exact in target.items():
        updates = _effective_updates(model, path, ["tv", "svd"])
        scale = float(exact.norm())
        assert float((updates["tv"] - exact).norm()) <= 1e-5 * scale, path
        assert float((updates["tv"] - updates["svd"]).norm()) <= 1e-5 * scale, path


@pytest.mark.parametrize("strategy", ["ties", "dare_ties"])
def test_density_one_ties_is_the_sign_elected_disjoint_merge(strategy):
    """TIES (and DARE-TIES) at density 1 trim nothing: the sign-elected disjoint merge of the full
    λᵢΔWᵢ — which differs from task arithmetic exactly where the weighted signs conflict."""
    model, names = _model(seed=5)
    options = {"density": 1.0, "seed": 0} if strategy == "dare_ties" else {"density": 1.0}
    report = model.average_adapter(
        "merged", names, weights=WEIGHTS3, combine_strategy=strategy, normalize_weights=False, svd_rank=32, **options
    )
    assert report.max_error <= 1e-5
    for path in _lora_modules(model, names[0]):
        updates = _effective_updates(model, path, names + ["merged"])
        tasks = [updates[n].reshape(-1).tolist() for n in names]
        expected = torch.tensor(_ref_sign_merge(tasks, WEIGHTS3, "total"), dtype=torch.float64).view(32, 32)
        merged = updates["merged"]
        assert float((merged - expected).abs().max()) <= 1e-5 * float(expected.abs().max()), path
        arithmetic = sum(w * updates[n] for n, w in zip(names, WEIGHTS3))
        values = torch.stack([w * updates[n] for n, w in zip(names, WEIGHTS3)])
        no_conflict = (values > 0).all(0) | (values < 0).all(0)
        assert no_conflict.any() and (~no_conflict).any()
        assert torch.allclose(merged[no_conflict], arithmetic[no_conflict], rtol=1e-4, atol=1e-7)
        assert not torch.allclose(merged[~no_conflict], arithmetic[~no_conflict], rtol=1e-2, atol=1e-4)


# =========================================================================== negative weights
def test_negative_weight_flips_the_task_before_sign_election():
    """Unlearning: weight −1 negates ΔW₂ BEFORE the vote. Where ΔW₁[p] > 0 and ΔW₂[p] > |ΔW₁[p]|, the
    weighted values are +ΔW₁ and −ΔW₂, the elected sign is −, only task 2 agrees, and
    τ_m = (|1| + |−1|)·(−ΔW₂[p])/|−1| = −2·ΔW₂[p]. (PEFT elects on the unweighted values: it would
    keep + there.) Where ΔW₁[p] > 0 > ΔW₂[p] both weighted values are positive: ΔW₁ − ΔW₂."""
    model, names = _model(specs=[(4, 8), (2, 2)], seed=6)
    model.average_adapter("unlearn", {names[0]: 1.0, names[1]: -1.0}, combine_strategy="ties",
                          normalize_weights=False, density=1.0, svd_rank=32)
    model.average_adapter("add", {names[0]: 1.0, names[1]: 1.0}, combine_strategy="ties",
                          normalize_weights=False, density=1.0, svd_rank=32)
    path = _lora_modules(model, names[0])[0]
    u = _effective_updates(model, path, names + ["unlearn", "add"])
    t1, t2 = u[names[0]], u[names[1]]
    dominated = (t1 > 0) & (t2 > t1)
    opposite = (t1 > 0) & (t2 < 0)
    assert dominated.any() and opposite.any()
    p = tuple(torch.nonzero(dominated)[0].tolist())
    assert float(u["unlearn"][p]) == pytest.approx(-2.0 * float(t2[p]), rel=1e-5, abs=1e-8)
    assert float(u["add"][p]) == pytest.approx(float(t1[p] + t2[p]), rel=1e-5, abs=1e-8)
    q = tuple(torch.nonzero(opposite)[0].tolist())
    assert float(u["unlearn"][q]) == pytest.approx(float(t1[q] - t2[q]), rel=1e-5, abs=1e-8)
    assert torch.allclose(u["unlearn"][dominated], -2.0 * t2[dominated], rtol=1e-4, atol=1e-7)


# =========================================================================== DARE randomness
def test_dare_is_seeded_and_leaves_the_global_rng_alone():
    model, names = _model(seed=7)
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    results = {}
    for strategy in ("dare_linear", "dare_ties"):
        for tag, seed in (("a", 11), ("b", 11), ("c", 12)):
            name = f"{strategy}_{tag}"
            model.average_adapter(name, names, weights=WEIGHTS3, combine_strategy=strategy,
                                  normalize_weights=False, density=0.5, seed=seed)
            results[name] = _merged_tensors(model, name)
        a, b, c = (results[f"{strategy}_{t}"] for t in "abc")
        assert a.keys() == b.keys() == c.keys() and a
        assert all(torch.equal(a[k], b[k]) for k in a)  # same seed: bit-identical
        assert not all(torch.equal(a[k], c[k]) for k in a)  # other seed: other masks
    assert torch.equal(torch.get_rng_state(), state)
    # the default seed is 0, so no seed is reproducible too
    common = dict(weights=WEIGHTS3, combine_strategy="dare_linear", normalize_weights=False)
    model.average_adapter("d0", names, **common)
    model.average_adapter("d1", names, seed=0, **common)
    d0, d1 = _merged_tensors(model, "d0"), _merged_tensors(model, "d1")
    assert all(torch.equal(d0[k], d1[k]) for k in d0)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("strategy", ["ties", "dare_ties"])
def test_randomized_refactorisation_is_deterministic_honest_and_rng_free(strategy, monkeypatch):
    """Large layers use the randomized range finder; forced here on the tiny layers. It must not draw
    from the global RNG, must give bit-identical results on a re-run, and its (sub-optimal by at most
    a little) error must be reported as measured."""
    calls = []

    def randomized_everywhere(*args, **kwargs):
        calls.append(kwargs.get("generator"))
        return dense_low_rank(*args, **{**kwargs, "randomized_threshold": 0})

    monkeypatch.setattr(lora_method, "dense_low_rank", randomized_everywhere)
    model, names = _model(seed=8)
    options = {"density": 0.4, "seed": 2} if strategy == "dare_ties" else {"density": 0.4}
    reference = _reference(model, names, WEIGHTS3, strategy, options)
    torch.manual_seed(99)
    state = torch.get_rng_state()
    report = model.average_adapter("r1", names, weights=WEIGHTS3, combine_strategy=strategy,
                                   normalize_weights=False, svd_rank=6, **options)
    model.average_adapter("r2", names, weights=WEIGHTS3, combine_strategy=strategy,
                          normalize_weights=False, svd_rank=6, **options)
    assert torch.equal(torch.get_rng_state(), state)
    assert calls and all(isinstance(g, torch.Generator) for g in calls)
    r1, r2 = _merged_tensors(model, "r1"), _merged_tensors(model, "r2")
    assert all(torch.equal(r1[k], r2[k]) for k in r1)
    got = _check_against_reference(model, "r1", reference, report)
    for path, (merged, ref) in got.items():  # near the optimum (2 power iterations, oversampling 10)
        optimal = math.sqrt(_optimal_error_sq(ref, 6)) / _frob(ref)
        measured = _frob([m - r for m, r in zip(merged, ref)]) / _frob(ref)
        assert optimal - 1e-6 <= measured <= optimal * 1.05 + 1e-6, path


# =========================================================================== svd_tol
@pytest.mark.parametrize("tol", [0.05, 0.3])
def test_svd_tol_gives_each_layer_its_own_rank(tol):
    """svd_tol: each module keeps the smallest rank whose error is ≤ tol (zero-padded to the
    adapter's common r = the largest such rank); the reported error is the measured one."""
    model, names = _model(intermediate_lora=True, output_lora=True, seed=9)
    options = {"density": 0.3}
    reference = _reference(model, names, WEIGHTS3, "ties", options)
    report = model.average_adapter("merged", names, weights=WEIGHTS3, combine_strategy="ties",
                                   normalize_weights=False, svd_tol=tol, **options)
    got = _check_against_reference(model, "merged", reference, report)
    own_ranks = []
    for path, (merged, ref) in got.items():
        (block,) = ref
        s = torch.linalg.svdvals(block)
        tails = [math.sqrt(float((s[q:] ** 2).sum())) / float(s.norm()) for q in range(len(s) + 1)]
        own = next(q for q, t in enumerate(tails) if t <= tol)
        own_ranks.append(own)
        measured = _frob([m - r for m, r in zip(merged, ref)]) / _frob(ref)
        assert measured <= tol + 1e-6, path
        assert measured == pytest.approx(tails[own], abs=1e-5), path  # truncated at its own rank
        assert int(torch.linalg.matrix_rank(merged[0], atol=1e-6 * float(s[0]))) == own, path
    assert report.rank == max(own_ranks) == model.adapters_config.get("merged")["r"]
    assert len(set(own_ranks)) > 1  # the layers really need different ranks
    assert report.max_error <= tol


# =========================================================================== errors
BAD_OPTIONS = [
    ("ties", {"density": 0}, ValueError, "density"),
    ("ties", {"density": 1.5}, ValueError, "density"),
    # NaN: rejected with a message naming density (strategies.py currently raises TypeError for it)
    ("dare_linear", {"density": float("nan")}, (ValueError, TypeError), "density"),
    ("magnitude_prune", {"density": -0.1}, ValueError, "density"),
    ("ties", {"majority_sign_method": "median"}, ValueError, "majority_sign_method"),
    ("dare_ties", {"majority_sign_method": 1}, ValueError, "majority_sign_method"),
    ("breadcrumbs", {"gamma": 1.0}, ValueError, "gamma"),
    ("breadcrumbs", {"gamma": 1.5}, ValueError, "gamma"),
    ("breadcrumbs", {"gamma": -0.1}, ValueError, "gamma"),
    # options of another strategy, and misspelt ones: TypeError (Python's own for an unexpected keyword)
    ("ties", {"gamma": 0.1}, TypeError, "Unknown option"),
    ("magnitude_prune", {"densty": 0.3}, TypeError, "unexpected keyword argument 'densty'"),
    ("breadcrumbs", {"seed": 1}, TypeError, "Unknown option"),
]


@pytest.mark.parametrize("strategy, options, error, match", BAD_OPTIONS)
def test_bad_options_are_refused_and_the_model_is_unchanged(strategy, options, error, match):
    model, names = _model(specs=[(2, 4), (3, 3)], seed=10)
    before = _snapshot(model)
    with pytest.raises(error, match=match):
        model.average_adapter("merged", names, combine_strategy=strategy, **options)
    _assert_unchanged(model, before)


@pytest.mark.parametrize(
    "config, family",
    [
        ("seq_bn", "bottleneck"),
        (IA3Config(), "IA³"),
        (VeraConfig(r=4), "VeRA"),
        (DoRAConfig(r=4), "DoRA"),
    ],
)
@pytest.mark.parametrize("strategy", TASK_VECTOR_STRATEGIES)
def test_non_lora_adapters_are_refused_with_the_supported_strategies(config, family, strategy):
    model = tiny_adapter_model("bert", seed=11)
    for name in ("a", "b"):
        model.add_adapter(name, config=config)
        randomize_adapter(model, name, seed=ord(name))
    before = _snapshot(model)
    with pytest.raises(ValueError) as info:
        model.average_adapter("merged", ["a", "b"], combine_strategy=strategy)
    message = str(info.value)
    assert f"combine_strategy='{strategy}'" in message and family in message
    assert "Strategies that support these adapters" in message and "'linear'" in message
    assert strategy not in message.split("Strategies that support")[1]
    _assert_unchanged(model, before)
