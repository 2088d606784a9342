"""Atomic outputs and progress bars.

Outputs are written under a temporary name beside the target and renamed at the end, so an
error or Ctrl-C never leaves a half-written file or folder at the target path.
"""
from __future__ import annotations

import logging
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

log = logging.getLogger(__name__)


def _temp_sibling(target: Path) -> Path:
    return target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"


@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder; on success it replaces ``target`` (an old one is removed)."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(target)
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if target.exists():
            old = _temp_sibling(target)
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """Yield a temporary file path beside ``target``; on success it is renamed onto ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(target)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def progress_factory(quiet: bool = False) -> Callable[..., Iterable]:
    """A ``progress(iterable, desc=..., total=...)`` wrapper: a tqdm bar on stderr, or nothing."""
    if quiet:
        return lambda iterable, desc=None, total=None, unit="it": iterable
    from tqdm.auto import tqdm

    def progress(iterable, desc: Optional[str] = None, total: Optional[int] = None, unit: str = "it"):
        return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True)

    return progress
