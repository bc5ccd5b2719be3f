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

The report measures what is stored against the target (`measured_error`, with its rounding floor).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from adapters import LoRAConfig
from adapters.configuration.adapter_config import MTLLoRAConfig

from ..ops import (
    LowRankSVD,
    compute_dtype,
    factored_svd,
    lowrank_frobenius_norm,
    select_rank,
    split_factors,
    stack_factors,
)
from .._warnings import warn
from ..ops import task_vectors
from ..ops.dense_svd import dense_low_rank, dense_relative_error
from ..state import Slot
from ..strategies import FAMILY_DESCRIPTIONS
from .base import Method, MergeContext, group_by, linear_merge

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
    return torch.cat([b for b, _ in groups], dim=0), torch.cat([a for _, a in groups], dim=0)


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
    if not ctx.strategy.merges_delta_w:
        linear = ctx.strategy.name == "linear" and kind in _CROSS_TERM_FAMILIES
        if linear and not any(w > 0 for w in ctx.weights) and any(w < 0 for w in ctx.weights):
            raise ValueError(_only_negative_error(kind, ctx.weights))
        if kind in _PARTLY_MEASURED:
            ctx.report.target = (
                f"Σ λᵢ sᵢBᵢAᵢ, the low-rank part only ({_PARTLY_MEASURED[kind]} are merged linearly and not measured)"
            )
        measured = len(ctx.report.modules)
        for unit in units.values():
            merged.update(_merge_parameters(ctx, configs, unit, kind))
        if linear and kind in _MEASURED_FAMILIES:
            _warn_if_linear_is_off(kind, ctx.report.modules[measured:])
        elif linear and _mixed_signs(ctx.weights):  # not measured: the update is not s·B·A
            warn(_cross_term_text(kind))
        return configs[0], merged
    if ctx.strategy.name not in ("lora_delta_w_svd", "lora_delta_w_concat"):
        ctx.report.target = f"the dense {ctx.strategy.name} merge of the ΔWᵢ"
    rank, alpha, tensors = _delta_w_plan(ctx, configs, units)
    merged.update(tensors)
    new_config = configs[0].replace(r=rank, alpha=alpha)
    ctx.report.rank, ctx.report.alpha = rank, alpha
    return new_config, merged


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
        warn(
            f"{_cross_term_text(kind).split('. ')[0]}: measured relative error{part} {worst:.3g} (mean {mean:.3g}) "
            f"over {len(modules)} modules. " + _cross_term_text(kind).split(". ", 1)[1]
        )


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


def _merge_parameters(ctx: MergeContext, configs, unit: Sequence[Slot], kind: str) -> Dict[Slot, torch.Tensor]:
    """``linear`` and ``lora_linear_only_negate_b``: rules on the parameters themselves."""
    merged = linear_merge(ctx, unit)
    by_param = {s.param: s for s in unit}
    if kind == "ia3":
        slot = by_param["lora_B"]
        alpha = scaling(configs[0])
        if alpha == 0:
            raise ValueError(
                f"The IA³ adapter '{ctx.names[0]}' has alpha=0: its scaling vector α·l is 0 whatever l is, so its "
                "deviation from identity (α·l − 1) cannot be merged. Use IA³ adapters with a non-zero alpha."
            )
        deviation = sum(w * (alpha * t.to(compute_dtype(t.dtype)) - 1.0) for w, t in zip(ctx.weights, ctx.inputs(slot)))
        merged[slot] = ((1.0 + deviation) / alpha).to(merged[slot].dtype)
    if ctx.strategy.name == "lora_linear_only_negate_b":
        slot = by_param["lora_A"]
        abs_ctx = MergeContext(ctx.names, [abs(w) for w in ctx.weights], ctx.tensors, ctx.strategy)
        merged[slot] = linear_merge(abs_ctx, [slot])[slot]
    if kind in _MEASURED_FAMILIES and "lora_A" in by_param:
        _report_parameter_merge(ctx, configs, by_param, merged)
    return merged


