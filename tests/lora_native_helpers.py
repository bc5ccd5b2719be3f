"""Helpers of the tests of the LoRA-native strategies (tsv, star): random factors, a rule called on
them, and the updates a tiny model's LoRA layers apply, measured through their forward pass."""
from __future__ import annotations

import copy
import math
from typing import Dict, List, Sequence, Tuple

import torch
from adapters import LoRAConfig

from adapter_merging.strategies import get_strategy

from conftest import randomize_adapter, tiny_adapter_model


def random_factors(seed: int, d: int, k: int, ranks: Sequence[int]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """(Bᵢ d × rᵢ, Aᵢ rᵢ × k) in float64 with independent normal entries."""
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(d, r, generator=generator, dtype=torch.float64), torch.randn(r, k, generator=generator, dtype=torch.float64))
        for r in ranks
    ]


def dense_updates(factors, scalings) -> List[torch.Tensor]:
    """ΔWᵢ = sᵢ Bᵢ Aᵢ, dense float64 (tests only)."""
    return [float(s) * b.double() @ a.double() for (b, a), s in zip(factors, scalings)]


def run_rule(strategy: str, factors, weights, scalings, scaling: float = 1.0, dtype=torch.float64, **options):
    """(ModuleMerge, the stored update scaling·B·A dense) of ``strategy``'s rule on one module."""
    chosen = get_strategy(strategy)
    parsed = chosen.parse_options(options.pop("svd_rank", None), options)
    ranks = [b.shape[1] for b, _ in factors]
    merge = chosen.rule.decompose(factors, list(weights), list(scalings), ranks, scaling, dtype, parsed, None)
    b, a = merge.stored
    return merge, scaling * b.double() @ a.double()


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    ref_norm = float(torch.linalg.matrix_norm(ref))
    diff = float(torch.linalg.matrix_norm(x - ref))
    if ref_norm == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / ref_norm


def best_rank(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """Eckart–Young: the best rank-``rank`` approximation of ``matrix`` (dense SVD)."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


# ----------------------------------------------------------------------------- tiny models
def lora_model(specs, seed: int = 0, arch: str = "bert", **lora_kwargs):
    """A tiny model with one randomised LoRA per (r, alpha) in ``specs``, named l0, l1, …"""
    model = tiny_adapter_model(arch, seed=seed)
    names = []
    for i, (r, alpha) in enumerate(specs):
        name = f"l{i}"
        model.add_adapter(name, config=LoRAConfig(r=r, alpha=alpha, **lora_kwargs))
        randomize_adapter(model, name, seed=100 * seed + i)
        names.append(name)
    return model, names


def lora_paths(model, name: str) -> List[str]:
    key = f".loras.{name}.lora_A"
    return sorted(n[: -len(key)] for n, _ in model.named_parameters() if n.endswith(key))


def effective_updates(model, path: str, names) -> Dict[str, torch.Tensor]:
    """{name: ΔW (out × in, float64)} the LoRA layer at ``path`` applies for each adapter, measured
    through the layer's forward pass on the identity input (in a float64 copy of the layer)."""
    module = model.get_submodule(path)
    x = torch.eye(module.in_features, dtype=torch.float64).unsqueeze(0)
    saved = model.adapters_config.active_setup
    try:
        with torch.no_grad():
            model.set_active_adapters(None)
            base = copy.deepcopy(module).double()(x)[0]
            out = {}
            for name in names:
                model.set_active_adapters(name)
                out[name] = (copy.deepcopy(module).double()(x)[0] - base).T.contiguous()
    finally:
        model.adapters_config.active_setup = saved
    return out
