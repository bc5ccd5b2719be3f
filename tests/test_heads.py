"""``average_head``: linear merge of prediction heads of one class and configuration."""
from __future__ import annotations

import pytest
import torch

import adapter_merging
import adapter_merging.model_mixin as model_mixin
from conftest import model_inputs, tiny_adapter_model
from test_atomicity import Once, assert_unchanged, snapshot




def _randomize_head(model, name, seed):
    generator = torch.Generator().manual_seed(seed)
    embedding = model.get_input_embeddings().weight
    with torch.no_grad():
        for param in model.heads[name].parameters():
            if param is not embedding:
                param.add_(torch.randn(param.shape, generator=generator))


def _head_state(model, name):
    prefix = f"heads.{name}."
    return {k[len(prefix):]: v for k, v in model.state_dict().items() if k.startswith(prefix)}


@pytest.fixture
def model():
    m = tiny_adapter_model("bert")
    labels = {0: "neg", 1: "neu", 2: "pos"}
    for i, name in enumerate(["c1", "c2", "c3"]):
        m.add_classification_head(name, num_labels=3, id2label=labels)
        _randomize_head(m, name, seed=i + 1)
    m.add_classification_head("c_other_labels", num_labels=3, id2label={0: "neg", 1: "pos", 2: "neu"})
    m.add_classification_head("c_two", num_labels=2)
    m.add_classification_head("multi", num_labels=3, id2label=labels, multilabel=True)
    m.add_tagging_head("tag", num_labels=3, id2label=labels)
    m.active_head = "c1"
    return m


def test_classification_heads_merged_linearly(model):
    model.average_head("avg", ["c1", "c2", "c3"], weights=[0.5, -1.0, 1.5], normalize_weights=False)
    merged, inputs = _head_state(model, "avg"), [_head_state(model, n) for n in ("c1", "c2", "c3")]
    assert merged.keys() == inputs[0].keys() and merged
    for key in merged:
        expected = 0.5 * inputs[0][key] - 1.0 * inputs[1][key] + 1.5 * inputs[2][key]
        torch.testing.assert_close(merged[key], expected, rtol=1e-6, atol=1e-6)
    assert model.config.prediction_heads["avg"]["label2id"] == {"neg": 0, "neu": 1, "pos": 2}
    assert model.config.prediction_heads["avg"]["num_labels"] == 3


def test_head_weights_default_and_normalized(model):
    model.average_head("avg_default", ["c1", "c2"])
    model.average_head("avg_norm", {"c1": 1.0, "c2": 3.0})
    c1, c2 = _head_state(model, "c1"), _head_state(model, "c2")
    for key in c1:
        torch.testing.assert_close(_head_state(model, "avg_default")[key], 0.5 * c1[key] + 0.5 * c2[key])
        torch.testing.assert_close(_head_state(model, "avg_norm")[key], 0.25 * c1[key] + 0.75 * c2[key])


def test_single_head_with_weight_one_reproduces_outputs(model):
    model.average_head("copy", ["c2"], weights=[1.0])
    with torch.no_grad():
        ref = model(**model_inputs(model), head="c2")[0]
        out = model(**model_inputs(model), head="copy")[0]
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_merged_head_is_independent_of_inputs(model):
    model.average_head("avg", ["c1", "c2"])
    with torch.no_grad():
        for p in model.heads["avg"].parameters():
            p.add_(1.0)
    torch.testing.assert_close(_head_state(model, "c1")["1.weight"] * 0.5 + _head_state(model, "c2")["1.weight"] * 0.5,
                               _head_state(model, "avg")["1.weight"] - 1.0)


def test_different_label_names_rejected(model):
    before = snapshot(model)
    with pytest.raises(ValueError, match="label2id") as err:
        model.average_head("avg", ["c1", "c_other_labels"])
    assert "same labels" in str(err.value)
    assert_unchanged(before, model)


def test_different_num_labels_rejected(model):
    before = snapshot(model)
    with pytest.raises(ValueError, match="different configurations") as err:
        model.average_head("avg", ["c1", "c_two"])
    assert "num_labels" in str(err.value) or "label2id" in str(err.value)
    assert_unchanged(before, model)


@pytest.mark.parametrize("other", ["multi", "tag"])
def test_different_head_classes_rejected(model, other):
    before = snapshot(model)
    with pytest.raises(ValueError, match="different classes") as err:
        model.average_head("avg", ["c1", other])
    assert "ClassificationHead" in str(err.value)
    assert_unchanged(before, model)


def test_unknown_head_rejected(model):
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"Unknown head\(s\) \['nope'\]") as err:
        model.average_head("avg", ["c1", "nope"])
    assert "c2" in str(err.value)
    assert_unchanged(before, model)


