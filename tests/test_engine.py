"""The engine on its own: inputs (configuration + {slot: tensor}) in, configuration + tensors + report
out, with no model; strategies carry their implementation; every front end calls it once."""
from __future__ import annotations

import pytest
import torch
from adapters import IA3Config, LoRAConfig, SeqBnConfig

import adapter_merging
import adapter_merging.model_mixin as model_mixin
from adapter_merging import STRATEGIES, engine
from adapter_merging.engine import AdapterInput, merge
from adapter_merging.methods.heads import HeadConfig
from adapter_merging.rules import DROP_AND_RESCALE, SUM, DeltaWRule, ParameterRule, TaskVectors
from adapter_merging.state import Slot
from adapter_merging.strategies import (
    CONVENTION, DENSITY, NORMALIZE, RESCALE, SCALE, SEED, SPACE, SVD_RANK, SVD_TOL, Strategy, register_strategy,
)
from conftest import randomize_adapter, tiny_adapter_model

Q, V = "layer.0.q", "layer.0.v"


def lora_input(name, seed, r=2, alpha=4, modules=(Q, V), d=6, k=5, **kwargs) -> AdapterInput:
    """A LoRA adapter as plain tensors: no model anywhere."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for prefix in modules:
        rank = kwargs.get("module_ranks", {}).get(prefix, r)
        tensors[Slot(prefix, "loras", "lora_A")] = torch.randn(rank, k, generator=generator, dtype=torch.float64)
        tensors[Slot(prefix, "loras", "lora_B")] = torch.randn(d, rank, generator=generator, dtype=torch.float64)
    return AdapterInput(name, LoRAConfig(r=r, alpha=alpha), tensors, **kwargs)


def update(item: AdapterInput, prefix: str) -> torch.Tensor:
    """s·B·A of one module, dense float64 (zero where the input lacks the module)."""
    a_slot, b_slot = Slot(prefix, "loras", "lora_A"), Slot(prefix, "loras", "lora_B")
    if a_slot not in item.tensors:
        return torch.zeros(6, 5, dtype=torch.float64)
    r = item.module_ranks.get(prefix, item.config["r"])
    s = item.module_scalings.get(prefix, item.config["alpha"] / item.config["r"])
    assert item.tensors[a_slot].shape[0] == r
    return s * item.tensors[b_slot] @ item.tensors[a_slot]


def merged_update(result, prefix: str) -> torch.Tensor:
    r, s = result.module_overrides.get(prefix, (result.config["r"], result.config["alpha"] / result.config["r"]))
    return s * result.tensors[Slot(prefix, "loras", "lora_B")] @ result.tensors[Slot(prefix, "loras", "lora_A")]


def rel(x, y) -> float:
    return float(torch.linalg.matrix_norm(x - y) / torch.linalg.matrix_norm(y))


# ----------------------------------------------------------------------------- the entry point
def test_merge_without_a_model_is_exact():
    inputs = [lora_input("a", 0), lora_input("b", 1, r=3, alpha=3)]
    result = merge(inputs, [1.0, -1.0], "lora_delta_w_concat", normalize_weights=False, name="diff")
    assert result.config["r"] == 5 and result.report.adapter_name == "diff"
    for prefix in (Q, V):
        assert rel(merged_update(result, prefix), update(inputs[0], prefix) - update(inputs[1], prefix)) < 1e-12
    assert result.report.max_error < 1e-12


def test_merge_resolves_weights_options_and_checks_like_average_adapter():
    inputs = [lora_input("a", 0), lora_input("b", 1)]
    assert merge(inputs).report.weights == {"a": 0.5, "b": 0.5}
    assert merge(inputs, {"b": 3.0, "a": 1.0}).report.weights == {"a": 0.25, "b": 0.75}
    with pytest.raises(ValueError, match="normalize_weights=False"):
        merge(inputs, [1.0, -1.0], "lora_delta_w_svd")
    with pytest.raises(TypeError, match="Unknown option"):
        merge(inputs, None, "lora_delta_w_svd", options={"density": 0.3})
    with pytest.raises(ValueError, match="Invalid combine_strategy"):
        merge(inputs, None, "nope")
    nan = lora_input("c", 2)
    nan.tensors[Slot(Q, "loras", "lora_A")][0, 0] = float("nan")
    with pytest.raises(ValueError, match="'c' has non-finite values"):
        merge([inputs[0], nan], None, "lora_delta_w_concat")


def test_per_module_ranks_and_scalings():
    """PEFT's rank_pattern / alpha_pattern / rsLoRA: rank and scaling per module."""
    a = lora_input("a", 0, module_ranks={V: 4}, module_scalings={V: 0.25})
    b = lora_input("b", 1, r=3, alpha=3, module_scalings={Q: 7.0})
    for strategy in ("lora_delta_w_concat", "lora_delta_w_svd"):
        result = merge([a, b], [1.0, 0.5], strategy, normalize_weights=False)
        for prefix in (Q, V):
            assert rel(merged_update(result, prefix), update(a, prefix) + 0.5 * update(b, prefix)) < 1e-10


