"""The family table (blora_export.families) across every writer, in the real runtimes.

Tiny random bases built offline from transformers' own config classes (samples/tiny_models.py):
``llama3`` (LlamaConfig with rope_type llama3, original context 64 so the scaling changes the
logits of the built-in prompts; Llama-3 byte-level BPE with two stop ids), ``qwen3``
(Qwen3Config, per-head q/k RMSNorm, head_dim 48 != hidden/heads, q/k projections 4x larger so the
norms matter) and ``granite`` (GraniteConfig with embedding multiplier 12, attention multiplier 0.015,
residual multiplier 0.22 and logits divided by 8; the weights are scaled so the model computes at the
other families' scales with them, so any one dropped moves the logits far beyond the bound) and
``smollm3`` (SmolLM3Config, 4 layers: the 4th does not rotate q/k, as in SmolLM3-3B and llama.cpp's
smollm3 graph; Llama-3 byte-level BPE) and ``gemma2`` (Gemma2Config: x·(1+w) norms, sandwich norms,
√hidden embeddings, q scaled by 8^-0.5, score and logit softcaps 5 and 20, an 8-token window on layer 0,
GELU-tanh, tied head; MLX refuses it, GGUF where llama.cpp's fixed conventions differ: a copy with
query_pre_attn_scalar = head_dim runs in llama.cpp). Every
export is checked by ``api.verify`` (logits against the training-time model) under the same bounds as
llama; each convention's test fails when the convention is broken.
"""
import json
import shutil
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from families_support import FORMATS, METHODS, field, run_cli  # tests/converters, on sys.path by its conftest
from gguf import GGUFReader
from safetensors.torch import load_file, save_file

from blora_export import api, stream
from blora_export.errors import UnsupportedError
from blora_export.families import FAMILIES, Scales, attention_window, family, rope_layers, scales
from blora_export.spec import MinMaxGrid
from converters import gguf_kquant, gguf_model, onnx_graph
from converters.gguf_runtime import open_llama

GRANITE = {"embedding_multiplier": 12.0, "attention_multiplier": 0.015, "residual_multiplier": 0.22,
           "logits_scaling": 8.0}  # samples/tiny_models.py GRANITE_SCALES