def _report_parameter_merge(ctx, configs, by_param, merged) -> None:
    """Error of the merged update s·B·A against the exact target Σ λᵢ sᵢ Bᵢ Aᵢ (factors only)."""
    a_slot, b_slot = by_param["lora_A"], by_param["lora_B"]
    r, s = configs[0]["r"], scaling(configs[0])
    inputs = [split_groups(ctx.tensors[n][b_slot], ctx.tensors[n][a_slot], c["r"]) for n, c in zip(ctx.names, configs)]
    coefficients = [w * scaling(c) for w, c in zip(ctx.weights, configs)]
    targets = [stack_factors([groups[j] for groups in inputs], coefficients) for j in range(len(inputs[0]))]
    stored = split_groups(merged[b_slot], merged[a_slot], r)
    error, floor = measured_error(stored, targets, s)
    ctx.report.add(a_slot.prefix, error, 1.0, r, rounding_floor=floor)


# ----------------------------------------------------------------------------- measuring
def rounding_floor(b: torch.Tensor, a: torch.Tensor) -> float:
    """Size of the float64 rounding in any quantity computed from the factors of B·A:
    max(d, k, R)·ε·‖B‖_F‖A‖_F. Singular values below it are zero, and a target whose norm is below
    it is zero (e.g. an adapter merged with itself at weights 1 and −1)."""
    size = max(b.shape[0], a.shape[1], b.shape[1])
    return size * torch.finfo(torch.float64).eps * float(b.to(torch.float64).norm()) * float(a.to(torch.float64).norm())


def difference_norm(b_new: torch.Tensor, a_new: torch.Tensor, b_ref: torch.Tensor, a_ref: torch.Tensor, scaling: float):
    """(‖s·B_new·A_new − B_ref·A_ref‖_F, whether it is exactly 0), from the factors, in float64.

    Where the stored A is the reference's A (concat, a single input), the difference is
    (s·B_new − B_ref)·A_ref: subtracting the factors first cancels exactly, so an exact merge
    measures 0 even where the target is far below ‖B_ref‖‖A_ref‖. Otherwise the difference is
    the product of [s·B_new, −B_ref] and [A_new; A_ref] (`lowrank_frobenius_norm`)."""
    b64, a64 = b_new.to(torch.float64) * float(scaling), a_new.to(torch.float64)
    if a64.shape == a_ref.shape and torch.equal(a64, a_ref):
        delta_b = b64 - b_ref
        if not bool(delta_b.any()):
            return 0.0, True
        return lowrank_frobenius_norm(delta_b, a_ref), False
    return lowrank_frobenius_norm(torch.cat([b64, -b_ref], dim=1), torch.cat([a64, a_ref], dim=0)), False


def measured_error(stored: Sequence[Factors], targets: Sequence[Factors], scaling: float) -> Tuple[float, float]:
    """(relative error, rounding floor) of stored factors (one pair per fused group) against the target
    Σ λᵢ sᵢBᵢAᵢ given as stacked float64 factors (B_cat, A_cat) per group (see `relative_error`)."""
    diff_sq = ref_sq = floor_sq = 0.0
    exact = True
    for (b_new, a_new), (b_ref, a_ref) in zip(stored, targets):
        diff, proven = difference_norm(b_new, a_new, b_ref, a_ref, scaling)
        exact &= proven
        diff_sq += diff**2
        ref_sq += lowrank_frobenius_norm(b_ref, a_ref) ** 2
        floor_sq += rounding_floor(b_ref, a_ref) ** 2
    if exact:
        return 0.0, 0.0
    return relative_error(diff_sq, ref_sq, floor_sq)


def relative_error(diff_sq: float, ref_sq: float, floor_sq: float = 0.0) -> Tuple[float, float]:
    """(‖merged − target‖/‖target‖, rounding floor/‖target‖). The true error lies within the error ±
    the floor: the floor is what rounding of the inputs lets one measure (and compute). A target below
    the floor counts as zero: error 0 if the difference is below it too, else ∞; floor 1."""
    if ref_sq <= floor_sq:
        return (0.0 if diff_sq <= 4.0 * floor_sq else math.inf), 1.0
    return math.sqrt(diff_sq / ref_sq), min(1.0, math.sqrt(floor_sq / ref_sq))


# ----------------------------------------------------------------------------- delta-W strategies
def merged_scaling(configs, weights: Sequence[float]) -> float:
    """The scaling s = alpha/r of the adapter a delta-W strategy makes: the largest |sᵢ| of the inputs
    with a non-zero weight (of all inputs if every weight is 0; 1 if every scaling is 0), whatever their
    order. The stored factors carry ΔW/s (B = U√(S/s), B_cat/s), so with this s they are no larger than
    the inputs' own — σ₁(ΔW)/s ≤ Σ |λᵢ| ‖Bᵢ‖‖Aᵢ‖ — and do not overflow in half precision. The effective
    update s·B·A does not depend on the choice."""
    used = [abs(scaling(c)) for c, w in zip(configs, weights) if w != 0] or [abs(scaling(c)) for c in configs]
    return max((s for s in used if s != 0.0), default=max((abs(scaling(c)) for c in configs if scaling(c)), default=1.0))


