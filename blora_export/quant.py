"""Block min-max quantization (paper Eq. 1) and the QA-BLoRA zero-point fold.

One block-size convention for the whole project: a block is ``block_out`` consecutive
output rows x ``block_in`` consecutive input columns of a ``[out, in]`` weight, blocks
starting at 0. ``alpha`` and ``beta`` have shape ``[out/block_out, in/block_in]``.
Dequantized: ``w = alpha * q + beta`` (computed in float32).

The min-max rule, used by training, export and verification alike::

    alpha = param_dtype((max - min) / (2^N - 1)),  beta = param_dtype(min)
    q = clamp(floor((w - beta) / alpha + 0.5), 0, 2^N - 1)     (float32; alpha == 0 -> q = 0)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .delta import AdapterModule, adapter_matrix
from .errors import BadInputError, UnsupportedError
from .fold import fold_problems, foldable_hint
from .numerics import round_to
from .spec import MinMaxGrid
from .tensor_io import all_finite, one_thread


@dataclass(frozen=True)
class QuantizedWeight:
    """A block-quantized weight ``(codes, alpha, beta)`` on a :class:`MinMaxGrid`."""

    codes: torch.Tensor  # uint8 [out, in], values 0 .. 2^bits - 1
    alpha: torch.Tensor  # param dtype [out/bo, in/bi]
    beta: torch.Tensor   # param dtype [out/bo, in/bi]
    grid: MinMaxGrid

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``alpha * q + beta`` in float32 (then cast to ``dtype``).

        Computed a few block rows at a time with α and β broadcast over their blocks: the same
        two float32 operations per element (multiply, then add) as on expanded tensors.
        """
        out = torch.empty(self.shape, dtype=torch.float32)
        a32, b32 = self.alpha.float(), self.beta.float()
        with one_thread():
            for r0, r1 in row_chunks(self.shape, self.grid.block_out):
                p0, p1 = r0 // self.grid.block_out, r1 // self.grid.block_out
                blk = block_view(self.codes[r0:r1], self.grid).float()
                blk.mul_(per_block(a32[p0:p1])).add_(per_block(b32[p0:p1]))
                out[r0:r1] = blk.view(r1 - r0, -1)
        return out if dtype == torch.float32 else out.to(dtype)


CHUNK_ELEMENTS = 1 << 18  # elements per pass: the working set of one chunk stays in cache


