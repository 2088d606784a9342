"""The public Python API. Each CLI command is a thin wrapper over one function here."""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional, Sequence

from .base import BaseModel, read_json
from .checkpoint import ADAPTER_CONFIG, Checkpoint, load_checkpoint, resolve_base_path
from .enums import Format
from .errors import BadInputError
from .families import require_format
from .io import check_output as guard_output
from .io import progress_factory
from .job import ExportJob, ExportResult
from .merge import resolve_merge_plan
from .reference import DEFAULT_PROMPTS, Prompt
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


FILE_FORMATS = (Format.GGUF,)  # formats whose output is one file; the others write a folder


def source_paths(ckpt: str | Path, base: str | Path | None = None) -> list[Path]:
    """What a command on ``ckpt`` reads: the checkpoint folder and its base folder (``--base`` or the one
    ``adapter_config.json`` names, when that can be resolved now; if not, loading reports why)."""
    paths = [Path(ckpt)]
    if base is not None:
        return paths + [Path(base)]
    try:
        paths.append(resolve_base_path(Path(ckpt), read_json(Path(ckpt) / ADAPTER_CONFIG), None))
    except BadInputError:
        pass
    return paths


def check_report(path: str | Path | None, inputs: Sequence[Path], outputs: Sequence[Path] = ()) -> None:
    """``--json PATH``: a file that is no input and no other output of the command (``-``: stdout)."""
    if path is None or str(path) == "-":
        return
    guard_output(path, inputs, what="--json", overwrite=True, kind="file", outputs=outputs)


def export(ckpt: str | Path, out: str | Path, format: str, base: str | Path | None = None,
           merge_into: Optional[str] = None, quiet: bool = False, overwrite: bool = False,
           report: str | Path | None = None, **options) -> ExportResult:
    """Export a checkpoint to ``format`` (``safetensors``, ``gguf``, ``onnx``, ``mlx``, ``peft``).

    An existing ``out`` is replaced only with ``overwrite=True``, and never when it is (or
    holds, or lies inside) the checkpoint or the base. ``report`` (the CLI's ``--json``) is a
    file the caller writes afterwards: checked now, before the export's work.
    """
    from converters import converter

    module = converter(format)
    kind = "file" if format in FILE_FORMATS else "dir"
    sources = source_paths(ckpt, base)
    guard_output(out, sources, overwrite=overwrite, kind=kind)
    check_report(report, sources, [Path(out)])
    job = open_job(ckpt, base, merge_into, quiet)
    require_format(job.base.config, module.NAME)
    guard_output(out, [job.ckpt.path, job.base.path], overwrite=overwrite, kind=kind)
    result = module.export(job, Path(out), **options)
    log.info("wrote %s (%s) in %.1f s", result.path, result.format, result.seconds)
    return result


def read_prompts(path: str | Path | None) -> Sequence[str]:
    """Built-in prompts, or one prompt per non-empty line of ``path``."""
    if path is None:
        return DEFAULT_PROMPTS
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"cannot read prompts from {path} ({exc})") from None
    lines = [Prompt(ln.strip(), f"{path}:{n}") for n, ln in enumerate(text.splitlines(), start=1) if ln.strip()]
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
