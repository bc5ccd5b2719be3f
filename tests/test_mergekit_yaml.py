"""The YAML front end reads mergekit's language as mergekit 0.1.5 does (issue 17, items 6, 9–11, 13, 15):
its per-method defaults, its kept counts and TIES divisor (against a dense float64 reference written
here), strict types, and one message for everything unsupported."""
from __future__ import annotations

import textwrap

import pytest
import torch

from adapter_merging.cli import ConfigError, plan_from_yaml
from adapter_merging.ops import chunked
from adapter_merging.ops.task_vectors import rank_window


def reference(tasks, weights, densities, gamma=None, consensus=False, normalize=True, rescale=False, lam=1.0):
    """mergekit 0.1.5's generalized task arithmetic, written out densely in float64 (argsort selections)."""
    kept = []
    for x, density in zip(tasks, densities):
        n = x.numel()
        if density >= 1:
            y = x.clone()
        else:
            mask = torch.zeros(n, dtype=x.dtype)
            if gamma is None:
                mask[torch.argsort(x.abs().reshape(-1), descending=True)[: max(1, int(density * n))]] = 1
            else:
                target, top = int(density * n), int(gamma * n)
                bottom = max(0, n - target - top)
                mask[torch.sort(x.abs().reshape(-1)).indices[bottom : bottom + target]] = 1
            y = x * mask.view_as(x)
            if rescale and x.abs().sum() >= 1e-7 and y.abs().sum() >= 1e-7:
                y = y * (x.abs().sum() / y.abs().sum())
        kept.append(y)
    lam_ = torch.tensor(weights, dtype=tasks.dtype).view(-1, 1, 1)
    deltas = torch.stack(kept) * lam_
    if consensus:
        majority = (deltas.sum(0) >= 0).to(deltas.dtype) * 2 - 1
        agree = (deltas.sign() == majority).to(deltas.dtype)
        mixed, divisor = (deltas * agree).sum(0), (lam_ * agree).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed, divisor = deltas.sum(0), lam_.sum(0)
        divisor[divisor.abs() < 1e-8] = 1
    return (mixed / divisor if normalize else mixed) * lam


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("kind", ["ties", "breadcrumbs", "breadcrumbs_ties", "breadcrumbs_gamma_shrinks"])
def test_chunked_mergekit_convention_equals_the_dense_reference(kind, normalize, rescale, monkeypatch):
    monkeypatch.setattr(chunked, "CHUNK_ENTRIES", 200)  # several chunks of rows
    tasks = torch.randn(3, 37, 29, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    weights, densities = [1.0, 0.5, -0.7], [0.3, 0.55, 0.8]
    gamma = {"ties": None, "breadcrumbs": 0.1, "breadcrumbs_ties": 0.1, "breadcrumbs_gamma_shrinks": 0.45}[kind]
    consensus = kind in ("ties", "breadcrumbs_ties")
    sparsify = chunked.KeepWindow(densities, gamma or 0.0, "mergekit", band=gamma is not None)
    combine = chunked.MergekitSignElection("total", normalize) if consensus else chunked.MergekitSum(normalize)
    got = chunked.merge(chunked.DenseTasks(tasks.clone()), weights, sparsify, combine, rescale=rescale, scale=0.7)
    want = reference(tasks, weights, densities, gamma, consensus, normalize, rescale, 0.7)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)


def test_kept_counts_are_mergekits():
    assert rank_window(1024, 0.3, 0.0, "adapter_merging") == (0, 308)  # ours: ⌈0.3·1024⌉
    assert rank_window(1024, 0.3, 0.0, "mergekit") == (0, 307)  # mergekit: max(1, ⌊0.3·1024⌋)
    assert rank_window(10, 0.01, 0.0, "mergekit") == (0, 1)
    assert rank_window(1000, 0.3, 0.05, "mergekit", band=True) == (50, 350)
    assert rank_window(1000, 0.8, 0.3, "mergekit", band=True) == (200, 1000)  # the top dropped shrinks
    assert rank_window(1000, 1.0, 0.3, "mergekit", band=True) == (0, 1000)  # density 1: everything


def write(tmp_path, text, name="merge.yml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


MODELS = """
models:
  - model: a
    parameters: {weight: 1.0}
  - model: b
    parameters: {weight: 0.5}
  - model: c
    parameters: {weight: -0.7}
"""


def test_task_arithmetic_does_not_normalise_by_default_and_says_so(tmp_path):
    plan = plan_from_yaml(write(tmp_path, MODELS + "merge_method: task_arithmetic\nparameters: {lambda: 2}\n"))
    assert plan["weights"] == [2.0, 1.0, -1.4] and plan["normalize"] is False
    assert plan["strategy"] == "task_arithmetic" and plan["linear_lora"] == "exact"
    assert "normalize: false (mergekit's default for task_arithmetic; the YAML does not say)." in plan["notes"]
    assert plan["recipe_extra"] == {"merge_method": "task_arithmetic", "ignored_keys": [],
                                    "config_file": str(tmp_path / "merge.yml")}


def test_ties_uses_mergekits_definitions(tmp_path):
    plan = plan_from_yaml(write(tmp_path, MODELS.replace("weight: 1.0}", "weight: 1.0, density: 0.3}") +
                                "merge_method: ties\nbase_model: org/base\nparameters: {density: 0.5, int8_mask: true}\n"))
    assert plan["weights"] == [1.0, 0.5, -0.7] and plan["normalize"] is False and plan["base_model"] == "org/base"
    assert plan["options"] == {"convention": "mergekit", "normalize": True, "scale": 1.0, "rescale": False,
                               "density": [0.3, 0.5, 0.5]}
    assert "normalize: true (mergekit's default for ties; the YAML does not say)." in plan["notes"]
    assert any(n.startswith("int8_mask was ignored") for n in plan["notes"])
    assert plan["recipe_extra"]["ignored_keys"] == ["int8_mask"]


def test_dare_rescales_by_default_and_linear_is_the_exact_average(tmp_path):
    dare = plan_from_yaml(write(tmp_path, MODELS + "merge_method: dare_linear\n"))
    assert dare["options"]["rescale"] is True and dare["options"]["normalize"] is False
    linear = plan_from_yaml(write(tmp_path, MODELS + "merge_method: linear\n"))
    assert linear["strategy"] == "linear" and linear["linear_lora"] == "exact" and linear["normalize"] is False
    assert linear["weights"] == pytest.approx([1 / 0.8, 0.5 / 0.8, -0.7 / 0.8])


def test_linear_without_normalize_that_would_scale_the_base_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"merge\.yml: linear with normalize: false and weights summing to 0\.8 "
                                          r"scales the base model"):
        plan_from_yaml(write(tmp_path, MODELS + "merge_method: linear\nparameters: {normalize: false}\n"))


