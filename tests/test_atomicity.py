"""A failed merge leaves the model exactly as it was; a successful one never touches its inputs or the
caller's random stream.

Failures are injected *after* the new adapter was added (writing its tensors, activating it, adding it
half-way, an interrupt), for new names and for ``overwrite_ok=True`` replacing an existing adapter.
``snapshot``/``assert_unchanged`` are shared with test_errors.py and test_heads.py.
"""
from __future__ import annotations

import copy
import warnings

import adapters
import pytest
import torch
from adapters import AdapterConfig

import adapter_merging
import adapter_merging.model_mixin as model_mixin
from conftest import model_inputs, randomize_adapter, tiny_adapter_model, tiny_init_model




# ----------------------------------------------------------------------------- snapshots
def snapshot(model) -> dict:
    """Everything a merge could change, copied; the order of keys and the identity of every parameter
    and module too (an optimizer holds the objects, a state dict lists the keys in order)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tied = getattr(model, "_tied_weights_keys", None)
    class_tied = getattr(type(model), "_tied_weights_keys", None)
    snap = {
        "state": state,
        "key_order": list(state),
        "parameter_ids": {n: id(p) for n, p in model.named_parameters()},
        "module_ids": {n: id(m) for n, m in model.named_modules()},
        "adapters_config": copy.deepcopy(model.adapters_config.to_dict()),
        "adapters": dict(model.adapters_config.adapters),
        "adapter_order": list(model.adapters_config.adapters),
        "config_map": {k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in model.adapters_config.config_map.items()},
        "vera_init_shapes": copy.deepcopy(model.adapters_config._vera_init_shapes),
        "active_setup": repr(model.adapters_config.active_setup),
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "tied_weights_keys": copy.copy(tied),
        "class_tied_weights_keys": copy.copy(class_tied),
    }
    if hasattr(model, "heads"):
        snap["heads"] = list(model.heads.keys())
        snap["prediction_heads"] = copy.deepcopy(model.config.prediction_heads)
        snap["prediction_head_order"] = list(model.config.prediction_heads)
        snap["active_head"] = model.active_head
        snap["head_modules"] = {n: id(h) for n, h in model.heads.items()}
    return snap


def assert_unchanged(before: dict, model, ignore: str | None = None) -> None:
    """``model`` equals the snapshot ``before``, the same objects in the same order; keys of the
    adapter/head ``ignore`` may be new."""
    after = snapshot(model)
    state_before, state_after = before["state"], after["state"]
    if ignore is not None:
        state_after = {k: v for k, v in state_after.items() if f".{ignore}." not in k and not k.startswith(f"{ignore}.")}
    assert state_after.keys() == state_before.keys(), (
        f"missing {sorted(state_before.keys() - state_after.keys())[:3]}, new {sorted(state_after.keys() - state_before.keys())[:3]}"
    )
    assert list(state_after) == list(state_before), "the state dict lists the same keys in another order"
    changed = [k for k in state_before if not _same_tensor(state_before[k], state_after[k])]
    assert not changed, f"tensors changed: {changed[:5]}"
    for field in before:
        if field == "state" or ignore is not None:
            continue
        if isinstance(before[field], dict) and isinstance(after[field], dict):
            diff = {k: (before[field].get(k), after[field].get(k)) for k in before[field].keys() | after[field].keys()
                    if before[field].get(k) != after[field].get(k)}
            assert not diff, f"{field} changed (before, after): {dict(list(diff.items())[:5])}"
        assert after[field] == before[field], f"{field} changed: {before[field]!r} -> {after[field]!r}"


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.is_meta or b.is_meta:  # no values to compare
        return a.is_meta and b.is_meta and a.shape == b.shape and a.dtype == b.dtype
    return a.dtype == b.dtype and torch.equal(a, b)


# ----------------------------------------------------------------------------- models
CONFIGS = {
    "seq_bn": "seq_bn",
    "compacter": AdapterConfig.load("compacter", reduction_factor=4),
    "seq_bn_inv": "seq_bn_inv",
    "prefix_tuning": "prefix_tuning",
    "prompt_tuning": "prompt_tuning",
    "lora": "lora",
    "ia3": "ia3",
    "vera": adapters.VeraConfig(init_weights_seed=42),
    "loreft": "loreft",
    "unipelt": "unipelt",
}


def make_model(config, factory=tiny_adapter_model, names=("a", "b", "old")):
    model = factory("bert")
    for i, name in enumerate(names):
        model.add_adapter(name, config=config)
        randomize_adapter(model, name, seed=i + 1)
    return model


class Once:
    """Replace ``owner.attr`` by a function that raises ``error`` on its first call (then behaves)."""

    def __init__(self, monkeypatch, owner, attr, error=RuntimeError("injected failure"), after=False):
        self.original = getattr(owner, attr)
        self.calls = 0
        self.error, self.after = error, after
        monkeypatch.setattr(owner, attr, self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == 1:
            if self.after:  # do the work, then fail: a half-made adapter
                self.original(*args, **kwargs)
            raise self.error
        return self.original(*args, **kwargs)


INJECTIONS = ["write", "set_active", "add_adapter_half_done", "keyboard_interrupt"]


def inject(kind, monkeypatch, model):
    if kind == "write":
        return Once(monkeypatch, model_mixin, "_write")
    if kind == "set_active":
        return Once(monkeypatch, model, "set_active_adapters")
    if kind == "add_adapter_half_done":
        return Once(monkeypatch, model, "add_adapter", after=True)
    if kind == "keyboard_interrupt":
        return Once(monkeypatch, model_mixin, "_write", error=KeyboardInterrupt())
    raise AssertionError(kind)


# ----------------------------------------------------------------------------- injected failures
@pytest.mark.parametrize("kind", INJECTIONS)
@pytest.mark.parametrize("method", ["seq_bn", "prefix_tuning"])  # prefix: the merged config (flat) is new
def test_failure_after_adding_new_adapter_rolls_back(method, kind, monkeypatch):
    model = make_model(CONFIGS[method])
    model.set_active_adapters("a")
    before = snapshot(model)
    injected = inject(kind, monkeypatch, model)
    with pytest.raises((RuntimeError, KeyboardInterrupt), match="injected failure" if kind != "keyboard_interrupt" else None):
        model.average_adapter("new", ["a", "b"], set_active=True)
    assert injected.calls >= 1
    assert "new" not in model.adapters_config
    assert_unchanged(before, model)


@pytest.mark.parametrize("kind", INJECTIONS)
@pytest.mark.parametrize("method", list(CONFIGS))
def test_failure_when_overwriting_restores_old_adapter(method, kind, monkeypatch):
    model = make_model(CONFIGS[method])
    model.train_adapter("a")  # 'old' is frozen: its requires_grad=False must come back too
    model.eval()
    model.set_active_adapters("old")
    with torch.no_grad():
        old_output = model(**model_inputs(model))[0]
    before = snapshot(model)
    inject(kind, monkeypatch, model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises((RuntimeError, KeyboardInterrupt)):
            model.average_adapter("old", ["a", "b"], weights=[2.0, -1.0], normalize_weights=False,
                                  overwrite_ok=True, set_active=True)
    assert_unchanged(before, model)
    model.set_active_adapters("old")
    with torch.no_grad():
        torch.testing.assert_close(model(**model_inputs(model))[0], old_output, rtol=0, atol=0)


def test_failure_when_overwriting_adapter_of_another_method(monkeypatch):
    model = make_model("seq_bn", names=("a", "b"))
    model.add_adapter("old", config="lora")
    randomize_adapter(model, "old", seed=9)
    model.set_active_adapters("old")
    before = snapshot(model)
    inject("write", monkeypatch, model)
    with pytest.raises(RuntimeError, match="injected"):
        model.average_adapter("old", ["a", "b"], overwrite_ok=True)
    assert_unchanged(before, model)
    assert isinstance(model.adapters_config.match("old", adapters.LoRAConfig), adapters.LoRAConfig)


def test_failure_on_init_model_rolls_back(monkeypatch):
    model = make_model("seq_bn_inv", factory=tiny_init_model)
    before = snapshot(model)
    inject("write", monkeypatch, model)
    with pytest.raises(RuntimeError):
        model.average_adapter("old", ["a", "b"], overwrite_ok=True)
    assert_unchanged(before, model)


def test_successful_overwrite_after_rollback_still_works(monkeypatch):
    model = make_model("seq_bn")
    inject("write", monkeypatch, model)
    with pytest.raises(RuntimeError):
        model.average_adapter("old", ["a", "b"], overwrite_ok=True)
    model.average_adapter("old", ["a", "b"], weights=[0.5, 0.5], overwrite_ok=True)  # the wrapper now passes
    state = model.state_dict()
    key = next(k for k in state if ".old." in k)
    torch.testing.assert_close(state[key], 0.5 * state[key.replace(".old.", ".a.")] + 0.5 * state[key.replace(".old.", ".b.")])


# ----------------------------------------------------------------------------- successful merges
@pytest.mark.parametrize("method", list(CONFIGS))
def test_successful_merge_does_not_modify_inputs(method):
    model = make_model(CONFIGS[method])
    model.set_active_adapters("a")
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model.average_adapter("merged", ["a", "b"], weights=[1.5, -0.5], normalize_weights=False)
    assert "merged" in model.adapters_config
    assert_unchanged(before, model, ignore="merged")
    assert {k: v for k, v in model.adapters_config.adapters.items() if k != "merged"} == before["adapters"]


@pytest.mark.parametrize("method", list(CONFIGS))
def test_merge_does_not_advance_global_rng(method):
    model = make_model(CONFIGS[method], names=("a", "b"))
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model.average_adapter("merged", ["a", "b"], weights=[0.3, 0.7])
        model.average_adapter("merged", ["a", "b"], weights=[0.6, 0.4], overwrite_ok=True, set_active=True)
    assert torch.equal(torch.get_rng_state(), state)


def test_failed_merge_does_not_advance_global_rng(monkeypatch):
    model = make_model("loreft")
    state = torch.get_rng_state()
    inject("write", monkeypatch, model)
    with pytest.raises(RuntimeError):
        model.average_adapter("old", ["a", "b"], weights=[0.3, 0.7], overwrite_ok=True)
    assert torch.equal(torch.get_rng_state(), state)


def test_average_head_does_not_advance_global_rng():
    model = tiny_adapter_model("bert")
    model.add_classification_head("h1", num_labels=3)
    model.add_classification_head("h2", num_labels=3)
    state = torch.get_rng_state()
    model.average_head("avg", ["h1", "h2"])
    assert torch.equal(torch.get_rng_state(), state)


def test_failing_validation_leaves_inputs_and_rng_alone():
    model = make_model("seq_bn")
    before, state = snapshot(model), torch.get_rng_state()
    with pytest.raises(ValueError):
        model.average_adapter("x", ["a", "b"], weights=[1.0, float("nan")])
    assert_unchanged(before, model)
    assert torch.equal(torch.get_rng_state(), state)


def test_plain_function_rolls_back_too(monkeypatch):
    model = make_model("lora")
    before = snapshot(model)
    inject("set_active", monkeypatch, model)
    with pytest.raises(RuntimeError):
        adapter_merging.average_adapter(model, "old", ["a", "b"], overwrite_ok=True, set_active=True)
    assert_unchanged(before, model)


# ----------------------------------------------------------------------------- the same objects in the same places
def test_failed_overwrite_keeps_the_optimizer_working(monkeypatch):
    """An optimizer made before a failed overwrite must still update the adapter afterwards: the same
    Parameter objects, in the same places and state-dict order."""
    model = make_model("lora")
    model.train_adapter("old")
    optimizer = torch.optim.SGD([p for n, p in model.named_parameters() if ".old." in n], lr=0.1)
    keys, params = list(model.state_dict()), {n: p for n, p in model.named_parameters() if ".old." in n}
    inject("write", monkeypatch, model)
    with pytest.raises(RuntimeError, match="injected"):
        model.average_adapter("old", ["a", "b"], overwrite_ok=True)
    assert list(model.state_dict()) == keys
    assert {n: p for n, p in model.named_parameters() if ".old." in n} == params  # identity (Parameter __eq__ is `is`)
    before = {n: p.detach().clone() for n, p in params.items()}
    model.train()
    model(**model_inputs(model))[0].sum().backward()
    optimizer.step()
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if ".old." in n)


def test_failed_vera_merge_leaves_no_trace_and_the_name_stays_usable(monkeypatch):
    model = make_model(CONFIGS["vera"], names=("a", "b"))
    before = snapshot(model)
    inject("write", monkeypatch, model)
    with pytest.raises(RuntimeError, match="injected"):
        model.average_adapter("new", ["a", "b"])
    assert "new" not in model.adapters_config._vera_init_shapes
    assert_unchanged(before, model)
    model.add_adapter("new", config=adapters.VeraConfig(init_weights_seed=42))  # the user's own adapter of that name
    model.set_active_adapters("new")
    assert torch.isfinite(model(**model_inputs(model))[0]).all()


@pytest.mark.parametrize("arch", ["bert", "bart"])  # bart: the base model's _tied_weights_keys is a class attribute
def test_failed_vera_merge_restores_tied_weights_keys(arch, monkeypatch):
    """adapters registers VeRA's shared projections in the base model's _tied_weights_keys, extending a
    class attribute in place where the class has one: every such list is as before after a failure."""
    model = tiny_adapter_model(arch)
    for i, name in enumerate(("a", "b")):
        model.add_adapter(name, config=adapters.VeraConfig(init_weights_seed=42))
        randomize_adapter(model, name, seed=i + 1)
    owners = [model, type(model), model.base_model, type(model.base_model)]
    before = [copy.copy(getattr(o, "_tied_weights_keys", None)) for o in owners]
    inject("write", monkeypatch, model)
    with pytest.raises(RuntimeError, match="injected"):
        model.average_adapter("new", ["a", "b"])
    after = [getattr(o, "_tied_weights_keys", None) for o in owners]
    assert after == before
    assert not any("new" in key for keys in after for key in (keys or []))


def test_failed_merge_with_set_active_keeps_the_active_head(monkeypatch):
    """adapters switches the active head to a head named like the activated adapter: undone on failure."""
    model = make_model("seq_bn", names=("a", "b"))
    model.add_classification_head("first", num_labels=2)
    model.add_classification_head("new", num_labels=2)
    model.active_head = "first"
    before = snapshot(model)
    original = model.set_active_adapters

    def activate_then_fail(*args, **kwargs):
        original(*args, **kwargs)
        assert model.active_head == "new", "adapters switched the head: the case this test is about"
        raise RuntimeError("injected failure")

    monkeypatch.setattr(model, "set_active_adapters", activate_then_fail)
    with pytest.raises(RuntimeError, match="injected"):
        model.average_adapter("new", ["a", "b"], set_active=True)
    assert model.active_head == "first"
    assert_unchanged(before, model)
