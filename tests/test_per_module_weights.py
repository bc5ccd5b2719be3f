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


def test_an_exact_module_name_with_glob_characters_is_its_own_entry():
    """PEFT names an expert of a raw parameter ``key[e]``: as a glob ``[e]`` is a set, which matches no such
    name, but the exact name still names that module (exact names are looked up before globs)."""
    modules = ["experts.w1[0]", "experts.w1[1]"]
    _, table = resolve_module_weights(["a"], [{"*": 1.0, "experts.w1[1]": 2.0}], False, modules)
    assert table == {"experts.w1[1]": [2.0]}
    _, table = resolve_module_weights(["a"], [{"*": 1.0, "experts.w1[[]0]": 3.0}], False, modules)
    assert table == {"experts.w1[0]": [3.0]}  # a bracket escaped in a glob


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


# ----------------------------------------------------------------------------- every strategy family
FAMILY_CASES = {
    "dare_linear": dict(combine_strategy="dare_linear", density=0.5, seed=3),
    "dare_ties": dict(combine_strategy="dare_ties", density=0.5, seed=3),
    "della": dict(combine_strategy="della", density=0.5, epsilon=0.2, seed=3),
    "della_linear": dict(combine_strategy="della_linear", density=0.5, epsilon=0.2, seed=3),
    "ties_core": dict(combine_strategy="ties", density=0.5, space="core"),
    "ties_knots": dict(combine_strategy="ties", density=0.5, space="knots"),
}


