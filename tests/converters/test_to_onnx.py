"""ONNX decoders: onnxruntime (and onnxruntime-genai) reproduce the training-time logits.

fp32 matches the training-time model to float32 noise; int4 (int8) QA-BLoRA on a 4-bit (8-bit)
min-max grid exports the checkpoint's own codes and scales with the update folded into float32
block offsets and matches to ~1e-6; decoding with the KV cache equals the one-pass logits (also
left-padded in a batch); an offset without the +8α (+128α), or without the fold, makes both the
per-layer check and the logits fail.
"""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from blora_export import api
from blora_export.errors import UnsupportedError
from blora_export.numerics import logit_stats
from blora_export.quant import quantize_minmax, to_row_blocks
from blora_export.reference import (
    DEFAULT_PROMPTS,
    adapter_branches,
    apply_trained_base,
    load_hf_model,
    reference_logits,
    tokenize_prompts,
)
from blora_export.spec import MinMaxGrid
from converters import onnx_weights, to_onnx
from converters.onnx_graph import IR_VERSION, OPSET, Graph, QuantLinear, linear

FLOAT_NOISE = 1e-5  # float32: measured 1-5e-6 relative on all models here


@pytest.fixture(scope="module")
def reference():
    """``reference(job) -> (ids, training-time logits, logits without adapter)``, cached per checkpoint."""
    cache = {}

    def get(job):
        key = str(job.ckpt.path)
        if key not in cache:
            ids = tokenize_prompts(job.base, DEFAULT_PROMPTS)
            ref = reference_logits(job.base, job.ckpt, job.plan, ids)
            cache[key] = (ids, ref.trained, ref.without_adapter)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """``export(ckpt, **options) -> (job, out)``, cached per checkpoint and options."""
    cache = {}

    def build(ckpt, **options):
        key = (str(ckpt), tuple(sorted(options.items())))
        if key not in cache:
            job = api.open_job(ckpt, quiet=True)
            out = tmp_path_factory.mktemp("onnx") / "model"
            to_onnx.export(job, out, **options)
            cache[key] = (job, out)
        return cache[key]

    return build


def onnx_logits(job, out, ids):
    return to_onnx.open_artifact(out, job).logits(ids)


def compare(reference, job, out):
    ids, trained, without = reference(job)
    stats = logit_stats(trained, onnx_logits(job, out, ids))
    effect = logit_stats(trained, without).max_rel
    return stats, effect


def failed(checks):
    return [c for c in checks if not c.passed]


@pytest.fixture(scope="module")
def qa_job(samples):
    return api.open_job(samples / "qa-blora-q4_1", quiet=True)


@pytest.fixture(scope="module")
def qa8(samples, make_ckpt):
    """A QA-BLoRA checkpoint on an 8-bit 1x32 min-max grid (λi = 32, λo = 4), on the sample base."""
    return make_ckpt(samples / "base", "qa-blora", 32, 4, base_quant=MinMaxGrid(8, 1, 32), seed=11)


