"""End-to-end logit bounds per storage dtype, with their basis.

The per-layer checks are the exact ones (each merged weight is the correctly rounded exact
sum). The end-to-end bound is on ``max |Δlogit| / max |logit|`` over the built-in prompts,
and must sit well below what a wrong merge does: dropping the adapter, or the paper
``merge.py``'s missing ``1/λi``, moves the samples' logits by 10-100% of their range.

Basis (``python bench/dtype_floor.py``): rounding every weight of the tiny test models to a
dtype with unit roundoff ``u`` (2^-11 fp16, 2^-8 bf16) moved their logits by 1.8-3.0 u
relative; correct merges of the samples measured 2.9-6.6 u. The table allows 16 u, and
``verify`` widens it to ``FLOOR_FACTOR`` x the floor it measures on the base itself when that is
larger (deep models have higher floors). float32 allows for the different operation order of the
adapter branch (pool -> matmul -> repeat) versus the merged matmul.

Floors. Every bound that is measured rather than tabled is ``FLOOR_FACTOR`` times a *floor*: what
the runtime's storage and arithmetic do to the base as trained **without the adapter** (its
weights rounded or quantized as the artifact stores them, its activations quantized as the
runtime quantizes them), on the same prompts, computed in torch from the checkpoint's base —
never from the artifact under test, and never from the size of the update being verified.
Top-1: disagreement up to ``FLOOR_FACTOR`` x the floor's, and at least ``TOP1_SLACK``.

Sensitivity. A check only tells a right artifact from a wrong one when its bound is well below
what the adapter does to the logits: ``verify`` reports a bound at or above
``effect / SENSITIVITY_FACTOR`` as *inconclusive* (exit 1, not a PASS).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .numerics import LogitStats


@dataclass(frozen=True)
class Tolerance:
    """The end-to-end bound an artifact must meet, with the reason for it."""

    max_rel: float  # max |Δlogit| / max |reference logit|
    min_top1: float  # fraction of positions whose argmax must agree
    basis: str  # why this bound (dtype, runtime noise, measured floor)

    def to_json(self) -> dict:
        return {"max_rel": self.max_rel, "min_top1": self.min_top1, "basis": self.basis}


UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}

TOLERANCES = {
    torch.float32: Tolerance(max_rel=1e-5, min_top1=0.97,
                             basis="float32 weights: float32 operation-order noise only"),
    torch.float16: Tolerance(max_rel=16 * 2.0**-11, min_top1=0.9,
                             basis="float16 weights: 16 x unit roundoff 2^-11 (each weight within half an ulp)"),
    torch.bfloat16: Tolerance(max_rel=16 * 2.0**-8, min_top1=0.8,
                              basis="bfloat16 weights: 16 x unit roundoff 2^-8 (each weight within half an ulp)"),
}


FLOOR_FACTOR = 4.0  # one factor for every measured floor (dtype rounding, PTQ, runtime arithmetic)
TOP1_SLACK = 0.10
SENSITIVITY_FACTOR = 4.0


def tolerance_for_dtype(dtype: torch.dtype) -> Tolerance:
    return TOLERANCES.get(dtype, TOLERANCES[torch.float32])


def widen_to_floor(tolerance: Tolerance, floor_rel: float, dtype: torch.dtype) -> Tolerance:
    """``max(bound, FLOOR_FACTOR x floor)``: the floor is what correct rounding to ``dtype`` does to
    the logits on the same prompts, of the base alone and of the training-time model, both rounded
    by verify itself (deeper models have a higher floor)."""
    widened = FLOOR_FACTOR * floor_rel
    if widened <= tolerance.max_rel:
        return tolerance
    return Tolerance(max_rel=widened, min_top1=tolerance.min_top1,
                     basis=f"{FLOOR_FACTOR:g} x the measured {str(dtype)[6:]} rounding floor (base and trained model, rounded by verify) "
                           f"({floor_rel:.2e}), above the table bound {tolerance.max_rel:.2e}")


def floor_tolerance(floor: LogitStats, what: str, at_least: Tolerance | None = None) -> Tolerance:
    """``FLOOR_FACTOR`` x a measured floor (relative error and top-1 disagreement), never tighter
    than ``at_least`` (a table bound) when given."""
    max_rel = FLOOR_FACTOR * floor.max_rel
    min_top1 = 1.0 - max(FLOOR_FACTOR * (1.0 - floor.top1_agreement), TOP1_SLACK)
    if at_least is not None:
        max_rel, min_top1 = max(max_rel, at_least.max_rel), min(min_top1, at_least.min_top1)
    return Tolerance(max_rel=max_rel, min_top1=max(min_top1, 0.0),
                     basis=f"{FLOOR_FACTOR:g} x {what} ({floor.max_rel:.2e} relative, top-1 "
                           f"{floor.top1_agreement:.3f}; measured on the base as trained, without the adapter)")
