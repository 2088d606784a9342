"""Running a GGUF for ``verify``: gguf-py (exact dequantization) or llama.cpp, with measured bounds.

Runtimes:

* ``gguf-py`` (default): a model file loads through transformers' GGUF loader
  (``from_pretrained(dir, gguf_file=...)``, every tensor dequantized by gguf-py, Q/K rows
  un-permuted); an adapter file is applied to the trained base in memory
  (``W += alpha/r · B @ A``, B rows un-permuted). Logits in float32.
* ``llama.cpp``: llama-cpp-python (``Llama(..., logits_all=True)``, ``eval(ids)``, ``scores``); an
  adapter runs on a temporary ``--base-only`` f32 GGUF with ``lora_path``.

Bounds (``max |Δlogit| / max |logit|``). Every floor is computed in torch from the checkpoint's base
as trained, *without the adapter* (:mod:`blora_export.tolerance`), never from a file this writer made:

* gguf-py, float types: the storage dtype's bound, widened to ``FLOOR_FACTOR`` x what storing the
  base in the file's tensor types costs;
* gguf-py, the Q4_1/Q5_1 fold: the file differs from ``trained_base + ΔW`` only by the fp16 rounding of
  each block's ``β'`` (and the f16 embeddings). That rounding is coherent over a block's 32 weights, so
  its cost is computed from the checkpoint each time (transformers with the correctly rounded fold,
  computed by the core), and the file may cost at most ``FOLD_FACTOR`` (2) times that;
* gguf-py, post-training quantization: ``FLOOR_FACTOR`` x what the same ``gguf.quants`` quantization of
  the base as trained costs (reported as such);
* llama.cpp: ``FLOOR_FACTOR`` x what llama.cpp's arithmetic does to the base as trained, stored in the
  file's tensor types: activations quantized per block before each quantized matmul as ggml does
  (:mod:`blora_export.emulate`), fp16 activations for F16 weights, an F16 KV cache. And the file's own
  tensors, dequantized exactly, run in the base's *true* architecture (from its config.json, not the
  GGUF metadata) must meet the gguf-py bound: a structural error (a wrong permutation, a missing sliding
  window, a dropped adapter) exceeds one or the other.
"""
from __future__ import annotations

import logging
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader

from blora_export.base import DECODER_LINEAR
from blora_export.emulate import NONE, Arithmetic, Rule
from blora_export.errors import BadInputError, UnsupportedError
from blora_export.families import family, fused_rows
from blora_export.job import Artifact, ExportJob
from blora_export.merge import exact_merged_weight
from blora_export.numerics import logit_stats, round_to
from blora_export.quant import fold_into_zero_points, quantize_minmax
from blora_export.reference import (
    DEFAULT_PROMPTS,
    model_logits,
    tokenize_prompts,
    trained_base_fn,
    trained_stream,
)
from blora_export.spec import MinMaxGrid
from blora_export.stream import Stream, StreamedForward
from blora_export.tolerance import Tolerance, floor_tolerance, tolerance_for_dtype

from .gguf_checks import GGUFFile, _layout, _tensors, layer_checks, lora_pairs, read_raw, unpermute_rows
from .gguf_kquant import ENCODING as KQUANT_ENCODING
from .gguf_model import permute_heads
from .gguf_quants import GGUF_TYPES, TYPE_BY_QTYPE, dequantize, quantize

log = logging.getLogger(__name__)
RUNTIMES = ("gguf-py", "llama.cpp")
LLAMA_CPP_PIP = 'pip install "llama-cpp-python>=0.3.8"'
FOLD_FACTOR = 2.0
FOLD_TOP1_SLACK = 0.05
EMBEDDINGS = ("model.embed_tokens.weight", "lm_head.weight")
#: ggml's K types (in llama.cpp's K-quant mixes) by the bit width of their codes: the floor stores a
#: tensor of such a type as min-max codes of that width on blocks of 32 (a proxy: llama.cpp's K-quant
#: search, with finer sub-block scales, does no worse on the weights).
KQUANT_PROXY_BITS = {GGMLQuantizationType.Q2_K: 2, GGMLQuantizationType.Q3_K: 3, GGMLQuantizationType.Q4_K: 4,
                     GGMLQuantizationType.Q5_K: 5, GGMLQuantizationType.Q6_K: 6}


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


