"""Phi-3 / Phi-3.5-mini / Phi-4-mini (the family table's ``phi3`` row) in every format, in its real runtime.

The tiny Phi-3 of samples/tiny_models.py: 2 layers, q|k|v and gate|up stored fused (``qkv_proj``,
``gate_up_proj``), each one adapted module whose λ is inferred from the fused shape; the rotation on the first
3/4 of each head's dims (``partial_rotary_factor`` 0.75, as Phi-4-mini); Phi-3's added special tokens. A LongRoPE
copy (short and long factor lists, original length 256 of 4096 positions: attention factor √1.5) runs in
llama.cpp, onnxruntime, transformers and PEFT; mlx-lm's phi3 refuses it. The gate|up order swapped and the
full rotation instead of the partial one are each written once into a writer and verify fails by more than
10x its bound; so does LongRoPE's short/long choice or attention factor dropped.
"""
import json
import shutil

import numpy as np
import pytest
from families_support import FORMATS, METHODS, field, run_cli, verified
from gguf import GGUFReader

from blora_export import api
from blora_export.base import BaseModel
from blora_export.checkpoint import load_checkpoint
from blora_export.families import FAMILIES, fused_rows, head_dim, rotary_dim
from converters import gguf_longrope, gguf_model, onnx_graph

ARCH = "phi3"
PHI3_FORMATS = {**FORMATS, "gguf-py": ("gguf", {}, {}), "mlx-lora": ("peft", {"layout": "mlx"}, {})}
LLAMA_CPP = {"gguf_type": "f32", "runtime": "llama.cpp"}
QKV, GATE_UP = "model.layers.0.self_attn.qkv_proj", "model.layers.0.mlp.gate_up_proj"


def test_phi3_row_reads_fused_projections_and_partial_rotation(tiny_base):
    config = json.loads((tiny_base(ARCH) / "config.json").read_text())
    assert FAMILIES[ARCH].fused == ("qkv_proj", "gate_up_proj") and not FAMILIES[ARCH].permute_qk
    assert (head_dim(config), rotary_dim(config)) == (32, 24)
    assert fused_rows(config, "qkv_proj") == (128, 64, 64) and fused_rows(config, "gate_up_proj") == (256, 256)
    assert rotary_dim({**config, "rope_parameters": {"rope_theta": 1e4}}) == 32  # no factor: every dim
    phi4_mini = {"model_type": ARCH, "hidden_size": 3072, "num_attention_heads": 24, "partial_rotary_factor": 0.75}
    assert rotary_dim(phi4_mini) == 96  # transformers 4.x: at the top level
    assert rotary_dim({**phi4_mini, "model_type": "llama"}) == 128  # LlamaModel ignores the factor


@pytest.mark.parametrize("layout", ["native", "paper"])
def test_lambda_is_inferred_per_fused_module(tiny_base, make_ckpt, layout):
    base = BaseModel.open(tiny_base(ARCH))
    li, lo, quant = METHODS["qa-blora"]
    ckpt, _ = load_checkpoint(make_ckpt(base.path, "qa-blora", li, lo, layout=layout,
                                        base_quant=quant if layout == "native" else None), base)
    assert base.shape(QKV + ".weight") == (256, 128) and base.shape(GATE_UP + ".weight") == (512, 128)
    qkv, gate_up = ckpt.modules[QKV], ckpt.modules[GATE_UP]
    assert (qkv.lambda_in, qkv.lambda_out, qkv.h.shape) == (32, 4, (64, 4))  # one module: out = q + k + v rows
    assert (gate_up.lambda_in, gate_up.lambda_out, gate_up.h.shape) == (32, 4, (128, 4))
    assert {name.rsplit(".", 1)[1] for name in ckpt.modules} == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}


def _verified(ckpt, out, fmt, method):
    return verified(ckpt, out, fmt, method, PHI3_FORMATS)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", list(PHI3_FORMATS))
