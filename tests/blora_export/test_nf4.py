"""NF4 quantization: bit-for-bit agreement with bitsandbytes (CPU) plus bnb-free checks."""

from __future__ import annotations

import math

import pytest
import torch

from blora_export.errors import BadInputError
from blora_export.nf4 import (
    DQ_BLOCKSIZE,
    NF4_CODE,
    NF4Weight,
    _quantize_blockwise8_cpu,
    dynamic_map_signed,
    nf4_codebook,
    nf4_dequantize,
    nf4_quantize,
    nf4_roundtrip,
)
from blora_export.spec import NF4Base

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MAX_HALF_GAP = max(b - a for a, b in zip(NF4_CODE, NF4_CODE[1:])) / 2


def _weight(shape, dtype, seed=0):
    """Gaussian weight with outliers and (where there is room) an all-zero aligned block."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    flat = w.view(-1)
    flat[::97] *= 40.0  # outliers
    if flat.numel() >= 192:
        flat[64:128] = 0.0  # a whole zero block for blocksize 32/64
    return w.to(dtype)


# --------------------------------------------------------------------------- bnb-free


def test_codebook_matches_normal_quantiles():
    """NF4_CODE is bnb's create_normal_map(offset=0.9677083, use_extra_value=True)."""
    code = nf4_codebook()
    assert code.dtype == torch.float32 and code.numel() == 16
    assert torch.all(code[1:] > code[:-1])
    assert code[0].item() == -1.0 and code[7].item() == 0.0 and code[15].item() == 1.0
    assert all(float(torch.tensor(c, dtype=torch.float32)) == c for c in NF4_CODE)
    offset = 0.9677083
    ndtri = torch.special.ndtri
    pos = ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    ref = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    ref = ref / ref.abs().max()
    assert torch.allclose(code.double(), ref, atol=1e-6, rtol=0)


def test_dynamic_map_shape():
    code = dynamic_map_signed()
    assert code.numel() == 256 and code.dtype == torch.float32
    assert torch.all(code[1:] > code[:-1])
    assert code[-1].item() == 1.0 and (code == 0).sum() == 1
    assert code[0].item() == pytest.approx(-0.99296875, abs=1e-7)


def test_hand_computed_block():
    # absmax 2.0 -> scaled values are w / 2 exactly (1.0 / 2.0 = 0.5 is exact)
    w = torch.zeros(64)
    w[:6] = torch.tensor([2.0, -2.0, 1.0, 0.6, -0.4, 0.1])
    # 1.0/2=0.5   -> nearest 0.4407 (d=.059) vs 0.5626 (d=.063): code 12
    # 0.6/2=0.3   -> 0.3379 (d=.038) vs 0.2461 (d=.054): code 11
    # -0.4/2=-0.2 -> -0.1848 (d=.015): code 5;  0.1/2=0.05 -> 0.0796 (d=.030) vs 0 (d=.05): 8
    q = nf4_quantize(w, NF4Base(blocksize=64, double_quant=False))
    assert q.codes[:6].tolist() == [15, 0, 12, 11, 5, 8]
    assert torch.all(q.codes[6:] == 7)
    assert q.absmax.tolist() == [2.0]
    d = nf4_dequantize(q)
    expected = torch.tensor([NF4_CODE[c] for c in q.codes.tolist()]) * 2.0
    assert torch.equal(d, expected)


@pytest.mark.parametrize("lower", [0, 6, 7, 14])
def test_tie_goes_to_lower_code(lower):
    code = nf4_codebook()
    mid = (code[lower] + code[lower + 1]) / 2  # float32 midpoint, as bnb computes it
    above = torch.nextafter(mid, torch.tensor(2.0))
    w = torch.zeros(64)
    w[0], w[1], w[2] = mid, above, 1.0  # absmax 1.0: scaling is exact
    q = nf4_quantize(w, NF4Base(64, double_quant=False))
    assert q.codes[:3].tolist() == [lower, lower + 1, 15]


# (value, block absmax, code via w * (1/absmax) as bnb does, code via w / absmax)
RECIPROCAL_CASES = [
    (-0.9850819110870361, 2.900034189224243, 4, 3),
    (-0.1355794221162796, 0.9830883741378784, 6, 5),
    (0.12914219498634338, 3.245581865310669, 7, 8),
    (0.2235167771577835, 0.7654322981834412, 11, 10),
]


def _reciprocal_blocks() -> torch.Tensor:
    w = torch.zeros(len(RECIPROCAL_CASES), 64)
    for i, (x, a, _, _) in enumerate(RECIPROCAL_CASES):
        w[i, 0], w[i, 1] = a, x
    return w


def test_full_blocks_scale_by_reciprocal():
    """bnb scales full blocks by w * (1/absmax), which rounds differently from w / absmax."""
    q = nf4_quantize(_reciprocal_blocks(), NF4Base(64, double_quant=False))
    assert q.codes[:, 1].tolist() == [c for _, _, c, _ in RECIPROCAL_CASES]


