"""Merge weights: ``resolve_weights`` and the weights ``average_adapter`` actually applies."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from adapter_merging.ops import resolve_weights
from adapter_merging.state import adapter_tensors, model_tensors
from conftest import randomize_adapter, tiny_adapter_model




# ----------------------------------------------------------------------------- resolve_weights
def test_no_weights_gives_equal_weights():
    assert resolve_weights(["a", "b", "c", "d"]) == [("a", 0.25), ("b", 0.25), ("c", 0.25), ("d", 0.25)]


def test_no_weights_ignores_normalize_flag():
    assert resolve_weights(["a", "b"], normalize_weights=False) == [("a", 0.5), ("b", 0.5)]


def test_weights_are_normalized_by_their_sum():
    resolved = resolve_weights(["a", "b", "c"], [1.0, 2.0, 5.0])
    assert [n for n, _ in resolved] == ["a", "b", "c"]
    assert [w for _, w in resolved] == pytest.approx([0.125, 0.25, 0.625], abs=1e-15)


def test_normalization_keeps_mixed_signs_when_sum_positive():
    resolved = dict(resolve_weights(["a", "b", "c"], [-1.0, 1.2, 0.8]))
    assert resolved == pytest.approx({"a": -1.0, "b": 1.2, "c": 0.8})  # Σ = 1 already
    resolved = dict(resolve_weights(["a", "b"], [-1.0, 3.0]))
    assert resolved == pytest.approx({"a": -0.5, "b": 1.5})


def test_normalize_false_keeps_weights_as_given():
    assert resolve_weights(["a", "b"], [1.0, -1.0], normalize_weights=False) == [("a", 1.0), ("b", -1.0)]
    assert resolve_weights(["a", "b"], [3, 4], normalize_weights=False) == [("a", 3.0), ("b", 4.0)]


def test_single_weight_normalizes_to_one():
    assert resolve_weights(["a"], [7.5]) == [("a", 1.0)]


def test_tiny_positive_weights_normalize():
    # the zero-sum test is relative to the weights' size, not an absolute threshold
    assert resolve_weights(["a", "b"], [1e-9, 3e-9]) == [("a", pytest.approx(0.25)), ("b", pytest.approx(0.75))]


def test_dict_as_adapter_list_is_honoured_in_its_order():
    resolved = resolve_weights({"b": 3.0, "a": 1.0})
    assert [n for n, _ in resolved] == ["b", "a"]
    assert [w for _, w in resolved] == pytest.approx([0.75, 0.25])


def test_dict_as_adapter_list_without_normalization():
    assert resolve_weights({"a": 1.0, "b": -1.0}, normalize_weights=False) == [("a", 1.0), ("b", -1.0)]


def test_dict_as_weights_is_matched_by_name_not_position():
    resolved = resolve_weights(["a", "b"], {"b": 0.25, "a": 0.75}, normalize_weights=False)
    assert resolved == [("a", 0.75), ("b", 0.25)]


def test_dict_weights_with_missing_or_extra_names_rejected():
    with pytest.raises(ValueError, match=r"missing \['b'\].*unexpected \['c'\]"):
        resolve_weights(["a", "b"], {"a": 1.0, "c": 1.0})


def test_dict_adapter_list_and_weights_together_rejected():
    with pytest.raises(ValueError, match="not both"):
        resolve_weights({"a": 1.0}, [1.0])


@pytest.mark.parametrize("weights", [[1.0, -1.0], [0.0, 0.0], [0.5, -0.5, 0.0], [1.0, -1.0 + 1e-13]])
def test_zero_sum_under_normalization_rejected(weights):
    names = [f"n{i}" for i in range(len(weights))]
    with pytest.raises(ValueError, match="normalize_weights=False") as err:
        resolve_weights(names, weights)
    assert "zero" in str(err.value)


def test_negative_sum_under_normalization_rejected():
    with pytest.raises(ValueError, match="normalize_weights=False") as err:
        resolve_weights(["a", "b"], [-2.0, 1.0])
    assert "< 0" in str(err.value)


def test_zero_and_negative_sum_fine_without_normalization():
    assert resolve_weights(["a", "b"], [1.0, -1.0], normalize_weights=False) == [("a", 1.0), ("b", -1.0)]
    assert resolve_weights(["a", "b"], [-2.0, 1.0], normalize_weights=False) == [("a", -2.0), ("b", 1.0)]


def test_overflowing_sum_rejected():
    with pytest.raises(ValueError, match="normalize_weights=False"):
        resolve_weights(["a", "b"], [1e308, 1e308])


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, np.nan, torch.tensor(math.inf)])
@pytest.mark.parametrize("normalize", [True, False])
def test_non_finite_weight_rejected(bad, normalize):
    with pytest.raises(ValueError, match="finite") as err:
        resolve_weights(["a", "b"], [1.0, bad], normalize_weights=normalize)
    assert "'b'" in str(err.value)


@pytest.mark.parametrize("weights", [[1.0], [1.0, 2.0, 3.0], []])
def test_wrong_number_of_weights_rejected(weights):
    with pytest.raises(ValueError, match=r"Got \d+ weights for 2 adapters") as err:
        resolve_weights(["a", "b"], weights)
    assert "one weight per adapter" in str(err.value)


def test_duplicate_names_rejected():
    with pytest.raises(ValueError, match=r"Duplicate adapter names \['a'\]") as err:
        resolve_weights(["a", "b", "a"], [1.0, 1.0, 1.0])
    assert "summed weight" in str(err.value)


@pytest.mark.parametrize("empty", [[], {}, ()])
def test_empty_list_rejected(empty):
    with pytest.raises(ValueError, match="at least one adapter"):
        resolve_weights(empty)


@pytest.mark.parametrize("names", [["a", 1], [None], [b"a"], {1: 1.0}])
def test_non_string_names_rejected(names):
    with pytest.raises(TypeError, match="names must be strings"):
        resolve_weights(names)


def test_single_string_as_list_rejected():
    with pytest.raises(TypeError, match="list or a dict"):
        resolve_weights("ab")


@pytest.mark.parametrize("bad", ["0.5", None, [1.0], object(), True, 1 + 2j])
def test_non_numeric_weight_rejected(bad):
    with pytest.raises(TypeError, match="real number") as err:
        resolve_weights(["a", "b"], [1.0, bad])
    assert "'b'" in str(err.value)


def test_weights_not_a_sequence_rejected():
    with pytest.raises(TypeError, match="list of numbers"):
        resolve_weights(["a", "b"], 0.5)
    with pytest.raises(TypeError, match="list of numbers"):
        resolve_weights(["a", "b"], "0.5, 0.5")


@pytest.mark.parametrize(
    "weights",
    [
        np.array([1.0, 3.0]),
        np.array([1, 3], dtype=np.int64),
        [np.float32(1.0), np.int64(3)],
        torch.tensor([1.0, 3.0]),
        [torch.tensor(1.0), torch.tensor(3.0, dtype=torch.float64)],
        [torch.tensor(1), 3],
        (1, 3),
    ],
    ids=["ndarray", "int-ndarray", "numpy-scalars", "tensor", "0d-tensors", "int-0d-tensor", "tuple"],
)
def test_array_and_scalar_weights_accepted(weights):
    resolved = resolve_weights(["a", "b"], weights)
    assert resolved == [("a", 0.25), ("b", 0.75)]
    assert all(type(w) is float for _, w in resolved)


def test_dict_with_numpy_and_tensor_values_accepted():
    resolved = resolve_weights({"a": np.float64(1.0), "b": torch.tensor(-1.0)}, normalize_weights=False)
    assert resolved == [("a", 1.0), ("b", -1.0)]


@pytest.mark.parametrize(
    "names, weights",
    [({"a", "b"}, None), (frozenset({"a", "b"}), [1.0, 2.0]), (["a", "b"], {1.0, 2.0}), (["a", "b"], frozenset({1.0}))],
    ids=["set-names", "frozenset-names", "set-weights", "frozenset-weights"],
)
def test_unordered_collections_rejected(names, weights):
    """A set has no order: positional weights would go to whichever name it yields first."""
    with pytest.raises(TypeError, match="unordered") as err:
        resolve_weights(names, weights)
    assert "list" in str(err.value)


@pytest.mark.parametrize(
    "bad",
    [np.True_, np.bool_(False), torch.tensor(True), np.complex128(1 + 2j), np.complex64(1), torch.tensor(1 + 1j)],
    ids=["numpy-true", "numpy-false", "bool-tensor", "numpy-complex", "numpy-complex-real", "complex-tensor"],
)
def test_bool_and_complex_scalars_rejected(bad):
    with pytest.raises(TypeError, match="real number") as err:
        resolve_weights(["a", "b"], [1.0, bad])
    assert "'b'" in str(err.value)


@pytest.mark.parametrize(
    "weights", [np.array([True, False]), torch.tensor([True, True]), np.array([1 + 0j, 2 + 0j])],
    ids=["bool-array", "bool-tensor", "complex-array"],
)
def test_bool_and_complex_arrays_rejected(weights):
    with pytest.raises(TypeError, match="real number"):
        resolve_weights(["a", "b"], weights)


@pytest.mark.parametrize("normalize", [True, False])
def test_integer_too_large_for_a_float_rejected(normalize):
    with pytest.raises(ValueError, match="too large") as err:
        resolve_weights(["a", "b"], [1, 10**400], normalize_weights=normalize)
    assert "'b'" in str(err.value)


@pytest.mark.parametrize("weights", [torch.tensor(0.5), np.float64(0.5), np.array(0.5), 0.5])
def test_scalar_weights_rejected_with_the_fix(weights):
    with pytest.raises(TypeError, match="one weight per adapter") as err:
        resolve_weights(["a"], weights)
    assert "[0.5]" in str(err.value)


def test_two_dimensional_weights_rejected():
    with pytest.raises(TypeError, match="1-D"):
        resolve_weights(["a", "b"], torch.ones(2, 1))


@pytest.mark.parametrize("flag", [None, "False", 0, 1, np.True_])
def test_normalize_flag_must_be_a_bool(flag):
    with pytest.raises(TypeError, match="normalize_weights must be True or False"):
        resolve_weights(["a", "b"], [1.0, 2.0], normalize_weights=flag)


# ----------------------------------------------------------------------------- through average_adapter
@pytest.fixture(scope="module")
def bn_model():
    model = tiny_adapter_model("bert")
    for i, name in enumerate(["wa", "wb", "wc"]):
        model.add_adapter(name, config="seq_bn")
        randomize_adapter(model, name, seed=i + 1)
    return model


def _applied(model, merged: str, inputs):
    """The weights actually applied: solve Σ λᵢ xᵢ = y on one tensor of the merged adapter."""
    named = model_tensors(model)
    out = adapter_tensors(named, merged)
    slots = sorted(out)
    columns = torch.stack(
        [torch.cat([adapter_tensors(named, n)[s].detach().double().flatten() for s in slots]) for n in inputs], dim=1
    )
    target = torch.cat([out[s].detach().double().flatten() for s in slots])
    return torch.linalg.lstsq(columns, target.unsqueeze(1)).solution.squeeze(1).tolist()


def test_average_adapter_default_weights(bn_model):
    bn_model.average_adapter("w_default", ["wa", "wb", "wc"])
    assert _applied(bn_model, "w_default", ["wa", "wb", "wc"]) == pytest.approx([1 / 3] * 3, abs=1e-5)


def test_average_adapter_normalizes(bn_model):
    bn_model.average_adapter("w_norm", ["wa", "wb"], weights=[1.0, 3.0])
    assert _applied(bn_model, "w_norm", ["wa", "wb"]) == pytest.approx([0.25, 0.75], abs=1e-5)


def test_average_adapter_dict_adapter_list(bn_model):
    bn_model.average_adapter("w_dict", {"wb": 2.0, "wa": -0.5}, normalize_weights=False)
    assert _applied(bn_model, "w_dict", ["wa", "wb"]) == pytest.approx([-0.5, 2.0], abs=1e-5)


def test_average_adapter_dict_weights(bn_model):
    bn_model.average_adapter("w_dictw", ["wa", "wb"], weights={"wb": 0.9, "wa": 0.1})
    assert _applied(bn_model, "w_dictw", ["wa", "wb"]) == pytest.approx([0.1, 0.9], abs=1e-5)


def test_average_adapter_tensor_weights(bn_model):
    report = bn_model.average_adapter("w_tensor", ["wa", "wc"], weights=torch.tensor([2.0, -1.0]),
                                      normalize_weights=False)
    assert report.weights == {"wa": 2.0, "wc": -1.0}
    assert _applied(bn_model, "w_tensor", ["wa", "wc"]) == pytest.approx([2.0, -1.0], abs=1e-5)


def test_report_records_resolved_weights(bn_model):
    report = bn_model.average_adapter("w_report", ["wa", "wb"], weights=np.array([1.0, 4.0]))
    assert report.weights == pytest.approx({"wa": 0.2, "wb": 0.8})
