"""A forward pass in bounded memory: one decoder layer's weights at a time, several weight sets at once.

The Hugging Face model is built on the meta device (transformers' own modules give each
family's conventions: rotary halves, GQA, biases, sliding windows). For each part in order —
the embeddings, every decoder layer, the final norm and head — the part is materialized on the
CPU, and for each :class:`Stream` its weights are loaded, its hooks attached, and it runs on the
hidden states that stream carried from the previous part (all prompts, packed into one sequence
with positions restarting at each prompt, so each weight is applied once, not once per prompt). Then the
part is freed. Each base tensor is read from disk once per pass (:class:`PartCache`), however
many streams use it.

What the model's own ``forward`` computes between the parts comes from the family table
(:func:`blora_export.families.scales`): the embedding multiplier (Granite) after the embeddings,
the logit divisor (Granite) and the final softcap (Gemma 2) after the head; the rotation of each
layer kind (Gemma 3's local layers have their own base). Where transformers'
embedding module scales by itself (Gemma's ``*ScaledWordEmbedding``, whose ``scalar_embed_scale``
is the value of its non-persistent ``embed_scale`` buffer), the module's scale is used instead.

A stream is one model: the training-time model, the base without the adapter, the base with
a runtime's rounding, or a float-weight artifact read tensor by tensor.
"""
from __future__ import annotations

import inspect
import logging
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import torch

from .base import BaseModel
from .errors import UnsupportedError
from .families import Scales, scales

log = logging.getLogger(__name__)
EMBED = "model.embed_tokens.weight"


