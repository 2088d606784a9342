"""The fold planner: can a QA-BLoRA checkpoint ship as its own codes with folded offsets?

One table of the runtimes' low-bit grids (:data:`RUNTIME_GRIDS`) and one planner
(:func:`fold_obstacles`) that every writer (GGUF, ONNX, MLX) and ``train``'s targets ask.

The conditions (docs/MATH.md, "Folding QA-BLoRA into zero-points"): the update is constant on
every grid block iff ``block_in | λi`` and ``block_out | λo``; a runtime storing 1-D blocks of
``t`` inputs takes the grid's codes untouched iff additionally ``t | block_in`` and ``t | λi``.
The codes' bit width must match, and β' is stored in the runtime's offset dtype (rounded once).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

from .enums import Runtime
from .spec import MinMaxGrid

#: 1-D block sizes that some runtime stores (ONNX MatMulNBits, MLX groups, GGUF's 32).
RUNTIME_BLOCK_SIZES = (16, 32, 64, 128)


@dataclass(frozen=True)
class RuntimeGrid:
    """How one runtime stores a low-bit weight: codes of ``bits`` on 1-D blocks of ``block``
    inputs, a scale α and an offset β per block, the offset stored as ``offset_dtype``
    (``None``: a float32 encoding derived from β, exact for any grid dtype)."""

    runtime: Runtime
    label: str  # what the user calls it: "GGUF Q4_1", "MatMulNBits int4 block 32", "MLX 4-bit group 32"
    bits: int
    block: int
    offset_dtype: Optional[str]  # "float16" / "float32" / None (any)
    command: str = ""  # the export that writes it: "to-onnx --precision int4"

    def describe(self) -> str:
        return f"{self.label} ({self.bits}-bit codes, blocks of {self.block} inputs)"


def gguf_grid(bits: int) -> RuntimeGrid:
    """GGUF Q4_1 / Q5_1: ``d·q + m`` on blocks of 32 with fp16 ``d`` and ``m``."""
    return RuntimeGrid(Runtime.LLAMA_CPP, f"GGUF Q{bits}_1", bits, 32, "float16", f"to-gguf --type q{bits}_1")


def onnx_grid(block: int, bits: int = 4) -> RuntimeGrid:
    """onnxruntime ``MatMulNBits`` without zero points (default ``z = 2^(bits−1)``: 8 for int4, 128 for
    int8): ``α·(q−z) + c`` with ``c = β' + z·α`` kept in float32."""
    return RuntimeGrid(Runtime.ONNXRUNTIME, f"MatMulNBits int{bits} block {block}", bits, block, None,
                       f"to-onnx --precision int{bits}")


def mlx_grid(bits: int, group: int, bias_dtype: str = "float16") -> RuntimeGrid:
    """MLX affine: ``scales·q + biases`` on groups of ``group`` inputs."""
    return RuntimeGrid(Runtime.MLX, f"MLX {bits}-bit group {group}", bits, group, bias_dtype,
                       f"to-safetensors --layout mlx --bits {bits}")


#: Code widths of the ONNX ``MatMulNBits`` precisions this tool writes (``--precision int4|int8``).
ONNX_BITS = (4, 8)

#: The named runtime grids ``train --target`` and the writers share.
RUNTIME_GRIDS: dict[str, RuntimeGrid] = {
    "gguf-q4_1": gguf_grid(4),
    "gguf-q5_1": gguf_grid(5),
    **{f"onnx-int{b}-{t}": onnx_grid(t, b) for b in ONNX_BITS for t in RUNTIME_BLOCK_SIZES},
    **{f"mlx-{b}-{g}": mlx_grid(b, g) for b in (2, 3, 4, 5, 6, 8) for g in (32, 64, 128)},
}


def width_hint(bits: int) -> str:
    """The exports that store ``bits``-bit codes with a float offset (where such a grid folds)."""
    commands = list(dict.fromkeys(g.command for g in RUNTIME_GRIDS.values() if g.bits == bits))
    article = "an" if bits == 8 else "a"
    return (f"{article} {bits}-bit grid folds into {', '.join(commands)}" if commands
            else f"no runtime here stores {bits}-bit codes with a float offset")


def fold_problems(grid: MinMaxGrid, lambda_in: int, lambda_out: int) -> list[str]:
    """Why a QA-BLoRA update with these λ cannot fold exactly into ``grid`` (empty if it can).

    Exact iff every block lies inside one λ cell: ``block_in | λi`` and ``block_out | λo``.
    """
    problems = []
    if lambda_in % grid.block_in:
        problems.append(f"block_in {grid.block_in} does not divide lambda_in {lambda_in}")
    if lambda_out % grid.block_out:
        problems.append(f"block_out {grid.block_out} does not divide lambda_out {lambda_out}")
    return problems


