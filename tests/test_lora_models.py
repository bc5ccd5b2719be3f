"""Every LoRA strategy on every architecture, checked through the layers themselves.

Covers plain ``nn.Linear`` layers (BERT, DeBERTa-v2, Llama with its narrower k/v projections, T5,
BART, ViT), GPT-2's ``Conv1D`` layers (``fan_in_fan_out``: the LoRA factors are stored in the
(out, in) layout all the same) and the fused QKV ``LoRAMergedLinear`` of GPT-2 (``c_attn``) and
DeBERTa v1 (``in_proj``) with two or three of q/k/v adapted. The reference update of each layer is
computed from its modules by ``effective_delta_w`` (test_lora_strategies.py), which is itself
checked against the layer's forward pass here.
"""
from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
from adapters import LoRAConfig

from conftest import tiny_adapter_model
from test_lora_strategies import (
    EXACT,
    add_loras,
    effective_delta_w,
    lora_modules,
    merge,
    optimal_truncation,
    rel,
    target_delta_w,
)

#: (architecture, attn_matrices): the fused layers appear with 2 and 3 groups
CASES = [
    ("bert", ["q", "v"]),
    ("gpt2", ["q", "v"]),
    ("gpt2", ["q", "k", "v"]),
    ("deberta-v2", ["q", "k", "v"]),
    ("deberta", ["q", "v"]),
    ("deberta", ["q", "k", "v"]),
    ("llama", ["q", "k", "v"]),
    ("t5", ["q", "k", "v"]),
    ("bart", ["q", "v"]),
    ("vit", ["q", "k", "v"]),
]
IDS = [f"{arch}-{''.join(matrices)}" for arch, matrices in CASES]
DIFFERENT_WEIGHTS = [1.0, -0.8, 0.6]
EQUAL_WEIGHTS = [0.9, -0.6, 0.4]



def configs(matrices, ranks, alphas):
    return [
        LoRAConfig(r=r, alpha=a, attn_matrices=list(matrices), intermediate_lora=True, output_lora=True)
        for r, a in zip(ranks, alphas)
    ]


@pytest.fixture(scope="module", params=CASES, ids=IDS)
def case(request):
    """A tiny model of the architecture with three LoRAs of different r and alpha ("d") and three of
    one configuration ("e"), all randomised as if trained."""
    arch, matrices = request.param
    model = tiny_adapter_model(arch)
    different = add_loras(model, configs(matrices, [2, 3, 4], [4, 3, 16]), seed=10, prefix="d")
    equal = add_loras(model, configs(matrices, [3, 3, 3], [6, 6, 6]), seed=20, prefix="e")
    return arch, model, different, equal


def one_layer_of_each_kind(model, name) -> dict:
    """{path: layer} with one layer per position in the block (the first block's), e.g. query, value,
    intermediate and output of BERT, or c_attn, c_fc and c_proj of GPT-2."""
    kinds = {}
    for path, module in lora_modules(model, name).items():
        kinds.setdefault(re.sub(r"\.\d+\.", ".#.", path), (path, module))
    return dict(kinds.values())


def _check_layer_kinds(arch, model, name):
    kinds = {type(m).__name__ for m in lora_modules(model, name).values()}
    if arch in ("gpt2", "deberta"):
        assert "LoRAMergedLinear" in kinds, "the fused QKV layer carries the adapter"
    return kinds


# ============================================================================ the reference itself
def test_reference_update_is_what_the_layer_applies(case):
    """x·ΔWᵀ = layer(x) − base(x) for every input adapter and layer: the (out, in) layout of the
    factors, GPT-2's Conv1D transposition and the q/k/v placement of fused groups are right."""
    arch, model, different, _ = case
    _check_layer_kinds(arch, model, different[0])
    model64 = copy.deepcopy(model).double()
    generator = torch.Generator().manual_seed(0)
    for name in different:
        for path, module in one_layer_of_each_kind(model64, name).items():
            x = torch.randn(2, 3, module.in_features, generator=generator, dtype=torch.float64)
            model64.set_active_adapters(None)
            base = module(x)
            model64.set_active_adapters(name)
            delta = module(x) - base
            expected = x @ effective_delta_w(module, name).T
            assert torch.allclose(delta, expected, atol=1e-12 * (1 + float(expected.abs().max()))), path


# ============================================================================ exact strategies
@pytest.mark.parametrize("strategy", ["lora_delta_w_concat", "lora_delta_w_svd"])
def test_exact_strategies_reproduce_the_target(case, strategy):
    arch, model, names, _ = case
    report = merge(model, names, DIFFERENT_WEIGHTS, strategy)
    config = model.adapters_config.get("merged")
    assert config["r"] == report.rank == 9 and config["alpha"] / config["r"] == pytest.approx(4.0)  # the largest sᵢ
    modules = lora_modules(model, "merged")
    assert {m.module for m in report.modules} == set(modules)
    for path, module in modules.items():
        assert module.loras["merged"].lora_A.dtype == torch.float32
        assert rel(effective_delta_w(module, "merged"), target_delta_w(module, names, DIFFERENT_WEIGHTS)) <= EXACT, path
    assert report.max_error <= EXACT