def merged_alpha(new_scaling: float, rank: int):
    """alpha = s·r; an integer when it is one to 1e-12 relative (16.000000000000004 → 16), never rounded
    to 0 or by more than that (alpha = 1e-10 stays 1e-10)."""
    alpha = new_scaling * rank
    nearest = round(alpha)
    return int(nearest) if nearest != 0 and abs(alpha - nearest) <= 1e-12 * abs(alpha) else alpha


@dataclass
class _Update:
    """One module's (one fused group's) merged update: how to store it at a rank, and how far that is
    from its target. Exact strategies keep the target as stacked factors and measure the stored
    factors against it; task-vector strategies measure their stored factors against the dense merge
    when they are made (phase 1), since the dense d × k target is not kept."""

    ref_sq: float  # ‖target‖²_F
    floor_sq: float  # squared rounding floor of the target (see rounding_floor)
    target: Optional[Factors] = None  # exact target (B_cat, A_cat), float64: lora_delta_w_svd / concat
    svd: Optional[LowRankSVD] = None  # SVD of the target (lora_delta_w_svd) or of the dense merge (task vectors)
    stored: Optional[Factors] = None  # task vectors: factors at their own rank, in the stored dtype
    stored_error_sq: float = 0.0  # task vectors: ‖dense merge − s·B·A‖² of ``stored``, measured densely

    def factors(self, rank: int, new_scaling: float, dtype) -> Factors:
        if self.stored is not None:  # own rank ≤ rank: pad with zeros (exact, unused)
            return pad_factors(*self.stored, rank)
        if self.svd is None:  # concat
            b_cat, a_cat = self.target
            return (b_cat / new_scaling).to(dtype), a_cat.to(dtype)
        return split_factors(self.svd, rank, new_scaling, dtype)

    def energy_kept(self, rank: int) -> float:
        if self.svd is None:
            return 1.0
        kept = self.svd.S[:rank] if self.stored is None else self.svd.S
        return float((kept.to(torch.float64) ** 2).sum()) / self.ref_sq if self.ref_sq else 1.0

    def own_rank(self, tol: Optional[float]) -> int:
        """The rank this module needs: a re-factorised (task-vector) update was already truncated
        to it by ``dense_low_rank``; an exact SVD is truncated by ``svd_tol`` here."""
        if self.stored is not None:
            return int(self.svd.S.numel())
        return select_rank(self.svd.S, None, tol)


def pad_factors(b: torch.Tensor, a: torch.Tensor, rank: int) -> Factors:
    """(B, A) of rank q ≤ ``rank`` as rank ``rank``: zero columns of B and rows of A (the same update)."""
    extra = rank - b.shape[1]
    if extra <= 0:
        return b, a
    return torch.cat([b, b.new_zeros(b.shape[0], extra)], dim=1), torch.cat([a, a.new_zeros(extra, a.shape[1])], dim=0)


