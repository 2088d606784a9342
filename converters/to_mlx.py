"""Low-bit mlx-lm folder: MLX affine quantization (packed uint32 codes, scales, biases).

MLX stores each quantized Linear as ``weight`` uint32 ``[out, in*bits/32]`` (codes packed
least-significant bit first, as one bit stream per row), ``scales`` and ``biases``
``[out, in/G]`` and dequantizes ``w = scales*q + biases`` on groups of ``G`` inputs. That is
the paper's min-max block with β stored as is, so a QA-BLoRA checkpoint on a min-max grid
exports its own codes and α untouched and the folded ``β' = β + s*H/λi`` (docs/MATH.md), when
``G`` divides the grid's block and λi. The only loss is rounding β' to the biases' dtype.

Anything else (Q-BLoRA, other grids, other bits or groups, ``--merge-into original``) is a
merge followed by min-max quantization on the ``1 x G`` grid: post-training quantization,
only with ``--requantize``, its error reported. Embeddings, norms and the output head stay in
the base's float dtype (mlx-lm quantizes exactly the modules that have ``scales``).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from blora_export.base import TensorFolder, read_json
from blora_export.delta import delta_weight
from blora_export.emulate import mlx_embedding_floor, mlx_embedding_hooks
from blora_export.errors import BadInputError, UnsupportedError
from blora_export.families import attention_window
from blora_export.fold import fold_obstacles, fold_refusal, mlx_grid
from blora_export.hf_folder import PROVENANCE_FILE, provenance, rope_overrides, write_hf_config, write_shards
from blora_export.io import atomic_dir
from blora_export.job import Artifact, ExportJob, ExportResult, LayerCheck
from blora_export.merge import exact_merged_weight, is_quantized_linear, merged_weight
from blora_export.numerics import HALF_ULP_LIMIT, half_ulp_ratio, logit_stats, round_to
from blora_export.ptq import PtqError
from blora_export.quant import (
    QuantizedWeight,
    expand_blocks,
    quantize_minmax,
    row_chunks,
    to_row_blocks,
    trained_beta,
)
from blora_export.reference import trained_base_fn
from blora_export.spec import MinMaxGrid
from blora_export.stream import Stream
from blora_export.tensor_io import one_thread
from blora_export.tolerance import UNIT_ROUNDOFF, Tolerance, floor_tolerance, tolerance_for_dtype

log = logging.getLogger(__name__)
NAME = "mlx"
DESCRIPTION = "mlx-lm folder, MLX affine low-bit (packed uint32 codes, scales, biases)"
MODE = "affine"
GROUP_SIZES = (128, 64, 32)  # largest first: the default is the largest that folds exactly
BITS = (2, 3, 4, 5, 6, 8)
SCALE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
DEFAULT_BITS, DEFAULT_GROUP = 4, 32
MAX_SHARD_BYTES = 2 * 1024**3
BIAS_TRADE = {
    "float32": "float32 scales/biases: β' kept to float32 (the fold at mlx-lm's own noise, ~2.9e-3 max|Δlogit| "
               "on the sample); 8 bytes per group instead of 4 (+25% over float16 at 4 bits, groups of 32)",
    "float16": "float16 scales/biases: exact for a checkpoint trained fold-aware with float16 β', otherwise each "
               "folded β' is rounded once more (~6x the logit error of float32 biases); 4 bytes per group",
}
ROUTES = {
    "fold": "QA-BLoRA folded into the zero-points: the checkpoint's own codes and scales, biases = β + s·H/λi",
    "requantize": "merged (trained base + ΔW) then min-max quantized on 1xG groups (post-training quantization)",
}


@dataclass(frozen=True)
class MlxPlan:
    """How the Linears are written: bits, group size, storage of scales/biases, and the route."""

    bits: int
    group_size: int
    scale_dtype: str
    route: str  # a key of ROUTES
    reason: str

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    def target_grid(self) -> MinMaxGrid:
        return MinMaxGrid(bits=self.bits, block_out=1, block_in=self.group_size, param_dtype=self.scale_dtype)

    def quantization(self) -> dict:
        return {"group_size": self.group_size, "bits": self.bits, "mode": MODE}


# ---------------------------------------------------------------- packing

def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[out, in]`` -> uint32 ``[out, in*bits/32]``: each row one LSB-first bit stream.

    Widths that divide 32 put ``32/bits`` whole codes in each word (``Σ q[k] << bits·k``); the
    others go through bit planes, a few rows at a time.
    """
    out_f, in_f = codes.shape
    if (in_f * bits) % 32:
        raise UnsupportedError(f"a row of {in_f} {bits}-bit codes does not fill whole 32-bit words")
    c = codes.numpy()
    words = np.empty((out_f, in_f * bits // 32), dtype="<u4")
    for r0, r1 in row_chunks(tuple(codes.shape)):
        words[r0:r1] = _pack_rows(c[r0:r1], bits)
    return torch.from_numpy(words)


def _pack_rows(c: np.ndarray, bits: int) -> np.ndarray:
    rows, in_f = c.shape
    if 32 % bits == 0:
        per = 32 // bits
        shifts = (np.arange(per, dtype=np.uint32) * bits).reshape(1, 1, per)
        return np.bitwise_or.reduce(c.reshape(rows, in_f // per, per).astype(np.uint32) << shifts, axis=2)
    bit_planes = np.unpackbits(c.astype(np.uint8).reshape(rows, in_f, 1), axis=2, bitorder="little")[:, :, :bits]
    packed = np.packbits(bit_planes.reshape(rows, in_f * bits), axis=1, bitorder="little")
    return np.ascontiguousarray(packed).view("<u4")


def unpack_codes(words: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of :func:`pack_codes`: uint32 ``[out, in*bits/32]`` -> uint8 ``[out, in]``."""
    w = np.ascontiguousarray(words.numpy().astype("<u4"))
    out_f = w.shape[0]
    stream = np.unpackbits(w.view(np.uint8), axis=1, bitorder="little")
    planes = stream.reshape(out_f, -1, bits).astype(np.uint16)
    return torch.from_numpy((planes << np.arange(bits, dtype=np.uint16)).sum(axis=2).astype(np.uint8))


# ---------------------------------------------------------------- planning

def _grid_defaults(job: ExportJob) -> tuple[int, int]:
    """Bits of the checkpoint's grid, and the largest group size that folds exactly (else 4 / 32)."""
    grid = job.ckpt.base_quant
    if not isinstance(grid, MinMaxGrid) or grid.bits not in BITS:
        return DEFAULT_BITS, DEFAULT_GROUP
    for t in GROUP_SIZES:
        if not fold_obstacles(job.ckpt.method, grid, "dequantized", job.ckpt.lambdas.values(), mlx_grid(grid.bits, t)):
            return grid.bits, t
    return grid.bits, DEFAULT_GROUP


def mlx_fold_obstacles(job: ExportJob, bits: int, group_size: int, scale_dtype: str) -> list[str]:
    """Why this checkpoint cannot export its own codes with these settings (empty when it can)."""
    return fold_obstacles(job.ckpt.method, job.ckpt.base_quant, job.plan.merge_into, job.ckpt.lambdas.values(),
                          mlx_grid(bits, group_size, scale_dtype))


def resolve_plan(job: ExportJob, bits: Optional[int], group_size: Optional[int], bias_dtype: str,
                 requantize: bool) -> MlxPlan:
    """Check the options and decide the route; refuse a lossy route unless ``requantize``."""
    if bias_dtype not in SCALE_DTYPES:
        raise UnsupportedError(f"--bias-dtype must be one of {', '.join(SCALE_DTYPES)}, got {bias_dtype!r}")
    default_bits, default_group = _grid_defaults(job)
    bits = default_bits if bits is None else int(bits)
    group_size = default_group if group_size is None else int(group_size)
    if bits not in BITS or group_size not in GROUP_SIZES:
        raise UnsupportedError(f"MLX affine takes bits {BITS} and group sizes {sorted(GROUP_SIZES)}; "
                               f"got bits={bits}, group_size={group_size}")
    problems = mlx_fold_obstacles(job, bits, group_size, bias_dtype)
    if not problems:
        return MlxPlan(bits, group_size, bias_dtype, "fold", "exact: codes kept, offsets folded")
    if not requantize:
        raise UnsupportedError(fold_refusal(mlx_grid(bits, group_size, bias_dtype), problems, job.ckpt.lambdas.values(),
                                            "pass --requantize to merge and re-quantize (PTQ, error reported), "
                                            "or export 16-bit with --layout hf"))
    log.warning("MLX export re-quantizes (post-training quantization): %s", "; ".join(problems))
    return MlxPlan(bits, group_size, bias_dtype, "requantize", "; ".join(problems))


# ---------------------------------------------------------------- weights

def folded_weight(job: ExportJob, name: str, weight: torch.Tensor, mplan: MlxPlan) -> QuantizedWeight:
    """The checkpoint's own quantization of ``name``, offsets folded (rounded once to the biases' dtype)."""
    qw = quantize_minmax(weight, job.ckpt.base_quant, name)
    module = job.ckpt.module_for_weight(name)
    if module is None:
        return qw
    grid = replace(qw.grid, param_dtype=mplan.scale_dtype)
    beta = round_to(trained_beta(qw, module, job.ckpt.folded_forward), grid.torch_dtype)
    return replace(qw, grid=grid, beta=beta)


def requantized_weight(job: ExportJob, name: str, weight: torch.Tensor, mplan: MlxPlan) -> QuantizedWeight:
    """Min-max on ``1 x G`` groups of the exact merge ``trained_base(W) + ΔW`` (float64 -> float32)."""
    exact = exact_merged_weight(name, weight, job.ckpt, job.plan)
    return quantize_minmax(exact.to(torch.float32), mplan.target_grid(), name)


def expected_weight(job: ExportJob, name: str, weight: torch.Tensor, mplan: MlxPlan) -> QuantizedWeight:
    if mplan.route == "fold":
        return folded_weight(job, name, weight, mplan)
    return requantized_weight(job, name, weight, mplan)


def row_params(qw: QuantizedWeight, mplan: MlxPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and biases ``[out, in/G]`` in the storage dtype (α is exact in it: checked in planning)."""
    alpha, beta = to_row_blocks(qw, mplan.group_size)
    return alpha.to(mplan.torch_scale_dtype), beta.to(mplan.torch_scale_dtype)


def mlx_tensors(job: ExportJob, mplan: MlxPlan, ptq: PtqError) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the MLX folder in base-file order, one base tensor at a time."""
    for name in job.base.names():
        weight = job.base.tensor(name)
        if is_quantized_linear(name):
            with one_thread():
                qw = expected_weight(job, name, weight, mplan)
            if mplan.route == "requantize":
                ptq.add(qw.dequantize(), exact_merged_weight(name, weight, job.ckpt, job.plan), name)
            scales, biases = row_params(qw, mplan)
            stem = name[: -len(".weight")]
            yield name, pack_codes(qw.codes, mplan.bits)
            yield stem + ".scales", scales
            yield stem + ".biases", biases
        elif job.ckpt.module_for_weight(name) is not None:
            yield name, merged_weight(name, weight, job.ckpt, job.plan, weight.dtype)
        else:
            yield name, weight


def mlx_config_extra(job: ExportJob, mplan: MlxPlan) -> dict:
    """``quantization`` (and mlx-lm's mirror ``quantization_config``) plus the rope keys."""
    return {"quantization": mplan.quantization(), "quantization_config": mplan.quantization(),
            **rope_overrides(job.base.config)}


def check_window(job: ExportJob) -> None:
    """mlx-lm runs Mistral as llama without a window (and its llama needs one full-attention layer):
    a base whose one window is shorter than its context would run as a different model."""
    window = attention_window(job.base.config)
    if window is not None:
        raise UnsupportedError(
            f"{job.base.model_type} attends within a sliding window of {window} tokens (max_position_embeddings "
            f"{job.base.config.get('max_position_embeddings')}) and mlx-lm's {job.base.model_type} has no window: "
            "export to ONNX (the window is in the graph) or GGUF (context capped at the window)")


def default_bias_dtype(job: ExportJob) -> str:
    """float32 biases unless the checkpoint trained fold-aware with float16 β' (then float16 is exact):
    float16 biases round each folded β' once more, which costs 6x mlx-lm's own noise on the logits
    (measured 1.8e-2 vs 2.9e-3 max|Δlogit| at 4 bits, groups of 32), for 4 bytes less per group."""
    grid = job.plan.base_quant
    if job.plan.folded and isinstance(grid, MinMaxGrid) and grid.param_dtype == "float16":
        return "float16"
    return "float32"


def export(job: ExportJob, out: Path, bits: Optional[int] = None, group_size: Optional[int] = None,
           bias_dtype: Optional[str] = None, requantize: bool = False) -> ExportResult:
    start = time.perf_counter()
    check_window(job)
    rope_overrides(job.base.config)  # refuses what mlx-lm's model of the family cannot compute, before writing
    if bias_dtype is None:
        bias_dtype = default_bias_dtype(job)
        log.info("MLX scales/biases: %s (%s)", bias_dtype, "exact: the checkpoint trained with float16 β'"
                 if bias_dtype == "float16" else "β' kept at the runtime's own noise; --bias-dtype float16 is "
                 "4 bytes smaller per group and rounds each folded β' to fp16")
    mplan = resolve_plan(job, bits, group_size, bias_dtype, requantize)
    ptq = PtqError()
    names = job.base.names()
    with atomic_dir(out) as tmp:
        total = len(names) + 2 * sum(1 for n in names if is_quantized_linear(n))  # + scales, biases
        stream = job.progress(mlx_tensors(job, mplan, ptq), desc="mlx", total=total, unit="tensor")
        weight_map = write_shards(stream, tmp, MAX_SHARD_BYTES)
        files = sorted(set(weight_map.values()))
        if len(files) > 1:
            total = sum((tmp / f).stat().st_size for f in files)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        dtype_name = str(job.base.tensor_dtype(names[0])).removeprefix("torch.")
        write_hf_config(job, tmp, dtype_name, mlx_config_extra(job, mplan))
        ptq_details = {"ptq_error": ptq.to_json()} if ptq.tensors else {}
        info = {"format": NAME, "route": mplan.route, "route_description": ROUTES[mplan.route],
                "reason": mplan.reason, "bias_dtype": mplan.scale_dtype, **mplan.quantization(), **ptq_details}
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance(job, info), indent=2) + "\n")
        size = sum((tmp / f).stat().st_size for f in files)
    details = {"route": ROUTES[mplan.route], "bits": mplan.bits, "group_size": mplan.group_size,
               "bias_dtype": mplan.scale_dtype, "bias_dtype_trade": BIAS_TRADE[mplan.scale_dtype],
               "bytes": size, "merge": job.plan.describe(), **ptq_details}
    return ExportResult(format=NAME, path=Path(out), seconds=time.perf_counter() - start, details=details)


# ---------------------------------------------------------------- verification

def detect(path: Path) -> bool:
    """An mlx-lm folder: ``config.json`` with an affine ``quantization`` and safetensors weights."""
    path = Path(path)
    config = path / "config.json"
    if not path.is_dir() or not config.is_file() or not any(path.glob("model*.safetensors")):
        return False
    try:
        quant = json.loads(config.read_text()).get("quantization")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(quant, dict) and quant.get("mode", MODE) == MODE


def artifact_plan(path: Path, job: ExportJob) -> MlxPlan:
    """Read bits, group size and scale dtype from the folder; the route follows from the checkpoint."""
    quant = read_json(Path(path) / "config.json")["quantization"]
    bad = [f"{key} {quant.get(key)!r}" for key in ("bits", "group_size")
           if not isinstance(quant.get(key), int) or isinstance(quant.get(key), bool)]
    if bad:
        raise BadInputError(f"{Path(path) / 'config.json'}: quantization has {', '.join(bad)}; bits and group_size "
                            "must be whole numbers (MLX affine: bits 2-8, group_size 32, 64 or 128)")
    files = TensorFolder.open(Path(path))
    first = next((n for n in job.base.linear_names() if files.get(n[: -len(".weight")] + ".scales") is not None), None)
    if first is None:
        raise BadInputError(f"{path} holds no quantized decoder Linear (no *.scales tensors)")
    scales = files.get(first[: -len(".weight")] + ".scales")
    dtype = {v: k for k, v in SCALE_DTYPES.items()}.get(scales.dtype)
    if dtype is None:
        raise UnsupportedError(f"{path}: scales are {scales.dtype}; this tool checks float16/float32 scales")
    return resolve_plan(job, int(quant["bits"]), int(quant["group_size"]), dtype, requantize=True)


def exact_biases(job: ExportJob, name: str, weight: torch.Tensor, mplan: MlxPlan) -> torch.Tensor:
    """Exact (float64) ``β'`` per group: the grid's β plus the mean of ΔW over the group."""
    qw = quantize_minmax(weight, job.ckpt.base_quant, name)
    beta = expand_blocks(qw.beta.double(), qw.grid)
    module = job.ckpt.module_for_weight(name)
    if module is not None and job.ckpt.folded_forward:
        beta = expand_blocks(trained_beta(qw, module, True), qw.grid)
    elif module is not None:
        beta = beta + delta_weight(module, torch.float64)
    return beta.unflatten(1, (-1, mplan.group_size)).mean(dim=2)


def _dequant_check(name: str, words, scales, biases, codes, mplan: MlxPlan) -> LayerCheck:
    """mlx's own ``dequantize`` of the stored tensors equals ``scales*q + biases`` (float32)."""
    import mlx.core as mx

    got = mx.dequantize(mx.array(words.numpy()), mx.array(scales.float().numpy()), mx.array(biases.float().numpy()),
                        group_size=mplan.group_size, bits=mplan.bits, mode=MODE)
    g = mplan.group_size
    ours = codes.float() * scales.float().repeat_interleave(g, 1) + biases.float().repeat_interleave(g, 1)
    return LayerCheck(name, "mlx.dequantize vs α·q+β (max abs)", float((torch.from_numpy(np.array(got)) - ours).abs().max()), 0.0)


def layer_checks(job: ExportJob, path: Path, mplan: MlxPlan) -> list[LayerCheck]:
    """Per quantized Linear: codes and scales as expected exactly; biases within half an ulp of exact β'
    (fold) or equal to min-max of the merge (re-quantized); the packing decodes identically in mlx."""
    files, checks = TensorFolder.open(Path(path)), []
    for name in job.progress(job.base.linear_names(), desc="check layers", unit="layer"):
        stem = name[: -len(".weight")]
        words, scales, biases = (files.get(name), files.get(stem + ".scales"), files.get(stem + ".biases"))
        if words is None or scales is None or biases is None or words.dtype != torch.uint32:
            checks.append(LayerCheck(name, "quantized (uint32 weight, scales, biases) in artifact", float("inf"), 0.0))
            continue
        weight = job.base.tensor(name)
        expected = expected_weight(job, name, weight, mplan)
        alpha, beta = row_params(expected, mplan)
        codes = unpack_codes(words, mplan.bits)
        same_shape = codes.shape == expected.codes.shape and scales.shape == alpha.shape
        mismatches = float((codes != expected.codes).sum()) if same_shape else float("inf")
        checks.append(LayerCheck(name, "codes differing from expected", mismatches, 0.0))
        scale_err = float((scales.double() - alpha.double()).abs().max()) if same_shape else float("inf")
        checks.append(LayerCheck(name, "|scales - α| (max)", scale_err, 0.0))
        if mplan.route == "fold":
            ratio = half_ulp_ratio(biases, exact_biases(job, name, weight, mplan)) if same_shape else float("inf")
            checks.append(LayerCheck(name, f"|biases - exact β'| / ulp({mplan.scale_dtype})", ratio, HALF_ULP_LIMIT))
        else:
            err = float((biases.double() - beta.double()).abs().max()) if same_shape else float("inf")
            checks.append(LayerCheck(name, "|biases - min-max β of the merge|", err, 0.0))
        if same_shape:
            checks.append(_dequant_check(name, words, scales, biases, codes, mplan))
    return checks


def activation_dtype(path: Path) -> torch.dtype:
    """The dtype MLX computes in: that of the (unquantized) token embeddings."""
    emb = TensorFolder.open(Path(path)).get("model.embed_tokens.weight")
    return emb.dtype if emb is not None and emb.is_floating_point() else torch.float32


def ptq_stream(job: ExportJob, mplan: MlxPlan) -> Stream:
    """The base as trained, WITHOUT the adapter, min-max quantized on the same 1xG groups (float math):
    the scale of error a re-quantized export is judged by, independent of the update."""
    base = trained_base_fn(job.plan)

    def weights(name: str, cache) -> torch.Tensor:
        w = base(name, cache)
        return quantize_minmax(w, mplan.target_grid(), name).dequantize() if is_quantized_linear(name) else w
    return Stream("mlx ptq floor", weights, mlx_embedding_hooks(job.base.config))


def tolerance(job: ExportJob, path: Path, mplan: MlxPlan) -> tuple[Tolerance, tuple, Optional[Callable]]:
    """(static bound, floor streams, bound from the streams' logits)."""
    static, streams, bound = _tolerance(job, path, mplan)
    if streams:  # a re-quantized export's PTQ floor has mlx-lm's embedding scale already
        return static, streams, bound
    return mlx_embedding_floor(job, static, bound)


def _tolerance(job: ExportJob, path: Path, mplan: MlxPlan) -> tuple[Tolerance, tuple, Optional[Callable]]:
    act = activation_dtype(path)
    if act != torch.float32:
        tol = tolerance_for_dtype(act)
        return replace(tol, basis=f"MLX computes in {str(act)[6:]} (the embeddings' dtype): {tol.basis}"), (), None
    if mplan.route == "requantize":
        static = tolerance_for_dtype(torch.float16)

        def bound(out: dict) -> Tolerance:
            return floor_tolerance(logit_stats(out["without"], out["mlx ptq floor"]),
                                   f"the same {mplan.bits}-bit min-max re-quantization on 1x{mplan.group_size} groups "
                                   "(PTQ); the layer checks prove the file is min-max of the exact merge", static)
        return static, (ptq_stream(job, mplan),), bound
    if mplan.scale_dtype == "float32":
        return Tolerance(max_rel=1e-5, min_top1=0.97,
                         basis="float32 biases: β' rounded to float32, float32 operation-order noise only"), (), None
    if exact_float16_biases(job, mplan):
        return Tolerance(max_rel=1e-5, min_top1=0.97,
                         basis="float16 biases = the fold-aware checkpoint's own float16 β' (exact, the layer checks "
                               "show 0 ulp): float32 operation-order noise only"), (), None
    u = UNIT_ROUNDOFF[torch.float16]
    return Tolerance(max_rel=16 * u, min_top1=0.9,
                     basis="float16 biases: codes and α exact, each β' within half an fp16 ulp (16 x 2^-11, "
                           "as for fp16 weights); MLX's CPU quantized matmul keeps float32 activations"), (), None


def exact_float16_biases(job: ExportJob, mplan: MlxPlan) -> bool:
    """The fold route with float16 biases for a checkpoint trained fold-aware with float16 β': the file holds
    exactly the trained weights (no rounding at export)."""
    grid = job.plan.base_quant
    return (mplan.route == "fold" and mplan.scale_dtype == "float16" and job.plan.folded
            and isinstance(grid, MinMaxGrid) and grid.param_dtype == "float16")


def open_artifact(path: Path, job: ExportJob, runtime: str | None = None) -> Artifact:
    if runtime not in (None, "mlx"):
        raise UnsupportedError(f"an MLX folder runs in mlx-lm (--runtime mlx), not {runtime!r}")
    path = Path(path)
    mplan = artifact_plan(path, job)

    def logits(prompts):
        import mlx.core as mx
        from mlx_lm import load

        model, _ = load(str(path))
        out = []
        for ids in prompts:
            result = model(mx.array([list(ids)]))
            out.append(torch.from_numpy(np.array(result[0].astype(mx.float32))))
        return out

    notes = [f"route: {ROUTES[mplan.route]}"]
    if mplan.route == "requantize":
        notes.append(f"not exact: {mplan.reason}")
    static, streams, bound = tolerance(job, path, mplan)
    return Artifact(format=NAME, path=path,
                    description=f"mlx-lm folder, {mplan.bits}-bit affine, groups of {mplan.group_size}, "
                                f"{mplan.scale_dtype} scales/biases (mlx-lm)",
                    tolerance=static, streams=streams, bound=bound, logits=logits,
                    layer_checks=lambda: layer_checks(job, path, mplan), notes=tuple(notes))
