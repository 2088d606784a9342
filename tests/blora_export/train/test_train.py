"""`blora-export train` end to end on the tiny sample model (CPU)."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from blora_export import api
from blora_export.checkpoint import load_checkpoint
from blora_export.cli import main
from blora_export.errors import BadInputError
from blora_export.merge import resolve_merge_plan
from blora_export.numerics import logit_stats
from blora_export.quant import fold_into_zero_points, quantize_minmax
from blora_export.reference import DEFAULT_PROMPTS, load_hf_model, model_logits, reference_logits, tokenize_prompts
from blora_export.spec import MinMaxGrid, NF4Base
from blora_export.train import TrainConfig, train
from blora_export.train.loop import Runtime, prepare
from converters import detect_format

ROOT = Path(__file__).resolve().parents[3]
TINY = ROOT / "samples" / "data" / "tiny.jsonl"
# hyper-parameters that make the toy task learnable in a few dozen CPU steps
METHOD_ARGS = {"q-blora": dict(rank=8, alpha=16, lr=3e-3),
               "qa-blora": dict(rank=8, alpha=16, lr=1e-2, lambda_out=1)}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny model gains nothing from intra-op threads, and they thrash on a busy 2-core runner."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(samples, out, method, **kw):
    args = dict(base=samples / "base", data=TINY, out=out, method=method, batch_size=4, seq_len=256, quiet=True,
                **METHOD_ARGS[method])
    args.update(kw)
    return TrainConfig(**args)


@pytest.fixture(scope="module")
def trained(samples, tmp_path_factory):
    """40 steps of each method (QA-BLoRA fold-aware), trained once for the module."""
    root = tmp_path_factory.mktemp("trained")
    return {m: train(config(samples, root / m, m, steps=40)) for m in ("q-blora", "qa-blora")}


@pytest.mark.parametrize("method", ["q-blora", "qa-blora"])
def test_a_few_dozen_steps_learn_the_toy_task(trained, method):
    log = [json.loads(line) for line in (trained[method].path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 41))
    assert {"step", "loss", "lr", "tokens_per_s", "tokens", "grad_norm"} <= set(log[0])
    first, last5 = log[0]["loss"], sum(r["loss"] for r in log[-5:]) / 5
    assert last5 < 0.5 * first, (first, last5)
    assert all(r["tokens_per_s"] > 0 and r["lr"] == METHOD_ARGS[method]["lr"] for r in log)


@pytest.mark.parametrize("method, quant, lam", [("q-blora", NF4Base(64, True), (2, 2)),
                                                 ("qa-blora", MinMaxGrid(4, 1, 32), (32, 1))])
def test_checkpoint_is_native_and_passes_verify(trained, method, quant, lam):
    ckpt, base = load_checkpoint(trained[method].path)
    assert (ckpt.layout, ckpt.method, ckpt.base_quant, ckpt.uniform_lambda()) == ("native", method, quant, lam)
    assert len(ckpt.modules) == len(base.linear_names())  # every decoder Linear adapted
    assert ckpt.scaling == 2.0
    report = api.verify(trained[method].path, quiet=True)
    assert report.passed, report.to_json()
    assert report.adapter_effect > 0.1  # the trained adapter really moves the logits


@pytest.mark.parametrize("fmt", ["safetensors", "peft"])
@pytest.mark.parametrize("method", ["q-blora", "qa-blora"])
def test_exports_to_16_bit_and_lora_and_verifies(trained, method, fmt, tmp_path):
    result = api.export(trained[method].path, tmp_path / fmt, fmt, quiet=True)
    report = api.verify(trained[method].path, result.path, quiet=True)
    assert report.passed, report.to_json()


LOW_BIT = [  # (format, --target, export options, the exported file computes the trained function to float noise)
    ("gguf", "gguf-q4_1", {}, False),  # exact Linears, but the GGUF keeps the float32 embeddings/head in F16
    ("mlx", "mlx-4-32", {}, True),  # fp16 biases = the fold-aware β' (fold-aware by default)
    ("onnx", "onnx-int4-32", {"precision": "int4", "block_size": 32}, True),  # float32 offsets (branch by default)
    ("mlx", "mlx-8-32", {}, True),  # 8-bit: fp16 biases = the fold-aware β'
    ("onnx", "onnx-int8-32", {"precision": "int8"}, True),  # 8-bit codes, float32 β+ΔW+128α (branch by default)
]


@pytest.mark.parametrize("fmt, target, options, exact", LOW_BIT, ids=[f[1] for f in LOW_BIT])
def test_low_bit_exports_pass_verify_and_compute_the_trained_function(samples, tmp_path, fmt, target, options,
                                                                     exact):
    ckpt_dir = tmp_path / "ckpt"
    train(config(samples, ckpt_dir, "qa-blora", steps=10, target=target))
    result = api.export(ckpt_dir, tmp_path / ("model.gguf" if fmt == "gguf" else fmt), fmt, quiet=True, **options)
    report = api.verify(ckpt_dir, result.path, quiet=True)
    assert report.passed, report.to_json()
    if exact:
        job = api.open_job(ckpt_dir, quiet=True)
        ids = tokenize_prompts(job.base, DEFAULT_PROMPTS)
        as_trained = model_logits(rebuilt_training_model(samples, ckpt_dir, "qa-blora", steps=10, target=target), ids)
        artifact = detect_format(result.path).open_artifact(result.path, job)
        assert logit_stats(as_trained, artifact.logits(ids)).max_rel < 1e-5


def rebuilt_training_model(samples, out, method, **kw):
    """The model as trained (quantized base + adapter layers), with the saved adapter loaded."""
    cfg = config(samples, out, method, resume=True, **kw)
    model = prepare(cfg, Runtime(torch.device("cpu"))).model
    return model.eval()


def folded_model(ckpt, base):
    """An HF model whose decoder Linears hold dequant(fold(quantized W, H)): the low-bit file's weights."""
    model = load_hf_model(base.path)
    with torch.no_grad():
        for name, module in ckpt.modules.items():
            qw = quantize_minmax(base.tensor(name + ".weight").float(), ckpt.base_quant, name)
            model.get_parameter(name + ".weight").copy_(fold_into_zero_points(qw, module).dequantize())
    return model


