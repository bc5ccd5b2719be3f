"""ReFT interventions (LoReFT, NoReFT, DiReFT).

Linear, Φ = Σ λᵢ Φᵢ, over the learned source (and, without orthogonality, the projection). LoReFT
constrains its projection R (r × d) to orthonormal rows through torch's orthogonal parametrization;
the stored tensors (``original``, ``base``) are not a vector space, so the merge works on the
*effective* projections Rᵢ, the matrices the model computes from them:

1. R̄ = Σ λᵢ Rᵢ.
2. If one input has weight 1 and every other input weight 0, the merge *is* that input: its stored
   ``original`` and ``base`` are copied as they are, so the merged adapter reproduces it bit for bit.
3. Rows of R̄ that are zero (norm ≤ tol·Σ|λᵢ|) stay zero: no intervention along them. A LoReFT
   projection collapses to zero rows in practice: torch's Householder map casts the diagonal of
   ``original`` to ``int``, so any optimiser step that moves it off ±1 — one step of
   ``torch.optim.AdamW`` with its default ``weight_decay=0.01`` is enough — zeroes the rows, and a
   [1, −1] merge of one adapter cancels to zero. (Zero rows need r < d, the Householder map; for a
   square R they are retracted like the others.)
4. The other rows are kept as they are if they are already orthonormal (‖R̄R̄ᵀ − I‖_max ≤ tol, e.g.
   inputs sharing one projection with weights summing to 1); otherwise they are replaced by the
   closest matrix with orthonormal rows in Frobenius norm, the polar factor U·Vᵀ of their SVD.

The merged (``original``, ``base``) are then built directly so that the parametrization yields the
result exactly: ``base`` is an orthogonal completion of the rows (deterministic: no random
completion, the caller's random stream is not touched), ``original`` is −I with 0 on the diagonal
of the zero rows. Everything is computed in float64 and stored in the inputs' dtype.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
from adapters import ReftConfig

from ..ops import linear_combination
from ..ops.weights import module_name
from .base import Method, linear_merge

ORIGINAL = "projection.parametrizations.weight.original"
BASE = "projection.parametrizations.weight.0.base"


def _orthogonal_linear(rows: int, cols: int, dtype) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):  # registering the parametrization draws random numbers
        linear = torch.nn.Linear(cols, rows, bias=False, dtype=dtype)
        return torch.nn.utils.parametrizations.orthogonal(linear)


def orthogonal_weight(original: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """The projection R the parametrization computes from its stored (original, base), in float64."""
    module = _orthogonal_linear(*original.shape, dtype=torch.float64)
    module.load_state_dict(
        {
            "parametrizations.weight.original": original.detach().to(torch.float64),
            "parametrizations.weight.0.base": base.detach().to(torch.float64),
        }
    )
    with torch.no_grad():
        return module.weight.detach().clone()


def polar_rows(matrix: torch.Tensor) -> torch.Tensor:
    """The matrix with orthonormal rows (or columns, if tall) closest to ``matrix`` in Frobenius norm:
    U·Vᵀ of its SVD."""
    u, _, vh = torch.linalg.svd(matrix.to(torch.float64), full_matrices=False)
    return (u @ vh).to(matrix.dtype)


def tolerance(dtype: torch.dtype) -> float:
    """How far from orthonormal (and from zero) a merged projection may be and still count as such."""
    return min(1e-2, max(1e-5, 16 * torch.finfo(dtype).eps))


def retract(merged: torch.Tensor, scale: float, tol: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rules 3 and 4 on R̄ (float64): (R with orthonormal or zero rows, boolean mask of the zero rows).

    Works in the tall orientation of the parametrization (columns of T = R̄ᵀ when r < d)."""
    rows, cols = merged.shape
    tall = merged if rows >= cols else merged.mT
    n, k = tall.shape
    norms = tall.norm(dim=0)
    zero = norms <= tol * max(scale, 1e-300)
    if n == k:  # matrix-exponential map: cannot represent zero columns
        zero = torch.zeros_like(zero)
    kept = tall[:, ~zero]
    if kept.shape[1]:
        gram = kept.mT @ kept
        if (gram - torch.eye(kept.shape[1], dtype=gram.dtype)).abs().max() > tol:
            kept = polar_rows(kept)
    out = torch.zeros_like(tall)
    out[:, ~zero] = kept
    return (out if rows >= cols else out.mT), zero


def orthogonal_state(weight: torch.Tensor, zero: torch.Tensor, dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """(original, base) such that torch's orthogonal parametrization yields ``weight`` (float64, rows
    orthonormal except the ``zero`` ones, which are zero) — built directly, deterministically."""
    rows, cols = weight.shape
    tall = (weight if rows >= cols else weight.mT).to(torch.float64).clone()
    n, k = tall.shape
    if zero.any():  # fill zero columns with an orthonormal complement of the others, for the base
        complement, _ = torch.linalg.qr(tall[:, ~zero], mode="complete")
        kept = int((~zero).sum())
        tall[:, zero] = complement[:, kept : kept + int(zero.sum())]
    base, _ = torch.linalg.qr(tall, mode="complete")  # n × n, first k columns span those of `tall`
    base[:, :k] = tall  # exactly: the parametrization computes base @ eye(n, k)
    original = torch.zeros(n, k, dtype=torch.float64)
    original.diagonal().fill_(-1.0)  # −I: the Householder (and matrix-exp) map gives eye(n, k)
    original.diagonal()[zero] = 0.0  # the diagonal is cast to int: 0 zeroes the column
    if rows < cols:
        original = original.mT
    return original.contiguous().to(dtype), base.contiguous().to(dtype)


def merge_projection(originals: Sequence[torch.Tensor], bases: Sequence[torch.Tensor], weights: Sequence[float]):
    """The merged (original, base) of one LoReFT unit by the rules of the module docstring."""
    nonzero = [i for i, w in enumerate(weights) if w != 0.0]
    if len(nonzero) == 1 and weights[nonzero[0]] == 1.0:
        i = nonzero[0]
        return originals[i].detach().clone(), bases[i].detach().clone()
    projections = [orthogonal_weight(o, b) for o, b in zip(originals, bases)]
    merged = linear_combination(projections, weights)
    dtype = originals[0].dtype
    weight, zero = retract(merged, sum(abs(w) for w in weights), tolerance(dtype))
    return orthogonal_state(weight, zero, dtype)


def merge_refts(ctx, configs, slots):
    plain = [s for s in slots if not s.param.endswith((ORIGINAL, BASE))]
    merged = linear_merge(ctx, plain)
    for slot in [s for s in slots if s.param.endswith(ORIGINAL)]:
        base_slot = slot.replace_param(slot.param[: -len(ORIGINAL)] + BASE)
        original, base = merge_projection(ctx.inputs(slot), ctx.inputs(base_slot), ctx.weights_at(module_name(slot)))
        device = ctx.inputs(slot)[0].device
        merged[slot], merged[base_slot] = original.to(device), base.to(device)
    return configs[0], merged


METHOD = Method(name="reft", config_types=(ReftConfig,), containers=("refts",), merge=merge_refts)
