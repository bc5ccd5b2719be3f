"""Smoke run of the merge-quality benchmark (benchmarks/quality/) on 2 tasks at tiny sizes: real numbers
from the real model, data from the test extra's packages (vaderSentiment, nrclex), one learned row (two
gradient steps) and LoraHub's setting (tiny budgets), and the cost measurement in fresh processes. The README's test
command installs all of them (the model with --no-deps), so nothing here is skipped: a missing package
fails the run, as the notebook's test does."""
import pytest
import torch

from benchmarks.quality import evaluate, learned
from benchmarks.quality.data import balanced_split

SETTINGS = {"tasks": ["sentiment", "fear"], "per_class": 60, "seeds": [0], "steps": 12, "batch_size": 32,
            "lr": 5e-3, "lams": [0.5, 1.0], "sum_lams": None, "ties_lams": [1.0], "densities": [0.5],
            "negative_lams": [1.0],
            "learned": {"examples": 8, "draw_seed": 0, "grids": {learned.PER_LAYER: [{"init": 0.25, "budget": 2}]}},
            "lorahub": {"examples": 5, "draw_seed": 100, "l1": 0.05, "configs": {"cma": {"budget": 3},
                                                                                 "gradient": {"budget": 2}}},
            "cost": False}
ONLY = ["simple average", "lora_delta_w_concat", "ties (core)"]
LEARNED = [learned.PER_LAYER, learned.PER_LAYER_VALIDATION]  # the second reuses the first's settings


def test_balanced_split_is_balanced_disjoint_and_seeded():
    positive, negative = [f"p{i}" for i in range(50)] + ["both"], [f"n{i}" for i in range(30)] + ["both"]
    train, validation, test = balanced_split(positive, negative, per_class=20, seed=3, validation_share=0.25,
                                             test_share=0.25)
    assert [len(s) for s in (train, validation, test)] == [20, 10, 10]
    assert all(sum(label for _, label in s) * 2 == len(s) for s in (train, validation, test))
    texts = [t for s in (train, validation, test) for t, _ in s]
    assert len(set(texts)) == 40 and "both" not in texts
    assert balanced_split(positive, negative, 20, 3, 0.25, 0.25) == (train, validation, test)


@pytest.fixture(scope="module")
def smoke():
    from benchmarks.quality.run import run

    return run(settings=SETTINGS, only=ONLY + LEARNED)


def test_individual_adapters_beat_the_bare_model(smoke):
    rows = smoke["seeds"][0]["rows"]
    assert rows["individual"]["test"]["sentiment"] > rows["pre-trained"]["test"]["sentiment"] + 0.05, rows
    table = smoke["summary"]["table"]
    assert table["individual"]["normalised"] == (1.0, 0.0)
    assert set(table) == {"pre-trained", "individual", "task arithmetic", *ONLY, *LEARNED}
    assert table["lora_delta_w_concat"]["configs"] == table["task arithmetic"]["configs"]  # its λ
    # the same update, two factorisations: the same accuracies
    assert table["lora_delta_w_concat"]["per_task"] == table["task arithmetic"]["per_task"]
    assert all(table[k]["merge_s"] > 0 for k in ONLY)


def test_exact_single_adapter_merge_has_normalised_accuracy_one(smoke):
    from benchmarks.quality.data import load_tasks
    from benchmarks.quality.train import encode, load_model, train_adapter, Recipe

    tasks = load_tasks(["sentiment"], per_class=40)
    model, tokenizer = load_model()
    data = {"sentiment": {s: encode(tokenizer, getattr(tasks["sentiment"], s)) for s in ("train", "test")}}
    train_adapter(model, "sentiment", data["sentiment"]["train"], seed=0, recipe=Recipe(steps=3, batch_size=16))
    individual = evaluate.scores(model, "sentiment", data, "test")
    evaluate.merge(model, {"sentiment": 1.0}, evaluate.Variant("exact", "lora_delta_w_svd"), {})
    merged = evaluate.scores(model, evaluate.MERGED, data, "test")
    assert evaluate.normalised(merged, individual) == {"sentiment": 1.0}


def test_negation_drives_the_target_down_and_renders(smoke):
    from benchmarks.quality.report import lines

    sentiment = smoke["seeds"][0]["negation"]["sentiment"]
    assert sentiment["lam"] == 1.0
    assert sentiment["target_with"] < sentiment["target_without"] - 0.1, sentiment
    text = "\n".join(lines(smoke))
    assert "| **pre-trained** | 9" in text or "| **pre-trained** |" in text
    assert "**Negation**" in text and "| sentiment |" in text


def test_publish_is_allowed_for_the_quality_section_alone():
    from benchmarks.run import parse_args

    assert parse_args(["--only", "quality", "--publish"]).publish
    with pytest.raises(SystemExit):
        parse_args(["--only", "quality,import", "--publish"])
    with pytest.raises(SystemExit):
        parse_args(["--only", "quality", "--publish", "--quick"])