def read_info(path: "Path | GGUFFile") -> GGUFInfo:
    reader, _ = _tensors(path)
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


@contextmanager
def _without_extra_buffers(llama_cpp) -> Iterator[None]:
    """``llama_model_params.use_extra_bufts = False`` for the models loaded inside.

    llama-cpp-python's ``Llama`` does not expose the field, so its default-params factory is
    wrapped while the model loads. Why: a llama.cpp built natively on an AMX CPU (Sapphire
    Rapids and later) moves Q4_0 / Q4_1 / Q8_0 weights into AMX buffers, and on virtual machines
    that list AMX without granting it (as this project's 2-core runners) the first ``decode``
    segfaults (measured: llama-cpp-python 0.3.36, q4_0, q4_1 and q8_0 crash, f16 and f32 run).
    Without extra buffers the same weights run in ggml's plain CPU kernels: the same block
    formats and the same Q8 activation blocks that verify's bound emulates.
    """
    module = llama_cpp.llama.llama_cpp
    factory = module.llama_model_default_params

    def params():
        value = factory()
        value.use_extra_bufts = False
        return value
    module.llama_model_default_params = params
    try:
        yield
    finally:
        module.llama_model_default_params = factory


def open_llama(model: Path, **options):
    """``llama_cpp.Llama`` on ``model`` without llama.cpp's extra weight buffers (see above)."""
    llama_cpp = require_llama_cpp()
    with _without_extra_buffers(llama_cpp):
        return llama_cpp.Llama(model_path=str(model), verbose=False, **options)


def llama_cpp_logits(model: Path, prompts: Sequence[Sequence[int]], lora: Optional[Path] = None) -> list[torch.Tensor]:
    """llama.cpp's float32 logits ``[len(prompt), vocab]`` per prompt (KV cache reset in between)."""
    n_ctx = max(64, max(len(p) for p in prompts) + 8)
    llm = open_llama(model, n_ctx=n_ctx, logits_all=True, lora_path=None if lora is None else str(lora))
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
    model = AutoModelForCausalLM.from_pretrained(str(path.parent.resolve()), gguf_file=str(path.resolve()),
                                                 dtype=torch.float32, device_map="cpu").eval()
    try:
        return model_logits(model, prompts)
    finally:
        del model


def _write_base(job: ExportJob, out: Path) -> None:
    """A ``--base-only`` f32 file: the base an ``--adapter-only`` file runs on in llama.cpp."""
    from .to_gguf import export

    export(replace(job, progress=lambda it, **_: it), out, gguf_type="f32", base_only=True)


def file_types(path: "Path | GGUFFile", job: ExportJob) -> dict[str, GGMLQuantizationType]:
    """The ggml type of each tensor of a GGUF model, by Hugging Face name."""
    arch, hp, tmap = _layout(job)
    _, tensors = _tensors(path)
    types = {}
    for name in job.base.names():
        gname = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if gname in tensors:
            types[name] = tensors[gname].tensor_type
    if "lm_head.weight" not in types:  # tied: the head multiplies with the embeddings' type
        types["lm_head.weight"] = tensors["output.weight"].tensor_type if "output.weight" in tensors \
            else types.get("model.embed_tokens.weight", GGMLQuantizationType.F32)
    return types


