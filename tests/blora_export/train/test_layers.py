"""The adapted layers: QA-BLoRA's fold-aware forward is the exported fold, bit for bit."""
import math

import pytest
import torch
from torch.nn import functional as F

from blora_export.delta import adapter_forward, delta_weight
from blora_export.nf4 import nf4_roundtrip
from blora_export.numerics import half_ulp_ratio
from blora_export.quant import expand_blocks, fold_into_zero_points, quantize_minmax
from blora_export.spec import MinMaxGrid, NF4Base
from blora_export.train.layers import BLoRALinear, BnbNF4Base, DenseBase, MinMaxBase

GRIDS = [  # (grid, λi, λo): GGUF q4_1, an MLX 3-bit group 64 with λo = 1, the paper's 2-D 4x8 blocks
    (MinMaxGrid(4, 1, 32), 32, 4),
    (MinMaxGrid(3, 1, 64), 64, 1),
    (MinMaxGrid(4, 8, 4), 4, 8),
]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def qa_layer(grid, li, lo, fold_aware, out_f=64, in_f=128, scaling=2.0, seed=0):
    w = torch.randn(out_f, in_f, generator=gen(seed)) * 0.05
    qw = quantize_minmax(w, grid)
    layer = BLoRALinear("m", MinMaxBase(qw), "qa-blora", li, lo, scaling, out_f, in_f, fold_aware=fold_aware)
    with torch.no_grad():  # a trained-looking H: shifts of a few α per block
        layer.lora_H.copy_(torch.randn(layer.lora_H.shape, generator=gen(seed + 1)) * 0.02)
    return layer, qw


@pytest.mark.parametrize("grid, li, lo", GRIDS)
def test_fold_aware_weights_are_the_exported_fold_bit_for_bit(grid, li, lo):
    layer, qw = qa_layer(grid, li, lo, fold_aware=True)
    folded = fold_into_zero_points(qw, layer.adapter_module())  # what every low-bit exporter writes
    exported = folded.dequantize()
    assert torch.equal(layer.effective_weight(), exported)
    x = torch.randn(3, 5, 128, generator=gen(7))
    assert torch.equal(layer(x), F.linear(x, exported))
    # ... and it is the exact update up to the fp16 rounding of each shifted β (so the test can fail)
    exact = qw.dequantize().double() + delta_weight(layer.adapter_module())
    assert not torch.equal(exported.double(), exact)
    beta_exact = qw.beta.double() + (exact - qw.dequantize().double()).reshape(
        qw.beta.shape[0], grid.block_out, qw.beta.shape[1], grid.block_in)[:, 0, :, 0]
    assert half_ulp_ratio(folded.beta, beta_exact) <= 0.5 + 1e-6


@pytest.mark.parametrize("grid, li, lo", GRIDS)
def test_fold_aware_gradient_is_straight_through_the_rounding(grid, li, lo):
    layer, qw = qa_layer(grid, li, lo, fold_aware=True)
    x = torch.randn(2, 6, 128, generator=gen(3))
    g = torch.randn(2, 6, 64, generator=gen(4))
    (layer(x) * g).sum().backward()
    # reference: autograd through the unrounded dense weight α·q + β + s·H/λi (float64)
    h = layer.lora_H.detach().double().requires_grad_(True)
    cell = torch.repeat_interleave(torch.repeat_interleave(h * (layer.scaling / li), lo, 0), li, 1)
    w = expand_blocks(qw.alpha.double(), grid) * qw.codes.double() + expand_blocks(qw.beta.double(), grid) + cell
    (F.linear(x.double(), w) * g.double()).sum().backward()
    scale = float(h.grad.abs().max())  # float32 accumulation vs float64: ~1e-6 relative
    torch.testing.assert_close(layer.lora_H.grad.double(), h.grad, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("grid, li, lo", GRIDS[:2])
def test_branch_forward_is_the_core_reference(grid, li, lo):
    layer, qw = qa_layer(grid, li, lo, fold_aware=False)
    x = torch.randn(3, 5, 128, generator=gen(7))
    base = qw.dequantize()
    assert torch.equal(layer(x), F.linear(x, base) + adapter_forward(x, layer.adapter_module()))
    exact = base.double() + delta_weight(layer.adapter_module())
    torch.testing.assert_close(layer.effective_weight().double(), exact, rtol=0, atol=1e-7)


def test_q_blora_starts_as_the_base_with_peft_init():
    w = torch.randn(64, 128, generator=gen(0)) * 0.05
    dense = nf4_roundtrip(w, NF4Base(64, True))
    layer = BLoRALinear("m", DenseBase(dense), "q-blora", 2, 2, 2.0, 64, 128, inner_rank=16, generator=gen(1))
    assert layer.lora_A.shape == (16, 64) and layer.lora_B.shape == (32, 16)
    assert (layer.lora_B == 0).all()
    bound = 1 / math.sqrt(64)
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.9 * bound
    x = torch.randn(4, 128, generator=gen(2))
    assert torch.equal(layer(x), F.linear(x, dense))
    with torch.no_grad():
        layer.lora_B.normal_(generator=gen(3))
    assert torch.equal(layer(x), F.linear(x, dense) + adapter_forward(x, layer.adapter_module()))


@pytest.mark.parametrize("double_quant", [True, False])
def test_bitsandbytes_base_equals_the_core_nf4(double_quant):
    w = torch.randn(96, 128, generator=gen(0)) * 0.05
    bnb_base = BnbNF4Base(w, 64, double_quant)
    core = DenseBase(nf4_roundtrip(w, NF4Base(64, double_quant)))
    assert torch.equal(bnb_base.dense_weight(), core.dense_weight())
    x1 = torch.randn(3, 128, generator=gen(1), requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    y1, y2 = bnb_base(x1), core(x2)
    torch.testing.assert_close(y1, y2, rtol=0, atol=1e-6)
    y1.sum().backward()
    y2.sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=1e-6)
