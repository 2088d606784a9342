"""The merged Hugging Face folder: transformers loads it unmodified and computes the trained function."""
import json

import pytest
import torch

from blora_export import api
from blora_export.checkpoint import load_checkpoint
from blora_export.errors import UnsupportedError
from blora_export.merge import exact_merged_weight, resolve_merge_plan
from blora_export.numerics import half_ulp_ratio
from blora_export.reference import load_hf_model


@pytest.mark.parametrize("name,dtype", [("qa-blora-q4_1", "float16"), ("q-blora-nf4", "bfloat16")])
def test_transformers_loads_the_merge_and_weights_are_correctly_rounded(samples, tmp_path, name, dtype):
    out = tmp_path / "merged"
    result = api.export(samples / name, out, "safetensors", dtype=dtype, quiet=True)
    assert result.details["dtype"] == dtype and (out / "tokenizer.json").is_file()
    model = load_hf_model(out, torch.float32)
    ckpt, base = load_checkpoint(samples / name)
    plan = resolve_merge_plan(ckpt)
    assert plan.merge_into == "dequantized"
    stored = load_hf_model(out, getattr(torch, dtype))
    for module in ckpt.modules.values():
        exact = exact_merged_weight(module.weight_name, base.tensor(module.weight_name), ckpt, plan)
        w = stored.get_parameter(module.weight_name).detach()
        assert w.dtype == getattr(torch, dtype) and half_ulp_ratio(w, exact) <= 0.5
    del model, stored
    report = api.verify(samples / name, out, quiet=True)
    assert report.passed, report.to_json()


def test_sharded_output_has_an_index_and_loads(samples, tmp_path):
    out = tmp_path / "sharded"
    result = api.export(samples / "paper-qa-blora", out, "safetensors", dtype="float32",
                        max_shard_bytes=400_000, quiet=True)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert result.details["shards"] == len(set(index["weight_map"].values())) > 1
    assert api.verify(samples / "paper-qa-blora", out, quiet=True).passed


def test_failure_midway_leaves_no_output(samples, tmp_path, monkeypatch):
    import converters.to_safetensors as mod

    def exploding(*args, **kwargs):
        yield "model.embed_tokens.weight", torch.zeros(2, 2)
        raise RuntimeError("disk full")
    monkeypatch.setattr(mod, "merged_tensors", exploding)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk full"):
        api.export(samples / "paper-q-blora", out, "safetensors", quiet=True)
    assert list(tmp_path.iterdir()) == []


def test_merge_into_dequantized_needs_a_recorded_base(samples, tmp_path):
    with pytest.raises(UnsupportedError, match="use --merge-into original"):
        api.export(samples / "paper-q-blora", tmp_path / "x", "safetensors", merge_into="dequantized")


def test_deterministic_bytes(samples, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        api.export(samples / "q-blora-nf4", out, "safetensors", quiet=True)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