def _delta_w_plan(ctx: MergeContext, configs, units) -> Tuple[int, float, Dict[Slot, torch.Tensor]]:
    """Merge the updates ΔWᵢ = sᵢ Bᵢ Aᵢ of every LoRA module: one rank and one scaling for the whole
    adapter (``merged_scaling``); returns (rank, alpha, {slot: factor}).

    Phase 1 decomposes each module's merged update (memory: one dense d × k update at a time for
    the task-vector strategies, none otherwise); phase 2 writes factors of the common rank and
    measures what is stored."""
    if ctx.options.get("svd_rank") is not None and ctx.options.get("svd_tol") is not None:
        raise ValueError(
            f"Pass either svd_rank (a fixed rank) or svd_tol (the smallest rank whose relative error is at most "
            f"svd_tol), not both: got svd_rank={ctx.options['svd_rank']}, svd_tol={ctx.options['svd_tol']}."
        )
    for slots in units.values():
        extra = sorted({s.param for s in slots} - {"lora_A", "lora_B"})
        if extra:
            raise ValueError(f"combine_strategy='{ctx.strategy.name}' cannot merge LoRA modules with {extra}.")
    ranks = [int(c["r"]) for c in configs]
    scalings = [scaling(c) for c in configs]
    coefficients = [w * s for w, s in zip(ctx.weights, scalings)]
    new_scaling = merged_scaling(configs, ctx.weights)
    updates: Dict[Tuple[Slot, Slot], List[_Update]] = {}
    for prefix, slots in units.items():
        a_slot = next(s for s in slots if s.param == "lora_A")
        b_slot = a_slot.replace_param("lora_B")
        dtype = ctx.inputs(a_slot)[0].dtype
        groups = [split_groups(ctx.tensors[n][b_slot], ctx.tensors[n][a_slot], r) for n, r in zip(ctx.names, ranks)]
        if len({len(g) for g in groups}) > 1:
            raise ValueError(f"The inputs fuse different numbers of projections at '{prefix}': check attn_matrices.")
        updates[(a_slot, b_slot)] = [
            _decompose(ctx, [g[j] for g in groups], coefficients, scalings, ranks, new_scaling, dtype)
            for j in range(len(groups[0]))
        ]
    rank = _choose_rank(ctx, updates, ranks)
    alpha = merged_alpha(new_scaling, rank)
    tensors: Dict[Slot, torch.Tensor] = {}
    for (a_slot, b_slot), group_updates in updates.items():
        like = ctx.inputs(a_slot)[0]
        stored = [u.factors(rank, new_scaling, like.dtype) for u in group_updates]
        b, a = join_groups(stored)
        tensors[a_slot], tensors[b_slot] = a.to(like.device), b.to(like.device)
        ref_sq = sum(u.ref_sq for u in group_updates)
        kept = sum(u.energy_kept(rank) * u.ref_sq for u in group_updates) / ref_sq if ref_sq else 1.0
        if group_updates[0].target is not None:  # concat and SVD: the stored factors against the exact target
            error, floor = measured_error(stored, [u.target for u in group_updates], new_scaling)
        else:
            error, floor = relative_error(
                sum(u.stored_error_sq for u in group_updates), ref_sq, sum(u.floor_sq for u in group_updates)
            )
        ctx.report.add(a_slot.prefix, error, kept, rank, rounding_floor=floor)
    if ctx.strategy.name not in ("lora_delta_w_svd", "lora_delta_w_concat"):
        _warn_if_refactorisation_loses(ctx, rank, updates)
    return rank, alpha, tensors


def _warn_if_refactorisation_loses(ctx: MergeContext, rank: int, updates) -> None:
    modules = ctx.report.modules[-len(updates):]
    off = [m for m in modules if m.relative_error > max(REFACTOR_WARNING_THRESHOLD, m.rounding_floor)]
    if not off:
        return
    worst = max(m.relative_error for m in modules)
    full = max(min(u.svd.U.shape[0], u.svd.Vh.shape[1]) for group in updates.values() for u in group)
    how = "the default rank Σ rᵢ" if ctx.options.get("svd_rank") is None else f"svd_rank={ctx.options['svd_rank']}"
    warn(
        f"combine_strategy='{ctx.strategy.name}' re-factorised the merged updates to rank {rank} ({how}) and lost "
        f"up to {worst:.3g} of them (relative error; {len(off)} of {len(modules)} modules above "
        f"{REFACTOR_WARNING_THRESHOLD:g}): pruning and sign election make the dense merge high-rank. For more, "
        f"pass a larger svd_rank (up to {full}, the full rank), or svd_tol=0.05 for the smallest rank within 5% "
        "in every module."
    )


