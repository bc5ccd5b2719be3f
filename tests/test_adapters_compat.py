"""Drop-in where ``adapters`` 1.3.0 is right: the same numbers, configuration classes and wording.

``adapters``' own ``average_adapter`` is still reachable on a model with the mixin (the mixin's class
is a subclass of the model's), so every comparison here runs both libraries on the same inputs.
"""
from __future__ import annotations

import copy
import re

import adapters
import pytest
import torch
from adapters import AdapterConfig, MAMConfig, UniPELTConfig

import adapter_merging
from adapter_merging.state import adapter_tensors, model_tensors
from conftest import randomize_adapter, tiny_adapter_model

WEIGHTS = [0.1, 0.6, 0.3]  # those of adapters' own merge test (run_average_test)


def adapters_average(model, *args, **kwargs):
    """``adapters``' own ``average_adapter`` (the method the mixin overrides)."""
    return super(adapter_merging.ModelMixin, model).average_adapter(*args, **kwargs)


def merged_state(model, name):
    return {slot: t.detach().clone() for slot, t in adapter_tensors(model_tensors(model), name).items()}


def inputs_model(config, names=("in_0", "in_1", "in_2"), **kwargs):
    model = tiny_adapter_model("bert")
    for i, name in enumerate(names):
        model.add_adapter(name, config=config)
        randomize_adapter(model, name, seed=i + 1, **kwargs)
    return model


# ----------------------------------------------------------------------------- numbers
#: methods whose linear merge adapters 1.3.0 computes right (prefix tuning: flat, as adapters' test uses;
#: IA³, ReFT and reparameterised prefixes are merged differently here on purpose, see the guide)
LINEAR = {
    "seq_bn": "seq_bn",
    "double_seq_bn": "double_seq_bn",
    "par_bn": "par_bn",
    "compacter": AdapterConfig.load("compacter", reduction_factor=4),
    "prefix_tuning_flat": adapters.PrefixTuningConfig(flat=True),
    "prompt_tuning": "prompt_tuning",
    "lora": "lora",
}


CASES = [(method, "linear") for method in LINEAR] + [("lora", "lora_linear_only_negate_b")]


@pytest.mark.parametrize("method, strategy", CASES)
def test_linear_merge_equals_adapters_bit_for_bit_in_float32(method, strategy):
    """Σ (wᵢ·Φᵢ) summed in adapters' order: the float32 results are identical, so adapters' own test
    (torch.allclose with its defaults against w₀Φ₀ + w₁Φ₁ + w₂Φ₂) passes too."""
    ours = inputs_model(LINEAR[method])
    theirs = copy.deepcopy(ours)
    names = ["in_0", "in_1", "in_2"]
    ours.average_adapter("avg", names, weights=WEIGHTS, combine_strategy=strategy)
    adapters_average(theirs, "avg", names, weights=WEIGHTS, combine_strategy=strategy)
    mine, reference = merged_state(ours, "avg"), merged_state(theirs, "avg")
    assert mine.keys() == reference.keys() and mine
    for slot in mine:
        assert torch.equal(mine[slot], reference[slot]), slot
    # and adapters' own test formula: the raw weights, w·v then += w·v
    manual = {}
    for name, weight in zip(names, WEIGHTS):
        for slot, tensor in adapter_tensors(model_tensors(ours), name).items():
            manual[slot] = manual[slot] + weight * tensor if slot in manual else weight * tensor
    for slot, value in mine.items():
        if strategy == "linear":
            assert torch.allclose(value, manual[slot]), slot


@pytest.mark.parametrize("config_class", [MAMConfig, UniPELTConfig])
def test_merged_union_keeps_its_configuration_class(config_class):
    model = inputs_model(config_class(), names=("in_0", "in_1"))
    model.average_adapter("avg", ["in_0", "in_1"])
    config = model.adapters_config.get("avg")
    assert type(config) is config_class
    assert config[0]["flat"] is True  # the prefix tuning part is merged in flat space
    assert config[1] == model.adapters_config.get("in_0")[1]
    if config_class is MAMConfig:  # its named parts keep working
        assert config.prefix_tuning is config[0] and config.adapter is config[1]


# ----------------------------------------------------------------------------- wording
def _first_sentence(message: str) -> str:
    return re.split(r"(?<=[.!])\s", message.strip(), maxsplit=1)[0]


def _bad_models():
    bn = inputs_model("seq_bn", names=("a", "b"))
    bn.add_adapter("r8", config=adapters.SeqBnConfig(reduction_factor=8))
    bn.add_adapter("lora", config="lora")
    vera = tiny_adapter_model("bert")
    for name in ("a", "b"):
        vera.add_adapter(name, config=adapters.VeraConfig(init_weights_seed=3))
    union = inputs_model(MAMConfig(), names=("a", "b"))
    prefix = inputs_model("prefix_tuning", names=("a", "b"))
    return {"bn": bn, "vera": vera, "union": union, "prefix": prefix}


REFUSALS = {
    "unknown strategy": ("bn", dict(adapter_list=["a", "b"], combine_strategy="average")),
    "different configurations": ("bn", dict(adapter_list=["a", "r8"])),
    "different methods": ("bn", dict(adapter_list=["a", "lora"])),
    "no adapters": ("bn", dict(adapter_list=[])),
    "bottleneck with delta-W SVD": ("bn", dict(adapter_list=["a", "b"], combine_strategy="lora_delta_w_svd")),
    "VeRA with delta-W SVD": ("vera", dict(adapter_list=["a", "b"], combine_strategy="lora_delta_w_svd")),
    "ConfigUnion with negate-B": ("union", dict(adapter_list=["a", "b"], combine_strategy="lora_linear_only_negate_b")),
    "prefix tuning with delta-W SVD": ("prefix", dict(adapter_list=["a", "b"], combine_strategy="lora_delta_w_svd")),
}


@pytest.fixture(scope="module")
def bad_models():
    return _bad_models()


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_start_with_adapters_wording(case, bad_models):
    """Where adapters 1.3.0 refuses with a ValueError, ours says the same first, then names the fix."""
    key, kwargs = REFUSALS[case]
    model = bad_models[key]
    with pytest.raises(ValueError) as theirs:
        adapters_average(copy.deepcopy(model), "new", **kwargs)
    with pytest.raises(ValueError) as ours:
        model.average_adapter("new", **kwargs)
    expected = _first_sentence(str(theirs.value))
    assert str(ours.value).startswith(expected), f"adapters says {expected!r}; we say {str(ours.value)!r}"
    assert len(str(ours.value)) > len(expected) + 20, "ours should go on to name the problem and the fix"