def runtime_fold_problems(grid: MinMaxGrid, lambda_in: int, lambda_out: int, t: int) -> list[str]:
    """Why a runtime storing 1-D blocks of ``t`` inputs cannot take this checkpoint's own codes.

    Exact iff ``t | block_in`` (a grid block splits into runs of ``t`` sharing α, β) and
    ``t | λi`` (the folded shift is constant on each run), plus the grid's own fold condition.
    """
    return fold_problems(grid, lambda_in, lambda_out) + runtime_block_problems(grid, t) + _cell_problems(lambda_in, t)


def runtime_block_problems(grid: MinMaxGrid, t: int) -> list[str]:
    """Why runtime blocks of ``t`` inputs cannot carry the grid's codes and α untouched (``t | block_in``)."""
    return [f"runtime block {t} does not divide the grid's block_in {grid.block_in}"] if grid.block_in % t else []


def _cell_problems(lambda_in: int, t: int) -> list[str]:
    """Why the folded shift is not constant on runtime blocks of ``t`` inputs (``t | λi``)."""
    return [f"runtime block {t} does not divide lambda_in {lambda_in}"] if lambda_in % t else []


def foldable_hint(lambda_in: int, lambda_out: int) -> str:
    """Name the grids and runtime block sizes that would fold these λ exactly."""
    runtime = [t for t in RUNTIME_BLOCK_SIZES if lambda_in % t == 0]
    grids = f"grids with block_in dividing {lambda_in} and block_out dividing {lambda_out}"
    if runtime:
        return f"exact folds exist for {grids} (runtime 1-D blocks of {', '.join(map(str, runtime))})"
    return (f"exact folds exist for {grids}, but no runtime block ({'/'.join(map(str, RUNTIME_BLOCK_SIZES))}) "
            f"divides lambda_in={lambda_in}: export 16-bit, re-quantize with --requantize, or train with "
            f"lambda_in a multiple of 32 (e.g. --target gguf-q4_1)")


def fold_obstacles(method: str, grid: object, merge_into: str, lambdas: Iterable[tuple[int, int]],
                   target: RuntimeGrid, base_only: bool = False) -> list[str]:
    """Why a checkpoint cannot ship as its own codes on ``target`` (empty: it can, exactly).

    ``grid`` is the checkpoint's base quantization (a :class:`MinMaxGrid`, else there are no
    codes to keep), ``merge_into`` the merge plan's target, ``lambdas`` the (λi, λo) of its
    modules. ``base_only``: only the trained base's codes are written (no adapter to fold).
    """
    if not base_only and method != "qa-blora":
        return ["only QA-BLoRA updates fold into block offsets: a Q-BLoRA update is not constant on "
                "quantization blocks, so a low-bit export of it is merge-then-quantize"]
    if not isinstance(grid, MinMaxGrid):
        return ["the checkpoint names no min-max grid (blora_config.json base_quant), so it has no codes to keep"]
    if merge_into != "dequantized":
        return ["--merge-into original asks for the unquantized base weights, which are not on the grid"]
    problems = []
    if grid.bits != target.bits:
        problems.append(f"the grid has {grid.bits}-bit codes, {target.label} stores {target.bits}-bit codes "
                        f"({width_hint(grid.bits)})")
    if target.offset_dtype == "float16" and grid.param_dtype != "float16":
        problems.append(f"the grid stores α/β as {grid.param_dtype}, {target.label} as float16")
    found = set(runtime_block_problems(grid, target.block))
    if not base_only:
        for li, lo in set(lambdas):
            found.update(f"λ={li}x{lo}: {p}" for p in fold_problems(grid, li, lo) + _cell_problems(li, target.block))
    return problems + sorted(found)


def fold_refusal(target: RuntimeGrid, problems: list[str], lambdas: Iterable[tuple[int, int]], alternatives: str) -> str:
    """The one-line refusal every writer gives when a fold is not exact, with what would work."""
    hints = sorted({foldable_hint(li, lo) for li, lo in set(lambdas)})
    return (f"cannot export the checkpoint's own codes as {target.label} ({'; '.join(problems)})"
            f"{'; ' + '; '.join(hints) if hints else ''}; {alternatives}")
