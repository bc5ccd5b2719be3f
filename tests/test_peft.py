"""`adapter_merging.peft.add_weighted_adapter` on tiny PEFT models (BERT, GPT-2, Llama, a Conv2d network).

Every merged adapter's effective update is read through PEFT's own ``get_delta_weight`` and compared
with a float64 dense reference computed here from the inputs' own ``get_delta_weight``; PEFT's own
``add_weighted_adapter`` on the same inputs is shown as the contrast.
"""
from __future__ import annotations

import copy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model

from adapter_merging.ops import task_vectors
from adapter_merging.peft import COMBINATION_TYPES, add_weighted_adapter
from test_atomicity import Once
from test_files import ConvNet, tiny_base

ROOT = Path(__file__).resolve().parents[1]
EXACT = 1e-5


def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=99))


def base(arch):
    return tiny_bert() if arch == "bert" else tiny_base(arch)


#: per base model, three LoRAs: different ranks, rank/alpha patterns, rsLoRA, different target modules
SPECS = {
    "bert": [dict(r=2, lora_alpha=4, target_modules=["query", "value"]),
             dict(r=3, lora_alpha=3, target_modules=["query", "key"], use_rslora=True),
             dict(r=4, lora_alpha=16, target_modules=["query", "value"], rank_pattern={"value": 2})],
    "gpt2": [dict(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
             dict(r=4, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True),
             dict(r=3, lora_alpha=6, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)],
    "llama": [dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"], alpha_pattern={"v_proj": 3}),
              dict(r=2, lora_alpha=3, target_modules=["q_proj", "k_proj"], use_rslora=True),
              dict(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj"])],
    "conv": [dict(r=2, lora_alpha=4, target_modules=["conv", "lin", "embed"]),
             dict(r=3, lora_alpha=3, target_modules=["conv", "lin"]),
             dict(r=2, lora_alpha=2, target_modules=["conv"])],
}
NAMES = ["a", "b", "c"]


def peft_model(arch, specs=None, names=NAMES, seed=0):
    """A PEFT model with one trained-like LoRA (random non-zero A and B) per spec."""
    specs = specs or SPECS[arch]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base(arch), LoraConfig(**specs[0]), adapter_name=names[0])
        for name, spec in zip(names[1:], specs[1:]):
            model.add_adapter(name, LoraConfig(**spec))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if "lora_" in key:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    return model


def deltas(model, name) -> dict:
    """{module: the update PEFT applies for adapter ``name``}, float64, through its own get_delta_weight."""
    out = {}
    for path, module in model.named_modules():
        held = list(getattr(module, "lora_A", {})) + list(getattr(module, "lora_embedding_A", {}))
        if hasattr(module, "get_delta_weight") and name in held:
            out[path] = module.get_delta_weight(name).detach().double()
    return out


def rel(x, y) -> float:
    return float(torch.linalg.norm(x - y) / torch.linalg.norm(y))


def exact_target(model, names, weights) -> dict:
    updates = [deltas(model, n) for n in names]
    modules = set().union(*updates)
    return {m: sum(w * u[m] for w, u in zip(weights, updates) if m in u) for m in modules}


# ----------------------------------------------------------------------------- the exact types
@pytest.mark.parametrize("combination", ["svd", "linear", "cat"])
@pytest.mark.parametrize("arch", list(SPECS))
def test_exact_types_give_the_exact_sum(arch, combination):
    model = peft_model(arch)
    weights = [1.0, -1.0, 0.5]
    report = add_weighted_adapter(model, NAMES, weights, "merged", combination_type=combination)
    target = exact_target(model, NAMES, weights)
    merged = deltas(model, "merged")
    assert set(merged) == set(target), "the union of the inputs' target modules"
    for module, update in target.items():
        assert rel(merged[module], update) <= EXACT, module
    assert report.max_error <= EXACT


def forward_inputs(arch):
    generator = torch.Generator().manual_seed(3)
    if arch == "conv":
        return {"x": torch.randn(2, 3, 8, 8, generator=generator)}
    return {"input_ids": torch.randint(0, 99, (2, 7), generator=generator)}


def output(model, inputs):
    result = model(**inputs)
    return result if isinstance(result, torch.Tensor) else result[0]


@pytest.mark.parametrize("combination", ["svd", "cat"])
@pytest.mark.parametrize("arch", list(SPECS))
def test_forward_pass_of_the_merged_adapter_is_the_base_plus_the_exact_sum(arch, combination):
    """Through the model itself: the merged adapter's outputs equal those of the base model with
    Σ λᵢ ΔWᵢ added to its weights by hand."""
    model = peft_model(arch)
    weights = [1.0, -1.0, 0.5]
    add_weighted_adapter(model, NAMES, weights, "merged", combination_type=combination)
    target = exact_target(model, NAMES, weights)
    model.set_adapter("merged")
    model.eval()
    reference = base(arch)
    reference.eval()
    with torch.no_grad():
        for path, update in target.items():
            reference.get_submodule(path.removeprefix("base_model.model.")).weight += update.float()
        inputs = forward_inputs(arch)
        torch.testing.assert_close(output(model, inputs), output(reference, inputs), rtol=1e-4, atol=1e-5)


def test_peft_own_linear_has_cross_terms_and_ours_not():
    """The contrast, on adapters PEFT's linear accepts (one rank and target set)."""
    specs = [dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])] * 2
    model = peft_model("llama", specs, names=["a", "b"])
    target = exact_target(model, ["a", "b"], [1.0, -1.0])
    model.add_weighted_adapter(["a", "b"], [1.0, -1.0], "peft_linear", combination_type="linear")
    add_weighted_adapter(model, ["a", "b"], [1.0, -1.0], "ours_linear", combination_type="linear")
    peft_errors = [rel(deltas(model, "peft_linear")[m], t) for m, t in target.items()]
    ours = [rel(deltas(model, "ours_linear")[m], t) for m, t in target.items()]
    assert min(peft_errors) > 0.5, "PEFT's linear combines A and B separately"
    assert max(ours) <= EXACT


