"""Acceptance of the YAML front end: mergekit 0.1.5 itself, run on full models base + ΔWᵢ, gives the same
merged update as `adapter-merge` on the LoRA adapters those ΔWᵢ come from (issue 17, item 13).

mergekit 0.1.5 needs transformers ≥ 5, so it runs in its own virtual environment, made once under
``~/.cache/adapter_merging/mergekit-0.1.5`` (or ``$ADAPTER_MERGING_CACHE``) and reused; the test is
skipped, with the reason, only where that environment cannot be installed.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import yaml

MERGEKIT_VERSION = "0.1.5"
CACHE = Path(os.environ.get("ADAPTER_MERGING_CACHE", Path.home() / ".cache" / "adapter_merging"))
VENV = CACHE / f"mergekit-{MERGEKIT_VERSION}"


def mergekit_python() -> Path:
    """The Python of a virtual environment holding mergekit 0.1.5 (made on first use: about 2 minutes)."""
    python = VENV / "bin" / "python"
    if python.exists():
        return python
    partial = VENV.with_name(VENV.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    steps = [
        [sys.executable, "-m", "venv", str(partial)],
        # torch first, so that pip takes the CPU build this machine already has
        [str(partial / "bin" / "python"), "-m", "pip", "install", "-q", f"torch=={torch.__version__.split('+')[0]}"],
        [str(partial / "bin" / "python"), "-m", "pip", "install", "-q", f"mergekit=={MERGEKIT_VERSION}"],
    ]
    for step in steps:
        result = subprocess.run(step, capture_output=True, text=True)
        if result.returncode:
            shutil.rmtree(partial, ignore_errors=True)
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(f"mergekit {MERGEKIT_VERSION} cannot be installed here ({' '.join(step[-2:])}: {last})")
    partial.rename(VENV)
    return python


DRIVER = textwrap.dedent("""
    import sys, yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=0)
    for config, out in zip(sys.argv[1::2], sys.argv[2::2]):
        with open(config) as f:
            run_merge(MergeConfiguration.model_validate(yaml.safe_load(f)), out, options)
