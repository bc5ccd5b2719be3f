"""Prompt tuning: the soft prompt embeddings are merged linearly, P = Σ λᵢ Pᵢ."""
from adapters import PromptTuningConfig

from .base import Method

METHOD = Method(name="prompt_tuning", config_types=(PromptTuningConfig,), containers=("prompt_tunings",))
