"""One module per adapter method family, mirroring ``adapters.methods``."""
from . import bottleneck, heads, lora, prefix_tuning, prompt_tuning, reft

#: every method the engine can merge; the first whose config types match a configuration owns it
METHODS = (
    bottleneck.METHOD,
    lora.METHOD,
    prefix_tuning.METHOD,
    prompt_tuning.METHOD,
    reft.METHOD,
    heads.METHOD,
)

__all__ = ["METHODS", "bottleneck", "heads", "lora", "prefix_tuning", "prompt_tuning", "reft"]
