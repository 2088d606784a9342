"""Reading checkpoints: both layouts, λ inference, and every kind of bad input."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from blora_export.checkpoint import load_checkpoint
from blora_export.errors import BadInputError, UnsupportedError


def copy_sample(samples, name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(samples / name, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(samples / "base")
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("name,method,layout,lams", [
    ("qa-blora-q4_1", "qa-blora", "native", (32, 4)),
    ("q-blora-nf4", "q-blora", "native", (2, 2)),
    ("paper-q-blora", "q-blora", "paper", (2, 2)),
    ("paper-qa-blora", "qa-blora", "paper", (4, 8)),
])
def test_samples_load_with_inferred_lambda(samples, name, method, layout, lams):
    ckpt, base = load_checkpoint(samples / name)
    assert (ckpt.method, ckpt.layout, ckpt.uniform_lambda()) == (method, layout, lams)
    assert len(ckpt.modules) == 14 and ckpt.scaling == 2.0
    assert base.model_type == "llama"


def test_lora_mora_key_and_adapter_name_suffix(samples, tmp_path):
    ckpt_dir = copy_sample(samples, "paper-qa-blora", tmp_path)
    tensors = load_file(str(ckpt_dir / "adapter_model.safetensors"))
    renamed = {k.replace("lora_A.weight", "lora_Mora.weight"): v for k, v in tensors.items()}
    save_file(renamed, str(ckpt_dir / "adapter_model.safetensors"))
    ckpt, _ = load_checkpoint(ckpt_dir)
    assert ckpt.method == "qa-blora" and ckpt.uniform_lambda() == (4, 8)


def test_rslora_scaling(samples, tmp_path):
    ckpt_dir = copy_sample(samples, "paper-q-blora", tmp_path)
    cfg = json.loads((ckpt_dir / "adapter_config.json").read_text())
    cfg.update(use_rslora=True)
    (ckpt_dir / "adapter_config.json").write_text(json.dumps(cfg))
    ckpt, _ = load_checkpoint(ckpt_dir)
    assert ckpt.scaling == pytest.approx(16 / 8**0.5)


def rewrite_tensors(ckpt_dir, edit):
    path = ckpt_dir / "adapter_model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def test_every_problem_is_reported_at_once(samples, tmp_path):
    ckpt_dir = copy_sample(samples, "paper-q-blora", tmp_path)

    def edit(t):
        t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(16, 48)  # 128/48
        t["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"][0, 0] = float("nan")
        del t["base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"]
    rewrite_tensors(ckpt_dir, edit)
    with pytest.raises(BadInputError) as err:
        load_checkpoint(ckpt_dir)
    msg = str(err.value)
    assert "3 problems" in msg and "not a whole number" in msg and "NaN" in msg and "no lora_A" in msg
    assert "\n" not in msg


def test_native_config_disagreement_names_modules(samples, tmp_path):
    ckpt_dir = copy_sample(samples, "qa-blora-q4_1", tmp_path)
    cfg = json.loads((ckpt_dir / "blora_config.json").read_text())
    cfg["lambda_out"] = 8
    (ckpt_dir / "blora_config.json").write_text(json.dumps(cfg))
    with pytest.raises(BadInputError, match="14 problems.*lambda_out=4 but blora_config.json says.*lambda_out=8"):
        load_checkpoint(ckpt_dir)


@pytest.mark.parametrize("damage,error,match", [
    (lambda d: (d / "adapter_model.safetensors").write_bytes((d / "adapter_model.safetensors").read_bytes()[:500]),
     BadInputError, "truncated"),
    (lambda d: ((d / "adapter_model.safetensors").unlink(), (d / "adapter_model.bin").write_bytes(b"\x80\x04")),
     UnsupportedError, "never unpickles"),
    (lambda d: (d / "adapter_config.json").write_text("{not json"), BadInputError, "not valid JSON"),
    (lambda d: (d / "adapter_config.json").unlink(), BadInputError, "no adapter_config.json"),
    (lambda d: (d / "blora_config.json").write_text('{"method": "lora", "lambda_in": 0}'), BadInputError,
     "method must be one of.*lambda_in must be"),
])
def test_bad_files(samples, tmp_path, damage, error, match):
    ckpt_dir = copy_sample(samples, "qa-blora-q4_1", tmp_path)
    damage(ckpt_dir)
    with pytest.raises(error, match=match):
        load_checkpoint(ckpt_dir)


def test_missing_base_and_pickled_base(samples, tmp_path):
    ckpt_dir = copy_sample(samples, "paper-q-blora", tmp_path)
    with pytest.raises(BadInputError, match="is not a folder; pass --base"):
        load_checkpoint(ckpt_dir, tmp_path / "nope")
    cfg = json.loads((ckpt_dir / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "meta-llama/Llama-2-7b-hf"
    (ckpt_dir / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(BadInputError, match="not a local folder \\(nothing is downloaded\\); pass --base"):
        load_checkpoint(ckpt_dir)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(samples / "base" / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(UnsupportedError, match="never unpickles.*safetensors"):
        load_checkpoint(ckpt_dir, pickled)


def test_folded_forward_is_read_and_validated(samples, tmp_path):
    ckpt_dir = copy_sample(samples, "qa-blora-q4_1", tmp_path)
    cfg = json.loads((ckpt_dir / "blora_config.json").read_text())
    (ckpt_dir / "blora_config.json").write_text(json.dumps({**cfg, "forward": "folded"}))
    ckpt, _ = load_checkpoint(ckpt_dir)
    assert ckpt.folded_forward
    (ckpt_dir / "blora_config.json").write_text(json.dumps({**cfg, "forward": "sideways"}))
    with pytest.raises(BadInputError, match="forward must be one of"):
        load_checkpoint(ckpt_dir)
    nf4 = copy_sample(samples, "q-blora-nf4", tmp_path)
    cfg = json.loads((nf4 / "blora_config.json").read_text())
    (nf4 / "blora_config.json").write_text(json.dumps({**cfg, "forward": "folded"}))
    with pytest.raises(BadInputError, match="needs method qa-blora on a min-max base_quant"):
        load_checkpoint(nf4)


@pytest.mark.parametrize("edit,match", [
    (lambda c, b: c.update(use_rslora="yes"), "use_rslora must be true or false"),
    (lambda c, b: c.update(use_dora=True), "use_dora: true is not supported"),
    (lambda c, b: c.update(peft_type="IA3"), "not a LoRA-style adapter"),
    (lambda c, b: c.update(rank_pattern={"q_proj": 4}), "rank_pattern is not supported"),
    (lambda c, b: c.update(base_model_name_or_path=5), "must be a string"),
    (lambda c, b: b["base_quant"].update(block_in="32"), "block_in must be a whole number"),
    (lambda c, b: b["base_quant"].update(bits=4.9), "bits must be a whole number"),
    (lambda c, b: b.update(format_version="1"), "format_version '1' is not supported"),
])
def test_config_types_are_checked(samples, tmp_path, edit, match):
    ckpt_dir = copy_sample(samples, "qa-blora-q4_1", tmp_path)
    cfg = json.loads((ckpt_dir / "adapter_config.json").read_text())
    blora = json.loads((ckpt_dir / "blora_config.json").read_text())
    edit(cfg, blora)
    (ckpt_dir / "adapter_config.json").write_text(json.dumps(cfg))
    (ckpt_dir / "blora_config.json").write_text(json.dumps(blora))
    with pytest.raises(BadInputError, match=match):
        load_checkpoint(ckpt_dir)


def test_blora_config_that_is_not_a_file(samples, tmp_path):
    ckpt_dir = copy_sample(samples, "paper-q-blora", tmp_path)
    (ckpt_dir / "blora_config.json").mkdir()
    with pytest.raises(BadInputError, match="is not a file"):
        load_checkpoint(ckpt_dir)
