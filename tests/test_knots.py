"""KnOTS merging (issue 18 item 2): ``space="knots"`` of every task-vector strategy.

Each merge is compared with `space_reference.knots_reference`, a plain dense float64 implementation of
the definition (Stoica et al. 2025; gstoica27/KnOTS): the dense SVD of [ΔW₁ … ΔW_T], the parts
diag(S)·Vᵢᵀ, the rule entry by entry, U·P.
"""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import adapter_merging
from adapter_merging.rules import knots

from space_reference import (
    CASES,
    INPUTS,
    as_numpy,
    generator_for,
    merge_in,
    stored_update,
    ShapeRecorder,
    knots_reference,
    effective_update,
    lora_inputs,
    lora_model,
    lora_paths,
    random_factors,
    relative,
)

SPACE = "knots"


def _merge(strategy, factors, scalings, weights, options, scaling=0.5, dtype=torch.float64, space=SPACE):
    return merge_in(space, strategy, factors, scalings, weights, options, scaling, dtype)


_update, _numpy, _generator = stored_update, as_numpy, generator_for


# =========================================================================== the definition
@pytest.mark.parametrize("inputs", list(INPUTS))
@pytest.mark.parametrize("case", list(CASES))
def test_equals_dense_reference(case, inputs):
    strategy, options = CASES[case]
    d, k, ranks, scalings, weights = INPUTS[inputs]
    factors = random_factors(d, k, ranks, seed=len(case))
    merge = _merge(strategy, factors, scalings, weights, options)
    reference = knots_reference(strategy, _numpy(factors), scalings, weights, options, _generator(options))
    assert relative(_update(merge), reference) < 1e-9
    assert merge.rank <= sum(ranks)
    # stored exactly: no re-factorisation loss against its own definition
    assert merge.diff_sq <= 1e-24 * merge.ref_sq
    assert merge.ref_sq == pytest.approx(float((reference**2).sum()), rel=1e-9)


def test_parts_are_the_dense_svd_of_the_updates_side_by_side():
    d, k, ranks, scalings, _ = INPUTS["three"]
    factors = random_factors(d, k, ranks, seed=1)
    u, parts = knots.knots_parts(factors, scalings)
    updates = [s * b @ a for (b, a), s in zip(factors, scalings)]
    side_by_side = torch.cat(updates, dim=1)
    _, s, _ = torch.linalg.svd(side_by_side, full_matrices=False)
    assert u.shape == (d, sum(ranks)) and parts.shape == (3, sum(ranks), k)
    assert torch.allclose(u.T @ u, torch.eye(sum(ranks), dtype=torch.float64), atol=1e-12)
    # [P₁ … P_T] = diag(S)·[V₁ᵀ … V_Tᵀ]: rows orthogonal, of norms S
    joined = torch.cat(list(parts), dim=1)
    assert torch.allclose(joined @ joined.T, torch.diag(s[: sum(ranks)] ** 2), atol=1e-10 * float(s[0]) ** 2)
    for update, part in zip(updates, parts):
        assert torch.allclose(u @ part, update, atol=1e-12 * float(update.norm()))  # ΔWᵢ = U·Pᵢ


@pytest.mark.parametrize("strategy, options", [
    ("magnitude_prune", {"density": 1.0}),
    ("dare_linear", {"density": 1.0}),
    ("breadcrumbs", {"density": 1.0, "gamma": 0.0}),
])
def test_a_linear_rule_is_the_weighted_sum(strategy, options):
    d, k, ranks, scalings, weights = INPUTS["four-wide"]
    factors = random_factors(d, k, ranks, seed=5)
    merge = _merge(strategy, factors, scalings, weights, options)
    target = sum(w * s * (b @ a) for (b, a), s, w in zip(factors, scalings, weights)).numpy()
    assert relative(_update(merge), target) < 1e-13


