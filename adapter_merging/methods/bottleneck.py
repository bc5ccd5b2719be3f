"""Bottleneck adapters: seq_bn, double_seq_bn, par_bn (incl. learned scaling), Compacter (its PHM
parameters shared across layers), AdapterPlus and invertible adapters.

Rule: linear, Φ = Σ λᵢ Φᵢ over every parameter of the adapter modules, the shared PHM parameters
and the invertible adapter (which ``adapters`` 1.3.0 skips on ``AutoAdapterModel``).
"""
from adapters import BnConfig

from .base import Method

METHOD = Method(
    name="bottleneck",
    config_types=(BnConfig,),
    containers=("adapters", "invertible_adapters", "shared_parameters"),
    owns_shared=lambda config: bool(config.get("phm_layer")),
)
