"""A runtime's arithmetic, emulated in torch: what it does to activations before a matmul.

Used for *floors*: the same model run in float32 and with the runtime's rounding of
activations (and of its KV cache) differs by what the runtime's arithmetic can explain; an
artifact may differ from the training-time model by a stated factor of that, no more.

ggml's CPU matmul converts the activation row to the weight type's ``vec_dot_type`` first:

* Q4_0, Q5_0, Q8_0 -> Q8_0; Q4_1, Q5_1 -> Q8_1: blocks of 32, ``d = amax / 127``,
  ``q = round(x / d)``, value ``q · fp16(d)`` (Q8_1 also stores the block sum; same values);
* F16 -> fp16, BF16 -> bf16, F32 -> none.

The KV cache is F16 (llama.cpp's default): keys, values and the queries that meet them are
rounded to fp16. mlx-lm's gemma3_text multiplies the embeddings by √hidden rounded to bfloat16
(:func:`mlx_embedding_floor`). onnxruntime's MatMulNBits at ``accuracy_level`` 4 quantizes activations to
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
    q_rows: int = 0  # a fused qkv_proj (Phi-3): its first q_rows outputs are q, the rest k|v (cached in kv_dtype)

    def hooks(self, part: torch.nn.Module, prefix: str) -> list:
        handles = []
        for local, sub in part.named_modules():
            name = f"{prefix}.{local}" if local else prefix
            rule = self.rules.get(name, NONE)
            if rule.kind != "none":
                handles.append(sub.register_forward_pre_hook(lambda _m, args, rule=rule: (rule(args[0]),) + args[1:]))
            if self.kv_dtype is not None and name.rsplit(".", 1)[-1] in KV_PROJECTIONS:
                handles.append(sub.register_forward_hook(lambda _m, _a, out: round_dtype(out, self.kv_dtype)))
            if self.kv_dtype is not None and name.endswith("self_attn.qkv_proj"):
                handles.append(sub.register_forward_hook(self._round_fused_kv))
            if self.act_dtype is not None and name.endswith("mlp.act_fn"):
                handles.append(sub.register_forward_pre_hook(lambda _m, args: (round_dtype(args[0], self.act_dtype),)))
                handles.append(sub.register_forward_hook(lambda _m, _a, out: round_dtype(out, self.act_dtype)))
        return handles

    def _round_fused_kv(self, _module, _args, out: torch.Tensor) -> torch.Tensor:
        return torch.cat([out[..., : self.q_rows], round_dtype(out[..., self.q_rows:], self.kv_dtype)], dim=-1)


#: mlx-lm models that multiply the token embeddings by √hidden_size rounded to bfloat16
#: (models/gemma3_text.py: ``mx.array(hidden_size**0.5, mx.bfloat16)``); transformers uses it in the
#: weights' dtype (float32 here): the two differ by up to 2^-9 relative on the embeddings.
MLX_BF16_EMBEDDING_SCALE = ("gemma3_text",)


def mlx_embedding_hooks(config: dict):
    """Hooks that give a stream mlx-lm's bfloat16 √hidden embedding scale (``None``: the family's mlx-lm
    model scales as transformers does)."""
    from .families import family

    if family(config.get("model_type")).mlx_model not in MLX_BF16_EMBEDDING_SCALE:
        return None
    exact = float(config["hidden_size"]) ** 0.5
    ratio = float(torch.tensor(exact, dtype=torch.bfloat16).float()) / exact

    def hooks(module: torch.nn.Module, prefix: str) -> list:
        if prefix != "model.embed_tokens":
            return []
        return [module.register_forward_hook(lambda _m, _a, out: out * ratio)]
    return hooks


def mlx_embedding_floor(job, static, bound=None) -> tuple:
    """``(static, floor streams, bound)`` of an export mlx-lm runs exactly but for its bfloat16 embedding
    scale: the floor is the base as trained, without the adapter, computed with that scale (unchanged where
    the family's mlx-lm model has none)."""
    from .numerics import logit_stats
    from .reference import trained_base_fn
    from .stream import Stream
    from .tolerance import floor_tolerance

    hooks = mlx_embedding_hooks(job.base.config)
    if hooks is None:
        return static, (), bound
    floor = Stream("mlx embedding floor", trained_base_fn(job.plan), hooks)

    def floor_bound(out: dict):
        return floor_tolerance(logit_stats(out["without"], out[floor.name]),
                               "mlx-lm's √hidden embedding scale rounded to bfloat16", static)
    return static, (floor,), floor_bound
