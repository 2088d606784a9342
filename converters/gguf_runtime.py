"""Running a GGUF for ``verify``: gguf-py (exact dequantization) or llama.cpp, with measured bounds.

Runtimes:

* ``gguf-py`` (default): a model file loads through transformers' GGUF loader
  (``from_pretrained(dir, gguf_file=...)``, every tensor dequantized by gguf-py, Q/K rows
  un-permuted); an adapter file is applied to the trained base in memory
  (``W += alpha/r · B @ A``, B rows un-permuted). Logits in float32.
* ``llama.cpp``: llama-cpp-python (``Llama(..., logits_all=True)``, ``eval(ids)``, ``scores``); an
  adapter runs on a temporary ``--base-only`` f32 GGUF with ``lora_path``.

Bounds (``max |Δlogit| / max |logit|``):

* exact dequantization of float weights: the storage dtype's bound (:mod:`blora_export.tolerance`);
* the Q4_1/Q5_1 fold: the file differs from ``trained_base + ΔW`` only by the fp16 rounding of each
  block's ``β'`` (and the f16 embeddings). That rounding is coherent over a block's 32 weights, so
  its cost is not the float16 bound's (measured 3e-3 .. 7.3e-3 relative on the test models, up to
  15 x 2^-11 on a tied model): it is computed from the checkpoint each time (transformers with the
  correctly rounded fold), and the file may cost at most ``FOLD_FACTOR`` (2) times that (gguf-py
  dequantizes with the same float32 arithmetic: measured ratio 1.00). The layer checks prove
  each ``β'`` is the correctly rounded one;
* everything else (llama.cpp's 8-bit activations and F16 KV cache, post-training quantization):
  ``FLOOR_FACTOR`` times the same runtime's error on the same kind of file *without the adapter*
  (a temporary ``--base-only`` export of the same type and encoding, against the trained base),
  measured on the built-in prompts each time an artifact is opened. On the test models the
  adapted model's error was 1.5-3.0x that floor (float and quantized alike: the adapted models
  are more sensitive), so 4x. Top-1: disagreement up to 4x the floor's, at least 10%, at most 50%.
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from gguf import GGUFReader

from blora_export.errors import BadInputError, UnsupportedError
from blora_export.job import Artifact, ExportJob
from blora_export.numerics import LogitStats, logit_stats
from blora_export.quant import fold_into_zero_points, quantize_minmax
from blora_export.reference import (
    DEFAULT_PROMPTS,
    apply_trained_base,
    load_hf_model,
    model_logits,
    reference_logits,
    tokenize_prompts,
)
from blora_export.tolerance import Tolerance, tolerance_for_dtype

from .gguf_checks import layer_checks, lora_pairs
from .gguf_kquant import ENCODING as KQUANT_ENCODING
from .gguf_quants import GGUF_TYPES, TYPE_BY_QTYPE

log = logging.getLogger(__name__)
RUNTIMES = ("gguf-py", "llama.cpp")
FLOOR_FACTOR = 4.0
MIN_TOP1_SLACK = 0.10
MIN_TOP1 = 0.5  # post-training quantization of a tiny random model can flip many near-ties
LLAMA_CPP_PIP = 'pip install "llama-cpp-python>=0.3.8"'
FOLD_FACTOR = 2.0
FOLD_TOP1_SLACK = 0.05
EMBEDDINGS = ("model.embed_tokens.weight", "lm_head.weight")


@dataclass(frozen=True)
class GGUFInfo:
    """What a file says about itself (``general.*``, ``blora.*``, ``adapter.*``)."""

    content: str  # "model", "base" or "adapter"
    type_name: str  # the --type it was written with
    encoding: str  # "float", "fold", "requantize" (models) or "adapter"
    embeddings_quantized: bool
    checkpoint_sha256: Optional[str]
    alpha: Optional[float]


def _field(reader: GGUFReader, key: str):
    field = reader.get_field(key)
    return None if field is None else field.contents()


def read_info(path: Path) -> GGUFInfo:
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # gguf raises ValueError / struct errors on damaged files
        raise BadInputError(f"{path} is not a readable GGUF file ({exc})") from None
    content = _field(reader, "blora.content")
    if content is None:
        content = "adapter" if _field(reader, "general.type") == "adapter" else "model"
    types = {t.name: t.tensor_type for t in reader.tensors}
    first = next((t for n, t in types.items() if n.startswith("blk.") and not n.endswith(("norm.weight", ".bias"))),
                 None)
    type_name = _field(reader, "blora.type") or (TYPE_BY_QTYPE[first].name if first in TYPE_BY_QTYPE else "f32")
    embed = types.get("token_embd.weight")
    return GGUFInfo(content=content, type_name=type_name,
                    encoding=_field(reader, "blora.encoding") or ("adapter" if content == "adapter" else "float"),
                    embeddings_quantized=embed is not None and TYPE_BY_QTYPE.get(embed) is not None
                    and TYPE_BY_QTYPE[embed].quantized,
                    checkpoint_sha256=_field(reader, "blora.checkpoint_sha256"),
                    alpha=_field(reader, "adapter.lora.alpha"))


def require_llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise UnsupportedError(f"--runtime llama.cpp needs llama-cpp-python: {LLAMA_CPP_PIP}") from None
    return llama_cpp


def llama_cpp_logits(model: Path, prompts: Sequence[Sequence[int]], lora: Optional[Path] = None) -> list[torch.Tensor]:
    """llama.cpp's float32 logits ``[len(prompt), vocab]`` per prompt (KV cache reset in between)."""
    llama_cpp = require_llama_cpp()
    n_ctx = max(64, max(len(p) for p in prompts) + 8)
    llm = llama_cpp.Llama(model_path=str(model), n_ctx=n_ctx, logits_all=True, verbose=False,
                          lora_path=None if lora is None else str(lora))
    try:
        out = []
        for ids in prompts:
            llm.reset()
            llm.eval(list(ids))
            out.append(torch.from_numpy(np.array(llm.scores[: llm.n_tokens], dtype=np.float32)))
        return out
    finally:
        llm.close()


