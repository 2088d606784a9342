"""GGUF for llama.cpp: complete models (folded low-bit codes or merged weights) and LoRA adapters.

``blora-export to-gguf CKPT OUT.gguf [--type T] [--adapter-only | --base-only] [--requantize]``

* A complete model (the families of :mod:`blora_export.families`): hyperparameters,
  tokenizer, ``general.*`` and provenance under ``blora.*``. Norms are F32; token embeddings and
  the output head F16 (F32 with ``--type f32``; ``--quantize-embeddings`` quantizes them, with
  the error reported); a tied head writes no ``output`` tensor.
* QA-BLoRA on a min-max grid to Q4_1/Q5_1: the checkpoint's own codes and fp16 α untouched, the
  folded ``β'`` as the block minimum (:mod:`converters.gguf_model`, :mod:`converters.gguf_quants`).
* ``--adapter-only``: a llama.cpp LoRA adapter (``general.type=adapter``) from the exact factors
  of :func:`blora_export.delta.lora_factors`; it applies on top of the base the adapter was
  trained against, which ``--base-only`` writes (for a min-max grid: its own codes).
* ``--base-only``: that base, without the adapter (also the runtime noise floor's reference).
* ``--type q4_k_m`` and the other K-quant mixes: llama.cpp's own quantizer on the exactly merged
  f32 file (:mod:`converters.gguf_kquant`; post-training quantization, its error reported).

Written in one pass, one base tensor in memory at a time (tensor infos first, then each tensor's
data as it is made), to a temporary file renamed at the end. Deterministic bytes.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import torch
from gguf import GGML_QUANT_VERSION, GGUFWriter

from blora_export.delta import AdapterModule, lora_factors
from blora_export.errors import BadInputError, UnsupportedError
from blora_export.hf_folder import provenance
from blora_export.io import atomic_file
from blora_export.job import Artifact, ExportJob, ExportResult
from blora_export.ptq import PtqError
from blora_export.tensor_io import one_thread

from .gguf_kquant import ENCODING, KQUANT_TYPES, export_kquant
from .gguf_model import (
    ArchSpec,
    EncodeContext,
    HParams,
    TensorSpec,
    arch_spec,
    choose_encoding,
    default_type,
    encode_tensor,
    permutation,
    permute_heads,
    tensor_plan,
    write_hparams,
)
from .gguf_quants import GGUF_TYPES, GGUFType, encode_float
from .gguf_tokenizer import quiet_logger, write_tokenizer

NAME = "gguf"
DESCRIPTION = "GGUF for llama.cpp: full model (folded Q4_1/Q5_1 codes or merged weights) or LoRA adapter"
MAGIC = b"GGUF"
ADAPTER_TYPES = ("f32", "f16")
log = logging.getLogger(__name__)


def _gguf_type(name: str | None, job: ExportJob) -> GGUFType:
    if name is None:
        return default_type(job)
    if name not in GGUF_TYPES:
        raise UnsupportedError(f"--type must be one of {', '.join([*GGUF_TYPES, *KQUANT_TYPES])}, got {name!r}")
    return GGUF_TYPES[name]


def write_provenance(writer: GGUFWriter, info: dict) -> None:
    """Each provenance item as ``blora.<key>``; objects and null as JSON strings."""
    for key, value in info.items():
        k = f"blora.{key}"
        if isinstance(value, bool):
            writer.add_bool(k, value)
        elif isinstance(value, int):
            writer.add_int64(k, value)
        elif isinstance(value, float):
            writer.add_float64(k, value)
        elif isinstance(value, str) and value:
            writer.add_string(k, value)
        elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            writer.add_array(k, value)
        else:
            writer.add_string(k, json.dumps(value, sort_keys=True))


def _write_general(writer: GGUFWriter, job: ExportJob, kind: str, content: str, gtype: GGUFType) -> None:
    writer.add_type(kind)
    label = {"model": "merged with", "base": "base of", "adapter": "adapter of"}[content]
    writer.add_name(f"{job.base.path.name} ({label} {job.ckpt.path.name})")
    writer.add_description(f"{job.ckpt.method} {content}, written by blora-export")
    writer.add_file_type(gtype.file_type)
    if gtype.quantized:
        writer.add_quantization_version(GGML_QUANT_VERSION)
        writer.add_quantized_by("blora-export")


def _write_gguf(out: Path, arch: ArchSpec, write_kv: Callable[[GGUFWriter], None], specs: list[TensorSpec],
                encode: Callable[[TensorSpec], np.ndarray], progress: Callable) -> None:
    """Tensor infos first, then each tensor's data as it is made; atomically."""
    with atomic_file(out) as tmp, quiet_logger("gguf.gguf_writer", logging.WARNING):
        writer = GGUFWriter(tmp, arch.name)
        try:
            write_kv(writer)
            for spec in specs:
                shape, dtype, nbytes, raw = spec.writer_info()
                writer.add_tensor_info(spec.name, shape, dtype, nbytes, raw_dtype=raw)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for spec in progress(specs, desc="gguf", total=len(specs), unit="tensor"):
                with one_thread():  # many small tensor ops per tensor: see tensor_io.one_thread
                    data = np.ascontiguousarray(encode(spec))
                writer.write_tensor_data(data)
                del data
        finally:
            writer.close()