def _decompose(ctx: MergeContext, factors: Sequence[Factors], coefficients, scalings, ranks, new_scaling, dtype):
    name = ctx.strategy.name
    stacked = stack_factors(factors, coefficients)
    if name == "lora_delta_w_concat":
        return _Update(lowrank_frobenius_norm(*stacked) ** 2, rounding_floor(*stacked) ** 2, target=stacked)
    if name == "lora_delta_w_svd":
        svd = factored_svd(*stacked)
        # singular values at the rounding level are zero: they are not part of the exact rank
        floor = rounding_floor(*stacked)
        svd = svd._replace(S=torch.where(svd.S > floor, svd.S, torch.zeros_like(svd.S)))
        return _Update(float((svd.S.to(torch.float64) ** 2).sum()), floor**2, target=stacked, svd=svd)
    dense, compute_eps = _task_vector_merge(ctx, factors, scalings)
    rank = ctx.options.get("svd_rank")
    if rank is None and ctx.options.get("svd_tol") is None:
        rank = sum(ranks)
    # a fixed-seed stream for the randomized range finder of large layers: deterministic, and the
    # caller's global torch RNG is never drawn from
    sketch_seed = torch.Generator().manual_seed(int(ctx.options.get("seed", 0)))
    svd = dense_low_rank(dense, svd_rank=rank, rel_tol=ctx.options.get("svd_tol"), generator=sketch_seed)
    stored = split_factors(svd, svd.S.numel(), new_scaling, dtype)  # what is written, measured as written
    error = dense_relative_error(dense, stored[0], stored[1], new_scaling)
    ref_sq = float((dense.to(torch.float64) ** 2).sum())
    # the dense merge is computed in compute_eps: a product of rank rᵢ and a sum of n tasks per entry
    size = [(r + len(factors)) * abs(c) * float(b.double().norm()) * float(a.double().norm())
            for (b, a), c, r in zip(factors, coefficients, ranks)]
    floor = compute_eps * sum(size)
    return _Update(ref_sq, floor**2, svd=svd, stored=stored, stored_error_sq=(error**2) * ref_sq)


def _task_vector_merge(ctx: MergeContext, factors: Sequence[Factors], scalings: Sequence[float]):
    """(dense merge of the ΔWᵢ = sᵢ Bᵢ Aᵢ of one module by the strategy ``ctx.strategy``, ε of its dtype)."""
    dtype = torch.float64 if factors[0][0].dtype == torch.float64 else torch.float32
    tasks = torch.stack([s * (b.to(dtype) @ a.to(dtype)) for (b, a), s in zip(factors, scalings)])
    options, name, generator = ctx.options, ctx.strategy.name, ctx.generator
    eps = torch.finfo(dtype).eps
    if name == "ties":
        return task_vectors.ties(tasks, ctx.weights, options["density"], options["majority_sign_method"]), eps
    if name == "dare_linear":
        return task_vectors.dare_linear(tasks, ctx.weights, options["density"], generator), eps
    if name == "dare_ties":
        merged = task_vectors.dare_ties(tasks, ctx.weights, options["density"], generator, options["majority_sign_method"])
        return merged, eps
    if name == "magnitude_prune":
        return task_vectors.magnitude_prune(tasks, ctx.weights, options["density"]), eps
    if name == "breadcrumbs":
        return task_vectors.breadcrumbs(tasks, ctx.weights, options["density"], options["gamma"]), eps
    raise ValueError(f"combine_strategy='{name}' is not a task-vector strategy.")  # pragma: no cover


def _choose_rank(ctx: MergeContext, updates, ranks: Sequence[int]) -> int:
    """One rank for all modules (a LoRA configuration has a single r).

    concat: Σ rᵢ. Otherwise ``svd_rank``; or with ``svd_tol`` the largest rank any module needs;
    or by default the exact (numerical) rank of the target, the largest over modules
    (``lora_delta_w_svd``) / Σ rᵢ (task-vector strategies). Never more than the largest rank the
    merged updates have."""
    if ctx.strategy.name == "lora_delta_w_concat":
        return sum(ranks)
    svds = [u.svd for group_updates in updates.values() for u in group_updates]
    available = max(svd.S.numel() for svd in svds)
    svd_rank, tol = ctx.options.get("svd_rank"), ctx.options.get("svd_tol")
    if svd_rank is None and tol is not None:
        return max(1, max(u.own_rank(tol) for group_updates in updates.values() for u in group_updates))
    if svd_rank is None and ctx.strategy.name == "lora_delta_w_svd":
        # the exact rank: singular values at the rounding level were zeroed by _decompose
        return max(1, max(int((u.svd.S > 0).sum()) for group_updates in updates.values() for u in group_updates))
    if svd_rank is None:
        return max(1, available)
    if svd_rank > available:
        ctx.report.notes.append(
            f"svd_rank={svd_rank} exceeds the rank of the merged update ({available}); used {available}."
        )
    return max(1, min(svd_rank, available))


METHOD = Method(
    name="lora",
    config_types=(LoRAConfig,),
    containers=("loras", "shared_parameters"),
    merge=merge_lora,
    families=lambda config: {family(config)},
    claims_shared_parameters=lambda config: family(config) == "vera",
    ignored_config_fields=_ignored_fields,
)
