"""``verify``: prove that a merge or an exported artifact computes what the adapter computed.

Per layer: the adapter branch and the dense ``ΔW`` agree on random inputs (float64), and each
merged weight is the correctly rounded exact sum (within half an ulp of its dtype). End to
end: logits of the training-time model (base as trained + adapter branches) against the
merged model or the artifact, on a few prompts, within the dtype's or runtime's bound.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch

from .delta import AdapterModule, adapter_forward, delta_weight
from .job import Artifact, ExportJob, LayerCheck
from .merge import DTYPES, exact_merged_weight, merged_weight
from .numerics import HALF_ULP_LIMIT, LogitStats, half_ulp_ratio, logit_stats, round_to
from .reference import DEFAULT_PROMPTS, rounded_stream, tokenize_prompts, trained_base_fn, trained_stream
from .stream import PartCache, Stream, StreamedForward
from .tensor_io import one_thread
from .tolerance import SENSITIVITY_FACTOR, Tolerance, tolerance_for_dtype, widen_to_floor

log = logging.getLogger(__name__)
BRANCH_REL_BOUND = 1e-12  # float64: pool/matmul/repeat vs dense ΔW differ only by float64 rounding
CORRECTLY_ROUNDED = 0.5  # the half-ulp ratio bound of a weight equal to the correct rounding of the exact value


def _within(stats: LogitStats, tolerance: Tolerance) -> bool:
    return stats.max_rel <= tolerance.max_rel and stats.top1_agreement >= tolerance.min_top1


@dataclass(frozen=True)
class WeightsCheck:
    """End to end on what a runtime artifact holds: its weights (dequantized exactly) in the base's true
    architecture, float32 arithmetic, against the training-time model."""

    description: str
    logits: LogitStats
    tolerance: Tolerance

    @property
    def passed(self) -> bool:
        return _within(self.logits, self.tolerance)

    def to_json(self) -> dict:
        return {"description": self.description, "logits": self.logits.to_json(), "tolerance": self.tolerance.to_json(),
                "passed": self.passed}


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
    rounding_floor: Optional[float] = None  # max_rel that correct rounding to the weight dtype causes (base, trained model)
    notes: list[str] = field(default_factory=list)
    weights_check: Optional["WeightsCheck"] = None  # a runtime artifact's own weights, in the true architecture

    @property
    def max_bound(self) -> float:
        bounds = [self.tolerance.max_rel] + ([self.weights_check.tolerance.max_rel] if self.weights_check else [])
        return max(bounds)

    @property
    def inconclusive(self) -> bool:
        """The bound is too wide to tell this artifact from one without the adapter."""
        return self.max_bound >= self.adapter_effect / SENSITIVITY_FACTOR

    @property
    def layers_passed(self) -> bool:
        return all(c.passed for c in self.layers)

    @property
    def logits_passed(self) -> bool:
        """The end-to-end check(s): the candidate's logits (and a runtime artifact's own weights)."""
        runtime = _within(self.logits, self.tolerance)
        return runtime and (self.weights_check is None or self.weights_check.passed)

    @property
    def passed(self) -> bool:
        return self.layers_passed and self.logits_passed and not self.inconclusive

    def to_json(self) -> dict:
        return {"passed": self.passed, "checkpoint": self.checkpoint, "artifact": self.artifact,
                "description": self.description, "method": self.method, "merge": self.merge,
                "tolerance": self.tolerance.to_json(), "logits": self.logits.to_json(),
                "logits_passed": self.logits_passed, "adapter_effect_rel": self.adapter_effect, "rounding_floor_rel": self.rounding_floor,
                "layers_passed": self.layers_passed, "layers": [c.to_json() for c in self.layers],
                "notes": self.notes, "inconclusive": self.inconclusive,
                "weights_check": None if self.weights_check is None else self.weights_check.to_json()}


def branch_check(module: AdapterModule, seed: int = 0) -> LayerCheck:
    """The adapter branch and ``x @ ΔW.T`` agree on random inputs (float64)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, module.in_features, generator=gen, dtype=torch.float64)
    dense = x @ delta_weight(module, torch.float64).T
    branch = adapter_forward(x, module)
    scale = float(dense.abs().max()) or 1.0
    rel = float((dense - branch).abs().max()) / scale
    return LayerCheck(module.name, "branch vs ΔW (float64, rel)", rel, BRANCH_REL_BOUND)


#: Columns of a weight checked per pass: the float64 working set of one chunk stays small.
CHECK_CHUNK_ELEMENTS = 1 << 20


