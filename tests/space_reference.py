"""Plain dense float64 references for the merge spaces of the task-vector strategies (issue 18 items 1, 2),
written from the papers and the authors' code, knowing nothing of the library's implementation:

* the task-vector rule on a stack of matrices (trim / DARE × sum / TIES), numpy, entry by entry;
* Core Space (Panariello et al. 2025): dense ΔWᵢ = sᵢBᵢAᵢ, bases from numpy SVDs of the stacked unscaled
  factors, cores U_Bᵀ ΔWᵢ V_A, rule, U_B M V_Aᵀ;
* KnOTS (Stoica et al. 2025): the dense SVD of [ΔW₁ … ΔW_T], parts diag(S)·Vᵢᵀ, rule, U·P.

DARE's masks are drawn the library's documented way (`dare_mask`, one per task in order from one
generator), so both draw the same masks.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import torch

from adapter_merging.ops.task_vectors import dare_mask

EPS = np.finfo(np.float64).eps


def count(fraction: float, n: int) -> int:
    """⌈fraction·n⌉ on the exact decimal value of ``fraction``."""
    return min(n, math.ceil(Fraction(repr(float(fraction))) * n))


def band(matrix: np.ndarray, density: float, gamma: float = 0.0) -> np.ndarray:
    """Keep magnitude ranks G < rank ≤ min(N, G + K) (G = ⌈γN⌉, K = ⌈density·N⌉), ties by lower flat index."""
    flat = matrix.reshape(-1)
    n = flat.size
    order = np.lexsort((np.arange(n), -np.abs(flat)))  # by decreasing |x|, then index
    start = count(gamma, n) if gamma else 0
    keep = np.zeros(n, bool)
    keep[order[start : min(n, start + count(density, n))]] = True
    return np.where(keep, flat, 0.0).reshape(matrix.shape)


def sign_merge(trimmed, weights, method: str) -> np.ndarray:
    """TIES: elect on λᵢτ̂ᵢ (total: sign Σ; frequency: sign Σ sign), disjoint mean scaled to Σ|λᵢ|."""
    weighted = np.stack([w * t for w, t in zip(weights, trimmed)])
    votes = weighted.sum(0) if method == "total" else np.sign(weighted).sum(0)
    elected = np.sign(votes)
    agree = (np.sign(weighted) == elected) & (weighted != 0) & (elected != 0)
    mass = (agree * np.abs(np.asarray(weights, float))[:, None, None]).sum(0)
    numerator = (weighted * agree).sum(0)
    total = sum(abs(w) for w in weights)
    return np.where(mass > 0, total * numerator / np.where(mass > 0, mass, 1.0), 0.0)


def rule(strategy: str, matrices, weights, options, generator=None) -> np.ndarray:
    """The task-vector strategy on the list of float64 matrices (one per task)."""
    density = options.get("density", 0.2)
    gamma = options.get("gamma", 0.01)
    if strategy in ("ties", "magnitude_prune"):
        trimmed = [band(m, density) for m in matrices]
    elif strategy in ("breadcrumbs", "breadcrumbs_ties"):
        trimmed = [band(m, density, gamma) for m in matrices]
    elif strategy in ("dare_linear", "dare_ties"):
        trimmed = [np.where(dare_mask(m.shape, density, generator).numpy(), m / density, 0.0) for m in matrices]
    else:
        raise ValueError(strategy)
    if strategy in ("ties", "dare_ties", "breadcrumbs_ties"):
        return sign_merge(trimmed, weights, options.get("majority_sign_method", "total"))
    return sum(w * t for w, t in zip(weights, trimmed))


def _rank(s: np.ndarray, rows: int, cols: int) -> int:
    return int((s > max(rows, cols) * EPS * s.max()).sum())


def core_reference(strategy, factors, scalings, weights, options, generator=None) -> np.ndarray:
    """Core Space's merged update, densely: U_B M V_Aᵀ, M = rule(U_Bᵀ ΔWᵢ V_A)."""
    bs = [np.asarray(b, np.float64) for b, _ in factors]
    as_ = [np.asarray(a, np.float64) for _, a in factors]
    updates = [s * b @ a for b, a, s in zip(bs, as_, scalings)]
    b_cat, a_cat = np.concatenate(bs, 1), np.concatenate(as_, 0)
    u, sb, _ = np.linalg.svd(b_cat, full_matrices=False)
    _, sa, vh = np.linalg.svd(a_cat, full_matrices=False)
    u_b = u[:, : _rank(sb, *b_cat.shape)]
    v_a = vh[: _rank(sa, *a_cat.shape)].T
    cores = [u_b.T @ w @ v_a for w in updates]
    return u_b @ rule(strategy, cores, weights, options, generator) @ v_a.T


