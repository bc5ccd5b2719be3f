"""Learned merge weights: the λ of a merge chosen on a few examples (LoraHub, AdaMerging, LoRA Soups).

    learn_weights(model, adapters, data, strategy=..., granularity=..., method=..., objective=...) -> LearnedWeights

The weights λ are found by minimising an objective over ``data`` (batches as the model's forward takes
them): the loss of the labelled batches (``objective="loss"``), the entropy of the predictions on
unlabelled ones (``"entropy"``, AdaMerging) or the caller's function. One λ per adapter
(``granularity="adapter"``), per adapter and layer (``"layer"``) or per adapter and module (``"module"``).

``method="gradient"`` (AdaMerging, LoRA Soups): Adam on λ alone, base model and adapters frozen. The
merged update of a module is the exact Σᵢ λᵢ sᵢ Bᵢ Aᵢ, computed factored: the adapters are concatenated
once (``lora_delta_w_concat``: B = [s₁B₁ … sₙBₙ]/s, A = [A₁; …; Aₙ]) and each step multiplies the
columns of Bᵢ by λᵢ, so there is neither a dense d × k matrix nor a merge per step. It learns the
weights of the strategies whose merge is that sum: ``lora_delta_w_svd`` (then truncated at ``svd_rank``)
and ``lora_delta_w_concat``, on LoRA adapters.

``method="cma"`` (LoraHub): CMA-ES (the ``cma`` package, ``pip install adapter-merging[learn]``) over λ,
each candidate scored without gradients: for those strategies by the same factored forward, for every
other strategy and adapter type by a merge with the candidate weights (any strategy, any adapter).

The engine is not bypassed: the learned λ are merge weights (per-module weights where they differ by
layer), and ``adapter_name=`` merges them with ``strategy`` through the model's own front end.
"""
from __future__ import annotations

import math
import numbers
import operator
import re
import time
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Literal, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch.nn.utils import parametrize

from ._progress import Progress
from .report import MergeReport
from .rollback import Checkpoint, rollback_on_error
from .strategies import get_strategy

Granularity = Literal["adapter", "layer", "module"]
LearnMethod = Literal["gradient", "cma"]
Objective = Union[Literal["loss", "entropy"], Callable[[Any, Any], Any]]

GRANULARITIES = ("adapter", "layer", "module")
LEARN_METHODS = ("gradient", "cma")
OBJECTIVES = ("loss", "entropy")
#: the strategies whose merged update is Σ λᵢ sᵢ Bᵢ Aᵢ exactly: the gradient flows through the factors
FACTORED_STRATEGIES = ("lora_delta_w_svd", "lora_delta_w_concat")
#: default number of steps (gradient: passes over the data) or objective evaluations (cma)
DEFAULT_BUDGET = {"gradient": 40, "cma": 100}
#: CMA-ES: the box the weights are searched in (LoraHub's) and the initial step size
CMA_BOUNDS = (-1.5, 1.5)
CMA_SIGMA = 0.1
#: PEFT adapter kinds the merge refuses (no weights can be learned for them, by either method)
UNMERGEABLE = ("lora with DoRA", "lora with lora_bias")
MAX_SEED = 2**32 - 1  # CMA-ES seeds numpy with seed + 1
#: the name of all modules under granularity="adapter"
ALL = "*"
_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


@dataclass
class LearnedWeights:
    """What `learn_weights` found, and how.

    ``weights``: ready for ``average_adapter(..., weights=weights, normalize_weights=False)`` (or the PEFT
    front end): ``{adapter: λ}``, or per module ``{adapter: {module: λ, "*": mean λ}}``. ``table``: the
    learned values by group (``"*"``, a layer such as ``"bert.encoder.layer.3"``, or a module name) and
    adapter; ``groups``: the modules of each group. ``history``: the objective (plus the L1 term) at each step
    (gradient: before the step's update) or each evaluation (cma); ``best``: the smallest, whose weights are
    returned. ``report``: the merge's report when ``adapter_name`` was given (its warnings are the merge's,
    for the returned weights). ``notes``: what the run noticed (an objective that never changed, options
    without a merge, a merged adapter that does not score ``best``)."""

    weights: Dict[str, Union[float, Dict[str, float]]]
    table: Dict[str, Dict[str, float]]
    groups: Dict[str, List[str]]
    history: List[float]
    best: float
    method: str
    granularity: str
    strategy: str
    objective: str
    evaluations: int
    seconds: float
    report: Optional[MergeReport] = None
    notes: List[str] = field(default_factory=list)
    #: the objective (plus the L1 term) of the merged adapter, with ``adapter_name``; a note says if it differs from
    #: ``best`` (a merge that is not the update learned through, e.g. ``svd_rank`` truncating it)
    merged: Optional[float] = None

    def summary(self) -> str:
        """One line: method, granularity, the objective before and after, evaluations and time."""
        start = self.history[0] if self.history else float("nan")
        return (f"learned {len(self.table)} x {len(next(iter(self.table.values()), {}))} weights "
                f"({self.method}, granularity {self.granularity}, objective {self.objective}): {start:.4g} -> "
                f"{self.best:.4g} in {self.evaluations} evaluations, {self.seconds:.1f} s")


