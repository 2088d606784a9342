"""Training data: JSON lines, tokenized with the base's tokenizer, prompts masked from the loss.

Each line is an object with either ``instruction`` (+ optional ``input``) and ``output``
(formatted with the Alpaca template; only the response and the end-of-sequence token are
trained) or ``text`` (every token trained). Labels of untrained positions are ``-100``.

Batches are a pure function of ``(seed, step)``: the examples are visited in a seeded
permutation per epoch, so a resumed run (or a data-parallel one with the same global batch)
sees exactly the examples an uninterrupted single-process run would.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..errors import BadInputError

log = logging.getLogger(__name__)
IGNORE_INDEX = -100
ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further "
                 "context. Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                          "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


@dataclass(frozen=True)
class Example:
    """One tokenized example: ``labels[i]`` is the target at position ``i`` (HF convention)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    @property
    def trained_tokens(self) -> int:
        return sum(1 for t in self.labels[1:] if t != IGNORE_INDEX)


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [B, L] long, right-padded
    attention_mask: torch.Tensor  # [B, L] long
    labels: torch.Tensor  # [B, L] long, -100 on prompts and padding

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


def format_prompt(row: dict) -> tuple[str, str]:
    """``(prompt, response)`` of an Alpaca row."""
    template = ALPACA_PROMPT if row.get("input") else ALPACA_PROMPT_NO_INPUT
    return template.format(instruction=row["instruction"], input=row.get("input", "")), row["output"]


def _check_row(row: object, where: str) -> dict:
    if not isinstance(row, dict):
        raise BadInputError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "text" in row:
        if not isinstance(row["text"], str) or not row["text"]:
            raise BadInputError(f"{where}: 'text' must be a non-empty string")
        return row
    missing = [k for k in ("instruction", "output") if k not in row]
    if missing:
        raise BadInputError(f"{where}: needs 'text', or 'instruction' and 'output' (missing {', '.join(missing)})")
    for key in ("instruction", "input", "output"):
        if key in row and not isinstance(row[key], str):
            raise BadInputError(f"{where}: '{key}' must be a string, got {type(row[key]).__name__}")
    if not row["output"]:
        raise BadInputError(f"{where}: 'output' is empty: nothing to train on")
    return row


def read_rows(path: str | Path) -> list[dict]:
    """Parse the JSON lines file; any bad line is a one-line error naming its number."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"cannot read --data {path} ({exc})") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadInputError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        rows.append(_check_row(raw, where))
    if not rows:
        raise BadInputError(f"--data {path} holds no examples (one JSON object per line)")
    return rows


def tokenize_row(row: dict, tokenizer, seq_len: int) -> Example:
    """Prompt tokens (with BOS) are masked; response tokens and EOS are trained; cut at ``seq_len``."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if "text" in row:
        ids = list(tokenizer(row["text"])["input_ids"]) + eos
        labels = list(ids)
    else:
        prompt, response = format_prompt(row)
        prompt_ids = list(tokenizer(prompt)["input_ids"])
        response_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"]) + eos
        ids = prompt_ids + response_ids
        labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
    return Example(tuple(ids[:seq_len]), tuple(labels[:seq_len]))


def load_examples(path: str | Path, tokenizer, seq_len: int) -> list[Example]:
    """Every usable example of the file; ones whose response lies past ``seq_len`` are dropped (logged)."""
    rows = read_rows(path)
    examples = [tokenize_row(r, tokenizer, seq_len) for r in rows]
    kept = [e for e in examples if e.trained_tokens > 0]
    if not kept:
        raise BadInputError(f"--data {path}: no example has a trained token within --seq-len {seq_len}; "
                            "raise --seq-len")
    if len(kept) < len(examples):
        log.warning("%d of %d examples have no response token within --seq-len %d and are skipped",
                    len(examples) - len(kept), len(examples), seq_len)
    return kept


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen).tolist()


def global_batch_indices(n: int, seed: int, step: int, global_batch: int) -> list[int]:
    """Example indices of ``step`` (0-based): the ``step``-th run of ``global_batch`` in the epoch stream."""
    start = step * global_batch
    out: list[int] = []
    epoch, offset = divmod(start, n)
    while len(out) < global_batch:
        order = epoch_order(n, seed, epoch)
        out.extend(order[offset:offset + global_batch - len(out)])
        epoch, offset = epoch + 1, 0
    return out


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    """Right-pad to the longest example; padding is masked from attention and loss."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return Batch(ids, mask, labels)


def rank_batch(examples: Sequence[Example], seed: int, step: int, batch_size: int, rank: int, world: int,
               pad_id: int) -> Batch:
    """This process's share (``batch_size`` examples) of the global batch of ``step``."""
    idx = global_batch_indices(len(examples), seed, step, batch_size * world)
    mine = idx[rank * batch_size:(rank + 1) * batch_size]
    return collate([examples[i] for i in mine], pad_id)
