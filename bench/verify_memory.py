"""Peak memory of ``verify`` on a synthetic larger base (built shard by shard, never whole in memory).

    python bench/verify_memory.py OUT_DIR [--hidden 2048] [--layers 8] [--vocab 32000]

writes ``OUT_DIR/base`` (fp16 LLaMA, GQA, one safetensors shard per decoder layer, the sample's
tokenizer) and ``OUT_DIR/qa`` (QA-BLoRA, λi=32, λo=4 on a 4-bit 1x32 grid), then runs
``verify OUT_DIR/qa`` under ``/usr/bin/time -v`` and prints wall time and peak RSS, with the
sizes of the whole model and of one decoder layer in float32 for comparison.
Set ``PYTHONPATH`` to the tree whose ``verify`` you want to measure.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "samples"))


def build_base(out: Path, hidden: int, layers: int, vocab: int, heads: int = 16, kv_heads: int = 4) -> dict:
    from transformers import LlamaConfig

    inter = int(hidden * 2.75) // 256 * 256
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                         max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    for f in (ROOT / "samples" / "base").iterdir():
        if f.name not in ("config.json",) and not f.name.startswith("model"):
            shutil.copy2(f, out / f.name)
    gen = torch.Generator().manual_seed(0)
    head_dim = hidden // heads

    def rand(*shape, scale=0.02):
        return (torch.randn(*shape, generator=gen) * scale).to(torch.float16)

    shards, weight_map = [], {}
    shards.append({"model.embed_tokens.weight": rand(vocab, hidden, scale=1.0), "model.norm.weight":
                   torch.ones(hidden, dtype=torch.float16), "lm_head.weight": rand(vocab, hidden, scale=0.05)})
    for i in range(layers):
        p = f"model.layers.{i}."
        shards.append({p + "self_attn.q_proj.weight": rand(hidden, hidden), p + "self_attn.k_proj.weight":
                       rand(kv_heads * head_dim, hidden), p + "self_attn.v_proj.weight": rand(kv_heads * head_dim, hidden),
                       p + "self_attn.o_proj.weight": rand(hidden, hidden), p + "mlp.gate_proj.weight": rand(inter, hidden),
                       p + "mlp.up_proj.weight": rand(inter, hidden), p + "mlp.down_proj.weight": rand(hidden, inter),
                       p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.float16),
                       p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.float16)})
    total = 0
    for k, tensors in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({n: name for n in tensors})
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    layer_params = sum(t.numel() for t in shards[1].values())
    return {"params": sum(t.numel() for s in shards for t in s.values()), "layer_params": layer_params,
            "embed_params": vocab * hidden * 2}


def peak(cmd: list[str]) -> tuple[float, float, int]:
    result = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=os.environ)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)[1])
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", result.stderr)[1]
    seconds = sum(float(x) * 60**i for i, x in enumerate(reversed(wall.split(":"))))
    return seconds, rss / 1024**2, result.returncode


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()
    from make_samples import make_checkpoint

    from blora_export.spec import MinMaxGrid

    base = args.out / "base"
    if not (base / "model.safetensors.index.json").is_file():
        sizes = build_base(base, args.hidden, args.layers, args.vocab)
        (args.out / "sizes.json").write_text(json.dumps(sizes))
    sizes = json.loads((args.out / "sizes.json").read_text())
    ckpt = args.out / "qa"
    if not ckpt.is_dir():
        make_checkpoint(ckpt, base, "qa-blora", 32, 4, base_quant=MinMaxGrid(bits=4, block_out=1, block_in=32))
    wall, rss, rc = peak([sys.executable, "-m", "blora_export.cli", "verify", str(ckpt), "--quiet"])
    gb = 4 / 1024**3
    print(f"model: {sizes['params'] / 1e6:.0f}M parameters ({sizes['params'] * gb:.2f} GB float32), one decoder "
          f"layer {sizes['layer_params'] * gb:.3f} GB, embeddings+head {sizes['embed_params'] * gb:.3f} GB float32")
    print(f"verify {ckpt}: exit {rc}, wall {wall:.1f} s, peak RSS {rss:.2f} GB")


if __name__ == "__main__":
    main()
