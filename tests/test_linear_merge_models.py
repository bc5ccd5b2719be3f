"""``linear`` merging of every adapter method of ``adapters`` 1.3.0, on real tiny models.

For each method the merged tensors are checked against Σ λᵢ Φᵢ computed here, independently, from
``model.state_dict()`` (reparameterised prefixes through each input module's own ``eject()``, IA³ as
1 + Σ λᵢ (lᵢ − 1), LoReFT projections through the parametrization the model uses), and the merged
adapter's forward pass must equal its input's for the weights [1] and {a: 1, b: 0}.
"""
from __future__ import annotations

import copy
import warnings

import adapters
import pytest
import torch
from adapters import AdapterConfig

from adapter_merging.methods.reft import BASE, ORIGINAL
from conftest import ARCHITECTURES, model_inputs, randomize_adapter, tiny_adapter_model, tiny_init_model



A, B, MERGED = "in0", "in1", "mrg"
WEIGHTS = (0.7, -0.4)  # both signs, normalize_weights=False


def _configs():
    return {
        "seq_bn": "seq_bn",
        "double_seq_bn": "double_seq_bn",
        "par_bn": "par_bn",
        "scaled_par_bn": "scaled_par_bn",
        "par_bn_learned_scaling": adapters.ParBnConfig(scaling="learned"),
        "compacter": AdapterConfig.load("compacter", reduction_factor=4),
        "compacter++": AdapterConfig.load("compacter++", reduction_factor=4),
        "seq_bn_inv": "seq_bn_inv",
        "double_seq_bn_inv": "double_seq_bn_inv",
        "prefix_tuning": "prefix_tuning",
        "prefix_tuning_flat": "prefix_tuning_flat",
        "prompt_tuning": "prompt_tuning",
        "loreft": "loreft",
        "noreft": "noreft",
        "direft": "direft",
        "mam": "mam",
        "unipelt": "unipelt",
        "lora": "lora",
        "ia3": "ia3",
        "vera": adapters.VeraConfig(init_weights_seed=42),
        "dora": "dora",
        "dvora": AdapterConfig.load("dvora", init_weights_seed=42),
        "mtl_lora": "mtl_lora",
    }


CONFIGS = _configs()
SUBSET = ["seq_bn", "par_bn", "prefix_tuning", "prompt_tuning", "lora", "ia3", "loreft", "unipelt", "mam"]
#: combinations ``adapters`` 1.3.0 refuses to add (``supports_adapter`` is False); they are skipped with its reason
REFUSED_BY_ADAPTERS = {(arch, "prompt_tuning") for arch in ("gpt2", "llama", "t5", "bart")}


# ----------------------------------------------------------------------------- helpers
def add_inputs(model, config, names=(A, B)):
    for i, name in enumerate(names):
        model.add_adapter(name, config=config)
        randomize_adapter(model, name, seed=11 + i)
        _keep_reft_diagonal(model, name)


def _keep_reft_diagonal(model, name):
    """randomize_adapter also moves the diagonal of LoReFT's ``original``, which torch casts to int
    (zeroing rows); keep it at -1 so the inputs are healthy orthonormal projections here (collapsed
    ones have their own tests below)."""
    with torch.no_grad():
        for key, tensor in model.named_parameters():
            if f".{name}." in key and key.endswith(ORIGINAL):
                tensor.diagonal().fill_(-1.0)


def output(model, name):
    model.set_active_adapters(name)
    with torch.no_grad():
        return model(**model_inputs(model))[0]


def _input_key(key: str, name: str) -> str:
    assert key.count(f".{MERGED}.") == 1, key
    return key.replace(f".{MERGED}.", f".{name}.")


def _ejected(model, key: str) -> torch.Tensor:
    """The flat prefix of the reparameterised prefix module at ``key`` (…control_trans), by its own eject()."""
    module = model.get_submodule(key[: -len(".control_trans")])
    with torch.no_grad():
        try:
            return module.eject().detach().clone()
        except RuntimeError:  # adapters' eject() views with the wrong size when n_heads·head_dim ≠ hidden (Llama GQA)
            return module.control_trans(module.wte.weight).reshape(-1).detach().clone()


