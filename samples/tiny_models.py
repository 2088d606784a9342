"""Tiny, random, fully offline Hugging Face base-model folders with real tokenizers.

Used by the sample generator and by the test suite.  This is a plain module file
(no package-relative imports): load it with ``sys.path.insert(0, "samples")`` or
``importlib.util.spec_from_file_location``.

Nothing here touches the network or a model hub:

* tokenizers are trained on ``samples/corpus.txt`` (next to this file) with
  ``sentencepiece`` (LLaMA/Mistral style, ``kind="spm"``; Gemma style, ``kind="gemma"``) or the ``tokenizers``
  library (GPT-2/Qwen2 byte-level BPE, ``kind="bpe"``) and written as
  transformers-5 tokenizer folders;
* models are built from a config (LlamaConfig / MistralConfig / Qwen2Config),
  initialised from a seeded ``torch.Generator`` with a scale chosen so that the
  model does something non-trivial (peaked attention, logits with a std of a few
  units), and written with ``save_pretrained`` (optionally sharded).

Public API::

    make_tokenizer(out_dir, kind="spm", vocab_size=512) -> None
    make_base(out_dir, arch="llama", *, hidden_size=128, intermediate_size=256,
              num_layers=None, num_heads=4, num_kv_heads=2, vocab_size=512, seed=0,
              dtype=torch.float32, tie_word_embeddings=False, shards=1,
              legacy_config=False) -> Path
    prompts() -> list[str]
"""

from __future__ import annotations

import io
import json
import math
import tempfile
from pathlib import Path

import torch

__all__ = [
    "ARCHS",
    "CORPUS_PATH",
    "TOKENIZER_KIND",
    "ROPE_THETA",
    "RMS_NORM_EPS",
    "make_tokenizer",
    "make_base",
    "prompts",
    "logits_std",
]

CORPUS_PATH = Path(__file__).resolve().parent / "corpus.txt"

ARCHS = ("llama", "mistral", "qwen2", "llama3", "qwen3", "granite", "smollm3", "gemma2", "gemma3_text", "phi3")
# Which tokenizer each architecture gets ("llama3" is a LlamaForCausalLM with Llama 3.x conventions).
TOKENIZER_KIND = {"llama": "spm", "mistral": "spm", "qwen2": "bpe", "llama3": "llama3", "qwen3": "bpe",
                  "granite": "bpe", "smollm3": "llama3", "gemma2": "gemma", "gemma3_text": "gemma", "phi3": "phi3"}
# Deliberately different per architecture so a converter that ignores rope_theta gets caught.
ROPE_THETA = {"llama": 10000.0, "mistral": 1000000.0, "qwen2": 1000000.0, "llama3": 10000.0, "qwen3": 1000000.0,
              "granite": 10000.0, "smollm3": 5000000.0, "gemma2": 10000.0, "gemma3_text": 1000000.0, "phi3": 250000.0}
RMS_NORM_EPS = {"llama": 1e-5, "mistral": 1e-5, "qwen2": 1e-6, "llama3": 1e-5, "qwen3": 1e-6, "granite": 1e-5,
                "smollm3": 1e-6, "gemma2": 1e-6, "gemma3_text": 1e-6, "phi3": 1e-5}
MAX_POSITION_EMBEDDINGS = 512
# Llama 3.x rope scaling with an original context so short (64) that the 8x scaling of the low
# frequencies changes the tiny model's logits on the 10-20 token prompts: a writer that drops it
# is caught (Llama 3.2 has factor 32 and 8192; the formula is the same).
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
# Granite's multipliers (Granite 3.x: 12 / 1/128 / 0.22 / 8), far from 1 so that a writer or a verify that
# drops one is caught: _init_weights divides the embeddings by the embedding multiplier, multiplies the head
# by the logit divisor and gives q/k the gain that makes the attention as peaked as the other families'
# at this attention multiplier, so the model stays as non-trivial as they are with every multiplier in place.
GRANITE_SCALES = {"embedding_multiplier": 12.0, "attention_multiplier": 0.015, "residual_multiplier": 0.22,
                  "logits_scaling": 8.0}
# Decoder layers when make_base is not told: SmolLM3 skips the rotation on every 4th layer (its
# default no_rope_layers, the pattern llama.cpp's smollm3 graph fixes), so its tiny model has 4.
DEFAULT_LAYERS = {"smollm3": 4, "gemma3_text": 3}
# Gemma 2 (2B: query_pre_attn_scalar 256 = head_dim, softcaps 50 / 30, window 4096 on every other
# layer), small enough that each convention moves the tiny model's logits: q scaled by 8^-0.5 (not
# head_dim^-0.5), scores capped at 5 (they reach ~5), logits at 20 (they reach ~25), a window of 8
# tokens on layer 0 (the built-in prompts are 12-21 tokens). Tied head, as Gemma.
GEMMA2_CONVENTIONS = {"query_pre_attn_scalar": 8, "attn_logit_softcapping": 5.0, "final_logit_softcapping": 20.0,
                      "sliding_window": 8, "hidden_activation": "gelu_pytorch_tanh"}
