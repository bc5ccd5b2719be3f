"""STAR (``star``, Lee et al., NAACL 2025) against a plain dense float64 implementation of its definition,
written here from the paper and the authors' code (IBM/STAR, ``merger/STAR.py``): per task the SVD of
the dense ΔWᵢ (its rᵢ leading values, as the authors' known-rank path), the count searched in the
cumulative sum of the singular values for eta/100 of their sum (left) plus one, the kept values
rescaled to the full sum; the merge Σ λᵢ·STAR(ΔWᵢ)."""
from __future__ import annotations

import math

import pytest
import torch

from adapter_merging import merge_saved_adapters
from adapter_merging.rules.star import kept_count
from adapter_merging.strategies import get_strategy
from adapter_merging.strategy_names import STRATEGY_NAMES

from lora_native_helpers import (
    best_rank,
    dense_updates,
    effective_updates,
    lora_model,
    lora_paths,
    random_factors,
    rel,
    run_rule,
)

TOL = 1e-6  # relative, at the exact rank, float64 storage


# ============================================================================ the dense reference
def star_reference_one(delta: torch.Tensor, eta: float, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    total = s.sum()
    keep = int(torch.searchsorted(torch.cumsum(s, 0), total * eta / 100)) + 1
    kept = s[:keep] * (total / s[:keep].sum())
    return u[:, :keep] @ torch.diag(kept) @ vh[:keep]


def star_reference(deltas, weights, ranks, eta=40.0) -> torch.Tensor:
    return sum(w * star_reference_one(x, eta, r) for x, w, r in zip(deltas, weights, ranks))


CASES = {
    "3-mixed": (40, 29, [2, 5, 3], [2.0, 0.5, 1.25], [0.7, -0.4, 0.5]),
    "2-equal": (23, 31, [6, 6], [1.0, 3.0], [1.0, 1.0]),
    "8-tasks": (64, 48, [3, 1, 2, 4, 2, 3, 1, 2], [1.0, 2.0, 0.5, 1.0, 4.0, 1.0, 0.25, 1.0],
                [0.3, 0.1, -0.2, 0.25, 0.15, 0.05, 0.2, 0.15]),
    "r16": (50, 70, [16, 16, 16], [0.5, 2.0, 1.0], [0.5, 0.3, 0.2]),
}


@pytest.mark.parametrize("eta", [40.0, 10.0, 75.0, 100.0])
@pytest.mark.parametrize("case", list(CASES))
def test_star_equals_dense_reference(case, eta):
    d, k, ranks, scalings, weights = CASES[case]
    factors = random_factors(int(eta) + len(ranks), d, k, ranks)
    reference = star_reference(dense_updates(factors, scalings), weights, ranks, eta)
    for scaling in (1.0, 0.375):
        merge, got = run_rule("star", factors, weights, scalings, scaling=scaling, eta=eta)
        assert rel(got, reference) <= TOL
        assert merge.rank == int(torch.linalg.matrix_rank(reference))
        assert merge.diff_sq <= (1e-12) ** 2 * merge.ref_sq  # stored exactly: the report says 0


def test_star_default_eta_is_the_authors_40():
    d, k, ranks, scalings, weights = CASES["r16"]
    factors = random_factors(1, d, k, ranks)
    assert get_strategy("star").parse_options(None, {})["eta"] == 40.0
    _, got = run_rule("star", factors, weights, scalings)
    assert rel(got, star_reference(dense_updates(factors, scalings), weights, ranks, 40.0)) <= TOL


# ============================================================================ defining properties
def _with_singular_values(values, d=12, k=9, seed=0):
    """(B, A) with B·A = U diag(values) Vᵀ for random orthonormal U, V."""
    generator = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(d, len(values), generator=generator, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(k, len(values), generator=generator, dtype=torch.float64)).Q
    return u * torch.tensor(values, dtype=torch.float64), v.T.contiguous(), u, v


def test_star_eta_is_a_percentage_of_the_nuclear_norm():
    """σ = (4, 3, 2, 1), ‖ΔW‖_* = 10: the smallest κ with σ₁+…+σ_κ ≥ eta % of 10 is kept, rescaled
    to sum 10. eta=40 → κ=1 (σ₁ = 4 reaches 4 exactly); 41 → κ=2; 90 → 3; 100 → all (ΔW itself)."""
    values = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    for eta, kappa in [(40, 1), (41, 2), (70, 2), (70.5, 3), (90, 3), (90.01, 4), (100, 4), (1e-9, 1)]:
        assert kept_count(values, eta) == kappa, eta
    b, a, u, v = _with_singular_values([4.0, 3.0, 2.0, 1.0])
    _, got = run_rule("star", [(b, a)], [1.0], [1.0], eta=41)
    expected = u[:, :2] @ torch.diag(torch.tensor([4.0, 3.0], dtype=torch.float64) * 10 / 7) @ v[:, :2].T
    assert rel(got, expected) <= 1e-13
    _, got = run_rule("star", [(b, a)], [1.0], [1.0], eta=100)
    assert rel(got, b @ a) <= 1e-13


@pytest.mark.parametrize("eta", [5.0, 40.0, 63.0])
def test_star_keeps_each_tasks_nuclear_norm(eta):
    """‖STAR(ΔWᵢ)‖_* = ‖ΔWᵢ‖_* for every task, and its rank is the kept count."""
    d, k, ranks, scalings, _ = CASES["8-tasks"]
    factors = random_factors(9, d, k, ranks)
    for (b, a), s, r, delta in zip(factors, scalings, ranks, dense_updates(factors, scalings)):
        _, got = run_rule("star", [(b, a)], [1.0], [s], eta=eta)
        nuclear = float(torch.linalg.svdvals(delta)[:r].sum())
        assert float(torch.linalg.svdvals(got).sum()) == pytest.approx(nuclear, rel=1e-12)
        assert int(torch.linalg.matrix_rank(got)) == kept_count(torch.linalg.svdvals(delta)[:r], eta)


def test_star_is_linear_in_the_weights_negative_included():
    """Σ λᵢ·STAR(ΔWᵢ): a negative weight subtracts the task's truncation; weight 0 leaves it out; a
    zero update (a fresh LoRA, B = 0) contributes nothing."""
    d, k, ranks, scalings, _ = CASES["3-mixed"]
    factors = random_factors(13, d, k, ranks)
    singles = [run_rule("star", [f], [1.0], [s])[1] for f, s in zip(factors, scalings)]
    weights = [0.9, -1.3, 0.0]
    _, got = run_rule("star", factors, weights, scalings)
    assert rel(got, sum(w * x for w, x in zip(weights, singles))) <= 1e-12
    fresh = [factors[0], factors[1], (torch.zeros_like(factors[2][0]), factors[2][1])]
    _, got_fresh = run_rule("star", fresh, [0.9, -1.3, 5.0], scalings)
    assert rel(got_fresh, got) <= 1e-12
    merge, nothing = run_rule("star", factors, [0.0, 0.0, 0.0], scalings)
    assert float(nothing.abs().max()) == 0.0 and merge.ref_sq == 0.0


def test_star_svd_rank_and_float32():
    d, k, ranks, scalings, weights = CASES["r16"]
    factors = random_factors(2, d, k, ranks)
    reference = star_reference(dense_updates(factors, scalings), weights, ranks)
    merge, got = run_rule("star", factors, weights, scalings, svd_rank=3)
    expected = best_rank(reference, 3)
    assert merge.rank == 3 and rel(got, expected) <= TOL
    assert math.sqrt(merge.diff_sq / merge.ref_sq) == pytest.approx(rel(expected, reference), rel=1e-6)
    merge, got = run_rule("star", factors, weights, scalings, dtype=torch.float32)
    assert merge.stored[0].dtype == torch.float32 and rel(got, reference) <= 1e-6


# ============================================================================ options and registry
@pytest.mark.parametrize("bad", [0, -5, 100.5, float("nan"), float("inf")])
def test_star_eta_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match=r"eta must lie in \(0, 100\]"):
        get_strategy("star").parse_options(None, {"eta": bad})


