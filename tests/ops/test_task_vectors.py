"""Tests of the dense task-vector merges against slow, loop-based references and hand-computed cases."""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from adapter_merging.ops import task_vectors
from adapter_merging.ops.task_vectors import (
    breadcrumbs,
    breadcrumbs_mask,
    check_density,
    check_gamma,
    check_sign_method,
    dare_linear,
    dare_mask,
    dare_ties,
    disjoint_merge,
    elect_sign,
    magnitude_mask,
    magnitude_prune,
    task_arithmetic,
    ties,
)

# --------------------------------------------------------------------------- slow references
# Explicit Python loops over entries, written independently of the vectorised implementation.


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def _flat(t: torch.Tensor) -> list[float]:
    return [float(v) for v in t.reshape(-1).tolist()]


def _ref_ranks(values: list[float]) -> list[int]:
    """rank[p] (1-based) of entry p by decreasing |x|, ties broken by lower flat index."""
    order = sorted(range(len(values)), key=lambda p: (-abs(values[p]), p))
    ranks = [0] * len(values)
    for r, p in enumerate(order, start=1):
        ranks[p] = r
    return ranks


def _ref_ceil(fraction: float, n: int) -> int:
    """ceil(fraction·n) on the exact decimal value of ``fraction`` (0.3·10 = 3, not 4)."""
    return min(n, math.ceil(Fraction(repr(fraction)) * n))


def _ref_magnitude_keep(values: list[float], density: float) -> list[bool]:
    k = _ref_ceil(density, len(values))
    return [r <= k for r in _ref_ranks(values)]


def _ref_breadcrumbs_keep(values: list[float], density: float, gamma: float) -> list[bool]:
    n = len(values)
    g = _ref_ceil(gamma, n)
    stop = min(n, g + _ref_ceil(density, n))
    return [g < r <= stop for r in _ref_ranks(values)]


def _ref_weighted_sum(trimmed: list[list[float]], weights, shape) -> torch.Tensor:
    out = []
    for p in range(len(trimmed[0])):
        acc = 0.0
        for i, w in enumerate(weights):
            acc += w * trimmed[i][p]
        out.append(acc)
    return torch.tensor(out, dtype=torch.float64).reshape(shape)


def _ref_sign_merge(trimmed: list[list[float]], weights, method: str, shape) -> torch.Tensor:
    total_mass = sum(abs(w) for w in weights)
    out = []
    for p in range(len(trimmed[0])):
        vals = [w * trimmed[i][p] for i, w in enumerate(weights)]
        if method == "total":
            gamma = _sign(sum(vals))
        else:
            gamma = _sign(sum(_sign(v) for v in vals))
        agree = [i for i in range(len(weights)) if gamma != 0 and _sign(vals[i]) == gamma and trimmed[i][p] != 0]
        if not agree:
            out.append(0.0)
            continue
        num = sum(vals[i] for i in agree)
        mass = sum(abs(weights[i]) for i in agree)
        out.append(total_mass * num / mass)
    return torch.tensor(out, dtype=torch.float64).reshape(shape)


def _trim(tasks: torch.Tensor, keep_fn) -> list[list[float]]:
    trimmed = []
    for t in tasks:
        vals = _flat(t)
        keep = keep_fn(vals)
        trimmed.append([v if k else 0.0 for v, k in zip(vals, keep)])
    return trimmed


def ref_task_arithmetic(tasks, weights):
    return _ref_weighted_sum([_flat(t) for t in tasks], weights, tasks.shape[1:])


def ref_magnitude_prune(tasks, weights, density):
    return _ref_weighted_sum(_trim(tasks, lambda v: _ref_magnitude_keep(v, density)), weights, tasks.shape[1:])


def ref_breadcrumbs(tasks, weights, density, gamma):
    trimmed = _trim(tasks, lambda v: _ref_breadcrumbs_keep(v, density, gamma))
    return _ref_weighted_sum(trimmed, weights, tasks.shape[1:])


def ref_ties(tasks, weights, density, method):
    trimmed = _trim(tasks, lambda v: _ref_magnitude_keep(v, density))
    return _ref_sign_merge(trimmed, weights, method, tasks.shape[1:])


