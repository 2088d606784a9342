"""Runnable models for verification: the training-time model and in-memory merges.

The training-time model is the base (float32, each decoder Linear replaced by the base the
adapter was trained against) plus the adapter *branch* on each adapted Linear, computed as
trained: ``y = x @ W.T + s * rep(pool(x) @ M.T)``. It is the reference every export is
compared with.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch

from .base import BaseModel
from .checkpoint import Checkpoint
from .delta import AdapterModule, adapter_forward
from .errors import BadInputError
from .merge import MergePlan, exact_merged_weight, is_quantized_linear, trained_base_weight
from .stream import PartCache, Stream, StreamedForward

log = logging.getLogger(__name__)
DEFAULT_PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Fine-tuning quantized language models with balanced low-rank adaptation",
    "Once upon a time, in a small village by the sea, there lived",
    "Question: what is the capital of France? Answer:",
)


@contextmanager
def _load_errors(what: str) -> Iterator[None]:
    """transformers' loaders fail on bad folders with assorted exceptions: one line, exit 2."""
    try:
        yield
    except (OSError, ValueError, TypeError, RuntimeError, KeyError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInputError(f"{what}: {first}") from None


def load_hf_model(path, dtype: torch.dtype = torch.float32):
    """A transformers causal LM from a local folder, on CPU, in eval mode."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars (or --quiet) only
    with _load_errors(f"transformers cannot load the model in {path}"):
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, device_map="cpu")
    model.eval()
    return model


PROBE_TEXT = "Hello world"


class Prompt(str):
    """A prompt that remembers where it was read (``FILE:LINE``), for error messages."""

    where: str

    def __new__(cls, text: str, where: str) -> "Prompt":
        obj = super().__new__(cls, text)
        obj.where = where
        return obj


def load_tokenizer(path):
    """The base's Hugging Face tokenizer; one that encodes plain text to no tokens is bad input."""
    from transformers import AutoTokenizer

    with _load_errors(f"cannot load the tokenizer in {path}"):
        tok = AutoTokenizer.from_pretrained(str(path))
        probe = list(tok(PROBE_TEXT, add_special_tokens=False)["input_ids"])
    if not probe:
        raise BadInputError(f"the tokenizer in {path} encodes {PROBE_TEXT!r} to no tokens: its vocabulary or "
                            "model is empty or broken (tokenizer.json / tokenizer.model)")
    return tok


def tokenize_prompts(base: BaseModel, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt; an empty one, or one longer than the model's context, is bad input."""
    tok = load_tokenizer(base.path)
    context = base.config.get("max_position_embeddings")
    out = []
    for i, prompt in enumerate(prompts):
        ids = list(tok(prompt)["input_ids"])
        where = getattr(prompt, "where", f"prompt {i + 1}")
        if not ids:
            raise BadInputError(f"{where}: the prompt encodes to no tokens")
        if isinstance(context, int) and len(ids) > context:
            raise BadInputError(f"{where}: the prompt is {len(ids)} tokens ({len(prompt)} characters), longer than "
                                f"the model's context (max_position_embeddings {context} in {base.path / 'config.json'}); "
                                "shorten or split it")
        out.append(ids)
    return out


@torch.no_grad()
def model_logits(model, prompts: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """float32 logits ``[len(prompt), vocab]`` for each prompt, one forward each."""
    out = []
    for ids in prompts:
        logits = model(input_ids=torch.tensor([list(ids)], dtype=torch.long)).logits[0]
        out.append(logits.float())
    return out


def _set_weight(model, name: str, value: torch.Tensor) -> None:
    param = model.get_parameter(name)
    with torch.no_grad():
        param.copy_(value.to(param.dtype))


def _linear(model, module: AdapterModule):
    return model.get_submodule(module.name)


@contextmanager
def adapter_branches(model, modules: Sequence[AdapterModule]) -> Iterator[None]:
    """Attach each adapter's branch to its Linear as a forward hook (removed on exit)."""
    handles = []
    for module in modules:
        def hook(_mod, args, output, module=module):
            return output + adapter_forward(args[0], module).to(output.dtype)
        handles.append(_linear(model, module).register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def apply_trained_base(model, base: BaseModel, plan: MergePlan, progress: Callable = iter) -> None:
    """Replace each decoder Linear's weight by the base the adapter was trained against."""
    if plan.merge_into == "original":
        return
    for name in progress(base.linear_names()):
        _set_weight(model, name, trained_base_weight(name, base.tensor(name), plan))


def branch_hooks(modules: Sequence[AdapterModule]):
    """A :class:`Stream` hook installer: each adapted Linear in a part adds its adapter branch."""
    by_name = {m.name: m for m in modules}

    def install(part, prefix: str) -> list:
        handles = []
        for local, sub in part.named_modules():
            module = by_name.get(f"{prefix}.{local}" if local else prefix)
            if module is not None:
                def hook(_mod, args, output, module=module):
                    return output + adapter_forward(args[0], module).to(output.dtype)
                handles.append(sub.register_forward_hook(hook))
        return handles
    return install


def trained_base_fn(plan: MergePlan):
    """Weights of the base as the adapter saw it, memoized per part: float32 where the plan changes
    them (a quantized base's decoder Linears), else the base's own tensor in its own dtype (exact;
    a float32 copy of a 16-bit embedding matrix would cost its size twice over per stream)."""
    def weights(name: str, cache: PartCache) -> torch.Tensor:
        if plan.merge_into == "original" or not is_quantized_linear(name):
            return cache.tensor(name)
        def derive() -> torch.Tensor:
            value = trained_base_weight(name, cache.tensor(name), plan)
            cache.forget_base(name)  # read again only if a stream asks for the raw tensor (0.4 GB a 7B layer)
            return value
        return cache.memo(("trained_base", name), derive)
    return weights


def trained_stream(ckpt: Checkpoint, plan: MergePlan) -> Stream:
    """The training-time model: the base as trained plus the adapter branches (or, fold-aware,
    the folded weights its forward used)."""
    base = trained_base_fn(plan)
    if not plan.folded:
        return Stream("trained", base, branch_hooks(list(ckpt.modules.values())))

    def weights(name: str, cache: PartCache) -> torch.Tensor:
        if ckpt.module_for_weight(name) is None:
            return base(name, cache)
        return cache.memo(("exact", name), lambda: exact_merged_weight(name, cache.tensor(name), ckpt, plan).float())
    return Stream("trained", weights)


def rounded_stream(plan: MergePlan, dtype: torch.dtype, name: str = "rounded base") -> Stream:
    """The base as trained, *without* the adapter, every weight rounded to ``dtype``: what storing
    in ``dtype`` costs a model, independent of the update being verified."""
    base = trained_base_fn(plan)
    return Stream(name, lambda n, cache: base(n, cache).to(dtype))


@dataclass
class ReferenceLogits:
    """Logits of the training-time model, of the base without the adapter, and (optionally)
    of that base with every weight rounded to a storage dtype: the dtype's noise floor."""

    trained: list[torch.Tensor]
    without_adapter: list[torch.Tensor]
    rounded_base: Optional[list[torch.Tensor]] = None


def reference_logits(base: BaseModel, ckpt: Checkpoint, plan: MergePlan, prompts: Sequence[Sequence[int]],
                     progress: Callable = iter, round_dtype: Optional[torch.dtype] = None) -> ReferenceLogits:
    """Logits of the training-time model (base as trained + adapter branches), and without the adapter.

    The second set measures how much the adapter moves the logits: a check is only meaningful
    when its tolerance is well below that. With ``round_dtype``, the base as trained (without
    the adapter) rounded to it. One streamed pass, one decoder layer in memory at a time.
    """
    streams = [trained_stream(ckpt, plan), Stream("without", trained_base_fn(plan))]
    if round_dtype is not None and round_dtype != torch.float32:
        streams.append(rounded_stream(plan, round_dtype))
    out = StreamedForward(base, progress).run(prompts, streams)
    return ReferenceLogits(trained=out["trained"], without_adapter=out["without"], rounded_base=out.get("rounded base"))
