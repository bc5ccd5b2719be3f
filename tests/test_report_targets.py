"""The report says what each rule's merge is measured against, and why a truncation of it loses."""
from __future__ import annotations

import pytest
from adapters import LoRAConfig

from conftest import randomize_adapter, tiny_adapter_model
from adapter_merging import average_adapter
from adapter_merging._warnings import MergeWarning


@pytest.fixture(scope="module")
def model():
    model = tiny_adapter_model("bert")
    for i, name in enumerate(("a", "b", "c")):
        model.add_adapter(name, config=LoRAConfig(r=4, alpha=8))
        randomize_adapter(model, name, seed=i)
    return model


@pytest.mark.parametrize("strategy, options, target", [
    ("lora_delta_w_svd", {}, "exact"),
    ("ties", {}, "the dense ties merge of the ΔWᵢ"),
    ("ties", {"space": "core"}, "the ties merge of the ΔWᵢ in core space"),
    ("dare_linear", {"space": "knots"}, "the dare_linear merge of the ΔWᵢ in knots space"),
    ("tsv", {}, "the tsv merge of the ΔWᵢ, computed from their factors"),
    ("iso_c", {}, "the iso_c merge of the ΔWᵢ, computed from their factors"),
    ("star", {}, "the star merge of the ΔWᵢ, computed from their factors"),
])
def test_the_report_names_each_rules_target(model, strategy, options, target):
    report = average_adapter(model, f"t_{strategy}_{len(options)}", ["a", "b", "c"], combine_strategy=strategy,
                             normalize_weights=False, **options)
    if target == "exact":
        assert "Σ" in report.target and "dense" not in report.target
    else:
        assert report.target == target


@pytest.mark.parametrize("strategy, options, cause", [
    ("ties", {}, "pruning and sign election make the dense merge high-rank"),
    ("tsv", {}, "the merged update has a higher rank than the one asked"),
    ("ties", {"space": "core"}, "the merge in its space has rank up to Σ rᵢ"),
])
def test_a_lossy_truncation_warns_with_the_rules_own_cause(model, strategy, options, cause):
    with pytest.warns(MergeWarning, match=cause):
        average_adapter(model, f"w_{strategy}_{len(options)}", ["a", "b", "c"], combine_strategy=strategy,
                        normalize_weights=False, svd_rank=1, **options)
