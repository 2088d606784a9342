"""The base model: a local Hugging Face folder read lazily, one tensor at a time.

Only safetensors are read (never pickle). Single-file and sharded layouts are supported.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch

from .errors import BadInputError, UnsupportedError, problems_error
from .families import family
from .tensor_io import TensorEntry, all_finite, read_header, read_tensor

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "generation_config.json")
DECODER_LINEAR = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.weight$")


@dataclass
class TensorFolder:
    """The one safetensors reader: a folder's tensors (``model.safetensors``, a sharded index,
    or any ``model*.safetensors``), read lazily.

    ``tensor(name)`` reads one tensor into memory the caller owns (:mod:`.tensor_io`: no memory
    map is kept open, so neither the model nor its pages stay resident). Never unpickles.
    """

    path: Path
    shards: dict[str, Path]  # tensor name -> file
    _headers: dict = field(default_factory=dict, repr=False)  # file -> {name: TensorEntry}

    @classmethod
    def open(cls, path: str | Path) -> "TensorFolder":
        return cls(path=Path(path), shards=index_shards(Path(path)))

    def get(self, name: str) -> Optional[torch.Tensor]:
        """The tensor as stored (non-finite values allowed), or ``None`` when there is none of that name."""
        return self.tensor(name, finite=False) if name in self.shards else None

    def names(self) -> list[str]:
        return list(self.shards)

    def __contains__(self, name: str) -> bool:
        return name in self.shards

    def _entry(self, name: str) -> TensorEntry:
        file = self._file(name)
        if file not in self._headers:
            self._headers[file] = read_header(file)
        entry = self._headers[file].get(name)
        if entry is None:
            raise BadInputError(f"cannot read {name} from {file}: the file has no such tensor")
        return entry

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def tensor(self, name: str, finite: bool = True) -> torch.Tensor:
        """One tensor, read from disk now; non-finite values are bad input (unless ``finite=False``:
        an artifact under verification may hold them, and then fails its checks)."""
        value = read_tensor(self._entry(name))
        if finite and not all_finite(value):
            raise BadInputError(f"tensor {name} in {self._file(name)} contains NaN or infinite values")
        return value

    def _file(self, name: str) -> Path:
        if name not in self.shards:
            raise BadInputError(f"{self.path} has no tensor {name!r}")
        return self.shards[name]

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor in file order, one at a time."""
        for name in self.names():
            yield name, self.tensor(name)

    def tensor_dtype(self, name: str) -> torch.dtype:
        return self._entry(name).dtype


