"""The adapted Linear layers: a frozen quantized base plus a trainable BLoRA adapter.

Bases (all frozen; every decoder Linear gets one, adapted or not, as ``merge`` assumes):

* :class:`DenseBase`: a fixed dequantized weight, e.g. ``dequant(NF4(W))`` from the core's
  bit-exact mirror of bitsandbytes (Q-BLoRA on CPU).
* :class:`BnbNF4Base`: bitsandbytes' packed NF4 weight and ``matmul_4bit`` (Q-BLoRA on CUDA,
  4 bits per weight in memory). Quantized on CPU, the code path the core mirrors, so the
  dequantized values equal :class:`DenseBase`'s; then moved to the device.
* :class:`MinMaxBase`: min-max codes, α, β on the target's grid (QA-BLoRA), dequantized with
  the core's :meth:`QuantizedWeight.dequantize` in each forward.

:class:`BLoRALinear` adds the adapter branch with the core's :func:`adapter_forward`, so its
function is the one ``reference.py`` rebuilds for ``verify``. With ``fold_aware`` (QA-BLoRA),
it instead computes ``α·q + fp16(β + s·H/λi)``: the very weights ``fold_into_zero_points``
exports, with a straight-through gradient through the fp16 rounding of the shifted β.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..delta import AdapterModule, adapter_forward
from ..quant import QuantizedWeight, fold_into_zero_points


class DenseBase(nn.Module):
    """``y = x @ W.T + b`` with a frozen weight buffer."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    def dense_weight(self) -> torch.Tensor:
        return self.weight.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class BnbNF4Base(nn.Module):
    """bitsandbytes NF4: packed 4-bit codes and a ``QuantState`` (nested absmax), ``matmul_4bit``."""

    def __init__(self, weight: torch.Tensor, blocksize: int, double_quant: bool, bias: torch.Tensor | None = None):
        super().__init__()
        import bitsandbytes.functional as bnbf

        packed, state = bnbf.quantize_4bit(weight.detach().to("cpu"), blocksize=blocksize,
                                           compress_statistics=double_quant, quant_type="nf4")
        self.register_buffer("packed", packed)
        self.register_buffer("bias", bias)
        self.quant_state = state

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.quant_state.to(self.packed.device)  # QuantState.to moves in place
        return self

    def dense_weight(self) -> torch.Tensor:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(self.packed, self.quant_state).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import bitsandbytes as bnb

        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        y = bnb.matmul_4bit(x.to(dtype), self.packed.t(), quant_state=self.quant_state)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class MinMaxBase(nn.Module):
    """A min-max quantized weight (codes, α, β on a grid), dequantized by the core in each forward."""

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.grid = qw.grid
        self.register_buffer("codes", qw.codes)
        self.register_buffer("alpha", qw.alpha)
        self.register_buffer("beta", qw.beta)
        self.register_buffer("bias", bias)

    def quantized(self, beta: torch.Tensor | None = None) -> QuantizedWeight:
        return QuantizedWeight(self.codes, self.alpha, self.beta if beta is None else beta, self.grid)

    def dense_weight(self) -> torch.Tensor:
        return self.quantized().dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight(), self.bias)


