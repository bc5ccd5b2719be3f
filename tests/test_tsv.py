"""TSV-M (``tsv``, Gargiulo et al., CVPR 2025) against a plain dense float64 implementation of its
definition, written here from the paper and the authors' code (task_singular_vectors,
``compute_and_sum_svd_mem_reduction``): per task the SVD of the dense ΔWᵢ, kept at the task's own rank
rᵢ (this library's choice; the authors keep 1/T of min(d, k)) with λᵢ·Sᵢ; U = [U₁ … U_T] and
V = [V₁ … V_T] replaced by their polar factors (SVD U = P Σ Qᵀ → P Qᵀ); the merge U⊥ diag(λS) V⊥ᵀ."""
from __future__ import annotations

import pytest
import torch

from adapter_merging import merge_saved_adapters
from adapter_merging._warnings import MergeWarning
from adapter_merging.rules.tsv import orthogonal_polar, orthogonal_polar_rows
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
def polar(matrix: torch.Tensor) -> torch.Tensor:
    """P Qᵀ of the thin SVD matrix = P Σ Qᵀ (dense); where singular values are ≤ 1e-8·σ₁ (linearly
    dependent vectors: the factor is not unique), the canonical one, over the others only."""
    p, s, qh = torch.linalg.svd(matrix, full_matrices=False)
    keep = s > 1e-8 * s[0]
    return p[:, keep] @ qh[keep]


def tsv_reference(deltas, weights, ranks) -> torch.Tensor:
    """TSV-M of the dense updates: each task's top rᵢ singular triplets, λᵢ on its singular values,
    concatenated and decorrelated; tasks of weight 0 left out."""
    us, ss, vhs = [], [], []
    for delta, w, r in zip(deltas, weights, ranks):
        if w == 0:
            continue
        u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
        us.append(u[:, :r])
        ss.append(w * s[:r])
        vhs.append(vh[:r])
    u_perp = polar(torch.cat(us, 1))
    vh_perp = polar(torch.cat(vhs, 0))
    return u_perp @ torch.diag(torch.cat(ss)) @ vh_perp


# (d, k, ranks, scalings, weights): different ranks and scalings, negative weights, 8 tasks, and
# Σrᵢ > d (U wider than tall: its polar factor has orthonormal rows)
CASES = {
    "3-mixed": (40, 29, [2, 5, 3], [2.0, 0.5, 1.25], [0.7, -0.4, 0.5]),
    "2-equal": (23, 31, [4, 4], [1.0, 3.0], [1.0, 1.0]),
    "8-tasks": (64, 48, [3, 1, 2, 4, 2, 3, 1, 2], [1.0, 2.0, 0.5, 1.0, 4.0, 1.0, 0.25, 1.0],
                [0.3, 0.1, -0.2, 0.25, 0.15, 0.05, 0.2, 0.15]),
    "wide-U": (6, 30, [3, 4], [1.0, 0.5], [0.6, 0.4]),
}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("case", list(CASES))
def test_tsv_equals_dense_reference(case, seed):
    d, k, ranks, scalings, weights = CASES[case]
    factors = random_factors(seed, d, k, ranks)
    reference = tsv_reference(dense_updates(factors, scalings), weights, ranks)
    for scaling in (1.0, 0.375):
        merge, got = run_rule("tsv", factors, weights, scalings, scaling=scaling)
        assert rel(got, reference) <= TOL
        assert merge.rank == min(sum(ranks), d, k) == int(torch.linalg.matrix_rank(reference))
        assert merge.diff_sq <= (1e-12) ** 2 * merge.ref_sq  # stored exactly: the report says 0


def test_tsv_float32_storage_and_truncation():
    d, k, ranks, scalings, weights = CASES["3-mixed"]
    factors = random_factors(3, d, k, ranks)
    reference = tsv_reference(dense_updates(factors, scalings), weights, ranks)
    merge, got = run_rule("tsv", factors, weights, scalings, dtype=torch.float32)
    assert merge.stored[0].dtype == torch.float32
    assert rel(got, reference) <= 1e-6
    # svd_rank / svd_tol: the optimal truncation of the TSV-M merge (Eckart–Young), measured honestly
    merge, got = run_rule("tsv", factors, weights, scalings, svd_rank=4)
    expected = best_rank(reference, 4)
    assert merge.rank == 4 and rel(got, expected) <= TOL
    measured = (merge.diff_sq / merge.ref_sq) ** 0.5
    assert measured == pytest.approx(rel(expected, reference), rel=1e-6)
    merge, got = run_rule("tsv", factors, weights, scalings, svd_tol=0.2)
    assert rel(got, reference) <= 0.2 and merge.rank < 10
    assert rel(got, best_rank(reference, merge.rank)) <= TOL


