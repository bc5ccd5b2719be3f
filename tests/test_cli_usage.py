"""The ``adapter-merge`` command line as a shell user meets it: a fast ``--help``, a package import that
pulls in no ``adapters``/``transformers``, one-line errors in the shell's words, mergekit's calling
form, and ``linear`` (the default) as the exact weighted sum of LoRA updates."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import get_args

import pytest
import torch
from adapters import LoRAConfig

from adapter_merging import cli
from adapter_merging.strategy_names import SIGN_METHOD_NAMES, STRATEGY_NAMES, CombineStrategy
from conftest import randomize_adapter, tiny_adapter_model

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "adapters", "transformers")


def python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def shell(*args, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m adapter_merging ARGS`` in a fresh interpreter, as a user runs it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "adapter_merging", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("adapter-merge: error: "), stderr
    return lines[0]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two saved LoRA adapters of different rank (adapters format)."""
    base = tmp_path_factory.mktemp("cli_usage")
    model = tiny_adapter_model("bert")
    for i, name in enumerate(("a", "b")):
        model.add_adapter(name, config=LoRAConfig(r=2 + i, alpha=4 + 4 * i))
        randomize_adapter(model, name, seed=10 + i)
        model.save_adapter(str(base / name), name, with_head=False)
    return base


@pytest.fixture
def work(folders, tmp_path, monkeypatch):
    for name in ("a", "b"):
        shutil.copytree(folders / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    showwarning = cli.warnings.showwarning
    yield tmp_path
    cli.warnings.showwarning = showwarning  # main() sets it for the process


def delta_w(folder: Path) -> dict:
    """module → the LoRA update s·B·A stored in an adapters-format folder (s = alpha / r)."""
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))["config"]
    state = torch.load(folder / "pytorch_adapter.bin", weights_only=True)
    scaling = config["alpha"] / config["r"]
    return {key[: -len(".lora_A")].rsplit(".", 1)[0]: scaling * state[key[:-1] + "B"].double() @ value.double()
            for key, value in state.items() if key.endswith(".lora_A")}


# --- item 20: a fast --help and a light import --------------------------------------------------------

