"""NF4 quantization identical, bit for bit, to bitsandbytes' CPU path.

Q-BLoRA trains its adapters against ``dequant(NF4(W))``; this module recomputes that
tensor without needing bitsandbytes at run time.

Mirrored code path: bitsandbytes 0.50.2 (PyPI wheel, ``libbitsandbytes_cpu.so``), CPU
tensors, ``quantize_4bit(W, blocksize=bs, quant_type="nf4", compress_statistics=dq)``
followed by ``dequantize_4bit``'s reference computation (``backends/default/ops.py``, flat
blocks, what the CUDA kernel computes; on AVX512 CPUs bnb 0.50 dispatches dequantization to a
native per-row kernel that disagrees with its own quantization when a row is not a multiple of
the block size, so that kernel is not the reference):

* 4-bit quantization: ``backends/default/ops.py`` ``quantize_4bit`` (pure torch; bnb
  registers no CPU-specific kernel for it). The flattened weight, in float32, is cut into
  blocks of ``bs``; ``absmax`` = max |w| of the block; full blocks are scaled by
  ``w * (1.0 / absmax.clamp(min=1e-38))``, a ragged last block (numel not divisible by
  ``bs``) by ``w / am`` with ``am = max|w|.clamp(min=1e-38)`` -- and that clamped ``am`` is
  what bnb stores as the tail's absmax. Scaled values are clamped to [-1, 1].
* Codebook: bnb's NF4 table (``NF4_CODE``, sorted, index = 4-bit code).
* Rounding / tie rule: the code is ``torch.bucketize(s, midpoints, right=False)`` with
  float32 midpoints ``(c[i] + c[i+1]) / 2``: nearest entry, and a value exactly on a
  midpoint takes the LOWER code index (toward -1).
* Double quantization (``compress_statistics=True``): ``offset = absmax.mean()``; the
  float32 ``absmax - offset`` is quantized with ``quantize_blockwise(blocksize=256)`` and
  ``create_dynamic_map(signed=True)``, which on CPU runs the native
  ``cquantize_blockwise_cpu_fp32``. That kernel is NOT an exact nearest-code search: it
  maps ``v = clamp(x * (1/absmax2), -1, 1)`` onto a 65536-point grid,
  ``g = trunc(fma((v + 1) * 0.5, 65535, 0.5))`` (the fma is in the compiled code), and picks
  the code nearest to grid point ``-1 + 2g/65535`` (ties to the lower index); a block whose
  absmax2 is 0 gets code 0. Dequantization is ``code[q] * absmax2 + offset`` (float32).
* Dequantization: ``cdequantize_blockwise_cpu_nf4_*`` (or the torch fallback for an odd
  last dimension): ``(NF4_CODE[q] * absmax[block]).to(dtype)`` -- one float32 multiply,
  then round-to-nearest-even into float16 / bfloat16.

Not mirrored: other bnb backends (CUDA, XPU, MPS), whose double-quant 8-bit search is an
exact nearest-code search, so their absmax (hence weights) can differ from this path; and
bnb's shape quirks (an even-length 1-D weight dequantizes to ``(1, n)``): results here
always have the weight's shape. All computation is on CPU; results are CPU tensors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .spec import NF4Base
from .tensor_io import all_finite, one_thread

logger = logging.getLogger(__name__)

#: bitsandbytes' NF4 codebook (``get_4bit_type("nf4")``), float32 values, sorted.
NF4_CODE: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DQ_BLOCKSIZE = 256  # bnb quantize_4bit's blocksize for the nested absmax quantization
_LUT_STEPS = 65535  # kLUTSize - 1 of bnb's CPU 8-bit quantizer


@dataclass(frozen=True)
class NF4Weight:
    """A quantized weight: one uint8 code (0..15) per element, unpacked, in ``shape``.

    ``absmax`` is float32, one per block of the flattened weight (the last block may be
    shorter); with double quantization it already holds the dequantized value, i.e. the
    exact scale that ``dequantize_4bit`` multiplies by.
    """

    codes: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    spec: NF4Base


def nf4_codebook() -> torch.Tensor:
    """The 16 NF4 values as a fresh float32 tensor (index = code)."""
    return torch.tensor(NF4_CODE, dtype=torch.float32)


def dynamic_map_signed() -> torch.Tensor:
    """Mirror of bnb ``create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)``."""
    max_exp, non_sign_bits = 7, 7
    data: list[float] = []
    for i in range(max_exp):
        items = int(2 ** (i + non_sign_bits - max_exp) + 1)
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-(max_exp - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exp - 1) + i)) * means).tolist()
    # additional_items = 2**(7-7) - 1 = 0: no extra linear region for these parameters
    data.append(0)
    data.append(1.0)
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def _check_weight(weight: torch.Tensor) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"NF4 weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"NF4 supports float32/float16/bfloat16 weights, got {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError("NF4 cannot quantize an empty weight")
    if not all_finite(weight):
        bad = int((~torch.isfinite(weight)).sum())
        raise ValueError(f"NF4 weight of shape {tuple(weight.shape)} has {bad} non-finite value(s)")


def _quantize_blockwise8_cpu(x: torch.Tensor, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bnb ``cquantize_blockwise_cpu_fp32`` (blocksize 256): codes [blocks, 256], absmax."""
    n = x.numel()
    nb = -(n // -DQ_BLOCKSIZE)
    xb = torch.nn.functional.pad(x, (0, nb * DQ_BLOCKSIZE - n)).view(nb, DQ_BLOCKSIZE)
    am2 = xb.abs().amax(dim=1)  # zero padding never changes a max of |.|
    zero = am2 == 0
    inv = torch.ones_like(am2) / torch.where(zero, torch.ones_like(am2), am2)
    v = torch.clamp(xb * inv.view(-1, 1), -1.0, 1.0)
    t = (v + 1.0) * 0.5
    # fma(t, 65535, 0.5) rounded once to float32: t has >= 2**-25 resolution, so the
    # float64 product-plus-half is exact and .float() is the single rounding.
    grid = (t.double() * _LUT_STEPS + 0.5).float().to(torch.int64)
    grid_val = (grid * 2).float() / torch.full(grid.shape, float(_LUT_STEPS)) - 1.0
    mids = (code[:-1] + code[1:]) * 0.5
    q = torch.bucketize(grid_val, mids, right=False)
    return torch.where(zero.view(-1, 1), torch.zeros_like(q), q), am2


def _double_quant_roundtrip(absmax: torch.Tensor) -> torch.Tensor:
    """bnb CPU: quantize_blockwise(absmax - mean, 256, dynamic map), dequantize, + mean."""
    code = dynamic_map_signed()
    offset = absmax.mean()
    q, am2 = _quantize_blockwise8_cpu(absmax - offset, code)
    return (code[q] * am2.view(-1, 1)).reshape(-1)[: absmax.numel()] + offset


def nf4_quantize(weight: torch.Tensor, spec: NF4Base) -> NF4Weight:
    """Quantize ``weight`` exactly as bnb ``quantize_4bit(..., quant_type="nf4")`` on CPU."""
    _check_weight(weight)
    bs = spec.blocksize
    flat = weight.detach().to("cpu").reshape(-1).float()
    n = flat.numel()
    rem = n % bs
    full = n - rem
    com = flat[:full].reshape(full // bs, bs)
    absmax = com.abs().max(dim=-1)[0]
    scaled = torch.clamp(com * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        # ragged tail: bnb divides (not multiplies) and stores the clamped absmax
        am = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / am, -1, 1)])
    code = nf4_codebook()
    mids = (code[:-1] + code[1:]) / 2
    codes = torch.bucketize(scaled, mids, right=False).to(torch.uint8).reshape(weight.shape)
    if spec.double_quant:
        absmax = _double_quant_roundtrip(absmax)
        if not bool(torch.isfinite(absmax).all()):  # bnb would silently yield NaN here
            raise ValueError(f"NF4 double quantization overflowed float32 for weight of shape {tuple(weight.shape)}")
    logger.debug("nf4_quantize: shape=%s dtype=%s blocks=%d ragged_tail=%d double_quant=%s",
                 tuple(weight.shape), weight.dtype, absmax.numel(), rem, spec.double_quant)
    return NF4Weight(codes=codes, absmax=absmax, shape=weight.shape, dtype=weight.dtype, spec=spec)