def gguf_weights(path: "Path | GGUFFile", job: ExportJob):
    """What the file holds, dequantized exactly by gguf-py, by Hugging Face name (Q/K rows un-permuted)."""
    arch, hp, tmap = _layout(job)
    reader, tensors = _tensors(path)

    def weights(name: str, _cache) -> torch.Tensor:
        gname = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if gname not in tensors and name == "lm_head.weight":
            gname = "output.weight" if "output.weight" in tensors else "token_embd.weight"
        if gname not in tensors:
            raise BadInputError(f"{path} has no tensor {gname} (for {name})")
        t = tensors[gname]
        shape = job.base.shape(name if name in job.base.shards else "model.embed_tokens.weight")
        value = dequantize(read_raw(reader, t), t.tensor_type).reshape(shape)
        if value.ndim == 1 and arch.family.norm_offset:  # the file stores offset + w (Gemma's 1 + w)
            value = value - arch.family.norm_offset
        return unpermute_rows(value, permute_heads(gname, arch, hp))
    return weights


def adapter_weights(path: "Path | GGUFFile", job: ExportJob):
    """An adapter file applied to the trained base in float64: ``W + alpha/r · B @ A``."""
    pairs = {module.weight_name: (a, b, scale) for module, a, b, scale in lora_pairs(path, job)}
    base = trained_base_fn(job.plan)

    def weights(name: str, cache) -> torch.Tensor:
        w = base(name, cache)
        if name not in pairs:
            return w
        a, b, scale = pairs[name]
        return (w.to(torch.float64) + scale * (b @ a)).to(torch.float32)
    return weights


def stored_like(w: torch.Tensor, qtype: GGMLQuantizationType) -> torch.Tensor:
    """``w`` as a file of this type stores it: rounded to the float type, or gguf-py's quantize/dequantize."""
    if qtype in KQUANT_PROXY_BITS:  # no K-quant quantizer outside llama.cpp: a min-max proxy of its width
        return quantize_minmax(w, MinMaxGrid(KQUANT_PROXY_BITS[qtype], 1, 32), "weight").dequantize()
    gtype = TYPE_BY_QTYPE.get(qtype)
    if gtype is None:
        raise UnsupportedError(f"verify knows ggml types {', '.join(GGUF_TYPES)}, not {qtype.name}")
    if not gtype.quantized:
        return w.to(gtype.float_dtype).to(torch.float32)
    return dequantize(quantize(w, gtype), qtype).reshape(w.shape)


def storage_stream(job: ExportJob, types: dict, name: str, arithmetic: Optional[Arithmetic] = None) -> Stream:
    """The base as trained, WITHOUT the adapter, stored as the file stores each tensor (and computed
    with a runtime's arithmetic): the floor, from the checkpoint's base, never from the file's weights."""
    base = trained_base_fn(job.plan)

    def weights(n: str, cache) -> torch.Tensor:
        w = base(n, cache)
        return stored_like(w, types[n]) if n in types and w.ndim == 2 else w
    return Stream(name, weights, None if arithmetic is None else arithmetic.hooks)


def llama_cpp_arithmetic(types: dict, job: Optional[ExportJob] = None) -> Arithmetic:
    """llama.cpp's CPU arithmetic for these tensor types (see :mod:`blora_export.emulate`); a GELU MLP
    (Gemma) is computed through ggml's fp16 GELU table: its input and output rounded to fp16."""
    rules = {}
    for name, qtype in types.items():
        if not name.endswith(".weight") or name == "model.embed_tokens.weight":
            continue  # get_rows reads the embeddings as stored; norms multiply in f32
        if qtype in KQUANT_PROXY_BITS:  # ggml's K types multiply with Q8_K activations: blocks of 256, f32 scale
            rules[name[: -len(".weight")]] = Rule("int8", 256, scale_dtype=None)
            continue
        gtype = TYPE_BY_QTYPE.get(qtype)
        if gtype is None:
            raise UnsupportedError(f"{name} is stored as {qtype.name}: verify emulates llama.cpp for the types "
                                   f"blora-export writes ({', '.join(GGUF_TYPES)})")
        rules[name[: -len(".weight")]] = (Rule("int8", 32) if gtype.quantized else
                                          NONE if gtype.float_dtype == torch.float32 else
                                          Rule("dtype", dtype=gtype.float_dtype))
    gelu = job is not None and "gelu" in str(job.base.config.get("hidden_activation") or job.base.config.get("hidden_act"))
    q_rows = fused_rows(job.base.config, "qkv_proj")[0] if job is not None and family(job.base.model_type).fused else 0
    return Arithmetic(rules, kv_dtype=torch.float16, act_dtype=torch.float16 if gelu else None, q_rows=q_rows)