@pytest.mark.parametrize("method", list(METHODS))
def test_phi3_matches_training_in_every_format(ckpts, tmp_path, method, fmt):
    out = tmp_path / ("m.gguf" if fmt.startswith("gguf") else "out")
    _verified(ckpts(ARCH, method), out, fmt, method)
    if fmt == "gguf-f32":
        shapes = {t.name: tuple(int(d) for d in t.shape) for t in GGUFReader(str(out)).tensors}
        assert shapes["blk.0.attn_qkv.weight"] == (128, 256) and shapes["blk.0.ffn_up.weight"] == (128, 512)
        assert not any(".attn_q." in name or ".ffn_gate." in name for name in shapes)  # kept fused
        assert field(out, "phi3.rope.dimension_count") == 24
    if fmt == "mlx":
        config = json.loads((out / "config.json").read_text())
        assert (config["partial_rotary_factor"], config["rope_theta"]) == (0.75, 250000.0)  # mlx-lm reads them here
    if fmt == "peft":
        config = json.loads((out / "adapter_config.json").read_text())
        assert set(config["target_modules"]) >= {"qkv_proj", "gate_up_proj"}


# ------------------------------------------------------------------ each convention broken once

def _swap_halves(rows):
    half = rows.shape[0] // 2
    return np.concatenate([rows[half:], rows[:half]]) if isinstance(rows, np.ndarray) else rows.roll(half, 0)


def _gguf_breaker(what: str):
    def breaker(patch):
        import converters.to_gguf as to_gguf

        if what == "full-rotary":
            patch.setattr(gguf_model, "rotary_dim", head_dim)
            return
        encode = gguf_model.encode_tensor

        def up_gate(spec, ctx):
            data = encode(spec, ctx)
            return _swap_halves(data) if spec.name.endswith("ffn_up.weight") else data
        patch.setattr(gguf_model, "encode_tensor", up_gate)
        patch.setattr(to_gguf, "encode_tensor", up_gate)
    return breaker


def _onnx_breaker(what: str):
    def breaker(patch):
        if what == "full-rotary":
            patch.setattr(onnx_graph, "rotary_dim", head_dim)
            return
        linear = onnx_graph.linear

        def up_gate(g, x, data, name):
            if name.endswith("gate_up_proj"):
                data = onnx_graph.FloatLinear(np.ascontiguousarray(_swap_halves(data.weight_t.T).T), data.bias)
            return linear(g, x, data, name)
        patch.setattr(onnx_graph, "linear", up_gate)
    return breaker


def _mlx_breaker(what: str):
    def breaker(patch):
        import converters.to_mlx as to_mlx

        if what == "full-rotary":
            extra = to_mlx.mlx_config_extra
            patch.setattr(to_mlx, "mlx_config_extra", lambda job, mplan: {**extra(job, mplan),
                                                                           "partial_rotary_factor": 1.0})
            return
        tensors = to_mlx.mlx_tensors

        def up_gate(job, mplan, ptq):
            for name, t in tensors(job, mplan, ptq):
                yield name, _swap_halves(t) if ".gate_up_proj." in name else t
        patch.setattr(to_mlx, "mlx_tensors", up_gate)
    return breaker


BREAKERS = {**{f"gguf-{w}": ("gguf", LLAMA_CPP, _gguf_breaker(w)) for w in ("up-gate", "full-rotary")},
            **{f"onnx-{w}": ("onnx", {}, _onnx_breaker(w)) for w in ("up-gate", "full-rotary")},
            **{f"mlx-{w}": ("mlx", {}, _mlx_breaker(w)) for w in ("up-gate", "full-rotary")}}


def _fails_verify(ckpt, out, kind, options, breaker, patch):
    options = dict(options)
    runtime = options.pop("runtime", None)
    with patch.context() as changed:
        breaker(changed)
        api.export(ckpt, out, kind, quiet=True, **options)
    report = api.verify(ckpt, out, quiet=True, **({"runtime": runtime} if runtime else {}))
    assert not report.passed and report.logits.max_rel > 10 * report.tolerance.max_rel, report.to_json()


