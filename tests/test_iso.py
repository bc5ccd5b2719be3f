"""Iso-C and Iso-CTS (``iso_c``, ``iso_cts``; Marczak et al. 2025) against dense float64 references of
their definitions, written here from the paper and the authors' code (danielm1405/iso-merging,
src/utils/iso.py), with one substitution for LoRA inputs: the dimension the authors split, min(d, k),
is read as the exact rank of the weighted sum (they are equal where the sum has full rank, as in their
dense setting: the ``d < R`` case below is exactly their computation)."""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from adapters import LoRAConfig

from adapter_merging import merge_saved_adapters
from adapter_merging.rules.iso import task_split
from adapter_merging.strategies import get_strategy

from conftest import randomize_adapter, tiny_adapter_model

EXACT = 1e-6  # relative, float64 storage at the exact rank


# ============================================================================ dense references
def exact_rank(matrix: torch.Tensor) -> int:
    s = torch.linalg.svdvals(matrix)
    return int((s > 1e-10 * float(s[0])).sum()) if s.numel() and float(s[0]) > 0 else 0


def dense_iso_c(tasks) -> torch.Tensor:
    """Iso-C: the sum's SVD with every singular value replaced by their mean over its exact rank."""
    total = sum(tasks)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    n = exact_rank(total)
    return s[:n].mean() * u[:, :n] @ vh[:n]


def dense_iso_cts(tasks, common_fraction: float) -> torch.Tensor:
    """The authors' iso_cts on dense matrices (task vectors already weighted), the split dimension
    min(d, k) read as the exact rank of the sum, and a task whose projected update has fewer directions
    than its share giving only those (the authors' dense code would take singular vectors of value 0,
    arbitrary ones, and average their zeros)."""
    combined = sum(tasks)
    dim, count = exact_rank(combined), len(tasks)
    common = int(dim * common_fraction)
    task_total = round((dim - common) / count) * count
    common = dim - task_total
    u, s, vh = torch.linalg.svd(combined, full_matrices=False)
    u_c, s_c, vh_c = u[:, :common], s[:common], vh[:common]
    per_task = (dim - common) // count
    lefts, values, rights = [], [], []
    for w in tasks:
        u_t, s_t, vh_t = torch.linalg.svd(w - u_c @ u_c.T @ w, full_matrices=False)
        keep = min(per_task, exact_rank(w - u_c @ u_c.T @ w))  # a task of lower rank: no null vectors
        lefts.append(u_t[:, :keep])
        values.append(s_t[:keep])
        rights.append(vh_t[:keep])
    left = torch.cat(lefts + [u_c], dim=1)  # task parts first, then the common part, as the authors fill them
    right = torch.cat(rights + [vh_c], dim=0)
    value = torch.cat(values + [s_c]).mean()
    w_l, _, z_l = torch.linalg.svd(left, full_matrices=False)
    w_r, _, z_r = torch.linalg.svd(right, full_matrices=False)
    return (w_l @ z_l) @ (value * (w_r @ z_r))


# ============================================================================ helpers
def random_factors(seed, d, k, ranks):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(d, r, generator=g, dtype=torch.float64), torch.randn(r, k, generator=g, dtype=torch.float64))
            for r in ranks]


def run_rule(strategy, factors, weights, scalings, scaling=1.0, dtype=torch.float64, svd_rank=None, **options):
    chosen = get_strategy(strategy)
    parsed = chosen.parse_options(svd_rank, options)
    ranks = [b.shape[1] for b, _ in factors]
    merge = chosen.rule.decompose(factors, list(weights), list(scalings), ranks, scaling, dtype, parsed, None)
    b, a = merge.stored
    return merge, scaling * b.double() @ a.double()


def weighted_tasks(factors, weights, scalings):
    return [w * s * b @ a for (b, a), w, s in zip(factors, weights, scalings)]


def rel(x, ref) -> float:
    return float(torch.linalg.matrix_norm(x - ref) / torch.linalg.matrix_norm(ref))


