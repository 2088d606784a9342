"""What ``blora-export train`` is asked to do: the frozen options and the target table.

A QA-BLoRA *target* names the low-bit format the checkpoint will be exported to. It fixes the
min-max grid the base is quantized on (bits, ``block_out`` x ``block_in``) and default balancing
factors ``λi``, ``λo`` for which the trained update folds exactly into the grid's zero-points
(``block_in | λi`` and ``block_out | λo``) and into the runtime's 1-D blocks of ``t`` inputs
(``t | block_in`` and ``t | λi``), see docs/MATH.md. Q-BLoRA has no target: its base is NF4.

Fold-aware training (QA-BLoRA) computes the forward as ``α·q + fp16(β + s·H/λi)`` (straight-through
gradient through the rounding): exactly the weights of a runtime that stores the folded β' in the
grid's fp16 (GGUF ``m``, MLX ``biases``). Runtimes that keep the offsets in float32 (the ONNX
exporter writes ``β+ΔW+8α`` in float32) or 16-bit merges compute the unrounded ``β + ΔW``, which the
plain adapter branch trains. So the default follows the target (``Target.rounded_beta``).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from ..errors import BadInputError, UnsupportedError
from ..fold import RUNTIME_GRIDS, RuntimeGrid, fold_problems, runtime_fold_problems
from ..spec import METHODS, MinMaxGrid, NF4Base

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "float32", "bf16")
DEFAULT_TARGET = "gguf-q4_1"
#: λ for Q-BLoRA by architecture: the paper recommends 2 for LLaMA/LLaMA2 and 8 for Mistral
#: (Sec. 4.3); it gives none for Qwen2, which gets the LLaMA value.
PAPER_LAMBDA = {"llama": 2, "mistral": 8, "qwen2": 2}
#: Q-BLoRA's base: bitsandbytes NF4, block 64, double-quantized absmax (QLoRA's default).
QBLORA_BASE = NF4Base(blocksize=64, double_quant=True)
DEFAULT_QA_LAMBDA_OUT = 4
MAX_LR = 1.0  # AdamW's step is about lr per weight: above 1 no adapter training converges


@dataclass(frozen=True)
class Target:
    """A QA-BLoRA export target: its training grid, default λ, and the runtime grid it ships to
    (``None``: the paper's 2-D blocks, 16-bit export only)."""

    name: str
    grid: MinMaxGrid
    lambda_in: int
    lambda_out: int
    runtime_grid: Optional[RuntimeGrid]

    @property
    def runtime_block(self) -> Optional[int]:
        return None if self.runtime_grid is None else self.runtime_grid.block

    @property
    def runtime(self) -> str:
        return "16-bit export only (paper blocks)" if self.runtime_grid is None else self.runtime_grid.label

    @property
    def rounded_beta(self) -> bool:
        """The runtime stores β' rounded to the grid's param dtype: fold-aware by default."""
        return self.runtime_grid is not None and self.runtime_grid.offset_dtype == self.grid.param_dtype

    def problems(self, lambda_in: int, lambda_out: int) -> list[str]:
        """Why ``(λi, λo)`` cannot fold exactly into this target (empty if it can)."""
        if self.runtime_grid is None:
            return fold_problems(self.grid, lambda_in, lambda_out)
        return runtime_fold_problems(self.grid, lambda_in, lambda_out, self.runtime_grid.block)

    def would_fold(self) -> str:
        """A one-phrase description of the λ that fold exactly."""
        step = self.grid.block_in  # every runtime block in the table divides it
        outs = "any --lambda-out" if self.grid.block_out == 1 else f"--lambda-out a multiple of {self.grid.block_out}"
        return f"--lambda-in a multiple of {step} (e.g. {self.lambda_in}) and {outs}"


PAPER_BITS = 4
_PAPER = re.compile(r"^paper-(\d+)x(\d+)$")
TARGET_HELP = ("gguf-q4_1, gguf-q5_1, onnx-int4-<16|32|64|128>, onnx-int8-<16|32|64|128>, mlx-<2|3|4|5|6|8>-<32|64|128>, "
               "paper-<bi>x<bo> (the paper's 2-D blocks, 16-bit export only)")


def parse_target(name: str) -> Target:
    """The :class:`Target` for ``name`` (see :data:`TARGET_HELP`): a runtime grid of
    :data:`blora_export.fold.RUNTIME_GRIDS` (trained on its own 1 x block grid, λi = block), or
    the paper's 2-D blocks."""
    lo = DEFAULT_QA_LAMBDA_OUT
    if name in RUNTIME_GRIDS:
        rg = RUNTIME_GRIDS[name]
        return Target(name, MinMaxGrid(rg.bits, 1, rg.block), rg.block, lo, rg)
    m = _PAPER.match(name)
    if m and int(m[1]) >= 1 and int(m[2]) >= 1:
        bi, bo = int(m[1]), int(m[2])
        return Target(name, MinMaxGrid(PAPER_BITS, bo, bi), bi, bo, None)
    raise UnsupportedError(f"unknown --target {name!r}; targets: {TARGET_HELP}")


@dataclass(frozen=True)
class TrainConfig:
    """Every option of ``blora-export train``. ``None`` means: the method's or target's default."""

    base: Path
    data: Path
    out: Path
    method: str
    lambda_: Optional[int] = None
    lambda_in: Optional[int] = None
    lambda_out: Optional[int] = None
    target: Optional[str] = None
    rank: int = 64
    alpha: float = 16.0
    steps: int = 200
    lr: float = 2e-4
    batch_size: int = 4
    seq_len: int = 512
    device: str = "auto"
    resume: bool = False
    overwrite: bool = False
    seed: int = 0
    fold_aware: Optional[bool] = None
    max_grad_norm: float = 1.0
    save_every: int = 100
    nf4_backend: str = "auto"  # auto: bitsandbytes on CUDA, the core's NF4 mirror on CPU
    precision: str = "auto"  # auto: bf16 autocast on CUDA, float32 on CPU
    gradient_checkpointing: Optional[bool] = None  # None: on CUDA only
    quiet: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.method not in METHODS:
            problems.append(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for key in ("rank", "steps", "batch_size", "seq_len", "save_every"):
            if getattr(self, key) < 1:
                problems.append(f"--{key.replace('_', '-')} must be >= 1, got {getattr(self, key)}")
        for key in ("lambda_", "lambda_in", "lambda_out"):
            value = getattr(self, key)
            if value is not None and value < 1:
                problems.append(f"--{key.strip('_').replace('_', '-')} must be >= 1, got {value}")
        if not all(0 < v < float("inf") for v in (self.lr, self.alpha, self.max_grad_norm)):
            problems.append("--lr, --alpha and the gradient clip must be finite and > 0")
        elif self.lr > MAX_LR:
            problems.append(f"--lr {self.lr:g} is above {MAX_LR:g}: AdamW moves every adapter weight by about lr "
                            "per step, so training would diverge at once (typical: 1e-4 to 1e-3)")
        if self.device not in DEVICES:
            problems.append(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.nf4_backend not in ("auto", "core", "bitsandbytes"):
            problems.append(f"nf4_backend must be auto, core or bitsandbytes, got {self.nf4_backend!r}")
        if self.lambda_ is not None and (self.lambda_in is not None or self.lambda_out is not None):
            problems.append("give either --lambda or --lambda-in/--lambda-out, not both")
        if self.resume and self.overwrite:
            problems.append("--resume and --overwrite contradict each other")
        if problems:
            raise BadInputError("train: " + "; ".join(problems))

    def to_json(self) -> dict:
        raw = asdict(self)
        return {k.rstrip("_"): (str(v) if isinstance(v, Path) else v) for k, v in raw.items()}


@dataclass(frozen=True)
class AdapterSpec:
    """The resolved adapter: method, λ, inner rank ``R``, scaling and the base quantization."""

    method: str
    lambda_in: int
    lambda_out: int
    inner_rank: int  # R = λi·rank for Q-BLoRA; unused (0) for QA-BLoRA
    scaling: float  # alpha / rank (the rank written in adapter_config.json)
    base_quant: object  # NF4Base for Q-BLoRA, the target's MinMaxGrid for QA-BLoRA
    target: Optional[Target]
    fold_aware: bool = False  # QA-BLoRA forward α·q + fp16(β + s·H/λi) instead of base + branch

    def to_json(self) -> dict:
        return {"method": self.method, "lambda_in": self.lambda_in, "lambda_out": self.lambda_out,
                "inner_rank": self.inner_rank, "scaling": self.scaling,
                "base_quant": self.base_quant.to_json(), "target": self.target.name if self.target else None,
                "fold_aware": self.fold_aware}


def resolve_spec(cfg: TrainConfig, model_type: str) -> AdapterSpec:
    """λ, R, scaling and base quantization from the options; refuse what cannot fold."""
    scaling = float(cfg.alpha) / cfg.rank
    if cfg.method == "q-blora":
        if cfg.target is not None or cfg.fold_aware:
            raise UnsupportedError("--target and --fold-aware apply to --method qa-blora: Q-BLoRA trains on an "
                                   "NF4 base and exports 16-bit merges (or re-quantizes); drop them or use qa-blora")
        lam = cfg.lambda_ or PAPER_LAMBDA.get(model_type, 2)
        li = cfg.lambda_in or lam
        lo = cfg.lambda_out or lam
        return AdapterSpec("q-blora", li, lo, li * cfg.rank, scaling, QBLORA_BASE, None)
    target = parse_target(cfg.target or DEFAULT_TARGET)
    li = cfg.lambda_in or cfg.lambda_ or target.lambda_in
    lo = cfg.lambda_out or cfg.lambda_ or target.lambda_out
    problems = target.problems(li, lo)
    if problems:
        raise UnsupportedError(f"QA-BLoRA with lambda_in={li}, lambda_out={lo} cannot fold exactly into "
                               f"--target {target.name} ({'; '.join(problems)}); use {target.would_fold()}")
    fold_aware = target.rounded_beta if cfg.fold_aware is None else cfg.fold_aware
    return AdapterSpec("qa-blora", li, lo, 0, scaling, target.grid, target, fold_aware)