class PartCache:
    """Base tensors (read once) and values derived from them, for the part being run."""

    def __init__(self, base: BaseModel):
        self.base = base
        self._values: dict = {}

    def tensor(self, name: str) -> torch.Tensor:
        """The base's tensor ``name`` (a tied ``lm_head.weight`` is the embeddings)."""
        if name == "lm_head.weight" and name not in self.base.shards:
            name = EMBED
        return self.memo(("base", name), lambda: self.base.tensor(name))

    def memo(self, key, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key not in self._values:
            self._values[key] = compute()
        return self._values[key]

    def get(self, key) -> torch.Tensor:
        return self._values[key]

    def forget_base(self, name: str) -> None:
        """Drop the base tensor ``name`` (once what the streams need has been derived from it)."""
        self.forget(("base", name))

    def forget(self, key) -> None:
        """Drop a memoized value no later stream of this part reads (computed again if one does)."""
        self._values.pop(key, None)

    def has(self, key) -> bool:
        return key in self._values

    def put(self, key, value: torch.Tensor) -> None:
        self._values[key] = value

    def clear(self) -> None:
        """Forget this part's tensors, and close the base's files: their memory-mapped pages would
        otherwise stay resident (and counted) until the whole model had been paged in."""
        self._values.clear()
        handles = getattr(self.base, "_handles", None)
        if isinstance(handles, dict):
            handles.clear()


WeightFn = Callable[[str, PartCache], torch.Tensor]
HookFn = Callable[[torch.nn.Module, str], list]


def base_weights(name: str, cache: PartCache) -> torch.Tensor:
    return cache.tensor(name)


@dataclass
class Stream:
    """One model run through the layers: where its weights come from and how it computes.

    ``weights(name, cache)`` gives the value of parameter ``name`` (Hugging Face name), in any float
    dtype that holds it exactly (the float32 parameter is filled by an in-place cast);
    ``hooks(module, prefix)`` attaches forward hooks to a materialized part (returns handles).
    """

    name: str
    weights: WeightFn = base_weights
    hooks: Optional[HookFn] = None
    states: list = field(default_factory=list)


def skeleton(base: BaseModel):
    """The model on the meta device (no memory for weights), eval mode, float32."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from .reference import _load_errors

    hf_logging.disable_progress_bar()
    with _load_errors(f"transformers cannot build the model in {base.path}"):
        config = AutoConfig.from_pretrained(str(base.path))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


@contextmanager
def materialized(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``module`` with CPU storage for its parameters, back on the meta device afterwards."""
    module.to_empty(device="cpu")
    for sub in module.modules():  # buffers the meta device left without values
        if hasattr(sub, "scalar_embed_scale") and isinstance(getattr(sub, "embed_scale", None), torch.Tensor):
            sub.embed_scale.fill_(sub.scalar_embed_scale)
    try:
        yield module
    finally:
        module.to_empty(device="meta")


def load_part(module: torch.nn.Module, prefix: str, stream: Stream, cache: PartCache) -> list:
    """Fill the part's parameters with ``stream``'s weights; weak references to the values given."""
    refs = []
    with torch.no_grad():
        for local, param in module.named_parameters():
            name = f"{prefix}.{local}" if prefix else local
            value = stream.weights(name, cache)
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(f"{stream.name}: {name} has shape {tuple(value.shape)}, "
                                 f"the model wants {tuple(param.shape)}")
            param.copy_(value)  # casts in place: no float32 temporary of a 16-bit value
            refs.append(weakref.ref(value))
    return refs


def same_values(a: list, b: list) -> bool:
    """Both streams gave this part the very same tensor objects (alive: a memoized value, never a reused id)."""
    return len(a) == len(b) and all(x() is not None and x() is y() for x, y in zip(a, b))


@contextmanager
def hooked(module: torch.nn.Module, prefix: str, stream: Stream) -> Iterator[list]:
    handles = stream.hooks(module, prefix) if stream.hooks is not None else []
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()


def _mask_kind(config, index: int) -> str:
    """``full_attention`` or ``sliding_attention``, as the model's own forward decides for layer ``index``."""
    kinds = getattr(config, "layer_types", None)
    if kinds:  # Qwen2 and newer families: one kind per layer
        return kinds[index]
    return "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"  # Mistral


def causal_mask(config, kind: str, embeds: torch.Tensor, position_ids: torch.Tensor):
    """The attention mask the model's own forward builds (transformers' masking_utils; keyword names
    differ between transformers versions, so only those the installed one takes are passed)."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    make = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
    offered = {"config": config, "inputs_embeds": embeds, "input_embeds": embeds, "attention_mask": None,
               "cache": None, "past_key_values": None, "cache_position": position_ids[0], "position_ids": position_ids}
    accepted = inspect.signature(inspect.unwrap(make)).parameters
    return make(**{k: v for k, v in offered.items() if k in accepted})


#: Prompts are packed into sequences of at most this many tokens (a longer prompt is its own sequence):
#: one pass over each weight per sequence instead of per prompt, and an attention mask of at most
#: ``PACK_TOKENS²`` entries.
PACK_TOKENS = 1024


def pack(prompts: Sequence[Sequence[int]], limit: Optional[int] = None) -> list[list[int]]:
    """Consecutive prompts grouped (by index) so that each group holds at most ``limit`` (default
    :data:`PACK_TOKENS`) tokens; a limit of 1 runs every prompt alone."""
    limit = PACK_TOKENS if limit is None else limit
    groups: list[list[int]] = []
    total = 0
    for i, p in enumerate(prompts):
        if not groups or total + len(p) > limit:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += len(p)
    return groups


@dataclass(frozen=True)
class Packed:
    """Several prompts as one sequence: positions restart at 0 at each prompt, which transformers'
    masks read as packed sequences (block-diagonal causal attention, windows within each prompt)."""

    ids: torch.Tensor  # [1, total]
    positions: torch.Tensor  # [1, total]
    lengths: tuple[int, ...]

    @classmethod
    def of(cls, prompts: Sequence[Sequence[int]]) -> "Packed":
        lengths = tuple(len(p) for p in prompts)
        ids = torch.tensor([[t for p in prompts for t in p]], dtype=torch.long)
        positions = torch.cat([torch.arange(n) for n in lengths])[None]
        return cls(ids, positions, lengths)


class StreamedForward:
    """Run several :class:`Stream` s through a base's architecture, one part at a time."""

    def __init__(self, base: BaseModel, progress: Callable = iter):
        self.base = base
        self.progress = progress if progress is not iter else (lambda it, **_: it)
        self.model = skeleton(base)
        inner = self.model.model
        self.rotary = type(inner.rotary_emb)(config=self.model.config)
        self.scales = scales(base.config)

    def run(self, prompts: Sequence[Sequence[int]], streams: Sequence[Stream]) -> dict[str, list[torch.Tensor]]:
        """float32 logits ``[len(prompt), vocab]`` per prompt, for every stream (by name)."""
        inner, cache, config = self.model.model, PartCache(self.base), self.model.config
        groups = [Packed.of([prompts[i] for i in g]) for g in pack(prompts)]
        initial = [g.ids for g in groups]
        for stream in streams:
            stream.states = initial  # one object: streams with the same weights share their states
        with torch.no_grad():
            rope = self._rotations([g.positions for g in groups])
            masks: dict = {}

            def mask(kind: str, h: torch.Tensor, i: int):
                if (kind, i) not in masks:
                    masks[(kind, i)] = causal_mask(config, kind, h, groups[i].positions)
                    if masks[(kind, i)] is None and len(groups[i].lengths) > 1:  # plain causal: prompts would mix
                        raise UnsupportedError("the installed transformers builds no packed-sequence attention mask "
                                               "from restarting position ids; upgrade transformers (>= 4.56)")
                return masks[(kind, i)]
            embed = 1.0 if hasattr(inner.embed_tokens, "scalar_embed_scale") else self.scales.embedding
            self._part(inner.embed_tokens, "model.embed_tokens", streams, cache,
                       (lambda m, h, i: m(h)) if embed == 1.0 else (lambda m, h, i: m(h) * embed))
            layers = list(enumerate(inner.layers[: config.num_hidden_layers]))
            for index, layer in self.progress(layers, desc="verify layers", unit="layer"):
                kind = _mask_kind(config, index)

                def run_layer(m, h, i, kind=kind):
                    out = m(h, attention_mask=mask(kind, h, i), position_ids=groups[i].positions,
                            position_embeddings=rope[kind][i])
                    return out[0] if isinstance(out, tuple) else out
                self._part(layer, f"model.layers.{index}", streams, cache, run_layer)
            self._part(inner.norm, "model.norm", streams, cache, lambda m, h, i: m(h))
            self._part(self.model.lm_head, "lm_head", streams, cache,
                       lambda m, h, i: final_logits(m(h)[0].float(), self.scales))
        return {s.name: [x for g, logits in zip(groups, s.states) for x in logits.split(g.lengths)] for s in streams}

    def _rotations(self, positions: list) -> dict[str, list]:
        """cos/sin per layer kind and packed sequence: one rotation for every layer, or (Gemma 3, whose rotary
        module takes a ``layer_type``) each kind's own, as the model's forward computes them."""
        kinds = sorted({_mask_kind(self.model.config, i) for i in range(self.model.config.num_hidden_layers)})
        per_type = "layer_type" in inspect.signature(self.rotary.forward).parameters
        x = torch.zeros(1, dtype=torch.float32)
        return {k: [self.rotary(x, p, k) if per_type else self.rotary(x, p) for p in positions] for k in kinds}

    @staticmethod
    def _part(module, prefix: str, streams: Sequence[Stream], cache: PartCache, step) -> None:
        """Materialize ``module``, run every stream's states through it with its weights, free it.

        A stream that brings the same hidden states (the same object) and the same weight objects as
        one already run, with no hooks on this part in either, computes the same function of the same
        input: it takes that stream's outputs (e.g. a merge bit-identical to verify's own rounding)."""
        run: list = []  # (inputs, weight refs, outputs) of the streams run without hooks
        with materialized(module):
            for stream in streams:
                refs = load_part(module, prefix, stream, cache)
                with hooked(module, prefix, stream) as handles:
                    twin = None if handles else next(
                        (out for ins, rs, out in run if ins is stream.states and same_values(rs, refs)), None)
                    outputs = twin if twin is not None else [step(module, h, i) for i, h in enumerate(stream.states)]
                if not handles and twin is None:
                    run.append((stream.states, refs, outputs))
                stream.states = outputs
        cache.clear()


def final_logits(logits: torch.Tensor, sc: Scales) -> torch.Tensor:
    """What the causal LM's ``forward`` does to the head's output: divide by the logit divisor (Granite),
    then ``cap·tanh(logits/cap)`` (Gemma 2's final softcap), as transformers writes them."""
    if sc.logit_divisor != 1.0:
        logits = logits / sc.logit_divisor
    if sc.final_softcap:
        logits = torch.tanh(logits / sc.final_softcap) * sc.final_softcap
    return logits
