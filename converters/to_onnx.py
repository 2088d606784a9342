"""ONNX decoder with KV cache for onnxruntime (and onnxruntime-genai), float, int4 or int8.

Route: the graph is written directly with ``onnx.helper`` (:mod:`converters.onnx_graph`),
weights come from :mod:`converters.onnx_weights`. IR version 10, opset 21 plus
``com.microsoft`` (MatMulNBits). ``OUT_DIR`` holds ``model.onnx`` (+ ``model.onnx.data`` above
256 MB of weights), ``genai_config.json``, the tokenizer files and ``blora_export.json``.

Precisions (activations and KV cache are float32 in all three, which every CPU build runs):

* ``fp32``: merged weights, each the correctly rounded ``trained_base + ΔW``;
* ``fp16``: the same rounded to float16 (embeddings and head too; norms float32), cast to
  float32 when the session loads;
* ``int4`` / ``int8``: ``MatMulNBits`` (bits 4 / 8) on blocks of ``--block-size`` inputs. A
  QA-BLoRA checkpoint on a min-max grid of the same width exports its own codes and scales
  exactly (the update folded into the offsets) when the block divides the grid's block and λi;
  otherwise the export refuses, or with ``--requantize`` merges and re-quantizes (min-max RTN)
  and reports the added error. Q-BLoRA has no exact low-bit form: it is always merge-then-quantize.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from blora_export.base import DECODER_LINEAR, read_json
from blora_export.emulate import Arithmetic, Rule
from blora_export.errors import BadInputError, UnsupportedError
from blora_export.families import family
from blora_export.fold import fold_obstacles, fold_refusal, onnx_grid
from blora_export.hf_folder import PROVENANCE_FILE, provenance
from blora_export.io import atomic_dir
from blora_export.job import Artifact, ExportJob, ExportResult, LayerCheck
from blora_export.numerics import logit_stats
from blora_export.quant import quantize_minmax
from blora_export.reference import DEFAULT_PROMPTS, load_hf_model, model_logits, tokenize_prompts, trained_base_fn
from blora_export.stream import Stream
from blora_export.tolerance import Tolerance, floor_tolerance, tolerance_for_dtype

from .onnx_graph import IR_VERSION, OPSET, DecoderSpec, build_decoder
from .onnx_weights import (
    LOWBIT_PRECISIONS,
    FloatWeights,
    QuantWeights,
    TensorStore,
    dequantized_codes,
    requant_grid,
    weight_checks,
    zero_point,
)

log = logging.getLogger(__name__)
NAME = "onnx"
DESCRIPTION = "ONNX decoder with KV cache for onnxruntime / onnxruntime-genai (fp32, fp16, int4/int8 MatMulNBits)"
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
GENAI_CONFIG = "genai_config.json"
# Below this the initializers go inline (one self-contained model.onnx). Above it they stay in
# model.onnx.data: inlining means holding them all in the ModelProto and again in its serialized
# bytes (a 1.1B int4 export peaked at 5.3 GB that way; protobuf's own limit is 2 GB).
INLINE_LIMIT = 256 * 1024**2
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, **{p: None for p in LOWBIT_PRECISIONS}}
BLOCK_SIZES = (16, 32, 64, 128)
DEFAULT_BLOCKS = (32, 16)  # a block that folds 64 or 128 also folds 32; 16 serves λi = 16
ACCURACY_LEVELS = (0, 4)
DECODE_BOUND = 1e-5  # float32 activations: cached K/V are the same numbers, only op order differs

INT4_TOLERANCES = {
    ("exact", 0): Tolerance(
        max_rel=1e-5, min_top1=0.97,
        basis="int4 exact: the checkpoint's codes and scales, offsets β+ΔW+8α in float32 (half an ulp), "
              "float32 activations: float32 operation-order noise only (measured ~1e-6 on the samples)"),
    ("exact", 4): Tolerance(
        max_rel=0.1, min_top1=0.85,
        basis="int4 exact weights, accuracy_level 4 (MatMulNBits quantizes activations to int8): measured "
              "3-6% relative, top-1 0.94-0.99 on tiny llama/mistral/qwen2 and a hidden-512 model; bound 10%"),
}
INT8_TOLERANCES = {
    ("exact", 0): Tolerance(
        max_rel=1e-5, min_top1=0.97,
        basis="int8 exact: the checkpoint's codes and scales, offsets β+ΔW+128α in float32 (half an ulp), "
              "float32 activations: float32 operation-order noise only (the same bound as int4)"),
    ("exact", 4): Tolerance(
        max_rel=0.1, min_top1=0.85,
        basis="int8 exact weights, accuracy_level 4 (MatMulNBits quantizes activations to int8): measured "
              "4.8% relative, top-1 0.98 on the tiny llama sample on an 8-bit grid (int4 there: 4.9%); bound 10%"),
}
TOLERANCES = {"int4": INT4_TOLERANCES, "int8": INT8_TOLERANCES}
# requantized files, and accuracy_level 4: FLOOR_FACTOR x a floor measured at verify time (lowbit_floor)


def check_options(precision: str, block_size, accuracy_level: int, requantize: bool) -> None:
    if precision not in PRECISIONS:
        raise UnsupportedError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision not in LOWBIT_PRECISIONS and (block_size is not None or accuracy_level or requantize):
        raise UnsupportedError("--block-size, --accuracy-level and --requantize apply to --precision "
                               f"{' / '.join(LOWBIT_PRECISIONS)} only")
    if block_size is not None and block_size not in BLOCK_SIZES:
        raise UnsupportedError(f"--block-size must be one of {BLOCK_SIZES}, got {block_size}")
    if accuracy_level not in ACCURACY_LEVELS:
        raise UnsupportedError(f"--accuracy-level must be one of {ACCURACY_LEVELS}, got {accuracy_level}")


def exact_problems(job: ExportJob, block: int, bits: int) -> list[str]:
    """Why the checkpoint's own codes cannot be exported exactly as ``bits``-bit codes on runtime blocks of ``block``."""
    return fold_obstacles(job.ckpt.method, job.plan.base_quant, job.plan.merge_into, job.ckpt.lambdas.values(),
                          onnx_grid(block, bits))


