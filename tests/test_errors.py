"""Bad input gets a ValueError/TypeError naming the problem and the fix, and leaves the model as it was.

Every failing call here is followed by a full comparison with a snapshot taken before it
(``test_atomicity.assert_unchanged``: tensors, adapter configuration and registry, active setup,
requires_grad, train/eval modes, heads).
"""
from __future__ import annotations

import math

import adapters
import pytest
import torch
from adapters import AdapterConfig, SeqBnConfig
from transformers import AutoModel

import adapter_merging
from conftest import TINY_CONFIGS, randomize_adapter, tiny_adapter_model, tiny_init_model
from test_atomicity import assert_unchanged, snapshot




@pytest.fixture
def model():  # one per test: a bug in one case must not leak into the next
    m = tiny_adapter_model("bert")
    for name, config in [
        ("bn_a", "seq_bn"),
        ("bn_b", "seq_bn"),
        ("bn_r8", SeqBnConfig(reduction_factor=8)),
        ("lora_a", "lora"),
        ("lora_b", "lora"),
        ("lora_r4", adapters.LoRAConfig(r=4)),
        ("vera_1", adapters.VeraConfig(init_weights_seed=1)),
        ("vera_2", adapters.VeraConfig(init_weights_seed=2)),
        ("taken", "seq_bn"),
    ]:
        m.add_adapter(name, config=config)
        randomize_adapter(m, name, seed=len(name))
    m.set_active_adapters("bn_a")
    return m


def fails(model, exc, *keywords, call=None, **kwargs):
    """Call ``model.average_adapter(**kwargs)`` (or ``call``), expect ``exc`` whose message contains every
    keyword, and check the model is unchanged. Returns the message."""
    before, rng = snapshot(model), torch.get_rng_state()
    with pytest.raises(exc) as err:
        (call or model.average_adapter)(**kwargs)
    message = str(err.value)
    for keyword in keywords:
        assert keyword in message, f"{keyword!r} not in: {message}"
    assert_unchanged(before, model)
    assert torch.equal(torch.get_rng_state(), rng)
    return message


# ----------------------------------------------------------------------------- names
def test_unknown_adapter(model):
    fails(model, ValueError, "Unknown adapter(s) ['nope']", "The model has", "bn_a", "Add or load them first",
          adapter_name="x", adapter_list=["bn_a", "nope"])


def test_unknown_adapter_in_dict(model):
    fails(model, ValueError, "Unknown adapter(s) ['nope']", adapter_name="x", adapter_list={"nope": 1.0})


def test_empty_list(model):
    fails(model, ValueError, "No adapters to average", "at least one adapter", adapter_name="x", adapter_list=[])


def test_empty_dict(model):
    fails(model, ValueError, "at least one adapter", adapter_name="x", adapter_list={})


def test_duplicate_names(model):
    fails(model, ValueError, "Duplicate adapter names ['bn_a']", "summed weight",
          adapter_name="x", adapter_list=["bn_a", "bn_b", "bn_a"])


def test_non_string_name(model):
    fails(model, TypeError, "names must be strings", adapter_name="x", adapter_list=["bn_a", 3])


def test_string_instead_of_list(model):
    fails(model, TypeError, "list or a dict", adapter_name="x", adapter_list="bn_a")


@pytest.mark.parametrize("name", ["", None, 3])
def test_invalid_new_name(model, name):
    fails(model, TypeError, "non-empty string", adapter_name=name, adapter_list=["bn_a", "bn_b"])


def test_new_name_with_dot(model):
    fails(model, ValueError, "must not contain '.'", adapter_name="a.b", adapter_list=["bn_a", "bn_b"])


def test_existing_target_without_overwrite_ok(model):
    fails(model, ValueError, "'taken' already exists", "overwrite_ok=True", adapter_name="taken",
          adapter_list=["bn_a", "bn_b"])


def test_target_is_an_input_without_overwrite_ok(model):
    fails(model, ValueError, "already exists", "overwrite_ok=True", adapter_name="bn_a", adapter_list=["bn_a", "bn_b"])


