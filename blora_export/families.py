"""One row per Hugging Face ``model_type``: the conventions every writer reads.

A family is the set of facts that make an architecture differ from plain Llama, read once here
and never re-derived by a writer (docs/ARCHITECTURES.md says where each fact comes from in
llama.cpp's converter and onnxruntime-genai's builder):

* ``gguf_arch`` / ``permute_qk``: llama.cpp's architecture name (gguf-py ``MODEL_ARCH``) and
  whether its graph rotates adjacent pairs (then q/k rows are permuted, docs/FORMATS.md);
* ``qk_norm``: a per-head RMSNorm (size head_dim) on queries and keys before the rotation
  (Qwen3's ``q_norm`` / ``k_norm``);
* ``norm_offset``: the constant the runtime adds to every stored norm weight (0: ``x·w``);
* multipliers (:func:`scales`), each the config key it is read from (``None``: the family has none):
  ``embedding_scale`` on the token embeddings (Granite's ``embedding_multiplier``; Gemma's
  :data:`SQRT_HIDDEN`), ``attention_scale`` replacing ``head_dim^-0.5`` on the attention scores,
  ``residual_scale`` on each sublayer's output before the residual add, ``logit_divisor`` the
  logits are divided by (Granite's ``logits_scaling``) and ``final_softcap`` (Gemma 2:
  ``cap·tanh(logits/cap)``). Granite's embedding multiplier, the divisor and the softcap sit in the
  Hugging Face model's ``forward`` outside its parts, so verify's streamed forward applies them
  from here (:mod:`blora_export.stream`; Gemma's embedding module scales by itself); the others
  are inside the decoder layer module;
* ``no_rope_key``: the config key of a per-layer list, 1 where the layer rotates q/k and 0 where it
  does not (SmolLM3's ``no_rope_layers``);
* ``query_scalar``: the config key ``q`` of an attention scale ``q^-0.5`` (Gemma's
  ``query_pre_attn_scalar``); ``attn_softcap``: the config key of ``cap·tanh(scores/cap)``;
* ``sandwich_norms``: norms on each sublayer's output too (Gemma 2 and 3); ``layer_windows``: the
  config's ``layer_types`` marks the layers that attend within ``sliding_window`` (Gemma 2 and 3);
* ``layer_rope``: the rotation is set per layer type (Gemma 3: ``rope_parameters`` keyed by
  ``full_attention`` / ``sliding_attention``, the local layers with their own base and no scaling;
  :func:`layer_rope_parameters`);
* ``formats``: the formats whose writers implement the row (``None``: all); the others refuse it
  in one line (:func:`require_format`);
* ``fused``: the base stores its Linears fused (Phi-3: ``qkv_proj`` = q|k|v rows, ``gate_up_proj`` =
  gate|up rows): each is one adapted module (its λ inferred from the fused shape) and every writer keeps
  it fused or splits its rows in that order (:data:`FUSED_MEMBERS`);
* ``rope_types``: the rope scalings the GGUF writer can represent for this family;
* ``partial_rotary``: the family's model rotates the first ``partial_rotary_factor``·head_dim dims only
  (Phi-3; :func:`rotary_dim`);
* ``window_key``: the config key of one attention window shared by every layer (Mistral);
* ``genai_type``: onnxruntime-genai's ``model.type``; ``mlx_model``: the mlx-lm module that runs it.

An architecture without a row is refused in one line naming the supported ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .errors import BadInputError, UnsupportedError


@dataclass(frozen=True)
class Family:
    model_type: str
    gguf_arch: str  # gguf.MODEL_ARCH member name
    permute_qk: bool
    genai_type: str
    mlx_model: str
    qk_norm: bool = False
    norm_offset: float = 0.0
    embedding_scale: Optional[str] = None  # config key, or SQRT_HIDDEN
    attention_scale: Optional[str] = None
    residual_scale: Optional[str] = None
    logit_divisor: Optional[str] = None
    fused: tuple[str, ...] = ()
    rope_types: tuple[str, ...] = ("default", "linear")
    window_key: Optional[str] = None
    no_rope_key: Optional[str] = None
    attn_softcap: Optional[str] = None  # config keys of Gemma 2's logit softcaps
    final_softcap: Optional[str] = None
    query_scalar: Optional[str] = None  # config key q: attention scale q^-0.5 (Gemma's query_pre_attn_scalar)
    sandwich_norms: bool = False  # Gemma 2: norms after attention and MLP outputs too (pre/post feedforward)
    layer_windows: bool = False  # config layer_types marks the layers attending within sliding_window
    layer_rope: bool = False  # Gemma 3: rope_parameters per layer type (local base, scaling on global layers)
    formats: Optional[tuple[str, ...]] = None  # the formats whose writers implement the row (None: all)
    partial_rotary: bool = False  # transformers' model reads partial_rotary_factor (Phi-3); others rotate all dims


#: ``embedding_scale`` of a family whose embeddings are multiplied by √hidden_size (Gemma).
SQRT_HIDDEN = "sqrt(hidden_size)"


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", "LLAMA", permute_qk=True, genai_type="llama", mlx_model="llama",
           rope_types=("default", "linear", "llama3")),
    # Mistral v0.x runs as llama in llama.cpp and mlx-lm; its one window is handled by the writers.
    Family("mistral", "LLAMA", permute_qk=True, genai_type="mistral", mlx_model="llama",
           window_key="sliding_window"),
    Family("qwen2", "QWEN2", permute_qk=False, genai_type="qwen2", mlx_model="qwen2"),
    Family("qwen3", "QWEN3", permute_qk=False, genai_type="qwen3", mlx_model="qwen3", qk_norm=True),
    # rope off on the layers no_rope_layers marks 0 (SmolLM3-3B: every 4th); otherwise llama
    Family("smollm3", "SMOLLM3", permute_qk=True, genai_type="smollm3", mlx_model="smollm3",
           no_rope_key="no_rope_layers"),
    # llama.cpp's converter writes Granite as llama (q/k permuted) with its four multipliers as keys
    Family("granite", "GRANITE", permute_qk=True, genai_type="granite", mlx_model="granite",
           embedding_scale="embedding_multiplier", attention_scale="attention_multiplier",
           residual_scale="residual_multiplier", logit_divisor="logits_scaling"),
    # Gemma 2: x·(1+w) norms, also after attention and MLP; √hidden embeddings; q scaled by
    # query_pre_attn_scalar^-0.5; tanh softcaps on the scores and the logits; every other layer local.
    # mlx-lm's gemma2 has no window: every format but MLX (llama.cpp's graph fixes the window pattern and
    # picks the attention scale by model size: the GGUF writer checks both against the config).
    Family("gemma2", "GEMMA2", permute_qk=False, genai_type="gemma2", mlx_model="gemma2", norm_offset=1.0,
           embedding_scale=SQRT_HIDDEN, attn_softcap="attn_logit_softcapping",
           final_softcap="final_logit_softcapping", query_scalar="query_pre_attn_scalar", sandwich_norms=True,
           layer_windows=True, formats=("gguf", "onnx", "safetensors", "peft")),
    # Gemma 3 (text): as Gemma 2 plus per-head q/k norms (x·(1+w) too), its own rope per layer type (local
    # layers: rope_local_base_freq, no scaling), usually five local layers to one global, no score softcap.
    # The writers whose runtime fixes a convention check the config against it (GGUF: attention scale and
    # caps; MLX: a periodic local/global pattern and no softcap).
    Family("gemma3_text", "GEMMA3", permute_qk=False, genai_type="gemma3_text", mlx_model="gemma3_text",
           qk_norm=True, norm_offset=1.0, embedding_scale=SQRT_HIDDEN, attn_softcap="attn_logit_softcapping",
           final_softcap="final_logit_softcapping", query_scalar="query_pre_attn_scalar", sandwich_norms=True,
           layer_windows=True, layer_rope=True),
    # Phi-3 / Phi-3.5-mini / Phi-4-mini: q|k|v and gate|up stored fused (llama.cpp's phi3 keeps them fused:
    # attn_qkv, ffn_up holding gate|up; mlx-lm's phi3 too), rotate-half (no q/k permutation), rotation on the
    # first partial_rotary_factor·head_dim dims (Phi-4-mini: 0.75), one optional window (sliding_window).
    Family("phi3", "PHI3", permute_qk=False, genai_type="phi3", mlx_model="phi3", fused=("qkv_proj", "gate_up_proj"),
           rope_types=("default", "longrope"), window_key="sliding_window", partial_rotary=True),
)}
#: A fused Linear's parts, in the order of its output rows (transformers' Phi3: ``split`` / ``chunk(2)``).
FUSED_MEMBERS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
SUPPORTED = tuple(FAMILIES)


def family(model_type: Optional[str]) -> Family:
    """The row of ``model_type``; an unsupported one is a one-line error naming the supported ones."""
    if model_type not in FAMILIES:
        raise UnsupportedError(f"base model architecture {model_type!r} is not supported; "
                               f"supported: {', '.join(SUPPORTED)}")
    return FAMILIES[model_type]


@dataclass(frozen=True)
class Scales:
    """A family's multipliers, read from a config: 1 (and ``head_dim^-0.5`` for the attention, no
    softcap) where the family has none."""

    embedding: float
    attention: float
    residual: float
    logit_divisor: float
    final_softcap: Optional[float] = None
    attn_softcap: Optional[float] = None


def scales(config: dict) -> Scales:
    """The multipliers of ``config``'s family (the config keys its row names)."""
    fam = family(config.get("model_type"))

    def read(key: Optional[str], default: float) -> float:
        if key is None:
            return default
        if key == SQRT_HIDDEN:
            return float(config["hidden_size"]) ** 0.5
        if config.get(key) is None:
            raise BadInputError(f"config.json of a {fam.model_type} model lacks {key!r}")
        return float(config[key])
    attention = read(fam.query_scalar, 1.0) ** -0.5 if fam.query_scalar else head_dim(config) ** -0.5
    caps = [config.get(key) if key else None for key in (fam.attn_softcap, fam.final_softcap)]
    return Scales(embedding=read(fam.embedding_scale, 1.0), attention=read(fam.attention_scale, attention),
                  residual=read(fam.residual_scale, 1.0), logit_divisor=read(fam.logit_divisor, 1.0),
                  final_softcap=None if caps[1] is None else float(caps[1]),
                  attn_softcap=None if caps[0] is None else float(caps[0]))


