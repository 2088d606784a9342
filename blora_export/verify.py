"""``verify``: prove that a merge or an exported artifact computes what the adapter computed.

Per layer: the adapter branch and the dense ``ΔW`` agree on random inputs (float64), and each
merged weight is the correctly rounded exact sum (within half an ulp of its dtype). End to
end: logits of the training-time model (base as trained + adapter branches) against the
merged model or the artifact, on a few prompts, within the dtype's or runtime's bound.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .delta import AdapterModule, adapter_forward, delta_weight
from .job import Artifact, ExportJob, LayerCheck
from .merge import DTYPES, exact_merged_weight, merged_tensors, trained_base_weight
from .numerics import HALF_ULP_LIMIT, LogitStats, half_ulp_ratio, logit_stats
from .reference import DEFAULT_PROMPTS, load_hf_model, model_logits, reference_logits, tokenize_prompts
from .tolerance import Tolerance, tolerance_for_dtype, widen_to_floor

log = logging.getLogger(__name__)
BRANCH_REL_BOUND = 1e-12  # float64: pool/matmul/repeat vs dense ΔW differ only by float64 rounding
SENSITIVITY_FACTOR = 4.0


@dataclass
class VerifyReport:
    checkpoint: str
    artifact: Optional[str]
    description: str
    method: str
    merge: str
    tolerance: Tolerance
    layers: list[LayerCheck]
    logits: LogitStats
    adapter_effect: float  # max_rel of the training-time model vs the same base without adapter
    rounding_floor: Optional[float] = None  # max_rel that rounding the base alone to the weight dtype causes
    notes: list[str] = field(default_factory=list)

    @property
    def layers_passed(self) -> bool:
        return all(c.passed for c in self.layers)

    @property
    def logits_passed(self) -> bool:
        return (self.logits.max_rel <= self.tolerance.max_rel
                and self.logits.top1_agreement >= self.tolerance.min_top1)

    @property
    def passed(self) -> bool:
        return self.layers_passed and self.logits_passed

    def to_json(self) -> dict:
        return {"passed": self.passed, "checkpoint": self.checkpoint, "artifact": self.artifact,
                "description": self.description, "method": self.method, "merge": self.merge,
                "tolerance": self.tolerance.to_json(), "logits": self.logits.to_json(),
                "logits_passed": self.logits_passed, "adapter_effect_rel": self.adapter_effect, "rounding_floor_rel": self.rounding_floor,
                "layers_passed": self.layers_passed, "layers": [c.to_json() for c in self.layers],
                "notes": self.notes}


def branch_check(module: AdapterModule, seed: int = 0) -> LayerCheck:
    """The adapter branch and ``x @ ΔW.T`` agree on random inputs (float64)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, module.in_features, generator=gen, dtype=torch.float64)
    dense = x @ delta_weight(module, torch.float64).T
    branch = adapter_forward(x, module)
    scale = float(dense.abs().max()) or 1.0
    rel = float((dense - branch).abs().max()) / scale
    return LayerCheck(module.name, "branch vs ΔW (float64, rel)", rel, BRANCH_REL_BOUND)


def exact_from_branch(module: AdapterModule, base_weight: torch.Tensor) -> torch.Tensor:
    """``trained_base(W) + ΔW`` with ``ΔW`` read off the branch itself: ``ΔW.T = branch(I)``."""
    eye = torch.eye(module.in_features, dtype=torch.float64)
    return base_weight.to(torch.float64) + adapter_forward(eye, module).T


def exact_trained_weight(job: ExportJob, module: AdapterModule) -> torch.Tensor:
    """The adapted weight the training-time model computes with, float64.

    Branch training: ``ΔW`` read off the branch itself (independent of ``delta_weight``).
    Fold-aware training: ``α·q + param_dtype(β')``, the weights its forward used.
    """
    weight = job.base.tensor(module.weight_name)
    if job.plan.folded:
        return exact_merged_weight(module.weight_name, weight, job.ckpt, job.plan)
    return exact_from_branch(module, trained_base_weight(module.weight_name, weight, job.plan))


