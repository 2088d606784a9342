"""Gemma 3 text (the family table's ``gemma3_text`` row) in every format, in its real runtime.

The tiny Gemma 3 of samples/tiny_models.py (GEMMA3_CONVENTIONS): 3 layers, local, local, global (Gemma 3: five
local to one global); rope base 1e6 on the global layer and 1e4 on the local ones; an 8-token window (the
built-in prompts are 12-21 tokens); per-head q/k norms and every other norm x·(1+w) with w ~ U(0.5, 1.5);
√hidden embeddings; query_pre_attn_scalar = head_dim (as Gemma 3 1B); GELU-tanh; tied head; no softcaps.
Each of the +1 on the q/k norms, the local rope base and the window is dropped once from each writer and
verify fails by more than 10x its bound.
"""
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
from families_support import FORMATS, METHODS, field, run_cli, verified
from gguf import GGUFReader

from blora_export import api
from blora_export.base import rope_parameters
from blora_export.families import layer_kinds, layer_rope_parameters, layer_windows
from converters import gguf_model, onnx_graph

ARCH = "gemma3_text"
GEMMA3_FORMATS = {**FORMATS, "gguf-py": ("gguf", {}, {}), "mlx-lora": ("peft", {"layout": "mlx"}, {})}
LLAMA_CPP = {"gguf_type": "f32", "runtime": "llama.cpp"}