#: verify packs its prompts into one sequence: the same function as one forward per prompt, in other
#: float32 GEMM blockings (tests/blora_export/test_stream.py); with PACK_TOKENS = 1 it is bit-identical.
PACKED_REL_BOUND = 1e-5


def test_fold_aware_training_function_is_the_folded_low_bit_model(samples, trained, monkeypatch):
    import blora_export.stream as stream_module

    path = trained["qa-blora"].path
    ckpt, base = load_checkpoint(path)
    ids = tokenize_prompts(base, DEFAULT_PROMPTS)
    as_trained = model_logits(rebuilt_training_model(samples, path, "qa-blora", steps=40), ids)
    exported = model_logits(folded_model(ckpt, base), ids)
    plan = resolve_merge_plan(ckpt)
    assert ckpt.forward == "folded" and plan.folded
    packed = reference_logits(base, ckpt, plan, ids).trained  # what verify compares exports with
    monkeypatch.setattr(stream_module, "PACK_TOKENS", 1)  # one prompt per sequence, as model_logits runs them
    reference = reference_logits(base, ckpt, plan, ids).trained
    branch = reference_logits(base, ckpt, dataclasses.replace(plan, folded=False), ids).trained
    assert logit_stats(as_trained, exported).max_abs == 0.0  # bit-identical
    assert logit_stats(as_trained, reference).max_abs == 0.0  # verify's reference is the trained function
    assert logit_stats(as_trained, packed).max_rel <= PACKED_REL_BOUND
    assert logit_stats(as_trained, branch).max_rel > 1e-4  # the fp16 rounding of β' that fold-aware absorbs