# Gemma 3 1B/270M: rope base 1e6 on the global layers (ROPE_THETA) and 1e4 on the local ones, five local
# layers to one global (here two to one: 3 layers), window 512 (here 8 tokens, shorter than the 12-21 token
# prompts), query_pre_attn_scalar = head_dim (as the 1B: the scale llama.cpp's gemma3 graph computes), no
# softcaps. The q/k norms (x·(1+w), w ~ U(0.5, 1.5)) scale q and k by ~2: a writer without the +1 halves them.
GEMMA3_CONVENTIONS = {"query_pre_attn_scalar": 32, "sliding_window": 8, "hidden_activation": "gelu_pytorch_tanh",
                      "final_logit_softcapping": None, "attn_logit_softcapping": None}
GEMMA3_LOCAL_ROPE_THETA = 10000.0
GEMMA3_PATTERN = 3  # layer i is global when (i + 1) % 3 == 0 (Gemma 3: 6)
# Phi-4-mini: the rotation acts on the first 3/4 of each head's dims (Phi-3.5-mini: all of them); rope base
# 250000 (Phi-4-mini 10000: another value so a writer that ignores it is caught).
PHI3_PARTIAL_ROTARY = 0.75
# Qwen3-0.6B/4B style: head_dim (48) is not hidden/heads (32).
QWEN3_HEAD_DIM = 48

# ---------------------------------------------------------------------------------------------
# chat templates
# ---------------------------------------------------------------------------------------------

# LLaMA-2 style ([INST] ... [/INST], optional <<SYS>> block folded into the first user turn).
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system_message = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system_message = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.first and system_message %}"
    "{{ bos_token + '[INST] <<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] | trim + ' [/INST]' }}"
    "{% else %}"
    "{{ bos_token + '[INST] ' + message['content'] | trim + ' [/INST]' }}"
    "{% endif %}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'] | trim + ' ' + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)

# ChatML, as used by Qwen2.
CHATML_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

QWEN2_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# Llama 3's special tokens (a subset: the reserved ones are left out) and its chat template.
LLAMA3_SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                         "<|eot_id|>")
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# Llama 3's split regex (llama.cpp's pre-tokenizer "llama-bpe").
LLAMA3_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Gemma's special pieces (ids 0-3 as in Gemma; <mask>, <start_of_turn>, <end_of_turn> follow at 4-6 where
# Gemma has them at 4, 106, 107) and Gemma's chat template (gemma-2-2b-it / gemma-3-1b-it, the user /
# model turns; the system-role refusal is left out).
GEMMA_SPECIAL_PIECES = {"pad": "<pad>", "eos": "<eos>", "bos": "<bos>", "unk": "<unk>"}
GEMMA_TURN_TOKENS = ("<mask>", "<start_of_turn>", "<end_of_turn>")
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

# Same split regex as transformers' Qwen2Tokenizer / the real Qwen2 tokenizer.json.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Keys that from_pretrained() injects into init_kwargs and save_pretrained() then writes back;
# they carry no information about the tokenizer and are dropped from tokenizer_config.json.
_CONFIG_NOISE_KEYS = ("is_local", "local_files_only", "name_or_path", "_commit_hash")


def _corpus_text(corpus: Path | None = None) -> str:
    return (corpus or CORPUS_PATH).read_text(encoding="utf-8")


def _corpus_lines(corpus: Path | None = None) -> list[str]:
    return [line.strip() for line in _corpus_text(corpus).splitlines() if line.strip()]


def _clean_tokenizer_config(out_dir: Path, extra: dict | None = None) -> dict:
    path = out_dir / "tokenizer_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    for key in _CONFIG_NOISE_KEYS:
        cfg.pop(key, None)
    if extra:
        cfg.update(extra)
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")
    return cfg


def _write_special_tokens_map(out_dir: Path, tok) -> None:
    """transformers 5 no longer writes special_tokens_map.json; older readers (gguf-py's
    SpecialVocab, llama.cpp's converter, transformers 4.x) still look for it."""
    smap = {k: str(v) for k, v in tok.special_tokens_map.items() if v is not None and not isinstance(v, list)}
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps(smap, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8"
    )


# ---------------------------------------------------------------------------------------------
# tokenizers
# ---------------------------------------------------------------------------------------------


