"""Standard LoRA adapters: a PEFT folder (and mlx-lm's adapter folder) that compute ``ΔW`` exactly.

Q-BLoRA is an ordinary LoRA of rank ``R``: ``A' = rep(A, λi)/λi``, ``B' = rep(B, λo)``;
QA-BLoRA is the smaller exact factorization of ``Rep @ H @ Pool`` (docs/MATH.md, ``lora_factors``).
``ΔW = s * B' @ A'``, so the adapter hot-swaps on the *unmodified* base in PEFT, vLLM and
friends. Modules may differ in rank (QA-BLoRA: ``min(out/λo, in/λi)``): PEFT gets
``rank_pattern``/``alpha_pattern`` with ``lora_alpha/r == s`` exactly; mlx-lm (one rank for
all modules) gets the factors zero-padded to the largest rank, which adds exactly nothing.

What the adapter computes on top of a base is ``base + ΔW``. The training-time model of a
checkpoint trained against a quantized base is ``dequant(W_q) + ΔW``: ``verify`` applies the
adapter to the base as the job's merge plan says (default: the base as trained, i.e. the
quantized one; ``--merge-into original``: the original weights ``W``), so both readings are checked.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from blora_export.base import BaseModel
from blora_export.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, BLORA_CONFIG, read_json, resolve_base_path
from blora_export.delta import AdapterModule, delta_weight, lora_factors
from blora_export.emulate import mlx_embedding_floor
from blora_export.errors import BadInputError, BloraError, UnsupportedError
from blora_export.families import attention_window, require_format
from blora_export.hf_folder import PROVENANCE_FILE, provenance, rope_overrides
from blora_export.io import atomic_dir
from blora_export.job import Artifact, ExportJob, ExportResult, LayerCheck
from blora_export.reference import apply_trained_base, load_hf_model, model_logits
from blora_export.tolerance import TOLERANCES

log = logging.getLogger(__name__)

NAME = "peft"
DESCRIPTION = "standard LoRA adapter (PEFT folder, or mlx-lm adapter folder), exact"
LAYOUTS = ("peft", "mlx")
MLX_CONFIG, MLX_WEIGHTS = "adapter_config.json", "adapters.safetensors"
PEFT_PREFIX = "base_model.model."
FACTOR_DTYPE = torch.float32
# s*B'@A' vs ΔW in float64: A' is float32; with a power-of-two λi it is exact, otherwise each
# entry of A' carries one float32 rounding (2^-24): allow 16 of those relative to max|ΔW|.
FACTOR_REL_BOUND = 16 * 2.0**-24
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.weight$")


def exact_alpha(scaling: float, rank: int) -> float | None:
    """A ``lora_alpha`` with ``lora_alpha / rank == scaling`` exactly in float64 (as PEFT computes
    it), or ``None`` when no float64 does (e.g. 0.1 with rank 3)."""
    alpha = scaling * rank
    for _ in range(64):
        got = alpha / rank
        if got == scaling:
            return alpha
        alpha = float(np.nextafter(alpha, np.inf if got < scaling else -np.inf))
    return None


def exact_rank(scaling: float, rank: int) -> int:
    """The smallest rank ``>= rank`` that has an exact ``lora_alpha`` (a power of two always does);
    factors are zero-padded to it, which adds exactly nothing to ``ΔW``."""
    for candidate in range(rank, 2 * rank + 1):
        if exact_alpha(scaling, candidate) is not None:
            return candidate
    raise UnsupportedError(f"no lora_alpha gives lora_alpha/r == {scaling!r} exactly; "
                           "use the 16-bit merge (to-safetensors) instead")


def pad_rank(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad ``A' [r, in]`` and ``B' [out, r]`` to ``rank``: the product is unchanged, exactly."""
    pad = rank - a.shape[0]
    if pad == 0:
        return a, b
    return (torch.cat([a, a.new_zeros(pad, a.shape[1])]), torch.cat([b, b.new_zeros(b.shape[0], pad)], 1))


