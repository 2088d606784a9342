"""What goes into a GGUF model for llama.cpp: architecture (the family table's row), hyperparameters,
tensor plan (plus ``rope_freqs.weight`` for a Llama 3.x rope).

Tensor names come from gguf-py's ``TensorNameMap``. llama.cpp's ``llama`` architecture (which
also runs Mistral v0.x) rotates adjacent pairs where Hugging Face rotates halves, so the rows of
``q_proj`` / ``k_proj`` (and their codes, α and β, or LoRA B) are permuted
(docs/FORMATS.md); ``qwen2`` needs no permutation but its q/k/v biases.

How each decoder Linear is stored (:func:`choose_encoding`):

* ``float``: ``trained_base(W) + ΔW`` from float64, correctly rounded to f32/f16/bf16;
* ``fold``: QA-BLoRA on a min-max grid whose blocks split into 32-element runs, written as
  Q4_1/Q5_1 with the checkpoint's own codes and fp16 α and the folded ``β'`` (no re-quantization);
* ``requantize``: merge, then ``gguf.quants.quantize`` (post-training quantization; error reported).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

import gguf
import numpy as np
import torch
from gguf import MODEL_ARCH, GGMLQuantizationType, GGUFWriter

from blora_export.base import DECODER_LINEAR, rope_parameters
from blora_export.errors import BadInputError, UnsupportedError
from blora_export.families import (
    SQRT_HIDDEN,
    Family,
    attention_window,
    family,
    head_dim,
    layer_kinds,
    layer_windows,
    rope_layers,
    rotary_dim,
    scales,
)
from blora_export.fold import fold_obstacles, fold_refusal, gguf_grid
from blora_export.job import ExportJob
from blora_export.merge import exact_merged_weight, merged_weight, trained_base_weight
from blora_export.ptq import PtqError
from blora_export.quant import fold_into_zero_points, quantize_minmax, to_row_blocks
from blora_export.spec import MinMaxGrid

from .gguf_longrope import LONG, SHORT, longrope, write_longrope_keys
from .gguf_quants import GGUF_TYPES, MIN_TYPE_FOR_BITS, QK, GGUFType, dequantize, encode_float, pack_rows, quantize


@dataclass(frozen=True)
class ArchSpec:
    """How a Hugging Face architecture is written for llama.cpp: its row of the family table."""

    family: Family

    @property
    def gguf_arch(self) -> MODEL_ARCH:
        return MODEL_ARCH[self.family.gguf_arch]

    @property
    def permute_qk(self) -> bool:  # llama.cpp's llama graph rotates adjacent pairs: permute q/k rows
        return self.family.permute_qk

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]


# Non-parameter buffers some checkpoints carry; llama.cpp computes them itself.
BUFFERS = ("rotary_emb.inv_freq",)
ROLE_EMBED = ("token_embd.weight", "output.weight")
ROPE_FREQS = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
log = logging.getLogger(__name__)


#: llama.cpp graphs that skip the rotation on every n-th layer, n fixed in llama.cpp (no GGUF key):
#: ``use_rope = (il + 1) % n != 0`` (src/models/smollm3.cpp, ``n_no_rope_layer_step = 4``).
NO_ROPE_STEP = {"SMOLLM3": 4}


def check_rope_layers(config: dict) -> None:
    """A base with rope off on some layers runs in llama.cpp only when its architecture skips exactly
    those layers (SmolLM3: every 4th, fixed); any other pattern is refused."""
    flags = rope_layers(config)
    if all(flags):
        return
    fam = family(config["model_type"])
    step = NO_ROPE_STEP.get(fam.gguf_arch)
    if step is None or flags != tuple((i + 1) % step != 0 for i in range(len(flags))):
        off = [i for i, f in enumerate(flags) if not f]
        fixed = f"only every {step}th layer ({step - 1}, {2 * step - 1}, ...)" if step else "no layer"
        raise UnsupportedError(f"{fam.model_type}: rope is off on layers {off} ({fam.no_rope_key}), and llama.cpp's "
                               f"{fam.gguf_arch.lower()} graph skips it on {fixed}: export to ONNX or MLX, which follow "
                               f"{fam.no_rope_key}")


@dataclass(frozen=True)
class FixedGraph:
    """What a llama.cpp Gemma graph fixes instead of reading it from the file (src/models/gemma*.cpp)."""

    swa_period: Optional[int]  # local layers where ``il % n < n - 1`` (None: the file lists them per layer)
    big_layers: int  # the layer count whose attention scale is (n_embd/n_head)^-0.5, else head_dim^-0.5
    score_softcap: bool  # whether the graph caps the attention scores (Gemma 2 always, Gemma 3 never)
    final_softcap_always: bool  # Gemma 2 caps the logits always; Gemma 3 where the key is written


#: Gemma 2: local layers every other from 0, both caps; Gemma 3: ``attention.sliding_window_pattern``
#: lists the local layers (the graph takes them and ``rope.freq_base_swa`` for them), no score cap.
LLAMA_CPP_FIXED = {"GEMMA2": FixedGraph(2, 46, True, True), "GEMMA3": FixedGraph(None, 62, False, False)}


def check_llama_cpp_conventions(config: dict) -> None:
    """Refuse a Gemma config whose windows, attention scale or softcaps llama.cpp's graph, which fixes
    them, would not compute."""
    fam = family(config["model_type"])
    fixed = LLAMA_CPP_FIXED.get(fam.gguf_arch)
    if fixed is None:
        return
    windows, sc, period = layer_windows(config), scales(config), fixed.swa_period
    expected = tuple(max(w or 0 for w in windows) or None if period and i % period < period - 1 else None
                     for i in range(len(windows))) if period else windows
    n, heads = int(config["num_hidden_layers"]), int(config["num_attention_heads"])
    scale = (int(config["hidden_size"]) // heads if n == fixed.big_layers else head_dim(config)) ** -0.5
    local = [i for i, kind in enumerate(layer_kinds(config)) if kind == "sliding_attention"]
    local_rope = rope_parameters(config, "sliding_attention")
    problems = [f"local layers {[i for i, w in enumerate(windows) if w]} (llama.cpp: every {period}th from 0)"
                if windows != expected else "",
                f"local layers {local} without a window (llama.cpp rotates them with the local base only in "
                "windowed models)" if fam.layer_rope and local and not any(windows) else "",
                f"attention scale {sc.attention:.6g} (llama.cpp computes {scale:.6g} for {n} layers)"
                if abs(sc.attention - scale) > 1e-6 * scale else "",
                "no attention or final softcap (llama.cpp's graph applies both)"
                if fixed.score_softcap and not (sc.attn_softcap and sc.final_softcap) else "",
                "an attention softcap (llama.cpp's graph has none)" if not fixed.score_softcap and sc.attn_softcap
                else "",
                f"rope scaling {local_rope['rope_type']!r} on the local layers (llama.cpp scales the global ones only)"
                if fam.layer_rope and local_rope["rope_type"] != "default" else ""]
    problems = [p for p in problems if p]
    if problems:
        raise UnsupportedError(f"{fam.model_type}: llama.cpp's {fam.gguf_arch.lower()} graph fixes what this config "
                               f"sets otherwise: {'; '.join(problems)}; export to ONNX")


def arch_spec(model_type: str) -> ArchSpec:
    return ArchSpec(family(model_type))


def rope_theta(config: dict) -> float:
    """``rope_theta`` at the top level (transformers 4) or in ``rope_parameters`` (transformers 5)."""
    return float(rope_parameters(config)["rope_theta"])


def _rope_scaling(config: dict) -> Optional[tuple[str, float]]:
    params = rope_parameters(config)
    kind = params["rope_type"]
    allowed = family(config["model_type"]).rope_types
    if kind not in allowed:
        raise UnsupportedError(f"rope scaling {kind!r} is not supported by the GGUF export of "
                               f"{config['model_type']} ({', '.join(allowed)} are)")
    if kind == "default":
        return None
    return kind, float(params.get("factor") or 1.0)


def llama3_rope_factors(config: dict) -> np.ndarray:
    """``rope_freqs.weight`` of a Llama 3.x rope (F32, head_dim/2): llama.cpp divides each
    frequency by its factor, which reproduces transformers' ``_compute_llama3_parameters``
    (same formula as llama.cpp's convert_hf_to_gguf.py ``LlamaModel.generate_extra_tensors``)."""
    params = rope_parameters(config)
    dim = head_dim(config)
    freqs = 1.0 / (float(params["rope_theta"]) ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = float(params.get("factor", 8.0))
    low, high = float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0))
    orig = float(params.get("original_max_position_embeddings", 8192))
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < orig / high:
            out.append(1.0)
        elif wavelen > orig / low:
            out.append(factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


@dataclass(frozen=True)
class HParams:
    n_layers: int
    hidden: int
    intermediate: int
    n_head: int
    n_kv_head: int
    head_dim: int
    context: int
    rms_eps: float
    theta: float
    tied: bool
    window: Optional[int] = None  # one attention window shorter than the context (Mistral)

    @property
    def context_written(self) -> int:
        """``context_length`` of the file: capped at the window, where attention over the whole
        context and the window's attention are the same computation."""
        return self.context if self.window is None else min(self.context, self.window)

    @classmethod
    def from_config(cls, config: dict) -> "HParams":
        try:
            n_head = int(config["num_attention_heads"])
            hidden = int(config["hidden_size"])
            check_rope_layers(config)
            check_llama_cpp_conventions(config)
            return cls(n_layers=int(config["num_hidden_layers"]), hidden=hidden,
                       intermediate=int(config["intermediate_size"]), n_head=n_head,
                       n_kv_head=int(config.get("num_key_value_heads") or n_head),
                       head_dim=head_dim(config),
                       context=int(config.get("max_position_embeddings", 2048)),
                       rms_eps=float(config.get("rms_norm_eps", 1e-6)), theta=rope_theta(config),
                       tied=bool(config.get("tie_word_embeddings", False)), window=attention_window(config))
        except KeyError as exc:
            raise BadInputError(f"config.json lacks {exc.args[0]!r}") from None


def write_hparams(writer: GGUFWriter, hp: HParams, config: dict, vocab_rows: int) -> None:
    writer.add_context_length(hp.context_written)
    writer.add_embedding_length(hp.hidden)
    writer.add_block_count(hp.n_layers)
    writer.add_feed_forward_length(hp.intermediate)
    writer.add_head_count(hp.n_head)
    writer.add_head_count_kv(hp.n_kv_head)
    if hp.head_dim * hp.n_head != hp.hidden:
        writer.add_key_length(hp.head_dim)
        writer.add_value_length(hp.head_dim)
    writer.add_rope_dimension_count(rotary_dim(config))  # Phi-3: partial_rotary_factor of head_dim
    writer.add_rope_freq_base(hp.theta)
    scaling = _rope_scaling(config)
    if scaling is not None and scaling[0] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling[1])
    # llama3: no key; the factors travel as the rope_freqs.weight tensor (tensor_plan); LongRoPE: two tensors too
    if longrope(config) is not None:
        write_longrope_keys(writer, longrope(config), hp.context_written)
    writer.add_layer_norm_rms_eps(hp.rms_eps)
    writer.add_vocab_size(vocab_rows)
    write_multipliers(writer, config)