def merge_quietly(model, name, weights, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.average_adapter(name, weights, normalize_weights=False, **kwargs)


@pytest.mark.parametrize("case", list(FAMILY_CASES))
def test_random_and_space_strategies_merge_each_module_with_its_own_weights(case):
    """DARE and DELLA (seeded masks) and TIES in core and KnOTS space: a module named by a pattern is merged
    as the plain merge with that module's weights; a module without an entry as the plain merge with "*"."""
    model = lora_model()
    kwargs = FAMILY_CASES[case]
    report = merge_quietly(model, "m", {"a": {"*": 0.6, LAYER1: 1.2}, "b": {"*": 0.9, Q0: -0.4}}, **kwargs)
    plain = {
        "default": merge_quietly(model, "p0", {"a": 0.6, "b": 0.9}, **kwargs),
        "layer1": merge_quietly(model, "p1", {"a": 1.2, "b": 0.9}, **kwargs),
        "q0": merge_quietly(model, "p2", {"a": 0.6, "b": -0.4}, **kwargs),
    }
    scale = lambda r: r.alpha / r.rank  # noqa: E731
    merged = updates(model, "m", scale(report))
    references = {key: updates(model, name, scale(plain[key])) for key, name in zip(plain, ("p0", "p1", "p2"))}
    assert len(merged) == 4
    for module, delta in merged.items():
        key = "q0" if module == Q0 else "layer1" if ".layer.1." in module else "default"
        torch.testing.assert_close(delta, references[key][module], rtol=1e-5, atol=1e-6)
        others = [k for k in references if k != key]
        assert all((references[k][module] - delta).norm() > 1e-3 * delta.norm() for k in others), module
    assert set(report.module_weights) == {m for m in merged if m == Q0 or ".layer.1." in m}


def test_adapters_ia3_is_the_deviation_from_identity_per_module():
    """IA³ (adapters): α·l = 1 + Σ λᵢ,m (α·lᵢ − 1), with each module's weights, against float64."""
    from adapters import IA3Config

    model = tiny_adapter_model("bert")
    for i, name in enumerate("ab"):
        model.add_adapter(name, IA3Config())
        randomize_adapter(model, name, seed=20 + i)
    weights = {"a": {"*": 0.5, "*.intermediate.dense": 2.0}, "b": {"*": -0.5, LAYER1: 1.0}}
    report = merge_quietly(model, "m", weights)
    named = model_tensors(model)
    a, b, m = (adapter_tensors(named, n) for n in ("a", "b", "m"))
    assert len(m) == 6
    for slot, value in m.items():
        la, lb = expected_weight(slot.prefix, weights["a"]), expected_weight(slot.prefix, weights["b"])
        target = 1.0 + la * (a[slot].double() - 1.0) + lb * (b[slot].double() - 1.0)
        torch.testing.assert_close(value.double(), target, rtol=1e-6, atol=1e-7)
    assert len(report.module_weights) == 4  # all but layer 0's key and value (the defaults) have their own
    assert report.module_weights["bert.encoder.layer.1.intermediate.dense"] == {"a": 2.0, "b": 1.0}


def test_compacter_shared_parameters_are_one_module_with_the_default():
    """Compacter's PHM parameters, shared by every layer, are one module (the slot's path, here ``bert``):
    they get "*" unless an entry names them; the layers' own modules their entries."""
    from adapters import CompacterConfig

    model = tiny_adapter_model("bert")
    for i, name in enumerate("ab"):
        model.add_adapter(name, CompacterConfig(reduction_factor=4))
        randomize_adapter(model, name, seed=30 + i)
    named = model_tensors(model)
    a, b = adapter_tensors(named, "a"), adapter_tensors(named, "b")
    for spec, shared in (({"*": 0.25, LAYER1: 1.5}, 0.25), ({"*": 0.25, LAYER1: 1.5, "bert": -1.0}, -1.0)):
        merge_quietly(model, "m", {"a": spec, "b": 0.75})
        m = adapter_tensors(model_tensors(model), "m")
        assert {s.container for s in m} == {"adapters", "shared_parameters"}
        for slot, value in m.items():
            lam = shared if slot.container == "shared_parameters" else 1.5 if ".layer.1." in slot.prefix else 0.25
            torch.testing.assert_close(value.double(), lam * a[slot].double() + 0.75 * b[slot].double())
        model.delete_adapter("m")


@pytest.mark.parametrize("config", ["loreft", "noreft"])
def test_reft_interventions_merge_each_layer_with_its_own_weights(config):
    """ReFT: each layer's intervention is a module; LoReFT's orthogonal projection is merged (and retracted)
    as the plain merge with that layer's weights, NoReFT's parameters as Σ λᵢ,m Φᵢ."""
    from adapters import LoReftConfig, NoReftConfig

    model = tiny_adapter_model("bert")
    for i, name in enumerate("ab"):
        model.add_adapter(name, (LoReftConfig if config == "loreft" else NoReftConfig)(r=2))
        randomize_adapter(model, name, seed=40 + i)
    report = merge_quietly(model, "m", {"a": {"*": 0.3, LAYER1: 1.0}, "b": {"*": 0.7, LAYER1: 0.0}})
    merge_quietly(model, "p0", {"a": 0.3, "b": 0.7})
    merge_quietly(model, "p1", {"a": 1.0, "b": 0.0})
    named = model_tensors(model)
    m, p0, p1, a, b = (adapter_tensors(named, n) for n in ("m", "p0", "p1", "a", "b"))
    assert {s.prefix for s in m} == {"bert.encoder.layer.0.reft_layer", "bert.encoder.layer.1.reft_layer"}
    for slot, value in m.items():
        layer1 = ".layer.1." in slot.prefix
        torch.testing.assert_close(value, (p1 if layer1 else p0)[slot], rtol=1e-6, atol=1e-7)
        if layer1:  # weights (1, 0): the merge is adapter a itself
            torch.testing.assert_close(value, a[slot])
        elif config == "noreft":
            torch.testing.assert_close(value.double(), 0.3 * a[slot].double() + 0.7 * b[slot].double())
    assert set(report.module_weights) == {"bert.encoder.layer.1.reft_layer"}


POOL = "bert.encoder.layer.0.attention.self.prefix_tuning.pool"


def prefix_model():
    from adapters import PrefixTuningConfig

    model = tiny_adapter_model("bert")
    for i, name in enumerate("ab"):
        model.add_adapter(name, PrefixTuningConfig(prefix_length=4, flat=i == 1))  # reparameterised and flat
        randomize_adapter(model, name, seed=50 + i)
    return model


def test_prefix_tuning_is_one_module_the_pool():
    """Prefix tuning keeps every layer's prefixes in one pool module: a weight naming the pool (or matching
    it) applies to all prefixes; without one, "*" does. The merge is the flat Σ λᵢ Pᵢ."""
    from adapter_merging.methods.prefix_tuning import flat_prefix

    model = prefix_model()
    named = model_tensors(model)
    flats = []
    for name in "ab":
        config = model.adapters_config.match(name, type(model.adapters_config.get(name)))
        local = {s.param.split(".", 1)[1]: t for s, t in adapter_tensors(named, name).items()}
        flats.append(flat_prefix(local, config).double())
    for name, spec, lam in (("m1", {"*": 0.2, POOL: 0.7}, 0.7), ("m2", {"*": 0.2, "*.prefix_tuning.*": 1.5}, 1.5),
                            ("m3", {"*": 0.2}, 0.2)):
        report = merge_quietly(model, name, {"a": spec, "b": 0.5})
        merged = adapter_tensors(model_tensors(model), name)
        assert [s.prefix for s in merged] == [POOL]
        torch.testing.assert_close(next(iter(merged.values())).double(), lam * flats[0] + 0.5 * flats[1])
        assert report.module_weights == ({} if lam == 0.2 else {POOL: {"a": lam, "b": 0.5}})


def test_prefix_tuning_refuses_a_per_layer_pattern_naming_the_pool():
    model = prefix_model()
    with pytest.raises(ValueError, match=rf"'\*\.layer\.1\.\*' of adapter 'a' matches no module .* such as {POOL}"):
        merge_quietly(model, "m", {"a": {"*": 0.2, LAYER1: 0.7}, "b": 0.5})
    assert "m" not in model.adapters_config
