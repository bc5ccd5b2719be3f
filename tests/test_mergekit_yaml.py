"""The YAML front end reads mergekit's language as mergekit 0.1.5 does (issue 17, items 6, 9–11, 13, 15):
its per-method defaults, its kept counts and TIES divisor (against a dense float64 reference written
here), strict types, and one message for everything unsupported."""
from __future__ import annotations

import textwrap

import pytest
import torch

from adapter_merging.cli import ConfigError, plan_from_yaml
from adapter_merging.mergekit import Gradient, LayerWeights, base_layer_count, evaluate, layer_index, layer_position
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


def test_mergekits_ties_example_reads_its_weight_lists_and_lists_the_rest_unsupported(tmp_path):
    # mergekit's examples/ties.yml, only its paths changed: its per-layer weight and filter are read, its
    # per-layer density is not (our strategies take one density per model), said in one message
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
        f"{path}: not supported: models[0].parameters.density (a per-layer list). Give one number per key "
        "(mergekit's per-layer lists and filters are read for `weight` only)."
    )
    # with one density per model it runs: int8_mask ignored with a note, the weights per layer and per filter
    import yaml

    config = yaml.safe_load(path.read_text())
    config["models"][0]["parameters"]["density"] = 0.7
    plan = plan_from_yaml(write(tmp_path, yaml.safe_dump(config), "fixed.yml"))
    assert plan["options"]["density"] == [0.7, 0.5, 0.33]
    assert plan["dtype"] == "float16" and plan["base_model"] == "llama"
    assert isinstance(plan["weights"], LayerWeights) and plan["weights"].method == "as_given"
    assert plan["weights"].values_at("model.layers.2.mlp.up_proj.weight", 2 / 3) == [1.0, 0.7, 0.5]
    assert plan["weights"].values_at("model.layers.2.self_attn.q_proj.weight", 0.5) == [1.0, 0.5, 0.0]


# ----------------------------------------------------------------------------- per-layer weights (issue 20)
@pytest.mark.parametrize("values, t, expected", [
    ((0.0, 0.3, 0.7, 1.0), 0.0, 0.0), ((0.0, 0.3, 0.7, 1.0), 1 / 3, 0.3), ((0.0, 0.3, 0.7, 1.0), 1.0, 1.0),
    ((0.0, 1.0, 0.5), 0.25, 0.5), ((0.0, 1.0, 0.5), 0.75, 0.75), ((0.0, 1.0, 0.5), 0.5, 1.0),
    ((2.0, 4.0), 0.125, 2.25), ((0.5,), 0.6, 0.5), ((1.0, 0.0, 0.5), 2 / 3, 1 / 6),
])
def test_a_weight_list_is_interpolated_linearly_over_the_layers(values, t, expected):
    assert Gradient(values).at(t) == pytest.approx(expected, abs=1e-15)


def test_layer_index_and_position_are_mergekits():
    assert layer_index("model.layers.3.mlp.experts.5.w1") == 3
    assert layer_index("bert.encoder.layer.0.attention.self.query") == 0
    assert layer_index("model.embed_tokens") is None and layer_index("heads") is None
    assert [layer_position(i, 4) for i in range(4)] == [0.0, 1 / 3, 2 / 3, 1.0]
    assert layer_position(0, 1) == 1.0  # a one-layer model: mergekit's t = 1
    assert layer_position(None, 4) == 0.0  # embeddings and head: mergekit plans them with t = 0


LLAMA = [f"model.layers.{i}.{m}" for i in range(3) for m in ("self_attn.q_proj", "mlp.down_proj")]


def effective(spec, modules):
    """The weight the engine gives each module from a per-module dict (the modules' exact names, else "*")."""
    return [spec.get(module, spec["*"]) for module in modules]


def lists(method, a="[0, 1]", b="1.0", parameters="", extra=""):
    return (f"models:\n  - model: a\n    parameters: {{weight: {a}}}\n  - model: b\n    parameters: {{weight: {b}}}\n"
            f"{extra}merge_method: {method}\n" + (f"parameters: {{{parameters}}}\n" if parameters else ""))