# (d, k, ranks, scalings, weights)
CASES = {
    "three-tasks-mixed-signs": (40, 30, (3, 5, 4), (0.5, 2.0, 1.3), (0.7, -1.2, 0.4)),
    "two-tasks": (25, 50, (2, 6), (4.0, 0.25), (1.0, 1.0)),
    "four-tasks-negative": (60, 35, (4, 4, 4, 4), (1.0, 0.5, 2.0, 1.5), (0.3, -0.2, 0.6, -0.9)),
    "d-below-R-authors-setting": (10, 30, (4, 5, 6), (1.0, 2.0, 0.5), (0.5, 0.3, -0.8)),
}


# ============================================================================ the definitions
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("scaling", [1.0, -0.37])
def test_iso_c_equals_the_dense_definition(case, scaling):
    d, k, ranks, scalings, weights = CASES[case]
    factors = random_factors(1, d, k, ranks)
    reference = dense_iso_c(weighted_tasks(factors, weights, scalings))
    merge, stored = run_rule("iso_c", factors, weights, scalings, scaling=scaling)
    assert rel(stored, reference) < EXACT
    n = min(d, k, sum(ranks))
    assert merge.rank == merge.available == n
    assert merge.diff_sq <= (EXACT**2) * merge.ref_sq
    assert merge.ref_sq == pytest.approx(float(torch.linalg.matrix_norm(reference)) ** 2, rel=1e-9)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("common_fraction", [0.8, 0.5, 0.25])
def test_iso_cts_equals_the_dense_definition(case, common_fraction):
    d, k, ranks, scalings, weights = CASES[case]
    factors = random_factors(2, d, k, ranks)
    reference = dense_iso_cts(weighted_tasks(factors, weights, scalings), common_fraction)
    merge, stored = run_rule("iso_cts", factors, weights, scalings, scaling=0.8, common_fraction=common_fraction)
    assert rel(stored, reference) < EXACT
    assert merge.diff_sq <= (EXACT**2) * merge.ref_sq


def test_the_authors_split_of_the_dimension():
    # (rank, tasks, fraction) → (common, per task): the task part is a multiple of the number of tasks
    assert task_split(12, 3, 0.8) == (9, 1)
    assert task_split(16, 4, 0.6) == (8, 2)  # ⌊9.6⌋ = 9, round(7/4) = 2
    assert task_split(768, 8, 0.8) == (616, 19)  # ViT-B's 768: ⌊614.4⌋ = 614, round(154/8) = 19
    assert task_split(5, 8, 0.1) == (5, 0)  # fewer directions than tasks: all common (never a negative k_c)
    assert task_split(12, 3, 1.0) == (12, 0)


# ============================================================================ defining properties
# rank 17 = 6 + 3 + 8; common_fraction 0.3: 5 common + 4 per task, the rank-3 task gives only 3: 16
@pytest.mark.parametrize(
    "strategy,options,rank", [("iso_c", {}, 17), ("iso_cts", {}, 17), ("iso_cts", {"common_fraction": 0.3}, 16)]
)
def test_every_kept_singular_value_is_equal(strategy, options, rank):
    factors = random_factors(3, 50, 45, (6, 3, 8))
    merge, stored = run_rule(strategy, factors, (0.9, -0.6, 0.4), (2.0, 1.0, 0.5), **options)
    s = torch.linalg.svdvals(stored)
    n = merge.rank
    assert n == rank
    assert float((s[:n].max() - s[:n].min()) / s[:n].max()) < 1e-12
    assert float(s[n]) < 1e-12 * float(s[0])