# ----------------------------------------------------------------------------- the public function
def learn_weights(
    model: torch.nn.Module,
    adapters: Sequence[str],
    data: Iterable[Mapping[str, Any]],
    *,
    strategy: str = "lora_delta_w_svd",
    granularity: Granularity = "adapter",
    method: LearnMethod = "gradient",
    objective: Objective = "loss",
    budget: Optional[int] = None,
    seed: int = 0,
    init: Union[float, Sequence[float], Mapping[str, float], None] = None,
    lr: float = 0.05,
    l1: float = 0.0,
    adapter_name: Optional[str] = None,
    merge_options: Optional[Mapping[str, Any]] = None,
    progress: Progress = None,
) -> LearnedWeights:
    """Learn the merge weights of ``adapters`` on ``data``; with ``adapter_name``, also merge them.

    :param model: an ``adapters`` model (``adapters.init(model)``/``AutoAdapterModel``) or a PEFT model
        holding the adapters.
    :param adapters: the names of the adapters to merge (a list; at least one).
    :param data: batches as the model's forward takes them: dicts of keyword arguments (``input_ids``,
        ``attention_mask``, ``labels`` for ``objective="loss"``; ``head=`` picks an ``adapters`` head per
        batch). Read once and kept (a few examples are all the methods need).
    :param strategy: the merge the weights are for. ``method="gradient"``: ``"lora_delta_w_svd"``
        (default) or ``"lora_delta_w_concat"`` (both Σ λᵢ ΔWᵢ, on LoRA adapters); ``"cma"``: any strategy.
    :param granularity: ``"adapter"`` (one λ per adapter, LoraHub), ``"layer"`` (per adapter and layer, the
        layer being a module's path up to its first number, e.g. ``bert.encoder.layer.3``: AdaMerging's
        layer-wise; an encoder's and a decoder's layer 3 are two layers) or ``"module"``.
    :param method: ``"gradient"`` (Adam on λ through the factored update) or ``"cma"`` (CMA-ES, needs the
        ``cma`` package, within ``CMA_BOUNDS``).
    :param objective: ``"loss"`` (the model's ``outputs.loss``: batches need labels), ``"entropy"`` (the
        mean entropy of softmax(``outputs.logits``) over all positions: unlabelled batches) or a callable
        ``objective(outputs, batch)`` returning a scalar tensor (gradient) or a number (cma). The objective
        of a step is the mean over the batches.
    :param budget: ``"gradient"``: the number of steps (each one pass over ``data``); ``"cma"``: the number
        of objective evaluations (each one pass). Default `DEFAULT_BUDGET`.
    :param seed: makes the run repeatable (CMA-ES's sampling; the model's random state is not touched).
    :param init: the starting λ: a number for every adapter, one per adapter, or ``{name: λ}``; default 1/N.
    :param lr: Adam's learning rate (gradient).
    :param l1: weight of the L1 term ``l1 · mean |λ|`` added to the objective (LoraHub's regulariser).
    :param adapter_name: if given, merge the adapters with the learned weights into this new adapter
        (``strategy``, ``normalize_weights=False``, ``merge_options``) and return its report.
    :param merge_options: keyword options of that merge and of cma's merges (``svd_rank``, ``density``, …).
    :param progress: a progress bar over steps on stderr: None (if the run takes over 2 s), True, False,
        or a callable ``progress(done, total)``.
    :returns: `LearnedWeights` (the weights, their table, the objective per step, the merge's report).
    :raises ValueError: bad arguments, adapters or strategies it cannot learn through (the message names what
        works); the model is left as it was on any error.
    :raises TypeError: arguments of the wrong type (``adapters`` not a list, a batch not a dict, an objective
        that returns no scalar).
    :raises RuntimeError: ``method="gradient"`` inside ``torch.inference_mode()``.
    :raises ImportError: ``method="cma"`` without the ``cma`` package.
    """
    started = time.perf_counter()
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"}) \
        if isinstance(model, torch.nn.Module) else []
    with torch.random.fork_rng(devices=cuda):  # neither the data's iteration nor the run moves the caller's RNG
        learned = _learn(model, adapters, data, strategy, granularity, method, objective, budget, seed, init, lr, l1,
                         adapter_name, merge_options, progress)
    learned.seconds = time.perf_counter() - started
    return learned