def test_peft_own_svd_default_rank_truncates_and_ours_not():
    model = peft_model("llama", [dict(r=4, lora_alpha=8, target_modules=["q_proj"])] * 3)
    target = exact_target(model, NAMES, [1.0, 1.0, 1.0])
    model.add_weighted_adapter(NAMES, [1.0, 1.0, 1.0], "peft_svd", combination_type="svd")
    add_weighted_adapter(model, NAMES, [1.0, 1.0, 1.0], "ours_svd")
    assert min(rel(deltas(model, "peft_svd")[m], t) for m, t in target.items()) > 0.1  # rank 4 of a rank-12 sum
    assert max(rel(deltas(model, "ours_svd")[m], t) for m, t in target.items()) <= EXACT


# ----------------------------------------------------------------------------- the task-vector types
TASK_VECTOR_TYPES = {  # (tasks, weights, the merge's random stream) → the dense merge
    "ties": lambda t, w, g: task_vectors.ties(t, w, 0.4, "total"),
    "ties_svd": lambda t, w, g: task_vectors.ties(t, w, 0.4, "total"),
    "magnitude_prune": lambda t, w, g: task_vectors.magnitude_prune(t, w, 0.4),
    "magnitude_prune_svd": lambda t, w, g: task_vectors.magnitude_prune(t, w, 0.4),
    "dare_linear": lambda t, w, g: task_vectors.dare_linear(t, w, 0.4, g),
    "dare_ties": lambda t, w, g: task_vectors.dare_ties(t, w, 0.4, g, "total"),
}


@pytest.mark.parametrize("combination", list(TASK_VECTOR_TYPES))
def test_task_vector_types_on_the_exact_updates(combination):
    """At the full rank the re-factorisation is exact, so the merged update is the dense task-vector merge
    of the exact ΔWᵢ, module by module (DARE: one random stream seeded by ``seed``, drawn module after
    module in name order, task after task)."""
    model = peft_model("llama", [dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])] * 3)
    weights = [0.7, -0.4, 0.5]
    seed = {"seed": 5} if combination.startswith("dare") else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = add_weighted_adapter(model, NAMES, weights, "merged", combination_type=combination, density=0.4,
                                      svd_rank=32, **seed)
    updates = [deltas(model, n) for n in NAMES]
    merged = deltas(model, "merged")
    stream = torch.Generator().manual_seed(5)
    for module in sorted(merged):
        tasks = torch.stack([u[module] for u in updates])
        assert rel(merged[module], TASK_VECTOR_TYPES[combination](tasks, weights, stream)) <= 1e-5, module
    assert report.max_error <= 1e-5 and report.target.startswith("the dense")


def test_ours_names_work_too():
    model = peft_model("llama")
    report = add_weighted_adapter(model, NAMES, [1.0, 0.5, -0.5], "concat", combination_type="lora_delta_w_concat")
    assert report.combine_strategy == "lora_delta_w_concat" and report.max_error <= EXACT


