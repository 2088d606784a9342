"""GGUF exports against real clients: llama.cpp (llama-cpp-python) and transformers' GGUF loader.

The reference is the training-time model (base as trained + adapter branches via hooks), built
without the converter. Bounds, with what was measured on these tiny models:

* llama.cpp, f32 weights: float noise of its F16 KV cache (measured 1.5e-3 relative; its error
  on the base alone, without adapter, 6.9e-4);
* llama.cpp, Q4_1: it quantizes activations to 8 bits, so the bound is FLOOR_FACTOR (4) times its
  error on the same kind of file *without the adapter* against the trained base (measured: 4.7e-2
  with vs 2.2e-2 without; the adapted model is ~2x as sensitive even with f32 weights);
* transformers' GGUF loader dequantizes exactly: the fold differs from the trained model only by
  the fp16 rounding of β' and the f16 embeddings, whose cost is computed from the checkpoint
  (gguf_runtime.fold_tolerance; measured 4.5e-3 on the sample, and the file matches it exactly);
* base + --adapter-only in llama.cpp vs the merged f32 export: 1.7e-4 at most.
"""
import hashlib
import json
import shutil

import gguf
import llama_cpp  # noqa: F401  (a declared test dependency: .ci/run installs llama-cpp-python)
import numpy as np
import pytest
import torch
from gguf import GGUFReader

from blora_export import api
from blora_export.cli import main
from blora_export.errors import BadInputError, UnsupportedError
from blora_export.numerics import logit_stats
from blora_export.quant import fold_into_zero_points, quantize_minmax
from blora_export.reference import DEFAULT_PROMPTS, reference_logits, tokenize_prompts
from blora_export.spec import MinMaxGrid
from blora_export.tolerance import FLOOR_FACTOR
from converters import gguf_model, gguf_runtime, gguf_tokenizer, to_gguf
from converters.gguf_runtime import gguf_py_model_logits, llama_cpp_logits

F16_BOUND = 16 * 2.0**-11
LLAMA_F32_BOUND = 3e-3