def _learn(model, adapters, data, strategy, granularity, method, objective, budget, seed, init, lr, l1, adapter_name,
           merge_options, progress) -> LearnedWeights:
    front = _front_end(model)
    names = front.check_adapters(adapters)
    _check_choice("granularity", granularity, GRANULARITIES)
    _check_choice("method", method, LEARN_METHODS)
    if not callable(objective):
        _check_choice("objective", objective, OBJECTIVES)
    budget = DEFAULT_BUDGET[method] if budget is None else _positive_int("budget", budget)
    seed = _seed(seed)
    lr, l1 = _non_negative("lr", lr, positive=True), _non_negative("l1", l1)
    options = _merge_options(front, merge_options)
    get_strategy(strategy)  # an unknown name: the engine's error, before anything else
    if adapter_name is not None:
        front.check_new_name(adapter_name)
    front.check_not_merged()
    factored = strategy in FACTORED_STRATEGIES
    if method == "gradient":
        if torch.is_inference_mode_enabled():
            raise RuntimeError("method='gradient' cannot run inside torch.inference_mode(): call learn_weights outside it "
                               "(method='cma' needs no gradients).")
        if not factored:
            raise ValueError(
                f"method='gradient' learns weights through the exact factored update Σ λᵢ sᵢ Bᵢ Aᵢ, which is the "
                f"merge of {list(FACTORED_STRATEGIES)}, not of {strategy!r}: use one of those, or method='cma' "
                f"(it scores each candidate by a {strategy!r} merge)."
            )
        front.check_factored(names)
    optimiser = _cma() if method == "cma" else None
    batches = _batches(data)
    start = _initial(names, init)
    if method == "cma" and not all(CMA_BOUNDS[0] <= float(v) <= CMA_BOUNDS[1] for v in start):
        raise ValueError(f"init {start.tolist()} lies outside the box method='cma' searches, {list(CMA_BOUNDS)} "
                         "(LoraHub's): give init values within it.")
    session = _Session(front, names, granularity, factored and front.is_lora(names))
    checkpoint = Checkpoint(model)
    try:
        if options or (adapter_name is not None and isinstance(front, _PeftFront)):
            # the final merge's arguments (and a name PEFT may refuse) checked before the run, not after it
            front.merge(adapter_name or session.name, names, [float(v) for v in start], strategy, options,
                        temporary=True, quiet=True)
            checkpoint.restore()
        session.open(strategy, options)
        if method == "gradient":
            history, best_table = _gradient(session, batches, objective, start, budget, lr, l1, progress)
        else:
            history, best_table = _search(session, optimiser, batches, objective, start, budget, seed, l1, progress)
    finally:
        session.close()
        checkpoint.restore()
    table = {group: dict(zip(names, map(float, row))) for group, row in zip(session.group_names, best_table.tolist())}
    weights = _as_weights(names, table, session.groups, granularity)
    learned = LearnedWeights(
        weights=weights, table=table, groups=session.groups, history=history, best=min(history), method=method,
        granularity=granularity, strategy=strategy, objective=objective if isinstance(objective, str) else "callable",
        evaluations=len(history), seconds=0.0,
    )
    if len(history) > 1 and len(set(history)) == 1:
        learned.notes.append(f"Every evaluation gave the objective {history[0]:.6g}: it may not depend on the weights "
                             "(the weights returned are the starting ones).")
    if adapter_name is None:
        if options and session.factored:
            learned.notes.append(f"merge_options {options} were checked, but no merge was made (no adapter_name): the "
                                 "weights were learned through the exact Σ λᵢ sᵢ Bᵢ Aᵢ.")
        return learned
    with rollback_on_error(model):  # the merged adapter is kept only if scoring it succeeds too
        learned.report = front.merge(adapter_name, names, weights, strategy, options)
        learned.merged = _merged_objective(front, adapter_name, batches, objective) + l1 * float(best_table.abs().mean())
    if not math.isclose(learned.merged, learned.best, rel_tol=1e-3, abs_tol=1e-6):
        learned.notes.append(
            f"The merged adapter '{adapter_name}' scores {learned.merged:.6g} on the objective, the learned weights "
            f"{learned.best:.6g}: the merge ({strategy}, options {options or 'none'}) is not the update the weights "
            "were learned through (svd_rank truncating it, or parts the merge combines otherwise).")
    return learned


def _merge_options(front: "_Front", merge_options: Any) -> Dict[str, Any]:
    """``merge_options`` as a dict whose keys the front end's merge takes (checked before the run)."""
    if merge_options is None:
        return {}
    if not isinstance(merge_options, Mapping):
        raise TypeError(f"merge_options must be a dict of the merge's keyword options, got {merge_options!r}.")
    allowed = front.option_names()
    unknown = sorted(str(k) for k in merge_options if k not in allowed)
    if unknown:
        raise ValueError(f"merge_options has unknown option(s) {unknown}: the merge takes {sorted(allowed)}.")
    return dict(merge_options)


def _merged_objective(front: "_Front", adapter_name: str, batches, objective) -> float:
    """The objective of the merged adapter (one pass, no gradients), the model left as it was."""
    checkpoint = Checkpoint(front.model)
    try:
        front.activate(adapter_name)
        front.freeze()
        return _forward_all(front, batches, objective, front.device(), False, 0)
    finally:
        checkpoint.restore()