# ----------------------------------------------------------------------------- saving, reloading, atomicity
def test_saved_merged_adapter_reloads_with_the_same_outputs(tmp_path):
    model = peft_model("llama")
    add_weighted_adapter(model, NAMES, [1.0, -1.0, 0.5], "merged", combination_type="cat")
    model.set_adapter("merged")
    ids = torch.randint(0, 99, (2, 7), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(str(tmp_path), selected_adapters=["merged"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = PeftModel.from_pretrained(tiny_base("llama"), str(tmp_path / "merged"))
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=1e-5, atol=1e-6)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("where", ["_write", "_add"])
def test_a_failure_adds_nothing(where, monkeypatch):
    import adapter_merging.peft as merging_peft

    model = peft_model("llama")
    before, config, keys = _state(model), copy.deepcopy(model.peft_config), list(model.state_dict())
    Once(monkeypatch, merging_peft, where, after=True)
    with pytest.raises(RuntimeError, match="injected"):
        add_weighted_adapter(model, NAMES, [1.0, -1.0, 0.5], "merged")
    assert model.peft_config == config and "merged" not in model.peft_config
    assert list(model.state_dict()) == keys
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    add_weighted_adapter(model, NAMES, [1.0, -1.0, 0.5], "merged")  # and the name is usable afterwards


def test_inputs_untouched_and_clear_errors():
    model = peft_model("llama")
    before = _state(model)
    add_weighted_adapter(model, NAMES, [1.0, -1.0, 0.5], "merged")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    with pytest.raises(ValueError, match="'merged' already exists"):
        add_weighted_adapter(model, NAMES, [1.0, 1.0, 1.0], "merged")
    with pytest.raises(ValueError, match=r"Unknown adapter\(s\) \['nope'\]"):
        add_weighted_adapter(model, ["a", "nope"], [1.0, 1.0], "x")
    with pytest.raises(ValueError, match="Got 1 weights for 3 adapters"):
        add_weighted_adapter(model, NAMES, [1.0], "x")
    with pytest.raises(ValueError, match="Invalid combination_type 'nope'"):
        add_weighted_adapter(model, NAMES, [1.0, 1.0, 1.0], "x", combination_type="nope")
    with pytest.raises(TypeError, match="not a PEFT model"):
        add_weighted_adapter(tiny_base("llama"), NAMES, [1.0, 1.0, 1.0], "x")
    assert "x" not in model.peft_config


def test_svd_clamp_is_ignored_with_a_warning():
    model = peft_model("llama")
    with pytest.warns(UserWarning, match="svd_clamp=0.99 is ignored") as record:
        add_weighted_adapter(model, NAMES, [1.0, 1.0, 1.0], "merged", svd_clamp=0.99)
    assert record[0].filename == __file__


def test_dora_and_lora_bias_are_refused():
    for flag in ("use_dora", "lora_bias"):
        model = peft_model("llama", [dict(r=2, target_modules=["q_proj"], **{flag: True})] * 2, names=["a", "b"])
        with pytest.raises(ValueError, match=f"{flag}=True"):
            add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "merged")
        assert "merged" not in model.peft_config


# ----------------------------------------------------------------------------- IA³ and modules_to_save
def test_ia3_merges_the_deviation_from_identity():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(tiny_base("llama"), IA3Config(target_modules=["k_proj", "down_proj"],
                                                             feedforward_modules=["down_proj"]), adapter_name="a")
        model.add_adapter("b", IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if "ia3_l" in key:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    add_weighted_adapter(model, ["a", "b"], [1.0, -1.0], "merged", combination_type="linear")
    params = dict(model.named_parameters())
    for key in [k for k in params if k.endswith("ia3_l.merged")]:
        a, b = params[key.replace(".merged", ".a")], params[key.replace(".merged", ".b")]
        torch.testing.assert_close(params[key], 1.0 + (a - 1.0) - (b - 1.0))
    with pytest.raises(ValueError, match="IA³ adapters: they merge by 'linear'"):
        add_weighted_adapter(model, ["a", "b"], [1.0, -1.0], "x", combination_type="svd")


def test_modules_to_save_are_merged_linearly():
    specs = [dict(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["lm_head"])] * 2
    model = peft_model("llama", specs, names=["a", "b"])
    with torch.no_grad():
        for i, name in enumerate(["a", "b"]):
            model.base_model.model.lm_head.modules_to_save[name].weight.fill_(float(i + 1))
    add_weighted_adapter(model, ["a", "b"], [0.25, 0.75], "merged")
    merged = model.base_model.model.lm_head.modules_to_save["merged"].weight
    torch.testing.assert_close(merged, torch.full_like(merged, 0.25 * 1 + 0.75 * 2))


def test_import_without_peft_says_how_to_install_it():
    code = (
        "import sys; sys.modules['peft'] = None\n"
        "import adapter_merging\n"
        "try:\n    import adapter_merging.peft\nexcept ImportError as error:\n    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert 'pip install "adapter_merging[peft]"' in result.stdout


def test_every_peft_combination_name_is_mapped():
    from peft.tuners.lora.model import LoraModel
    import inspect
    import typing

    annotation = inspect.signature(LoraModel.add_weighted_adapter).parameters["combination_type"].annotation
    names = set(typing.get_args(eval(annotation, vars(sys.modules[LoraModel.__module__])) if isinstance(annotation, str) else annotation))
    assert names == set(COMBINATION_TYPES)