@pytest.mark.parametrize("dtype", DTYPES)
def test_error_bound_without_double_quant(dtype):
    w = _weight((96, 80), dtype, seed=3)
    q = nf4_quantize(w, NF4Base(64, double_quant=False))
    d = nf4_dequantize(q)
    err = (w.float() - d.float()).abs().view(-1)
    scale = q.absmax.repeat_interleave(64)[: w.numel()]
    out_ulp = 2.0 ** -8 if dtype != torch.float32 else 1e-6  # final rounding into dtype
    assert torch.all(err <= MAX_HALF_GAP * scale * (1 + 1e-6) + out_ulp * d.float().abs().view(-1))


def test_error_bound_with_double_quant():
    w = _weight((300, 64), torch.float32, seed=4)  # 300 blocks -> 2 double-quant blocks
    plain = nf4_quantize(w, NF4Base(64, double_quant=False)).absmax
    q = nf4_quantize(w, NF4Base(64, double_quant=True))
    assert q.absmax.shape == plain.shape
    dq_err = (plain - q.absmax).abs()
    assert torch.all(dq_err <= 0.01 * plain.abs().max())  # 8-bit dynamic code is fine-grained
    err = (w - nf4_dequantize(q)).abs().view(-1)
    bound = MAX_HALF_GAP * q.absmax + dq_err
    assert torch.all(err <= bound.repeat_interleave(64) * (1 + 1e-5) + 1e-7)


@pytest.mark.parametrize("dq", [False, True])
def test_deterministic_and_layout_independent(dq):
    w = _weight((128, 96), torch.bfloat16, seed=5)
    spec = NF4Base(64, dq)
    a, b = nf4_quantize(w, spec), nf4_quantize(w.clone(), spec)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.absmax, b.absmax)
    assert torch.equal(nf4_roundtrip(w, spec), nf4_roundtrip(w, spec))
    wt = w.t().contiguous().t()  # same values, non-contiguous layout
    assert torch.equal(nf4_roundtrip(wt, spec), nf4_roundtrip(w, spec))


@pytest.mark.parametrize("dtype", DTYPES)
def test_types_and_shapes(dtype):
    w = _weight((5, 3, 40), dtype)
    q = nf4_quantize(w, NF4Base())
    assert isinstance(q, NF4Weight)
    assert q.codes.dtype == torch.uint8 and q.codes.shape == w.shape and int(q.codes.max()) <= 15
    assert q.absmax.dtype == torch.float32 and q.absmax.numel() == math.ceil(600 / 64)
    assert q.shape == w.shape and q.dtype == dtype
    d = nf4_roundtrip(w, NF4Base())
    assert d.dtype == dtype and d.shape == w.shape


def test_zero_blocks_and_ragged_tail():
    w = torch.randn(3, 50)  # 150 = 2 full blocks + a 22-element tail
    w.view(-1)[:64] = 0.0
    w.view(-1)[128:] = 0.0
    q = nf4_quantize(w, NF4Base(64, double_quant=False))
    assert q.absmax.numel() == 3
    assert q.absmax[0].item() == 0.0  # a full zero block keeps absmax 0 ...
    assert q.absmax[2].item() == torch.tensor(1e-38).item()  # ... the tail stores bnb's clamp
    d = nf4_dequantize(q).view(-1)
    assert torch.all(d[:64] == 0) and torch.all(d[128:] == 0)
    assert torch.all(q.codes.view(-1)[:64] == 7)


@pytest.mark.parametrize(
    "bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"]
)
def test_rejects_non_finite(bad):
    w = torch.randn(4, 64)
    w[2, 7] = bad
    with pytest.raises(ValueError, match="non-finite") as exc:
        nf4_quantize(w, NF4Base())
    assert "\n" not in str(exc.value)


def test_rejects_bad_inputs():
    with pytest.raises(ValueError):
        nf4_quantize(torch.ones(64, dtype=torch.int32), NF4Base())
    with pytest.raises(ValueError):
        nf4_quantize(torch.ones(0), NF4Base())
    with pytest.raises(BadInputError):
        NF4Base(blocksize=48)
    with pytest.raises(TypeError):
        nf4_quantize([1.0, 2.0], NF4Base())  # type: ignore[arg-type]


# --------------------------------------------------------------------------- bitsandbytes


@pytest.fixture
def bnbF():
    pytest.importorskip("bitsandbytes", exc_type=ImportError)  # also a broken install
    import bitsandbytes.functional as F
    from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib

    if isinstance(lib, ErrorHandlerMockBNBNativeLibrary):
        pytest.skip("bitsandbytes native CPU library not loaded: not the mirrored code path")
    return F


def _bnb(F, w, blocksize, dq):
    qp, st = F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=dq)
    deq = _bnb_dequantize(F, qp, st)
    p = qp.reshape(-1)
    codes = torch.stack([p >> 4, p & 15], dim=1).reshape(-1)[: w.numel()].reshape(w.shape)
    absmax = st.absmax
    if dq:
        absmax = F.dequantize_blockwise(st.absmax, st.state2) + st.offset
    return codes, absmax, deq