def test_unsupported_architecture_is_one_line_naming_the_supported(samples, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(samples / "base", base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    with pytest.raises(UnsupportedError, match="supported: llama, mistral, qwen2, qwen3"):
        family("gpt_neox")
    code, err = run_cli(capsys, "inspect", samples / "qa-blora-q4_1", "--base", base)
    assert code == 2 and len(err.splitlines()) == 1 and "'gpt_neox' is not supported" in err and "qwen3" in err


def test_llama3_rope_factors_reproduce_transformers_frequencies(tiny_base):
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    base = tiny_base("llama3")
    config = json.loads((base / "config.json").read_text())
    factors = torch.from_numpy(gguf_model.llama3_rope_factors(config)).double()
    dim = 32
    default = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](AutoConfig.from_pretrained(str(base)), None)
    assert factors.shape == (dim // 2,) and factors.max() == 8.0 and factors.min() == 1.0
    assert torch.allclose(default.double() / factors, scaled.double(), rtol=1e-6)  # as llama.cpp divides


def test_family_rows_hold_the_conventions():
    assert FAMILIES["qwen3"].qk_norm and not FAMILIES["qwen2"].qk_norm
    assert FAMILIES["llama"].permute_qk and not FAMILIES["qwen3"].permute_qk
    assert "llama3" in FAMILIES["llama"].rope_types and "llama3" not in FAMILIES["qwen2"].rope_types
    assert attention_window({"model_type": "mistral", "sliding_window": 4096, "max_position_embeddings": 32768}) == 4096
    assert attention_window({"model_type": "mistral", "sliding_window": 4096, "max_position_embeddings": 4096}) is None
    granite = {"model_type": "granite", "hidden_size": 128, "num_attention_heads": 4, **GRANITE}
    assert scales(granite) == Scales(12.0, 0.015, 0.22, 8.0)
    assert scales({"model_type": "llama", "hidden_size": 128, "num_attention_heads": 4}) == Scales(1.0, 32**-0.5, 1.0, 1.0)
    assert rope_layers({"model_type": "smollm3", "num_hidden_layers": 8}) == (True, True, True, False) * 2
    assert rope_layers({"model_type": "smollm3", "num_hidden_layers": 2, "no_rope_layers": [0, 1]}) == (False, True)
    assert rope_layers({"model_type": "llama", "num_hidden_layers": 2, "no_rope_layers": [0, 0]}) == (True, True)
    with pytest.raises(UnsupportedError, match="use_sliding_window"):
        attention_window({"model_type": "smollm3", "use_sliding_window": True, "sliding_window": 8})


def test_gguf_carries_each_family_convention(ckpts, tmp_path):
    llama3 = tmp_path / "llama3.gguf"
    api.export(ckpts("llama3", "qa-blora"), llama3, "gguf", gguf_type="f32", quiet=True)
    tensors = {t.name: t for t in GGUFReader(str(llama3)).tensors}
    assert tensors["rope_freqs.weight"].data.dtype == np.float32 and tensors["rope_freqs.weight"].data.size == 16
    assert field(llama3, "llama.rope.scaling.type") is None  # llama3: the tensor, no key
    assert field(llama3, "tokenizer.ggml.pre") == "llama-bpe" and field(llama3, "tokenizer.ggml.model") == "gpt2"
    assert field(llama3, "tokenizer.chat_template").startswith("{{ bos_token }}")
    qwen3 = tmp_path / "qwen3.gguf"
    api.export(ckpts("qwen3", "qa-blora"), qwen3, "gguf", gguf_type="f32", quiet=True)
    names = {t.name for t in GGUFReader(str(qwen3)).tensors}
    assert field(qwen3, "general.architecture") == "qwen3"
    assert {"blk.0.attn_q_norm.weight", "blk.1.attn_k_norm.weight"} <= names
    assert field(qwen3, "qwen3.attention.key_length") == 48 and field(qwen3, "qwen3.attention.value_length") == 48
    granite = tmp_path / "granite.gguf"
    api.export(ckpts("granite", "qa-blora"), granite, "gguf", gguf_type="f32", quiet=True)
    assert field(granite, "general.architecture") == "granite"
    keys = ("embedding_scale", "attention.scale", "residual_scale", "logit_scale")
    assert [field(granite, f"granite.{k}") for k in keys] == pytest.approx([12.0, 0.015, 0.22, 8.0])
    assert field(llama3, "llama.embedding_scale") is None  # only the families that have them
    smollm3 = tmp_path / "smollm3.gguf"
    api.export(ckpts("smollm3", "qa-blora"), smollm3, "gguf", gguf_type="f32", quiet=True)
    assert field(smollm3, "general.architecture") == "smollm3" and field(smollm3, "smollm3.block_count") == 4


@pytest.mark.slow
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", ["llama3", "qwen3", "granite", "smollm3"])
def test_every_format_matches_training_in_its_runtime(ckpts, tmp_path, arch, method, fmt):
    kind, options, verify_options = FORMATS[fmt]
    if method == "q-blora" and fmt in ("onnx-int4", "mlx"):
        options = {**options, "requantize": True}  # no exact fold for a Q-BLoRA: PTQ, bound from the base's
    ckpt = ckpts(arch, method)
    out = tmp_path / ("model.gguf" if kind == "gguf" else "out")
    api.export(ckpt, out, kind, quiet=True, **options)
    report = api.verify(ckpt, out, quiet=True, **verify_options)
    if options.get("requantize"):  # 4-bit PTQ of a tiny random model costs as much as the adapter: verify
        assert report.logits_passed and report.layers_passed, report.to_json()  # says INCONCLUSIVE, not PASS
        return
    assert report.passed, report.to_json()
    assert report.logits.max_rel < report.adapter_effect / 4, report.to_json()  # it sees the adapter


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama3", "qwen3"])
def test_paper_layout_checkpoints_too(tiny_base, make_ckpt, tmp_path, arch):
    """The paper's layout (λ inferred from the shapes; QA-BLoRA 4x8 cells) through GGUF and ONNX."""
    ckpt = make_ckpt(tiny_base(arch), "qa-blora", 4, 8, layout="paper")
    for kind, out, options in (("gguf", tmp_path / "m.gguf", {"runtime": "llama.cpp"}), ("onnx", tmp_path / "o", {})):
        api.export(ckpt, out, kind, quiet=True, **({"gguf_type": "f32"} if kind == "gguf" else {}))
        report = api.verify(ckpt, out, quiet=True, **options)
        assert report.passed and report.logits.max_rel < report.adapter_effect / 4, report.to_json()


def _break_rope_freqs(monkeypatch):
    monkeypatch.setattr(gguf_model, "llama3_rope_factors", lambda config: np.ones(16, np.float32))


def _break_gguf_qk_norm(monkeypatch):
    """The q/k norm weights written as ones (the learned per-dimension scales dropped)."""
    encode = gguf_model.encode_tensor

    def encode_without_qk_norm(spec, ctx):
        data = encode(spec, ctx)
        return np.ones_like(data) if spec.name.endswith(("attn_q_norm.weight", "attn_k_norm.weight")) else data

    monkeypatch.setattr(gguf_model, "encode_tensor", encode_without_qk_norm)
    import converters.to_gguf as to_gguf
    monkeypatch.setattr(to_gguf, "encode_tensor", encode_without_qk_norm)


def _break_onnx_qk_norm(monkeypatch):
    original = onnx_graph.DecoderSpec.from_config.__func__

    def without(cls, config, path=None):
        from dataclasses import replace
        return replace(original(cls, config, path), qk_norm=False)

    monkeypatch.setattr(onnx_graph.DecoderSpec, "from_config", classmethod(without))


def _break_onnx_llama3(monkeypatch):
    monkeypatch.setattr(onnx_graph, "STATIC_ROPE_TYPES", ("default", "linear", "llama3", "yarn"))
    rope = onnx_graph.rope_frequencies

    def default_rope(config, head_dim, path=None):
        plain = {**config, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}}
        return rope(plain, head_dim, path)

    monkeypatch.setattr(onnx_graph, "rope_frequencies", default_rope)


def _break_mlx_llama3(monkeypatch):
    import converters.to_mlx as to_mlx

    monkeypatch.setattr(to_mlx, "rope_overrides", lambda config: {"rope_theta": 10000.0})  # no rope_scaling


MULTIPLIERS = ("embedding", "attention", "residual", "logit_divisor")


def _without(field: str):
    """``scales`` with one multiplier back at its plain-llama value (1, head_dim^-0.5, no softcap)."""
    def patched(config):
        plain = Scales(1.0, (config["hidden_size"] // config["num_attention_heads"]) ** -0.5, 1.0, 1.0)
        return replace(scales(config), **{field: getattr(plain, field)})
    return patched


def _drop_scale(module, field: str):
    def breaker(monkeypatch):
        monkeypatch.setattr(module, "scales", _without(field))
    return breaker


def _drop_mlx_key(key: str):
    def breaker(monkeypatch):
        import converters.to_mlx as to_mlx

        extra = to_mlx.mlx_config_extra
        monkeypatch.setattr(to_mlx, "mlx_config_extra", lambda job, mplan: {**extra(job, mplan), key: 1.0})
    return breaker


def _rope_everywhere_gguf(monkeypatch):
    """SmolLM3 written as llama: llama.cpp rotates q/k on every layer, the NoPE layer too."""
    import converters.to_gguf as to_gguf
    from blora_export.families import FAMILIES

    as_llama = lambda model_type: gguf_model.ArchSpec(replace(FAMILIES[model_type], gguf_arch="LLAMA"))  # noqa: E731
    monkeypatch.setattr(gguf_model, "arch_spec", as_llama)
    monkeypatch.setattr(to_gguf, "arch_spec", as_llama)
    monkeypatch.setattr(gguf_model, "check_rope_layers", lambda config: None)


def _rope_everywhere_onnx(monkeypatch):
    original = onnx_graph.DecoderSpec.from_config.__func__
    monkeypatch.setattr(onnx_graph.DecoderSpec, "from_config",
                        classmethod(lambda cls, config, path=None: replace(original(cls, config, path), rope_layers=())))


def _rope_everywhere_mlx(monkeypatch):
    import converters.to_mlx as to_mlx

    extra = to_mlx.mlx_config_extra
    monkeypatch.setattr(to_mlx, "mlx_config_extra", lambda job, mplan: {**extra(job, mplan), "no_rope_layers": [1] * 4})


GRANITE_BREAKERS = ([("granite", "gguf", {"gguf_type": "f32", "runtime": "llama.cpp"}, _drop_scale(gguf_model, f))
                     for f in MULTIPLIERS] + [("granite", "onnx", {}, _drop_scale(onnx_graph, f)) for f in MULTIPLIERS]
                    + [("granite", "mlx", {}, _drop_mlx_key(k)) for k in ("embedding_multiplier", "logits_scaling")])


@pytest.mark.slow
@pytest.mark.parametrize("arch,kind,options,breaker", [
    ("llama3", "gguf", {"gguf_type": "f32", "runtime": "llama.cpp"}, _break_rope_freqs),
    ("llama3", "onnx", {}, _break_onnx_llama3),
    ("llama3", "mlx", {}, _break_mlx_llama3),
    ("qwen3", "gguf", {"gguf_type": "f32", "runtime": "llama.cpp"}, _break_gguf_qk_norm),
    ("qwen3", "onnx", {}, _break_onnx_qk_norm),
    *GRANITE_BREAKERS,
    ("smollm3", "gguf", {"gguf_type": "f32", "runtime": "llama.cpp"}, _rope_everywhere_gguf),
    ("smollm3", "onnx", {}, _rope_everywhere_onnx),
    ("smollm3", "mlx", {}, _rope_everywhere_mlx),
], ids=["gguf-no-rope_freqs", "onnx-no-llama3-rope", "mlx-no-rope_scaling", "gguf-qk-norm-dropped", "onnx-qk-norm-dropped",
        *[f"gguf-granite-no-{f}" for f in MULTIPLIERS], *[f"onnx-granite-no-{f}" for f in MULTIPLIERS],
        "mlx-granite-no-embedding_multiplier", "mlx-granite-no-logits_scaling",
        "gguf-smollm3-rope-everywhere", "onnx-smollm3-rope-everywhere", "mlx-smollm3-rope-everywhere"])
def test_a_broken_convention_fails_verify(ckpts, tmp_path, monkeypatch, arch, kind, options, breaker):
    ckpt = ckpts(arch, "qa-blora")
    options = dict(options)
    runtime = options.pop("runtime", None)
    out = tmp_path / ("model.gguf" if kind == "gguf" else "out")
    with monkeypatch.context() as patch:
        breaker(patch)
        api.export(ckpt, out, kind, quiet=True, **options)
    report = api.verify(ckpt, out, quiet=True, **({"runtime": runtime} if runtime else {}))
    assert not report.passed and report.logits.max_rel > 10 * report.tolerance.max_rel, report.to_json()


@pytest.mark.slow
@pytest.mark.parametrize("arch,field", [("granite", "embedding"), ("granite", "logit_divisor"),
                                        ("gemma2", "final_softcap")])
def test_verify_reference_applies_the_multipliers_outside_the_parts(ckpts, tmp_path, monkeypatch, arch, field):
    """Granite's embedding multiplier and logit divisor, Gemma 2's final softcap live in the model's forward,
    outside the parts verify streams: without them its reference is another model, and a right export fails."""
    ckpt = ckpts(arch, "qa-blora")
    out = tmp_path / "onnx"
    api.export(ckpt, out, "onnx", quiet=True)
    assert api.verify(ckpt, out, quiet=True).passed
    monkeypatch.setattr(stream, "scales", _without(field))
    report = api.verify(ckpt, out, quiet=True)
    assert not report.passed and report.logits.max_rel > 10 * report.tolerance.max_rel, report.to_json()


def test_nope_layers_llama_cpp_cannot_run_are_refused_and_onnx_follows_them(tiny_base, make_ckpt, tmp_path, capsys):
    """llama.cpp's smollm3 graph fixes the NoPE layers at every 4th: another no_rope_layers is refused in
    one line naming what follows it; the ONNX graph and mlx-lm compute it."""
    base = tmp_path / "base"
    shutil.copytree(tiny_base("smollm3"), base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "no_rope_layers": [1, 0, 1, 1]}))
    ckpt = make_ckpt(base, "qa-blora", 32, 4, base_quant=MinMaxGrid(4, 1, 32))
    code, err = run_cli(capsys, "to-gguf", ckpt, tmp_path / "m.gguf", "--type", "f32", "--quiet")
    assert code == 2 and len(err.splitlines()) == 1 and "layers [1]" in err and "ONNX or MLX" in err, err
    assert not (tmp_path / "m.gguf").exists()
    for kind in ("onnx", "mlx"):
        api.export(ckpt, tmp_path / kind, kind, quiet=True)
        report = api.verify(ckpt, tmp_path / kind, quiet=True)
        assert report.passed, report.to_json()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["granite", "smollm3", "gemma2", "gemma3_text", "phi3"])