def _train_spm(vocab_size: int, corpus: Path | None = None, **spec) -> bytes:
    """Train a LLaMA-style SentencePiece BPE model on the corpus; return the serialized proto.
    ``spec`` overrides trainer_spec fields (Gemma: its special ids, no dummy prefix, user pieces)."""
    import sentencepiece as spm

    # LLaMA's trainer_spec: byte fallback, digits split, no normalisation, dummy prefix,
    # whitespace kept as is, <unk>=0 <s>=1 </s>=2, no pad piece.
    llama = dict(add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, unk_piece="<unk>", bos_piece="<s>",
                 eos_piece="</s>")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus_lines(corpus)),
        model_writer=buf,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        **{**llama, **spec},
        hard_vocab_limit=True,
        # determinism
        num_threads=1,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        seed_sentencepiece_size=1000000,
        minloglevel=2,
    )
    return buf.getvalue()


def _make_spm_tokenizer(out_dir: Path, vocab_size: int, corpus: Path | None = None) -> None:
    # LlamaTokenizerFast is an alias of LlamaTokenizer (TokenizersBackend) in transformers 5.
    from transformers import LlamaTokenizerFast

    proto = _train_spm(vocab_size, corpus)
    with tempfile.TemporaryDirectory(prefix="tiny_spm_") as tmp:
        tmp = Path(tmp)
        (tmp / "tokenizer.model").write_bytes(proto)
        # from_pretrained on a folder holding only tokenizer.model runs transformers 5's
        # SentencePiece -> tokenizers conversion (SentencePieceExtractor + LlamaTokenizer's
        # BPE/Metaspace/ByteFallback pipeline).
        tok = LlamaTokenizerFast.from_pretrained(
            str(tmp),
            local_files_only=True,
            add_bos_token=True,
            add_eos_token=False,
            legacy=False,
        )
        tok.chat_template = LLAMA2_CHAT_TEMPLATE
        # save_jinja_files=False keeps the chat template inside tokenizer_config.json.
        tok.save_pretrained(str(out_dir), save_jinja_files=False)
        # The vocab_file is the temp copy: always write tokenizer.model ourselves.
        (out_dir / "tokenizer.model").write_bytes(proto)
    # Like LLaMA-2's tokenizer_config.json: readers such as gguf-py take add_bos/eos from here.
    _clean_tokenizer_config(
        out_dir, {"add_bos_token": True, "add_eos_token": False, "model_max_length": MAX_POSITION_EMBEDDINGS}
    )
    _write_special_tokens_map(out_dir, tok)


def _make_gemma_tokenizer(out_dir: Path, vocab_size: int) -> None:
    """Gemma style: SentencePiece BPE with byte fallback and no dummy prefix, <pad>=0 <eos>=1 <bos>=2
    <unk>=3, then <mask>, <start_of_turn>, <end_of_turn> as user-defined pieces (matched in text by
    SentencePiece; special added tokens in tokenizer.json, as in Gemma's); ``GemmaTokenizer`` (transformers 5's
    GemmaTokenizerFast) adds <bos>; Gemma's chat template. The model stops at <eos> and <end_of_turn>
    (generation_config, make_base)."""
    from transformers import GemmaTokenizerFast

    proto = _train_spm(vocab_size, add_dummy_prefix=False, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
                       **{f"{k}_piece": v for k, v in GEMMA_SPECIAL_PIECES.items()},
                       user_defined_symbols=list(GEMMA_TURN_TOKENS))
    with tempfile.TemporaryDirectory(prefix="tiny_gemma_") as tmp:
        tmp = Path(tmp)
        (tmp / "tokenizer.model").write_bytes(proto)
        tok = GemmaTokenizerFast.from_pretrained(str(tmp), local_files_only=True, add_bos_token=True,
                                                 add_eos_token=False)
        tok.save_pretrained(str(tmp / "saved"), save_jinja_files=False)
        # Gemma's tokenizer.json marks the turn tokens special (transformers' conversion leaves them plain).
        tj = json.loads((tmp / "saved" / "tokenizer.json").read_text(encoding="utf-8"))
        for token in tj["added_tokens"]:
            token["special"] = token["special"] or token["content"] in GEMMA_TURN_TOKENS
        (tmp / "saved" / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
        tok = GemmaTokenizerFast.from_pretrained(str(tmp / "saved"), local_files_only=True)
        tok.chat_template = GEMMA_CHAT_TEMPLATE
        tok.save_pretrained(str(out_dir), save_jinja_files=False)
    (out_dir / "tokenizer.model").write_bytes(proto)
    _clean_tokenizer_config(out_dir, {"add_bos_token": True, "add_eos_token": False, "vocab_file": "tokenizer.model",
                                      "model_max_length": MAX_POSITION_EMBEDDINGS})
    _write_special_tokens_map(out_dir, tok)


def _train_byte_bpe(vocab_size: int, regex: str, specials: tuple[str, ...]):
    """A byte-level BPE (``tokenizers``) trained on the corpus, ``specials`` appended after it."""
    from tokenizers import AddedToken as TkAddedToken
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
    from tokenizers.models import BPE

    n_special = len(specials)
    n_regular = vocab_size - n_special
    if n_regular <= 256:
        raise ValueError(f"bpe vocab_size must exceed 256 + {n_special}, got {vocab_size}")

    backend = Tokenizer(
        BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False, byte_fallback=False)
    )
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=n_regular,
        min_frequency=1,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(_corpus_lines(), trainer=trainer)
    if backend.get_vocab_size() != n_regular:
        raise ValueError(
            f"corpus too small for a byte-level BPE of {vocab_size} tokens "
            f"(got {backend.get_vocab_size()} + {n_special} special)"
        )
    # Special tokens go after the regular vocabulary (as in Qwen2 and Llama 3).
    backend.add_special_tokens([TkAddedToken(t, special=True, normalized=False) for t in specials])
    return backend