def test_linear_with_a_weight_list_normalises_per_layer(tmp_path):
    plan = plan_from_yaml(write(tmp_path, lists("linear")))
    assert plan["strategy"] == "linear" and plan["normalize"] is False
    weights, note, layers = plan["weights"].resolve(LLAMA + ["model.embed_tokens"])
    # a: 0, 0.5, 1 over layers 0-2 (t = 0, 1/2, 1), b: 1; each divided by a + b; embed_tokens: t = 0
    assert layers == 3 and weights == [
        {"*": 0.0, "model.embed_tokens": 0.0,
         "model.layers.0.self_attn.q_proj": 0.0, "model.layers.0.mlp.down_proj": 0.0,
         "model.layers.1.self_attn.q_proj": 1 / 3, "model.layers.1.mlp.down_proj": 1 / 3,
         "model.layers.2.self_attn.q_proj": 0.5, "model.layers.2.mlp.down_proj": 0.5},
        {"*": 1.0, "model.embed_tokens": 1.0,
         "model.layers.0.self_attn.q_proj": 1.0, "model.layers.0.mlp.down_proj": 1.0,
         "model.layers.1.self_attn.q_proj": 2 / 3, "model.layers.1.mlp.down_proj": 2 / 3,
         "model.layers.2.self_attn.q_proj": 0.5, "model.layers.2.mlp.down_proj": 0.5}]
    assert note.startswith("weight: per-layer values over L = 3 layers (the adapters' highest layer index + 1;")


def test_task_arithmetic_multiplies_each_layer_by_lambda_and_a_global_list_is_every_models_default(tmp_path):
    text = ("models:\n  - model: a\n    parameters: {weight: [1, 0, 0.5]}\n  - model: b\n"
            "merge_method: task_arithmetic\nparameters: {lambda: 2, weight: [0.5, 1.5]}\n")
    plan = plan_from_yaml(write(tmp_path, text))
    modules = [f"model.layers.{i}.self_attn.q_proj" for i in range(4)]  # t = 0, 1/3, 2/3, 1
    weights, _, _ = plan["weights"].resolve(modules)
    assert effective(weights[0], modules) == pytest.approx([2.0, 2 / 3, 1 / 3, 1.0], abs=1e-15)
    assert effective(weights[1], modules) == pytest.approx([1.0, 5 / 3, 7 / 3, 3.0], abs=1e-15)


def test_the_base_models_layer_count_sets_t(tmp_path):
    plan = plan_from_yaml(write(tmp_path, lists("task_arithmetic", a="[0, 1]")))
    modules = [f"model.layers.{i}.self_attn.q_proj" for i in range(3)]  # the adapters leave layers 3 and 4 out
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 5}', encoding="utf-8")
    layers, counted = base_layer_count([None, "not/cached-anywhere", str(base)])
    assert (layers, counted) == (5, f"num_hidden_layers of the base model {base}'s config.json")
    weights, note, _ = plan["weights"].resolve(modules, layers, counted)
    assert effective(weights[0], modules) == [0.0, 0.25, 0.5]  # t = i/4, not i/2
    assert f"L = 5 layers (num_hidden_layers of the base model {base}'s config.json)" in note
    with pytest.raises(ConfigError, match=r"the module model\.layers\.2\.self_attn\.q_proj lies in layer 2, but "
                                          r"the config gives 2 layers \(0 to 1\): is it the adapters' base model\?"):
        plan["weights"].resolve(modules, 2, "the config")


def test_conditions_give_each_module_the_first_matching_filter(tmp_path):
    a = "[{filter: self_attn, value: [0, 1]}, {filter: mlp, value: 2}]"
    b = "{value: 0.25}"
    plan = plan_from_yaml(write(tmp_path, lists("task_arithmetic", a=a, b=b, parameters="weight: 0.5")))
    weights, _, _ = plan["weights"].resolve(LLAMA + ["lm_head"])
    # a: self_attn → 0, 0.5, 1 per layer; mlp → 2; lm_head no filter matches → the global 0.5; b: 0.25
    assert effective(weights[0], LLAMA + ["lm_head"]) == [0.0, 2.0, 0.5, 2.0, 1.0, 2.0, 0.5]
    assert weights[0]["*"] == 0.5 and set(weights[1].values()) == {0.25}
    # the filter is part of the full model's tensor name: the module's name + ".weight", as mergekit sees it
    assert evaluate(plan["weights"].chains[0][0], "model.layers.0.mlp.down_proj.weight", 0.0) == 2.0
    assert evaluate(plan["weights"].chains[0][0], "model.norm.weight", 0.0) is None


def test_our_own_strategies_take_weight_lists_and_normalise_in_the_engine(tmp_path):
    plan = plan_from_yaml(write(tmp_path, lists("tsv", a="[1, 3]")))
    assert plan["strategy"] == "tsv" and plan["normalize"] is True and plan["weights"].method == "as_given"
    weights, _, _ = plan["weights"].resolve(["x.0.q", "x.1.q"])
    assert weights == [{"*": 1.0, "x.0.q": 1.0, "x.1.q": 3.0}, {"*": 1.0, "x.0.q": 1.0, "x.1.q": 1.0}]  # normalised
    # per module by the engine