def _ref_dare_trimmed(tasks, density, seed):
    """Masks come from ``dare_mask`` (tested on its own); drop and rescale are done by hand."""
    gen = torch.Generator().manual_seed(seed)
    trimmed = []
    for t in tasks:
        keep = _flat(dare_mask(t.shape, density, gen).to(torch.float64))
        trimmed.append([v / density if k else 0.0 for v, k in zip(_flat(t), keep)])
    return trimmed


def ref_dare_linear(tasks, weights, density, seed):
    return _ref_weighted_sum(_ref_dare_trimmed(tasks, density, seed), weights, tasks.shape[1:])


def ref_dare_ties(tasks, weights, density, seed, method):
    return _ref_sign_merge(_ref_dare_trimmed(tasks, density, seed), weights, method, tasks.shape[1:])


# --------------------------------------------------------------------------- fixtures

SHAPES = [(4, 5), (7,), (2, 3, 2)]
WEIGHTS = [0.5, -1.25, 0.75]


def _int_tasks(shape, seed, n=3):
    """Integer-valued tasks: many exact ties and zeros, so tie-breaking is exercised."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-4, 5, (n, *shape), generator=g).to(torch.float64)


def _gauss_tasks(shape, seed, n=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=g, dtype=torch.float64)


TASK_MAKERS = [_int_tasks, _gauss_tasks]


# --------------------------------------------------------------------------- references, every strategy


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("make", TASK_MAKERS)
def test_task_arithmetic_matches_reference(shape, make):
    tasks = make(shape, 0)
    assert_close(task_arithmetic(tasks, WEIGHTS), ref_task_arithmetic(tasks, WEIGHTS))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("make", TASK_MAKERS)
@pytest.mark.parametrize("density", [0.1, 0.3, 0.5, 0.75, 1.0])
def test_magnitude_prune_matches_reference(shape, make, density):
    tasks = make(shape, 1)
    assert_close(magnitude_prune(tasks, WEIGHTS, density), ref_magnitude_prune(tasks, WEIGHTS, density))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("make", TASK_MAKERS)
@pytest.mark.parametrize("density,gamma", [(0.5, 0.0), (0.3, 0.1), (0.5, 0.25), (0.8, 0.5), (1.0, 0.2), (0.05, 0.9)])
def test_breadcrumbs_matches_reference(shape, make, density, gamma):
    tasks = make(shape, 2)
    assert_close(
        breadcrumbs(tasks, WEIGHTS, density, gamma), ref_breadcrumbs(tasks, WEIGHTS, density, gamma)
    )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("make", TASK_MAKERS)
@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
@pytest.mark.parametrize("method", ["total", "frequency"])
def test_ties_matches_reference(shape, make, density, method):
    tasks = make(shape, 3)
    assert_close(ties(tasks, WEIGHTS, density, method), ref_ties(tasks, WEIGHTS, density, method))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [0.3, 0.7, 1.0])
def test_dare_linear_matches_reference(shape, density):
    tasks = _gauss_tasks(shape, 4)
    got = dare_linear(tasks, WEIGHTS, density, torch.Generator().manual_seed(11))
    assert_close(got, ref_dare_linear(tasks, WEIGHTS, density, 11))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("make", TASK_MAKERS)
@pytest.mark.parametrize("density", [0.3, 0.7, 1.0])
@pytest.mark.parametrize("method", ["total", "frequency"])
def test_dare_ties_matches_reference(shape, make, density, method):
    tasks = make(shape, 5)
    got = dare_ties(tasks, WEIGHTS, density, torch.Generator().manual_seed(12), method)
    assert_close(got, ref_dare_ties(tasks, WEIGHTS, density, 12, method))


@pytest.mark.parametrize("strategy", ["ta", "ties", "dare_linear", "dare_ties", "magnitude", "breadcrumbs"])
def test_float32_in_float32_out(strategy):
    tasks = _gauss_tasks((6, 5), 6).to(torch.float32)
    w = [0.4, 0.6, -0.2]
    gen = torch.Generator().manual_seed(0)
    out = {
        "ta": lambda: task_arithmetic(tasks, w),
        "ties": lambda: ties(tasks, w, 0.5),
        "dare_linear": lambda: dare_linear(tasks, w, 0.5, gen),
        "dare_ties": lambda: dare_ties(tasks, w, 0.5, gen),
        "magnitude": lambda: magnitude_prune(tasks, w, 0.5),
        "breadcrumbs": lambda: breadcrumbs(tasks, w, 0.5, 0.1),
    }[strategy]()
    assert out.dtype == torch.float32
    assert out.shape == (6, 5)


# --------------------------------------------------------------------------- masks


@pytest.mark.parametrize(
    "density,numel,expected",
    [(0.3, 10, 3), (0.25, 10, 3), (0.1, 10, 1), (0.01, 10, 1), (1.0, 10, 10), (0.7, 10, 7), (0.05, 10, 1),
     # float products just above an integer: 0.07·100 = 7.000000000000001, 0.28·25 = 7.000000000000001
     (0.07, 100, 7), (0.28, 25, 7), (0.56, 50, 28), (0.7, 90, 63)],
)
def test_magnitude_mask_count(density, numel, expected):
    task = torch.arange(numel, dtype=torch.float64) - numel / 2
    assert int(magnitude_mask(task, density).sum()) == expected


@settings(max_examples=200, deadline=None)
@given(
    numel=st.integers(1, 300),
    density=st.integers(1, 100).map(lambda k: k / 100),
    gamma=st.integers(0, 99).map(lambda k: k / 100),
)
def test_property_mask_counts(numel, density, gamma):
    task = torch.linspace(-1.0, 1.0, numel, dtype=torch.float64)
    assert int(magnitude_mask(task, density).sum()) == _ref_ceil(density, numel)
    g = _ref_ceil(gamma, numel)
    kept = breadcrumbs_mask(task, density, gamma)
    assert int(kept.sum()) == min(numel, g + _ref_ceil(density, numel)) - g


def test_magnitude_mask_ties_broken_by_flat_index():
    task = torch.tensor([[1.0, -3.0, 2.0], [3.0, 2.0, -2.0]])
    # |x| ranks: 3 (idx1), 3 (idx3), 2 (idx2), 2 (idx4), 2 (idx5), 1 (idx0); keep ceil(0.5·6) = 3
    expected = torch.tensor([[False, True, True], [True, False, False]])
    assert torch.equal(magnitude_mask(task, 0.5), expected)
    assert torch.equal(magnitude_mask(task, 1.0), torch.ones(2, 3, dtype=torch.bool))


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.integers(-3, 3), min_size=1, max_size=40),
    density=st.floats(0.01, 1.0),
    gamma=st.floats(0.0, 0.99),
)
def test_masks_match_reference_ranks_with_many_ties(values, density, gamma):
    # small integers: most magnitudes tie, so the selection must break ties by flat index exactly
    task = torch.tensor(values, dtype=torch.float64)
    ranks = _ref_ranks([float(v) for v in values])
    n, k, g = len(values), _ref_ceil(density, len(values)), _ref_ceil(gamma, len(values))
    assert magnitude_mask(task, density).tolist() == [r <= k for r in ranks]
    assert breadcrumbs_mask(task, density, gamma).tolist() == [g < r <= min(n, g + k) for r in ranks]


def test_masks_rank_non_finite_entries_first():
    # +inf, -inf and NaN count as the largest magnitudes (ties among them by flat index)
    task = torch.tensor([1.0, math.nan, -math.inf, 5.0, math.inf, -2.0])
    assert magnitude_mask(task, 0.5).tolist() == [False, True, True, False, True, False]
    assert breadcrumbs_mask(task, 0.3, 0.5).tolist() == [False, False, False, True, False, True]


def test_breadcrumbs_mask_band():
    task = torch.tensor([10.0, -9.0, 8.0, -7.0, 6.0, 5.0, -4.0, 3.0, 2.0, 1.0])
    # gamma 0.2 drops the top 2, density 0.3 keeps the next 3
    expected = torch.tensor([False, False, True, True, True, False, False, False, False, False])
    assert torch.equal(breadcrumbs_mask(task, 0.3, 0.2), expected)
    # gamma + density > 1 is clipped: everything below the top 7 is kept
    assert torch.equal(breadcrumbs_mask(task, 0.9, 0.7), torch.arange(10) >= 7)
    # gamma 0 is the magnitude mask
    assert torch.equal(breadcrumbs_mask(task, 0.4, 0.0), magnitude_mask(task, 0.4))


def test_dare_mask_bernoulli():
    gen = torch.Generator().manual_seed(0)
    mask = dare_mask((200, 500), 0.3, gen)
    assert mask.dtype == torch.bool and mask.shape == (200, 500)
    assert abs(mask.double().mean().item() - 0.3) < 0.01
    assert bool(dare_mask((50, 7), 1.0, gen).all())


# --------------------------------------------------------------------------- hand-computed 3 × 3 examples

T1 = [[1.0, -2.0, 3.0], [0.0, 4.0, -1.0], [2.0, 2.0, -5.0]]
T2 = [[2.0, 1.0, -1.0], [-3.0, 0.0, 1.0], [-1.0, 2.0, 1.0]]
T3 = [[-1.0, -1.0, -1.0], [1.0, -2.0, 1.0], [-4.0, 2.0, 1.0]]
HAND_TASKS = torch.tensor([T1, T2, T3], dtype=torch.float64)
THIRDS = [1 / 3, 1 / 3, 1 / 3]


def test_hand_sign_election_total():
    # Σᵢ τᵢ = [[2, -2, 1], [-2, 2, 1], [-3, 6, -3]]
    expected = torch.tensor([[1.0, -1.0, 1.0], [-1.0, 1.0, 1.0], [-1.0, 1.0, -1.0]], dtype=torch.float64)
    assert torch.equal(elect_sign(HAND_TASKS, "total"), expected)


def test_hand_sign_election_frequency():
    # Σᵢ sign(τᵢ) = [[1, -1, -1], [0, 0, 1], [-1, 3, 1]]
    expected = torch.tensor([[1.0, -1.0, -1.0], [0.0, 0.0, 1.0], [-1.0, 1.0, 1.0]], dtype=torch.float64)
    assert torch.equal(elect_sign(HAND_TASKS, "frequency"), expected)


def test_hand_disjoint_mean_total():
    # equal weights 1/3: mean over the non-zero entries that agree with the elected sign
    weighted = HAND_TASKS / 3
    got = disjoint_merge(weighted, elect_sign(weighted, "total"), THIRDS)
    expected = torch.tensor([[1.5, -1.5, 3.0], [-3.0, 4.0, 1.0], [-2.5, 2.0, -5.0]], dtype=torch.float64)
    assert_close(got, expected)
    assert_close(ties(HAND_TASKS, THIRDS, 1.0, "total"), expected)


def test_hand_disjoint_mean_frequency():
    weighted = HAND_TASKS / 3
    got = disjoint_merge(weighted, elect_sign(weighted, "frequency"), THIRDS)
    expected = torch.tensor([[1.5, -1.5, -1.0], [0.0, 0.0, 1.0], [-2.5, 2.0, 1.0]], dtype=torch.float64)
    assert_close(got, expected)
    assert_close(ties(HAND_TASKS, THIRDS, 1.0, "frequency"), expected)


def test_hand_ties_with_trimming():
    # density 0.5 keeps ceil(4.5) = 5 entries per task (ties by flat index):
    #   τ̂1 = [[0, -2, 3], [0, 4, 0], [2, 0, -5]]
    #   τ̂2 = [[2, 1, -1], [-3, 0, 0], [0, 2, 0]]
    #   τ̂3 = [[-1, -1, 0], [0, -2, 0], [-4, 2, 0]]
    expected = torch.tensor([[2.0, -1.5, 3.0], [-3.0, 4.0, 0.0], [-4.0, 2.0, -5.0]], dtype=torch.float64)
    assert_close(ties(HAND_TASKS, THIRDS, 0.5, "total"), expected)


def test_hand_disjoint_merge_unequal_weights():
    # λ = [2, 1]: A_p agreeing; τ_m = (Σ|λ|)·Σ_A λτ / Σ_A |λ|
    tasks = torch.tensor([[1.0, 3.0, -1.0], [2.0, -1.0, 0.0]], dtype=torch.float64)
    weighted = torch.tensor([[2.0], [1.0]], dtype=torch.float64) * tasks  # [[2, 6, -2], [2, -1, 0]]
    sign = elect_sign(weighted, "total")  # [1, 1, -1]
    got = disjoint_merge(weighted, sign, [2.0, 1.0])
    # p0: 3·(2+2)/3 = 4;  p1: 3·6/2 = 9;  p2: 3·(-2)/2 = -3
    assert_close(got, torch.tensor([4.0, 9.0, -3.0], dtype=torch.float64))


# --------------------------------------------------------------------------- density = 1 identities


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_ties_density_one_is_untrimmed_sign_merge(method):
    tasks = _gauss_tasks((5, 6), 7)
    lam = torch.tensor(WEIGHTS, dtype=torch.float64).view(-1, 1, 1)
    weighted = lam * tasks
    expected = disjoint_merge(weighted, elect_sign(weighted, method), WEIGHTS)
    assert torch.equal(ties(tasks, WEIGHTS, 1.0, method), expected)


def _no_conflict_tasks(seed, shape=(5, 6), weights=WEIGHTS):
    """Tasks whose weighted entries λᵢτᵢ[p] all share one sign per p (and are non-zero)."""
    g = torch.Generator().manual_seed(seed)
    entry_sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
    mags = torch.rand((len(weights), *shape), generator=g, dtype=torch.float64) + 0.1
    w_sign = torch.tensor([math.copysign(1.0, w) for w in weights], dtype=torch.float64).view(-1, 1, 1)
    return entry_sign * w_sign * mags


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_ties_density_one_no_conflict_is_task_arithmetic(method):
    tasks = _no_conflict_tasks(8)
    assert_close(ties(tasks, WEIGHTS, 1.0, method), task_arithmetic(tasks, WEIGHTS))


def test_magnitude_prune_density_one_is_task_arithmetic_exactly():
    tasks = _gauss_tasks((5, 6), 9)
    assert torch.equal(magnitude_prune(tasks, WEIGHTS, 1.0), task_arithmetic(tasks, WEIGHTS))


def test_breadcrumbs_gamma_zero_density_one_is_task_arithmetic():
    tasks = _gauss_tasks((5, 6), 10)
    assert torch.equal(breadcrumbs(tasks, WEIGHTS, 1.0, 0.0), task_arithmetic(tasks, WEIGHTS))


def test_dare_linear_density_one_is_task_arithmetic():
    tasks = _gauss_tasks((5, 6), 11)
    assert torch.equal(dare_linear(tasks, WEIGHTS, 1.0, torch.Generator().manual_seed(0)), task_arithmetic(tasks, WEIGHTS))


def test_equal_weights_is_ties_paper_disjoint_mean():
    # λᵢ = 1/n: τ_m[p] = mean of the agreeing non-zero τ̂ᵢ[p] (Yadav et al. 2023)
    tasks = _int_tasks((4, 4), 12, n=4)
    w = [0.25] * 4
    got = ties(tasks, w, 0.6)
    trimmed = torch.stack([torch.where(magnitude_mask(t, 0.6), t, torch.zeros_like(t)) for t in tasks])
    gamma = torch.sign(trimmed.sum(0))
    for r in range(4):
        for c in range(4):
            agree = [float(trimmed[i, r, c]) for i in range(4)
                     if trimmed[i, r, c] != 0 and torch.sign(trimmed[i, r, c]) == gamma[r, c]]
            expected = sum(agree) / len(agree) if agree else 0.0
            assert math.isclose(float(got[r, c]), expected, rel_tol=1e-12, abs_tol=1e-12)


# --------------------------------------------------------------------------- DARE randomness


@pytest.mark.parametrize("fn", ["linear", "ties"])
def test_dare_seeded_reproducible(fn):
    tasks = _gauss_tasks((8, 9), 13)
    merge = dare_linear if fn == "linear" else dare_ties
    a = merge(tasks, WEIGHTS, 0.4, torch.Generator().manual_seed(123))
    b = merge(tasks, WEIGHTS, 0.4, torch.Generator().manual_seed(123))
    c = merge(tasks, WEIGHTS, 0.4, torch.Generator().manual_seed(124))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_dare_masks_drawn_per_task_in_order():
    tasks = _gauss_tasks((3, 4), 14)
    gen = torch.Generator().manual_seed(5)
    masks = [dare_mask((3, 4), 0.5, gen) for _ in range(3)]
    expected = sum(w * torch.where(m, t / 0.5, torch.zeros_like(t)) for w, m, t in zip(WEIGHTS, masks, tasks))
    assert_close(dare_linear(tasks, WEIGHTS, 0.5, torch.Generator().manual_seed(5)), expected)


@pytest.mark.parametrize("threads", [1, 2])
def test_dare_masks_made_in_parallel_are_those_drawn_one_after_another(threads, monkeypatch):
    """`dare_bits_many` draws the seeds in order and makes the masks in threads: the same masks as
    `dare_mask` one after another, whatever the thread count, and the generator left in the same state."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    densities = [0.5, 0.2, 1.0, 0.7]
    first, second = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    packed = task_vectors.dare_bits_many(1001, densities, first)
    for bits, density in zip(packed, densities):
        expected = dare_mask((7, 143), density, second)
        assert torch.equal(task_vectors.unpack_bits(bits, 0, 1001).reshape(7, 143), expected)
    assert torch.equal(first.get_state(), second.get_state())
    assert bool(task_vectors.unpack_bits(packed[2], 0, 1001).all())  # density 1 keeps everything