@dataclass
class BaseModel(TensorFolder):
    """A Hugging Face model folder: ``config.json`` plus its tensors (a :class:`TensorFolder`)."""

    config: dict = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | Path) -> "BaseModel":
        path = Path(path)
        if not path.is_dir():
            raise BadInputError(f"base model {path} is not a folder; pass --base DIR (a local Hugging Face model folder)")
        config_file = path / "config.json"
        if not config_file.is_file():
            raise BadInputError(f"base model {path} has no config.json")
        config = read_json(config_file)
        family(config.get("model_type"))  # an unsupported architecture: one line naming the supported ones
        model = cls(path=path, config=config, shards=index_shards(path))
        problems = model.config_problems()
        if problems:
            raise problems_error(f"base model {config_file}: inconsistent with itself or the weights", problems)
        return model

    def config_problems(self) -> list[str]:
        """Where ``config.json`` and the tensors' shapes disagree (every problem, not the first)."""
        cfg, problems = self.config, []
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            if not isinstance(cfg.get(key), int) or isinstance(cfg.get(key), bool) or cfg.get(key) < 1:
                problems.append(f"{key} must be a whole number >= 1, got {cfg.get(key)!r}")
        if problems:
            return problems
        problems += self._head_problems()
        embed = "model.embed_tokens.weight"
        if embed not in self.shards:
            return problems + [f"no {embed}"]
        rows, cols = self.shape(embed)
        if (rows, cols) != (cfg["vocab_size"], cfg["hidden_size"]):
            problems.append(f"{embed} is [{rows}, {cols}] but vocab_size, hidden_size = "
                            f"{cfg['vocab_size']}, {cfg['hidden_size']}")
        layers = {int(m[1]) for m in map(DECODER_LINEAR.match, self.names()) if m}
        if layers != set(range(cfg["num_hidden_layers"])):
            problems.append(f"num_hidden_layers is {cfg['num_hidden_layers']} but the weights hold "
                            f"{len(layers)} layers")
        if "model.norm.weight" not in self.shards:
            problems.append("no model.norm.weight")
        if not cfg.get("tie_word_embeddings", False) and "lm_head.weight" not in self.shards:
            problems.append("no lm_head.weight and tie_word_embeddings is false")
        return problems

    def _head_problems(self) -> list[str]:
        """Attention heads: KV heads divide the heads, and the q/k projections have their rows."""
        cfg, problems = self.config, []
        heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        if not isinstance(kv, int) or isinstance(kv, bool) or kv < 1:
            return [f"num_key_value_heads must be a whole number >= 1, got {kv!r}"]
        if heads % kv:
            problems.append(f"num_key_value_heads {kv} does not divide num_attention_heads {heads}")
        if not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim < 1:
            return problems + [f"head_dim must be a whole number >= 1, got {head_dim!r}"]
        if not cfg.get("head_dim") and cfg["hidden_size"] % heads:
            problems.append(f"num_attention_heads {heads} does not divide hidden_size {cfg['hidden_size']} "
                            "(and no head_dim is given)")
        for proj, n in (("q_proj", heads), ("k_proj", kv), ("v_proj", kv), ("qkv_proj", heads + 2 * kv)):
            name = f"model.layers.0.self_attn.{proj}.weight"
            if name in self.shards and self.shape(name)[0] != n * head_dim:
                problems.append(f"{name} has {self.shape(name)[0]} rows but {n} heads x head_dim {head_dim} "
                                f"= {n * head_dim}")
        return problems

    @property
    def model_type(self) -> str:
        return self.config["model_type"]

    def linear_names(self) -> list[str]:
        """Weights of the decoder's Linear layers (what a quantized base quantizes)."""
        return [n for n in self.names() if DECODER_LINEAR.match(n)]

    def tokenizer_files(self) -> list[Path]:
        return [self.path / f for f in TOKENIZER_FILES if (self.path / f).is_file()]


#: transformers' attention kinds; Gemma 3 keys ``rope_parameters`` by them.
LAYER_TYPES = ("full_attention", "sliding_attention")


def rope_parameters(config: dict, layer_type: str = "full_attention") -> dict:
    """Rotary settings of a model config: ``rope_parameters`` (transformers 5) or the top-level
    ``rope_theta`` + ``rope_scaling`` (4.x); always with ``rope_theta`` and ``rope_type``. Where they
    differ per layer type (Gemma 3: ``rope_parameters`` keyed by :data:`LAYER_TYPES`; in 4.x, the local
    layers' ``rope_local_base_freq`` without scaling), those of ``layer_type``."""
    params = dict(config.get("rope_parameters") or {})
    if params and set(params) <= set(LAYER_TYPES):
        params = dict(params.get(layer_type) or params["full_attention"])
    elif not params and layer_type == "sliding_attention" and config.get("rope_local_base_freq") is not None:
        params = {"rope_theta": config["rope_local_base_freq"]}
    elif not params:
        params = dict(config.get("rope_scaling") or {})
        params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; anything else is a one-line bad-input error."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise BadInputError(f"cannot read {path} ({exc})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise BadInputError(f"{path} must hold a JSON object")
    return data


def index_shards(path: Path) -> dict[str, Path]:
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise BadInputError(f"{index} has no weight_map")
        if not all(isinstance(f, str) for f in weight_map.values()):
            raise BadInputError(f"{index}: weight_map values must be shard file names")
        missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if missing:
            raise BadInputError(f"{index} names shard files that are missing: {', '.join(missing)}")
        return {name: path / file for name, file in weight_map.items()}
    if single.is_file():
        return {name: single for name in sorted(read_header(single))}  # safe_open's keys() order
    pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    if pickles:
        raise UnsupportedError(
            f"base model {path} holds only pickled weights ({pickles[0]}); this tool never unpickles. "
            "Convert it once to safetensors, e.g. `AutoModelForCausalLM.from_pretrained(dir)"
            ".save_pretrained(new_dir)` in a trusted environment")
    raise BadInputError(f"base model {path} has no model.safetensors or model.safetensors.index.json")
