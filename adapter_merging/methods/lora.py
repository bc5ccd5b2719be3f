"""The LoRA family: LoRA, IA³, VeRA, DoRA, MTL-LoRA and gated LoRA (UniPELT).

A LoRA module adds ΔW = s·B·A to a frozen weight, s = alpha/r, B ∈ ℝ^{d×r}, A ∈ ℝ^{r×k}, with
B·A in the (out, in) layout whatever the layer stores (GPT-2's Conv1D, ``fan_in_fan_out``).
A fused QKV layer (``LoRAMergedLinear``: GPT-2 ``c_attn``, DeBERTa ``in_proj``) holds g groups,
A = [A₁; …; A_g] (g·r × k) and B = [B₁; …; B_g] (g·d/3 × r), group j updating its own rows by
s·B_j·A_j; every rule below is applied group by group.

Rules by strategy (λᵢ the merge weights, sᵢ each input's own scaling):

* ``linear`` — A = Σ λᵢ Aᵢ, B = Σ λᵢ Bᵢ (plus gates, DoRA magnitudes, VeRA vectors linearly);
  IA³ merges the deviation from identity of its scaling vector: α·l = 1 + Σ λᵢ (α·lᵢ − 1).
* ``lora_linear_only_negate_b`` — A = Σ |λᵢ| Aᵢ, B = Σ λᵢ Bᵢ.
* ``lora_delta_w_svd`` — target ΔW = Σ λᵢ sᵢ Bᵢ Aᵢ, exact factored SVD, truncated to one rank for
  all layers: ``svd_rank``; or with ``svd_tol`` the smallest rank whose relative truncation error is
  ≤ svd_tol in every layer; or (neither) the exact rank, the largest numerical rank of any layer's
  target. The merged adapter's own scaling s (the first input's) is folded into the factors,
  B = U√(S/s), A = √(S/s)Vh, so s·B·A equals the target's optimal (Eckart–Young) truncation.
* ``lora_delta_w_concat`` — B = [λ₁s₁B₁ … λₙsₙBₙ]/s, A = [A₁; …; Aₙ]: exact, rank Σ rᵢ.
* task-vector strategies (``ties``, ``dare_*``, ``magnitude_prune``, ``breadcrumbs``) — applied to
  the dense per-adapter updates ΔWᵢ = sᵢ Bᵢ Aᵢ of one layer at a time, then re-factorised.
"""
from __future__ import annotations

import math
import os
import sys
import warnings
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
from ..ops import task_vectors
from ..ops.lowrank import svd_difference_norm
from ..ops.dense_svd import dense_low_rank, dense_relative_error
from ..state import Slot
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


def merged_scaling(configs) -> float:
    """The scaling alpha/r the adapter made by a delta-W strategy gets: the first input's, or the first
    non-zero one if the first is zero (a zero scaling could not carry any update); the factors are
    divided by it, so the effective update s·B·A does not depend on this choice."""
    return next((s for s in map(scaling, configs) if s != 0.0), 1.0)


def _tidy(number: float):
    return int(round(number)) if abs(number - round(number)) < 1e-9 else number


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
def merge_lora(ctx: MergeContext, configs, slots):
    kind = family(configs[0])
    shared = [s for s in slots if s.container == "shared_parameters"]
    units = group_by([s for s in slots if s.container == "loras"], lambda s: s.prefix)
    merged: Dict[Slot, torch.Tensor] = _copy_identical(ctx, shared) if kind == "vera" else {}
    if not ctx.strategy.merges_delta_w:
        if ctx.strategy.name == "linear" and _mixed_signs(ctx.weights) and kind in _CROSS_TERM_FAMILIES:
            warnings.warn(_cross_term_warning(kind), UserWarning, stacklevel=_user_stacklevel())
        if ctx.report is not None and kind in _PARTLY_MEASURED:
            ctx.report.target = (
                f"Σ λᵢ sᵢBᵢAᵢ, the low-rank part only ({_PARTLY_MEASURED[kind]} are merged linearly and not measured)"
            )
        for unit in units.values():
            merged.update(_merge_parameters(ctx, configs, unit, kind))
        return configs[0], merged
    if ctx.report is not None and ctx.strategy.name not in ("lora_delta_w_svd", "lora_delta_w_concat"):
        ctx.report.target = f"the dense {ctx.strategy.name} merge of the ΔWᵢ"
    new_scaling = merged_scaling(configs)
    rank, tensors = _delta_w_plan(ctx, configs, units, new_scaling)
    merged.update(tensors)
    new_config = configs[0].replace(r=rank, alpha=_tidy(new_scaling * rank))
    if ctx.report is not None:
        ctx.report.rank, ctx.report.alpha = rank, new_config["alpha"]
    return new_config, merged


