"""The ONNX decoder graph (the families of blora_export.families), built node by node with ``onnx.helper``.

One route, kept in this module: the graph is written directly from the Hugging Face config,
in plain opset-21 operators (plus ``com.microsoft::MatMulNBits`` for int4 and int8 weights), so the
output is deterministic and needs neither ``torch.onnx`` nor a model builder. It mirrors
transformers' modeling code, in float32 activations:

* RMSNorm ``x / sqrt(mean(x²) + eps) * w`` (also per head on q and k where the family has q/k
  norms); rotary embedding ``x·cos + rotate_half(x)·sin`` with
  ``inv_freq`` computed exactly as transformers does (float32), ``cos/sin`` from ``position_ids``;
* grouped-query attention without repeating K/V: queries are viewed as
  ``[B, n_kv, n_rep·S, d]`` (query head ``h`` uses K/V head ``h // n_rep``, as ``repeat_kv``);
  causal + padding (+ sliding window) mask built from ``attention_mask``; ``present = concat(past, new)``;
* gated MLP (SiLU, or GELU-tanh for Gemma); tied or untied head; a window per layer (Gemma 2's
  local layers: one mask per distinct window);
* Gemma's ``x·(1 + w)`` norms, also on each sublayer's output (sandwich norms), and tanh softcaps
  on the attention scores and the logits;
* Gemma 3's per-layer-type rotation: a second cos/sin table for the local layers (their own base);
* no rotation on the layers the family marks so (SmolLM3's ``no_rope_layers``);
* the family's multipliers (:func:`blora_export.families.scales`, Granite): on the embeddings, the
  attention scores (in place of ``head_dim^-0.5``), each sublayer's output, and a divisor on the logits.

Inputs/outputs follow onnxruntime-genai's names: ``input_ids``, ``attention_mask``,
``position_ids``, ``past_key_values.{i}.key/value`` ``[B, n_kv, P, d]`` → ``logits``,
``present.{i}.key/value``. Weights come from a provider, one linear group at a time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import numpy as np
import torch
from onnx import TensorProto, helper

from blora_export.base import rope_parameters
from blora_export.errors import UnsupportedError
from blora_export.families import (
    Scales,
    family,
    head_dim,
    layer_kinds,
    layer_windows,
    partial_rotary_factor,
    rope_layers,
    rotary_dim,
    scales,
)

IR_VERSION = 10
OPSET = 21
MS_DOMAIN = "com.microsoft"
MS_OPSET = 1
FLOAT_LOWEST = float(np.finfo(np.float32).min)
ONNX_DTYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
               np.dtype(np.uint8): TensorProto.UINT8, np.dtype(np.int64): TensorProto.INT64}
# rope types whose inv_freq is a constant (transformers computes it once); others depend on the length.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# transformers' activation name -> the gated MLP's nonlinearity in the graph
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


@dataclass(frozen=True)
class LinearGroup:
    """Decoder Linears fused into one ONNX matmul (outputs concatenated in this order)."""

    onnx_name: str
    members: tuple[str, ...]  # module paths under model.layers.{i}.


LINEAR_GROUPS = (
    LinearGroup("attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    LinearGroup("attn.o_proj", ("self_attn.o_proj",)),
    LinearGroup("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj")),
    LinearGroup("mlp.down_proj", ("mlp.down_proj",)),
)
#: The same groups where the base stores them fused (the family's ``fused``: Phi-3): one member each.
FUSED_GROUPS = (
    LinearGroup("attn.qkv_proj", ("self_attn.qkv_proj",)),
    LINEAR_GROUPS[1],
    LinearGroup("mlp.gate_up_proj", ("mlp.gate_up_proj",)),
    LINEAR_GROUPS[3],
)


def linear_groups(model_type: str) -> tuple[LinearGroup, ...]:
    """The four matmuls of a decoder layer and the base Linears whose rows each concatenates."""
    return FUSED_GROUPS if family(model_type).fused else LINEAR_GROUPS


@dataclass(frozen=True)
class FloatLinear:
    """``Y = X @ weight_t (+ bias)``; ``weight_t`` is ``[K, N]`` (float32 or float16, cast at load)."""

    weight_t: np.ndarray
    bias: Optional[np.ndarray] = None


@dataclass(frozen=True)
class QuantLinear:
    """``w = α·(q − z) + c`` per block of ``block_size`` inputs, ``z = 2^(bits−1)`` (MatMulNBits' default
    zero point: 8 for int4, 128 for int8) and ``c = β + z·α``, see docs/FORMATS.md.

    ``packed`` uint8 ``[N, K/bs, bs·bits/8]`` (int4: two codes per byte, low nibble first; int8: one
    code per byte), ``scales`` float32 ``[N, K/bs]``, ``offsets_t`` float32 ``[K/bs, N]``. Computed as
    ``MatMulNBits(X, q, α)`` (no zero points input) plus ``ReduceSum_blocks(X) @ offsets_t``.
    """

    packed: np.ndarray
    scales: np.ndarray
    offsets_t: np.ndarray
    block_size: int
    accuracy_level: int
    bias: Optional[np.ndarray] = None
    bits: int = 4


class WeightProvider(Protocol):
    def linear(self, layer: int, group: LinearGroup) -> FloatLinear | QuantLinear: ...

    def tensor(self, name: str) -> np.ndarray: ...  # embeddings, norms: float arrays

    def transposed(self, name: str): ...  # the untied head, transposed, as row blocks (onnx_weights.RowBlocks)


@dataclass(frozen=True)
class DecoderSpec:
    """The architecture numbers the graph needs, read from a Hugging Face config."""

    model_type: str
    num_layers: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    inv_freq: tuple[float, ...]  # float32 values
    rope_scaling: float  # transformers' attention_factor (1.0 for default rope)
    windows: tuple[Optional[int], ...]  # each layer's attention window (None: global)
    tied: bool
    context_length: int
    qk_norm: bool = False  # per-head RMSNorm of q and k before the rotation (Qwen3)
    scales: Optional[Scales] = None  # embedding/attention/residual multipliers, logit divisor (Granite)
    rope_layers: tuple[bool, ...] = ()  # whether each layer rotates q/k (empty: all; SmolLM3 skips some)
    norm_offset: float = 0.0  # Gemma: norms compute x·(offset + w)
    sandwich_norms: bool = False  # Gemma 2: norms on the attention and MLP outputs too
    activation: str = "silu"  # of the gated MLP: silu or gelu_pytorch_tanh (Gemma)
    # Gemma 3: the local layers' (inv_freq, scaling), their own base and no scaling (None: one rotation)
    local_rope: Optional[tuple[tuple[float, ...], float]] = None
    local_layers: tuple[bool, ...] = ()  # the layers that use local_rope
    rotary_dim: int = 0  # the first dims of each head that rotate (Phi-3: partial_rotary_factor; 0: all)
    # LongRoPE (Phi-3): inv_freq is the short one; (long inv_freq, original length) used when the call's
    # max(position_ids) + 1 exceeds the original length, as transformers' longrope_frequency_update
    long_rope: Optional[tuple[tuple[float, ...], int]] = None
    groups: tuple[LinearGroup, ...] = LINEAR_GROUPS  # the layer's matmuls (Phi-3: its fused Linears)

    @classmethod
    def from_config(cls, config: dict, path=None) -> "DecoderSpec":
        act = config.get("hidden_activation") or config.get("hidden_act") or "silu"
        if act not in ACTIVATIONS:
            raise UnsupportedError(f"hidden activation {act!r}: the ONNX export writes gated MLPs with {', '.join(ACTIVATIONS)}")
        if config.get("use_bidirectional_attention"):
            raise UnsupportedError("use_bidirectional_attention: the ONNX export writes causal decoders")
        fam = family(config["model_type"])
        heads = int(config["num_attention_heads"])
        dim = head_dim(config)
        inv_freq, factor = rope_frequencies(config, dim, path)
        local = [kind == "sliding_attention" for kind in layer_kinds(config)] if fam.layer_rope else []
        return cls(model_type=config["model_type"], num_layers=int(config["num_hidden_layers"]),
                   hidden=int(config["hidden_size"]), intermediate=int(config["intermediate_size"]),
                   vocab=int(config["vocab_size"]), heads=heads,
                   kv_heads=int(config.get("num_key_value_heads") or heads), head_dim=dim,
                   eps=float(config.get("rms_norm_eps", 1e-6)), inv_freq=inv_freq, rope_scaling=factor,
                   windows=layer_windows(config), tied=bool(config.get("tie_word_embeddings", False)),
                   context_length=int(config.get("max_position_embeddings", 4096)),
                   qk_norm=fam.qk_norm, scales=scales(config), rope_layers=rope_layers(config),
                   norm_offset=fam.norm_offset, sandwich_norms=fam.sandwich_norms, activation=ACTIVATIONS[act],
                   local_rope=rope_frequencies(config, dim, path, "sliding_attention") if any(local) else None,
                   local_layers=tuple(local), rotary_dim=rotary_dim(config), groups=linear_groups(config["model_type"]),
                   long_rope=long_frequencies(config, path))


def rope_frequencies(config: dict, head_dim: int, path=None,
                     layer_type: str = "full_attention") -> tuple[tuple[float, ...], float]:
    """``inv_freq`` (float32, exactly as transformers computes it) and the cos/sin scaling factor (of the
    layers of ``layer_type``, where the family sets the rotation per layer type: Gemma 3)."""
    params = rope_parameters(config, layer_type)
    rope_type = params["rope_type"]
    if rope_type not in STATIC_ROPE_TYPES + ("longrope",):
        raise UnsupportedError(f"rope type {rope_type!r} depends on the sequence length; the ONNX export "
                               f"supports {', '.join(STATIC_ROPE_TYPES)} and longrope")
    if rope_type == "default":  # over the rotated dims only (transformers: int(head_dim·partial_rotary_factor))
        base, dim = float(params["rope_theta"]), rotary_dim(config)
        inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim))
        return tuple(float(v) for v in inv), 1.0
    if rotary_dim(config) != head_dim and rope_type != "longrope":  # transformers' longrope rotates part itself
        raise UnsupportedError(f"rope type {rope_type!r} with partial_rotary_factor {partial_rotary_factor(config)}: "
                               "the ONNX export rotates part of each head with the default rope only")
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_config = AutoConfig.from_pretrained(str(path))
    per_type = isinstance(getattr(hf_config, "rope_parameters", None), dict) and layer_type in hf_config.rope_parameters
    inv, factor = ROPE_INIT_FUNCTIONS[rope_type](hf_config, None, **({"layer_type": layer_type} if per_type else {}))
    return tuple(float(v) for v in inv.float()), float(factor)


def long_frequencies(config: dict, path=None) -> Optional[tuple[tuple[float, ...], int]]:
    """LongRoPE's long ``inv_freq`` (transformers, for a sequence one past the original length) and that
    original length; ``None`` for other rope types."""
    params = rope_parameters(config)
    if params["rope_type"] != "longrope":
        return None
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_config = AutoConfig.from_pretrained(str(path))
    original = int(hf_config.rope_parameters["original_max_position_embeddings"])
    inv, _ = ROPE_INIT_FUNCTIONS["longrope"](hf_config, None, seq_len=original + 1)
    return tuple(float(v) for v in inv.float()), original


class Graph:
    """Nodes, initializers (through a tensor store) and small constants, named deterministically."""

    def __init__(self, store):
        self.store = store
        self.nodes: list = []
        self._consts: dict = {}
        self._count = 0

    def op(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, domain: str = "",
           **attrs) -> str | list[str]:
        self._count += 1
        base = f"/{op_type}_{self._count}"
        names = outputs if isinstance(outputs, list) else [f"{base}/out{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=base, domain=domain or None, **attrs))
        return names[0] if len(names) == 1 else names

    def init(self, name: str, array: np.ndarray) -> str:
        return self.store.add(name, array)

    def const(self, values, dtype=np.int64) -> str:
        """A small constant initializer, shared by value."""
        array = np.asarray(values, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            self._consts[key] = self.store.add(f"const_{len(self._consts)}", array)
        return self._consts[key]


def rms_norm(g: Graph, x: str, weight: np.ndarray, eps: float, name: str, offset: float = 0.0) -> str:
    """``x / sqrt(mean(x²) + eps) · (offset + w)`` (Gemma: offset 1, added in float32 as transformers does)."""
    w = g.init(name, (np.float32(offset) + weight.astype(np.float32)) if offset else weight.astype(np.float32))
    mean_sq = g.op("ReduceMean", [g.op("Mul", [x, x]), g.const([-1])], keepdims=1)
    denom = g.op("Sqrt", [g.op("Add", [mean_sq, g.const(eps, np.float32)])])
    return g.op("Mul", [g.op("Div", [x, denom]), w])


def float_weight(g: Graph, name: str, array: np.ndarray) -> str:
    """A float initializer used in float32 math (float16 storage gets a Cast, folded at load)."""
    return as_float32(g, g.init(name, array), array.dtype)


def as_float32(g: Graph, ref: str, dtype: np.dtype) -> str:
    """An initializer stored as ``dtype``, read in float32 math."""
    return ref if dtype == np.float32 else g.op("Cast", [ref], to=TensorProto.FLOAT)


def linear(g: Graph, x: str, data: FloatLinear | QuantLinear, name: str) -> str:
    if isinstance(data, FloatLinear):
        y = g.op("MatMul", [x, float_weight(g, f"{name}.MatMul.weight", data.weight_t)])
    else:
        n, k_blocks, _ = data.packed.shape
        bs = data.block_size
        q = g.init(f"{name}.MatMulNBits.qweight", data.packed)
        scales = g.init(f"{name}.MatMulNBits.scales", data.scales)
        main = g.op("MatMulNBits", [x, q, scales], domain=MS_DOMAIN, K=k_blocks * bs, N=n, bits=data.bits,
                    block_size=bs, accuracy_level=data.accuracy_level)
        sums = g.op("ReduceSum", [g.op("Reshape", [x, g.const([0, 0, k_blocks, bs])]), g.const([-1])], keepdims=0)
        offsets = g.init(f"{name}.block_offsets", data.offsets_t)
        y = g.op("Add", [main, g.op("MatMul", [sums, offsets])])
    if data.bias is not None:
        y = g.op("Add", [y, g.init(f"{name}.bias", data.bias.astype(np.float32))])
    return y


def rotary_tables(g: Graph, inv_freq: tuple[float, ...], scaling: float,
                  long_rope: Optional[tuple[tuple[float, ...], int]] = None) -> tuple[str, str]:
    """``cos, sin`` ``[B, 1, S, d]`` from ``position_ids`` (float32, transformers' formula); with LongRoPE the
    long frequencies where ``max(position_ids) + 1`` exceeds the original length, else ``inv_freq``."""
    pos = g.op("Unsqueeze", [g.op("Cast", ["position_ids"], to=TensorProto.FLOAT), g.const([-1])])
    inv = g.const(inv_freq, np.float32)
    if long_rope is not None:
        longest = g.op("Add", [g.op("ReduceMax", ["position_ids"], keepdims=0), g.const(1)])
        inv = g.op("Where", [g.op("Greater", [longest, g.const(long_rope[1])]), g.const(long_rope[0], np.float32), inv])
    freqs = g.op("Mul", [pos, inv])
    emb = g.op("Concat", [freqs, freqs], axis=-1)
    tables = []
    for fn in ("Cos", "Sin"):
        t = g.op(fn, [emb])
        if scaling != 1.0:
            t = g.op("Mul", [t, g.const(scaling, np.float32)])
        tables.append(g.op("Unsqueeze", [t, g.const([1])]))
    return tables[0], tables[1]


def apply_rotary(g: Graph, x: str, cos: str, sin: str, head_dim: int, rotary_dim: int = 0) -> str:
    """``x·cos + rotate_half(x)·sin`` on the first ``rotary_dim`` dims (0: all), the rest passed through."""
    rot = rotary_dim or head_dim
    if rot != head_dim:
        x, rest = g.op("Split", [x, g.const([rot, head_dim - rot])], outputs=2, axis=-1)
    half = rot // 2
    x1, x2 = g.op("Split", [x, g.const([half, half])], outputs=2, axis=-1)
    rotated = g.op("Concat", [g.op("Neg", [x2]), x1], axis=-1)
    out = g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rotated, sin])])
    return out if rot == head_dim else g.op("Concat", [out, rest], axis=-1)


def attention_bias(g: Graph, window: Optional[int]) -> str:
    """``[B, 1, S, T]`` additive mask: 0 where allowed (causal, not padding, in the window), else lowest."""
    seq = g.op("Shape", ["input_ids"], start=1, end=2)
    total = g.op("Shape", ["attention_mask"], start=1, end=2)
    scalar = lambda v: g.op("Squeeze", [v, g.const([0])])  # noqa: E731
    past = g.op("Sub", [total, seq])
    key_pos = g.op("Range", [g.const(0), scalar(total), g.const(1)])
    query_pos = g.op("Unsqueeze", [g.op("Range", [scalar(past), scalar(total), g.const(1)]), g.const([1])])
    allowed = g.op("LessOrEqual", [key_pos, query_pos])
    if window:
        window_start = g.op("Sub", [query_pos, g.const(window)])
        allowed = g.op("And", [allowed, g.op("Greater", [key_pos, window_start])])
    padding = g.op("Unsqueeze", [g.op("Cast", ["attention_mask"], to=TensorProto.BOOL), g.const([1, 2])])
    allowed = g.op("And", [allowed, padding])
    return g.op("Where", [allowed, g.const(0.0, np.float32), g.const(FLOAT_LOWEST, np.float32)])


def heads_first(g: Graph, x: str, heads: int, head_dim: int) -> str:
    """``[B, S, h·d]`` → ``[B, h, S, d]``."""
    return g.op("Transpose", [g.op("Reshape", [x, g.const([0, 0, heads, head_dim])])], perm=[0, 2, 1, 3])


def attention(g: Graph, spec: DecoderSpec, i: int, x: str, weights: WeightProvider, ctx: dict) -> str:
    hd, nh, nkv = spec.head_dim, spec.heads, spec.kv_heads
    qkv = linear(g, x, weights.linear(i, spec.groups[0]), f"model.layers.{i}.attn.qkv_proj")
    q, k, v = g.op("Split", [qkv, g.const([nh * hd, nkv * hd, nkv * hd])], outputs=3, axis=-1)
    q, k = heads_first(g, q, nh, hd), heads_first(g, k, nkv, hd)
    if spec.qk_norm:  # RMSNorm over each head's d values, before the rotation
        prefix = f"model.layers.{i}.self_attn"
        q = rms_norm(g, q, weights.tensor(f"{prefix}.q_norm.weight"), spec.eps, f"{prefix}.q_norm.weight",
                     spec.norm_offset)
        k = rms_norm(g, k, weights.tensor(f"{prefix}.k_norm.weight"), spec.eps, f"{prefix}.k_norm.weight",
                     spec.norm_offset)
    if not spec.rope_layers or spec.rope_layers[i]:  # SmolLM3's NoPE layers: no rotation
        local = bool(spec.local_layers) and spec.local_layers[i] and spec.local_rope is not None
        cos, sin = ctx["local_rope"] if local else ctx["rope"]
        q = apply_rotary(g, q, cos, sin, hd, spec.rotary_dim)
        k = apply_rotary(g, k, cos, sin, hd, spec.rotary_dim)
    k_all = g.op("Concat", [f"past_key_values.{i}.key", k], outputs=[f"present.{i}.key"], axis=2)
    v_all = g.op("Concat", [f"past_key_values.{i}.value", heads_first(g, v, nkv, hd)],
                 outputs=[f"present.{i}.value"], axis=2)
    grouped = g.op("Reshape", [q, g.const([0, nkv, -1, hd])])  # [B, n_kv, n_rep·S, d]
    scores = g.op("MatMul", [grouped, g.op("Transpose", [k_all], perm=[0, 1, 3, 2])])
    scale = spec.scales.attention if spec.scales else hd ** -0.5
    scores = softcapped(g, g.op("Mul", [scores, g.const(scale, np.float32)]), spec.scales and spec.scales.attn_softcap)
    scores = g.op("Add", [g.op("Reshape", [scores, g.const([0, nh, -1, 0])]), ctx["masks"][spec.windows[i]]])
    probs = g.op("Reshape", [g.op("Softmax", [scores], axis=-1), g.const([0, nkv, -1, 0])])
    out = g.op("Reshape", [g.op("MatMul", [probs, v_all]), g.const([0, nh, -1, hd])])
    out = g.op("Reshape", [g.op("Transpose", [out], perm=[0, 2, 1, 3]), g.const([0, 0, nh * hd])])
    return linear(g, out, weights.linear(i, spec.groups[1]), f"model.layers.{i}.attn.o_proj")


def mlp(g: Graph, spec: DecoderSpec, i: int, x: str, weights: WeightProvider) -> str:
    gate_up = linear(g, x, weights.linear(i, spec.groups[2]), f"model.layers.{i}.mlp.gate_up_proj")
    gate, up = g.op("Split", [gate_up, g.const([spec.intermediate, spec.intermediate])], outputs=2, axis=-1)
    if spec.activation == "gelu_tanh":
        act = g.op("Mul", [g.op("Gelu", [gate], approximate="tanh"), up])
    else:
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
    return linear(g, act, weights.linear(i, spec.groups[3]), f"model.layers.{i}.mlp.down_proj")


def softcapped(g: Graph, x: str, cap: Optional[float]) -> str:
    """``cap · tanh(x / cap)`` (Gemma 2's softcaps; no node without one)."""
    if not cap:
        return x
    c = g.const(cap, np.float32)
    return g.op("Mul", [g.op("Tanh", [g.op("Div", [x, c])]), c])


def scaled(g: Graph, x: str, factor: float) -> str:
    """``x · factor`` (no node for 1)."""
    return x if factor == 1.0 else g.op("Mul", [x, g.const(factor, np.float32)])


def decoder_io(spec: DecoderSpec) -> tuple[list, list]:
    """Graph inputs and outputs with onnxruntime-genai's names and dynamic dimension names."""
    kv = ["batch_size", spec.kv_heads, "past_sequence_length", spec.head_dim]
    present = ["batch_size", spec.kv_heads, "total_sequence_length", spec.head_dim]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                            ["batch_size", "total_sequence_length"]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                             ["batch_size", "sequence_length", spec.vocab])]
    for i in range(spec.num_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT, kv))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT, present))
    return inputs, outputs