def test_learned_row_is_in_the_table_with_its_learning_time_and_gap_to_task_arithmetic(smoke):
    table, seed = smoke["summary"]["table"], smoke["seeds"][0]["rows"]
    for label in LEARNED:
        row = table[label]
        assert row["status"] == "ok" and row["configs"] == [{"init": 0.25, "budget": 2}], row
        assert 0 < row["merge_s"] < 120 and 0.5 < row["normalised"][0] < 1.5, row
        assert seed[label]["learned"]["evaluations"] == 2
        lams = seed[label]["learned"]["lams"]["table"]  # one λ per layer and adapter
        assert list(lams) == [f"bert.encoder.layer.{i}" for i in range(6)] and all(len(v) == 2 for v in lams.values())
    target = smoke["summary"]["learned_targets"][learned.PER_LAYER]
    gap = table[learned.PER_LAYER]["normalised"][0] - table["task arithmetic"]["normalised"][0]
    assert target["gaps"] == [pytest.approx(gap)] and target["met"] == (gap >= 0.03)


def test_learned_examples_are_one_fixed_batch_per_task_from_the_split():
    data = {t: {"train": (torch.arange(40 * 5).reshape(40, 5), torch.ones(40, 5, dtype=torch.long),
                          torch.arange(40) % 2)} for t in ("a", "b")}
    data["a"]["train"][1][:, 3:] = 0  # every row of task a is 3 tokens long
    batches = learned.draw(data, ["a", "b"], "train", 8, seed=0)
    assert [b["head"] for b in batches] == ["a", "b"] and [len(b["labels"]) for b in batches] == [8, 8]
    assert batches[0]["input_ids"].shape == (8, 3) and batches[1]["input_ids"].shape == (8, 5)
    again = learned.draw(data, ["a", "b"], "train", 8, seed=0, labels=False)
    assert torch.equal(again[0]["input_ids"], batches[0]["input_ids"]) and "labels" not in again[0]
    rows = batches[0]["input_ids"][:, 0] // 5
    assert len(set(rows.tolist())) == 8 and torch.equal(batches[0]["labels"], rows % 2)


def test_lorahub_setting_scores_every_row_on_the_unseen_task(smoke):
    seed = smoke["seeds"][0]
    for task, row in seed["lorahub"].items():
        test = row["test"]
        assert set(test) == set(learned.HUB_ROWS) and all(0 <= v <= 1 for v in test.values()), row
        assert row["chosen"] != task and row["oracle"] != task
        assert test[learned.ORACLE] >= test[learned.SINGLE]
        assert test[learned.BARE] == seed["rows"]["pre-trained"]["test"][task]  # the same model and head
        assert test[learned.OWN] == seed["rows"]["individual"]["test"][task]
        # a pool of one adapter: the uniform merge at λ = 1 is that adapter
        assert test[learned.UNIFORM] == test[learned.SINGLE]
    hub = smoke["summary"]["lorahub"]
    assert set(hub["table"]) == set(learned.HUB_ROWS) and hub["cases"] == 2
    assert all(s > 0 for s in hub["seconds"].values())


def test_learned_sections_render(smoke):
    from benchmarks.quality.report import lines

    text = "\n".join(lines(smoke))
    assert f"| *{learned.PER_LAYER}* |" in text and "**Targets** (issue 20)" in text
    assert "**LoraHub's setting**" in text and f"| *{learned.HUB_CMA}* |" in text


def test_cost_compares_learning_with_a_training_step_in_fresh_processes():
    from benchmarks.quality import cost

    measured = cost.measure({"budget": 2}, ["sentiment", "fear"], threads=1, examples=4, per_class=20)
    learn, step = measured["learn"], measured["step"]
    assert learn["evaluations"] == 2 and learn["tasks"] == 2 and step["trained_parameters"] > 0
    for run in (learn, step):
        assert 100 < run["peak_loaded_mib"] <= run["peak_mib"] < 8000 and run["seconds"] > 0
    assert measured["peak_ratio"] == pytest.approx(learn["peak_mib"] / step["peak_mib"])


def test_target_gap_is_per_seed_normalised_learned_minus_task_arithmetic():
    def seed(learned_acc, ta_acc):
        return {"rows": {"individual": {"status": "ok", "test": {"a": 0.8, "b": 0.5}},
                         "task arithmetic": {"status": "ok", "test": ta_acc},
                         learned.PER_LAYER: {"status": "ok", "test": learned_acc}}}

    # seed 1: (0.88/0.8 + 0.5/0.5)/2 − (0.8/0.8 + 0.45/0.5)/2 = 1.05 − 0.95 = +0.10; seed 2: 1.0 − 1.0 = 0
    out = learned.targets([seed({"a": 0.88, "b": 0.5}, {"a": 0.8, "b": 0.45}), seed({"a": 0.8, "b": 0.5},
                                                                                    {"a": 0.8, "b": 0.5})])
    target = out[learned.PER_LAYER]
    assert target["gaps"] == [pytest.approx(0.10), pytest.approx(0.0)]
    assert target["gap"] == (pytest.approx(0.05), pytest.approx(0.0707107, rel=1e-5))
    assert target["met"] is True and target["target"] == 0.03 and learned.ENTROPY not in out
