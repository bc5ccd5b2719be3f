"""Core Space merging (issue 18 item 1): ``space="core"`` of every task-vector strategy.

Each merge is compared with `space_reference.core_reference`, a plain dense float64 implementation of
the definition (Panariello et al. 2025; apanariello4/core-space-merging): dense updates, numpy SVD bases,
dense cores, the rule entry by entry, U_B M V_Aᵀ.
"""
from __future__ import annotations


import pytest
import torch

from adapter_merging.rules import core_space
from adapter_merging.strategies import STRATEGIES, get_strategy

from space_reference import (
    CASES,
    INPUTS,
    as_numpy,
    generator_for,
    merge_in,
    stored_update,
    core_reference,
    random_factors,
    relative,
)

SPACE = "core"
TASK_VECTOR_STRATEGIES = ["ties", "dare_linear", "dare_ties", "magnitude_prune", "breadcrumbs", "breadcrumbs_ties"]


def _merge(strategy, factors, scalings, weights, options, scaling=0.5, dtype=torch.float64, space=SPACE):
    return merge_in(space, strategy, factors, scalings, weights, options, scaling, dtype)


_update, _numpy, _generator = stored_update, as_numpy, generator_for


# =========================================================================== the definition
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


# =========================================================================== options
def test_space_is_validated():
    with pytest.raises(ValueError, match="Unknown space 'kore'.*'full'.*'core'.*'knots'"):
        get_strategy("ties").parse_options(None, {"space": "kore"})
    with pytest.raises(TypeError, match="space must be one of"):
        get_strategy("ties").parse_options(None, {"space": 1})
    with pytest.raises(TypeError, match=r"Unknown option\(s\) \['space'\] for combine_strategy='lora_delta_w_svd'"):
        get_strategy("lora_delta_w_svd").parse_options(None, {"space": "core"})
