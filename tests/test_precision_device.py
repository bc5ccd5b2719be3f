"""Half precision: merged in float32, stored in the inputs' dtype; device kept."""
from __future__ import annotations

import copy
import warnings

import adapters
import pytest
import torch
from adapters import AdapterConfig

from adapter_merging.methods.reft import BASE, ORIGINAL
from adapter_merging.state import adapter_tensors, model_tensors
from conftest import model_inputs, tiny_adapter_model
from test_linear_merge_models import A, B, MERGED, add_inputs, expected_linear, output



DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
METHODS = {
    "seq_bn": "seq_bn",
    "compacter": AdapterConfig.load("compacter", reduction_factor=4),
    "prefix_tuning": "prefix_tuning",
    "prompt_tuning": "prompt_tuning",
    "lora": "lora",
    "ia3": "ia3",
    "vera": adapters.VeraConfig(init_weights_seed=42),
    "dora": "dora",
    "unipelt": "unipelt",
    "noreft": "noreft",
}
WEIGHTS = [0.7, 0.45]  # not summing to 1, so rounding errors would not cancel


def half_model(config, dtype):
    model = tiny_adapter_model("bert")
    add_inputs(model, config)
    return model.to(dtype)


def merged_tensors(model, name=MERGED):
    return adapter_tensors(model_tensors(model), name)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("method", list(METHODS))
