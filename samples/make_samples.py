"""Build the shipped samples: a tiny LLaMA base and checkpoints of both methods in both layouts.

    python samples/make_samples.py            # rewrites samples/base and samples/*-blora*

The adapters are random (seeded) with an update about half the size of each weight, so that
a dropped adapter or a wrong merge moves the logits far more than float noise. The
checkpoints trained by ``blora-export train`` are real ones; these exist to be small and
deterministic.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from blora_export.base import BaseModel  # noqa: E402
from blora_export.delta import AdapterModule  # noqa: E402
from blora_export.save import save_checkpoint  # noqa: E402
from blora_export.spec import BloraConfig, MinMaxGrid, NF4Base, adapter_scaling  # noqa: E402

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
               "qkv_proj", "gate_up_proj")  # Phi-3's fused Linears


def random_modules(base: BaseModel, method: str, lambda_in: int, lambda_out: int, rank: int, scaling: float,
                   targets: Sequence[str] = ALL_TARGETS, seed: int = 0, strength: float = 0.5) -> list[AdapterModule]:
    """Seeded adapters whose ΔW has about ``strength`` times the std of each base weight."""
    gen = torch.Generator().manual_seed(seed)
    modules = []
    for name in base.linear_names():
        module = name[: -len(".weight")]
        if module.rsplit(".", 1)[-1] not in targets:
            continue
        out_f, in_f = base.shape(name)
        std = float(base.tensor(name).float().std())
        if method == "q-blora":
            big_r = rank * lambda_in
            a = torch.randn(big_r, in_f // lambda_in, generator=gen)
            b = torch.randn(out_f // lambda_out, big_r, generator=gen)
            b *= strength * std * lambda_in / (scaling * big_r**0.5)
            modules.append(AdapterModule(module, method, lambda_in, lambda_out, scaling, out_f, in_f, a=a, b=b))
        else:
            h = torch.randn(out_f // lambda_out, in_f // lambda_in, generator=gen)
            h *= strength * std * lambda_in / scaling
            modules.append(AdapterModule(module, method, lambda_in, lambda_out, scaling, out_f, in_f, h=h))
    return modules


def make_checkpoint(out: Path, base_dir: Path, method: str, lambda_in: int, lambda_out: int, *, layout: str = "native",
                    base_quant: Optional[object] = None, rank: int = 8, lora_alpha: float = 16.0,
                    seed: int = 0, strength: float = 0.5, base_ref: Optional[str] = None,
                    targets: Sequence[str] = ALL_TARGETS, qa_key: str = "lora_A") -> Path:
    """Write one checkpoint (native or paper layout) for the base in ``base_dir``."""
    base = BaseModel.open(base_dir)
    scaling = adapter_scaling(lora_alpha, rank, False)
    modules = random_modules(base, method, lambda_in, lambda_out, rank, scaling, targets, seed, strength)
    blora = BloraConfig(method, lambda_in, lambda_out, base_quant) if layout == "native" else None
    return save_checkpoint(out, modules, rank, lora_alpha, base_ref or str(Path(base_dir).resolve()), blora,
                           qa_key=qa_key)


SAMPLES = {
    # name: (method, λi, λo, layout, base_quant)
    "qa-blora-q4_1": ("qa-blora", 32, 4, "native", MinMaxGrid(bits=4, block_out=1, block_in=32)),
    "q-blora-nf4": ("q-blora", 2, 2, "native", NF4Base(blocksize=64, double_quant=True)),
    "paper-q-blora": ("q-blora", 2, 2, "paper", None),
    "paper-qa-blora": ("qa-blora", 4, 8, "paper", None),
}


def main(root: Path = HERE) -> None:
    from tiny_models import make_base

    make_base(root / "base", arch="llama")
    for i, (name, (method, li, lo, layout, quant)) in enumerate(SAMPLES.items()):
        make_checkpoint(root / name, root / "base", method, li, lo, layout=layout, base_quant=quant,
                        seed=100 + i, base_ref="../base")
        print(f"wrote {root / name}")


if __name__ == "__main__":
    main()
