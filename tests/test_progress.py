"""Progress over modules: a callback, a tqdm bar on stderr (always, never, or only for long merges),
the same in every front end; a bad value fails before anything changes."""
from __future__ import annotations

import pytest
import torch
from adapters import LoRAConfig
from peft import LoraConfig, get_peft_model

from adapter_merging import _progress, merge_saved_adapters
from adapter_merging.peft import add_weighted_adapter
from conftest import randomize_adapter, tiny_adapter_model
from test_cli import run
from test_files import tiny_base

#: LoRA on q and v of 2 layers
MODULES = 4


@pytest.fixture
def model():
    model = tiny_adapter_model("bert")
    for i, name in enumerate(("a", "b")):
        model.add_adapter(name, config=LoRAConfig(r=2, alpha=4))
        randomize_adapter(model, name, seed=i)
    return model


def test_callback_counts_every_module_once(model):
    calls = []
    model.average_adapter("m", ["a", "b"], combine_strategy="ties", progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, MODULES) for i in range(1, MODULES + 1)]


def test_true_shows_a_bar_false_and_quick_none_show_nothing(model, capsys):
    model.average_adapter("m1", ["a", "b"], combine_strategy="lora_delta_w_svd", progress=True)
    bar = capsys.readouterr().err
    assert "merging" in bar and f"/{MODULES}" in bar and "module/s" in bar
    model.average_adapter("m2", ["a", "b"], combine_strategy="lora_delta_w_svd", progress=False)
    model.average_adapter("m3", ["a", "b"], combine_strategy="lora_delta_w_svd")  # None: a quick merge is silent
    assert capsys.readouterr().err == ""


def test_none_shows_the_bar_once_the_merge_runs_longer_than_the_delay(model, capsys, monkeypatch):
    monkeypatch.setattr(_progress, "AUTO_DELAY", 0.0)
    model.average_adapter("m", ["a", "b"], combine_strategy="lora_delta_w_svd")
    assert f"/{MODULES}" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["yes", 1, 0.5])
def test_a_bad_value_is_a_type_error_and_adds_nothing(model, value):
    with pytest.raises(TypeError, match="progress must be True .*, False .*, None .* or a callable progress"):
        model.average_adapter("m", ["a", "b"], progress=value)
    assert "m" not in model.adapters_config


def test_the_bar_is_closed_when_the_merge_fails(model, monkeypatch):
    bars = []

    class Recording(_progress.ProgressBar):
        def __init__(self, delay=0.0):
            super().__init__(delay)
            bars.append(self)

        def close(self):
            self.closed = True
            super().close()

    monkeypatch.setattr(_progress, "ProgressBar", Recording)
    with pytest.raises(ValueError, match="density"):
        model.average_adapter("m", ["a", "b"], combine_strategy="ties", density=2.0, progress=True)
    assert len(bars) == 1 and bars[0].closed


def test_saved_adapters_and_the_command_line(model, tmp_path, capsys):
    for name in ("a", "b"):
        model.save_adapter(str(tmp_path / name), name, with_head=False)
    calls = []
    merge_saved_adapters([tmp_path / "a", tmp_path / "b"], tmp_path / "out", combine_strategy="task_arithmetic",
                         progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (MODULES, MODULES) and len(calls) == MODULES
    assert capsys.readouterr().err == ""
    shown = run("a", "b", "-o", "cli", cwd=tmp_path)
    assert shown.returncode == 0 and f"/{MODULES}" in shown.stderr and "merging" in shown.stderr
    quiet = run("a", "b", "-o", "cli2", "-q", cwd=tmp_path)
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_peft_models(capsys):
    peft_model = get_peft_model(tiny_base("gpt2"), LoraConfig(r=2, target_modules=["c_attn"]), adapter_name="a")
    peft_model.add_adapter("b", LoraConfig(r=3, target_modules=["c_attn"]))
    with torch.no_grad():
        for key, param in peft_model.named_parameters():
            if "lora_B" in key:
                param.normal_()
    calls = []
    add_weighted_adapter(peft_model, ["a", "b"], [1.0, -1.0], "m", progress=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 2), (2, 2)]  # c_attn of 2 layers
    add_weighted_adapter(peft_model, ["a", "b"], [1.0, -1.0], "m2", progress=True)
    assert "/2" in capsys.readouterr().err
