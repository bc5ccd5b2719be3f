"""Per-module weights: ``{adapter: number | {module name or glob: number, "*": default}}`` on every front end.

References are computed by hand in float64: the merged update of each module is Σ λᵢ,module sᵢ Bᵢ Aᵢ
for the exact strategies, Φ = Σ λᵢ,module Φᵢ per parameter for bottleneck adapters; any strategy with
per-module weights equals, module by module, the same strategy with that module's weights as plain ones.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from adapters import LoRAConfig, SeqBnConfig

from adapter_merging import merge_saved_adapters
from adapter_merging.ops.weights import resolve_module_weights
from adapter_merging.state import adapter_tensors, model_tensors
from conftest import randomize_adapter, tiny_adapter_model

Q0 = "bert.encoder.layer.0.attention.self.query"
LAYER1 = "*.layer.1.*"


def lora_model(names=("a", "b"), r=2, alpha=4):
    model = tiny_adapter_model("bert")
    for i, name in enumerate(names):
        model.add_adapter(name, LoRAConfig(r=r, alpha=alpha + 2 * i))  # the scalings differ
        randomize_adapter(model, name, seed=i + 1)
    return model


def updates(model, name, scaling):
    """{module: s·B·A} of a LoRA adapter in the model, in float64."""
    tensors = adapter_tensors(model_tensors(model), name)
    out = {}
    for slot, a in tensors.items():
        if slot.param == "lora_A":
            b = tensors[slot.replace_param("lora_B")]
            out[slot.prefix] = scaling * b.double() @ a.double()
    return out


def expected_weight(module, spec):
    """The weight a per-module spec gives ``module``, by the documented rule, written out independently."""
    if not isinstance(spec, dict):
        return spec
    if module in spec:
        return spec[module]
    import fnmatch

    return next((w for k, w in spec.items() if k != "*" and fnmatch.fnmatchcase(module, k)), spec["*"])


@pytest.mark.parametrize("strategy", ["lora_delta_w_svd", "lora_delta_w_concat"])
@pytest.mark.parametrize("normalize", [False, True])
def test_exact_strategies_give_the_per_module_weighted_sum(strategy, normalize):
    model = lora_model()
    weights = {"a": {"*": 1.0, Q0: 3.0, LAYER1: -0.25}, "b": {"*": 0.5, "*.value": 2.0}}
    report = model.average_adapter("m", weights, combine_strategy=strategy, normalize_weights=normalize)
    inputs = {"a": updates(model, "a", 4 / 2), "b": updates(model, "b", 6 / 2)}
    merged = updates(model, "m", report.alpha / report.rank)
    assert merged.keys() == inputs["a"].keys() and len(merged) == 4
    for module, delta in merged.items():
        raw = [expected_weight(module, weights[n]) for n in ("a", "b")]
        lam = [w / math.fsum(raw) for w in raw] if normalize else raw
        target = lam[0] * inputs["a"][module] + lam[1] * inputs["b"][module]
        torch.testing.assert_close(delta, target, rtol=1e-5, atol=1e-6)
        assert report.module_weights.get(module, report.weights) == pytest.approx(dict(zip("ab", lam)))
    # the report lists only the modules whose weights differ from the defaults
    assert set(report.module_weights) == set(merged)  # here every module has its own
    assert "other weights in 4 modules" in report.summary()


def test_normalisation_is_per_module():
    defaults, table = resolve_module_weights(["a", "b"], {"a": {"*": 1, "x.q": 3}, "b": 1}, True, ["x.q", "x.v"])
    assert defaults == [("a", 0.5), ("b", 0.5)]
    assert table == {"x.q": [0.75, 0.25]}  # x.v has the defaults: not listed


def test_pattern_rule_exact_name_then_first_glob_then_default():
    spec = {"*": 0.1, "*.q": 0.2, "l.*": 0.3, "l.q": 0.4}
    _, table = resolve_module_weights(["a"], [spec], False, ["l.q", "l.v", "m.q", "m.v"])
    assert table == {"l.q": [0.4], "l.v": [0.3], "m.q": [0.2]}  # m.v: the default 0.1


def test_bottleneck_linear_per_module():
    model = tiny_adapter_model("bert")
    for i, name in enumerate("ab"):
        model.add_adapter(name, SeqBnConfig(reduction_factor=4))
        randomize_adapter(model, name, seed=10 + i)
    weights = [{"*": 0.25, LAYER1: 1.5}, 0.75]
    report = model.average_adapter("m", ["a", "b"], weights=weights, normalize_weights=False)
    named = model_tensors(model)
    a, b, m = (adapter_tensors(named, n) for n in ("a", "b", "m"))
    assert m.keys() == a.keys()
    for slot in m:
        lam = 1.5 if ".layer.1." in slot.prefix else 0.25
        torch.testing.assert_close(m[slot].double(), lam * a[slot].double() + 0.75 * b[slot].double())
    assert set(report.module_weights) == {"bert.encoder.layer.1.output"}


@pytest.mark.parametrize("strategy", ["linear", "lora_linear_only_negate_b", "ties", "magnitude_prune", "tsv",
                                      "iso_c", "star", "breadcrumbs"])
def test_every_strategy_merges_each_module_with_its_own_weights(strategy):
    """Per-module weights equal, module by module, plain weights of that module's values."""
    model = lora_model(alpha=4)  # (alpha differs: fine for the delta-W strategies)
    if strategy in ("linear", "lora_linear_only_negate_b"):
        model = tiny_adapter_model("bert")
        for i, name in enumerate("ab"):
            model.add_adapter(name, LoRAConfig(r=2, alpha=4))
            randomize_adapter(model, name, seed=i + 1)
    kwargs = dict(combine_strategy=strategy, normalize_weights=False)
    if strategy in ("ties", "magnitude_prune", "breadcrumbs"):
        kwargs["density"] = 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = model.average_adapter("m", {"a": {"*": 0.6, LAYER1: 1.2}, "b": 0.9}, **kwargs)
        plain0 = model.average_adapter("p0", {"a": 0.6, "b": 0.9}, **kwargs)
        plain1 = model.average_adapter("p1", {"a": 1.2, "b": 0.9}, **kwargs)
    scale = lambda r: (r.alpha / r.rank) if r.rank else 2.0  # noqa: E731
    merged, p0, p1 = updates(model, "m", scale(report)), updates(model, "p0", scale(plain0)), updates(model, "p1", scale(plain1))
    for module, delta in merged.items():
        reference = p1 if ".layer.1." in module else p0
        torch.testing.assert_close(delta, reference[module], rtol=1e-5, atol=1e-6)


