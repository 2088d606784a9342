"""16-bit (or float32) merged Hugging Face folder: config, tokenizer, sharded safetensors.

``transformers.AutoModelForCausalLM.from_pretrained`` loads the folder unmodified. Every
adapted weight is ``round(trained_base(W) + ΔW)`` from float64: within half an ulp of the
exact sum in the chosen dtype (checked again by ``verify`` on the written file).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from blora_export.base import TensorFolder, read_json
from blora_export.errors import BadInputError, UnsupportedError
from blora_export.hf_folder import PROVENANCE_FILE, provenance, write_hf_config, write_shards
from blora_export.io import atomic_dir
from blora_export.job import Artifact, ExportJob, ExportResult, LayerCheck
from blora_export.merge import DTYPES, exact_merged_weight, merged_tensors
from blora_export.numerics import HALF_ULP_LIMIT, half_ulp_ratio
from blora_export.tolerance import tolerance_for_dtype

NAME = "safetensors"
DESCRIPTION = "merged Hugging Face folder (float16/bfloat16/float32 safetensors)"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
def export(job: ExportJob, out: Path, dtype: str = "float16", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> ExportResult:
    if dtype not in DTYPES:
        raise UnsupportedError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    start = time.perf_counter()
    names = job.base.names()
    with atomic_dir(out) as tmp:
        stream = job.progress(merged_tensors(job.base, job.ckpt, job.plan, DTYPES[dtype]),
                              desc="merge", total=len(names), unit="tensor")
        weight_map = write_shards(stream, tmp, max_shard_bytes)
        if len(set(weight_map.values())) > 1:
            total = sum((tmp / f).stat().st_size for f in set(weight_map.values()))
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        write_hf_config(job, tmp, dtype)
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance(job, {"format": NAME, "dtype": dtype}), indent=2) + "\n")
    details = {"dtype": dtype, "tensors": len(names), "shards": len(set(weight_map.values())),
               "adapted_modules": len(job.ckpt.modules), "merge": job.plan.describe()}
    return ExportResult(format=NAME, path=Path(out), seconds=time.perf_counter() - start, details=details)


def detect(path: Path) -> bool:
    path = Path(path)
    if not path.is_dir() or not (path / "config.json").is_file():
        return False
    if not ((path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()):
        return False
    config = read_json(path / "config.json")  # a damaged one is a one-line bad-input error
    return "quantization" not in config and "quantization_config" not in config


def weight_layer_checks(job: ExportJob, path: Path) -> list[LayerCheck]:
    """Each adapted weight in the file is the correctly rounded ``trained_base(W) + ΔW``."""
    files = TensorFolder.open(path)
    checks = [config_check(job, path)]
    for module in job.progress(list(job.ckpt.modules.values()), desc="check weights", unit="layer"):
        name = module.weight_name
        if name not in files:
            checks.append(LayerCheck(name, "present in artifact", float("inf"), 0.0))
            continue
        stored = files.get(name)
        exact = exact_merged_weight(name, job.base.tensor(name), job.ckpt, job.plan)
        ratio = half_ulp_ratio(stored, exact) if stored.shape == exact.shape else float("inf")
        checks.append(LayerCheck(name, f"|w - exact| / ulp({str(stored.dtype)[6:]})", ratio, HALF_ULP_LIMIT))
    return checks


CONFIG_FREE_KEYS = ("torch_dtype", "dtype", "quantization_config", "transformers_version", "_name_or_path")


def config_check(job: ExportJob, path: Path) -> LayerCheck:
    """The folder's config.json says what the base's does (verify runs its weights in the base's architecture)."""
    config = read_json(path / "config.json")
    differ = [k for k in set(job.base.config) | set(config)
              if k not in CONFIG_FREE_KEYS and job.base.config.get(k) != config.get(k)]
    return LayerCheck("config.json", "keys that differ from the base's config" + (f" ({', '.join(sorted(differ)[:4])})"
                      if differ else ""), float(len(differ)), 0.0)


def stored_dtype(path: Path, job: ExportJob) -> torch.dtype:
    files = TensorFolder.open(path)
    first = next(iter(job.ckpt.modules.values())).weight_name
    return files.tensor_dtype(first) if first in files else torch.float32


def file_weights(path: Path):
    """The folder's own weights by Hugging Face name, one tensor at a time (a tied head is the embeddings)."""
    files = TensorFolder.open(path)

    def weights(name: str, _cache) -> torch.Tensor:
        if name not in files and name == "lm_head.weight":
            name = "model.embed_tokens.weight"
        if name not in files:
            raise BadInputError(f"{path} has no tensor {name}: is it an export of this checkpoint's base?")
        return files.get(name).to(torch.float32)
    return weights


def open_artifact(path: Path, job: ExportJob, runtime: str | None = None) -> Artifact:
    if runtime not in (None, "transformers"):
        raise UnsupportedError(f"a Hugging Face folder runs in transformers, not {runtime!r}")
    path = Path(path)
    dtype = stored_dtype(path, job)
    return Artifact(format=NAME, path=path, description=f"Hugging Face folder, {str(dtype)[6:]} weights "
                    "(run layer by layer in the base's architecture, float32)",
                    tolerance=tolerance_for_dtype(dtype), logits=None, weights=file_weights(path), weight_dtype=dtype,
                    layer_checks=lambda: weight_layer_checks(job, path))
