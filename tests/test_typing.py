"""Type checkers and IDEs see the API: ``py.typed`` ships, ``init(model).average_adapter(...)`` type-checks,
strategy names are a ``Literal`` equal to the registry, and every strategy option is a documented keyword; so are
``learn_weights``' choices and parameters."""
from __future__ import annotations

import importlib.util
import inspect
import pydoc
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import get_args

import pytest

import adapter_merging
from adapter_merging import STRATEGIES, ModelMixin, average_adapter
from adapter_merging.ops.task_vectors import SIGN_METHODS
from adapter_merging.strategies import CombineStrategy, SignMethod

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = sorted({option for strategy in STRATEGIES.values() for option in strategy.option_names})
FUNCTIONS = {
    "adapter_merging.average_adapter": average_adapter,
    "ModelMixin.average_adapter": ModelMixin.average_adapter,
}


def test_strategy_literal_is_the_registry():
    assert get_args(CombineStrategy) == tuple(STRATEGIES)
    assert get_args(SignMethod) == SIGN_METHODS


@pytest.mark.parametrize("where", list(FUNCTIONS))
def test_every_strategy_option_is_a_typed_keyword(where):
    parameters = inspect.signature(FUNCTIONS[where]).parameters
    assert parameters["combine_strategy"].annotation in ("CombineStrategy", CombineStrategy)
    for option in OPTIONS:
        assert option in parameters, f"{where} lacks the option {option}"
        assert parameters[option].default is None and parameters[option].annotation != inspect.Parameter.empty
        if option != "svd_rank":  # svd_rank is positional in adapters' signature
            assert parameters[option].kind is inspect.Parameter.KEYWORD_ONLY


@pytest.mark.parametrize("where", ["adapter_merging.average_adapter", "ModelMixin.average_adapter"])
def test_every_parameter_is_documented_in_help(where):
    function = FUNCTIONS[where]
    text = pydoc.render_doc(function)
    for name in inspect.signature(function).parameters:
        if name in ("self", "model"):
            continue
        assert f":param {name}:" in (function.__doc__ or ""), f"{where}: {name} is not documented"
    assert all(option in text for option in OPTIONS)
    assert ":returns:" in function.__doc__ and "MergeReport" in function.__doc__


def test_learn_weights_choices_are_literals_and_every_parameter_is_documented():
    from adapter_merging.learn import GRANULARITIES, LEARN_METHODS, OBJECTIVES, Granularity, LearnMethod, Objective

    assert get_args(Granularity) == GRANULARITIES and get_args(LearnMethod) == LEARN_METHODS
    assert get_args(get_args(Objective)[0]) == OBJECTIVES
    parameters = inspect.signature(adapter_merging.learn_weights).parameters
    for name, parameter in parameters.items():
        assert f":param {name}:" in adapter_merging.learn_weights.__doc__, f"learn_weights: {name} is not documented"
        assert parameter.annotation != inspect.Parameter.empty, f"learn_weights: {name} has no type"
        if name not in ("model", "adapters", "data"):
            assert parameter.kind is inspect.Parameter.KEYWORD_ONLY, name
    assert ":returns:" in adapter_merging.learn_weights.__doc__ and "LearnedWeights" in adapter_merging.learn_weights.__doc__


def test_py_typed_ships_with_the_package():
    assert (Path(adapter_merging.__file__).parent / "py.typed").exists()
    assert 'adapter_merging = ["py.typed"]' in (ROOT / "pyproject.toml").read_text(encoding="utf-8")


SCRIPT = '''
    import adapter_merging
    from adapters import AutoAdapterModel
    from transformers import BertConfig

    model = adapter_merging.init(AutoAdapterModel.from_config(BertConfig()))
    report = model.average_adapter("avg", ["a", "b"], weights=[0.5, 0.5], combine_strategy="ties", density=0.3)
    print(report.max_error + 1.0, report.to_json())
    model.train_adapter("avg")                     # the model's own methods stay available
    heads = model.average_head("h", ["h1", "h2"])
    reveal_type(heads)
    model.average_adapter("avg", ["a", "b"], combine_strategy="nonsense")
    model.average_adapter("avg", ["a", "b"], majority_sign_method="median")
    learned = adapter_merging.learn_weights(model, ["a", "b"], [{"input_ids": None, "labels": None}],
                                            granularity="layer", method="cma", objective="entropy", seed=1)
    reveal_type(learned)
    print(learned.table["layer 0"]["a"] + 1.0, learned.weights, learned.history[0] + learned.best, learned.summary())
    adapter_merging.learn_weights(model, ["a"], [], objective=lambda outputs, batch: outputs.loss, adapter_name="m")
    adapter_merging.learn_weights(model, ["a", "b"], [], granularity="block")
'''
MYPY_CONFIG = '''
    [mypy]
    follow_imports = silent
    [mypy-torch.*,transformers.*,adapters.*,huggingface_hub.*,safetensors.*,numpy.*]
    follow_imports = skip
    ignore_missing_imports = True
'''


def test_mypy_accepts_a_users_script_and_flags_bad_strategy_names(tmp_path):
    if importlib.util.find_spec("mypy") is None:
        pytest.fail('mypy is not installed: pip install -e ".[test]" installs it')
    (tmp_path / "script.py").write_text(textwrap.dedent(SCRIPT), encoding="utf-8")
    (tmp_path / "mypy.ini").write_text(textwrap.dedent(MYPY_CONFIG), encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "mypy.ini", "--cache-dir", str(tmp_path / "cache"), "script.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env={"MYPYPATH": str(ROOT), "PATH": ""},
    )
    lines = result.stdout.splitlines()
    assert 'Revealed type is "adapter_merging.report.MergeReport"' in result.stdout, result.stdout + result.stderr
    assert 'Revealed type is "adapter_merging.learn.LearnedWeights"' in result.stdout, result.stdout
    errors = [line for line in lines if ": error:" in line]
    assert len(errors) == 3, result.stdout
    assert "script.py:12:" in errors[0] and "Literal['nonsense']" in errors[0]
    assert "script.py:13:" in errors[1] and "Literal['median']" in errors[1]
    assert "script.py:19:" in errors[2] and "Literal['block']" in errors[2]