def lowbit_weights(job: ExportJob, precision: str, block_size, accuracy_level: int, requantize: bool) -> QuantWeights:
    """Exact when the checkpoint folds into the block; re-quantized when asked; else refuse."""
    bits = LOWBIT_PRECISIONS[precision]
    candidates = (block_size,) if block_size is not None else DEFAULT_BLOCKS
    problems = {}
    for block in candidates:
        problems[block] = exact_problems(job, block, bits)
        if not problems[block]:
            return QuantWeights(job, block, accuracy_level, requantize=False, bits=bits)
    block = candidates[0]
    if requantize:
        log.warning("%s: %s; merging and re-quantizing (min-max RTN, block %d)", precision,
                    "; ".join(problems[block]), block)
        return QuantWeights(job, block, accuracy_level, requantize=True, bits=bits)
    raise UnsupportedError(fold_refusal(onnx_grid(block, bits), problems[block], job.ckpt.lambdas.values(),
                                        "pass --requantize to merge and re-quantize (min-max RTN, reports the "
                                        "added error) or use --precision fp16"))


def onnx_session(model_path: Path, shown: Path | None = None, load_only: bool = False):
    """A CPU onnxruntime session (this is also how an export is validated); errors name ``shown``
    (the export's real output path, not the temporary folder it is written in).

    ``load_only``: the export's validation, which only needs onnxruntime to accept the file: no
    graph optimizations and no weight prepacking (which copies every int4 weight into a second,
    prepacked buffer).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if load_only:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.add_session_config_entry("session.disable_prepacking", "1")
    try:
        return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise BadInputError(f"onnxruntime cannot load {shown or model_path}: {exc}") from None


def run_decoder(session, decoder: dict, ids, past: list | None = None) -> tuple[np.ndarray, list]:
    """Logits ``[len(ids), vocab]`` for ``ids`` after ``past`` (one batch row), and the new KV cache."""
    layers, heads, size = decoder["num_hidden_layers"], decoder["num_key_value_heads"], decoder["head_size"]
    if past is None:
        past = [np.zeros((1, heads, 0, size), np.float32) for _ in range(2 * layers)]
    start = past[0].shape[2]
    feeds = {"input_ids": np.asarray([list(ids)], np.int64),
             "attention_mask": np.ones((1, start + len(ids)), np.int64),
             "position_ids": np.arange(start, start + len(ids), dtype=np.int64)[None]}
    for i in range(layers):
        feeds[f"past_key_values.{i}.key"], feeds[f"past_key_values.{i}.value"] = past[2 * i], past[2 * i + 1]
    names = ["logits"] + [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    outputs = session.run(names, feeds)
    return outputs[0][0].astype(np.float32), outputs[1:]


def prompt_logits(session, decoder: dict, ids) -> np.ndarray:
    """The whole prompt in one pass (empty KV cache)."""
    return run_decoder(session, decoder, ids)[0]


def decode_check(session, decoder: dict, prompt, bound: float, steps: int = 4) -> LayerCheck:
    """Prefill then ``steps`` single-token steps with the KV cache reproduce the one-pass logits."""
    full = prompt_logits(session, decoder, prompt)
    split = max(1, len(prompt) - steps)
    first, past = run_decoder(session, decoder, prompt[:split])
    parts = [first]
    for token in prompt[split:]:
        step, past = run_decoder(session, decoder, [token], past)
        parts.append(step)
    rel = float(np.abs(np.concatenate(parts) - full).max() / max(float(np.abs(full).max()), 1e-30))
    return LayerCheck("decoder", f"KV-cache decode vs one pass, {len(prompt) - split} steps (rel)", rel, bound)


def dequantized_check(job: ExportJob, model_path: Path, precision: str, info: dict, session, decoder: dict, prompt,
                      bound: float) -> LayerCheck:
    """onnxruntime against transformers running the file's own int4/int8 weights, dequantized (float64 → float32)."""
    model = load_hf_model(job.base.path, torch.float32)
    try:
        with torch.no_grad():
            for name, weight in dequantized_codes(job, model_path, info["block_size"], LOWBIT_PRECISIONS[precision]):
                model.get_parameter(name).copy_(weight.to(torch.float32))
        expected = model_logits(model, [prompt])[0].numpy()
    finally:
        del model
    got = prompt_logits(session, decoder, prompt)
    rel = float(np.abs(got - expected).max() / max(float(np.abs(expected).max()), 1e-30))
    return LayerCheck("decoder", f"logits vs the file's {precision} weights dequantized in transformers (rel)", rel, bound)