# ----------------------------------------------------------------------------- argument checks
def _check_choice(what: str, value: Any, choices: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{what} must be one of {list(choices)}, got {value!r}.")


def _integer(value: Any) -> Optional[int]:
    """``value`` as an int if it is an integer (numpy's too), not a bool; else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _positive_int(what: str, value: Any) -> int:
    number = _integer(value)
    if number is None or number < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}.")
    return number


def _seed(value: Any) -> int:
    number = _integer(value)
    if number is None or not 0 <= number < MAX_SEED:
        raise ValueError(f"seed must be an int in [0, {MAX_SEED}), got {value!r}.")
    return number


def _real(value: Any) -> Optional[float]:
    """``value`` as a float if it is a real number (numpy's too), not a bool; else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def _non_negative(what: str, value: Any, positive: bool = False) -> float:
    number = _real(value)
    if number is None or not math.isfinite(number) or number < 0 or (positive and number == 0):
        raise ValueError(f"{what} must be a finite number {'> 0' if positive else '≥ 0'}, got {value!r}.")
    return number


def _initial(names: Sequence[str], init: Any) -> torch.Tensor:
    """The starting λ of each adapter (float64, length N)."""
    n = len(names)
    if init is None:
        values = [1.0 / n] * n
    elif _real(init) is not None:
        values = [init] * n
    elif hasattr(init, "tolist") and getattr(init, "ndim", None) == 1:  # a 1-D numpy array or tensor
        values = init.tolist()
    elif isinstance(init, Mapping):
        unknown = sorted(set(map(str, init)) - set(names))
        if unknown or len(init) != n:
            raise ValueError(f"init as a dict needs exactly the adapters {list(names)} as keys, got {list(init)}.")
        values = [init[name] for name in names]
    elif isinstance(init, (list, tuple)):
        if len(init) != n:
            raise ValueError(f"init has {len(init)} values for {n} adapters {list(names)}: give one per adapter.")
        values = list(init)
    else:
        raise TypeError(f"init must be None, a number, one number per adapter or {{name: number}}, got {init!r}.")
    numbers_ = [_real(v) for v in values]
    if any(v is None or not math.isfinite(v) for v in numbers_):
        raise ValueError(f"init values must be finite numbers, got {values!r}.")
    return torch.tensor(numbers_, dtype=torch.float64)


def _batches(data: Iterable[Mapping[str, Any]]) -> List[Mapping[str, Any]]:
    if isinstance(data, Mapping):
        data = [data]
    try:
        batches = list(data)
    except TypeError:
        raise TypeError(f"data must be an iterable of batches (dicts of the forward's arguments), got "
                        f"{type(data).__name__}.") from None
    if not batches:
        raise ValueError("data has no batch: give at least one batch (a dict of the model's forward arguments).")
    for i, batch in enumerate(batches):
        if not isinstance(batch, Mapping):
            raise TypeError(f"batch {i} is a {type(batch).__name__}: each batch must be a dict of the model's forward "
                            "arguments (input_ids=…, attention_mask=…, labels=…).")
    return batches


def _cma():
    try:
        import cma
    except ImportError:
        raise ImportError("method='cma' needs the cma package: pip install 'adapter-merging[learn]' (or pip install "
                          "cma), or use method='gradient'.") from None
    return cma


# ----------------------------------------------------------------------------- the objective
def _to_device(batch: Mapping[str, Any], device: torch.device) -> Dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _objective_value(objective: Objective, outputs: Any, batch: Mapping[str, Any]) -> Any:
    if callable(objective):
        return objective(outputs, batch)
    if isinstance(outputs, tuple):
        raise ValueError(f"The model returned a tuple (return_dict=False?): objective={objective!r} reads "
                         "outputs.loss / outputs.logits; let it return its output object, or pass a callable objective.")
    if objective == "loss":
        loss = getattr(outputs, "loss", None)
        if loss is None:
            raise ValueError("objective='loss' but the model returned no loss: give the batches labels "
                             "('labels': …), or use objective='entropy' (unlabelled) or a callable.")
        return loss
    logits = getattr(outputs, "logits", None)
    if logits is None:
        raise ValueError("objective='entropy' needs outputs.logits, which the model did not return: pass a callable "
                         "objective(outputs, batch).")
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(-1).mean()


def _scalar(value: Any, step: int, need_grad: bool) -> Any:
    if need_grad:
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise TypeError(f"The objective must return a scalar tensor (method='gradient'), got {type(value).__name__}.")
        if not value.requires_grad:
            raise ValueError("The objective does not depend on the weights (its tensor needs no gradient): compute it "
                             "from the model's outputs.")
        value = value.reshape(())
        number = float(value.detach())
    else:
        number = float(value.detach()) if isinstance(value, torch.Tensor) and value.numel() == 1 else _real(value)
        if number is None:
            raise TypeError(f"The objective must return a number or a scalar tensor, got {type(value).__name__}.")
    if not math.isfinite(number):
        raise ValueError(f"The objective is {number} at step {step}: check the data, or lower lr / the init weights.")
    return value if need_grad else number


# ----------------------------------------------------------------------------- a learning session on a model
class _BlockScale(torch.nn.Module):
    """Parametrization B ↦ B · λ over B's rank columns (dim 1): column block i times λ[row, i]."""

    def __init__(self, table: List[torch.Tensor], row: int, ranks: Sequence[int]) -> None:
        super().__init__()
        self._table = table  # a list, so the shared λ is no parameter of the model
        self.row = row
        self.register_buffer("index", torch.repeat_interleave(torch.arange(len(ranks)), torch.tensor(ranks)),
                             persistent=False)

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        scale = self._table[0][self.row].to(b.device).index_select(0, self.index.to(b.device)).to(b.dtype)
        return b * scale.view([1, -1] + [1] * (b.ndim - 2))


class _Mix(torch.nn.Module):
    """Parametrization of a copy the front end merges linearly (PEFT's ``modules_to_save``): Σᵢ λ̄ᵢ θᵢ, λ̄ᵢ the
    mean of adapter i's λ over the groups (the ``"*"`` weight such a merge uses)."""

    def __init__(self, table: List[torch.Tensor], stack: torch.Tensor) -> None:
        super().__init__()
        self._table = table
        self.register_buffer("stack", stack, persistent=False)

    def forward(self, _: torch.Tensor) -> torch.Tensor:
        mean = self._table[0].mean(0).to(device=self.stack.device, dtype=self.stack.dtype)
        return torch.tensordot(mean, self.stack, dims=1)


class _Session:
    """The temporary state of a run: a concatenated adapter whose B columns carry λ (factored), or a merged
    adapter rebuilt per candidate (any strategy, cma); the groups of modules λ is shared by."""

    def __init__(self, front, names: Sequence[str], granularity: str, factored: bool) -> None:
        self.front, self.names, self.granularity, self.factored = front, list(names), granularity, factored
        self.name = f"_learn_weights_{uuid.uuid4().hex[:8]}"
        self.table: List[torch.Tensor] = [torch.zeros(0)]
        self.groups: Dict[str, List[str]] = {}
        self.group_names: List[str] = []
        self._registered: List[Tuple[torch.nn.Module, str]] = []
        self._options: Dict[str, Any] = {}
        self._strategy = ""

    def open(self, strategy: str, options: Mapping[str, Any]) -> None:
        self._strategy, self._options = strategy, dict(options)
        self.groups = _group(self.front.module_names(self.names), self.granularity)
        self.group_names = list(self.groups)
        if not self.factored:
            return
        self.front.add_concat(self.name, self.names)
        self.table[0] = torch.ones(len(self.group_names), len(self.names))  # registering evaluates the parametrization
        row_of = {m: i for i, g in enumerate(self.group_names) for m in self.groups[g]}
        for module_name, owner, attribute, ranks in self.front.factors(self.name, self.names):
            if module_name not in row_of:
                raise RuntimeError(f"internal: module {module_name} of the concatenated adapter is in no group")
            self._register(owner, attribute, _BlockScale(self.table, row_of[module_name], ranks))
        for owner, attribute, stack in self.front.linear_copies(self.name, self.names):
            self._register(owner, attribute, _Mix(self.table, stack))
        self.front.activate(self.name)
        self.front.freeze()

    def _register(self, owner: torch.nn.Module, attribute: str, parametrization: torch.nn.Module) -> None:
        parametrize.register_parametrization(owner, attribute, parametrization)
        self._registered.append((owner, attribute))

    def set(self, table: torch.Tensor) -> None:
        """Use the weights ``table`` (groups × adapters) for the next forward passes."""
        if self.factored:
            self.table[0] = table
            return
        weights = _as_weights(self.names, {g: dict(zip(self.names, map(float, row))) for g, row in
                                           zip(self.group_names, table.tolist())}, self.groups, self.granularity)
        self.front.merge(self.name, self.names, weights, self._strategy, self._options, temporary=True, quiet=True)
        self.front.activate(self.name)
        self.front.freeze()

    def close(self) -> None:
        for owner, attribute in reversed(self._registered):
            parametrize.remove_parametrizations(owner, attribute, leave_parametrized=False)
        self._registered.clear()


def _group(modules: Sequence[str], granularity: str) -> Dict[str, List[str]]:
    """{group: modules}: one group ``"*"``; by layer, the path up to its first number (``bert.encoder.layer.3``;
    an encoder's and a decoder's layer 3 are two layers; a module without a number is a group of its own); or
    each module its own."""
    if granularity == "adapter":
        return {ALL: list(modules)}
    if granularity == "module":
        return {m: [m] for m in modules}
    groups: Dict[str, List[str]] = {}
    for module in modules:
        found = _LAYER.search(module)
        groups.setdefault(module[: found.end(1)] if found else module, []).append(module)
    return dict(sorted(groups.items(), key=lambda item: _layer_key(item[0])))


def _layer_key(group: str) -> Tuple[str, int, str]:
    """Layers in order: by the path before the number, then the number (layer 2 before layer 10)."""
    found = _LAYER.search(group)
    return (group[: found.start(1)], int(found.group(1)), group) if found else (group, -1, group)


def _as_weights(names: Sequence[str], table: Mapping[str, Mapping[str, float]], groups: Mapping[str, List[str]],
                granularity: str) -> Dict[str, Union[float, Dict[str, float]]]:
    """The table as merge weights: ``{adapter: λ}``, or ``{adapter: {module: λ, "*": mean}}``."""
    if granularity == "adapter":
        return {name: table[ALL][name] for name in names}
    weights: Dict[str, Union[float, Dict[str, float]]] = {}
    for name in names:
        values = [table[g][name] for g in groups]
        spec: Dict[str, float] = {"*": sum(values) / len(values)}
        for group, modules in groups.items():
            spec.update({m: table[group][name] for m in modules})
        weights[name] = spec
    return weights


def _forward_all(front: "_Front", batches, objective, device, need_grad: bool, step: int) -> float:
    """The mean objective over the batches; with ``need_grad`` its gradient is accumulated into λ."""
    total = 0.0
    for i, batch in enumerate(batches):
        batch = _to_device(batch, device)
        with torch.set_grad_enabled(need_grad):
            try:
                outputs = front.model(**batch)
            except Exception as error:
                error.add_note(f"(learn_weights: in the model's forward pass on batch {i} of data)")
                raise
            value = _scalar(_objective_value(objective, outputs, batch), step, need_grad)
            if need_grad:
                (value / len(batches)).backward()
                total += float(value.detach())
            else:
                total += value
    return total / len(batches)


def _gradient(session: _Session, batches, objective, start: torch.Tensor, budget: int, lr: float, l1: float,
              progress: Progress) -> Tuple[List[float], torch.Tensor]:
    """Adam on λ: each step one pass over the batches (gradients accumulated), the objective before the update
    recorded; the λ with the smallest objective is returned."""
    device = session.front.device()
    table = torch.nn.Parameter(start.to(device=device, dtype=torch.float32).repeat(len(session.group_names), 1))
    session.set(table)
    optimiser = torch.optim.Adam([table], lr=lr)
    history: List[float] = []
    best, best_table = math.inf, table.detach().clone()
    with _bar(progress, budget, "learning weights") as tick:
        for step in range(budget):
            optimiser.zero_grad(set_to_none=True)
            value = _forward_all(session.front, batches, objective, device, True, step)
            if table.grad is None:
                raise ValueError("The objective does not depend on the weights (no gradient reached them): compute it "
                                 "from the model's outputs, without detaching them.")
            if l1:
                penalty = l1 * table.abs().mean()
                penalty.backward()
                value += float(penalty.detach())
            history.append(value)
            if value < best:
                best, best_table = value, table.detach().clone()
            optimiser.step()
            tick(step + 1, value)
    return history, best_table.cpu().double()


def _search(session: _Session, cma, batches, objective, start: torch.Tensor, budget: int, seed: int, l1: float,
            progress: Progress) -> Tuple[List[float], torch.Tensor]:
    """CMA-ES over λ (flattened groups × adapters) in `CMA_BOUNDS`, each candidate scored without gradients.
    numpy's global random state (which ``cma`` seeds) is restored after."""
    import numpy

    state = numpy.random.get_state()
    try:
        return _cma_search(session, cma, batches, objective, start, budget, seed, l1, progress)
    finally:
        numpy.random.set_state(state)


def _cma_search(session, cma, batches, objective, start, budget, seed, l1, progress):
    device = session.front.device()
    shape = (len(session.group_names), len(session.names))
    x0 = start.repeat(shape[0], 1).flatten().tolist()
    es = cma.CMAEvolutionStrategy(x0, CMA_SIGMA, {"seed": seed + 1, "maxfevals": budget, "bounds": list(CMA_BOUNDS),
                                                  "verbose": -9})
    history: List[float] = []
    best, best_table = math.inf, start.repeat(shape[0], 1)
    with _bar(progress, budget, "searching weights") as tick:
        while not es.stop() and len(history) < budget:
            candidates = es.ask()[: budget - len(history)]
            values = []
            for x in candidates:
                table = torch.tensor(x, dtype=torch.float64).reshape(shape)
                session.set(table.to(device=device, dtype=torch.float32) if session.factored else table)
                value = _forward_all(session.front, batches, objective, device, False, len(history))
                value += l1 * float(table.abs().mean())
                values.append(value)
                history.append(value)
                if value < best:
                    best, best_table = value, table.clone()
                tick(len(history), value)
            if len(candidates) == es.popsize:  # the last generation may be cut short by the budget
                es.tell(candidates, values)
    return history, best_table


class _bar:
    """``with _bar(progress, total, what) as tick: tick(done, objective)``: a tqdm bar over steps (shown after
    2 s with progress=None, at once with True), the caller's callback, or nothing."""

    def __init__(self, progress: Progress, total: int, what: str) -> None:
        from ._progress import AUTO_DELAY

        if progress is not None and not isinstance(progress, bool) and not callable(progress):
            raise TypeError(f"progress must be True, False, None or a callable progress(done, total), got {progress!r}.")
        self.progress, self.total, self.what, self.delay, self.bar = progress, total, what, AUTO_DELAY, None

    def __enter__(self) -> Callable[[int, float], None]:
        if self.progress is None or self.progress is True:
            import sys

            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc=self.what, file=sys.stderr, leave=False,
                            delay=self.delay if self.progress is None else 0.0)
        return self.tick

    def tick(self, done: int, value: float) -> None:
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix(objective=f"{value:.4g}", refresh=False)
        elif callable(self.progress):
            self.progress(done, self.total)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------- the two kinds of model
def _front_end(model: Any) -> "_Front":
    if hasattr(model, "adapters_config"):
        return _AdaptersFront(model)
    if hasattr(model, "peft_config"):
        return _PeftFront(model)
    raise TypeError(f"{type(model).__name__} is neither an adapters model (adapters.init(model), AutoAdapterModel) nor "
                    "a PEFT model (get_peft_model): learn_weights needs the model that holds the adapters.")


class _Front:
    """What a learning session needs of a model kind: its adapters, a concatenated adapter and its B factors
    with each input's rank block, activation, freezing, and the front end's merge."""

    #: the parameters of the front end's merge that learn_weights sets itself (the rest are ``merge_options``)
    OWN = frozenset()

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def freeze(self) -> None:
        """Every parameter frozen and every module in eval mode (no dropout: the objective is a function of λ
        alone); the run's checkpoint restores both."""
        self.model.eval()  # after each merge: new modules are made in training mode
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)

    def check_adapters(self, adapters: Any) -> List[str]:
        if isinstance(adapters, str) or not isinstance(adapters, (list, tuple)):
            raise TypeError(f"adapters must be a list of adapter names, got {adapters!r}.")
        names = list(adapters)
        if not names:
            raise ValueError("adapters is empty: give the names of the adapters to merge.")
        if len(set(names)) != len(names):
            raise ValueError(f"Duplicate adapter names in {names}: give each adapter once.")
        unknown = [n for n in names if n not in self.available()]
        if unknown:
            raise ValueError(f"Unknown adapter(s) {unknown}. The model has: {sorted(self.available())}.")
        return names

    def check_factored(self, names: Sequence[str]) -> None:
        if not self.is_lora(names):
            kinds = {n: self.kind(n) for n in names}
            unmergeable = {n: k for n, k in kinds.items() if k in UNMERGEABLE}
            if unmergeable:
                raise ValueError(f"The adapters {unmergeable} cannot be merged at all (their update is not s·B·A), so no "
                                 "merge weights can be learned for them.")
            raise ValueError(
                f"method='gradient' learns through LoRA updates s·B·A; the adapters are {kinds}: use method='cma' with a "
                "strategy that merges them (e.g. strategy='linear' for bottleneck, IA³ or prefix tuning adapters); "
                "it scores each candidate by a real merge.")

    def is_lora(self, names: Sequence[str]) -> bool:
        return all(self.kind(n) == "lora" for n in names)

    def option_names(self) -> set:
        import inspect

        return set(inspect.signature(self.merge_function()).parameters) - self.OWN

    def linear_copies(self, name: str, names: Sequence[str]):
        """(module, attribute, stacked inputs' values) of the copies the front end merges linearly: none here."""
        return iter(())

    def merge(self, name, names, weights, strategy, options, temporary: bool = False, quiet: bool = False):
        if not quiet:
            return self._merge(name, names, weights, strategy, options, temporary)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self._merge(name, names, weights, strategy, options, temporary)