def _mixed_signs(weights: Sequence[float]) -> bool:
    return any(w < 0 for w in weights) and any(w > 0 for w in weights)


#: families whose update is a product of merged parameters, so ``linear`` has cross-terms
_CROSS_TERM_FAMILIES = ("lora", "dora", "lora_gated", "mtl_lora", "vera")
#: families whose report measures only s·B·A: what else they apply, merged linearly but not measured
_PARTLY_MEASURED = {"dora": "the DoRA magnitudes", "lora_gated": "the gates"}


def _cross_term_warning(kind: str) -> str:
    text = (
        "combine_strategy='linear' combines the factors of the update (A and B) separately, so with weights "
        "of mixed signs the merged update has cross-terms Bᵢ·Aⱼ and is not Σ λᵢ ΔWᵢ."
    )
    if kind == "lora":
        return text + (
            " For task arithmetic and unlearning use combine_strategy='lora_delta_w_concat' (exact, rank Σ rᵢ) "
            "or 'lora_delta_w_svd' (exact at svd_rank=None, else the optimal truncation)."
        )
    return text + (
        " The exact strategies 'lora_delta_w_concat' and 'lora_delta_w_svd' only support plain LoRA, "
        "so the result of this merge is an approximation."
    )


def _user_stacklevel() -> int:
    """stacklevel that points a warning at the first caller outside adapter_merging."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


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
        deviation = sum(w * (alpha * t.to(compute_dtype(t.dtype)) - 1.0) for w, t in zip(ctx.weights, ctx.inputs(slot)))
        merged[slot] = ((1.0 + deviation) / alpha).to(ctx.inputs(slot)[0].dtype)
    if ctx.strategy.name == "lora_linear_only_negate_b":
        slot = by_param["lora_A"]
        abs_ctx = MergeContext(ctx.names, [abs(w) for w in ctx.weights], ctx.tensors, ctx.strategy)
        merged[slot] = linear_merge(abs_ctx, [slot])[slot]
    if kind in ("lora", "dora", "lora_gated") and ctx.report is not None and "lora_A" in by_param:
        _report_parameter_merge(ctx, configs, by_param, merged)
    return merged


def _report_parameter_merge(ctx, configs, by_param, merged) -> None:
    """Error of the merged update s·B·A against the exact target Σ λᵢ sᵢ Bᵢ Aᵢ (factors only)."""
    a_slot, b_slot = by_param["lora_A"], by_param["lora_B"]
    r, s = configs[0]["r"], scaling(configs[0])
    inputs = [split_groups(ctx.tensors[n][b_slot], ctx.tensors[n][a_slot], c["r"]) for n, c in zip(ctx.names, configs)]
    result = split_groups(merged[b_slot], merged[a_slot], r)
    diff_sq = ref_sq = noise_sq = 0.0
    for j, (b_new, a_new) in enumerate(result):
        b_ref, a_ref = stack_factors([groups[j] for groups in inputs], [w * scaling(c) for w, c in zip(ctx.weights, configs)])
        ref_sq += lowrank_frobenius_norm(b_ref, a_ref) ** 2
        noise_sq += rounding_floor(b_ref, a_ref) ** 2
        diff_b = torch.cat([b_new.to(torch.float64) * s, -b_ref], dim=1)
        diff_sq += lowrank_frobenius_norm(diff_b, torch.cat([a_new.to(torch.float64), a_ref], dim=0)) ** 2
    ctx.report.add(a_slot.prefix, _ratio(diff_sq, ref_sq, noise_sq), 1.0, r)


def rounding_floor(b: torch.Tensor, a: torch.Tensor) -> float:
    """Size of the float64 rounding in any quantity computed from the factors of B·A:
    max(d, k, R)·ε·‖B‖_F‖A‖_F. Singular values below it are zero, and a target whose norm is below
    it is zero (e.g. an adapter merged with itself at weights 1 and −1)."""
    size = max(b.shape[0], a.shape[1], b.shape[1])
    return size * torch.finfo(torch.float64).eps * float(b.to(torch.float64).norm()) * float(a.to(torch.float64).norm())


def _ratio(diff_sq: float, ref_sq: float, noise_sq: float = 0.0) -> float:
    """‖merged − target‖/‖target‖; a target below the rounding floor counts as zero, and so does a
    difference from it that is below the floor."""
    if ref_sq <= noise_sq:
        return 0.0 if diff_sq <= 4.0 * noise_sq else math.inf
    return math.sqrt(diff_sq / ref_sq)


# ----------------------------------------------------------------------------- delta-W strategies
@dataclass
class _Update:
    """The merged update of one module (one fused group): how to factor it, and its target norm."""

    ref_sq: float  # ‖target ΔW‖²_F
    svd: Optional[LowRankSVD] = None  # exact (factored) or re-factorised SVD of the target
    concat: Optional[Factors] = None  # exact stacked factors (B_cat, A_cat)
    residual_sq: Optional[float] = None  # measured ‖target − re-factorised‖², task-vector strategies
    target: Optional[Factors] = None  # the exact target as stacked factors (lora_delta_w_svd), for the report
    noise_sq: float = 0.0  # squared rounding floor of the target (see rounding_floor)

    def factors(self, rank: int, new_scaling: float, dtype) -> Factors:
        if self.concat is not None:
            b_cat, a_cat = self.concat
            return (b_cat / new_scaling).to(dtype), a_cat.to(dtype)
        return split_factors(self.svd, rank, new_scaling, dtype)

    @property
    def exact_factors(self) -> Optional[Factors]:
        """The target as exact stacked factors, when known (concat and SVD)."""
        return self.concat if self.concat is not None else self.target

    def error_sq_and_kept(self, rank: int) -> Tuple[float, float]:
        """(‖merged − target‖², ‖kept‖²) predicted from the decomposition."""
        if self.concat is not None:
            return 0.0, self.ref_sq
        kept_sq = float((self.svd.S[:rank].to(torch.float64) ** 2).sum())
        if self.residual_sq is not None:
            # the residual of the re-factorisation is orthogonal to its span, so truncating it further
            # (a common rank below this module's own) adds exactly the dropped singular values
            dropped_sq = float((self.svd.S[rank:].to(torch.float64) ** 2).sum())
            return self.residual_sq + dropped_sq, kept_sq
        # the dropped tail itself, not ‖ΔW‖² − kept, whose cancellation loses a small error's digits
        return float((self.svd.S[rank:].to(torch.float64) ** 2).sum()), kept_sq

    def own_rank(self, tol: Optional[float]) -> int:
        """The rank this module needs: a re-factorised (task-vector) update was already truncated
        to it by ``dense_low_rank``; an exact SVD is truncated by ``svd_tol`` here."""
        if self.residual_sq is not None:
            return int(self.svd.S.numel())
        return select_rank(self.svd.S, None, tol)


def _delta_w_plan(
    ctx: MergeContext, configs, units, new_scaling: float
) -> Tuple[int, Dict[Slot, torch.Tensor]]:
    """Merge the updates ΔWᵢ = sᵢ Bᵢ Aᵢ of every LoRA module; one rank for the whole adapter, whose
    factors are written for the scaling ``new_scaling`` (new_scaling·B·A is the merged update).

    Phase 1 decomposes each module's merged update (memory: one dense d × k update at a time for
    the task-vector strategies, none otherwise); phase 2 writes factors of the common rank."""
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
    updates: Dict[Tuple[Slot, Slot], List[_Update]] = {}
    for prefix, slots in units.items():
        a_slot = next(s for s in slots if s.param == "lora_A")
        b_slot = a_slot.replace_param("lora_B")
        groups = [split_groups(ctx.tensors[n][b_slot], ctx.tensors[n][a_slot], r) for n, r in zip(ctx.names, ranks)]
        if len({len(g) for g in groups}) > 1:
            raise ValueError(f"The inputs fuse different numbers of projections at '{prefix}': check attn_matrices.")
        updates[(a_slot, b_slot)] = [
            _decompose(ctx, [g[j] for g in groups], coefficients, scalings, ranks) for j in range(len(groups[0]))
        ]
    rank = _choose_rank(ctx, updates, ranks)
    tensors: Dict[Slot, torch.Tensor] = {}
    for (a_slot, b_slot), group_updates in updates.items():
        like = ctx.inputs(a_slot)[0]
        b, a = join_groups([u.factors(rank, new_scaling, like.dtype) for u in group_updates])
        tensors[a_slot], tensors[b_slot] = a.to(like.device), b.to(like.device)
        if ctx.report is not None:
            ref_sq = sum(u.ref_sq for u in group_updates)
            error_sq, kept_sq = map(sum, zip(*(u.error_sq_and_kept(rank) for u in group_updates)))
            kept = kept_sq / ref_sq if ref_sq else 1.0
            if all(u.exact_factors is not None for u in group_updates):
                # concat and SVD: measured from the stored factors (their dtype included), not assumed
                error = _measured_error(ctx, a_slot, b_slot, tensors, group_updates, new_scaling, rank)
                ctx.report.add(a_slot.prefix, error, kept, rank)
                continue
            ctx.report.add(a_slot.prefix, _ratio(error_sq, ref_sq), kept, rank)
    return rank, tensors


def _decompose(ctx: MergeContext, factors: Sequence[Factors], coefficients, scalings, ranks) -> _Update:
    name = ctx.strategy.name
    stacked = stack_factors(factors, coefficients)
    if name == "lora_delta_w_concat":
        return _Update(lowrank_frobenius_norm(*stacked) ** 2, concat=stacked, noise_sq=rounding_floor(*stacked) ** 2)
    if name == "lora_delta_w_svd":
        svd = factored_svd(*stacked)
        # singular values at the rounding level are zero: they are not part of the exact rank
        floor = rounding_floor(*stacked)
        svd = svd._replace(S=torch.where(svd.S > floor, svd.S, torch.zeros_like(svd.S)))
        return _Update(float((svd.S.to(torch.float64) ** 2).sum()), svd=svd, target=stacked, noise_sq=floor**2)
    dense = _task_vector_merge(ctx, factors, scalings)
    rank = ctx.options.get("svd_rank")
    if rank is None and ctx.options.get("svd_tol") is None:
        rank = sum(ranks)
    # a fixed-seed stream for the randomized range finder of large layers: deterministic, and the
    # caller's global torch RNG is never drawn from
    sketch_seed = torch.Generator().manual_seed(int(ctx.options.get("seed", 0)))
    svd = dense_low_rank(dense, svd_rank=rank, rel_tol=ctx.options.get("svd_tol"), generator=sketch_seed)
    b, a = svd.U * svd.S, svd.Vh
    ref_sq = float((dense.to(torch.float64) ** 2).sum())
    residual_sq = (dense_relative_error(dense, b, a) ** 2) * ref_sq
    return _Update(ref_sq, svd=svd, residual_sq=residual_sq)


def _task_vector_merge(ctx: MergeContext, factors: Sequence[Factors], scalings: Sequence[float]) -> torch.Tensor:
    """Dense ΔWᵢ = sᵢ Bᵢ Aᵢ of one module, merged by the task-vector strategy ``ctx.strategy``."""
    dtype = torch.float64 if factors[0][0].dtype == torch.float64 else torch.float32
    tasks = torch.stack([s * (b.to(dtype) @ a.to(dtype)) for (b, a), s in zip(factors, scalings)])
    options, name, generator = ctx.options, ctx.strategy.name, ctx.generator
    if name == "ties":
        return task_vectors.ties(tasks, ctx.weights, options["density"], options["majority_sign_method"])
    if name == "dare_linear":
        return task_vectors.dare_linear(tasks, ctx.weights, options["density"], generator)
    if name == "dare_ties":
        return task_vectors.dare_ties(tasks, ctx.weights, options["density"], generator, options["majority_sign_method"])
    if name == "magnitude_prune":
        return task_vectors.magnitude_prune(tasks, ctx.weights, options["density"])
    if name == "breadcrumbs":
        return task_vectors.breadcrumbs(tasks, ctx.weights, options["density"], options["gamma"])
    raise ValueError(f"combine_strategy='{name}' is not a task-vector strategy.")  # pragma: no cover


def _measured_error(ctx, a_slot, b_slot, tensors, group_updates, new_scaling, rank) -> float:
    diff_sq = ref_sq = noise_sq = 0.0
    stored = split_groups(tensors[b_slot], tensors[a_slot], rank)
    for (b_new, a_new), update in zip(stored, group_updates):
        ref_sq += update.ref_sq
        noise_sq += update.noise_sq
        if update.concat is None:  # against the exact SVD of the target: products, no QR
            diff_sq += svd_difference_norm(update.svd, b_new, a_new, new_scaling) ** 2
            continue
        b_ref, a_ref = update.concat
        diff = torch.cat([b_new.to(torch.float64) * new_scaling, -b_ref], dim=1)
        diff_sq += lowrank_frobenius_norm(diff, torch.cat([a_new.to(torch.float64), a_ref], dim=0)) ** 2
    return _ratio(diff_sq, ref_sq, noise_sq)


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
    if svd_rank > available and ctx.report is not None:
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