def export(job: ExportJob, out: Path, gguf_type: str | None = None, adapter_only: bool = False,
           requantize: bool = False, quantize_embeddings: bool = False, base_only: bool = False,
           force_requantize: bool = False) -> ExportResult:
    """Write ``out``; ``force_requantize`` (library only) merges and re-quantizes even where the fold is
    exact: the post-training-quantization baseline the fold is measured against."""
    start = time.perf_counter()
    if adapter_only and base_only:
        raise UnsupportedError("--adapter-only and --base-only write two different files: run to-gguf twice")
    arch = arch_spec(job.base.model_type)
    hp = HParams.from_config(job.base.config)
    if gguf_type in KQUANT_TYPES and not adapter_only:
        if quantize_embeddings:
            raise UnsupportedError(f"--type {gguf_type} is llama.cpp's mix: it chooses the embedding types itself; "
                                   "drop --quantize-embeddings")
        kquant = KQUANT_TYPES[gguf_type]
        label = {"type": kquant.name, "encoding": ENCODING,
                 "encoding_detail": f"post-training quantization by llama.cpp's llama_model_quantize ({kquant.ftype}) "
                                    "of the exactly merged f32 model"}
        encoding = ("float", "trained base + ΔW from float64, correctly rounded to f32 (llama.cpp's quantizer input)")
        details = export_kquant(Path(out), kquant, lambda src: _export_model(
            job, src, arch, hp, GGUF_TYPES["f32"], encoding, False, base_only, label))
    elif adapter_only:
        if requantize or quantize_embeddings or force_requantize:
            raise UnsupportedError("--requantize and --quantize-embeddings apply to full models, not --adapter-only")
        details = _export_adapter(job, Path(out), arch, hp, gguf_type)
    else:
        gtype = _gguf_type(gguf_type, job)
        encoding = ("requantize", f"merge-then-quantize with gguf.quants to {gtype.name} (forced: PTQ baseline)") \
            if force_requantize and gtype.quantized else choose_encoding(job, gtype, requantize, base_only)
        details = _export_model(job, Path(out), arch, hp, gtype, encoding, quantize_embeddings, base_only)
    details["bytes"] = Path(out).stat().st_size
    return ExportResult(format=NAME, path=Path(out), seconds=time.perf_counter() - start, details=details)


def _export_model(job: ExportJob, out: Path, arch: ArchSpec, hp: HParams, gtype: GGUFType, encoding: tuple[str, str],
                  quantize_embeddings: bool, base_only: bool, label: dict | None = None) -> dict:
    """A complete model file; ``label`` overrides the provenance's type/encoding (the f32 input of a K-quant)."""
    encoding, how = encoding
    specs = tensor_plan(job, arch, hp, gtype, quantize_embeddings)
    rows = next(s.shape[0] for s in specs if s.name == "token_embd.weight")
    ctx = EncodeContext(job, encoding, base_only, PtqError(), PtqError())
    content = "base" if base_only else "model"
    summary: dict = {}

    window = window_note(hp)
    extra = {"attention_window": window} if window else {}

    def write_kv(writer: GGUFWriter) -> None:
        _write_general(writer, job, "model", content, gtype)
        write_hparams(writer, hp, job.base.config, rows)
        summary.update(write_tokenizer(writer, job.base.path, rows))
        write_provenance(writer, provenance(job, {"format": NAME, "content": content, "type": gtype.name,
                                                  "encoding": encoding, "encoding_detail": how, **extra,
                                                  **(label or {})}))

    _write_gguf(out, arch, write_kv, specs, lambda s: encode_tensor(s, ctx), job.progress)
    details = {"architecture": arch.name, "content": content, "type": gtype.name, "encoding": encoding,
               "linear_weights": how, "tensors": len(specs), "tied_output": hp.tied,
               "embeddings": next(s.gtype.name for s in specs if s.name == "token_embd.weight"),
               "norms": "f32", "tokenizer": summary, "merge": job.plan.describe(), **extra}
    if ctx.ptq.tensors:
        details["ptq_error"] = ctx.ptq.to_json()
    if ctx.embed_ptq.tensors:
        details["embedding_ptq_error"] = ctx.embed_ptq.to_json()
    if base_only:
        details["note"] = "the base the adapter was trained against, without the adapter (for --adapter-only)"
    return details


