"""Writing a Hugging Face model folder: config, tokenizer files, sharded safetensors and the
provenance record every artifact carries. Shared by every writer that emits such a folder."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from .base import LAYER_TYPES, rope_parameters
from .errors import UnsupportedError
from .job import ExportJob
from .tensor_io import SafetensorsStream

PROVENANCE_FILE = "blora_export.json"


def provenance(job: ExportJob, extra: dict | None = None) -> dict:
    """What was exported from what: written beside every artifact."""
    ckpt = job.ckpt
    return {
        "tool": "blora-export",
        "method": ckpt.method,
        "layout": ckpt.layout,
        "lambda": sorted({f"{li}x{lo}" for li, lo in ckpt.lambdas.values()}),
        "scaling": ckpt.scaling,
        "rank": ckpt.rank,
        "lora_alpha": ckpt.lora_alpha,
        "use_rslora": ckpt.use_rslora,
        "base_quant": None if ckpt.base_quant is None else ckpt.base_quant.to_json(),
        "merge": job.plan.describe(),
        "checkpoint_sha256": ckpt.sha256,
        **(extra or {}),
    }


def write_hf_config(job: ExportJob, out: Path, dtype_name: str, extra: dict | None = None) -> None:
    """``config.json`` of the base with the new dtype, plus tokenizer and provenance files."""
    config = dict(job.base.config)
    config.pop("quantization_config", None)
    config["torch_dtype"] = dtype_name
    config["dtype"] = dtype_name
    config.update(extra or {})
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for file in job.base.tokenizer_files():
        shutil.copy2(file, out / file.name)


def write_shards(tensors, out: Path, max_shard_bytes: int) -> dict[str, str]:
    """Write tensors into shards of at most ``max_shard_bytes``; return name -> file.

    Each tensor is streamed to its shard as it arrives (:class:`SafetensorsStream`): memory
    holds one tensor, not one shard.
    """
    files: list[tuple[str, list[str]]] = []
    stream = None

    def flush():
        nonlocal stream
        if stream is not None:
            stream.close()
            files.append((stream.path.name, list(stream.entries)))
            stream = None

    try:
        for name, tensor in tensors:
            nbytes = tensor.numel() * tensor.element_size()
            if stream is not None and stream.nbytes + nbytes > max_shard_bytes:
                flush()
            if stream is None:
                stream = SafetensorsStream(out / f"part-{len(files):05d}.safetensors", {"format": "pt"})
            stream.add(name, tensor)
            del tensor
        flush()
    finally:
        if stream is not None:
            stream.abort()
    if len(files) == 1:
        (out / files[0][0]).rename(out / "model.safetensors")
        return {name: "model.safetensors" for name in files[0][1]}
    weight_map = {}
    for i, (file, names) in enumerate(files):
        final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        (out / file).rename(out / final)
        weight_map.update({name: final for name in names})
    return weight_map


def rope_overrides(config: dict) -> dict:
    """The keys mlx-lm reads at the top level of config.json: transformers 5 nests ``rope_theta``
    (and the rope type) in ``rope_parameters``, which mlx-lm 0.32 ignores (it would use its default);
    Gemma 3's per-layer-type rotation and layer pattern as :func:`gemma3_mlx_keys` writes them."""
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and rope and set(rope) <= set(LAYER_TYPES):
        return gemma3_mlx_keys(config)
    if config.get("model_type") == "phi3":
        check_mlx_phi3(config)
    if not isinstance(rope, dict) or "rope_theta" not in rope or "rope_theta" in config:
        return {}
    extra = {"rope_theta": rope["rope_theta"]}
    if "partial_rotary_factor" in rope:  # Phi-3 (mlx-lm's phi3 reads it at the top level)
        extra["partial_rotary_factor"] = rope["partial_rotary_factor"]
    if rope.get("rope_type", "default") != "default":
        extra["rope_scaling"] = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
    return extra


def check_mlx_phi3(config: dict) -> None:
    """mlx-lm's phi3 takes head_dim = hidden/heads and rotates with LongRoPE's long factors at every length
    (transformers: the short ones up to ``original_max_position_embeddings``): refuse a config it would not
    compute, in one line."""
    from .families import head_dim

    heads, hidden = int(config["num_attention_heads"]), int(config["hidden_size"])
    problems = [f"head_dim {head_dim(config)} (mlx-lm's phi3 takes hidden/heads = {hidden // heads})"
                if head_dim(config) * heads != hidden else "",
                "LongRoPE (it rotates with the long factors at every length)"
                if rope_parameters(config)["rope_type"] in ("longrope", "su") else ""]
    problems = [p for p in problems if p]
    if problems:
        raise UnsupportedError(f"phi3: mlx-lm's phi3 cannot compute {'; '.join(problems)}: "
                               "export to GGUF, safetensors or PEFT")


def gemma3_mlx_keys(config: dict) -> dict:
    """mlx-lm's gemma3_text: ``rope_theta`` / ``rope_scaling`` of the global layers, ``rope_local_base_freq``
    of the local ones, and the global layers as one period ``sliding_window_pattern`` (layer i global when
    (i + 1) % n == 0). What its model cannot compute is refused in one line: another layer pattern, rope
    scaling on the local layers, softcaps (it applies none)."""
    from .families import layer_kinds

    kinds, fam = layer_kinds(config), config.get("model_type")
    glob, loc = rope_parameters(config, "full_attention"), rope_parameters(config, "sliding_attention")
    period = next((n for n in range(1, len(kinds) + 1)
                   if all((kind == "full_attention") == ((i + 1) % n == 0) for i, kind in enumerate(kinds))), None)
    problems = [f"global layers {[i for i, k in enumerate(kinds) if k == 'full_attention']} are not every n-th"
                if period is None else "",
                f"rope scaling {loc['rope_type']!r} on the local layers" if loc["rope_type"] != "default" else "",
                *[f"{key} {config[key]}" for key in ("attn_logit_softcapping", "final_logit_softcapping")
                  if config.get(key)]]
    problems = [p for p in problems if p]
    if problems:
        raise UnsupportedError(f"{fam}: mlx-lm's gemma3_text cannot compute {'; '.join(problems)}: "
                               "export to ONNX, GGUF or safetensors")
    extra = {"rope_theta": glob["rope_theta"], "rope_local_base_freq": loc["rope_theta"],
             "sliding_window_pattern": period}
    if glob["rope_type"] != "default":
        extra["rope_scaling"] = {k: v for k, v in glob.items() if k != "rope_theta"}
    return extra


def stop_token_ids(base_path: Path, config: dict) -> list[int]:
    """The ids generation stops at: ``eos_token_id`` of generation_config.json, else config.json
    (Llama 3.x lists several: ``<|end_of_text|>``, ``<|eot_id|>``)."""
    from .base import read_json

    gen_file = Path(base_path) / "generation_config.json"
    gen = read_json(gen_file) if gen_file.is_file() else {}
    eos = gen.get("eos_token_id", config.get("eos_token_id"))
    ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
    return [int(i) for i in ids if isinstance(i, int) and not isinstance(i, bool)]
