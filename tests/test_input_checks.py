"""The engine refuses what it cannot merge honestly, before any rule sees it, whatever the front end:
non-finite inputs (issue 17, items 5 and 14), a requested storage dtype measured against the inputs as
stored (item 8), malformed saved configurations (item 15) and a breadcrumbs band wider than everything."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import os
import warnings
from pathlib import Path

import pytest
import torch
from adapters import LoRAConfig
from safetensors.torch import save_file

from adapter_merging import merge_saved_adapters
from adapter_merging.files.io import InputError, LazyFile
from adapter_merging.ops import chunked
from adapter_merging.state import adapter_tensors
from conftest import randomize_adapter, tiny_adapter_model

ROOT = Path(__file__).resolve().parents[1]

#: every strategy that merges LoRA, with options that make it run on a tiny model
STRATEGIES = {
    "linear": {},
    "lora_delta_w_concat": {},
    "lora_delta_w_svd": {},
    "ties": {"density": 0.5},
    "dare_ties": {"density": 0.5, "seed": 1},
    "dare_linear": {"density": 0.5, "seed": 1},
    "magnitude_prune": {"density": 0.5},
    "breadcrumbs": {"density": 0.5, "gamma": 0.1},
}


def lora_model():
    model = tiny_adapter_model("bert")
    for i, name in enumerate(("a", "b")):
        model.add_adapter(name, config=LoRAConfig(r=2, alpha=4))
        randomize_adapter(model, name, seed=i + 1)
    return model


def poison(model, name: str, value: float):
    """Put ``value`` into one entry of one tensor of adapter ``name``; returns that tensor's key."""
    slots = adapter_tensors(dict(model.named_parameters()), name)
    slot = sorted(slots)[3]
    with torch.no_grad():
        slots[slot][1, 0] = value
    return slot.key(name)


def state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ============================================================================ non-finite inputs: in memory
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_a_nan_input_is_refused_by_every_strategy_naming_adapter_and_tensor(strategy):
    model = lora_model()
    key = poison(model, "b", float("nan"))
    before = state(model)
    with pytest.raises(ValueError) as error:
        model.average_adapter("m", ["a", "b"], combine_strategy=strategy, **STRATEGIES[strategy])
    message = str(error.value)
    assert f"The adapter 'b' has non-finite values (NaN or inf) in {key} (1 NaN of 64 entries)" in message, message
    assert "m" not in model.adapters_config.adapters
    after = state(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) or torch.isnan(before[k]).any() for k in before)


@pytest.mark.parametrize("strategy", ["linear", "lora_delta_w_svd", "ties"])
def test_an_inf_input_with_weight_zero_is_refused_too(strategy):
    model = lora_model()
    key = poison(model, "a", float("inf"))
    with pytest.raises(ValueError, match=r"The adapter 'a' has non-finite values \(NaN or inf\) in .* \(1 ±inf of") as error:
        model.average_adapter("m", ["a", "b"], weights=[0.0, 1.0], combine_strategy=strategy,
                              normalize_weights=False, **STRATEGIES[strategy])
    assert key in str(error.value)


def test_overflow_of_finite_inputs_is_still_caught_after_the_merge():
    model = lora_model()
    with pytest.raises(ValueError, match="is not finite: the weights make it overflow"):
        model.average_adapter("m", ["a", "b"], weights=[1e39, 1e39], normalize_weights=False)


def test_a_nan_in_a_peft_model_is_refused_by_add_weighted_adapter():
    from peft import LoraConfig as PeftLoraConfig, get_peft_model
    from transformers import BertConfig, BertModel

    from adapter_merging.peft import add_weighted_adapter

    torch.manual_seed(0)
    base = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37, vocab_size=99))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base, PeftLoraConfig(r=2, lora_alpha=4, target_modules=["query"]), adapter_name="a")
        model.add_adapter("b", PeftLoraConfig(r=2, lora_alpha=4, target_modules=["query"]))
    with torch.no_grad():
        for key, param in model.named_parameters():
            if "lora_" in key:
                param.normal_(0, 0.2)
        bad = next(p for k, p in model.named_parameters() if "lora_A.b" in k)
        bad[0, 0] = float("nan")
    for combination, options in (("svd", {}), ("ties", {"density": 0.5}), ("dare_linear", {"density": 0.5})):
        with pytest.raises(ValueError, match="The adapter 'b' has non-finite values") as error:
            add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "m", combination_type=combination, **options)
        assert "query" in str(error.value)
        assert "m" not in model.peft_config