def test_iso_c_keeps_the_singular_vectors_of_the_sum():
    factors = random_factors(4, 30, 20, (3, 4))
    tasks = weighted_tasks(factors, (1.0, -0.5), (1.0, 3.0))
    _, stored = run_rule("iso_c", factors, (1.0, -0.5), (1.0, 3.0))
    u, s, vh = torch.linalg.svd(sum(tasks), full_matrices=False)
    value = s[:7].mean()
    # same singular vectors, paired with the same signs: Uᵀ·stored·V = mean(S)·I
    torch.testing.assert_close(u[:, :7].T @ stored @ vh[:7].T, value * torch.eye(7, dtype=torch.float64), rtol=0, atol=1e-12)
    # and the same nuclear norm ÷ rank
    assert float(torch.linalg.matrix_norm(stored, "nuc")) == pytest.approx(float(s[:7].sum()), rel=1e-12)


def test_iso_cts_with_common_fraction_one_is_iso_c():
    factors = random_factors(5, 35, 28, (5, 2, 4))
    _, c = run_rule("iso_c", factors, (0.5, 0.2, -0.7), (1.0, 2.0, 0.5))
    _, cts = run_rule("iso_cts", factors, (0.5, 0.2, -0.7), (1.0, 2.0, 0.5), common_fraction=1.0)
    assert rel(cts, c) < 1e-12


def test_iso_cts_keeps_the_common_subspace_and_each_tasks_top_direction_off_it():
    factors = random_factors(6, 40, 30, (3, 5, 4))
    weights, scalings = (0.7, -1.2, 0.4), (0.5, 2.0, 1.3)
    tasks = weighted_tasks(factors, weights, scalings)
    _, stored = run_rule("iso_cts", factors, weights, scalings)  # 12 directions: 9 common, 1 per task
    u_s = torch.linalg.svd(stored, full_matrices=False)[0][:, :12]
    project = u_s @ u_s.T
    u_c = torch.linalg.svd(sum(tasks), full_matrices=False)[0][:, :9]
    assert float(torch.linalg.matrix_norm(u_c - project @ u_c)) < 1e-10
    for w in tasks:
        top = torch.linalg.svd(w - u_c @ u_c.T @ w, full_matrices=False)[0][:, :1]
        assert float(torch.linalg.matrix_norm(top - project @ top)) < 1e-10


def test_positively_homogeneous_and_odd_in_the_weights():
    factors = random_factors(7, 30, 25, (4, 4, 2))
    for strategy in ("iso_c", "iso_cts"):
        _, base = run_rule(strategy, factors, (0.5, -0.3, 0.8), (1.0, 1.0, 2.0))
        _, tripled = run_rule(strategy, factors, (1.5, -0.9, 2.4), (1.0, 1.0, 2.0))
        _, negated = run_rule(strategy, factors, (-0.5, 0.3, -0.8), (1.0, 1.0, 2.0))
        assert rel(tripled, 3 * base) < 1e-12
        assert rel(negated, -base) < 1e-12


# ============================================================================ truncation and edge cases
@pytest.mark.parametrize("strategy", ["iso_c", "iso_cts"])
def test_svd_rank_keeps_the_leading_directions_and_reports_the_rest(strategy):
    factors = random_factors(8, 40, 30, (3, 5, 4))
    weights, scalings = (0.7, -1.2, 0.4), (0.5, 2.0, 1.3)
    full_merge, full = run_rule(strategy, factors, weights, scalings)
    merge, stored = run_rule(strategy, factors, weights, scalings, svd_rank=5)
    assert merge.rank == 5 and merge.available == 12
    error = math.sqrt(merge.diff_sq / merge.ref_sq)
    assert error == pytest.approx(math.sqrt(7 / 12), rel=1e-9)  # every direction weighs the same
    assert rel(stored, full) == pytest.approx(math.sqrt(7 / 12), rel=1e-9)
    if strategy == "iso_c":  # the sum's five leading directions
        u, s, vh = torch.linalg.svd(sum(weighted_tasks(factors, weights, scalings)), full_matrices=False)
        assert rel(stored, s[:12].mean() * u[:, :5] @ vh[:5]) < 1e-10
    tol_merge, _ = run_rule(strategy, factors, weights, scalings, svd_tol=0.5)
    assert tol_merge.rank == 9  # smallest k with √((12 − k)/12) ≤ 0.5