def test_branch_training_function_is_the_verify_reference(samples, tmp_path, monkeypatch):
    import blora_export.stream as stream_module

    monkeypatch.setattr(stream_module, "PACK_TOKENS", 1)  # one prompt per sequence: bit-identical
    path = tmp_path / "qa-branch"
    train(config(samples, path, "qa-blora", steps=5, fold_aware=False))
    ckpt, base = load_checkpoint(path)
    ids = tokenize_prompts(base, DEFAULT_PROMPTS)
    as_trained = model_logits(rebuilt_training_model(samples, path, "qa-blora", steps=5, fold_aware=False), ids)
    ref = reference_logits(base, ckpt, resolve_merge_plan(ckpt), ids)
    assert logit_stats(as_trained, ref.trained).max_abs == 0.0
    assert logit_stats(as_trained, model_logits(folded_model(ckpt, base), ids)).max_rel > 1e-5


@pytest.mark.parametrize("arch", ["granite", "smollm3", "gemma2", "gemma3_text", "phi3"])
def test_other_families_train_to_the_verify_reference(samples, tiny_base, tmp_path, arch, monkeypatch):
    """Granite (multipliers in and outside the decoder layers), SmolLM3 (NoPE layers), Gemma 2 (scaled
    embedding module, final softcap) and Gemma 3 (a rotation per layer kind): the function training computes is
    verify's streamed reference, bit for bit (one prompt per sequence; packed, see tests/blora_export/test_stream.py)."""
    import blora_export.stream as stream_module

    monkeypatch.setattr(stream_module, "PACK_TOKENS", 1)
    base_dir = tiny_base(arch)
    path = tmp_path / arch
    train(config(samples, path, "qa-blora", steps=5, fold_aware=False, base=base_dir))
    ckpt, base = load_checkpoint(path)
    ids = tokenize_prompts(base, DEFAULT_PROMPTS)
    as_trained = model_logits(rebuilt_training_model(samples, path, "qa-blora", steps=5, fold_aware=False,
                                                     base=base_dir), ids)
    ref = reference_logits(base, ckpt, resolve_merge_plan(ckpt), ids)
    assert logit_stats(as_trained, ref.trained).max_abs == 0.0
    assert logit_stats(ref.trained, ref.without_adapter).max_rel > 1e-3  # the adapter learned something


@pytest.mark.parametrize("method", ["q-blora", "qa-blora"])
def test_the_cuda_code_path_on_cpu(samples, tmp_path, method):
    """bf16 autocast, gradient checkpointing and (Q-BLoRA) bitsandbytes NF4 matmuls, as on CUDA, run on CPU."""
    extra = {"nf4_backend": "bitsandbytes"} if method == "q-blora" else {}  # bitsandbytes: in the test extra

    def run(name, **kw):
        result = train(config(samples, tmp_path / name, method, steps=4, **kw))
        return result, load_file(result.path / "adapter_model.safetensors")

    (plain, a), (ckpt, b) = run("plain", precision="float32"), run("ckpt", gradient_checkpointing=True, **extra)
    assert [r["loss"] for r in ckpt.log] == pytest.approx([r["loss"] for r in plain.log], rel=1e-6)
    for key in a:  # checkpointing recomputes the same function; bnb's NF4 weights are the core's
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)
    bf16, _ = run("bf16", precision="bf16", gradient_checkpointing=True, **extra)
    assert [r["loss"] for r in bf16.log] == pytest.approx([r["loss"] for r in plain.log], rel=2e-2)
    assert bf16.log[-1]["loss"] < bf16.log[0]["loss"]
    assert api.verify(bf16.path, quiet=True).passed


def cli_train(samples, out, method, *extra):
    args = ["train", "--base", str(samples / "base"), "--data", str(TINY), "--out", str(out), "--method", method,
            "--rank", "8", "--lr", "3e-3", "--batch-size", "2", "--seq-len", "256", "--quiet", *extra]
    main(args)