def _write_gpt2_files(out_dir: Path) -> None:
    """vocab.json / merges.txt (GPT-2 format), as written by transformers 4.x and read by some converters."""
    model = json.loads((out_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    vocab = model["vocab"]
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def _make_llama3_tokenizer(out_dir: Path, vocab_size: int) -> None:
    """Llama 3 style: byte-level BPE with its split regex, ``<|begin_of_text|>`` added in front by the
    post-processor, ``<|eot_id|>`` as the chat EOS (``<|end_of_text|>`` also stops: generation_config)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = _train_byte_bpe(vocab_size, LLAMA3_PRETOKENIZE_REGEX, LLAMA3_SPECIAL_TOKENS)
    bos = LLAMA3_SPECIAL_TOKENS[0]
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                      special_tokens=[(bos, backend.token_to_id(bos))]),
    ])
    with tempfile.TemporaryDirectory(prefix="tiny_llama3_") as tmp:
        tmp = Path(tmp)
        backend.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": "<|eot_id|>",
            "clean_up_tokenization_spaces": True, "model_max_length": MAX_POSITION_EMBEDDINGS,
            "model_input_names": ["input_ids", "attention_mask"]}), encoding="utf-8")
        tok = PreTrainedTokenizerFast.from_pretrained(str(tmp), local_files_only=True)
        tok.chat_template = LLAMA3_CHAT_TEMPLATE
        tok.save_pretrained(str(out_dir), save_jinja_files=False)
    _clean_tokenizer_config(out_dir)
    _write_special_tokens_map(out_dir, tok)


# Phi-3's tokenizer: Llama's SentencePiece plus these added tokens after it (<|endoftext|> is its EOS; llama.cpp
# looks it up by text when general.name names Phi-3), and its chat template.
PHI3_SPECIAL_TOKENS = ("<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>")
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)


def _make_phi3_tokenizer(out_dir: Path, vocab_size: int) -> None:
    """Phi-3 style: the spm tokenizer of ``vocab_size - 5`` pieces, then PHI3_SPECIAL_TOKENS as added special
    tokens, ``<|endoftext|>`` the EOS."""
    from transformers import AutoTokenizer

    _make_spm_tokenizer(out_dir, vocab_size - len(PHI3_SPECIAL_TOKENS))
    tok = AutoTokenizer.from_pretrained(str(out_dir), local_files_only=True)
    tok.add_special_tokens({"eos_token": PHI3_SPECIAL_TOKENS[0]})
    tok.add_special_tokens({"additional_special_tokens": list(PHI3_SPECIAL_TOKENS[1:])})
    tok.chat_template = PHI3_CHAT_TEMPLATE
    proto = (out_dir / "tokenizer.model").read_bytes()
    tok.save_pretrained(str(out_dir), save_jinja_files=False)
    (out_dir / "tokenizer.model").write_bytes(proto)
    _clean_tokenizer_config(out_dir, {"add_bos_token": True, "add_eos_token": False,
                                      "model_max_length": MAX_POSITION_EMBEDDINGS})
    _write_special_tokens_map(out_dir, tok)


def _make_bpe_tokenizer(out_dir: Path, vocab_size: int) -> None:
    from transformers import Qwen2Tokenizer

    backend = _train_byte_bpe(vocab_size, QWEN2_PRETOKENIZE_REGEX, QWEN2_SPECIAL_TOKENS)

    with tempfile.TemporaryDirectory(prefix="tiny_bpe_") as tmp:
        tmp = Path(tmp)
        backend.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "tokenizer_class": "Qwen2Tokenizer",
                    "bos_token": None,
                    "eos_token": "<|endoftext|>",
                    "pad_token": "<|endoftext|>",
                    "unk_token": None,
                    "add_prefix_space": False,
                    "clean_up_tokenization_spaces": False,
                    "errors": "replace",
                    "model_max_length": MAX_POSITION_EMBEDDINGS,
                    "split_special_tokens": False,
                    "extra_special_tokens": ["<|im_start|>", "<|im_end|>"],
                }
            ),
            encoding="utf-8",
        )
        tok = Qwen2Tokenizer.from_pretrained(str(tmp), local_files_only=True)
        tok.chat_template = CHATML_CHAT_TEMPLATE
        tok.save_pretrained(str(out_dir), save_jinja_files=False)
    _clean_tokenizer_config(out_dir)
    _write_special_tokens_map(out_dir, tok)
    _write_gpt2_files(out_dir)


def make_tokenizer(out_dir, kind: str = "spm", vocab_size: int = 512, corpus: Path | None = None) -> None:
    """Train a tokenizer offline on ``samples/corpus.txt`` (or ``corpus``, spm only) and write a
    transformers-5 tokenizer folder.

    kind="spm": LLaMA-style SentencePiece BPE (byte_fallback, <unk>=0 <s>=1 </s>=2, no pad) converted to
        ``LlamaTokenizer``; writes tokenizer.model, tokenizer.json, tokenizer_config.json (chat_template
        inside, add_bos_token=true) and special_tokens_map.json.
    kind="bpe": GPT-2/Qwen2-style byte-level BPE (Qwen2 split regex, NFC, ByteLevel decoder) with
        <|endoftext|>, <|im_start|>, <|im_end|> appended after the regular vocabulary; loads as
        ``Qwen2Tokenizer``; writes tokenizer.json, tokenizer_config.json (ChatML chat_template inside),
        special_tokens_map.json, vocab.json and merges.txt.
    kind="llama3": Llama 3 byte-level BPE (see _make_llama3_tokenizer).
    kind="gemma": Gemma SentencePiece (<pad>=0 <eos>=1 <bos>=2 <unk>=3, <start_of_turn> / <end_of_turn>, no
        dummy prefix) as ``GemmaTokenizer`` with Gemma's chat template (see _make_gemma_tokenizer).

    In both cases ``len(AutoTokenizer.from_pretrained(out_dir)) == vocab_size`` exactly.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if kind == "spm":
        _make_spm_tokenizer(out_dir, vocab_size, corpus)
    elif kind == "bpe":
        _make_bpe_tokenizer(out_dir, vocab_size)
    elif kind == "llama3":
        _make_llama3_tokenizer(out_dir, vocab_size)
    elif kind == "gemma":
        _make_gemma_tokenizer(out_dir, vocab_size)
    elif kind == "phi3":
        _make_phi3_tokenizer(out_dir, vocab_size)
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r} (expected 'spm', 'bpe', 'llama3', 'gemma' or 'phi3')")


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------


def _build_config(
    arch: str,
    *,
    hidden_size: int,
    intermediate_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    vocab_size: int,
    tie_word_embeddings: bool,
    bos_token_id,
    eos_token_id,
    pad_token_id,
):
    common = dict(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        vocab_size=vocab_size,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        rms_norm_eps=RMS_NORM_EPS[arch],
        rope_theta=ROPE_THETA[arch],
        hidden_act="silu",
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        initializer_range=0.02,
        use_cache=True,
    )
    if arch == "llama":
        from transformers import LlamaConfig

        cfg = LlamaConfig(attention_bias=False, mlp_bias=False, **common)
    elif arch == "llama3":
        from transformers import LlamaConfig

        common["rope_parameters"] = {"rope_theta": common.pop("rope_theta"), **LLAMA3_ROPE}
        cfg = LlamaConfig(attention_bias=False, mlp_bias=False, **common)
    elif arch == "granite":
        from transformers import GraniteConfig

        cfg = GraniteConfig(attention_bias=False, mlp_bias=False, **GRANITE_SCALES, **common)
    elif arch == "gemma2":
        from transformers import Gemma2Config

        common.pop("hidden_act")
        cfg = Gemma2Config(head_dim=hidden_size // num_heads, attention_bias=False, **GEMMA2_CONVENTIONS, **common)
    elif arch == "gemma3_text":
        from transformers import Gemma3TextConfig

        common.pop("hidden_act")
        theta = common.pop("rope_theta")
        common["rope_parameters"] = {"full_attention": {"rope_type": "default", "rope_theta": theta},
                                     "sliding_attention": {"rope_type": "default", "rope_theta": GEMMA3_LOCAL_ROPE_THETA}}
        kinds = ["sliding_attention" if (i + 1) % GEMMA3_PATTERN else "full_attention" for i in range(num_layers)]
        cfg = Gemma3TextConfig(head_dim=hidden_size // num_heads, attention_bias=False, layer_types=kinds,
                               **GEMMA3_CONVENTIONS, **common)
    elif arch == "phi3":
        from transformers import Phi3Config

        theta = common.pop("rope_theta")
        common["rope_parameters"] = {"rope_type": "default", "rope_theta": theta,
                                     "partial_rotary_factor": PHI3_PARTIAL_ROTARY}
        cfg = Phi3Config(sliding_window=None, original_max_position_embeddings=MAX_POSITION_EMBEDDINGS, **common)
    elif arch == "smollm3":
        from transformers import SmolLM3Config

        cfg = SmolLM3Config(use_sliding_window=False, sliding_window=None, attention_bias=False, mlp_bias=False,
                            **common)
    elif arch == "qwen3":
        from transformers import Qwen3Config

        cfg = Qwen3Config(use_sliding_window=False, sliding_window=None, max_window_layers=num_layers,
                          head_dim=QWEN3_HEAD_DIM, attention_bias=False, **common)
    elif arch == "mistral":
        from transformers import MistralConfig

        cfg = MistralConfig(sliding_window=None, head_dim=hidden_size // num_heads, **common)
    elif arch == "qwen2":
        from transformers import Qwen2Config

        cfg = Qwen2Config(use_sliding_window=False, sliding_window=None, max_window_layers=num_layers, **common)
    else:
        raise ValueError(f"unknown arch {arch!r} (expected one of {ARCHS})")
    return cfg


def _model_class(arch: str):
    import transformers

    return {
        "llama": transformers.LlamaForCausalLM,
        "mistral": transformers.MistralForCausalLM,
        "qwen2": transformers.Qwen2ForCausalLM,
        "llama3": transformers.LlamaForCausalLM,
        "qwen3": transformers.Qwen3ForCausalLM,
        "granite": transformers.GraniteForCausalLM,
        "smollm3": transformers.SmolLM3ForCausalLM,
        "gemma2": transformers.Gemma2ForCausalLM,
        "gemma3_text": transformers.Gemma3ForCausalLM,
        "phi3": transformers.Phi3ForCausalLM,
    }[arch]


# Output scale of the LM head (logits std ~ LOGIT_GAIN since the final norm output has rms ~1).
LOGIT_GAIN = 3.0
# Gain on q/k projections so pre-softmax attention scores have std ~2: attention is peaked and
# position-dependent, so RoPE (and its theta) matters.
QK_GAIN = 1.5
# With per-head q/k norms (Qwen3) the projections' scale is normalised away: a larger gain makes a
# writer that drops the norms see scores ~16x too large.
QK_NORM_GAIN = 4.0


@torch.no_grad()
def _init_weights(model, config, seed: int) -> None:
    """Deterministic, 'interesting' initialisation, independent of transformers' own init and of the
    global RNG.  Every parameter is filled in sorted-name order from one seeded generator, in float32.

    * Linear weights: N(0, 1/fan_in) so activations stay O(1) through the residual stream;
      q/k get an extra gain (peaked attention), the LM head a gain LOGIT_GAIN (logits std ~3).
    * Embeddings: N(0, 1) (tied: N(0, LOGIT_GAIN^2/hidden) so they can double as the LM head).
    * RMSNorm weights: U(0.5, 1.5), so a converter that drops them or adds Gemma's +1 is caught.
    * Biases (qwen2 q/k/v): N(0, 0.5^2), so dropping them is caught.
    * Granite: embeddings / embedding_multiplier, head x logits_scaling, q/k x sqrt(head_dim^-0.5 /
      attention_multiplier), o_proj and down_proj / residual_multiplier, so that with its multipliers
      the model computes at the scales above.
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    hidden = config.hidden_size
    tied = bool(getattr(config, "tie_word_embeddings", False))
    seen = set()
    qk_normed = any(n.endswith("self_attn.q_norm.weight") for n, _ in model.named_parameters())
    embed_mult = float(getattr(config, "embedding_multiplier", 1.0))  # Granite's multipliers (1 elsewhere)
    logit_mult = float(getattr(config, "logits_scaling", 1.0))
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    out_mult = 1.0 / float(getattr(config, "residual_multiplier", 1.0))
    qk_mult = math.sqrt(head_dim**-0.5 / float(getattr(config, "attention_multiplier", head_dim**-0.5)))
    for name, param in sorted(model.named_parameters(remove_duplicate=True), key=lambda kv: kv[0]):
        if id(param) in seen:
            continue
        seen.add(id(param))
        shape = tuple(param.shape)
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            value = 0.5 + torch.rand(shape, generator=gen, dtype=torch.float32)
        elif name.endswith(".bias"):
            value = 0.5 * torch.randn(shape, generator=gen, dtype=torch.float32)
        elif name.endswith("embed_tokens.weight"):
            std = (LOGIT_GAIN / math.sqrt(hidden) if tied else 1.0) / embed_mult
            value = std * torch.randn(shape, generator=gen, dtype=torch.float32)
        elif name.endswith("lm_head.weight"):
            value = (logit_mult * LOGIT_GAIN / math.sqrt(shape[1])) * torch.randn(shape, generator=gen, dtype=torch.float32)
        elif param.dim() == 2:
            gain = QK_GAIN if (name.endswith("q_proj.weight") or name.endswith("k_proj.weight")) else 1.0
            gain *= QK_NORM_GAIN if qk_normed and gain != 1.0 else 1.0
            gain *= qk_mult if gain != 1.0 else 1.0
            gain *= out_mult if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
            value = (gain / math.sqrt(shape[1])) * torch.randn(shape, generator=gen, dtype=torch.float32)
            if name.endswith("qkv_proj.weight"):  # Phi-3's fused q|k|v: the q/k gain on the q and k rows
                value[: (config.num_attention_heads + config.num_key_value_heads) * head_dim] *= QK_GAIN
        else:  # pragma: no cover - no other parameter kinds in these architectures
            raise RuntimeError(f"don't know how to initialise {name} {shape}")
        param.copy_(value.to(param.dtype))


def _shard_limit(model, shards: int, tied: bool) -> int:
    """Smallest integer max_shard_size for which transformers' greedy sharding yields `shards` files."""
    from huggingface_hub import split_torch_state_dict_into_shards

    state = {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    if shards > len(state):
        raise ValueError(f"cannot split {len(state)} tensors into {shards} shards")

    def count(limit: int) -> int:
        return len(split_torch_state_dict_into_shards(state, max_shard_size=limit).filename_to_tensors)

    total = sum(t.numel() * t.element_size() for t in state.values())
    lo, hi = 1, total  # count(total) == 1
    while lo < hi:  # smallest limit with count(limit) <= shards (count is non-increasing in limit)
        mid = (lo + hi) // 2
        if count(mid) <= shards:
            hi = mid
        else:
            lo = mid + 1
    if count(lo) != shards:
        raise ValueError(f"cannot produce exactly {shards} shards with greedy sharding")
    return lo


# Files make_base() writes; a rebuild into the same folder removes these (and nothing else) first,
# so no stale shard / index / tokenizer file survives.
_BUILD_FILE_PATTERNS = (
    "config.json",
    "generation_config.json",
    "model*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
)


def _remove_previous_build(out_dir: Path) -> None:
    for pattern in _BUILD_FILE_PATTERNS:
        for path in out_dir.glob(pattern):
            if path.is_file():
                path.unlink()


def logits_std(model_dir, text: str | None = None) -> float:
    """Std of the logits of the saved model on a prompt (diagnostic used by the tests)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, dtype=torch.float32)
    ids = tok(text or prompts()[0], return_tensors="pt").input_ids
    with torch.no_grad():
        return float(model(ids).logits.float().std())


def make_base(
    out_dir,
    arch: str = "llama",
    *,
    hidden_size: int = 128,
    intermediate_size: int = 256,
    num_layers: int | None = None,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 512,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tie_word_embeddings: bool | None = None,
    shards: int = 1,
    legacy_config: bool = False,
    sliding_window: int | None = None,
) -> Path:
    """Build a tiny random base model folder for ``arch`` in ARCHS ("llama3" is Llama 3.x: llama3
    rope scaling, byte-level BPE with Llama 3's special tokens and two stop ids; "qwen3" has per-head
    q/k norms and head_dim 48 != hidden/heads; "granite" has its four multipliers, GRANITE_SCALES;
    "smollm3" skips the rotation on every 4th layer and has 4 layers unless ``num_layers`` says
    otherwise; every other arch has 2; "gemma2" has GEMMA2_CONVENTIONS and, unless told otherwise, a
    tied head; "gemma3_text" has GEMMA3_CONVENTIONS, 3 layers (local, local, global) and a tied head).
    ``sliding_window`` (mistral only) sets one attention window.

    The folder holds config.json, generation_config.json, model.safetensors (or
    model-0000k-of-0000n.safetensors + model.safetensors.index.json when shards > 1) and the
    tokenizer (spm for llama/mistral, bpe for qwen2) trained to exactly ``vocab_size`` tokens.
    The same arguments always give byte-identical safetensors files.

    legacy_config=True rewrites config.json the way transformers 4.x wrote it (top-level
    ``rope_theta`` + ``rope_scaling: null`` instead of v5's ``rope_parameters``), for testing
    converters against older checkpoints; transformers 5 loads both forms.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r} (expected one of {ARCHS})")
    num_layers = DEFAULT_LAYERS.get(arch, 2) if num_layers is None else num_layers
    tie_word_embeddings = arch in ("gemma2", "gemma3_text") if tie_word_embeddings is None else tie_word_embeddings
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError("hidden_size must divide by num_heads and num_heads by num_kv_heads")
    head_dim = hidden_size // num_heads
    for what, n in (
        ("hidden_size", hidden_size),
        ("intermediate_size", intermediate_size),
        ("num_kv_heads*head_dim", num_kv_heads * head_dim),
        ("vocab_size", vocab_size),
    ):
        if n % 32:
            raise ValueError(f"{what}={n} must be a multiple of 32 (4-bit block formats use 32-element blocks)")
    if shards < 1:
        raise ValueError("shards must be >= 1")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_previous_build(out_dir)

    from transformers import AutoTokenizer, GenerationConfig

    # 1. tokenizer first, so the config's vocab/special ids come from it.
    make_tokenizer(out_dir, TOKENIZER_KIND[arch], vocab_size)
    tok = AutoTokenizer.from_pretrained(str(out_dir), local_files_only=True)
    if len(tok) != vocab_size:
        raise RuntimeError(f"tokenizer has {len(tok)} tokens, expected {vocab_size}")
    if arch == "llama3":
        stops = [tok.convert_tokens_to_ids("<|end_of_text|>"), tok.convert_tokens_to_ids("<|eot_id|>")]
        bos_id, eos_id, pad_id = tok.bos_token_id, stops, None  # as in Llama-3.2-Instruct's config.json
        gen_kwargs = dict(bos_token_id=bos_id, eos_token_id=stops)
    elif arch in ("gemma2", "gemma3_text"):
        stops = [tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")]
        bos_id, eos_id, pad_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id  # as gemma-2-2b-it's config
        gen_kwargs = dict(bos_token_id=bos_id, eos_token_id=stops, pad_token_id=pad_id)
    elif arch in ("qwen2", "qwen3", "granite"):
        eot = tok.convert_tokens_to_ids("<|endoftext|>")
        bos_id, eos_id, pad_id = eot, eot, None  # as in Qwen2 base config.json
        gen_kwargs = dict(bos_token_id=eot, eos_token_id=eot, pad_token_id=eot)
    else:
        bos_id, eos_id, pad_id = tok.bos_token_id, tok.eos_token_id, None
        gen_kwargs = dict(bos_token_id=bos_id, eos_token_id=eos_id)

    # 2. config + model, deterministic float32 init, then cast.
    config = _build_config(
        arch,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        vocab_size=vocab_size,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    if sliding_window is not None:
        if arch != "mistral":
            raise ValueError("sliding_window is a mistral option")
        config.sliding_window = sliding_window
    torch_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(int(seed))
        model = _model_class(arch)(config)
    finally:
        torch.random.set_rng_state(torch_state)
    model = model.to(torch.float32).eval()
    _init_weights(model, config, seed)
    if tie_word_embeddings:
        model.tie_weights()
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model = model.to(dtype)
    model.config.dtype = dtype
    if model.model.embed_tokens.weight.shape[0] != len(tok):
        raise RuntimeError("embedding rows != tokenizer size")

    model.generation_config = GenerationConfig(do_sample=False, **gen_kwargs)

    # 3. save (optionally sharded).
    max_shard_size = _shard_limit(model, shards, tie_word_embeddings) if shards > 1 else "50GB"
    model.save_pretrained(str(out_dir), max_shard_size=max_shard_size)
    n_files = len(list(out_dir.glob("*.safetensors")))
    if n_files != shards:
        raise RuntimeError(f"expected {shards} safetensors files, got {n_files}")

    if legacy_config:
        cfg_path = out_dir / "config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        rope = cfg.pop("rope_parameters", None) or {}
        cfg["rope_theta"] = float(rope.get("rope_theta", ROPE_THETA[arch]))
        cfg["rope_scaling"] = None
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out_dir


def prompts() -> list[str]:
    """Short English prompts used as built-in verify prompts.

    With the default 512-token tokenizers they are 12-21 tokens long (spm, counting <s>: 13/17/18/21;
    bpe: 12/14/16/16), i.e. within 8-24 for both.
    """
    return [
        "The capital of France is",
        "Once upon a time there was a",
        "Water boils at one hundred degrees",
        "Low-rank adapters keep most weights fixed.",
    ]


if __name__ == "__main__":  # pragma: no cover - manual smoke run
    import sys
    import time

    root = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="tiny_models_"))
    for a in ARCHS:
        t0 = time.time()
        d = make_base(root / a, a)
        print(f"{a}: {d} ({time.time() - t0:.2f}s) logits std {logits_std(d):.2f}")
