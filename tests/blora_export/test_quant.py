"""Min-max quantization and the zero-point fold: definitions, bounds and refusals."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from blora_export.delta import AdapterModule, delta_weight
from blora_export.errors import BadInputError, UnsupportedError
from blora_export.fold import runtime_fold_problems
from blora_export.quant import (
    expand_blocks,
    fold_into_zero_points,
    quantize_minmax,
    to_row_blocks,
)
from blora_export.spec import MinMaxGrid


def brute_force_quant(w, grid):
    out_f, in_f = w.shape
    q = torch.zeros(out_f, in_f, dtype=torch.uint8)
    for bo in range(0, out_f, grid.block_out):
        for bi in range(0, in_f, grid.block_in):
            blk = w[bo:bo + grid.block_out, bi:bi + grid.block_in].float()
            a = ((blk.max() - blk.min()) / grid.levels).to(grid.torch_dtype).float()
            b = blk.min().to(grid.torch_dtype).float()
            if a == 0:
                continue
            q[bo:bo + grid.block_out, bi:bi + grid.block_in] = torch.floor((blk - b) / a + 0.5).clamp(0, grid.levels).to(torch.uint8)
    return q


grids = st.tuples(st.sampled_from([2, 3, 4, 5, 8]), st.sampled_from([1, 2, 4]), st.sampled_from([4, 8, 32]),
                  st.sampled_from(["float16", "bfloat16", "float32"]))


@settings(max_examples=40, deadline=None)
@given(grids, st.integers(0, 10_000))
def test_quantize_matches_definition_and_error_bound(g, seed):
    bits, bo, bi, pdt = g
    grid = MinMaxGrid(bits, bo, bi, pdt)
    w = torch.randn(2 * bo * 2, 2 * bi, generator=torch.Generator().manual_seed(seed)) * 0.05
    qw = quantize_minmax(w, grid)
    assert torch.equal(qw.codes, brute_force_quant(w, grid))
    assert int(qw.codes.max()) <= grid.levels
    # each weight within alpha/2 of its dequantized value, plus the rounding of alpha and beta
    alpha = expand_blocks(qw.alpha.float(), grid)
    slack = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 2.0**-22}[pdt]
    bound = alpha / 2 + slack * (w.abs().max() + alpha * grid.levels) * grid.levels
    assert ((qw.dequantize() - w).abs() <= bound + 1e-7).all()


def test_constant_block_has_zero_codes_and_exact_beta():
    w = torch.full((1, 32), 0.125)
    qw = quantize_minmax(w, MinMaxGrid(4, 1, 32))
    assert int(qw.codes.max()) == 0 and torch.equal(qw.dequantize(), w)


def test_bad_inputs_are_rejected():
    with pytest.raises(BadInputError, match="NaN"):
        quantize_minmax(torch.tensor([[float("nan")] * 32]), MinMaxGrid())
    with pytest.raises(UnsupportedError, match="does not split"):
        quantize_minmax(torch.zeros(2, 48), MinMaxGrid(4, 1, 32))


def qa_module(out_f, in_f, li, lo, scale=0.01, seed=1):
    h = torch.randn(out_f // lo, in_f // li, generator=torch.Generator().manual_seed(seed)) * scale
    return AdapterModule("m", "qa-blora", li, lo, 2.0, out_f, in_f, h=h)


@pytest.mark.parametrize("grid,li,lo", [(MinMaxGrid(4, 1, 32), 32, 4), (MinMaxGrid(4, 8, 4), 4, 8),
                                        (MinMaxGrid(5, 1, 32), 64, 1), (MinMaxGrid(4, 1, 32, "float32"), 32, 2)])
def test_fold_equals_merge_up_to_beta_rounding(grid, li, lo):
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)) * 0.05
    m = qa_module(64, 128, li, lo)
    qw = quantize_minmax(w, grid)
    folded = fold_into_zero_points(qw, m)
    assert torch.equal(folded.codes, qw.codes) and torch.equal(folded.alpha, qw.alpha)
    exact = qw.dequantize().double() + delta_weight(m)
    got = folded.dequantize().double()
    # the only loss is rounding β' once to param_dtype: at most half an ulp of β' (plus float32 dequant)
    beta_exact = exact - expand_blocks(qw.alpha.double(), grid) * qw.codes.double()
    half_ulp = {"float16": 2.0**-11, "float32": 2.0**-24}[grid.param_dtype] * beta_exact.abs()
    assert ((got - exact).abs() <= half_ulp + 2.0**-23 * exact.abs() + 1e-12).all()


def test_fold_refuses_blocks_that_straddle_cells_and_names_what_works():
    qw = quantize_minmax(torch.randn(32, 64), MinMaxGrid(4, 1, 32))
    with pytest.raises(UnsupportedError, match="block_in 32 does not divide lambda_in 4.*runtime block"):
        fold_into_zero_points(qw, qa_module(32, 64, 4, 8))


def test_runtime_block_condition():
    grid = MinMaxGrid(4, 1, 32)
    assert runtime_fold_problems(grid, 32, 4, 32) == []
    assert runtime_fold_problems(grid, 32, 4, 16) == []
    assert runtime_fold_problems(grid, 32, 4, 64)  # 64 does not divide 32
    assert runtime_fold_problems(MinMaxGrid(4, 8, 4), 4, 8, 32)


def test_row_blocks_expand_grid_blocks():
    grid = MinMaxGrid(4, 2, 64)
    qw = quantize_minmax(torch.randn(4, 128), grid)
    alpha, beta = to_row_blocks(qw, 32)
    assert alpha.shape == (4, 4)
    assert torch.equal(torch.repeat_interleave(alpha, 32, 1), expand_blocks(qw.alpha, grid))
