"""Weights for the ONNX decoder: float (merged), exact int4/int8 (the checkpoint's own codes), re-quantized.

Each provider hands :func:`converters.onnx_graph.build_decoder` one fused linear group at a
time (read from the base one tensor at a time), and the store writes each initializer as soon
as it is made. The low-bit encoding (docs/FORMATS.md) of ``w = α·q + β`` is ``α·(q − z) + c``
with ``c = β + z·α``, ``z = 2^(bits−1)`` (8 for int4, 128 for int8): ``MatMulNBits`` without
zero points (whose default is ``z``) plus a block-sum correction.

* exact: QA-BLoRA on a min-max grid of the same width (4 or 8 bits), runtime blocks of ``t``
  with ``t | block_in`` and ``t | λi``: codes and α are the checkpoint grid's,
  ``c = β + s·H/λi + z·α`` is computed in float64 and stored in float32 (half an ulp). No
  float16 rounding of β' is needed: ``c`` is a float32 tensor.
* requantized: merge exactly (float64), quantize min-max RTN on ``MinMaxGrid(bits, 1, t)``.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper

from blora_export.delta import delta_weight
from blora_export.fold import ONNX_BITS
from blora_export.job import ExportJob, LayerCheck
from blora_export.merge import exact_merged_weight, merged_weight
from blora_export.numerics import HALF_ULP_LIMIT, half_ulp_ratio
from blora_export.ptq import PtqError
from blora_export.quant import expand_blocks, quantize_minmax, to_row_blocks, trained_beta
from blora_export.spec import MinMaxGrid
from blora_export.tensor_io import one_thread

from .onnx_graph import FUSED_GROUPS, LINEAR_GROUPS, ONNX_DTYPES, FloatLinear, LinearGroup, QuantLinear

INLINE_BYTES = 1024  # small constants stay in model.onnx
ALIGN = 4096  # external data offsets (page-aligned for memory mapping)
NUMPY_DTYPES = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.UINT8: np.uint8,
                TensorProto.INT64: np.int64}


def member_names(layer: int, group: LinearGroup, suffix: str = "weight") -> list[str]:
    return [f"model.layers.{layer}.{m}.{suffix}" for m in group.members]


#: ``--precision`` names of the MatMulNBits files and their code widths.
LOWBIT_PRECISIONS = {f"int{b}": b for b in ONNX_BITS}


def zero_point(bits: int) -> int:
    """MatMulNBits' default zero point without a zero_points input: ``2^(bits−1)`` (8 for int4, 128 for int8)."""
    return 1 << (bits - 1)


def group_initializer(layer: int, group: LinearGroup, quantized: bool) -> str:
    prefix = f"model.layers.{layer}.{group.onnx_name}"
    return f"{prefix}.MatMulNBits.qweight" if quantized else f"{prefix}.MatMul.weight"


def module_rows(job: ExportJob, layer: int, group: LinearGroup) -> dict[str, tuple[int, int]]:
    """HF weight name -> ``(start, stop)`` of its outputs in the fused group."""
    rows, start = {}, 0
    for name in member_names(layer, group):
        out_f = job.base.shape(name)[0]
        rows[name] = (start, start + out_f)
        start += out_f
    return rows


