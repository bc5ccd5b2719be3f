"""learn_weights: merge weights learned on a few examples.

The references are independent of the code under test: the factored forward is checked against the dense
Σ λᵢ sᵢ Bᵢ Aᵢ added to the base weights (float64), its gradient against finite differences, and the
learning against a teacher: a merge with known per-layer weights λ*, whose outputs the learner must
reproduce, recovering λ* (gradient and CMA-ES, adapters and PEFT models).
"""
from __future__ import annotations

import copy
import sys

import pytest
import torch
from adapters import LoRAConfig, SeqBnConfig

from adapter_merging import learn_weights
from adapter_merging.learn import FACTORED_STRATEGIES, _AdaptersFront, _Session
from adapter_merging.state import adapter_tensors, model_tensors
from conftest import randomize_adapter, tiny_adapter_model

NAMES = ("a", "b", "c")
SPECS = {"a": (2, 4), "b": (3, 10), "c": (4, 3)}  # (r, alpha): ranks and scalings differ


def lora_model(names=NAMES, scale=0.5):
    model = tiny_adapter_model("bert")
    for i, name in enumerate(names):
        r, alpha = SPECS[name]
        model.add_adapter(name, LoRAConfig(r=r, alpha=alpha))
        randomize_adapter(model, name, scale=scale, seed=i + 1)
    model.add_classification_head("h", num_labels=4)
    return model


def batch(seed=0, rows=8, length=6, labels=True):
    generator = torch.Generator().manual_seed(seed)
    out = {"input_ids": torch.randint(1, 99, (rows, length), generator=generator), "head": "h"}
    if labels:
        out["labels"] = torch.randint(0, 4, (rows,), generator=generator)
    return out


def dense_updates(model, name):
    """{module: s·B·A} of a LoRA adapter of ``model``, float64."""
    r, alpha = SPECS[name]
    tensors = adapter_tensors(model_tensors(model), name)
    return {slot.prefix: (alpha / r) * tensors[slot.replace_param("lora_B")].double() @ a.double()
            for slot, a in tensors.items() if slot.param == "lora_A"}


def logits_with_dense_update(model, updates, inputs):
    """The bare model's logits with W + ΔW in each module (no adapter active), float64."""
    bare = copy.deepcopy(model).double()
    bare.set_active_adapters(None)
    with torch.no_grad():
        for path, delta in updates.items():
            bare.get_submodule(path).weight.add_(delta)
        return bare(**inputs).logits


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- the factored forward and its gradient
def test_factored_update_is_the_weighted_sum_of_the_updates_in_every_module():
    model = lora_model()
    front = _AdaptersFront(model)
    session = _Session(front, list(NAMES), "module", factored=True)
    session.open("lora_delta_w_svd", {})
    try:
        table = torch.randn(len(session.group_names), 3, generator=torch.Generator().manual_seed(5))
        session.set(table)
        references = {n: dense_updates(model, n) for n in NAMES}
        for row, module in enumerate(session.group_names):
            lora = model.get_submodule(module).loras[session.name]
            got = lora.scaling * lora.lora_B.double() @ lora.lora_A.double()  # lora_B: the parametrized value
            want = sum(float(table[row, i]) * references[n][module] for i, n in enumerate(NAMES))
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), module
        inputs = batch(labels=False)
        with torch.no_grad():
            got = model(**inputs).logits.double()
        per_module = {m: sum(float(table[row, i]) * references[n][m] for i, n in enumerate(NAMES))
                      for row, m in enumerate(session.group_names)}
        want = logits_with_dense_update(model, per_module, inputs)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    finally:
        session.close()


def test_gradient_of_the_weights_matches_finite_differences():
    model = lora_model().double()
    session = _Session(_AdaptersFront(model), list(NAMES), "layer", factored=True)
    session.open("lora_delta_w_svd", {})
    inputs = batch(labels=False)

    def objective(table):
        session.set(table)
        return (model(**inputs).logits ** 2).sum()

    try:
        table = torch.nn.Parameter(torch.tensor([[0.3, -0.2, 0.5], [0.1, 0.4, -0.6]], dtype=torch.float64))
        objective(table).backward()
        eps = 1e-6
        for index in [(0, 0), (0, 2), (1, 1), (1, 2)]:
            with torch.no_grad():
                up, down = table.detach().clone(), table.detach().clone()
                up[index] += eps
                down[index] -= eps
                numeric = (objective(up) - objective(down)) / (2 * eps)
            assert float(table.grad[index]) == pytest.approx(float(numeric), rel=1e-5, abs=1e-8), index
    finally:
        session.close()


