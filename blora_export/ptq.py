"""The error a post-training re-quantization adds, measured in weight space.

Every writer that re-quantizes (``--requantize``, quantized embeddings, ONNX int4 of a
Q-BLoRA) accumulates one :class:`PtqError` and reports it under the same keys, so a user
compares the fold with the PTQ route in one vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class PtqError:
    """Stored weights against the exact ones, accumulated tensor by tensor."""

    sq_err: float = 0.0
    sq_ref: float = 0.0
    max_rel: float = 0.0  # max over tensors of max|stored - exact| / max|exact|
    worst: Optional[str] = None  # the tensor where max_rel was reached
    tensors: int = 0

    def add(self, stored: torch.Tensor, exact: torch.Tensor, name: Optional[str] = None) -> None:
        err = stored.to(torch.float64) - exact.to(torch.float64)
        self.sq_err += float((err * err).sum())
        self.sq_ref += float((exact.to(torch.float64) ** 2).sum())
        scale = float(exact.abs().max()) or 1.0
        rel = float(err.abs().max()) / scale
        if rel >= self.max_rel:
            self.max_rel, self.worst = rel, name
        self.tensors += 1

    def to_json(self) -> dict:
        rms = (self.sq_err / self.sq_ref) ** 0.5 if self.sq_ref else 0.0
        return {"weight_rel_rms": rms, "weight_max_rel": self.max_rel, "worst_tensor": self.worst,
                "tensors": self.tensors}