def test_a_module_name_with_glob_characters_gets_its_own_weight(tmp_path):
    # every module is listed by its exact name, so 'experts.w1[0]' (a pattern matching 'experts.w10') takes no other's
    plan = plan_from_yaml(write(tmp_path, lists("task_arithmetic", a="[{filter: w10, value: 0}, {value: [0, 1]}]")))
    modules = ["model.layers.0.mlp", "model.layers.1.experts.w1[0]", "model.layers.1.experts.w10"]
    weights, _, _ = plan["weights"].resolve(modules)
    assert effective(weights[0], modules) == [0.0, 1.0, 0.0] and weights[0]["*"] == 0.0
    from adapter_merging.ops.weights import resolve_module_weights

    _, table = resolve_module_weights(["a", "b"], weights, False, modules)
    assert table == {"model.layers.1.experts.w1[0]": [1.0, 1.0]}  # w10 keeps the defaults (0, 1)


@pytest.mark.parametrize("weight, message", [
    ("[]", r"weight is an empty list: give a number, or a list of numbers \(the values "
           r"from the first layer to the last, interpolated in between\)\."),
    ("[0, '0.5']", r"weight\[1\] must be a finite number, got '0\.5' \(a string\): a "
                   r"per-layer list holds numbers, from the first layer to the last\."),
    ("[1, .nan]", r"weight\[1\] must be a finite number, got nan: a per-layer list"),
    ("[true, 1]", r"weight\[0\] must be a finite number, got True"),
    ("[[0, 1]]", r"weight\[0\] must be a finite number, got \[0, 1\]"),
    ("[1e-3, 1]", r"weight\[0\] must be a finite number, got '1e-3' \(a string: YAML reads 1e-3 as text; write "
                  r"1\.0e-3\)"),
    ("[0.5, {value: 1}]", r"weight mixes numbers and conditions: give a list of numbers"),
    ("[{filter: mlp}]", r"weight\[0\] is a condition with the keys \['filter'\]: a "
                        r"condition has `value:` \(a number or a per-layer list\)"),
    ("{filter: 3, value: 1}", r"weight\.filter must be text of the tensor names it applies to \(e\.g\. self_attn\), "
                              r"got 3; leave it out for every tensor\."),
    ("{value: []}", r"weight\.value is an empty list: give a number, or a list of numbers"),
    ("{value: .inf}", r"weight\.value must be a finite number or a list of numbers, got inf\."),
    ("[{filter: mlp, value: 1}]", r"weight: every condition has a filter, so the tensors "
                                  r"no filter names \(embeddings, norms\) get no weight, which mergekit refuses: end "
                                  r"the list with `- value: …` \(no filter\), or give a global"),
])
def test_bad_weight_lists_are_refused_with_the_fix(tmp_path, weight, message):
    with pytest.raises(ConfigError, match=r"merge\.yml: models\[0\]\.parameters\." + message):
        plan_from_yaml(write(tmp_path, lists("linear", a=weight)))


@pytest.mark.parametrize("parameters, per_model, listed", [
    ("", "density: [1, 0.5]", "models[0].parameters.density (a per-layer list)"),
    ("lambda: [1, 2]", "", "parameters.lambda (a per-layer list)"),
    ("normalize: [true, false]", "", "parameters.normalize (a per-layer list)"),
    ("", "density: {filter: mlp, value: 0.5}", "models[0].parameters.density (a filter)"),
])
def test_lists_of_other_parameters_are_refused_naming_weight(tmp_path, parameters, per_model, listed):
    text = lists("ties", a=f"1.0, {per_model}" if per_model else "1.0", parameters=parameters)
    with pytest.raises(ConfigError) as error:
        plan_from_yaml(write(tmp_path, text))
    assert str(error.value) == (f"{tmp_path / 'merge.yml'}: not supported: {listed}. Give one number per key "
                                "(mergekit's per-layer lists and filters are read for `weight` only).")


def test_a_layer_whose_weights_cannot_be_used_is_refused_naming_the_module(tmp_path):
    plan = plan_from_yaml(write(tmp_path, lists("linear", a="[1, -1]")))  # layer 2: a = -1, b = 1: sum 0
    with pytest.raises(ConfigError, match=r"merge\.yml: module model\.layers\.2\.mlp\.down_proj \(layer 2, t = 1\): "
                                          r"the weights \[-1\.0, 1\.0\] sum to 0, so linear with normalize: true"):
        plan["weights"].resolve(LLAMA)
    # without normalize the weights of every layer must sum to 1: a cross-fade does
    crossfade = plan_from_yaml(write(tmp_path, lists("linear", a="[1, 0]", b="[0, 1]", parameters="normalize: false")))
    weights, _, _ = crossfade["weights"].resolve(LLAMA)
    assert weights[0]["model.layers.1.mlp.down_proj"] == 0.5 and weights[1]["*"] == 0.0
    skewed = plan_from_yaml(write(tmp_path, lists("linear", a="[1, 0]", b="[0, 0.5]", parameters="normalize: false")))
    with pytest.raises(ConfigError, match=r"module model\.layers\.1\.mlp\.down_proj \(layer 1, t = 0\.5\): linear with "
                                          r"normalize: false and weights summing to 0\.75 scales the base model"):
        skewed["weights"].resolve(LLAMA)