def factors(job: ExportJob) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``name -> (A' [r, in], B' [out, r])`` for every adapted module (float32)."""
    return {name: lora_factors(m, FACTOR_DTYPE) for name, m in job.ckpt.modules.items()}


def _suffix(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def target_modules(job: ExportJob) -> list[str]:
    """Short names (``q_proj``) when they cover exactly the adapted modules, else full module names."""
    adapted = set(job.ckpt.modules)
    suffixes = {_suffix(n) for n in adapted}
    candidates = {w[: -len(".weight")] for w in job.base.names() if w.endswith(".weight")}
    if {c for c in candidates if _suffix(c) in suffixes} == adapted:
        return sorted(suffixes)
    return sorted(adapted)


def rank_patterns(ranks: dict[str, int]) -> tuple[int, dict[str, int]]:
    """Default rank (the most common) and PEFT ``rank_pattern`` for the others: the short name when
    all modules of that name share a rank, else the escaped full name (PEFT matches it as a regex)."""
    default = Counter(ranks.values()).most_common(1)[0][0]
    by_suffix: dict[str, set[int]] = {}
    for name, r in ranks.items():
        by_suffix.setdefault(_suffix(name), set()).add(r)
    pattern = {}
    for name, r in sorted(ranks.items()):
        if r == default:
            continue
        suffix = _suffix(name)
        if by_suffix[suffix] == {r}:
            pattern[suffix] = r
        else:
            pattern[re.escape(name)] = r
    return default, pattern


def base_reference(job: ExportJob, out: Path) -> str:
    """``base_model_name_or_path``: the checkpoint's own name unless it is a local folder, then a path
    relative to the output folder (deterministic, and resolvable beside it)."""
    cfg = read_json(job.ckpt.path / ADAPTER_CONFIG)
    named = cfg.get("base_model_name_or_path")
    if named and not (job.ckpt.path / named).is_dir() and not Path(named).is_dir():
        return str(named)
    return os.path.relpath(job.base.path.resolve(), Path(out).resolve())


def peft_config(job: ExportJob, ranks: dict[str, int], out: Path) -> dict:
    s = job.ckpt.scaling
    r, pattern = rank_patterns(ranks)
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": exact_alpha(s, r),
        "rank_pattern": pattern, "alpha_pattern": {k: exact_alpha(s, v) for k, v in pattern.items()},
        "target_modules": target_modules(job), "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
        "use_dora": False, "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "base_model_name_or_path": base_reference(job, out),
    }


def write_peft(job: ExportJob, tmp: Path, out: Path) -> dict:
    tensors, ranks = {}, {}
    for name, (a, b) in job.progress(factors(job).items(), desc="factors", unit="module"):
        a, b = pad_rank(a, b, exact_rank(job.ckpt.scaling, int(a.shape[0])))
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.contiguous()
        ranks[name] = int(a.shape[0])
    save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = peft_config(job, ranks, out)
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return {"rank": config["r"], "rank_pattern": config["rank_pattern"], "lora_alpha": config["lora_alpha"]}


def _layer_and_key(name: str) -> tuple[int, str]:
    match = re.match(r"^model\.layers\.(\d+)\.(.+)$", name)
    if not match:
        raise UnsupportedError(f"{name}: mlx-lm adapters cover decoder layers only; use --layout peft")
    return int(match[1]), match[2]


def write_mlx(job: ExportJob, tmp: Path) -> dict:
    """mlx-lm's adapter folder: ``lora_a`` ``[in, r]``, ``lora_b`` ``[r, out]``, one rank (zero-padded)."""
    facts = factors(job)
    rank = max(int(a.shape[0]) for a, _ in facts.values())
    keys = sorted({_layer_and_key(n)[1] for n in facts})
    n_layers = int(job.base.config["num_hidden_layers"])
    tensors = {}
    for layer in range(n_layers):
        for key in keys:
            name = f"model.layers.{layer}.{key}"
            out_f, in_f = job.base.shape(name + ".weight")
            a, b = pad_rank(*facts.get(name, (torch.zeros(0, in_f), torch.zeros(out_f, 0))), rank)
            tensors[name + ".lora_a"] = a.T.contiguous().to(FACTOR_DTYPE)
            tensors[name + ".lora_b"] = b.T.contiguous().to(FACTOR_DTYPE)
    save_file(tensors, str(tmp / MLX_WEIGHTS), metadata={"format": "mlx"})
    config = {"fine_tune_type": "lora", "num_layers": n_layers,
              "lora_parameters": {"rank": rank, "scale": job.ckpt.scaling, "dropout": 0.0, "keys": keys}}
    (tmp / MLX_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return {"rank": rank, "scale": job.ckpt.scaling, "keys": keys}


def export(job: ExportJob, out: Path, layout: str = "peft") -> ExportResult:
    if layout not in LAYOUTS:
        raise UnsupportedError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if layout == "mlx":  # the adapter runs in mlx-lm's model of the family
        require_format(job.base.config, "mlx")
        rope_overrides(job.base.config)  # refuses what mlx-lm's model of the family cannot compute
    start = time.perf_counter()
    with atomic_dir(out) as tmp:
        info = write_peft(job, tmp, Path(out)) if layout == "peft" else write_mlx(job, tmp)
        window = attention_window(job.base.config) if layout == "mlx" else None
        if window is not None:
            info["window_note"] = (f"the base attends within a {window}-token sliding window that mlx-lm's "
                                   f"{job.base.model_type} does not implement: prompts longer than the window "
                                   "run a different model there")
            log.warning("%s", info["window_note"])
        extra = {"format": NAME, "layout": layout, "applies_to": "any base: base + ΔW", **info}
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance(job, extra), indent=2) + "\n")
    details = {"layout": layout, "adapted_modules": len(job.ckpt.modules), **info,
               "note": "exact: ΔW = s·B'@A'; apply it to the base you run (the trained one: " +
                       (job.ckpt.base_quant.describe() if job.ckpt.base_quant else "the original weights") + ")"}
    return ExportResult(format=NAME, path=Path(out), seconds=time.perf_counter() - start, details=details)


