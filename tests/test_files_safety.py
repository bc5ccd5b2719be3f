"""merge_saved_adapters never loses a file and says where everything came from (issue 17, items 1-4,
12, 21 and unsafe names): outputs that would replace an input, one folder under two spellings,
folder modes, symbolic-link outputs, temporary folders of killed runs, different base models, the
model card and the recipe."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import adapter_merging
from adapter_merging import merge_saved_adapters
from adapter_merging._warnings import MergeWarning
from adapter_merging.files import CARD_NAME, REPORT_NAME, InputError
from adapter_merging.files import io as files_io
from conftest import randomize_adapter, tiny_adapter_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"
# most tests here merge with the default 'linear', whose cross-term warning is not what they test
pytestmark = pytest.mark.filterwarnings("ignore:combine_strategy='linear' combines the factors")


def peft_folder(folder: Path, seed: int, base: object = "org/tiny-llama", r: int = 2, alpha: float = 4.0) -> Path:
    """A PEFT LoRA folder written by hand (two Linear modules, d 6, k 5): fast, no model needed."""
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module in ("model.layers.0.q_proj", "model.layers.0.v_proj"):
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, 5, generator=generator)
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(6, r, generator=generator)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
              "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": base}
    (folder / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def delta_w(folder: Path) -> dict:
    """Each module's ΔW = (alpha/r)·B·A of a PEFT folder, in float64."""
    from safetensors.torch import load_file

    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    out = {}
    for key, a in tensors.items():
        if key.endswith("lora_A.weight"):
            b = tensors[key.replace("lora_A", "lora_B")]
            out[key[: -len(".lora_A.weight")]] = config["lora_alpha"] / a.shape[0] * (b.double() @ a.double())
    return out


@pytest.fixture(scope="module")
def saved_bn(tmp_path_factory) -> Path:
    """Two bottleneck adapters saved by model.save_adapter (made once; tests copy them)."""
    root = tmp_path_factory.mktemp("saved_bn")
    model = tiny_adapter_model("bert")
    for i, name in enumerate(("a", "b")):
        model.add_adapter(name, config="seq_bn")
        randomize_adapter(model, name, seed=i + 1)
        model.save_adapter(str(root / name), name, with_head=False)
    return root


