"""Writing the trained checkpoint and the state a ``--resume`` continues from.

One atomic write (``save.save_checkpoint``) puts everything in the checkpoint folder:
the native checkpoint (``adapter_config.json``, ``adapter_model.safetensors``,
``blora_config.json``), ``train_log.jsonl`` (one JSON object per step), ``train_config.json``
(the options and the resolved adapter), and the resumable state: ``train_state.safetensors``
(adapter tensors, AdamW moments, RNG states) and ``train_state.json`` (step, optimizer groups,
and the fingerprint a resumed run must match). Nothing is pickled.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..errors import BadInputError
from ..save import save_checkpoint
from ..spec import BloraConfig
from .config import AdapterSpec, TrainConfig
from .layers import BLoRALinear

STATE_TENSORS = "train_state.safetensors"
STATE_JSON = "train_state.json"
LOG_FILE = "train_log.jsonl"
CONFIG_FILE = "train_config.json"
STATE_VERSION = 1


@dataclass(frozen=True)
class ResumeState:
    step: int
    tensors: dict[str, torch.Tensor]
    meta: dict
    log_rows: list[dict]


def fingerprint(cfg: TrainConfig, spec: AdapterSpec, data_sha256: str, global_batch: int) -> dict:
    """Everything a resumed run must share with the saved one to continue the same trajectory."""
    return {"base": str(Path(cfg.base).resolve()), "data_sha256": data_sha256, **spec.to_json(),
            "rank": cfg.rank, "alpha": cfg.alpha, "lr": cfg.lr, "global_batch": global_batch,
            "seq_len": cfg.seq_len, "seed": cfg.seed, "max_grad_norm": cfg.max_grad_norm}


def base_reference(base_path: Path, out: Path) -> str:
    """The base as ``adapter_config.json`` names it: relative to the checkpoint folder when the two share
    a folder (so the pair can move together, like ``samples/``), else absolute."""
    base_abs, out_abs = Path(base_path).resolve(), Path(out).resolve()
    if os.path.commonpath([base_abs, out_abs]) == base_abs.anchor:
        return str(base_abs)
    return os.path.relpath(base_abs, out_abs)


def state_tensors(layers: Sequence[BLoRALinear], optimizer: torch.optim.Optimizer) -> tuple[dict, list]:
    tensors: dict[str, torch.Tensor] = {}
    for layer in layers:
        for pname, param in layer.named_parameters(recurse=False):
            tensors[f"adapter.{layer.name}.{pname}"] = param.detach().float().cpu().contiguous()
    opt = optimizer.state_dict()
    for idx, slots in opt["state"].items():
        for key, value in slots.items():
            tensors[f"optimizer.{idx}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in opt["param_groups"]]
    return tensors, groups


def write_checkpoint(cfg: TrainConfig, spec: AdapterSpec, layers: Sequence[BLoRALinear],
                     optimizer: torch.optim.Optimizer, step: int, log_rows: Sequence[dict], meta: dict) -> Path:
    """Write the checkpoint and resumable state at ``step`` (atomically: all or nothing)."""
    modules = [layer.adapter_module() for layer in layers]
    tensors, groups = state_tensors(layers, optimizer)
    state = {"version": STATE_VERSION, "step": step, "param_groups": groups, **meta}
    extra = {
        LOG_FILE: "".join(json.dumps(row) + "\n" for row in log_rows),
        CONFIG_FILE: json.dumps({"options": cfg.to_json(), "adapter": spec.to_json(), **meta}, indent=2) + "\n",
        STATE_JSON: json.dumps(state, indent=2) + "\n",
        STATE_TENSORS: st_save(tensors),
    }
    blora = BloraConfig(spec.method, spec.lambda_in, spec.lambda_out, spec.base_quant,
                        forward="folded" if spec.fold_aware else "branch")
    return save_checkpoint(cfg.out, modules, rank=cfg.rank, lora_alpha=float(cfg.alpha),
                           base_model=base_reference(cfg.base, cfg.out), blora=blora, extra_files=extra)


def read_state(out: Path) -> ResumeState:
    """The saved state of the checkpoint folder ``out`` (for ``--resume``)."""
    out = Path(out)
    if not (out / STATE_JSON).is_file() or not (out / STATE_TENSORS).is_file():
        raise BadInputError(f"--resume: {out} holds no {STATE_JSON}/{STATE_TENSORS} (not written by "
                            "`blora-export train`?); run without --resume to start a new training")
    try:
        meta = json.loads((out / STATE_JSON).read_text())
        tensors = st_load((out / STATE_TENSORS).read_bytes())
        rows = [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as exc:
        raise BadInputError(f"--resume: the training state in {out} is unreadable ({exc})") from None
    if meta.get("version") != STATE_VERSION:
        raise BadInputError(f"--resume: {out} has training state version {meta.get('version')!r}; "
                            f"this tool reads {STATE_VERSION}")
    return ResumeState(int(meta["step"]), tensors, meta, [r for r in rows if r.get("step", 0) <= meta["step"]])


def check_fingerprint(state: ResumeState, current: dict, out: Path) -> None:
    saved = state.meta.get("fingerprint", {})
    diffs = [f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in current.items() if saved.get(k) != v]
    if diffs:
        raise BadInputError(f"--resume: {out} was trained with other settings ({'; '.join(diffs[:4])}); "
                            "resume with the same options (only --steps may grow) or start a new --out")


def restore(state: ResumeState, layers: Sequence[BLoRALinear], optimizer: torch.optim.Optimizer) -> None:
    """Load adapter tensors, optimizer moments and RNG states saved by :func:`write_checkpoint`."""
    t = state.tensors
    with torch.no_grad():
        for layer in layers:
            for pname, param in layer.named_parameters(recurse=False):
                param.copy_(t[f"adapter.{layer.name}.{pname}"].to(param.device, param.dtype))
    slots: dict[int, dict] = {}
    for key, value in t.items():
        if key.startswith("optimizer."):
            _, idx, name = key.split(".", 2)
            slots.setdefault(int(idx), {})[name] = value
    groups = state.meta["param_groups"]
    optimizer.load_state_dict({"state": slots, "param_groups": groups})
    torch.set_rng_state(t["rng.cpu"])
    if "rng.cuda" in t and torch.cuda.is_available():
        torch.cuda.set_rng_state(t["rng.cuda"])