def knots_reference(strategy, factors, scalings, weights, options, generator=None) -> np.ndarray:
    """KnOTS' merged update, densely: U·P, P = rule(diag(S)·Vᵢᵀ) of the SVD of [ΔW₁ … ΔW_T]."""
    updates = [s * np.asarray(b, np.float64) @ np.asarray(a, np.float64) for (b, a), s in zip(factors, scalings)]
    d, k = updates[0].shape
    u, s, vh = np.linalg.svd(np.concatenate(updates, 1), full_matrices=False)
    p = _rank(s, d, len(updates) * k)
    parts = [s[:p, None] * vh[:p, i * k : (i + 1) * k] for i in range(len(updates))]
    return u[:, :p] @ rule(strategy, parts, weights, options, generator)


def random_factors(d, k, ranks, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(d, r, generator=generator, dtype=dtype), torch.randn(r, k, generator=generator, dtype=dtype))
            for r in ranks]


def relative(result, reference) -> float:
    result = np.asarray(result, np.float64)
    return float(np.linalg.norm(result - reference) / np.linalg.norm(reference))


# ----------------------------------------------------------------------------- tiny models
def lora_model(specs=((2, 4), (3, 3), (4, 16)), seed=0):
    """A tiny BERT adapters model with one randomised LoRA per (r, alpha): l0, l1, …"""
    from adapters import LoRAConfig

    from conftest import randomize_adapter, tiny_adapter_model

    model = tiny_adapter_model("bert", seed=seed)
    names = []
    for i, (r, alpha) in enumerate(specs):
        model.add_adapter(f"l{i}", config=LoRAConfig(r=r, alpha=alpha))
        randomize_adapter(model, f"l{i}", seed=100 * seed + i)
        names.append(f"l{i}")
    return model, names


def lora_paths(model, name):
    key = f".loras.{name}.lora_A"
    return sorted(n[: -len(key)] for n, _ in model.named_parameters() if n.endswith(key))


def lora_inputs(model, path, names):
    """([(Bᵢ, Aᵢ)] as float64 numpy, [sᵢ]) of the inputs' LoRA at ``path``, read from the parameters."""
    loras = model.get_submodule(path).loras
    factors = [(loras[n].lora_B.detach().double().numpy(), loras[n].lora_A.detach().double().numpy()) for n in names]
    return factors, [float(loras[n].scaling) for n in names]


def effective_update(model, path, name) -> np.ndarray:
    """ΔW (out × in) the LoRA layer at ``path`` applies with adapter ``name``: measured through the layer's
    forward pass on the identity input, in a float64 copy of the layer."""
    import copy

    module = model.get_submodule(path)
    x = torch.eye(module.in_features, dtype=torch.float64).unsqueeze(0)
    saved = model.adapters_config.active_setup
    try:
        with torch.no_grad():
            model.set_active_adapters(None)
            base = copy.deepcopy(module).double()(x)[0]
            model.set_active_adapters(name)
            return (copy.deepcopy(module).double()(x)[0] - base).T.numpy()
    finally:
        model.adapters_config.active_setup = saved


class ShapeRecorder:
    """Records the shape of every tensor any torch operation returns while active (a dispatch mode)."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        shapes = self.shapes = []

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                shapes.extend(tuple(t.shape) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)

    @property
    def largest(self) -> int:
        return max(math.prod(s) for s in self.shapes)


# the cases and inputs both spaces' tests run, and how they call a rule
CASES = {
    "ties-total": ("ties", {"density": 0.3}),
    "ties-frequency": ("ties", {"density": 0.45, "majority_sign_method": "frequency"}),
    "magnitude_prune": ("magnitude_prune", {"density": 0.27}),
    "breadcrumbs": ("breadcrumbs", {"density": 0.4, "gamma": 0.05}),
    "breadcrumbs_ties": ("breadcrumbs_ties", {"density": 0.35, "gamma": 0.1}),
    "dare_linear": ("dare_linear", {"density": 0.6, "seed": 7}),
    "dare_ties": ("dare_ties", {"density": 0.5, "seed": 3}),
}
# (d, k, ranks, scalings, weights): different ranks and scalings, negative weights
INPUTS = {
    "three": (40, 56, [2, 3, 5], [2.0, 1 / 3, 4.0], [0.7, -0.4, 0.5]),
    "four-wide": (24, 70, [1, 4, 2, 3], [1.0, 0.5, 8.0, 2.0], [-1.0, 0.3, 0.9, 0.25]),
}


def merge_in(space, strategy, factors, scalings, weights, options, scaling=0.5, dtype=torch.float64):
    """The strategy's rule on one module's factors in ``space`` (the `ModuleMerge`)."""
    from adapter_merging.strategies import get_strategy

    st = get_strategy(strategy)
    parsed = st.parse_options(None, {**options, "space": space})
    generator = torch.Generator().manual_seed(parsed["seed"]) if "seed" in parsed else None
    ranks = [b.shape[1] for b, _ in factors]
    return st.rule.decompose(factors, weights, scalings, ranks, scaling, dtype, parsed, generator)


def stored_update(merge, scaling=0.5):
    b, a = merge.stored
    return scaling * (b.double() @ a.double()).numpy()


def as_numpy(factors):
    return [(b.numpy(), a.numpy()) for b, a in factors]


def generator_for(options):
    return torch.Generator().manual_seed(options["seed"]) if "seed" in options else None