# ----------------------------------------------------------------------------- learning recovers known weights
L0, L1 = "bert.encoder.layer.0", "bert.encoder.layer.1"
TEACHER = {L0: {"a": 0.8, "b": -0.3, "c": 0.5}, L1: {"a": 0.2, "b": 0.6, "c": -0.4}}


def teacher_weights():
    return {n: {"*": 0.0, f"{L0}.*": TEACHER[L0][n], f"{L1}.*": TEACHER[L1][n]} for n in NAMES}


def teacher_logits(model, inputs, weights, strategy="lora_delta_w_svd"):
    """The logits of the merge ``weights`` ({adapter: weight or per-module dict}), the model left without it."""
    model.average_adapter("teacher", weights, combine_strategy=strategy, normalize_weights=False)
    model.set_active_adapters("teacher")
    with torch.no_grad():
        out = model(**inputs).logits.detach()
    model.delete_adapter("teacher")
    model.set_active_adapters(None)
    return out


def mse_to(target):
    return lambda outputs, batch: ((outputs.logits - target) ** 2).mean()


@pytest.mark.parametrize("strategy", FACTORED_STRATEGIES)
def test_gradient_learning_recovers_per_layer_weights_and_merges_them(strategy):
    model = lora_model()
    inputs = batch(labels=False, rows=16)
    target = teacher_logits(model, inputs, teacher_weights())
    learned = learn_weights(model, list(NAMES), [inputs], strategy=strategy, granularity="layer",
                            objective=mse_to(target), budget=400, lr=0.03, init=0.1, adapter_name="learned",
                            progress=False)
    assert list(learned.table) == [L0, L1]
    for group, row in TEACHER.items():
        for name, value in row.items():
            assert learned.table[group][name] == pytest.approx(value, abs=0.02), (group, name)
    assert learned.best < 1e-3 * learned.history[0]
    assert learned.evaluations == len(learned.history) == 400
    # the merged adapter is the learned weights, merged by the engine: it reproduces the teacher
    model.set_active_adapters("learned")
    with torch.no_grad():
        got = model(**inputs).logits
    assert torch.allclose(got, target, atol=2e-3 * float(target.abs().max()))
    assert learned.report is not None and learned.report.combine_strategy == strategy
    weights = learned.weights["a"]
    assert weights["bert.encoder.layer.0.attention.self.query"] == learned.table[L0]["a"]
    assert weights["*"] == pytest.approx((learned.table[L0]["a"] + learned.table[L1]["a"]) / 2)
    assert learned.merged == pytest.approx(learned.best, rel=1e-3, abs=1e-6) and not learned.notes


def test_cma_recovers_per_adapter_weights_and_is_deterministic():
    model = lora_model(names=("a", "b"))
    inputs = batch(labels=False, rows=16)
    target = teacher_logits(model, inputs, {"a": 0.7, "b": -0.4})
    runs = [learn_weights(model, ["a", "b"], [inputs], method="cma", objective=mse_to(target), budget=250, seed=3,
                          progress=False) for _ in range(2)]
    assert runs[0].history == runs[1].history
    assert runs[0].table["*"]["a"] == pytest.approx(0.7, abs=0.03)
    assert runs[0].table["*"]["b"] == pytest.approx(-0.4, abs=0.03)
    other = learn_weights(model, ["a", "b"], [inputs], method="cma", objective=mse_to(target), budget=20, seed=4,
                          progress=False)
    assert other.history != runs[0].history[:20]


def test_cma_learns_through_any_strategy_and_adapter_type_by_merging_each_candidate():
    model = tiny_adapter_model("bert")
    for i, name in enumerate(("x", "y")):
        model.add_adapter(name, SeqBnConfig(reduction_factor=4))
        randomize_adapter(model, name, scale=0.5, seed=i + 7)
    model.add_classification_head("h", num_labels=4)
    inputs = batch(labels=False, rows=16)
    target = teacher_logits(model, inputs, {"x": 0.7, "y": 0.3}, strategy="linear")
    with pytest.raises(ValueError, match="method='cma'"):
        learn_weights(model, ["x", "y"], [inputs], strategy="lora_delta_w_svd", objective=mse_to(target))
    learned = learn_weights(model, ["x", "y"], [inputs], method="cma", strategy="linear", objective=mse_to(target),
                            budget=250, seed=1, progress=False, adapter_name="learned")
    assert learned.table["*"]["x"] == pytest.approx(0.7, abs=0.05)
    assert learned.table["*"]["y"] == pytest.approx(0.3, abs=0.05)
    assert "learned" in model.adapters_config


