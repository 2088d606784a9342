"""The adapter math against brute-force definitions, across shapes and λ."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from blora_export.delta import AdapterModule, adapter_forward, delta_weight, lora_factors, pool, rep


def make_module(method, out_f, in_f, li, lo, rank=3, scaling=0.75, seed=0):
    g = torch.Generator().manual_seed(seed)
    if method == "q-blora":
        return AdapterModule("m", method, li, lo, scaling, out_f, in_f,
                             a=torch.randn(rank, in_f // li, generator=g, dtype=torch.float64),
                             b=torch.randn(out_f // lo, rank, generator=g, dtype=torch.float64))
    return AdapterModule("m", method, li, lo, scaling, out_f, in_f,
                         h=torch.randn(out_f // lo, in_f // li, generator=g, dtype=torch.float64))


def brute_force_delta(m):
    mat = (m.b @ m.a) if m.method == "q-blora" else m.h
    out = torch.empty(m.out_features, m.in_features, dtype=torch.float64)
    for o in range(m.out_features):
        for i in range(m.in_features):
            out[o, i] = m.scaling * mat[o // m.lambda_out, i // m.lambda_in] / m.lambda_in
    return out


shapes = st.tuples(st.sampled_from(["q-blora", "qa-blora"]), st.sampled_from([1, 2, 3, 4, 8]),
                   st.sampled_from([1, 2, 4, 8]), st.integers(1, 4), st.integers(1, 4), st.integers(1, 5))


@settings(max_examples=60, deadline=None)
@given(shapes)
def test_delta_weight_matches_definition_and_branch(params):
    method, li, lo, n_in, n_out, rank = params
    m = make_module(method, n_out * lo, n_in * li, li, lo, rank=rank)
    dw = delta_weight(m)
    assert torch.allclose(dw, brute_force_delta(m), rtol=1e-13, atol=1e-15)
    x = torch.randn(5, m.in_features, dtype=torch.float64)
    dense, branch = x @ dw.T, adapter_forward(x, m)
    assert (dense - branch).abs().max() <= 1e-12 * max(1.0, float(dense.abs().max()))


@settings(max_examples=40, deadline=None)
@given(shapes)
def test_lora_factors_are_exact(params):
    method, li, lo, n_in, n_out, rank = params
    m = make_module(method, n_out * lo, n_in * li, li, lo, rank=rank)
    a, b = lora_factors(m, torch.float64)
    assert a.shape[1] == m.in_features and b.shape[0] == m.out_features and a.shape[0] == b.shape[1]
    assert torch.allclose(m.scaling * b @ a, delta_weight(m), rtol=1e-12, atol=1e-14)
    if method == "qa-blora":
        assert a.shape[0] == min(m.h.shape)
    else:
        assert a.shape[0] == rank


def test_pool_is_avgpool1d_and_rep_is_repeat_interleave():
    x = torch.randn(2, 3, 24)
    assert torch.allclose(pool(x, 4), torch.nn.AvgPool1d(4)(x.reshape(-1, 1, 24)).reshape(2, 3, 6))
    y = torch.randn(2, 5)
    assert torch.equal(rep(y, 3), torch.repeat_interleave(y, 3, dim=-1))


def test_paper_merge_without_division_is_caught():
    """The reference merge.py's ΔW (no 1/λi) disagrees with the branch by a factor λi."""
    m = make_module("q-blora", 8, 8, 2, 2)
    wrong = delta_weight(m) * m.lambda_in
    x = torch.randn(3, 8, dtype=torch.float64)
    rel = (x @ wrong.T - adapter_forward(x, m)).abs().max() / adapter_forward(x, m).abs().max()
    assert rel > 0.5
