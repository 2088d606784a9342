"""The adapter math of Q-BLoRA and QA-BLoRA, as pure functions (see docs/MATH.md).

Layout is PyTorch's: a weight is ``[out, in]`` and ``y = x @ W.T``.

* ``pool(x, k)``: ``AvgPool1d(k)`` over the last axis (the mean of each run of ``k`` inputs).
* ``rep(y, k)``: ``repeat_interleave(y, k, dim=-1)``.
* The adapter branch: ``s * rep(pool(x, λi) @ M.T, λo)`` with ``M = B @ A`` (Q-BLoRA)
  or ``M = H`` (QA-BLoRA).
* The same branch as a dense update: ``ΔW[o, i] = s * M[o // λo, i // λi] / λi``.
  The ``/ λi`` is the mean in ``pool``; the paper's ``merge.py`` omits it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class AdapterModule:
    """One adapted Linear: its trained tensors, balancing factors and scaling.

    ``name`` is the Hugging Face module path (``model.layers.0.self_attn.q_proj``).
    Q-BLoRA holds ``a`` ``[R, in/λi]`` and ``b`` ``[out/λo, R]``; QA-BLoRA holds ``h``
    ``[out/λo, in/λi]``.
    """

    name: str
    method: str
    lambda_in: int
    lambda_out: int
    scaling: float
    out_features: int
    in_features: int
    a: Optional[torch.Tensor] = None
    b: Optional[torch.Tensor] = None
    h: Optional[torch.Tensor] = None

    @property
    def weight_name(self) -> str:
        return self.name + ".weight"

    @property
    def inner_rank(self) -> int:
        """``R`` for Q-BLoRA (the matrices' rank); ``min(out/λo, in/λi)`` for QA-BLoRA."""
        if self.method == "q-blora":
            return int(self.a.shape[0])
        return int(min(self.h.shape))

    def num_parameters(self) -> int:
        tensors = (self.a, self.b) if self.method == "q-blora" else (self.h,)
        return sum(int(t.numel()) for t in tensors)


def pool(x: torch.Tensor, k: int) -> torch.Tensor:
    """``AvgPool1d(k)`` over the last axis: the mean of each run of ``k`` consecutive values."""
    if k == 1:
        return x
    return x.unflatten(-1, (x.shape[-1] // k, k)).mean(dim=-1)


def rep(y: torch.Tensor, k: int) -> torch.Tensor:
    """``repeat_interleave(y, k, dim=-1)``."""
    return y if k == 1 else torch.repeat_interleave(y, k, dim=-1)


def adapter_matrix(module: AdapterModule, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``M`` ``[out/λo, in/λi]``: ``B @ A`` for Q-BLoRA, ``H`` for QA-BLoRA."""
    if module.method == "q-blora":
        return module.b.to(dtype) @ module.a.to(dtype)
    return module.h.to(dtype)


def adapter_forward(x: torch.Tensor, module: AdapterModule) -> torch.Tensor:
    """The adapter branch as trained: ``s * rep(pool(x) @ A.T @ B.T)`` (or ``@ H.T``)."""
    pooled = pool(x, module.lambda_in)
    if module.method == "q-blora":
        small = pooled @ module.a.to(x.dtype).T @ module.b.to(x.dtype).T
    else:
        small = pooled @ module.h.to(x.dtype).T
    return module.scaling * rep(small, module.lambda_out)


def delta_weight(module: AdapterModule, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The exact dense update ``ΔW`` ``[out, in]``, computed in ``dtype`` (float64 by default).

    ``ΔW = s * repeat_interleave(repeat_interleave(M, λo, 0), λi, 1) / λi``.
    """
    m = adapter_matrix(module, dtype) * (module.scaling / module.lambda_in)
    m = torch.repeat_interleave(m, module.lambda_out, dim=0)
    return torch.repeat_interleave(m, module.lambda_in, dim=1)


def lora_factors(module: AdapterModule, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard LoRA factors ``(A' [r, in], B' [out, r])`` with ``ΔW = s * B' @ A'`` exactly.

    Q-BLoRA: ``A' = rep_rows(A, λi)/λi``, ``B' = rep(B, λo)`` (rank ``R``).
    QA-BLoRA: the smaller of ``(B' = Rep @ H, A' = Pool)`` (rank ``in/λi``) and
    ``(B' = Rep, A' = H @ Pool)`` (rank ``out/λo``).
    """
    li, lo = module.lambda_in, module.lambda_out
    if module.method == "q-blora":
        a = torch.repeat_interleave(module.a.to(dtype), li, dim=1) / li
        b = torch.repeat_interleave(module.b.to(dtype), lo, dim=0)
        return a, b
    h = module.h.to(dtype)
    n_out, n_in = h.shape
    if n_in <= n_out:
        pool_m = torch.repeat_interleave(torch.eye(n_in, dtype=dtype), li, dim=1) / li
        return pool_m, torch.repeat_interleave(h, lo, dim=0)
    rep_m = torch.repeat_interleave(torch.eye(n_out, dtype=dtype), lo, dim=0)
    return torch.repeat_interleave(h, li, dim=1) / li, rep_m
