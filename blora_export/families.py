"""One row per Hugging Face ``model_type``: the conventions every writer reads.

A family is the set of facts that make an architecture differ from plain Llama, read once here
and never re-derived by a writer (docs/ARCHITECTURES.md says where each fact comes from in
llama.cpp's converter and onnxruntime-genai's builder):

* ``gguf_arch`` / ``permute_qk``: llama.cpp's architecture name (gguf-py ``MODEL_ARCH``) and
  whether its graph rotates adjacent pairs (then q/k rows are permuted, docs/FORMATS.md);
* ``qk_norm``: a per-head RMSNorm (size head_dim) on queries and keys before the rotation
  (Qwen3's ``q_norm`` / ``k_norm``);
* ``norm_offset``: the constant the runtime adds to every stored norm weight (0: ``x·w``);
* ``embedding_scale``: a multiplier on the token embeddings (``None``: none);
* ``fused``: Linear groups the base itself stores fused (none of the supported rows);
* ``rope_types``: the rope scalings each writer can represent for this family;
* ``window_key``: the config key of one attention window shared by every layer (Mistral);
* ``genai_type``: onnxruntime-genai's ``model.type``; ``mlx_model``: the mlx-lm module that runs it.

An architecture without a row is refused in one line naming the supported ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .errors import UnsupportedError


@dataclass(frozen=True)
class Family:
    model_type: str
    gguf_arch: str  # gguf.MODEL_ARCH member name
    permute_qk: bool
    genai_type: str
    mlx_model: str
    qk_norm: bool = False
    norm_offset: float = 0.0
    embedding_scale: Optional[float] = None
    fused: tuple[str, ...] = ()
    rope_types: tuple[str, ...] = ("default", "linear")
    window_key: Optional[str] = None
    attn_softcap: Optional[str] = None  # config keys of Gemma 2's logit softcaps
    final_softcap: Optional[str] = None

    def unimplemented(self) -> list[str]:
        """Conventions of this row that no writer implements yet (a row that sets one is refused)."""
        return [name for name, value in (("norm offset", self.norm_offset), ("embedding scale", self.embedding_scale),
                                         ("fused projections", self.fused), ("attention softcap", self.attn_softcap),
                                         ("final logit softcap", self.final_softcap)) if value]


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", "LLAMA", permute_qk=True, genai_type="llama", mlx_model="llama",
           rope_types=("default", "linear", "llama3")),
    # Mistral v0.x runs as llama in llama.cpp and mlx-lm; its one window is handled by the writers.
    Family("mistral", "LLAMA", permute_qk=True, genai_type="mistral", mlx_model="llama",
           window_key="sliding_window"),
    Family("qwen2", "QWEN2", permute_qk=False, genai_type="qwen2", mlx_model="qwen2"),
    Family("qwen3", "QWEN3", permute_qk=False, genai_type="qwen3", mlx_model="qwen3", qk_norm=True),
)}
SUPPORTED = tuple(m for m, f in FAMILIES.items() if not f.unimplemented())


def family(model_type: Optional[str]) -> Family:
    """The row of ``model_type``; an unsupported one is a one-line error naming the supported ones."""
    if model_type not in FAMILIES:
        raise UnsupportedError(f"base model architecture {model_type!r} is not supported; "
                               f"supported: {', '.join(SUPPORTED)}")
    row = FAMILIES[model_type]
    if row.unimplemented():
        raise UnsupportedError(f"{model_type}: the writers do not implement its {', '.join(row.unimplemented())} yet")
    return row


def head_dim(config: dict) -> int:
    """``head_dim`` from the config when given (Qwen3, Gemma: it may differ from hidden/heads)."""
    return int(config.get("head_dim") or int(config["hidden_size"]) // int(config["num_attention_heads"]))


def attention_window(config: dict) -> Optional[int]:
    """The attention window every layer shares, when it is shorter than the model's context
    (``None``: attention is global over ``max_position_embeddings``)."""
    fam = family(config.get("model_type"))
    if config.get("model_type") == "qwen2" and config.get("use_sliding_window"):
        raise UnsupportedError("qwen2 with use_sliding_window=true (per-layer windows) is not supported; "
                               "export a config with use_sliding_window=false")
    if fam.window_key is None or not config.get(fam.window_key):
        return None
    window = int(config[fam.window_key])
    context = int(config.get("max_position_embeddings") or 0)
    return window if context == 0 or window < context else None
