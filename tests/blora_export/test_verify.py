"""verify: passes on every sample, fails on the broken merges users actually make."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from blora_export import api
from blora_export.checkpoint import load_checkpoint
from blora_export.delta import delta_weight
from blora_export.numerics import round_to

SAMPLES = ["qa-blora-q4_1", "q-blora-nf4", "paper-q-blora", "paper-qa-blora"]


@pytest.mark.parametrize("name", SAMPLES)
def test_in_memory_merge_passes(samples, name):
    report = api.verify(samples / name, quiet=True)
    assert report.passed, report.to_json()
    assert all(c.passed for c in report.layers) and len(report.layers) == 28
    assert report.logits.max_rel < report.tolerance.max_rel < report.adapter_effect / 10


@pytest.mark.parametrize("name", ["paper-q-blora", "paper-qa-blora"])
def test_bfloat16_and_float32_merges_pass(samples, name):
    for dtype in ("bfloat16", "float32"):
        report = api.verify(samples / name, dtype=dtype, quiet=True)
        assert report.passed, (dtype, report.to_json())


def tamper(folder, ckpt_dir, weight_fn):
    """Rewrite every adapted weight of an exported folder as ``weight_fn(W, ΔW, module)``."""
    ckpt, base = load_checkpoint(ckpt_dir)
    tensors = load_file(str(folder / "model.safetensors"))
    for module in ckpt.modules.values():
        w = base.tensor(module.weight_name).double()
        tensors[module.weight_name] = round_to(weight_fn(w, delta_weight(module), module), torch.float16)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def exported(samples, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "merged"
    api.export(samples / "paper-q-blora", out, "safetensors", quiet=True)
    return out


def test_exported_folder_passes(samples, exported):
    report = api.verify(samples / "paper-q-blora", exported, quiet=True)
    assert report.passed and report.artifact == str(exported)
    assert len(report.layers) == 29  # 14 branch checks + config.json vs the base + 14 stored-weight checks


@pytest.mark.parametrize("breakage", ["paper_merge_without_1_over_lambda", "adapter_dropped"])
def test_broken_merges_fail(samples, exported, tmp_path, breakage):
    broken = tmp_path / breakage
    shutil.copytree(exported, broken)
    fn = {"paper_merge_without_1_over_lambda": lambda w, dw, m: w + dw * m.lambda_in,
          "adapter_dropped": lambda w, dw, m: w}[breakage]
    tamper(broken, samples / "paper-q-blora", fn)
    report = api.verify(samples / "paper-q-blora", broken, quiet=True)
    assert not report.passed
    assert not report.layers_passed and not report.logits_passed  # each check catches it on its own
    assert report.logits.max_rel > 10 * report.tolerance.max_rel


def test_report_json_roundtrips(samples):
    report = api.verify(samples / "paper-qa-blora", quiet=True)
    data = json.loads(json.dumps(report.to_json()))
    assert data["passed"] is True and data["logits"]["positions"] > 40
    assert data["merge"].startswith("merged into the original")


def test_tolerance_widens_to_floor_factor_times_a_measured_floor():
    import torch

    from blora_export.tolerance import FLOOR_FACTOR, tolerance_for_dtype, widen_to_floor

    table = tolerance_for_dtype(torch.float16)
    assert widen_to_floor(table, table.max_rel / 10, torch.float16) is table
    wide = widen_to_floor(table, table.max_rel, torch.float16)
    assert wide.max_rel == FLOOR_FACTOR * table.max_rel and "floor" in wide.basis


def test_report_states_the_rounding_floor(samples):
    report = api.verify(samples / "paper-q-blora", dtype="bfloat16", quiet=True)
    assert 0 < report.rounding_floor < report.tolerance.max_rel