def test_gemma3_row_reads_each_layer_kind(tiny_base):
    config = json.loads((tiny_base(ARCH) / "config.json").read_text())
    assert layer_kinds(config) == ("sliding_attention", "sliding_attention", "full_attention")
    assert layer_windows(config) == (8, 8, None)
    assert [p["rope_theta"] for p in layer_rope_parameters(config)] == [1e4, 1e4, 1e6]
    legacy = {"model_type": ARCH, "num_hidden_layers": 12, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
              "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "sliding_window": 512}  # transformers 4.x
    assert rope_parameters(legacy, "sliding_attention") == {"rope_theta": 1e4, "rope_type": "default"}
    assert rope_parameters(legacy)["factor"] == 8.0
    assert [i for i, w in enumerate(layer_windows(legacy)) if w is None] == [5, 11]  # five local to one global


def _verified(ckpt, out, fmt, method):
    return verified(ckpt, out, fmt, method, GEMMA3_FORMATS)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", list(GEMMA3_FORMATS))
@pytest.mark.parametrize("method", list(METHODS))
def test_gemma3_matches_training_in_every_format(ckpts, tmp_path, method, fmt):
    out = tmp_path / ("m.gguf" if fmt.startswith("gguf") else "out")
    _verified(ckpts(ARCH, method), out, fmt, method)
    if fmt == "gguf-f32":
        tensors = {t.name for t in GGUFReader(str(out)).tensors}
        assert {"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight", "blk.0.post_ffw_norm.weight"} <= tensors
        assert "output.weight" not in tensors  # tied
        assert field(out, "gemma3.attention.sliding_window") == 8
        assert list(field(out, "gemma3.attention.sliding_window_pattern")) == [True, True, False]
        assert field(out, "gemma3.rope.freq_base_swa") == 1e4 and field(out, "gemma3.rope.freq_base") == 1e6
    if fmt == "mlx":
        config = json.loads((out / "config.json").read_text())
        assert (config["sliding_window_pattern"], config["rope_local_base_freq"], config["rope_theta"]) == (3, 1e4, 1e6)


# ------------------------------------------------------------------ each convention broken once

def _gguf_breaker(what: str):
    """The GGUF without the +1 on the q/k norms, with the global base on the local layers, or with no window."""
    def breaker(monkeypatch):
        import converters.to_gguf as to_gguf

        if what == "qk-norm-offset":
            encode = gguf_model.encode_tensor

            def encode_qk_without_offset(spec, ctx):
                data = encode(spec, ctx)
                return data - 1.0 if spec.name.endswith(("attn_q_norm.weight", "attn_k_norm.weight")) else data
            monkeypatch.setattr(gguf_model, "encode_tensor", encode_qk_without_offset)
            monkeypatch.setattr(to_gguf, "encode_tensor", encode_qk_without_offset)
            return
        write = gguf_model.write_windows

        def changed(writer, config):
            if what == "one-rope-base":
                glob = config["rope_parameters"]["full_attention"]
                config = {**config, "rope_parameters": {"full_attention": glob, "sliding_attention": glob}}
            write(writer, {**config, "sliding_window": 512} if what == "no-window" else config)
        monkeypatch.setattr(gguf_model, "write_windows", changed)
    return breaker


def _onnx_breaker(what: str):
    def breaker(monkeypatch):
        if what == "qk-norm-offset":
            norm = onnx_graph.rms_norm

            def without(g, x, weight, eps, name, offset=0.0):
                return norm(g, x, weight, eps, name, 0.0 if name.endswith(("q_norm.weight", "k_norm.weight")) else offset)
            monkeypatch.setattr(onnx_graph, "rms_norm", without)
            return
        original = onnx_graph.DecoderSpec.from_config.__func__

        def changed(cls, config, path=None):
            spec = original(cls, config, path)
            if what == "one-rope-base":
                return replace(spec, local_rope=None)
            return replace(spec, windows=(None,) * spec.num_layers)
        monkeypatch.setattr(onnx_graph.DecoderSpec, "from_config", classmethod(changed))
    return breaker


def _mlx_breaker(what: str):
    """mlx-lm adds the 1 itself: the writer's part is the keys (the local base, the layer pattern, the window)."""
    def breaker(monkeypatch):
        import converters.to_mlx as to_mlx

        extra = to_mlx.mlx_config_extra
        change = {"one-rope-base": {"rope_local_base_freq": 1e6}, "no-window": {"sliding_window": 512},
                  "qk-norm-offset": {}}[what]
        monkeypatch.setattr(to_mlx, "mlx_config_extra", lambda job, mplan: {**extra(job, mplan), **change})
    return breaker


BREAKERS = {**{f"gguf-{w}": ("gguf", LLAMA_CPP, _gguf_breaker(w)) for w in ("qk-norm-offset", "one-rope-base", "no-window")},
            **{f"onnx-{w}": ("onnx", {}, _onnx_breaker(w)) for w in ("qk-norm-offset", "one-rope-base", "no-window")},
            **{f"mlx-{w}": ("mlx", {}, _mlx_breaker(w)) for w in ("one-rope-base", "no-window")}}


@pytest.mark.slow
@pytest.mark.parametrize("kind,options,breaker", list(BREAKERS.values()), ids=list(BREAKERS))
def test_gemma3_without_a_convention_fails_verify(ckpts, tmp_path, monkeypatch, kind, options, breaker):
    ckpt = ckpts(ARCH, "qa-blora")
    options = dict(options)
    runtime = options.pop("runtime", None)
    out = tmp_path / ("m.gguf" if kind == "gguf" else "out")
    with monkeypatch.context() as patch:
        breaker(patch)
        api.export(ckpt, out, kind, quiet=True, **options)
    report = api.verify(ckpt, out, quiet=True, **({"runtime": runtime} if runtime else {}))
    assert not report.passed and report.logits.max_rel > 10 * report.tolerance.max_rel, report.to_json()


def test_verify_reference_rotates_each_layer_kind_with_its_own_base(ckpts, monkeypatch):
    """verify's streamed reference with the global rotation on every layer is another model: the exact
    ONNX export no longer matches it (the stream must rotate as Gemma3TextModel.forward does)."""
    from blora_export.stream import StreamedForward

    ckpt = ckpts(ARCH, "qa-blora")
    rotations = StreamedForward._rotations

    def global_everywhere(self, positions):
        table = rotations(self, positions)
        return {kind: table["full_attention"] for kind in table}
    out = ckpt.parent / "onnx-reference-check"
    shutil.rmtree(out, ignore_errors=True)
    api.export(ckpt, out, "onnx", quiet=True)
    assert api.verify(ckpt, out, quiet=True).passed
    monkeypatch.setattr(StreamedForward, "_rotations", global_everywhere)
    report = api.verify(ckpt, out, quiet=True)
    assert not report.passed and report.logits.max_rel > 10 * report.tolerance.max_rel, report.to_json()


# ------------------------------------------------------------------ what a runtime cannot compute is refused

def _changed_base(tiny_base, make_ckpt, tmp_path, **change):
    base = tmp_path / "base"
    shutil.copytree(tiny_base(ARCH), base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, **change}))
    li, lo, quant = METHODS["qa-blora"]
    return make_ckpt(base, "qa-blora", li, lo, base_quant=quant)


