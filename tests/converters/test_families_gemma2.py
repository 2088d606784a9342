"""Gemma 2 (the family table's ``gemma2`` row) in the formats that implement it, in their real runtimes.

The tiny Gemma 2 of samples/tiny_models.py (GEMMA2_CONVENTIONS): x·(1+w) norms, also on the attention
and MLP outputs, √hidden embeddings, q scaled by 8^-0.5, score and logit softcaps 5 and 20, an 8-token
window on layer 0, GELU-tanh, tied head. mlx-lm's gemma2 has no window (refused); llama.cpp's gemma2
fixes the attention scale at head_dim^-0.5 (below 27B), so the GGUF tests run a copy whose
query_pre_attn_scalar is its head_dim, and the tiny model itself is refused for GGUF.
"""
import json
import shutil
from dataclasses import replace

import pytest
from families_support import FORMATS, METHODS, field, run_cli, verified
from gguf import GGUFReader

from blora_export import api
from converters import gguf_model, onnx_graph


def _verified(ckpt, out, fmt, method):
    return verified(ckpt, out, fmt, method, {**FORMATS, "gguf-py": ("gguf", {}, {})})


GEMMA2_FORMATS = ("onnx-fp32", "onnx-int4", "safetensors", "peft")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", GEMMA2_FORMATS)
@pytest.mark.parametrize("method", list(METHODS))
def test_gemma2_matches_training_in_the_formats_that_implement_it(ckpts, tmp_path, method, fmt):
    _verified(ckpts("gemma2", method), tmp_path / "out", fmt, method)


@pytest.mark.parametrize("args,says", [
    (("to-gguf", "--type", "f32"), "attention scale 0.353553 (llama.cpp computes 0.176777 for 2 layers)"),
    (("to-safetensors", "--layout", "mlx"), "gguf, onnx, safetensors, peft"),
    (("to-peft", "--layout", "mlx"), "gguf, onnx, safetensors, peft")], ids=["gguf", "mlx", "mlx-lora"])
def test_gemma2_is_refused_where_its_runtime_would_run_another_model(ckpts, tmp_path, capsys, args, says):
    """mlx-lm's gemma2 has no window; llama.cpp's fixes the attention scale at head_dim^-0.5 below 27B."""
    code, err = run_cli(capsys, args[0], ckpts("gemma2", "qa-blora"), tmp_path / "out", *args[1:], "--quiet")
    assert code == 2 and len(err.splitlines()) == 1 and says in err, err
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def gemma2_gguf(tiny_base, make_ckpt, tmp_path_factory):
    """``method -> checkpoint`` on a tiny Gemma 2 whose query_pre_attn_scalar is its head_dim (as Gemma-2-2B/9B),
    the attention scale llama.cpp's gemma2 graph computes."""
    base = tmp_path_factory.mktemp("gemma2-gguf") / "base"
    shutil.copytree(tiny_base("gemma2"), base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "query_pre_attn_scalar": 32}))
    return {m: make_ckpt(base, m, li, lo, base_quant=quant) for m, (li, lo, quant) in METHODS.items()}


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["gguf-f32", "gguf-default", "gguf-py"])
@pytest.mark.parametrize("method", list(METHODS))
def test_gemma2_gguf_matches_training_in_llama_cpp(gemma2_gguf, tmp_path, method, fmt):
    _verified(gemma2_gguf[method], tmp_path / "m.gguf", fmt, method)
    tensors = {t.name for t in GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert {"blk.0.post_attention_norm.weight", "blk.0.ffn_norm.weight", "blk.0.post_ffw_norm.weight"} <= tensors
    assert "output.weight" not in tensors  # tied
    assert field(tmp_path / "m.gguf", "gemma2.attention.sliding_window") == 8
    assert field(tmp_path / "m.gguf", "gemma2.final_logit_softcapping") == 20.0


def _gemma2_gguf_breaker(what: str):
    def breaker(monkeypatch):
        from blora_export import families

        if what == "norm-offset":  # the writer stores w where llama.cpp wants 1 + w
            monkeypatch.setitem(families.FAMILIES, "gemma2", replace(families.FAMILIES["gemma2"], norm_offset=0.0))
            return
        write = gguf_model.write_multipliers

        def without(writer, config):  # a cap or window so large it does nothing
            key = {"window": "sliding_window", "final-softcap": "final_logit_softcapping",
                   "attn-softcap": "attn_logit_softcapping"}[what]
            write(writer, {**config, key: 1e6 if "softcap" in what else 512})
        monkeypatch.setattr(gguf_model, "write_multipliers", without)
    return breaker


@pytest.mark.slow
@pytest.mark.parametrize("what", ["norm-offset", "window", "final-softcap", "attn-softcap"])
def test_gemma2_gguf_without_a_convention_fails_verify(gemma2_gguf, tmp_path, monkeypatch, what):
    out = tmp_path / "m.gguf"
    with monkeypatch.context() as patch:
        _gemma2_gguf_breaker(what)(patch)
        api.export(gemma2_gguf["qa-blora"], out, "gguf", gguf_type="f32", quiet=True)
    report = api.verify(gemma2_gguf["qa-blora"], out, runtime="llama.cpp", quiet=True)
    assert not report.passed and report.logits.max_rel > 10 * report.tolerance.max_rel, report.to_json()


def _onnx_spec(**change):
    """The ONNX decoder spec with one convention changed (``scales``: a dict of Scales fields)."""
    def breaker(monkeypatch):
        original = onnx_graph.DecoderSpec.from_config.__func__

        def changed(cls, config, path=None):
            spec = original(cls, config, path)
            fields = dict(change)
            if "scales" in fields:
                fields["scales"] = replace(spec.scales, **fields["scales"])
            if fields.get("windows") == "global":
                fields["windows"] = (None,) * spec.num_layers
            return replace(spec, **fields)
        monkeypatch.setattr(onnx_graph.DecoderSpec, "from_config", classmethod(changed))
    return breaker


GEMMA2_BREAKERS = {"no-norm-offset": dict(norm_offset=0.0), "no-sandwich-norms": dict(sandwich_norms=False),
                   "silu": dict(activation="silu"), "no-window": dict(windows="global"),
                   "no-embedding-scale": dict(scales={"embedding": 1.0}),
                   "head_dim-attention-scale": dict(scales={"attention": 32**-0.5}),
                   "no-attn-softcap": dict(scales={"attn_softcap": None}),
                   "no-final-softcap": dict(scales={"final_softcap": None})}


@pytest.mark.slow
@pytest.mark.parametrize("change", list(GEMMA2_BREAKERS.values()), ids=list(GEMMA2_BREAKERS))
def test_gemma2_onnx_without_a_convention_fails_verify(ckpts, tmp_path, monkeypatch, change):
    ckpt = ckpts("gemma2", "qa-blora")
    with monkeypatch.context() as patch:
        _onnx_spec(**change)(patch)
        api.export(ckpt, tmp_path / "out", "onnx", quiet=True)
    report = api.verify(ckpt, tmp_path / "out", quiet=True)
    assert not report.passed and report.logits.max_rel > 10 * report.tolerance.max_rel, report.to_json()
