"""What ``space="core"`` and ``space="knots"`` share (issue 18 items 1, 2): every task-vector strategy
equals its dense float64 reference (`space_reference.core_reference`, `knots_reference`), a linear rule
is the weighted sum, the result is stored exactly (or optimally truncated), no d × k matrix is formed,
and the merge is the same through a model and from saved folders. What is particular to each space is in
tests/test_core_space.py and tests/test_knots.py."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import adapter_merging

from space_reference import (
    CASES,
    INPUTS,
    ShapeRecorder,
    as_numpy,
    core_reference,
    effective_update,
    generator_for,
    knots_reference,
    lora_inputs,
    lora_model,
    lora_paths,
    merge_in,
    random_factors,
    relative,
    stored_update,
)

REFERENCES = {"core": core_reference, "knots": knots_reference}
SPACES = list(REFERENCES)


@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("inputs", list(INPUTS))
@pytest.mark.parametrize("case", list(CASES))
def test_equals_dense_reference(space, case, inputs):
    strategy, options = CASES[case]
    d, k, ranks, scalings, weights = INPUTS[inputs]
    factors = random_factors(d, k, ranks, seed=len(case))
    merge = merge_in(space, strategy, factors, scalings, weights, options)
    reference = REFERENCES[space](strategy, as_numpy(factors), scalings, weights, options, generator_for(options))
    assert relative(stored_update(merge), reference) < 1e-9
    assert merge.rank <= sum(ranks)
    # stored exactly: no re-factorisation loss against its own definition
    assert merge.diff_sq <= 1e-24 * merge.ref_sq
    assert merge.ref_sq == pytest.approx(float((reference**2).sum()), rel=1e-9)


@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("strategy, options", [
    ("magnitude_prune", {"density": 1.0}),
    ("dare_linear", {"density": 1.0}),
    ("breadcrumbs", {"density": 1.0, "gamma": 0.0}),
])
def test_a_linear_rule_is_the_weighted_sum(space, strategy, options):
    d, k, ranks, scalings, weights = INPUTS["four-wide"]
    factors = random_factors(d, k, ranks, seed=5)
    merge = merge_in(space, strategy, factors, scalings, weights, options)
    target = sum(w * s * (b @ a) for (b, a), s, w in zip(factors, scalings, weights)).numpy()
    assert relative(stored_update(merge), target) < 1e-13


@pytest.mark.parametrize("space", SPACES)
def test_zero_inputs_merge_to_zero(space):
    factors = [(torch.zeros(8, 2, dtype=torch.float64), torch.zeros(2, 6, dtype=torch.float64))] * 2
    merge = merge_in(space, "ties", factors, [1.0, 1.0], [0.5, 0.5], {"density": 0.5})
    assert not stored_update(merge).any()


@pytest.mark.parametrize("space", SPACES)
def test_svd_rank_truncates_the_exact_merge_optimally(space):
    d, k, ranks, scalings, weights = INPUTS["three"]
    factors = random_factors(d, k, ranks, seed=3)
    reference = REFERENCES[space]("ties", as_numpy(factors), scalings, weights, {"density": 0.3})
    merge = merge_in(space, "ties", factors, scalings, weights, {"density": 0.3, "svd_rank": 4})
    u, s, vh = np.linalg.svd(reference)
    assert merge.rank == 4
    assert relative(stored_update(merge), (u[:, :4] * s[:4]) @ vh[:4]) < 1e-9


# the largest tensor each space makes: core a basis or a factor (d × 48, k × 48); KnOTS the three parts
# (3 × 48 × k), d·k being 85 times more
LARGEST = {"core": 48 * 11008, "knots": 3 * 48 * 11008}


@pytest.mark.parametrize("space", SPACES)
def test_no_d_by_k_matrix_at_a_7b_layer(space):
    d, k = 4096, 11008
    factors = random_factors(d, k, [16, 16, 16], seed=0, dtype=torch.float32)
    with ShapeRecorder() as recorder:
        start = time.perf_counter()
        merge = merge_in(space, "ties", factors, [2.0, 1.0, 0.5], [0.5, 0.3, 0.2], {"density": 0.2},
                         dtype=torch.float32)
        elapsed = time.perf_counter() - start
    assert merge.rank == 48
    assert recorder.largest <= LARGEST[space]
    assert elapsed < 10


@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("strategy, options", [
    ("ties", {"density": 0.3}),
    ("breadcrumbs_ties", {"density": 0.4, "gamma": 0.05, "majority_sign_method": "frequency"}),
])
def test_average_adapter_forward_pass_equals_the_definition(space, strategy, options):
    model, names = lora_model()
    weights = [0.7, -0.4, 0.5]
    report = model.average_adapter("merged", names, weights=weights, normalize_weights=False,
                                   combine_strategy=strategy, space=space, **options)
    for path in lora_paths(model, "merged"):
        factors, scalings = lora_inputs(model, path, names)
        reference = REFERENCES[space](strategy, factors, scalings, weights, options)
        assert relative(effective_update(model, path, "merged"), reference) < 1e-6
    assert report.max_error < 1e-6  # against its own definition: stored as float32, nothing truncated


@pytest.mark.parametrize("space", SPACES)
def test_merge_saved_adapters_equals_the_definition(space, tmp_path):
    model, names = lora_model(seed=1)
    for name in names:
        model.save_adapter(str(tmp_path / name), name)
    weights, options = [1.0, -0.5, 0.8], {"density": 0.25, "seed": 11}
    report = adapter_merging.merge_saved_adapters(
        [tmp_path / n for n in names], tmp_path / "out", weights=weights, normalize_weights=False,
        combine_strategy="dare_ties", space=space, **options,
    )
    assert report.max_error < 1e-6
    loaded = model.load_adapter(str(tmp_path / "out"))
    # DARE's masks come from one generator per merge, module after module in the order of the paths
    generator = torch.Generator().manual_seed(options["seed"])
    for path in lora_paths(model, loaded):
        factors, scalings = lora_inputs(model, path, names)
        reference = REFERENCES[space]("dare_ties", factors, scalings, weights, options, generator)
        assert relative(effective_update(model, path, loaded), reference) < 1e-6