def test_onnxruntime_genai_generates_what_training_would(ckpts, tmp_path, arch):
    """onnxruntime-genai takes the family's model.type and decodes with its KV cache the greedy tokens
    of the training-time model (transformers, base as trained + adapter branches)."""
    import onnxruntime_genai as og

    from blora_export.reference import adapter_branches, apply_trained_base, load_hf_model, tokenize_prompts

    ckpt = ckpts(arch, "q-blora")
    job = api.open_job(ckpt, quiet=True)
    prompt, steps = tokenize_prompts(job.base, ["Once upon a time"])[0], 8
    model = load_hf_model(job.base.path)
    apply_trained_base(model, job.base, job.plan)
    ids = list(prompt)
    with torch.no_grad(), adapter_branches(model, list(job.ckpt.modules.values())):
        while len(ids) < len(prompt) + steps:
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    out = tmp_path / "onnx"
    api.export(ckpt, out, "onnx", quiet=True)
    assert json.loads((out / "genai_config.json").read_text())["model"]["type"] == family(arch).genai_type
    og_model = og.Model(str(out))
    params = og.GeneratorParams(og_model)
    params.set_search_options(max_length=len(prompt) + steps, do_sample=False)
    generator = og.Generator(og_model, params)
    generator.append_tokens(np.array(prompt, np.int32))
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    assert tokens and tokens == ids[len(prompt):len(prompt) + len(tokens)], (tokens, ids[len(prompt):])


