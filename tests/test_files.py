"""Merging saved adapters without a model (`adapter_merging.merge_saved_adapters`).

adapters format: folders written by ``model.save_adapter``, merged from files, loaded back with
``model.load_adapter``, must equal the in-model merge of the same adapters (tensors and outputs).
PEFT format: LoRAs of every kind PEFT saves, merged from files, loaded with
``PeftModel.from_pretrained``: each module's effective update (PEFT's own ``get_delta_weight``) must
equal the exact target Σ λᵢ ΔWᵢ computed here from the inputs (dense float64).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import warnings
from pathlib import Path

import adapters
import pytest
import torch
from adapters import LoRAConfig

import adapter_merging
from adapter_merging import merge_saved_adapters
from adapter_merging.files import REPORT_NAME
from adapter_merging.files.io import LazyFile
from adapter_merging.state import adapter_tensors, model_tensors
from conftest import model_inputs, randomize_adapter, tiny_adapter_model

EXACT = 1e-5


# ============================================================================ adapters format
ADAPTER_CASES = {
    "lora": (lambda i: LoRAConfig(r=2 + i, alpha=4), "lora_delta_w_concat", [1.0, -0.5]),
    "lora_svd": (lambda i: LoRAConfig(r=2 + i, alpha=4 + i), "lora_delta_w_svd", [0.7, 0.6]),
    "seq_bn": (lambda i: "seq_bn", "linear", [0.7, -0.4]),
    "prefix_tuning": (lambda i: "prefix_tuning", "linear", [0.7, 0.3]),
    "ia3": (lambda i: "ia3", "linear", [1.0, -1.0]),
    "mam": (lambda i: "mam", "linear", [0.6, 0.4]),
}


def saved_pair(tmp_path: Path, make_config, with_head=True):
    """A model with adapters 'a' and 'b' (and heads), each saved into its own folder."""
    model = tiny_adapter_model("bert")
    for i, name in enumerate(("a", "b")):
        model.add_adapter(name, config=make_config(i))
        randomize_adapter(model, name, seed=i + 1)
        if with_head:
            model.add_classification_head(name, num_labels=3)
            with torch.no_grad():
                for p in model.heads[name].parameters():
                    p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(10 + i)))
        model.save_adapter(str(tmp_path / name), name, with_head=with_head)
    return model


def file_hashes(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("case", list(ADAPTER_CASES))
def test_adapters_format_round_trip_equals_the_in_model_merge(case, tmp_path):
    make_config, strategy, weights = ADAPTER_CASES[case]
    model = saved_pair(tmp_path, make_config)
    before = {n: file_hashes(tmp_path / n) for n in ("a", "b")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        report = merge_saved_adapters([tmp_path / "a", tmp_path / "b"], tmp_path / "merged", weights=weights,
                                      combine_strategy=strategy, normalize_weights=False)
        model.average_adapter("reference", ["a", "b"], weights=weights, combine_strategy=strategy, normalize_weights=False)
        model.average_head("reference", ["a", "b"], weights=weights, normalize_weights=False)
    assert {n: file_hashes(tmp_path / n) for n in ("a", "b")} == before, "inputs are never modified"
    assert report.adapter_name == "merged"
    loaded = model.load_adapter(str(tmp_path / "merged"))
    assert loaded == "merged" and "merged" in model.heads
    assert model.adapters_config.get("merged") == model.adapters_config.get("reference")
    named = model_tensors(model)
    for containers in (None, ("heads",)):
        kwargs = {"containers": containers} if containers else {}
        mine, theirs = adapter_tensors(named, "merged", **kwargs), adapter_tensors(named, "reference", **kwargs)
        assert mine.keys() == theirs.keys() and mine
        for slot in mine:
            torch.testing.assert_close(mine[slot], theirs[slot], rtol=1e-6, atol=1e-7)
    outputs = {}
    for name in ("merged", "reference"):
        model.set_active_adapters(name)
        with torch.no_grad():
            outputs[name] = model(**model_inputs(model), head=name).logits
    torch.testing.assert_close(outputs["merged"], outputs["reference"], rtol=1e-5, atol=1e-6)


def test_adapters_format_recipe_says_where_the_adapter_came_from(tmp_path):
    saved_pair(tmp_path, lambda i: LoRAConfig(r=2, alpha=4))
    report = merge_saved_adapters({str(tmp_path / "a"): 1.0, str(tmp_path / "b"): -1.0}, tmp_path / "out",
                                  combine_strategy="lora_delta_w_svd", normalize_weights=False, svd_rank=2)
    recipe = json.loads((tmp_path / "out" / REPORT_NAME).read_text(encoding="utf-8"))
    assert recipe["format"] == "adapters" and recipe["name"] == "out"
    assert set(recipe["files"]) == {p.name for p in (tmp_path / "out").iterdir()}
    inputs = recipe["recipe"]["inputs"]
    assert [i["weight"] for i in inputs] == [1.0, -1.0]
    assert inputs[0]["sha256"] == hashlib.sha256((tmp_path / "a" / "pytorch_adapter.bin").read_bytes()).hexdigest()
    assert recipe["recipe"]["combine_strategy"] == "lora_delta_w_svd" and recipe["recipe"]["svd_rank"] == 2
    assert recipe["versions"]["adapter_merging"] == adapter_merging.__version__
    assert recipe["versions"]["adapters"] == adapters.__version__ and recipe["versions"]["torch"] == torch.__version__
    assert recipe["report"] == report.to_dict() and len(recipe["report"]["modules"]) == 4


def test_heads_merge_only_when_every_input_has_one(tmp_path):
    model = saved_pair(tmp_path, lambda i: "seq_bn")
    model.save_adapter(str(tmp_path / "b_headless"), "b", with_head=False)
    report = merge_saved_adapters([tmp_path / "a", tmp_path / "b_headless"], tmp_path / "out")
    assert not (tmp_path / "out" / "head_config.json").exists()
    assert any("without a prediction head" in note for note in report.notes)


def test_name_of_the_stored_adapter(tmp_path):
    model = saved_pair(tmp_path, lambda i: "seq_bn", with_head=False)
    merge_saved_adapters([tmp_path / "a", tmp_path / "b"], tmp_path / "out", name="avg")
    assert model.load_adapter(str(tmp_path / "out")) == "avg"


# ============================================================================ safety and bad inputs
@pytest.fixture
def pair(tmp_path):
    saved_pair(tmp_path, lambda i: LoRAConfig(r=2, alpha=4), with_head=False)
    return tmp_path


def _no_leftovers(folder: Path, output: str = "out"):
    assert not (folder / output).exists()
    assert not [p for p in folder.iterdir() if p.name.startswith(f".{output}.")], "no temporary folder is left"


class _Payload:
    """Unpickling this would run code: create a file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_that_would_run_code_is_refused(pair):
    marker = pair / "PWNED"
    with open(pair / "b" / "pytorch_adapter.bin", "wb") as handle:
        pickle.dump({"x": _Payload(str(marker))}, handle)
    with pytest.raises(ValueError, match="refused: it is a pickle that would run code"):
        merge_saved_adapters([pair / "a", pair / "b"], pair / "out")
    assert not marker.exists(), "the payload must not run"
    _no_leftovers(pair)