def test_cma_with_a_task_vector_strategy_improves_the_objective_and_keeps_no_candidate_warnings():
    model = lora_model()
    inputs = batch(rows=16)
    learned = learn_weights(model, list(NAMES), [inputs], method="cma", strategy="ties", budget=12, seed=0,
                            merge_options={"density": 0.5}, progress=False)
    assert learned.best <= learned.history[0]
    assert learned.evaluations == 12
    assert learned.notes == []  # the candidates' re-factorisation warnings are about other weights: not kept


# ----------------------------------------------------------------------------- PEFT models
def peft_model():
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                    intermediate_size=37, vocab_size=99, num_labels=4)).eval()
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"]), adapter_name="one")
    model.add_adapter("two", LoraConfig(r=3, lora_alpha=9, target_modules=["query", "value"]))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if "lora_" in key:
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))
    model.set_adapter("one")
    model.eval()
    return model


def test_peft_gradient_learning_recovers_the_weights_and_leaves_the_model_as_it_was():
    from adapter_merging.peft import add_weighted_adapter

    model = peft_model()
    inputs = {"input_ids": batch(labels=False, rows=16)["input_ids"]}
    add_weighted_adapter(model, ["one", "two"], [0.6, -0.5], "teacher", "lora_delta_w_svd")
    model.set_adapter("teacher")
    with torch.no_grad():
        target = model(**inputs).logits.detach()
    model.delete_adapter("teacher")
    model.set_adapter("one")
    before = state(model)
    learned = learn_weights(model, ["one", "two"], [inputs], objective=mse_to(target), budget=600, lr=0.1,
                            progress=False)
    assert learned.table["*"]["one"] == pytest.approx(0.6, abs=0.02)
    assert learned.table["*"]["two"] == pytest.approx(-0.5, abs=0.02)
    after = state(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert model.active_adapter == "one" and sorted(model.peft_config) == ["one", "two"]
    learn_weights(model, ["one", "two"], [inputs], objective=mse_to(target), budget=2, progress=False,
                  adapter_name="merged")
    assert "merged" in model.peft_config


# ----------------------------------------------------------------------------- the model is left as it was
def snapshot(model):
    return (state(model), sorted(model.adapters_config.adapters), str(model.active_adapters), model.training,
            [p.requires_grad for p in model.parameters()], torch.random.get_rng_state())


def assert_same(model, before):
    now = snapshot(model)
    assert now[0].keys() == before[0].keys() and all(torch.equal(now[0][k], before[0][k]) for k in before[0])
    assert now[1:5] == before[1:5]
    assert torch.equal(now[5], before[5])
    assert not any("parametriz" in type(m).__name__.lower() for m in model.modules())


@pytest.mark.parametrize("method", ["gradient", "cma"])
def test_a_run_leaves_the_model_its_active_adapters_grad_flags_mode_and_rng_as_they_were(method):
    model = lora_model()
    model.set_active_adapters("b")
    model.train_adapter("c")  # c trainable, training mode: both must come back
    before = snapshot(model)
    learn_weights(model, list(NAMES), [batch()], method=method, budget=4, progress=False)
    assert_same(model, before)


@pytest.mark.parametrize("budget, adapter_name, error", [
    (10, None, RuntimeError),  # the objective fails while learning
    (2, "new", KeyboardInterrupt),  # budget 2, then the merged adapter's scoring fails: it is removed again
])
def test_an_error_during_learning_or_scoring_leaves_the_model_as_it_was(budget, adapter_name, error):
    model = lora_model()
    before = snapshot(model)
    calls = []

    def failing(outputs, batch):
        calls.append(1)
        if len(calls) == 3:
            raise error("boom")
        return outputs.loss

    with pytest.raises(error):
        learn_weights(model, list(NAMES), [batch()], objective=failing, budget=budget, adapter_name=adapter_name,
                      progress=False)
    assert_same(model, before)


# ----------------------------------------------------------------------------- objectives, progress
def test_entropy_objective_learns_on_unlabelled_batches():
    model = lora_model()
    learned = learn_weights(model, list(NAMES), [batch(labels=False)], objective="entropy", budget=15, lr=0.1,
                            progress=False)
    assert learned.best < learned.history[0]
    assert learned.objective == "entropy"


def test_loss_objective_decreases_the_loss_of_labelled_batches():
    model = lora_model()
    learned = learn_weights(model, list(NAMES), [batch(0), batch(1)], budget=20, lr=0.1, progress=False)
    assert learned.best < learned.history[0]
    assert learned.summary().startswith("learned 1 x 3 weights (gradient, granularity adapter, objective loss)")


def test_l1_term_is_added_to_the_objective():
    model = lora_model()
    plain = learn_weights(model, list(NAMES), [batch()], budget=1, init=0.5, progress=False)
    with_l1 = learn_weights(model, list(NAMES), [batch()], budget=1, init=0.5, l1=0.2, progress=False)
    assert with_l1.history[0] == pytest.approx(plain.history[0] + 0.2 * 0.5, rel=1e-6)


def test_progress_callback_gets_each_step():
    model = lora_model()
    seen = []
    learn_weights(model, list(NAMES), [batch()], budget=5, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(i, 5) for i in range(1, 6)]


# ----------------------------------------------------------------------------- bad input: one clear error each
BAD = [
    (dict(adapters="a"), TypeError, "list of adapter names"),
    (dict(adapters=[]), ValueError, "empty"),
    (dict(adapters=["a", "a"]), ValueError, "Duplicate"),
    (dict(adapters=["a", "zz"]), ValueError, "Unknown adapter"),
    (dict(granularity="head"), ValueError, "granularity must be one of"),
    (dict(method="adam"), ValueError, "method must be one of"),
    (dict(objective="accuracy"), ValueError, "objective must be one of"),
    (dict(budget=0), ValueError, "budget must be a positive int"),
    (dict(budget=True), ValueError, "budget must be a positive int"),
    (dict(seed=-1), ValueError, "seed must be"),
    (dict(lr=0), ValueError, "lr must be"),
    (dict(l1=float("nan")), ValueError, "l1 must be"),
    (dict(init=[1.0]), ValueError, "one per adapter"),
    (dict(init={"a": 1.0}), ValueError, "init as a dict"),
    (dict(init=float("inf")), ValueError, "finite"),
    (dict(strategy="ties"), ValueError, "method='cma'"),
    (dict(strategy="linear"), ValueError, "method='cma'"),
    (dict(data=[]), ValueError, "no batch"),
    (dict(data=[[1, 2]]), TypeError, "dict of the model's forward"),
    (dict(data=[batch(labels=False)]), ValueError, "labels"),
    (dict(adapter_name="a"), ValueError, "already exists"),
    (dict(objective=lambda outputs, batch: outputs.logits), TypeError, "scalar tensor"),
    (dict(objective=lambda outputs, batch: torch.tensor(1.0)), ValueError, "does not depend on the weights"),
    (dict(objective=lambda outputs, batch: outputs.logits.sum() * float("nan")), ValueError, "nan at step 0"),
    (dict(progress="yes"), TypeError, "progress must be"),
]


@pytest.mark.parametrize("kwargs, error, message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_arguments_get_one_clear_error_and_leave_the_model_as_it_was(kwargs, error, message):
    model = lora_model()
    before = snapshot(model)
    call = dict(adapters=list(NAMES), data=[batch()], budget=2, progress=False)
    call.update(kwargs)
    adapters, data = call.pop("adapters"), call.pop("data")
    with pytest.raises(error, match=message):
        learn_weights(model, adapters, data, **call)
    assert_same(model, before)


def test_a_model_of_neither_library_is_refused():
    with pytest.raises(TypeError, match="neither an adapters model"):
        learn_weights(torch.nn.Linear(2, 2), ["a"], [batch()])


def test_cma_without_the_package_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cma", None)
    with pytest.raises(ImportError, match=r"adapter-merging\[learn\]"):
        learn_weights(lora_model(), list(NAMES), [batch()], method="cma")


def test_dropout_is_off_while_learning_even_for_a_model_in_training_mode():
    model = tiny_adapter_model("bert")
    for i, name in enumerate(("a", "b")):
        model.add_adapter(name, LoRAConfig(r=2, alpha=4, dropout=0.5))
        randomize_adapter(model, name, scale=0.5, seed=i + 1)
    model.add_classification_head("h", num_labels=4)
    runs = []
    for mode in ("train", "train", "eval"):
        getattr(model, mode)()
        runs.append(learn_weights(model, ["a", "b"], [batch()], budget=3, progress=False).history)
        assert model.training == (mode == "train")
    assert runs[0] == runs[1] == runs[2]


# ----------------------------------------------------------------------------- the factored forward is the merge, on other layouts
def session_matches_merge(model, front, names, inputs, forward_kwargs=None, seed=0):
    """A random per-module table: the session's forward equals the forward of the front end's merge
    (lora_delta_w_svd) with the same weights as per-module weights."""
    from adapter_merging.learn import _as_weights

    session = _Session(front, list(names), "module", factored=True)
    checkpoint_state = state(model)
    session.open("lora_delta_w_svd", {})
    try:
        table = torch.randn(len(session.group_names), len(names), generator=torch.Generator().manual_seed(seed))
        session.set(table)
        with torch.no_grad():
            got = model(**inputs).logits.double()
    finally:
        session.close()
    rows = {g: dict(zip(names, map(float, row))) for g, row in zip(session.group_names, table.tolist())}
    weights = _as_weights(list(names), rows, session.groups, "module")
    front.merge("check", list(names), weights, "lora_delta_w_svd", {})
    front.activate("check")
    front.model.eval()
    with torch.no_grad():
        want = model(**inputs).logits.double()
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    assert not torch.allclose(want, torch.zeros_like(want))
    assert set(checkpoint_state) <= set(state(model))


@pytest.mark.parametrize("arch", ["gpt2", "deberta", "t5"])
def test_factored_forward_equals_the_merge_on_fused_and_seq2seq_modules(arch):
    from conftest import model_inputs

    model = tiny_adapter_model(arch)
    model.add_adapter("a", LoRAConfig(r=2, alpha=4, attn_matrices=["q", "k", "v"]))
    model.add_adapter("b", LoRAConfig(r=3, alpha=9, attn_matrices=["q", "k", "v"]))
    for i, name in enumerate("ab"):
        randomize_adapter(model, name, scale=0.5, seed=i + 1)
    if arch == "t5":
        model.add_seq2seq_lm_head("h")
    else:
        model.add_classification_head("h", num_labels=4)
    session_matches_merge(model, _AdaptersFront(model), ["a", "b"], model_inputs(model))


def peft_pair(first, second, task_type=None):
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                    intermediate_size=37, vocab_size=99, num_labels=4)).eval()
    model = get_peft_model(base, LoraConfig(task_type=task_type, **first), adapter_name="one")
    model.add_adapter("two", LoraConfig(task_type=task_type, **second))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if "lora_" in key or "modules_to_save" in key:
                param.add_(0.5 * torch.randn(param.shape, generator=generator))
    model.set_adapter("one")
    model.eval()
    return model