def expected_linear(model, config, names, weights):
    """{merged key: expected tensor} computed from the inputs in ``model.state_dict()``."""
    state = model.state_dict()
    config = AdapterConfig.load(config)
    parts = config.configs if isinstance(config, adapters.ConfigUnion) else (config,)
    ia3 = any(isinstance(p, adapters.LoRAConfig) and p["composition_mode"] == "scale" for p in parts)
    alpha = next((p["alpha"] for p in parts if isinstance(p, adapters.LoRAConfig)), 1)
    expected = {}
    for key in state:
        if f".{MERGED}." not in key or key.endswith((ORIGINAL, BASE)):
            continue  # LoReFT projections: checked in effective space by check_reft_projections
        inputs = [_input_key(key, n) for n in names]
        if ".prefix_tunings." in key and key.endswith(".control_trans") and inputs[0] not in state:
            values = [_ejected(model, k).double() for k in inputs]
        elif key.split(".").count("shared_parameters") and key.rsplit(".", 1)[1] in ("lora_A", "lora_B"):
            expected[key] = state[inputs[0]].double()  # VeRA's frozen projections: shared, kept
            continue
        else:
            values = [state[k].double() for k in inputs]
        if ia3 and key.endswith(".lora_B"):
            expected[key] = (1.0 + sum(w * (alpha * v - 1.0) for w, v in zip(weights, values))) / alpha
        else:
            expected[key] = sum(w * v for w, v in zip(weights, values))
    return expected


def check_merged_tensors(model, config, names=(A, B), weights=WEIGHTS):
    state = model.state_dict()
    expected = expected_linear(model, config, names, weights)
    assert expected, "the merged adapter has no tensors"
    for key, value in expected.items():
        torch.testing.assert_close(state[key].double(), value, rtol=1e-5, atol=1e-6, msg=key)
    # every input tensor has its merged counterpart (reparameterised prefixes become one flat tensor)
    merged_keys = {k for k in state if f".{MERGED}." in k}
    for key in state:
        if f".{names[0]}." in key and ".control_trans." not in key and not key.endswith(".wte.weight"):
            assert key.replace(f".{names[0]}.", f".{MERGED}.") in merged_keys, key
    check_reft_projections(model, names, weights)
    return expected


def effective_projection(model, key: str) -> torch.Tensor:
    """R as the model computes it from the parametrization at ``key`` (…original)."""
    module = model.get_submodule(key[: -len(".parametrizations.weight.original")])
    with torch.no_grad():
        return module.weight.detach().double().clone()