# ------------------------------------------------------------------ Mistral's sliding window

@pytest.fixture(scope="module")
def windowed(tiny_base, make_ckpt):
    base = tiny_base("mistral", sliding_window=8)  # the built-in prompts are 12-21 tokens
    return make_ckpt(base, "qa-blora", 32, 4, base_quant=MinMaxGrid(4, 1, 32))


def test_gguf_caps_the_context_at_the_window_and_says_so(windowed, tmp_path, caplog):
    out = tmp_path / "m.gguf"
    result = api.export(windowed, out, "gguf", gguf_type="f32", quiet=True)
    assert field(out, "llama.context_length") == 8
    assert "capped at the attention window" in field(out, "blora.attention_window")
    assert "capped" in result.details["attention_window"]
    assert any("sliding window" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


def test_mlx_refuses_a_window_it_cannot_run(windowed, tmp_path, capsys):
    code, err = run_cli(capsys, "to-safetensors", windowed, tmp_path / "mlx", "--layout", "mlx", "--quiet")
    assert code == 2 and len(err.splitlines()) == 1 and "sliding window of 8" in err and "ONNX" in err
    assert not (tmp_path / "mlx").exists()


@pytest.mark.slow
def test_window_in_onnx_exact_and_in_llama_cpp_only_within_it(windowed, tmp_path):
    onnx = tmp_path / "onnx"
    api.export(windowed, onnx, "onnx", quiet=True)
    assert api.verify(windowed, onnx, quiet=True).passed  # prompts longer than the window: in the graph
    gguf = tmp_path / "m.gguf"
    api.export(windowed, gguf, "gguf", gguf_type="f32", quiet=True)
    short = ["The fox", "Once upon"]
    from blora_export.reference import load_tokenizer
    assert all(len(load_tokenizer(api.open_job(windowed, quiet=True).base.path)(p)["input_ids"]) <= 8 for p in short)
    assert api.verify(windowed, gguf, prompts=short, runtime="llama.cpp", quiet=True).passed
    # past the capped context llama.cpp attends to everything: a different model, which verify sees
    assert not api.verify(windowed, gguf, runtime="llama.cpp", quiet=True).passed


# ------------------------------------------------------------------ K-quants

@pytest.fixture(scope="module")
def wide(tiny_base, make_ckpt):
    """256-wide rows: llama.cpp's K-quants need rows of 256 (narrower ones fall back to legacy types)."""
    base = tiny_base("llama3", hidden_size=256, intermediate_size=512, num_heads=8, num_kv_heads=4)
    return make_ckpt(base, "qa-blora", 32, 4, base_quant=MinMaxGrid(4, 1, 32))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["q4_k_m", "q6_k"])
