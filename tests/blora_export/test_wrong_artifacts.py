"""verify's end-to-end check, by itself, fails every artifact that is wrong the ways exports go wrong.

Each wrong artifact is exported from a tampered copy of the checkpoint and verified against the
original: adapter dropped; one layer's adapter missing; λ off by 2x (update doubled); 1/λi
missing (update λi times too strong); zero-points folded with the wrong sign (update negated);
q and k swapped (each layer's q_proj update applied to k_proj and back; the base has as many
KV heads as heads so the shapes agree). The right artifact passes. ``report.logits_passed`` is
asserted alone (the per-layer checks would catch most of these too) and each test prints the
margin error / bound for the right and the wrong artifact.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from blora_export import api
from blora_export.spec import MinMaxGrid

ADAPTER = "adapter_model.safetensors"
LAMBDA_IN = 32


def _tamper(tensors: dict[str, torch.Tensor], how: str) -> dict[str, torch.Tensor]:
    out = dict(tensors)
    if how == "qk_swapped":
        for key in tensors:
            if ".q_proj." in key:
                other = key.replace(".q_proj.", ".k_proj.")
                out[key], out[other] = tensors[other], tensors[key]
        return out
    factor = {"adapter_dropped": 0.0, "lambda_2x": 2.0, "no_inverse_lambda": float(LAMBDA_IN), "wrong_sign": -1.0}
    for key, value in tensors.items():
        if how == "one_layer_missing":
            out[key] = torch.zeros_like(value) if ".layers.1." in key else value
        elif "lora_A" in key:
            out[key] = value * factor[how]
    return out


WRONG = ("adapter_dropped", "one_layer_missing", "lambda_2x", "no_inverse_lambda", "wrong_sign", "qk_swapped")


@pytest.fixture(scope="module")
def checkpoints(tiny_base, make_ckpt, tmp_path_factory):
    """The right QA-BLoRA checkpoint (4-bit 1x32 grid, λi=32, λo=4, heads = KV heads) and tampered copies."""
    base = tiny_base("llama", num_kv_heads=4)
    right = make_ckpt(base, "qa-blora", LAMBDA_IN, 4, base_quant=MinMaxGrid(bits=4, block_out=1, block_in=32))
    root = tmp_path_factory.mktemp("wrong")
    tensors = load_file(str(right / ADAPTER))
    made = {"right": right}
    for how in WRONG:
        copy = root / how
        shutil.copytree(right, copy)
        save_file(_tamper(tensors, how), str(copy / ADAPTER))
        made[how] = copy
    return made


EXPORTS = {
    # name: (format, export options, verify options)
    "safetensors-fp16": ("safetensors", {"dtype": "float16"}, {}),
    "gguf-q4_1-gguf-py": ("gguf", {}, {}),
    "gguf-q4_1-llama.cpp": ("gguf", {}, {"runtime": "llama.cpp"}),
    "gguf-f16-llama.cpp": ("gguf", {"gguf_type": "f16"}, {"runtime": "llama.cpp"}),
    "onnx-fp32": ("onnx", {"precision": "fp32"}, {}),
    "onnx-int4": ("onnx", {"precision": "int4"}, {}),
    "mlx-4bit": ("mlx", {}, {}),
    "peft": ("peft", {}, {}),
}
FAST = ("safetensors-fp16", "gguf-q4_1-gguf-py")
RUNTIME_MODULE = {"gguf-q4_1-llama.cpp": "llama_cpp", "gguf-f16-llama.cpp": "llama_cpp", "onnx-fp32": "onnxruntime",
                  "onnx-int4": "onnxruntime", "mlx-4bit": "mlx_lm", "peft": "peft"}
SUFFIX = {"gguf": ".gguf"}


def _margin(report) -> float:
    return report.logits.max_rel / report.tolerance.max_rel


def _verify(checkpoints, export_name: str, which: str, tmp_path: Path):
    fmt, export_options, verify_options = EXPORTS[export_name]
    out = tmp_path / f"{which}{SUFFIX.get(fmt, '')}"
    api.export(checkpoints[which], out, fmt, quiet=True, **export_options)
    return api.verify(checkpoints["right"], out, quiet=True, **verify_options)


def _params():
    for name in EXPORTS:
        marks = [] if name in FAST else [pytest.mark.slow]
        yield pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("export_name", _params())
def test_end_to_end_check_alone_fails_every_wrong_artifact(checkpoints, export_name, tmp_path):
    if export_name in RUNTIME_MODULE:
        pytest.importorskip(RUNTIME_MODULE[export_name])
    right = _verify(checkpoints, export_name, "right", tmp_path)
    margins = {"right": (_margin(right), right.logits.top1_agreement)}
    assert right.passed, right.to_json()
    failures = []
    for how in WRONG:
        report = _verify(checkpoints, export_name, how, tmp_path)
        margins[how] = (_margin(report), report.logits.top1_agreement)
        if report.logits_passed:
            failures.append(how)
    print(f"\n{export_name}: bound {right.tolerance.max_rel:.2e} ({right.tolerance.basis})")
    for how, (margin, top1) in margins.items():
        print(f"  {how:<20} error/bound {margin:8.2f}  top-1 {top1:.3f}")
    assert not failures, f"{export_name}: the end-to-end check passed wrong artifacts {failures}: {margins}"


def test_fold_aware_floor_is_the_base_without_the_adapter(checkpoints, tmp_path):
    """A fold-aware checkpoint's rounding floor is measured on the base as trained, without the adapter:
    far below the adapter's effect, so a dropped adapter fails the end-to-end check by itself."""
    folded = {}
    for which in ("right", "adapter_dropped"):
        copy = tmp_path / f"folded-{which}"
        shutil.copytree(checkpoints[which], copy)
        config = json.loads((copy / "blora_config.json").read_text())
        (copy / "blora_config.json").write_text(json.dumps({**config, "forward": "folded"}))
        folded[which] = copy
    merge = api.verify(folded["right"], quiet=True)
    assert merge.passed, merge.to_json()
    assert merge.rounding_floor < merge.adapter_effect / 20
    api.export(folded["adapter_dropped"], tmp_path / "dropped", "safetensors", quiet=True)
    dropped = api.verify(folded["right"], tmp_path / "dropped", quiet=True)
    print(f"\nfold-aware fp16 merge: floor {merge.rounding_floor:.2e}, bound {merge.tolerance.max_rel:.2e}, "
          f"effect {merge.adapter_effect:.2e}; dropped adapter error/bound {_margin(dropped):.1f}")
    assert not dropped.logits_passed


