"""ReFT interventions (LoReFT, NoReFT, DiReFT).

Linear, Φ = Σ λᵢ Φᵢ, over the learned source and the projection as the model uses it. LoReFT
constrains its projection R (r × d) to orthonormal rows through a torch parametrization; the stored
tensors (``original``, ``base``) are not a vector space, so the effective projections are merged,
R̄ = Σ λᵢ Rᵢ, and mapped back to the constraint by the polar decomposition (the closest matrix with
orthonormal rows, U·Vᵀ of R̄'s SVD). For a single input with weight 1 this returns it unchanged.
"""
from __future__ import annotations

import torch
from adapters import ReftConfig

from ..ops import linear_combination
from .base import Method, linear_merge

ORIGINAL = "projection.parametrizations.weight.original"
BASE = "projection.parametrizations.weight.0.base"


def _orthogonal_linear(rows: int, cols: int, dtype) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):  # do not consume the caller's random stream
        linear = torch.nn.Linear(cols, rows, bias=False, dtype=dtype)
        return torch.nn.utils.parametrizations.orthogonal(linear)


def orthogonal_weight(original: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """The projection R the parametrization computes from its stored (original, base)."""
    module = _orthogonal_linear(*original.shape, dtype=original.dtype)
    module.load_state_dict({"parametrizations.weight.original": original, "parametrizations.weight.0.base": base})
    with torch.no_grad():
        return module.weight.detach().clone()


def polar_rows(matrix: torch.Tensor) -> torch.Tensor:
    """The matrix with orthonormal rows closest to ``matrix`` in Frobenius norm: U·Vᵀ of its SVD."""
    u, _, vh = torch.linalg.svd(matrix.to(torch.float64), full_matrices=False)
    return (u @ vh).to(matrix.dtype)


def orthogonal_state(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(original, base) such that the parametrization yields ``weight`` (orthonormal rows)."""
    module = _orthogonal_linear(*weight.shape, dtype=weight.dtype)
    with torch.no_grad():
        module.weight = weight
    state = module.state_dict()
    return state["parametrizations.weight.original"].clone(), state["parametrizations.weight.0.base"].clone()


def merge_refts(ctx, configs, slots):
    plain = [s for s in slots if not s.param.endswith((ORIGINAL, BASE))]
    merged = linear_merge(ctx, plain)
    orthogonal = [s for s in slots if s.param.endswith(ORIGINAL)]
    for slot in orthogonal:
        unit = slot.param[: -len(ORIGINAL)]
        base_slot = slot.replace_param(unit + BASE)
        projections = [
            orthogonal_weight(ctx.tensors[name][slot], ctx.tensors[name][base_slot]) for name in ctx.names
        ]
        original, base = orthogonal_state(polar_rows(linear_combination(projections, ctx.weights)))
        merged[slot], merged[base_slot] = original, base
    return configs[0], merged


METHOD = Method(name="reft", config_types=(ReftConfig,), containers=("refts",), merge=merge_refts)