@pytest.mark.parametrize("change,args,says", [
    ({"query_pre_attn_scalar": 8}, ("to-gguf", "--type", "f32"),
     "attention scale 0.353553 (llama.cpp computes 0.176777 for 3 layers)"),
    ({"attn_logit_softcapping": 50.0}, ("to-gguf", "--type", "f32"), "an attention softcap (llama.cpp's graph has none)"),
    ({"layer_types": ["full_attention", "sliding_attention", "sliding_attention"]}, ("to-safetensors", "--layout", "mlx"),
     "global layers [0] are not every n-th"),
    ({"final_logit_softcapping": 30.0}, ("to-safetensors", "--layout", "mlx"), "final_logit_softcapping 30.0"),
    ({"final_logit_softcapping": 30.0}, ("to-peft", "--layout", "mlx"), "final_logit_softcapping 30.0"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                          "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}},
     ("to-gguf", "--type", "f32"), "rope scaling 'linear' on the local layers"),
], ids=["gguf-attention-scale", "gguf-score-softcap", "mlx-pattern", "mlx-final-softcap", "mlx-lora-final-softcap",
        "gguf-local-rope-scaling"])
def test_gemma3_is_refused_where_its_runtime_would_run_another_model(tiny_base, make_ckpt, tmp_path, capsys,
                                                                      change, args, says):
    ckpt = _changed_base(tiny_base, make_ckpt, tmp_path, **change)
    code, err = run_cli(capsys, args[0], ckpt, tmp_path / "out", *args[1:], "--quiet")
    assert code == 2 and len(err.splitlines()) == 1 and says in err, err
    assert not (tmp_path / "out").exists()


LINEAR_GLOBAL = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                 "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["gguf-f32", "onnx-fp32", "mlx", "safetensors"])
def test_gemma3_linear_rope_scaling_on_the_global_layers_only(tiny_base, make_ckpt, tmp_path, fmt):
    """Gemma 3 4B+: linear scaling (factor 8) on the global layers, none on the local ones."""
    ckpt = _changed_base(tiny_base, make_ckpt, tmp_path, rope_parameters=LINEAR_GLOBAL)
    _verified(ckpt, tmp_path / ("m.gguf" if fmt.startswith("gguf") else "out"), fmt, "qa-blora")


@pytest.mark.slow
def test_gemma3_gguf_without_the_global_scaling_fails_verify(tiny_base, make_ckpt, tmp_path, monkeypatch):
    ckpt = _changed_base(tiny_base, make_ckpt, tmp_path, rope_parameters=LINEAR_GLOBAL)
    with monkeypatch.context() as patch:
        patch.setattr(gguf_model, "_rope_scaling", lambda config: None)
        api.export(ckpt, tmp_path / "m.gguf", "gguf", gguf_type="f32", quiet=True)
    report = api.verify(ckpt, tmp_path / "m.gguf", runtime="llama.cpp", quiet=True)
    assert not report.passed and report.logits.max_rel > 10 * report.tolerance.max_rel, report.to_json()


def test_gemma3_gguf_carries_a_final_softcap_where_the_config_has_one(tiny_base, make_ckpt, tmp_path):
    ckpt = _changed_base(tiny_base, make_ckpt, tmp_path, final_logit_softcapping=30.0)
    api.export(ckpt, tmp_path / "m.gguf", "gguf", gguf_type="f32", quiet=True)
    assert field(tmp_path / "m.gguf", "gemma3.final_logit_softcapping") == 30.0
    assert field(tmp_path / "m.gguf", "gemma3.attn_logit_softcapping") is None
    assert np.isclose(field(tmp_path / "m.gguf", "gemma3.rope.freq_base_swa"), 1e4)