def test_float32_storage_is_measured():
    factors = random_factors(9, 64, 48, (8, 8, 8))
    merge, stored = run_rule("iso_cts", factors, (0.4, 0.4, 0.4), (2.0, 2.0, 2.0), dtype=torch.float32)
    assert merge.stored[0].dtype == torch.float32
    reference = dense_iso_cts(weighted_tasks(factors, (0.4,) * 3, (2.0,) * 3), 0.8)
    actual = rel(stored, reference)
    assert actual < 1e-6
    assert actual <= math.sqrt(merge.diff_sq / merge.ref_sq) * 1.0001 + 1e-12  # the report never under-reports


@pytest.mark.parametrize("strategy", ["iso_c", "iso_cts"])
def test_updates_that_cancel_merge_to_zero(strategy):
    (b, a), = random_factors(10, 20, 15, (3,))
    merge, stored = run_rule(strategy, [(b, a), (b.clone(), a.clone())], (1.0, -1.0), (2.0, 2.0))
    assert merge.rank == 0 and merge.exact and stored.shape == (20, 15) and not stored.any()


def test_an_adapter_given_twice_gives_no_arbitrary_directions():
    (b, a), (b2, a2) = random_factors(11, 30, 25, (4, 3))
    factors = [(b, a), (b.clone(), a.clone()), (b2, a2)]
    merge, stored = run_rule("iso_cts", factors, (0.3, 0.3, 0.4), (1.0, 1.0, 1.0), common_fraction=0.5)
    assert torch.isfinite(stored).all()
    # everything lies in the inputs' spans
    q_b = torch.linalg.qr(torch.cat([b, b2], 1))[0]
    q_a = torch.linalg.qr(torch.cat([a, a2], 0).T)[0]
    assert float(torch.linalg.matrix_norm(stored - q_b @ q_b.T @ stored @ q_a @ q_a.T)) < 1e-10 * float(
        torch.linalg.matrix_norm(stored))
    # the duplicated task's direction is counted once: isotropic on the directions it spans
    s = torch.linalg.svdvals(stored)
    n = merge.rank
    assert float((s[:n].max() - s[:n].min()) / s[:n].max()) < 1e-10
    assert merge.diff_sq <= 1e-20 * merge.ref_sq


# ============================================================================ options
@pytest.mark.parametrize(
    "strategy,options,error,match",
    [
        ("iso_cts", {"common_fraction": 0}, ValueError, r"common_fraction must lie in \(0, 1\]"),
        ("iso_cts", {"common_fraction": 1.2}, ValueError, r"common_fraction must lie in \(0, 1\]"),
        ("iso_cts", {"common_fraction": float("nan")}, ValueError, "common_fraction"),
        ("iso_cts", {"common_fraction": "0.8"}, TypeError, "common_fraction must be a number"),
        ("iso_cts", {"common_fraction": True}, TypeError, "common_fraction must be a number"),
        ("iso_c", {"common_fraction": 0.5}, TypeError, r"Unknown option\(s\) \['common_fraction'\]"),
        ("iso_cts", {"density": 0.5}, TypeError, r"Unknown option\(s\) \['density'\]"),
        ("iso_c", {"svd_rank": 2, "svd_tol": 0.1}, ValueError, "either svd_rank"),
    ],
)
def test_bad_options_are_refused(strategy, options, error, match):
    options = dict(options)
    with pytest.raises(error, match=match):
        get_strategy(strategy).parse_options(options.pop("svd_rank", None), options)


def test_defaults():
    assert get_strategy("iso_cts").parse_options(None, {}) == {"common_fraction": 0.8, "svd_rank": None, "svd_tol": None}
    assert get_strategy("iso_c").parse_options(None, {}) == {"svd_rank": None, "svd_tol": None}


# ============================================================================ through a model, and from files
SPECS = [(2, 4), (3, 3), (4, 16)]
WEIGHTS = [0.8, -0.5, 1.1]