""")

#: different ranks, a rank and an alpha pattern, rsLoRA, different target modules
SPECS = [
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
         rank_pattern={"model.layers.0.self_attn.q_proj": 6}, alpha_pattern={"v_proj": 3}),
    dict(r=2, lora_alpha=3, target_modules=["q_proj", "k_proj", "down_proj"], use_rslora=True),
    dict(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"]),
]

#: (merge_method, YAML parameters, per-model parameters): negative weights, fractional densities
CASES = {
    "linear": ("linear", {}, [dict(weight=1.0), dict(weight=0.5), dict(weight=-0.7)]),
    "task_arithmetic": ("task_arithmetic", {"lambda": 0.9},
                        [dict(weight=1.0), dict(weight=0.5), dict(weight=-0.7)]),
    "ties": ("ties", {}, [dict(weight=1.0, density=0.3), dict(weight=0.5, density=0.55),
                          dict(weight=-0.7, density=0.8)]),
    "ties_unnormalized_rescaled": ("ties", {"normalize": False, "rescale": True, "int8_mask": True, "lambda": 1.2},
                                   [dict(weight=1.0, density=0.3), dict(weight=0.5, density=0.55),
                                    dict(weight=-0.7, density=0.8)]),
    "breadcrumbs": ("breadcrumbs", {"lambda": 1.3}, [dict(weight=1.0, density=0.4, gamma=0.05),
                                                     dict(weight=-0.6, density=0.7, gamma=0.05),
                                                     dict(weight=0.8, density=0.9, gamma=0.05)]),
    "breadcrumbs_normalized": ("breadcrumbs", {"normalize": True},
                               [dict(weight=1.0, density=0.4, gamma=0.1), dict(weight=0.6, density=0.7, gamma=0.1),
                                dict(weight=-0.3, density=0.95, gamma=0.1)]),
    "breadcrumbs_ties": ("breadcrumbs_ties", {"normalize": True},
                         [dict(weight=1.0, density=0.4, gamma=0.1), dict(weight=0.5, density=0.6, gamma=0.1),
                          dict(weight=-0.7, density=0.8, gamma=0.1)]),
    # DELLA's masks are random (mergekit's torch.bernoulli is not reproduced): density 1 keeps everything
    # there, so these check the YAML's names and defaults (della: normalize and TIES consensus) exactly
    "della_density_one": ("della", {}, [dict(weight=1.0, density=1.0, epsilon=0.2), dict(weight=0.5, density=1.0),
                                        dict(weight=-0.7, density=1.0, epsilon=0.3)]),
    "della_linear_density_one": ("della_linear", {"lambda": 1.2, "epsilon": 0.1},
                                 [dict(weight=1.0, density=1.0), dict(weight=0.5, density=1.0),
                                  dict(weight=-0.7, density=1.0)]),
}


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=37, vocab_size=99)
    return LlamaForCausalLM(config).double()


def weights_of(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def merged_full_model(base_folder: Path, adapter: Path):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(tiny_llama(), str(adapter))
    return model.merge_and_unload()


def read_safetensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def write_yaml(path: Path, method, shared, per_model, models, base=None):
    config = {"models": [{"model": str(m), "parameters": p} for m, p in zip(models, per_model)],
              "merge_method": method, "dtype": "float64"}
    if shared:
        config["parameters"] = shared
    if base is not None:
        config["base_model"] = str(base)
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The base model, three LoRA adapters (float64, random trained-like factors) and the full models
    base + ΔWᵢ, saved; and mergekit's merges of the full models for every case."""
    python = mergekit_python()
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("mergekit_reference")
    base = tiny_llama()
    base.save_pretrained(str(root / "base"))
    adapters, fulls = [], []
    for i, spec in enumerate(SPECS):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(tiny_llama(), LoraConfig(**spec))
        generator = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for key, param in model.named_parameters():
                if "lora_" in key:
                    param.copy_(0.2 * torch.randn(param.shape, generator=generator, dtype=param.dtype))
        model.save_pretrained(str(root / f"lora{i}"))
        adapters.append(root / f"lora{i}")
        merged_full_model(root / "base", root / f"lora{i}").save_pretrained(str(root / f"full{i}"))
        fulls.append(root / f"full{i}")
    arguments = []
    for case, (method, shared, per_model) in CASES.items():
        # mergekit's linear takes a `base_model` as one more input (needing a weight): give it none there
        base_model = None if method == "linear" else root / "base"
        arguments += [str(write_yaml(root / f"{case}.mk.yml", method, shared, per_model, fulls, base_model)),
                      str(root / f"{case}.mergekit")]
    driver = root / "driver.py"
    driver.write_text(DRIVER, encoding="utf-8")
    result = subprocess.run([str(python), str(driver), *arguments], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return root, adapters, weights_of(base)


@pytest.mark.parametrize("case", list(CASES))
def test_our_yaml_merge_equals_mergekits(built, case):
    from adapter_merging.cli import plan_from_yaml
    from adapter_merging.files import merge_saved_adapters

    root, adapters, base = built
    method, shared, per_model = CASES[case]
    # at full rank: the sparsified merge re-factorised without truncation (min(d, k) ≤ 37 here)
    ours_shared = dict(shared, svd_rank=64) if method not in ("linear", "task_arithmetic") else shared
    plan = plan_from_yaml(write_yaml(root / f"{case}.ours.yml", method, ours_shared, per_model, adapters))
    out = root / f"{case}_ours"
    merge_saved_adapters(plan["inputs"], out, weights=plan["weights"], combine_strategy=plan["strategy"],
                         normalize_weights=plan["normalize"], linear_lora=plan["linear_lora"], **plan["options"])
    ours = weights_of(merged_full_model(root / "base", out))
    theirs = read_safetensors(root / f"{case}.mergekit")
    changed = 0
    for key, value in base.items():
        if key not in theirs:
            continue
        expected, got = theirs[key].double() - value, ours[key] - value
        scale = float(expected.norm())
        if scale <= 1e-12 * float(value.norm()):  # a module no LoRA changes: mergekit's W + 0 − W rounds
            assert float(got.norm()) <= 1e-12 * float(value.norm()), key
            continue
        changed += 1
        assert float((got - expected).norm()) <= 1e-5 * scale, (key, float((got - expected).norm()) / scale)
    assert changed == 8  # q_proj, k_proj, v_proj, down_proj of both layers: every module a LoRA changes
