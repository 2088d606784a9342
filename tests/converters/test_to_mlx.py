"""Low-bit mlx-lm folders: mlx-lm loads them and reproduces the training-time logits.

QA-BLoRA on its min-max grid keeps its codes and α and folds the update into the biases;
the tests check the bytes against the checkpoint's own quantization, the packing against
mlx's own dequantize, and the logits of ``mlx_lm.load`` against the training-time model.
A bias without the 1/λi (the paper merge.py's bug) must fail.
"""
import json

import mlx.core as mx  # a declared test dependency: mlx[cpu] and mlx-lm (.ci/run installs them)
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from blora_export import api
from blora_export.errors import UnsupportedError
from blora_export.merge import resolve_merge_plan
from blora_export.quant import quantize_minmax, to_row_blocks
from blora_export.spec import MinMaxGrid
from blora_export.verify import run_verify
from converters import to_mlx


def verify(ckpt, out, **job_options):
    """verify with this converter's open_artifact (what `blora-export verify CKPT OUT` runs)."""
    job = api.open_job(ckpt, quiet=True, **job_options)
    assert to_mlx.detect(out)
    return run_verify(job, to_mlx.open_artifact(out, job))


def worst(report, check):
    return max(c.value for c in report.layers if c.check.startswith(check))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_packing_round_trips_and_matches_mlx_dequantize(bits):
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (6, 128), generator=gen, dtype=torch.uint8)
    words = to_mlx.pack_codes(codes, bits)
    assert words.dtype == torch.uint32 and words.shape == (6, 128 * bits // 32)
    assert torch.equal(to_mlx.unpack_codes(words, bits), codes)
    ones, zeros = mx.ones((6, 4)), mx.zeros((6, 4))
    got = mx.dequantize(mx.array(words.numpy()), ones, zeros, group_size=32, bits=bits)
    assert np.array_equal(np.array(got), codes.numpy().astype(np.float32))
    # and mlx's own quantizer's words decode with our unpacker to what mlx dequantizes
    w = mx.array(torch.randn(6, 128, generator=gen).numpy())
    ref_words, scales, biases = mx.quantize(w, group_size=32, bits=bits)
    mine = to_mlx.unpack_codes(torch.from_numpy(np.array(ref_words)), bits).numpy().astype(np.float32)
    ours = mine * np.repeat(np.array(scales), 32, 1) + np.repeat(np.array(biases), 32, 1)
    theirs = np.array(mx.dequantize(ref_words, scales, biases, group_size=32, bits=bits))
    assert np.allclose(ours, theirs, rtol=0, atol=1e-6)
    assert torch.equal(to_mlx.pack_codes(torch.from_numpy(mine.astype(np.uint8)), bits),
                       torch.from_numpy(np.array(ref_words)))


@pytest.mark.slow
def test_qa_blora_exports_its_own_codes_and_mlx_lm_matches_training(samples, tmp_path):
    out = tmp_path / "mlx"
    result = api.export(samples / "qa-blora-q4_1", out, "mlx", quiet=True)
    assert (result.details["bits"], result.details["group_size"]) == (4, 32)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    assert json.loads((out / "blora_export.json").read_text())["route"] == "fold"
    tensors = load_file(str(out / "model.safetensors"))
    assert tensors["model.embed_tokens.weight"].dtype == torch.float32  # embeddings/head/norms stay float
    assert "lm_head.scales" not in tensors and "model.norm.scales" not in tensors
    # the codes are byte-identical to the checkpoint's own quantization; scales are α exactly
    from blora_export.base import BaseModel
    base = BaseModel.open(samples / "base")
    name = "model.layers.1.mlp.down_proj.weight"
    qw = quantize_minmax(base.tensor(name), MinMaxGrid(4, 1, 32), name)
    assert torch.equal(tensors[name], to_mlx.pack_codes(qw.codes, 4))
    assert torch.equal(tensors[name.replace("weight", "scales")], to_row_blocks(qw, 32)[0])
    report = verify(samples / "qa-blora-q4_1", out)
    assert report.passed, report.to_json()
    assert worst(report, "codes differing") == 0 and worst(report, "mlx.dequantize") == 0
    assert worst(report, "|biases - exact") <= 0.5 + 1e-6
    assert report.logits.max_rel < 5e-3 and report.adapter_effect > 0.5  # measured 3.6e-3 vs effect 1.13


@pytest.mark.slow
def test_float32_biases_are_tighter(samples, tmp_path):
    out = tmp_path / "mlx32"
    api.export(samples / "qa-blora-q4_1", out, "mlx", bias_dtype="float32", quiet=True)
    assert load_file(str(out / "model.safetensors"))["model.layers.0.self_attn.q_proj.biases"].dtype == torch.float32
    report = verify(samples / "qa-blora-q4_1", out)
    assert report.passed and report.logits.max_rel < 1e-5, report.to_json()  # measured 2.8e-6


@pytest.mark.slow
def test_bias_without_one_over_lambda_in_fails(samples, tmp_path):
    """The paper merge.py's bug, written into the file: β + s·H (no /λi). verify must fail."""
    out = tmp_path / "mlx"
    api.export(samples / "qa-blora-q4_1", out, "mlx", bias_dtype="float32", quiet=True)
    job = api.open_job(samples / "qa-blora-q4_1", quiet=True)
    tensors = load_file(str(out / "model.safetensors"))
    for module in job.ckpt.modules.values():
        stem = module.name
        qw = quantize_minmax(job.base.tensor(module.weight_name), job.ckpt.base_quant, module.weight_name)
        beta = to_row_blocks(qw, 32)[1].double()
        folded = tensors[stem + ".biases"].double()
        tensors[stem + ".biases"] = (beta + (folded - beta) * module.lambda_in).float()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "mlx"})
    report = run_verify(job, to_mlx.open_artifact(out, job))
    assert not report.layers_passed and not report.logits_passed
    assert report.logits.max_rel > 0.1


