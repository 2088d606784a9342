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

from dataclasses import dataclass, replace

import torch

from .delta import AdapterModule, adapter_matrix
from .errors import BadInputError, UnsupportedError
from .fold import fold_problems, foldable_hint
from .numerics import round_to
from .spec import MinMaxGrid


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
        """``alpha * q + beta`` in float32 (then cast to ``dtype``)."""
        a = expand_blocks(self.alpha.float(), self.grid)
        b = expand_blocks(self.beta.float(), self.grid)
        return (a * self.codes.float() + b).to(dtype)


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


def _blocks(w: torch.Tensor, grid: MinMaxGrid) -> torch.Tensor:
    """View ``[out, in]`` as ``[out/bo, in/bi, bo*bi]`` (one row per block)."""
    out_f, in_f = w.shape
    bo, bi = grid.block_out, grid.block_in
    return (w.reshape(out_f // bo, bo, in_f // bi, bi).permute(0, 2, 1, 3)
            .reshape(out_f // bo, in_f // bi, bo * bi))


def quantize_minmax(weight: torch.Tensor, grid: MinMaxGrid, name: str = "weight") -> QuantizedWeight:
    """Quantize ``weight`` ``[out, in]`` with the min-max rule on ``grid`` (see module docstring)."""
    if not isinstance(grid, MinMaxGrid):
        raise UnsupportedError(f"{name}: this needs a checkpoint on a min-max grid (blora_config.json base_quant "
                               f"scheme 'minmax'), not {grid!r}: is the artifact from another checkpoint?")
    if weight.ndim != 2:
        raise BadInputError(f"{name}: expected a 2-D weight, got shape {tuple(weight.shape)}")
    check_grid_fits(tuple(weight.shape), grid, name)
    w = weight.to(torch.float32)
    if not torch.isfinite(w).all():
        raise BadInputError(f"{name}: contains NaN or infinite values")
    blocks = _blocks(w, grid)
    lo, hi = blocks.amin(dim=-1), blocks.amax(dim=-1)
    pdt = grid.torch_dtype
    alpha = ((hi - lo) / grid.levels).to(pdt)
    beta = lo.to(pdt)
    if not (torch.isfinite(alpha).all() and torch.isfinite(beta).all()):
        raise UnsupportedError(f"{name}: block range overflows {grid.param_dtype}; use param_dtype float32")
    a32 = expand_blocks(alpha.float(), grid)
    b32 = expand_blocks(beta.float(), grid)
    safe = torch.where(a32 == 0, torch.ones_like(a32), a32)
    q = torch.floor((w - b32) / safe + 0.5).clamp_(0, grid.levels)
    q = torch.where(a32 == 0, torch.zeros_like(q), q)
    return QuantizedWeight(codes=q.to(torch.uint8), alpha=alpha, beta=beta, grid=grid)


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
    alpha = torch.repeat_interleave(torch.repeat_interleave(qw.alpha, grid.block_out, 0), per, 1)
    beta = torch.repeat_interleave(torch.repeat_interleave(qw.beta, grid.block_out, 0), per, 1)
    return alpha, beta
