"""Correct rounding and the half-ulp check."""
import numpy as np
import pytest
import torch

from blora_export.numerics import corrected_double_rounding, half_ulp_ratio, logit_stats, round_to


def test_round_to_float16_two_algorithms_agree_bit_for_bit():
    # round_to takes numpy's direct float64 -> float16 conversion; the float32 path with its
    # double-rounding correction (what bfloat16 uses) must give the same bits, midpoints included
    x = torch.randn(2_000_000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    h = x[:200_000].to(torch.float16)
    up = torch.nextafter(h, torch.full_like(h, float("inf")))
    mid = (h.double() + up.double()) / 2
    x = torch.cat([x, x * 1e-5, x * 3e4, x * 1e-7, mid, mid + 1e-13, mid - 1e-13])
    with np.errstate(over="ignore"):
        expected = corrected_double_rounding(x, torch.float16)
    assert torch.equal(round_to(x, torch.float16).view(torch.int16), expected.view(torch.int16))
    assert not torch.equal(x.to(torch.float16), expected)  # torch's own cast double-rounds


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_round_to_is_within_half_an_ulp_and_ties_go_to_even(dtype):
    x = torch.randn(1_000_000, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert half_ulp_ratio(round_to(x, dtype), x) <= 0.5
    assert half_ulp_ratio(x.to(dtype), x) > 0.5
    one = torch.tensor(1.0, dtype=dtype)
    ulp = float(torch.nextafter(one, torch.tensor(2.0, dtype=dtype))) - 1.0
    ties = torch.tensor([1 + ulp / 2, 1 + 3 * ulp / 2], dtype=torch.float64)
    assert round_to(ties, dtype).tolist() == [1.0, 1 + 2 * ulp]


def test_logit_stats():
    ref = [torch.tensor([[1.0, 2.0, 4.0]])]
    stats = logit_stats(ref, [torch.tensor([[1.0, 2.5, 4.0]])])
    assert stats.max_abs == 0.5 and stats.max_rel == 0.125 and stats.top1_agreement == 1.0 and stats.kl_mean > 0