def genai_config(job: ExportJob, spec: DecoderSpec) -> dict:
    """``genai_config.json`` for onnxruntime-genai (names as in its model builder)."""
    config = dict(job.base.config)
    gen_file = job.base.path / "generation_config.json"
    config.update({k: v for k, v in (read_json(gen_file) if gen_file.is_file() else {}).items()
                   if k in ("bos_token_id", "eos_token_id", "pad_token_id") and v is not None})
    eos = config.get("eos_token_id")
    if eos is None:
        raise BadInputError(f"{job.base.path}: no eos_token_id in config.json or generation_config.json")
    first_eos = eos[0] if isinstance(eos, list) else eos
    pad = config.get("pad_token_id")
    decoder = {"session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
               "filename": MODEL_FILE, "head_size": spec.head_dim, "hidden_size": spec.hidden,
               "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                          "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
               "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                           "present_value_names": "present.%d.value"},
               "num_attention_heads": spec.heads, "num_hidden_layers": spec.num_layers,
               "num_key_value_heads": spec.kv_heads}
    model = {"bos_token_id": config.get("bos_token_id", 1), "context_length": spec.context_length,
             "decoder": decoder, "eos_token_id": eos, "pad_token_id": first_eos if pad is None else pad,
             "type": family(spec.model_type).genai_type, "vocab_size": spec.vocab}
    search = {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
              "max_length": spec.context_length, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
              "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
              "temperature": 1.0, "top_k": 1, "top_p": 1.0}
    return {"model": model, "search": search}