# ============================================================================ non-finite inputs: files and CLI
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two saved fp32 LoRA adapters (adapters format) of the same rank, and a copy of 'b' holding a NaN."""
    base = tmp_path_factory.mktemp("saved")
    model = lora_model()
    for name in ("a", "b"):
        model.save_adapter(str(base / name), name, with_head=False)
    shutil.copytree(base / "b", base / "nan")
    weights = next(p for p in (base / "nan").iterdir() if p.name in ("pytorch_adapter.bin", "adapter.safetensors"))
    tensors = {k: v.clone() for k, v in LazyFile(weights).items()}
    key = sorted(tensors)[3]
    tensors[key][0, 1] = float("nan")
    rewrite(weights, tensors)
    return base, key


def rewrite(path: Path, tensors: dict) -> None:
    """Replace a weights file (a new file renamed over it: the old one may still be memory-mapped)."""
    new = path.with_name(path.name + ".new")
    if path.suffix == ".safetensors":
        save_file(tensors, str(new))
    else:
        torch.save(tensors, new)
    os.replace(new, path)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_a_nan_in_a_saved_adapter_is_refused_by_every_strategy(strategy, saved, tmp_path):
    base, key = saved
    with pytest.raises(ValueError) as error:
        merge_saved_adapters([base / "a", base / "nan"], tmp_path / "out", combine_strategy=strategy,
                             **STRATEGIES[strategy])
    message = str(error.value)
    assert f"The adapter 'nan' has non-finite values (NaN or inf) in {key.replace('.b.', '.nan.')} (1 NaN of" in message, message
    assert not (tmp_path / "out").exists()


def test_the_cli_refuses_a_nan_input_in_one_line(saved, tmp_path):
    base, key = saved
    environment = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run(
        [sys.executable, "-m", "adapter_merging", str(base / "a"), str(base / "nan"), "-o", str(tmp_path / "out"),
         "--strategy", "ties", "--density", "0.5", "-q"],
        cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("adapter-merge: error: The adapter 'nan' has non-finite values"), result.stderr
    assert key.replace(".b.", ".nan.") in lines[0]
    assert not (tmp_path / "out").exists()


# ============================================================================ item 8: dtype as stored
def _factors(tensors: dict, name: str):
    """{module prefix: (B, A)} in float64 from a saved adapters-format state dict."""
    out = {}
    for key, tensor in tensors.items():
        if key.endswith(f".loras.{name}.lora_A"):
            prefix = key[: -len(f".loras.{name}.lora_A")]
            out[prefix] = (tensors[f"{prefix}.loras.{name}.lora_B"].double(), tensor.double())
    return out


def _config(folder: Path) -> dict:
    return json.loads((folder / "adapter_config.json").read_text())["config"]


def _read(folder: Path) -> dict:
    weights = next(p for p in folder.iterdir() if p.name in ("pytorch_adapter.bin", "adapter.safetensors"))
    return dict(LazyFile(weights))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("strategy", ["lora_delta_w_svd", "lora_delta_w_concat", "ties", "linear"])
def test_a_half_precision_output_is_measured_against_the_inputs_as_stored(strategy, dtype, saved, tmp_path):
    base, _ = saved
    weights = [0.7, -0.45]
    options = {"density": 0.5, "svd_rank": 32} if strategy == "ties" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = merge_saved_adapters([base / "a", base / "b"], tmp_path / "out", weights=weights, normalize_weights=False,
                                      combine_strategy=strategy, dtype=dtype, **options)
    inputs = [_factors(_read(base / n), n) for n in ("a", "b")]
    scalings = [_config(base / n)["alpha"] / _config(base / n)["r"] for n in ("a", "b")]
    out_tensors = _read(tmp_path / "out")
    assert {t.dtype for t in out_tensors.values()} == {getattr(torch, dtype)}
    assert report.dtype == dtype and any(f"Stored in {dtype} as asked" in note for note in report.notes)
    merged = _factors(out_tensors, "out")
    out_scaling = _config(tmp_path / "out")["alpha"] / _config(tmp_path / "out")["r"]
    reported = {m.module: m for m in report.modules}
    worst = 0.0
    for prefix, (b, a) in merged.items():
        parts = [(s * b_i, a_i) for s, (b_i, a_i) in zip(scalings, (inp[prefix] for inp in inputs))]
        if strategy == "ties":
            tasks = chunked.FactoredTasks(parts, [1.0, 1.0], torch.float64)
            target = chunked.merge(tasks, weights, chunked.KeepWindow(0.5), chunked.ties_consensus("total"), None)
        else:
            target = sum(w * (b_i @ a_i) for w, (b_i, a_i) in zip(weights, parts))
        true = float((out_scaling * (b @ a) - target).norm() / target.norm())
        module = reported[prefix]
        assert true <= module.relative_error + module.rounding_floor + 1e-7, (prefix, true, module)
        worst = max(worst, true)
    assert worst > 1e-5, "half-precision storage costs something: the test must see it"
    # the true error lies within the reported error ± its rounding floor (ties: its target is computed in float32)
    assert max(m.relative_error + m.rounding_floor for m in report.modules) >= worst


# ============================================================================ item 15: PEFT configurations
def peft_folder(folder: Path, **config) -> Path:
    """A hand-made PEFT LoRA folder: one Linear module 'lin' (4 × 6), rank 2, and what ``config`` changes."""
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    save_file({"base_model.model.lin.lora_A.weight": torch.randn(2, 6, generator=generator),
               "base_model.model.lin.lora_B.weight": torch.randn(4, 2, generator=generator)},
              str(folder / "adapter_model.safetensors"))
    metadata = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["lin"], "modules_to_save": None}
    metadata.update(config)
    (folder / "adapter_config.json").write_text(json.dumps(metadata))
    return folder


PEFT_BREAKAGES = {
    "r zero": (dict(r=0), "'r' is 0, but must be a positive integer"),
    "r string": (dict(r="abc"), "'r' is \"abc\", but must be a positive integer"),
    "r float": (dict(r=2.5), "'r' is 2.5, but must be a positive integer"),
    "alpha null": (dict(lora_alpha=None), "'lora_alpha' is null, but must be a number"),
    "alpha string": (dict(lora_alpha="8"), "'lora_alpha' is \"8\", but must be a number"),
    "alpha_pattern list": (dict(alpha_pattern=[1]), "'alpha_pattern' is [1], but must be a dict"),
    "rank_pattern bad regex": (dict(rank_pattern={"lin(": 2}), "'rank_pattern' has the key \"lin(\", which is not a valid regular expression"),
    "alpha_pattern bad regex": (dict(alpha_pattern={"[": 2}), "'alpha_pattern' has the key \"[\", which is not a valid regular expression"),
    "alpha_pattern string value": (dict(alpha_pattern={"lin": "2"}), "'alpha_pattern[\"lin\"]' is \"2\", but must be a number"),
    "use_rslora string": (dict(use_rslora="false"), "'use_rslora' is \"false\", but must be true or false"),
    "modules_to_save dict": (dict(modules_to_save={"lm_head": 1}), "'modules_to_save' is {\"lm_head\": 1}, but must be a list"),
}


@pytest.mark.parametrize("case", list(PEFT_BREAKAGES))
def test_a_malformed_peft_config_is_one_line_naming_file_and_key(case, tmp_path):
    config, expected = PEFT_BREAKAGES[case]
    good = peft_folder(tmp_path / "good")
    bad = peft_folder(tmp_path / "bad", **config)
    with pytest.raises(InputError) as error:
        merge_saved_adapters([good, bad], tmp_path / "out", combine_strategy="lora_delta_w_concat")
    message = str(error.value)
    assert "\n" not in message and expected in message, message
    assert str(bad / "adapter_config.json") in message
    assert not (tmp_path / "out").exists()


def test_a_rank_zero_tensor_is_refused_by_name(tmp_path):
    good = peft_folder(tmp_path / "good")
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file({"base_model.model.lin.lora_A.weight": torch.zeros(0, 6), "base_model.model.lin.lora_B.weight": torch.zeros(4, 0)},
              str(bad / "adapter_model.safetensors"))
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    with pytest.raises(InputError, match="the LoRA of 'lin' has rank 0"):
        merge_saved_adapters([good, bad], tmp_path / "out", combine_strategy="lora_delta_w_concat")


def test_modules_to_save_as_one_string_means_that_module(tmp_path):
    """PEFT keeps a string as it is and then matches each of its letters; here it means [string], and the
    output's configuration says so as a list."""
    folders = []
    for i, name in enumerate(("a", "b")):
        folder = peft_folder(tmp_path / name, modules_to_save="head")
        tensors = {k: v.clone() for k, v in LazyFile(folder / "adapter_model.safetensors").items()}
        tensors["base_model.model.head.weight"] = torch.full((3, 4), float(i + 1))
        rewrite(folder / "adapter_model.safetensors", tensors)
        folders.append(folder)
    merge_saved_adapters(folders, tmp_path / "out", combine_strategy="lora_delta_w_concat")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["head"]
    merged = LazyFile(tmp_path / "out" / "adapter_model.safetensors")
    assert torch.equal(merged["base_model.model.head.weight"], torch.full((3, 4), 1.5))


