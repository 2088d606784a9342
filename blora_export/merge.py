"""What to merge the adapter into, and the merged weights, one tensor at a time.

The function a checkpoint was trained as is ``trained_base(W) + ΔW`` for every adapted
Linear, where ``trained_base`` is the base weight the adapter saw during training:
``dequant(NF4(W))`` for an NF4 base, ``dequant(minmax(W))`` for a min-max grid, ``W`` itself
when nothing says how the base was quantized (the paper's own checkpoints).
A quantized base quantizes every decoder Linear, adapted or not.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from .base import DECODER_LINEAR, BaseModel
from .checkpoint import Checkpoint
from .delta import adapter_matrix, delta_weight
from .enums import MergeTarget
from .errors import BadInputError, UnsupportedError
from .nf4 import nf4_roundtrip
from .numerics import round_to
from .quant import QuantizedWeight, fold_into_zero_points, quantize_minmax, row_chunks
from .spec import MinMaxGrid, NF4Base
from .tensor_io import all_finite, one_thread

log = logging.getLogger(__name__)
MERGE_TARGETS = MergeTarget.values()
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class MergePlan:
    """Which base weights the adapter is merged into, and why."""

    merge_into: str  # "original" or "dequantized"
    base_quant: object  # MinMaxGrid | NF4Base | None
    reason: str
    folded: bool = False  # a fold-aware checkpoint merged into its quantized base

    def describe(self) -> str:
        if self.merge_into == "original":
            return f"merged into the original base weights ({self.reason})"
        folded = ", offsets folded as trained (fold-aware)" if self.folded else ""
        return f"merged into the dequantized base, {self.base_quant.describe()}{folded} ({self.reason})"


def resolve_merge_plan(ckpt: Checkpoint, merge_into: Optional[str] = None) -> MergePlan:
    """Default: ``dequantized`` when the checkpoint names its base quantization, else ``original``."""
    if merge_into is not None and merge_into not in MERGE_TARGETS:
        raise UnsupportedError(f"--merge-into must be one of {MERGE_TARGETS}, got {merge_into!r}")
    if merge_into is None:
        if ckpt.base_quant is None:
            return MergePlan("original", None, "default: the checkpoint does not say how its base was quantized")
        return MergePlan("dequantized", ckpt.base_quant,
                         "default: blora_config.json names the quantized base the adapter was trained against",
                         ckpt.folded_forward)
    if merge_into == "dequantized":
        if ckpt.base_quant is None:
            raise UnsupportedError("--merge-into dequantized needs a checkpoint whose blora_config.json names "
                                   "base_quant; this one does not: use --merge-into original")
        return MergePlan("dequantized", ckpt.base_quant, "requested", ckpt.folded_forward)
    return MergePlan("original", ckpt.base_quant, "requested")


def is_quantized_linear(name: str) -> bool:
    return DECODER_LINEAR.match(name) is not None


def quantize_base_weight(weight: torch.Tensor, grid: MinMaxGrid, name: str) -> QuantizedWeight:
    return quantize_minmax(weight, grid, name)


def trained_base_weight(name: str, weight: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    """The base weight the adapter was trained against (float32), per the plan."""
    if plan.merge_into == "original" or not is_quantized_linear(name):
        return weight.to(torch.float32)
    quant = plan.base_quant
    if isinstance(quant, NF4Base):
        try:
            return nf4_roundtrip(weight, quant).to(torch.float32)
        except ValueError as exc:
            raise BadInputError(f"{name}: {exc}") from None
    if isinstance(quant, MinMaxGrid):
        return quantize_minmax(weight, quant, name).dequantize()  # converts to float32 a few rows at a time
    raise UnsupportedError(f"unknown base quantization {quant!r}")


def exact_merged_weight(name: str, weight: torch.Tensor, ckpt: Checkpoint, plan: MergePlan) -> torch.Tensor:
    """``trained_base(W) + ΔW`` in float64 (exact up to float64 rounding).

    A fold-aware checkpoint merged into its quantized base is ``α·q + param_dtype(β')``
    instead: the weights its forward used (float32 values, returned as float64).
    """
    module = ckpt.module_for_weight(name)
    if module is not None and ckpt.folded_forward and plan.merge_into == "dequantized":
        qw = quantize_minmax(weight, plan.base_quant, name)
        return fold_into_zero_points(qw, module).dequantize().to(torch.float64)
    merged = trained_base_weight(name, weight, plan).to(torch.float64)
    if module is not None:
        merged = merged + delta_weight(module, torch.float64)
    return merged


def merged_weight(name: str, weight: torch.Tensor, ckpt: Checkpoint, plan: MergePlan, dtype: torch.dtype,
                  trained: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``round_to(exact_merged_weight(...), dtype)`` without the whole float64 tensors.

    The same float64 values are formed, a few rows at a time: ``trained_base(W)`` (float32,
    exact in float64) plus ``ΔW[o, i] = (M·s/λi)[o//λo, i//λi]`` broadcast over each λi run
    instead of materialized (the same float64 operands, hence the same sums), then correctly
    rounded to ``dtype``. A fold-aware checkpoint's weights are float32 values ``α·q + β'``:
    rounding them to ``dtype`` once is exact rounding already. ``trained``: ``trained_base(W)``
    when the caller has it already (verify shares it between its streams).
    """
    module = ckpt.module_for_weight(name)
    if module is not None and ckpt.folded_forward and plan.merge_into == "dequantized":
        qw = quantize_minmax(weight, plan.base_quant, name)
        return fold_into_zero_points(qw, module).dequantize(dtype)
    base = trained_base_weight(name, weight, plan) if trained is None else trained
    if module is None:
        return base.to(dtype)
    m = adapter_matrix(module, torch.float64) * (module.scaling / module.lambda_in)
    out = torch.empty(base.shape, dtype=dtype)
    li = module.lambda_in
    with one_thread():
        for r0, r1 in row_chunks(tuple(base.shape), 1):
            rows = base[r0:r1].to(torch.float64, copy=True).view(r1 - r0, -1, li)
            rows += m[torch.arange(r0, r1) // module.lambda_out][:, :, None]
            out[r0:r1] = round_to(rows.view(r1 - r0, -1), dtype)
    return out


def merged_tensors(base: BaseModel, ckpt: Checkpoint, plan: MergePlan, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the merged model, in base-file order, one at a time.

    Adapted weights are ``round_dtype(trained_base(W) + ΔW)`` from float64: each within half
    an ulp of ``dtype`` of the exact sum (:func:`merged_weight`). Other tensors are cast to
    ``dtype`` (quantized decoder Linears dequantized first when merging into the dequantized base).
    """
    for name in base.names():
        weight = base.tensor(name)
        if ckpt.module_for_weight(name) is not None:
            merged = merged_weight(name, weight, ckpt, plan, dtype)
        elif weight.is_floating_point() and (plan.merge_into == "original" or not is_quantized_linear(name)):
            merged = weight.to(dtype)  # unchanged by the plan: one rounding, no float32 copy (0.5 GB at 7B)
        elif weight.is_floating_point():
            with one_thread():
                merged = trained_base_weight(name, weight, plan).to(dtype)
        else:
            yield name, weight
            continue
        del weight
        if not all_finite(merged):
            raise UnsupportedError(f"{name} overflows {str(dtype)[6:]} after merging; "
                                   "use --dtype bfloat16 or float32")
        yield name, merged