# ----------------------------------------------------------------------------- weights
@pytest.mark.parametrize("weights", [[1.0], [1.0, 2.0, 3.0]])
def test_wrong_number_of_weights(model, weights):
    fails(model, ValueError, f"Got {len(weights)} weights for 2 adapters", "one weight per adapter",
          adapter_name="x", adapter_list=["bn_a", "bn_b"], weights=weights)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_weight(model, bad):
    fails(model, ValueError, "'bn_b'", "finite", adapter_name="x", adapter_list=["bn_a", "bn_b"],
          weights=[1.0, bad], normalize_weights=False)


def test_input_with_non_finite_values_is_named(model):
    with torch.no_grad():
        model.bert.encoder.layer[1].output.adapters["bn_b"].adapter_down[0].weight[0, 0] = math.nan
    before = snapshot(model)
    with pytest.raises(ValueError) as err:
        model.average_adapter("x", ["bn_a", "bn_b"])
    message = str(err.value)
    assert "'bn_b'" in message and "non-finite" in message and "layer.1.output.adapters.bn_b" in message
    assert "x" not in model.adapters_config
    # the snapshot holds the NaN itself, which torch.equal never matches: compare it with equal_nan
    after = snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.allclose(after["state"][k], v, rtol=0, atol=0, equal_nan=True) for k, v in before["state"].items())
    assert after["adapters_config"] == before["adapters_config"]


@pytest.mark.parametrize("strategy", ["linear", "lora_delta_w_concat"])
def test_overflow_of_the_stored_dtype_is_refused(model, strategy):
    # half-precision inputs are merged in float32 and stored in float16, whose largest value is 65504
    half = tiny_adapter_model("bert")
    for name in ("a", "b"):
        half.add_adapter(name, config="lora")
        randomize_adapter(half, name, seed=len(name))
    half.half()
    fails(half, ValueError, "merged value of", "float16", "smaller weights", adapter_name="x",
          adapter_list=["a", "b"], weights=[1e6, 1e6], normalize_weights=False, combine_strategy=strategy)


def test_finite_tensor_whose_sum_overflows_is_accepted():
    # the fast path sums each merged tensor; a sum can overflow while every entry is finite
    from adapter_merging.engine import check_finite
    from adapter_merging.state import Slot

    slot = Slot("layer", "loras", "lora_A")
    big = torch.full((10,), 6.0e4, dtype=torch.float16)  # finite; its float16 sum is inf
    assert torch.isinf(big.sum())
    check_finite("x", ["a"], {"a": {slot: big}}, {slot: big}, "adapter")
    with pytest.raises(ValueError, match="merged value of layer.loras.x.lora_A"):
        check_finite("x", ["a"], {"a": {slot: big}}, {slot: torch.cat([big, big.new_tensor([math.inf])])}, "adapter")


def test_head_with_non_finite_values_is_named():
    m = tiny_adapter_model("bert")
    for name in ("h1", "h2"):
        m.add_classification_head(name, num_labels=2)
    with torch.no_grad():
        next(m.heads["h2"].parameters()).view(-1)[0] = math.inf
    with pytest.raises(ValueError, match=r"head 'h2' has non-finite values \(NaN or inf\) in heads\.h2\."):
        m.average_head("avg", ["h1", "h2"])
    assert "avg" not in m.heads


def test_non_numeric_weight(model):
    fails(model, TypeError, "'bn_b'", "real number", adapter_name="x", adapter_list=["bn_a", "bn_b"],
          weights=[1.0, "2"])


def test_zero_sum_weights_with_normalization(model):
    fails(model, ValueError, "zero", "normalize_weights=False", adapter_name="x", adapter_list=["bn_a", "bn_b"],
          weights=[1.0, -1.0])


def test_negative_sum_weights_with_normalization(model):
    fails(model, ValueError, "< 0", "normalize_weights=False", adapter_name="x",
          adapter_list={"bn_a": -2.0, "bn_b": 1.0})


def test_weights_dict_and_adapter_dict(model):
    fails(model, ValueError, "not both", adapter_name="x", adapter_list={"bn_a": 1.0}, weights=[1.0])


@pytest.mark.parametrize("flag", ["overwrite_ok", "set_active", "normalize_weights"])
@pytest.mark.parametrize("value", ["False", None, 0, 1])
def test_flags_must_be_booleans(model, flag, value):
    """"False" is truthy: taken by truthiness it would replace or activate; refused instead."""
    fails(model, TypeError, f"{flag} must be True or False", repr(value), adapter_name="taken",
          adapter_list=["bn_a", "bn_b"], **{flag: value})


