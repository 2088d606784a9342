"""What the family tests share: the methods and formats they run, the CLI and GGUF helpers."""
import pytest
from gguf import GGUFReader

from blora_export.cli import main
from blora_export.spec import MinMaxGrid

METHODS = {"qa-blora": (32, 4, MinMaxGrid(4, 1, 32)), "q-blora": (2, 2, None)}
# (format, export options, verify options); Q-BLoRA has no exact low-bit fold: MLX re-quantizes (PTQ)
FORMATS = {
    "gguf-f32": ("gguf", {"gguf_type": "f32"}, {"runtime": "llama.cpp"}),
    "gguf-default": ("gguf", {}, {"runtime": "llama.cpp"}),
    "onnx-fp32": ("onnx", {}, {}),
    "onnx-int4": ("onnx", {"precision": "int4"}, {}),
    "mlx": ("mlx", {}, {}),
    "safetensors": ("safetensors", {"dtype": "float32"}, {}),
    "peft": ("peft", {}, {}),
}


def run_cli(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main([str(a) for a in args])
    return exited.value.code, capsys.readouterr().err.strip()


def field(path, key):
    f = GGUFReader(str(path)).get_field(key)
    return None if f is None else f.contents()