@pytest.mark.parametrize("bad", ["40", True, None, [40]])
def test_star_eta_of_the_wrong_type_is_refused(bad):
    with pytest.raises(TypeError, match="eta must be a number"):
        get_strategy("star").parse_options(None, {"eta": bad})


def test_star_registration():
    assert "star" in STRATEGY_NAMES
    strategy = get_strategy("star")
    assert strategy.families == frozenset({"lora"})
    assert strategy.option_names == ("eta", "svd_rank", "svd_tol")
    assert strategy.parse_options(None, {"eta": 55})["eta"] == 55.0
    with pytest.raises(TypeError, match="Unknown option"):
        strategy.parse_options(None, {"density": 0.5})
    with pytest.raises(ValueError, match="does not support"):
        strategy.check_families({"bottleneck"})


# ============================================================================ through a model and files
SPECS = [(2, 4), (3, 3), (4, 16)]
WEIGHTS = [0.7, -0.4, 0.5]


def _references(model, names, weights, ranks, eta):
    return {
        path: star_reference([deltas[n] for n in names], weights, ranks, eta)
        for path in lora_paths(model, names[0])
        for deltas in [effective_updates(model, path, names)]
    }


@pytest.mark.parametrize("eta", [None, 65.0])
def test_star_through_a_tiny_model(eta):
    """average_adapter on a tiny BERT (q, v, intermediate, output; different r and alpha, a negative
    weight): each layer's merged update, measured through its forward pass, is the dense STAR merge
    of the inputs' measured updates; the report is its error against that (0)."""
    model, names = lora_model(SPECS, intermediate_lora=True, output_lora=True)
    references = _references(model, names, WEIGHTS, [r for r, _ in SPECS], 40.0 if eta is None else eta)
    options = {} if eta is None else {"eta": eta}
    report = model.average_adapter(
        "merged", names, weights=WEIGHTS, combine_strategy="star", normalize_weights=False, **options
    )
    assert len(references) == 8
    assert report.rank == max(int(torch.linalg.matrix_rank(r)) for r in references.values())
    for path, reference in references.items():
        got = effective_updates(model, path, ["merged"])["merged"]
        assert rel(got, reference) <= 1e-6, path  # float32 storage
    assert report.max_error <= 1e-6


def test_star_from_saved_folders(tmp_path):
    """merge_saved_adapters(eta=25): loaded back, each module is the dense STAR merge."""
    model, names = lora_model(SPECS, seed=2)
    references = _references(model, names, WEIGHTS, [r for r, _ in SPECS], 25.0)
    for name in names:
        model.save_adapter(str(tmp_path / name), name, with_head=False)
    report = merge_saved_adapters(
        [tmp_path / n for n in names], tmp_path / "out", weights=WEIGHTS, combine_strategy="star",
        normalize_weights=False, eta=25,
    )
    loaded = model.load_adapter(str(tmp_path / "out"))
    for path, reference in references.items():
        got = effective_updates(model, path, [loaded])[loaded]
        assert rel(got, reference) <= 1e-6, path
    assert report.max_error <= 1e-6
