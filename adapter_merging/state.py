"""Where an adapter's tensors live: state-dict keys parsed into slots.

``adapters`` stores every adapter's tensors under a container keyed by the adapter's name, e.g.
``bert.encoder.layer.0.attention.self.query.loras.<name>.lora_A``. A `Slot` is such a key
with the name taken out, so the same slot addresses the same tensor of every adapter of one
configuration, in a model or in a saved adapter file alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, Mapping

import torch

#: container attribute → what it holds. Keys are the attribute names ``adapters`` uses.
CONTAINERS = {
    "adapters": "bottleneck adapter modules",
    "invertible_adapters": "invertible adapter modules",
    "shared_parameters": "parameters shared across layers (Compacter PHM, VeRA projections)",
    "loras": "LoRA / IA³ / VeRA / DoRA modules",
    "prefix_tunings": "prefix tuning prefixes",
    "prefix_gates": "prefix tuning gates (UniPELT)",
    "prompt_tunings": "prompt tuning embeddings",
    "refts": "ReFT interventions",
    "heads": "prediction heads",
}
#: the containers of adapters (heads have their own merge, ``average_head``)
ADAPTER_CONTAINERS = tuple(c for c in CONTAINERS if c != "heads")
HEAD_CONTAINERS = ("heads",)


@dataclass(frozen=True, order=True)
class Slot:
    """``{prefix}.{container}.{name}.{param}`` without the adapter name."""

    prefix: str
    container: str
    param: str

    def key(self, name: str) -> str:
        head = f"{self.prefix}.{self.container}" if self.prefix else self.container
        return f"{head}.{name}.{self.param}"

    @property
    def module(self) -> str:
        """Path of the module holding the adapter, e.g. ``bert.encoder.layer.0.attention.self.query``."""
        return self.prefix

    def replace_param(self, param: str) -> "Slot":
        return Slot(self.prefix, self.container, param)


def parse_key(key: str, name: str, containers: Iterable[str] = ADAPTER_CONTAINERS) -> Slot | None:
    """The slot of ``key`` if it belongs to the adapter ``name``, else None."""
    parts = key.split(".")
    containers = set(containers)
    for i in range(1, len(parts) - 1):
        if parts[i] == name and parts[i - 1] in containers:
            return Slot(".".join(parts[: i - 1]), parts[i - 1], ".".join(parts[i + 1 :]))
    return None


def adapter_tensors(
    named_tensors: Mapping[str, torch.Tensor], name: str, containers: Iterable[str] = ADAPTER_CONTAINERS
) -> Dict[Slot, torch.Tensor]:
    """{slot: tensor} of the adapter ``name`` among ``named_tensors`` (a state dict or the model's
    de-duplicated named parameters and buffers)."""
    containers = set(containers)
    found = {}
    for key, tensor in named_tensors.items():
        slot = parse_key(key, name, containers)
        if slot is not None:
            found[slot] = tensor
    return found


def model_tensors(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The model's parameters and buffers by name, each shared tensor once (first name wins)."""
    named = dict(model.named_parameters())
    for key, buffer in model.named_buffers():
        named.setdefault(key, buffer)
    return named