def test_dare_linear_expectation_is_task_arithmetic():
    tasks = _gauss_tasks((4, 5), 15)
    draws = torch.stack(
        [dare_linear(tasks, WEIGHTS, 0.5, torch.Generator().manual_seed(s)) for s in range(3000)]
    )
    # per-entry std of one draw ≤ ~3, so the mean of 3000 has std ≤ ~0.06
    assert_close(draws.mean(0), task_arithmetic(tasks, WEIGHTS), atol=0.25, rtol=0.0)


# --------------------------------------------------------------------------- negative weights


def test_negative_weight_flips_elected_sign():
    tasks = torch.tensor([[1.0, 1.0, -1.0], [2.0, -3.0, 1.0]], dtype=torch.float64)
    # λ = [1, 1]: p0 elects + (1 + 2); λ = [1, -1]: λτ = [[1, 1, -1], [-2, 3, -1]], p0 elects − (1 − 2)
    pos = ties(tasks, [1.0, 1.0], 1.0)
    neg = ties(tasks, [1.0, -1.0], 1.0)
    assert float(pos[0]) > 0 and float(neg[0]) < 0
    # p0: 2·(−2)/1 = −4;  p1: 2·(1 + 3)/2 = 4;  p2: 2·(−1 − 1)/2 = −2
    assert_close(neg, torch.tensor([-4.0, 4.0, -2.0], dtype=torch.float64))
    # λ = [1, 1]: γ = sign([3, −2, 0]); p0: 2·3/2 = 3;  p1: 2·(−3)/1 = −6;  p2: no sign → 0
    assert_close(pos, torch.tensor([3.0, -6.0, 0.0], dtype=torch.float64))
    # frequency: p0 has signs (+, −) → tie → 0
    assert float(ties(tasks, [1.0, -1.0], 1.0, "frequency")[0]) == 0.0


