"""What a hostile user found in the front ends (files, command line, YAML, PEFT): each finding's fix, checked.

Tiny adapters as tests/test_files.py and tests/test_cli_usage.py build them; the command line runs as
``python -m adapter_merging`` in a fresh interpreter. Refusals before any merge import no torch, so they are fast.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from adapters import LoRAConfig

from adapter_merging._warnings import MergeWarning
from adapter_merging.cli import for_the_shell
from adapter_merging.files import InputError, merge_saved_adapters
from adapter_merging.mergekit import ConfigError, plan_from_config
from conftest import randomize_adapter, tiny_adapter_model
from test_cli_usage import one_line, shell



def hashes(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two LoRA adapters with prediction heads (adapters format), and the same without heads."""
    base = tmp_path_factory.mktemp("attack")
    model = tiny_adapter_model("bert")
    for i, name in enumerate(("a", "b")):
        model.add_adapter(name, config=LoRAConfig(r=2 + i, alpha=4 + 4 * i))
        model.add_classification_head(name, num_labels=2)
        randomize_adapter(model, name, seed=20 + i)
        model.save_adapter(str(base / name), name, with_head=False)
        model.save_adapter(str(base / f"head_{name}"), name)
    return base


@pytest.fixture
def work(saved, tmp_path, monkeypatch):
    for name in ("a", "b", "head_a", "head_b"):
        shutil.copytree(saved / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --- 1. --report never writes into an input -----------------------------------------------------------

@pytest.mark.parametrize("report, setup", [
    ("a/pytorch_adapter.bin", None),
    ("a/adapter_config.json", None),
    ("link.json", lambda: os.symlink("a/pytorch_adapter.bin", "link.json")),
    ("linked/new.json", lambda: os.symlink("a", "linked")),
    ("a", None),
    ("out/other.json", None),
    ("recipe.yaml", None),
])
def test_report_path_into_an_input_or_the_output_is_refused_before_anything_is_written(work, report, setup):
    (work / "recipe.yaml").write_text("models:\n  - model: a\n    parameters: {weight: 1.0}\n"
                                      "  - model: b\n    parameters: {weight: 1.0}\nmerge_method: linear\n")
    if setup:
        setup()
    before = {name: hashes(work / name) for name in ("a", "b")}
    yaml_before = (work / "recipe.yaml").read_text()
    args = ["recipe.yaml", "out"] if report == "recipe.yaml" else ["a", "b", "-o", "out"]
    result = shell(*args, "-q", "--report", report, cwd=work)
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert f"--report {report}" in line and ("input" in line or "folder" in line), line
    assert {name: hashes(work / name) for name in ("a", "b")} == before
    assert (work / "recipe.yaml").read_text() == yaml_before
    assert not (work / "out").exists()


def test_report_as_the_outputs_own_merge_report_is_a_no_op(work):
    result = shell("a", "b", "-o", "out", "-q", "--report", "out/merge_report.json", cwd=work)
    assert result.returncode == 0, result.stderr
    assert json.loads((work / "out" / "merge_report.json").read_text())["schema"] == 1


def test_report_replaces_a_hard_link_instead_of_writing_through_it(work):
    before = hashes(work / "a")
    os.link(work / "a" / "pytorch_adapter.bin", work / "hard.json")
    result = shell("a", "b", "-o", "out", "-q", "--report", "hard.json", cwd=work)
    assert result.returncode == 0, result.stderr
    assert hashes(work / "a") == before
    assert json.loads((work / "hard.json").read_text()) == json.loads((work / "out" / "merge_report.json").read_text())


# --- 2. heads are full weights: Σ λᵢ ≠ 1 is said ------------------------------------------------------

def test_heads_merged_with_weights_not_summing_to_one_warn_and_note(work):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = merge_saved_adapters({"head_a": 1.0, "head_b": -1.0}, "out", normalize_weights=False,
                                      combine_strategy="lora_delta_w_concat")
    said = [str(w.message) for w in caught if issubclass(w.category, MergeWarning) and "full weights" in str(w.message)]
    assert len(said) == 1 and "summing to 0" in said[0] and "prediction heads" in said[0]
    assert said[0] in report.notes
    assert "weights summing to 1" in said[0] and "leave them out" in said[0]
    with warnings.catch_warnings(record=True) as caught:  # normalised weights: a head, nothing to say
        warnings.simplefilter("always")
        report = merge_saved_adapters({"head_a": 1.0, "head_b": 3.0}, "out2", combine_strategy="lora_delta_w_concat")
    assert not [w for w in caught if "full weights" in str(w.message)]
    assert not [n for n in report.notes if "full weights" in n]


def test_the_command_line_shows_the_head_warning(work):
    result = shell("head_a:1", "head_b:1", "--no-normalize", "-o", "out", cwd=work)
    assert result.returncode == 0, result.stderr
    assert "adapter-merge: warning: The prediction heads were merged as Σ λᵢ Wᵢ with weights summing to 2" in result.stderr


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(6, 5)
        self.head = torch.nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.proj(x))