# ============================================================================ defining properties
def test_decorrelated_bases_are_orthonormal_and_nearest():
    """The polar factor has orthonormal columns (rows when wide) and is the orthogonal Procrustes
    solution: the dense SVD's P Qᵀ."""
    generator = torch.Generator().manual_seed(5)
    for shape in [(50, 12), (7, 12)]:
        m = torch.randn(*shape, generator=generator, dtype=torch.float64)
        q = orthogonal_polar(m)
        gram = q.T @ q if shape[0] >= shape[1] else q @ q.T
        assert float((gram - torch.eye(gram.shape[0], dtype=torch.float64)).abs().max()) <= 1e-13
        assert float((q - polar(m)).abs().max()) <= 1e-12


def test_polar_paths_agree_with_the_dense_polar_factor():
    """Both ways of computing the polar factor (the R × R Gram matrix where it is well conditioned,
    a thin QR where not: nearly shared task subspaces, more vectors than dimensions) match the dense
    SVD's P Qᵀ, columns and rows."""
    generator = torch.Generator().manual_seed(8)
    base = torch.randn(40, 6, generator=generator, dtype=torch.float64)
    for spread in (1.0, 1e-2, 1e-5):  # Gram condition ~1, ~1e-4 (Gram path), ~1e-10 (QR path)
        m = torch.cat([base, base + spread * torch.randn(40, 6, generator=generator, dtype=torch.float64)], 1)
        expected = polar(m)
        assert float((orthogonal_polar(m) - expected).abs().max()) <= 1e-9, spread
        assert float((orthogonal_polar_rows(m.T.contiguous()) - expected.T).abs().max()) <= 1e-9, spread
        assert orthogonal_polar_rows(m.T.contiguous()).is_contiguous()


def test_tsv_nearly_identical_tasks_match_the_reference():
    """Two tasks whose updates nearly coincide, with one A (their right singular vectors span one
    space: the polar factor is not unique, the canonical one is taken; the left ones nearly shared:
    the QR path)."""
    factors = random_factors(21, 30, 25, [3, 3])
    generator = torch.Generator().manual_seed(22)
    b, a = factors[0]
    factors[1] = (b + 1e-6 * torch.randn(b.shape, generator=generator, dtype=torch.float64), a.clone())
    reference = tsv_reference(dense_updates(factors, [1.0, 1.0]), [0.5, 0.5], [3, 3])
    _, got = run_rule("tsv", factors, [0.5, 0.5], [1.0, 1.0])
    assert rel(got, reference) <= TOL


def test_tsv_identical_tasks_merge_to_the_weighted_task():
    """Copies of one task share every direction: the canonical decorrelation averages them, so
    weights 1 and 1 give ΔW itself and 0.5 and 0.5 give ΔW/2."""
    factors = random_factors(23, 20, 30, [4])
    copies = [factors[0], (factors[0][0].clone(), factors[0][1].clone())]
    delta = dense_updates(factors, [1.5])[0]
    for weights, expected in [([1.0, 1.0], delta), ([0.5, 0.5], 0.5 * delta)]:
        _, got = run_rule("tsv", copies, weights, [1.5, 1.5])
        assert rel(got, expected) <= 1e-10


def test_tsv_singular_values_are_the_weighted_task_singular_values():
    """U⊥ and V⊥ are orthonormal, so the merge's singular values are exactly the |λᵢ|·σᵢⱼ."""
    d, k, ranks, scalings, weights = CASES["8-tasks"]
    factors = random_factors(7, d, k, ranks)
    deltas = dense_updates(factors, scalings)
    expected = torch.cat([abs(w) * torch.linalg.svdvals(x)[:r] for x, w, r in zip(deltas, weights, ranks)])
    _, got = run_rule("tsv", factors, weights, scalings)
    values = torch.linalg.svdvals(got)[: sum(ranks)]
    assert torch.allclose(values, expected.sort(descending=True).values, rtol=1e-10, atol=0)


def test_tsv_single_task_and_orthogonal_tasks_are_the_weighted_sum():
    """One task: λ·ΔW. Tasks on mutually orthogonal row and column spaces are already decorrelated:
    Σ λᵢΔWᵢ exactly."""
    factors = random_factors(11, 30, 20, [3])
    merge, got = run_rule("tsv", factors, [0.6], [2.0])
    assert rel(got, 0.6 * dense_updates(factors, [2.0])[0]) <= 1e-12
    generator = torch.Generator().manual_seed(12)
    factors = []
    for i, r in enumerate([2, 3, 1]):
        b = torch.zeros(30, r, dtype=torch.float64)
        a = torch.zeros(r, 20, dtype=torch.float64)
        b[10 * i : 10 * i + 10] = torch.randn(10, r, generator=generator, dtype=torch.float64)
        a[:, 6 * i : 6 * i + 6] = torch.randn(r, 6, generator=generator, dtype=torch.float64)
        factors.append((b, a))
    weights, scalings = [0.5, -1.5, 2.0], [1.0, 0.5, 3.0]
    _, got = run_rule("tsv", factors, weights, scalings)
    expected = sum(w * x for w, x in zip(weights, dense_updates(factors, scalings)))
    assert rel(got, expected) <= 1e-12


