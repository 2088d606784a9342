"""Reading safetensors files one tensor at a time, without memory-mapping them.

``safe_open`` maps the whole file; every page a tensor read touches stays mapped (and counted
in the process's resident memory) for as long as the handle lives, so an export that reads a
2 GB base through open handles ends with 2 GB resident. Here the header is parsed once per
file and each tensor is read with one ``readinto`` straight into a fresh tensor's buffer: the
only resident memory is the tensors the caller still holds (the kernel's page cache is not the
process's and is reclaimable).

Format (https://github.com/huggingface/safetensors): 8-byte little-endian header length ``n``,
``n`` bytes of JSON ``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": ...}``,
then the data; offsets are relative to the end of the header; little-endian, C order.
"""
from __future__ import annotations

import json
import math
import os
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import BadInputError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool}
MAX_HEADER = 100 * 1024**2  # safetensors' own limit


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies in its file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset
    nbytes: int


def read_header(file: Path) -> dict[str, TensorEntry]:
    """Every tensor of a safetensors file (name -> entry), checked against the file's size."""
    try:
        with open(file, "rb") as fh:
            head = fh.read(8)
            if len(head) != 8:
                raise ValueError("shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER:
                raise ValueError(f"header length {n} is implausible")
            raw = fh.read(n)
            if len(raw) != n:
                raise ValueError("header is cut short")
            header = json.loads(raw)
            size = os.fstat(fh.fileno()).st_size
    except OSError as exc:
        raise BadInputError(f"cannot read {file} ({exc})") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{file} is truncated or not a safetensors file ({exc})") from None
    if not isinstance(header, dict):
        raise BadInputError(f"{file} is not a safetensors file (its header is not a JSON object)")
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        entries[name] = _entry(file, name, info, 8 + n, size)
    return entries


def _entry(file: Path, name: str, info, data_start: int, size: int) -> TensorEntry:
    try:
        dtype = DTYPES[info["dtype"]]
        shape = tuple(int(d) for d in info["shape"])
        begin, end = (int(v) for v in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise BadInputError(f"{file}: tensor {name!r} has an unreadable or unsupported header entry {info!r}") from None
    nbytes = math.prod(shape) * dtype.itemsize
    if end - begin != nbytes or begin < 0 or any(d < 0 for d in shape):
        raise BadInputError(f"{file}: tensor {name!r} {list(shape)} {info['dtype']} does not match its byte range")
    if data_start + end > size:
        raise BadInputError(f"{file} is truncated: tensor {name!r} ends at byte {data_start + end}, the file has {size}")
    return TensorEntry(file, dtype, shape, data_start + begin, nbytes)


def read_tensor(entry: TensorEntry) -> torch.Tensor:
    """The tensor, read now into memory this process owns (no mapping is kept)."""
    buf = torch.empty(entry.nbytes, dtype=torch.uint8)
    try:
        with open(entry.file, "rb", buffering=0) as fh:
            fh.seek(entry.start)
            view, done = memoryview(buf.numpy()), 0
            while done < entry.nbytes:
                got = fh.readinto(view[done:])
                if not got:
                    raise BadInputError(f"{entry.file} is truncated (a tensor ends past the end of the file)")
                done += got
    except OSError as exc:
        raise BadInputError(f"cannot read {entry.file} ({exc})") from None
    if entry.dtype == torch.bool:
        return buf.view(torch.bool).reshape(entry.shape)
    return buf.view(entry.dtype).reshape(entry.shape)


@contextmanager
def one_thread():
    """Run torch on one intra-op thread inside (restored after).

    For loops of many small (cache-sized) tensor operations: each op split over threads pays a
    barrier, and when the machine has other work those barriers wait on descheduled threads.
    Measured on one 1.1B decoder layer (to-gguf q4_1 fold, 2 cores under load): 2 threads
    21-36 s wall and 5-9 s CPU, 1 thread 2.8 s wall and 0.5 s CPU.
    """
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def all_finite(x: torch.Tensor) -> bool:
    """Whether every value of a float tensor is finite: usually one fast pass, no allocation.

    The sum of the values (in the tensor's dtype; torch accumulates 16-bit types in float32)
    is NaN or infinite whenever a value is (IEEE: inf + finite = inf, inf - inf = NaN, NaN
    propagates), so a finite sum proves every value finite. A non-finite sum means a
    non-finite value or an overflow of the sum: then each value is tested. (``isfinite`` on
    float16 is several times slower than the sum.)
    """
    if not x.is_floating_point() or x.numel() == 0:
        return True
    if bool(torch.isfinite(x.sum())):
        return True
    return bool(torch.isfinite(x).all())


CODES = {v: k for k, v in DTYPES.items()}
COPY_CHUNK = 64 * 1024**2


class SafetensorsStream:
    """One safetensors file written a tensor at a time: nothing but the current tensor in memory.

    The data goes to a side file as each tensor arrives; ``close`` writes the header (its size
    is known only then) and moves the data behind it with ``os.sendfile`` (in the kernel).
    Tensors lie in arrival order, contiguous, as the format requires (no holes).
    """

    def __init__(self, path: Path, metadata: dict | None = None):
        self.path = Path(path)
        self.metadata = metadata or {}
        self._side = self.path.with_name(self.path.name + ".data")
        self._data = open(self._side, "wb+")
        self.entries: dict[str, dict] = {}
        self.nbytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.entries:
            raise ValueError(f"duplicate tensor {name}")
        if tensor.dtype not in CODES:
            raise ValueError(f"{name}: dtype {tensor.dtype} has no safetensors code")
        flat = tensor.detach().contiguous().reshape(-1)
        raw = flat.view(torch.uint8) if flat.dtype != torch.bool else flat.to(torch.uint8)
        self._data.write(memoryview(raw.numpy()))
        n = flat.numel() * tensor.element_size()
        self.entries[name] = {"dtype": CODES[tensor.dtype], "shape": list(tensor.shape),
                              "data_offsets": [self.nbytes, self.nbytes + n]}
        self.nbytes += n

    def close(self) -> None:
        header = {"__metadata__": self.metadata, **self.entries} if self.metadata else dict(self.entries)
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # data 8-byte aligned, as safetensors pads
        self._data.flush()
        with open(self.path, "wb") as out:
            out.write(struct.pack("<Q", len(text)) + text)
            out.flush()
            done = 0
            while done < self.nbytes:
                sent = os.sendfile(out.fileno(), self._data.fileno(), done, min(COPY_CHUNK, self.nbytes - done))
                if not sent:
                    raise OSError(f"short copy into {self.path}")
                done += sent
        self._data.close()
        os.unlink(self._side)

    def abort(self) -> None:
        self._data.close()
        self._side.unlink(missing_ok=True)
