"""Exports, runtimes and perplexity for ``bench/fidelity.py``.

Each cell: one model (``base``, ``qa-blora``, ``q-blora``, ``qlora``) as one artifact in its
real runtime, scored on the same held-out token windows: perplexity ``exp(mean NLL)`` of every
next token, and next-token top-1 accuracy. Logits are float64 for the scoring.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from blora_export import api

log = logging.getLogger("fidelity")
LLAMA_PTQ_TYPES = {"q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
                   "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0"}
PTQ_TYPES = {4: ("q4_0", "q4_1", "q4_k_m"), 8: ("q8_0",)}  # llama.cpp's quantizer, per width of the comparison


@dataclass(frozen=True)
class Artifact:
    model: str
    artifact: str  # e.g. torch, gguf-q4_1-fold, gguf-q4_k_m-ptq
    kind: str  # reference, fold, ptq, float
    runtime: str
    path: Path
    seconds: float  # time to make it


def heldout_windows(base: Path, paragraphs: list[str], seq: int, count: int) -> list[list[int]]:
    """``count`` windows of ``seq`` tokens (BOS + seq-1 tokens) cut from the held-out token stream."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    stream: list[int] = []
    for p in paragraphs:
        stream.extend(tok(p, add_special_tokens=False)["input_ids"])
        if len(stream) >= count * (seq - 1):
            break
    bos = tok.bos_token_id if tok.bos_token_id is not None else stream[0]
    windows = [[bos] + stream[i * (seq - 1):(i + 1) * (seq - 1)] for i in range(count)]
    return [w for w in windows if len(w) == seq]


def log_probs(logits: list[np.ndarray]) -> list[torch.Tensor]:
    """float64 next-token log-probabilities of every position but the last, per window."""
    return [torch.log_softmax(torch.from_numpy(np.asarray(lg, dtype=np.float64))[:-1], dim=-1) for lg in logits]


def score(logp: list[torch.Tensor], windows: list[list[int]]) -> tuple[float, float]:
    """(perplexity, top-1 accuracy) of next-token prediction over every window."""
    nll, hits, n = 0.0, 0, 0
    for x, ids in zip(logp, windows):
        target = torch.tensor(ids[1:])
        nll -= float(x.gather(1, target[:, None]).sum())
        hits += int((x.argmax(-1) == target).sum())
        n += len(target)
    return math.exp(nll / n), hits / n


def mean_kl(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> float:
    """Mean over positions of KL(reference || candidate), nats: how far a file's next-token
    distributions are from the training-time model's (0 for the same function; unlike a
    perplexity change, it cannot come out in the candidate's favour by chance)."""
    total = sum(float((r.exp() * (r - c)).sum()) for r, c in zip(reference, candidate))
    return total / sum(r.shape[0] for r in reference)


# ---------------------------------------------------------------- runtimes

def transformers_logits(path: Path, windows) -> list[np.ndarray]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(input_ids=torch.tensor([w])).logits[0].numpy() for w in windows]


def llama_cpp_logits(path: Path, windows) -> list[np.ndarray]:
    from converters.gguf_runtime import open_llama

    seq = max(len(w) for w in windows)
    llm = open_llama(path, n_ctx=seq + 8, n_batch=seq, logits_all=True, n_threads=os.cpu_count())
    out = []
    for w in windows:
        llm.reset()
        llm.eval(w)
        out.append(np.array(llm.scores[: len(w)], dtype=np.float32))
    return out


def onnx_logits(path: Path, windows) -> list[np.ndarray]:
    from converters import to_onnx

    decoder = json.loads((path / to_onnx.GENAI_CONFIG).read_text())["model"]["decoder"]
    session = to_onnx.onnx_session(path / to_onnx.MODEL_FILE)
    return [to_onnx.prompt_logits(session, decoder, w) for w in windows]


def mlx_logits(path: Path, windows) -> list[np.ndarray]:
    import mlx.core as mx
    from mlx_lm import load

    model, _ = load(str(path))
    return [np.array(model(mx.array([w]))[0].astype(mx.float32)) for w in windows]


RUNTIMES: dict[str, Callable[[Path, list], list[np.ndarray]]] = {
    "transformers": transformers_logits, "llama.cpp": llama_cpp_logits,
    "onnxruntime": onnx_logits, "mlx-lm": mlx_logits,
}


# ---------------------------------------------------------------- artifacts

def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def llama_quantize(src: Path, out: Path, ftype: str) -> None:
    """llama.cpp's own quantizer (the code behind ``llama-quantize``)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_PTQ_TYPES[ftype])
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize {ftype} failed ({rc})")


def mlx_convert_q(merged: Path, out: Path) -> None:
    """mlx-lm's ``convert -q`` (4-bit, group 64) on the merged fp16 folder, ``--dtype float32``: its
    default keeps the unquantized weights, scales and biases in float16, which MLX's CPU backend
    computes in emulated half precision (over 15 min for 32 windows here). float32 scales and biases
    only make the PTQ row more accurate than the default."""
    from mlx_lm import convert

    convert(hf_path=str(merged), mlx_path=str(out), quantize=True, dtype="float32")


def ort_rtn(fp32_dir: Path, out: Path) -> None:
    """onnxruntime's own int4 quantizer (RTN, asymmetric, block 32) on the fp32 export."""
    import onnx_decode

    onnx_decode.ort_rtn(fp32_dir, out, accuracy_level=0)


