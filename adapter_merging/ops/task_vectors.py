"""Task-vector merges on dense updates: task arithmetic, TIES, DARE, magnitude pruning, Breadcrumbs.

All functions act on the dense updates of ONE layer, stacked as ``tasks`` of shape (n, *shape)
(τᵢ = tasks[i] = ΔWᵢ), with one merge weight λᵢ per task (any sign). They are computed in the
dtype of ``tasks`` (the caller passes float32 or float64) and return a tensor of the task shape.

Notation: τ̂ᵢ is a trimmed (or dropped and rescaled) task, λᵢτ̂ᵢ its weighted form, γ the elected
sign, ⊙ the element-wise product. Ranks by magnitude are broken deterministically: among equal
|x| the entry with the lower flat (row-major) index ranks first.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from numbers import Real
from typing import List, Optional, Sequence, Union

import numpy as np
import torch

from .linear import linear_combination

#: valid ``majority_sign_method`` values of TIES / DARE-TIES sign election.
SIGN_METHODS = ("total", "frequency")


# --------------------------------------------------------------------------- validation


def _real(name: str, value, expected: str, example: str) -> float:
    """``value`` as a float if it is a real number (not a bool); else a TypeError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number in {expected}, got {value!r}. {example}")
    return float(value)


def check_density(density: float) -> float:
    """Validate the fraction of entries kept: a finite number with 0 < density ≤ 1 (TypeError for
    a value that is not a number, ValueError for one out of range)."""
    example = "Pass e.g. density=0.2 to keep 20% of the entries, or density=1 to keep all of them."
    value = _real("density", density, "(0, 1]", example)
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise ValueError(f"density must be a finite number in (0, 1], got {density!r}. {example}")
    return value


def check_gamma(gamma: float) -> float:
    """Validate the Breadcrumbs top-magnitude fraction dropped: a finite number with 0 ≤ gamma < 1."""
    example = "Pass e.g. gamma=0.01 to drop the largest 1% of the entries, or gamma=0 to drop none."
    value = _real("gamma", gamma, "[0, 1)", example)
    if not (math.isfinite(value) and 0.0 <= value < 1.0):
        raise ValueError(f"gamma must be a finite number in [0, 1) (gamma=1 would drop every entry), got {gamma!r}. {example}")
    return value


def check_sign_method(method: str) -> str:
    """Validate the TIES sign-election method: one of ``"total"`` or ``"frequency"``."""
    if method not in SIGN_METHODS:
        raise ValueError(
            f"Unknown majority_sign_method {method!r}: use 'total' (sign of the weighted sum) "
            "or 'frequency' (sign of the sum of signs)."
        )
    return method


