"""DELLA (``della``, ``della_linear``: MAGPRUNE × TIES sign election / sum; issue 18, item 6) against a
dense float64 reference written here from the paper and the authors' code (same documented mask stream),
the law of the keep probabilities, a tiny model's forward pass, saved folders and mergekit's YAML."""
from __future__ import annotations

import math
import textwrap
import warnings

import numpy as np
import pytest
import torch

from adapter_merging import merge_saved_adapters
from adapter_merging.cli import ConfigError, plan_from_yaml
from adapter_merging.ops import chunked
from adapter_merging.ops.task_vectors import magprune, pcg64_uniforms
from adapter_merging.strategies import get_strategy

from lora_native_helpers import effective_updates, lora_model, lora_paths, random_factors


# ----------------------------------------------------------------------------- the reference
def reference_seeds(n, generator):
    """One 63-bit seed per task, drawn in task order (as DARE draws its seeds)."""
    return [int(torch.randint(0, 2**63 - 1, (1,), generator=generator, dtype=torch.int64)) for _ in range(n)]


def reference_uniforms(seed, count):
    """The documented stream: PCG64(seed)'s raw 64-bit words, low 32-bit half first."""
    halves = []
    for word in np.random.PCG64(seed).random_raw((count + 1) // 2).tolist():
        halves += [word & 0xFFFFFFFF, word >> 32]
    return halves[:count]


def reference_magprune(task, density, epsilon, seed, divide=True):
    """MAGPRUNE of one task (d × k, float64), written out entry by entry: in each row the entries ranked
    by increasing |x| (ρ = 0 … k−1; equal magnitudes: the higher column ranks lower), kept with
    probability p = (density − ε) + 2ε·ρ/(k−1) — kept where u < round(p·2³²) — and divided by p."""
    d, k = task.shape
    if density >= 1:
        return task.clone()
    u = reference_uniforms(seed, d * k)
    out = torch.zeros_like(task)
    for i in range(d):
        row = task[i].tolist()
        ascending = sorted(range(k), key=lambda j: (abs(row[j]), -j))
        for rho, j in enumerate(ascending):
            p = (density - epsilon) + rho / (k - 1) * (2 * epsilon) if k > 1 else density
            if u[i * k + j] < round(p * 2**32):
                out[i, j] = row[j] / p if divide else row[j]
    return out


def reference_ties(trimmed, weights, method="total"):
    """This library's TIES consensus: λ applied before the election, the weight-mass disjoint mean."""
    lam = torch.tensor(weights, dtype=torch.float64).view(-1, 1, 1)
    weighted = lam * trimmed
    votes = weighted.sum(0) if method == "total" else torch.sign(weighted).sum(0)
    elected = torch.sign(votes)
    agree = (torch.sign(weighted) == elected) & (weighted != 0)
    mass = (agree * lam.abs()).sum(0)
    summed = (weighted * agree).sum(0)
    return torch.where(mass > 0, lam.abs().sum() * summed / mass.clamp_min(1e-300), torch.zeros((), dtype=torch.float64))


def reference_mergekit(trimmed, originals, weights, consensus, normalize, rescale):
    """mergekit 0.1.5's generalized task arithmetic on the masked tasks (L1 `rescale`, its divisors)."""
    kept = []
    for y, x in zip(trimmed, originals):
        if rescale and x.abs().sum() >= 1e-7 and y.abs().sum() >= 1e-7:
            y = y * (x.abs().sum() / y.abs().sum())
        kept.append(y)
    lam = torch.tensor(weights, dtype=torch.float64).view(-1, 1, 1)
    deltas = torch.stack(kept) * lam
    if consensus:
        majority = (deltas.sum(0) >= 0).double() * 2 - 1
        agree = (deltas.sign() == majority).double()
        mixed, divisor = (deltas * agree).sum(0), (lam * agree).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed, divisor = deltas.sum(0), lam.sum(0)
        divisor[divisor.abs() < 1e-8] = 1
    return mixed / divisor if normalize else mixed


def reference_della(tasks, weights, density, epsilon, generator, consensus, method="total"):
    densities = density if isinstance(density, (list, tuple)) else [density] * len(tasks)
    epsilons = epsilon if isinstance(epsilon, (list, tuple)) else [epsilon] * len(tasks)
    seeds = reference_seeds(len(tasks), generator)
    trimmed = torch.stack([reference_magprune(t, d, e, s) for t, d, e, s in zip(tasks, densities, epsilons, seeds)])
    if consensus:
        return reference_ties(trimmed, weights, method)
    return sum(w * t for w, t in zip(weights, trimmed))


def rel(x, ref):
    return float(torch.linalg.matrix_norm(x - ref) / torch.linalg.matrix_norm(ref))


# ----------------------------------------------------------------------------- chunked = reference
@pytest.mark.parametrize("chunk", [150, 1 << 18])  # 5 rows of 29: odd offsets
@pytest.mark.parametrize("consensus", ["sum", "total", "frequency"])
def test_chunked_magprune_equals_the_dense_reference(consensus, chunk, monkeypatch):
    monkeypatch.setattr(chunked, "CHUNK_ENTRIES", chunk)  # several chunks of rows, odd offsets included
    tasks = torch.randn(3, 23, 29, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    tasks[1, 4, :6] = 0.25  # equal magnitudes in a row: ranked by column
    weights, densities, epsilons = [1.0, 0.5, -0.7], [0.3, 0.5, 0.8], [0.1, 0.5, 0.2]
    combine = chunked.Sum() if consensus == "sum" else chunked.SignElection(consensus)
    got = chunked.merge(chunked.DenseTasks(tasks.clone()), weights, chunked.MagPrune(densities, epsilons),
                        combine, torch.Generator().manual_seed(7))
    want = reference_della(tasks, weights, densities, epsilons, torch.Generator().manual_seed(7),
                           consensus != "sum", consensus)
    assert torch.allclose(got, want, rtol=1e-13, atol=1e-13)
    assert float(want.abs().sum()) > 0
    # the dense op of ops.task_vectors draws the same masks
    dense = magprune(tasks, densities, epsilons, torch.Generator().manual_seed(7))
    seeds = reference_seeds(3, torch.Generator().manual_seed(7))
    for i in range(3):
        assert torch.allclose(dense[i], reference_magprune(tasks[i], densities[i], epsilons[i], seeds[i]), rtol=1e-14, atol=0)


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("consensus", [False, True])
def test_mergekit_convention_masks_without_one_over_p(consensus, normalize, rescale, monkeypatch):
    monkeypatch.setattr(chunked, "CHUNK_ENTRIES", 150)
    tasks = torch.randn(3, 17, 13, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    weights, density, epsilon = [0.6, 0.3, -0.4], 0.4, 0.15
    combine = chunked.MergekitSignElection("total", normalize) if consensus else chunked.MergekitSum(normalize)
    got = chunked.merge(chunked.DenseTasks(tasks.clone()), weights, chunked.MagPrune(density, epsilon, "mergekit"),
                        combine, torch.Generator().manual_seed(3), rescale=rescale, scale=1.3)
    seeds = reference_seeds(3, torch.Generator().manual_seed(3))
    masked = [reference_magprune(t, density, epsilon, s, divide=False) for t, s in zip(tasks, seeds)]
    want = 1.3 * reference_mergekit(masked, tasks, weights, consensus, normalize, rescale)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-13)


def test_stream_from_any_offset_is_the_stream():
    full = np.array(reference_uniforms(12345, 101), dtype=np.uint64)
    for offset, count in [(0, 101), (1, 50), (37, 64), (100, 1), (2, 99)]:
        assert np.array_equal(pcg64_uniforms(12345, offset, count).astype(np.uint64), full[offset : offset + count])


# ----------------------------------------------------------------------------- the rule on factors
@pytest.mark.parametrize("strategy", ["della", "della_linear"])
def test_rule_on_factors_equals_the_reference_at_the_exact_rank(strategy):
    """Different ranks and scalings, a negative weight, float64 factors; svd_rank = min(d, k): the
    stored update is the dense reference within 1e-6 relative."""
    d, k = 24, 19
    factors = random_factors(5, d, k, [2, 5, 3])
    scalings, weights = [2.0, 0.5, 1.25], [0.7, -0.4, 0.9]
    options = get_strategy(strategy).parse_options(k, {"density": 0.35, "epsilon": 0.2, "seed": 11})
    merge = get_strategy(strategy).rule.decompose(factors, weights, scalings, [2, 5, 3], 1.5, torch.float64, options,
                                                  torch.Generator().manual_seed(11))
    stored = 1.5 * merge.stored[0] @ merge.stored[1]
    tasks = torch.stack([s * b @ a for (b, a), s in zip(factors, scalings)])
    want = reference_della(tasks, weights, 0.35, 0.2, torch.Generator().manual_seed(11), strategy == "della")
    assert rel(stored, want) < 1e-6
    assert merge.diff_sq <= 1e-12 * merge.ref_sq


# ----------------------------------------------------------------------------- defining properties
def test_keep_probabilities_follow_the_law_and_the_survivors_are_unbiased():
    """Over 300 seeds: entry of ascending rank ρ is kept with frequency (density − ε) + 2ε·ρ/(k−1)
    (within 5 binomial standard deviations), and the mean of τ̂ is τ (E[m/p] = 1)."""
    rows, k, density, epsilon, draws = 40, 9, 0.45, 0.3, 300
    row = torch.tensor([0.5, -3.0, 1.0, 2.0, -0.25, 4.0, -1.5, 0.75, 2.5], dtype=torch.float64)
    tasks = row.repeat(rows, 1).unsqueeze(0)
    ascending = sorted(range(k), key=lambda j: abs(float(row[j])))
    expected = torch.empty(k, dtype=torch.float64)
    for rho, j in enumerate(ascending):
        expected[j] = (density - epsilon) + 2 * epsilon * rho / (k - 1)
    kept = torch.zeros(k, dtype=torch.float64)
    total = torch.zeros(k, dtype=torch.float64)
    for seed in range(draws):
        out = magprune(tasks, density, epsilon, torch.Generator().manual_seed(seed))[0]
        kept += (out != 0).double().sum(0)
        total += out.sum(0)
    n = rows * draws
    frequency = kept / n
    sd = torch.sqrt(expected * (1 - expected) / n)
    assert torch.all((frequency - expected).abs() <= 5 * sd), (frequency, expected)
    assert float(frequency.mean()) == pytest.approx(density, abs=0.01)  # the mean keep rate is density
    mean = total / n
    spread = row.abs() * torch.sqrt((1 - expected) / (expected * n))  # sd of the mean of x·m/p
    assert torch.all((mean - row).abs() <= 5 * spread)


@pytest.mark.parametrize("della, dare", [("della", "dare_ties"), ("della_linear", "dare_linear")])
def test_epsilon_zero_is_dare_with_the_same_seed(della, dare):
    model, names = lora_model([(2, 4), (4, 4), (3, 6)], seed=3)
    weights = [1.0, -0.5, 0.8]
    model.average_adapter("della", names, weights=weights, normalize_weights=False, combine_strategy=della,
                          density=0.4, epsilon=0.0, seed=9, svd_rank=32)
    model.average_adapter("dare", names, weights=weights, normalize_weights=False, combine_strategy=dare,
                          density=0.4, seed=9, svd_rank=32)
    params = dict(model.named_parameters())
    pairs = [(v, params[key.replace(".della.", ".dare.")]) for key, v in params.items() if ".loras.della." in key]
    assert pairs and all(torch.equal(a, b) for a, b in pairs)


def test_density_one_keeps_everything_whatever_epsilon():
    tasks = torch.randn(2, 6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    assert torch.equal(magprune(tasks, 1.0, 0.3, torch.Generator().manual_seed(0)), tasks)
    got = chunked.merge(chunked.DenseTasks(tasks.clone()), [1.0, 2.0], chunked.MagPrune(1.0, 0.3), chunked.Sum(),
                        torch.Generator().manual_seed(0))
    assert torch.allclose(got, tasks[0] + 2 * tasks[1], rtol=1e-15, atol=0)


# ----------------------------------------------------------------------------- through a model
@pytest.mark.parametrize("strategy", ["della", "della_linear"])
def test_forward_pass_of_the_merged_adapter_is_the_reference(strategy):
    """A tiny BERT, 3 LoRAs of different r and alpha, a negative weight, svd_rank = 32 = min(d, k): the
    merged adapter's ΔW, measured through each layer's forward pass, is the reference merge of the
    inputs' ΔWᵢ (masks drawn module by module in sorted path order, input by input)."""
    model, names = lora_model([(2, 4), (4, 4), (3, 6)], seed=1)
    weights, options = [1.0, -0.6, 0.8], dict(density=0.3, epsilon=0.2, seed=5)
    generator = torch.Generator().manual_seed(5)
    references = {}
    for path in lora_paths(model, names[0]):
        updates = effective_updates(model, path, names)
        references[path] = reference_della(torch.stack([updates[n] for n in names]), weights, 0.3, 0.2, generator,
                                           strategy == "della")
    report = model.average_adapter("merged", names, weights=weights, normalize_weights=False,
                                   combine_strategy=strategy, svd_rank=32, **options)
    assert report.target == f"the dense {strategy} merge of the ΔWᵢ"
    assert report.max_error <= 1e-5
    for path, want in references.items():
        got = effective_updates(model, path, ["merged"])["merged"]
        assert rel(got, want) <= 1e-5, path


def test_from_saved_folders_equals_the_in_model_merge(tmp_path):
    model, names = lora_model([(2, 4), (4, 8)], seed=2)
    for name in names:
        model.save_adapter(str(tmp_path / name), name)
    weights = [0.7, -0.3]
    options = dict(density=0.4, epsilon=0.25, seed=3, svd_rank=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        report = merge_saved_adapters([tmp_path / n for n in names], tmp_path / "merged", weights=weights,
                                      normalize_weights=False, combine_strategy="della", **options)
        model.average_adapter("reference", names, weights=weights, normalize_weights=False,
                              combine_strategy="della", **options)
    assert report.max_error <= 1e-5
    model.load_adapter(str(tmp_path / "merged"))
    for path in lora_paths(model, "reference"):
        updates = effective_updates(model, path, ["merged", "reference"])
        assert rel(updates["merged"], updates["reference"]) <= 1e-6, path


# ----------------------------------------------------------------------------- options and YAML
@pytest.mark.parametrize("options, error, match", [
    (dict(epsilon="0.1"), TypeError, "epsilon must be a number"),
    (dict(epsilon=-0.1), ValueError, "epsilon must be a finite number in"),
    (dict(epsilon=float("nan")), ValueError, "epsilon must be a finite number in"),
    (dict(density=0.1, epsilon=0.2), ValueError, r"density − epsilon to density \+ epsilon.*Pass epsilon ≤ 0.1"),
    (dict(density=0.9, epsilon=0.15), ValueError, r"\[0.75, 1.05\]"),
    (dict(density=[0.2, 0.5], epsilon=[0.1, 0.6]), ValueError, "epsilon must be a finite number in"),
])
def test_bad_epsilon_is_refused_and_the_model_is_unchanged(options, error, match):
    model, names = lora_model([(2, 4), (4, 4)], seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        model.average_adapter("bad", names, combine_strategy="della", **options)
    assert "bad" not in model.adapters_config
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_epsilon_belongs_to_della_only():
    with pytest.raises(TypeError, match=r"Unknown option\(s\) \['epsilon'\] for combine_strategy='ties'"):
        get_strategy("ties").parse_options(None, {"epsilon": 0.1})
    parsed = get_strategy("della_linear").parse_options(None, {})
    assert parsed["epsilon"] == 0.15 and parsed["density"] == 0.2 and parsed["seed"] == 0
    assert get_strategy("della").parse_options(None, {"density": 1.0, "epsilon": 0.4})["epsilon"] == 0.4
    assert get_strategy("della").parse_options(None, {"density": 0.7, "epsilon": 0.3})["epsilon"] == 0.3  # [0.4, 1]


MODELS = """
models:
  - model: a
    parameters: {weight: 1.0, density: 0.5}
  - model: b
    parameters: {weight: -0.5, density: 0.4, epsilon: 0.1}
"""


def plan(tmp_path, text):
    path = tmp_path / "merge.yml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return plan_from_yaml(path)


@pytest.mark.parametrize("method, normalize", [("della", True), ("della_linear", False)])
def test_yaml_della_reads_mergekits_names_and_defaults(tmp_path, method, normalize):
    got = plan(tmp_path, MODELS + f"merge_method: {method}\nparameters: {{lambda: 1.5, seed: 4}}\n")
    options = got["options"]
    assert got["strategy"] == method and got["weights"] == [1.0, -0.5]
    assert options["convention"] == "mergekit" and options["normalize"] is normalize and options["rescale"] is True
    assert options["density"] == [0.5, 0.4] and options["epsilon"] == [0.15, 0.1]  # mergekit's default 0.15
    assert options["scale"] == 1.5 and options["seed"] == 4
    assert any("MAGPRUNE's random masks" in note for note in got["notes"])
    parsed = get_strategy(method).parse_options(None, options)  # the plan's options are the strategy's
    assert parsed["epsilon"] == (0.15, 0.1)
    flat = plan(tmp_path, MODELS.replace(", epsilon: 0.1", "") + f"merge_method: {method}\n"
                "parameters: {epsilon: 0.05, rescale: false, normalize: " + str(not normalize).lower() + "}\n")
    assert flat["options"]["epsilon"] == 0.05 and flat["options"]["rescale"] is False
    assert flat["options"]["normalize"] is (not normalize)


def test_yaml_della_refusals(tmp_path):
    with pytest.raises(ConfigError, match=r"models\[1\] has density 0.4 and epsilon 0.4: mergekit needs density ± "
                                          r"epsilon inside \(0, 1\)"):
        plan(tmp_path, MODELS.replace("epsilon: 0.1", "epsilon: 0.4") + "merge_method: della\n")
    with pytest.raises(ConfigError, match=r"parameters\.epsilon \(not a parameter of ties"):
        plan(tmp_path, MODELS.replace(", epsilon: 0.1", "") + "merge_method: ties\nparameters: {epsilon: 0.1}\n")
    with pytest.raises(ConfigError, match=r"epsilon must be a finite number, got 'x' \(a string\)"):
        plan(tmp_path, MODELS.replace("epsilon: 0.1", "epsilon: x") + "merge_method: della_linear\n")
    # density 1 keeps everything in mergekit, whatever epsilon
    assert plan(tmp_path, MODELS.replace("density: 0.4, epsilon: 0.1", "density: 1.0, epsilon: 0.4")
                + "merge_method: della\n")["options"]["epsilon"] == [0.15, 0.4]


# ----------------------------------------------------------------------------- in Core Space and KnOTS' space
@pytest.mark.parametrize("space", ["core", "knots"])
@pytest.mark.parametrize("strategy", ["della", "della_linear"])
def test_in_the_small_spaces_magprune_runs_on_their_matrices(strategy, space, monkeypatch):
    """space='core' / 'knots': MAGPRUNE and the consensus run on the cores (or KnOTS' task parts), rows of
    those matrices ranked, masks from the same seeded stream; the stored update is the space's reference
    with the dense DELLA rule written here, within 1e-6 relative."""
    import space_reference

    def rule(name, matrices, weights, options, generator=None):
        tasks = torch.stack([torch.as_tensor(m, dtype=torch.float64) for m in matrices])
        merged = reference_della(tasks, weights, options["density"], options["epsilon"], generator, name == "della")
        return merged.numpy()

    monkeypatch.setattr(space_reference, "rule", rule)
    factors = random_factors(8, 30, 26, [3, 5, 2])
    scalings, weights = [2.0, 0.5, 1.5], [0.8, -0.5, 0.6]
    options = dict(density=0.4, epsilon=0.3, seed=2, space=space)
    parsed = get_strategy(strategy).parse_options(None, options)
    merge = get_strategy(strategy).rule.decompose(factors, weights, scalings, [3, 5, 2], 1.0, torch.float64, parsed,
                                                  torch.Generator().manual_seed(2))
    stored = merge.stored[0] @ merge.stored[1]
    reference = space_reference.core_reference if space == "core" else space_reference.knots_reference
    want = torch.as_tensor(reference(strategy, factors, scalings, weights, options, torch.Generator().manual_seed(2)))
    assert rel(stored, want) < 1e-6


def test_ranks_of_float32_and_float64_agree_ties_included():
    """float32 magnitudes are ranked by one sort of unique integer keys, float64 by a stable sort: the
    same ranks, equal magnitudes (and ±0) ranked by column, the lower column as the larger."""
    from adapter_merging.ops.task_vectors import magprune_probabilities

    values = torch.tensor([[0.5, -0.5, 0.0, -0.0, 2.0, 0.5, -1.0, 0.0],
                           [3.0, 3.0, 3.0, 3.0, -3.0, 1.0, 1.0, -1.0]])
    p32 = magprune_probabilities(values.abs(), 0.5, 0.35)
    p64 = magprune_probabilities(values.double().abs(), 0.5, 0.35)
    assert torch.equal(p32, p64)
    step = 0.7 / 7
    # row 0 ascending: 0 (col 7), 0 (col 3), 0 (col 2), 0.5 (col 5), 0.5 (col 1), 0.5 (col 0), 1 (col 6), 2 (col 4)
    rank = torch.tensor([[5, 4, 2, 1, 7, 3, 6, 0], [7, 6, 5, 4, 3, 2, 1, 0]], dtype=torch.float64)
    assert torch.allclose(p64, 0.15 + step * rank, rtol=0, atol=1e-15)