def test_k_quants_come_from_llama_cpp_and_report_their_error(wide, tmp_path, kind):
    out = tmp_path / "k.gguf"
    result = api.export(wide, out, "gguf", gguf_type=kind, quiet=True)
    d = result.details
    assert d["type"] == kind and d["encoding"] == "llama-quantize" and "post-training" in d["linear_weights"]
    assert ("Q4_K" if kind == "q4_k_m" else "Q6_K") in d["tensor_types"]
    assert 0 < d["ptq_error"]["weight_rel_rms"] < 0.1 and d["ptq_error"]["tensors"] == 14
    assert field(out, "blora.encoding") == "llama-quantize" and field(out, "blora.type") == kind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.gguf"]  # no temporary file left
    report = api.verify(wide, out, runtime="llama.cpp", quiet=True)
    # within 4x what the same llama.cpp quantization does to the base alone; on this tiny random model that
    # is as large as the adapter's effect, so verify says INCONCLUSIVE rather than PASS
    assert report.logits_passed and report.layers_passed, report.to_json()
    assert any("post-training quantization" in n for n in report.notes)
    assert "emulated" in report.tolerance.basis  # the floor is llama.cpp's arithmetic, not a file of this writer
    print(f"\n{kind}: error {report.logits.max_rel:.2e}, bound {report.tolerance.max_rel:.2e} ({report.tolerance.basis})")


