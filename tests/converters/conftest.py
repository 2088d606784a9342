"""Fixtures of the converter tests: tiny-base checkpoints per family and method."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # families_support (pytest runs with importlib mode)

from families_support import METHODS  # noqa: E402


@pytest.fixture(scope="module")
def ckpts(tiny_base, make_ckpt):
    cache = {}

    def get(arch, method, **base_kwargs):
        key = (arch, method, tuple(sorted(base_kwargs.items())))
        if key not in cache:
            li, lo, quant = METHODS[method]
            cache[key] = make_ckpt(tiny_base(arch, **base_kwargs), method, li, lo, base_quant=quant)
        return cache[key]

    return get