def _bnb_dequantize(F, qp, st):
    """bitsandbytes' own reference dequantization (its device-independent implementation: blocks of
    ``blocksize`` over the flattened weight, what its CUDA kernel computes).

    Not ``F.dequantize_4bit`` on CPU: on AVX512 machines bitsandbytes 0.50 dispatches it to a native
    kernel that reads blocks per row, which disagrees with its own ``quantize_4bit`` whenever a row is
    not a multiple of the block size (measured here: (7, 96) / 64 and (96, 160) / 128 differ in most
    elements, by whole code steps). bnb wraps the reference in torch.compile; eager computes the same
    values (one float32 multiply, one cast) without minutes of compilation.
    """
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = st.absmax
    if st.nested:
        absmax = F.dequantize_blockwise(st.absmax, st.state2) + st.offset
    with torch._dynamo.config.patch(disable=True):
        return _dequantize_4bit_compute(qp.reshape(-1).view(torch.uint8), absmax.float(), st.code, st.blocksize,
                                        st.shape, st.dtype)


def _assert_same_as_bnb(F, w, blocksize, dq):
    codes, absmax, deq = _bnb(F, w, blocksize, dq)
    q = nf4_quantize(w, NF4Base(blocksize, dq))
    mine = nf4_dequantize(q)
    assert torch.equal(q.codes, codes)
    assert torch.equal(q.absmax, absmax)
    assert mine.dtype == deq.dtype == w.dtype
    # bnb returns an even-length 1-D weight as (1, n); values are compared flat
    assert torch.equal(mine.reshape(-1), deq.reshape(-1))
    assert torch.equal(nf4_roundtrip(w, NF4Base(blocksize, dq)), mine)


def test_tables_match_bnb(bnbF):
    assert torch.equal(nf4_codebook(), bnbF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_map_signed(), bnbF.create_dynamic_map(signed=True))


SHAPES = [(64, 128), (7, 96), (300, 64), (1, 64), (3, 50), (513, 384), (1000, 37)]


@pytest.mark.parametrize("dq", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bit_identical_to_bnb(bnbF, shape, dtype, dq):
    _assert_same_as_bnb(bnbF, _weight(shape, dtype, seed=sum(shape)), 64, dq)


@pytest.mark.parametrize("blocksize", [32, 128, 256, 4096])
@pytest.mark.parametrize("dq", [False, True], ids=["plain", "dq"])
def test_bit_identical_to_bnb_blocksizes(bnbF, blocksize, dq):
    _assert_same_as_bnb(bnbF, _weight((96, 160), torch.bfloat16, seed=blocksize), blocksize, dq)


@pytest.mark.parametrize("dq", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bit_identical_to_bnb_edge_values(bnbF, dtype, dq):
    code = nf4_codebook()
    mids = (code[:-1] + code[1:]) / 2
    up, down = torch.full((15,), 2.0), torch.full((15,), -2.0)
    ties = torch.zeros(64)
    ties[:61] = torch.cat([mids, torch.nextafter(mids, up), torch.nextafter(mids, down), code])
    ties[63] = 1.0
    big = 6.0e4 if dtype == torch.float16 else 1.0e30
    g = torch.Generator().manual_seed(7)
    parts = [
        ties,
        torch.randn(64, generator=g) * 1e-39,  # subnormal block (absmax clamp 1e-38 region)
        torch.randn(64, generator=g) * 1e-36,
        (torch.rand(64, generator=g) * 2 - 1) * big,  # huge block: dq absmax may overshoot
        torch.zeros(64),
        torch.randn(64, generator=g),
        _reciprocal_blocks().view(-1).to(dtype).float(),
        torch.zeros(30),  # ragged all-zero tail
    ]
    _assert_same_as_bnb(bnbF, torch.cat(parts).to(dtype), 64, dq)


def test_double_quant_kernel_matches_bnb(bnbF):
    """The 8-bit absmax quantizer, on values straddling its 65536-point grid and code midpoints."""
    code = dynamic_map_signed()
    k = torch.arange(1, 65536, dtype=torch.float64)
    v = (2 * (k - 0.5) / 65535 - 1).float()
    mids = (code[:-1] + code[1:]) * 0.5
    vals = torch.cat([v, torch.nextafter(v, torch.full_like(v, 2.0)), mids, code]).clamp(-1, 1)
    nb = -(vals.numel() // -(DQ_BLOCKSIZE - 1))
    vals = torch.cat([vals, torch.zeros(nb * (DQ_BLOCKSIZE - 1) - vals.numel())])
    x = torch.cat([vals.view(nb, -1), torch.ones(nb, 1)], dim=1).view(-1)  # absmax 1 per block
    g = torch.Generator().manual_seed(11)
    r = torch.rand(100_003, generator=g) * 0.02 + 0.01
    for inp in (x, r - r.mean(), torch.zeros(300)):
        qb, st = bnbF.quantize_blockwise(inp, blocksize=DQ_BLOCKSIZE)
        q, am2 = _quantize_blockwise8_cpu(inp, code)
        assert torch.equal(q.reshape(-1)[: inp.numel()].to(torch.uint8), qb)
        assert torch.equal(am2, st.absmax)
