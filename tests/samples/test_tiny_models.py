"""Tests for samples/tiny_models.py: tiny offline llama/mistral/qwen2 bases with real tokenizers."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _load_tiny_models():
    name = "tiny_models"
    if name in sys.modules and Path(getattr(sys.modules[name], "__file__", "")).resolve() == (
        ROOT / "samples" / "tiny_models.py"
    ):
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "samples" / "tiny_models.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


tm = _load_tiny_models()

from safetensors import safe_open  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

ARCHS = ("llama", "mistral", "qwen2")
VOCAB = 512


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load(d: Path, **kw):
    tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(d), local_files_only=True, **kw).eval()
    return tok, model


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_bases")
    return {arch: tm.make_base(root / arch, arch) for arch in ARCHS}


# ----------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_base_loads_and_runs(bases, arch):
    d = bases[arch]
    assert isinstance(d, Path) and d.is_dir()
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json"):
        assert (d / name).is_file(), name
    tok, model = _load(d, dtype=torch.float32)
    assert model.config.model_type == arch
    expected_cls = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
    assert type(model).__name__ == expected_cls[arch]
    assert model.dtype == torch.float32
    ids = tok(tm.prompts()[0], return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], VOCAB)
    assert torch.isfinite(logits).all()
    # "interesting" weights: logits are far from ~0, but not absurd
    assert 1.0 <= logits.std().item() <= 5.0
    # greedy generation works and respects the generation config
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 4)


@pytest.mark.parametrize("arch", ARCHS)
def test_config_values(bases, arch):
    d = bases[arch]
    raw = json.loads((d / "config.json").read_text())
    cfg = AutoConfig.from_pretrained(str(d), local_files_only=True)
    theta = {"llama": 10000.0, "mistral": 1000000.0, "qwen2": 1000000.0}[arch]
    assert raw["rope_parameters"]["rope_theta"] == theta
    assert cfg.rope_parameters["rope_theta"] == theta
    assert raw["rms_norm_eps"] == {"llama": 1e-5, "mistral": 1e-5, "qwen2": 1e-6}[arch]
    assert raw["max_position_embeddings"] == 512
    assert (raw["hidden_size"], raw["intermediate_size"], raw["num_hidden_layers"]) == (128, 256, 2)
    assert (raw["num_attention_heads"], raw["num_key_value_heads"]) == (4, 2)
    assert raw["tie_word_embeddings"] is False
    assert raw["vocab_size"] == VOCAB
    gen = json.loads((d / "generation_config.json").read_text())
    assert gen["eos_token_id"] == raw["eos_token_id"]


@pytest.mark.parametrize("arch", ARCHS)
def test_vocab_equals_embedding_rows(bases, arch):
    d = bases[arch]
    tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        emb = f.get_slice("model.embed_tokens.weight").get_shape()
        head = f.get_slice("lm_head.weight").get_shape()
        shapes = {k: f.get_slice(k).get_shape() for k in keys}
        dtypes = {f.get_slice(k).get_dtype() for k in keys}
    assert len(tok) == emb[0] == head[0] == VOCAB
    assert dtypes == {"F32"}
    # every Linear in/out is a multiple of 32 (4-bit block formats use 32-element blocks)
    for k, shape in shapes.items():
        if len(shape) == 2:
            assert shape[0] % 32 == 0 and shape[1] % 32 == 0, (k, shape)
    has_bias = any(k.endswith("q_proj.bias") for k in keys)
    assert has_bias == (arch == "qwen2")
    if arch == "qwen2":
        assert {"model.layers.0.self_attn.k_proj.bias", "model.layers.0.self_attn.v_proj.bias"} <= keys


@pytest.mark.parametrize("arch", ARCHS)
def test_weights_are_not_trivial(bases, arch):
    with safe_open(str(bases[arch] / "model.safetensors"), "pt") as f:
        norm = f.get_tensor("model.layers.0.input_layernorm.weight")
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        bias = f.get_tensor("model.layers.0.self_attn.q_proj.bias") if arch == "qwen2" else None
    assert norm.std() > 0.1 and (norm - 1).abs().max() > 0.2  # RMSNorm weights are not all ones
    assert q.std() > 0.05
    if bias is not None:
        assert bias.abs().mean() > 0.1


def test_rope_theta_matters(bases):
    """A converter that ignores rope_theta must produce visibly different logits."""
    d = bases["qwen2"]
    tok, model = _load(d, dtype=torch.float32)
    ids = tok(" ".join(tm.prompts()), return_tensors="pt").input_ids
    wrong = AutoModelForCausalLM.from_pretrained(
        str(d),
        local_files_only=True,
        dtype=torch.float32,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ).eval()
    with torch.no_grad():
        a, b = model(ids).logits, wrong(ids).logits
    assert ((a - b).norm() / a.norm()).item() > 0.1


def test_sharded_save_and_tied(tmp_path, bases):
    d = tm.make_base(tmp_path / "sharded", "llama", shards=2)
    assert not (d / "model.safetensors").exists()
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard_files = sorted(p.name for p in d.glob("model-*.safetensors"))
    assert shard_files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert set(index["weight_map"].values()) == set(shard_files)
    # same seed => same tensors as the unsharded build
    with safe_open(str(bases["llama"] / "model.safetensors"), "pt") as f:
        ref = {k: f.get_tensor(k) for k in f.keys()}
    assert set(index["weight_map"]) == set(ref)
    for shard in shard_files:
        with safe_open(str(d / shard), "pt") as f:
            for k in f.keys():
                assert torch.equal(f.get_tensor(k), ref[k]), k
    _, model = _load(d, dtype=torch.float32)
    assert torch.isfinite(model(torch.tensor([[1, 5, 9]])).logits).all()

    t = tm.make_base(tmp_path / "tied", "qwen2", tie_word_embeddings=True, shards=3)
    index = json.loads((t / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    assert "lm_head.weight" not in index["weight_map"]
    tok, model = _load(t, dtype=torch.float32)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = tok(tm.prompts()[1], return_tensors="pt").input_ids
    with torch.no_grad():
        assert 1.0 <= model(ids).logits.std().item() <= 5.0


def test_deterministic(tmp_path, bases):
    a = tm.make_base(tmp_path / "a", "mistral", shards=2)
    b = tm.make_base(tmp_path / "b", "mistral", shards=2)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    for name in files:
        assert _sha(a / name) == _sha(b / name), name
    # rebuilding into the same folder (unsharded now) leaves no stale shards and matches the fixture
    tm.make_base(a, "llama")
    assert not list(a.glob("model-*.safetensors")) and not (a / "model.safetensors.index.json").exists()
    for name in ("model.safetensors", "tokenizer.model", "tokenizer.json"):
        assert _sha(a / name) == _sha(bases["llama"] / name), name
    # a different seed gives different weights; bf16 is honoured
    c = tm.make_base(tmp_path / "c", "llama", seed=1, dtype=torch.bfloat16)
    with safe_open(str(c / "model.safetensors"), "pt") as f:
        assert f.get_slice("lm_head.weight").get_dtype() == "BF16"
        w1 = f.get_tensor("model.layers.0.mlp.up_proj.weight").float()
    with safe_open(str(bases["llama"] / "model.safetensors"), "pt") as f:
        w0 = f.get_tensor("model.layers.0.mlp.up_proj.weight")
    assert not torch.allclose(w0, w1, atol=1e-2)


def test_legacy_config(tmp_path):
    d = tm.make_base(tmp_path / "legacy", "qwen2", legacy_config=True)
    raw = json.loads((d / "config.json").read_text())
    assert raw["rope_theta"] == 1000000.0 and "rope_parameters" not in raw
    cfg = AutoConfig.from_pretrained(str(d), local_files_only=True)
    assert cfg.rope_parameters["rope_theta"] == 1000000.0


def test_bad_sizes_rejected(tmp_path):
    with pytest.raises(ValueError):
        tm.make_base(tmp_path / "x", "llama", intermediate_size=200)
    with pytest.raises(ValueError):
        tm.make_base(tmp_path / "y", "gpt2")


# ----------------------------------------------------------------------------------------------
# tokenizers
# ----------------------------------------------------------------------------------------------

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Quantization-aware fine-tuning merges 4-bit blocks of 32 values, 2025 times!",
    "Ünïcode ✓ and emoji 😀 survive the round trip.",
    "Line one\nline two\twith a tab",
]


def test_spm_tokenizer(tmp_path):
    import sentencepiece as spm

    d = tmp_path / "spm"
    tm.make_tokenizer(d, "spm", 512)
    names = {p.name for p in d.iterdir()}
    assert {"tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= names
    tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    assert type(tok).__name__ == "LlamaTokenizer"
    assert len(tok) == 512
    assert (tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token) == ("<unk>", "<s>", "</s>", None)
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    assert "[INST]" in cfg["chat_template"]
    assert cfg["add_bos_token"] is True and cfg["add_eos_token"] is False
    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    assert sp.get_piece_size() == 512 and sp.bos_id() == 1 and sp.eos_id() == 2 and sp.unk_id() == 0
    assert sp.pad_id() == -1
    for s in SENTENCES + tm.prompts():
        ids = tok.encode(s)
        assert ids[0] == 1 and ids[-1] != 2  # BOS added, EOS not
        assert ids[1:] == sp.encode(s)  # HF conversion agrees with sentencepiece
        assert tok.decode(ids, skip_special_tokens=True) == s
        assert 0 not in ids  # byte fallback: never <unk>
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert chat == "<s>[INST] Hi [/INST]"


def test_gemma_tokenizer(tmp_path):
    import sentencepiece as spm

    d = tmp_path / "gemma"
    tm.make_tokenizer(d, "gemma", 512)
    tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    assert type(tok).__name__ == "GemmaTokenizer" and len(tok) == 512
    assert [tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id] == [0, 1, 2, 3]
    assert tok.convert_tokens_to_ids(list(tm.GEMMA_TURN_TOKENS)) == [4, 5, 6]
    special = {t["content"] for t in json.loads((d / "tokenizer.json").read_text())["added_tokens"] if t["special"]}
    assert set(tm.GEMMA_TURN_TOKENS) <= special
    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    assert [sp.pad_id(), sp.eos_id(), sp.bos_id(), sp.unk_id()] == [0, 1, 2, 3]
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes"}],
                                   tokenize=False, add_generation_prompt=False)
    assert chat == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nYes<end_of_turn>\n"
    for s in SENTENCES + tm.prompts() + ["<start_of_turn>user\nHi<end_of_turn>"]:
        ids = tok.encode(s)
        assert ids[0] == 2 and ids[1:] == sp.encode(s)  # <bos>, then what SentencePiece does (no dummy prefix)
        assert tok.decode(ids[1:]) == s and 3 not in ids
    assert sp.encode("x")[0] != sp.encode(" x")[0]  # no space goes in front


def test_bpe_tokenizer(tmp_path):
    d = tmp_path / "bpe"
    tm.make_tokenizer(d, "bpe", 512)
    names = {p.name for p in d.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"} <= names
    assert "tokenizer.model" not in names
    tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    assert type(tok).__name__ == "Qwen2Tokenizer"
    assert len(tok) == 512
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [509, 510, 511]
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|endoftext|>" and tok.bos_token is None
    vocab = json.loads((d / "vocab.json").read_text())
    assert len(vocab) == 509
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in cfg["chat_template"]
    for s in SENTENCES + tm.prompts():
        ids = tok.encode(s)
        assert max(ids) < 509  # plain text never produces special tokens
        assert tok.decode(ids) == s
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.encode("<|im_start|>user")[0] == 510


def test_tokenizer_other_sizes(tmp_path):
    for kind in ("spm", "bpe"):
        tm.make_tokenizer(tmp_path / kind, kind, 1024)
        assert len(AutoTokenizer.from_pretrained(str(tmp_path / kind), local_files_only=True)) == 1024
    with pytest.raises(ValueError):
        tm.make_tokenizer(tmp_path / "x", "wordpiece")


def test_prompts(bases):
    ps = tm.prompts()
    assert 3 <= len(ps) <= 4 and all(isinstance(p, str) and p for p in ps)
    for arch in ("llama", "qwen2"):
        tok = AutoTokenizer.from_pretrained(str(bases[arch]), local_files_only=True)
        for p in ps:
            assert 8 <= len(tok.encode(p)) <= 24, (arch, p)