def test_existing_head_without_overwrite_ok_rejected(model):
    before = snapshot(model)
    with pytest.raises(ValueError, match="overwrite_ok=True"):
        model.average_head("c3", ["c1", "c2"])
    assert_unchanged(before, model)


@pytest.mark.parametrize("weights, keyword", [([1.0, -1.0], "normalize_weights=False"), ([1.0], "one weight per head"),
                                              ([1.0, float("nan")], "finite")])
def test_bad_head_weights_rejected(model, weights, keyword):
    before = snapshot(model)
    with pytest.raises(ValueError, match=keyword):
        model.average_head("avg", ["c1", "c2"], weights=weights)
    assert_unchanged(before, model)


def test_duplicate_and_empty_head_lists_rejected(model):
    before = snapshot(model)
    with pytest.raises(ValueError, match="Duplicate head names"):
        model.average_head("avg", ["c1", "c1"])
    with pytest.raises(ValueError, match="at least one head"):
        model.average_head("avg", [])
    assert_unchanged(before, model)


def test_overwrite_ok_replaces_head(model):
    model.average_head("c3", ["c1", "c2"], weights=[0.25, 0.75], overwrite_ok=True)
    c1, c2, c3 = _head_state(model, "c1"), _head_state(model, "c2"), _head_state(model, "c3")
    for key in c1:
        torch.testing.assert_close(c3[key], 0.25 * c1[key] + 0.75 * c2[key])
    assert sorted(model.heads.keys()).count("c3") == 1


def test_set_active(model):
    model.average_head("inactive", ["c1", "c2"])
    assert model.active_head == "c1"
    model.average_head("active", ["c1", "c2"], set_active=True)
    assert model.active_head == "active"


def test_plain_function(model):
    adapter_merging.average_head(model, "fn", ["c1", "c2"], weights=[0.5, 0.5])
    assert "fn" in model.heads


@pytest.mark.parametrize("overwrite", [False, True])
def test_failure_after_adding_head_rolls_back(model, monkeypatch, overwrite):
    name = "c3" if overwrite else "new"
    old_head = model.heads["c3"]
    before = snapshot(model)
    Once(monkeypatch, model_mixin, "_write")
    with pytest.raises(RuntimeError, match="injected"):
        model.average_head(name, ["c1", "c2"], overwrite_ok=overwrite, set_active=True)
    assert_unchanged(before, model)
    assert model.heads["c3"] is old_head
    assert model.active_head == "c1"


def test_failed_head_overwrite_keeps_its_place(model, monkeypatch):
    """The old head is the same object in the same place of model.heads (and of its configuration)."""
    order, old_head = list(model.heads), model.heads["c2"]
    Once(monkeypatch, model_mixin, "_write")
    with pytest.raises(RuntimeError, match="injected"):
        model.average_head("c2", ["c1", "c3"], overwrite_ok=True)
    assert list(model.heads) == order and model.heads["c2"] is old_head
    assert list(model.config.prediction_heads) == order


def test_failure_in_add_prediction_head_rolls_back(model, monkeypatch):
    before = snapshot(model)
    Once(monkeypatch, model, "add_prediction_head", after=True)
    with pytest.raises(RuntimeError, match="injected"):
        model.average_head("c3", ["c1", "c2"], overwrite_ok=True, set_active=True)
    assert_unchanged(before, model)


# ----------------------------------------------------------------------------- tied LM heads
@pytest.mark.parametrize("arch, add", [("bert", "add_masked_lm_head"), ("gpt2", "add_causal_lm_head")])
def test_tied_lm_head_stays_tied_and_rest_is_merged(arch, add):
    m = tiny_adapter_model(arch)
    embedding = m.get_input_embeddings().weight
    for i, name in enumerate(["lm1", "lm2"]):
        getattr(m, add)(name)
        _randomize_head(m, name, seed=i + 1)
    tied_before = embedding.detach().clone()
    m.average_head("lm_avg", ["lm1", "lm2"], weights=[0.3, 0.7])
    head = m.heads["lm_avg"]
    tied = [mod for mod in head.modules() if getattr(mod, "weight", None) is embedding]
    assert len(tied) == 1, "the merged head's output embedding must be the input embedding itself"
    assert torch.equal(embedding, tied_before)
    lm1, lm2 = dict(m.heads["lm1"].named_parameters()), dict(m.heads["lm2"].named_parameters())
    merged = dict(head.named_parameters())
    untied = [k for k in merged if merged[k] is not embedding]
    assert untied
    for key in untied:
        assert merged[key] is not lm1[key]
        torch.testing.assert_close(merged[key], 0.3 * lm1[key] + 0.7 * lm2[key], rtol=1e-6, atol=1e-6)
    with torch.no_grad():  # a forward with the merged head runs and has the vocabulary size
        logits = m(**model_inputs(m), head="lm_avg")[0]
    assert logits.shape[-1] == m.config.vocab_size