def expected_fold_stream(job: ExportJob) -> Stream:
    """transformers with the weights a correct fold file holds: codes, fp16 α, correctly rounded fp16 β'
    (from the checkpoint, not the file) and f16 embeddings/head."""
    def weights(name: str, cache) -> torch.Tensor:
        if name in EMBEDDINGS:
            return cache.tensor(name).to(torch.float16).to(torch.float32)
        w = cache.tensor(name)
        if not DECODER_LINEAR.match(name):
            return w.to(torch.float32)
        qw = quantize_minmax(w.to(torch.float32), job.ckpt.base_quant, name)
        module = job.ckpt.module_for_weight(name)
        return (qw if module is None else fold_into_zero_points(qw, module)).dequantize()
    return Stream("expected fold", weights)


def expected_file_stream(job: ExportJob, info: GGUFInfo, types: dict, arithmetic: Arithmetic) -> Optional[Stream]:
    """The training-time model as a correct file of this kind stores it, computed by verify from the
    checkpoint (never read from the file), run with llama.cpp's arithmetic emulated: what the runtime
    costs the adapted model itself. A fold file: :func:`expected_fold_stream`'s weights; a float file:
    the exact trained weights correctly rounded to each tensor's type. None for post-training
    quantization (its expected file would be this writer's own quantizer)."""
    if info.encoding == "fold" and not info.embeddings_quantized:
        return Stream("llama.cpp trained floor", expected_fold_stream(job).weights, arithmetic.hooks)
    if info.encoding != "float":
        return None
    base = trained_base_fn(job.plan)

    def weights(name: str, cache) -> torch.Tensor:
        gtype = TYPE_BY_QTYPE.get(types.get(name))
        if job.ckpt.module_for_weight(name) is None or gtype is None or gtype.quantized:
            w = base(name, cache)
            return stored_like(w, types[name]) if name in types and w.ndim == 2 else w
        return round_to(exact_merged_weight(name, cache.tensor(name), job.ckpt, job.plan), gtype.float_dtype)
    return Stream("llama.cpp trained floor", weights, arithmetic.hooks)


def llama_cpp_bound(what: str, exact: Tolerance):
    """``FLOOR_FACTOR`` x the larger of llama.cpp's emulated cost to the base without the adapter and
    (where verify can build the expected file) to the training-time model itself: a deep model
    amplifies the runtime's rounding of the adapted weights more than the base's (7B QA-BLoRA q4_1
    fold: 7.6e-2 on the base, and llama.cpp's error 3.1e-1 against the base-only bound 3.0e-1)."""
    def bound(out: dict) -> Tolerance:
        base = logit_stats(out["without"], out["llama.cpp floor"])
        trained = logit_stats(out["trained"], out["llama.cpp trained floor"]) if "llama.cpp trained floor" in out else None
        if trained is None or trained.max_rel <= base.max_rel:
            return floor_tolerance(base, what, exact)
        tol = floor_tolerance(trained, what, exact)
        return replace(tol, basis=tol.basis.replace("measured on the base as trained, without the adapter",
                                                    "measured on the training-time model stored as a correct file, "
                                                    f"computed by verify; on the base alone {base.max_rel:.2e}"))
    return bound


def fold_bound(out: dict) -> Tolerance:
    """FOLD_FACTOR x what the fp16 rounding of β' (and f16 embeddings) costs, computed from the checkpoint."""
    cost = logit_stats(out["trained"], out["expected fold"])
    return Tolerance(max_rel=max(FOLD_FACTOR * cost.max_rel, tolerance_for_dtype(torch.float32).max_rel),
                     min_top1=1.0 - max(FOLD_FACTOR * (1.0 - cost.top1_agreement), FOLD_TOP1_SLACK),
                     basis=f"{FOLD_FACTOR:g} x the cost of the fold's only rounding ({cost.max_rel:.2e}, top-1 "
                           f"{cost.top1_agreement:.3f}: β' correctly rounded to fp16, f16 embeddings; computed in "
                           "transformers from the checkpoint)")


