"""Shared fixtures: tiny models of every architecture the tests cover, built offline from configs."""
from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import settings
from transformers import (
    BartConfig,
    BertConfig,
    DebertaConfig,
    DebertaV2Config,
    GPT2Config,
    LlamaConfig,
    RobertaConfig,
    T5Config,
    ViTConfig,
)

warnings.filterwarnings("ignore", message="There are adapters available but none are activated")

# Property tests draw the same examples on every run, so that a run (CI's included) never fails by
# chance; `python -m pytest --hypothesis-profile=explore` draws new examples each time, to hunt for bugs.
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile("repeatable")

_COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=99)

#: architecture name → a tiny transformers config (hidden 32, 2 layers, odd FFN size 37 so d ≠ k)
TINY_CONFIGS = {
    "bert": lambda: BertConfig(**_COMMON),
    "roberta": lambda: RobertaConfig(**_COMMON),
    "gpt2": lambda: GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=99, n_positions=64),
    "llama": lambda: LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=37, vocab_size=99,
    ),
    "t5": lambda: T5Config(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, vocab_size=99),
    "bart": lambda: BartConfig(
        d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=37, decoder_ffn_dim=37, vocab_size=99,
    ),
    "deberta-v2": lambda: DebertaV2Config(**_COMMON),
    "deberta": lambda: DebertaConfig(**_COMMON),  # fused QKV: LoRAMergedLinear
    "vit": lambda: ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=16, patch_size=8
    ),
}

ARCHITECTURES = ["bert", "roberta", "gpt2", "llama", "t5", "bart", "deberta-v2", "vit"]


def tiny_adapter_model(arch: str, seed: int = 0):
    """An ``AutoAdapterModel`` (flexible heads) of ``arch``, in eval mode, with the mixin."""
    import adapter_merging
    from adapters import AutoAdapterModel

    torch.manual_seed(seed)
    model = AutoAdapterModel.from_config(TINY_CONFIGS[arch]())
    model.eval()
    return adapter_merging.init(model)


def tiny_init_model(arch: str, seed: int = 0):
    """A plain transformers model made an adapters model by ``adapters.init``, with the mixin."""
    import adapters
    import adapter_merging
    from transformers import AutoModel

    torch.manual_seed(seed)
    model = AutoModel.from_config(TINY_CONFIGS[arch]())
    adapters.init(model)
    model.eval()
    return adapter_merging.init(model)


def model_inputs(model, batch: int = 2, length: int = 7, seed: int = 1) -> dict:
    """Deterministic inputs for ``model``'s forward pass (images for ViT, decoder ids for seq2seq)."""
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    if config.model_type == "vit":
        return {"pixel_values": torch.randn(batch, 3, config.image_size, config.image_size, generator=generator)}
    ids = torch.randint(0, config.vocab_size, (batch, length), generator=generator)
    inputs = {"input_ids": ids}
    if config.is_encoder_decoder:
        inputs["decoder_input_ids"] = torch.randint(0, config.vocab_size, (batch, 5), generator=generator)
    return inputs


def randomize_adapter(model, name: str, scale: float = 0.1, seed: int = 0) -> None:
    """Give every trainable tensor of adapter ``name`` a random non-zero value (as if trained)."""
    from adapter_merging.state import adapter_tensors

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for slot, tensor in adapter_tensors(dict(model.named_parameters()), name).items():
            if slot.container == "shared_parameters" and "lora" in slot.param:
                continue  # VeRA's frozen projections stay as created
            tensor.add_(scale * torch.randn(tensor.shape, generator=generator).to(tensor.dtype))


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine torch's spinning
    OpenMP threads make every small operation wait (measured 5–10× slower test files)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=ARCHITECTURES)
def arch(request):
    return request.param