class _AdaptersFront(_Front):
    OWN = frozenset({"model", "adapter_name", "adapter_list", "weights", "combine_strategy", "normalize_weights",
                     "overwrite_ok", "set_active", "progress"})

    def merge_function(self):
        from .model_mixin import average_adapter

        return average_adapter

    def available(self) -> List[str]:
        return list(self.model.adapters_config.adapters)

    def kind(self, name: str) -> str:
        from .methods.lora import family

        config = self.model.adapters_config.get(name)
        try:
            return family(config)
        except Exception:
            return type(config).__name__

    def check_new_name(self, name: str) -> None:
        from .model_mixin import _check_new_name

        _check_new_name(name, "adapter")
        if name in self.model.adapters_config:
            raise ValueError(f"An adapter named '{name}' already exists: choose another adapter_name.")

    def check_not_merged(self) -> None:
        merged = sorted({str(m.merged) for m in self.model.modules() if getattr(m, "merged", None)})
        if merged:
            raise ValueError(f"The adapter(s) {merged} are merged into the model's weights (merge_adapter): call "
                             "model.reset_adapter() first; learning activates other adapters on top of them.")

    def module_names(self, names: Sequence[str]) -> List[str]:
        from .ops.weights import module_name
        from .state import adapter_tensors, model_tensors

        named = model_tensors(self.model)
        return sorted({module_name(slot) for n in names for slot in adapter_tensors(named, n)})

    def add_concat(self, name: str, names: Sequence[str]) -> None:
        self.merge(name, names, [1.0] * len(names), "lora_delta_w_concat", {}, quiet=True)

    def factors(self, name: str, names: Sequence[str]):
        configs = [self.model.adapters_config.get(n) for n in names]
        for path, module in self.model.named_modules():
            loras = getattr(module, "loras", None)
            if isinstance(loras, torch.nn.ModuleDict) and name in loras:
                # each input's rank (fused q/k/v modules: per matrix); an input without the module: zeros of its r
                ranks = [int(loras[n].r) if n in loras else int(c["r"]) for n, c in zip(names, configs)]
                _check_width(path, loras[name].lora_B, ranks)
                yield path, loras[name], "lora_B", ranks

    def activate(self, name: str) -> None:
        import logging

        quiet = logging.getLogger("adapters.model_mixin")  # activating runs an empty forward that warns
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            self.model.set_active_adapters(name)
        finally:
            quiet.setLevel(level)

    def _merge(self, name, names, weights, strategy, options, temporary):
        return self.merge_function()(self.model, name, list(names), weights, strategy, normalize_weights=False,
                                     overwrite_ok=temporary, progress=False, **dict(options))