@pytest.mark.parametrize("bits, t", [(4, 16), (8, 16), (8, 32)])
def test_lowbit_encoding_runs_in_matmulnbits(bits, t):
    """Our packing and ``α·(q−z) + (β+zα)`` (z = 8 for int4, 128 for int8) in a lone MatMulNBits equal
    ``x @ (αq + β)ᵀ``."""
    gen = torch.Generator().manual_seed(bits)
    n, k, z = 24, 64, onnx_weights.zero_point(bits)
    assert z == {4: 8, 8: 128}[bits]
    codes = torch.randint(0, 2**bits, (n, k), generator=gen, dtype=torch.uint8)
    alpha = torch.rand(n, k // t, generator=gen, dtype=torch.float64).to(torch.float16).double()
    beta = (-torch.rand(n, k // t, generator=gen, dtype=torch.float64)).to(torch.float16).double()
    weight = torch.repeat_interleave(alpha, t, 1) * codes.double() + torch.repeat_interleave(beta, t, 1)
    data = QuantLinear(packed=onnx_weights.pack_codes(codes, t, bits), scales=alpha.float().numpy(),
                       offsets_t=(beta + z * alpha).T.float().contiguous().numpy(), block_size=t, accuracy_level=0,
                       bits=bits)
    assert data.packed.shape == (n, k // t, t * bits // 8)
    assert torch.equal(onnx_weights.unpack_codes(data.packed, bits), codes)

    class Store:
        def __init__(self):
            self.protos = []

        def add(self, name, array):
            self.protos.append(onnx.numpy_helper.from_array(array, name))
            return name

    store = Store()
    g = Graph(store)
    linear(g, "x", data, "w")
    g.nodes[-1].output[0] = "y"
    graph = onnx.helper.make_graph(g.nodes, "g", [onnx.helper.make_tensor_value_info("x", 1, [1, 3, k])],
                                   [onnx.helper.make_tensor_value_info("y", 1, None)], store.protos)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET),
                                                         onnx.helper.make_opsetid("com.microsoft", 1)])
    x = torch.randn(1, 3, k, generator=gen)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    expected = (x.double() @ weight.T).numpy()
    assert np.abs(y - expected).max() <= 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize("name", ["qa-blora-q4_1", "q-blora-nf4", "paper-qa-blora"])
def test_fp32_matches_training_time_model(samples, export, reference, name):
    job, out = export(samples / name, precision="fp32")
    stats, effect = compare(reference, job, out)
    assert stats.max_rel <= FLOAT_NOISE and stats.top1_agreement == 1.0, stats
    assert effect > 1000 * FLOAT_NOISE  # the adapter matters far more than the bound
    assert not failed(to_onnx.open_artifact(out, job).layer_checks())


def test_export_is_ir10_opset21_and_validates(samples, export):
    job, out = export(samples / "qa-blora-q4_1", precision="int4")
    model = onnx.load(str(out / "model.onnx"))
    assert model.ir_version == IR_VERSION == 10
    assert {o.domain: o.version for o in model.opset_import} == {"": OPSET, "com.microsoft": 1}
    assert to_onnx.detect(out) and not to_onnx.detect(samples / "base")
    names = {i.name for i in model.graph.input}
    assert {"input_ids", "attention_mask", "position_ids", "past_key_values.1.value"} <= names
    config = json.loads((out / "genai_config.json").read_text())["model"]
    assert config["type"] == "llama" and config["decoder"]["num_key_value_heads"] == 2
    assert (out / "tokenizer.json").is_file() and (out / "blora_export.json").is_file()


def test_fp16_weights_correctly_rounded(samples, export, reference):
    job, out = export(samples / "qa-blora-q4_1", precision="fp16")
    artifact = to_onnx.open_artifact(out, job)
    checks = artifact.layer_checks()
    assert not failed(checks) and any("ulp(float16)" in c.check for c in checks)
    stats, _ = compare(reference, job, out)
    assert stats.max_rel <= artifact.tolerance.max_rel


def test_int4_qa_blora_is_exact(samples, export, reference):
    job, out = export(samples / "qa-blora-q4_1", precision="int4")
    meta = json.loads((out / "blora_export.json").read_text())["int4"]
    assert meta["mode"] == "exact" and meta["block_size"] == 32 and meta["accuracy_level"] == 0
    stats, effect = compare(reference, job, out)
    assert stats.max_rel <= FLOAT_NOISE and stats.top1_agreement == 1.0, stats
    checks = to_onnx.open_artifact(out, job).layer_checks()
    assert not failed(checks)
    assert all(c.value == 0 for c in checks if "mismatches" in c.check)  # the checkpoint's own codes and α
    assert len([c for c in checks if "mismatches" in c.check]) == len(job.ckpt.modules)


def test_int4_block_16_is_exact_too(samples, export, reference):
    job, out = export(samples / "qa-blora-q4_1", precision="int4", block_size=16)
    stats, _ = compare(reference, job, out)
    assert stats.max_rel <= FLOAT_NOISE


def test_int4_offset_without_8_alpha_fails(samples, tmp_path, reference, monkeypatch):
    """β+ΔW instead of β+ΔW+8α (the default zero point forgotten): the checks must catch it."""
    exact = onnx_weights.exact_codes

    def wrong(job, name, block, bits):
        codes, alpha, offsets = exact(job, name, block, bits)
        return codes, alpha, offsets - onnx_weights.zero_point(bits) * alpha.double()

    monkeypatch.setattr(onnx_weights, "exact_codes", wrong)
    job = api.open_job(samples / "qa-blora-q4_1", quiet=True)
    to_onnx.export(job, tmp_path / "bad", precision="int4")
    stats, _ = compare(reference, job, tmp_path / "bad")
    assert stats.max_rel > 100 * FLOAT_NOISE
    assert any("β+ΔW+8α" in c.check for c in failed(to_onnx.open_artifact(tmp_path / "bad", job).layer_checks()))


def test_int8_qa_blora_on_an_8_bit_grid_is_exact(qa8, export, reference):
    """The checkpoint's own 8-bit codes (one per byte) and α, β+ΔW+128α in float32: the float32 bound."""
    job, out = export(qa8, precision="int8")
    info = json.loads((out / "blora_export.json").read_text())
    assert info["precision"] == "int8" and "int4" not in info
    meta = info["int8"]
    assert (meta["mode"], meta["block_size"], meta["accuracy_level"], meta["bits"]) == ("exact", 32, 0, 8)
    node = next(n for n in onnx.load(str(out / "model.onnx")).graph.node if n.op_type == "MatMulNBits")
    assert {a.name: a.i for a in node.attribute}["bits"] == 8 and len(node.input) == 3  # no zero_points input
    stats, effect = compare(reference, job, out)
    assert stats.max_rel <= FLOAT_NOISE and stats.top1_agreement == 1.0, stats
    assert effect > 1000 * FLOAT_NOISE
    checks = to_onnx.open_artifact(out, job).layer_checks()
    assert not failed(checks)
    codes = [c for c in checks if "int8 codes" in c.check]
    assert len(codes) == len(job.ckpt.modules) and all(c.value == 0 for c in codes)
    report = api.verify(qa8, out, quiet=True)
    assert report.passed and report.tolerance.max_rel == FLOAT_NOISE, report.to_json()


@pytest.mark.parametrize("breakage", ["no fold", "int4 zero point"])
def test_int8_broken_fold_fails(qa8, tmp_path, reference, monkeypatch, breakage):
    """The fold dropped (offsets β+128α: the base without the adapter), or int4's zero point 8 used for int8
    (β+ΔW+8α): the per-layer offset check and the logits must both fail."""
    exact = onnx_weights.exact_codes

    def wrong(job, name, block, bits):
        codes, alpha, offsets = exact(job, name, block, bits)
        if breakage == "int4 zero point":
            return codes, alpha, offsets - (onnx_weights.zero_point(bits) - 8) * alpha.double()
        qw = quantize_minmax(job.base.tensor(name).float(), job.plan.base_quant, name)
        beta = to_row_blocks(qw, block)[1].double()
        return codes, alpha, beta + onnx_weights.zero_point(bits) * alpha.double()

    monkeypatch.setattr(onnx_weights, "exact_codes", wrong)
    job = api.open_job(qa8, quiet=True)
    to_onnx.export(job, tmp_path / "bad", precision="int8")
    report = api.verify(qa8, tmp_path / "bad", quiet=True)
    assert not report.passed and not report.logits_passed
    assert report.logits.max_rel > 100 * FLOAT_NOISE
    assert any("β+ΔW+128α" in c.check for c in report.layers if not c.passed)


def test_int8_refusals_name_what_would_work(samples, qa8, tmp_path):
    """A 4-bit checkpoint asked for int8 (and an 8-bit one for int4): one line naming the exports that fold it."""
    with pytest.raises(UnsupportedError) as info:
        to_onnx.export(api.open_job(samples / "qa-blora-q4_1", quiet=True), tmp_path / "x", precision="int8")
    message = str(info.value)
    assert "\n" not in message
    assert "the grid has 4-bit codes, MatMulNBits int8 block 32 stores 8-bit codes" in message
    assert "to-onnx --precision int4" in message and "--requantize" in message
    with pytest.raises(UnsupportedError, match=r"the grid has 8-bit codes.*to-onnx --precision int8"):
        to_onnx.export(api.open_job(qa8, quiet=True), tmp_path / "x", precision="int4")
    with pytest.raises(UnsupportedError, match=r"runtime block 64 does not divide the grid's block_in 32"):
        to_onnx.export(api.open_job(qa8, quiet=True), tmp_path / "x", precision="int8", block_size=64)
    assert not (tmp_path / "x").exists()


def test_int8_requantize_is_rtn_of_exact_merge(samples, export):
    """Q-BLoRA to int8: merge, 8-bit min-max RTN, error reported (about 16x below int4's) and checked."""
    job, out = export(samples / "q-blora-nf4", precision="int8", requantize=True)
    info = json.loads((out / "blora_export.json").read_text())
    assert info["int8"]["mode"] == "requantized" and "8-bit" in info["int8"]["note"]
    _, out4 = export(samples / "q-blora-nf4", precision="int4", requantize=True)
    err4 = json.loads((out4 / "blora_export.json").read_text())["ptq_error"]["weight_max_rel"]
    assert 0 < info["ptq_error"]["weight_max_rel"] < err4 / 8
    checks = to_onnx.open_artifact(out, job).layer_checks()
    assert not failed(checks)
    assert all(c.value == 0 for c in checks if "int8 codes" in c.check)


def test_int8_accuracy_level_4_within_its_floor(qa8, export, reference):
    """int8 activations (accuracy_level 4) on int8 weights: verify bounds it by the emulated activation floor."""
    job, out = export(qa8, precision="int8", accuracy_level=4)
    stats, _ = compare(reference, job, out)
    assert 1e-4 < stats.max_rel  # int8 activations really are used
    report = api.verify(qa8, out, quiet=True)
    assert report.passed, report.to_json()
    assert stats.max_rel <= report.tolerance.max_rel


def test_int4_accuracy_level_4_within_measured_bound(samples, export, reference):
    job, out = export(samples / "qa-blora-q4_1", precision="int4", accuracy_level=4)
    artifact = to_onnx.open_artifact(out, job)
    stats, _ = compare(reference, job, out)
    assert 1e-4 < stats.max_rel <= artifact.tolerance.max_rel  # int8 activations really are used
    assert stats.top1_agreement >= artifact.tolerance.min_top1


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_kv_cache_decode_equals_one_pass(samples, export, qa_job, precision):
    job, out = export(samples / "qa-blora-q4_1", precision=precision)
    session = to_onnx.onnx_session(out / "model.onnx")
    decoder = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
    for prompt in tokenize_prompts(job.base, DEFAULT_PROMPTS):
        check = to_onnx.decode_check(session, decoder, prompt, FLOAT_NOISE, steps=len(prompt) - 1)
        assert check.passed, check


def test_left_padded_batch_with_past_equals_single_prompts(samples, export):
    job, out = export(samples / "qa-blora-q4_1", precision="fp32")
    session = to_onnx.onnx_session(out / "model.onnx")
    decoder = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
    long, short = sorted(tokenize_prompts(job.base, DEFAULT_PROMPTS[:2]), key=len, reverse=True)
    pad = len(long) - len(short)
    mask = np.array([[1] * len(long), [0] * pad + [1] * len(short)], np.int64)
    feeds = {"input_ids": np.array([long, [0] * pad + short], np.int64), "attention_mask": mask,
             "position_ids": np.clip(mask.cumsum(1) - 1, 0, None)}
    layers, heads, size = decoder["num_hidden_layers"], decoder["num_key_value_heads"], decoder["head_size"]
    for i in range(layers):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros((2, heads, 0, size), np.float32)
    outputs = session.run(None, feeds)
    names = [o.name for o in session.get_outputs()]
    logits = outputs[names.index("logits")]
    for row, prompt, start in ((0, long, 0), (1, short, pad)):
        single = to_onnx.prompt_logits(session, decoder, prompt)
        assert np.abs(logits[row, start:] - single).max() <= FLOAT_NOISE * np.abs(single).max()
    step = {"input_ids": np.array([[5], [7]], np.int64), "attention_mask": np.concatenate([mask, [[1], [1]]], 1),
            "position_ids": np.array([[len(long)], [len(short)]], np.int64)}
    for i in range(layers):
        for kind in ("key", "value"):
            step[f"past_key_values.{i}.{kind}"] = outputs[names.index(f"present.{i}.{kind}")]
    stepped = session.run(["logits"], step)[0]
    for row, prompt, token in ((0, long, 5), (1, short, 7)):
        single = to_onnx.prompt_logits(session, decoder, prompt + [token])[-1]
        assert np.abs(stepped[row, 0] - single).max() <= FLOAT_NOISE * np.abs(single).max()


@pytest.mark.parametrize("arch,kwargs", [("mistral", {}), ("qwen2", {"tie_word_embeddings": True}),
                                         ("llama", {"legacy_config": True})])
def test_architectures(tiny_base, make_ckpt, export, reference, arch, kwargs):
    """mistral (rope_theta 1e6), qwen2 (q/k/v biases, tied head), llama with a transformers-4 config."""
    base = tiny_base(arch, **kwargs)
    ckpt = make_ckpt(base, "qa-blora", 32, 4, base_quant=MinMaxGrid(4, 1, 32), seed=7)
    for precision in ("fp32", "int4"):
        job, out = export(ckpt, precision=precision)
        stats, effect = compare(reference, job, out)
        assert stats.max_rel <= FLOAT_NOISE and effect > 1000 * FLOAT_NOISE, (precision, stats)
    assert json.loads((out / "genai_config.json").read_text())["model"]["type"] == arch


@pytest.mark.parametrize("change", ["sliding_window", "linear_rope"])
def test_config_variants(tiny_base, make_ckpt, tmp_path, reference, change):
    """A mistral sliding window shorter than the prompts, and linear rope scaling."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_base("mistral"), base)
    config = json.loads((base / "config.json").read_text())
    if change == "sliding_window":
        config["sliding_window"] = 4
    else:
        config["rope_parameters"] = {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}
    (base / "config.json").write_text(json.dumps(config))
    ckpt = make_ckpt(base, "qa-blora", 32, 4, base_quant=MinMaxGrid(4, 1, 32), seed=3)
    job = api.open_job(ckpt, quiet=True)
    to_onnx.export(job, tmp_path / "out")
    stats, _ = compare(reference, job, tmp_path / "out")
    assert stats.max_rel <= FLOAT_NOISE, stats


def test_refusals_name_what_would_work(samples, tmp_path):
    qa = api.open_job(samples / "qa-blora-q4_1", quiet=True)
    with pytest.raises(UnsupportedError, match=r"runtime 1-D blocks of 16, 32.*--requantize"):
        to_onnx.export(qa, tmp_path / "x", precision="int4", block_size=64)
    with pytest.raises(UnsupportedError, match=r"no runtime block .* divides lambda_in=4"):
        to_onnx.export(api.open_job(samples / "paper-qa-blora", quiet=True), tmp_path / "x", precision="int4")
    with pytest.raises(UnsupportedError, match=r"Q-BLoRA .* merge-then-quantize.*--requantize"):
        to_onnx.export(api.open_job(samples / "q-blora-nf4", quiet=True), tmp_path / "x", precision="int4")
    with pytest.raises(UnsupportedError, match="int4 / int8 only"):
        to_onnx.export(qa, tmp_path / "x", precision="fp16", block_size=32)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name", ["q-blora-nf4", "paper-qa-blora"])
def test_requantize_is_rtn_of_exact_merge_and_reports_error(samples, export, name):
    job, out = export(samples / name, precision="int4", requantize=True)
    info = json.loads((out / "blora_export.json").read_text())
    meta = info["int4"]
    assert meta["mode"] == "requantized" and info["ptq_error"]["weight_max_rel"] > 0.01
    assert ("merge-then-quantize" in meta["note"]) == (job.ckpt.method == "q-blora")
    checks = to_onnx.open_artifact(out, job).layer_checks()
    assert not failed(checks)
    dequantized = [c for c in checks if "dequantized in transformers" in c.check]
    assert len(dequantized) == 1 and dequantized[0].value <= FLOAT_NOISE


def test_external_data_and_deterministic_bytes(samples, export, qa_job, tmp_path, monkeypatch):
    _, inline = export(samples / "qa-blora-q4_1", precision="int4")
    to_onnx.export(qa_job, tmp_path / "again", precision="int4")
    assert (tmp_path / "again" / "model.onnx").read_bytes() == (inline / "model.onnx").read_bytes()
    monkeypatch.setattr(to_onnx, "INLINE_LIMIT", 0)
    to_onnx.export(qa_job, tmp_path / "ext", precision="int4")
    assert (tmp_path / "ext" / "model.onnx.data").is_file() and not (inline / "model.onnx.data").exists()
    assert (tmp_path / "ext" / "model.onnx").stat().st_size < 100_000
    ids = tokenize_prompts(qa_job.base, DEFAULT_PROMPTS[:1])
    a, b = onnx_logits(qa_job, inline, ids), onnx_logits(qa_job, tmp_path / "ext", ids)
    assert torch.equal(a[0], b[0])


def test_verify_cli_path(samples, export):
    """What `blora-export verify CKPT OUT_DIR` runs: detection, layer checks, logits."""
    _, out = export(samples / "qa-blora-q4_1", precision="int4")
    report = api.verify(samples / "qa-blora-q4_1", out, quiet=True)
    assert report.passed and report.logits.max_rel <= FLOAT_NOISE
    assert any("KV-cache" in c.check for c in report.layers)


@torch.no_grad()
def greedy_reference(job, prompt, steps):
    model = load_hf_model(job.base.path)
    apply_trained_base(model, job.base, job.plan)
    ids = list(prompt)
    with adapter_branches(model, list(job.ckpt.modules.values())):
        for _ in range(steps):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "int4", "int8"])
def test_onnxruntime_genai_greedy_generation(samples, qa8, export, precision):
    import onnxruntime_genai as og  # a declared test dependency (.ci/run installs onnxruntime-genai)

    job, out = export(qa8 if precision == "int8" else samples / "qa-blora-q4_1", precision=precision)
    prompt = tokenize_prompts(job.base, DEFAULT_PROMPTS[2:3])[0]
    steps = 16
    model = og.Model(str(out))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + steps, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array(prompt, np.int32))
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    assert tokens == greedy_reference(job, prompt, steps)
    assert og.Tokenizer(model).decode(tokens)  # genai reads the copied tokenizer files


@pytest.mark.parametrize("precision, dtype", [("fp32", np.float32), ("fp16", np.float16)])
def test_the_head_written_in_row_blocks_is_the_transposed_head(samples, tmp_path, monkeypatch, precision, dtype):
    """The untied head goes to the data file ROW_BLOCK rows at a time (never a whole float32 copy): with
    blocks of 7 rows (the last one short) the stored initializer is still exactly the transposed head."""
    from blora_export.base import BaseModel

    monkeypatch.setattr(onnx_weights, "ROW_BLOCK", 7)
    monkeypatch.setattr(to_onnx, "INLINE_LIMIT", 0)  # keep model.onnx.data: the blocks as written
    out = tmp_path / precision
    api.export(samples / "qa-blora-q4_1", out, "onnx", quiet=True, precision=precision)
    head = onnx_weights.TensorReader(out / to_onnx.MODEL_FILE).array("lm_head.MatMul.weight")
    expected = BaseModel.open(samples / "base").tensor("lm_head.weight").float().T.numpy().astype(dtype)
    assert head.dtype == dtype and head.shape == expected.shape and np.array_equal(head, expected)
    assert api.verify(samples / "qa-blora-q4_1", out, quiet=True).passed