ADAPTERS_BREAKAGES = {
    "r zero": ({"r": 0}, "'config.r' is 0, but must be a positive integer"),
    "r string": ({"r": "abc"}, "'config.r' is \"abc\", but must be a positive integer"),
    "alpha null": ({"alpha": None}, "'config.alpha' is null, but must be a number"),
}


@pytest.mark.parametrize("case", list(ADAPTERS_BREAKAGES))
def test_a_malformed_adapters_config_is_one_line_naming_file_and_key(case, saved, tmp_path):
    base, _ = saved
    change, expected = ADAPTERS_BREAKAGES[case]
    shutil.copytree(base / "b", tmp_path / "bad")
    path = tmp_path / "bad" / "adapter_config.json"
    metadata = json.loads(path.read_text())
    metadata["config"].update(change)
    path.write_text(json.dumps(metadata))
    with pytest.raises(InputError) as error:
        merge_saved_adapters([base / "a", tmp_path / "bad"], tmp_path / "out", combine_strategy="lora_delta_w_concat")
    assert expected in str(error.value) and str(path) in str(error.value), str(error.value)


# ============================================================================ breadcrumbs: density + gamma ≤ 1
def test_breadcrumbs_refuses_a_band_wider_than_every_entry():
    model = lora_model()
    with pytest.raises(ValueError, match=r"density \+ gamma > 1\). Pass density ≤ 0.7"):
        model.average_adapter("m", ["a", "b"], combine_strategy="breadcrumbs", density=0.8, gamma=0.3)
    with pytest.raises(ValueError, match=r"density \+ gamma > 1"):
        model.average_adapter("m", ["a", "b"], combine_strategy="breadcrumbs", density=[0.5, 0.95], gamma=0.1)
    report = model.average_adapter("m", ["a", "b"], combine_strategy="breadcrumbs", density=0.7, gamma=0.3)
    assert math.isfinite(report.max_error)