def grid_bits(info: dict) -> Optional[int]:
    """Code width of a QA-BLoRA checkpoint's min-max grid (``api.inspect``), None for anything else."""
    quant = info.get("base_quant") or {}
    return quant.get("bits") if info["method"] == "qa-blora" and quant.get("scheme") == "minmax" else None


def model_artifacts(name: str, ckpt: Path, base: Path, art: Path, info: dict) -> list[Artifact]:
    """Every artifact of one fine-tuned checkpoint (exports with this tool, then the PTQ baselines).

    A QA-BLoRA on an 8-bit grid gets its two exact 8-bit folds (ONNX int8, MLX 8-bit) and llama.cpp's
    Q8_0 of the merge; every other checkpoint the 4-bit rows (a 4-bit grid's three folds, then the
    4-bit PTQ pipelines)."""
    d = art / name
    d.mkdir(parents=True, exist_ok=True)

    def export(out: str, fmt: str, **kw) -> float:
        return _timed(lambda: api.export(ckpt, d / out, fmt, base=base, quiet=True, overwrite=True, **kw))

    bits = grid_bits(info)
    arts = [Artifact(name, "torch", "reference", "transformers", d / "f32", export("f32", "safetensors", dtype="float32"))]
    if bits == 8:
        arts += [Artifact(name, "onnx-int8-fold", "fold", "onnxruntime", d / "onnx-int8",
                          export("onnx-int8", "onnx", precision="int8")),
                 Artifact(name, "mlx-8bit-fold", "fold", "mlx-lm", d / "mlx8", export("mlx8", "mlx", bits=8))]
        return arts + gguf_ptq(name, d, export, PTQ_TYPES[8])
    arts.append(Artifact(name, "safetensors-fp16", "float", "transformers", d / "f16", export("f16", "safetensors")))
    if bits == 4:
        arts += [Artifact(name, "gguf-q4_1-fold", "fold", "llama.cpp", d / "fold.gguf", export("fold.gguf", "gguf")),
                 Artifact(name, "onnx-int4-fold", "fold", "onnxruntime", d / "onnx-int4",
                          export("onnx-int4", "onnx", precision="int4")),
                 Artifact(name, "mlx-4-32-fold", "fold", "mlx-lm", d / "mlx", export("mlx", "mlx"))]
    arts += gguf_ptq(name, d, export, PTQ_TYPES[4])
    # The PTQ pipelines start where a user's would: the adapter merged into the original 16-bit
    # weights (merge_and_unload on the unquantized base), then the runtime's own quantizer.
    orig = {"merge_into": "original"}
    secs = export("orig-f16", "safetensors", **orig)
    arts.append(Artifact(name, "mlx-4-64-ptq", "ptq", "mlx-lm", d / "mlx-ptq",
                         secs + _timed(lambda: _fresh(d / "mlx-ptq") or mlx_convert_q(d / "orig-f16", d / "mlx-ptq"))))
    secs = export("orig-onnx-f32", "onnx", **orig)
    arts.append(Artifact(name, "onnx-int4-rtn-ptq", "ptq", "onnxruntime", d / "onnx-rtn",
                         secs + _timed(lambda: _fresh(d / "onnx-rtn") or ort_rtn(d / "orig-onnx-f32", d / "onnx-rtn"))))
    return arts


def gguf_ptq(name: str, d: Path, export, types) -> list[Artifact]:
    """llama.cpp's quantizer to each of ``types`` on the adapter merged into the original weights (f32 GGUF)."""
    secs = export("orig-f32.gguf", "gguf", gguf_type="f32", merge_into="original")
    arts = []
    for t in types:
        out = d / f"{t}-ptq.gguf"
        arts.append(Artifact(name, f"gguf-{t}-ptq", "ptq", "llama.cpp", out,
                             secs + _timed(lambda t=t, out=out: llama_quantize(d / "orig-f32.gguf", out, t))))
    return arts


def _fresh(path: Path) -> None:
    """Remove a previous run's output of a third-party tool (only inside the bench's own workdir)."""
    import shutil

    if path.exists():
        shutil.rmtree(path)


def nbytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def evaluate(a: Artifact, windows, reference: Optional[list[torch.Tensor]] = None) -> tuple[dict, list[torch.Tensor]]:
    """The cell of one artifact (with its mean KL from ``reference``, the training-time model's
    log-probabilities, when given) and its own log-probabilities."""
    start = time.perf_counter()
    logp = log_probs(RUNTIMES[a.runtime](a.path, windows))
    ppl, top1 = score(logp, windows)
    kl = None if reference is None else mean_kl(reference, logp)
    cell = {"model": a.model, "artifact": a.artifact, "kind": a.kind, "runtime": a.runtime, "ppl": ppl,
            "top1": top1, "kl": kl, "bytes": nbytes(a.path), "seconds": round(a.seconds, 2),
            "eval_seconds": round(time.perf_counter() - start, 2)}
    log.info("%-13s %-20s %-12s ppl %.3f top1 %.4f kl %s", a.model, a.artifact, a.runtime, ppl, top1,
             "-" if kl is None else f"{kl:.2e}")
    return cell, logp


def evaluate_all(base: Path, ckpts: dict[str, Path], windows, art: Path, skip: frozenset = frozenset()) -> list[dict]:
    """Every cell; artifacts named in ``skip`` (e.g. ``mlx-4-64-ptq``) are made but not evaluated."""
    cells = [evaluate(Artifact("base", "torch", "reference", "transformers", base, 0.0), windows)[0]]
    for name, ckpt in ckpts.items():
        reference = None
        for a in model_artifacts(name, ckpt, base, art, api.inspect(ckpt, base)):
            if a.artifact in skip:
                log.info("%-13s %-20s skipped (--skip)", name, a.artifact)
                continue
            cell, logp = evaluate(a, windows, reference)
            cells.append(cell)
            if a.kind == "reference":
                reference = logp
    return cells


# ---------------------------------------------------------------- reporting

def _reference(cells: list[dict], model: str) -> Optional[float]:
    return next((c["ppl"] for c in cells if c["model"] == model and c["kind"] == "reference"), None)


def format_table(cells: list[dict]) -> str:
    rows = [c for c in cells if c["model"] != "run"]
    lines = [f"{'model':<13} {'artifact':<20} {'kind':<9} {'runtime':<12} {'ppl':>9} {'Δppl vs torch':>13} "
             f"{'top-1':>7} {'KL nats':>9} {'MB':>8}"]
    for c in rows:
        ref = _reference(cells, c["model"])
        delta = f"{100 * (c['ppl'] / ref - 1):+.2f}%" if ref else "-"
        kl = "-" if c.get("kl") is None else f"{c['kl']:.2e}"
        lines.append(f"{c['model']:<13} {c['artifact']:<20} {c['kind']:<9} {c['runtime']:<12} {c['ppl']:>9.3f} "
                     f"{delta:>13} {c['top1']:>7.4f} {kl:>9} {c['bytes'] / 1e6:>8.2f}")
    run = next((c for c in cells if c["model"] == "run"), None)
    if run:
        lines.append(f"total wall time {run['seconds']:.0f} s on {run['machine']}")
    return "\n".join(lines)


def plot(cells: list[dict], out: Path) -> None:
    """Per artifact, against its own model's training-time function: the perplexity change (left) and
    the mean KL divergence of the next-token distributions (right, log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [c for c in cells if c["model"] not in ("run", "base") and c["kind"] != "reference"]
    colors = {"float": "#1f77b4", "fold": "#2ca02c", "ptq": "#d62728"}
    deltas = [100 * (c["ppl"] / _reference(cells, c["model"]) - 1) for c in rows]
    kls = [max(c.get("kl") or 0.0, 1e-14) for c in rows]  # 1e-14: the floor of the log axis
    fig, (ax, ax_kl) = plt.subplots(1, 2, sharey=True, figsize=(12, 0.3 * len(rows) + 1.8),
                                    gridspec_kw={"width_ratios": [3, 2]})
    bar_colors = [colors[c["kind"]] for c in rows]
    ax.barh(range(len(rows)), deltas, color=bar_colors)
    ax.set_yticks(range(len(rows)), [f"{c['model']} · {c['artifact']} ({c['runtime']})" for c in rows], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="#444444", linewidth=0.8)
    ax.set_xlabel("held-out perplexity vs the training-time model (%)")
    ax.legend([plt.Rectangle((0, 0), 1, 1, color=v) for v in colors.values()], list(colors), fontsize=8)
    ax_kl.barh(range(len(rows)), kls, color=bar_colors)
    ax_kl.set_xscale("log")
    ax_kl.set_xlim(left=1e-14)
    ax_kl.set_xlabel("mean KL(training-time ‖ file), nats per token (log)")
    base, gains = _reference(cells, "base"), []
    for m in ("qa-blora", "qa-blora-8bit", "q-blora", "qlora"):
        ref = _reference(cells, m)
        if base and ref:
            gains.append(f"{m} {base:.1f}→{ref:.1f}")
    fig.suptitle("Each shipped file in its runtime: fold vs post-training quantization\n"
                 f"(fine-tuning gain, base→trained ppl: {', '.join(gains)})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