def test_saved_folders_merge_like_the_model(tmp_path):
    model = lora_model()
    for name in "ab":
        model.save_adapter(str(tmp_path / name), name)
    weights = {"a": {"*": 1.0, LAYER1: 0.0}, "b": {"*": 0.0, LAYER1: 1.0}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = merge_saved_adapters({tmp_path / "a": weights["a"], tmp_path / "b": weights["b"]},
                                      tmp_path / "merged", combine_strategy="lora_delta_w_concat",
                                      normalize_weights=False)
    loaded = model.load_adapter(str(tmp_path / "merged"))
    merged = updates(model, loaded, report.alpha / report.rank)
    inputs = {"a": updates(model, "a", 2.0), "b": updates(model, "b", 3.0)}
    for module, delta in merged.items():
        source = "b" if ".layer.1." in module else "a"
        torch.testing.assert_close(delta, inputs[source][module], rtol=1e-5, atol=1e-6)
    assert set(report.module_weights) == {m for m in merged if ".layer.1." in m}


@pytest.mark.parametrize("weights, error, match", [
    ({"a": {"*": 1, "*.nowhere.*": 2}, "b": 1}, ValueError, "matches no module"),
    ({"a": {"*": 1, Q0: "big"}, "b": 1}, TypeError, "must be a real number"),
    ({"a": {"*": 1, Q0: float("nan")}, "b": 1}, ValueError, "finite"),
    ({"a": {"*": 1, Q0: True}, "b": 1}, TypeError, "must be a real number"),
    ({"a": {0.5, 1.0}, "b": 1}, TypeError, "is a set"),
    ({"a": {Q0: 1.0}, "b": 1}, ValueError, r"no '\*' entry"),
    ({"a": {"*": 1, 3: 1.0}, "b": 1}, TypeError, "keyed by module names"),
])
def test_bad_per_module_weights_are_refused(weights, error, match):
    model = lora_model()
    with pytest.raises(error, match=match):
        model.average_adapter("m", weights, combine_strategy="lora_delta_w_svd")
    assert "m" not in model.adapters_config


def test_a_module_whose_weights_sum_to_zero_is_refused_when_normalising():
    model = lora_model()
    with pytest.raises(ValueError, match=f"In module '{Q0}'.*per module"):
        model.average_adapter("m", {"a": {"*": 1, Q0: 1}, "b": {"*": 1, Q0: -1}}, combine_strategy="lora_delta_w_svd")
