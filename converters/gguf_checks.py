"""Per-layer checks of a written GGUF against the checkpoint (read with gguf-py's reader).

* fold (Q4_1/Q5_1): the codes and ``d`` bytes are byte-identical to the checkpoint's own min-max
  quantization; each stored ``m`` is the correctly rounded fp16 of the exact ``β'`` (float64);
  and gguf-py's dequantization equals ``QuantizedWeight.dequantize()`` of the fold bit for bit.
* float types: each weight is the correctly rounded ``trained_base + ΔW`` (half an ulp).
* merge-then-quantize: the bytes are ``gguf.quants.quantize`` of the exact merged weight.
* adapter: ``alpha/r · B @ A`` equals ``ΔW`` to the rounding of the stored factors.

Q/K rows are compared in llama.cpp's order (the expectation is permuted like the file).
"""
from __future__ import annotations

import mmap
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import gguf
import numpy as np
import torch
from gguf import GGUFReader

from blora_export.delta import AdapterModule, delta_weight
from blora_export.errors import BadInputError
from blora_export.job import ExportJob, LayerCheck
from blora_export.merge import exact_merged_weight
from blora_export.numerics import HALF_ULP_LIMIT, half_ulp_ratio
from blora_export.quant import block_shift, fold_into_zero_points, quantize_minmax, to_row_blocks

from .gguf_kquant import ENCODING as KQUANT_ENCODING
from .gguf_kquant import KQUANT_TYPES, dequantized, weight_bound
from .gguf_model import ArchSpec, HParams, arch_spec, permutation, permute_heads
from .gguf_quants import BLOCKS, QK, TYPE_BY_QTYPE, dequantize, pack_rows, quantize

# alpha/r · B@A vs ΔW, relative to max|ΔW|: float32 factors round each entry by 2^-24 relative
# (products of R terms: a few ulps); float16 factors by 2^-11.
ADAPTER_BOUNDS = {gguf.GGMLQuantizationType.F32: 1e-6, gguf.GGMLQuantizationType.F16: 4 * 2.0**-11}


def _layout(job: ExportJob) -> tuple[ArchSpec, HParams, gguf.TensorNameMap]:
    arch = arch_spec(job.base.model_type)
    hp = HParams.from_config(job.base.config)
    return arch, hp, gguf.get_tensor_name_map(arch.gguf_arch, hp.n_layers)


def _rows(x: torch.Tensor, heads) -> torch.Tensor:
    return x if heads is None else x[permutation(x.shape[0], heads)]


def unpermute_rows(x: torch.Tensor, heads) -> torch.Tensor:
    return x if heads is None else x[torch.argsort(permutation(x.shape[0], heads))]


@dataclass(frozen=True)
class GGUFFile:
    """A GGUF file parsed once by gguf-py (its reader builds every metadata field, a 32k-token
    vocabulary included: seconds per parse), shared by everything ``verify`` reads from it."""

    path: Path
    reader: GGUFReader
    tensors: dict

    @classmethod
    def open(cls, path: Path) -> "GGUFFile":
        try:
            reader = GGUFReader(str(path))
        except Exception as exc:  # gguf raises ValueError / struct errors on damaged files
            raise BadInputError(f"{path} is not a readable GGUF file ({exc})") from None
        return cls(Path(path), reader, {t.name: t for t in reader.tensors})

    def __str__(self) -> str:  # messages name the file
        return str(self.path)


def _tensors(source: "Path | GGUFFile") -> tuple[GGUFReader, dict]:
    """The reader and tensors by name of a parsed file, or of a path parsed now."""
    file = source if isinstance(source, GGUFFile) else GGUFFile.open(source)
    return file.reader, file.tensors


def read_raw(reader: GGUFReader, tensor) -> np.ndarray:
    """A copy of ``tensor``'s bytes (as gguf-py types them), its pages then dropped from the process.

    gguf-py maps the whole file: every page a check touches would otherwise stay resident until
    the reader is collected, the whole file by the end of a pass (3.8 GB for a 7B q4_1)."""
    raw = np.array(tensor.data)
    mapping = getattr(reader.data, "_mmap", None)
    if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)  # read-only file pages: re-read from the page cache if needed
    return raw


def _fold_checks(name: str, raw: np.ndarray, qtype, weight: torch.Tensor, module: AdapterModule, job: ExportJob,
                 heads) -> list[LayerCheck]:
    grid = job.ckpt.base_quant
    block = BLOCKS[qtype]
    qw = quantize_minmax(weight.to(torch.float32), grid, name)
    folded = fold_into_zero_points(qw, module)
    alpha, beta = to_row_blocks(folded, QK)
    _, exact_beta = to_row_blocks(replace(qw, beta=qw.beta.to(torch.float64) + block_shift(module, grid)), QK)
    stored = raw.reshape(-1, block.type_size())
    expected = pack_rows(_rows(qw.codes, heads), _rows(alpha, heads), _rows(beta, heads), qtype)
    expected = expected.reshape(-1, block.type_size())
    mismatch = int((stored[:, block.D] != expected[:, block.D]).sum() +
                   (stored[:, block.CODES] != expected[:, block.CODES]).sum())
    m = torch.from_numpy(np.ascontiguousarray(stored[:, block.M]).view(np.float16).reshape(-1))
    ratio = half_ulp_ratio(m, _rows(exact_beta, heads).reshape(-1))
    dq = dequantize(raw, qtype).reshape(qw.shape)
    diff = float((dq - _rows(folded.dequantize(), heads)).abs().max())
    return [LayerCheck(name, "codes+d bytes vs checkpoint quantization (mismatches)", float(mismatch), 0.0),
            LayerCheck(name, "m vs exact β' (fp16 half-ulp ratio)", ratio, HALF_ULP_LIMIT),
            LayerCheck(name, "gguf dequant vs QuantizedWeight.dequantize", diff, 0.0)]