def peft_model():
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(Tiny(), LoraConfig(r=2, lora_alpha=4, target_modules=["proj"], modules_to_save=["head"]),
                               adapter_name="x")
        model.add_adapter("y", LoraConfig(r=2, lora_alpha=4, target_modules=["proj"], modules_to_save=["head"]))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if "lora_" in key or "modules_to_save" in key:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    return model


def test_peft_modules_to_save_with_weights_not_summing_to_one_warn_and_note():
    pytest.importorskip("peft")
    from adapter_merging.peft import add_weighted_adapter

    model = peft_model()
    with pytest.warns(MergeWarning, match=r"modules_to_save were merged as Σ λᵢ Wᵢ with weights summing to 0"):
        report = add_weighted_adapter(model, ["x", "y"], [1.0, -1.0], "unlearned")
    assert any("modules_to_save were merged" in note for note in report.notes)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MergeWarning)
        report = add_weighted_adapter(model, ["x", "y"], [0.5, 0.5], "average")
    assert not [n for n in report.notes if "full weights" in n]


# --- 3. PEFT booleans must be booleans ------------------------------------------------------------------

@pytest.fixture(scope="module")
def peft_pair(tmp_path_factory):
    pytest.importorskip("peft")
    base = tmp_path_factory.mktemp("attack_peft")
    model = peft_model()
    model.save_pretrained(str(base), selected_adapters=["x", "y"])
    return base / "x" if (base / "x").is_dir() else base, base / "y"


@pytest.mark.parametrize("key, value", [("use_dora", "false"), ("use_dora", 1), ("lora_bias", "false"),
                                        ("fan_in_fan_out", "no"), ("use_rslora", "true")])
