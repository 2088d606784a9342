"""Shared fixtures: the shipped samples and factories for tiny offline models."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
sys.path.insert(0, str(SAMPLES))

import make_samples  # noqa: E402
import tiny_models  # noqa: E402


@pytest.fixture(scope="session")
def samples() -> Path:
    """The shipped samples folder (base + four checkpoints)."""
    return SAMPLES


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """``tiny_base(arch="llama", **kwargs) -> Path``: a cached tiny base model folder."""
    cache: dict = {}

    def build(arch: str = "llama", **kwargs) -> Path:
        key = (arch, tuple(sorted(kwargs.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"base-{arch}")
            cache[key] = tiny_models.make_base(out, arch=arch, **kwargs)
        return cache[key]

    return build


@pytest.fixture(scope="session")
def make_ckpt(tmp_path_factory):
    """``make_ckpt(base_dir, method, λi, λo, layout="native", base_quant=None, **kw) -> Path``."""
    def build(base_dir, method, lambda_in, lambda_out, **kwargs) -> Path:
        out = tmp_path_factory.mktemp(f"ckpt-{method}")
        return make_samples.make_checkpoint(out / "ckpt", Path(base_dir), method, lambda_in, lambda_out, **kwargs)

    return build
