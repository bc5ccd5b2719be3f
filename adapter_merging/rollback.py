"""An exact rollback of everything a merge may change in a model, in place.

Adding or replacing an adapter or a head changes containers all over an ``adapters`` model: the
``ModuleDict`` of every adapted layer, the adapters configuration (its registry, the active setup,
VeRA's ``_vera_init_shapes``), the model configuration's ``prediction_heads``, the tied-weights
lists (``_tied_weights_keys``, sometimes a class attribute extended in place), hooks.

A `Checkpoint` records, before the merge, the attributes of every module and of those
configuration objects, and the contents of every container (dict, list, set) they hold, nested
containers included, with the *identity* of what they hold. Restoring puts each container's
contents back in place, so the same Parameter and Module objects are back in the same places and
order: an optimizer or a reference taken before the call stays valid. Tensor values are not
recorded: a merge writes only into the tensors it creates.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Tuple

import torch

_CONTAINERS = (dict, list, set)


class Checkpoint:
    """The restorable state of ``model`` (see the module docstring)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._attributes: List[Tuple[Any, Dict[str, Any]]] = []
        self._contents: Dict[int, Tuple[Any, Any]] = {}
        owners: List[Any] = list(model.modules())
        owners += [getattr(model, "adapters_config", None), getattr(model, "config", None)]
        for owner in owners:
            if owner is None or not hasattr(owner, "__dict__"):
                continue
            attributes = dict(vars(owner))
            self._attributes.append((owner, attributes))
            for value in attributes.values():
                self._record(value)
            tied = getattr(owner, "_tied_weights_keys", None)  # may be a class attribute extended in place
            if isinstance(tied, list):
                self._record(tied)
        self._requires_grad = [(p, p.requires_grad) for p in model.parameters()]

    def _record(self, value: Any) -> None:
        stack = [value]
        while stack:
            item = stack.pop()
            if not isinstance(item, _CONTAINERS) or id(item) in self._contents:
                continue
            copy = dict(item) if isinstance(item, dict) else list(item)
            self._contents[id(item)] = (item, copy)
            stack.extend(copy.values() if isinstance(item, dict) else copy)

    def restore(self) -> None:
        """Put every recorded attribute and container back, in place."""
        for container, saved in self._contents.values():
            if isinstance(container, dict):
                container.clear()
                container.update(saved)
            elif isinstance(container, list):
                container[:] = saved
            else:
                container.clear()
                container.update(saved)
        for owner, attributes in self._attributes:
            state = vars(owner)
            for key in [k for k in state if k not in attributes]:
                del state[key]
            state.update(attributes)
        for parameter, flag in self._requires_grad:
            parameter.requires_grad_(flag)


@contextmanager
def rollback_on_error(model: torch.nn.Module) -> Iterator[Checkpoint]:
    """Run the block; if it raises anything (KeyboardInterrupt too), restore ``model`` exactly and re-raise."""
    checkpoint = Checkpoint(model)
    try:
        yield checkpoint
    except BaseException:
        checkpoint.restore()
        raise
