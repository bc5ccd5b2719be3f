"""Linear combination of tensors: the merge rule shared by every adapter method."""
from __future__ import annotations

from typing import Sequence

import torch

#: dtypes that are merged in float32 and stored back in their own dtype.
LOW_PRECISION = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype merges are computed in: float32 for half precision, else the dtype itself."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def result_dtype(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    """The dtype a merge of tensors of ``dtypes`` is stored in: the widest (``torch.promote_types``;
    float16 with bfloat16 gives float32), whatever their order."""
    result = dtypes[0]
    for dtype in dtypes[1:]:
        result = torch.promote_types(result, dtype)
    return result


def linear_combination(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Φ = Σ λᵢ Φᵢ, summed as ``adapters`` does — (λ₀Φ₀) + (λ₁Φ₁) + …, each product rounded, in input
    order — so float32 results are identical to its formula. Half precision is computed in float32;
    the result has the widest dtype of the inputs (`result_dtype`) and the first input's device."""
    if len(tensors) != len(weights) or not tensors:
        raise ValueError("linear_combination needs one weight per tensor and at least one tensor.")
    first = tensors[0]
    for t in tensors[1:]:
        if t.shape != first.shape:
            raise ValueError(f"Cannot combine tensors of shapes {tuple(first.shape)} and {tuple(t.shape)}.")
    out_dtype = result_dtype([t.dtype for t in tensors])
    acc_dtype = compute_dtype(out_dtype)
    out = first.to(dtype=acc_dtype) * float(weights[0])
    for t, w in zip(tensors[1:], weights[1:]):
        out += t.to(device=first.device, dtype=acc_dtype) * float(w)
    return out.to(out_dtype)


def combine_state_dicts(states, weights):
    """{key: Σ λᵢ stateᵢ[key]} for dicts of tensors sharing one set of keys (the linear merge)."""
    keys = list(states[0].keys())
    for state in states[1:]:
        if set(state.keys()) != set(keys):
            raise ValueError("Cannot combine tensor dicts with different keys.")
    return {key: linear_combination([state[key] for state in states], weights) for key in keys}