@pytest.mark.slow
@pytest.mark.parametrize("kind,options,breaker", list(BREAKERS.values()), ids=list(BREAKERS))
def test_phi3_without_a_convention_fails_verify(ckpts, tmp_path, monkeypatch, kind, options, breaker):
    _fails_verify(ckpts(ARCH, "qa-blora"), tmp_path / ("m.gguf" if kind == "gguf" else "out"), kind, options,
                  breaker, monkeypatch)


# ------------------------------------------------------------------ LongRoPE

def _longrope_ckpt(tiny_base, make_ckpt, tmp_path, original: int):
    """The tiny Phi-3 with LongRoPE: short factors 1..3.75, long 4..20.5 (12 = 24 rotated dims / 2), the
    original length ``original`` of 4096 positions (attention factor √(1 + ln(4096/n)/ln n))."""
    base = tmp_path / "base"
    shutil.copytree(tiny_base(ARCH), base)
    config = json.loads((base / "config.json").read_text())
    rope = {**config["rope_parameters"], "rope_type": "longrope", "original_max_position_embeddings": original,
            "short_factor": [1.0 + 0.25 * i for i in range(12)], "long_factor": [4.0 + 1.5 * i for i in range(12)]}
    (base / "config.json").write_text(json.dumps({**config, "rope_parameters": rope, "max_position_embeddings": 4096,
                                                  "original_max_position_embeddings": original}))
    li, lo, quant = METHODS["qa-blora"]
    return make_ckpt(base, "qa-blora", li, lo, base_quant=quant)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["gguf-f32", "gguf-default", "onnx-fp32", "onnx-int4", "safetensors", "peft"])
def test_phi3_longrope(tiny_base, make_ckpt, tmp_path, fmt):
    """llama.cpp takes the short factors while its context (256 at least: it pads n_ctx) is within the original
    length 256, as transformers on sequences within it."""
    ckpt = _longrope_ckpt(tiny_base, make_ckpt, tmp_path, 256)
    out = tmp_path / ("m.gguf" if fmt.startswith("gguf") else "out")
    _verified(ckpt, out, fmt, "qa-blora")
    if fmt == "gguf-f32":
        tensors = {t.name: t.data for t in GGUFReader(str(out)).tensors}
        assert list(tensors[gguf_longrope.SHORT]) == [1.0 + 0.25 * i for i in range(12)]
        assert list(tensors[gguf_longrope.LONG]) == [4.0 + 1.5 * i for i in range(12)]
        assert field(out, "phi3.rope.scaling.original_context_length") == 256
        assert abs(field(out, "phi3.rope.scaling.attn_factor") - 1.5 ** 0.5) < 1e-6