@pytest.mark.parametrize("problem, match", [
    ("missing folder", "is not a folder"),
    ("no weights file", "holds no weights file"),
    ("no config", "holds no adapter_config.json"),
    ("corrupted safetensors", "not a readable safetensors file"),
    ("truncated pickle", "not a readable weights file"),
])
def test_bad_inputs_get_a_clear_error_and_no_output(pair, problem, match):
    folder = pair / "b"
    if problem == "missing folder":
        folder = pair / "nope"
    elif problem == "no weights file":
        (folder / "pytorch_adapter.bin").unlink()
    elif problem == "no config":
        (folder / "adapter_config.json").unlink()
    elif problem == "corrupted safetensors":
        (folder / "pytorch_adapter.bin").unlink()
        (folder / "adapter.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    elif problem == "truncated pickle":
        data = (folder / "pytorch_adapter.bin").read_bytes()
        (folder / "pytorch_adapter.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=match):
        merge_saved_adapters([pair / "a", folder], pair / "out")
    _no_leftovers(pair)


def test_mixed_formats_are_refused(pair, tmp_path_factory):
    peft_folder = save_peft_loras(tmp_path_factory.mktemp("peft"), "llama", [PEFT_SPECS["llama"][0]])[0]
    with pytest.raises(ValueError, match="mix formats"):
        merge_saved_adapters([pair / "a", peft_folder], pair / "out")
    _no_leftovers(pair)


def test_mismatched_shapes_are_refused(pair):
    from adapters import AutoAdapterModel

    from conftest import TINY_CONFIGS

    config = TINY_CONFIGS["bert"]()  # the same architecture with another hidden size
    config.hidden_size, config.intermediate_size = 48, 40
    other = AutoAdapterModel.from_config(config)
    other.add_adapter("c", config=LoRAConfig(r=2, alpha=4))
    other.save_adapter(str(pair / "c"), "c", with_head=False)
    with pytest.raises(ValueError, match="different shapes"):
        merge_saved_adapters([pair / "a", pair / "c"], pair / "out", combine_strategy="lora_delta_w_concat")
    _no_leftovers(pair)


def test_existing_output(pair):
    (pair / "out").mkdir()
    merge_saved_adapters([pair / "a", pair / "b"], pair / "out")  # an existing empty folder is fine
    first = file_hashes(pair / "out")
    with pytest.raises(ValueError, match="exists and is not empty.*overwrite_ok=True"):
        merge_saved_adapters([pair / "a", pair / "b"], pair / "out", weights=[0.9, 0.1])
    assert file_hashes(pair / "out") == first
    merge_saved_adapters([pair / "a", pair / "b"], pair / "out", weights=[0.9, 0.1], overwrite_ok=True)
    assert file_hashes(pair / "out")["pytorch_adapter.bin"] != first["pytorch_adapter.bin"]
    with pytest.raises(ValueError, match="is one of the inputs"):
        merge_saved_adapters([pair / "a", pair / "b"], pair / "a", overwrite_ok=True)


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_failed_write_leaves_no_folder(pair, monkeypatch, error):
    import adapter_merging.files as files

    def fail(*args, **kwargs):
        (args[0] / "pytorch_adapter.bin").write_bytes(b"half")  # a half-written folder
        raise error

    monkeypatch.setattr(files, "write_adapters_format", fail)
    with pytest.raises(type(error)):
        merge_saved_adapters([pair / "a", pair / "b"], pair / "out")
    _no_leftovers(pair)


def test_reading_does_not_load_tensors(pair, monkeypatch):
    """Reading a folder reads only its metadata; tensors are loaded when the merge needs them."""
    from safetensors.torch import save_file

    from adapter_merging.files.formats import read_adapter

    state = torch.load(pair / "a" / "pytorch_adapter.bin", weights_only=True)
    (pair / "a" / "pytorch_adapter.bin").unlink()
    save_file(state, str(pair / "a" / "adapter.safetensors"))
    reads = []
    original = LazyFile.__getitem__
    monkeypatch.setattr(LazyFile, "__getitem__", lambda self, key: reads.append(key) or original(self, key))
    saved = read_adapter(pair / "a", "a", "a")
    assert reads == [] and len(saved.adapter.tensors) == len(state)
    assert saved.adapter.tensors.dtype_of(next(iter(saved.adapter.tensors))) == torch.float32 and reads == []


def test_weights_and_options_are_checked_as_in_average_adapter(pair):
    with pytest.raises(ValueError, match="normalize_weights=False"):
        merge_saved_adapters([pair / "a", pair / "b"], pair / "out", weights=[1.0, -1.0])
    with pytest.raises(TypeError, match="unordered"):
        merge_saved_adapters({str(pair / "a"), str(pair / "b")}, pair / "out")
    with pytest.raises(TypeError, match="overwrite_ok must be True or False"):
        merge_saved_adapters([pair / "a", pair / "b"], pair / "out", overwrite_ok="yes")
    with pytest.raises(ValueError, match="Invalid combine_strategy"):
        merge_saved_adapters([pair / "a", pair / "b"], pair / "out", combine_strategy="nope")
    _no_leftovers(pair)


def test_dtype_of_the_merged_adapter(pair):
    merge_saved_adapters([pair / "a", pair / "b"], pair / "out", combine_strategy="lora_delta_w_svd", dtype="bfloat16")
    state = torch.load(pair / "out" / "pytorch_adapter.bin", weights_only=True)
    assert {t.dtype for t in state.values()} == {torch.bfloat16}


# ============================================================================ PEFT format
def tiny_base(arch: str):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, intermediate_size=37, vocab_size=99))
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=99, n_positions=64))
    if arch == "conv":
        return ConvNet()
    raise AssertionError(arch)


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.embed = torch.nn.Embedding(11, 6)
        self.lin = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.lin(self.conv(x).mean((2, 3)))


