"""Core Space merging (issue 18 item 1): ``space="core"`` of every task-vector strategy.

Each merge is compared with `space_reference.core_reference`, a plain dense float64 implementation of
the definition (Panariello et al. 2025; apanariello4/core-space-merging): dense updates, numpy SVD bases,
dense cores, the rule entry by entry, U_B M V_Aᵀ.
"""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import adapter_merging
from adapter_merging.rules import core_space
from adapter_merging.strategies import STRATEGIES, get_strategy

from space_reference import (
    CASES,
    INPUTS,
    as_numpy,
    generator_for,
    merge_in,
    stored_update,
    ShapeRecorder,
    core_reference,
    effective_update,
    lora_inputs,
    lora_model,
    lora_paths,
    random_factors,
    relative,
)

SPACE = "core"
TASK_VECTOR_STRATEGIES = ["ties", "dare_linear", "dare_ties", "magnitude_prune", "breadcrumbs", "breadcrumbs_ties"]


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
    reference = core_reference(strategy, _numpy(factors), scalings, weights, options, _generator(options))
    assert relative(_update(merge), reference) < 1e-9
    assert merge.rank <= sum(ranks)
    # stored exactly: no re-factorisation loss against its own definition
    assert merge.diff_sq <= 1e-24 * merge.ref_sq
    assert merge.ref_sq == pytest.approx(float((reference**2).sum()), rel=1e-9)


def test_every_task_vector_strategy_takes_space():
    takes = sorted(s.name for s in STRATEGIES.values() if "space" in s.option_names)
    assert set(TASK_VECTOR_STRATEGIES) <= set(takes)
    for name in TASK_VECTOR_STRATEGIES:
        assert get_strategy(name).parse_options(None, {})["space"] == "full"


def test_cores_are_the_projections_of_the_updates():
    d, k, ranks, scalings, _ = INPUTS["three"]
    factors = random_factors(d, k, ranks, seed=1)
    u_b, v_a = core_space.core_bases(factors)
    assert u_b.shape == (d, sum(ranks)) and v_a.shape == (k, sum(ranks))
    eye = torch.eye(sum(ranks), dtype=torch.float64)
    assert torch.allclose(u_b.T @ u_b, eye, atol=1e-12) and torch.allclose(v_a.T @ v_a, eye, atol=1e-12)
    cores = core_space.core_matrices(factors, scalings, u_b, v_a)
    for (b, a), s, core in zip(factors, scalings, cores):
        dense = s * b @ a
        assert torch.allclose(u_b @ core @ v_a.T, dense, atol=1e-12 * float(dense.norm()))  # ΔWᵢ = U_B Mᵢ V_Aᵀ
        assert torch.allclose(core, u_b.T @ dense @ v_a, atol=1e-12 * float(dense.norm()))


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
    """The same adapter twice (and a third one): the stacks have rank 5 of 8; the bases keep 5 vectors,
    and the merge still equals the dense definition (whose bases keep the numerical rank too)."""
    (b0, a0), (b1, a1) = random_factors(30, 44, [3, 2], seed=2)
    factors = [(b0, a0), (b0.clone(), a0.clone()), (b1, a1)]
    scalings, weights = [1.0, 2.0, 0.5], [0.5, 0.25, -1.0]
    u_b, v_a = core_space.core_bases(factors)
    assert u_b.shape[1] == 5 and v_a.shape[1] == 5
    for strategy, options in CASES.values():
        merge = _merge(strategy, factors, scalings, weights, options)
        reference = core_reference(strategy, _numpy(factors), scalings, weights, options, _generator(options))
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
    reference = core_reference("ties", _numpy(factors), scalings, weights, {"density": 0.3})
    merge = _merge("ties", factors, scalings, weights, {"density": 0.3, "svd_rank": 4})
    u, s, vh = np.linalg.svd(reference)
    assert merge.rank == 4
    assert relative(_update(merge), (u[:, :4] * s[:4]) @ vh[:4]) < 1e-9


# =========================================================================== options
def test_space_is_validated():
    with pytest.raises(ValueError, match="Unknown space 'kore'.*'full'.*'core'.*'knots'"):
        get_strategy("ties").parse_options(None, {"space": "kore"})
    with pytest.raises(TypeError, match="space must be one of"):
        get_strategy("ties").parse_options(None, {"space": 1})
    with pytest.raises(TypeError, match=r"Unknown option\(s\) \['space'\] for combine_strategy='lora_delta_w_svd'"):
        get_strategy("lora_delta_w_svd").parse_options(None, {"space": "core"})


# =========================================================================== never dense
def test_no_d_by_k_matrix_at_a_7b_layer():
    d, k = 4096, 11008
    factors = random_factors(d, k, [16, 16, 16], seed=0, dtype=torch.float32)
    with ShapeRecorder() as recorder:
        start = time.perf_counter()
        merge = _merge("ties", factors, [2.0, 1.0, 0.5], [0.5, 0.3, 0.2], {"density": 0.2}, dtype=torch.float32)
        elapsed = time.perf_counter() - start
    assert merge.rank == 48
    assert recorder.largest <= 48 * k  # the largest: a basis or a factor (d × 48, k × 48)
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
        reference = core_reference(strategy, factors, scalings, weights, options)
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
        reference = core_reference("dare_ties", factors, scalings, weights, options, generator)
        assert relative(effective_update(model, path, loaded), reference) < 1e-6