def tree(root: Path) -> dict:
    """{relative path: sha256 (files) or 'dir'/'link -> target'} of everything under root."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = f"link -> {os.readlink(path)}"
        elif path.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def two_peft(tmp_path: Path, bases=("org/tiny-llama", "org/tiny-llama")) -> list:
    return [peft_folder(tmp_path / "d" / n, seed=i, base=bases[i]) for i, n in enumerate(("a", "b"))]


# ============================================================================ item 1: output vs inputs
@pytest.mark.parametrize("output, relation", [
    ("d", "contains the input"), (".", "contains the input"), ("d/a", "is one of the inputs ("),
    ("d/a/merged", "lies inside the input"), ("d/./b/../a", "is one of the inputs ("),
])
def test_output_that_is_contains_or_lies_inside_an_input_is_refused_before_writing(tmp_path, monkeypatch, output, relation):
    two_peft(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = tree(tmp_path)
    with pytest.raises(InputError) as error:
        merge_saved_adapters(["d/a", "d/b"], output, overwrite_ok=True, combine_strategy="lora_delta_w_svd")
    message = str(error.value)
    assert f"The output {Path(output)} {relation}" in message and "overwrite_ok (--force)" in message
    assert "\n" not in message
    assert tree(tmp_path) == before, "nothing written, nothing removed"


def test_output_reaching_an_input_through_a_link_is_refused(tmp_path):
    two_peft(tmp_path)
    (tmp_path / "link").symlink_to(tmp_path / "d", target_is_directory=True)
    before = tree(tmp_path)
    for output in (tmp_path / "link", tmp_path / "link" / "a" / "x"):
        with pytest.raises(InputError, match="contains the input|lies inside the input"):
            merge_saved_adapters([tmp_path / "d" / "a", tmp_path / "d" / "b"], output, overwrite_ok=True)
    assert tree(tmp_path) == before


def test_output_holding_the_files_an_input_links_to_is_refused(tmp_path):
    """A Hub cache snapshot's files are links into blobs/: replacing blobs/ would delete the input's data."""
    blobs = tmp_path / "cache" / "blobs"
    source = peft_folder(tmp_path / "src", seed=0)
    snapshot = tmp_path / "cache" / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for file in source.iterdir():
        shutil.copy(file, blobs / file.name)
        (snapshot / file.name).symlink_to(blobs / file.name)
    other = peft_folder(tmp_path / "other", seed=1)
    before = tree(tmp_path)
    with pytest.raises(InputError, match=r"contains the file .*blobs.* of the input"):
        merge_saved_adapters([snapshot, other], blobs, overwrite_ok=True)
    assert tree(tmp_path) == before


# ============================================================================ item 2: one folder, two spellings
def test_one_folder_under_two_spellings_is_a_duplicate(tmp_path, monkeypatch):
    peft_folder(tmp_path / "pa", seed=0)
    (tmp_path / "alias").symlink_to(tmp_path / "pa", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    for second in ("./pa", "alias", str(tmp_path / "pa"), "pa/"):
        with pytest.raises(InputError) as error:
            merge_saved_adapters(["pa", second], "out", weights=[1, -1], normalize_weights=False)
        assert str(error.value).startswith(f"Duplicate adapter names ['pa', '{second}']: both are the folder ")
        assert "each adapter may appear once" in str(error.value)
    with pytest.raises(InputError, match=r"Duplicate adapter names \['pa', './pa'\]"):
        merge_saved_adapters({"pa": 1.0, "./pa": -1.0}, "out", normalize_weights=False)
    assert not (tmp_path / "out").exists()


def test_a_hub_id_and_its_snapshot_folder_are_a_duplicate_and_the_commit_is_recorded(tmp_path, monkeypatch):
    import huggingface_hub

    snapshot = peft_folder(tmp_path / "hub" / "models--org--lora" / "snapshots" / COMMIT, seed=0)
    other = peft_folder(tmp_path / "other", seed=1)
    calls = []

    def fake_snapshot_download(repo_id, revision=None, **kwargs):
        calls.append((repo_id, revision))
        if repo_id != "org/lora":
            raise FileNotFoundError(repo_id)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    with pytest.raises(InputError, match=r"Duplicate adapter names \['org/lora', '.*snapshots.*'\]"):
        merge_saved_adapters(["org/lora", str(snapshot)], tmp_path / "out")
    merge_saved_adapters(["org/lora@main", other], tmp_path / "out", combine_strategy="lora_delta_w_svd")
    assert calls[-1] == ("org/lora", "main")
    recipe = json.loads((tmp_path / "out" / REPORT_NAME).read_text())
    assert [i["revision"] for i in recipe["recipe"]["inputs"]] == [COMMIT, None]
    assert f"`{COMMIT}`" in (tmp_path / "out" / CARD_NAME).read_text()


# ============================================================================ item 3: modes
@pytest.mark.parametrize("umask, folder_mode, file_mode", [(0o022, 0o755, 0o644), (0o002, 0o775, 0o664), (0o077, 0o700, 0o600)])
def test_output_folder_has_mkdirs_mode_under_the_umask(tmp_path, umask, folder_mode, file_mode):
    a, b = two_peft(tmp_path)
    previous = os.umask(umask)
    try:
        merge_saved_adapters([a, b], tmp_path / "out")
    finally:
        os.umask(previous)
    out = tmp_path / "out"
    assert oct(out.stat().st_mode & 0o7777) == oct(folder_mode)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {
        p.name: oct(file_mode) for p in out.iterdir()}


def test_overwriting_keeps_the_existing_outputs_mode(tmp_path):
    a, b = two_peft(tmp_path)
    for existing_mode, contents in ((0o750, True), (0o711, False)):
        out = tmp_path / f"out{existing_mode:o}"
        out.mkdir()
        if contents:
            (out / "old.txt").write_text("old")
        out.chmod(existing_mode)
        merge_saved_adapters([a, b], out, overwrite_ok=True)
        assert oct(out.stat().st_mode & 0o7777) == oct(existing_mode)
        assert not (out / "old.txt").exists() and (out / REPORT_NAME).is_file()


# ============================================================================ item 4: links, temporary folders
def test_a_symlinked_output_is_written_into_its_target_and_the_link_stays(tmp_path):
    a, b = two_peft(tmp_path)
    target = tmp_path / "real_out"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    link = tmp_path / "out_link"
    link.symlink_to(target, target_is_directory=True)
    merge_saved_adapters([a, b], link, overwrite_ok=True)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert (target / REPORT_NAME).is_file() and not (target / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "out_link", "real_out"], "no .old-* or .partial-* left"
    recipe = json.loads((target / REPORT_NAME).read_text())
    assert recipe["name"] == "out_link"  # the name given, not the target's


def test_a_dangling_symlinked_output_is_one_clear_error(tmp_path):
    a, b = two_peft(tmp_path)
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "missing")
    with pytest.raises(InputError) as error:
        merge_saved_adapters([a, b], link)
    assert str(error.value) == (
        f"The output {link} is a symbolic link to {tmp_path / 'missing'}, which does not exist (or is a loop): "
        "create the folder it points to, or remove the link."
    )
    assert link.is_symlink() and not (tmp_path / "missing").exists()


@pytest.mark.parametrize("exchange", [True, False])
def test_overwriting_never_leaves_an_old_folder(tmp_path, monkeypatch, exchange):
    a, b = two_peft(tmp_path)
    if not exchange:  # the two-rename path of systems without an atomic swap
        monkeypatch.setattr(files_io, "_exchange", lambda x, y: False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("old")
    merge_saved_adapters([a, b], out, overwrite_ok=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "out"]
    assert (out / REPORT_NAME).is_file() and not (out / "x").exists()


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def with_pid(name: str, pid: int) -> str:
    head, host, _, rand = name.rsplit("-", 3)
    return f"{head}-{host}-{pid}-{rand}"


def test_a_run_killed_while_writing_leaves_a_partial_folder_the_next_run_removes(tmp_path):
    a, b = two_peft(tmp_path)
    out = tmp_path / "out"
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from adapter_merging.files.io import atomic_folder\n"
        "with atomic_folder(Path(sys.argv[1]), False) as staging:\n"
        "    (staging / 'adapter_model.safetensors').write_bytes(b'x' * 100000)\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script, str(out)], stdout=subprocess.PIPE, text=True,
                             cwd=Path(adapter_merging.__file__).parents[1])
    try:
        assert child.stdout.readline().strip() == "writing"
        live = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
        assert len(live) == 1 and files_io.stale_folders(out) == [], "a live run's folder is never stale"
    finally:
        child.kill()  # SIGKILL: no finally blocks run
        child.wait()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == live, "the kill left it"
    report = merge_saved_adapters([a, b], out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "out"]
    assert any(f"Removed 1 temporary folder(s) left by an interrupted run: {live}" in n for n in report.notes)


def test_which_temporary_folders_are_stale(tmp_path):
    out = tmp_path / "out"
    ours = files_io.temporary_name(out, "partial")
    old_mtime = time.time() - files_io.STALE_AGE_S - 60
    folders = {
        with_pid(ours, dead_pid()): True,                                   # this machine, process gone
        with_pid(files_io.temporary_name(out, "old"), dead_pid()): True,    # a replaced output left by a kill
        ours: False,                                                        # this process: live
        with_pid(ours, os.getppid()): False,                                # a live process
        ".out.partial-ab_cd123": False,                                     # an earlier version's name, recent
        ".out.partial-zz9_abcd": True,                                      # ... and a day old (mtime set below)
        ".out.partial-ffffffff-1-0badcafe": True,                           # another machine, a day old
        ".out.partial-fffffffe-1-0badcafe": False,                          # another machine, recent
        ".out2.partial-" + ours.rsplit(".partial-", 1)[1]: False,           # another output's
        ".out.partial-x": False,                                            # not our naming
        "out.partial-ab_cd123": False,                                      # not hidden: not ours
    }
    for name in folders:
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text("x")
    for name in (".out.partial-zz9_abcd", ".out.partial-ffffffff-1-0badcafe"):
        for path in (tmp_path / name / "f", tmp_path / name):
            os.utime(path, (old_mtime, old_mtime))
    (tmp_path / ".out.partial-file0001").write_text("a file, not a folder")
    (tmp_path / ".out.partial-link0001").symlink_to(tmp_path / ours)
    stale = {p.name for p in files_io.stale_folders(out)}
    assert stale == {n for n, is_stale in folders.items() if is_stale}
    assert {p.name for p in files_io.stale_folders(out, ("partial",))} == {n for n in stale if ".partial-" in n}
    removed = files_io.remove_stale(out)
    assert sorted(removed) == sorted(stale)
    assert {p.name for p in tmp_path.iterdir()} == (set(folders) - stale) | {".out.partial-file0001", ".out.partial-link0001"}


# ============================================================================ item 15: unsafe names
@pytest.mark.parametrize("name", ["a/b", "a\\b", "..", "a.b", "", " ", "a:b", "a\nb", "a\x00b"])
def test_an_unsafe_adapter_name_is_refused_in_one_line(tmp_path, name):
    a, b = two_peft(tmp_path)
    with pytest.raises(ValueError) as error:
        merge_saved_adapters([a, b], tmp_path / "out", name=name)
    message = str(error.value)
    assert message.startswith("The merged adapter's name must be a non-empty string without '.', '/', '\\'")
    assert repr(name) in message and "\n" not in message
    assert not (tmp_path / "out").exists()


# ============================================================================ item 12: base models
def test_inputs_of_different_base_models_are_refused(tmp_path):
    a, b = two_peft(tmp_path, bases=("org/tiny-llama", "org/other-llama"))
    with pytest.raises(InputError) as error:
        merge_saved_adapters([a, b], tmp_path / "out")
    assert str(error.value) == (
        "The inputs were trained on different base models ('a': org/tiny-llama, 'b': org/other-llama): their updates "
        "do not add up on one model. Merge adapters of one base model, or pass allow_different_bases=True "
        "(--allow-different-bases) if the bases share their weights."
    )
    assert not (tmp_path / "out").exists()


def test_allow_different_bases_warns_notes_and_records_every_base(tmp_path):
    a, b = two_peft(tmp_path, bases=("org/tiny-llama", "org/other-llama"))
    with pytest.warns(MergeWarning, match="different base models"):
        report = merge_saved_adapters([a, b], tmp_path / "out", allow_different_bases=True)
    assert any("different base models" in note for note in report.notes)
    recipe = json.loads((tmp_path / "out" / REPORT_NAME).read_text())
    assert [i["base_model"] for i in recipe["recipe"]["inputs"]] == ["org/tiny-llama", "org/other-llama"]
    assert recipe["recipe"]["allow_different_bases"] is True
    with pytest.raises(TypeError, match="allow_different_bases must be True or False, got 'yes'"):
        merge_saved_adapters([a, b], tmp_path / "out2", allow_different_bases="yes")


@pytest.mark.parametrize("bases", [
    ("org/tiny-llama", None), ("org/tiny-llama", ""), ("org/tiny-llama", "tiny-llama"),
    ("org/tiny-llama", "/models/Tiny-Llama/"), ("org/tiny-llama", "/hf/models--org--tiny-llama/snapshots/" + COMMIT),
])
def test_same_or_unrecorded_bases_merge(tmp_path, bases):
    a, b = two_peft(tmp_path, bases=bases)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MergeWarning)
        merge_saved_adapters([a, b], tmp_path / "out", combine_strategy="lora_delta_w_svd")
    recipe = json.loads((tmp_path / "out" / REPORT_NAME).read_text())
    assert [i["base_model"] for i in recipe["recipe"]["inputs"]] == [x or None for x in bases]


def test_adapters_format_records_its_base_in_model_name(tmp_path, saved_bn):
    for name, base in (("a", "bert-base-uncased"), ("b", "roberta-base")):
        shutil.copytree(saved_bn / name, tmp_path / name)
        config = json.loads((tmp_path / name / "adapter_config.json").read_text())
        assert config["model_name"] == ""  # what save_adapter records for a model made from a config
        config["model_name"] = base
        (tmp_path / name / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=r"different base models \('a': bert-base-uncased, 'b': roberta-base\)"):
        merge_saved_adapters([tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    with pytest.raises(InputError, match=r"base_model is 'google-bert/bert-base-uncased', but \{'b': 'roberta-base'\}"):
        merge_saved_adapters([tmp_path / "a", tmp_path / "b"], tmp_path / "out", base_model="google-bert/bert-base-uncased",
                             allow_different_bases=True)
    assert not (tmp_path / "out").exists()


def test_base_model_must_match_every_recorded_base(tmp_path):
    a, b = two_peft(tmp_path, bases=("org/tiny-llama", None))
    with pytest.raises(InputError) as error:
        merge_saved_adapters([a, b], tmp_path / "out", base_model="org/llama-7b")
    assert str(error.value) == (
        "base_model is 'org/llama-7b', but {'a': 'org/tiny-llama'} were trained on another base model (as their "
        "adapter_config.json records): merge adapters of that base model, or correct base_model."
    )
    report = merge_saved_adapters([a, b], tmp_path / "out", base_model="other-org/Tiny-Llama")
    assert "['b'] record no base model: they could not be checked against base_model 'other-org/Tiny-Llama'." in report.notes
    assert json.loads((tmp_path / "out" / REPORT_NAME).read_text())["recipe"]["base_model"] == "other-org/Tiny-Llama"
    with pytest.raises(TypeError, match="base_model must be a model name or path"):
        merge_saved_adapters([a, b], tmp_path / "out2", base_model=3)


# ============================================================================ new options: linear_lora, extra, notes
def test_linear_lora_exact_is_the_exact_sum_and_parameters_is_adapters_meaning(tmp_path):
    a = peft_folder(tmp_path / "a", seed=0, r=2, alpha=4)
    b = peft_folder(tmp_path / "b", seed=1, r=3, alpha=3)
    target = {m: 0.5 * x + 0.5 * y for (m, x), y in zip(delta_w(a).items(), delta_w(b).values())}
    report = merge_saved_adapters([a, b], tmp_path / "exact", linear_lora="exact")
    merged = delta_w(tmp_path / "exact")
    for module, expected in target.items():
        assert (merged[module] - expected).norm() / expected.norm() < 1e-6
    assert report.combine_strategy == "lora_delta_w_svd" and report.max_error < 1e-6
    assert "combine_strategy 'linear' is the exact Σ λᵢ ΔWᵢ for LoRA here (lora_delta_w_svd at the exact rank)." in report.notes
    recipe = json.loads((tmp_path / "exact" / REPORT_NAME).read_text())["recipe"]
    assert (recipe["combine_strategy_asked"], recipe["combine_strategy"], recipe["linear_lora"]) == (
        "linear", "lora_delta_w_svd", "exact")
    c = peft_folder(tmp_path / "c", seed=2, r=2, alpha=4)
    report = merge_saved_adapters([a, c], tmp_path / "params")  # default: A and B combined separately
    assert report.combine_strategy == "linear" and report.max_error > 0.1
    with pytest.raises(ValueError, match="linear_lora must be 'parameters' or 'exact', got 'mergekit'"):
        merge_saved_adapters([a, c], tmp_path / "x", linear_lora="mergekit")


def test_linear_lora_exact_keeps_linear_for_methods_whose_linear_merge_is_exact(tmp_path, saved_bn):
    report = merge_saved_adapters([saved_bn / "a", saved_bn / "b"], tmp_path / "out", linear_lora="exact")
    assert report.combine_strategy == "linear" and report.notes == []


def test_strategy_options_reach_the_strategy(tmp_path):
    a, b = two_peft(tmp_path)
    with pytest.raises(TypeError, match=r"Unknown option\(s\) \['no_such_option'\] for combine_strategy='ties'"):
        merge_saved_adapters([a, b], tmp_path / "out", combine_strategy="ties", no_such_option=1)
    assert not (tmp_path / "out").exists()


def test_recipe_extra_and_notes(tmp_path):
    a, b = two_peft(tmp_path)
    extra = {"ignored_keys": ["int8_mask"], "merge_method": "ties", "config_file": "x.yml"}
    report = merge_saved_adapters([a, b], tmp_path / "out", recipe_extra=extra, notes=["int8_mask was ignored."])
    assert report.notes[-1] == "int8_mask was ignored."
    data = json.loads((tmp_path / "out" / REPORT_NAME).read_text())
    assert {k: data["recipe"][k] for k in extra} == extra
    assert data["report"]["notes"][-1] == "int8_mask was ignored."
    card = (tmp_path / "out" / CARD_NAME).read_text()
    assert '- ignored keys: ["int8_mask"]' in card and "int8_mask was ignored." in card
    with pytest.raises(ValueError, match=r"may not replace the recipe's own entries \['combine_strategy'\]"):
        merge_saved_adapters([a, b], tmp_path / "x", recipe_extra={"combine_strategy": "ties"})
    with pytest.raises(TypeError, match="recipe_extra must hold JSON values only"):
        merge_saved_adapters([a, b], tmp_path / "x", recipe_extra={"path": Path("x")})
    with pytest.raises(TypeError, match="notes must be a list of strings"):
        merge_saved_adapters([a, b], tmp_path / "x", notes="one note")
    assert not (tmp_path / "x").exists()


# ============================================================================ item 21: the model card
def test_the_output_holds_a_model_card(tmp_path):
    a, b = two_peft(tmp_path)
    report = merge_saved_adapters({a: 1.0, b: -0.5}, tmp_path / "out", combine_strategy="task_arithmetic",
                                  normalize_weights=False)
    out = tmp_path / "out"
    recipe = json.loads((out / REPORT_NAME).read_text())
    assert set(recipe["files"]) == {p.name for p in out.iterdir()} and CARD_NAME in recipe["files"]
    assert (recipe["recipe"]["combine_strategy_asked"], recipe["recipe"]["combine_strategy"]) == (
        "task_arithmetic", "lora_delta_w_svd")
    card = (out / CARD_NAME).read_text()
    assert card.startswith("---\nlibrary_name: peft\nbase_model: \"org/tiny-llama\"\n")
    assert "- Strategy: `task_arithmetic` as asked, resolved to `lora_delta_w_svd`." in card
    assert "- Weights: used as given (not normalised)" in card
    for item in recipe["recipe"]["inputs"]:
        assert f"| `{item['source']}` | {item['weight']:+.6g} | org/tiny-llama | `{item['sha256']}` | — |" in card
    assert report.summary() in card
    assert f"adapter_merging {adapter_merging.__version__}" in card
