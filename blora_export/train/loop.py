"""The training loop: AdamW on the adapter parameters only, one process or data-parallel (DDP).

Loss: the sum of token cross-entropies over the global batch divided by the global number of
trained tokens (prompt and padding tokens are masked). Under ``torchrun`` / ``accelerate launch``
(``WORLD_SIZE`` > 1) every process takes its ``--batch-size`` share of the same global batch and
DDP averages the gradients (gloo on CPU, NCCL on CUDA), so N processes with batch B follow the
trajectory of one process with batch N·B; rank 0 writes the one checkpoint.
On CUDA: bf16 autocast and gradient checkpointing (the adapter stays float32).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import distributed as dist
from torch.nn import functional as F

from ..base import BaseModel
from ..errors import BadInputError, UnsupportedError
from ..io import check_output, progress_factory
from ..reference import load_tokenizer
from . import state as st
from .config import AdapterSpec, TrainConfig, resolve_spec
from .data import IGNORE_INDEX, Batch, file_sha256, load_examples, rank_batch
from .model import build_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: device, data-parallel rank and world size."""

    device: torch.device
    rank: int = 0
    world: int = 1
    bf16: bool = False  # bf16 autocast around forward and loss (the adapter stays float32)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def all_sum(self, *values: float) -> list[float]:
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


@dataclass
class TrainResult:
    path: Path
    method: str
    adapter: dict
    device: str
    world_size: int
    start_step: int
    steps: int
    seconds: float
    log: list = field(default_factory=list)
    is_main: bool = True  # rank 0 (the process that wrote the checkpoint)

    def to_json(self) -> dict:
        new = [r for r in self.log if r["step"] > self.start_step]
        tok_s = [r["tokens_per_s"] for r in new]
        return {"path": str(self.path), "method": self.method, "adapter": self.adapter, "device": self.device,
                "world_size": self.world_size, "start_step": self.start_step, "steps": self.steps,
                "seconds": round(self.seconds, 3),
                "first_loss": self.log[0]["loss"] if self.log else None,
                "last_loss": self.log[-1]["loss"] if self.log else None,
                "mean_tokens_per_s": sum(tok_s) / len(tok_s) if tok_s else None}


def pick_device(requested: str, local_rank: int, precision: str) -> torch.device:
    has_cuda = torch.cuda.is_available()
    if requested == "cuda" and not has_cuda:
        raise UnsupportedError("--device cuda: no CUDA device is visible; use --device cpu (or auto)")
    if requested == "cpu" or not has_cuda:
        return torch.device("cpu")
    if precision != "float32" and not torch.cuda.is_bf16_supported():
        raise UnsupportedError("this GPU has no bfloat16 support (needed for bf16 autocast); use --device cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def start_runtime(cfg: TrainConfig) -> Runtime:
    """Single process, or join the process group ``torchrun`` / ``accelerate launch`` set up."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(cfg.device, local_rank, cfg.precision)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    if world == 1:
        return Runtime(device, bf16=bf16)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Runtime(device, dist.get_rank(), dist.get_world_size(), bf16)


def loss_sum(model, batch: Batch) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the trained positions, and their count."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    labels = batch.labels[:, 1:]
    total = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    return total, int((labels != IGNORE_INDEX).sum())


def train_step(model, params, optimizer, batch: Batch, rt: Runtime, cfg: TrainConfig) -> dict:
    """One optimizer step on this process's batch; returns the global statistics."""
    t0 = time.perf_counter()
    with rt.autocast():
        total, count = loss_sum(model, batch)
    (global_count,) = rt.all_sum(count)
    # DDP averages gradients over processes; scaling by world makes it a global token mean
    (total * (rt.world / global_count)).backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss_total, tokens = rt.all_sum(float(total.detach()), batch.tokens)
    if not math.isfinite(loss_total) or not math.isfinite(float(grad_norm)):
        raise BadInputError(f"the loss diverged (loss {loss_total / global_count:g}, gradient norm {float(grad_norm):g}); "
                            "lower --lr or --alpha")
    seconds = time.perf_counter() - t0
    row = {"loss": loss_total / global_count, "lr": optimizer.param_groups[0]["lr"],
           "tokens_per_s": tokens / seconds, "tokens": int(tokens), "trained_tokens": int(global_count),
           "grad_norm": float(grad_norm), "step_time_s": seconds}
    if rt.device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(rt.device) / 1024**3
    return row


def enable_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant: frozen inputs are fine)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def check_out(cfg: TrainConfig) -> None:
    """``--out`` is never the base or the data, nor holds or lies in them, whatever the flags."""
    out = Path(cfg.out)
    check_output(out, [cfg.base, cfg.data], what="--out", overwrite=True, kind="dir")
    if cfg.resume or not out.exists() or cfg.overwrite:
        return
    raise BadInputError(f"--out {out} already exists; pass --resume to continue its training, --overwrite to "
                        "replace it, or choose another --out")


