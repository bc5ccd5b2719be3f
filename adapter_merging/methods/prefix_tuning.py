"""Prefix tuning, merged in the space the model uses: the flat key/value prefixes.

A reparameterised prefix (``flat=False``) is an MLP applied to a prefix embedding,
P = W₂·act(W₁·E + b₁) + b₂; averaging the MLP weights is not averaging the prefixes (the MLP is
non-linear). So every input is first *ejected* to its flat prefix Pᵢ, exactly as
``model.eject_prefix_tuning`` does, and the merged adapter is the flat prefix P = Σ λᵢ Pᵢ, with
``flat=True`` in its configuration. Prefix gates (UniPELT) are merged linearly.
"""
from __future__ import annotations

from typing import Dict, List

import torch
from adapters import PrefixTuningConfig
from adapters.methods.modeling import Activation_Function_Class

from ..ops import compute_dtype, linear_combination
from ..ops.weights import module_name
from ..state import Slot
from .base import Method, group_by, linear_merge

FLAT_PARAM = "control_trans"


def flat_prefix(tensors: Dict[str, torch.Tensor], config) -> torch.Tensor:
    """The flat prefix of one location: ``control_trans`` if flat, else W₂·act(W₁·E + b₁) + b₂."""
    if FLAT_PARAM in tensors:
        return tensors[FLAT_PARAM]
    embedding = tensors["wte.weight"]
    dtype = compute_dtype(embedding.dtype)
    activation = Activation_Function_Class(config["non_linearity"].lower())
    with torch.no_grad():
        hidden = torch.nn.functional.linear(
            embedding.to(dtype), tensors["control_trans.0.weight"].to(dtype), tensors["control_trans.0.bias"].to(dtype)
        )
        prefix = torch.nn.functional.linear(
            activation(hidden), tensors["control_trans.2.weight"].to(dtype), tensors["control_trans.2.bias"].to(dtype)
        )
    return prefix.reshape(-1).to(embedding.dtype)


def _location(slot: Slot):
    return slot.prefix, slot.param.split(".", 1)[0]


def merge_prefixes(ctx, configs, slots):
    gates = [s for s in slots if s.container == "prefix_gates"]
    merged = linear_merge(ctx, gates)
    # the slots of all inputs: a location is one flat tensor in a flat input, an MLP in a reparameterised one
    for (_, location), unit in group_by([s for s in slots if s.container == "prefix_tunings"], _location).items():
        prefixes: List[torch.Tensor] = []
        for name, config in zip(ctx.names, configs):
            local = {s.param.split(".", 1)[1]: t for s, t in ctx.tensors[name].items() if s in unit}
            prefixes.append(flat_prefix(local, config))
        shapes = {tuple(p.shape) for p in prefixes}
        if len(shapes) > 1:
            raise ValueError(f"Prefixes at '{location}' have different sizes {sorted(shapes)}: check prefix_length.")
        merged[unit[0].replace_param(f"{location}.{FLAT_PARAM}")] = linear_combination(prefixes, ctx.weights_at(module_name(unit[0])))
    return configs[0].replace(flat=True), merged


def _unit(slot: Slot):
    """Inputs must have the same prefix locations; how each stores one (flat or MLP) may differ."""
    return _location(slot) if slot.container == "prefix_tunings" else slot


METHOD = Method(
    name="prefix_tuning",
    config_types=(PrefixTuningConfig,),
    containers=("prefix_tunings", "prefix_gates"),
    merge=merge_prefixes,
    unit=_unit,
    # merged in flat space, so the reparameterisation of each input does not need to match
    ignored_config_fields=lambda config, strategy: {"flat", "bottleneck_size", "non_linearity"},
)