def window_note(hp: HParams) -> str:
    """Mistral's attention window: llama.cpp's llama graph has none, so the file's context is capped
    at the window, where both attend to every earlier token (the exact equivalent); said once."""
    if hp.window is None:
        return ""
    note = (f"context_length capped at the attention window ({hp.window} < max_position_embeddings "
            f"{hp.context}): llama.cpp's llama graph has no sliding window, and within the window both attend "
            "to every earlier token; longer prompts would compute a different model")
    log.warning("%s", note)
    return note


def adapter_rank(module: AdapterModule) -> int:
    """Rank of :func:`lora_factors`: ``R`` (Q-BLoRA) or ``min(out/λo, in/λi)`` (QA-BLoRA)."""
    return module.inner_rank


def adapter_specs(job: ExportJob, arch: ArchSpec, hp: HParams, gtype: GGUFType) -> list[tuple[TensorSpec, AdapterModule]]:
    """``<base>.lora_a`` ``[r, in]`` and ``.lora_b`` ``[out, r]`` per module, padded to one rank ``r``."""
    tmap = gguf.get_tensor_name_map(arch.gguf_arch, hp.n_layers)
    rank = max(adapter_rank(m) for m in job.ckpt.modules.values())
    specs = []
    for module in job.ckpt.modules.values():
        base_name = tmap.get_name(module.weight_name, try_suffixes=(".weight",))
        if base_name is None:
            raise UnsupportedError(f"{module.name}: no llama.cpp tensor for it in arch {arch.name}")
        heads = permute_heads(base_name, arch, hp)
        specs.append((TensorSpec(base_name + ".lora_a", module.name, (rank, module.in_features), gtype, "lora_a",
                                 None), module))
        specs.append((TensorSpec(base_name + ".lora_b", module.name, (module.out_features, rank), gtype, "lora_b",
                                 heads), module))
    return specs


def encode_lora(spec: TensorSpec, module: AdapterModule, rank: int) -> np.ndarray:
    """One factor of ``ΔW = s·B'@A'`` (float64 -> the file's float type), zero-padded to ``rank``."""
    a, b = lora_factors(module, torch.float64)
    if spec.role == "lora_a":
        t = torch.cat([a, a.new_zeros(rank - a.shape[0], a.shape[1])])
    else:
        t = torch.cat([b, b.new_zeros(b.shape[0], rank - b.shape[1])], dim=1)
        if spec.heads is not None:
            t = t[permutation(t.shape[0], spec.heads)]
    return encode_float(t, spec.gtype)


def _export_adapter(job: ExportJob, out: Path, arch: ArchSpec, hp: HParams, type_name: str | None) -> dict:
    if type_name not in (None, *ADAPTER_TYPES):
        raise UnsupportedError(f"--adapter-only writes float factors: --type {' or '.join(ADAPTER_TYPES)}, "
                               f"not {type_name}")
    gtype = GGUF_TYPES[type_name or "f32"]
    pairs = adapter_specs(job, arch, hp, gtype)
    rank = pairs[0][0].shape[0]
    alpha = job.ckpt.scaling * rank
    by_name = {spec.name: module for spec, module in pairs}

    def write_kv(writer: GGUFWriter) -> None:
        _write_general(writer, job, "adapter", "adapter", gtype)
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", alpha)
        write_provenance(writer, provenance(job, {"format": NAME, "content": "adapter", "type": gtype.name,
                                                  "adapter_rank": rank}))

    _write_gguf(out, arch, write_kv, [s for s, _ in pairs], lambda s: encode_lora(s, by_name[s.name], rank),
                job.progress)
    ranks = sorted({adapter_rank(m) for m in job.ckpt.modules.values()})
    return {"architecture": arch.name, "content": "adapter", "type": gtype.name, "rank": rank,
            "alpha": float(np.float32(alpha)), "scaling": job.ckpt.scaling, "modules": len(job.ckpt.modules),
            "factorization": ("Q-BLoRA as a rank-R LoRA" if job.ckpt.method == "q-blora"
                              else "QA-BLoRA as the smaller of Rep@H·Pool's exact factorizations"),
            "padded_ranks": ranks if len(ranks) > 1 else [],
            "apply_on": "the base the adapter was trained against: `blora-export to-gguf CKPT base.gguf --base-only` "
                        f"({job.plan.describe()})"}


def detect(path: Path) -> bool:
    """A file that starts with the GGUF magic; a ``.gguf`` file that does not is bad input."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head != MAGIC and path.suffix.lower() == ".gguf":
        what = "it is empty" if not head else f"it starts with {head!r}, not the GGUF magic {MAGIC!r}"
        raise BadInputError(f"{path} is not a GGUF file: {what} (a truncated or failed download or export?)")
    return head == MAGIC


def open_artifact(path: Path, job: ExportJob, runtime: str | None = None) -> Artifact:
    from .gguf_runtime import open_gguf

    return open_gguf(Path(path), job, runtime)
