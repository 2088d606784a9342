"""K-quant GGUF types (``--type q4_k_m`` ...) through llama.cpp's own quantizer.

The exactly merged model is first written as an f32 GGUF to a temporary file beside the output
(trained base + ΔW from float64, correctly rounded; tokenizer, hyperparameters and provenance as
for every model file); ``llama_cpp.llama_model_quantize`` (llama-cpp-python) then writes the
K-quant mix llama.cpp's ``llama-quantize`` would, to a second temporary name that is renamed onto
the output at the end. This is post-training quantization: the weights change, and the error it
adds is measured by reading the quantized file back (gguf-py's reader and ``gguf.quants``
dequantization) against the f32 source, tensor by tensor (:class:`blora_export.ptq.PtqError`).
No K-quant block is written by this tool.
"""
from __future__ import annotations

import ctypes
import logging
import os
import sys
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, LlamaFileType
from gguf import quants as gguf_quants

from blora_export.errors import BloraError, UnsupportedError
from blora_export.io import atomic_file
from blora_export.ptq import PtqError

log = logging.getLogger(__name__)
LLAMA_CPP_PIP = "pip install llama-cpp-python"
ENCODING = "llama-quantize"
FLOAT_QTYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
EMBEDDINGS = ("token_embd.weight", "output.weight")


@dataclass(frozen=True)
class KQuant:
    """One llama.cpp file type: its ``LLAMA_FTYPE_MOSTLY_*`` and the fewest bits of its mix."""

    name: str
    ftype: str  # llama_cpp constant
    file_type: LlamaFileType
    min_bits: int


KQUANT_TYPES: dict[str, KQuant] = {k.name: k for k in (
    KQuant("q2_k", "LLAMA_FTYPE_MOSTLY_Q2_K", LlamaFileType.MOSTLY_Q2_K, 2),
    KQuant("q3_k_s", "LLAMA_FTYPE_MOSTLY_Q3_K_S", LlamaFileType.MOSTLY_Q3_K_S, 3),
    KQuant("q3_k_m", "LLAMA_FTYPE_MOSTLY_Q3_K_M", LlamaFileType.MOSTLY_Q3_K_M, 3),
    KQuant("q3_k_l", "LLAMA_FTYPE_MOSTLY_Q3_K_L", LlamaFileType.MOSTLY_Q3_K_L, 3),
    KQuant("q4_k_s", "LLAMA_FTYPE_MOSTLY_Q4_K_S", LlamaFileType.MOSTLY_Q4_K_S, 4),
    KQuant("q4_k_m", "LLAMA_FTYPE_MOSTLY_Q4_K_M", LlamaFileType.MOSTLY_Q4_K_M, 4),
    KQuant("q5_k_s", "LLAMA_FTYPE_MOSTLY_Q5_K_S", LlamaFileType.MOSTLY_Q5_K_S, 5),
    KQuant("q5_k_m", "LLAMA_FTYPE_MOSTLY_Q5_K_M", LlamaFileType.MOSTLY_Q5_K_M, 5),
    KQuant("q6_k", "LLAMA_FTYPE_MOSTLY_Q6_K", LlamaFileType.MOSTLY_Q6_K, 6),
)}


def weight_bound(kquant: KQuant) -> float:
    """A loose per-tensor bound on ``max|w_q - w| / max|w|``: half a step of the coarsest grid of
    the mix on a block spanning the tensor's whole range, doubled for the quantized block scales.
    It catches a wrong tensor (e.g. rows in the wrong order), not the quantizer's quality."""
    return 2.0 / (2 ** kquant.min_bits - 1)


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise UnsupportedError(f"K-quant types are made by llama.cpp's own quantizer: {LLAMA_CPP_PIP} "
                               f"(or use --type q4_1 / q5_1 / q8_0 / f16)") from None
    return llama_cpp


def quantize_file(source: Path, target: Path, kquant: KQuant) -> None:
    """``llama_model_quantize(source, target)`` with llama.cpp's default parameters and ``kquant``'s ftype."""
    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, kquant.ftype)
    params.nthread = max(1, min(4, os.cpu_count() or 1))
    with captured_output() as output:
        rc = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    fallbacks = [line.split("-", 1)[0].replace("warning:", "").strip() for line in output
                 if "falling back" in line]
    if fallbacks:
        log.warning("llama.cpp stored %d tensor(s) in a fallback type (rows not a multiple of 256): %s",
                    len(fallbacks), ", ".join(fallbacks[:6]) + (" ..." if len(fallbacks) > 6 else ""))
    if rc != 0 or not target.is_file():
        last = output[-1].strip() if output else "no output"
        raise BloraError(f"llama.cpp's quantizer failed on {source.name} (return code {rc}: {last}); "
                         f"try --type {'f16' if kquant.min_bits < 4 else 'q8_0'}")


@contextmanager
def captured_output() -> Iterator[list[str]]:
    """Capture what native code writes to file descriptors 1 and 2 (llama.cpp logs there); the lines
    are in the yielded list once the block ends."""
    lines: list[str] = []
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            sink.seek(0)
            lines.extend(sink.read().decode("utf-8", "replace").splitlines())


def dequantized(tensor) -> torch.Tensor:
    """A tensor of a GGUF file as float64, in PyTorch's ``[out, in]`` shape."""
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    data = gguf_quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
    return torch.from_numpy(np.asarray(data, dtype=np.float64).reshape(shape))


def measure(source: Path, quantized: Path) -> tuple[PtqError, PtqError, dict[str, int]]:
    """Weight error of every quantized tensor of ``quantized`` against the f32 ``source``
    (decoder weights and embeddings/head apart) and how many tensors got each ggml type."""
    src = {t.name: t for t in GGUFReader(str(source)).tensors}
    ptq, embed_ptq, types = PtqError(), PtqError(), {}
    for t in GGUFReader(str(quantized)).tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        if t.tensor_type in FLOAT_QTYPES or t.name not in src or len(t.shape) < 2:
            continue
        (embed_ptq if t.name in EMBEDDINGS else ptq).add(dequantized(t), dequantized(src[t.name]), t.name)
    return ptq, embed_ptq, dict(sorted(types.items()))


def export_kquant(out: Path, kquant: KQuant, write_f32: Callable[[Path], dict]) -> dict:
    """Write ``out`` as ``kquant`` from the f32 file ``write_f32(path)`` writes (its details are returned,
    updated with the quantizer's); both temporary files live beside ``out`` and never survive."""
    _llama_cpp()
    source = out.parent / f".{out.name}.f32-{uuid.uuid4().hex[:8]}"
    try:
        with atomic_file(out) as tmp:
            details = write_f32(source)
            quantize_file(source, tmp, kquant)
            ptq, embed_ptq, types = measure(source, tmp)
    finally:
        source.unlink(missing_ok=True)
    details.update({
        "type": kquant.name, "encoding": ENCODING, "tensor_types": types,
        "linear_weights": f"llama.cpp's llama_model_quantize ({kquant.ftype}) from the exactly merged f32 model: "
                          "post-training quantization, error measured below",
        "ptq_error": ptq.to_json(), "ptq_weight_bound": weight_bound(kquant)})
    if embed_ptq.tensors:
        details["embedding_ptq_error"] = embed_ptq.to_json()
    log.info("%s: post-training quantization by llama.cpp, weight rel rms %.3g (max %.3g at %s)", kquant.name,
             ptq.to_json()["weight_rel_rms"], ptq.max_rel, ptq.worst)
    return details