def test_half_precision_merge_keeps_dtype_and_is_accurate(method, dtype):
    torch_dtype = DTYPES[dtype]
    model = half_model(METHODS[method], torch_dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model.average_adapter(MERGED, [A, B], weights=WEIGHTS, normalize_weights=False)
    merged = merged_tensors(model)
    assert merged and all(t.dtype == torch_dtype for t in merged.values())
    assert all(t.device == torch.device("cpu") for t in merged.values())
    # float64 reference from the (half) inputs: Σ λᵢ Φᵢ (IA³: 1 + Σ λᵢ(lᵢ − 1), prefixes ejected in float64)
    reference = copy.deepcopy(model).double()
    expected = expected_linear(reference, METHODS[method], (A, B), WEIGHTS)
    state = model.state_dict()
    for key, value in expected.items():
        got = state[key]
        assert got.dtype == torch_dtype, key
        error = (got.double() - value).norm() / value.norm().clamp_min(1e-12)
        assert error <= 1e-2, f"{key}: relative error {error:.2e}"


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_half_precision_is_computed_in_float32(dtype):
    """Each merged entry is within one ulp of the float64 result and almost always its correct rounding
    (ties of the float32 intermediate aside): no half-precision accumulation."""
    torch_dtype = DTYPES[dtype]
    model = half_model("seq_bn", torch_dtype)
    weights = [0.3, 0.3, 0.3, 0.3, -0.2]
    names = [A, B]
    for i, name in enumerate(["x2", "x3", "x4"]):
        model.add_adapter(name, config="seq_bn")
        with torch.no_grad():
            for key, t in merged_tensors(model, name).items():
                t.copy_(merged_tensors(model, A)[key] * (1 + 0.1 * (i + 1)))
        names.append(name)
    model.to(torch_dtype)  # new adapters are created in the default dtype
    model.average_adapter(MERGED, names, weights=weights, normalize_weights=False)
    inputs = [merged_tensors(model, n) for n in names]
    for slot, got in merged_tensors(model).items():
        exact = sum(w * t[slot].double() for w, t in zip(weights, inputs))
        rounded = exact.to(torch_dtype)
        assert got.dtype == torch_dtype
        mismatched = (got != rounded).float().mean().item()
        # float32 accumulation: a few double-rounding ties; half accumulation gets ~half the entries wrong
        assert mismatched <= 0.1, f"{slot.param}: {mismatched:.1%} entries not correctly rounded"
        ulp = torch.finfo(torch_dtype).eps * exact.abs().clamp_min(torch.finfo(torch_dtype).tiny)
        assert ((got.double() - exact).abs() <= ulp * 1.01).all()


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("method", ["seq_bn", "lora", "prompt_tuning"])
def test_half_precision_single_input_reproduces_outputs(method, dtype):
    model = half_model(method, DTYPES[dtype])
    model.average_adapter("one_zero", {A: 1.0, B: 0.0}, normalize_weights=False)
    out = output(model, "one_zero")
    assert out.dtype == DTYPES[dtype]
    assert torch.equal(out, output(model, A))


def test_adapter_dtype_differs_from_model_dtype():
    """LoRAConfig(dtype='bfloat16') on a float32 model: the merged adapter is bfloat16 too."""
    model = tiny_adapter_model("bert")
    add_inputs(model, adapters.LoRAConfig(dtype="bfloat16"))
    model.average_adapter(MERGED, [A, B], weights=[0.5, 0.5])
    merged = merged_tensors(model)
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}
    assert model.bert.embeddings.word_embeddings.weight.dtype == torch.float32
    # (no forward: adapters 1.3.0's LoRA forward fails on a float32 model with a bfloat16 LoRA on CPU)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_half_precision_loreft_projection(dtype):
    """LoReFT in half precision: merged in float64, stored in the half dtype, rows orthonormal to the
    dtype's precision (torch has no half-precision Householder product on CPU, so no forward here)."""
    torch_dtype = DTYPES[dtype]
    model = half_model("loreft", torch_dtype)
    model.average_adapter(MERGED, [A, B], weights=[0.5, 0.5])
    model.average_adapter("solo", [A], weights=[1.0])
    merged = merged_tensors(model)
    assert {t.dtype for t in merged.values()} == {torch_dtype}
    state = model.state_dict()
    keys = [k for k in state if f".{MERGED}." in k and k.endswith(ORIGINAL)]
    assert keys
    for key in keys:
        base_key = key.replace(ORIGINAL, BASE)
        module = model.get_submodule(key[: -len(".parametrizations.weight.original")])
        double = copy.deepcopy(module).double()
        with torch.no_grad():
            r = double.weight
        torch.testing.assert_close(r @ r.T, torch.eye(r.shape[0], dtype=torch.float64), atol=2e-2, rtol=0)
        solo = key.replace(f".{MERGED}.", ".solo.")
        assert torch.equal(state[solo], state[key.replace(f".{MERGED}.", f".{A}.")])
        assert torch.equal(state[solo.replace(ORIGINAL, BASE)], state[base_key.replace(f".{MERGED}.", f".{A}.")])


def test_device_is_kept():
    model = tiny_adapter_model("bert")
    add_inputs(model, "lora")
    device = next(iter(merged_tensors(model, A).values())).device
    model.average_adapter(MERGED, [A, B])
    assert {t.device for t in merged_tensors(model).values()} == {device}
    model.add_classification_head("h1", num_labels=2)
    model.add_classification_head("h2", num_labels=2)
    model.average_head("h", ["h1", "h2"])
    assert {p.device for p in model.heads["h"].parameters()} == {device}


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_half_precision_heads(dtype):
    torch_dtype = DTYPES[dtype]
    model = tiny_adapter_model("bert")
    model.add_classification_head("h1", num_labels=3)
    model.add_classification_head("h2", num_labels=3)
    model.to(torch_dtype)
    model.average_head("h", ["h1", "h2"], weights=[0.3, 0.9], normalize_weights=False)
    h1, h2, h = (dict(model.heads[n].named_parameters()) for n in ("h1", "h2", "h"))
    for key, value in h.items():
        assert value.dtype == torch_dtype
        exact = 0.3 * h1[key].double() + 0.9 * h2[key].double()
        torch.testing.assert_close(value.double(), exact, rtol=1e-2, atol=1e-3)
    with torch.no_grad():
        assert model(**model_inputs(model), head="h")[0].dtype == torch_dtype
