"""`blora-export train` on the samples: loss curve, CPU throughput, and fold-aware vs branch QA-BLoRA.

    python bench/train_bench.py [--steps 60] [--threads 1] [--out DIR]

1. Loss curve: --steps steps of each method on samples/data/tiny.jsonl (first/last loss, every 10th).
2. Throughput: median step time and tokens/s per method, timed in interleaved rounds (the CPU is shared).
3. QA-BLoRA fold-aware vs branch (gguf-q4_1 grid): step-time cost, and the logits of the function as
   trained against each low-bit export (GGUF q4_1, MLX 4-bit/32, ONNX int4/32) and against verify's
   reference (base + adapter branch), as max |Δlogit| / max |logit| over the built-in prompts.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from blora_export import api  # noqa: E402
from blora_export.numerics import logit_stats  # noqa: E402
from blora_export.reference import DEFAULT_PROMPTS, model_logits, reference_logits, tokenize_prompts  # noqa: E402
from blora_export.train import TrainConfig, train  # noqa: E402
from blora_export.train.data import rank_batch  # noqa: E402
from blora_export.train.loop import Runtime, prepare, train_step  # noqa: E402
from converters import detect_format  # noqa: E402

RUNS = {  # name: (method, options) -- the toy-task settings of tests/blora_export/train
    "q-blora": ("q-blora", dict(rank=8, alpha=16, lr=3e-3)),
    "qa-blora fold-aware": ("qa-blora", dict(rank=8, alpha=16, lr=1e-2, lambda_out=1, fold_aware=True)),
    "qa-blora branch": ("qa-blora", dict(rank=8, alpha=16, lr=1e-2, lambda_out=1, fold_aware=False)),
}
EXPORTS = {"GGUF q4_1": ("gguf", "m.gguf", {}), "MLX 4-bit g32": ("mlx", "mlx", {}),
           "ONNX int4 b32": ("onnx", "onnx", {"precision": "int4", "block_size": 32})}


def config(out: Path, name: str, steps: int, **kw) -> TrainConfig:
    method, options = RUNS[name]
    return TrainConfig(base=ROOT / "samples/base", data=ROOT / "samples/data/tiny.jsonl", out=out / name.replace(" ", "-"),
                       method=method, steps=steps, batch_size=4, seq_len=256, quiet=True, save_every=10**6,
                       **options, **kw)


def loss_curves(out: Path, steps: int) -> dict:
    results = {}
    for name in RUNS:
        result = train(config(out, name, steps, overwrite=True))
        losses = [r["loss"] for r in result.log]
        results[name] = result
        print(f"{name:22s} loss {losses[0]:.3f} -> {losses[-1]:.3f} (mean of last 5: {statistics.mean(losses[-5:]):.3f}); "
              f"every 10: {' '.join(f'{x:.2f}' for x in losses[::10])}")
    return results


def throughput(out: Path, rounds: int) -> None:
    sessions = {name: prepare(config(out, name, 1, overwrite=True), Runtime(torch.device("cpu"))) for name in RUNS}
    times: dict = {name: [] for name in RUNS}
    cfgs = {name: config(out, name, 1) for name in RUNS}
    for step in range(rounds + 1):  # interleaved: every variant sees the same machine load
        for name, ses in sessions.items():
            batch = rank_batch(ses.examples, 0, step, 4, 0, 1, ses.pad_id)
            t0 = time.perf_counter()
            train_step(ses.model, ses.params, ses.optimizer, batch, Runtime(torch.device("cpu")), cfgs[name])
            if step:  # the first step warms up
                times[name].append((time.perf_counter() - t0, batch.tokens))
    for name, rows in times.items():
        med = statistics.median(t for t, _ in rows)
        tok = statistics.median(n / t for t, n in rows)
        print(f"{name:22s} median step {med * 1e3:7.1f} ms, median {tok:7.0f} tokens/s ({rounds} interleaved steps)")


def fold_effect(results: dict, out: Path) -> None:
    for name in ("qa-blora fold-aware", "qa-blora branch"):
        path = results[name].path
        job = api.open_job(path, quiet=True)
        ids = tokenize_prompts(job.base, DEFAULT_PROMPTS)
        ses = prepare(config(out, name, results[name].steps, resume=True), Runtime(torch.device("cpu")))
        trained = model_logits(ses.model.eval(), ids)
        ref = reference_logits(job.base, job.ckpt, job.plan, ids)
        print(f"{name}: adapter effect {logit_stats(ref.trained, ref.without_adapter).max_rel:.2e}; "
              f"trained function vs verify reference {logit_stats(trained, ref.trained).max_rel:.2e}")
        for label, (fmt, file, options) in EXPORTS.items():
            artifact_path = out / "exports" / name.replace(" ", "-") / file
            api.export(path, artifact_path, fmt, quiet=True, **options)
            cand = detect_format(artifact_path).open_artifact(artifact_path, job).logits(ids)
            print(f"  {label:14s} vs trained function {logit_stats(trained, cand).max_rel:.2e}  "
                  f"vs verify reference {logit_stats(ref.trained, cand).max_rel:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=30, help="interleaved timing steps per variant")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        print(f"torch {torch.__version__}, {args.threads} thread(s), samples/base (tiny llama), batch 4, seq-len 256")
        results = loss_curves(out, args.steps)
        throughput(out / "timing", args.rounds)
        fold_effect(results, out)


if __name__ == "__main__":
    main()