def export(job: ExportJob, out: Path, precision: str = "fp32", block_size=None, accuracy_level: int = 0,
           requantize: bool = False) -> ExportResult:
    check_options(precision, block_size, accuracy_level, requantize)
    start = time.perf_counter()
    spec = DecoderSpec.from_config(job.base.config, job.base.path)
    if precision in LOWBIT_PRECISIONS:
        weights = lowbit_weights(job, precision, block_size, accuracy_level, requantize)
    else:
        weights = FloatWeights(job, PRECISIONS[precision])
    with atomic_dir(out) as tmp:
        store = TensorStore(tmp, DATA_FILE)
        try:
            model = build_decoder(spec, weights, store, job.progress)
        finally:
            external = store.finish(INLINE_LIMIT)
        model.graph.initializer.extend(store.protos)
        (tmp / MODEL_FILE).write_bytes(model.SerializeToString())
        onnx_session(tmp / MODEL_FILE, Path(out) / MODEL_FILE, load_only=True)  # validation: onnxruntime must load it
        (tmp / GENAI_CONFIG).write_text(json.dumps(genai_config(job, spec), indent=2) + "\n")
        for file in job.base.tokenizer_files():
            shutil.copy2(file, tmp / file.name)
        details = export_details(job, precision, weights, external, store.nbytes)
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance(job, details), indent=2) + "\n")
    return ExportResult(format=NAME, path=Path(out), seconds=time.perf_counter() - start, details=details)


def export_details(job: ExportJob, precision: str, weights, external: bool, nbytes: int) -> dict:
    details = {"format": NAME, "precision": precision, "ir_version": IR_VERSION, "opset": OPSET,
               "external_data": external, "initializer_bytes": nbytes, "activations": "float32",
               "route": "graph written with onnx.helper (converters/onnx_graph.py)"}
    if isinstance(weights, QuantWeights):
        z = zero_point(weights.bits)
        info = details[precision] = {
            "mode": "requantized" if weights.requantize else "exact", "block_size": weights.block,
            "accuracy_level": weights.accuracy_level, "bits": weights.bits,
            "encoding": f"MatMulNBits(X, q, alpha) + ReduceSum_blocks(X) @ (beta + {z} alpha)"}
        if weights.requantize:
            what = "Q-BLoRA: merge-then-quantize" if job.ckpt.method == "q-blora" else "merged then re-quantized"
            info["note"] = f"{what} (min-max RTN, {weights.bits}-bit, block {weights.block}): not the trained codes"
            details["ptq_error"] = weights.ptq.to_json()
        else:
            info["note"] = "the checkpoint's own codes and scales; QA-BLoRA update folded into offsets"
    return details


def detect(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / MODEL_FILE).is_file()


def lowbit_info(meta: dict) -> tuple[str, dict] | None:
    """``(precision, its block: mode, block_size, accuracy_level)`` of an int4/int8 file; None for a float one."""
    precision = meta.get("precision")
    return (precision, meta[precision]) if precision in LOWBIT_PRECISIONS else None


def artifact_tolerance(meta: dict) -> Tolerance:
    low = lowbit_info(meta)
    if low:
        table = TOLERANCES[low[0]]
        return table.get((low[1]["mode"], low[1]["accuracy_level"]), table[("exact", 0)])
    return tolerance_for_dtype(PRECISIONS.get(meta.get("precision")) or torch.float32)


LOWBIT_META = {"mode": ("exact", "requantized"), "accuracy_level": ACCURACY_LEVELS, "block_size": BLOCK_SIZES}


def lowbit_floor(job: ExportJob, precision: str, info: dict):
    """(stream, bound) for an int4/int8 file whose bound is measured: the base as trained WITHOUT the adapter,
    re-quantized by the same min-max RTN when the file was (``requantized``), with MatMulNBits' int8
    activation blocks when ``accuracy_level`` is 4. None: the exact file at level 0 (table bound)."""
    requantized, level, block = info["mode"] == "requantized", info["accuracy_level"], info["block_size"]
    if not requantized and level == 0:
        return None
    bits = LOWBIT_PRECISIONS[precision]
    base = trained_base_fn(job.plan)

    def weights(name: str, cache) -> torch.Tensor:
        w = base(name, cache)
        if requantized and DECODER_LINEAR.match(name):
            return quantize_minmax(w, requant_grid(block, bits), name).dequantize()
        return w
    linears = {n[: -len(".weight")]: Rule("int8", block, scale_dtype=None) for n in job.base.linear_names()}
    stream = Stream("onnx floor", weights, Arithmetic(linears).hooks if level == 4 else None)
    what = " and ".join(w for w, on in ((f"the same {bits}-bit min-max re-quantization (PTQ)", requantized),
                                        ("MatMulNBits' int8 activations (emulated)", level == 4)) if on)

    def bound(out: dict) -> Tolerance:
        return floor_tolerance(logit_stats(out["without"], out["onnx floor"]), what,
                               TOLERANCES[precision][("exact", 0)])
    return stream, bound


