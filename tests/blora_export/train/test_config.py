"""The target table and the λ / fold rules of `blora-export train`."""
import pytest

from blora_export.errors import BadInputError, UnsupportedError
from blora_export.fold import fold_problems, runtime_fold_problems
from blora_export.spec import MinMaxGrid, NF4Base
from blora_export.train.config import TrainConfig, parse_target, resolve_spec


@pytest.mark.parametrize("name, grid, li, lo, block", [
    ("gguf-q4_1", MinMaxGrid(4, 1, 32), 32, 4, 32),
    ("gguf-q5_1", MinMaxGrid(5, 1, 32), 32, 4, 32),
    ("onnx-int4-16", MinMaxGrid(4, 1, 16), 16, 4, 16),
    ("onnx-int4-128", MinMaxGrid(4, 1, 128), 128, 4, 128),
    ("mlx-3-64", MinMaxGrid(3, 1, 64), 64, 4, 64),
    ("mlx-8-32", MinMaxGrid(8, 1, 32), 32, 4, 32),
    ("onnx-int8-32", MinMaxGrid(8, 1, 32), 32, 4, 32),
    ("onnx-int8-16", MinMaxGrid(8, 1, 16), 16, 4, 16),
    ("paper-4x8", MinMaxGrid(4, 8, 4), 4, 8, None),
])
def test_target_table_defaults_fold_exactly(name, grid, li, lo, block):
    target = parse_target(name)
    assert (target.grid, target.lambda_in, target.lambda_out, target.runtime_block) == (grid, li, lo, block)
    assert target.problems(li, lo) == []
    # the defaults satisfy the core's own fold rules, not just this table's
    assert fold_problems(grid, li, lo) == []
    if block is not None:
        assert runtime_fold_problems(grid, li, lo, block) == []


@pytest.mark.parametrize("name", ["gguf-q4_0", "onnx-int4-24", "onnx-int8-24", "onnx-int2-32", "mlx-7-32", "mlx-4-16",
                                  "paper-0x8", "q4"])
def test_unknown_target_names_the_known_ones(name):
    with pytest.raises(UnsupportedError, match="gguf-q4_1, gguf-q5_1, onnx-int4-"):
        parse_target(name)


def cfg(method, **kw):
    return TrainConfig(base="b", data="d", out="o", method=method, **kw)


@pytest.mark.parametrize("target, li, lo", [("gguf-q4_1", 16, None), ("gguf-q4_1", 48, None),
                                            ("onnx-int4-64", 32, None), ("paper-4x8", 2, None),
                                            ("paper-4x8", 4, 4)])
def test_non_foldable_lambda_is_refused_with_what_would(target, li, lo):
    with pytest.raises(UnsupportedError) as err:
        resolve_spec(cfg("qa-blora", target=target, lambda_in=li, lambda_out=lo), "llama")
    msg = str(err.value)
    assert "cannot fold exactly" in msg and "\n" not in msg
    assert "--lambda-in a multiple of" in msg


def test_foldable_multiples_are_accepted():
    spec = resolve_spec(cfg("qa-blora", target="gguf-q4_1", lambda_in=64, lambda_out=2), "llama")
    assert (spec.lambda_in, spec.lambda_out, spec.base_quant) == (64, 2, MinMaxGrid(4, 1, 32))
    spec = resolve_spec(cfg("qa-blora", target="paper-4x8", lambda_in=8, lambda_out=16), "llama")
    assert spec.base_quant == MinMaxGrid(4, 8, 4)


def test_qa_blora_defaults_and_scaling():
    spec = resolve_spec(cfg("qa-blora", rank=8, alpha=16), "llama")
    assert (spec.lambda_in, spec.lambda_out, spec.scaling) == (32, 4, 2.0)
    assert spec.target.name == "gguf-q4_1"
    assert resolve_spec(cfg("qa-blora", **{"lambda_": 32}), "llama").lambda_out == 32


@pytest.mark.parametrize("arch, lam", [("llama", 2), ("mistral", 8), ("qwen2", 2)])
def test_q_blora_paper_defaults(arch, lam):
    spec = resolve_spec(cfg("q-blora", rank=16, alpha=32), arch)
    assert (spec.lambda_in, spec.lambda_out) == (lam, lam)
    assert spec.inner_rank == lam * 16  # R = λ·rank
    assert spec.scaling == 2.0
    assert spec.base_quant == NF4Base(64, True)


def test_q_blora_refuses_a_target():
    for kw in (dict(target="gguf-q4_1"), dict(fold_aware=True)):
        with pytest.raises(UnsupportedError, match="apply to --method qa-blora"):
            resolve_spec(cfg("q-blora", **kw), "llama")


@pytest.mark.parametrize("target, default", [("gguf-q4_1", True), ("gguf-q5_1", True), ("mlx-4-64", True),
                                             ("mlx-8-32", True), ("onnx-int4-32", False), ("onnx-int8-32", False),
                                             ("paper-4x8", False)])
def test_fold_aware_default_follows_how_the_runtime_stores_beta(target, default):
    assert resolve_spec(cfg("qa-blora", target=target), "llama").fold_aware is default
    assert resolve_spec(cfg("qa-blora", target=target, fold_aware=not default), "llama").fold_aware is not default


@pytest.mark.parametrize("kw, match", [
    (dict(lambda_=2, lambda_in=2), "not both"),
    (dict(rank=0), "--rank must be >= 1"),
    (dict(device="tpu"), "--device"),
    (dict(resume=True, overwrite=True), "contradict"),
])
def test_bad_options(kw, match):
    with pytest.raises(BadInputError, match=match):
        cfg("q-blora", **kw)
