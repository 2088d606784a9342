"""Output formats, one module each, behind the interface in :mod:`blora_export.job`.

The table maps a format name to its module; modules are imported only when used, so a
missing optional runtime (mlx, llama-cpp-python) never breaks the others.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from blora_export.enums import Format
from blora_export.errors import BadInputError, UnsupportedError

FORMATS: dict[Format, str] = {
    Format.SAFETENSORS: "converters.to_safetensors",
    Format.GGUF: "converters.to_gguf",
    Format.ONNX: "converters.to_onnx",
    Format.MLX: "converters.to_mlx",
    Format.PEFT: "converters.to_peft",
}
# Order in which `verify` asks each format whether it recognises an artifact path.
DETECT_ORDER = (Format.GGUF, Format.ONNX, Format.MLX, Format.PEFT, Format.SAFETENSORS)


def converter(name: str) -> ModuleType:
    if name not in FORMATS:
        raise UnsupportedError(f"unknown format {name!r}; formats: {', '.join(FORMATS)}")
    try:
        return importlib.import_module(FORMATS[name])
    except ModuleNotFoundError as exc:
        if exc.name == FORMATS[name]:
            raise UnsupportedError(f"format {name!r} is not available in this build") from None
        raise UnsupportedError(f"format {name!r} needs the package {exc.name!r}: pip install it") from None


def detect_format(path: Path) -> ModuleType:
    """The converter whose ``detect`` recognises ``path``."""
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"artifact {path} does not exist")
    for name in DETECT_ORDER:
        try:
            module = converter(name)
        except UnsupportedError:
            continue
        if module.detect(path):
            return module
    raise BadInputError(f"{path} is not a recognised artifact (a .gguf file, an ONNX folder, an MLX folder, "
                        "a PEFT adapter folder or a merged Hugging Face folder)")
