"""Base models: sharded safetensors, llama / mistral / qwen2, verify and merge on each."""
import pytest

from blora_export import api
from blora_export.base import BaseModel
from blora_export.spec import MinMaxGrid, NF4Base


def test_sharded_base_reads_lazily(tiny_base):
    base = BaseModel.open(tiny_base("llama", shards=3))
    assert len(set(base.shards.values())) == 3
    assert base.shape("model.layers.1.mlp.down_proj.weight") == (128, 256)
    assert len(base.linear_names()) == 14


@pytest.mark.parametrize("arch,method,lams,quant", [
    ("qwen2", "qa-blora", (32, 4), MinMaxGrid(4, 1, 32)),
    ("mistral", "q-blora", (2, 2), NF4Base(64, True)),
    ("qwen2", "q-blora", (4, 2), None),
])
def test_architectures_verify_and_merge(tiny_base, make_ckpt, tmp_path, arch, method, lams, quant):
    base = tiny_base(arch, shards=2)
    ckpt = make_ckpt(base, method, *lams, base_quant=quant, layout="native" if quant else "paper")
    assert api.verify(ckpt, quiet=True).passed
    out = tmp_path / "merged"
    api.export(ckpt, out, "safetensors", dtype="bfloat16", quiet=True)
    report = api.verify(ckpt, out, quiet=True)
    assert report.passed, report.to_json()


def test_non_finite_base_weight_is_bad_input(samples, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from blora_export.errors import BadInputError

    base = tmp_path / "base"
    shutil.copytree(samples / "base", base)
    tensors = load_file(str(base / "model.safetensors"))
    tensors["model.layers.0.mlp.up_proj.weight"][3, 5] = float("inf")
    save_file(tensors, str(base / "model.safetensors"))
    with pytest.raises(BadInputError, match="up_proj.weight .* NaN or infinite"):
        api.export(samples / "paper-q-blora", tmp_path / "out", "safetensors", base=base, quiet=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("edit,match", [
    ({"vocab_size": 600}, "embed_tokens.weight is \\[512, 128\\] but vocab_size, hidden_size = 600, 128"),
    ({"num_hidden_layers": 3}, "num_hidden_layers is 3 but the weights hold 2 layers"),
    ({"hidden_size": "128"}, "hidden_size must be a whole number"),
])
def test_config_must_agree_with_the_weights(samples, tmp_path, edit, match):
    import json
    import shutil

    from blora_export.errors import BadInputError

    base = tmp_path / "base"
    shutil.copytree(samples / "base", base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(BadInputError, match=match):
        BaseModel.open(base)