PEFT_LAYOUTS = {
    "different targets": (dict(r=2, lora_alpha=4, target_modules=["query"]),
                          dict(r=3, lora_alpha=9, target_modules=["query", "value"])),
    "rank_pattern": (dict(r=2, lora_alpha=4, target_modules=["query", "value"], rank_pattern={"query": 4}),
                     dict(r=3, lora_alpha=9, target_modules=["query", "value"])),
    "embedding and rslora": (dict(r=2, lora_alpha=4, target_modules=["word_embeddings", "value"], use_rslora=True),
                             dict(r=3, lora_alpha=9, target_modules=["word_embeddings", "value"])),
}


@pytest.mark.parametrize("layout", list(PEFT_LAYOUTS))
def test_peft_factored_forward_equals_the_merge(layout):
    from adapter_merging.learn import _PeftFront

    model = peft_pair(*PEFT_LAYOUTS[layout])
    session_matches_merge(model, _PeftFront(model), ["one", "two"], {"input_ids": batch(labels=False)["input_ids"]})


def test_peft_modules_to_save_are_learned_as_the_merge_combines_them():
    """SEQ_CLS models save their classifier per adapter; the merge combines the copies with each adapter's
    weight, so learning must too: the merged adapter scores what the learning reported."""
    spec = dict(target_modules=["query", "value"], lora_dropout=0.3)
    model = peft_pair(dict(r=2, lora_alpha=4, **spec), dict(r=3, lora_alpha=9, **spec), task_type="SEQ_CLS")
    inputs = {"input_ids": batch(labels=False, rows=16)["input_ids"]}
    target = torch.randn(16, 4, generator=torch.Generator().manual_seed(3))
    learned = learn_weights(model, ["one", "two"], [inputs], objective=mse_to(target), budget=30, lr=0.1,
                            adapter_name="merged", progress=False)
    assert learned.merged == pytest.approx(learned.best, rel=1e-4)
    assert learned.notes == []  # not the internal concatenation's warning about its weights [1, 1]
    model.set_adapter("merged")  # the merged adapter's new dropout modules follow the model's eval mode
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, model(**inputs).logits)