#: per base model, the LoRA configurations of the inputs: different ranks, rank/alpha patterns, rsLoRA,
#: Conv1D (fan_in_fan_out), Embedding and Conv2d LoRAs, and different target modules
PEFT_SPECS = {
    "llama": [
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"],
             rank_pattern={"model.layers.0.self_attn.q_proj": 6}, alpha_pattern={"v_proj": 3}),
        dict(r=2, lora_alpha=3, target_modules=["q_proj", "k_proj", "down_proj"], use_rslora=True),
        dict(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj"]),
    ],
    "gpt2": [
        dict(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
        dict(r=4, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True),
    ],
    "conv": [
        dict(r=2, lora_alpha=4, target_modules=["conv", "lin", "embed"]),
        dict(r=3, lora_alpha=3, target_modules=["conv", "lin"]),
    ],
}


def save_peft_loras(folder: Path, arch: str, specs):
    """Save one PEFT LoRA per spec (trained-like: random non-zero factors); returns the folders."""
    from peft import LoraConfig, get_peft_model

    folders = []
    for i, spec in enumerate(specs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(tiny_base(arch), LoraConfig(**spec))
        generator = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for key, param in model.named_parameters():
                if "lora_" in key:
                    param.copy_(0.2 * torch.randn(param.shape, generator=generator))
        model.save_pretrained(str(folder / f"lora{i}"))
        folders.append(folder / f"lora{i}")
    return folders


def peft_updates(arch: str, folder: Path) -> dict:
    """{module name: the update PEFT applies (its own get_delta_weight), float64} of a saved LoRA."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(tiny_base(arch), str(folder))
    updates = {}
    for name, module in model.named_modules():
        factors = list(getattr(module, "lora_A", {})) + list(getattr(module, "lora_embedding_A", {}))
        if hasattr(module, "get_delta_weight") and "default" in factors:
            updates[name] = module.get_delta_weight("default").detach().double()
    return updates


@pytest.mark.parametrize("strategy", ["lora_delta_w_concat", "lora_delta_w_svd", "linear_of_one"])
@pytest.mark.parametrize("arch", list(PEFT_SPECS))
def test_peft_round_trip_is_exact(arch, strategy, tmp_path):
    folders = save_peft_loras(tmp_path, arch, PEFT_SPECS[arch])
    weights = [1.0, -1.0, 0.5][: len(folders)]
    if strategy == "linear_of_one":  # a single input through the parameter rule: its own update back
        folders, weights, strategy = folders[:1], [1.0], "linear"
    report = merge_saved_adapters(folders, tmp_path / "out", weights=weights, combine_strategy=strategy,
                                  normalize_weights=False)
    inputs = [peft_updates(arch, f) for f in folders]
    merged = peft_updates(arch, tmp_path / "out")
    modules = set().union(*inputs)
    assert set(merged) == modules, "the output covers the union of the inputs' target modules"
    for module in modules:
        target = sum(w * u[module] for w, u in zip(weights, inputs) if module in u)
        error = float(torch.linalg.norm(merged[module] - target) / torch.linalg.norm(target))
        assert error <= EXACT, (module, error)
    assert report.max_error <= EXACT


def test_peft_outputs_equal_after_reload(tmp_path):
    """Loaded with PeftModel.from_pretrained, the merged adapter gives the outputs of the exact sum."""
    from peft import PeftModel

    folders = save_peft_loras(tmp_path, "llama", PEFT_SPECS["llama"][:2])
    merge_saved_adapters(folders, tmp_path / "out", weights=[1.0, -1.0], combine_strategy="lora_delta_w_concat",
                         normalize_weights=False)
    ids = torch.randint(0, 99, (2, 7), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = PeftModel.from_pretrained(tiny_base("llama"), str(tmp_path / "out"))
        reference = tiny_base("llama")
    with torch.no_grad():  # the reference: the base weights plus the exact update, added by hand
        for folder, sign in ((folders[0], 1.0), (folders[1], -1.0)):
            for name, update in peft_updates("llama", folder).items():
                reference.get_submodule(name.removeprefix("base_model.model.")).weight += sign * update.float()
        torch.testing.assert_close(merged(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-5)


def test_peft_ia3_merges_the_deviation_from_identity(tmp_path):
    from peft import IA3Config, PeftModel, get_peft_model

    vectors = []
    for i in range(2):
        model = get_peft_model(tiny_base("llama"), IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
        with torch.no_grad():
            for key, param in model.named_parameters():
                if "ia3_l" in key:
                    param.add_(0.3 * torch.randn(param.shape, generator=torch.Generator().manual_seed(i)))
        model.save_pretrained(str(tmp_path / f"ia3_{i}"))
        vectors.append({k: p.detach().clone() for k, p in model.named_parameters() if "ia3_l" in k})
    merge_saved_adapters([tmp_path / "ia3_0", tmp_path / "ia3_1"], tmp_path / "out", weights=[1.0, -1.0],
                         normalize_weights=False)
    merged = PeftModel.from_pretrained(tiny_base("llama"), str(tmp_path / "out"))
    got = {k: p.detach() for k, p in merged.named_parameters() if "ia3_l" in k}
    assert got.keys() == vectors[0].keys()
    for key in got:
        torch.testing.assert_close(got[key], 1.0 + (vectors[0][key] - 1.0) - (vectors[1][key] - 1.0))


def test_peft_dora_is_refused_clearly(tmp_path):
    from peft import LoraConfig, get_peft_model

    for name in ("d0", "d1"):
        model = get_peft_model(tiny_base("llama"), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
        model.save_pretrained(str(tmp_path / name))
    with pytest.raises(ValueError, match="use_dora=True.*DoRA"):
        merge_saved_adapters([tmp_path / "d0", tmp_path / "d1"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_safetensors_are_written_one_tensor_at_a_time_in_the_standard_format(tmp_path):
    from safetensors import safe_open

    from adapter_merging.files.io import write_safetensors

    tensors = {"b.weight": torch.randn(3, 5), "a": torch.randn(7).to(torch.bfloat16), "i": torch.arange(6).reshape(2, 3),
               "h": torch.randn(2, 2).half(), "empty": torch.zeros(0, 4), "f64": torch.randn(2, dtype=torch.float64)}
    write_safetensors(tmp_path / "x.safetensors", tensors, {"format": "pt"})
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
        for key, tensor in tensors.items():
            assert torch.equal(handle.get_tensor(key), tensor) and handle.get_tensor(key).dtype == tensor.dtype