def nf4_dequantize(q: NF4Weight) -> torch.Tensor:
    """``dequantize_4bit``: ``(NF4_CODE[code] * absmax[block]).to(dtype)``, CPU tensor."""
    bs = q.spec.blocksize
    n = q.codes.numel()
    if q.absmax.numel() != -(n // -bs):
        raise ValueError(f"NF4Weight has {q.absmax.numel()} absmax values for {n} elements / block {bs}")
    vals = nf4_codebook()[q.codes.reshape(-1).long()]
    scale = q.absmax.float().repeat_interleave(bs)[:n]
    return (vals * scale).to(q.dtype).reshape(q.shape)


def nf4_roundtrip(weight: torch.Tensor, spec: NF4Base) -> torch.Tensor:
    """``dequant(NF4(weight))``: the weights Q-BLoRA trained against (on weight's device).

    Bit for bit ``nf4_dequantize(nf4_quantize(weight, spec))``, computed a few thousand blocks
    at a time (the same float32 operations per element; only the per-block absmax, and its
    double quantization, are whole-tensor), so the working set stays small.
    """
    _check_weight(weight)
    with one_thread():
        return _nf4_roundtrip_chunked(weight, spec)


def _nf4_roundtrip_chunked(weight: torch.Tensor, spec: NF4Base) -> torch.Tensor:
    bs = spec.blocksize
    flat = weight.detach().to("cpu").reshape(-1)
    n = flat.numel()
    full = n - n % bs
    step = max(1, _CHUNK_BLOCKS) * bs
    absmax = torch.empty(-(n // -bs), dtype=torch.float32)
    for s in range(0, full, step):
        e = min(s + step, full)
        absmax[s // bs: e // bs] = flat[s:e].float().view(-1, bs).abs().amax(dim=-1)
    if full < n:  # ragged tail: bnb stores the clamped absmax
        absmax[-1] = flat[full:].float().abs().max().clamp(min=1e-38)
    scale = _double_quant_roundtrip(absmax) if spec.double_quant else absmax
    if spec.double_quant and not bool(torch.isfinite(scale).all()):
        raise ValueError(f"NF4 double quantization overflowed float32 for weight of shape {tuple(weight.shape)}")
    code = nf4_codebook()
    mids = (code[:-1] + code[1:]) / 2
    out = torch.empty(n, dtype=weight.dtype)
    for s in range(0, full, step):
        e = min(s + step, full)
        b0, b1 = s // bs, e // bs
        com = flat[s:e].float().view(-1, bs)
        scaled = torch.clamp(com * (1.0 / absmax[b0:b1].clamp(min=1e-38).view(-1, 1)), -1, 1)
        vals = code[_bucketize(scaled, mids)]
        out[s:e] = (vals * scale[b0:b1].view(-1, 1)).view(-1)
    if full < n:
        tail = torch.clamp(flat[full:].float() / absmax[-1], -1, 1)
        out[full:] = code[_bucketize(tail, mids)] * scale[-1]
    return out.reshape(weight.shape).to(weight.device)


_CHUNK_BLOCKS = 2048  # blocks per pass of nf4_roundtrip


def _bucketize(x: torch.Tensor, mids: torch.Tensor) -> torch.Tensor:
    """``torch.bucketize(x, mids, right=False)`` for the 15 sorted NF4 midpoints: the number of
    midpoints strictly below each value (a value on a midpoint takes the lower code). Fifteen
    vectorized comparisons are several times faster than bucketize's per-element search."""
    idx = torch.zeros(x.shape, dtype=torch.uint8)
    for m in mids.tolist():
        idx += x > m
    return idx.long()