def test_k_quant_without_llama_cpp_is_one_line(ckpts, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    code, err = run_cli(capsys, "to-gguf", ckpts("llama3", "qa-blora"), tmp_path / "k.gguf", "--type", "q4_k_m",
                        "--quiet")
    assert code == 2 and len(err.splitlines()) == 1 and "pip install llama-cpp-python" in err
    assert list(tmp_path.iterdir()) == []


def test_k_quant_failure_leaves_no_output(ckpts, tmp_path, monkeypatch):
    def fail(source, target, kquant):
        raise RuntimeError("quantizer crashed")

    monkeypatch.setattr(gguf_kquant, "quantize_file", fail)
    with pytest.raises(RuntimeError):
        api.export(ckpts("llama3", "qa-blora"), tmp_path / "k.gguf", "gguf", gguf_type="q4_k_m", quiet=True)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ stop tokens

def test_stop_ids_reach_every_output(ckpts, tmp_path):
    import llama_cpp

    ckpt = ckpts("llama3", "qa-blora")
    gguf = tmp_path / "m.gguf"
    result = api.export(ckpt, gguf, "gguf", gguf_type="f32", quiet=True)
    stops = result.details["tokenizer"]["stop_ids"]
    assert len(stops) == 2
    llm = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    assert all(llama_cpp.llama_vocab_is_eog(vocab, i) for i in stops)
    onnx = tmp_path / "onnx"
    api.export(ckpt, onnx, "onnx", quiet=True)
    assert json.loads((onnx / "genai_config.json").read_text())["model"]["eos_token_id"] == stops
    for kind in ("mlx", "safetensors"):
        out = tmp_path / kind
        api.export(ckpt, out, kind, quiet=True)
        assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == stops
        assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())