def test_negative_weight_same_as_negated_task():
    tasks = _int_tasks((4, 5), 16)
    flipped = tasks.clone()
    flipped[1] = -flipped[1]
    w_neg = [0.5, -0.8, 0.3]
    w_pos = [0.5, 0.8, 0.3]
    for method in ("total", "frequency"):
        assert_close(ties(tasks, w_neg, 0.5, method), ties(flipped, w_pos, 0.5, method))
        gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        assert_close(dare_ties(tasks, w_neg, 0.5, gen_a, method), dare_ties(flipped, w_pos, 0.5, gen_b, method))


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "density, error",
    [(0, ValueError), (0.0, ValueError), (1.5, ValueError), (-0.1, ValueError), (float("nan"), ValueError),
     (float("inf"), ValueError), (True, TypeError), ("0.5", TypeError), (None, TypeError)],
)
def test_invalid_density(density, error):
    """One validator for every path (strategy options included): TypeError for a value that is not a
    number, ValueError for a number out of range."""
    with pytest.raises(error, match=r"density.*\(0, 1\].*density=0\.2"):
        check_density(density)
    tasks = _gauss_tasks((3, 3), 0)
    for call in (
        lambda: magnitude_mask(tasks[0], density),
        lambda: ties(tasks, WEIGHTS, density),
        lambda: dare_linear(tasks, WEIGHTS, density, torch.Generator()),
        lambda: dare_ties(tasks, WEIGHTS, density, torch.Generator()),
        lambda: magnitude_prune(tasks, WEIGHTS, density),
        lambda: breadcrumbs(tasks, WEIGHTS, density, 0.1),
    ):
        with pytest.raises(error, match="density"):
            call()


