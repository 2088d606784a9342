"""Fidelity: held-out perplexity of every shipped file in its real runtime, fold vs PTQ.

    python bench/fidelity.py [--size small|smoke] [--workdir DIR] [--json FILE] [--plot FILE]
    python bench/fidelity.py --base HF_DIR --ckpt CKPT [--ckpt CKPT ...]   # a user's own model

1. Corpus (``bench/fidelity_corpus.py``): a dictionary (Debian ``dict-gcide``) for the base,
   the Python documentation (``python3.11-doc``) for fine-tuning and a held-out split of it.
2. Base: a LLaMA-shaped model (``small``: 23M parameters, its own SentencePiece tokenizer)
   pretrained on the dictionary.
3. Fine-tuning with ``blora-export train`` at one step budget: QA-BLoRA on the gguf-q4_1 grid,
   QA-BLoRA on the 8-bit mlx-8-32 grid (``qa-blora-8bit``), Q-BLoRA on NF4, and the QLoRA baseline
   (Q-BLoRA with λ = 1, i.e. plain LoRA on NF4).
4. Every model in every place (``bench/fidelity_eval.py``): the training-time function (the
   merged float32 model in transformers), merged fp16, the fold exports (GGUF Q4_1 in llama.cpp,
   ONNX int4 in onnxruntime, MLX 4-bit in mlx-lm; for the 8-bit model ONNX int8 and MLX 8-bit),
   and the PTQ pipelines a user would otherwise run on the merged model (llama.cpp's quantizer:
   Q4_0, Q4_1, Q4_K_M, and Q8_0 for the 8-bit model; mlx-lm's ``convert -q``; onnxruntime's RTN
   int4 quantizer). Perplexity and next-token top-1 on the held-out split.

Output: a table, ``--json`` (one object per cell, plus ``{"model": "run", ...}``) and a PNG plot.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "samples"))

import fidelity_corpus  # noqa: E402
import fidelity_eval  # noqa: E402

log = logging.getLogger("fidelity")


@dataclass(frozen=True)
class Size:
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    seq: int
    batch: int
    pretrain_steps: int
    finetune_steps: int
    eval_windows: int
    rank: int
    pretrain_chars: int  # how much of the dictionary the tokenizer and pretraining see


SIZES = {
    # hidden 512, 6 layers, GQA 8/4, ffn 1536 (a multiple of 256 so Q4_K_M applies everywhere): 23.1M parameters
    "small": Size(512, 6, 1536, 8, 4, 4096, 256, 8, 1000, 120, 32, 16, 6_000_000),
    "smoke": Size(64, 2, 256, 4, 2, 640, 64, 4, 4, 3, 3, 4, 200_000),
}


def train_tokenizer(corpus: fidelity_corpus.Corpus, out: Path, size: Size) -> None:
    """A LLaMA-style SentencePiece tokenizer on the pretraining text plus the fine-tuning split."""
    import tiny_models

    text = _take(corpus.pretrain, size.pretrain_chars // 2) + _take(corpus.finetune, size.pretrain_chars // 2)
    corpus_file = out.parent / "tokenizer_corpus.txt"
    corpus_file.write_text("\n".join(text) + "\n", encoding="utf-8")
    tiny_models.make_tokenizer(out, kind="spm", vocab_size=size.vocab, corpus=corpus_file)


def _take(paragraphs: list[str], chars: int) -> list[str]:
    out, total = [], 0
    for p in paragraphs:
        if total >= chars:
            break
        out.append(p)
        total += len(p)
    return out


def token_stream(tokenizer, paragraphs: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for p in paragraphs:
        ids.extend(tokenizer(p)["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


def pretrain_base(corpus, out: Path, size: Size, seed: int = 0) -> dict:
    """Pretrain a LLaMA on the dictionary; save it (safetensors) with its tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    train_tokenizer(corpus, out, size)
    tok = AutoTokenizer.from_pretrained(str(out))
    stream = token_stream(tok, _take(corpus.pretrain, size.pretrain_chars))
    cfg = LlamaConfig(vocab_size=size.vocab, hidden_size=size.hidden, intermediate_size=size.intermediate,
                      num_hidden_layers=size.layers, num_attention_heads=size.heads,
                      num_key_value_heads=size.kv_heads, max_position_embeddings=max(512, size.seq),
                      rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    start, losses = time.perf_counter(), []
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=size.pretrain_steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    for step in range(size.pretrain_steps):
        starts = torch.randint(0, len(stream) - size.seq - 1, (size.batch,), generator=gen)
        batch = torch.stack([stream[s: s + size.seq] for s in starts.tolist()])
        with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 matmuls (AMX where the CPU has it); float32 weights
            loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss))
        if step % 25 == 0:
            log.info("pretrain step %d/%d loss %.3f", step, size.pretrain_steps, losses[-1])
    model.save_pretrained(str(out))
    params = sum(p.numel() for p in model.parameters())
    return {"parameters": params, "tokens": len(stream), "steps": size.pretrain_steps,
            "loss_first": losses[0], "loss_last": losses[-1], "seconds": time.perf_counter() - start}