def _stop_early_base(base, tmp_path, stop_id, prompt_ids):
    """A copy of ``base`` whose head makes ``stop_id`` the greedy choice after a few tokens: its row
    becomes 1.5x the row of the token greedy decoding picks third (whose logit is the largest there)."""
    from blora_export.reference import load_hf_model

    model = load_hf_model(base)
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(3):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    out = tmp_path / "stop-base"
    shutil.copytree(base, out)
    state = load_file(str(out / "model.safetensors"))
    state["lm_head.weight"][stop_id] = 1.5 * state["lm_head.weight"][ids[-1]]
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.mark.slow
def test_greedy_generation_stops_at_eos_in_llama_cpp_and_genai(tiny_base, make_ckpt, tmp_path):
    import llama_cpp
    import onnxruntime_genai as og

    from blora_export.reference import adapter_branches, apply_trained_base, load_hf_model, tokenize_prompts

    base = tiny_base("llama3")
    stops = json.loads((base / "generation_config.json").read_text())["eos_token_id"]
    job0 = api.open_job(make_ckpt(base, "q-blora", 2, 2), quiet=True)
    prompt = tokenize_prompts(job0.base, ["Once upon a time"])[0]
    stop_base = _stop_early_base(base, tmp_path, stops[0], prompt)  # <|end_of_text|>: not the tokenizer's eos
    ckpt = make_ckpt(stop_base, "q-blora", 2, 2)
    job = api.open_job(ckpt, quiet=True)
    model = load_hf_model(stop_base)
    apply_trained_base(model, job.base, job.plan)
    ids, steps = list(prompt), 12
    with torch.no_grad(), adapter_branches(model, list(job.ckpt.modules.values())):
        while len(ids) < len(prompt) + steps and ids[-1] not in stops:
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    expected = ids[len(prompt):]
    assert expected[-1] in stops and len(expected) < steps, expected  # the reference stops early

    gguf = tmp_path / "m.gguf"
    api.export(ckpt, gguf, "gguf", gguf_type="f32", quiet=True)
    llm = open_llama(gguf, n_ctx=64)
    completion = llm.create_completion(prompt, max_tokens=steps, temperature=0.0, top_k=1)
    assert completion["choices"][0]["finish_reason"] == "stop"  # llama-cpp-python's loop stopped at an EOG id
    llm.close()
    llm = open_llama(gguf, n_ctx=64, logits_all=True)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    llm.eval(prompt)
    tokens = []
    while len(tokens) < steps:
        tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        if llama_cpp.llama_vocab_is_eog(vocab, tokens[-1]):
            break
        llm.eval(tokens[-1:])
    llm.close()
    assert tokens == expected  # the same greedy tokens, ending at the stop id llama.cpp stops at

    onnx = tmp_path / "onnx"
    api.export(ckpt, onnx, "onnx", quiet=True)
    og_model = og.Model(str(onnx))
    params = og.GeneratorParams(og_model)
    params.set_search_options(max_length=len(prompt) + steps, do_sample=False)
    generator = og.Generator(og_model, params)
    generator.append_tokens(np.array(prompt, np.int32))
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    assert tokens == expected  # stops at the stop id (genai's eos_token_id list)


def test_cli_offers_exactly_the_k_quants_the_writer_knows():
    from blora_export import cli

    assert cli.GGUF_KQUANTS == list(gguf_kquant.KQUANT_TYPES)