def test_import_adapter_merging_loads_no_adapters_transformers_or_torch(tmp_path):
    result = python("""
        import sys, adapter_merging
        print(sorted(m for m in ("torch", "adapters", "transformers") if m in sys.modules))
        print(adapter_merging.__version__, len(adapter_merging.__all__))
        """, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "[]"


def test_names_import_their_modules_on_first_use(tmp_path):
    result = python("""
        import sys, adapter_merging
        from adapter_merging import merge_saved_adapters, STRATEGIES
        print(merge_saved_adapters.__module__, len(STRATEGIES), "adapters" in sys.modules)
        print(adapter_merging.init.__module__, "init" in dir(adapter_merging))
        try:
            adapter_merging.nonsense
        except AttributeError as error:
            print(error)
        """, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"adapter_merging.files {len(STRATEGY_NAMES)} True",
        "adapter_merging.model_mixin True",
        "module 'adapter_merging' has no attribute 'nonsense'",
    ]


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version_import_no_torch(tmp_path, flag):
    result = python(f"""
        import sys
        from adapter_merging.cli import main
        try:
            main([{flag!r}])
        except SystemExit as exit:
            print("exit", exit.code)
        print(sorted(m for m in {HEAVY!r} if m in sys.modules))
        """, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-2:] == ["exit 0", "[]"]
    assert ("adapter-merge 0.1.0" in result.stdout) == (flag == "--version")


def test_strategy_names_without_torch_equal_the_registry():
    from adapter_merging.ops.task_vectors import SIGN_METHODS
    from adapter_merging.strategies import STRATEGIES

    assert STRATEGY_NAMES == tuple(STRATEGIES) == get_args(CombineStrategy)
    assert SIGN_METHOD_NAMES == SIGN_METHODS
    strategy_action = next(a for a in cli.build_parser()._actions if a.dest == "strategy")
    assert all(strategy_action.type(name) == name for name in STRATEGIES)


def test_import_benchmark_section_checks_what_each_case_loads():
    sys.path.insert(0, str(ROOT))
    from benchmarks import import_time, report, run

    assert run.SECTIONS["import"] == ("import_time", "run", None)
    assert import_time.loaded(import_time.CASES["adapter-merge --help"]) == []
    assert import_time.loaded(import_time.CASES["import adapter_merging"]) == []
    result = {"setup": {"repeats": 5, "target_help_s": 0.5}, "help_target_met": True, "rows": [
        {"case": "adapter-merge --help", "median_s": 0.21, "min_s": 0.2, "max_s": 0.3, "loaded": []},
        {"case": "import torch", "median_s": 2.5, "min_s": 2.4, "max_s": 3.1, "loaded": ["torch"]}]}
    lines = report.import_section(result)
    assert "`adapter-merge --help` within 0.5 s: met." in lines[0]
    assert "| `adapter-merge --help` | 210 ms (200 ms–300 ms) | none |" in lines
    assert "| `import torch` | 2.50 s (2.40 s–3.10 s) | torch |" in lines


# --- item 17: usage errors, bad input and the shell's words ---------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["a", "b"], "pass --output OUT"),
    (["a", "b", "-o", "out", "--bogus"], "unrecognized arguments: --bogus"),
    (["a", "b", "-o", "out", "--svd-rank", "four"], "argument --svd-rank: invalid int value: 'four'"),
    (["a/:one", "b", "-o", "out"], "the weight of a/ is 'one': 'one' is not a number (DIR:WEIGHT, e.g. a/:0.5)"),
    (["a:1", "b:", "-o", "out"], "the weight of b is '': '' is not a number"),
    (["a", "b", "-o", "out", "-s", "svd"], "invalid choice 'svd': did you mean lora_delta_w_svd? ('svd' is PEFT's name"),
    (["a", "b", "-o", "out", "-s", "cat"], "invalid choice 'cat': did you mean lora_delta_w_concat?"),
    (["a", "b", "-o", "out", "-s", "dare_ties_svd"], "did you mean dare_ties? ('dare_ties_svd' is PEFT's name for it, "
                                                     "with --svd-rank N)"),
    (["a", "b", "-o", "out", "-s", "tie"], "invalid choice 'tie': did you mean ties?"),
    (["a", "b", "-o", "out", "-s", "nope"], "invalid choice 'nope': choose from linear, lora_linear_only_negate_b"),
    (["r.yaml", "out", "extra"], "a YAML config takes one more argument at most, the output folder"),
    (["r.yaml", "out", "-o", "other"], "two output folders, out and --output other: give one"),
    (["r.yaml", "out", "-s", "ties"], "--strategy does not apply to a YAML config"),
])
def test_usage_errors_are_one_line_then_see_help_exit_2(tmp_path, args, message):
    result = shell(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    line = one_line(result.stderr)
    assert message in line and line.endswith("(see adapter-merge --help)"), line
    assert "usage:" not in result.stderr and not list(tmp_path.iterdir())


def test_a_colon_inside_an_existing_path_is_part_of_it(work):
    os.rename(work / "a", work / "a:one")
    assert cli.parse_input("a:one") == ("a:one", None)
    assert cli.parse_input("a:one:-0.5") == ("a:one", -0.5)
    assert cli.parse_input("x:y/z") == ("x:y/z", None)  # a path separator after the colon: a path
    with pytest.raises(cli.UsageError, match="'one' is not a number"):
        cli.parse_input("b:one")


def test_device_without_cuda_is_one_line_exit_1(work, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["a", "b", "-o", "out", "--device", "cuda"]) == 1
    line = one_line(capsys.readouterr().err)
    assert "--device cuda: no cuda device is available on this machine" in line
    assert line.endswith("leave --device out to compute on the CPU")
    assert cli.main(["a", "b", "-o", "out", "--device", "gpu"]) == 1
    assert one_line(capsys.readouterr().err).startswith("adapter-merge: error: --device gpu is not a device: ")
    assert not (work / "out").exists()


def test_device_index_beyond_the_machines_devices(work, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert cli.main(["a", "b", "-o", "out", "--device", "cuda:2"]) == 1
    assert one_line(capsys.readouterr().err).endswith("--device cuda:2: this machine has 2 cuda device(s), cuda:0 to cuda:1")


def test_engine_errors_name_the_flags_not_the_parameters(work, capsys):
    assert cli.main(["a:1", "b:-1", "-o", "out"]) == 1
    line = one_line(capsys.readouterr().err)
    assert line == ("adapter-merge: error: The weights [1.0, -1.0] sum to (nearly) zero, so the default normalisation "
                    "(no --no-normalize) would divide by zero. For task arithmetic or unlearning with negative "
                    "weights pass --no-normalize.")
    (work / "out").mkdir()
    (work / "out" / "keep.txt").write_text("mine", encoding="utf-8")
    assert cli.main(["a", "b", "-o", "out", "-q"]) == 1
    line = one_line(capsys.readouterr().err)
    assert "Pass --force to replace it" in line and "overwrite_ok" not in line and "(--force" not in line


@pytest.mark.parametrize("message, shell_words", [
    ("pass normalize_weights=False.", "pass --no-normalize."),
    ("or pass allow_different_bases=True (--allow-different-bases) if", "or pass --allow-different-bases if"),
    ("Unknown option(s) ['x'] for combine_strategy='ties'.", "Unknown option(s) ['x'] for --strategy ties."),
    ("pass a larger svd_rank, or svd_tol=0.05 with density=0.3;", "pass a larger --svd-rank, or --svd-tol 0.05 with --density 0.3;"),
    ("majority_sign_method must be", "--majority-sign-method must be"),
    ("a density in (0, 1]", "a density in (0, 1]"),  # a plain word stays a word
])
def test_for_the_shell_translates_parameter_names_into_flags(message, shell_words):
    assert cli.for_the_shell(message) == shell_words


def test_yaml_content_errors_exit_1(work, capsys):
    (work / "bad.yaml").write_text("models:\n  - model: a\n    parameters: [1]\n", encoding="utf-8")
    assert cli.main(["bad.yaml", "out"]) == 1
    line = one_line(capsys.readouterr().err)
    assert "bad.yaml" in line and "parameters" in line
    assert not (work / "out").exists()


def test_report_file_is_the_outputs_merge_report(work, capsys):
    assert cli.main(["a:0.7", "b:0.3", "-s", "lora_delta_w_concat", "-o", "out", "-q", "--report", "sub/report.json"]) == 0
    copied = (work / "sub" / "report.json").read_bytes()
    assert copied == (work / "out" / "merge_report.json").read_bytes()
    saved = json.loads(copied)
    assert [i["sha256"] for i in saved["recipe"]["inputs"]] and saved["recipe"]["combine_strategy"] == "lora_delta_w_concat"
    (work / "folder.json").mkdir()
    assert cli.main(["a", "b", "-o", "out2", "-q", "--report", "folder.json"]) == 1
    assert "--report folder.json is a folder" in one_line(capsys.readouterr().err)
    assert not (work / "out2").exists()


# --- item 10: linear (the default) is the exact sum for LoRA -------------------------------------------

@pytest.mark.parametrize("strategy", [None, "linear"])
def test_default_and_linear_strategy_are_the_exact_weighted_sum(work, capsys, strategy):
    args = ["a:0.5", "b:0.5", "-o", "out"] + (["-s", strategy] if strategy else [])
    assert cli.main(args) == 0
    summary = capsys.readouterr().err
    assert "strategy   linear → lora_delta_w_svd (a: +0.5, b: +0.5)" in summary
    merged, a, b = delta_w(work / "out"), delta_w(work / "a"), delta_w(work / "b")
    assert merged.keys() == a.keys() == b.keys() and len(merged) == 4
    for module, update in merged.items():
        exact = 0.5 * a[module] + 0.5 * b[module]
        assert torch.linalg.norm(update - exact) <= 1e-6 * torch.linalg.norm(exact), module
    recipe = json.loads((work / "out" / "merge_report.json").read_text(encoding="utf-8"))["recipe"]
    assert recipe["combine_strategy"] == "lora_delta_w_svd" and recipe["linear_lora"] == "exact"


# --- item 12: --allow-different-bases -------------------------------------------------------------------

def _record_base(folder: Path, base: str) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["model_name"] = base
    path.write_text(json.dumps(config), encoding="utf-8")


def test_different_bases_are_refused_unless_allowed(work, capsys):
    _record_base(work / "a", "org/bert-base")
    _record_base(work / "b", "org/roberta-base")
    assert cli.main(["a", "b", "-o", "out", "-s", "lora_delta_w_concat"]) == 1
    line = one_line(capsys.readouterr().err)
    assert "different base models" in line and "pass --allow-different-bases if" in line
    assert "allow_different_bases" not in line and not (work / "out").exists()
    assert cli.main(["a", "b", "-o", "out", "-s", "lora_delta_w_concat", "--allow-different-bases"]) == 0
    err = capsys.readouterr().err
    assert "adapter-merge: warning: The inputs were trained on different base models" in err
    recipe = json.loads((work / "out" / "merge_report.json").read_text(encoding="utf-8"))["recipe"]
    assert recipe["allow_different_bases"] is True
    assert [i["base_model"] for i in recipe["inputs"]] == ["org/bert-base", "org/roberta-base"]


# --- item 11: mergekit's calling form and the YAML plan's keys --------------------------------------------

RECIPE = """
models:
  - model: a
    parameters: {weight: 1.0}
  - model: b
    parameters: {weight: -0.5}
merge_method: task_arithmetic
"""


def test_yaml_then_output_folder_mergekits_calling_form(work):
    (work / "r.yml").write_text(RECIPE, encoding="utf-8")
    result = shell("r.yml", "out", cwd=work)
    assert result.returncode == 0, result.stderr
    assert "note       normalize: false (mergekit's default for task_arithmetic; the YAML does not say)." in result.stderr
    recipe = json.loads((work / "out" / "merge_report.json").read_text(encoding="utf-8"))["recipe"]
    assert recipe["merge_method"] == "task_arithmetic" and recipe["config_file"] == "r.yml"
    assert [i["weight"] for i in recipe["inputs"]] == [1.0, -0.5]
    merged, a, b = delta_w(work / "out"), delta_w(work / "a"), delta_w(work / "b")
    for module, update in merged.items():
        exact = a[module] - 0.5 * b[module]
        assert torch.linalg.norm(update - exact) <= 1e-6 * torch.linalg.norm(exact), module


def test_yaml_base_model_is_checked_against_the_inputs(work, capsys):
    _record_base(work / "a", "org/bert-base")
    _record_base(work / "b", "org/bert-base")
    (work / "r.yml").write_text(RECIPE + "base_model: org/llama-7b\n", encoding="utf-8")
    assert cli.main(["r.yml", "out"]) == 1
    line = one_line(capsys.readouterr().err)
    assert "org/llama-7b" in line and "org/bert-base" in line
    assert not (work / "out").exists()
    (work / "r.yml").write_text(RECIPE + "base_model: bert-base\n", encoding="utf-8")
    assert cli.main(["r.yml", "out", "-q"]) == 0
    assert json.loads((work / "out" / "merge_report.json").read_text(encoding="utf-8"))["recipe"]["base_model"] == "bert-base"


# --- issue 20: per-module weights (--module-weight DIR:GLOB=WEIGHT) -------------------------------------

LAYER1 = "*.layer.1.*"


def weight_of(module: str, spec) -> float:
    """The documented rule, written out: an exact path, else the first matching glob, else "*"."""
    import fnmatch

    if not isinstance(spec, dict):
        return spec
    if module in spec:
        return spec[module]
    return next((w for k, w in spec.items() if k != "*" and fnmatch.fnmatchcase(module, k)), spec["*"])


def check_per_module_merge(work: Path, specs: dict, normalize: bool) -> None:
    """The merged folder's updates are Σ λᵢ,m ΔWᵢ in float64 (λ normalised per module if ``normalize``)."""
    merged, inputs = delta_w(work / "out"), {n: delta_w(work / n) for n in specs}
    assert merged.keys() == inputs["a"].keys() and len(merged) == 4
    for module, update in merged.items():
        raw = {n: weight_of(module.removesuffix(".loras"), spec) for n, spec in specs.items()}
        total = sum(raw.values()) if normalize else 1.0
        exact = sum(w / total * inputs[n][module] for n, w in raw.items())
        assert torch.linalg.norm(update - exact) <= 1e-6 * torch.linalg.norm(exact), module


def test_module_weight_gives_each_module_its_normalised_weights(work, capsys):
    """a:1 b:1 and a's layer-1 modules at 3: there a gets 3/4 and b 1/4, elsewhere 1/2 each (the default
    strategy, exact for LoRA); the summary and merge_report.json say which modules have their own weights."""
    assert cli.main(["a:1", "b:1", "--module-weight", f"a:{LAYER1}=3", "-o", "out"]) == 0
    check_per_module_merge(work, {"a": {"*": 1.0, LAYER1: 3.0}, "b": 1.0}, normalize=True)
    summary = capsys.readouterr().err
    assert "strategy   linear → lora_delta_w_svd (a: +0.5, b: +0.5)" in summary
    assert (f"per module 2 of 4 modules have their own weights, e.g. bert.encoder.layer.1.attention.self.query "
            f"(a: +0.75, b: +0.25); each in {Path('out') / 'merge_report.json'}") in summary
    recipe = json.loads((work / "out" / "merge_report.json").read_text(encoding="utf-8"))["recipe"]
    assert recipe["module_weights"] == {f"bert.encoder.layer.1.attention.self.{p}": {"a": 0.75, "b": 0.25}
                                        for p in ("query", "value")}
    assert [i["weight"] for i in recipe["inputs"]] == [0.5, 0.5]


def test_module_weight_defaults_to_one_over_n_and_patterns_apply_in_order(work):
    """Without DIR:WEIGHT an input's default is 1/N; an input's patterns apply in the order given (the first
    that matches wins); with --no-normalize the weights are used as given."""
    args = ["a", "b", "--module-weight", "b:*.layer.0.*=2", "--module-weight", "b:*.value=-1",
            "--module-weight", "a:bert.encoder.layer.1.attention.self.query=0", "--no-normalize",
            "-s", "lora_delta_w_concat", "-o", "out", "-q"]
    assert cli.main(args) == 0
    specs = {"a": {"*": 0.5, "bert.encoder.layer.1.attention.self.query": 0.0},
             "b": {"*": 0.5, "*.layer.0.*": 2.0, "*.value": -1.0}}
    check_per_module_merge(work, specs, normalize=False)
    saved = json.loads((work / "out" / "merge_report.json").read_text(encoding="utf-8"))["recipe"]["module_weights"]
    assert saved["bert.encoder.layer.0.attention.self.value"] == {"a": 0.5, "b": 2.0}  # the first pattern wins
    assert saved["bert.encoder.layer.1.attention.self.value"] == {"a": 0.5, "b": -1.0}


def test_module_weight_dir_is_matched_as_a_path_among_the_inputs(work):
    os.rename(work / "a", work / "a:one")
    inputs = ["a:one/", "b"]
    assert cli.parse_module_weight("a:one:*.query=2", inputs) == (0, "*.query", 2.0)  # a ':' inside DIR
    assert cli.parse_module_weight("./b/:*.layer.[01].*=-0.5", inputs) == (1, "*.layer.[01].*", -0.5)
    assert cli.parse_module_weight("b:a=b=1", inputs) == (1, "a=b", 1.0)  # the last '=' starts the weight
    assert cli.module_weights(inputs, None, ["b:*.query=2", "b:*.key=3"]) == [
        0.5, {"*": 0.5, "*.query": 2.0, "*.key": 3.0}]
    assert cli.module_weights(inputs, [0.3, -1.0], ["a:one:*.q=1"]) == [{"*": 0.3, "*.q": 1.0}, -1.0]


@pytest.mark.parametrize("args, message", [
    (["--module-weight", "c:*.query=1"], "--module-weight c:*.query=1: c is not one of the inputs (a, b); name DIR as "
                                         "among the inputs"),
    (["--module-weight", "a:*.query"], "--module-weight a:*.query: expected DIR:GLOB=WEIGHT, e.g."),
    (["--module-weight", "*.query=1"], "--module-weight *.query=1: expected DIR:GLOB=WEIGHT"),
    (["--module-weight", "a:*.query=big"], "--module-weight a:*.query=big: the weight 'big' is not a number"),
    (["--module-weight", "a:*.query=nan"], "the weight is nan: weights must be finite numbers"),
    (["--module-weight", "a:=1"], "--module-weight a:=1: no module pattern between 'a:' and '='"),
    (["--module-weight", "a:*=0.5"], "'*' is every module, a's own weight: give it as a:0.5 among the inputs"),
    (["--module-weight", "a:*.q=1", "--module-weight", "a:*.q=2"], "a:*.q is given twice (1 and 2): give each "
                                                                  "pattern once"),
])
def test_bad_module_weight_is_a_usage_error(work, capsys, args, message):
    with pytest.raises(SystemExit) as exit:
        cli.main(["a", "b", "-o", "out", *args])
    assert exit.value.code == 2
    line = capsys.readouterr().err.strip()
    assert len(line.splitlines()) == 1 and message in line and line.endswith("(see adapter-merge --help)"), line
    assert not (work / "out").exists()


def test_module_weight_with_a_yaml_is_a_usage_error(work, capsys):
    (work / "r.yml").write_text(RECIPE, encoding="utf-8")
    with pytest.raises(SystemExit) as exit:
        cli.main(["r.yml", "out", "--module-weight", "a:*.query=1"])
    assert exit.value.code == 2
    assert "--module-weight does not apply to a YAML config" in capsys.readouterr().err


def test_module_weight_matching_no_module_is_the_engines_error_in_shell_words(work, capsys):
    """What only the inputs can tell (a pattern matching none of their modules; a module whose weights sum
    to zero) is bad input: one line in the command line's words, exit status 1, nothing written."""
    assert cli.main(["a", "b", "--module-weight", "a:*.nowhere.*=2", "-o", "out"]) == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith("adapter-merge: error: The --module-weight pattern '*.nowhere.*' of adapter 'a' matches "
                           "no module of the merge. Patterns are shell-style globs (fnmatch) over module names such as "
                           "bert.encoder.layer.0.attention.self.query, "), line
    assert line.endswith("for LoRA, a merge's merge_report.json lists every module (report → modules).")
    assert "report.modules" not in line
    assert cli.main(["a:1", "b:1", "--module-weight", f"b:{LAYER1}=-1", "-o", "out"]) == 1
    line = one_line(capsys.readouterr().err)
    assert "In module 'bert.encoder.layer.1.attention.self.query': The weights [1.0, -1.0] sum to (nearly) zero" in line
    assert "normalize_weights" not in line and "pass --no-normalize" in line
    assert not (work / "out").exists()


def test_help_documents_module_weight():
    text = cli.build_parser().format_help()
    assert "--module-weight DIR:GLOB=WEIGHT" in text and "(repeatable)" in text
    assert "adapter-merge math/:1 code/:1 --module-weight 'math/:*.layer.1.*=3' --output layered/" in text