# ----------------------------------------------------------------------------- the command line, end to end
def llama_adapters(folder, layers=4):
    """Two PEFT LoRA adapters of a float64 Llama of ``layers`` layers, saved, and the base model's weights."""
    import warnings

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=16, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                         intermediate_size=24, vocab_size=50)
    for i, spec in enumerate([dict(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"]),
                              dict(r=3, lora_alpha=3, target_modules=["q_proj", "down_proj"], use_rslora=True)]):
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(LlamaForCausalLM(config).double(), LoraConfig(**spec))
        generator = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for key, param in model.named_parameters():
                if "lora_" in key:
                    param.copy_(0.3 * torch.randn(param.shape, generator=generator, dtype=param.dtype))
        model.save_pretrained(str(folder / f"lora{i}"))


def peft_updates(folder) -> dict:
    """{module: ΔW = s·B·A} of a saved PEFT LoRA folder, in float64, read with safetensors and the config
    (ranks and alphas per module included): written out here, independent of the library."""
    import json
    import math
    import re

    from safetensors.torch import load_file

    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    out = {}
    for key, a in tensors.items():
        if key.endswith("lora_A.weight"):
            module = key[len("base_model.model."):-len(".lora_A.weight")]
            rank = next((v for k, v in (config.get("rank_pattern") or {}).items() if re.search(k, module)), config["r"])
            alpha = next((v for k, v in (config.get("alpha_pattern") or {}).items() if re.search(k, module)),
                         config["lora_alpha"])
            scaling = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
            b = tensors[key.replace("lora_A", "lora_B")]
            out[module] = scaling * b.double() @ a.double()
    return out


def test_the_command_line_merges_each_layer_with_its_interpolated_weights(tmp_path, capsys):
    import json

    from adapter_merging.cli import main

    llama_adapters(tmp_path)
    config = write(tmp_path, f"""
        models:
          - model: {tmp_path / 'lora0'}
            parameters: {{weight: [1, 0, 0.5]}}
          - model: {tmp_path / 'lora1'}
            parameters: {{weight: -0.5}}
        merge_method: task_arithmetic
        parameters: {{lambda: 2}}
        dtype: float64
    """)
    assert main([str(config), str(tmp_path / "out"), "--quiet"]) == 0
    # layers 0-3: t = 0, 1/3, 2/3, 1 → lora0's weight 1, 1/3, 1/6, 1/2 (interpolated), times λ = 2
    expected_weights = {0: (2.0, -1.0), 1: (2 / 3, -1.0), 2: (1 / 3, -1.0), 3: (1.0, -1.0)}
    inputs = [peft_updates(tmp_path / f"lora{i}") for i in range(2)]
    merged = peft_updates(tmp_path / "out")
    assert sorted(merged) == sorted(inputs[0]) and len(merged) == 8
    for module, got in merged.items():
        wa, wb = expected_weights[int(module.split(".")[2])]
        want = wa * inputs[0][module] + wb * inputs[1][module]
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12), module
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert report["recipe"]["num_layers"] == 4 and report["recipe"]["config_file"] == str(config)
    assert any(n.startswith("weight: per-layer values over L = 4 layers") for n in report["report"]["notes"])


def test_the_command_line_refuses_a_layer_with_unusable_weights_and_writes_nothing(tmp_path, capsys):
    from adapter_merging.cli import main

    llama_adapters(tmp_path, layers=2)
    config = write(tmp_path, f"""
        models:
          - model: {tmp_path / 'lora0'}
            parameters: {{weight: [1, -1]}}
          - model: {tmp_path / 'lora1'}
            parameters: {{weight: 1}}
        merge_method: linear
    """)
    assert main([str(config), str(tmp_path / "out"), "--quiet"]) == 1
    assert capsys.readouterr().err == (
        f"adapter-merge: error: {config}: module model.layers.1.mlp.down_proj (layer 1, t = 1): the weights "
        "[-1.0, 1.0] sum to 0, so linear with normalize: true divides by zero (mergekit gives NaN): change the "
        "weights.\n")
    assert not (tmp_path / "out").exists()


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
