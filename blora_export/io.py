"""Outputs: the one guard every command's outputs pass, atomic writes, and progress bars.

:func:`check_output` is called for every path a command will write (an export's output, ``--json``,
``train --out``) before any long work starts: no command deletes or overwrites what it reads,
whatever the flags. Outputs are then written under a temporary name beside the target and renamed
at the end, so an error or Ctrl-C never leaves a half-written file or folder at the target path,
nor the empty parent folders made for it.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

from .errors import OutputError

log = logging.getLogger(__name__)
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")


def check_output(path: str | Path, inputs: Sequence[str | Path] = (), *, what: str = "output",
                 overwrite: bool = False, kind: Optional[str] = None, outputs: Sequence[str | Path] = ()) -> None:
    """Refuse, before any work, an output that would destroy an input or cannot be written.

    ``inputs`` are every file and folder the command reads: the output may not be one of them,
    lie inside one, or hold one (replacing it would delete it). ``what`` names the output in the
    message (``output``, ``--json``, ``--out``); ``kind`` is ``"file"`` or ``"dir"``; an existing
    output is replaced only with ``overwrite``. The folder it goes in must be writable. ``outputs``
    are the command's other outputs, which it may not be or hold.
    """
    path = Path(path)
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OutputError(f"{what} {path} is a symlink loop; choose another path") from None
    target = Path(os.path.realpath(path))
    for src in inputs:
        src = Path(os.path.realpath(src))
        if target == src or src in target.parents:
            raise OutputError(f"{what} {path} would overwrite or lie inside the input {src}; choose another path")
        if target in src.parents:
            raise OutputError(f"{what} {path} would overwrite or lie inside the input {src}: it holds it, and "
                              "replacing it would delete it; choose another path")
    for other in outputs:
        other = Path(os.path.realpath(other))
        if target == other or target in other.parents:
            raise OutputError(f"{what} {path} is (or holds) the command's other output {other}; choose another path")
    if path.exists():
        if kind == "dir" and not path.is_dir():
            raise OutputError(f"{what} {path} exists and is not a folder; choose another path")
        if kind == "file" and path.is_dir():
            raise OutputError(f"{what} {path} is a folder; give a file path")
        if not overwrite:
            raise OutputError(f"{what} {path} exists; pass --overwrite to replace it")
    _check_writable(path, what)


def _check_writable(path: Path, what: str) -> None:
    """The nearest existing folder above ``path`` is a folder we can create entries in (probed:
    permission bits say nothing for root or a read-only mount)."""
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise OutputError(f"{what} {path}: {folder} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".blora-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"cannot write {what} {path}: {folder} is not writable ({exc.strerror})") from None


def write_error(exc: BaseException, target: Path, tmp: Path) -> Optional[OutputError]:
    """A one-line error for a failure to write ``target`` (via ``tmp``), or None if it is something else."""
    text = str(exc)
    short_write = isinstance(exc, OSError) and SHORT_WRITE.search(text)  # numpy's tofile on a full disk
    if getattr(exc, "errno", None) in DISK_FULL or "No space left on device" in text or short_write:
        return OutputError(f"no space left on the device while writing {target} (the disk is full); "
                           "free some space or write elsewhere")
    filename = getattr(exc, "filename", None)
    if isinstance(exc, OSError) and filename and str(filename).startswith(str(tmp)):
        return OutputError(f"cannot write {target} ({exc.strerror})")
    return None


def _make_parents(target: Path) -> list[Path]:
    """Create the missing folders above ``target``; return them, deepest first (to undo)."""
    missing = []
    folder = target.parent
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for made in reversed(missing):
        made.mkdir()
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _temp_sibling(target: Path) -> Path:
    return target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"


@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder; on success it replaces ``target`` (an old one is removed)."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise OutputError(f"output {target} exists and is not a folder")
    made = _make_parents(target)
    tmp = _temp_sibling(target)
    done = False
    try:
        tmp.mkdir()
        yield tmp
        old = None
        if target.exists():
            old = _temp_sibling(target)
            os.replace(target, old)
        os.replace(tmp, target)
        done = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except Exception as exc:
        error = write_error(exc, target, tmp)
        if error is not None:
            raise error from None
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if not done:
            _remove_empty(made)


@contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """Yield a temporary file path beside ``target``; on success it is renamed onto ``target``."""
    target = Path(target)
    made = _make_parents(target)
    tmp = _temp_sibling(target)
    done = False
    try:
        yield tmp
        os.replace(tmp, target)
        done = True
    except Exception as exc:
        error = write_error(exc, target, tmp)
        if error is not None:
            raise error from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
        if not done:
            _remove_empty(made)


def write_text(target: str | Path, text: str) -> None:
    """Write a small text output (``--json``) atomically."""
    with atomic_file(target) as tmp:
        tmp.write_text(text)


def progress_factory(quiet: bool = False) -> Callable[..., Iterable]:
    """A ``progress(iterable, desc=..., total=...)`` wrapper: a tqdm bar on stderr, or nothing."""
    if quiet:
        return lambda iterable, desc=None, total=None, unit="it": iterable
    from tqdm.auto import tqdm

    def progress(iterable, desc: Optional[str] = None, total: Optional[int] = None, unit: str = "it"):
        return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True)

    return progress