@pytest.mark.parametrize("method", ["q-blora", "qa-blora"])
def test_resume_continues_the_same_trajectory(samples, tmp_path, method):
    cli_train(samples, tmp_path / "straight", method, "--steps", "6")
    cli_train(samples, tmp_path / "resumed", method, "--steps", "3")
    cli_train(samples, tmp_path / "resumed", method, "--steps", "6", "--resume")
    a = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)
    logs = [[json.loads(x) for x in (tmp_path / d / "train_log.jsonl").read_text().splitlines()]
            for d in ("straight", "resumed")]
    assert [r["step"] for r in logs[1]] == list(range(1, 7))
    assert [r["loss"] for r in logs[0]] == pytest.approx([r["loss"] for r in logs[1]], rel=1e-5)
    assert any(float(t.abs().max()) > 0 for k, t in a.items() if "lora_B" in k or method == "qa-blora")


def test_resume_refuses_other_options_and_existing_out(samples, tmp_path, capsys):
    cli_train(samples, tmp_path / "run", "q-blora", "--steps", "1")
    with pytest.raises(BadInputError, match="lr: saved 0.003, now 0.001"):
        train(config(samples, tmp_path / "run", "q-blora", steps=2, resume=True, lr=1e-3, batch_size=2))
    with pytest.raises(SystemExit) as exit_:
        cli_train(samples, tmp_path / "run", "q-blora", "--steps", "2")
    assert exit_.value.code == 2 and "already exists; pass --resume" in capsys.readouterr().err
    with pytest.raises(BadInputError, match="holds no train_state"):
        train(config(samples, samples / "qa-blora-q4_1", "qa-blora", steps=2, resume=True))


@pytest.mark.parametrize("method, extra, match", [
    ("qa-blora", ["--lambda-in", "16"], "cannot fold exactly into --target gguf-q4_1"),
    ("qa-blora", ["--target", "paper-4x8", "--lambda-in", "2"], "cannot fold exactly into --target paper-4x8"),
    ("qa-blora", ["--target", "gguf-q3_k"], "unknown --target 'gguf-q3_k'"),
    ("q-blora", ["--lambda", "3"], "is not divisible by lambda_in=3"),
    ("q-blora", ["--target", "gguf-q4_1"], "apply to --method qa-blora"),
])
def test_bad_requests_are_one_line_errors(samples, tmp_path, capsys, method, extra, match):
    with pytest.raises(SystemExit) as exit_:
        cli_train(samples, tmp_path / "x", method, "--steps", "1", *extra)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.startswith("error: ") and match in err and "\n" not in err
    assert not (tmp_path / "x").exists()


def test_bad_data_line_is_named(samples, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "fine"}\n{"instruction": "no output"}\n')
    with pytest.raises(SystemExit):
        main(["train", "--base", str(samples / "base"), "--data", str(data), "--out", str(tmp_path / "x"),
              "--method", "q-blora", "--steps", "1", "--quiet"])
    assert f"{data}:2:" in capsys.readouterr().err


@pytest.mark.slow
def test_data_parallel_on_two_gloo_processes_matches_one_process(samples, tmp_path):
    args = ["train", "--base", str(samples / "base"), "--data", str(TINY), "--method", "q-blora", "--rank", "8",
            "--lr", "3e-3", "--seq-len", "256", "--steps", "3", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "blora_export.cli", *args, "--batch-size", "2", "--out", str(tmp_path / "ddp")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    main([*args, "--batch-size", "4", "--out", str(tmp_path / "single")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "single"]  # one checkpoint, no leftovers
    ckpt, _ = load_checkpoint(tmp_path / "ddp")
    assert ckpt.method == "q-blora"
    a = load_file(tmp_path / "ddp" / "adapter_model.safetensors")
    b = load_file(tmp_path / "single" / "adapter_model.safetensors")
    for key in a:  # 2 processes x batch 2 follow 1 process x batch 4 (float summation order only)
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    logs = [[json.loads(x) for x in (tmp_path / d / "train_log.jsonl").read_text().splitlines()]
            for d in ("ddp", "single")]
    assert len(logs[0]) == 3
    for key in ("loss", "grad_norm", "tokens", "trained_tokens"):  # global statistics, gradient scale included
        assert [r[key] for r in logs[0]] == pytest.approx([r[key] for r in logs[1]], rel=1e-4)