# ----------------------------------------------------------------------------- what the attack found, one test each
def test_a_model_with_a_lora_merged_into_its_weights_is_refused():
    model = lora_model()
    model.merge_adapter("a")
    with pytest.raises(ValueError, match="reset_adapter"):
        learn_weights(model, list(NAMES), [batch()], budget=2, progress=False)
    peft = peft_pair(dict(r=2, lora_alpha=4, target_modules=["query"]), dict(r=2, lora_alpha=4, target_modules=["query"]))
    peft.merge_adapter()
    with pytest.raises(ValueError, match="unmerge_adapter"):
        learn_weights(peft, ["one", "two"], [{"input_ids": batch()["input_ids"]}], budget=2, progress=False)


def counting(objective="loss"):
    calls = []

    def count(outputs, batch):
        calls.append(1)
        return outputs.loss
    return count, calls


@pytest.mark.parametrize("options, message", [({"bogus": 1}, "unknown option"), ({"svd_rank": -1}, "svd_rank")])
def test_merge_options_are_checked_before_the_run(options, message):
    model = lora_model()
    objective, calls = counting()
    with pytest.raises((ValueError, TypeError), match=message):
        learn_weights(model, list(NAMES), [batch()], objective=objective, merge_options=options, adapter_name="m",
                      progress=False)
    assert calls == [] and "m" not in model.adapters_config


