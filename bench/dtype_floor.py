"""Measure the logit noise floor of rounding every weight to float16 / bfloat16.

This is the basis of the end-to-end bounds in blora_export/tolerance.py: a correct 16-bit
merge (each weight within half an ulp) moves the logits by about what rounding the base
alone does. Prints max |Δlogit| / max |logit| in units of the dtype's unit roundoff.

    python bench/dtype_floor.py
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "samples"))

from blora_export import api  # noqa: E402
from blora_export.base import BaseModel  # noqa: E402
from blora_export.numerics import logit_stats  # noqa: E402
from blora_export.reference import DEFAULT_PROMPTS, load_hf_model, model_logits, tokenize_prompts  # noqa: E402

UNIT = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def floor(base_dir: Path) -> dict:
    base = BaseModel.open(base_dir)
    ids = tokenize_prompts(base, DEFAULT_PROMPTS)
    model = load_hf_model(base_dir)
    ref = model_logits(model, ids)
    out = {}
    for dtype, u in UNIT.items():
        rounded = load_hf_model(base_dir)
        with torch.no_grad():
            for p in rounded.parameters():
                p.copy_(p.to(dtype).float())
        out[str(dtype)[6:]] = logit_stats(ref, model_logits(rounded, ids)).max_rel / u
    return out


def main() -> None:
    import tiny_models

    rows = {"samples/base (llama)": ROOT / "samples" / "base"}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ("mistral", "qwen2"):
            rows[f"tiny {arch}"] = tiny_models.make_base(Path(tmp) / arch, arch=arch)
        rows["tiny llama 512x4"] = tiny_models.make_base(Path(tmp) / "big", hidden_size=512, intermediate_size=1024,
                                                         num_layers=4, num_heads=8, num_kv_heads=4)
        print(f"{'model':<24} {'float16 (u)':>12} {'bfloat16 (u)':>13}")
        for name, path in rows.items():
            f = floor(path)
            print(f"{name:<24} {f['float16']:>12.2f} {f['bfloat16']:>13.2f}")
    for name in ("paper-q-blora", "paper-qa-blora", "qa-blora-q4_1", "q-blora-nf4"):
        for dtype, u in (("float16", 2.0**-11), ("bfloat16", 2.0**-8)):
            r = api.verify(ROOT / "samples" / name, dtype=dtype, quiet=True)
            print(f"verify samples/{name:<15} {dtype:<9} merged: {r.logits.max_rel / u:6.2f} u   "
                  f"adapter effect {r.adapter_effect:.2f}")


if __name__ == "__main__":
    main()
