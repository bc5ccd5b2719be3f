"""Linear combination of tensors: the merge rule shared by every adapter method."""
from __future__ import annotations

from typing import Sequence

import torch

#: dtypes that are merged in float32 and stored back in their own dtype.
LOW_PRECISION = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype merges are computed in: float32 for half precision, else the dtype itself."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def linear_combination(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Φ = Σ λᵢ Φᵢ, computed in float32 for half-precision inputs, returned in the inputs' dtype/device."""
    if len(tensors) != len(weights) or not tensors:
        raise ValueError("linear_combination needs one weight per tensor and at least one tensor.")
    first = tensors[0]
    for t in tensors[1:]:
        if t.shape != first.shape:
            raise ValueError(f"Cannot combine tensors of shapes {tuple(first.shape)} and {tuple(t.shape)}.")
    acc_dtype = compute_dtype(first.dtype)
    out = torch.zeros(first.shape, dtype=acc_dtype, device=first.device)
    for t, w in zip(tensors, weights):
        out.add_(t.to(device=first.device, dtype=acc_dtype), alpha=float(w))
    return out.to(first.dtype)


def combine_state_dicts(states, weights):
    """{key: Σ λᵢ stateᵢ[key]} for dicts of tensors sharing one set of keys (the linear merge)."""
    keys = list(states[0].keys())
    for state in states[1:]:
        if set(state.keys()) != set(keys):
            raise ValueError("Cannot combine tensor dicts with different keys.")
    return {key: linear_combination([state[key] for state in states], weights) for key in keys}