def test_group_that_does_not_divide_the_grid_is_refused_with_a_hint(samples, tmp_path):
    with pytest.raises(UnsupportedError, match="does not divide the grid's block_in 32.*--requantize"):
        api.export(samples / "qa-blora-q4_1", tmp_path / "x", "mlx", group_size=64, quiet=True)
    with pytest.raises(UnsupportedError, match="Q-BLoRA.*--requantize"):
        api.export(samples / "q-blora-nf4", tmp_path / "x", "mlx", quiet=True)
    with pytest.raises(UnsupportedError, match="the grid has 4-bit codes, MLX 8-bit group 32 stores 8-bit codes"):
        api.export(samples / "qa-blora-q4_1", tmp_path / "x", "mlx", bits=8, quiet=True)
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def qa8(samples, make_ckpt):
    """A QA-BLoRA checkpoint on an 8-bit 1x32 min-max grid (λi = 32, λo = 4), branch-trained."""
    return make_ckpt(samples / "base", "qa-blora", 32, 4, base_quant=MinMaxGrid(8, 1, 32), seed=11)


@pytest.mark.slow
def test_8_bit_grid_folds_into_mlx_8_bit_and_mlx_lm_matches_training(qa8, samples, tmp_path):
    """Bits and group follow the checkpoint's grid (8, 32); codes one byte each in the uint32 words, α exact,
    biases β' in float32 (the default for a branch-trained checkpoint): verify's float32 bound holds in mlx-lm."""
    out = tmp_path / "mlx8"
    result = api.export(qa8, out, "mlx", quiet=True)
    assert (result.details["bits"], result.details["group_size"], result.details["bias_dtype"]) == (8, 32, "float32")
    assert json.loads((out / "config.json").read_text())["quantization"] == {"group_size": 32, "bits": 8,
                                                                            "mode": "affine"}
    tensors = load_file(str(out / "model.safetensors"))
    from blora_export.base import BaseModel
    name = "model.layers.0.mlp.gate_proj.weight"
    qw = quantize_minmax(BaseModel.open(samples / "base").tensor(name), MinMaxGrid(8, 1, 32), name)
    assert tensors[name].shape == (qw.codes.shape[0], qw.codes.shape[1] // 4)
    assert torch.equal(tensors[name], to_mlx.pack_codes(qw.codes, 8))
    report = verify(qa8, out)
    assert report.passed, report.to_json()
    assert worst(report, "codes differing") == 0 and worst(report, "mlx.dequantize") == 0
    assert report.tolerance.max_rel == 1e-5 and report.logits.max_rel < 1e-5  # measured 2.1e-6
    assert report.adapter_effect > 0.5


@pytest.mark.slow
def test_8_bit_fold_without_the_update_fails(qa8, tmp_path):
    """The fold dropped (biases = the grid's β, the base without the adapter): verify must fail."""
    out = tmp_path / "mlx8"
    api.export(qa8, out, "mlx", quiet=True)
    job = api.open_job(qa8, quiet=True)
    tensors = load_file(str(out / "model.safetensors"))
    for module in job.ckpt.modules.values():
        qw = quantize_minmax(job.base.tensor(module.weight_name), job.ckpt.base_quant, module.weight_name)
        tensors[module.name + ".biases"] = to_row_blocks(qw, 32)[1].float()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "mlx"})
    report = run_verify(job, to_mlx.open_artifact(out, job))
    assert not report.layers_passed and not report.logits_passed
    assert report.logits.max_rel > 100 * report.tolerance.max_rel