@pytest.mark.parametrize("gamma", [1, 1.0, -0.1, float("nan"), 2.0])
def test_invalid_gamma(gamma):
    with pytest.raises(ValueError, match=r"gamma.*\[0, 1\).*gamma=0"):
        check_gamma(gamma)
    with pytest.raises(ValueError, match="gamma"):
        breadcrumbs(_gauss_tasks((3, 3), 0), WEIGHTS, 0.5, gamma)


def test_invalid_sign_method():
    with pytest.raises(ValueError, match=r"'foo'.*'total'.*'frequency'"):
        check_sign_method("foo")
    tasks = _gauss_tasks((3, 3), 0)
    with pytest.raises(ValueError, match="'total'"):
        ties(tasks, WEIGHTS, 0.5, "foo")
    with pytest.raises(ValueError, match="'frequency'"):
        dare_ties(tasks, WEIGHTS, 0.5, torch.Generator(), "foo")
    with pytest.raises(ValueError, match="'total'"):
        elect_sign(tasks, "foo")


def test_valid_options_pass_through():
    assert check_density(1) == 1.0 and check_density(0.2) == 0.2
    assert check_gamma(0) == 0.0
    assert check_sign_method("frequency") == "frequency"


def test_weight_count_mismatch():
    with pytest.raises(ValueError, match="one weight per task"):
        task_arithmetic(_gauss_tasks((3, 3), 0), [1.0, 2.0])


