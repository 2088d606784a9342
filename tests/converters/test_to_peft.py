"""Standard LoRA adapters: PEFT (and mlx-lm) load them on the unmodified base and compute W + ΔW.

The reference here is built independently of the converter: the base's own transformers
model with the adapter *branch* (pool -> matmul -> repeat) hooked onto each Linear, as trained.
A factor without the 1/λi, or a wrong lora_alpha, must fail.
"""
import json
import math

import peft  # a declared test dependency (.ci/run installs it)
import pytest
from safetensors.torch import load_file, save_file

from blora_export import api
from blora_export.numerics import logit_stats
from blora_export.reference import DEFAULT_PROMPTS, adapter_branches, load_hf_model, model_logits, tokenize_prompts
from blora_export.verify import run_verify
from converters import to_peft


def verify(ckpt, out, **job_options):
    job = api.open_job(ckpt, quiet=True, **job_options)
    assert to_peft.detect(out)
    return run_verify(job, to_peft.open_artifact(out, job))


def branch_reference(job, prompts):
    """W + ΔW as the adapter branch computes it, on the original base weights."""
    model = load_hf_model(job.base.path)
    with adapter_branches(model, list(job.ckpt.modules.values())):
        return model_logits(model, prompts)


@pytest.mark.parametrize("name", ["q-blora-nf4", "paper-qa-blora"])
def test_peft_on_the_unmodified_base_computes_w_plus_delta(samples, tmp_path, name):
    out = tmp_path / "adapter"
    api.export(samples / name, out, "peft", quiet=True)
    job = api.open_job(samples / name, merge_into="original", quiet=True)
    prompts = tokenize_prompts(job.base, DEFAULT_PROMPTS)
    model = peft.PeftModel.from_pretrained(load_hf_model(samples / "base"), str(out))
    got = model_logits(model.eval(), prompts)
    stats = logit_stats(branch_reference(job, prompts), got)
    assert stats.max_rel < 1e-5 and stats.top1_agreement == 1.0, stats  # measured 1.0e-6 .. 2.1e-6
    weights = load_file(str(out / "adapter_model.safetensors"))
    module = next(iter(job.ckpt.modules.values()))
    a = weights[f"base_model.model.{module.name}.lora_A.weight"]
    b = weights[f"base_model.model.{module.name}.lora_B.weight"]
    assert a.shape[1] == module.in_features and b.shape[0] == module.out_features


def test_ranks_and_alpha_give_exactly_s(samples, tmp_path):
    out = tmp_path / "adapter"
    api.export(samples / "qa-blora-q4_1", out, "peft", quiet=True)
    config = json.loads((out / "adapter_config.json").read_text())
    # QA-BLoRA λi=32 λo=4 on hidden 128 / intermediate 256: H is [out/4, in/32] -> rank in/32
    assert (config["r"], config["rank_pattern"]) == (4, {"down_proj": 8})
    assert config["lora_alpha"] / config["r"] == 2.0 and config["alpha_pattern"] == {"down_proj": 16.0}
    loaded = peft.LoraConfig.from_pretrained(str(out))
    assert loaded.rank_pattern == {"down_proj": 8}
    for scaling in (0.1, 1 / 3, 2.0, 16 / math.sqrt(8), 1e-3):
        for rank in (1, 3, 4, 7, 344):
            padded = to_peft.exact_rank(scaling, rank)
            assert padded >= rank and to_peft.exact_alpha(scaling, padded) / padded == scaling
    assert to_peft.exact_alpha(0.1, 3) is None and to_peft.exact_rank(0.1, 3) == 4


@pytest.mark.slow
def test_verify_on_the_trained_base_and_on_the_original(samples, tmp_path):
    out = tmp_path / "adapter"
    api.export(samples / "qa-blora-q4_1", out, "peft", quiet=True)
    for merge_into in (None, "original"):
        report = verify(samples / "qa-blora-q4_1", out, merge_into=merge_into)
        assert report.passed and report.logits.max_rel < 1e-5, report.to_json()
        assert max(c.value for c in report.layers if "B'@A'" in c.check) == 0.0  # λi a power of two: exact


def test_b_lora_checkpoints_are_not_taken_for_exported_adapters(samples):
    for name in ("paper-q-blora", "paper-qa-blora", "q-blora-nf4", "qa-blora-q4_1"):
        assert not to_peft.detect(samples / name)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["drop 1/λi", "wrong alpha"])
def test_damaged_adapters_fail(samples, tmp_path, damage):
    out = tmp_path / "adapter"
    api.export(samples / "paper-q-blora", out, "peft", quiet=True)
    if damage == "drop 1/λi":  # the paper merge.py's bug: A' = rep(A) without the mean's 1/λi
        weights = load_file(str(out / "adapter_model.safetensors"))
        weights = {k: v * 2 if ".lora_A." in k else v for k, v in weights.items()}  # λi = 2
        save_file(weights, str(out / "adapter_model.safetensors"))
    else:
        config = json.loads((out / "adapter_config.json").read_text())
        config["lora_alpha"] = config["r"]  # scaling 1 instead of s = 2
        (out / "adapter_config.json").write_text(json.dumps(config))
    report = verify(samples / "paper-q-blora", out)
    assert not report.layers_passed and not report.logits_passed and report.logits.max_rel > 0.05


@pytest.mark.slow
def test_mlx_adapter_layout_loads_in_mlx_lm(samples, tmp_path):
    out = tmp_path / "mlx-adapter"
    result = api.export(samples / "paper-qa-blora", out, "peft", layout="mlx", quiet=True)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["lora_parameters"]["scale"] == 2.0 and config["lora_parameters"]["rank"] == result.details["rank"]
    report = verify(samples / "paper-qa-blora", out)
    assert report.passed and report.logits.max_rel < 1e-5, report.to_json()  # measured 2.2e-6