def exact_trained_columns(job: ExportJob, module: AdapterModule, cache: PartCache) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(c0, c1, W_exact[:, c0:c1].T)``: the adapted weight the training-time model computes with,
    float64, a few input columns at a time (never the whole float64 tensor), each chunk transposed
    to a contiguous ``[c1 - c0, out]`` tensor (one strided gather; every later pass is contiguous).

    Branch training: ``trained_base(W) + ΔW`` with ``ΔW`` read off the branch itself,
    ``ΔW[:, c0:c1].T = branch(I[c0:c1])`` (independent of ``delta_weight``). Fold-aware
    training: ``α·q + param_dtype(β')``, the float32 weights its forward used.
    """
    name = module.weight_name
    if job.plan.folded:
        weights = cache.memo(("exact", name), lambda: exact_merged_weight(name, cache.tensor(name), job.ckpt, job.plan).float())
    else:
        weights = trained_base_fn(job.plan)(name, cache)
    rows, cols = weights.shape
    step = max(1, CHECK_CHUNK_ELEMENTS // rows)
    for c0 in range(0, cols, step):
        c1 = min(c0 + step, cols)
        exact = weights[:, c0:c1].T.to(torch.float64, memory_format=torch.contiguous_format)
        if not job.plan.folded:
            eye = torch.zeros(c1 - c0, cols, dtype=torch.float64)
            eye[torch.arange(c1 - c0), torch.arange(c0, c1)] = 1.0
            exact += adapter_forward(eye, module)
        yield c0, c1, exact


def reference_rounding(job: ExportJob, module: AdapterModule, cache: PartCache, dtype: torch.dtype,
                       candidate: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, float, bool]:
    """verify's own correct rounding of the exact trained weight to ``dtype`` (memoized per part),
    a bound on the half-ulp ratio of ``candidate`` against the exact weight (0 without one), and
    whether ``candidate`` is that rounding, bit for bit.

    One pass over the exact weight's columns computes both. A chunk of ``candidate`` equal to the
    correct rounding is within half an ulp by construction (bound 0.5, no further pass); any other
    chunk gets the full :func:`half_ulp_ratio` (a tie rounded the other way is 0.5, a wrong weight more).
    With no candidate, a rounding made earlier in the part is reused.
    """
    key = ("reference rounding", module.weight_name, dtype)
    if candidate is None and cache.has(key):
        return cache.get(key), 0.0, False
    ratio, identical = (0.0, False) if candidate is None else (CORRECTLY_ROUNDED, True)
    rounded = torch.empty((module.out_features, module.in_features), dtype=dtype)
    with one_thread():
        for c0, c1, exact_t in exact_trained_columns(job, module, cache):
            rounded[:, c0:c1] = round_to(exact_t, dtype).T
            if candidate is not None and not torch.equal(candidate[:, c0:c1], rounded[:, c0:c1]):
                identical = False
                ratio = max(ratio, half_ulp_ratio(candidate[:, c0:c1].T.contiguous(), exact_t))
    cache.put(key, rounded)
    return rounded, ratio, identical


def merge_stream(job: ExportJob, dtype: torch.dtype, checks: list[LayerCheck]) -> Stream:
    """The in-memory merge (weights rounded to ``dtype`` by the writers' own :func:`merged_weight`),
    each adapted weight checked against the exact trained weight as it is made."""
    base = trained_base_fn(job.plan)

    def weights(name: str, cache: PartCache) -> torch.Tensor:
        module = job.ckpt.module_for_weight(name)
        if module is None:
            return base(name, cache).to(dtype)
        trained = None if job.plan.folded else base(name, cache)
        weight = cache.tensor(name) if job.plan.folded else trained  # the raw tensor only where it is used
        with one_thread():
            merged = merged_weight(name, weight, job.ckpt, job.plan, dtype, trained=trained)
        rounded, ratio, identical = reference_rounding(job, module, cache, dtype, candidate=merged)
        cache.forget(("trained_base", name))  # the last stream reads its rounding instead (a 7B layer: 0.8 GB)
        checks.append(LayerCheck(name, f"|w - exact| / ulp({str(dtype)[6:]}) (0.5: = correct rounding)", ratio,
                                 HALF_ULP_LIMIT))
        return rounded if identical else merged  # the same values; one object lets the rounded stream reuse this run
    return Stream("candidate", weights)


def reference_rounding_stream(job: ExportJob, dtype: torch.dtype) -> Stream:
    """The training-time model with every weight correctly rounded to ``dtype`` by verify itself:
    what storing *this* model in ``dtype`` costs, computed without the writer under test."""
    base = trained_base_fn(job.plan)

    def weights(name: str, cache: PartCache) -> torch.Tensor:
        module = job.ckpt.module_for_weight(name)
        if module is None:
            return base(name, cache).to(dtype)
        return reference_rounding(job, module, cache, dtype)[0]
    return Stream("rounded trained", weights)


def _streams(job: ExportJob, artifact: Optional[Artifact], weight_dtype, checks: list[LayerCheck]) -> list[Stream]:
    streams = [trained_stream(job.ckpt, job.plan), Stream("without", trained_base_fn(job.plan))]
    if weight_dtype is not None and weight_dtype != torch.float32:
        streams.append(rounded_stream(job.plan, weight_dtype))
    if artifact is None:
        streams.append(merge_stream(job, weight_dtype, checks))
    else:
        streams.extend(artifact.streams)
        if artifact.weights is not None:
            streams.append(Stream("candidate" if artifact.logits is None else "artifact weights", artifact.weights))
    if weight_dtype is not None and weight_dtype != torch.float32:
        streams.append(reference_rounding_stream(job, weight_dtype))  # after the candidate: shares its rounding
    return streams


def _dtype_tolerance(tolerance: Tolerance, out: dict, weight_dtype) -> tuple[Tolerance, Optional[float]]:
    """Widen to the dtype's rounding floor: the larger of what correct rounding to ``weight_dtype``
    does to the base without the adapter and to the training-time model itself, both rounded by
    verify (a deep model amplifies the rounding of larger merged weights a little more)."""
    if "rounded base" not in out:
        return tolerance, None
    floor = max(logit_stats(out["without"], out["rounded base"]).max_rel,
                logit_stats(out["trained"], out["rounded trained"]).max_rel)
    return widen_to_floor(tolerance, floor, weight_dtype), floor


def run_verify(job: ExportJob, artifact: Optional[Artifact], prompts: Sequence[str] = DEFAULT_PROMPTS,
               dtype: str = "float16") -> VerifyReport:
    """Verify ``job``'s merge (``artifact=None``) or an opened artifact against the training-time model.

    One streamed pass over the decoder layers computes every model the check needs: the
    training-time model, the base without the adapter, the floors, and a float-weight candidate.
    """
    ids = tokenize_prompts(job.base, prompts)
    modules = list(job.ckpt.modules.values())
    checks = [branch_check(m, seed=i) for i, m in enumerate(modules)]
    weight_dtype = DTYPES[dtype] if artifact is None else artifact.weight_dtype
    out = StreamedForward(job.base, job.progress).run(ids, _streams(job, artifact, weight_dtype, checks))
    weights_check = None
    if artifact is None:
        tolerance, description, notes = tolerance_for_dtype(weight_dtype), f"in-memory merge, {dtype} weights", []
        artifact_path, candidate = None, out["candidate"]
    else:
        checks.extend(artifact.layer_checks())
        candidate = out["candidate"] if artifact.logits is None else artifact.logits(ids)
        tolerance = artifact.tolerance if artifact.bound is None else artifact.bound(out)
        description, notes, artifact_path = artifact.description, list(artifact.notes), str(artifact.path)
        if artifact.logits is not None and artifact.weights is not None:
            weights_check = WeightsCheck(artifact.weights_description, logit_stats(out["trained"], out["artifact weights"]),
                                         artifact.weights_bound(out))
    tolerance, floor = _dtype_tolerance(tolerance, out, weight_dtype)
    effect = logit_stats(out["trained"], out["without"]).max_rel
    report = VerifyReport(checkpoint=str(job.ckpt.path), artifact=artifact_path, description=description,
                          method=job.ckpt.method, merge=job.plan.describe(), tolerance=tolerance,
                          layers=checks, logits=logit_stats(out["trained"], candidate), adapter_effect=effect,
                          rounding_floor=floor, notes=notes, weights_check=weights_check)
    if report.inconclusive:
        notes.append(f"inconclusive: the bound {report.max_bound:.2e} is not below 1/{SENSITIVITY_FACTOR:g} of what the "
                     f"adapter does to the logits ({effect:.2e} relative), so a dropped adapter could pass; a "
                     "higher-precision export (float weights, or a type without post-training quantization), or "
                     "prompts on which the adapter matters more, would make it conclusive")
    return report


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
              f"  top-1 agreement   {s.top1_agreement:.4f}  (bound >= {t.min_top1:.4f})",
              f"  KL(ref || cand)   {s.kl_mean:.3e} nats, {s.positions} positions",
              f"  adapter effect    {report.adapter_effect:.3e} (relative change of logits the adapter makes)"]
    if report.rounding_floor is not None:
        lines.append(f"  rounding floor    {report.rounding_floor:.3e} "
                     "(verify's own correct rounding of the base alone and of the trained model)")
    w = report.weights_check
    if w is not None:
        lines += [f"  file's weights    {w.logits.max_rel:.3e} relative, top-1 {w.logits.top1_agreement:.4f} "
                  f"(bound {w.tolerance.max_rel:.3e}, >= {w.tolerance.min_top1:.3f}: {w.description}; {w.tolerance.basis})"]
    lines += [f"note: {n}" for n in report.notes]
    lines.append("")
    lines.append("INCONCLUSIVE" if report.inconclusive and report.layers_passed and report.logits_passed
                 else "PASS" if report.passed else "FAIL")
    return "\n".join(lines)


def _worst_per_check(checks: list[LayerCheck]) -> list[LayerCheck]:
    worst: dict[str, LayerCheck] = {}
    for c in checks:
        if c.check not in worst or c.value > worst[c.check].value:
            worst[c.check] = c
    return list(worst.values())
