"""Measured errors of the GGUF export: adapter-on vs the runtime's own floor vs post-training quantization.

    python bench/gguf_errors.py [--ckpt samples/qa-blora-q4_1] [--out DIR]

Every row is ``max |Δlogit| / max |reference logit|`` (and top-1 agreement) over the built-in
prompts, against the training-time model (base as trained + adapter branches), or for the
"floor" rows a ``--base-only`` file (same codes, no adapter) against the trained base.
Needs llama-cpp-python. Prints a Markdown table, then the export time and sizes.
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
from gguf import GGUFReader

from blora_export import api
from blora_export.numerics import logit_stats
from blora_export.reference import DEFAULT_PROMPTS, reference_logits, tokenize_prompts
from converters.gguf_runtime import gguf_py_model_logits, llama_cpp_logits

log = logging.getLogger("bench.gguf_errors")
ROOT = Path(__file__).resolve().parents[1]

# name: (export options, runtime, reference: "trained" or "base", what it measures)
ROWS = {
    "f32-llama.cpp": ({"gguf_type": "f32"}, "llama.cpp", "trained", "f32 export (F16 KV cache)"),
    "f32-floor-llama.cpp": ({"gguf_type": "f32", "base_only": True}, "llama.cpp", "base", "f32 base, no adapter"),
    "fold-llama.cpp": ({}, "llama.cpp", "trained", "q4_1 fold, adapter on"),
    "fold-floor-llama.cpp": ({"base_only": True}, "llama.cpp", "base", "q4_1 same codes, no adapter (floor)"),
    "ptq-same-grid-llama.cpp": ({"force_requantize": True}, "llama.cpp", "trained",
                                "merge (trained base) then gguf Q4_1 RTN"),
    "ptq-original-llama.cpp": ({"merge_into": "original", "requantize": True, "gguf_type": "q4_1"}, "llama.cpp",
                               "trained", "merge into original fp weights then Q4_1 (usual pipeline)"),
    "fold-gguf-py": ({}, "gguf-py", "trained", "q4_1 fold, transformers' GGUF loader"),
    "ptq-same-grid-gguf-py": ({"force_requantize": True}, "gguf-py", "trained", "merge then Q4_1 RTN"),
    "ptq-original-gguf-py": ({"merge_into": "original", "requantize": True, "gguf_type": "q4_1"}, "gguf-py",
                             "trained", "merge into original then Q4_1"),
    "f32-gguf-py": ({"gguf_type": "f32"}, "gguf-py", "trained", "f32 export"),
}


def differing_blocks(a: Path, b: Path) -> dict:
    """How many Q4_1 blocks differ in d, m or codes between two files."""
    tb = {t.name: t for t in GGUFReader(str(b)).tensors}
    counts = {"blocks": 0, "d": 0, "m": 0, "codes": 0}
    for t in GGUFReader(str(a)).tensors:
        if t.tensor_type.name != "Q4_1":
            continue
        x, y = np.asarray(t.data).reshape(-1, 20), np.asarray(tb[t.name].data).reshape(-1, 20)
        counts["blocks"] += len(x)
        for key, sl in (("d", slice(0, 2)), ("m", slice(2, 4)), ("codes", slice(4, None))):
            counts[key] += int((x[:, sl] != y[:, sl]).any(axis=1).sum())
    return counts


def measure(ckpt: Path, out: Path) -> None:
    job = api.open_job(ckpt, quiet=True)
    ids = tokenize_prompts(job.base, DEFAULT_PROMPTS)
    ref = reference_logits(job.base, job.ckpt, job.plan, ids)
    refs = {"trained": ref.trained, "base": ref.without_adapter}
    files, results = {}, {}
    for name, (options, runtime, against, _) in ROWS.items():
        key = tuple(sorted(options.items()))
        if key not in files:
            files[key] = out / f"{name}.gguf"
            api.export(ckpt, files[key], "gguf", quiet=True, **options)
        run = llama_cpp_logits if runtime == "llama.cpp" else gguf_py_model_logits
        results[name] = logit_stats(refs[against], run(files[key], ids))
    same = logit_stats(gguf_py_model_logits(files[()], ids), llama_cpp_logits(files[()], ids))
    adapter, base, merged = out / "adapter.gguf", files[(("base_only", True), ("gguf_type", "f32"))], \
        files[(("gguf_type", "f32"),)]
    api.export(ckpt, adapter, "gguf", quiet=True, adapter_only=True)
    lora = llama_cpp_logits(base, ids, lora=adapter)
    print(f"checkpoint: {ckpt} ({job.ckpt.method}; {job.plan.describe()})")
    print(f"adapter effect (training-time vs no adapter): {logit_stats(ref.trained, ref.without_adapter).max_rel:.3e}\n")
    print("| row | runtime | max rel | top-1 | what |\n| --- | --- | --- | --- | --- |")
    for name, (_, runtime, _, what) in ROWS.items():
        s = results[name]
        print(f"| {name} | {runtime} | {s.max_rel:.3e} | {s.top1_agreement:.3f} | {what} |")
    print(f"| same-file | llama.cpp vs gguf-py | {same.max_rel:.3e} | {same.top1_agreement:.3f} | "
          "fold file: llama.cpp's 8-bit activations alone |")
    print(f"| adapter | llama.cpp | {logit_stats(ref.trained, lora).max_rel:.3e} | "
          f"{logit_stats(ref.trained, lora).top1_agreement:.3f} | f32 base + --adapter-only |")
    print(f"| adapter vs merged | llama.cpp | {logit_stats(llama_cpp_logits(merged, ids), lora).max_rel:.3e} | - | "
          "base + adapter vs merged f32 export |")
    ratio = results["fold-llama.cpp"].max_rel / results["fold-floor-llama.cpp"].max_rel
    print(f"\nllama.cpp q4_1: adapter-on / floor = {ratio:.2f}; "
          f"f32: {results['f32-llama.cpp'].max_rel / results['f32-floor-llama.cpp'].max_rel:.2f}")
    diff = differing_blocks(files[()], files[(("force_requantize", True),)])
    print(f"fold vs merge-then-Q4_1-RTN on the same grid: {diff}")


def timing(ckpt: Path, out: Path) -> None:
    for options in ({}, {"gguf_type": "f16"}, {"adapter_only": True}):
        path = out / "timed.gguf"
        start = time.perf_counter()
        result = api.export(ckpt, path, "gguf", quiet=True, **options)
        print(f"export {options or 'default'}: {time.perf_counter() - start:.2f} s wall "
              f"({result.seconds:.2f} s in export), {path.stat().st_size} bytes, type {result.details['type']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, default=ROOT / "samples" / "qa-blora-q4_1")
    parser.add_argument("--out", type=Path, default=None, help="keep the files here (default: a temporary folder)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="gguf-bench-") as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        measure(args.ckpt, out)
        timing(args.ckpt, out)


if __name__ == "__main__":
    main()