def test_a_merge_that_is_not_the_learned_update_says_so():
    model = lora_model()
    learned = learn_weights(model, list(NAMES), [batch()], budget=5, lr=0.1, adapter_name="m",
                            merge_options={"svd_rank": 1}, progress=False)
    assert learned.merged != pytest.approx(learned.best, rel=1e-3)
    assert any("svd_rank" in note for note in learned.notes)


def test_an_objective_that_bypasses_the_weights_is_refused():
    leak = torch.tensor(1.0, requires_grad=True)
    with pytest.raises(ValueError, match="no gradient reached them"):
        learn_weights(lora_model(), list(NAMES), [batch()], objective=lambda o, b: o.loss.detach() + 0 * leak,
                      budget=2, progress=False)


def test_gradient_learning_inside_inference_mode_says_why():
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        learn_weights(lora_model(), list(NAMES), [batch()], budget=2, progress=False)


def test_cma_leaves_numpy_random_state_as_it_was():
    import numpy

    model = lora_model()
    numpy.random.seed(123)
    expected = numpy.random.rand()
    numpy.random.seed(123)
    learn_weights(model, list(NAMES), [batch()], method="cma", budget=6, progress=False)
    assert numpy.random.rand() == expected


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="cma", init=5.0), "outside the box"),
    (dict(method="cma", seed=2**32), "seed must be an int in"),
])
def test_cma_specific_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        learn_weights(lora_model(), list(NAMES), [batch()], budget=2, progress=False, **kwargs)


def test_numpy_numbers_are_accepted_as_seed_budget_and_init():
    import numpy

    learned = learn_weights(lora_model(), list(NAMES), [batch()], budget=numpy.int64(2), seed=numpy.int64(1),
                            init=[numpy.float32(0.2)] * 3, method="cma", progress=False)
    assert learned.evaluations == 2


def test_a_tuple_output_and_a_failing_forward_get_messages_naming_the_cause():
    with pytest.raises(ValueError, match="returned a tuple"):
        learn_weights(lora_model(), list(NAMES), [{**batch(), "return_dict": False}], budget=2, progress=False)
    bad = {**batch(), "labels": torch.zeros(3, dtype=torch.long)}  # 8 rows, 3 labels
    with pytest.raises(Exception) as caught:
        learn_weights(lora_model(), list(NAMES), [batch(), bad], budget=2, progress=False)
    assert "batch 1 of data" in "".join(getattr(caught.value, "__notes__", []))


