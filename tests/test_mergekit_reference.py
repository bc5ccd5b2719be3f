"""Acceptance of the YAML front end: mergekit 0.1.5 itself, run on full models base + ΔWᵢ, gives the same
merged update as `adapter-merge` on the LoRA adapters those ΔWᵢ come from (issue 17, item 13), per-layer
``weight`` lists and conditions included (issue 20), module by module.

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


#: per-layer weights (issue 20), on a model of 4 layers (t = 0, 1/3, 2/3, 1: a list of 3 values is interpolated
#: between its points): (merge_method, YAML parameters, per-model parameters, which adapters). "all": the
#: adapters of SPECS on every layer; "first3": the same on layers 0–2 only, where mergekit's L (the base
#: model's 4 layers) differs from the adapters' count (3): our YAML names the base model's folder then.
GRADIENT_CASES = {
    "linear_gradient": ("linear", {}, [dict(weight=[1.0, 0.0, 0.5]), dict(weight=0.5), dict(weight=[-0.7, 0.2])],
                        "all"),
    "linear_conditions": ("linear", {"weight": 0.4},
                          [dict(weight=[{"filter": "self_attn", "value": [0.0, 1.0]}, {"filter": "mlp", "value": 2.0}]),
                           dict(weight=1.0),
                           dict(weight=[{"filter": "v_proj", "value": [0.3, 0.1, 0.9]}, {"value": 0.6}])], "all"),
    "task_arithmetic_gradient": ("task_arithmetic", {"lambda": 0.9, "weight": [0.2, 1.0]},
                                 [dict(weight=[1.0, 0.0, 0.5]), dict(), dict(weight=-0.7)], "all"),
    "ties_gradient": ("ties", {}, [dict(weight=[1.0, 0.0, 0.5], density=0.3), dict(weight=0.5, density=0.55),
                                   dict(weight=[-0.7, 0.4], density=0.8)], "all"),
    "task_arithmetic_last_layer_left_out": ("task_arithmetic", {"normalize": True},
                                            [dict(weight=[1.0, 0.0, 0.5]), dict(weight=[0.5, 1.5]), dict(weight=-0.7)],
                                            "first3"),
    "ties_last_layer_left_out": ("ties", {"normalize": False},
                                 [dict(weight=[1.0, 0.0, 0.5], density=0.5), dict(weight=[0.5, 1.5], density=0.7),
                                  dict(weight=-0.7, density=0.9)], "first3"),
}


def tiny_llama(layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=37, vocab_size=99)
    return LlamaForCausalLM(config).double()


def weights_of(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def merged_full_model(base_folder: Path, adapter: Path, layers: int = 2):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(tiny_llama(layers), str(adapter))
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


def build(root: Path, cases: dict, layers: int = 2, sets: dict = None):
    """Under ``root``: the base model, LoRA adapters (float64, random trained-like factors) per set of specs
    and the full models base + ΔWᵢ, saved; and mergekit's merges of the full models for every case.
    Returns {set: adapter folders} and the base model's weights."""
    python = mergekit_python()
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(layers)
    base.save_pretrained(str(root / "base"))
    adapters, fulls = {}, {}
    for name, specs in (sets or {"all": SPECS}).items():
        for i, spec in enumerate(specs):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = get_peft_model(tiny_llama(layers), LoraConfig(**spec))
            generator = torch.Generator().manual_seed(100 + i)
            with torch.no_grad():
                for key, param in model.named_parameters():
                    if "lora_" in key:
                        param.copy_(0.2 * torch.randn(param.shape, generator=generator, dtype=param.dtype))
            model.save_pretrained(str(root / f"{name}_lora{i}"))
            adapters.setdefault(name, []).append(root / f"{name}_lora{i}")
            full = merged_full_model(root / "base", root / f"{name}_lora{i}", layers)
            full.save_pretrained(str(root / f"{name}_full{i}"))
            fulls.setdefault(name, []).append(root / f"{name}_full{i}")
    arguments = []
    for case, (method, shared, per_model, *which) in cases.items():
        # mergekit's linear takes a `base_model` as one more input (needing a weight): give it none there
        base_model = None if method == "linear" else root / "base"
        models = fulls[which[0] if which else "all"]
        arguments += [str(write_yaml(root / f"{case}.mk.yml", method, shared, per_model, models, base_model)),
                      str(root / f"{case}.mergekit")]
    driver = root / "driver.py"
    driver.write_text(DRIVER, encoding="utf-8")
    result = subprocess.run([str(python), str(driver), *arguments], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return adapters, weights_of(base)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("mergekit_reference")
    adapters, base = build(root, CASES)
    return root, adapters["all"], base


@pytest.fixture(scope="module")
def built_layers(tmp_path_factory):
    """`build` on a 4-layer model, for the per-layer cases: the adapters on every layer, and on layers 0–2."""
    root = tmp_path_factory.mktemp("mergekit_reference_layers")
    first3 = [dict(spec, layers_to_transform=[0, 1, 2]) for spec in SPECS]
    adapters, base = build(root, GRADIENT_CASES, layers=4, sets={"all": SPECS, "first3": first3})
    return root, adapters, base


def merge_ours(root: Path, case: str, method, shared, per_model, adapters, base_model=None, layers: int = 2) -> dict:
    """The full model base + our merged update, from our YAML on the adapters (as `adapter-merge` reads it)."""
    from adapter_merging.cli import plan_from_yaml, plan_weights
    from adapter_merging.files import merge_saved_adapters

    # at full rank: the sparsified merge re-factorised without truncation (min(d, k) ≤ 37 here)
    ours_shared = dict(shared, svd_rank=64) if method not in ("linear", "task_arithmetic") else shared
    plan = plan_from_yaml(write_yaml(root / f"{case}.ours.yml", method, ours_shared, per_model, adapters, base_model))
    out = root / f"{case}_ours"
    merge_saved_adapters(plan["inputs"], out, weights=plan_weights(plan), combine_strategy=plan["strategy"],
                         normalize_weights=plan["normalize"], linear_lora=plan["linear_lora"],
                         base_model=plan["base_model"], notes=plan["notes"], **plan["options"])
    return weights_of(merged_full_model(root / "base", out, layers))


def assert_same_updates(base: dict, ours: dict, theirs: dict) -> int:
    """Every tensor's update (merged − base) ours equals mergekit's within 1e-5 (relative); returns how many
    tensors an adapter changes."""
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
    return changed


@pytest.mark.parametrize("case", list(CASES))
def test_our_yaml_merge_equals_mergekits(built, case):
    root, adapters, base = built
    method, shared, per_model = CASES[case]
    ours = merge_ours(root, case, method, shared, per_model, adapters)
    # q_proj, k_proj, v_proj, down_proj of both layers: every module a LoRA changes
    assert assert_same_updates(base, ours, read_safetensors(root / f"{case}.mergekit")) == 8


@pytest.mark.parametrize("case", list(GRADIENT_CASES))
def test_per_layer_weights_merge_as_mergekits(built_layers, case):
    """A per-layer ``weight`` list (a gradient) or conditions: every layer's merged update equals mergekit's."""
    root, adapters, base = built_layers
    method, shared, per_model, which = GRADIENT_CASES[case]
    # layers 0-2 only: mergekit's t counts the base model's 4 layers, which our YAML's base_model gives
    base_model = root / "base" if which == "first3" else None
    ours = merge_ours(root, case, method, shared, per_model, adapters[which], base_model, layers=4)
    # q_proj, k_proj, v_proj, down_proj of every layer the adapters change
    changed = assert_same_updates(base, ours, read_safetensors(root / f"{case}.mergekit"))
    assert changed == (16 if which == "all" else 12)


def test_gradients_and_conditions_evaluate_as_mergekits():
    """Our `Gradient` and `evaluate` against mergekit's own `evaluate_setting`, at every t mergekit computes for
    models of 1 to 7 layers, bit for bit."""
    import json

    from adapter_merging.mergekit import Conditions, Gradient, evaluate

    python = mergekit_python()
    ts = sorted({1.0} | {i / (layers - 1) for layers in range(2, 8) for i in range(layers)})
    lists = [[0.5], [0, 1], [0, 0.3, 0.7, 1], [1.0, 0.0, 0.5], [-0.7, 0.2, 3, 1e-3, 2.5], [0.1, 0.2, 0.3]]
    conditions = [{"filter": "self_attn", "value": [0.0, 1.0]}, {"filter": "mlp", "value": 2.0}, {"value": [0.6, 0.1]}]
    tensors = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight", ""]
    script = textwrap.dedent("""
        import json, sys
        from mergekit.config import ConditionalParameter, evaluate_setting
        ts, lists, conditions, tensors = json.loads(sys.argv[1])
        settings = [ConditionalParameter(**c) for c in conditions]
        print(json.dumps([[evaluate_setting("", v, t, validate=float) for t in ts] for v in lists] +
                         [[evaluate_setting(n, settings, t, validate=float) for t in ts] for n in tensors]))
    """)
    result = subprocess.run([str(python), "-c", script, json.dumps([ts, lists, conditions, tensors])],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    theirs = json.loads(result.stdout)
    ours_conditions = Conditions(tuple((c.get("filter"), Gradient(tuple(map(float, c["value"])))
                                        if isinstance(c["value"], list) else float(c["value"])) for c in conditions))
    ours = [[Gradient(tuple(map(float, v))).at(t) for t in ts] for v in lists] + \
           [[evaluate(ours_conditions, n, t) for t in ts] for n in tensors]
    assert ours == theirs