def pack_codes(codes: torch.Tensor, block: int, bits: int) -> np.ndarray:
    """``[N, K]`` codes → uint8 ``[N, K/block, block·bits/8]``: int4 two per byte, low nibble first;
    int8 one per byte."""
    c = codes.to(torch.uint8)
    if bits == 4:
        c = c[:, 0::2] | (c[:, 1::2] << 4)
    elif bits != 8:
        raise ValueError(f"MatMulNBits packing is written for 4 and 8 bits, not {bits}")
    return c.reshape(codes.shape[0], codes.shape[1] // block, block * bits // 8).numpy()


def unpack_codes(packed: np.ndarray, bits: int) -> torch.Tensor:
    """The inverse of :func:`pack_codes`: ``[N, K]`` uint8 codes."""
    p = torch.from_numpy(np.array(packed, dtype=np.uint8)).reshape(packed.shape[0], -1)
    if bits == 8:
        return p
    return torch.stack([p & 15, p >> 4], dim=-1).reshape(p.shape[0], -1)


def group_bias(job: ExportJob, layer: int, group: LinearGroup) -> np.ndarray | None:
    """Concatenated biases (qwen2's q/k/v), zeros for members without one; None if no member has one."""
    names = member_names(layer, group, "bias")
    if not any(n in job.base.shards for n in names):
        return None
    parts = [job.base.tensor(n).float() if n in job.base.shards else torch.zeros(job.base.shape(w)[0])
             for n, w in zip(names, member_names(layer, group))]
    return torch.cat(parts).numpy()


@dataclass
class FloatWeights:
    """Merged float weights: each adapted one the correctly rounded ``trained_base + ΔW``."""

    job: ExportJob
    dtype: torch.dtype  # float32 or float16 storage (math is float32)

    def merged(self, name: str) -> torch.Tensor:
        return merged_weight(name, self.job.base.tensor(name), self.job.ckpt, self.job.plan, self.dtype)

    def linear(self, layer: int, group: LinearGroup) -> FloatLinear:
        weight = torch.cat([self.merged(n) for n in member_names(layer, group)])
        return FloatLinear(weight_t=weight.T.contiguous().numpy(), bias=group_bias(self.job, layer, group))

    def tensor(self, name: str) -> np.ndarray:
        dtype = torch.float32 if name.endswith("norm.weight") else self.dtype
        return float_array(self.job.base.tensor(name), dtype)

    def transposed(self, name: str) -> "RowBlocks":
        return RowBlocks(self.job.base.tensor(name), self.dtype)


@dataclass
class QuantWeights:
    """``bits``-bit weights (4 or 8) on runtime blocks of ``block``: exact (the grid's own codes) or
    re-quantized."""

    job: ExportJob
    block: int
    accuracy_level: int
    requantize: bool
    bits: int = 4
    ptq: PtqError = field(default_factory=PtqError)  # what re-quantization adds, per weight

    def codes_scales_offsets(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(q [N, K], α [N, K/t] float32, c [N, K/t] float64)`` for one HF weight."""
        if self.requantize:
            return self._requantized(name)
        return exact_codes(self.job, name, self.block, self.bits)

    def _requantized(self, name: str):
        weight = self.job.base.tensor(name)
        exact = exact_merged_weight(name, weight, self.job.ckpt, self.job.plan)
        qw = quantize_minmax(exact.to(torch.float32), requant_grid(self.block, self.bits), name)
        deq = qw.dequantize(torch.float64)
        self.ptq.add(deq, exact, name)
        alpha, beta = qw.alpha.double(), qw.beta.double()
        return qw.codes, alpha.float(), beta + zero_point(self.bits) * alpha

    def linear(self, layer: int, group: LinearGroup) -> QuantLinear:
        with one_thread():
            parts = [self.codes_scales_offsets(n) for n in member_names(layer, group)]
        codes = torch.cat([p[0] for p in parts])
        scales = torch.cat([p[1] for p in parts]).float()
        offsets = torch.cat([p[2] for p in parts]).to(torch.float32)
        return QuantLinear(packed=pack_codes(codes, self.block, self.bits), scales=scales.numpy(),
                           offsets_t=offsets.T.contiguous().numpy(), block_size=self.block,
                           accuracy_level=self.accuracy_level, bias=group_bias(self.job, layer, group),
                           bits=self.bits)

    def tensor(self, name: str) -> np.ndarray:
        return float_array(self.job.base.tensor(name), torch.float32)

    def transposed(self, name: str) -> "RowBlocks":
        return RowBlocks(self.job.base.tensor(name), torch.float32)


def float_array(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """``t`` stored as ``dtype`` (a 16-bit value goes through float32: exact, then one rounding)."""
    if t.dtype != dtype:
        t = t.to(torch.float32).to(dtype)
    return t.contiguous().numpy()


NUMPY_BY_TORCH = {torch.float32: np.dtype(np.float32), torch.float16: np.dtype(np.float16)}
#: Rows of a transposed tensor made per block: a 7B head block is 256 x 32000 float32 (33 MB).
ROW_BLOCK = 256


@dataclass(frozen=True)
class RowBlocks:
    """``source.T`` stored as ``torch_dtype``, made ``ROW_BLOCK`` rows at a time (never the whole
    transposed float32 copy: a 7B head is 0.5 GB in float32)."""

    source: torch.Tensor
    torch_dtype: torch.dtype  # float32 or float16

    @property
    def shape(self) -> tuple[int, int]:
        return self.source.shape[1], self.source.shape[0]

    @property
    def dtype(self) -> np.dtype:
        return NUMPY_BY_TORCH[self.torch_dtype]

    def __iter__(self) -> Iterator[np.ndarray]:
        for r0 in range(0, self.shape[0], ROW_BLOCK):
            yield float_array(self.source[:, r0:r0 + ROW_BLOCK].T, self.torch_dtype)


def requant_grid(block: int, bits: int = 4) -> MinMaxGrid:
    return MinMaxGrid(bits=bits, block_out=1, block_in=block)


def exact_codes(job: ExportJob, name: str, block: int, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The checkpoint grid's codes and α on runtime blocks, and ``c = β + s·H/λi + z·α`` (float64).

    ``bits`` is the grid's own width (the planner has checked it); ``z`` the runtime's default zero point.
    """
    grid = job.plan.base_quant
    qw = quantize_minmax(job.base.tensor(name).to(torch.float32), grid, name)
    module = job.ckpt.module_for_weight(name)
    if module is not None:  # β' as trained: exact, or param_dtype-rounded for a fold-aware checkpoint
        qw = replace(qw, beta=trained_beta(qw, module, job.ckpt.folded_forward))
    alpha, beta = to_row_blocks(qw, block)
    offsets = beta.double() + zero_point(bits) * alpha.double()
    return qw.codes, alpha.float(), offsets


class TensorStore:
    """Initializers, each written to one external data file as soon as it is made.

    ``finish`` moves everything back inline when the total is small (one self-contained
    ``model.onnx``) and keeps ``location`` beside it otherwise.
    """

    def __init__(self, folder: Path, location: str):
        self.folder, self.location = Path(folder), location
        self.protos: list[TensorProto] = []
        self._names: set[str] = set()
        self._file = open(self.folder / location, "wb")
        self.nbytes = 0

    def add(self, name: str, array: np.ndarray) -> str:
        self._claim(name)
        array = np.ascontiguousarray(array)
        if array.nbytes < INLINE_BYTES:
            self.protos.append(numpy_helper.from_array(array, name))
            return name
        return self._external(name, array.shape, array.dtype, [array])

    def add_blocks(self, name: str, blocks: "RowBlocks") -> str:
        """An initializer written block by block (``blocks`` yields its rows in order)."""
        self._claim(name)
        return self._external(name, blocks.shape, blocks.dtype, blocks)

    def _claim(self, name: str) -> None:
        if name in self._names:
            raise ValueError(f"duplicate initializer {name}")
        self._names.add(name)

    def _external(self, name: str, shape, dtype: np.dtype, parts) -> str:
        offset = self._file.tell()
        pad = (-offset) % ALIGN
        self._file.write(b"\0" * pad)
        length = 0
        for part in parts:
            part = np.ascontiguousarray(part, dtype=dtype)
            self._file.write(memoryview(part.astype(part.dtype.newbyteorder("<"), copy=False)).cast("B"))  # no copy
            length += part.nbytes
        if length != math.prod(shape) * np.dtype(dtype).itemsize:
            raise ValueError(f"{name}: wrote {length} bytes for shape {tuple(shape)} {np.dtype(dtype)}")
        tensor = TensorProto(name=name, dims=list(shape), data_type=ONNX_DTYPES[np.dtype(dtype)])
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", offset + pad), ("length", length)):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
        self.nbytes += length
        self.protos.append(tensor)
        return name

    def finish(self, inline_limit: int) -> bool:
        """Close the data file; inline every tensor when the total is below ``inline_limit``."""
        self._file.close()
        data = self.folder / self.location
        if self.nbytes >= inline_limit:
            return True
        with open(data, "rb") as fh:
            for tensor in self.protos:
                if tensor.data_location == TensorProto.EXTERNAL:
                    info = {e.key: e.value for e in tensor.external_data}
                    fh.seek(int(info["offset"]))
                    tensor.raw_data = fh.read(int(info["length"]))
                    del tensor.external_data[:]
                    tensor.data_location = TensorProto.DEFAULT
        os.unlink(data)
        return False


class TensorReader:
    """Initializers of a written ``model.onnx`` by name, reading external data lazily."""

    def __init__(self, model_path: Path):
        self.folder = Path(model_path).parent
        model = onnx.load(str(model_path), load_external_data=False)
        self.tensors = {t.name: t for t in model.graph.initializer}

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def array(self, name: str) -> np.ndarray:
        tensor = self.tensors[name]
        if tensor.data_location != TensorProto.EXTERNAL:
            return numpy_helper.to_array(tensor).copy()
        info = {e.key: e.value for e in tensor.external_data}
        with open(self.folder / info["location"], "rb") as fh:
            fh.seek(int(info.get("offset", 0)))
            raw = fh.read(int(info["length"]))
        return np.frombuffer(raw, dtype=NUMPY_DTYPES[tensor.data_type]).reshape(tuple(tensor.dims)).copy()


def locate(weight_name: str) -> tuple[int, LinearGroup]:
    """``model.layers.{i}.<member>.weight`` -> ``(i, its fused group)``."""
    _, _, layer, rest = weight_name.split(".", 3)
    member = rest[: -len(".weight")]
    return int(layer), next(g for g in LINEAR_GROUPS + FUSED_GROUPS if member in g.members)


def reference_codes(job: ExportJob, name: str, block: int, requantize: bool, bits: int):
    """``(codes, α per runtime block, w_ref float64)``: the grid's own codes with ``w_ref = αq + β + ΔW``,
    or RTN of the exact merge with ``w_ref = αq + β`` (computed independently of the export)."""
    weight = job.base.tensor(name)
    module = job.ckpt.module_for_weight(name)
    if requantize:
        qw = quantize_minmax(exact_merged_weight(name, weight, job.ckpt, job.plan).to(torch.float32),
                             requant_grid(block, bits), name)
    else:
        qw = quantize_minmax(weight.to(torch.float32), job.plan.base_quant, name)
    beta = qw.beta.double()
    if module is not None and not requantize and job.ckpt.folded_forward:
        beta = trained_beta(qw, module, True)  # a fold-aware checkpoint trained with param_dtype(β')
    w_ref = expand_blocks(qw.alpha.double(), qw.grid) * qw.codes.double() + expand_blocks(beta, qw.grid)
    if module is not None and not requantize and not job.ckpt.folded_forward:
        w_ref = w_ref + delta_weight(module, torch.float64)
    return qw.codes, to_row_blocks(qw, block)[0].float(), w_ref


def stored_codes(reader: "TensorReader", layer: int, group: LinearGroup, rows: tuple[int, int], bits: int):
    """``(codes [N, K], α [N, K/t], c [N, K/t])`` of one member, read back from the file."""
    prefix = f"model.layers.{layer}.{group.onnx_name}"
    start, stop = rows
    codes = unpack_codes(reader.array(f"{prefix}.MatMulNBits.qweight")[start:stop], bits)
    scales = torch.from_numpy(reader.array(f"{prefix}.MatMulNBits.scales")[start:stop].copy())
    offsets = torch.from_numpy(reader.array(f"{prefix}.block_offsets")[:, start:stop].T.copy())
    return codes, scales, offsets


def dequantized_codes(job: ExportJob, model_path: Path, block: int, bits: int):
    """Every decoder Linear of an int4/int8 file as float64 ``α·(q − z) + c``, one at a time."""
    reader = TensorReader(model_path)
    for name in job.base.linear_names():
        layer, group = locate(name)
        codes, scales, offsets = stored_codes(reader, layer, group, module_rows(job, layer, group)[name], bits)
        alpha = torch.repeat_interleave(scales.double(), block, dim=1)
        yield name, (alpha * (codes.double() - zero_point(bits))
                     + torch.repeat_interleave(offsets.double(), block, dim=1))


def quant_module_checks(job: ExportJob, reader: "TensorReader", name: str, info: dict, bits: int) -> list[LayerCheck]:
    layer, group = locate(name)
    block, requantize, z = info["block_size"], info["mode"] == "requantized", zero_point(bits)
    codes, scales, offsets = stored_codes(reader, layer, group, module_rows(job, layer, group)[name], bits)
    ref_codes, ref_scales, w_ref = reference_codes(job, name, block, requantize, bits)
    source = "RTN of the exact merge" if requantize else "the checkpoint grid"
    if codes.shape != ref_codes.shape or scales.shape != ref_scales.shape:
        return [LayerCheck(name, f"int{bits} codes, scales shaped as {source}'s", float("inf"), 0.0)]
    mismatches = int((codes != ref_codes).sum()) + int((scales != ref_scales).sum())
    alpha = torch.repeat_interleave(scales.double(), block, dim=1)
    implied = w_ref - alpha * (codes.double() - z)  # exactly β + ΔW + zα where codes/α are right
    stored = torch.repeat_interleave(offsets, block, dim=1)
    offset = f"β+{z}α" if requantize else f"β+ΔW+{z}α"
    return [LayerCheck(name, f"int{bits} codes, scales = {source}'s (mismatches)", float(mismatches), 0.0),
            LayerCheck(name, f"|c - ({offset})| / ulp(float32)", half_ulp_ratio(stored, implied), HALF_ULP_LIMIT)]


def float_module_check(job: ExportJob, reader: "TensorReader", name: str) -> LayerCheck:
    layer, group = locate(name)
    start, stop = module_rows(job, layer, group)[name]
    stored = torch.from_numpy(reader.array(group_initializer(layer, group, False))[:, start:stop].T.copy())
    exact = exact_merged_weight(name, job.base.tensor(name), job.ckpt, job.plan)
    return LayerCheck(name, f"|w - exact| / ulp({str(stored.dtype)[6:]})", half_ulp_ratio(stored, exact),
                      HALF_ULP_LIMIT)


def weight_checks(job: ExportJob, model_path: Path, meta: dict) -> list[LayerCheck]:
    """Each adapted weight in the file against the exact ``trained_base + ΔW`` (or its RTN)."""
    reader = TensorReader(model_path)
    bits = LOWBIT_PRECISIONS.get(meta.get("precision"))
    info = meta.get(meta.get("precision")) if bits else None
    checks = []
    for module in job.progress(list(job.ckpt.modules.values()), desc="check weights", unit="layer"):
        layer, group = locate(module.weight_name)
        if group_initializer(layer, group, info is not None) not in reader:
            checks.append(LayerCheck(module.weight_name, "present in artifact", float("inf"), 0.0))
        elif info:
            checks.extend(quant_module_checks(job, reader, module.weight_name, info, bits))
        else:
            checks.append(float_module_check(job, reader, module.weight_name))
    return checks
