"""End-to-end logit bounds per storage dtype, with their basis.

The per-layer checks are the exact ones (each merged weight is the correctly rounded exact
sum). The end-to-end bound is on ``max |Δlogit| / max |logit|`` over the built-in prompts,
and must sit well below what a wrong merge does: dropping the adapter, or the paper
``merge.py``'s missing ``1/λi``, moves the samples' logits by 10-100% of their range.

Basis (measured on the samples and the test models, see README "Tolerances"): rounding
every weight of a model to a dtype with unit roundoff ``u`` (2^-11 fp16, 2^-8 bf16, 2^-24
fp32) moved the logits of the tiny test models by at most ~5u relative; the bounds below
allow 16u for the 16-bit dtypes, and float32 allows for the different operation order of
the adapter branch (pool -> matmul -> repeat) versus the merged matmul.
"""
from __future__ import annotations

import torch

from .base import Tolerance

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}

TOLERANCES = {
    torch.float32: Tolerance(max_rel=1e-5, min_top1=0.97,
                             basis="float32 weights: float32 operation-order noise only"),
    torch.float16: Tolerance(max_rel=16 * 2.0**-11, min_top1=0.9,
                             basis="float16 weights: 16 x unit roundoff 2^-11 (each weight within half an ulp)"),
    torch.bfloat16: Tolerance(max_rel=16 * 2.0**-8, min_top1=0.8,
                              basis="bfloat16 weights: 16 x unit roundoff 2^-8 (each weight within half an ulp)"),
}


def tolerance_for_dtype(dtype: torch.dtype) -> Tolerance:
    return TOLERANCES.get(dtype, TOLERANCES[torch.float32])