# ---------------------------------------------------------------- verification

def _peft_shapes(path: Path) -> dict[str, dict[str, tuple[int, ...]]]:
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    with safe_open(str(path / ADAPTER_WEIGHTS), framework="pt") as f:
        for key in f.keys():
            match = _KEY.match(key)
            if match is None:
                raise BadInputError(f"{path}: tensor {key!r} is not a plain PEFT lora_A/lora_B weight")
            shapes.setdefault(match["module"], {})[match["kind"]] = tuple(f.get_slice(key).get_shape())
    return shapes


def shape_problems(shapes: dict, base: BaseModel) -> list[str]:
    """Why these tensors are not a standard LoRA of ``base`` (full-size A [r, in], B [out, r])."""
    problems = []
    for module, parts in shapes.items():
        weight = module + ".weight"
        if set(parts) != {"lora_A", "lora_B"} or weight not in base.shards:
            problems.append(f"{module}: needs lora_A and lora_B of a base Linear")
            continue
        out_f, in_f = base.shape(weight)
        a, b = parts["lora_A"], parts["lora_B"]
        if a[1] != in_f or b[0] != out_f or a[0] != b[1]:
            problems.append(f"{module}: lora_A {a} / lora_B {b} are not [r, {in_f}] / [{out_f}, r]")
    return problems


def detect(path: Path) -> bool:
    """A PEFT LoRA folder with full-size factors (not a B-LoRA checkpoint), or an mlx-lm adapter folder."""
    path = Path(path)
    if not path.is_dir() or not (path / ADAPTER_CONFIG).is_file():
        return False
    try:
        config = read_json(path / ADAPTER_CONFIG)
    except BadInputError:
        return False
    if "lora_parameters" in config:
        return (path / MLX_WEIGHTS).is_file()
    if config.get("peft_type") != "LORA" or (path / BLORA_CONFIG).is_file() or not (path / ADAPTER_WEIGHTS).is_file():
        return False
    try:
        base = BaseModel.open(resolve_base_path(path, config, None))
        return not shape_problems(_peft_shapes(path), base)
    except BloraError:
        provenance_file = path / PROVENANCE_FILE
        return provenance_file.is_file() and read_json(provenance_file).get("format") == NAME


def _scaling_for(config: dict, module: str) -> float:
    """PEFT's own ``lora_alpha / r`` for ``module`` (rank_pattern / alpha_pattern resolved as PEFT does)."""
    from peft.utils.other import get_pattern_key

    r_key = get_pattern_key(config.get("rank_pattern", {}).keys(), module)
    a_key = get_pattern_key(config.get("alpha_pattern", {}).keys(), module)
    r = config.get("rank_pattern", {}).get(r_key, config["r"])
    alpha = config.get("alpha_pattern", {}).get(a_key, config["lora_alpha"])
    return alpha / (r**0.5 if config.get("use_rslora") else r)


def stored_factors(path: Path, layout: str) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, float]]:
    """``module -> (A' [r, in], B' [out, r])`` and ``module -> scaling``, read back from the folder."""
    config = read_json(path / ADAPTER_CONFIG)
    out, scale = {}, {}
    weights = path / (ADAPTER_WEIGHTS if layout == "peft" else MLX_WEIGHTS)
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            if layout == "peft":
                match = _KEY.match(key)
                module, kind = match["module"], match["kind"]
                tensor = f.get_tensor(key)
            else:
                module, kind = key.rsplit(".", 1)
                tensor = f.get_tensor(key).T
            a, b = out.get(module, (None, None))
            out[module] = (tensor, b) if kind.lower() == "lora_a" else (a, tensor)
    for module in out:
        scale[module] = _scaling_for(config, module) if layout == "peft" else float(config["lora_parameters"]["scale"])
    return out, scale


