"""The merge report is honest: it never claims less error than the stored adapter has, says where
float64 rounding of the inputs limits what can be measured, warns where a merge loses much, and can
be saved.

"True" errors here are measured from the adapters the model actually holds, in float64, against
references computed so that they are accurate even where the target nearly cancels.
"""
from __future__ import annotations

import json
import math
import warnings
from fractions import Fraction

import pytest
import torch
from adapters import LoRAConfig

from conftest import randomize_adapter, tiny_adapter_model
from test_lora_strategies import effective_delta_w, lora_modules, merge, rel, target_delta_w


# ----------------------------------------------------------------------------- nearly cancelling inputs
def near_twins(scale: float = 1e-12):
    """A float64 model with LoRA 'a' and 'b' = a·(1 + scale·noise): a − b is ~scale of each of them.
    alpha/r = 2 and weights ±1, so λᵢsᵢBᵢ is exact in float64 and the target is defined exactly."""
    model = tiny_adapter_model("bert").double()
    for name in ("a", "b"):
        model.add_adapter(name, config=LoRAConfig(r=4, alpha=8))
    model.double()
    randomize_adapter(model, "a", seed=1)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        params = dict(model.named_parameters())
        for key, param in params.items():
            if ".a." in key and "loras" in key:
                twin = params[key.replace(".a.", ".b.")]
                noise = torch.randn(param.shape, generator=generator, dtype=torch.float64)
                twin.copy_(param * (1.0 + scale * noise))
    return model


def exact_update(terms) -> torch.Tensor:
    """Σ cᵢ Bᵢ Aᵢ computed exactly (rational arithmetic on the float64 entries), rounded once to float64:
    accurate to ε relative to itself, however much the terms cancel."""
    terms = [(Fraction(float(c)), b.detach().double().tolist(), a.detach().double().tolist()) for c, b, a in terms]
    rows, cols = len(terms[0][1]), len(terms[0][2][0])
    out = torch.zeros(rows, cols, dtype=torch.float64)
    for i in range(rows):
        for j in range(cols):
            total = Fraction(0)
            for c, b, a in terms:
                total += c * sum((Fraction(b[i][k]) * Fraction(a[k][j]) for k in range(len(a))), Fraction(0))
            out[i, j] = float(total)
    return out


def true_errors(model, names=("a", "b"), weights=(1.0, -1.0)) -> dict:
    """‖merged update − target‖/‖target‖ per module, both computed exactly."""
    errors = {}
    for path, module in lora_modules(model, "merged").items():
        merged = module.loras["merged"]
        update = exact_update([(merged.scaling, merged.lora_B, merged.lora_A)])
        target = exact_update(
            [(w * module.loras[n].scaling, module.loras[n].lora_B, module.loras[n].lora_A) for n, w in zip(names, weights)]
        )
        errors[path] = rel(update, target)
    return errors


def test_svd_of_nearly_cancelling_inputs_reports_no_less_than_its_true_error():
    model = near_twins()
    report = merge(model, ["a", "b"], [1.0, -1.0], "lora_delta_w_svd")
    true = true_errors(model)
    assert max(true.values()) > 1e-6, "float64 rounding of the factored SVD shows at this cancellation"
    for m in report.modules:
        assert true[m.module] <= m.relative_error + m.rounding_floor, (m, true[m.module])
        assert m.rounding_floor > 1e-6, "the report says the inputs' rounding limits what can be measured"
    assert "rounding floor" in report.summary()


def test_concat_of_nearly_cancelling_inputs_is_exact_and_says_zero():
    model = near_twins()
    report = merge(model, ["a", "b"], [1.0, -1.0], "lora_delta_w_concat")
    assert max(true_errors(model).values()) <= 1e-14  # s·(B_cat/s) = B_cat exactly: the stored update is the target
    assert report.max_error == 0.0
    assert all(m.relative_error == 0.0 for m in report.modules)


def test_rounding_floor_is_negligible_for_ordinary_inputs():
    model = tiny_adapter_model("bert")
    for i, name in enumerate(("a", "b")):
        model.add_adapter(name, config=LoRAConfig(r=4, alpha=8))
        randomize_adapter(model, name, seed=i)
    report = merge(model, ["a", "b"], [1.0, -1.0], "lora_delta_w_svd")
    assert all(m.rounding_floor < 1e-12 for m in report.modules)
    assert "rounding floor" not in report.summary()