class _PeftFront(_Front):
    OWN = frozenset({"model", "adapters", "weights", "adapter_name", "combination_type", "progress"})

    def __init__(self, model: torch.nn.Module) -> None:
        from .peft import _lora_root

        super().__init__(model)
        self.root = _lora_root(model)

    def merge_function(self):
        from .peft import add_weighted_adapter

        return add_weighted_adapter

    def available(self) -> List[str]:
        return list(self.root.peft_config)

    def kind(self, name: str) -> str:
        config = self.root.peft_config[name]
        kind = str(getattr(config.peft_type, "value", config.peft_type)).lower()
        if kind == "lora" and getattr(config, "use_dora", False):
            return "lora with DoRA"
        if kind == "lora" and getattr(config, "lora_bias", False):
            return "lora with lora_bias"
        if kind == "lora" and getattr(config, "target_parameters", None):
            return "lora on target_parameters"
        return kind

    def check_new_name(self, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"adapter_name must be a non-empty string, got {name!r}.")
        if name in self.root.peft_config:
            raise ValueError(f"An adapter named '{name}' already exists: choose another adapter_name.")

    def check_not_merged(self) -> None:
        merged = sorted({n for m in self.root.model.modules() for n in (getattr(m, "merged_adapters", None) or [])})
        if merged:
            raise ValueError(f"The adapter(s) {merged} are merged into the model's weights (merge_adapter): call "
                             "model.unmerge_adapter() first; learning activates other adapters.")

    def module_names(self, names: Sequence[str]) -> List[str]:
        """The modules as the merge names them (the engine reads the adapters the same way)."""
        from .ops.weights import module_name
        from .peft import _peft_type, _read

        configs = [self.root.peft_config[n] for n in names]
        peft_type = _peft_type(list(names), configs)
        return sorted({module_name(slot) for n, c in zip(names, configs)
                       for slot in _read(self.root, n, c, peft_type)[0].tensors})

    def add_concat(self, name: str, names: Sequence[str]) -> None:
        self.merge(name, names, [1.0] * len(names), "lora_delta_w_concat", {}, quiet=True)

    def factors(self, name: str, names: Sequence[str]):
        configs = [self.root.peft_config[n] for n in names]
        for path, module in self.root.model.named_modules():
            ranks_of = getattr(module, "r", None)
            if isinstance(getattr(module, "lora_B", None), torch.nn.ModuleDict) and name in module.lora_B:
                owner, attribute = module.lora_B[name], "weight"
            elif isinstance(getattr(module, "lora_embedding_B", None), torch.nn.ParameterDict) \
                    and name in module.lora_embedding_B:
                owner, attribute = module.lora_embedding_B, name
            else:
                continue
            # an input without the module: zero factors of its configured r (as the merge reads it)
            ranks = [int(ranks_of[n]) if n in ranks_of else int(c.r) for n, c in zip(names, configs)]
            _check_width(path, getattr(owner, attribute), ranks)
            yield path, owner, attribute, _padded(ranks, getattr(owner, attribute).shape[1])

    def linear_copies(self, name: str, names: Sequence[str]):
        """PEFT's ``modules_to_save`` copies of the concatenated adapter: the merge combines the inputs' copies
        linearly with each adapter's ``"*"`` weight (when every input has them)."""
        from peft.utils.other import ModulesToSaveWrapper

        wrappers = [m for m in self.root.model.modules() if isinstance(m, ModulesToSaveWrapper)]
        if not all(n in w.modules_to_save for w in wrappers for n in names):
            return  # the merge combines the copies only if every input has every one (peft._modules_to_save)
        for wrapper in wrappers:
            if name not in wrapper.modules_to_save:
                continue
            copy_ = wrapper.modules_to_save[name]
            for key, _param in list(copy_.named_parameters()):
                owner_path, _, attribute = key.rpartition(".")
                owner = copy_.get_submodule(owner_path) if owner_path else copy_
                stack = torch.stack([wrapper.modules_to_save[n].get_parameter(key).detach() for n in names])
                yield owner, attribute, stack

    def activate(self, name: str) -> None:
        self.model.set_adapter(name)

    def _merge(self, name, names, weights, strategy, options, temporary):
        if temporary and name in self.root.peft_config:
            self.model.delete_adapter(name)
        values = [weights[n] for n in names] if isinstance(weights, Mapping) else list(weights)
        return self.merge_function()(self.model, list(names), values, name, strategy, progress=False, **dict(options))


def _padded(ranks: Sequence[int], width: int) -> List[int]:
    """The rank blocks, the zero columns past Σ rᵢ (PEFT's one rank for every module pads at the end) given to the
    last input."""
    return list(ranks[:-1]) + [ranks[-1] + width - sum(ranks)]


def _check_width(path: str, b: torch.Tensor, ranks: Sequence[int]) -> None:
    width = b.shape[1]
    padding_is_zero = width > sum(ranks) and not bool(b[:, sum(ranks):].detach().any())
    if width != sum(ranks) and not padding_is_zero:
        raise ValueError(
            f"In module {path} the concatenated adapter has rank {width}, not the inputs' Σ rᵢ = {sum(ranks)} "
            f"(ranks {list(ranks)}), so the weights cannot be applied to its blocks. Use method='cma' with a "
            "strategy outside " + str(list(FACTORED_STRATEGIES)) + " (e.g. 'ties'), which merges each candidate, "
            "and report this case."
        )
