"""The closed sets of names the tool uses, one enum each.

Each member is also its string (``Method.QA_BLORA == "qa-blora"``), so JSON files and CLI
options keep their plain spellings.
"""
from __future__ import annotations

from enum import Enum


class NameEnum(str, Enum):
    """A ``str`` enum whose ``str()`` and f-string form is its value (``enum.StrEnum`` is 3.11+)."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)


class Method(NameEnum):
    """How the adapter was trained (docs/MATH.md, "Adapters")."""

    Q_BLORA = "q-blora"
    QA_BLORA = "qa-blora"


class Forward(NameEnum):
    """What a QA-BLoRA checkpoint's forward computed: the adapter branch, or the folded weights."""

    BRANCH = "branch"
    FOLDED = "folded"


class MergeTarget(NameEnum):
    """What the adapter is merged into: the original weights or the dequantized trained base."""

    ORIGINAL = "original"
    DEQUANTIZED = "dequantized"


class Format(NameEnum):
    """Output formats; each has one converter module (``converters.FORMATS``)."""

    SAFETENSORS = "safetensors"
    GGUF = "gguf"
    ONNX = "onnx"
    MLX = "mlx"
    PEFT = "peft"


class Runtime(NameEnum):
    """What runs an artifact for ``verify`` (and which runtimes' grids carry a fold)."""

    TRANSFORMERS = "transformers"
    GGUF_PY = "gguf-py"
    LLAMA_CPP = "llama.cpp"
    ONNXRUNTIME = "onnxruntime"
    MLX = "mlx"
    PEFT = "peft"