# ----------------------------------------------------------------------------- what is stored
@pytest.mark.parametrize("dtype, at_least", [(torch.float16, 1e-4), (torch.bfloat16, 5e-4)])
def test_task_vector_report_measures_the_stored_half_precision_factors(dtype, at_least):
    """magnitude_prune at density 1 is exactly Σ λᵢ ΔWᵢ, and the default rank Σ rᵢ holds it exactly:
    the only error left is the rounding of the stored factors, which the report must include."""
    model = tiny_adapter_model("bert")
    names = []
    for i in range(2):
        model.add_adapter(f"l{i}", config=LoRAConfig(r=4, alpha=8))
        randomize_adapter(model, f"l{i}", seed=i)
        names.append(f"l{i}")
    model.to(dtype)
    report = merge(model, names, [0.7, -0.4], "magnitude_prune", density=1.0)
    for m in report.modules:
        module = dict(lora_modules(model, "merged"))[m.module]
        true = rel(effective_delta_w(module, "merged"), target_delta_w(module, names, [0.7, -0.4]))
        assert true >= at_least, "the stored half-precision factors are not exact"
        assert m.relative_error == pytest.approx(true, rel=0.02, abs=1e-6), (m.relative_error, true)


# ----------------------------------------------------------------------------- loss warnings
def _three_loras():
    model = tiny_adapter_model("bert")
    names = []
    for i, (r, alpha) in enumerate([(2, 4), (3, 3), (4, 16)]):
        model.add_adapter(f"l{i}", config=LoRAConfig(r=r, alpha=alpha))
        randomize_adapter(model, f"l{i}", seed=i)
        names.append(f"l{i}")
    return model, names


@pytest.mark.parametrize("strategy", ["ties", "magnitude_prune", "dare_linear", "breadcrumbs"])
def test_task_vector_merge_that_loses_much_at_its_rank_warns(strategy):
    model, names = _three_loras()
    with pytest.warns(UserWarning, match="re-factoris") as record:
        report = model.average_adapter("merged", names, combine_strategy=strategy, density=0.3)
    message = str(record[0].message)
    assert report.max_error > 0.1 and f"{report.max_error:.3g}" in message
    assert "svd_rank" in message and "svd_tol" in message
    assert record[0].filename == __file__


def test_task_vector_merge_within_tolerance_is_silent():
    model, names = _three_loras()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = merge(model, names, [1.0, 1.0, 1.0], "ties", density=0.3, svd_tol=0.05)
    assert report.max_error <= 0.05 + 1e-6


# ----------------------------------------------------------------------------- saving
def test_report_to_dict_json_and_save(tmp_path):
    model, names = _three_loras()
    report = merge(model, names, [1.0, -0.5, 0.25], "lora_delta_w_svd", svd_rank=3)
    data = report.to_dict()
    assert data["adapter_name"] == "merged" and data["combine_strategy"] == "lora_delta_w_svd"
    assert data["weights"] == {"l0": 1.0, "l1": -0.5, "l2": 0.25} and data["rank"] == 3
    assert data["max_error"] == report.max_error and len(data["modules"]) == len(report.modules)
    assert set(data["modules"][0]) >= {"module", "relative_error", "energy_kept", "rank", "rounding_floor"}
    assert json.loads(report.to_json()) == data
    path = report.save(tmp_path / "sub" / "report.json")
    assert json.loads(path.read_text(encoding="utf-8")) == data


def test_report_json_has_no_non_standard_numbers(tmp_path):
    """An infinite error (a non-zero update where the target is zero) is written as null, not Infinity."""
    from adapter_merging import MergeReport

    report = MergeReport("x", "linear", {"a": 1.0})
    report.add("layer", math.inf)
    text = report.to_json()
    json.loads(text, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
    assert json.loads(text)["modules"][0]["relative_error"] is None


def test_average_head_returns_a_report():
    model = tiny_adapter_model("bert")
    for name in ("h1", "h2"):
        model.add_classification_head(name, num_labels=2)
    report = model.average_head("avg", ["h1", "h2"], weights=[1.0, 3.0])
    assert report.adapter_name == "avg" and report.kind == "head"
    assert report.weights == {"h1": 0.25, "h2": 0.75} and report.max_error == 0.0
    assert "avg" in report.summary()
