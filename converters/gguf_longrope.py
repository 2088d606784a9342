"""LongRoPE (Phi-3.5-mini, Phi-4-mini: ``rope_type`` ``longrope``) as llama.cpp's phi3 graph reads it.

transformers (``_compute_longrope_parameters``) divides each rotated frequency by a factor: the
``short_factor`` list while the sequence is at most ``original_max_position_embeddings`` long, the
``long_factor`` list beyond, and scales cos/sin by the attention factor (given, or
``√(1 + ln(factor)/ln(original))`` with ``factor = max_position_embeddings / original``, 1 when that is <= 1).

llama.cpp's converter (``Phi3MiniModel``) writes both lists as ``rope_factors_short.weight`` /
``rope_factors_long.weight`` (F32, rotated dims / 2), the attention factor as
``rope.scaling.attn_factor`` and ``rope.scaling.original_context_length`` (the converter always recomputes the
factor from the lengths; a config's own ``attention_factor`` is written here, as transformers uses it; the
rotated dims are transformers' ``int(head_dim·factor)``, the converter's ``int(factor·hidden)//heads`` where
head_dim = hidden/heads); at run time llama.cpp takes the
long factors when its context per sequence exceeds the original length (llama_model::get_rope_factors),
transformers when the sequence does: the two agree on every sequence when llama.cpp's context is at most
the original length, and on sequences longer than it otherwise.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

import gguf
import numpy as np

from blora_export.base import rope_parameters
from blora_export.errors import BadInputError
from blora_export.families import rotary_dim

SHORT = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight"
LONG = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LongRope:
    short: tuple[float, ...]
    long: tuple[float, ...]
    attention_factor: float
    original_context: int

    def factors(self, name: str) -> np.ndarray:
        return np.asarray(self.short if name == SHORT else self.long, dtype=np.float32)


def longrope(config: dict) -> Optional[LongRope]:
    """The config's LongRoPE (``None``: another rope type), read as transformers reads it."""
    params = rope_parameters(config)
    if params["rope_type"] not in ("longrope", "su"):
        return None
    original = params.get("original_max_position_embeddings", config.get("original_max_position_embeddings"))
    half = rotary_dim(config) // 2
    short, long = params.get("short_factor"), params.get("long_factor")
    if original is None or not all(isinstance(f, list) and len(f) == half for f in (short, long)):
        raise BadInputError(f"config.json's LongRoPE needs original_max_position_embeddings and short_factor / "
                            f"long_factor lists of {half} values (rotated dims / 2)")
    factor = params.get("factor") or int(config["max_position_embeddings"]) / int(original)
    attention = params.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(int(original)))
    return LongRope(tuple(map(float, short)), tuple(map(float, long)), float(attention), int(original))


def write_longrope_keys(writer: gguf.GGUFWriter, rope: LongRope, context: int) -> None:
    writer.add_rope_scaling_attn_factors(rope.attention_factor)
    writer.add_rope_scaling_orig_ctx_len(rope.original_context)
    if context > rope.original_context and rope.short != rope.long:
        log.warning("LongRoPE: llama.cpp uses the long factors at every position when its context exceeds %d tokens "
                 "(transformers only on longer sequences); open it with n_ctx <= %d to compute transformers' "
                 "model on shorter ones", rope.original_context, rope.original_context)