def head_dim(config: dict) -> int:
    """``head_dim`` from the config when given (Qwen3, Gemma: it may differ from hidden/heads)."""
    return int(config.get("head_dim") or int(config["hidden_size"]) // int(config["num_attention_heads"]))


def partial_rotary_factor(config: dict) -> float:
    """The fraction of each head's dims that is rotated (transformers 5 keeps it in ``rope_parameters``,
    4.x at the top level; 1 when neither says, or where the family's model ignores it)."""
    from .base import rope_parameters

    if not family(config.get("model_type")).partial_rotary:
        return 1.0
    value = rope_parameters(config).get("partial_rotary_factor", config.get("partial_rotary_factor"))
    return 1.0 if value is None else float(value)


def rotary_dim(config: dict) -> int:
    """The dims of each head the rotation acts on, the first ones (transformers: ``int(head_dim·factor)``)."""
    dim = int(head_dim(config) * partial_rotary_factor(config))
    if dim % 2 or dim < 2:
        raise BadInputError(f"partial_rotary_factor {partial_rotary_factor(config)} gives {dim} rotated dims of "
                            f"{head_dim(config)}: it must be an even number >= 2")
    return dim


def fused_rows(config: dict, module: str) -> Optional[tuple[int, ...]]:
    """The output rows of each part of a fused Linear (``qkv_proj``: q, k, v; ``gate_up_proj``: gate, up),
    or ``None`` for a Linear that is not fused."""
    if module not in FUSED_MEMBERS:
        return None
    if module == "gate_up_proj":
        return (int(config["intermediate_size"]),) * 2
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    return heads * head_dim(config), kv * head_dim(config), kv * head_dim(config)


def attention_window(config: dict) -> Optional[int]:
    """The attention window every layer shares, when it is shorter than the model's context
    (``None``: attention is global over ``max_position_embeddings``)."""
    fam = family(config.get("model_type"))
    if config.get("use_sliding_window"):  # Qwen2/Qwen3, SmolLM3: windows on some layers only
        raise UnsupportedError(f"{fam.model_type} with use_sliding_window=true (per-layer windows) is not supported; "
                               "export a config with use_sliding_window=false")
    if fam.window_key is None or not config.get(fam.window_key):
        return None
    window = int(config[fam.window_key])
    context = int(config.get("max_position_embeddings") or 0)
    return window if context == 0 or window < context else None


def rope_layers(config: dict) -> tuple[bool, ...]:
    """Whether each decoder layer rotates q and k: every layer, except where the family's
    ``no_rope_key`` list holds 0 (SmolLM3; without the list, transformers' default: every
    ``no_rope_layer_interval``-th layer, 4 unless the config says otherwise)."""
    fam, n = family(config.get("model_type")), int(config["num_hidden_layers"])
    if fam.no_rope_key is None:
        return (True,) * n
    flags = config.get(fam.no_rope_key)
    if flags is None:
        interval = int(config.get("no_rope_layer_interval") or 4)
        flags = [int((i + 1) % interval != 0) for i in range(n)]
    if len(flags) != n:
        raise BadInputError(f"config.json's {fam.no_rope_key} has {len(flags)} entries for {n} layers")
    return tuple(bool(f) for f in flags)


def layer_windows(config: dict) -> tuple[Optional[int], ...]:
    """The attention window of each decoder layer (``None``: global): the one window of
    :func:`attention_window` on every layer, or ``sliding_window`` on the layers ``layer_types`` marks
    ``sliding_attention`` (Gemma 2: every other layer; Gemma 3: five of every six)."""
    fam, n = family(config.get("model_type")), int(config["num_hidden_layers"])
    if not fam.layer_windows:
        return (attention_window(config),) * n
    kinds, window = layer_kinds(config), config.get("sliding_window")
    return tuple(int(window) if window and kind == "sliding_attention" else None for kind in kinds)


def layer_kinds(config: dict) -> tuple[str, ...]:
    """Each decoder layer's attention kind, ``sliding_attention`` or ``full_attention`` (``layer_types``;
    without it, transformers' defaults: Gemma 2 every other layer local, Gemma 3 five of every six)."""
    fam, n = family(config.get("model_type")), int(config["num_hidden_layers"])
    kinds = config.get("layer_types")
    if not kinds:
        period = int(config.get("sliding_window_pattern") or (6 if fam.layer_rope else 2))
        kinds = ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(n)]
    if len(kinds) != n:
        raise BadInputError(f"config.json's layer_types has {len(kinds)} entries for {n} layers")
    return tuple(kinds)


def layer_rope_parameters(config: dict) -> tuple[dict, ...]:
    """Each decoder layer's rotary settings (``rope_theta``, ``rope_type`` and the scaling's keys): the
    config's one set on every layer, or (Gemma 3) the set of the layer's type."""
    from .base import rope_parameters

    fam = family(config.get("model_type"))
    if not fam.layer_rope:
        return (rope_parameters(config),) * int(config["num_hidden_layers"])
    return tuple(rope_parameters(config, kind) for kind in layer_kinds(config))


def require_format(config: dict, fmt: str) -> None:
    """Refuse, in one line naming the formats that work, a format whose writer does not implement the family."""
    fam = family(config.get("model_type"))
    if fam.formats is not None and fmt not in fam.formats:
        raise UnsupportedError(f"{fam.model_type} is not exported to {fmt} yet (its conventions are implemented "
                               f"for {', '.join(fam.formats)}): export to one of those")