def hf_to_llama(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """docs/FORMATS.md's permutation, written out independently of the converter."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def export(ckpt, out, **options):
    return api.export(ckpt, out, "gguf", quiet=True, **options)


def reference(ckpt, **job_options):
    job = api.open_job(ckpt, quiet=True, **job_options)
    ids = tokenize_prompts(job.base, DEFAULT_PROMPTS)
    return job, ids, reference_logits(job.base, job.ckpt, job.plan, ids)


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def q41(samples, tmp_path_factory):
    """The sample QA-BLoRA checkpoint exported with no options (q4_1 fold), and its reference."""
    out = tmp_path_factory.mktemp("gguf") / "model.gguf"
    result = export(samples / "qa-blora-q4_1", out)
    job, ids, ref = reference(samples / "qa-blora-q4_1")
    return out, result, job, ids, ref


def test_default_is_the_fold_with_the_checkpoints_own_codes(q41):
    out, result, job, _, _ = q41
    assert (result.details["type"], result.details["encoding"]) == ("q4_1", "fold")
    assert result.details["embeddings"] == "f16" and "ptq_error" not in result.details
    tensors = {t.name: t for t in GGUFReader(str(out)).tensors}
    assert "output.weight" in tensors and tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    heads = {"attn_q": 4, "attn_k": 2}
    for module in job.ckpt.modules.values():
        layer, kind = int(module.name.split(".")[2]), module.name.rsplit(".", 1)[-1]
        gname = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                 "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[kind]
        t = tensors[f"blk.{layer}.{gname}.weight"]
        assert t.tensor_type == gguf.GGMLQuantizationType.Q4_1
        dq = torch.from_numpy(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type))
        qw = fold_into_zero_points(quantize_minmax(job.base.tensor(module.weight_name), job.ckpt.base_quant), module)
        want = qw.dequantize()
        if gname in heads:
            want = hf_to_llama(want, heads[gname])
        assert torch.equal(dq, want), module.name  # gguf-py's dequantization == QuantizedWeight, fp32-exact


def test_layer_checks_pass_and_see_a_dropped_one_over_lambda_in(q41, tmp_path, monkeypatch):
    out, _, job, _, _ = q41
    checks = to_gguf.open_artifact(out, job).layer_checks()
    assert checks and all(c.passed for c in checks), [c for c in checks if not c.passed][:3]
    assert max(c.value for c in checks if "half-ulp" in c.check) <= 0.5
    # The reference merge.py's bug: ΔW without the 1/λi. The file must fail its own checks.
    real = gguf_model.fold_into_zero_points
    monkeypatch.setattr(gguf_model, "fold_into_zero_points",
                        lambda qw, m: real(qw, type(m)(**{**m.__dict__, "h": m.h * m.lambda_in})))
    bad = tmp_path / "bad.gguf"
    export(job.ckpt.path, bad)
    monkeypatch.undo()
    failed = [c for c in to_gguf.open_artifact(bad, job).layer_checks() if not c.passed]
    assert any("β'" in c.check for c in failed)


def test_transformers_loader_matches_to_the_fp16_rounding_of_beta(q41, tmp_path):
    out, _, job, ids, ref = q41
    stats = logit_stats(ref.trained, gguf_py_model_logits(out, ids))
    bound = gguf_runtime.fold_tolerance(job)  # 2 x what correctly rounded fp16 β' cost: 2 x 4.5e-3
    assert stats.max_rel <= bound.max_rel and stats.top1_agreement >= bound.min_top1, (stats, bound)
    assert stats.max_rel <= F16_BOUND  # measured 4.5e-3, top-1 0.991
    # the usual pipeline (merge into the original weights, then quantize) is far off
    ptq = tmp_path / "ptq.gguf"
    export(job.ckpt.path, ptq, gguf_type="q4_1", merge_into="original", requantize=True)
    ptq_stats = logit_stats(ref.trained, gguf_py_model_logits(ptq, ids))
    assert ptq_stats.max_rel > 10 * stats.max_rel, (ptq_stats, stats)  # measured 9.7e-2


@pytest.mark.slow
def test_llama_cpp_f32_matches_the_training_time_model(q41, tmp_path):
    _, _, job, ids, ref = q41
    out = tmp_path / "f32.gguf"
    export(job.ckpt.path, out, gguf_type="f32")
    stats = logit_stats(ref.trained, llama_cpp_logits(out, ids))
    assert stats.max_rel <= LLAMA_F32_BOUND and stats.top1_agreement == 1.0, stats  # measured 1.5e-3


@pytest.mark.slow
def test_llama_cpp_q4_1_within_its_own_noise_floor_and_better_than_ptq(q41, tmp_path):
    out, _, job, ids, ref = q41
    base = tmp_path / "base.gguf"
    export(job.ckpt.path, base, base_only=True)  # the same codes, original β: no adapter
    floor = logit_stats(ref.without_adapter, llama_cpp_logits(base, ids))
    stats = logit_stats(ref.trained, llama_cpp_logits(out, ids))
    assert stats.max_rel <= FLOOR_FACTOR * floor.max_rel, (stats, floor)  # measured 4.7e-2 vs 2.2e-2
    ptq = tmp_path / "ptq.gguf"
    export(job.ckpt.path, ptq, gguf_type="q4_1", merge_into="original", requantize=True)
    ptq_stats = logit_stats(ref.trained, llama_cpp_logits(ptq, ids))
    assert ptq_stats.max_rel > 2 * stats.max_rel, (ptq_stats, stats)  # measured 0.127


@pytest.mark.slow
def test_wrong_permutation_fails_in_llama_cpp(q41, tmp_path, monkeypatch):
    _, _, job, ids, ref = q41
    monkeypatch.setattr(gguf_model, "permutation", lambda rows, n: torch.arange(rows))
    out = tmp_path / "unpermuted.gguf"
    export(job.ckpt.path, out, gguf_type="f32")
    stats = logit_stats(ref.trained, llama_cpp_logits(out, ids))
    assert stats.max_rel > 10 * LLAMA_F32_BOUND, stats


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qa-blora-q4_1", "q-blora-nf4"])
def test_adapter_on_its_base_equals_the_merged_export(samples, tmp_path, name):
    adapter, base, merged = tmp_path / "adapter.gguf", tmp_path / "base.gguf", tmp_path / "merged.gguf"
    result = export(samples / name, adapter, adapter_only=True)
    assert result.details["alpha"] / result.details["rank"] == result.details["scaling"]
    export(samples / name, base, gguf_type="f32", base_only=True)
    export(samples / name, merged, gguf_type="f32")
    job, ids, ref = reference(samples / name)
    with_lora = llama_cpp_logits(base, ids, lora=adapter)
    stats = logit_stats(llama_cpp_logits(merged, ids), with_lora)
    assert stats.max_rel < 1e-3 and stats.top1_agreement == 1.0, stats  # measured <= 1.7e-4
    assert logit_stats(ref.trained, with_lora).max_rel <= LLAMA_F32_BOUND
    checks = to_gguf.open_artifact(adapter, job).layer_checks()
    assert all(c.passed for c in checks)


@pytest.mark.slow
@pytest.mark.parametrize("arch,legacy", [("qwen2", False), ("mistral", True)])
def test_qwen2_and_mistral_load_and_match(tiny_base, make_ckpt, tmp_path, arch, legacy):
    base = tiny_base(arch, legacy_config=legacy)
    ckpt = make_ckpt(base, "qa-blora", 32, 4, base_quant=MinMaxGrid(4, 1, 32))
    job, ids, ref = reference(ckpt)
    f32, q41 = tmp_path / "f32.gguf", tmp_path / "q41.gguf"
    export(ckpt, f32, gguf_type="f32")
    export(ckpt, q41)
    reader = GGUFReader(str(f32))
    assert reader.get_field(f"{'qwen2' if arch == 'qwen2' else 'llama'}.rope.freq_base").contents() == 1e6
    assert logit_stats(ref.trained, llama_cpp_logits(f32, ids)).max_rel <= LLAMA_F32_BOUND
    assert logit_stats(ref.trained, gguf_py_model_logits(q41, ids)).max_rel <= gguf_runtime.fold_tolerance(job).max_rel
    llm = llama_cpp.Llama(model_path=str(f32), vocab_only=True, verbose=False)
    assert [llm.tokenize(p.encode(), add_bos=True) for p in DEFAULT_PROMPTS] == ids


def test_tokenizer_json_alone_gives_the_same_vocab(samples, tmp_path):
    """transformers 5 folders may lack tokenizer.model: the vocab must still be complete."""
    folder = tmp_path / "base"
    shutil.copytree(samples / "base", folder)
    (folder / "tokenizer.model").unlink()
    from_json = gguf_tokenizer.read_vocab(folder)
    from_model = gguf_tokenizer.read_vocab(samples / "base")
    assert (from_json.tokens, from_json.scores, from_json.types) == \
        (from_model.tokens, from_model.scores, from_model.types)
    out = tmp_path / "m.gguf"
    export(samples / "qa-blora-q4_1", out, base=folder)
    llm = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
    ids = tokenize_prompts(api.open_job(samples / "qa-blora-q4_1", base=folder, quiet=True).base, DEFAULT_PROMPTS)
    assert [llm.tokenize(p.encode(), add_bos=True) for p in DEFAULT_PROMPTS] == ids


def test_vocab_is_checked_against_the_embedding_rows(samples):
    vocab = gguf_tokenizer.read_vocab(samples / "base")
    with pytest.raises(BadInputError, match="512 tokens but the embedding has only 500 rows"):
        gguf_tokenizer.fit_to_rows(vocab, 500)
    padded = gguf_tokenizer.fit_to_rows(vocab, 520)
    assert len(padded) == 520 and padded.types[-1] == gguf.TokenType.UNUSED


def test_tied_embeddings_write_no_output_tensor(tiny_base, make_ckpt, tmp_path):
    ckpt = make_ckpt(tiny_base("llama", tie_word_embeddings=True), "qa-blora", 32, 4, base_quant=MinMaxGrid(4, 1, 32))
    out = tmp_path / "tied.gguf"
    export(ckpt, out, gguf_type="f32")
    assert "output.weight" not in {t.name for t in GGUFReader(str(out)).tensors}
    job, ids, ref = reference(ckpt)
    assert logit_stats(ref.trained, llama_cpp_logits(out, ids)).max_rel <= LLAMA_F32_BOUND


def test_same_input_same_bytes(samples, tmp_path):
    for options in ({}, {"adapter_only": True}, {"gguf_type": "q8_0"}):
        a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
        export(samples / "qa-blora-q4_1", a, overwrite=True, **options)
        export(samples / "qa-blora-q4_1", b, overwrite=True, **options)
        assert sha256(a) == sha256(b), options


def test_metadata_and_provenance(q41):
    out, _, job, _, _ = q41
    reader = GGUFReader(str(out))
    field = lambda k: reader.get_field(k).contents()  # noqa: E731
    assert field("general.architecture") == "llama" and field("general.file_type") == gguf.LlamaFileType.MOSTLY_Q4_1
    assert field("llama.attention.head_count_kv") == 2 and field("llama.rope.dimension_count") == 32
    assert field("blora.checkpoint_sha256") == job.ckpt.sha256 and field("blora.scaling") == 2.0
    assert field("blora.method") == "qa-blora" and field("blora.lambda") == ["32x4"]
    assert json.loads(field("blora.base_quant"))["block_in"] == 32 and "[INST]" in field("tokenizer.chat_template")
    assert field("tokenizer.ggml.add_bos_token") is True and field("tokenizer.ggml.bos_token_id") == 1


def run_cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what fixtures printed
    with pytest.raises(SystemExit) as exited:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return exited.value.code, captured.out, captured.err


def test_non_foldable_grid_is_refused_in_one_line(tiny_base, make_ckpt, tmp_path, capsys):
    ckpt = make_ckpt(tiny_base("llama"), "qa-blora", 16, 4, base_quant=MinMaxGrid(4, 1, 32))
    with pytest.raises(UnsupportedError, match="does not divide lambda_in 16.*--requantize"):
        export(ckpt, tmp_path / "x.gguf")
    code, _, err = run_cli(capsys, "to-gguf", ckpt, tmp_path / "x.gguf", "-q")
    assert code == 2 and err.count("\n") == 1 and err.startswith("error:"), err
    assert not (tmp_path / "x.gguf").exists()
    done = export(ckpt, tmp_path / "ptq.gguf", requantize=True)
    assert done.details["encoding"] == "requantize" and 0 < done.details["ptq_error"]["weight_rel_rms"] < 0.2
    # the base alone re-quantizes losslessly (it is on the grid); the adapter's shift is not: verify says so
    report = api.verify(ckpt, tmp_path / "ptq.gguf", quiet=True)
    assert not report.passed and report.logits.max_rel > 0.1, report.to_json()  # measured 0.385


def test_verify_cli_and_a_missing_llama_cpp(q41, monkeypatch, capsys):
    out, _, job, _, _ = q41
    code, stdout, _ = run_cli(capsys, "verify", job.ckpt.path, out, "-q")
    assert code == 0 and stdout.strip() == "PASS", stdout
    monkeypatch.setitem(__import__("sys").modules, "llama_cpp", None)
    with pytest.raises(UnsupportedError, match="pip install"):
        gguf_runtime.open_gguf(out, job, "llama.cpp")


@pytest.mark.slow
def test_verify_in_llama_cpp(q41):
    out, _, job, _, _ = q41
    report = api.verify(job.ckpt.path, out, runtime="llama.cpp", quiet=True)
    assert report.passed, report.to_json()
    assert report.tolerance.max_rel < report.adapter_effect / 4


def test_five_bit_grid_gives_q5_1_with_its_own_codes(tiny_base, make_ckpt, tmp_path):
    ckpt = make_ckpt(tiny_base("llama"), "qa-blora", 32, 4, base_quant=MinMaxGrid(5, 1, 32))
    out = tmp_path / "q51.gguf"
    assert export(ckpt, out).details["type"] == "q5_1"
    report = api.verify(ckpt, out, quiet=True)
    assert report.passed, report.to_json()
    exact = [c for c in report.layers if "QuantizedWeight" in c.check]
    assert len(exact) == 14 and all(c.value == 0.0 for c in exact)  # gguf-py dequant == our codes, fp32-exact


def test_quantized_embeddings_report_their_error(samples, tmp_path):
    out = tmp_path / "qe.gguf"
    result = export(samples / "qa-blora-q4_1", out, quantize_embeddings=True)
    assert result.details["embeddings"] == "q4_1" and result.details["embedding_ptq_error"]["tensors"] == 2
    types = {t.name: t.tensor_type for t in GGUFReader(str(out)).tensors}
    assert types["token_embd.weight"] == types["output.weight"] == gguf.GGMLQuantizationType.Q4_1
    report = api.verify(samples / "qa-blora-q4_1", out, quiet=True)  # bound: 4 x the same PTQ on the base
    assert report.logits_passed and "post-training quantization" in report.tolerance.basis, report.to_json()
    # 4-bit embeddings of a tiny random model are lossy (measured 0.48 relative): the bound is as wide as the
    # adapter's effect, so verify reports it inconclusive (exit 1), not PASS
    assert report.inconclusive and not report.passed
    assert any("inconclusive" in note for note in report.notes)
