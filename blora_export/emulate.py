"""A runtime's arithmetic, emulated in torch: what it does to activations before a matmul.

Used for *floors*: the same model run in float32 and with the runtime's rounding of
activations (and of its KV cache) differs by what the runtime's arithmetic can explain; an
artifact may differ from the training-time model by a stated factor of that, no more.

ggml's CPU matmul converts the activation row to the weight type's ``vec_dot_type`` first:

* Q4_0, Q5_0, Q8_0 -> Q8_0; Q4_1, Q5_1 -> Q8_1: blocks of 32, ``d = amax / 127``,
  ``q = round(x / d)``, value ``q · fp16(d)`` (Q8_1 also stores the block sum; same values);
* F16 -> fp16, BF16 -> bf16, F32 -> none.

The KV cache is F16 (llama.cpp's default): keys, values and the queries that meet them are
rounded to fp16. onnxruntime's MatMulNBits at ``accuracy_level`` 4 quantizes activations to
int8 per block of the weight's block size the same way (symmetric, ``amax / 127``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

KV_PROJECTIONS = ("q_proj", "k_proj", "v_proj")


def quantize_blocks_int8(x: torch.Tensor, block: int, scale_dtype: Optional[torch.dtype] = torch.float16) -> torch.Tensor:
    """``x`` with each run of ``block`` values along the last axis rounded to ``q · d``,
    ``d = amax / 127`` (stored as ``scale_dtype``), ``q = round(x / d)`` in -127..127."""
    if x.shape[-1] % block:
        return x
    blocks = x.float().unflatten(-1, (x.shape[-1] // block, block))
    d = blocks.abs().amax(dim=-1, keepdim=True) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(blocks * inv)
    stored = d if scale_dtype is None else d.to(scale_dtype).float()
    return (q * stored).flatten(-2).to(x.dtype)


def round_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype).to(x.dtype)


@dataclass(frozen=True)
class Rule:
    """What happens to a Linear's input before the runtime multiplies: ``int8`` blocks or a dtype."""

    kind: str  # "int8", "dtype" or "none"
    block: int = 32
    dtype: Optional[torch.dtype] = None
    scale_dtype: Optional[torch.dtype] = torch.float16

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "int8":
            return quantize_blocks_int8(x, self.block, self.scale_dtype)
        if self.kind == "dtype":
            return round_dtype(x, self.dtype)
        return x


NONE = Rule("none")


@dataclass
class Arithmetic:
    """A runtime's activation rules per Linear (Hugging Face module name) and its KV cache dtype."""

    rules: dict = field(default_factory=dict)  # module name -> Rule
    kv_dtype: Optional[torch.dtype] = None
    act_dtype: Optional[torch.dtype] = None  # the MLP nonlinearity's input and output (ggml's fp16 GELU table)

    def hooks(self, part: torch.nn.Module, prefix: str) -> list:
        handles = []
        for local, sub in part.named_modules():
            name = f"{prefix}.{local}" if local else prefix
            rule = self.rules.get(name, NONE)
            if rule.kind != "none":
                handles.append(sub.register_forward_pre_hook(lambda _m, args, rule=rule: (rule(args[0]),) + args[1:]))
            if self.kv_dtype is not None and name.rsplit(".", 1)[-1] in KV_PROJECTIONS:
                handles.append(sub.register_forward_hook(lambda _m, _a, out: round_dtype(out, self.kv_dtype)))
            if self.act_dtype is not None and name.endswith("mlp.act_fn"):
                handles.append(sub.register_forward_pre_hook(lambda _m, args: (round_dtype(args[0], self.act_dtype),)))
                handles.append(sub.register_forward_hook(lambda _m, _a, out: round_dtype(out, self.act_dtype)))
        return handles
