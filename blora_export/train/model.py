"""The model that is trained: the base with every decoder Linear replaced by a :class:`BLoRALinear`.

Every decoder Linear is quantized (NF4 for Q-BLoRA, the target's min-max grid for QA-BLoRA) and
adapted, as ``merge.trained_base_weight`` assumes; everything else (embeddings, norms, the output
head) is the base's own weights, frozen. Base weights are read from the files one tensor at a
time (``BaseModel.tensor``), in their stored dtype, exactly as ``merge`` reads them.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

from ..base import BaseModel
from ..errors import UnsupportedError
from ..nf4 import nf4_roundtrip
from ..quant import check_grid_fits, quantize_minmax
from ..reference import load_hf_model
from ..spec import MinMaxGrid, NF4Base
from .config import AdapterSpec
from .layers import BLoRALinear, BnbNF4Base, DenseBase, MinMaxBase

log = logging.getLogger(__name__)


def shape_problems(base: BaseModel, spec: AdapterSpec) -> list[str]:
    """Decoder Linears whose shapes λ (or the grid) do not divide."""
    problems = []
    for name in base.linear_names():
        out_f, in_f = base.shape(name)
        if in_f % spec.lambda_in or out_f % spec.lambda_out:
            problems.append(f"{name[:-7]} [{out_f}, {in_f}] is not divisible by lambda_in={spec.lambda_in}, "
                            f"lambda_out={spec.lambda_out}")
        elif isinstance(spec.base_quant, MinMaxGrid):
            try:
                check_grid_fits((out_f, in_f), spec.base_quant, name)
            except UnsupportedError as exc:
                problems.append(str(exc))
    return problems


def check_shapes(base: BaseModel, spec: AdapterSpec) -> None:
    problems = shape_problems(base, spec)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UnsupportedError(f"{problems[0]}{more}; choose λ that divide every decoder Linear's in/out features")


def resolve_nf4_backend(requested: str, device: torch.device) -> str:
    if requested == "auto":
        return "bitsandbytes" if device.type == "cuda" else "core"
    return requested


def quantized_base(name: str, weight: torch.Tensor, bias, spec: AdapterSpec, nf4_backend: str) -> nn.Module:
    """The frozen base of one decoder Linear, from its stored weight."""
    quant = spec.base_quant
    if isinstance(quant, MinMaxGrid):
        return MinMaxBase(quantize_minmax(weight.float(), quant, name), bias)
    if isinstance(quant, NF4Base):
        if nf4_backend == "bitsandbytes":
            try:
                return BnbNF4Base(weight, quant.blocksize, quant.double_quant, bias)
            except ImportError:
                raise UnsupportedError("Q-BLoRA on CUDA uses bitsandbytes: pip install bitsandbytes "
                                       "(or train with --device cpu)") from None
        dense = nf4_roundtrip(weight, quant).float()
        return DenseBase(dense, bias)
    raise UnsupportedError(f"no training base for {quant!r}")


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def build_model(base: BaseModel, spec: AdapterSpec, device: torch.device, seed: int, nf4_backend: str = "auto",
                progress: Callable = iter) -> tuple[nn.Module, dict[str, BLoRALinear]]:
    """The training model on ``device`` and its adapted layers by module name (natural order)."""
    check_shapes(base, spec)
    backend = resolve_nf4_backend(nf4_backend, device)
    dtype = torch.float32 if device.type == "cpu" else base_dtype(base)
    model = load_hf_model(base.path, dtype)
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    layers: dict[str, BLoRALinear] = {}
    for weight_name in progress(base.linear_names(), desc="quantize", total=len(base.linear_names()), unit="layer"):
        name = weight_name[: -len(".weight")]
        linear = model.get_submodule(name)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        qbase = quantized_base(weight_name, base.tensor(weight_name), bias, spec, backend)
        out_f, in_f = base.shape(weight_name)
        layer = BLoRALinear(name, qbase, spec.method, spec.lambda_in, spec.lambda_out, spec.scaling, out_f, in_f,
                            inner_rank=spec.inner_rank, fold_aware=spec.fold_aware, generator=gen)
        _set_submodule(model, name, layer)
        layers[name] = layer
    log.info("%s: %d decoder Linears quantized (%s) and adapted; %s trainable parameters", base.path, len(layers),
             spec.base_quant.describe(), f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,}")
    return model.to(device), layers


def base_dtype(base: BaseModel) -> torch.dtype:
    """The stored dtype of the base's first decoder Linear (the GPU model is loaded in it)."""
    names = base.linear_names()
    return base.tensor_dtype(names[0]) if names else torch.float32