def decoder_layer(g: Graph, spec: DecoderSpec, i: int, x: str, weights: WeightProvider, ctx: dict, sc: Scales) -> str:
    """One pre-norm block: ``x + attn(norm(x))``, then ``+ mlp(norm(·))``; with sandwich norms (Gemma 2)
    each sublayer's output is normed too (``post_attention_layernorm`` / ``post_feedforward_layernorm``,
    the MLP's input norm being ``pre_feedforward_layernorm``); Granite's residual multiplier on each."""
    def norm(x: str, local: str) -> str:
        name = f"model.layers.{i}.{local}.weight"
        return rms_norm(g, x, weights.tensor(name), spec.eps, name, spec.norm_offset)
    h = attention(g, spec, i, norm(x, "input_layernorm"), weights, ctx)
    if spec.sandwich_norms:
        h = norm(h, "post_attention_layernorm")
    x = g.op("Add", [x, scaled(g, h, sc.residual)])
    h = mlp(g, spec, i, norm(x, "pre_feedforward_layernorm" if spec.sandwich_norms else "post_attention_layernorm"),
            weights)
    if spec.sandwich_norms:
        h = norm(h, "post_feedforward_layernorm")
    return g.op("Add", [x, scaled(g, h, sc.residual)])


def build_decoder(spec: DecoderSpec, weights: WeightProvider, store, progress=iter):
    """The whole decoder as an ``onnx.ModelProto`` without initializers: they stay in ``store``
    (written as they are made) and join the graph once the store is finished."""
    g = Graph(store)
    embed_ref = float_weight(g, "model.embed_tokens.weight", weights.tensor("model.embed_tokens.weight"))  # not kept
    sc = spec.scales or Scales(1.0, spec.head_dim ** -0.5, 1.0, 1.0)
    x = scaled(g, g.op("Gather", [embed_ref, "input_ids"], axis=0), sc.embedding)
    ctx = {"masks": {w: attention_bias(g, w) for w in sorted(set(spec.windows), key=lambda w: w or 0)}}
    ctx["rope"] = rotary_tables(g, spec.inv_freq, spec.rope_scaling, spec.long_rope)
    if spec.local_rope is not None:  # Gemma 3's local layers: their own base
        ctx["local_rope"] = rotary_tables(g, *spec.local_rope)
    for i in progress(range(spec.num_layers), desc="onnx layers", total=spec.num_layers, unit="layer"):
        x = decoder_layer(g, spec, i, x, weights, ctx, sc)
    x = rms_norm(g, x, weights.tensor("model.norm.weight"), spec.eps, "model.norm.weight", spec.norm_offset)
    if spec.tied:
        head = g.op("Transpose", [embed_ref], perm=[1, 0])
    else:
        blocks = weights.transposed("lm_head.weight")
        head = as_float32(g, g.store.add_blocks("lm_head.MatMul.weight", blocks), blocks.dtype)
    logits = g.op("MatMul", [x, head])
    if sc.logit_divisor != 1.0:  # as transformers: logits / logits_scaling, then the final softcap
        logits = g.op("Div", [logits, g.const(sc.logit_divisor, np.float32)])
    g.op("Identity", [softcapped(g, logits, sc.final_softcap)], outputs=["logits"])
    inputs, outputs = decoder_io(spec)
    graph = helper.make_graph(g.nodes, "blora_decoder", inputs, outputs)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, MS_OPSET)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION, producer_name="blora-export")