def merged_model_logits(job: ExportJob, dtype: torch.dtype, prompts, checks: list[LayerCheck]):
    """Merge in memory (weights rounded to ``dtype``), check each merged weight, return logits."""
    model = load_hf_model(job.base.path, torch.float32)
    stream = job.progress(merged_tensors(job.base, job.ckpt, job.plan, dtype), desc="merge",
                          total=len(job.base.names()), unit="tensor")
    with torch.no_grad():
        for name, tensor in stream:
            module = job.ckpt.module_for_weight(name)
            if module is not None:
                ratio = half_ulp_ratio(tensor, exact_trained_weight(job, module))
                checks.append(LayerCheck(name, f"|w - exact| / ulp({str(dtype)[6:]})", ratio, HALF_ULP_LIMIT))
            try:
                model.get_parameter(name).copy_(tensor.to(torch.float32))
            except AttributeError:
                log.debug("tensor %s is not a parameter of the model (tied or buffer)", name)
    try:
        return model_logits(model, prompts)
    finally:
        del model


def run_verify(job: ExportJob, artifact: Optional[Artifact], prompts: Sequence[str] = DEFAULT_PROMPTS,
               dtype: str = "float16") -> VerifyReport:
    """Verify ``job``'s merge (``artifact=None``) or an opened artifact against the training-time model."""
    ids = tokenize_prompts(job.base, prompts)
    modules = list(job.ckpt.modules.values())
    checks = [branch_check(m, seed=i) for i, m in enumerate(modules)]
    weight_dtype = DTYPES[dtype] if artifact is None else artifact.weight_dtype
    ref = reference_logits(job.base, job.ckpt, job.plan, ids, job.progress, round_dtype=weight_dtype)
    if artifact is None:
        candidate = merged_model_logits(job, weight_dtype, ids, checks)
        tolerance, description, notes = tolerance_for_dtype(weight_dtype), f"in-memory merge, {dtype} weights", []
        artifact_path = None
    else:
        checks.extend(artifact.layer_checks())
        candidate = artifact.logits(ids)
        tolerance, description, notes = artifact.tolerance, artifact.description, list(artifact.notes)
        artifact_path = str(artifact.path)
    floor = None
    if ref.rounded_base is not None:
        floor = logit_stats(ref.without_adapter, ref.rounded_base).max_rel
        tolerance = widen_to_floor(tolerance, floor, weight_dtype)
    effect = logit_stats(ref.trained, ref.without_adapter).max_rel
    if effect < SENSITIVITY_FACTOR * tolerance.max_rel:
        notes.append(f"the adapter moves the logits by only {effect:.2e} (relative), less than "
                     f"{SENSITIVITY_FACTOR:g}x the tolerance: this check cannot tell a dropped adapter from noise")
    return VerifyReport(checkpoint=str(job.ckpt.path), artifact=artifact_path, description=description,
                        method=job.ckpt.method, merge=job.plan.describe(), tolerance=tolerance,
                        layers=checks, logits=logit_stats(ref.trained, candidate), adapter_effect=effect,
                        rounding_floor=floor, notes=notes)


def format_report(report: VerifyReport, max_layers: int = 12) -> str:
    """A human-readable table."""
    lines = [f"checkpoint : {report.checkpoint} ({report.method})",
             f"artifact   : {report.artifact or '(none: in-memory merge)'} - {report.description}",
             f"merge      : {report.merge}", ""]
    failed = [c for c in report.layers if not c.passed]
    lines.append(f"per-layer checks: {len(report.layers) - len(failed)}/{len(report.layers)} passed")
    shown = failed[:max_layers] if failed else _worst_per_check(report.layers)
    for c in shown:
        lines.append(f"  {'FAIL' if not c.passed else 'ok  '} {c.name:<45} {c.check:<32} {c.value:.3e} <= {c.bound:.3e}")
    s, t = report.logits, report.tolerance
    lines += ["", "end to end (training-time model vs candidate):",
              f"  max |Δlogit|      {s.max_abs:.3e}",
              f"  relative          {s.max_rel:.3e}  (bound {t.max_rel:.3e}: {t.basis})",
              f"  top-1 agreement   {s.top1_agreement:.4f}  (bound >= {t.min_top1})",
              f"  KL(ref || cand)   {s.kl_mean:.3e} nats, {s.positions} positions",
              f"  adapter effect    {report.adapter_effect:.3e} (relative change of logits the adapter makes)"]
    if report.rounding_floor is not None:
        lines.append(f"  rounding floor    {report.rounding_floor:.3e} (the same rounding applied to the base alone)")
    lines += [f"note: {n}" for n in report.notes]
    lines.append("")
    lines.append("PASS" if report.passed else "FAIL")
    return "\n".join(lines)


def _worst_per_check(checks: list[LayerCheck]) -> list[LayerCheck]:
    worst: dict[str, LayerCheck] = {}
    for c in checks:
        if c.check not in worst or c.value > worst[c.check].value:
            worst[c.check] = c
    return list(worst.values())
