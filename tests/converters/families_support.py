"""What the family tests share: the methods and formats they run, the CLI and GGUF helpers."""
import pytest
from gguf import GGUFReader

from blora_export import api
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


def verified(ckpt, out, fmt, method, formats=FORMATS):
    """Export ``ckpt`` as ``formats[fmt]`` and verify it: PASS with the error below a quarter of the
    adapter's effect, or, for a Q-BLoRA re-quantized to 4 bits (no exact fold: PTQ of a tiny random
    model), every check within its bound and verify saying INCONCLUSIVE."""
    kind, options, verify_options = formats[fmt]
    if method == "q-blora" and fmt in ("onnx-int4", "mlx"):
        options = {**options, "requantize": True}  # no exact fold for a Q-BLoRA: PTQ, bound from the base's
    api.export(ckpt, out, kind, quiet=True, **options)
    report = api.verify(ckpt, out, quiet=True, **verify_options)
    if options.get("requantize"):  # 4-bit PTQ of a tiny random model: verify says INCONCLUSIVE, not PASS
        assert report.logits_passed and report.layers_passed, report.to_json()
    else:
        assert report.passed and report.logits.max_rel < report.adapter_effect / 4, report.to_json()
    return report


def run_cli(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main([str(a) for a in args])
    return exited.value.code, capsys.readouterr().err.strip()


def field(path, key):
    f = GGUFReader(str(path)).get_field(key)
    return None if f is None else f.contents()