#: The fine-tuning runs: name -> TrainConfig options (same step budget, rank and data).
RUNS = {
    "qa-blora": dict(method="qa-blora", target="gguf-q4_1", lr=5e-3),
    # 8-bit min-max grid, fold-aware with fp16 β': exact in MLX 8-bit (fp16 biases) and ONNX int8 (float32 offsets)
    "qa-blora-8bit": dict(method="qa-blora", target="mlx-8-32", lr=5e-3),
    "q-blora": dict(method="q-blora", lr=2e-3),
    "qlora": dict(method="q-blora", lambda_=1, lr=2e-3),
}
#: Every run trains under bf16 autocast (``--precision bf16``): the adapter and the fold-aware β stay
#: float32, and what is exported and evaluated is the float32 function of the trained parameters.
PRECISION = "bf16"


def finetune(base: Path, corpus, work: Path, size: Size) -> dict[str, Path]:
    from blora_export.train import TrainConfig, train

    data = work / "finetune.jsonl"
    with data.open("w", encoding="utf-8") as f:
        for p in corpus.finetune:
            f.write(json.dumps({"text": p}) + "\n")
    out = {}
    for name, options in RUNS.items():
        cfg = TrainConfig(base=base, data=data, out=work / name, rank=size.rank, alpha=2.0 * size.rank,
                          steps=size.finetune_steps, batch_size=size.batch, seq_len=size.seq,
                          save_every=size.finetune_steps, quiet=True, precision=PRECISION, **options)
        result = train(cfg)
        log.info("%s: %d steps in %.0f s", name, result.steps, result.seconds)
        out[name] = result.path
    return out


def run(args) -> list[dict]:
    size = SIZES[args.size]
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    corpus = fidelity_corpus.load_corpus(Path(args.corpus_cache))
    heldout = corpus.heldout
    if args.base:
        base, ckpts, pre = Path(args.base), {Path(c).name: Path(c) for c in args.ckpt}, {}
    else:
        base = work / "base"
        pre = pretrain_base(corpus, base, size)
        ckpts = finetune(base, corpus, work, size)
    windows = fidelity_eval.heldout_windows(base, heldout, size.seq, size.eval_windows)
    cells = fidelity_eval.evaluate_all(base, ckpts, windows, work / "artifacts", frozenset(args.skip))
    cells.append({"model": "run", "seconds": time.perf_counter() - start, "size": args.size,
                  "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
                  "pretrain": pre, "corpus": corpus.describe(), "heldout_tokens": sum(len(w) - 1 for w in windows)})
    return cells


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--workdir", default=str(Path.home() / ".cache" / "blora-export-bench" / "fidelity"))
    p.add_argument("--corpus-cache", default=str(Path.home() / ".cache" / "blora-export-bench" / "corpus"))
    p.add_argument("--json", default=None, help="write the cells as JSON here")
    p.add_argument("--plot", default=None, help="write a PNG plot here")
    p.add_argument("--base", default=None, help="evaluate your own HF base folder instead of pretraining one")
    p.add_argument("--ckpt", action="append", default=[], help="with --base: a checkpoint (repeatable)")
    p.add_argument("--skip", action="append", default=[], metavar="ARTIFACT",
                   help="do not evaluate this artifact (repeatable), e.g. mlx-4-64-ptq")
    args = p.parse_args(argv)
    if args.base and not args.ckpt:
        p.error("--base needs at least one --ckpt")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("onnxruntime", "mlx_lm", "httpx", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cells = run(args)
    print(fidelity_eval.format_table(cells))
    if args.json:
        Path(args.json).write_text(json.dumps(cells, indent=2) + "\n")
    if args.plot:
        fidelity_eval.plot(cells, Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
