"""Frozen specs: how a checkpoint's base was quantized and what the adapter is.

``blora_config.json`` (the native format) is parsed here and nowhere else.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import torch

from .enums import Forward, Method
from .errors import BadInputError

METHODS = Method.values()
FORWARDS = Forward.values()
PARAM_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
FORMAT_VERSION = 1


@dataclass(frozen=True)
class MinMaxGrid:
    """Min-max block quantization (paper Eq. 1) on blocks of ``block_out`` x ``block_in``.

    Block size convention (one for the whole project): a block covers ``block_out``
    consecutive output rows and ``block_in`` consecutive input columns of a PyTorch
    ``[out, in]`` weight; blocks start at index 0 on both axes.
    """

    bits: int = 4
    block_out: int = 1
    block_in: int = 32
    param_dtype: str = "float16"

    def __post_init__(self) -> None:
        problems = []
        if not 2 <= self.bits <= 8:
            problems.append(f"bits must be 2..8, got {self.bits}")
        if self.block_out < 1 or self.block_in < 1:
            problems.append(f"block sizes must be >= 1, got {self.block_out}x{self.block_in}")
        if self.param_dtype not in PARAM_DTYPES:
            problems.append(f"param_dtype must be one of {sorted(PARAM_DTYPES)}, got {self.param_dtype!r}")
        if problems:
            raise BadInputError("min-max grid: " + "; ".join(problems))

    @property
    def torch_dtype(self) -> torch.dtype:
        return PARAM_DTYPES[self.param_dtype]

    @property
    def levels(self) -> int:
        return 2**self.bits - 1

    def describe(self) -> str:
        return f"min-max {self.bits}-bit, {self.block_out}x{self.block_in} blocks, {self.param_dtype} α/β"

    def to_json(self) -> dict:
        return {"scheme": "minmax", "bits": self.bits, "block_out": self.block_out,
                "block_in": self.block_in, "param_dtype": self.param_dtype}


@dataclass(frozen=True)
class NF4Base:
    """bitsandbytes NF4 (absmax x codebook) as Q-BLoRA's base (paper Sec. 3.2)."""

    blocksize: int = 64
    double_quant: bool = True

    def __post_init__(self) -> None:
        if self.blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise BadInputError(f"nf4 blocksize must be a power of two from 32 to 4096, got {self.blocksize}")

    def describe(self) -> str:
        dq = ", double-quantized absmax" if self.double_quant else ""
        return f"NF4, block {self.blocksize}{dq}"

    def to_json(self) -> dict:
        return {"scheme": "nf4", "blocksize": self.blocksize, "double_quant": self.double_quant}


BaseQuant = Union[MinMaxGrid, NF4Base, None]


def _whole(value: object, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadInputError(f"base_quant.{key} must be a whole number, got {value!r}")
    return value


def parse_base_quant(raw: object) -> BaseQuant:
    """Parse the ``base_quant`` entry of ``blora_config.json``."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise BadInputError(f"base_quant must be null or an object, got {raw!r}")
    scheme = raw.get("scheme")
    try:
        if scheme == "minmax":
            return MinMaxGrid(bits=_whole(raw["bits"], "bits"), block_out=_whole(raw.get("block_out", 1), "block_out"),
                              block_in=_whole(raw["block_in"], "block_in"),
                              param_dtype=str(raw.get("param_dtype", "float16")))
        if scheme == "nf4":
            dq = raw.get("double_quant", True)
            if not isinstance(dq, bool):
                raise BadInputError(f"base_quant.double_quant must be true or false, got {dq!r}")
            return NF4Base(blocksize=_whole(raw.get("blocksize", 64), "blocksize"), double_quant=dq)
    except KeyError as exc:
        raise BadInputError(f"base_quant {scheme!r} is missing the field {exc.args[0]!r}") from None
    raise BadInputError(f"base_quant.scheme must be 'minmax' or 'nf4', got {scheme!r}")


@dataclass(frozen=True)
class BloraConfig:
    """The native ``blora_config.json``."""

    method: str
    lambda_in: int
    lambda_out: int
    base_quant: BaseQuant = None
    format_version: int = FORMAT_VERSION
    # "branch": trained as base + adapter branch (exact β + s·H/λi); "folded": QA-BLoRA trained
    # fold-aware, its forward was α·q + param_dtype(β + s·H/λi) (see docs/MATH.md, the fold).
    forward: str = "branch"

    def to_json(self) -> dict:
        data = {"format_version": self.format_version, "method": self.method,
                "lambda_in": self.lambda_in, "lambda_out": self.lambda_out,
                "base_quant": None if self.base_quant is None else self.base_quant.to_json()}
        if self.forward != "branch":
            data["forward"] = self.forward
        return data

    @classmethod
    def from_json(cls, raw: dict) -> "BloraConfig":
        problems = []
        version = raw.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            problems.append(f"format_version {version!r} is not supported (this tool reads the number {FORMAT_VERSION})")
        method = raw.get("method")
        if method not in METHODS:
            problems.append(f"method must be one of {METHODS}, got {method!r}")
        lams = {}
        for key in ("lambda_in", "lambda_out"):
            value = raw.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{key} must be a whole number >= 1, got {value!r}")
            lams[key] = value
        forward = raw.get("forward", "branch")
        if forward not in FORWARDS:
            problems.append(f"forward must be one of {FORWARDS}, got {forward!r}")
        if problems:
            raise BadInputError("blora_config.json: " + "; ".join(problems))
        base_quant = parse_base_quant(raw.get("base_quant"))
        if forward == "folded" and (method != "qa-blora" or not isinstance(base_quant, MinMaxGrid)):
            raise BadInputError("blora_config.json: forward 'folded' needs method qa-blora on a min-max base_quant")
        return cls(method=method, lambda_in=lams["lambda_in"], lambda_out=lams["lambda_out"],
                   base_quant=base_quant, forward=forward)


def adapter_scaling(lora_alpha: float, r: int, use_rslora: bool) -> float:
    """``s = lora_alpha / r`` (or ``/ sqrt(r)`` with rsLoRA); ``r`` is the configured rank."""
    return float(lora_alpha) / (math.sqrt(r) if use_rslora else r)