@dataclass
class Session:
    """Everything one training run holds: the adapter spec, data, model, optimizer, resumed state."""

    spec: AdapterSpec
    examples: list
    pad_id: int
    model: torch.nn.Module
    layers: list  # the BLoRALinear layers, in module order
    optimizer: torch.optim.Optimizer
    meta: dict  # fingerprint and facts saved with the state
    resumed: Optional[st.ResumeState]

    @property
    def params(self) -> list:
        return [p for layer in self.layers for p in layer.parameters() if p.requires_grad]


def prepare(cfg: TrainConfig, rt: Runtime) -> Session:
    """Base, adapter spec, examples, model, optimizer and the resumed state (if any)."""
    check_out(cfg)
    torch.manual_seed(cfg.seed + rt.rank)  # dropout, if a base has any (a resumed run restores the saved RNG)
    base = BaseModel.open(cfg.base)
    spec = resolve_spec(cfg, base.model_type)
    tokenizer = load_tokenizer(base.path)
    examples = load_examples(cfg.data, tokenizer, cfg.seq_len)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    progress = progress_factory(cfg.quiet or not rt.main)
    model, layers = build_model(base, spec, rt.device, cfg.seed, cfg.nf4_backend, progress)
    checkpointing = cfg.gradient_checkpointing
    if checkpointing or (checkpointing is None and rt.device.type == "cuda"):
        enable_checkpointing(model)
    model.train()
    layers = list(layers.values())
    params = [p for layer in layers for p in layer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=0.0)
    meta = {"fingerprint": st.fingerprint(cfg, spec, file_sha256(cfg.data), cfg.batch_size * rt.world),
            "examples": len(examples)}
    resumed = None
    if cfg.resume:
        resumed = st.read_state(cfg.out)
        st.check_fingerprint(resumed, meta["fingerprint"], cfg.out)
        st.restore(resumed, layers, optimizer)
    return Session(spec, examples, pad_id, model, layers, optimizer, meta, resumed)


def train(cfg: TrainConfig) -> TrainResult:
    """Train a Q-BLoRA / QA-BLoRA adapter and write its native checkpoint (see the module docstring)."""
    rt = start_runtime(cfg)
    try:
        return _train(cfg, rt)
    finally:
        if rt.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, rt: Runtime) -> TrainResult:
    ses = prepare(cfg, rt)
    start = ses.resumed.step if ses.resumed else 0
    rows = list(ses.resumed.log_rows) if ses.resumed else []
    model, params = ses.model, ses.params
    if rt.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    t0 = time.perf_counter()
    bar = _bar(cfg, rt, start)
    for step in range(start, cfg.steps):
        batch = rank_batch(ses.examples, cfg.seed, step, cfg.batch_size, rt.rank, rt.world, ses.pad_id)
        row = {"step": step + 1, **train_step(model, params, ses.optimizer, batch.to(rt.device), rt, cfg)}
        rows.append(row)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            _save(cfg, ses, step + 1, rows, rt)
    if bar is not None:
        bar.close()
    if start >= cfg.steps:
        log.warning("%s is already at step %d >= --steps %d: nothing to train", cfg.out, start, cfg.steps)
    return TrainResult(Path(cfg.out), ses.spec.method, ses.spec.to_json(), str(rt.device), rt.world, start, cfg.steps,
                       time.perf_counter() - t0, rows, rt.main)


def _bar(cfg: TrainConfig, rt: Runtime, start: int):
    if cfg.quiet or not rt.main:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True, leave=False)


def _save(cfg: TrainConfig, ses: Session, step: int, rows: list, rt: Runtime) -> None:
    if rt.main:
        st.write_checkpoint(cfg, ses.spec, ses.layers, ses.optimizer, step, rows, ses.meta)
        log.debug("saved %s at step %d", cfg.out, step)
    rt.barrier()
