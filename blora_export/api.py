"""The public Python API. Each CLI command is a thin wrapper over one function here."""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional, Sequence

from .base import BaseModel
from .checkpoint import Checkpoint, load_checkpoint
from .errors import BadInputError
from .io import progress_factory
from .job import ExportJob, ExportResult
from .merge import resolve_merge_plan
from .reference import DEFAULT_PROMPTS
from .verify import VerifyReport, run_verify

log = logging.getLogger(__name__)


def open_job(ckpt: str | Path, base: str | Path | None = None, merge_into: Optional[str] = None,
             quiet: bool = False) -> ExportJob:
    """Load and validate a checkpoint and its base; decide what the adapter merges into."""
    checkpoint, base_model = load_checkpoint(ckpt, base)
    plan = resolve_merge_plan(checkpoint, merge_into)
    log.info("%s: %s, %d adapted modules; %s", checkpoint.path, checkpoint.method, len(checkpoint.modules),
             plan.describe())
    return ExportJob(ckpt=checkpoint, base=base_model, plan=plan, progress=progress_factory(quiet))


def check_output(out: Path, inputs: Sequence[Path], overwrite: bool) -> None:
    """Refuse an output that exists (unless ``overwrite``) or that is, holds or lies in an input."""
    target = out.resolve()
    for src in inputs:
        src = src.resolve()
        if target == src or target in src.parents or src in target.parents:
            raise BadInputError(f"output {out} would overwrite or lie inside the input {src}; choose another path")
    if out.exists() and not overwrite:
        raise BadInputError(f"output {out} exists; pass --overwrite to replace it")
    if out.parent.exists() and not out.parent.is_dir():
        raise BadInputError(f"output {out}: {out.parent} is not a folder")


def export(ckpt: str | Path, out: str | Path, format: str, base: str | Path | None = None,
           merge_into: Optional[str] = None, quiet: bool = False, overwrite: bool = False, **options) -> ExportResult:
    """Export a checkpoint to ``format`` (``safetensors``, ``gguf``, ``onnx``, ``mlx``, ``peft``).

    An existing ``out`` is replaced only with ``overwrite=True``, and never when it is (or
    holds, or lies inside) the checkpoint or the base.
    """
    from converters import converter

    module = converter(format)
    job = open_job(ckpt, base, merge_into, quiet)
    check_output(Path(out), [job.ckpt.path, job.base.path], overwrite)
    result = module.export(job, Path(out), **options)
    log.info("wrote %s (%s) in %.1f s", result.path, result.format, result.seconds)
    return result


def read_prompts(path: str | Path | None) -> Sequence[str]:
    """Built-in prompts, or one prompt per non-empty line of ``path``."""
    if path is None:
        return DEFAULT_PROMPTS
    try:
        lines = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"cannot read prompts from {path} ({exc})") from None
    if not lines:
        raise BadInputError(f"{path} holds no prompts (one per line)")
    return lines


def verify(ckpt: str | Path, artifact: str | Path | None = None, base: str | Path | None = None,
           prompts: Sequence[str] | None = None, dtype: str = "float16", merge_into: Optional[str] = None,
           quiet: bool = False, **artifact_options) -> VerifyReport:
    """Check a merge (no ``artifact``) or an exported artifact against the training-time model."""
    from converters import detect_format

    fmt = detect_format(Path(artifact)) if artifact is not None else None  # validate early
    job = open_job(ckpt, base, merge_into, quiet)
    opened = fmt.open_artifact(Path(artifact), job, **artifact_options) if fmt is not None else None
    return run_verify(job, opened, prompts or DEFAULT_PROMPTS, dtype)


def inspect(ckpt: str | Path, base: str | Path | None = None) -> dict:
    """Method, λ per module, rank, scaling, base, base quantization and parameter counts."""
    checkpoint, base_model = load_checkpoint(ckpt, base)
    return describe_checkpoint(checkpoint, base_model)


def describe_checkpoint(ckpt: Checkpoint, base: BaseModel) -> dict:
    modules = {}
    for name, m in ckpt.modules.items():
        shapes = {"lora_A": list(m.a.shape), "lora_B": list(m.b.shape)} if m.method == "q-blora" else {"H": list(m.h.shape)}
        modules[name] = {"lambda_in": m.lambda_in, "lambda_out": m.lambda_out, "shape": [m.out_features, m.in_features],
                         "inner_rank": m.inner_rank, "parameters": m.num_parameters(), **shapes}
    base_params = sum(math.prod(base.shape(n)) for n in base.names())
    return {"checkpoint": str(ckpt.path), "layout": ckpt.layout, "method": ckpt.method,
            "rank": ckpt.rank, "lora_alpha": ckpt.lora_alpha, "use_rslora": ckpt.use_rslora,
            "scaling": ckpt.scaling, "base": str(base.path), "architecture": base.model_type,
            "forward": ckpt.forward,
            "base_quant": None if ckpt.base_quant is None else ckpt.base_quant.to_json(),
            "adapter_parameters": sum(m["parameters"] for m in modules.values()),
            "base_parameters": base_params, "sha256": ckpt.sha256, "modules": modules}