def write_multipliers(writer: GGUFWriter, config: dict) -> None:
    """The multipliers a family reads from its config, as the keys llama.cpp's graph for it reads
    (Granite: ``embedding_scale``, ``attention.scale``, ``residual_scale``, ``logit_scale``, the divisor).
    A √hidden embedding scale (Gemma) is applied by llama.cpp's gemma graphs themselves: no key."""
    fam, sc = family(config["model_type"]), scales(config)
    if fam.embedding_scale is not None and fam.embedding_scale != SQRT_HIDDEN:
        writer.add_embedding_scale(sc.embedding)
    if fam.attention_scale is not None:
        writer.add_attention_scale(sc.attention)
    if fam.residual_scale is not None:
        writer.add_residual_scale(sc.residual)
    if fam.logit_divisor is not None:
        writer.add_logit_scale(sc.logit_divisor)
    if sc.attn_softcap is not None:
        writer.add_attn_logit_softcapping(sc.attn_softcap)
    if sc.final_softcap is not None:
        writer.add_final_logit_softcapping(sc.final_softcap)
    write_windows(writer, config)


def write_windows(writer: GGUFWriter, config: dict) -> None:
    """Gemma's ``attention.sliding_window``; for Gemma 3 also which layers are local
    (``attention.sliding_window_pattern``, one bool per layer) and their rope base (``rope.freq_base_swa``)."""
    fam, windows = family(config["model_type"]), layer_windows(config)
    if not (fam.layer_windows and any(windows)):
        return
    writer.add_sliding_window(max(w or 0 for w in windows))
    if fam.layer_rope:
        writer.add_sliding_window_pattern([w is not None for w in windows])
        writer.add_rope_freq_base_swa(float(rope_parameters(config, "sliding_attention")["rope_theta"]))