def test_layers_of_an_encoder_and_a_decoder_are_different_groups():
    from adapter_merging.learn import _group

    modules = ["encoder.block.0.layer.0.SelfAttention.q", "decoder.block.0.layer.0.SelfAttention.q",
               "encoder.block.10.layer.0.SelfAttention.q", "encoder.block.2.layer.1.DenseReluDense.wi", "prefix.pool"]
    groups = _group(modules, "layer")
    assert list(groups) == ["decoder.block.0", "encoder.block.0", "encoder.block.2", "encoder.block.10", "prefix.pool"]
    assert groups["encoder.block.2"] == ["encoder.block.2.layer.1.DenseReluDense.wi"]


def test_a_data_loader_does_not_move_the_callers_random_state():
    from torch.utils.data import DataLoader

    rows = [{"input_ids": row, "labels": label} for row, label in zip(batch()["input_ids"], batch()["labels"])]
    model = lora_model()
    model.active_head = "h"
    state_before = torch.random.get_rng_state()
    learn_weights(model, list(NAMES), DataLoader(rows, batch_size=4, shuffle=True), budget=2, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state_before)


# ----------------------------------------------------------------------------- what the second review found
def test_partial_modules_to_save_are_learned_as_the_merge_leaves_them():
    model = peft_pair(dict(r=2, lora_alpha=4, target_modules=["query"], modules_to_save=["classifier"]),
                      dict(r=3, lora_alpha=9, target_modules=["query"], modules_to_save=["classifier", "pooler"]))
    inputs = {"input_ids": batch(labels=False, rows=16)["input_ids"]}
    learned = learn_weights(model, ["one", "two"], [inputs], objective="entropy", budget=5, lr=0.1,
                            adapter_name="merged", progress=False)
    assert learned.merged == pytest.approx(learned.best, rel=1e-4) and learned.notes == []


def test_peft_dora_is_refused_as_unmergeable():
    model = peft_pair(dict(r=2, lora_alpha=4, target_modules=["query"], use_dora=True),
                      dict(r=2, lora_alpha=4, target_modules=["query"], use_dora=True))
    with pytest.raises(ValueError, match="cannot be merged at all"):
        learn_weights(model, ["one", "two"], [{"input_ids": batch()["input_ids"]}], objective="entropy", budget=2)


def test_a_peft_adapter_named_like_a_module_changes_no_other_module():
    model = peft_pair(dict(r=2, lora_alpha=4, target_modules=["query", "value"]),
                      dict(r=2, lora_alpha=4, target_modules=["query", "value"]))
    model.train()
    model.base_model.model.bert.encoder.eval()
    for key, param in model.named_parameters():
        param.requires_grad_("lora_" in key and ".one." in key)
    modes = {k: m.training for k, m in model.named_modules()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    learn_weights(model, ["one", "two"], [{"input_ids": batch()["input_ids"]}], objective="entropy", budget=2,
                  adapter_name="value", progress=False)
    assert {k: m.training for k, m in model.named_modules() if k in modes} == modes
    assert {k: p.requires_grad for k, p in model.named_parameters() if k in flags} == flags
    assert all(not p.requires_grad for k, p in model.named_parameters() if k not in flags)  # the new adapter: frozen


def test_notes_say_when_options_make_no_merge_and_when_the_objective_never_changes():
    model = lora_model()
    learned = learn_weights(model, list(NAMES), [batch()], budget=2, merge_options={"svd_rank": 1}, progress=False)
    assert any("no merge was made" in note for note in learned.notes)
    constant = learn_weights(model, list(NAMES), [batch()], method="cma", objective=lambda o, b: 2.0, budget=4,
                             progress=False)
    assert any("may not depend on the weights" in note for note in constant.notes)


def test_init_may_be_an_array():
    import numpy

    learned = learn_weights(lora_model(), list(NAMES), [batch()], budget=1, init=numpy.array([0.1, 0.2, 0.3]),
                            progress=False)
    assert learned.table["*"] == pytest.approx({"a": 0.1, "b": 0.2, "c": 0.3})
