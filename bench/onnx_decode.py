"""Decode speed and logit error: our exact int4 ONNX export vs onnxruntime's own RTN int4 quantizer.

    python bench/onnx_decode.py                      # hidden 512, 4 layers, 64 decode steps, 1 thread
    python bench/onnx_decode.py --json bench.json --threads 2

Builds a tiny llama (``samples/tiny_models.make_base``) and a QA-BLoRA checkpoint on a 4-bit
min-max 1x32 grid (λi=32, λo=4, ``samples/make_samples.make_checkpoint``), then exports:

* ``fp32``: the merged model, float32 (``to-onnx --precision fp32``);
* ``ours int4 (acc N)``: the checkpoint's own codes, update folded into float32 block offsets;
* ``ort RTN int4 (acc N)``: ``MatMulNBitsQuantizer`` (RTN, asymmetric, block 32) run on the fp32
  export (the same merged model; lm_head excluded in both, so only the decoder Linears differ).

For each: logit error against the training-time model (base as trained + adapter branches) on
the built-in prompts, and decode ms/token (one-token steps with the KV cache after a prompt,
median over steps, best of ``--trials`` interleaved trials).
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "samples"))
sys.path.insert(0, str(ROOT))

from blora_export import api  # noqa: E402
from blora_export.numerics import logit_stats  # noqa: E402
from blora_export.reference import DEFAULT_PROMPTS, reference_logits, tokenize_prompts  # noqa: E402
from blora_export.spec import MinMaxGrid  # noqa: E402
from converters import to_onnx  # noqa: E402

log = logging.getLogger("bench.onnx_decode")
BLOCK = 32


def build_model(work: Path, hidden: int, layers: int) -> Path:
    import make_samples
    import tiny_models

    base = tiny_models.make_base(work / "base", arch="llama", hidden_size=hidden, intermediate_size=3 * hidden,
                                 num_layers=layers, num_heads=hidden // 64, num_kv_heads=max(1, hidden // 128))
    return make_samples.make_checkpoint(work / "ckpt", base, "qa-blora", 32, 4,
                                        base_quant=MinMaxGrid(bits=4, block_out=1, block_in=BLOCK), seed=1)


def ort_rtn(fp32_dir: Path, out: Path, accuracy_level: int) -> Path:
    """onnxruntime's own int4 (RTN, asymmetric, integer zero points) on the fp32 export."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(fp32_dir / to_onnx.MODEL_FILE))
    head = next(n.name for n in model.graph.node if "logits" in n.output)
    quantizer = MatMulNBitsQuantizer(model, block_size=BLOCK, is_symmetric=False, accuracy_level=accuracy_level,
                                     nodes_to_exclude=[head])
    quantizer.process()
    out.mkdir(parents=True)
    quantizer.model.save_model_to_file(str(out / to_onnx.MODEL_FILE), use_external_data_format=False)
    (out / to_onnx.GENAI_CONFIG).write_bytes((fp32_dir / to_onnx.GENAI_CONFIG).read_bytes())
    return out


def session(model_dir: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(model_dir / to_onnx.MODEL_FILE), options, providers=["CPUExecutionProvider"])


def decode_ms(sess, decoder: dict, prompt, steps: int) -> float:
    """Median ms per one-token step with the KV cache after ``prompt``."""
    logits, past = to_onnx.run_decoder(sess, decoder, prompt)
    token, times = int(logits[-1].argmax()), []
    for _ in range(steps):
        start = time.perf_counter()
        logits, past = to_onnx.run_decoder(sess, decoder, [token], past)
        times.append(time.perf_counter() - start)
        token = int(logits[-1].argmax())
    return statistics.median(times) * 1e3