def test_rank_deficient_stacks_use_the_numerical_rank():
    """The same update twice (and a third one): [ΔW₁ ΔW₂ ΔW₃] has rank 5 of 8; the parts keep 5 rows, and
    the merge still equals the dense definition (which keeps the numerical rank too)."""
    (b0, a0), (b1, a1) = random_factors(30, 44, [3, 2], seed=2)
    factors = [(b0, a0), (2 * b0, a0.clone()), (b1, a1)]
    scalings, weights = [1.0, 0.5, 0.5], [0.5, 0.25, -1.0]
    u, parts = knots.knots_parts(factors, scalings)
    assert u.shape[1] == 5 and parts.shape[1] == 5
    for strategy, options in CASES.values():
        merge = _merge(strategy, factors, scalings, weights, options)
        reference = knots_reference(strategy, _numpy(factors), scalings, weights, options, _generator(options))
        assert relative(_update(merge), reference) < 1e-9, strategy
    merge = _merge("magnitude_prune", factors, scalings, weights, {"density": 1.0})
    target = sum(w * s * (b @ a) for (b, a), s, w in zip(factors, scalings, weights)).numpy()
    assert relative(_update(merge), target) < 1e-13


def test_zero_inputs_merge_to_zero():
    factors = [(torch.zeros(8, 2, dtype=torch.float64), torch.zeros(2, 6, dtype=torch.float64))] * 2
    merge = _merge("ties", factors, [1.0, 1.0], [0.5, 0.5], {"density": 0.5})
    assert not _update(merge).any()


def test_svd_rank_truncates_the_exact_merge_optimally():
    d, k, ranks, scalings, weights = INPUTS["three"]
    factors = random_factors(d, k, ranks, seed=3)
    reference = knots_reference("ties", _numpy(factors), scalings, weights, {"density": 0.3})
    merge = _merge("ties", factors, scalings, weights, {"density": 0.3, "svd_rank": 4})
    u, s, vh = np.linalg.svd(reference)
    assert merge.rank == 4
    assert relative(_update(merge), (u[:, :4] * s[:4]) @ vh[:4]) < 1e-9


# =========================================================================== never dense
def test_no_d_by_k_matrix_at_a_7b_layer():
    d, k = 4096, 11008
    factors = random_factors(d, k, [16, 16, 16], seed=0, dtype=torch.float32)
    with ShapeRecorder() as recorder:
        start = time.perf_counter()
        merge = _merge("ties", factors, [2.0, 1.0, 0.5], [0.5, 0.3, 0.2], {"density": 0.2}, dtype=torch.float32)
        elapsed = time.perf_counter() - start
    assert merge.rank == 48
    assert recorder.largest <= 3 * 48 * k  # the largest: the three parts (3 × 48 × k); d·k = 85 times more
    assert elapsed < 10


# =========================================================================== through a model, in memory and from files
@pytest.mark.parametrize("strategy, options", [
    ("ties", {"density": 0.3}),
    ("breadcrumbs_ties", {"density": 0.4, "gamma": 0.05, "majority_sign_method": "frequency"}),
])
def test_average_adapter_forward_pass_equals_the_definition(strategy, options):
    model, names = lora_model()
    weights = [0.7, -0.4, 0.5]
    report = model.average_adapter("merged", names, weights=weights, normalize_weights=False,
                                   combine_strategy=strategy, space=SPACE, **options)
    for path in lora_paths(model, "merged"):
        factors, scalings = lora_inputs(model, path, names)
        reference = knots_reference(strategy, factors, scalings, weights, options)
        assert relative(effective_update(model, path, "merged"), reference) < 1e-6
    assert report.max_error < 1e-6  # against its own definition: stored as float32, nothing truncated
    print(report.summary())


def test_merge_saved_adapters_equals_the_definition(tmp_path):
    model, names = lora_model(seed=1)
    for name in names:
        model.save_adapter(str(tmp_path / name), name)
    weights, options = [1.0, -0.5, 0.8], {"density": 0.25, "seed": 11}
    report = adapter_merging.merge_saved_adapters(
        [tmp_path / n for n in names], tmp_path / "out", weights=weights, normalize_weights=False,
        combine_strategy="dare_ties", space=SPACE, **options,
    )
    assert report.max_error < 1e-6
    loaded = model.load_adapter(str(tmp_path / "out"))
    # DARE's masks come from one generator per merge, module after module in the order of the paths
    generator = torch.Generator().manual_seed(options["seed"])
    for path in lora_paths(model, loaded):
        factors, scalings = lora_inputs(model, path, names)
        reference = knots_reference("dare_ties", factors, scalings, weights, options, generator)
        assert relative(effective_update(model, path, loaded), reference) < 1e-6