def read_meta(path: Path) -> dict:
    """The export's provenance (``blora_export.json``): how the folder was written, checked."""
    file = path / PROVENANCE_FILE
    if not file.is_file():
        raise BadInputError(f"{path} has no {PROVENANCE_FILE}: verify needs to know how blora-export wrote it")
    meta = read_json(file)
    if meta.get("precision") not in PRECISIONS:
        raise BadInputError(f"{file}: precision must be one of {', '.join(PRECISIONS)}, got {meta.get('precision')!r}")
    precision = meta["precision"]
    if precision in LOWBIT_PRECISIONS:
        info = meta.get(precision)
        if not isinstance(info, dict):
            raise BadInputError(f"{file}: precision {precision} but no {precision!r} block (mode, block_size, "
                                "accuracy_level)")
        bad = [f"{k} {info.get(k)!r} (expected one of {', '.join(map(str, allowed))})"
               for k, allowed in LOWBIT_META.items() if info.get(k) not in allowed or isinstance(info.get(k), bool)]
        if bad:
            raise BadInputError(f"{file}: the {precision!r} block has {'; '.join(bad)}")
    return meta


def read_decoder(path: Path) -> dict:
    """The decoder section of ``genai_config.json`` (input and output names the session is run with)."""
    file = path / GENAI_CONFIG
    if not file.is_file():
        raise BadInputError(f"{path} has no {GENAI_CONFIG}: verify runs the decoder with the names it gives "
                            "(re-export the folder)")
    model = read_json(file).get("model")
    decoder = model.get("decoder") if isinstance(model, dict) else None
    if not isinstance(decoder, dict) or not all(isinstance(decoder.get(k), dict) for k in ("inputs", "outputs")):
        raise BadInputError(f"{file}: no model.decoder with inputs and outputs")
    for key in ("num_hidden_layers", "num_key_value_heads", "head_size"):
        if not isinstance(decoder.get(key), int) or isinstance(decoder.get(key), bool) or decoder[key] < 1:
            raise BadInputError(f"{file}: model.decoder.{key} must be a whole number >= 1, got {decoder.get(key)!r}")
    return decoder


def open_artifact(path: Path, job: ExportJob, runtime: str | None = None) -> Artifact:
    if runtime not in (None, "onnxruntime"):
        raise UnsupportedError(f"an ONNX folder runs in onnxruntime, not {runtime!r}")
    path = Path(path)
    meta = read_meta(path)
    genai = read_decoder(path)
    session = onnx_session(path / MODEL_FILE)
    tolerance = artifact_tolerance(meta)
    low = lowbit_info(meta)
    precision, info = low if low else (meta.get("precision"), {})
    decode_bound = DECODE_BOUND if info.get("accuracy_level", 0) == 0 else tolerance.max_rel

    def logits(prompts):
        return [torch.from_numpy(prompt_logits(session, genai, ids)) for ids in prompts]

    def layer_checks() -> list[LayerCheck]:
        prompt = tokenize_prompts(job.base, DEFAULT_PROMPTS[:1])[0]
        checks = weight_checks(job, path / MODEL_FILE, meta) + [decode_check(session, genai, prompt, decode_bound)]
        if info:
            checks.append(dequantized_check(job, path / MODEL_FILE, precision, info, session, genai, prompt,
                                            decode_bound))
        return checks

    notes = tuple(n for n in (info.get("note"),) if n)
    floor = lowbit_floor(job, precision, info) if info else None
    return Artifact(format=NAME, path=path, description=f"ONNX decoder, {precision} weights"
                    + (f" ({info['mode']}, block {info['block_size']}, accuracy_level {info['accuracy_level']})"
                       if info else ""), tolerance=tolerance, logits=logits, layer_checks=layer_checks, notes=notes,
                    weight_dtype=None if info else PRECISIONS.get(precision),
                    streams=() if floor is None else (floor[0],), bound=None if floor is None else floor[1])
