"""Task-vector merges row chunk by row chunk: the definitions of `task_vectors`, without n dense tasks.

The tasks τᵢ (d × k) are given by a `Tasks` object that computes any rows of any task on demand — for
LoRA updates τᵢ = sᵢ·Bᵢ·Aᵢ, a c × r by r × k product per chunk of c rows — so the merge holds
O(chunk × n) of them at a time, plus the d × k result. Per layer it makes two passes over the rows:

1. **selection** (magnitude-based sparsifications): the K-th largest |τᵢ| of each task, exactly,
   without a full selection: a random sample of entries brackets it in [t_lo, t_hi]; one pass counts
   the entries above t_hi and keeps the few in [t_lo, t_hi] with their flat index; the exact K-th
   value (and, among entries equal to it, the lowest-indexed ones to keep) is selected among those.
   If the bracket misses (improbable), the task's magnitudes are selected in full, as before. DARE's
   random masks are drawn here, task after task (as `dare_mask` draws them), and kept packed.
2. **merge**: each chunk of every task, its mask, and the consensus (`weighted_sum`,
   `sign_consensus`) applied to the chunk.

Given the same τᵢ the result is bit-identical to the dense functions of `task_vectors` (the same
masks, the same arithmetic on each entry). On finite chunks the masks are applied as 0/1 numbers
computed by arithmetic, into buffers reused from chunk to chunk: on the CPU a comparison producing
booleans costs several arithmetic passes and a fresh allocation of a chunk-sized tensor more still.
Chunks holding NaN or ±inf take the boolean selections of `task_vectors` themselves.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .linear import linear_combination
from .task_vectors import (
    MERGEKIT,
    OURS,
    check_convention,
    dare_bits_many,
    per_task_gamma,
    rank_window,
    unpack_bits,
    check_sign_method,
    disjoint_merge,
    elect_sign,
    per_task_density,
    weighted_sum,
    check_magprune_window,
    magprune_keep,
    magprune_probabilities,
    magprune_seeds,
    pcg64_uniforms,
    per_task_epsilon,
)

#: entries per chunk of rows (a chunk of every task and its temporaries stay in the CPU's caches)
CHUNK_ENTRIES = 1 << 18
#: entries sampled per task to bracket a selection threshold
SAMPLE_ENTRIES = 1 << 18
#: a task held densely in memory with at most this many entries is selected exactly over all of them
#: (one kthvalue): cheaper than sampling SAMPLE_ENTRIES of it to bracket the threshold (KnOTS' parts)
SELECT_IN_FULL_BELOW = 1 << 22


class Tasks:
    """n tasks of shape (d, k), computed on demand. Subclasses define `rows_into` and `entries`."""

    def __init__(self, n: int, shape: Tuple[int, int], dtype: torch.dtype, device: torch.device) -> None:
        self.n, self.shape, self.dtype, self.device = n, (int(shape[0]), int(shape[1])), dtype, device

    def rows_into(self, task: int, rows: slice, out: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` of task ``task``, written into ``out`` (a reused buffer of the chunk's shape)."""
        raise NotImplementedError  # pragma: no cover - defined by every subclass

    def entries(self, task: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """The entries (rows[j], cols[j]) of task ``task`` (a sample; only used to bracket thresholds)."""
        raise NotImplementedError  # pragma: no cover - defined by every subclass

    def rows(self, task: int, rows: slice) -> torch.Tensor:
        out = torch.empty(rows.stop - rows.start, self.shape[1], dtype=self.dtype, device=self.device)
        return self.rows_into(task, rows, out)


class FactoredTasks(Tasks):
    """τᵢ = sᵢ·(Bᵢ·Aᵢ) in ``dtype``: the dense updates of LoRA modules, never formed whole."""

    def __init__(self, factors: Sequence[Tuple[torch.Tensor, torch.Tensor]], scalings: Sequence[float], dtype: torch.dtype):
        self.b = [b.to(dtype) for b, _ in factors]
        self.a = [a.to(dtype) for _, a in factors]
        self.s = [float(s) for s in scalings]
        super().__init__(len(self.b), (self.b[0].shape[0], self.a[0].shape[1]), dtype, self.b[0].device)

    def rows_into(self, task, rows, out):
        return torch.mm(self.b[task][rows], self.a[task], out=out).mul_(self.s[task])  # = s·(B[rows]·A)

    def entries(self, task, rows, cols):
        a_t = self.a[task].T.contiguous()  # gathering rows of Aᵀ reads contiguous memory, columns of A do not
        return self.s[task] * (self.b[task][rows] * a_t[cols]).sum(dim=1)


class DenseTasks(Tasks):
    """Tasks already stacked densely, (n, d, k) (tests, and small layers)."""

    def __init__(self, tasks: torch.Tensor) -> None:
        self.tasks = tasks
        super().__init__(tasks.shape[0], tuple(tasks.shape[1:]), tasks.dtype, tasks.device)

    def rows_into(self, task, rows, out):
        return out.copy_(self.tasks[task, rows])

    def entries(self, task, rows, cols):
        return self.tasks[task, rows, cols]


def chunks(d: int, k: int) -> List[slice]:
    step = max(1, CHUNK_ENTRIES // max(1, k))
    return [slice(start, min(d, start + step)) for start in range(0, d, step)]


def magnitudes(values: torch.Tensor) -> torch.Tensor:
    """|x| with NaN ranked as the largest magnitude, like +inf (the rule of `task_vectors`)."""
    out = values.abs()
    return torch.where(torch.isnan(out), torch.full_like(out, math.inf), out)


class Workspace:
    """Buffers of the largest chunk, reused for every chunk (views of the right size per chunk)."""

    def __init__(self, tasks: Tasks, extra: int = 4) -> None:
        d, k = tasks.shape
        parts = chunks(d, k)
        self.rows = parts[0].stop - parts[0].start
        self.k = k
        options = dict(dtype=tasks.dtype, device=tasks.device)
        self.tasks = torch.empty(tasks.n, self.rows, k, **options)
        self.scratch = [torch.empty(self.rows, k, **options) for _ in range(extra)]
        self.flags = torch.empty(self.rows, k, dtype=torch.bool, device=tasks.device)

    def view(self, buffer: torch.Tensor, rows: slice) -> torch.Tensor:
        return buffer[: rows.stop - rows.start]


# ----------------------------------------------------------------------------- exact selection
@dataclass(frozen=True)
class Top:
    """The ``count`` largest magnitudes of one task (lower flat index first among equals):
    |x| > ``value``, plus the entries equal to it whose flat indices are in ``ties`` (sorted); everything
    (count ≥ N) or nothing (count ≤ 0) in the trivial cases."""

    count: int
    numel: int
    value: Optional[float] = None
    ties: Optional[torch.Tensor] = None

    @property
    def everything(self) -> bool:
        return self.count >= self.numel

    @property
    def nothing(self) -> bool:
        return self.count <= 0

    def ties_in(self, offset: int, size: int) -> torch.Tensor:
        """The kept ties among flat indices [offset, offset + size), relative to ``offset``."""
        if self.ties is None or not self.ties.numel():
            return torch.empty(0, dtype=torch.long)
        lo, hi = torch.searchsorted(self.ties, torch.tensor([offset, offset + size])).tolist()
        return self.ties[lo:hi] - offset

    def mask(self, values: torch.Tensor, offset: int) -> torch.Tensor:
        """The boolean mask of a chunk of magnitudes whose first entry has flat index ``offset``."""
        if self.nothing:
            return torch.zeros(values.shape, dtype=torch.bool, device=values.device)
        if self.everything:
            return torch.ones(values.shape, dtype=torch.bool, device=values.device)
        mask = values > self.value
        mask.view(-1)[self.ties_in(offset, values.numel()).to(values.device)] = True
        return mask

    def keep_into(self, values: torch.Tensor, offset: int, out: torch.Tensor) -> torch.Tensor:
        """``values`` where they are among the top, else 0, into ``out``, for finite values: one
        ``hardshrink`` (x where |x| > v, else 0), then the kept ties copied over."""
        if self.nothing:
            return out.zero_()
        if self.everything:
            return out.copy_(values)
        torch.hardshrink(values, self.value, out=out)
        ties = self.ties_in(offset, out.numel()).to(out.device)
        if ties.numel():
            out.view(-1)[ties] = values.reshape(-1)[ties]
        return out

    def indicator_into(self, size: torch.Tensor, offset: int, out: torch.Tensor) -> torch.Tensor:
        """The same mask as 0/1 numbers, into ``out``, by arithmetic: sign(max(|x| − v, 0)) is 1 exactly
        where |x| > v (the difference of two distinct floats is never 0). For finite magnitudes."""
        if self.nothing:
            return out.zero_()
        if self.everything:
            return out.fill_(1)
        torch.sub(size, self.value, out=out).clamp_(min=0).sign_()
        out.view(-1)[self.ties_in(offset, out.numel()).to(out.device)] = 1
        return out


def select_tops(tasks: Tasks, task: int, counts: Sequence[int], generator: torch.Generator,
                workspace: Optional[Workspace] = None) -> List[Top]:
    """`Top` of each count for one task: bracketed by a sample, decided by one pass (see the module docstring)."""
    d, k = tasks.shape
    numel = d * k
    wanted = [c for c in counts if 0 < c < numel]
    if not wanted:
        return [Top(c, numel) for c in counts]
    if isinstance(tasks, DenseTasks) and numel <= SELECT_IN_FULL_BELOW:  # the same Tops, without the sample
        exact = {count: _select_in_full(tasks, task, count) for count in wanted}
        return [exact.get(c, Top(c, numel)) for c in counts]
    ws = workspace or Workspace(tasks)
    brackets = _brackets(tasks, task, wanted, generator)
    above = [0] * len(wanted)
    values: List[List[torch.Tensor]] = [[] for _ in wanted]
    indices: List[List[torch.Tensor]] = [[] for _ in wanted]
    for part in chunks(d, k):
        chunk = tasks.rows_into(task, part, ws.view(ws.tasks[0], part)).abs_()
        if not math.isfinite(float(chunk.sum())):
            chunk = magnitudes(chunk)
        flat = chunk.view(-1)
        offset = part.start * k
        for j, (low, high) in enumerate(brackets):
            count, inside = _partition(flat, low, high, ws, part)
            above[j] += count
            values[j].append(flat[inside])
            indices[j].append(inside + offset)
    tops = {}
    for j, count in enumerate(wanted):
        found = _resolve(count, above[j], torch.cat(values[j]), torch.cat(indices[j]), numel)
        tops[count] = found if found is not None else _select_in_full(tasks, task, count)
    return [tops.get(c, Top(c, numel)) for c in counts]


def _brackets(tasks: Tasks, task: int, counts: Sequence[int], generator: torch.Generator) -> List[Tuple[float, float]]:
    """[t_lo, t_hi] per count, holding the count-th largest magnitude with high probability: the order
    statistics of a uniform sample of the task's magnitudes at the count's rank ± 6 standard deviations
    of a sample quantile (+ 2 entries)."""
    d, k = tasks.shape
    numel = d * k
    size = min(SAMPLE_ENTRIES, numel)
    rows = torch.randint(0, d, (size,), generator=generator).to(tasks.device)
    cols = torch.randint(0, k, (size,), generator=generator).to(tasks.device)
    sample = magnitudes(tasks.entries(task, rows, cols)).cpu().double().numpy()
    positions = []
    for count in counts:
        below = (numel - count) / numel  # the fraction of entries below the count-th largest
        margin = 6.0 * math.sqrt(max(below * (1 - below), 1.0 / size) / size) + 2.0 / size
        positions.append((math.floor(max(0.0, below - margin) * (size - 1)), math.ceil(min(1.0, below + margin) * (size - 1))))
    ordered = np.partition(sample, sorted({p for pair in positions for p in pair}))
    return [(float(ordered[lo]), float(ordered[hi])) for lo, hi in positions]


def _partition(flat: torch.Tensor, low: float, high: float, ws: Workspace, part: slice) -> Tuple[int, torch.Tensor]:
    """(the number of entries of ``flat`` above ``high``, the flat indices of those in [low, high]), the
    bounds rounded once to the dtype of ``flat`` (so every entry is in exactly one of the three parts).
    On the CPU by numpy, whose comparisons are several times faster than torch's here."""
    if flat.device.type == "cpu":
        array = flat.numpy()
        low_, high_ = array.dtype.type(low), array.dtype.type(high)
        flags = ws.view(ws.flags, part).view(-1).numpy()
        above = int(np.count_nonzero(np.greater(array, high_, out=flags)))
        band = np.logical_and(np.greater_equal(array, low_, out=flags), array <= high_, out=flags)
        return above, torch.from_numpy(np.flatnonzero(band))
    low_t, high_t = (torch.tensor(v, dtype=flat.dtype, device=flat.device) for v in (low, high))
    return int((flat > high_t).sum()), torch.nonzero((flat >= low_t) & (flat <= high_t)).flatten()


def _resolve(count: int, above: int, values: torch.Tensor, indices: torch.Tensor, numel: int) -> Optional[Top]:
    """The count-th largest among candidates, if the bracket holds it: ``above`` entries exceed the
    bracket, ``values`` are all entries inside it."""
    if not above < count <= above + values.numel():
        return None
    order = count - above  # the order-th largest of the candidates
    value = torch.kthvalue(values, values.numel() - order + 1).values
    greater = above + int((values > value).sum())
    ties = torch.sort(indices[values == value]).values
    return Top(count, numel, float(value), ties[: count - greater].cpu())


def _select_in_full(tasks: Tasks, task: int, count: int) -> Top:
    """The exact selection over every magnitude of the task (the bracket missed)."""
    d, k = tasks.shape
    full = torch.cat([magnitudes(tasks.rows(task, rows)).reshape(-1) for rows in chunks(d, k)])
    if full.device.type == "cpu":  # numpy's introselect: several times faster than torch.kthvalue on the CPU
        value = torch.tensor(np.partition(full.numpy(), full.numel() - count)[full.numel() - count])
    else:
        value = torch.kthvalue(full, full.numel() - count + 1).values
    greater = int((full > value).sum())
    ties = torch.nonzero(full == value).flatten()
    return Top(count, full.numel(), float(value), ties[: count - greater].cpu())


# ----------------------------------------------------------------------------- sparsifications
class Sparsify:
    """A sparsification planned over whole tasks, applied chunk by chunk, in place: ``plan`` once per
    layer; then per chunk ``apply_`` (any chunk: the boolean selection) or ``apply_finite_`` (a chunk
    of finite values: the same result by arithmetic, into the workspace's buffers)."""

    def plan(self, tasks: Tasks, generator: Optional[torch.Generator], workspace: Workspace) -> None:
        pass

    def apply_(self, task: int, values: torch.Tensor, rows: slice) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - defined by every subclass

    def apply_finite_(self, task: int, values: torch.Tensor, rows: slice, ws: Workspace) -> torch.Tensor:
        return self.apply_(task, values, rows)


class KeepAll(Sparsify):
    def apply_(self, task, values, rows):
        return values


class KeepWindow(Sparsify):
    """Keep the magnitude ranks start+1 … stop of each task: `rank_window` gives them for the
    convention (ours: `task_vectors.magnitude_mask` / `breadcrumbs_mask`; or mergekit 0.1.5's)."""

    def __init__(self, density, gamma=0.0, convention: str = OURS, band: bool = False) -> None:
        self.density, self.gamma = density, gamma
        self.convention, self.band = check_convention(convention), band

    def plan(self, tasks, generator, workspace):
        numel = tasks.shape[0] * tasks.shape[1]
        densities = per_task_density(self.density, tasks.n)
        gammas = per_task_gamma(self.gamma, tasks.n)
        sampler = torch.Generator().manual_seed(0x5EED)  # brackets only: never changes the result
        self.windows = []
        for i, (density, gamma) in enumerate(zip(densities, gammas)):
            start, stop = rank_window(numel, density, gamma, self.convention, self.band)
            self.windows.append(tuple(select_tops(tasks, i, [start, stop], sampler, workspace)))
        self.k = tasks.shape[1]

    def apply_(self, task, values, rows):
        top_start, top_stop = self.windows[task]
        offset = rows.start * self.k
        size = magnitudes(values)  # NaN ranks as +inf: the boolean selection, as task_vectors does it
        mask = top_stop.mask(size, offset)
        if not top_start.nothing:
            mask &= ~top_start.mask(size, offset)
        return values.copy_(torch.where(mask, values, torch.zeros_like(values)))

    def apply_finite_(self, task, values, rows, ws):
        top_start, top_stop = self.windows[task]
        offset = rows.start * self.k
        kept, top = (ws.view(buffer, rows) for buffer in ws.scratch[:2])
        top_stop.keep_into(values, offset, kept)
        if top_start.nothing:
            return values.copy_(kept)
        return torch.sub(kept, top_start.keep_into(values, offset, top), out=values)  # x − x = 0 in the top


class DropAndRescale(Sparsify):
    """DARE: mᵢ ~ Bernoulli(densityᵢ) drawn as `task_vectors.dare_mask` draws it (task after task, each
    from its own seed drawn from the merge's generator), kept packed; τ̂ᵢ = mᵢ ⊙ τᵢ / densityᵢ."""

    def __init__(self, density, convention: str = OURS) -> None:
        self.density, self.convention = density, check_convention(convention)

    def plan(self, tasks, generator, workspace):
        d, k = tasks.shape
        self.densities = per_task_density(self.density, tasks.n)
        self.k = k
        self.bits = dare_bits_many(d * k, self.densities, generator)
        if self.convention == MERGEKIT:  # mergekit's mask alone: m ⊙ τ, no 1/density (its `rescale` does that)
            self.densities = [1.0] * tasks.n

    def _keep(self, task: int, rows: slice, values: torch.Tensor) -> torch.Tensor:
        return unpack_bits(self.bits[task], rows.start * self.k, values.numel()).reshape(values.shape).to(values.device)

    def apply_(self, task, values, rows):
        keep = self._keep(task, rows, values)
        return values.copy_(torch.where(keep, values / self.densities[task], torch.zeros_like(values)))

    def apply_finite_(self, task, values, rows, ws):
        keep = ws.view(ws.scratch[0], rows).copy_(self._keep(task, rows, values))
        return values.div_(self.densities[task]).mul_(keep)  # τ/density kept or 0: the selection, for finite τ


class MagPrune(Sparsify):
    """DELLA's MAGPRUNE (`task_vectors.magprune`), chunk of rows by chunk: each row of each task ranked by
    magnitude, keep probabilities spread linearly over [densityᵢ − εᵢ, densityᵢ + εᵢ] (larger magnitude,
    higher probability), the Bernoulli mask drawn from the task's seed (one per task, drawn from the
    merge's generator in task order, as DARE draws them) at the chunk's place in its stream, so any
    chunking gives the same mask; τ̂ᵢ = mᵢ ⊙ τᵢ / p (ours) or mᵢ ⊙ τᵢ (mergekit 0.1.5's, whose `rescale`
    then matches the L1 norm). Rows are ranked on their own, so no pass over the whole task is needed."""

    def __init__(self, density, epsilon, convention: str = OURS) -> None:
        self.density, self.epsilon, self.convention = density, epsilon, check_convention(convention)

    def plan(self, tasks, generator, workspace):
        self.densities = per_task_density(self.density, tasks.n)
        self.epsilons = per_task_epsilon(self.epsilon, tasks.n)
        for density, epsilon in zip(self.densities, self.epsilons):
            check_magprune_window(density, epsilon)
        self.seeds = magprune_seeds(tasks.n, generator)
        self.k = tasks.shape[1]

    def _kept(self, task: int, values: torch.Tensor, rows: slice):
        """(the keep mask, the probabilities in the values' dtype) of a chunk; None where all is kept."""
        if self.densities[task] >= 1:
            return None
        p = magprune_probabilities(values.abs(), self.densities[task], self.epsilons[task])
        keep = magprune_keep(pcg64_uniforms(self.seeds[task], rows.start * self.k, values.numel()), p)
        p = p.masked_fill_(~keep, 1.0).to(device=values.device, dtype=values.dtype)  # p > 0 wherever kept
        return keep.to(values.device), p

    def apply_(self, task, values, rows):
        kept = self._kept(task, values, rows)
        if kept is None:
            return values
        keep, p = kept
        scaled = values / p if self.convention == OURS else values
        return values.copy_(torch.where(keep, scaled, torch.zeros_like(values)))

    def apply_finite_(self, task, values, rows, ws):
        if self.densities[task] >= 1:
            return values
        if values.device.type != "cpu" or not values.is_contiguous():
            return self.apply_(task, values, rows)
        # on the CPU, in numpy, in place: the ranks from the values' own bits (`magprune_probabilities`),
        # τ/p divided where kept (the same IEEE division as torch's), then × the 0/1 mask
        v = values.numpy()
        p = magprune_probabilities(values, self.densities[task], self.epsilons[task], finite=True).numpy()
        keep = magprune_keep(pcg64_uniforms(self.seeds[task], rows.start * self.k, values.numel()), p).numpy()
        if self.convention == OURS:
            np.divide(v, p.astype(v.dtype), out=v, where=keep)
        np.multiply(v, keep, out=v)
        return values


# ----------------------------------------------------------------------------- consensus
class Consensus:
    """How the trimmed chunks are combined: ``exact(trimmed, weights)`` (the definition, any values) and
    ``into(trimmed, weights, ws, out)`` (finite values: the same arithmetic into reused buffers)."""

    def exact(self, trimmed: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - defined by every subclass

    def into(self, trimmed, weights, ws: Workspace, out: torch.Tensor) -> torch.Tensor:
        return out.copy_(self.exact(trimmed, weights))


class Sum(Consensus):
    """Σᵢ λᵢτ̂ᵢ (`task_vectors.weighted_sum`): (λ₀τ̂₀) + (λ₁τ̂₁) + … in task order."""

    def exact(self, trimmed, weights):
        return weighted_sum(trimmed, weights)

    def into(self, trimmed, weights, ws, out):
        if trimmed.dtype != out.dtype or trimmed.dtype not in (torch.float32, torch.float64):
            return out.copy_(linear_combination(trimmed.unbind(0), weights))
        product = ws.view(ws.scratch[0], slice(0, out.shape[0]))
        torch.mul(trimmed[0], float(weights[0]), out=out)
        for task, weight in zip(trimmed[1:], weights[1:]):
            out.add_(torch.mul(task, float(weight), out=product))
        return out


class SignElection(Consensus):
    """TIES' consensus (`task_vectors.sign_consensus`): weight, elect the sign, disjoint mean."""

    def __init__(self, method: str) -> None:
        self.method = check_sign_method(method)

    def exact(self, trimmed, weights):
        lam = torch.tensor([float(w) for w in weights], dtype=trimmed.dtype, device=trimmed.device)
        weighted = trimmed.mul_(lam.view(-1, *([1] * (trimmed.ndim - 1))))
        return disjoint_merge(weighted, elect_sign(weighted, self.method), weights)

    def into(self, trimmed, weights, ws, out):
        rows = slice(0, out.shape[0])
        sign, mass, agree = (ws.view(buffer, rows) for buffer in ws.scratch[:3])
        lam = torch.tensor([float(w) for w in weights], dtype=trimmed.dtype, device=trimmed.device)
        for task, weight in zip(trimmed, lam):
            task.mul_(weight)  # λᵢτ̂ᵢ, as sign_consensus weights them
        if self.method == "total":  # elect_sign: Σ in task order, then the sign
            sign.copy_(trimmed[0])
            for task in trimmed[1:]:
                sign.add_(task)
        else:
            torch.sign(trimmed[0], out=sign)
            for task in trimmed[1:]:
                sign.add_(torch.sign(task, out=agree))
        sign.sign_()
        out.zero_()
        mass.zero_()
        magnitudes_ = lam.abs()
        # disjoint_merge's sums, in task order: Σ of the agreeing λᵢτ̂ᵢ, all of sign γ, is γ·Σ|λᵢτ̂ᵢ| exactly
        # (rounding is symmetric), and relu(γ·λᵢτ̂ᵢ) is |λᵢτ̂ᵢ| where it agrees, else 0
        for task, weight in zip(trimmed, magnitudes_.tolist()):
            torch.mul(task, sign, out=agree).relu_()
            out.add_(agree)
            mass.add_(agree.sign_(), alpha=weight)  # + |λᵢ| where τ̂ᵢ agrees
        out.mul_(sign)
        nonzero = magnitudes_[magnitudes_ > 0]
        smallest = float(nonzero.min()) if nonzero.numel() else 1.0
        return out.mul_(magnitudes_.sum()).div_(mass.clamp_(min=smallest))


class MergekitSum(Consensus):
    """mergekit 0.1.5's consensus-free merge: Σᵢ λᵢτ̂ᵢ, divided by Σᵢ λᵢ when ``normalize`` (a sum
    |Σ λᵢ| < 1e-8 divides by 1)."""

    def __init__(self, normalize: bool) -> None:
        self.normalize = bool(normalize)

    def exact(self, trimmed, weights):
        out = weighted_sum(trimmed, weights)
        if self.normalize:
            total = float(sum(float(w) for w in weights))
            out = out / (total if abs(total) >= 1e-8 else 1.0)
        return out


class MergekitSignElection(Consensus):
    """mergekit 0.1.5's TIES consensus on the weighted λᵢτ̂ᵢ: the majority sign is + where Σᵢ λᵢτ̂ᵢ ≥ 0
    (``total``; ``frequency``: Σᵢ sign(λᵢτ̂ᵢ) ≥ 0), else −; the entries whose sign equals it (zeros never
    do) are summed; with ``normalize`` the sum is divided, entry by entry, by the signed Σ λᵢ of the
    entries kept (1 where that is 0)."""

    def __init__(self, method: str, normalize: bool) -> None:
        self.method, self.normalize = check_sign_method(method), bool(normalize)

    def exact(self, trimmed, weights):
        lam = torch.tensor([float(w) for w in weights], dtype=trimmed.dtype, device=trimmed.device)
        lam = lam.view(-1, *([1] * (trimmed.ndim - 1)))
        weighted = trimmed * lam
        signs = torch.sign(weighted)
        votes = weighted.sum(dim=0) if self.method == "total" else signs.sum(dim=0)
        majority = torch.where(votes >= 0, 1.0, -1.0).to(trimmed.dtype)
        keep = (signs == majority).to(trimmed.dtype)
        out = (weighted * keep).sum(dim=0)
        if self.normalize:
            divisor = (lam * keep).sum(dim=0)
            out = out / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
        return out


# ----------------------------------------------------------------------------- the merge
def merge(
    tasks: Tasks,
    weights: Sequence[float],
    sparsify: Sparsify,
    consensus: Consensus,
    generator: Optional[torch.Generator] = None,
    *,
    rescale: bool = False,
    scale: float = 1.0,
) -> torch.Tensor:
    """τ_m = scale · consensus(sparsify(τ), λ), row chunk by row chunk; returns the d × k merge in
    ``tasks.dtype``. ``rescale``: each sparsified task is multiplied by ‖τᵢ‖₁ / ‖τ̂ᵢ‖₁ (mergekit's
    ``rescale``; left as it is where either norm is below 1e-7), found by one more pass (`l1_rescales`)."""
    if len(weights) != tasks.n:
        raise ValueError(f"Got {len(weights)} weights for {tasks.n} tasks: pass one weight per task.")
    ws = Workspace(tasks)
    sparsify.plan(tasks, generator, ws)
    factors = l1_rescales(tasks, sparsify, ws) if rescale else None
    d, k = tasks.shape
    out = torch.empty(d, k, dtype=tasks.dtype, device=tasks.device)
    for rows in chunks(d, k):
        trimmed = ws.tasks[:, : rows.stop - rows.start]
        for i in range(tasks.n):
            tasks.rows_into(i, rows, trimmed[i])
        finite = math.isfinite(float(trimmed.sum()))
        for i in range(tasks.n):
            if finite:
                sparsify.apply_finite_(i, trimmed[i], rows, ws)
            else:
                sparsify.apply_(i, trimmed[i], rows)
            if factors is not None and factors[i] != 1.0:
                trimmed[i].mul_(factors[i])
        if finite:
            consensus.into(trimmed, weights, ws, out[rows])
        else:
            out[rows] = consensus.exact(trimmed, weights)
    if scale != 1:
        out.mul_(float(scale))
    return out


#: mergekit's `rescaled_masked_tensor` leaves a task as it is where a norm is below this
RESCALE_EPS = 1e-7


def l1_rescales(tasks: Tasks, sparsify: Sparsify, ws: Workspace) -> List[float]:
    """‖τᵢ‖₁ / ‖τ̂ᵢ‖₁ per task (1 where either is below `RESCALE_EPS`), the norms summed chunk by chunk
    in float64 (one pass over the rows of every task)."""
    d, k = tasks.shape
    before, after = [0.0] * tasks.n, [0.0] * tasks.n
    for rows in chunks(d, k):
        values = ws.view(ws.scratch[-1], rows)
        for i in range(tasks.n):
            tasks.rows_into(i, rows, values)
            before[i] += float(values.abs().sum(dtype=torch.float64))
            sparsify.apply_(i, values, rows)
            after[i] += float(values.abs().sum(dtype=torch.float64))
    return [1.0 if b < RESCALE_EPS or a < RESCALE_EPS else b / a for b, a in zip(before, after)]


def sum_consensus() -> Consensus:
    return Sum()


def ties_consensus(method: str) -> Consensus:
    return SignElection(method)


def mergekit_sum_consensus(normalize: bool) -> Consensus:
    return MergekitSum(normalize)


def mergekit_ties_consensus(method: str, normalize: bool) -> Consensus:
    return MergekitSignElection(method, normalize)


__all__ = [
    "Tasks", "FactoredTasks", "DenseTasks", "Top", "select_tops", "Sparsify", "KeepAll", "KeepWindow",
    "DropAndRescale", "MagPrune", "Consensus", "Sum", "SignElection", "MergekitSum", "MergekitSignElection", "merge",
    "sum_consensus", "ties_consensus", "mergekit_sum_consensus", "mergekit_ties_consensus", "l1_rescales", "chunks",
]