def permutation(rows: int, n_head: int) -> torch.Tensor:
    """Row order llama.cpp wants: ``W.reshape(n, 2, rows//n//2, ...).swapaxes(1, 2)`` (docs/FORMATS.md)."""
    return torch.arange(rows).reshape(n_head, 2, rows // n_head // 2).transpose(1, 2).reshape(-1)


def permute_heads(gguf_name: str, arch: ArchSpec, hp: HParams) -> Optional[int]:
    """The head count the rows of this tensor are permuted with (``None``: no permutation)."""
    if not arch.permute_qk:
        return None
    if ".attn_q." in gguf_name:
        return hp.n_head
    if ".attn_k." in gguf_name:
        return hp.n_kv_head
    return None


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the output file and how it is made."""

    name: str  # GGUF name
    source: str  # Hugging Face name
    shape: tuple[int, ...]  # PyTorch shape ([out, in] or [n])
    gtype: GGUFType
    role: str  # "norm" (1-D, F32), "embed" (token_embd/output), "linear" (decoder Linear), "rope_freqs"
    heads: Optional[int]  # permute rows with this head count

    def writer_info(self) -> tuple[tuple[int, ...], np.dtype, int, Optional[GGMLQuantizationType]]:
        """Arguments for ``GGUFWriter.add_tensor_info``: byte shape for raw types."""
        rows = int(np.prod(self.shape[:-1])) if len(self.shape) > 1 else 1
        cols = self.shape[-1]
        if self.gtype.name == "f32":
            return self.shape, np.dtype(np.float32), rows * cols * 4, None
        if self.gtype.name == "f16":
            return self.shape, np.dtype(np.float16), rows * cols * 2, None
        block, size = gguf.GGML_QUANT_SIZES[self.gtype.qtype]
        if cols % block:
            raise UnsupportedError(f"{self.source}: {cols} inputs per row do not split into {self.gtype.name} "
                                   f"blocks of {block}; use --type f16")
        byte_shape = (*self.shape[:-1], cols // block * size)
        return byte_shape, np.dtype(np.uint8), rows * (cols // block) * size, self.gtype.qtype


def tensor_plan(job: ExportJob, arch: ArchSpec, hp: HParams, gtype: GGUFType, quantize_embeddings: bool) -> list[TensorSpec]:
    """Every tensor of the output file, in the base's order (shapes only; nothing is read)."""
    tmap = gguf.get_tensor_name_map(arch.gguf_arch, hp.n_layers)
    embed_type = gtype if quantize_embeddings and gtype.quantized else (
        GGUF_TYPES["f32"] if gtype.name == "f32" else GGUF_TYPES["f16"])
    specs, names = [], job.base.names()
    if (_rope_scaling(job.base.config) or ("default",))[0] == "llama3":  # llama3: factors as a tensor
        specs.append(TensorSpec(ROPE_FREQS, "", (hp.head_dim // 2,), GGUF_TYPES["f32"], "rope_freqs", None))
    if longrope(job.base.config) is not None:  # Phi-3's LongRoPE: short and long factors (gguf_longrope)
        specs += [TensorSpec(name, "", (rotary_dim(job.base.config) // 2,), GGUF_TYPES["f32"], "rope_freqs", None)
                  for name in (LONG, SHORT)]
    if not hp.tied and "lm_head.weight" not in names:
        raise BadInputError(f"{job.base.path}: config says untied embeddings but there is no lm_head.weight")
    for source in names:
        if source.endswith(BUFFERS) or (hp.tied and source == "lm_head.weight"):
            continue
        name = tmap.get_name(source, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UnsupportedError(f"{source}: no llama.cpp tensor for it in arch {arch.name}")
        shape = tuple(job.base.shape(source))
        if len(shape) == 1:
            role, t = "norm", GGUF_TYPES["f32"]
        elif name in ROLE_EMBED:
            role, t = "embed", embed_type
        elif DECODER_LINEAR.match(source):
            role, t = "linear", gtype
        else:
            raise UnsupportedError(f"{source}: a 2-D tensor that is neither an embedding nor a decoder Linear")
        specs.append(TensorSpec(name, source, shape, t, role, permute_heads(name, arch, hp)))
    return specs


def default_type(job: ExportJob) -> GGUFType:
    """q4_1/q5_1 for QA-BLoRA on a min-max grid of 4/5 bits whose blocks split into 32-runs, else f16."""
    grid = job.ckpt.base_quant
    if (job.ckpt.method == "qa-blora" and isinstance(grid, MinMaxGrid) and grid.bits in MIN_TYPE_FOR_BITS
            and grid.block_in % QK == 0):
        return MIN_TYPE_FOR_BITS[grid.bits]
    return GGUF_TYPES["f16"]


def fold_problems(job: ExportJob, gtype: GGUFType, base_only: bool) -> list[str]:
    """Why the checkpoint's own codes cannot be written as ``gtype`` (empty: they can)."""
    if not gtype.has_min:
        return [f"{gtype.name} has no block offset m to fold into"]
    return fold_obstacles(job.ckpt.method, job.ckpt.base_quant, job.plan.merge_into, job.ckpt.lambdas.values(),
                          gguf_grid(gtype.bits), base_only)


def choose_encoding(job: ExportJob, gtype: GGUFType, requantize: bool, base_only: bool) -> tuple[str, str]:
    """``(encoding, explanation)`` for the decoder Linears; refuses a QA-BLoRA fold that cannot be exact."""
    if not gtype.quantized:
        return "float", f"trained base + ΔW from float64, correctly rounded to {gtype.name}"
    problems = fold_problems(job, gtype, base_only)
    if not problems:
        what = "the trained base's" if base_only else "the checkpoint's"
        return "fold", (f"{what} own codes and fp16 α written untouched as {gtype.name} qs/d"
                        + ("" if base_only else "; β' = β + s·H/λi rounded once to fp16 as m (no re-quantization)"))
    if job.ckpt.method == "qa-blora" and gtype.has_min and not requantize and not base_only:
        raise UnsupportedError(fold_refusal(gguf_grid(gtype.bits), problems, job.ckpt.lambdas.values(),
                                            "or pass --requantize (merge, then re-quantize: PTQ, error reported) "
                                            "or --type f16"))
    return "requantize", (f"merge-then-quantize with gguf.quants to {gtype.name} (post-training quantization: "
                          f"adds error, see ptq_error; {problems[0]})")


@dataclass
class EncodeContext:
    """What encoding needs besides the tensor: the job, the choices and the running error stats."""

    job: ExportJob
    encoding: str
    base_only: bool
    ptq: PtqError
    embed_ptq: PtqError


def _rows(x: torch.Tensor, heads: Optional[int]) -> torch.Tensor:
    return x if heads is None else x[permutation(x.shape[0], heads)]


def encode_tensor(spec: TensorSpec, ctx: EncodeContext) -> np.ndarray:
    """The bytes (or float array) of one tensor; reads one base tensor."""
    if spec.role == "rope_freqs":
        rope = longrope(ctx.job.base.config)
        return llama3_rope_factors(ctx.job.base.config) if rope is None else rope.factors(spec.name)
    job, weight = ctx.job, ctx.job.base.tensor(spec.source)
    if spec.role == "norm":  # llama.cpp computes x·w: a family's offset (Gemma: x·(1+w)) is stored, in float32
        offset = family(job.base.model_type).norm_offset
        return np.ascontiguousarray(_rows(weight.to(torch.float32) + offset if offset else weight.to(torch.float32),
                                          spec.heads).numpy())
    if spec.role == "embed":
        data = quantize(weight, spec.gtype)
        if spec.gtype.quantized:
            ctx.embed_ptq.add(dequantize(data, spec.gtype.qtype).reshape(weight.shape), weight, spec.name)
        return data
    module = None if ctx.base_only else job.ckpt.module_for_weight(spec.source)
    if ctx.encoding == "fold":
        qw = quantize_minmax(weight, job.ckpt.base_quant, spec.source)
        if module is not None:
            qw = fold_into_zero_points(qw, module)
        alpha, beta = to_row_blocks(qw, QK)
        return pack_rows(_rows(qw.codes, spec.heads), _rows(alpha, spec.heads), _rows(beta, spec.heads),
                         spec.gtype.qtype)
    if not spec.gtype.quantized:  # correctly rounded (in row chunks: no whole float64 tensor)
        dtype = spec.gtype.float_dtype
        rounded = (trained_base_weight(spec.source, weight, job.plan).to(dtype) if module is None
                   else merged_weight(spec.source, weight, job.ckpt, job.plan, dtype))
        return encode_float(_rows(rounded, spec.heads), spec.gtype)
    if module is not None:
        exact = exact_merged_weight(spec.source, weight, job.ckpt, job.plan)
    else:
        exact = trained_base_weight(spec.source, weight, job.plan).to(torch.float64)
    exact = _rows(exact, spec.heads)
    data = quantize(exact, spec.gtype)
    if spec.gtype.quantized:
        ctx.ptq.add(dequantize(data, spec.gtype.qtype).reshape(exact.shape), exact, spec.name)
    return data