# ============================================================================ item 22: adapters-format LoRAs on different modules
def test_adapters_format_loras_on_different_modules_are_refused_saying_what_differs_and_what_to_do(tmp_path):
    """Documented difference (docs/files.md): adapters-format LoRAs merge only on the same modules, even with an
    exact strategy; the refusal names every differing field with both values, and says what to do."""
    model = tiny_adapter_model("bert")
    model.add_adapter("a", config=LoRAConfig(r=2, attn_matrices=["q"]))
    model.add_adapter("b", config=LoRAConfig(r=2, attn_matrices=["v"], leave_out=[0]))
    for name in ("a", "b"):
        randomize_adapter(model, name)
        model.save_adapter(str(tmp_path / name), name, with_head=False)
    with pytest.raises(ValueError) as error:
        merge_saved_adapters([tmp_path / "a", tmp_path / "b"], tmp_path / "out", combine_strategy="lora_delta_w_concat")
    message = str(error.value)
    assert "'a' has attn_matrices=['q'] but 'b' has attn_matrices=['v'] (and leave_out=[] vs [0])" in message, message
    assert "merged only when they sit on the same modules" in message and "PEFT folders merge over the union" in message
    assert "Merge LoRAs trained on the same modules" in message
    assert not (tmp_path / "out").exists()