def op_breakdown(folder: Path, decoder: dict, prompt, steps: int, threads: int) -> dict[str, float]:
    """Mean ms per decode step spent in each ONNX op type (onnxruntime's profiler, node events)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = str(folder / "profile")
    sess = ort.InferenceSession(str(folder / to_onnx.MODEL_FILE), options, providers=["CPUExecutionProvider"])
    logits, past = to_onnx.run_decoder(sess, decoder, prompt)
    token = int(logits[-1].argmax())
    trace = Path(sess.end_profiling())  # the prompt's events; the decode steps get their own profile
    sess = ort.InferenceSession(str(folder / to_onnx.MODEL_FILE), options, providers=["CPUExecutionProvider"])
    for _ in range(steps):
        logits, past = to_onnx.run_decoder(sess, decoder, [token], past)
        token = int(logits[-1].argmax())
    trace = Path(sess.end_profiling())
    totals: dict[str, float] = {}
    for event in json.loads(trace.read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op = event["args"].get("op_name", "?")
            totals[op] = totals.get(op, 0.0) + event["dur"] / 1e3 / steps
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


VARIANT_DIRS = {f"{who} int4 (acc {acc})": f"{d}{acc}" for acc in (0, 4) for who, d in (("ours", "ours"), ("ort RTN", "ort"))}


def variants(job, work: Path) -> dict[str, Path]:
    out = {}
    to_onnx.export(job, work / "fp32", precision="fp32")
    out["fp32"] = work / "fp32"
    for acc in (0, 4):
        to_onnx.export(job, work / f"ours{acc}", precision="int4", block_size=BLOCK, accuracy_level=acc)
        out[f"ours int4 (acc {acc})"] = work / f"ours{acc}"
        out[f"ort RTN int4 (acc {acc})"] = ort_rtn(work / "fp32", work / f"ort{acc}", acc)
    return out


def run(args) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="onnx-bench-") as tmp:
        work = Path(tmp)
        ckpt = build_model(work, args.hidden, args.layers)
        job = api.open_job(ckpt, quiet=True)
        ids = tokenize_prompts(job.base, DEFAULT_PROMPTS)
        ref = reference_logits(job.base, job.ckpt, job.plan, ids)
        rows, runs = [], []
        for name, folder in variants(job, work).items():
            decoder = json.loads((folder / to_onnx.GENAI_CONFIG).read_text())["model"]["decoder"]
            sess = session(folder, args.threads)
            logits = [to_onnx.prompt_logits(sess, decoder, p) for p in ids]
            stats = logit_stats(ref.trained, [np_to_torch(x) for x in logits])
            size = sum(f.stat().st_size for f in folder.glob("model.onnx*"))
            rows.append({"variant": name, "max_rel": stats.max_rel, "top1": stats.top1_agreement,
                         "kl": stats.kl_mean, "ms_per_token": float("inf"), "onnx_bytes": size})
            runs.append((sess, decoder))
        for _ in range(args.trials):  # interleaved, so that other load on the machine hits every variant alike
            for row, (_sess, decoder) in zip(rows, runs):
                row["ms_per_token"] = min(row["ms_per_token"], decode_ms(sess, decoder, ids[0], args.tokens))
        rows.append({"variant": "adapter effect (no adapter vs training-time)",
                     "max_rel": logit_stats(ref.trained, ref.without_adapter).max_rel})
        if args.breakdown:
            for row, (_sess, decoder) in zip(rows, runs):
                if "int4" in row["variant"]:
                    row["ms_per_op"] = op_breakdown(work / VARIANT_DIRS[row["variant"]], decoder, ids[0],
                                                    args.tokens, args.threads)
        return rows


def np_to_torch(x: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(x))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64, help="decode steps timed per trial")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    parser.add_argument("--breakdown", action="store_true", help="also profile the int4 variants: ms per op type")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    rows = run(args)
    print(f"hidden {args.hidden}, {args.layers} layers, block {BLOCK}, {args.threads} thread(s), "
          f"{args.tokens} decode steps x {args.trials} trials")
    print(f"{'variant':<28} {'max rel err':>12} {'top-1':>7} {'KL nats':>10} {'ms/token':>9} {'MB':>7}")
    for r in rows:
        if "ms_per_token" in r:
            print(f"{r['variant']:<28} {r['max_rel']:>12.3e} {r['top1']:>7.4f} {r['kl']:>10.2e} "
                  f"{r['ms_per_token']:>9.3f} {r['onnx_bytes'] / 1e6:>7.2f}")
        else:
            print(f"{r['variant']}: {r['max_rel']:.3e}")
    for r in rows:
        if "ms_per_op" in r:
            ops = ", ".join(f"{op} {ms:.3f}" for op, ms in list(r["ms_per_op"].items())[:8])
            print(f"{r['variant']} ms/token by op: {ops}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