def test_tsv_negative_weight_subtracts_the_task():
    """λᵢ < 0 gives the task negative singular values: the same merge as the negated task −ΔWᵢ with
    |λᵢ| (the polar factor commutes with flipping columns' signs), not a different decorrelation."""
    d, k, ranks, scalings, _ = CASES["3-mixed"]
    factors = random_factors(4, d, k, ranks)
    negated = [factors[0], (-factors[1][0], factors[1][1]), factors[2]]
    _, with_negative = run_rule("tsv", factors, [0.7, -0.4, 0.5], scalings)
    _, with_negated = run_rule("tsv", negated, [0.7, 0.4, 0.5], scalings)
    assert rel(with_negative, with_negated) <= 1e-12
    reference = tsv_reference(dense_updates(factors, scalings), [0.7, -0.4, 0.5], ranks)
    assert rel(with_negative, reference) <= TOL
    # all weights negated: the whole merge negated
    _, all_negative = run_rule("tsv", factors, [-0.7, 0.4, -0.5], scalings)
    assert rel(all_negative, -with_negative) <= 1e-12


def test_tsv_weight_zero_and_zero_update_leave_the_task_out():
    """A task of weight 0, or with ΔWᵢ = 0 (a fresh LoRA, B = 0), takes no part (its singular vectors
    would otherwise still rotate the others' through the decorrelation)."""
    d, k, ranks, scalings, weights = CASES["3-mixed"]
    factors = random_factors(6, d, k, ranks)
    _, without = run_rule("tsv", [factors[0], factors[2]], [weights[0], weights[2]], [scalings[0], scalings[2]])
    _, zero_weight = run_rule("tsv", factors, [weights[0], 0.0, weights[2]], scalings)
    assert rel(zero_weight, without) <= 1e-12
    fresh = [factors[0], (torch.zeros_like(factors[1][0]), factors[1][1]), factors[2]]
    _, zero_update = run_rule("tsv", fresh, weights, scalings)
    assert rel(zero_update, without) <= 1e-12
    merge, nothing = run_rule("tsv", factors, [0.0, 0.0, 0.0], scalings)
    assert float(nothing.abs().max()) == 0.0 and merge.ref_sq == 0.0


# ============================================================================ options and registry
def test_tsv_registration_and_options():
    assert "tsv" in STRATEGY_NAMES
    strategy = get_strategy("tsv")
    assert strategy.families == frozenset({"lora"}) and strategy.option_names == ("svd_rank", "svd_tol")
    with pytest.raises(TypeError, match="Unknown option"):
        strategy.parse_options(None, {"eta": 40})
    with pytest.raises(ValueError, match="does not support"):
        strategy.check_families({"ia3"})
    with pytest.raises(ValueError, match="svd_tol"):
        strategy.parse_options(2, {"svd_tol": 0.1})


# ============================================================================ through a model and files
SPECS = [(2, 4), (3, 3), (4, 16)]
WEIGHTS = [0.7, -0.4, 0.5]


def _references(model, names, weights, ranks):
    return {
        path: tsv_reference([deltas[n] for n in names], weights, ranks)
        for path in lora_paths(model, names[0])
        for deltas in [effective_updates(model, path, names)]
    }


def test_tsv_through_a_tiny_model():
    """average_adapter on a tiny BERT (LoRA on q, v, intermediate and output; different r and alpha,
    a negative weight): the merged adapter's update, measured through each layer's forward pass, is
    the dense TSV-M of the inputs' measured updates; the report is its error against that (0)."""
    model, names = lora_model(SPECS, intermediate_lora=True, output_lora=True)
    references = _references(model, names, WEIGHTS, [r for r, _ in SPECS])
    report = model.average_adapter("merged", names, weights=WEIGHTS, combine_strategy="tsv", normalize_weights=False)
    assert report.rank == 9 and len(references) == 8
    for path, reference in references.items():
        got = effective_updates(model, path, ["merged"])["merged"]
        assert rel(got, reference) <= 1e-6, path  # float32 storage
    assert report.max_error <= 1e-6


def test_tsv_from_saved_folders(tmp_path):
    """merge_saved_adapters with svd_rank: loaded back, each module is the optimal rank-5 truncation of
    the dense TSV-M, and the report states its error."""
    model, names = lora_model(SPECS, seed=1)
    references = _references(model, names, WEIGHTS, [r for r, _ in SPECS])
    for name in names:
        model.save_adapter(str(tmp_path / name), name, with_head=False)
    with pytest.warns(MergeWarning, match="rank 5"):  # the truncation loses a third: said
        report = merge_saved_adapters(
            [tmp_path / n for n in names], tmp_path / "out", weights=WEIGHTS, combine_strategy="tsv",
            normalize_weights=False, svd_rank=5,
        )
    loaded = model.load_adapter(str(tmp_path / "out"))
    assert report.rank == 5
    errors = []
    for path, reference in references.items():
        got = effective_updates(model, path, [loaded])[loaded]
        expected = best_rank(reference, 5)
        assert rel(got, expected) <= 1e-5, path
        errors.append(rel(expected, reference))
    assert report.max_error == pytest.approx(max(errors), rel=1e-4)