def row_chunks(shape: tuple[int, ...], multiple: int = 1, elements: int = CHUNK_ELEMENTS):
    """``(start, stop)`` row ranges of about ``elements`` elements, starts a multiple of ``multiple``."""
    rows, cols = shape[0], max(1, shape[-1])
    step = max(multiple, (elements // cols) // multiple * multiple)
    for r0 in range(0, rows, step):
        yield r0, min(r0 + step, rows)


def block_view(w: torch.Tensor, grid: MinMaxGrid) -> torch.Tensor:
    """``[rows, in]`` (rows a multiple of ``block_out``) as ``[rows/bo, bo, in/bi, bi]`` (a view if contiguous)."""
    rows, cols = w.shape
    return w.reshape(rows // grid.block_out, grid.block_out, cols // grid.block_in, grid.block_in)


def per_block(p: torch.Tensor) -> torch.Tensor:
    """A ``[rows/bo, in/bi]`` tensor shaped to broadcast over :func:`block_view`."""
    return p[:, None, :, None]


def expand_blocks(per_block: torch.Tensor, grid: MinMaxGrid) -> torch.Tensor:
    """Broadcast a ``[out/bo, in/bi]`` tensor to ``[out, in]`` (each value over its block)."""
    out = torch.repeat_interleave(per_block, grid.block_out, dim=0)
    return torch.repeat_interleave(out, grid.block_in, dim=1)


def check_grid_fits(shape: tuple[int, int], grid: MinMaxGrid, name: str = "weight") -> None:
    out_f, in_f = shape
    if out_f % grid.block_out or in_f % grid.block_in:
        raise UnsupportedError(
            f"{name} [{out_f}, {in_f}] does not split into {grid.block_out}x{grid.block_in} blocks; "
            f"use a block size that divides both dimensions")


def quantize_minmax(weight: torch.Tensor, grid: MinMaxGrid, name: str = "weight") -> QuantizedWeight:
    """Quantize ``weight`` ``[out, in]`` with the min-max rule on ``grid`` (see module docstring)."""
    if not isinstance(grid, MinMaxGrid):
        raise UnsupportedError(f"{name}: this needs a checkpoint on a min-max grid (blora_config.json base_quant "
                               f"scheme 'minmax'), not {grid!r}: is the artifact from another checkpoint?")
    if weight.ndim != 2:
        raise BadInputError(f"{name}: expected a 2-D weight, got shape {tuple(weight.shape)}")
    check_grid_fits(tuple(weight.shape), grid, name)
    out_f, in_f = weight.shape
    bo, bi = grid.block_out, grid.block_in
    codes = torch.empty(out_f, in_f, dtype=torch.uint8)
    lo = torch.empty(out_f // bo, in_f // bi, dtype=torch.float32)
    hi = torch.empty_like(lo)
    scratch = _Scratch(weight.shape, bo)
    with one_thread():
        for r0, r1 in row_chunks(tuple(weight.shape), bo):
            p0, p1 = r0 // bo, r1 // bo
            blk = block_view(scratch.take(0, weight[r0:r1]), grid)
            torch.amin(blk, dim=(1, 3), out=lo[p0:p1])
            torch.amax(blk, dim=(1, 3), out=hi[p0:p1])
            _codes_into(codes[r0:r1], blk, lo[p0:p1], hi[p0:p1], grid, scratch)
    # amin/amax propagate NaN, and an infinity makes a block's min or max infinite: checking
    # the per-block extremes checks every element.
    if not (all_finite(lo) and all_finite(hi)):
        raise BadInputError(f"{name}: contains NaN or infinite values")
    alpha, beta = _alpha_beta(lo, hi, grid)
    if not (all_finite(alpha) and all_finite(beta)):
        raise UnsupportedError(f"{name}: block range overflows {grid.param_dtype}; use param_dtype float32")
    return QuantizedWeight(codes=codes, alpha=alpha, beta=beta, grid=grid)


def _alpha_beta(lo: torch.Tensor, hi: torch.Tensor, grid: MinMaxGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """``alpha = param_dtype((max - min) / (2^N - 1))``, ``beta = param_dtype(min)`` (float32 math)."""
    return ((hi - lo) / grid.levels).to(grid.torch_dtype), lo.to(grid.torch_dtype)


class _Scratch:
    """Two float32 buffers of one row chunk, reused across chunks (a fresh allocation per chunk
    costs page faults that take longer than the arithmetic)."""

    def __init__(self, shape: tuple[int, ...], multiple: int):
        rows = max(r1 - r0 for r0, r1 in row_chunks(tuple(shape), multiple))
        self.bufs = [torch.empty(rows * shape[-1], dtype=torch.float32) for _ in range(2)]

    def take(self, i: int, rows: torch.Tensor | None = None, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Buffer ``i`` shaped like ``rows`` (filled with it, as float32) or ``shape``."""
        shape = tuple(rows.shape) if rows is not None else shape
        out = self.bufs[i][: math.prod(shape)].view(shape)
        return out if rows is None else out.copy_(rows)


def _codes_into(dest: torch.Tensor, blk: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, grid: MinMaxGrid,
                scratch: "_Scratch") -> None:
    """The module docstring's rule on whole block rows, written into ``dest`` (uint8).

    Per element: ``(w - β)`` then ``/ α`` (or ``/ 1`` where α == 0) then ``+ 0.5``, floor,
    clamp, all float32 with α and β broadcast over their block: bit for bit the formula on
    expanded tensors.
    """
    alpha, beta = _alpha_beta(lo, hi, grid)
    a32 = alpha.float()
    zero = a32 == 0
    q = scratch.take(1, shape=tuple(blk.shape))
    torch.sub(blk, per_block(beta.float()), out=q)
    q.div_(per_block(torch.where(zero, torch.ones_like(a32), a32))).add_(0.5).floor_().clamp_(0, grid.levels)
    if bool(zero.any()):
        q.masked_fill_(per_block(zero), 0)
    dest.copy_(q.view(dest.shape))


def fold_into_zero_points(qw: QuantizedWeight, module: AdapterModule) -> QuantizedWeight:
    """Fold a QA-BLoRA update into the block offsets: ``β' = β + s·H[o//λo, i//λi]/λi``.

    Codes and ``alpha`` are untouched; ``β'`` is computed in float64 and rounded once to the
    grid's ``param_dtype`` (at most half an ulp of ``β'``). Raises :class:`UnsupportedError`
    when the blocks do not nest in the λ cells.
    """
    if module.method != "qa-blora":
        raise UnsupportedError(f"{module.name}: only QA-BLoRA updates fold into zero-points; "
                               "Q-BLoRA merges into 16-bit weights (or re-quantize with --requantize)")
    grid = qw.grid
    problems = fold_problems(grid, module.lambda_in, module.lambda_out)
    if problems:
        raise UnsupportedError(f"{module.name}: cannot fold exactly ({'; '.join(problems)}); "
                               f"{foldable_hint(module.lambda_in, module.lambda_out)}")
    shift = block_shift(module, grid)
    beta = round_to(qw.beta.double() + shift, grid.torch_dtype)
    return replace(qw, beta=beta)


def trained_beta(qw: QuantizedWeight, module: AdapterModule, folded: bool) -> torch.Tensor:
    """``β'`` per grid block as the checkpoint was trained (float64).

    Branch training: ``β + s·H/λi`` exactly. Fold-aware training (``forward: folded``): that
    value rounded once to the grid's ``param_dtype``, which is what its forward used.
    """
    if folded:
        return fold_into_zero_points(qw, module).beta.to(torch.float64)
    problems = fold_problems(qw.grid, module.lambda_in, module.lambda_out)
    if problems:
        raise UnsupportedError(f"{module.name}: cannot fold exactly ({'; '.join(problems)}); "
                               f"{foldable_hint(module.lambda_in, module.lambda_out)}")
    return qw.beta.to(torch.float64) + block_shift(module, qw.grid)


def block_shift(module: AdapterModule, grid: MinMaxGrid) -> torch.Tensor:
    """``s·H/λi`` sampled at each block's first element, float64, shape ``[out/bo, in/bi]``.

    Only meaningful when the blocks nest in the λ cells (:func:`fold_problems` is empty).
    """
    cell = adapter_matrix(module, torch.float64) * (module.scaling / module.lambda_in)
    rows = torch.arange(0, module.out_features, grid.block_out) // module.lambda_out
    cols = torch.arange(0, module.in_features, grid.block_in) // module.lambda_in
    return cell[rows][:, cols]


def to_row_blocks(qw: QuantizedWeight, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """α and β per 1-D runtime block of ``t`` inputs: shapes ``[out, in/t]``.

    Requires ``t | block_in`` (checked), so each run of ``t`` lies in one grid block.
    """
    grid = qw.grid
    if grid.block_in % t:
        raise UnsupportedError(f"runtime block {t} does not divide the grid's block_in {grid.block_in}")
    per = grid.block_in // t
    return _repeat2(qw.alpha, grid.block_out, per), _repeat2(qw.beta, grid.block_out, per)


def _repeat2(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``repeat_interleave`` over rows then columns (no copy when both are 1)."""
    if rows > 1:
        x = torch.repeat_interleave(x, rows, 0)
    return torch.repeat_interleave(x, cols, 1) if cols > 1 else x