def test_peft_boolean_keys_that_are_not_booleans_are_refused_in_one_line(peft_pair, tmp_path, key, value):
    first, second = peft_pair
    shutil.copytree(first, tmp_path / "x")
    config = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    config[key] = value
    (tmp_path / "x" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(InputError) as error:
        merge_saved_adapters([tmp_path / "x", second], tmp_path / "out")
    message = str(error.value)
    assert f"'{key}' is {json.dumps(value)}, but must be true or false" in message and "\n" not in message
    assert "adapter_config.json" in message


def test_peft_false_booleans_merge(peft_pair, tmp_path):
    first, second = peft_pair
    shutil.copytree(first, tmp_path / "x")
    config = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    config.update(use_dora=False, lora_bias=False, fan_in_fan_out=False)
    (tmp_path / "x" / "adapter_config.json").write_text(json.dumps(config))
    merge_saved_adapters([tmp_path / "x", second], tmp_path / "out", combine_strategy="lora_delta_w_svd", progress=False)


# --- 4. the YAML's numbers: the file and the key, never a flag ---------------------------------------------

def models(first: str = "weight: 1.0", method: str = "ties", parameters: str = "") -> str:
    text = (f"models:\n  - model: a\n    parameters: {{{first}}}\n  - model: b\n    parameters: {{weight: 1.0}}\n"
            f"merge_method: {method}\n")
    return text + (f"parameters: {{{parameters}}}\n" if parameters else "")


@pytest.mark.parametrize("text, expected", [
    (models("weight: 1.0, density: 2"), "recipe.yaml: models[0].parameters.density must be a finite number in (0, 1], got 2."),
    (models("weight: 1.0, gamma: 1", "breadcrumbs"), "recipe.yaml: models[0].parameters.gamma must be a finite number in [0, 1), got 1."),
    (models(parameters='svd_rank: "four"'), "recipe.yaml: parameters.svd_rank must be a positive integer, got 'four' (a string)."),
    (models(parameters="svd_rank: 0"), "recipe.yaml: parameters.svd_rank must be a positive integer, got 0."),
    (models(method="dare_ties", parameters="seed: 1.5"), "recipe.yaml: parameters.seed must be an integer, got 1.5."),
    (models(parameters="svd_tol: 2"), "recipe.yaml: parameters.svd_tol must be a finite number in (0, 1), got 2."),
    (models(parameters="majority_sign_method: sum"), "recipe.yaml: parameters.majority_sign_method must be one of total, frequency, got 'sum'."),
    (models("weight: 1e-3", "task_arithmetic"),
     "recipe.yaml: models[0].parameters.weight must be a finite number, got '1e-3' (a string: YAML reads 1e-3 as text; write 1.0e-3)."),
])
def test_yaml_number_errors_name_the_file_and_the_key(text, expected):
    import yaml

    with pytest.raises(ConfigError) as error:
        plan_from_config(yaml.safe_load(text), "recipe.yaml")
    assert str(error.value) == expected


def test_yaml_errors_on_the_command_line_keep_the_keys_names(work):
    (work / "recipe.yaml").write_text(models(parameters='svd_rank: "four"'))
    result = shell("recipe.yaml", "out", cwd=work)
    assert result.returncode == 1
    assert one_line(result.stderr) == ("adapter-merge: error: recipe.yaml: parameters.svd_rank must be a positive "
                                       "integer, got 'four' (a string).")


# --- 5. global-only keys under a model are refused ---------------------------------------------------------

@pytest.mark.parametrize("key", ["normalize: false", "lambda: 2", "rescale: true", "int8_mask: true"])
def test_yaml_global_only_parameters_under_a_model_are_refused(key):
    import yaml

    with pytest.raises(ConfigError) as error:
        plan_from_config(yaml.safe_load(models(f"weight: 1.0, {key}", "task_arithmetic")), "recipe.yaml")
    name = key.split(":")[0]
    assert str(error.value).startswith(f"recipe.yaml: models[0].parameters.{name}: a global parameter of task_arithmetic")
    assert "move it there" in str(error.value)


def test_yaml_global_normalize_is_still_read():
    import yaml

    plan = plan_from_config(yaml.safe_load(models(method="task_arithmetic", parameters="normalize: true")), "r.yaml")
    assert "normalize: true (as the YAML says)." in plan["notes"]


# --- 6. messages name what the user chose ---------------------------------------------------------------------

def test_an_option_the_default_strategy_lacks_is_said_of_the_default(work):
    result = shell("a", "b", "-o", "out", "--density", "0.5", cwd=work)
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert "for the default --strategy linear (lora_delta_w_svd for these adapters)" in line, line
    assert "'--density' is an option of ties" in line and "lora_delta_w_svd." not in line.split("for")[0]


def test_peft_option_errors_say_combination_type():
    pytest.importorskip("peft")
    from adapter_merging.peft import add_weighted_adapter

    model = peft_model()
    with pytest.raises(TypeError) as error:
        add_weighted_adapter(model, ["x", "y"], [1.0, 1.0], "m", majority_sign_method=5)
    message = str(error.value)
    assert "combination_type=None (PEFT's default for LORA: adapter_merging's lora_delta_w_svd)" in message
    assert "combine_strategy" not in message
    with pytest.raises(TypeError, match=r"for combination_type='svd' \(adapter_merging's lora_delta_w_svd\)"):
        add_weighted_adapter(model, ["x", "y"], [1.0, 1.0], "m", "svd", density=0.5)


def test_command_line_warnings_are_in_the_shells_words(work):
    result = shell("a", "b", "-o", "out", "-s", "lora_delta_w_concat", "--svd-rank", "4", cwd=work)
    assert result.returncode == 0, result.stderr
    assert "adapter-merge: warning: --svd-rank 4 has no effect with --strategy lora_delta_w_concat" in result.stderr
    assert "svd_rank" not in result.stderr and "combine_strategy" not in result.stderr


# --- 7. the output overlaps an input: said first; a broken union config: one clear line --------------------

def test_output_named_through_dotdot_reports_the_overlap(work):
    (work / "d").mkdir()
    for name in ("a", "b"):
        shutil.copytree(work / name, work / "d" / name)
    with pytest.raises(InputError, match=r"The output d/a/\.\. contains the input d/a"):
        merge_saved_adapters(["d/a", "d/b"], "d/a/..", overwrite_ok=True)


def test_adapters_union_config_without_members_is_one_clear_line(work):
    config = json.loads((work / "a" / "adapter_config.json").read_text())
    config["config"]["architecture"] = "union"
    (work / "a" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(InputError) as error:
        merge_saved_adapters(["a", "b"], "out")
    message = str(error.value)
    assert "'config' lacks the key 'configs'" in message and "'architecture': 'union'" in message
    assert "('configs')" not in message and "\n" not in message


# --- 8. cosmetics ------------------------------------------------------------------------------------------------

def test_model_card_says_an_adapters_format_adapter(work):
    merge_saved_adapters(["a", "b"], "out", combine_strategy="lora_delta_w_svd", progress=False)
    card = (work / "out" / "README.md").read_text()
    assert "An adapters-format adapter merged from 2 saved adapters" in card


@pytest.mark.parametrize("message, expected", [
    ("pass another name=.", "pass another --name."),
    ("use svd_rank=4.", "use --svd-rank 4."),
    ("svd_tol=0.05, or", "--svd-tol 0.05, or"),
    ("Unknown option(s) ['density', 'seed'].", "Unknown option(s) ['--density', '--seed']."),
])
def test_shell_words_keep_punctuation_after_a_parameter(message, expected):
    assert for_the_shell(message) == expected


def test_bad_name_error_on_the_command_line(work):
    result = shell("a", "b", "-o", "out", "--name", "x.y", cwd=work)
    assert result.returncode == 1
    assert one_line(result.stderr).endswith("got 'x.y': pass another --name.")


# --- the LoRA-native strategies' errors, said in the words of where they were given ------------------

def test_option_lists_and_validation_messages_name_flags_on_the_command_line():
    assert for_the_shell("Unknown option(s) ['density'] for --strategy star. Its options are: eta, svd_rank, "
                         "svd_tol.") == ("Unknown option(s) ['--density'] for --strategy star. Its options are: "
                                         "--eta, --svd-rank, --svd-tol.")
    assert for_the_shell("eta must lie in (0, 100], got 0.") == "--eta must lie in (0, 100], got 0."


def test_a_yaml_merges_errors_name_the_file_and_its_keys_not_flags(work):
    (work / "iso.yaml").write_text("merge_method: iso_cts\nparameters: {common_fraction: 0}\nmodels:\n"
                                   "  - {model: a, parameters: {weight: 1.0}}\n  - {model: b, parameters: {weight: 1.0}}\n")
    line = one_line(shell("iso.yaml", "out", "-q", cwd=work).stderr)
    assert line.startswith("adapter-merge: error: iso.yaml: common_fraction must") and "--" not in line
    assert not (work / "out").exists()


def test_a_yaml_option_of_our_strategy_under_a_model_is_said_to_be_global():
    config = {"merge_method": "star", "models": [{"model": "a", "parameters": {"weight": 1.0, "eta": 50}},
                                                 {"model": "b", "parameters": {"weight": 1.0}}]}
    with pytest.raises(ConfigError, match=r"models\[0\]\.parameters\.eta: a global parameter of star.*move it there"):
        plan_from_config(config, "star.yaml")
    config["models"][0]["parameters"] = {"weight": 1.0, "density": 0.5}  # star takes no density
    with pytest.raises(ConfigError, match=r"models\[0\]\.parameters\.density \(not a parameter of star: it has "
                                          r"weight, normalize\)"):
        plan_from_config(config, "star.yaml")
