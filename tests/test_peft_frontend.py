"""The PEFT front end as a migrating PEFT user meets it (issue 17, items 7, 15, 16, 18, 19): PEFT's own IA³
call form, refusals of unordered and non-bool arguments, Conv1d/Conv3d LoRAs in memory and from folders,
LoRA on raw parameters (``target_parameters``, mixture-of-experts weights); per-module weights (issue 20)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model

from adapter_merging.files import InputError, merge_saved_adapters
from adapter_merging.peft import add_weighted_adapter
from test_peft import NAMES, deltas, exact_target, peft_model, rel

EXACT = 1e-5


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model, before, config):
    assert model.peft_config == config
    assert list(model.state_dict()) == list(before)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _randomise(model, scale=0.2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if "lora_" in key:
                param.copy_(scale * torch.randn(param.shape, generator=generator))


# ----------------------------------------------------------------------------- item 7: no sets
def test_sets_for_adapters_or_weights_are_refused_and_nothing_changes():
    model = peft_model("llama")
    before, config = _state(model), copy.deepcopy(model.peft_config)
    with pytest.raises(TypeError, match=r"The adapter list is an unordered set, so which adapter gets which weight"):
        add_weighted_adapter(model, {"a", "b"}, [1.0, -1.0], "merged")
    with pytest.raises(TypeError, match=r"`weights` is an unordered frozenset.*Pass a list"):
        add_weighted_adapter(model, ["a", "b"], frozenset({1.0, -1.0}), "merged")
    with pytest.raises(TypeError, match=r"Pass one weight per adapter \(\['a', 'b'\]\) as `weights`"):
        add_weighted_adapter(model, ["a", "b"], None, "merged")
    _unchanged(model, before, config)
    report = add_weighted_adapter(model, {"a": 1.0, "b": -1.0}, None, "merged")  # a dict pairs them by name
    target = exact_target(model, ["a", "b"], [1.0, -1.0])
    assert max(rel(deltas(model, "merged")[m], t) for m, t in target.items()) <= EXACT
    assert report.weights == {"a": 1.0, "b": -1.0}


# ----------------------------------------------------------------------------- item 15: real bools
@pytest.mark.parametrize("value", ["False", None, 0, 1])
def test_boolean_parameters_must_be_bools(value):
    model = peft_model("llama")
    before, config = _state(model), copy.deepcopy(model.peft_config)
    with pytest.raises(TypeError, match=rf"svd_full_matrices must be True or False, got {value!r}"):
        add_weighted_adapter(model, ["a", "b"], [1.0, -1.0], "merged", svd_full_matrices=value)
    _unchanged(model, before, config)
    add_weighted_adapter(model, ["a", "b"], [1.0, -1.0], "merged", svd_full_matrices=False)


# ----------------------------------------------------------------------------- item 18: PEFT's IA³ call form
def _ia3_model():
    from test_files import tiny_base

    spec = dict(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(tiny_base("llama"), IA3Config(**spec), adapter_name="a")
        model.add_adapter("b", IA3Config(**spec))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if "ia3_l" in key:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    return model


def test_ia3_peft_own_call_form_works_unchanged():
    """``IA3Model.add_weighted_adapter(adapters, weights, adapter_name)`` has no combination_type: the same
    call here defaults to IA³'s "linear"; with weights summing to 1 it is PEFT's own result."""
    model = _ia3_model()
    model.add_weighted_adapter(["a", "b"], [0.3, 0.7], "peft_merged")  # PEFT's own
    report = add_weighted_adapter(model, ["a", "b"], [0.3, 0.7], "ours")  # the one-line migration
    assert report.combine_strategy == "linear"
    params = dict(model.named_parameters())
    merged = [k for k in params if k.endswith("ia3_l.ours")]
    assert len(merged) == 4
    for key in merged:
        torch.testing.assert_close(params[key], params[key.replace(".ours", ".peft_merged")])
    add_weighted_adapter(model, ["a", "b"], [1.0, -1.0], "unlearn")  # and the deviation rule for any weights
    for key in merged:
        a, b = params[key.replace(".ours", ".a")], params[key.replace(".ours", ".b")]
        torch.testing.assert_close(dict(model.named_parameters())[key.replace(".ours", ".unlearn")], a - b + 1.0)
    with pytest.raises(ValueError, match="combination_type='svd' does not apply to IA³ adapters"):
        add_weighted_adapter(model, ["a", "b"], [1.0, -1.0], "x", combination_type="svd")


def test_lora_default_is_still_svd_at_the_exact_rank():
    model = peft_model("llama")
    report = add_weighted_adapter(model, ["a", "b", "c"], [1.0, -1.0, 0.5], "merged")
    assert report.combine_strategy == "lora_delta_w_svd" and report.max_error <= EXACT


# ----------------------------------------------------------------------------- item 16: Conv1d / Conv3d
class ConvNd(torch.nn.Module):
    def __init__(self, groups=1):
        super().__init__()
        self.c1 = torch.nn.Conv1d(4, 6, 3, groups=groups)
        self.c3 = torch.nn.Conv3d(2, 4, (2, 2, 3))
        self.c1x1 = torch.nn.Conv1d(6, 5, 1)

    def forward(self, x, y):
        return self.c1x1(self.c1(x)).flatten(1), self.c3(y).flatten(1)


CONV_SPECS = [dict(r=2, lora_alpha=4, target_modules=["c1", "c3", "c1x1"]),
              dict(r=3, lora_alpha=3, target_modules=["c1", "c3"], use_rslora=True),
              dict(r=2, lora_alpha=2, target_modules=["c1", "c1x1"], rank_pattern={"c1x1": 1})]


def conv_model(specs=CONV_SPECS, groups=1):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(ConvNd(groups), LoraConfig(**specs[0]), adapter_name="a")
        for name, spec in zip("bc", specs[1:]):
            model.add_adapter(name, LoraConfig(**spec))
    _randomise(model)
    return model


def conv_inputs():
    generator = torch.Generator().manual_seed(3)
    return torch.randn(2, 4, 9, generator=generator), torch.randn(2, 2, 3, 4, 6, generator=generator)


@pytest.mark.parametrize("combination", ["svd", "cat", "ties"])
def test_conv1d_and_conv3d_lora_merge_exactly_in_memory(combination):
    """The merged model's outputs equal the base model's with Σ λᵢ ΔWᵢ added to its weights by hand."""
    model = conv_model()
    weights = [1.0, -1.0, 0.5]
    options = dict(density=0.5, svd_rank=64) if combination == "ties" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = add_weighted_adapter(model, ["a", "b", "c"], weights, "merged", combination_type=combination,
                                      **options)
    merged = deltas(model, "merged")
    if combination != "ties":
        target = exact_target(model, ["a", "b", "c"], weights)
        assert sorted(target) == ["base_model.model.c1", "base_model.model.c1x1", "base_model.model.c3"]
        assert {m: tuple(t.shape) for m, t in merged.items()} == {m: tuple(t.shape) for m, t in target.items()}
        assert max(rel(merged[m], t) for m, t in target.items()) <= EXACT and report.max_error <= EXACT
    torch.manual_seed(0)
    reference = ConvNd()
    with torch.no_grad():
        for path, update in merged.items():
            reference.get_submodule(path.removeprefix("base_model.model.")).weight += update.float()
    model.set_adapter("merged")
    with torch.no_grad():
        for ours, theirs in zip(model(*conv_inputs()), reference(*conv_inputs())):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_conv1d_and_conv3d_lora_merge_exactly_from_folders(tmp_path):
    model = conv_model()
    model.save_pretrained(str(tmp_path / "in"), selected_adapters=["a", "b", "c"])
    folders = [tmp_path / "in" / n for n in "abc"]
    weights = [1.0, -1.0, 0.5]
    target = exact_target(model, ["a", "b", "c"], weights)
    report = merge_saved_adapters([str(f) for f in folders], str(tmp_path / "out"), weights=weights,
                                  combine_strategy="lora_delta_w_svd", normalize_weights=False)
    assert report.max_error <= EXACT
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = PeftModel.from_pretrained(ConvNd(), str(tmp_path / "out"))
    merged = deltas(reloaded, "default")
    assert sorted(merged) == sorted(target)
    for module, update in target.items():
        assert rel(merged[module], update) <= EXACT, module


def test_grouped_convolution_lora_is_refused_by_name(tmp_path):
    specs = [dict(r=2, lora_alpha=4, target_modules=["c1"])] * 2
    model = conv_model(specs, groups=2)
    before, config = _state(model), copy.deepcopy(model.peft_config)
    with pytest.raises(ValueError, match=r"'a' has a LoRA on c1, a Conv1d with groups=2: it is not merged"):
        add_weighted_adapter(model, ["a", "b"], [1.0, -1.0], "merged")
    _unchanged(model, before, config)
    model.save_pretrained(str(tmp_path / "in"), selected_adapters=["a", "b"])
    with pytest.raises(InputError, match=r"the LoRA on c1 is on a convolution with groups=2 .*it is not merged"):
        merge_saved_adapters([str(tmp_path / "in" / "a"), str(tmp_path / "in" / "b")], str(tmp_path / "out"),
                             weights=[1.0, -1.0], combine_strategy="lora_delta_w_svd", normalize_weights=False)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- item 19: target_parameters
class Experts(torch.nn.Module):
    """A mixture-of-experts block: two 3-D expert weights on one module (PEFT nests two wrappers)."""

    def __init__(self):
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(3, 4, 6))  # (experts, in, out)
        self.w2 = torch.nn.Parameter(torch.randn(3, 6, 4))

    def forward(self, x):  # x: (experts, tokens, 4)
        return torch.bmm(torch.bmm(x, self.w1).tanh(), self.w2)


class Gate(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.router = torch.nn.Parameter(torch.randn(5, 4))  # a 2-D raw parameter (out, in)

    def forward(self, x):
        return torch.nn.functional.linear(x, self.router)


class MoE(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.experts = Experts()
        self.gate = Gate()

    def forward(self, x):
        return self.experts(x), self.gate(x)


PARAMS = ["experts.w1", "experts.w2", "gate.router"]
PARAM_SPECS = [dict(r=2, lora_alpha=4, target_modules=[], target_parameters=PARAMS),
               dict(r=3, lora_alpha=3, target_modules=[], target_parameters=PARAMS, use_rslora=True),
               dict(r=1, lora_alpha=2, target_modules=[], target_parameters=PARAMS)]


def moe_model(specs=PARAM_SPECS):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(MoE(), LoraConfig(**specs[0]), adapter_name="a")
        for name, spec in zip("bc", specs[1:]):
            model.add_adapter(name, LoraConfig(**spec))
    _randomise(model, seed=1)
    return model


def parameter_deltas(model, name):
    """{parameter key: the update PEFT applies to it for adapter ``name``}, through its get_delta_weight."""
    from peft.tuners.lora.layer import ParamWrapper

    out = {}
    for path, module in model.base_model.model.named_modules():
        if isinstance(module, ParamWrapper) and name in module.lora_A:
            key = f"{path.replace('.base_layer', '')}.{module.parameter_name}"
            out[key] = module.get_delta_weight(name).detach().double()
    return out


@pytest.mark.parametrize("combination", ["svd", "cat", "linear"])
def test_lora_on_target_parameters_merges_exactly(combination, tmp_path):
    """Each expert of a 3-D parameter (and a 2-D parameter) is its own LoRA: the merged adapter applies
    Σ λᵢ ΔWᵢ to every expert; the model's outputs equal the base's with that sum added by hand; saved and
    reloaded, the same."""
    model = moe_model()
    names, weights = ["a", "b", "c"], [1.0, -0.7, 0.5]
    updates = [parameter_deltas(model, n) for n in names]
    assert sorted(updates[0]) == PARAMS and tuple(updates[0]["experts.w1"].shape) == (3, 4, 6)
    report = add_weighted_adapter(model, names, weights, "merged", combination_type=combination)
    assert report.max_error <= EXACT
    assert sorted(m.module for m in report.modules) == [
        "experts.w1[0]", "experts.w1[1]", "experts.w1[2]", "experts.w2[0]", "experts.w2[1]", "experts.w2[2]",
        "gate.router"]
    merged = parameter_deltas(model, "merged")
    for key in PARAMS:
        target = sum(w * u[key] for w, u in zip(weights, updates))
        assert rel(merged[key], target) <= EXACT, key
    assert model.peft_config["merged"].target_parameters == PARAMS
    torch.manual_seed(0)
    reference = MoE()
    with torch.no_grad():
        for key in PARAMS:
            reference.get_parameter(key).add_(sum(w * u[key] for w, u in zip(weights, updates)).float())
    x = torch.randn(3, 7, 4, generator=torch.Generator().manual_seed(5))
    model.set_adapter("merged")
    with torch.no_grad():
        for ours, theirs in zip(model(x), reference(x)):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
        expected = model(x)
    model.save_pretrained(str(tmp_path), selected_adapters=["merged"])
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = PeftModel.from_pretrained(MoE(), str(tmp_path / "merged"))
    with torch.no_grad():
        for ours, theirs in zip(reloaded(x), expected):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_lora_on_target_parameters_from_folders_is_refused_by_name(tmp_path):
    model = moe_model(PARAM_SPECS[:2])
    model.save_pretrained(str(tmp_path / "in"), selected_adapters=["a", "b"])
    with pytest.raises(InputError, match=r"LoRA on target_parameters \(experts.w1, experts.w2, gate.router\) is not "
                                         r"merged from files: .*adapter_merging.peft.add_weighted_adapter"):
        merge_saved_adapters([str(tmp_path / "in" / "a"), str(tmp_path / "in" / "b")], str(tmp_path / "out"),
                             weights=[1.0, -1.0], combine_strategy="lora_delta_w_svd", normalize_weights=False)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- issue 20: per-module weights
#: the PEFT model's module paths inside the LoraModel's ``model`` (what per-module weights name)
Q0 = "model.layers.0.self_attn.q_proj"
LAYER1 = "model.layers.1.*"


def weight_of(module, spec):
    """The weight a per-module spec gives ``module``: exact name, else the first matching glob, else "*"."""
    import fnmatch

    if not isinstance(spec, dict):
        return spec
    if module in spec:
        return spec[module]
    return next((w for k, w in spec.items() if k != "*" and fnmatch.fnmatchcase(module, k)), spec["*"])


def per_module_target(model, names, specs):
    """{module path inside the LoraModel's model: Σ λᵢ,m ΔWᵢ}, float64, through PEFT's get_delta_weight."""
    updates = {n: {m.removeprefix("base_model.model."): d for m, d in deltas(model, n).items()} for n in names}
    modules = set().union(*updates.values())
    return {m: sum(weight_of(m, s) * updates[n][m] for n, s in zip(names, specs) if m in updates[n]) for m in modules}


@pytest.mark.parametrize("combination", ["svd", "cat", "linear"])
def test_per_module_weights_give_the_per_module_exact_sum(combination):
    """Three LoRAs of different ranks, rsLoRA, an alpha pattern, an embedding and different target modules:
    each module's merged update is Σ λᵢ,m ΔWᵢ (not normalised: PEFT's semantics), in float64."""
    model = peft_model("llama")
    specs = [{"*": 1.0, Q0: -2.0, "*.v_proj": 0.25}, 0.5, {"*": -1.0, LAYER1: 3.0, "model.embed_tokens": 7.0}]
    report = add_weighted_adapter(model, NAMES, specs, "merged", combination_type=combination)
    target = per_module_target(model, NAMES, specs)
    merged = {m.removeprefix("base_model.model."): d for m, d in deltas(model, "merged").items()}
    assert sorted(merged) == sorted(target) and "model.embed_tokens" in merged and len(merged) == 7
    for module, update in target.items():
        assert rel(merged[module], update) <= EXACT, module
    assert report.max_error <= EXACT and report.weights == {"a": 1.0, "b": 0.5, "c": -1.0}
    assert report.module_weights[Q0] == {"a": -2.0, "b": 0.5, "c": -1.0}
    assert report.module_weights["model.layers.1.self_attn.v_proj"] == {"a": 0.25, "b": 0.5, "c": 3.0}
    assert "model.layers.0.self_attn.k_proj" not in report.module_weights  # the defaults


def test_per_module_weights_by_adapter_name():
    """A dict by name as ``adapters`` (weights=None) or as ``weights`` pairs each spec with its adapter."""
    model = peft_model("llama")
    specs = {"c": {"*": 0.5, LAYER1: -1.0}, "a": 2.0}
    add_weighted_adapter(model, specs, None, "by_adapters")
    add_weighted_adapter(model, ["a", "c"], specs, "by_weights")
    target = per_module_target(model, ["a", "c"], [specs["a"], specs["c"]])
    for name in ("by_adapters", "by_weights"):
        merged = {m.removeprefix("base_model.model."): d for m, d in deltas(model, name).items()}
        assert sorted(merged) == sorted(target)
        assert max(rel(merged[m], t) for m, t in target.items()) <= EXACT


def test_per_module_weights_on_peft_ia3():
    model = _ia3_model()
    specs = [{"*": 1.0, "*.down_proj": 0.5}, {"*": -1.0, "model.layers.0.*": 0.25}]
    add_weighted_adapter(model, ["a", "b"], specs, "merged")
    params = dict(model.named_parameters())
    merged = [k for k in params if k.endswith("ia3_l.merged")]
    assert len(merged) == 4
    for key in merged:
        module = key.removeprefix("base_model.model.").removesuffix(".ia3_l.merged")
        la, lb = weight_of(module, specs[0]), weight_of(module, specs[1])
        a, b = params[key.replace(".merged", ".a")].double(), params[key.replace(".merged", ".b")].double()
        torch.testing.assert_close(params[key].double(), 1.0 + la * (a - 1.0) + lb * (b - 1.0))


def test_per_module_weights_leave_modules_to_save_to_the_default():
    """modules_to_save (here the LM head) are merged linearly with each adapter's "*" weight: patterns name
    LoRA modules, and one matching no LoRA module is refused even if it names a saved module."""
    specs = [dict(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["lm_head"])] * 2
    model = peft_model("llama", specs, names=["a", "b"])
    with torch.no_grad():
        for i, name in enumerate(["a", "b"]):
            model.base_model.model.lm_head.modules_to_save[name].weight.fill_(float(i + 1))
    weights = [{"*": 0.25, Q0: 3.0}, {"*": 0.75, LAYER1: -1.0}]
    report = add_weighted_adapter(model, ["a", "b"], weights, "merged")
    head = model.base_model.model.lm_head.modules_to_save["merged"].weight
    torch.testing.assert_close(head, torch.full_like(head, 0.25 * 1 + 0.75 * 2))
    assert not report.notes  # the defaults sum to 1: no warning about the heads
    target = per_module_target(model, ["a", "b"], weights)
    merged = {m.removeprefix("base_model.model."): d for m, d in deltas(model, "merged").items()}
    assert max(rel(merged[m], t) for m, t in target.items()) <= EXACT
    with pytest.raises(ValueError, match="pattern 'lm_head' of adapter 'a' matches no module"):
        add_weighted_adapter(model, ["a", "b"], [{"*": 1.0, "lm_head": 0.0}, 1.0], "other")
    assert "other" not in model.peft_config


def test_per_module_weights_name_experts_of_target_parameters_exactly():
    """An expert of a raw parameter is the module ``<key>[e]``: its exact name (brackets included) weighs it."""
    model = moe_model(PARAM_SPECS[:2])
    before = [parameter_deltas(model, n) for n in ("a", "b")]
    add_weighted_adapter(model, ["a", "b"], [{"*": 1.0, "experts.w1[1]": -3.0, "gate.*": 0.5}, 1.0], "merged")
    merged = parameter_deltas(model, "merged")
    for key in PARAMS:
        target = before[0][key] * (0.5 if key == "gate.router" else 1.0) + before[1][key]
        if key == "experts.w1":
            target[1] = -3.0 * before[0][key][1] + before[1][key][1]
        assert rel(merged[key], target) <= EXACT, key


@pytest.mark.parametrize("weights, error, match", [
    ([{"*": 1.0, "*.nowhere.*": 2.0}, 1.0, 1.0], ValueError,
     r"'\*\.nowhere\.\*' of adapter 'a' matches no module of the merge.* such as model\.embed_tokens"),
    ([{Q0: 2.0}, 1.0, 1.0], ValueError, r"no '\*' entry"),
    ([{"*": 1.0, Q0: "2"}, 1.0, 1.0], TypeError, "must be a real number"),
    ({"a": 1.0, "b": {"*": 1.0}}, ValueError, r"missing \['c'\]"),
])
def test_bad_per_module_weights_are_refused_and_nothing_changes(weights, error, match):
    model = peft_model("llama")
    before, config = _state(model), copy.deepcopy(model.peft_config)
    with pytest.raises(error, match=match):
        add_weighted_adapter(model, NAMES, weights, "merged")
    _unchanged(model, before, config)
