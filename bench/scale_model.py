"""Synthetic LLaMA-shaped fp16 bases written shard by shard, and checkpoints of both methods.

Used by ``bench/scale.py``. A base is generated one shard at a time (at most ``SHARD_BYTES`` of
tensors in memory), from a seeded generator: Linear weights ``N(0, 1/fan_in)``, embeddings and
head likewise, RMSNorm weights ``U(0.5, 1.5)``. A ``.complete`` marker makes a finished base
reusable across runs (``--keep``).
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

SHARD_BYTES = 1 << 30
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every tensor name and shape, in the order written."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        out = [("model.embed_tokens.weight", (self.vocab, h))]
        shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
                  "self_attn.o_proj": (h, h), "mlp.gate_proj": (self.intermediate, h),
                  "mlp.up_proj": (self.intermediate, h), "mlp.down_proj": (h, self.intermediate)}
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
            out += [(p + name + ".weight", shapes[name]) for name in LINEARS]
        return out + [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]

    def params(self) -> int:
        return sum(math.prod(s) for _, s in self.tensors())

    def config(self) -> dict:
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden,
                "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
                "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads,
                "vocab_size": self.vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
                "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
                "bos_token_id": 1, "eos_token_id": 2, "initializer_range": 0.02, "attention_bias": False,
                "mlp_bias": False, "torch_dtype": "float16", "use_cache": True}


SHAPES = {
    "tiny": Shape(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256, vocab=1024),
    "1.1b": Shape(hidden=2048, layers=22, heads=32, kv_heads=4, intermediate=5632, vocab=32000),
    "7b": Shape(hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, vocab=32000),
}


def largest_tensor_bytes(shape: Shape) -> int:
    return max(math.prod(s) for _, s in shape.tensors()) * 2


def _value(name: str, dims: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if len(dims) == 1:
        return (0.5 + torch.rand(dims, generator=gen)).to(torch.float16)
    gain = 1.5 if name.endswith(("q_proj.weight", "k_proj.weight")) else 1.0
    return (torch.randn(dims, generator=gen) * (gain / math.sqrt(dims[1]))).to(torch.float16)


def build_base(out: Path, shape: Shape, seed: int = 0) -> Path:
    """Write the base (config, tokenizer, sharded fp16 safetensors + index) unless already complete."""
    if (out / ".complete").is_file():
        return out
    import tiny_models

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    tiny_models.make_tokenizer(out, "spm", vocab_size=512)
    (out / "config.json").write_text(json.dumps(shape.config(), indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")
    groups, current, size = [], [], 0
    for name, dims in shape.tensors():
        nbytes = math.prod(dims) * 2
        if current and size + nbytes > SHARD_BYTES:
            groups.append(current)
            current, size = [], 0
        current.append((name, dims))
        size += nbytes
    groups.append(current)
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: _value(name, dims, gen) for name, dims in group}  # one shard in memory
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update({name: file for name in tensors})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / ".complete").write_text("")
    return out


def build_checkpoints(root: Path, base: Path, seed: int = 1) -> dict[str, Path]:
    """QA-BLoRA λ 32x4 on a 4-bit 1x32 min-max grid, and Q-BLoRA λ 2x2 on NF4 (64, double quant)."""
    from blora_export.delta import AdapterModule
    from blora_export.save import save_checkpoint
    from blora_export.spec import BloraConfig, MinMaxGrid, NF4Base, adapter_scaling

    config = json.loads((base / "config.json").read_text())
    shape = Shape(config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
                  config["num_key_value_heads"], config["intermediate_size"], config["vocab_size"])
    rank, lora_alpha = 8, 16.0
    scaling = adapter_scaling(lora_alpha, rank, False)
    specs = {"qa": ("qa-blora", 32, 4, MinMaxGrid(bits=4, block_out=1, block_in=32)),
             "qb": ("q-blora", 2, 2, NF4Base(blocksize=64, double_quant=True))}
    out = {}
    for key, (method, li, lo, quant) in specs.items():
        path = root / f"ckpt-{key}"
        if not (path / "blora_config.json").is_file():
            gen = torch.Generator().manual_seed(seed)
            modules = [_module(name, dims, method, li, lo, rank, scaling, gen, AdapterModule)
                       for name, dims in shape.tensors() if name.endswith(tuple(f"{m}.weight" for m in LINEARS))]
            save_checkpoint(path, modules, rank, lora_alpha, str(base.resolve()), BloraConfig(method, li, lo, quant))
        out[key] = path
    return out


def _module(name, dims, method, li, lo, rank, scaling, gen, cls, strength: float = 0.5):
    """A seeded adapter whose ΔW has about ``strength`` times the std of the base weight."""
    out_f, in_f = dims
    std = (1.5 if name.endswith(("q_proj.weight", "k_proj.weight")) else 1.0) / math.sqrt(in_f)
    module = name[: -len(".weight")]
    if method == "q-blora":
        big_r = rank * li
        a = torch.randn(big_r, in_f // li, generator=gen)
        b = torch.randn(out_f // lo, big_r, generator=gen) * (strength * std * li / (scaling * big_r**0.5))
        return cls(module, method, li, lo, scaling, out_f, in_f, a=a, b=b)
    h = torch.randn(out_f // lo, in_f // li, generator=gen) * (strength * std * li / scaling)
    return cls(module, method, li, lo, scaling, out_f, in_f, h=h)