@pytest.mark.slow
def test_onnx_longrope_switches_to_the_long_factors_past_the_original_length(tiny_base, make_ckpt, tmp_path,
                                                                             monkeypatch):
    """Original length 16: the 13-token prompt rotates with the short factors, the 17-21-token ones with the long
    factors (transformers' choice per call, from max(position_ids) + 1); the graph without the switch fails."""
    ckpt = _longrope_ckpt(tiny_base, make_ckpt, tmp_path, 16)
    _verified(ckpt, tmp_path / "out", "onnx-fp32", "qa-blora")
    original = onnx_graph.DecoderSpec.from_config.__func__

    def short_only(cls, config, path=None):
        from dataclasses import replace
        return replace(original(cls, config, path), long_rope=None)
    _fails_verify(ckpt, tmp_path / "short", "onnx", {},
                  lambda patch: patch.setattr(onnx_graph.DecoderSpec, "from_config", classmethod(short_only)),
                  monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("what", ["no-attention-factor", "long-factors"])
def test_gguf_longrope_without_a_part_fails_verify(tiny_base, make_ckpt, tmp_path, monkeypatch, what):
    ckpt = _longrope_ckpt(tiny_base, make_ckpt, tmp_path, 256)

    def breaker(patch):
        read = gguf_longrope.longrope

        def changed(config):
            from dataclasses import replace
            rope = read(config)
            if rope is None:
                return None
            return replace(rope, attention_factor=1.0) if what == "no-attention-factor" else replace(rope, short=rope.long)
        patch.setattr(gguf_model, "longrope", changed)
    _fails_verify(ckpt, tmp_path / "m.gguf", "gguf", LLAMA_CPP, breaker, monkeypatch)


# ------------------------------------------------------------------ what a runtime cannot compute is refused

@pytest.mark.parametrize("args", [("to-safetensors", "--layout", "mlx"), ("to-peft", "--layout", "mlx")],
                         ids=["mlx", "mlx-lora"])
def test_longrope_is_refused_for_mlx_lm_in_one_line(tiny_base, make_ckpt, tmp_path, capsys, args):
    ckpt = _longrope_ckpt(tiny_base, make_ckpt, tmp_path, 256)
    code, err = run_cli(capsys, args[0], ckpt, tmp_path / "out", *args[1:], "--quiet")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "mlx-lm's phi3 cannot compute LongRoPE" in err and "GGUF, safetensors or PEFT" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_phi3_window_in_onnx_and_refused_by_mlx_lm(tiny_base, make_ckpt, tmp_path, capsys):
    """A ``sliding_window`` of 8 tokens (the prompts are 13-21): the ONNX graph masks it; mlx-lm's phi3 has no
    window and llama.cpp disables Phi-3's (src/models/phi3.cpp): MLX refuses, GGUF caps the context at it."""
    base = tmp_path / "base"
    shutil.copytree(tiny_base(ARCH), base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "sliding_window": 8}))
    li, lo, quant = METHODS["qa-blora"]
    ckpt = make_ckpt(base, "qa-blora", li, lo, base_quant=quant)
    _verified(ckpt, tmp_path / "onnx", "onnx-fp32", "qa-blora")
    code, err = run_cli(capsys, "to-safetensors", ckpt, tmp_path / "mlx", "--layout", "mlx", "--quiet")
    assert code == 2 and len(err.splitlines()) == 1 and "sliding window of 8 tokens" in err, err
    api.export(ckpt, tmp_path / "m.gguf", "gguf", gguf_type="f32", quiet=True)
    assert field(tmp_path / "m.gguf", "phi3.context_length") == 8


@pytest.mark.slow
def test_phi3_gguf_lora_adapter_on_its_base_equals_the_merged_export(ckpts, tmp_path):
    """``--adapter-only``: LoRA pairs on the fused ``attn_qkv`` / ``ffn_up`` that llama.cpp applies on top of the
    ``--base-only`` file, as the merged export computes."""
    from blora_export.numerics import logit_stats
    from blora_export.reference import DEFAULT_PROMPTS, tokenize_prompts
    from converters.gguf_runtime import llama_cpp_logits

    ckpt = ckpts(ARCH, "qa-blora")
    adapter, base, merged = tmp_path / "adapter.gguf", tmp_path / "base.gguf", tmp_path / "merged.gguf"
    api.export(ckpt, adapter, "gguf", adapter_only=True, quiet=True)
    api.export(ckpt, base, "gguf", gguf_type="f32", base_only=True, quiet=True)
    api.export(ckpt, merged, "gguf", gguf_type="f32", quiet=True)
    assert {"blk.0.attn_qkv.weight.lora_a", "blk.0.ffn_up.weight.lora_b"} <= {t.name for t in GGUFReader(str(adapter)).tensors}
    ids = tokenize_prompts(api.open_job(ckpt, quiet=True).base, DEFAULT_PROMPTS)
    stats = logit_stats(llama_cpp_logits(merged, ids), llama_cpp_logits(base, ids, lora=adapter))
    assert stats.max_rel < 1e-3 and stats.top1_agreement == 1.0, stats
