"""The README's main job, ``python -m adapter_merging.demo``, runs and tells its story."""
from __future__ import annotations

import re



def test_demo_runs_and_the_exact_merges_are_exact(capsys):
    from adapter_merging import demo

    demo.main()
    out = capsys.readouterr().out
    errors = {name: float(value) for name, value in re.findall(r"^\s+(\w+)\s+task_a: .* max ΔW error ([\d.]+)", out, re.M)}
    assert errors["lora_delta_w_concat"] == 0.0 and errors["unlearned_from_files"] == 0.0
    assert errors["linear"] > 0.5, "linear's cross-terms show in the report"
    assert "warning: combine_strategy='linear'" in out
    concat = re.search(r"^\s+lora_delta_w_concat\s+(task_a: [\d.]+\s+task_b: [\d.]+)", out.split("Unlearning")[1], re.M)[1]
    from_files = re.search(r"^\s+unlearned_from_files\s+(task_a: [\d.]+\s+task_b: [\d.]+)", out, re.M)[1]
    assert concat == from_files, "the merge from saved folders is the in-model merge"
    task_b = float(re.search(r"task_b: ([\d.]+)", concat)[1])
    assert task_b < 0.55, "unlearning task_b brings it to chance"
