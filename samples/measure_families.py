"""Measure the families x formats table of the README: relative logit error of each export in its
real runtime against the training-time model (``api.verify``), on tiny offline bases.

    python samples/measure_families.py [--method qa-blora|q-blora] [--arch llama3 ...]

Prints a Markdown table; each cell is ``max_rel`` (max |Δlogit| / max |logit| over the built-in
prompts) and ``/ bound`` verify's bound for that artifact (FAIL marks a failed verify).
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import make_samples  # noqa: E402
import tiny_models  # noqa: E402

from blora_export import api  # noqa: E402
from blora_export.spec import MinMaxGrid  # noqa: E402

METHODS = {"qa-blora": (32, 4, MinMaxGrid(4, 1, 32)), "q-blora": (2, 2, None)}
# column: (format, export options, verify options)
COLUMNS = {
    "GGUF f32 (llama.cpp)": ("gguf", {"gguf_type": "f32"}, {"runtime": "llama.cpp"}),
    "GGUF default (llama.cpp)": ("gguf", {}, {"runtime": "llama.cpp"}),
    "ONNX fp32 (onnxruntime)": ("onnx", {}, {}),
    "ONNX int4 (onnxruntime)": ("onnx", {"precision": "int4"}, {}),
    "MLX 4-bit (mlx-lm)": ("mlx", {}, {}),
    "safetensors f32 (transformers)": ("safetensors", {"dtype": "float32"}, {}),
    "PEFT (transformers+PEFT)": ("peft", {}, {}),
}


def cell(ckpt: Path, out: Path, kind: str, options: dict, verify_options: dict, method: str) -> str:
    if method == "q-blora" and kind in ("mlx",) or (method == "q-blora" and options.get("precision") == "int4"):
        options = {**options, "requantize": True}
    try:
        api.export(ckpt, out, kind, quiet=True, **options)
        report = api.verify(ckpt, out, quiet=True, **verify_options)
    except Exception as exc:  # a refusal is the cell's content
        return f"refused: {str(exc).splitlines()[0][:80]}"
    mark = "" if report.passed else " FAIL"
    return f"{report.logits.max_rel:.1e} / {report.tolerance.max_rel:.1e}{mark}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", default="qa-blora", choices=list(METHODS))
    parser.add_argument("--arch", nargs="*", default=["llama", "mistral", "qwen2", "llama3", "qwen3", "granite", "smollm3", "gemma2",
                                                       "gemma3_text", "phi3"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    li, lo, quant = METHODS[args.method]
    print("| family | " + " | ".join(COLUMNS) + " |")
    print("| --- " * (len(COLUMNS) + 1) + "|")
    with tempfile.TemporaryDirectory(prefix="blora-families-") as tmp:
        root = Path(tmp)
        for arch in args.arch:
            base = tiny_models.make_base(root / arch / "base", arch=arch)
            ckpt = make_samples.make_checkpoint(root / arch / "ckpt", base, args.method, li, lo, base_quant=quant)
            cells = [cell(ckpt, root / arch / f"out{i}{'.gguf' if kind == 'gguf' else ''}", kind, o, v, args.method)
                     for i, (kind, o, v) in enumerate(COLUMNS.values())]
            print(f"| {arch} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
