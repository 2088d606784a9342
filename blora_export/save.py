"""Writing checkpoints: the native format and the paper's PEFT-style layout."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors.torch import save_file

from .checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, BLORA_CONFIG
from .delta import AdapterModule
from .errors import BadInputError
from .io import atomic_dir
from .spec import BloraConfig

PEFT_PREFIX = "base_model.model."


def adapter_tensors(modules: Sequence[AdapterModule], qa_key: str = "lora_A") -> dict[str, torch.Tensor]:
    """PEFT-named tensors: ``lora_A``/``lora_B`` for Q-BLoRA, one ``lora_A`` (or ``lora_Mora``) for QA-BLoRA."""
    tensors = {}
    for m in modules:
        prefix = PEFT_PREFIX + m.name
        if m.method == "q-blora":
            tensors[f"{prefix}.lora_A.weight"] = m.a.contiguous()
            tensors[f"{prefix}.lora_B.weight"] = m.b.contiguous()
        else:
            tensors[f"{prefix}.{qa_key}.weight"] = m.h.contiguous()
    return tensors


def peft_adapter_config(modules: Sequence[AdapterModule], rank: int, lora_alpha: float, base_model: str,
                        use_rslora: bool = False) -> dict:
    targets = sorted({m.name.rsplit(".", 1)[-1] for m in modules})
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": lora_alpha,
            "lora_dropout": 0.0, "bias": "none", "use_rslora": use_rslora, "target_modules": targets,
            "base_model_name_or_path": base_model, "fan_in_fan_out": False, "inference_mode": True}


def save_checkpoint(out: str | Path, modules: Sequence[AdapterModule], rank: int, lora_alpha: float,
                    base_model: str, blora: Optional[BloraConfig] = None, use_rslora: bool = False,
                    qa_key: str = "lora_A", extra_files: Optional[dict[str, str | bytes]] = None) -> Path:
    """Write a checkpoint folder atomically: native when ``blora`` is given, else the paper's layout."""
    if not modules:
        raise BadInputError("save_checkpoint: no modules to save")
    out = Path(out)
    with atomic_dir(out) as tmp:
        save_file(adapter_tensors(modules, qa_key), str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        config = peft_adapter_config(modules, rank, lora_alpha, base_model, use_rslora)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        if blora is not None:
            (tmp / BLORA_CONFIG).write_text(json.dumps(blora.to_json(), indent=2) + "\n")
        for name, content in (extra_files or {}).items():
            if isinstance(content, bytes):
                (tmp / name).write_bytes(content)
            else:
                (tmp / name).write_text(content)
    return out
