"""KnOTS merging (issue 18 item 2): ``space="knots"`` of every task-vector strategy.

Each merge is compared with `space_reference.knots_reference`, a plain dense float64 implementation of
the definition (Stoica et al. 2025; gstoica27/KnOTS): the dense SVD of [ΔW₁ … ΔW_T], the parts
diag(S)·Vᵢᵀ, the rule entry by entry, U·P.
"""
from __future__ import annotations


import torch

from adapter_merging.rules import knots

from space_reference import (
    CASES,
    INPUTS,
    as_numpy,
    generator_for,
    merge_in,
    stored_update,
    knots_reference,
    random_factors,
    relative,
)

SPACE = "knots"


def _merge(strategy, factors, scalings, weights, options, scaling=0.5, dtype=torch.float64, space=SPACE):
    return merge_in(space, strategy, factors, scalings, weights, options, scaling, dtype)


_update, _numpy, _generator = stored_update, as_numpy, generator_for


# =========================================================================== the definition
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