def test_parameter_rules_need_the_same_rank_in_every_module():
    a = lora_input("a", 0, module_ranks={V: 4})
    b = lora_input("b", 1)
    with pytest.raises(ValueError, match=f"At '{V}' 'a' has rank 4.*'b' has rank 2.*lora_delta_w_svd"):
        merge([a, b], None, "linear")
    same = lora_input("c", 2, module_ranks={V: 4})
    with pytest.warns(UserWarning):
        result = merge([a, same], None, "linear")
    assert result.module_overrides == {V: (4, 2.0)}  # the merged module keeps the inputs' rank


@pytest.mark.parametrize("strategy", ["lora_delta_w_concat", "lora_delta_w_svd", "magnitude_prune"])
def test_modules_an_input_selects_out_are_zero_updates(strategy):
    """PEFT adapters with different target_modules merge over the union."""
    a = lora_input("a", 0, modules=(Q,), selects_modules=True)
    b = lora_input("b", 1, modules=(Q, V), selects_modules=True)
    options = {"density": 1.0} if strategy == "magnitude_prune" else {}
    result = merge([a, b], [1.0, -1.0], strategy, normalize_weights=False, options=options)
    for prefix in (Q, V):
        assert rel(merged_update(result, prefix), update(a, prefix) - update(b, prefix)) < 1e-6


def test_a_lacking_module_is_an_error_where_the_format_does_not_select_modules():
    a = lora_input("a", 0, modules=(Q,))
    b = lora_input("b", 1, modules=(Q, V))
    with pytest.raises(ValueError, match=f"Adapter 'a' lacks {V}.loras.a.lora_A"):
        merge([a, b], None, "lora_delta_w_concat")


def test_absent_ia3_module_is_the_identity():
    slot = Slot(Q, "loras", "lora_B")
    a = AdapterInput("a", IA3Config(alpha=2.0), {}, selects_modules=True)
    b = AdapterInput("b", IA3Config(alpha=2.0), {slot: torch.full((6, 1), 0.75)}, selects_modules=True)
    result = merge([a, b], [1.0, 1.0], normalize_weights=False)
    # α·l = 1 + 1·(1 − 1) + 1·(2·0.75 − 1)
    assert torch.allclose(2.0 * result.tensors[slot], torch.full((6, 1), 1.5))


