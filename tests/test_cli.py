"""The ``adapter-merge`` command line, run as a user runs it: a subprocess (``python -m adapter_merging``,
the same program as the ``adapter-merge`` console script)."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from adapters import LoRAConfig

from conftest import randomize_adapter, tiny_adapter_model
from test_files import _Payload, save_peft_loras, PEFT_SPECS

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    environment["PYTHONPATH"] = str(ROOT) + os.pathsep + environment.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "adapter_merging", *map(str, args)], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two saved LoRA adapters (adapters format) in a fresh folder per test module."""
    base = tmp_path_factory.mktemp("cli")
    model = tiny_adapter_model("bert")
    for i, name in enumerate(("a", "b")):
        model.add_adapter(name, config=LoRAConfig(r=2 + i, alpha=4))
        randomize_adapter(model, name, seed=i)
        model.save_adapter(str(base / name), name, with_head=False)
    return base


@pytest.fixture
def work(folders, tmp_path):
    for name in ("a", "b"):
        shutil.copytree(folders / name, tmp_path / name)
    return tmp_path


def assert_failed_cleanly(result, *keywords):
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("adapter-merge: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for keyword in keywords:
        assert keyword in lines[0], lines[0]


def test_help_lists_the_options_and_examples(tmp_path):
    result = run("--help", cwd=tmp_path)
    assert result.returncode == 0
    for text in ("DIR[:WEIGHT]", "--output", "--strategy", "--svd-rank", "--svd-tol", "--density",
                 "--majority-sign-method", "--gamma", "--seed", "--no-normalize", "--force", "--report", "--device",
                 "--dtype", "--quiet", "examples:", "task_arithmetic", "CONFIG.yaml"):
        assert text in result.stdout, text


def test_merge_with_weights_summary_and_report(work):
    result = run("a:1", "b:-1", "--no-normalize", "--strategy", "lora_delta_w_concat", "--output", "out",
                 "--report", "report.json", cwd=work)
    assert result.returncode == 0, result.stderr
    assert "merged 2 adapters into out" in result.stderr and "lora_delta_w_concat (a: +1, b: -1)" in result.stderr
    assert "rank       5" in result.stderr and "error      max " in result.stderr
    report = json.loads((work / "report.json").read_text(encoding="utf-8"))["report"]  # merge_report.json's copy
    assert report["weights"] == {"a": 1.0, "b": -1.0} and report["max_error"] < 1e-6  # float32 storage
    assert {p.name for p in (work / "out").iterdir()} == {"adapter_config.json", "pytorch_adapter.bin", "merge_report.json", "README.md"}
    quiet = run("a", "b", "-s", "lora_delta_w_svd", "-o", "out2", "-q", cwd=work)
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout == ""


def test_mergekit_shaped_yaml(work):
    (work / "recipe.yaml").write_text(textwrap.dedent("""
        models:
          - model: a
            parameters: {weight: 1.0, density: 0.5}
          - model: b
            parameters: {weight: 0.5, density: 0.8}
        merge_method: ties
        parameters:
          normalize: false
          svd_tol: 0.05
        dtype: bfloat16
        output: merged
    """), encoding="utf-8")
    result = run("recipe.yaml", cwd=work)
    assert result.returncode == 0, result.stderr
    recipe = json.loads((work / "merged" / "merge_report.json").read_text(encoding="utf-8"))["recipe"]
    assert recipe["combine_strategy"] == "ties" and recipe["normalize_weights"] is False
    assert recipe["options"] == {"convention": "mergekit", "normalize": False, "scale": 1.0, "rescale": False,
                                 "density": [0.5, 0.8], "svd_tol": 0.05}  # mergekit's ties (issue 17)
    assert [i["weight"] for i in recipe["inputs"]] == [1.0, 0.5]
    state = torch.load(work / "merged" / "pytorch_adapter.bin", weights_only=True)
    assert {t.dtype for t in state.values()} == {torch.bfloat16}


def test_task_arithmetic_is_the_exact_sum(work):
    result = run("a:1", "b:-1", "--no-normalize", "-s", "task_arithmetic", "-o", "out", cwd=work)
    assert result.returncode == 0, result.stderr
    recipe = json.loads((work / "out" / "merge_report.json").read_text(encoding="utf-8"))
    assert recipe["recipe"]["combine_strategy"] == "lora_delta_w_svd" and recipe["report"]["max_error"] < 1e-6


def _corrupt(work: Path, problem: str):
    folder = work / "b"
    if problem == "missing folder":
        shutil.rmtree(folder)
    elif problem == "no weights file":
        (folder / "pytorch_adapter.bin").unlink()
    elif problem == "corrupted safetensors":
        (folder / "pytorch_adapter.bin").unlink()
        (folder / "adapter.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    elif problem == "pickle with code":
        with open(folder / "pytorch_adapter.bin", "wb") as handle:
            pickle.dump({"x": _Payload(str(work / "PWNED"))}, handle)
    elif problem == "mixed formats":
        shutil.rmtree(folder)
        shutil.copytree(save_peft_loras(work / "peft", "llama", PEFT_SPECS["llama"][:1])[0], folder)
    elif problem == "mismatched shapes":
        state = torch.load(folder / "pytorch_adapter.bin", weights_only=True)
        torch.save({k: torch.cat([v, v], dim=-1) if k.endswith("lora_A") else v for k, v in state.items()},
                   folder / "pytorch_adapter.bin")
    elif problem == "existing output":
        (work / "out").mkdir()
        (work / "out" / "keep.txt").write_text("mine", encoding="utf-8")


BAD_INPUTS = {
    "missing folder": "is not a folder",
    "no weights file": "holds no weights file",
    "corrupted safetensors": "not a readable safetensors file",
    "pickle with code": "refused: it is a pickle that would run code",
    "mixed formats": "mix formats",
    "mismatched shapes": "different shapes",
    "existing output": "exists and is not empty",
}


@pytest.mark.parametrize("problem", list(BAD_INPUTS))
def test_bad_input_exits_non_zero_with_one_line_and_no_output(work, problem):
    _corrupt(work, problem)
    result = run("a", "b", "-s", "lora_delta_w_concat", "-o", "out", cwd=work)
    assert_failed_cleanly(result, BAD_INPUTS[problem])
    if problem == "existing output":
        assert [p.name for p in (work / "out").iterdir()] == ["keep.txt"]
    else:
        assert not (work / "out").exists()
    assert not [p for p in work.iterdir() if p.name.startswith(".out.")]
    assert not (work / "PWNED").exists()


def test_force_replaces_the_output(work):
    _corrupt(work, "existing output")
    result = run("a", "b", "-s", "lora_delta_w_svd", "-o", "out", "--force", "-q", cwd=work)
    assert result.returncode == 0, result.stderr
    assert not (work / "out" / "keep.txt").exists() and (work / "out" / "merge_report.json").exists()


@pytest.mark.parametrize("args, message", [
    (["a", "b"], "--output"),
    (["a:1", "b", "-o", "out"], "every input"),
    (["a", "b", "-o", "out", "--strategy", "nope"], "invalid choice"),
])
def test_usage_errors_exit_2(work, args, message):
    result = run(*args, cwd=work)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_hub_ids_resolve_from_the_offline_cache(work):
    """org/name[@revision] through huggingface_hub's cache, laid out by hand (nothing is downloaded)."""
    cache = work / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    for name in ("a", "b"):
        repo = cache / f"models--org--lora-{name}"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit, encoding="utf-8")
        shutil.copytree(work / name, repo / "snapshots" / commit)
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    result = run("org/lora-a:0.5", "org/lora-b@main:0.5", "-s", "lora_delta_w_svd", "-o", "out", cwd=work, env=env)
    assert result.returncode == 0, result.stderr
    sources = [i["source"] for i in json.loads((work / "out" / "merge_report.json").read_text(encoding="utf-8"))["recipe"]["inputs"]]
    assert sources == ["org/lora-a", "org/lora-b@main"]
    missing = run("org/lora-a", "org/not-cached", "-o", "out2", cwd=work, env=env)
    assert_failed_cleanly(missing, "org/not-cached", "local Hugging Face cache")
    assert not (work / "out2").exists()


def test_the_cli_page_runs(tmp_path):
    """docs/cli.md: its Python block makes the example folders, then every ```bash block runs in a shell
    there, with `adapter-merge` being this package's command; each must succeed."""
    from sybil import Document
    from sybil.parsers.markdown.lexers import FencedCodeBlockLexer

    page = ROOT / "docs" / "cli.md"
    document = Document(page.read_text(encoding="utf-8"), str(page))
    blocks = [(r.lexemes["language"].strip(), r.lexemes["source"]) for r in FencedCodeBlockLexer(language=r".*")(document)]
    python = [source for language, source in blocks if language == "python"]
    bash = [source for language, source in blocks if language == "bash"]
    assert python and len(bash) >= 4
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        for source in python:
            exec(compile(source, str(page), "exec"), {"__name__": "cli_page"})
    finally:
        os.chdir(cwd)
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "adapter-merge").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m adapter_merging "$@"\n', encoding="utf-8")
    (shim / "adapter-merge").chmod(0o755)
    env = {**os.environ, "PATH": f"{shim}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for source in bash:
        result = subprocess.run(["bash", "-e", "-c", source], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{source}\n{result.stderr}"
    for folder in ("average", "detoxified", "ties_merge", "task_arithmetic", "small", "from_yaml"):
        assert (tmp_path / folder / "merge_report.json").exists(), folder
    assert "exit status 1" in result.stdout and "exists and is not empty" in result.stderr
