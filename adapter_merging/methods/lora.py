"""The LoRA family: LoRA, IA³, VeRA, DoRA, MTL-LoRA and gated LoRA (UniPELT).

A LoRA module adds ΔW = s·B·A to a frozen weight, s = alpha/r, B ∈ ℝ^{d×r}, A ∈ ℝ^{r×k}, with
B·A in the (out, in) layout whatever the layer stores (GPT-2's Conv1D, ``fan_in_fan_out``).
A fused QKV layer (``LoRAMergedLinear``: GPT-2 ``c_attn``, DeBERTa ``in_proj``) holds g groups,
A = [A₁; …; A_g] (g·r × k) and B = [B₁; …; B_g] (g·d/3 × r), group j updating its own rows by
s·B_j·A_j; every rule below is applied group by group.

Rules by strategy (λᵢ the merge weights, sᵢ each input's own scaling):

* ``linear`` — A = Σ λᵢ Aᵢ, B = Σ λᵢ Bᵢ (plus gates, DoRA magnitudes, VeRA vectors linearly);
  IA³ merges the deviation from identity of its scaling vector: α·l = 1 + Σ λᵢ (α·lᵢ − 1).
  Its error against Σ λᵢ ΔWᵢ is measured and warned about above 1e-3; only negative weights are
  refused, since (−B)(−A) = BA.
* ``lora_linear_only_negate_b`` — A = Σ |λᵢ| Aᵢ, B = Σ λᵢ Bᵢ.
* ``lora_delta_w_svd`` — target ΔW = Σ λᵢ sᵢ Bᵢ Aᵢ, exact factored SVD, truncated to one rank for
  all layers: ``svd_rank``; or with ``svd_tol`` the smallest rank whose relative truncation error is
  ≤ svd_tol in every layer; or (neither) the exact rank, the largest numerical rank of any layer's
  target. The merged adapter's own scaling s (`merged_scaling`: the inputs' largest) is folded into
  the factors, B = U√(S/s), A = √(S/s)Vh, so s·B·A equals the target's optimal (Eckart–Young)
  truncation.
* ``lora_delta_w_concat`` — B = [λ₁s₁B₁ … λₙsₙBₙ]/s, A = [A₁; …; Aₙ]: exact, rank Σ rᵢ.
* task-vector strategies (``ties``, ``dare_*``, ``magnitude_prune``, ``breadcrumbs``) — applied to
  the dense per-adapter updates ΔWᵢ = sᵢ Bᵢ Aᵢ of one layer at a time, then re-factorised; a
  re-factorisation that loses more than 10 % warns.

The strategies' implementations are `adapter_merging.rules` (a `ParameterRule` or a `DeltaWRule`);
this module maps LoRA tensors to them and adds LoRA's own rules (IA³'s identity, fused groups, one
rank and one scaling per adapter). Ranks and scalings may differ per module (PEFT's rank_pattern,
alpha_pattern and rsLoRA), given by the merge context. The report measures what is stored against
the target (`ops.lowrank.measured_error`, with its rounding floor).
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from adapters import LoRAConfig
from adapters.configuration.adapter_config import MTLLoRAConfig

from .._warnings import warn
from ..ops import compute_dtype, stack_factors
from ..ops.lowrank import measured_error, relative_error
from ..rules import DeltaWRule, ModuleMerge, ParameterRule
from ..state import Slot
from ..strategies import FAMILY_DESCRIPTIONS
from .base import Method, MergeContext, dtype_of, group_by, linear_merge

Factors = Tuple[torch.Tensor, torch.Tensor]  # (B, A)


# ----------------------------------------------------------------------------- configuration
def family(config) -> str:
    """Which member of the LoRA family ``config`` describes (decides which rules apply)."""
    if config["composition_mode"] == "scale":
        return "ia3"
    if isinstance(config["vera_d"], float) or isinstance(config["vera_b"], float):
        return "vera"
    if isinstance(config, MTLLoRAConfig):
        return "mtl_lora"
    if config["use_dora"]:
        return "dora"
    if config["use_gating"]:
        return "lora_gated"
    return "lora"


def scaling(config) -> float:
    """The factor the model applies to B·A: alpha/r (IA³: alpha)."""
    if config["composition_mode"] == "scale":
        return float(config["alpha"])
    return float(config["alpha"]) / float(config["r"])


def _ignored_fields(config, strategy) -> set:
    # the delta-W strategies merge the updates s·B·A, so the inputs' ranks and alphas may differ
    return {"r", "alpha"} if strategy.merges_delta_w else set()


#: LoRAConfig fields that choose which modules of the model carry a LoRA
MODULE_SELECTION = ("selfattn_lora", "intermediate_lora", "output_lora", "attn_matrices", "leave_out")


def _hint(field: str, strategy) -> str:
    if field in MODULE_SELECTION:
        return (
            f" {', '.join(MODULE_SELECTION)} choose which modules carry a LoRA: adapters-format LoRAs (and LoRAs in "
            "a model) are merged only when they sit on the same modules, whatever the strategy, while PEFT folders "
            "merge over the union of their modules (a missing module is a zero update). Merge LoRAs trained on the "
            "same modules (the same values of these fields), or train them as PEFT LoRAs."
        )
    if field not in ("r", "alpha"):
        return ""
    return (
        f" combine_strategy='{strategy.name}' combines the factors A and B entry by entry, so their "
        "shapes (r) and scalings (alpha) must match; LoRA adapters of different r or alpha can be "
        "merged with 'lora_delta_w_svd' or 'lora_delta_w_concat'."
    )


def module_rank(ctx: MergeContext, name: str, config, prefix: str) -> int:
    return int(ctx.module_ranks.get(name, {}).get(prefix, config["r"]))


def module_scaling(ctx: MergeContext, name: str, config, prefix: str) -> float:
    return float(ctx.module_scalings.get(name, {}).get(prefix, scaling(config)))


# ----------------------------------------------------------------------------- factor layout
def split_groups(b: torch.Tensor, a: torch.Tensor, r: int) -> List[Factors]:
    """[(B_j, A_j)] of a (possibly fused) LoRA module: g = rows(A)/r groups."""
    if a.shape[0] % r or b.shape[1] != r:
        raise ValueError(f"LoRA factors of shapes B {tuple(b.shape)}, A {tuple(a.shape)} do not match rank {r}.")
    groups = a.shape[0] // r
    if b.shape[0] % groups:
        raise ValueError(f"Cannot split B {tuple(b.shape)} into {groups} fused groups.")
    return list(zip(b.chunk(groups, dim=0), a.split(r, dim=0)))


def join_groups(groups: Sequence[Factors]) -> Factors:
    if len(groups) == 1:
        return groups[0]
    return torch.cat([b for b, _ in groups], dim=0), torch.cat([a for _, a in groups], dim=0)


def _absent(slot: Slot, present: torch.Tensor, config) -> torch.Tensor:
    """What an input without this module contributes: a zero update (IA³: the identity 1/alpha;
    LoRA: zero factors of the input's own rank)."""
    if family(config) == "ia3":
        return torch.full_like(present, 1.0 / scaling(config)) if scaling(config) else torch.ones_like(present)
    if slot.param == "lora_A":
        return present.new_zeros(int(config["r"]), present.shape[1])
    if slot.param == "lora_B":
        return present.new_zeros(present.shape[0], int(config["r"]))
    return torch.zeros_like(present)


# ----------------------------------------------------------------------------- the merge
#: families whose update is a product of merged parameters, so ``linear`` has cross-terms
_CROSS_TERM_FAMILIES = ("lora", "dora", "lora_gated", "mtl_lora", "vera")
#: families whose ``linear`` merge the report measures (s·B·A); the others' update is not s·B·A
_MEASURED_FAMILIES = ("lora", "dora", "lora_gated")
#: families whose report measures only s·B·A: what else they apply, merged linearly but not measured
_PARTLY_MEASURED = {"dora": "the DoRA magnitudes", "lora_gated": "the gates"}
#: a ``linear`` merge whose measured relative error exceeds this warns
LINEAR_WARNING_THRESHOLD = 1e-3
#: a re-factorisation (task-vector strategies) that loses more than this warns
REFACTOR_WARNING_THRESHOLD = 0.1
_EXACT_STRATEGIES = (
    "combine_strategy='lora_delta_w_concat' (exact, rank Σ rᵢ) or 'lora_delta_w_svd' (exact at svd_rank=None, "
    "else the optimal truncation)"
)


def merge_lora(ctx: MergeContext, configs, slots):
    kind = family(configs[0])
    shared = [s for s in slots if s.container == "shared_parameters"]
    units = group_by([s for s in slots if s.container == "loras"], lambda s: s.prefix)
    merged: Dict[Slot, torch.Tensor] = _copy_identical(ctx, shared) if kind == "vera" else {}
    rule = ctx.strategy.rule
    if isinstance(rule, ParameterRule):
        merged.update(_merge_parameters(ctx, configs, units, kind, rule))
        return configs[0], merged
    target = rule.target(ctx.strategy.name, ctx.options)
    if target is not None:
        ctx.report.target = target
    rank, alpha, tensors = _merge_updates(ctx, configs, units, rule)
    merged.update(tensors)
    ctx.report.rank, ctx.report.alpha = rank, alpha
    return configs[0].replace(r=rank, alpha=alpha), merged


def _mixed_signs(weights: Sequence[float]) -> bool:
    return any(w < 0 for w in weights) and any(w > 0 for w in weights)


def _cross_term_text(kind: str) -> str:
    text = (
        "combine_strategy='linear' combines the factors of the update (A and B) separately, so the merged update "
        "has cross-terms Bᵢ·Aⱼ and is not Σ λᵢ ΔWᵢ"
    )
    if kind == "lora":
        return text + f". For task arithmetic and unlearning use {_EXACT_STRATEGIES}."
    return text + (
        ". The exact strategies 'lora_delta_w_concat' and 'lora_delta_w_svd' only support plain LoRA, "
        "so the result of this merge is an approximation."
    )


def _only_negative_error(kind: str, weights: Sequence[float]) -> str:
    text = (
        f"combine_strategy='linear' with only negative weights {list(weights)} negates both factors of the update, "
        "and (−B)(−A) = BA: the merged adapter would add the skills instead of removing them. "
    )
    if kind == "lora":
        return text + (
            f"To unlearn, use {_EXACT_STRATEGIES}, or 'lora_linear_only_negate_b' (negates B only, "
            "Zhang et al. 2023), with normalize_weights=False."
        )
    return text + (
        f"No strategy negates the update of {FAMILY_DESCRIPTIONS[kind]} adapters exactly (the exact strategies "
        "'lora_delta_w_concat' and 'lora_delta_w_svd', and 'lora_linear_only_negate_b', support plain LoRA only)."
    )


def _warn_if_linear_is_off(kind: str, modules) -> None:
    """Warn, with the measured error, when a ``linear`` merge misses Σ λᵢ ΔWᵢ by more than 1e-3."""
    off = [m for m in modules if m.relative_error > max(LINEAR_WARNING_THRESHOLD, m.rounding_floor)]
    if off:
        worst = max(m.relative_error for m in modules)
        mean = sum(m.relative_error for m in modules) / len(modules)
        part = " of the low-rank part s·B·A" if kind in _PARTLY_MEASURED else ""
        head, advice = _cross_term_text(kind).split(". ", 1)
        warn(f"{head}: measured relative error{part} {worst:.3g} (mean {mean:.3g}) over {len(modules)} modules. {advice}")


def _copy_identical(ctx: MergeContext, slots: Sequence[Slot]) -> Dict[Slot, torch.Tensor]:
    """VeRA's frozen random projections: merging the trainable vectors is only meaningful when every
    input uses the same projections, which are then kept as they are."""
    out = {}
    for slot in slots:
        first, *rest = ctx.inputs(slot)
        if not all(t.shape == first.shape and torch.equal(t, first) for t in rest):
            raise ValueError(
                f"The VeRA adapters {ctx.names} use different frozen projections ('{slot.param}'), so their "
                "trainable vectors live in different bases and cannot be merged. Create them with the same "
                "init_weights_seed (VeraConfig(init_weights_seed=...)) so the projections are shared."
            )
        out[slot] = first.clone()
    return out


# ----------------------------------------------------------------------------- parameter rules
def _merge_parameters(ctx: MergeContext, configs, units, kind: str, rule: ParameterRule) -> Dict[Slot, torch.Tensor]:
    """``linear`` and ``lora_linear_only_negate_b``: the rule on the parameters themselves, module by
    module; IA³ merges its deviation from identity. Reports and warns for ``linear``'s cross-terms."""
    linear = ctx.strategy.name == "linear" and kind in _CROSS_TERM_FAMILIES
    for weights in ctx.every_weights():
        if linear and not any(w > 0 for w in weights) and any(w < 0 for w in weights):
            raise ValueError(_only_negative_error(kind, weights))
    if kind in _PARTLY_MEASURED:
        ctx.report.target = (
            f"Σ λᵢ sᵢBᵢAᵢ, the low-rank part only ({_PARTLY_MEASURED[kind]} are merged linearly and not measured)"
        )
    measured = len(ctx.report.modules)
    merged: Dict[Slot, torch.Tensor] = {}
    whole = ctx
    for prefix, unit in units.items():
        ctx = whole.at_module(prefix)  # this module's weights
        _check_same_module_shape(ctx, configs, prefix)
        out = linear_merge(ctx, unit, rule.weights_for)
        by_param = {s.param: s for s in unit}
        if kind == "ia3":
            out[by_param["lora_B"]] = _ia3_deviation(ctx, configs, prefix, by_param["lora_B"], out)
        if kind in _MEASURED_FAMILIES and "lora_A" in by_param:
            _report_parameter_merge(ctx, configs, prefix, by_param, out)
        ctx.advance(prefix)
        rank, scale = module_rank(ctx, ctx.names[0], configs[0], prefix), module_scaling(ctx, ctx.names[0], configs[0], prefix)
        if (rank, scale) != (int(configs[0]["r"]), scaling(configs[0])):
            ctx.merged_modules[prefix] = (rank, scale)
        merged.update(out)
    ctx = whole
    if linear and kind in _MEASURED_FAMILIES:
        _warn_if_linear_is_off(kind, ctx.report.modules[measured:])
    elif linear and any(_mixed_signs(w) for w in ctx.every_weights()):  # not measured: the update is not s·B·A
        warn(_cross_term_text(kind))
    return merged


def _check_same_module_shape(ctx: MergeContext, configs, prefix: str) -> None:
    """The parameter rules combine factors entry by entry: every input needs the same rank and scaling
    in every module (configurations are compared by the engine; per-module patterns here)."""
    first = (module_rank(ctx, ctx.names[0], configs[0], prefix), module_scaling(ctx, ctx.names[0], configs[0], prefix))
    for name, config in zip(ctx.names[1:], configs[1:]):
        other = (module_rank(ctx, name, config, prefix), module_scaling(ctx, name, config, prefix))
        if other != first:
            raise ValueError(
                f"Cannot average adapters with different configurations. At '{prefix}' '{ctx.names[0]}' has rank "
                f"{first[0]} and scaling {first[1]:g} but '{name}' has rank {other[0]} and scaling {other[1]:g}."
                + _hint("r", ctx.strategy)
            )


def _ia3_deviation(ctx: MergeContext, configs, prefix: str, slot: Slot, out) -> torch.Tensor:
    """α·l = 1 + Σ λᵢ (α·lᵢ − 1): IA³ merges what each input changed, its deviation from identity."""
    alpha = module_scaling(ctx, ctx.names[0], configs[0], prefix)
    if alpha == 0:
        raise ValueError(
            f"The IA³ adapter '{ctx.names[0]}' has alpha=0: its scaling vector α·l is 0 whatever l is, so its "
            "deviation from identity (α·l − 1) cannot be merged. Use IA³ adapters with a non-zero alpha."
        )
    deviation = sum(w * (alpha * t.to(compute_dtype(t.dtype)) - 1.0) for w, t in zip(ctx.weights, ctx.inputs(slot)))
    return ((1.0 + deviation) / alpha).to(out[slot].dtype)


def _report_parameter_merge(ctx: MergeContext, configs, prefix: str, by_param, merged) -> None:
    """Error of the merged update s·B·A against the exact target Σ λᵢ sᵢ Bᵢ Aᵢ (factors only)."""
    a_slot, b_slot = by_param["lora_A"], by_param["lora_B"]
    ranks = [module_rank(ctx, n, c, prefix) for n, c in zip(ctx.names, configs)]
    scalings = [module_scaling(ctx, n, c, prefix) for n, c in zip(ctx.names, configs)]
    inputs = [split_groups(ctx.tensors[n][b_slot], ctx.tensors[n][a_slot], r) for n, r in zip(ctx.names, ranks)]
    coefficients = [w * s for w, s in zip(ctx.weights, scalings)]
    targets = [stack_factors([groups[j] for groups in inputs], coefficients) for j in range(len(inputs[0]))]
    stored = split_groups(merged[b_slot], merged[a_slot], ranks[0])
    error, floor = measured_error(stored, targets, scalings[0])
    ctx.report.add(prefix, error, 1.0, ranks[0], rounding_floor=floor)


# ----------------------------------------------------------------------------- delta-W rules
def merged_scaling(scalings: Sequence[float], weights: Sequence[float]) -> float:
    """The scaling s = alpha/r of the adapter a delta-W strategy makes: the largest |sᵢ| of the inputs
    (over their modules) with a non-zero weight (of all inputs if every weight is 0; 1 if every
    scaling is 0), whatever their order. The stored factors carry ΔW/s (B = U√(S/s), B_cat/s), so with
    this s they are no larger than the inputs' own — σ₁(ΔW)/s ≤ Σ |λᵢ| ‖Bᵢ‖‖Aᵢ‖ — and do not overflow
    in half precision. The effective update s·B·A does not depend on the choice."""
    used = [abs(s) for s, w in zip(scalings, weights) if w != 0 and s != 0]
    every = [abs(s) for s in scalings if s != 0]
    return max(used or every or [1.0])


def merged_alpha(new_scaling: float, rank: int):
    """alpha = s·r; an integer when it is one to 1e-12 relative (16.000000000000004 → 16), never rounded
    to 0 or by more than that (alpha = 1e-10 stays 1e-10)."""
    alpha = new_scaling * rank
    nearest = round(alpha)
    return int(nearest) if nearest != 0 and abs(alpha - nearest) <= 1e-12 * abs(alpha) else alpha


def _merge_updates(ctx: MergeContext, configs, units, rule: DeltaWRule) -> Tuple[int, float, Dict[Slot, torch.Tensor]]:
    """Merge the updates ΔWᵢ = sᵢ Bᵢ Aᵢ of every LoRA module by ``rule``: one rank and one scaling for
    the whole adapter (`merged_scaling`); returns (rank, alpha, {slot: factor}).

    Phase 1 decomposes each module's merged update (memory: one dense d × k update at a time for
    the task-vector rules, none otherwise); phase 2 writes factors of the common rank and measures
    what is stored."""
    for slots in units.values():
        extra = sorted({s.param for s in slots} - {"lora_A", "lora_B"})
        if extra:
            raise ValueError(f"combine_strategy='{ctx.strategy.name}' cannot merge LoRA modules with {extra}.")
    per_module = {
        prefix: (
            [module_rank(ctx, n, c, prefix) for n, c in zip(ctx.names, configs)],
            [module_scaling(ctx, n, c, prefix) for n, c in zip(ctx.names, configs)],
        )
        for prefix in units
    }
    all_scalings = [s for _, scalings in per_module.values() for s in scalings]
    new_scaling = merged_scaling(all_scalings, [w for prefix in per_module for w in ctx.weights_at(prefix)]
                                 if per_module else ctx.weights)
    merges: Dict[Tuple[Slot, Slot], List[ModuleMerge]] = {}
    for prefix, slots in units.items():
        a_slot = next(s for s in slots if s.param == "lora_A")
        b_slot = a_slot.replace_param("lora_B")
        ranks, scalings = per_module[prefix]
        dtype = ctx.stored_dtype(dtype_of(ctx.tensors[ctx.names[0]], a_slot))
        groups = [split_groups(ctx.tensors[n][b_slot], ctx.tensors[n][a_slot], r) for n, r in zip(ctx.names, ranks)]
        if len({len(g) for g in groups}) > 1:
            raise ValueError(f"The inputs fuse different numbers of projections at '{prefix}': check attn_matrices.")
        _check_module_shapes(ctx.names, prefix, groups)
        merges[(a_slot, b_slot)] = [
            rule.decompose([g[j] for g in groups], ctx.weights_at(prefix), scalings, ranks, new_scaling, dtype, ctx.options, ctx.generator)
            for j in range(len(groups[0]))
        ]
        ctx.advance(prefix)
    every = [m for group in merges.values() for m in group]
    rank = rule.choose_rank(every, ctx.options, ctx.report.notes)
    alpha = merged_alpha(new_scaling, rank)
    full, count = max(m.available for m in every), len(merges)
    del every
    tensors: Dict[Slot, torch.Tensor] = {}
    for key in list(merges):
        (a_slot, b_slot), group_merges = key, merges.pop(key)  # each module's merge is dropped once written
        b, a = join_groups([m.factors(rank) for m in group_merges])
        device = ctx.inputs(a_slot)[0].device
        tensors[a_slot], tensors[b_slot] = a.to(device), b.to(device)
        ref_sq = sum(m.ref_sq for m in group_merges)
        kept = sum(m.kept_sq for m in group_merges) / ref_sq if ref_sq else 1.0
        if all(m.exact for m in group_merges):
            error, floor = 0.0, 0.0
        else:
            error, floor = relative_error(
                sum(m.diff_sq for m in group_merges), ref_sq, sum(m.floor_sq for m in group_merges)
            )
        ctx.report.add(a_slot.prefix, error, min(kept, 1.0), rank, rounding_floor=floor)
    if not rule.exact_target:
        _warn_if_refactorisation_loses(ctx, rank, full, count)
    return rank, alpha, tensors


def _check_module_shapes(names: Sequence[str], prefix: str, groups) -> None:
    """Every input's update of one module must be d × k alike (ranks may differ)."""
    shapes = [tuple((b.shape[0], a.shape[1]) for b, a in g) for g in groups]
    if len(set(shapes)) > 1:
        listing = ", ".join(f"'{n}': {' + '.join(f'{d}×{k}' for d, k in s)}" for n, s in zip(names, shapes))
        raise ValueError(
            f"The inputs' LoRA updates of '{prefix}' have different shapes ({listing}): they were trained on "
            "different base models, and cannot be merged."
        )


def _warn_if_refactorisation_loses(ctx: MergeContext, rank: int, full: int, count: int) -> None:
    """Warn when re-factorising the dense merge lost more than 10 % in some of the ``count`` modules
    just reported (``full``: the largest rank a module's merge has)."""
    modules = ctx.report.modules[-count:]
    off = [m for m in modules if m.relative_error > max(REFACTOR_WARNING_THRESHOLD, m.rounding_floor)]
    if not off:
        return
    worst = max(m.relative_error for m in modules)
    how = "the default rank Σ rᵢ" if ctx.options.get("svd_rank") is None else f"svd_rank={ctx.options['svd_rank']}"
    warn(
        f"combine_strategy='{ctx.strategy.name}' re-factorised the merged updates to rank {rank} ({how}) and lost "
        f"up to {worst:.3g} of them (relative error; {len(off)} of {len(modules)} modules above "
        f"{REFACTOR_WARNING_THRESHOLD:g}): {ctx.strategy.rule.truncation_cause(ctx.options)}. For more, "
        f"pass a larger svd_rank (up to {full}, the full rank), or svd_tol=0.05 for the smallest rank within 5% "
        "in every module."
    )


METHOD = Method(
    name="lora",
    config_types=(LoRAConfig,),
    containers=("loras", "shared_parameters"),
    merge=merge_lora,
    families=lambda config: {family(config)},
    owns_shared=lambda config: family(config) == "vera",
    ignored_config_fields=_ignored_fields,
    hint=_hint,
    absent_value=_absent,
)