def test_heads_go_through_the_engine():
    slot = Slot("", "heads", "1.weight")
    config = {"head_type": "classification", "num_labels": 2, "layers": 1, "dropout_prob": 0.1}
    heads = [AdapterInput(n, HeadConfig("ClassificationHead", dict(config, dropout_prob=p)), {slot: torch.full((2, 3), v)})
             for n, p, v in (("h1", 0.1, 1.0), ("h2", 0.2, 3.0))]
    result = merge(heads, [0.25, 0.75], kind="head", name="avg")
    assert torch.equal(result.tensors[slot], torch.full((2, 3), 2.5)) and result.report.kind == "head"
    other = AdapterInput("h3", HeadConfig("ClassificationHead", dict(config, num_labels=3)), {slot: torch.ones(2, 3)})
    with pytest.raises(ValueError, match="Cannot average heads with different configurations: 'h1' has num_labels=2"):
        merge([heads[0], other], kind="head")
    tagging = AdapterInput("t", HeadConfig("TaggingHead", config), {slot: torch.ones(2, 3)})
    with pytest.raises(ValueError, match="Cannot average heads of different classes"):
        merge([heads[0], tagging], kind="head")


# ----------------------------------------------------------------------------- strategies carry their implementation
def test_every_strategy_has_a_rule():
    for strategy in STRATEGIES.values():
        assert isinstance(strategy.rule, (ParameterRule, DeltaWRule)), strategy.name
        assert set(strategy.rule.option_names) <= set(strategy.option_names), strategy.name


def test_a_strategy_without_an_implementation_cannot_be_declared():
    with pytest.raises(TypeError, match="needs a rule"):
        Strategy("nothing", frozenset({"lora"}), "declared but not implemented", None)
    with pytest.raises(TypeError, match=r"undeclared option\(s\) \['convention', 'density', 'normalize', 'rescale', 'scale', 'seed', 'space', 'svd_rank', 'svd_tol'\]"):
        Strategy("half", frozenset({"lora"}), "reads options it does not declare", TaskVectors(DROP_AND_RESCALE, SUM))


def test_a_new_task_vector_strategy_is_one_declaration():
    """Sparsification × consensus: a new pair needs no branch in any method module."""
    name = "dare_sum_for_test"
    register_strategy(Strategy(name, frozenset({"lora"}), "DARE × sum", TaskVectors(DROP_AND_RESCALE, SUM),
                               options=(DENSITY, SEED, CONVENTION, NORMALIZE, SCALE, RESCALE, SPACE, SVD_RANK, SVD_TOL)))
    try:
        inputs = [lora_input("a", 0), lora_input("b", 1)]
        options = {"density": 0.5, "seed": 3}
        ours = merge(inputs, None, name, options=options)
        reference = merge(inputs, None, "dare_linear", options=options)
        for slot, tensor in reference.tensors.items():
            assert torch.equal(ours.tensors[slot], tensor)
    finally:
        del STRATEGIES[name]


@pytest.mark.parametrize("value, error", [("x", TypeError), (None, TypeError), (1.5, ValueError), (float("nan"), ValueError)])
def test_option_validation_is_one_place(value, error):
    """The same exception type for a bad density through the engine and through the tensor operation."""
    from adapter_merging.ops.task_vectors import ties

    with pytest.raises(error, match="density"):
        merge([lora_input("a", 0), lora_input("b", 1)], None, "ties", options={"density": value})
    with pytest.raises(error, match="density"):
        ties(torch.ones(2, 3, 3), [0.5, 0.5], value)


# ----------------------------------------------------------------------------- front ends call it once
def test_average_adapter_and_average_head_call_the_engine_once(monkeypatch):
    calls = []
    original = model_mixin.merge

    def counting(*args, **kwargs):
        calls.append(kwargs.get("kind", "adapter"))
        return original(*args, **kwargs)

    monkeypatch.setattr(model_mixin, "merge", counting)
    model = tiny_adapter_model("bert")
    for i, name in enumerate(("a", "b")):
        model.add_adapter(name, config=SeqBnConfig())
        randomize_adapter(model, name, seed=i)
        model.add_classification_head(name, num_labels=2)
    model.average_adapter("avg", ["a", "b"])
    model.average_head("avg", ["a", "b"])
    assert calls == ["adapter", "head"]