def _model(seed=0):
    model = tiny_adapter_model("bert", seed=seed)
    for i, (r, alpha) in enumerate(SPECS):
        model.add_adapter(f"l{i}", config=LoRAConfig(r=r, alpha=alpha))
        randomize_adapter(model, f"l{i}", seed=100 * seed + i)
    return model, [f"l{i}" for i in range(len(SPECS))]


def _updates(model, names):
    """{layer path: {name: ΔW}}: the update each adapter's LoRA layer applies, measured through the
    layer's forward pass on the identity input (float64 copies of the layer)."""
    key = f".loras.{names[0]}.lora_A"
    paths = sorted(n[: -len(key)] for n, _ in model.named_parameters() if n.endswith(key))
    saved = model.adapters_config.active_setup
    out = {}
    try:
        with torch.no_grad():
            for path in paths:
                module = model.get_submodule(path)
                x = torch.eye(module.in_features, dtype=torch.float64).unsqueeze(0)
                model.set_active_adapters(None)
                base = copy.deepcopy(module).double()(x)[0]
                out[path] = {}
                for name in names:
                    model.set_active_adapters(name)
                    out[path][name] = (copy.deepcopy(module).double()(x)[0] - base).T
    finally:
        model.adapters_config.active_setup = saved
    return out


@pytest.mark.parametrize("strategy,options", [("iso_c", {}), ("iso_cts", {"common_fraction": 0.6})])
def test_through_the_forward_pass_of_a_tiny_model(strategy, options):
    model, names = _model()
    report = model.average_adapter("merged", names, weights=WEIGHTS, combine_strategy=strategy,
                                   normalize_weights=False, **options)
    fraction = options.get("common_fraction", 1.0)
    updates = _updates(model, names + ["merged"])
    assert len(updates) == 4 and report.rank == 9  # min(32, 2 + 3 + 4)
    for path, by_name in updates.items():
        tasks = [w * by_name[n] for n, w in zip(names, WEIGHTS)]
        reference = dense_iso_cts(tasks, fraction) if strategy == "iso_cts" else dense_iso_c(tasks)
        assert rel(by_name["merged"], reference) < 1e-5  # stored in float32
    assert report.max_error < 1e-6  # against the isotropic update, in float32
    assert report.target != "Σ λᵢ ΔWᵢ"


@pytest.mark.parametrize("strategy,options", [("iso_c", {"svd_rank": 6}), ("iso_cts", {"common_fraction": 0.5})])
def test_from_saved_folders_equals_the_in_model_merge(strategy, options, tmp_path):
    model, names = _model(seed=1)
    for name in names:
        model.save_adapter(str(tmp_path / name), name, with_head=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # svd_rank=6 loses 1/3 of an isotropic update: it warns
        report = merge_saved_adapters([tmp_path / n for n in names], tmp_path / "merged", weights=WEIGHTS,
                                      combine_strategy=strategy, normalize_weights=False, **options)
        model.average_adapter("reference", names, weights=WEIGHTS, combine_strategy=strategy,
                              normalize_weights=False, **options)
    assert model.load_adapter(str(tmp_path / "merged")) == "merged"
    updates = _updates(model, names + ["merged", "reference"])
    fraction = options.get("common_fraction", 1.0)
    for by_name in updates.values():
        torch.testing.assert_close(by_name["merged"], by_name["reference"], rtol=1e-6, atol=1e-7)
        tasks = [w * by_name[n] for n, w in zip(names, WEIGHTS)]
        reference = dense_iso_cts(tasks, fraction) if strategy == "iso_cts" else dense_iso_c(tasks)
        error = rel(by_name["merged"], reference)
        if strategy == "iso_c":  # rank 6 of 9 equal directions: √(3/9) away
            assert error == pytest.approx(math.sqrt(3 / 9), rel=1e-5)
        else:
            assert error < 1e-5
    expected = math.sqrt(3 / 9) if strategy == "iso_c" else 0.0
    assert report.max_error == pytest.approx(expected, abs=1e-6)