def test_8_bit_grid_refuses_other_widths_naming_what_folds(qa8, tmp_path):
    with pytest.raises(UnsupportedError, match=r"the grid has 8-bit codes, MLX 4-bit group 32 stores 4-bit codes "
                                               r"\(an 8-bit grid folds into to-onnx --precision int8, "
                                               r"to-safetensors --layout mlx --bits 8\).*--requantize"):
        api.export(qa8, tmp_path / "x", "mlx", bits=4, quiet=True)
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_requantize_is_min_max_of_the_exact_merge_and_reports_its_error(samples, tmp_path):
    out = tmp_path / "ptq"
    result = api.export(samples / "q-blora-nf4", out, "mlx", group_size=64, requantize=True, quiet=True)
    assert "post-training quantization" in result.details["route"]
    assert 0 < result.details["ptq_error"]["weight_max_rel"] < 0.2
    job = api.open_job(samples / "q-blora-nf4", quiet=True)
    assert job.plan == resolve_merge_plan(job.ckpt)
    checks = to_mlx.layer_checks(job, out, to_mlx.artifact_plan(out, job))
    assert checks and all(c.passed for c in checks), [c for c in checks if not c.passed]


@pytest.mark.slow
def test_qwen2_with_biases_and_tied_embeddings(tiny_base, make_ckpt, tmp_path):
    base = tiny_base("qwen2", tie_word_embeddings=True)
    ckpt = make_ckpt(base, "qa-blora", 32, 2, base_quant=MinMaxGrid(bits=4, block_out=1, block_in=32))
    out = tmp_path / "mlx"
    api.export(ckpt, out, "mlx", bias_dtype="float32", quiet=True)
    report = verify(ckpt, out)
    assert report.passed and report.logits.max_rel < 1e-5, report.to_json()


@pytest.mark.slow
def test_cli_verify_detects_the_mlx_folder(samples, tmp_path):
    from blora_export.cli import main

    out = tmp_path / "mlx"
    main(["to-safetensors", str(samples / "qa-blora-q4_1"), str(out), "--layout", "mlx", "-q"])
    with pytest.raises(SystemExit) as exit_info:
        main(["verify", str(samples / "qa-blora-q4_1"), str(out), "-q", "--json", str(tmp_path / "r.json")])
    report = json.loads((tmp_path / "r.json").read_text())
    assert exit_info.value.code == 0 and report["passed"] and report["description"].startswith("mlx-lm folder")