def layer_checks(job: ExportJob, path: Path, layout: str) -> list[LayerCheck]:
    """Per module: PEFT's scaling equals s exactly, and ``scaling·B'@A'`` equals ``ΔW`` (float64)."""
    stored, scale = stored_factors(path, layout)
    checks = []
    for name, module in job.progress(list(job.ckpt.modules.items()), desc="check factors", unit="module"):
        if name not in stored or any(t is None for t in stored[name]):
            checks.append(LayerCheck(name, "lora_A and lora_B present", float("inf"), 0.0))
            continue
        a, b = stored[name]
        checks.append(LayerCheck(name, "|adapter scaling - s| / s", abs(scale[name] - module.scaling) / abs(module.scaling), 0.0))
        checks.append(LayerCheck(name, "|scaling·B'@A' - ΔW| / max|ΔW| (float64)", _factor_error(module, a, b, scale[name]), FACTOR_REL_BOUND))
    extra = sorted(n for n in stored if n not in job.ckpt.modules and any(float(t.abs().max()) for t in stored[n]))
    checks += [LayerCheck(n, "non-zero factors on a module the checkpoint does not adapt", float("inf"), 0.0) for n in extra]
    return checks


def _factor_error(module: AdapterModule, a: torch.Tensor, b: torch.Tensor, scaling: float) -> float:
    exact = delta_weight(module, torch.float64)
    if a.shape[1] != module.in_features or b.shape[0] != module.out_features or a.shape[0] != b.shape[1]:
        return float("inf")
    got = scaling * (b.double() @ a.double())
    return float((got - exact).abs().max()) / (float(exact.abs().max()) or 1.0)


def _peft_logits(path: Path, job: ExportJob):
    def logits(prompts):
        from peft import PeftModel

        model = load_hf_model(job.base.path, torch.float32)
        apply_trained_base(model, job.base, job.plan, job.progress)
        model = PeftModel.from_pretrained(model, str(path), is_trainable=False)
        model.eval()
        try:
            return model_logits(model, prompts)
        finally:
            del model
    return logits


def _mlx_logits(path: Path, job: ExportJob):
    def logits(prompts):
        import mlx.core as mx
        from mlx_lm import load
        from mlx_lm.utils import load_adapters

        model, _ = load(str(job.base.path), model_config=rope_overrides(job.base.config))
        if job.plan.merge_into == "dequantized":
            from blora_export.merge import trained_base_weight

            model.load_weights([(n, mx.array(trained_base_weight(n, job.base.tensor(n), job.plan).numpy()))
                                for n in job.base.linear_names()], strict=False)
        load_adapters(model, str(path))
        model.eval()
        return [torch.from_numpy(np.array(model(mx.array([list(ids)]))[0].astype(mx.float32))) for ids in prompts]
    return logits


def open_artifact(path: Path, job: ExportJob, runtime: str | None = None) -> Artifact:
    path = Path(path)
    layout = "mlx" if "lora_parameters" in read_json(path / ADAPTER_CONFIG) else "peft"
    runtimes = {"peft": (None, "peft", "transformers"), "mlx": (None, "mlx")}[layout]
    if runtime not in runtimes:
        raise UnsupportedError(f"a {layout} adapter runs in {runtimes[1]}, not {runtime!r}")
    if layout == "peft":
        problems = shape_problems(_peft_shapes(path), job.base)
        if problems:
            raise BadInputError(f"{path} is not a standard LoRA of {job.base.path} ({problems[0]}); "
                                "a B-LoRA checkpoint is the first argument of verify, not the artifact")
    on = "the base as trained" if job.plan.merge_into == "dequantized" else "the original base weights W"
    base = TOLERANCES[torch.float32]
    tol = type(base)(max_rel=base.max_rel, min_top1=base.min_top1,
                     basis="float32 factors on a float32 base: ΔW exact, float32 operation-order noise only")
    if job.plan.folded:  # trained with param_dtype(β'): the exact ΔW differs by that rounding per block
        rounded = TOLERANCES[job.plan.base_quant.torch_dtype]
        tol = type(base)(max_rel=rounded.max_rel, min_top1=rounded.min_top1,
                         basis=f"fold-aware checkpoint: it trained with β' rounded to {job.plan.base_quant.param_dtype} "
                               "per block, the adapter adds the exact ΔW; bound as for weights of that dtype")
    client = "peft.PeftModel" if layout == "peft" else "mlx_lm (load_adapters)"
    tol, streams, bound = mlx_embedding_floor(job, tol) if layout == "mlx" else (tol, (), None)
    return Artifact(format=NAME, path=path, description=f"{layout} LoRA adapter applied by {client} on {on}",
                    tolerance=tol, streams=streams, bound=bound, logits=_peft_logits(path, job) if layout == "peft" else _mlx_logits(path, job),
                    layer_checks=lambda: layer_checks(job, path, layout),
                    notes=(f"{job.plan.describe()}; the adapter computes base + ΔW on whatever base it is loaded on",))