@pytest.mark.parametrize("seed, keyword", [(2**70, "2**64"), (-(2**64), "2**64"), (1.5, "integer"), (True, "integer")])
def test_seed_out_of_range_or_not_an_integer(model, seed, keyword):
    fails(model, (TypeError, ValueError), "seed", keyword, adapter_name="x", adapter_list=["lora_a", "lora_b"],
          combine_strategy="dare_linear", seed=seed)


def test_scalar_tensor_as_weights(model):
    fails(model, TypeError, "one weight per adapter", adapter_name="x", adapter_list=["bn_a"],
          weights=torch.tensor(0.5))


def test_set_as_adapter_list(model):
    fails(model, TypeError, "unordered", adapter_name="x", adapter_list={"bn_a", "bn_b"}, weights=[1.0, 2.0])


# ----------------------------------------------------------------------------- configurations
def test_different_methods(model):
    fails(model, ValueError, "'lora_a'", "'bn_a'", "different methods", "Merge only adapters of one method",
          adapter_name="x", adapter_list=["lora_a", "bn_a"])


def test_different_configurations_names_the_field(model):
    message = fails(model, ValueError, "different configurations", "reduction_factor", "16", "8",
                    "Merge adapters of one configuration", adapter_name="x", adapter_list=["bn_a", "bn_r8"])
    assert "'bn_a' has reduction_factor=16" in message and "'bn_r8' has reduction_factor=8" in message


def test_lora_different_rank_with_linear_suggests_delta_w(model):
    fails(model, ValueError, "r=8", "r=4", "lora_delta_w_svd", "lora_delta_w_concat",
          adapter_name="x", adapter_list=["lora_a", "lora_r4"])


def test_vera_different_seeds(model):
    fails(model, ValueError, "different frozen projections", "init_weights_seed", "VeraConfig(init_weights_seed=",
          adapter_name="x", adapter_list=["vera_1", "vera_2"])


# ----------------------------------------------------------------------------- strategies and options
def test_strategy_not_supported_by_method_lists_supported(model):
    message = fails(model, ValueError, "combine_strategy='lora_delta_w_svd' does not support", "bottleneck",
                    "Strategies that support these adapters", "'linear'",
                    adapter_name="x", adapter_list=["bn_a", "bn_b"], combine_strategy="lora_delta_w_svd")
    assert "lora_delta_w_concat" not in message


def test_unknown_strategy(model):
    fails(model, ValueError, "Invalid combine_strategy 'average'", "Must be one of", "'linear'", "'lora_delta_w_svd'",
          adapter_name="x", adapter_list=["bn_a", "bn_b"], combine_strategy="average")


def test_svd_rank_with_a_strategy_without_rank_warns_and_is_ignored(model):
    """As in adapters 1.3.0: a warning, not an error; the merge goes on without it."""
    with pytest.warns(UserWarning, match="svd_rank=4 has no effect with combine_strategy='linear'") as record:
        report = model.average_adapter("x", ["bn_a", "bn_b"], svd_rank=4)
    assert record[0].filename == __file__, "the warning should point at the caller's line"
    assert "x" in model.adapters_config and report.combine_strategy == "linear"
    assert any("svd_rank=4 was ignored" in note for note in report.notes)


def test_unknown_option(model):
    fails(model, TypeError, "unexpected keyword argument 'densty'",
          adapter_name="x", adapter_list=["lora_a", "lora_b"], combine_strategy="ties", densty=0.3)


def test_option_of_another_strategy(model):
    fails(model, TypeError, "Unknown option(s) ['gamma'] for combine_strategy='ties'", "Its options are", "density",
          adapter_name="x", adapter_list=["lora_a", "lora_b"], combine_strategy="ties", gamma=0.1)


def test_option_for_strategy_without_options(model):
    fails(model, TypeError, "Unknown option(s) ['seed']", "Its options are: none",
          adapter_name="x", adapter_list=["bn_a", "bn_b"], seed=3)


