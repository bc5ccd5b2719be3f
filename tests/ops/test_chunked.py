"""Task-vector merges row chunk by row chunk (`ops.chunked`) are bit-identical to the dense definitions
(`ops.task_vectors`) on the same tasks: the same masks, the same arithmetic per entry."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adapter_merging.ops import chunked, task_vectors

WEIGHTS = [0.7, -0.4, 0.5]


def dense_and_chunked(name, tasks, weights, density=0.3, gamma=0.05, method="total", seed=3):
    """(dense definition, chunked merge) of one strategy on stacked ``tasks``."""
    dense = {
        "ties": lambda: task_vectors.ties(tasks, weights, density, method),
        "magnitude_prune": lambda: task_vectors.magnitude_prune(tasks, weights, density),
        "breadcrumbs": lambda: task_vectors.breadcrumbs(tasks, weights, density, gamma),
        "dare_linear": lambda: task_vectors.dare_linear(tasks, weights, density, torch.Generator().manual_seed(seed)),
        "dare_ties": lambda: task_vectors.dare_ties(tasks, weights, density, torch.Generator().manual_seed(seed), method),
        "task_arithmetic": lambda: task_vectors.task_arithmetic(tasks, weights),
    }[name]()
    sparsify = {
        "ties": chunked.KeepWindow(density), "magnitude_prune": chunked.KeepWindow(density),
        "breadcrumbs": chunked.KeepWindow(density, gamma), "dare_linear": chunked.DropAndRescale(density),
        "dare_ties": chunked.DropAndRescale(density), "task_arithmetic": chunked.KeepAll(),
    }[name]
    consensus = chunked.ties_consensus(method) if name in ("ties", "dare_ties") else chunked.sum_consensus()
    merged = chunked.merge(chunked.DenseTasks(tasks), weights, sparsify, consensus, torch.Generator().manual_seed(seed))
    return dense, merged


STRATEGIES = ["ties", "magnitude_prune", "breadcrumbs", "dare_linear", "dare_ties", "task_arithmetic"]


@pytest.fixture(autouse=True, scope="module")
def sampled_selection():
    """Every test here selects by the sample's brackets, as large tasks do (small dense tasks are otherwise
    selected over all their entries: `test_small_dense_tasks_are_selected_in_full_with_the_same_result`)."""
    saved = chunked.SELECT_IN_FULL_BELOW
    chunked.SELECT_IN_FULL_BELOW = 0
    yield
    chunked.SELECT_IN_FULL_BELOW = saved


@pytest.mark.parametrize("name", ["ties", "magnitude_prune", "breadcrumbs"])
def test_small_dense_tasks_are_selected_in_full_with_the_same_result(name, monkeypatch):
    """The exact selection over every entry (small dense tasks: KnOTS' parts) gives bit for bit the masks
    of the sampled brackets, ties in magnitude included (entries rounded to a coarse grid)."""
    tasks = torch.round(torch.randn(3, 60, 70, generator=torch.Generator().manual_seed(5)) * 8) / 8
    _, sampled = dense_and_chunked(name, tasks, WEIGHTS, density=0.3, gamma=0.05)
    monkeypatch.setattr(chunked, "SELECT_IN_FULL_BELOW", 1 << 22)
    calls = []
    original = chunked._select_in_full
    monkeypatch.setattr(chunked, "_select_in_full", lambda *a: calls.append(a) or original(*a))
    dense, in_full = dense_and_chunked(name, tasks, WEIGHTS, density=0.3, gamma=0.05)
    assert calls and torch.equal(in_full, sampled) and torch.equal(in_full, dense)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of a few rows and a small sample, so that every path runs on small tensors."""
    monkeypatch.setattr(chunked, "CHUNK_ENTRIES", 64)
    monkeypatch.setattr(chunked, "SAMPLE_ENTRIES", 256)


@pytest.mark.parametrize("name", STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunked_merge_is_bit_identical_to_the_dense_definition(name, dtype, small_chunks):
    tasks = torch.randn(3, 37, 53, generator=torch.Generator().manual_seed(0), dtype=dtype)
    dense, merged = dense_and_chunked(name, tasks, WEIGHTS)
    assert merged.dtype == dtype and torch.equal(merged, dense)


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from(STRATEGIES), st.integers(1, 4), st.integers(1, 9), st.integers(1, 13),
    st.floats(0.01, 1.0), st.floats(0.0, 0.5), st.sampled_from(["total", "frequency"]), st.integers(0, 2**31),
    st.booleans(),
)
def test_property_bit_identical_on_tie_heavy_inputs(name, n, d, k, density, gamma, method, seed, special):
    """Integer-valued tasks (many equal magnitudes: the tie rule by flat index), ±inf and NaN entries,
    tiny chunks and samples (brackets miss, the exact fallback runs)."""
    generator = torch.Generator().manual_seed(seed)
    tasks = torch.randint(-3, 4, (n, d, k), generator=generator).double()
    if special:
        flat = tasks.view(-1)
        flat[torch.randint(0, flat.numel(), (3,), generator=generator)] = torch.tensor([float("inf"), -float("inf"), float("nan")], dtype=torch.float64)
    weights = [float(w) for w in torch.randn(n, generator=generator)]
    old = chunked.CHUNK_ENTRIES, chunked.SAMPLE_ENTRIES
    chunked.CHUNK_ENTRIES, chunked.SAMPLE_ENTRIES = 7, 5
    try:
        dense, merged = dense_and_chunked(name, tasks, weights, density, gamma, method, seed)
    finally:
        chunked.CHUNK_ENTRIES, chunked.SAMPLE_ENTRIES = old
    assert torch.equal(torch.nan_to_num(merged, nan=123.0), torch.nan_to_num(dense, nan=123.0))
    assert torch.equal(torch.isnan(merged), torch.isnan(dense))


def test_exact_selection_without_the_fallback(monkeypatch):
    """On ordinary data the sample's bracket holds the threshold: no task is selected in full."""
    calls = []
    monkeypatch.setattr(chunked, "_select_in_full", lambda *a: calls.append(a) or pytest.fail("fallback used"))
    monkeypatch.setattr(chunked, "CHUNK_ENTRIES", 4096)
    tasks = torch.randn(3, 300, 400, generator=torch.Generator().manual_seed(1))
    for name in ("ties", "breadcrumbs"):
        dense, merged = dense_and_chunked(name, tasks, WEIGHTS, density=0.2, gamma=0.01)
        assert torch.equal(merged, dense)
    assert not calls


def test_per_task_density(small_chunks):
    tasks = torch.randn(3, 20, 30, generator=torch.Generator().manual_seed(2))
    densities = [0.1, 0.5, 1.0]
    merged = chunked.merge(chunked.DenseTasks(tasks), WEIGHTS, chunked.KeepWindow(densities), chunked.sum_consensus())
    expected = sum(w * (t * task_vectors.magnitude_mask(t, p)) for w, t, p in zip(WEIGHTS, tasks, densities))
    torch.testing.assert_close(merged, expected)


def test_factored_tasks_are_the_products():
    generator = torch.Generator().manual_seed(4)
    factors = [(torch.randn(40, 3, generator=generator), torch.randn(3, 50, generator=generator)) for _ in range(2)]
    tasks = chunked.FactoredTasks(factors, [2.0, -0.5], torch.float64)
    dense = torch.stack([s * (b.double() @ a.double()) for (b, a), s in zip(factors, [2.0, -0.5])])
    assert torch.equal(tasks.rows(1, slice(5, 17)), dense[1, 5:17])
    rows, cols = torch.tensor([0, 7, 39]), torch.tensor([49, 3, 0])
    torch.testing.assert_close(tasks.entries(0, rows, cols), dense[0, rows, cols])