def polar(matrix: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u @ vh


def check_reft_projections(model, names, weights):
    for key in [k for k in model.state_dict() if f".{MERGED}." in k and k.endswith(ORIGINAL)]:
        merged = effective_projection(model, key)
        target = sum(w * effective_projection(model, _input_key(key, n)) for w, n in zip(weights, names))
        torch.testing.assert_close(merged, polar(target), rtol=0, atol=1e-5, msg=key)
        torch.testing.assert_close(merged @ merged.T, torch.eye(merged.shape[0], dtype=merged.dtype), atol=1e-5, rtol=0)


def check_reproduces_input(model, config):
    """Merges of one input with weight 1 give that input's outputs."""
    reference = output(model, A)
    model.average_adapter("solo", [A], weights=[1.0])
    model.average_adapter("one_zero", {A: 1.0, B: 0.0}, normalize_weights=False)
    torch.testing.assert_close(output(model, "solo"), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(output(model, "one_zero"), reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(output(model, B), reference, atol=1e-4), "inputs too similar for a meaningful test"


def run_case(model, config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # LoRA 'linear' with mixed signs warns (tested elsewhere)
        model.average_adapter(MERGED, [A, B], weights=list(WEIGHTS), normalize_weights=False)
    expected = check_merged_tensors(model, config)
    check_reproduces_input(model, config)
    return expected


# ----------------------------------------------------------------------------- every method on BERT
FACTORIES = {"AutoAdapterModel": tiny_adapter_model, "adapters.init": tiny_init_model}


@pytest.mark.parametrize("factory", list(FACTORIES), ids=list(FACTORIES))
@pytest.mark.parametrize("method", list(CONFIGS), ids=list(CONFIGS))
def test_linear_merge_every_method_bert(method, factory):
    model = FACTORIES[factory]("bert")
    config = CONFIGS[method]
    add_inputs(model, config)
    expected = run_case(model, config)
    if method.endswith("_inv"):  # adapters 1.3.0's own average_adapter skips these on AutoAdapterModel
        assert any("invertible_adapters." in k for k in expected)
    if method.startswith("compacter"):
        assert any("shared_parameters." in k and k.endswith("phm_rule") for k in expected)
    if method in ("prefix_tuning", "mam", "unipelt"):
        assert model.adapters_config.match(MERGED, adapters.PrefixTuningConfig)["flat"] is True


# ----------------------------------------------------------------------------- a subset on every model
@pytest.mark.parametrize(
    "arch, method",
    [(a, m) for a in ARCHITECTURES if a != "bert" for m in SUBSET if (a, m) not in REFUSED_BY_ADAPTERS],
)
def test_linear_merge_architectures(arch, method):
    model = tiny_adapter_model(arch)
    config = CONFIGS[method]
    add_inputs(model, config)
    run_case(model, config)


@pytest.mark.parametrize("arch, method", sorted(REFUSED_BY_ADAPTERS))
def test_adapters_itself_cannot_add_these(arch, method):
    """The pairs left out above: adapters refuses to add the method to the architecture, so no model
    holds such adapters to merge. If a later adapters accepts one, this fails: move it into the test above."""
    model = tiny_adapter_model(arch)
    with pytest.raises(ValueError, match="is not supported by this model"):
        model.add_adapter("probe", config=CONFIGS[method])


def test_expected_refusals_are_really_refused():
    """The skips above are the library's refusals, not ours."""
    for arch, method in sorted(REFUSED_BY_ADAPTERS):
        model = tiny_adapter_model(arch)
        with pytest.raises(ValueError, match="not supported by this model"):
            model.add_adapter("x", config=CONFIGS[method])


# ----------------------------------------------------------------------------- IA³ and VeRA specifics
def test_ia3_merges_deviation_from_identity():
    model = tiny_adapter_model("bert")
    add_inputs(model, "ia3")
    model.average_adapter(MERGED, {A: 1.0, B: -1.0}, normalize_weights=False)
    state = model.state_dict()
    keys = [k for k in state if f".{MERGED}." in k and k.endswith("lora_B")]
    assert keys
    for key in keys:
        la, lb = state[_input_key(key, A)].double(), state[_input_key(key, B)].double()
        torch.testing.assert_close(state[key].double(), 1.0 + (la - 1.0) - (lb - 1.0), rtol=1e-6, atol=1e-6)
        assert (state[key] > 0).all()  # not the sign flip of a plain Σ λᵢ lᵢ = la − lb


def test_vera_shares_projections_and_merges_vectors():
    model = tiny_adapter_model("bert")
    add_inputs(model, CONFIGS["vera"])
    model.average_adapter(MERGED, [A, B], weights=[0.25, 0.75])
    state = model.state_dict()
    shared = [k for k in state if f"shared_parameters.{MERGED}." in k]
    assert {k.rsplit(".", 1)[1] for k in shared} == {"lora_A", "lora_B"}
    for key in shared:
        assert torch.equal(state[key], state[_input_key(key, A)])
    vectors = [k for k in state if f".loras.{MERGED}." in k and k.endswith(("vera_D", "vera_B"))]
    assert vectors
    for key in vectors:
        expected = 0.25 * state[_input_key(key, A)] + 0.75 * state[_input_key(key, B)]
        torch.testing.assert_close(state[key], expected, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- LoReFT projections
def _train(model, name, optimizer, steps=2):
    model.train_adapter(name)
    opt = optimizer([p for p in model.parameters() if p.requires_grad])
    for _ in range(steps):
        _loss(model).backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def _loss(model):
    """A loss with real gradients (the squared norm of a LayerNorm output is nearly constant)."""
    out = model(**model_inputs(model))[0]
    direction = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    return (out * direction).sum()


def _projection_keys(model, name):
    return [k for k in model.state_dict() if f".{name}." in k and k.endswith(ORIGINAL)]


@pytest.fixture(scope="module")
def reft_model():
    """LoReFT adapters trained for real: 'h0', 'h1' with Adam (orthonormal projections); 'c0', 'c1' with
    torch.optim.AdamW's default weight_decay=0.01, which moves the diagonal of the parametrization's
    `original` off -1 — torch casts it to int, so their effective projections collapse to zero."""
    model = tiny_adapter_model("bert")
    for name, opt in [
        ("h0", lambda p: torch.optim.Adam(p, lr=1e-2)),
        ("h1", lambda p: torch.optim.Adam(p, lr=1e-2)),
        ("c0", lambda p: torch.optim.AdamW(p, lr=1e-2)),
        ("c1", lambda p: torch.optim.AdamW(p, lr=1e-2)),
    ]:
        torch.manual_seed(len(name) + ord(name[0]) + ord(name[1]))
        model.add_adapter(name, config=adapters.LoReftConfig(r=2))
        _train(model, name, opt)
    return model


def test_loreft_training_with_adamw_collapses_projection(reft_model):
    """The realistic case that motivates reft.py's zero-row rule."""
    for key in _projection_keys(reft_model, "c0"):
        assert effective_projection(reft_model, key).abs().max() == 0
    for key in _projection_keys(reft_model, "h0"):
        r = effective_projection(reft_model, key)
        torch.testing.assert_close(r @ r.T, torch.eye(2, dtype=r.dtype), atol=1e-6, rtol=0)


@pytest.mark.parametrize("source", ["h0", "c0"])
def test_loreft_single_input_reproduced_exactly(reft_model, source):
    other = "h1" if source == "h0" else "c1"
    reft_model.average_adapter(f"{source}_solo", [source], weights=[1.0])
    reft_model.average_adapter(f"{source}_pair", {source: 1.0, other: 0.0}, normalize_weights=False)
    reference = output(reft_model, source)
    for merged in (f"{source}_solo", f"{source}_pair"):
        assert torch.equal(output(reft_model, merged), reference)
        for key in _projection_keys(reft_model, merged):
            assert torch.equal(effective_projection(reft_model, key),
                               effective_projection(reft_model, key.replace(f".{merged}.", f".{source}.")))


def test_loreft_merge_is_polar_of_weighted_sum(reft_model):
    reft_model.average_adapter("h_mix", {"h0": 0.6, "h1": 0.9}, normalize_weights=False)
    for key in _projection_keys(reft_model, "h_mix"):
        target = sum(w * effective_projection(reft_model, key.replace(".h_mix.", f".{n}."))
                     for n, w in [("h0", 0.6), ("h1", 0.9)])
        torch.testing.assert_close(effective_projection(reft_model, key), polar(target), atol=1e-6, rtol=0)


def test_loreft_collapsed_inputs_stay_collapsed(reft_model):
    reft_model.average_adapter("c_mix", {"c0": 0.5, "c1": 0.5})
    for key in _projection_keys(reft_model, "c_mix"):
        assert effective_projection(reft_model, key).abs().max() == 0
    # a collapsed intervention is the identity: the model behaves as without adapters
    reft_model.set_active_adapters(None)
    with torch.no_grad():
        plain = reft_model(**model_inputs(reft_model))[0]
    torch.testing.assert_close(output(reft_model, "c_mix"), plain, rtol=1e-5, atol=1e-5)


def test_loreft_mixed_collapsed_and_healthy_keeps_healthy_directions(reft_model):
    reft_model.average_adapter("ch_mix", {"c0": 0.5, "h0": 0.5})
    for key in _projection_keys(reft_model, "ch_mix"):
        healthy = effective_projection(reft_model, key.replace(".ch_mix.", ".h0."))
        torch.testing.assert_close(effective_projection(reft_model, key), healthy, atol=1e-6, rtol=0)


def test_loreft_shared_projection_is_not_retracted():
    model = tiny_adapter_model("bert")
    add_inputs(model, "loreft")
    with torch.no_grad():  # B uses A's projection (its learned source differs)
        named = dict(model.named_parameters()) | dict(model.named_buffers())
        for key in named:
            if f".{B}." in key and key.endswith((ORIGINAL, BASE)):
                named[key].copy_(named[key.replace(f".{B}.", f".{A}.")])
    model.average_adapter(MERGED, [A, B], weights=[0.3, 0.7])
    for key in _projection_keys(model, MERGED):
        torch.testing.assert_close(effective_projection(model, key), effective_projection(model, _input_key(key, A)),
                                   atol=1e-7, rtol=0)


def test_loreft_cancelling_merge_is_identity():
    model = tiny_adapter_model("bert")
    add_inputs(model, "loreft")
    with torch.no_grad():  # B := A, then A − B cancels exactly
        state = model.state_dict()
        for key, value in state.items():
            if f".{B}." in key:
                value.copy_(state[key.replace(f".{B}.", f".{A}.")])
    model.average_adapter(MERGED, {A: 1.0, B: -1.0}, normalize_weights=False)
    for key in _projection_keys(model, MERGED):
        assert effective_projection(model, key).abs().max() == 0
    model.set_active_adapters(None)
    with torch.no_grad():
        plain = model(**model_inputs(model))[0]
    torch.testing.assert_close(output(model, MERGED), plain, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- the merged adapter is ordinary
ORDINARY = ["seq_bn", "compacter", "prefix_tuning", "lora", "ia3", "loreft", "unipelt", "vera"]


@pytest.mark.parametrize("method", ORDINARY)
def test_merged_adapter_save_load_round_trip(method, tmp_path):
    model = tiny_adapter_model("bert")
    add_inputs(model, CONFIGS[method])
    model.average_adapter(MERGED, [A, B], weights=[0.4, 0.6], set_active=True)
    assert model.active_adapters.first() == MERGED
    with torch.no_grad():
        active_out = model(**model_inputs(model))[0]
    reference = output(model, MERGED)
    torch.testing.assert_close(active_out, reference, rtol=0, atol=0)
    model.save_adapter(str(tmp_path / MERGED), MERGED)

    fresh = tiny_adapter_model("bert")  # same base weights (same seed)
    loaded = fresh.load_adapter(str(tmp_path / MERGED))
    assert loaded == MERGED
    torch.testing.assert_close(output(fresh, MERGED), reference, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ORDINARY)
def test_merged_adapter_trains_one_step(method):
    model = tiny_adapter_model("bert")
    add_inputs(model, CONFIGS[method])
    model.average_adapter(MERGED, [A, B], weights=[0.4, 0.6])
    model.train_adapter(MERGED)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(f".{MERGED}." in n or "heads" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in trainable.items()}
    opt = torch.optim.SGD(trainable.values(), lr=0.5)
    _loss(model).backward()
    opt.step()
    assert any(not torch.equal(before[n], p) for n, p in trainable.items())
    assert all(torch.isfinite(p).all() for p in trainable.values())


def test_set_active_flag_activates_merged_adapter():
    model = tiny_adapter_model("bert")
    add_inputs(model, "seq_bn")
    model.set_active_adapters(A)
    model.average_adapter(MERGED, [A, B], set_active=True)
    assert model.active_adapters.first() == MERGED
    model.average_adapter("inactive", [A, B])
    assert model.active_adapters.first() == MERGED


def test_plain_function_equals_method():
    import adapter_merging

    model = tiny_adapter_model("bert")
    add_inputs(model, "seq_bn")
    model.average_adapter("via_method", [A, B], weights=[0.2, 0.8])
    adapter_merging.average_adapter(model, "via_function", [A, B], weights=[0.2, 0.8])
    state = model.state_dict()
    for key in [k for k in state if ".via_method." in k]:
        assert torch.equal(state[key], state[key.replace(".via_method.", ".via_function.")])


def test_copy_of_config_is_used_not_mutated():
    config = copy.deepcopy(CONFIGS["prefix_tuning"])
    model = tiny_adapter_model("bert")
    add_inputs(model, config)
    model.average_adapter(MERGED, [A, B])
    assert model.adapters_config.match(A, adapters.PrefixTuningConfig)["flat"] is False
    assert model.adapters_config.match(MERGED, adapters.PrefixTuningConfig)["flat"] is True


def test_prefix_tuning_flat_and_reparameterised_inputs_merge_in_flat_space():
    model = tiny_adapter_model("bert")
    model.add_adapter(A, config=adapters.PrefixTuningConfig(prefix_length=5))
    model.add_adapter(B, config=adapters.PrefixTuningConfig(prefix_length=5, flat=True, bottleneck_size=64))
    for i, name in enumerate((A, B)):
        randomize_adapter(model, name, seed=i + 3)
    model.average_adapter(MERGED, {A: 0.25, B: 0.75})
    state = model.state_dict()
    keys = [k for k in state if f".{MERGED}." in k and k.endswith(".control_trans")]
    assert keys and all(f".{MERGED}." not in k for k in state if k.endswith(".wte.weight"))
    for key in keys:
        expected = 0.25 * _ejected(model, _input_key(key, A)) + 0.75 * state[_input_key(key, B)]
        torch.testing.assert_close(state[key], expected, rtol=1e-5, atol=1e-6)
    model.average_adapter("solo_flat", {A: 0.0, B: 1.0}, normalize_weights=False)
    torch.testing.assert_close(output(model, "solo_flat"), output(model, B), rtol=1e-5, atol=1e-5)


def test_prefix_tuning_different_lengths_rejected():
    model = tiny_adapter_model("bert")
    model.add_adapter(A, config=adapters.PrefixTuningConfig(prefix_length=5))
    model.add_adapter(B, config=adapters.PrefixTuningConfig(prefix_length=7))
    with pytest.raises(ValueError, match="prefix_length"):
        model.average_adapter(MERGED, [A, B])
    assert MERGED not in model.adapters_config