@pytest.mark.parametrize("value, shown", [('"false"', "'false' (a string)"), ("null", "None"), ("0", "0")])
def test_booleans_must_be_booleans(tmp_path, value, shown):
    path = write(tmp_path, MODELS + f"merge_method: ties\nparameters: {{normalize: {value}}}\n")
    with pytest.raises(ConfigError) as error:
        plan_from_yaml(path)
    assert str(error.value) == f"{path}: parameters.normalize must be true or false, got {shown}."


def test_numbers_must_be_numbers_and_parameters_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match=r"models\[1\]\.parameters\.weight must be a finite number, got '0\.5' \(a string\)"):
        plan_from_yaml(write(tmp_path, MODELS.replace("weight: 0.5", "weight: '0.5'") + "merge_method: ties\n"))
    with pytest.raises(ConfigError, match=r"merge\.yml: `parameters` must be a mapping \(key: value\), got list \[1\]"):
        plan_from_yaml(write(tmp_path, MODELS + "merge_method: ties\nparameters: [1]\n"))


def test_mergekits_ties_example_gets_one_message_listing_everything_unsupported(tmp_path):
    # mergekit's examples/ties.yml, only its paths changed
    path = write(tmp_path, """
        models:
          - model: orca
            parameters:
              density: [1, 0.7, 0.1] # density gradient
              weight: 1.0
          - model: platypus
            parameters:
              density: 0.5
              weight: [0, 0.3, 0.7, 1] # weight gradient
          - model: wizardmath
            parameters:
              density: 0.33
              weight:
                - filter: mlp
                  value: 0.5
                - value: 0
        merge_method: ties
        base_model: llama
        parameters:
          normalize: true
          int8_mask: true
        dtype: float16
    """)
    with pytest.raises(ConfigError) as error:
        plan_from_yaml(path)
    assert str(error.value) == (
        f"{path}: not supported: models[0].parameters.density (a per-layer list); models[1].parameters.weight "
        "(a per-layer list); models[2].parameters.weight (a filter). Give one number per key (per-layer lists and "
        "filters are not supported)."
    )
    # with one number per key it runs: int8_mask ignored with a note
    import yaml

    config = yaml.safe_load(path.read_text())
    config["models"][0]["parameters"]["density"] = 0.7
    config["models"][1]["parameters"]["weight"] = 0.3
    config["models"][2]["parameters"]["weight"] = 0.5
    plan = plan_from_yaml(write(tmp_path, yaml.safe_dump(config), "fixed.yml"))
    assert plan["options"]["density"] == [0.7, 0.5, 0.33] and plan["weights"] == [1.0, 0.3, 0.5]
    assert plan["dtype"] == "float16" and plan["base_model"] == "llama"


def test_unknown_methods_and_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"merge_method 'slerp' is not supported \(a mergekit method this library "
                                          r"does not compute\); use one of \['breadcrumbs', 'breadcrumbs_ties'"):
        plan_from_yaml(write(tmp_path, MODELS + "merge_method: slerp\n"))
    with pytest.raises(ConfigError, match=r"not supported: parameters\.gamma \(not a parameter of ties"):
        plan_from_yaml(write(tmp_path, MODELS + "merge_method: ties\nparameters: {gamma: 0.1}\n"))
    with pytest.raises(ConfigError, match=r"models\[0\], models\[1\], models\[2\] have no `weight`"):
        plan_from_yaml(write(tmp_path, MODELS.replace("weight: ", "density: ") + "merge_method: ties\n"))


def test_mergekit_convention_through_the_strategy_options():
    from adapter_merging.strategies import get_strategy

    ties = get_strategy("ties")
    parsed = ties.parse_options(None, {"convention": "mergekit", "normalize": True, "scale": 0.5, "rescale": True})
    assert (parsed["convention"], parsed["normalize"], parsed["scale"], parsed["rescale"]) == ("mergekit", True, 0.5, True)
    with pytest.raises(ValueError, match="normalize=True is mergekit's own normalisation and needs convention='mergekit'"):
        ties.parse_options(None, {"normalize": True})
    with pytest.raises(ValueError, match="Unknown convention 'mergekti'"):
        ties.parse_options(None, {"convention": "mergekti"})
    with pytest.raises(TypeError, match="rescale must be True or False, got 'yes'"):
        ties.parse_options(None, {"rescale": "yes"})
    # mergekit's breadcrumbs shrink the top dropped where density + gamma > 1: accepted in its convention only
    get_strategy("breadcrumbs").parse_options(None, {"convention": "mergekit", "density": 0.95, "gamma": 0.1})