class _StraightThrough(torch.autograd.Function):
    """Returns ``value`` (computed without autograd); the gradient flows to ``source`` unchanged."""

    @staticmethod
    def forward(ctx, source: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return value.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _BlockOffsetLinear(torch.autograd.Function):
    """``y = x @ (α·q + β_blocks).T`` with the gradient for the per-block β only.

    ``dL/dβ[block] = Σ_{o in block} Σ_tokens g[t, o] · Σ_{i in block} x[t, i]``: a matmul with
    the block-summed input (``in/block_in`` columns), never the dense ``[out, in]`` weight gradient.
    Under autocast the output (so its gradient) is bf16 and ``grad_x`` is computed in it; the β
    gradient is always accumulated in float32 (backward runs outside autocast).
    """

    @staticmethod
    def forward(ctx, x, beta, codes, alpha, grid):
        weight = QuantizedWeight(codes, alpha, beta, grid).dequantize()
        ctx.save_for_backward(x, beta, codes, alpha)
        ctx.grid = grid
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad):
        x, beta, codes, alpha = ctx.saved_tensors
        grid = ctx.grid
        grad_x = grad_beta = None
        if ctx.needs_input_grad[0]:
            weight = QuantizedWeight(codes, alpha, beta, grid).dequantize()
            grad_x = (grad @ weight.to(grad.dtype)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            out_f, in_f = codes.shape
            xs = x.reshape(-1, in_f).float().unflatten(-1, (in_f // grid.block_in, grid.block_in)).sum(-1)
            full = grad.reshape(-1, out_f).float().T @ xs
            grad_beta = full.view(out_f // grid.block_out, grid.block_out, -1).sum(1)
        return grad_x, grad_beta, None, None, None


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's ``lora_A`` init: ``kaiming_uniform_(a=sqrt(5))``, i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    t = torch.empty(shape)
    nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)
    return t


class BLoRALinear(nn.Module):
    """A frozen quantized base and a Q-BLoRA (``lora_A``, ``lora_B``) or QA-BLoRA (``lora_H``) adapter.

    Q-BLoRA: ``A`` ``[R, in/λi]`` Kaiming-uniform, ``B`` ``[out/λo, R]`` zeros (as PEFT's LoRA).
    QA-BLoRA: ``H`` ``[out/λo, in/λi]`` zeros. Scaling ``s = alpha / rank`` for both.
    """

    def __init__(self, name: str, base: nn.Module, method: str, lambda_in: int, lambda_out: int, scaling: float,
                 out_features: int, in_features: int, inner_rank: int = 0, fold_aware: bool = False,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.name, self.base, self.method = name, base, method
        self.lambda_in, self.lambda_out, self.scaling = lambda_in, lambda_out, scaling
        self.out_features, self.in_features = out_features, in_features
        self.fold_aware = fold_aware and method == "qa-blora"
        if method == "q-blora":
            gen = generator or torch.Generator().manual_seed(0)
            self.lora_A = nn.Parameter(kaiming_uniform((inner_rank, in_features // lambda_in), gen))
            self.lora_B = nn.Parameter(torch.zeros(out_features // lambda_out, inner_rank))
        else:
            self.lora_H = nn.Parameter(torch.zeros(out_features // lambda_out, in_features // lambda_in))
        if self.fold_aware and not isinstance(base, MinMaxBase):
            raise TypeError("fold-aware training needs a MinMaxBase")

    def adapter_module(self, detach: bool = True) -> AdapterModule:
        """The core's :class:`AdapterModule` (detached float32 copies, or the live parameters)."""
        def grab(p):
            return p.detach().float().clone() if detach else p
        tensors = ({"a": grab(self.lora_A), "b": grab(self.lora_B)} if self.method == "q-blora"
                   else {"h": grab(self.lora_H)})
        return AdapterModule(self.name, self.method, self.lambda_in, self.lambda_out, self.scaling,
                             self.out_features, self.in_features, **tensors)

    def folded_beta(self) -> torch.Tensor:
        """``fp16(β + s·H/λi)`` per block (float32 values) with a straight-through gradient to ``H``."""
        base, grid = self.base, self.base.grid
        with torch.no_grad(), torch.autocast(self.lora_H.device.type, enabled=False):  # the exporter's own fold
            value = fold_into_zero_points(base.quantized(), self.adapter_module(detach=False)).beta.float()
        rows = torch.arange(0, self.out_features, grid.block_out, device=value.device) // self.lambda_out
        cols = torch.arange(0, self.in_features, grid.block_in, device=value.device) // self.lambda_in
        shift = (self.lora_H * (self.scaling / self.lambda_in))[rows][:, cols]
        return _StraightThrough.apply(base.beta.float() + shift, value)

    def effective_weight(self) -> torch.Tensor:
        """The dense weight this layer computes with (float32), for checks."""
        if self.fold_aware:
            return self.base.quantized(self.folded_beta().detach()).dequantize()
        base = self.base.dense_weight()
        eye = torch.eye(self.in_features, dtype=torch.float64, device=base.device)
        return (base.double() + adapter_forward(eye, self.adapter_module()).T).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fold_aware:
            y = _BlockOffsetLinear.apply(x, self.folded_beta(), self.base.codes, self.base.alpha, self.base.grid)
            return y if self.base.bias is None else y + self.base.bias.to(y.dtype)
        return self.base(x) + adapter_forward(x, self.adapter_module(detach=False))