def fold_tolerance(job: ExportJob) -> Tolerance:
    """:func:`fold_bound` on the built-in prompts (one streamed pass)."""
    ids = tokenize_prompts(job.base, DEFAULT_PROMPTS)
    streams = [trained_stream(job.ckpt, job.plan), expected_fold_stream(job)]
    return fold_bound(StreamedForward(job.base).run(ids, streams))


def _weights_plan(path: Path, job: ExportJob, info: GGUFInfo, types: dict):
    """(streams, bound) for the file's weights run in float32: what gguf-py's exact dequantization allows."""
    if info.encoding == "fold" and not info.embeddings_quantized:
        return [expected_fold_stream(job)], fold_bound
    table = tolerance_for_dtype(torch.float16 if GGUF_TYPES[info.type_name].quantized
                                else GGUF_TYPES[info.type_name].float_dtype)
    what = ("post-training quantization" if info.encoding == "requantize" or info.embeddings_quantized
            else "storage rounding")

    def bound(out: dict) -> Tolerance:
        return floor_tolerance(logit_stats(out["without"], out["stored base"]), f"the file types' {what}", table)
    return [storage_stream(job, types, "stored base")], bound


def open_gguf(path: Path, job: ExportJob, runtime: Optional[str]) -> Artifact:
    source = GGUFFile.open(path)  # parsed once: its info, tensor types, weights and checks all read it
    info = read_info(source)
    if info.encoding == KQUANT_ENCODING:  # llama.cpp's own K-quant mix: its floor needs llama.cpp's quantizer
        if runtime not in (None, "llama.cpp"):
            raise UnsupportedError(f"{path.name} is a {info.type_name} K-quant made by llama.cpp's quantizer: "
                                   "verify it with --runtime llama.cpp")
        runtime = "llama.cpp"
    runtime = runtime or "gguf-py"
    if runtime not in RUNTIMES:
        raise UnsupportedError(f"a GGUF runs in {' or '.join(RUNTIMES)}, not {runtime!r}")
    if info.content == "base":
        raise UnsupportedError(f"{path} is a --base-only file (the base without the adapter): verify the model "
                               "export, or an --adapter-only file (which is run on such a base)")
    notes = []
    if info.checkpoint_sha256 and info.checkpoint_sha256 != job.ckpt.sha256:
        notes.append(f"{path.name} was written from another checkpoint (sha256 {info.checkpoint_sha256[:12]}...)")
    if info.encoding in ("requantize", KQUANT_ENCODING) or info.embeddings_quantized:
        notes.append("post-training quantization: the file approximates the trained function (the export's "
                     "ptq_error gives the weight error); the bound is what the same re-quantization costs the "
                     "base as trained without the adapter")
    kind = _gguf_py if runtime == "gguf-py" else _llama_cpp
    if runtime == "llama.cpp":
        require_llama_cpp()
    return kind(path, job, info, tuple(notes), source)


def _gguf_py(path: Path, job: ExportJob, info: GGUFInfo, notes: tuple, source: GGUFFile) -> Artifact:
    checks = lambda: layer_checks(source, job, info.encoding)  # noqa: E731
    if info.content == "adapter":
        tol = replace(tolerance_for_dtype(GGUF_TYPES[info.type_name].float_dtype),
                      basis=f"LoRA factors stored as {info.type_name}, applied in float64 to the trained base")
        return Artifact(format="gguf", path=path, tolerance=tol, logits=None, weights=adapter_weights(source, job),
                        description=f"GGUF LoRA adapter ({info.type_name}), applied by gguf-py to the trained base",
                        layer_checks=checks, notes=notes)
    streams, bound = _weights_plan(path, job, info, file_types(source, job))
    return Artifact(format="gguf", path=path, tolerance=tolerance_for_dtype(torch.float32), logits=None,
                    weights=gguf_weights(source, job), streams=tuple(streams), bound=bound, layer_checks=checks,
                    description=f"GGUF {info.type_name} ({info.encoding}), dequantized by gguf-py, run layer by layer "
                                "in the base's architecture", notes=notes)