def gguf_py_model_logits(path: Path, prompts: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """transformers' GGUF loader (gguf-py dequantization), float32."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    reader = GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    head_dim = _field(reader, f"{arch}.attention.key_length")  # transformers' loader does not read it
    extra = {} if head_dim is None else {"head_dim": int(head_dim)}
    model = AutoModelForCausalLM.from_pretrained(str(path.parent.resolve()), gguf_file=str(path.resolve()),
                                                 dtype=torch.float32, device_map="cpu", **extra).eval()
    _apply_rope_freqs(model, reader, path)
    try:
        return model_logits(model, prompts)
    finally:
        del model


def trained_base_model(job: ExportJob):
    model = load_hf_model(job.base.path, torch.float32)
    apply_trained_base(model, job.base, job.plan, job.progress)
    return model


def gguf_py_adapter_logits(path: Path, job: ExportJob, prompts: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """The adapter file applied to the trained base in memory: ``W += alpha/r · B @ A``."""
    model = trained_base_model(job)
    with torch.no_grad():
        for module, a, b, scale in lora_pairs(path, job):
            param = model.get_parameter(module.weight_name)
            param.copy_((param.to(torch.float64) + scale * (b @ a)).to(param.dtype))
    try:
        return model_logits(model, prompts)
    finally:
        del model


def _reference_base_logits(job: ExportJob, ids: list) -> list[torch.Tensor]:
    model = trained_base_model(job)
    try:
        return model_logits(model, ids)
    finally:
        del model


def _write_base(job: ExportJob, out: Path, info: GGUFInfo) -> None:
    """A ``--base-only`` file like the one being verified (f32 for an adapter's base)."""
    from .to_gguf import export

    quiet = replace(job, progress=lambda it, **_: it)
    if info.content == "adapter":
        export(quiet, out, gguf_type="f32", base_only=True)
    else:
        export(quiet, out, gguf_type=info.type_name, base_only=True,
               quantize_embeddings=info.embeddings_quantized and info.encoding != KQUANT_ENCODING,
               force_requantize=info.encoding == "requantize")


def _floor(job: ExportJob, info: GGUFInfo, run: Callable[[Path, list], list]) -> LogitStats:
    """The runtime's error on a ``--base-only`` file of the same type and encoding, against the trained base."""
    ids = tokenize_prompts(job.base, DEFAULT_PROMPTS)
    reference = _reference_base_logits(job, ids)
    with tempfile.TemporaryDirectory(prefix="blora-gguf-floor-") as tmp:
        base = Path(tmp) / "base.gguf"
        _write_base(job, base, info)
        return logit_stats(reference, run(base, ids))


def floor_tolerance(floor: LogitStats, what: str, at_least: Tolerance) -> Tolerance:
    max_rel = max(FLOOR_FACTOR * floor.max_rel, at_least.max_rel)
    slack = max(FLOOR_FACTOR * (1.0 - floor.top1_agreement), MIN_TOP1_SLACK)
    min_top1 = max(MIN_TOP1, min(at_least.min_top1, 1.0 - slack))
    return Tolerance(max_rel=max_rel, min_top1=min_top1,
                     basis=f"{FLOOR_FACTOR:g} x {what}'s own error without the adapter "
                           f"({floor.max_rel:.2e}, top-1 {floor.top1_agreement:.3f}; measured on a --base-only "
                           "file of the same type against the trained base)")


def _expected_fold_logits(job: ExportJob, ids: list) -> list[torch.Tensor]:
    """transformers with the weights a correct fold file holds: codes, fp16 α, correctly rounded fp16 β'
    (from the checkpoint, not the file) and f16 embeddings/head."""
    model = load_hf_model(job.base.path, torch.float32)
    with torch.no_grad():
        for name in job.base.linear_names():
            qw = quantize_minmax(job.base.tensor(name).to(torch.float32), job.ckpt.base_quant, name)
            module = job.ckpt.module_for_weight(name)
            model.get_parameter(name).copy_((qw if module is None else fold_into_zero_points(qw, module)).dequantize())
        for name in EMBEDDINGS:
            if name in job.base.shards:
                param = model.get_parameter(name)
                param.copy_(param.to(torch.float16).to(torch.float32))
    try:
        return model_logits(model, ids)
    finally:
        del model


def fold_tolerance(job: ExportJob) -> Tolerance:
    """FOLD_FACTOR x what the fp16 rounding of β' (and f16 embeddings) costs, computed from the checkpoint."""
    ids = tokenize_prompts(job.base, DEFAULT_PROMPTS)
    trained = reference_logits(job.base, job.ckpt, job.plan, ids).trained
    cost = logit_stats(trained, _expected_fold_logits(job, ids))
    return Tolerance(max_rel=max(FOLD_FACTOR * cost.max_rel, tolerance_for_dtype(torch.float32).max_rel),
                     min_top1=1.0 - max(FOLD_FACTOR * (1.0 - cost.top1_agreement), FOLD_TOP1_SLACK),
                     basis=f"{FOLD_FACTOR:g} x the cost of the fold's only rounding ({cost.max_rel:.2e}, top-1 "
                           f"{cost.top1_agreement:.3f}: β' correctly rounded to fp16, f16 embeddings; computed in "
                           "transformers from the checkpoint)")


def _exact_tolerance(info: GGUFInfo, job: ExportJob) -> Optional[Tolerance]:
    """The bound for gguf-py's exact dequantization, when the file holds no post-training quantization."""
    if info.embeddings_quantized or info.encoding in ("requantize", KQUANT_ENCODING):
        return None
    if info.encoding == "fold":
        return fold_tolerance(job)
    return tolerance_for_dtype(GGUF_TYPES[info.type_name].float_dtype)


def _apply_rope_freqs(model, reader: GGUFReader, path: Path) -> None:
    """transformers' GGUF loader ignores ``rope_freqs.weight`` (Llama 3.x rope): divide its rotary
    frequencies by the file's factors, as llama.cpp does."""
    tensor = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if tensor is None:
        return
    factors = torch.from_numpy(np.array(tensor.data, dtype=np.float32))
    rotary = model.model.rotary_emb
    if rotary.inv_freq.shape != factors.shape:
        raise BadInputError(f"{path}: rope_freqs.weight has {factors.numel()} values, the model "
                            f"{rotary.inv_freq.numel()} rotary frequencies")
    rotary.inv_freq = rotary.inv_freq / factors
    rotary.original_inv_freq = rotary.inv_freq


def transformers_reads(path: Path) -> bool:
    """Whether transformers' GGUF loader knows the file's architecture (it lacks e.g. granite)."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    return _field(GGUFReader(str(path)), "general.architecture") in GGUF_CONFIG_MAPPING


def open_gguf(path: Path, job: ExportJob, runtime: Optional[str]) -> Artifact:
    if runtime is None:  # gguf-py where transformers can load the architecture, else llama.cpp
        runtime = "gguf-py" if read_info(path).content == "adapter" or transformers_reads(path) else "llama.cpp"
    elif runtime == "gguf-py" and read_info(path).content != "adapter" and not transformers_reads(path):
        raise UnsupportedError(f"transformers' GGUF loader cannot load {path.name}'s architecture: "
                               "verify it with --runtime llama.cpp")
    if runtime not in RUNTIMES:
        raise UnsupportedError(f"a GGUF runs in {' or '.join(RUNTIMES)}, not {runtime!r}")
    info = read_info(path)
    if info.content == "base":
        raise UnsupportedError(f"{path} is a --base-only file (the base without the adapter): verify the model "
                               "export, or an --adapter-only file (which is run on such a base)")
    notes = []
    if info.checkpoint_sha256 and info.checkpoint_sha256 != job.ckpt.sha256:
        notes.append(f"{path.name} was written from another checkpoint (sha256 {info.checkpoint_sha256[:12]}...)")
    if info.encoding in ("requantize", KQUANT_ENCODING) or info.embeddings_quantized:
        notes.append("post-training quantization: the file approximates the trained function (the export's "
                     "ptq_error gives the weight error); the bound is what the same re-quantization costs the "
                     "base alone, so a failure here is the error the re-quantization adds because of the adapter")
    if runtime == "llama.cpp":
        require_llama_cpp()
        logits, tolerance, description = _llama_cpp(path, job, info)
    else:
        logits, tolerance, description = _gguf_py(path, job, info)
    return Artifact(format="gguf", path=path, description=description, tolerance=tolerance, logits=logits,
                    layer_checks=lambda: layer_checks(path, job, info.encoding), notes=tuple(notes))


def _gguf_py(path: Path, job: ExportJob, info: GGUFInfo):
    if info.content == "adapter":
        return (lambda prompts: gguf_py_adapter_logits(path, job, prompts),
                replace(tolerance_for_dtype(GGUF_TYPES[info.type_name].float_dtype),
                        basis=f"LoRA factors stored as {info.type_name}, applied in float64 to the trained base"),
                f"GGUF LoRA adapter ({info.type_name}), applied by gguf-py to the trained base")
    description = f"GGUF {info.type_name} ({info.encoding}), dequantized by gguf-py in transformers"
    tolerance = _exact_tolerance(info, job)
    if tolerance is None:
        floor = _floor(job, info, lambda f, ids: gguf_py_model_logits(f, ids))
        tolerance = floor_tolerance(floor, "post-training quantization", tolerance_for_dtype(torch.float16))
    return (lambda prompts: gguf_py_model_logits(path, prompts)), tolerance, description


def _llama_cpp(path: Path, job: ExportJob, info: GGUFInfo):
    float_type = GGUF_TYPES.get(info.type_name)  # None: a K-quant mix made by llama.cpp
    exact = tolerance_for_dtype(torch.float16 if float_type is None or float_type.quantized
                                or info.embeddings_quantized else float_type.float_dtype)
    floor = _floor(job, info, llama_cpp_logits)
    tolerance = floor_tolerance(floor, "llama.cpp", exact)
    if info.content != "adapter":
        return ((lambda prompts: llama_cpp_logits(path, prompts)), tolerance,
                f"GGUF {info.type_name} ({info.encoding}) in llama.cpp")

    def logits(prompts):
        with tempfile.TemporaryDirectory(prefix="blora-gguf-base-") as tmp:
            base = Path(tmp) / "base.gguf"
            _write_base(job, base, info)
            return llama_cpp_logits(base, prompts, lora=path)

    return logits, tolerance, f"GGUF LoRA adapter ({info.type_name}) on a --base-only f32 GGUF in llama.cpp"