@pytest.mark.parametrize("rank, exc, keyword", [
    (0, ValueError, "positive integer"),
    (-1, ValueError, "positive integer"),
    (2.5, TypeError, "positive integer"),
    (True, TypeError, "positive integer"),
    ("4", TypeError, "positive integer"),
])
def test_invalid_svd_rank(model, rank, exc, keyword):
    fails(model, exc, "svd_rank", keyword, repr(rank), adapter_name="x", adapter_list=["lora_a", "lora_b"],
          combine_strategy="lora_delta_w_svd", svd_rank=rank)


# ----------------------------------------------------------------------------- models that are not adapter models
def test_plain_transformers_model_rejected():
    plain = AutoModel.from_config(TINY_CONFIGS["bert"]())
    with pytest.raises(TypeError, match="adapters.init") as err:
        adapter_merging.average_adapter(plain, "x", ["a", "b"])
    assert "not set up for adapters" in str(err.value) and "AutoAdapterModel" in str(err.value)


def test_init_on_plain_model_rejected():
    plain = AutoModel.from_config(TINY_CONFIGS["bert"]())
    with pytest.raises(TypeError, match="adapters.init"):
        adapter_merging.init(plain)
    assert not hasattr(plain, "average_head") and type(plain).__name__ == "BertModel"


def test_init_is_idempotent_and_returns_model():
    m = tiny_init_model("bert")
    cls = type(m)
    assert adapter_merging.init(m) is m and type(m) is cls
    assert isinstance(m, adapter_merging.ModelMixin)


def test_average_head_on_model_without_heads():
    m = tiny_init_model("bert")
    with pytest.raises(TypeError, match="no prediction heads") as err:
        m.average_head("h", ["a", "b"])
    assert "AutoAdapterModel" in str(err.value)


def test_error_on_init_model_leaves_it_unchanged():
    m = tiny_init_model("bert")
    m.add_adapter("a", config="seq_bn")
    m.add_adapter("b", config=AdapterConfig.load("seq_bn", reduction_factor=2))
    fails(m, ValueError, "reduction_factor", adapter_name="x", adapter_list=["a", "b"])


# ----------------------------------------------------------------------------- states of the model and its inputs
def test_overwriting_an_adapter_merged_into_the_base_weights(model):
    model.merge_adapter("lora_a")
    fails(model, ValueError, "'lora_a' is merged into the model's weights", "reset_adapter()", adapter_name="lora_a",
          adapter_list=["lora_b"], overwrite_ok=True)


def test_input_missing_a_module_deleted_by_hand(model):
    del model.bert.encoder.layer[0].attention.self.query.loras["lora_a"]
    fails(model, ValueError, "'lora_a' lacks", "bert.encoder.layer.0.attention.self.query.loras.lora_a.lora_A",
          "deleted", adapter_name="x", adapter_list=["lora_a", "lora_b"])


def test_single_input_missing_a_module_deleted_by_hand(model):
    del model.bert.encoder.layer[0].attention.self.query.loras["lora_a"]
    fails(model, ValueError, "'lora_a' lacks", "bert.encoder.layer.0.attention.self.query.loras.lora_a.lora_A",
          "deleted", adapter_name="x", adapter_list=["lora_a"])


def test_ia3_with_alpha_zero():
    m = tiny_adapter_model("bert")
    for name in ("ia3_a", "ia3_b"):
        m.add_adapter(name, config=adapters.IA3Config(alpha=0))
    fails(m, ValueError, "'ia3_a'", "alpha=0", adapter_name="x", adapter_list=["ia3_a", "ia3_b"])


def test_data_parallel_wrapper_says_to_pass_the_module(model):
    wrapped = torch.nn.DataParallel(model)
    with pytest.raises(TypeError, match=r"DataParallel.*model\.module"):
        adapter_merging.average_adapter(wrapped, "x", ["bn_a", "bn_b"])
    with pytest.raises(TypeError, match=r"DataParallel.*model\.module"):
        adapter_merging.init(wrapped)
    assert "x" not in model.adapters_config


def test_input_on_the_meta_device(model):
    model.bert.encoder.layer[0].output.adapters["bn_b"].to_empty(device="meta")
    fails(model, ValueError, "'bn_b'", "meta device", adapter_name="x", adapter_list=["bn_a", "bn_b"])