def _model_checks(job: ExportJob, path: "Path | GGUFFile", encoding: str) -> list[LayerCheck]:
    arch, hp, tmap = _layout(job)
    reader, tensors = _tensors(path)
    checks = []
    for module in job.progress(list(job.ckpt.modules.values()), desc="check weights", unit="layer"):
        name = module.weight_name
        gname = tmap.get_name(name, try_suffixes=(".weight",))
        if gname not in tensors:
            checks.append(LayerCheck(name, "present in the GGUF", float("inf"), 0.0))
            continue
        t, heads, weight = tensors[gname], permute_heads(gname, arch, hp), job.base.tensor(name)
        raw = read_raw(reader, t)
        if encoding == "fold":
            checks.extend(_fold_checks(name, raw, t.tensor_type, weight, module, job, heads))
            continue
        exact = _rows(exact_merged_weight(name, weight, job.ckpt, job.plan), heads)
        if encoding == KQUANT_ENCODING:
            checks.append(_kquant_check(name, t, exact, reader))
            continue
        gtype = TYPE_BY_QTYPE[t.tensor_type]
        if gtype.quantized:
            mismatch = float((raw != quantize(exact, gtype).reshape(raw.shape)).sum())
            checks.append(LayerCheck(name, f"bytes vs gguf.quants.quantize({gtype.name}) of the exact merge",
                                     mismatch, 0.0))
        else:
            stored = dequantize(raw, t.tensor_type).reshape(exact.shape).to(gtype.float_dtype)
            checks.append(LayerCheck(name, f"|w - exact| / ulp({gtype.name})", half_ulp_ratio(stored, exact),
                                     HALF_ULP_LIMIT))
    return checks


def _kquant_check(name: str, tensor, exact: torch.Tensor, reader: GGUFReader) -> LayerCheck:
    """llama.cpp's K-quant of the exact merge, dequantized by gguf-py: max error relative to max|w|,
    under the coarse bound of the file's mix (a wrong tensor or row order fails it; PTQ quality does not)."""
    field = reader.get_field("blora.type")
    kquant = KQUANT_TYPES.get(field.contents() if field is not None else None)
    if kquant is None:
        return LayerCheck(name, "blora.type names a K-quant type", float("inf"), 0.0)
    stored = dequantized(tensor).reshape(exact.shape)
    rel = float((stored - exact).abs().max() / max(float(exact.abs().max()), 1e-30))
    return LayerCheck(name, f"{kquant.name} (llama.cpp) dequantized vs exact merge (max rel)", rel, weight_bound(kquant))


def lora_pairs(path: "Path | GGUFFile", job: ExportJob) -> Iterator[tuple[AdapterModule, torch.Tensor, torch.Tensor, float]]:
    """``(module, A [r, in], B [out, r] in Hugging Face row order, alpha / r)`` per adapted module, float64."""
    arch, hp, tmap = _layout(job)
    reader, tensors = _tensors(path)
    field = reader.get_field("adapter.lora.alpha")
    if field is None:
        raise BadInputError(f"{path} is not a LoRA adapter GGUF (no adapter.lora.alpha)")
    alpha = float(field.contents())
    missing = []
    for module in job.ckpt.modules.values():
        gname = tmap.get_name(module.weight_name, try_suffixes=(".weight",))
        ta, tb = tensors.get(f"{gname}.lora_a"), tensors.get(f"{gname}.lora_b")
        if ta is None or tb is None:
            missing.append(f"{gname}.lora_a/.lora_b")
            continue
        a = dequantize(np.asarray(ta.data), ta.tensor_type).reshape(-1, module.in_features).to(torch.float64)
        b = dequantize(np.asarray(tb.data), tb.tensor_type).reshape(module.out_features, -1).to(torch.float64)
        yield module, a, unpermute_rows(b, permute_heads(gname, arch, hp)), alpha / b.shape[1]
    if missing:
        raise BadInputError(f"{path} lacks {len(missing)} adapter tensors: {', '.join(missing[:4])}")


def _adapter_checks(job: ExportJob, path: "Path | GGUFFile") -> list[LayerCheck]:
    _, tensors = _tensors(path)
    qtype = next(t.tensor_type for t in tensors.values())
    checks = []
    for module, a, b, scale in lora_pairs(path, job):
        exact = delta_weight(module, torch.float64)
        rel = float((scale * (b @ a) - exact).abs().max()) / (float(exact.abs().max()) or 1.0)
        checks.append(LayerCheck(module.weight_name, "alpha/r·B@A vs ΔW (rel)", rel, ADAPTER_BOUNDS[qtype]))
    return checks


def layer_checks(path: "Path | GGUFFile", job: ExportJob, encoding: str) -> list[LayerCheck]:
    if encoding == "adapter":
        return _adapter_checks(job, path)
    return _model_checks(job, path, encoding)
