"""The shared types of an export: the job every converter receives, what it returns, and
what ``verify`` reads back (an opened artifact and its per-layer checks).

The one small interface every output format implements.

A converter module (``converters/<format>.py``) exposes:

* ``NAME: str`` and ``DESCRIPTION: str``;
* ``export(job: ExportJob, out: Path, **options) -> ExportResult``: write the artifact
  (atomically: to a temporary path, renamed at the end);
* ``detect(path: Path) -> bool``: whether ``path`` looks like this format's artifact;
* ``open_artifact(path: Path, job: ExportJob, **options) -> Artifact``: load it for ``verify``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .base import BaseModel
from .checkpoint import Checkpoint
from .merge import MergePlan
from .tolerance import Tolerance


@dataclass(frozen=True)
class ExportJob:
    """What every converter receives: the checkpoint, its base, and the merge plan."""

    ckpt: Checkpoint
    base: BaseModel
    plan: MergePlan
    progress: Callable = iter  # wraps an iterable with a progress bar (or not, with --quiet)


@dataclass(frozen=True)
class ExportResult:
    """What was written, and the facts a user (or CI) needs about it."""

    format: str
    path: Path
    seconds: float
    details: dict = field(default_factory=dict)  # JSON-serialisable

    def to_json(self) -> dict:
        return {"format": self.format, "path": str(self.path), "seconds": round(self.seconds, 3), **self.details}


@dataclass(frozen=True)
class LayerCheck:
    """One per-layer check: a number, the bound it must meet, and the verdict."""

    name: str
    check: str
    value: float
    bound: float

    @property
    def passed(self) -> bool:
        return self.value <= self.bound

    def to_json(self) -> dict:
        return {"name": self.name, "check": self.check, "value": self.value, "bound": self.bound,
                "passed": self.passed}


@dataclass(frozen=True)
class Artifact:
    """An exported model loaded for verification."""

    format: str
    path: Path
    description: str
    tolerance: Tolerance
    # The artifact's logits in its runtime; None: run ``weights`` in verify's streamed forward.
    logits: Optional[Callable[[Sequence[Sequence[int]]], list[torch.Tensor]]]
    layer_checks: Callable[[], list[LayerCheck]] = lambda: []
    notes: tuple[str, ...] = ()
    # Set for float-weight artifacts: verify measures this dtype's rounding floor on the base
    # (as trained, without the adapter) and widens the tolerance to FLOOR_FACTOR x that floor.
    weight_dtype: Optional[torch.dtype] = None
    # Extra streams (blora_export.stream.Stream) verify runs in its one pass over the layers: the
    # floors a bound is measured from. ``bound(logits_by_stream)`` then gives the tolerance
    # (streams "trained" and "without" are always there); None: ``tolerance`` as is.
    streams: tuple = ()
    bound: Optional[Callable[[dict], Tolerance]] = None
    # The artifact's own weights, float32 by Hugging Face name (``weights(name, cache)``), run in the
    # base's true architecture. Without ``logits`` they are the candidate; with it (a runtime), a second
    # end-to-end check of what the file holds, against ``weights_bound``.
    weights: Optional[Callable] = None
    weights_bound: Optional[Callable[[dict], Tolerance]] = None
    weights_description: str = ""