def _llama_cpp_kquant(path: Path, job: ExportJob, info: GGUFInfo, notes: tuple, source: GGUFFile) -> Artifact:
    """A K-quant mix in llama.cpp. Its floor never comes from a file of this writer: the base as trained,
    without the adapter, each tensor stored as the file's type says (K types through a min-max proxy of
    their bit width on blocks of 32, which llama.cpp's K-quant search does no worse than) and run with
    llama.cpp's arithmetic emulated (Q8_K activation blocks of 256 for K types, F16 KV cache)."""
    types = file_types(source, job)
    floor = storage_stream(job, types, "llama.cpp floor", llama_cpp_arithmetic(types, job))
    exact = tolerance_for_dtype(torch.float16)

    def bound(out: dict) -> Tolerance:
        return floor_tolerance(logit_stats(out["without"], out["llama.cpp floor"]),
                               f"llama.cpp's {info.type_name} quantization (min-max proxy of each K type's width) "
                               "and arithmetic (Q8_K/Q8_0 activation blocks, f16 KV cache), emulated in torch", exact)
    return Artifact(format="gguf", path=path, tolerance=exact, logits=lambda prompts: llama_cpp_logits(path, prompts),
                    streams=(floor,), bound=bound, layer_checks=lambda: layer_checks(source, job, info.encoding),
                    notes=notes, description=f"GGUF {info.type_name} (llama.cpp's K-quant of the exact merge) in llama.cpp")


def _llama_cpp(path: Path, job: ExportJob, info: GGUFInfo, notes: tuple, source: GGUFFile) -> Artifact:
    if info.encoding == KQUANT_ENCODING:
        return _llama_cpp_kquant(path, job, info, notes, source)
    checks = lambda: layer_checks(source, job, info.encoding)  # noqa: E731
    if info.content == "adapter":
        types = {n: GGMLQuantizationType.F32 for n in job.base.names()}
        types["lm_head.weight"] = GGMLQuantizationType.F32
    else:
        types = file_types(source, job)
    arithmetic = llama_cpp_arithmetic(types, job)
    floor = storage_stream(job, types, "llama.cpp floor", arithmetic)
    exact = tolerance_for_dtype(torch.float32 if info.content == "adapter" else torch.float16)
    bound = llama_cpp_bound("llama.cpp's arithmetic and storage, emulated in torch (8-bit activation blocks, "
                            "f16 KV cache, the file's tensor types)", exact)
    if info.content == "adapter":
        def logits(prompts):
            with tempfile.TemporaryDirectory(prefix="blora-gguf-base-") as tmp:
                base = Path(tmp) / "base.gguf"
                _write_base(job, base)
                return llama_cpp_logits(base, prompts, lora=path)
        return Artifact(format="gguf", path=path, tolerance=exact, logits=logits, streams=(floor,), bound=bound,
                        weights=adapter_weights(source, job), weights_bound=lambda out: exact,
                        weights_description="the adapter's factors applied in float64 to the trained base",
                        description=f"GGUF LoRA adapter ({info.type_name}) on a --base-only f32 GGUF in llama.cpp",
                        layer_checks=checks, notes=notes)
    streams, weights_bound = _weights_plan(path, job, info, types)
    trained_floor = expected_file_stream(job, info, types, arithmetic)
    streams = [floor, *streams] + ([] if trained_floor is None else [trained_floor])
    return Artifact(format="gguf", path=path, tolerance=exact, logits=lambda prompts: llama_cpp_logits(path, prompts),
                    streams=tuple(streams), bound=bound, weights=gguf_weights(source, job),
                    weights_bound=weights_bound,
                    weights_description="the file's tensors dequantized by gguf-py in the base's own architecture",
                    description=f"GGUF {info.type_name} ({info.encoding}) in llama.cpp", layer_checks=checks,
                    notes=notes)