@pytest.mark.slow
def test_mistral_sliding_window_shorter_than_the_prompts_fails_in_llama_cpp(tiny_base, make_ckpt, tmp_path):
    """llama.cpp runs the GGUF without Mistral's sliding window: the floor no longer comes from a file
    made by the same writer, so the error is caught."""
    pytest.importorskip("llama_cpp")
    base = tmp_path / "mistral-sw"
    shutil.copytree(tiny_base("mistral"), base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "sliding_window": 8}))
    ckpt = make_ckpt(base, "qa-blora", LAMBDA_IN, 4, base_quant=MinMaxGrid(bits=4, block_out=1, block_in=32))
    out = tmp_path / "model.gguf"
    try:
        api.export(ckpt, out, "gguf", quiet=True)
    except Exception as exc:  # a writer that refuses sliding windows is right too
        pytest.skip(f"the GGUF writer refuses the sliding window: {exc}")
    exact = api.verify(ckpt, out, quiet=True)
    assert exact.passed, exact.to_json()  # the file's weights, in Mistral's own architecture, are right
    report = api.verify(ckpt, out, quiet=True, runtime="llama.cpp")
    print(f"\nmistral sliding window 8 in llama.cpp: error {report.logits.max_rel:.2e}, "
          f"bound {report.tolerance.max_rel:.2e} (error/bound {_margin(report):.1f})")
    assert not report.logits_passed and not report.passed


@pytest.fixture(scope="module")
def nf4_dropped(samples, tmp_path_factory):
    """The Q-BLoRA sample and a copy with its adapter zeroed."""
    copy = tmp_path_factory.mktemp("nf4") / "dropped"
    shutil.copytree(samples / "q-blora-nf4", copy)
    save_file(_tamper(load_file(str(copy / ADAPTER)), "adapter_dropped"), str(copy / ADAPTER))  # lora_A = 0
    return copy


def test_post_training_quantization_as_wide_as_the_adapter_is_inconclusive(samples, nf4_dropped, tmp_path):
    """4-bit re-quantization of the tiny Q-BLoRA sample costs the base alone about as much as the adapter
    does: the PTQ bound (4 x that floor) is no longer below effect/4, so verify cannot PASS either file."""
    from blora_export.verify import format_report

    for which, ckpt in (("right", samples / "q-blora-nf4"), ("dropped", nf4_dropped)):
        out = tmp_path / f"{which}.gguf"
        api.export(ckpt, out, "gguf", base=samples / "base", quiet=True, gguf_type="q4_0")
        report = api.verify(samples / "q-blora-nf4", out, quiet=True)
        print(f"\nq4_0 PTQ {which}: error {report.logits.max_rel:.2e}, bound {report.tolerance.max_rel:.2e}, "
              f"effect {report.adapter_effect:.2e}")
        assert report.inconclusive and not report.passed, report.to_json()
        assert report.to_json()["inconclusive"] is True
        assert "post-training" in report.tolerance.basis
        if which == "right":  # its layer checks pass (the dropped one's fail): the verdict says why it is not a PASS
            assert format_report(report).endswith("INCONCLUSIVE")


@pytest.mark.slow
def test_q8_0_in_llama_cpp_passes_and_its_dropped_adapter_fails(samples, nf4_dropped, tmp_path):
    pytest.importorskip("llama_cpp")
    reports = {}
    for which, ckpt in (("right", samples / "q-blora-nf4"), ("dropped", nf4_dropped)):
        out = tmp_path / f"{which}.gguf"
        api.export(ckpt, out, "gguf", base=samples / "base", quiet=True, gguf_type="q8_0")
        reports[which] = api.verify(samples / "q-blora-nf4", out, quiet=True, runtime="llama.cpp")
        print(f"\nq8_0 llama.cpp {which}: error/bound {_margin(reports[which]):.2f}")
    assert reports["right"].passed, reports["right"].to_json()
    assert not reports["dropped"].logits_passed