def _check_tasks(tasks: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """λ as a tensor of shape (n, 1, …, 1) in the dtype/device of ``tasks``, broadcastable against it."""
    if not isinstance(tasks, torch.Tensor) or tasks.ndim < 1 or tasks.shape[0] == 0:
        raise ValueError("tasks must be a tensor of shape (n, *shape) stacking n ≥ 1 task updates.")
    if not tasks.is_floating_point():
        raise ValueError(f"tasks must be a floating-point tensor, got dtype {tasks.dtype}.")
    weights = list(weights)
    if len(weights) != tasks.shape[0]:
        raise ValueError(
            f"Got {len(weights)} weights for {tasks.shape[0]} tasks: pass one weight per task."
        )
    lam = torch.tensor([float(w) for w in weights], dtype=tasks.dtype, device=tasks.device)
    return lam.view(-1, *([1] * (tasks.ndim - 1)))


#: the definitions a task-vector strategy follows (its ``convention`` option): ours, or mergekit 0.1.5's
OURS, MERGEKIT = "adapter_merging", "mergekit"
CONVENTIONS = (OURS, MERGEKIT)


def check_convention(convention: str) -> str:
    """Validate a ``convention``: ``"adapter_merging"`` (ours) or ``"mergekit"`` (mergekit 0.1.5's)."""
    if convention not in CONVENTIONS:
        raise ValueError(
            f"Unknown convention {convention!r}: use 'adapter_merging' (this library's definitions) or "
            "'mergekit' (mergekit 0.1.5's kept counts, TIES divisor and DARE mask)."
        )
    return convention


def rank_window(numel: int, density: float, gamma: float, convention: str = OURS, band: bool = False):
    """(start, stop): the magnitude ranks start+1 … stop of a task of ``numel`` entries are kept.

    * ours: start = ⌈gamma·N⌉ (0 without gamma), stop = min(N, start + ⌈density·N⌉) (`magnitude_mask`,
      `breadcrumbs_mask`);
    * mergekit 0.1.5, magnitude (``band`` False, TIES): everything if density ≥ 1, else the top
      max(1, ⌊density·N⌋);
    * mergekit 0.1.5, magnitude with outliers (``band`` True, breadcrumbs): everything if density ≥ 1,
      else K = ⌊density·N⌋ entries below the top ⌊gamma·N⌋, the top dropped shrinking where
      ⌊gamma·N⌋ + K > N (the K smallest are kept then)."""
    if check_convention(convention) == OURS:
        start = _count(gamma, numel) if gamma else 0
        return start, min(numel, start + _count(density, numel))
    if density >= 1:
        return 0, numel
    if not band:
        return 0, min(numel, max(1, int(density * numel)))
    kept = int(density * numel)
    start = min(int(gamma * numel), numel - kept)
    return start, start + kept


def _count(fraction: float, numel: int) -> int:
    """ceil(fraction·numel) clamped to [0, numel]; a 1e-12 relative guard keeps products such as
    0.07·100 = 7.000000000000001 from rounding up to an extra entry."""
    return max(0, min(numel, math.ceil(fraction * numel * (1.0 - 1e-12))))


def _top_mask(magnitude: torch.Tensor, count: int) -> torch.Tensor:
    """Boolean mask of the ``count`` largest entries of the flat ``magnitude``; among equal values
    the lower index ranks first. A selection, not a sort: with v the count-th largest value
    (``kthvalue``), keep every entry > v and the first (count − #{> v}) entries equal to v.
    O(N) time and no N-long index tensor, unlike an argsort."""
    n = magnitude.numel()
    if count <= 0:
        return torch.zeros(n, dtype=torch.bool, device=magnitude.device)
    if count >= n:
        return torch.ones(n, dtype=torch.bool, device=magnitude.device)
    threshold = torch.kthvalue(magnitude, n - count + 1).values
    mask = magnitude > threshold
    missing = count - int(mask.sum())
    mask[torch.nonzero(magnitude == threshold).flatten()[:missing]] = True
    return mask


def _apply_mask(task: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """m ⊙ τ as a selection (exact zeros where m is False, even for non-finite τ)."""
    return torch.where(mask, task, torch.zeros_like(task))


def _rank_window_mask(task: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Boolean mask of the entries ranked start+1 … stop by decreasing |x| (1-based ranks; ties
    keep the lower flat index first; NaN ranks as the largest magnitude, like +inf)."""
    magnitude = task.detach().abs().reshape(-1)
    magnitude = torch.where(torch.isnan(magnitude), torch.full_like(magnitude, math.inf), magnitude)
    mask = _top_mask(magnitude, stop)
    if start > 0:
        mask &= ~_top_mask(magnitude, start)
    return mask.view(task.shape)


# --------------------------------------------------------------------------- masks


def magnitude_mask(task: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the K = ceil(density·numel) largest-|x| entries of one task tensor: m[p] = [rank(|τ[p]|) ≤ K].

    Ties are broken by flat index (lower first), so the mask always has exactly K entries;
    density=1 keeps all of them.
    """
    density = check_density(density)
    return _rank_window_mask(task, 0, _count(density, task.numel()))


def breadcrumbs_mask(task: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs mask (Davari & Belilovsky 2023): drop the outliers, keep the next band.

    With N = numel, G = ceil(gamma·N) and K = ceil(density·N), the entries of magnitude rank
    G < rank ≤ min(N, G + K) are kept, i.e. the top ``gamma`` fraction and everything below the
    next ``density`` fraction are dropped (gamma + density clipped at 1). gamma=0 gives
    `magnitude_mask`.
    """
    density = check_density(density)
    gamma = check_gamma(gamma)
    n = task.numel()
    start = _count(gamma, n)
    return _rank_window_mask(task, start, min(n, start + _count(density, n)))


#: 64-bit outputs of the bit generator drawn at a time when making a DARE mask
_DARE_BLOCK = 1 << 20


def dare_bits(numel: int, density: float, generator: Optional[torch.Generator] = None) -> np.ndarray:
    """A DARE keep mask of ``numel`` entries, packed 8 to a byte (``numpy.packbits`` order).

    m[p] = [u[p] < t], t = round(density·2³²) (t = 2³² keeps everything): u are the 32-bit halves
    (little-endian) of the raw 64-bit outputs of a PCG64 bit generator, seeded with a 63-bit integer
    drawn from ``generator`` (or from torch's global generator if None). PCG64's raw stream is fixed
    by numpy's stability policy, so one seed gives one mask on every machine; and it is 4–5× faster
    than float64 uniforms from torch (measured: 0.07 s against 0.33 s for 45 M entries), which
    dominated DARE's cost."""
    return dare_bits_many(numel, [density], generator)[0]


def dare_bits_many(numel: int, densities: Sequence[float], generator: Optional[torch.Generator] = None) -> List[np.ndarray]:
    """`dare_bits` of one size for each density in turn: the seeds drawn from ``generator`` in order,
    the masks made in parallel (numpy releases the GIL; up to ``torch.get_num_threads()`` threads),
    so the result is that of drawing them one after another."""
    densities = [check_density(density) for density in densities]
    seeds = [int(torch.randint(0, 2**63 - 1, (1,), generator=generator, dtype=torch.int64)) for _ in densities]
    workers = max(1, min(len(seeds), torch.get_num_threads()))
    if workers == 1:
        return [_pcg64_mask(numel, density, seed) for density, seed in zip(densities, seeds)]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(_pcg64_mask, [numel] * len(seeds), densities, seeds))


def _pcg64_mask(numel: int, density: float, seed: int) -> np.ndarray:
    stream = np.random.PCG64(seed)
    threshold = round(density * 2**32)
    packed, left = [], numel
    while left > 0:
        raw = stream.random_raw(min(_DARE_BLOCK, (left + 1) // 2)).astype("<u8", copy=False).view("<u4")[:left]
        packed.append(np.packbits(raw < np.uint32(threshold) if threshold < 2**32 else np.ones(raw.shape, bool)))
        left -= raw.size
    return np.concatenate(packed) if packed else np.zeros(0, np.uint8)


def unpack_bits(packed: np.ndarray, offset: int, count: int) -> torch.Tensor:
    """Entries [offset, offset + count) of a packed mask, as a bool tensor."""
    first, last = offset // 8, -(-(offset + count) // 8)
    bits = np.unpackbits(packed[first:last])[offset % 8 : offset % 8 + count]
    return torch.from_numpy(bits.astype(bool))


def dare_mask(
    shape: Sequence[int] | torch.Size, density: float, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """DARE keep mask (Yu et al. 2024): m[p] ~ Bernoulli(density) i.i.d. (to 2⁻³²), drawn by
    `dare_bits` from ``generator`` (one 63-bit seed per mask), in row-major order, on the CPU (the
    caller moves it to its device). density=1 keeps every entry."""
    shape = tuple(shape)
    numel = math.prod(shape)
    return unpack_bits(dare_bits(numel, density, generator), 0, numel).reshape(shape)


# --------------------------------------------------------------------------- DELLA's MAGPRUNE


def check_epsilon(epsilon: float) -> float:
    """Validate MAGPRUNE's half-width of the keep probabilities: a finite number ≥ 0 (TypeError for a
    value that is not a number, ValueError for one out of range; the window around the density is
    checked by `check_magprune_window`)."""
    example = "Pass e.g. epsilon=0.15: keep probabilities from density − 0.15 to density + 0.15."
    value = _real("epsilon", epsilon, "[0, 0.5]", example)
    if not (math.isfinite(value) and 0.0 <= value <= 0.5):
        raise ValueError(f"epsilon must be a finite number in [0, 0.5], got {epsilon!r}. {example}")
    return value


def per_task_epsilon(epsilon, n: int) -> List[float]:
    """One validated epsilon per task: a number for every task, or a sequence of n (mergekit's per-model epsilon)."""
    if isinstance(epsilon, (str, bytes)) or not isinstance(epsilon, Sequence):
        return [check_epsilon(epsilon)] * n
    if len(epsilon) != n:
        raise ValueError(f"epsilon has {len(epsilon)} values for {n} inputs: pass one number, or one per input.")
    return [check_epsilon(e) for e in epsilon]


def check_magprune_window(density, epsilon) -> None:
    """MAGPRUNE keeps entries with probabilities from density − epsilon to density + epsilon: both ends
    must lie in [0, 1] (density = 1 keeps everything and ignores epsilon, as mergekit does). Numbers or
    per-input sequences (pairs checked where both are sequences of one length; others at merge time)."""
    densities = list(density) if isinstance(density, (list, tuple)) else None
    epsilons = list(epsilon) if isinstance(epsilon, (list, tuple)) else None
    if densities is None and epsilons is None:
        pairs = [(density, epsilon)]
    elif densities is None:
        pairs = [(density, e) for e in epsilons]
    elif epsilons is None:
        pairs = [(d, epsilon) for d in densities]
    elif len(densities) == len(epsilons):
        pairs = list(zip(densities, epsilons))
    else:
        return  # per_task_density / per_task_epsilon refuse the lengths when merging
    for d, e in pairs:
        d, e = check_density(d), check_epsilon(e)
        if d < 1 and not (-1e-12 <= d - e and d + e <= 1.0 + 1e-12):  # decimal inputs: 0.7 + 0.3 is 1
            raise ValueError(
                f"MAGPRUNE keeps entries with probabilities from density − epsilon to density + epsilon, which "
                f"must lie in [0, 1]: density={d:g}, epsilon={e:g} gives [{d - e:g}, {d + e:g}]. Pass epsilon ≤ "
                f"{min(d, 1 - d):g} (or density=1 to keep everything)."
            )


def _ascending_columns(values: torch.Tensor, finite: bool = False) -> np.ndarray:
    """Per row of ``values`` (rows × k), its column indices by increasing magnitude |x|; equal magnitudes:
    the higher column first (so the lower column ranks as the larger); NaN as +inf. float32 by one
    unstable sort of unique int64 keys (the bits of |x|, then the reversed column), several times faster
    than a stable sort; other dtypes by numpy's stable sort of the reversed columns. ``finite``: the
    caller knows there is no NaN."""
    rows, k = values.shape
    m = values.detach().cpu()
    if not finite:
        m = torch.nan_to_num(m.abs(), nan=math.inf)
    if m.dtype == torch.float32:
        keys = (m.contiguous().numpy().view(np.int32) & np.int32(0x7FFFFFFF)).astype(np.int64)  # bits of |x|
        keys <<= 32
        keys |= np.arange(k - 1, -1, -1, dtype=np.int64)
        return np.argsort(keys, axis=1)
    reversed_ = np.abs(m.double().numpy()[:, ::-1])
    return (k - 1) - np.argsort(reversed_, axis=1, kind="stable")


def magprune_probabilities(values: torch.Tensor, density: float, epsilon: float, finite: bool = False) -> torch.Tensor:
    """DELLA's keep probabilities of each row of ``values`` (rows × k; magnitudes or the values
    themselves), float64 on the CPU: the entries of a row ranked by increasing |x|, ρ = 0 … k−1,
    p = (density − ε) + 2ε·ρ/(k − 1) (p = density if k = 1). Equal magnitudes: the lower column index
    ranks as the larger (NaN as +inf)."""
    rows, k = values.shape
    if k == 1:
        return torch.full((rows, 1), float(density), dtype=torch.float64)
    by_rank = (float(density) - float(epsilon)) + np.arange(k, dtype=np.float64) / (k - 1) * (2.0 * float(epsilon))
    np.clip(by_rank, 0.0, 1.0, out=by_rank)
    p = np.empty((rows, k), dtype=np.float64)
    np.put_along_axis(p, _ascending_columns(values, finite), by_rank[None, :], axis=1)
    return torch.from_numpy(p)


def magprune_seeds(n: int, generator: Optional[torch.Generator] = None) -> List[int]:
    """One 63-bit seed per task, drawn from ``generator`` in task order exactly as `dare_bits_many` draws
    its seeds (so MAGPRUNE with epsilon = 0 draws DARE's masks)."""
    return [int(torch.randint(0, 2**63 - 1, (1,), generator=generator, dtype=torch.int64)) for _ in range(n)]


def pcg64_uniforms(seed: int, offset: int, count: int) -> np.ndarray:
    """The 32-bit uniforms u[offset … offset + count) of `dare_bits`' stream for ``seed``: the raw 64-bit
    outputs of numpy's PCG64 split into 32-bit halves, low half first, one per entry in row-major order.
    Any range, without drawing what comes before it (``PCG64.advance``)."""
    stream = np.random.PCG64(seed)
    if offset // 2:
        stream.advance(offset // 2)
    skip = offset % 2
    raw = stream.random_raw((skip + count + 1) // 2).astype("<u8", copy=False).view("<u4")
    return raw[skip : skip + count]


def magprune_keep(uniforms: np.ndarray, probabilities) -> torch.Tensor:
    """m = u < round(p·2³²), elementwise (DARE's rule with a probability per entry), as a bool tensor of
    the shape of ``probabilities`` (on the CPU). u and round(p·2³²) are integers exact in float64."""
    p = probabilities.detach().double().cpu().numpy() if isinstance(probabilities, torch.Tensor) else probabilities
    keep = uniforms.reshape(p.shape) < np.rint(p * 2.0**32)
    return torch.from_numpy(keep)


def magprune(
    tasks: torch.Tensor,
    density: Density,
    epsilon,
    generator: Optional[torch.Generator] = None,
    divide: bool = True,
) -> torch.Tensor:
    """DELLA's MAGPRUNE (Deep et al. 2024) on dense tasks (n, d, k): per row of each task, keep entry p
    with probability p[p] = `magprune_probabilities` (larger magnitude, higher probability), the mask
    `magprune_keep` of the uniforms `pcg64_uniforms` of the task's seed (`magprune_seeds`); τ̂ᵢ = mᵢ ⊙ τᵢ / p
    (``divide``; mergekit's convention: mᵢ ⊙ τᵢ). density = 1 keeps everything (the seeds are still drawn)."""
    n, d, k = tasks.shape
    densities, epsilons = per_task_density(density, n), per_task_epsilon(epsilon, n)
    seeds = magprune_seeds(n, generator)
    out = torch.empty_like(tasks)
    for i, task in enumerate(tasks):
        check_magprune_window(densities[i], epsilons[i])
        if densities[i] >= 1:
            out[i] = task
            continue
        p = magprune_probabilities(task.abs(), densities[i], epsilons[i])
        keep = magprune_keep(pcg64_uniforms(seeds[i], 0, d * k), p)
        keep, p = keep.to(task.device), p.to(device=task.device, dtype=task.dtype)
        kept = task / p if divide else task
        out[i] = torch.where(keep, kept, torch.zeros_like(task))
    return out


# --------------------------------------------------------------------------- TIES building blocks


def elect_sign(weighted_tasks: torch.Tensor, method: str = "total") -> torch.Tensor:
    """TIES sign election on the weighted trimmed tasks λᵢτ̂ᵢ (stacked on dim 0):

    * ``"total"``:     γ = sign(Σᵢ λᵢτ̂ᵢ)
    * ``"frequency"``: γ = sign(Σᵢ sign(λᵢτ̂ᵢ))

    Returns γ ∈ {−1, 0, +1} with the task shape and the input dtype. Where γ = 0 (a tie, or all
    entries zero) no sign is elected and `disjoint_merge` yields 0 there.
    """
    method = check_sign_method(method)
    votes = weighted_tasks.unbind(0) if method == "total" else [torch.sign(t) for t in weighted_tasks]
    total = votes[0].clone()
    for vote in votes[1:]:  # Σ in task order (as linear_combination with weights 1 sums)
        total += vote
    return torch.sign(total)


def disjoint_merge(
    weighted_tasks: torch.Tensor, elected_sign: torch.Tensor, weights: Sequence[float]
) -> torch.Tensor:
    """Weighted disjoint mean of the entries that agree with the elected sign.

    With A_p = {i : sign(λᵢτ̂ᵢ[p]) = γ[p] and τ̂ᵢ[p] ≠ 0} (so A_p = ∅ where γ[p] = 0),

        τ_m[p] = (Σᵢ |λᵢ|) · Σ_{i∈A_p} λᵢτ̂ᵢ[p] / Σ_{i∈A_p} |λᵢ|        (0 where A_p = ∅).

    With equal weights λᵢ = 1/n this is exactly the disjoint mean of TIES (Yadav et al. 2023),
    the mean of the agreeing non-zero τ̂ᵢ[p]. When no sign conflicts and every τ̂ᵢ[p] ≠ 0 it is
    plain task arithmetic Σᵢ λᵢτ̂ᵢ. A task whose entry is 0 is left out of A_p, so the others are
    rescaled to the full weight mass Σᵢ |λᵢ| (the TIES convention).

    On finite tasks the agreement is computed as a number, aᵢ = sign(max(x·γ, 0)) ∈ {0, 1}, and the
    sums as Σ x·aᵢ and Σ |λᵢ|·aᵢ: the same values as the boolean selection, in a few arithmetic passes
    (boolean and masked operations are several times slower on the CPU); non-finite tasks take the
    selection itself, whose rules for NaN (never agreeing) the arithmetic would not keep.
    """
    lam = _check_tasks(weighted_tasks, weights).reshape(-1).abs()
    if not math.isfinite(float(weighted_tasks.sum())):
        return _disjoint_merge_selecting(weighted_tasks, elected_sign, lam)
    numerator = torch.zeros_like(weighted_tasks[0])
    mass = torch.zeros_like(weighted_tasks[0])
    agree = torch.empty_like(weighted_tasks[0])
    for task, weight in zip(weighted_tasks, lam):  # one task at a time: no n × shape temporaries
        torch.mul(task, elected_sign, out=agree).clamp_(min=0).sign_()  # 1 where sign(x) = γ ≠ 0, else 0
        numerator.addcmul_(task, agree)
        mass.add_(agree * weight)
    nonzero = lam[lam > 0]
    smallest = float(nonzero.min()) if nonzero.numel() else 1.0
    # where mass > 0 it is ≥ the smallest weight, so the clamp changes nothing there; where it is 0,
    # so is the numerator, and the result is 0 either way
    return lam.sum() * numerator / mass.clamp_(min=smallest)


def _disjoint_merge_selecting(weighted_tasks: torch.Tensor, elected_sign: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    numerator = torch.zeros_like(weighted_tasks[0])
    mass = torch.zeros_like(weighted_tasks[0])
    for task, weight in zip(weighted_tasks, lam):
        agree = task * elected_sign > 0  # sign(x) = γ ≠ 0 (false for x = 0, γ = 0 and NaN)
        numerator += torch.where(agree, task, 0.0)
        mass += agree * weight
    total_mass = lam.sum()
    safe = torch.where(mass > 0, mass, 1.0)
    return torch.where(mass > 0, total_mass * numerator / safe, 0.0)


# --------------------------------------------------------------------------- sparsification × consensus
#
# Every strategy below is a sparsification of each task (which entries of τᵢ survive, and how they
# are rescaled) followed by a consensus (how the surviving λᵢτ̂ᵢ are combined), after the
# generalized task arithmetic of mergekit. A new strategy is a new pair.


def _trim(tasks: torch.Tensor, mask_of) -> torch.Tensor:
    """τ̂ᵢ = mask_of(i, τᵢ) ⊙ τᵢ for each task, into one new tensor of the shape of ``tasks``."""
    trimmed = torch.empty_like(tasks)
    for i, task in enumerate(tasks):
        trimmed[i] = _apply_mask(task, mask_of(i, task))
    return trimmed


def keep_all(tasks: torch.Tensor) -> torch.Tensor:
    """No sparsification: τ̂ᵢ = τᵢ (a fresh tensor the consensus may overwrite)."""
    return tasks.clone()


Density = Union[float, Sequence[float]]


def per_task_density(density: Density, n: int) -> List[float]:
    """One validated density per task: a number for every task, or a sequence of n (mergekit's
    per-model density)."""
    if isinstance(density, (str, bytes)) or not isinstance(density, Sequence):
        return [check_density(density)] * n
    if len(density) != n:
        raise ValueError(f"density has {len(density)} values for {n} inputs: pass one number, or one per input.")
    return [check_density(d) for d in density]


def per_task_gamma(gamma, n: int) -> List[float]:
    """One validated gamma per task: a number for every task, or a sequence of n (mergekit's per-model gamma)."""
    if isinstance(gamma, (str, bytes)) or not isinstance(gamma, Sequence):
        return [check_gamma(gamma)] * n
    if len(gamma) != n:
        raise ValueError(f"gamma has {len(gamma)} values for {n} inputs: pass one number, or one per input.")
    return [check_gamma(g) for g in gamma]


def keep_largest(tasks: torch.Tensor, density: Density) -> torch.Tensor:
    """τ̂ᵢ = magnitude_mask(τᵢ, densityᵢ) ⊙ τᵢ: the top ``density`` magnitudes of each task (TIES trim)."""
    densities = per_task_density(density, tasks.shape[0])
    return _trim(tasks, lambda i, task: magnitude_mask(task, densities[i]))


def keep_band(tasks: torch.Tensor, density: Density, gamma: float) -> torch.Tensor:
    """τ̂ᵢ = breadcrumbs_mask(τᵢ, densityᵢ, gamma) ⊙ τᵢ: drop the top ``gamma``, keep the next ``density``."""
    densities, gamma = per_task_density(density, tasks.shape[0]), check_gamma(gamma)
    return _trim(tasks, lambda i, task: breadcrumbs_mask(task, densities[i], gamma))


def drop_and_rescale(tasks: torch.Tensor, density: Density, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """DARE: τ̂ᵢ = mᵢ ⊙ τᵢ / densityᵢ with one mask mᵢ ~ Bernoulli(densityᵢ) drawn per task in order
    i = 0 … n−1 from ``generator``."""
    densities = per_task_density(density, tasks.shape[0])
    dropped = torch.empty_like(tasks)
    for i, density_i in enumerate(densities):
        keep = dare_mask(tasks.shape[1:], density_i, generator).to(tasks.device)
        dropped[i] = torch.where(keep, tasks[i] / density_i, torch.zeros_like(tasks[i]))
    return dropped


def weighted_sum(trimmed: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """Consensus of task arithmetic: τ_m = Σᵢ λᵢτ̂ᵢ."""
    _check_tasks(trimmed, weights)
    return linear_combination(trimmed.unbind(0), weights)


def sign_consensus(trimmed: torch.Tensor, weights: Sequence[float], majority_sign_method: str = "total") -> torch.Tensor:
    """Consensus of TIES: γ = elect_sign(λτ̂, method), τ_m = disjoint_merge(λτ̂, γ, λ). Weights
    ``trimmed`` in place (a fresh tensor of the caller's)."""
    lam = _check_tasks(trimmed, weights)
    check_sign_method(majority_sign_method)
    weighted = trimmed.mul_(lam)
    return disjoint_merge(weighted, elect_sign(weighted, majority_sign_method), weights)


# --------------------------------------------------------------------------- the named strategies


def task_arithmetic(tasks: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """Task arithmetic (Ilharco et al. 2023): τ_m = Σᵢ λᵢτᵢ."""
    _check_tasks(tasks, weights)
    return linear_combination(tasks.unbind(0), weights)


def ties(
    tasks: torch.Tensor, weights: Sequence[float], density: float, majority_sign_method: str = "total"
) -> torch.Tensor:
    """TIES merging (Yadav et al. 2023): `keep_largest` then `sign_consensus`."""
    _check_tasks(tasks, weights)
    check_density(density)
    check_sign_method(majority_sign_method)
    return sign_consensus(keep_largest(tasks, density), weights, majority_sign_method)


def dare_linear(
    tasks: torch.Tensor, weights: Sequence[float], density: float, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """DARE (Yu et al. 2024) with a linear merge: `drop_and_rescale` then `weighted_sum`;
    E[τ_m] = Σᵢ λᵢτᵢ."""
    _check_tasks(tasks, weights)
    return weighted_sum(drop_and_rescale(tasks, density, generator), weights)


def dare_ties(
    tasks: torch.Tensor,
    weights: Sequence[float],
    density: float,
    generator: Optional[torch.Generator] = None,
    majority_sign_method: str = "total",
) -> torch.Tensor:
    """DARE drop and rescale, then TIES sign election and disjoint merge: `drop_and_rescale` then
    `sign_consensus`."""
    _check_tasks(tasks, weights)
    check_density(density)
    check_sign_method(majority_sign_method)
    return sign_consensus(drop_and_rescale(tasks, density, generator), weights, majority_sign_method)


def magnitude_prune(tasks: torch.Tensor, weights: Sequence[float], density: float) -> torch.Tensor:
    """Magnitude pruning: `keep_largest` then `weighted_sum`, τ_m = Σᵢ λᵢ (magnitude_mask(τᵢ) ⊙ τᵢ)."""
    _check_tasks(tasks, weights)
    return weighted_sum(keep_largest(tasks, density), weights)


def breadcrumbs(tasks: torch.Tensor, weights: Sequence[float], density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs: `keep_band` then `weighted_sum`."""
    _check_tasks(tasks, weights)
    return weighted_sum(keep_band(tasks, density, gamma), weights)


__all__ = [
    "SIGN_METHODS",
    "OURS",
    "MERGEKIT",
    "CONVENTIONS",
    "check_convention",
    "rank_window",
    "per_task_gamma",
    "keep_all",
    "keep_largest",
    "keep_band",
    "drop_and_rescale",
    "weighted_sum",
    "sign_consensus",
    "check_density",
    "check_gamma",
    "check_sign_method",
    "magnitude_mask",
    "breadcrumbs_mask",
    "dare_mask",
    "dare_bits",
    "dare_bits_many",
    "unpack_bits",
    "elect_sign",
    "disjoint_merge",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "magnitude_prune",
    "breadcrumbs",
    "check_epsilon",
    "per_task_epsilon",
    "check_magprune_window",
    "magprune_probabilities",
    "magprune_seeds",
    "pcg64_uniforms",
    "magprune_keep",
    "magprune",
]
