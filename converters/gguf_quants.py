"""GGUF tensor types: the type table, our own block packers, merge-then-quantize and errors.

Two ways a weight reaches a GGUF block:

* **our own codes** (the QA-BLoRA fold): the checkpoint's codes ``q`` and fp16 ``α`` go in
  untouched as ``qs`` and ``d``, the folded ``β'`` as ``m``. The packers below only say how a
  block is laid out (a table like gguf-py's ``quants.py``, one small class per type);
* **merge-then-quantize**: ``gguf.quants.quantize`` (pure numpy, byte-identical to ggml's
  reference quantizer) on the merged float32 weight. This is post-training quantization and
  adds error, which :func:`weight_error` measures.

Layouts (little-endian, docs/FORMATS.md): Q4_1 ``d, m, qs[16]`` with ``qs[j] = q[j] | q[j+16] << 4``;
Q5_1 ``d, m, qh[4], qs[16]`` with bit ``i`` of the uint32 ``qh`` = bit 4 of ``q[i]``.
Dequantized: ``d·q + m``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType
from gguf import quants as gguf_quants

from blora_export.numerics import round_to

QK = 32  # elements per block of every legacy quant type


@dataclass(frozen=True)
class GGUFType:
    """One ``--type``: its ggml tensor type, the file type it gives and how it stores a weight."""

    name: str
    qtype: GGMLQuantizationType
    file_type: LlamaFileType
    bits: Optional[int] = None  # code width of a block type
    has_min: bool = False  # ``d·q + m``: a block offset that can take the QA-BLoRA fold
    float_dtype: Optional[torch.dtype] = None  # the float types

    @property
    def quantized(self) -> bool:
        return self.float_dtype is None


GGUF_TYPES: dict[str, GGUFType] = {
    "f32": GGUFType("f32", GGMLQuantizationType.F32, LlamaFileType.ALL_F32, float_dtype=torch.float32),
    "f16": GGUFType("f16", GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16, float_dtype=torch.float16),
    "bf16": GGUFType("bf16", GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16, float_dtype=torch.bfloat16),
    "q8_0": GGUFType("q8_0", GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0, bits=8),
    "q4_0": GGUFType("q4_0", GGMLQuantizationType.Q4_0, LlamaFileType.MOSTLY_Q4_0, bits=4),
    "q5_0": GGUFType("q5_0", GGMLQuantizationType.Q5_0, LlamaFileType.MOSTLY_Q5_0, bits=5),
    "q4_1": GGUFType("q4_1", GGMLQuantizationType.Q4_1, LlamaFileType.MOSTLY_Q4_1, bits=4, has_min=True),
    "q5_1": GGUFType("q5_1", GGMLQuantizationType.Q5_1, LlamaFileType.MOSTLY_Q5_1, bits=5, has_min=True),
}
TYPE_BY_QTYPE = {t.qtype: t for t in GGUF_TYPES.values()}
MIN_TYPE_FOR_BITS = {t.bits: t for t in GGUF_TYPES.values() if t.has_min}


class _MinBlock:
    """A ``d·q + m`` block of 32 codes: fp16 ``d`` at bytes 0-1, fp16 ``m`` at 2-3, codes after."""

    qtype: GGMLQuantizationType
    bits: int
    D = slice(0, 2)
    M = slice(2, 4)
    CODES = slice(4, None)

    @classmethod
    def type_size(cls) -> int:
        return GGML_QUANT_SIZES[cls.qtype][1]

    @classmethod
    def pack_codes(cls, q: np.ndarray) -> np.ndarray:
        """``[n, 32]`` uint8 codes -> ``[n, type_size - 4]`` bytes."""
        raise NotImplementedError

    @classmethod
    def pack(cls, q: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
        """Blocks ``[n, type_size]`` uint8 from codes ``[n, 32]``, fp16 ``d`` ``[n]`` and ``m`` ``[n]``."""
        d16 = np.ascontiguousarray(d, dtype=np.float16).reshape(-1, 1).view(np.uint8)
        m16 = np.ascontiguousarray(m, dtype=np.float16).reshape(-1, 1).view(np.uint8)
        return np.concatenate([d16, m16, cls.pack_codes(q.astype(np.uint8))], axis=1)


class Q4_1Block(_MinBlock):
    qtype = GGMLQuantizationType.Q4_1
    bits = 4

    @classmethod
    def pack_codes(cls, q: np.ndarray) -> np.ndarray:
        return q[:, :16] | (q[:, 16:] << np.uint8(4))


class Q5_1Block(_MinBlock):
    qtype = GGMLQuantizationType.Q5_1
    bits = 5

    @classmethod
    def pack_codes(cls, q: np.ndarray) -> np.ndarray:
        qh = np.packbits((q >> np.uint8(4)) & np.uint8(1), axis=1, bitorder="little")  # [n, 4]: uint32 LE
        qs = (q[:, :16] & np.uint8(0x0F)) | ((q[:, 16:] & np.uint8(0x0F)) << np.uint8(4))
        return np.concatenate([qh, qs], axis=1)


BLOCKS: dict[GGMLQuantizationType, type[_MinBlock]] = {b.qtype: b for b in (Q4_1Block, Q5_1Block)}


def pack_rows(codes: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, qtype: GGMLQuantizationType) -> np.ndarray:
    """Rows of blocks: codes ``[rows, in]``, fp16 ``α``/``β`` ``[rows, in/32]`` -> uint8 ``[rows, bytes]``."""
    block = BLOCKS[qtype]
    rows, cols = codes.shape
    q = codes.numpy().astype(np.uint8).reshape(-1, QK)
    d = alpha.to(torch.float16).numpy().reshape(-1)
    m = beta.to(torch.float16).numpy().reshape(-1)
    return block.pack(q, d, m).reshape(rows, (cols // QK) * block.type_size())


def encode_float(weight: torch.Tensor, gtype: GGUFType) -> np.ndarray:
    """A float weight correctly rounded to the float type (bf16 as raw bytes).

    float64 goes through ``round_to`` (torch double-rounds float64 -> 16 bits via float32); from
    float32 or a 16-bit dtype torch's own conversion is a single, correct rounding.
    """
    if weight.dtype == torch.float64:
        rounded = round_to(weight, gtype.float_dtype)
    else:
        rounded = weight.to(gtype.float_dtype)
    if gtype.float_dtype == torch.bfloat16:
        return rounded.view(torch.int16).numpy().view(np.uint8).reshape(*rounded.shape[:-1], -1)
    return np.ascontiguousarray(rounded.numpy())


def quantize(weight: torch.Tensor, gtype: GGUFType) -> np.ndarray:
    """Merge-then-quantize: ``gguf.quants.quantize`` of the float32 weight (float types: rounded)."""
    if not gtype.quantized:
        return encode_float(weight, gtype)
    return gguf_quants.quantize(np.ascontiguousarray(weight.to(torch.float32).numpy()), gtype.qtype)


def dequantize(data: np.ndarray, qtype: GGMLQuantizationType) -> torch.Tensor:
    """``gguf.quants.dequantize`` (ggml's own arithmetic) as a float32 tensor."""
    if qtype == GGMLQuantizationType.F32:
        return torch.from_numpy(np.array(data, dtype=np.float32))
    return torch.from_numpy(np.array(gguf_quants.dequantize(np.asarray(data), qtype), dtype=np.float32))