# --------------------------------------------------------------------------- property tests

_weight = st.floats(0.1, 3.0).flatmap(lambda m: st.sampled_from([m, -m]))


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 4).flatmap(
        lambda n: st.tuples(
            st.lists(_weight, min_size=n, max_size=n),
            st.integers(1, 4),
            st.integers(1, 4),
            st.integers(0, 2**31 - 1),
            st.sampled_from(["total", "frequency"]),
        )
    )
)
def test_property_no_conflict_density_one_is_task_arithmetic(args):
    weights, rows, cols, seed, method = args
    tasks = _no_conflict_tasks(seed, (rows, cols), weights)
    expected = task_arithmetic(tasks, weights)
    lam = torch.tensor(weights, dtype=torch.float64).view(-1, 1, 1)
    weighted = lam * tasks
    assert_close(disjoint_merge(weighted, elect_sign(weighted, method), weights), expected)
    assert_close(ties(tasks, weights, 1.0, method), expected)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 4),
    numel=st.integers(1, 12),
    seed=st.integers(0, 2**31 - 1),
    density=st.integers(1, 100).map(lambda k: k / 100),
    gamma=st.integers(0, 99).map(lambda k: k / 100),
    method=st.sampled_from(["total", "frequency"]),
)
def test_property_matches_references(n, numel, seed, density, gamma, method):
    tasks = _int_tasks((numel,), seed, n=n)
    weights = [((-1) ** i) * (i + 1) / 2 for i in range(n)]
    assert_close(ties(tasks, weights, density, method), ref_ties(tasks, weights, density, method))
    assert_close(magnitude_prune(tasks, weights, density), ref_magnitude_prune(tasks, weights, density))
    assert_close(breadcrumbs(tasks, weights, density, gamma), ref_breadcrumbs(tasks, weights, density, gamma))
    mask = magnitude_mask(tasks[0], density)
    assert int(mask.sum()) == _ref_ceil(density, numel)