def test_truncated_svd_is_optimal_per_layer_and_group(case):
    """svd_rank=2: every layer (every fused group) gets its Eckart–Young truncation, and the report
    states its error and kept energy."""
    arch, model, names, _ = case
    report = merge(model, names, DIFFERENT_WEIGHTS, "lora_delta_w_svd", svd_rank=2)
    rows = {m.module: m for m in report.modules}
    assert model.adapters_config.get("merged")["r"] == 2
    for path, module in lora_modules(model, "merged").items():
        target = target_delta_w(module, names, DIFFERENT_WEIGHTS)
        merged = effective_delta_w(module, "merged")
        best, optimum, kept, unique = optimal_truncation(module, "merged", target, 2)
        assert rel(merged, target) == pytest.approx(optimum, abs=1e-4), path
        if unique:
            assert rel(merged, best) <= EXACT, path
        assert rows[path].relative_error == pytest.approx(optimum, abs=1e-5)
        assert rows[path].energy_kept == pytest.approx(kept, abs=1e-5)


# ============================================================================ parameter strategies
@pytest.mark.parametrize("strategy", ["linear", "lora_linear_only_negate_b"])
def test_parameter_strategies(case, strategy):
    arch, model, _, names = case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # linear with mixed signs warns (tested elsewhere)
        report = merge(model, names, EQUAL_WEIGHTS, strategy)
    a_weights = EQUAL_WEIGHTS if strategy == "linear" else [abs(w) for w in EQUAL_WEIGHTS]
    rows = {m.module: m for m in report.modules}
    for path, module in lora_modules(model, "merged").items():
        loras = [module.loras[n] for n in names]
        merged = module.loras["merged"]
        a = sum(w * l.lora_A.detach().double() for l, w in zip(loras, a_weights))
        b = sum(w * l.lora_B.detach().double() for l, w in zip(loras, EQUAL_WEIGHTS))
        assert torch.allclose(merged.lora_A.detach().double(), a, atol=1e-6), path
        assert torch.allclose(merged.lora_B.detach().double(), b, atol=1e-6), path
        # the report's error is the dense one: these rules are not Σ λᵢ ΔWᵢ
        dense = rel(effective_delta_w(module, "merged"), target_delta_w(module, names, EQUAL_WEIGHTS))
        assert rows[path].relative_error == pytest.approx(dense, rel=1e-5), path
    assert report.max_error > 0.1


# ============================================================================ through the forward pass
@pytest.mark.parametrize("strategy,options", [("lora_delta_w_concat", {}), ("lora_delta_w_svd", {})])
def test_forward_pass_is_linear_in_the_adapters(case, strategy, options):
    """For every LoRA layer, called directly on random inputs with the adapter active:
    layer_merged(x) − base(x) = Σ λᵢ (layerᵢ(x) − base(x))."""
    arch, model, names, _ = case
    model64 = copy.deepcopy(model).double()
    merge(model64, names, DIFFERENT_WEIGHTS, strategy, **options)
    generator = torch.Generator().manual_seed(1)
    for path, module in one_layer_of_each_kind(model64, "merged").items():
        x = torch.randn(2, 5, module.in_features, generator=generator, dtype=torch.float64)
        model64.set_active_adapters(None)
        base = module(x)
        outputs = {}
        for name in names + ["merged"]:
            model64.set_active_adapters(name)
            outputs[name] = module(x) - base
        expected = sum(w * outputs[n] for n, w in zip(names, DIFFERENT_WEIGHTS))
        merged = outputs["merged"].detach().reshape(-1, expected.shape[-1])
        assert rel(merged, expected.detach().reshape(-1, expected.shape[-1])) <= 1e-10, path


def test_merged_model_runs_end_to_end(case):
    from conftest import model_inputs

    arch, model, names, _ = case
    merge(model, names, DIFFERENT_WEIGHTS, "lora_delta_w_svd", svd_tol=0.2)
    model.set_active_adapters("merged")
    with torch.no_grad():
        model(**model_inputs(model))


@pytest.mark.parametrize("arch", ["gpt2", "deberta"])
def test_fused_layers_that_adapters_refuses_are_merged_exactly(arch):
    """``adapters`` 1.3.0 refuses lora_delta_w_svd on models with fused QKV layers; here it is exact."""
    from adapter_merging import ModelMixin

    model = tiny_adapter_model(arch)
    names = add_loras(model, configs(["q", "v"], [2, 3], [4, 3]), prefix="f")
    try:
        super(ModelMixin, model).average_adapter(
            "theirs", names, weights=[1.0, -1.0], combine_strategy="lora_delta_w_svd", svd_rank=5,
            normalize_weights=False,
        )
    except ValueError as error:
        assert "lora_delta_w_svd" in str(error)
    else:  # pragma: no cover - depends on the installed adapters version
        pytest.skip("this adapters version merges fused layers itself")
    report = merge(model, names, [1.0, -1.0], "lora_delta_w_svd")
    assert report.rank == 5 and report.max_error <= EXACT
    for module in lora_modules(model, "merged").values():
        assert rel(effective_delta_w(module, "merged"), target_delta_w(module, names, [1.0, -1.0])) <= EXACT
