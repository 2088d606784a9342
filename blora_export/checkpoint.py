"""Reading trained checkpoints: the paper's PEFT-style folder and the native format.

Both are a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``);
the native format adds ``blora_config.json``. The paper's layout saves no λ: it is
inferred per module from the base model's shapes (docs/MATH.md, "Inferring λ").
Every problem found is reported at once, in one error.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file

from .base import BaseModel, read_json
from .delta import AdapterModule
from .errors import BadInputError, UnsupportedError, problems_error
from .spec import BaseQuant, BloraConfig, adapter_scaling

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BLORA_CONFIG = "blora_config.json"
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_Mora)"
                  r"(?:\.(?P<adapter>[A-Za-z0-9_-]+))?(?:\.weight)?$")


@dataclass(frozen=True)
class Checkpoint:
    """A validated checkpoint: its adapted modules with λ, scaling and tensors."""

    path: Path
    layout: str  # "native" or "paper"
    method: str
    modules: dict[str, AdapterModule]
    rank: int
    lora_alpha: float
    use_rslora: bool
    scaling: float
    base_quant: BaseQuant
    base_path: Path
    sha256: str
    forward: str = "branch"  # "folded": trained fold-aware (blora_config.json "forward")

    @property
    def folded_forward(self) -> bool:
        return self.forward == "folded"

    @property
    def lambdas(self) -> dict[str, tuple[int, int]]:
        return {name: (m.lambda_in, m.lambda_out) for name, m in self.modules.items()}

    def uniform_lambda(self) -> Optional[tuple[int, int]]:
        """``(λi, λo)`` when every module shares them, else ``None``."""
        values = set(self.lambdas.values())
        return next(iter(values)) if len(values) == 1 else None

    def module_for_weight(self, weight_name: str) -> Optional[AdapterModule]:
        if not weight_name.endswith(".weight"):
            return None
        return self.modules.get(weight_name[: -len(".weight")])


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_base_path(ckpt_dir: Path, adapter_config: dict, base: str | Path | None) -> Path:
    """``--base`` if given, else ``base_model_name_or_path`` as a local folder (never a download)."""
    if base is not None:
        return Path(base)
    named = adapter_config.get("base_model_name_or_path")
    if named is not None and not isinstance(named, str):
        raise BadInputError(f"{ckpt_dir / ADAPTER_CONFIG}: base_model_name_or_path must be a string; pass --base DIR")
    if not named:
        raise BadInputError(f"{ckpt_dir / ADAPTER_CONFIG} names no base_model_name_or_path; pass --base DIR")
    candidate = Path(named)
    for path in ([candidate] if candidate.is_absolute() else [ckpt_dir / candidate, candidate]):
        if (path / "config.json").is_file():
            return path
    raise BadInputError(f"base model {named!r} is not a local folder (nothing is downloaded); pass --base DIR")


def load_checkpoint(path: str | Path, base: BaseModel | str | Path | None = None) -> tuple[Checkpoint, BaseModel]:
    """Read and validate a checkpoint folder and open its base model.

    Returns ``(checkpoint, base_model)``. Raises :class:`BadInputError` listing every problem.
    """
    ckpt_dir = Path(path)
    if not ckpt_dir.is_dir():
        raise BadInputError(f"checkpoint {ckpt_dir} is not a folder")
    adapter_config = _read_adapter_config(ckpt_dir)
    if (ckpt_dir / BLORA_CONFIG).exists() and not (ckpt_dir / BLORA_CONFIG).is_file():
        raise BadInputError(f"{ckpt_dir / BLORA_CONFIG} is not a file")
    native = read_json(ckpt_dir / BLORA_CONFIG) if (ckpt_dir / BLORA_CONFIG).is_file() else None
    blora = BloraConfig.from_json(native) if native is not None else None
    if not isinstance(base, BaseModel):
        base = BaseModel.open(resolve_base_path(ckpt_dir, adapter_config, base))
    tensors = _read_adapter_tensors(ckpt_dir)
    rank, alpha, rslora = _rank_alpha(ckpt_dir, adapter_config)
    scaling = adapter_scaling(alpha, rank, rslora)
    modules = _build_modules(ckpt_dir, tensors, base, blora, scaling)
    if blora is not None and blora.forward == "folded":
        _check_folded(ckpt_dir, blora)
    methods = {m.method for m in modules.values()}
    if len(methods) > 1:
        raise UnsupportedError(f"{ckpt_dir}: mixes Q-BLoRA and QA-BLoRA modules; export them as two checkpoints")
    return Checkpoint(path=ckpt_dir, layout="native" if blora else "paper", method=methods.pop(),
                      modules=modules, rank=rank, lora_alpha=alpha, use_rslora=rslora, scaling=scaling,
                      base_quant=blora.base_quant if blora else None, base_path=base.path,
                      sha256=file_sha256(ckpt_dir / ADAPTER_WEIGHTS),
                      forward=blora.forward if blora else "branch"), base


def _check_folded(ckpt_dir: Path, blora: BloraConfig) -> None:
    from .fold import fold_problems

    problems = fold_problems(blora.base_quant, blora.lambda_in, blora.lambda_out)
    if problems:
        raise problems_error(f"{ckpt_dir / BLORA_CONFIG} says forward 'folded'", problems)


def _read_adapter_config(ckpt_dir: Path) -> dict:
    cfg_path = ckpt_dir / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise BadInputError(f"checkpoint {ckpt_dir} has no {ADAPTER_CONFIG}")
    return read_json(cfg_path)


def _rank_alpha(ckpt_dir: Path, cfg: dict) -> tuple[int, float, bool]:
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    problems = [f"no {key} (the scaling is lora_alpha / r: a default would silently change it)"
                for key in ("r", "lora_alpha") if key not in cfg]
    if "r" in cfg and (not isinstance(r, int) or isinstance(r, bool) or r < 1):
        problems.append(f"r must be a whole number >= 1, got {r!r}")
    if "lora_alpha" in cfg and (not isinstance(alpha, (int, float)) or isinstance(alpha, bool)
                                or not math.isfinite(alpha) or alpha <= 0):
        problems.append(f"lora_alpha must be a finite number > 0, got {alpha!r}")
    rslora = cfg.get("use_rslora", False)
    if not isinstance(rslora, bool):
        problems.append(f"use_rslora must be true or false, got {rslora!r}")
    if cfg.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type {cfg.get('peft_type')!r} is not a LoRA-style adapter")
    for key in ("use_dora", "fan_in_fan_out"):
        if cfg.get(key):
            problems.append(f"{key}: true is not supported (B-LoRA checkpoints are plain LoRA-style adapters)")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            problems.append(f"{key} is not supported: one scaling for every module; save the modules as separate checkpoints")
    if problems:
        raise problems_error(str(ckpt_dir / ADAPTER_CONFIG), problems)
    return r, float(alpha), rslora


def _read_adapter_tensors(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    weights = ckpt_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        if any(ckpt_dir.glob("adapter_model.bin")) or any(ckpt_dir.glob("*.pt")):
            raise UnsupportedError(f"{ckpt_dir} holds a pickled adapter; this tool never unpickles. Re-save it "
                                   "with safetensors (PEFT: save_pretrained(..., safe_serialization=True))")
        raise BadInputError(f"checkpoint {ckpt_dir} has no {ADAPTER_WEIGHTS}")
    try:
        return load_file(str(weights))
    except Exception as exc:
        raise BadInputError(f"{weights} is truncated or not a safetensors file ({exc})") from None


def _group_tensors(tensors: dict[str, torch.Tensor], problems: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        match = _KEY.match(key)
        if not match:
            problems.append(f"unexpected tensor {key!r} (only lora_A / lora_B / lora_Mora adapters are supported)")
            continue
        kind = "lora_A" if match["kind"] == "lora_Mora" else match["kind"]
        slot = grouped.setdefault(match["module"], {})
        if kind in slot:
            problems.append(f"{match['module']}: two tensors for {kind}")
        slot[kind] = value
    return grouped


def _build_modules(ckpt_dir: Path, tensors: dict[str, torch.Tensor], base: BaseModel,
                   blora: BloraConfig | None, scaling: float) -> dict[str, AdapterModule]:
    problems: list[str] = []
    grouped = _group_tensors(tensors, problems)
    if not grouped and not problems:
        problems.append("no adapter tensors found")
    modules = {}
    for name in sorted(grouped, key=_natural_key):
        module = _build_module(name, grouped[name], base, blora, scaling, problems)
        if module is not None:
            modules[name] = module
    if problems:
        raise problems_error(f"checkpoint {ckpt_dir}", problems)
    return modules


def _build_module(name: str, parts: dict[str, torch.Tensor], base: BaseModel, blora: BloraConfig | None,
                  scaling: float, problems: list[str]) -> Optional[AdapterModule]:
    weight_name = name + ".weight"
    if weight_name not in base.shards:
        problems.append(f"{name}: the base model has no {weight_name}")
        return None
    shape = base.shape(weight_name)
    if len(shape) != 2:
        problems.append(f"{name}: the base weight {weight_name} is not a 2-D Linear weight ({shape})")
        return None
    out_f, in_f = shape
    start = len(problems)
    for kind, t in parts.items():
        if t.ndim != 2 or not t.is_floating_point():
            problems.append(f"{name}.{kind}: expected a 2-D float matrix, got {t.dtype} {tuple(t.shape)}")
        elif not torch.isfinite(t).all():
            problems.append(f"{name}.{kind}: contains NaN or infinite values")
    if len(problems) > start:
        return None
    method = "q-blora" if "lora_B" in parts else "qa-blora"
    if method == "q-blora":
        a, b = parts.get("lora_A"), parts["lora_B"]
        if a is None:
            problems.append(f"{name}: has lora_B but no lora_A")
            return None
        if a.shape[0] != b.shape[1]:
            problems.append(f"{name}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} disagree on the rank")
            return None
        li, lo = _ratio(in_f, a.shape[1], f"{name}: in {in_f} / lora_A cols {a.shape[1]}", problems), \
            _ratio(out_f, b.shape[0], f"{name}: out {out_f} / lora_B rows {b.shape[0]}", problems)
    else:
        a = b = None
        h = parts["lora_A"]
        li = _ratio(in_f, h.shape[1], f"{name}: in {in_f} / H cols {h.shape[1]}", problems)
        lo = _ratio(out_f, h.shape[0], f"{name}: out {out_f} / H rows {h.shape[0]}", problems)
    if li is None or lo is None:
        return None
    if blora is not None and not _agrees(name, method, li, lo, blora, parts, problems):
        return None
    return AdapterModule(name=name, method=method, lambda_in=li, lambda_out=lo, scaling=scaling,
                         out_features=out_f, in_features=in_f,
                         a=a.float() if a is not None else None, b=b.float() if b is not None else None,
                         h=parts["lora_A"].float() if method == "qa-blora" else None)


def _ratio(full: int, small: int, what: str, problems: list[str]) -> Optional[int]:
    if small < 1 or full % small:
        problems.append(f"{what} is not a whole number: λ must divide the dimension")
        return None
    return full // small


def _agrees(name: str, method: str, li: int, lo: int, blora: BloraConfig, parts: dict,
            problems: list[str]) -> bool:
    ok = True
    if method != blora.method:
        problems.append(f"{name}: tensors are {method} ({', '.join(sorted(parts))}) but blora_config.json says {blora.method}")
        ok = False
    if (li, lo) != (blora.lambda_in, blora.lambda_out):
        problems.append(f"{name}: shapes give lambda_in={li}, lambda_out={lo} but blora_config.json says "
                        f"lambda_in={blora.lambda_in}, lambda_out={blora.lambda_out}")
        ok = False
    return ok


def _natural_key(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in name.split(".")]
