"""The tokenizer of a GGUF model, read from a Hugging Face folder.

* SentencePiece (LLaMA, Mistral) -> ``tokenizer.ggml.model = "llama"`` with tokens, scores and
  token types; from ``tokenizer.model`` (gguf-py's ``SentencePieceVocab``) or, when the folder
  has only ``tokenizer.json`` (what transformers 5 saves), from its BPE/Unigram model:
  a SentencePiece BPE model scores piece ``k`` of its trained vocabulary ``-k`` (checked on the
  shipped sample against its ``tokenizer.model``), and llama.cpp only uses the order of the scores.
* Byte-level BPE (Qwen2, Llama 3) -> ``"gpt2"`` with merges and a known pre-tokenizer name,
  recognised from the split regex in ``tokenizer.json``.

A SentencePiece vocabulary also says whether a space goes before the text (``add_space_prefix``:
LLaMA yes, Gemma no; llama.cpp assumes yes when the key is missing), read from the tokenizer.

Special ids, add_bos/add_eos and the chat template come from gguf-py's ``SpecialVocab``;
add_bos/add_eos are then set from what the Hugging Face tokenizer itself does. The vocabulary is
checked against the embedding rows before anything is written; missing ids (embeddings padded
past the tokenizer) become ``[PADn]`` tokens of type UNUSED, as llama.cpp's converter does.
"""
from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import gguf
from gguf import GGUFWriter, SpecialVocab, TokenType

from blora_export.base import read_json
from blora_export.errors import BadInputError, UnsupportedError
from blora_export.hf_folder import stop_token_ids

log = logging.getLogger(__name__)

# Byte-level BPE split regex (tokenizer.json pre_tokenizer) -> llama.cpp's pre-tokenizer name.
PRE_TOKENIZERS: dict[str, str] = {
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""":
        "qwen2",
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""":
        "llama-bpe",
}
# Texts of end-of-turn / end-of-message tokens (llama.cpp's EOT / EOM ids).
EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>")
EOM_TEXTS = ("<|eom_id|>",)
BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
PAD_SCORE = -1000.0


@dataclass(frozen=True)
class Vocab:
    """Everything ``tokenizer.ggml.*`` needs except the special tokens."""

    model: str  # "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    pre: Optional[str]
    tokens: list[bytes]
    scores: list[float]
    types: list[int]
    source: str

    def __len__(self) -> int:
        return len(self.tokens)


def _added_types(tj: dict) -> dict[int, int]:
    """Token type of each added token of tokenizer.json: CONTROL if special, else USER_DEFINED."""
    return {int(t["id"]): int(TokenType.CONTROL if t.get("special") else TokenType.USER_DEFINED)
            for t in tj.get("added_tokens") or []}


def _added_after(tj: dict, start: int) -> list[tuple[int, str, bool]]:
    """Added tokens with ids from ``start`` on, which must be contiguous."""
    extra = sorted((int(t["id"]), t["content"], bool(t.get("special"))) for t in tj.get("added_tokens") or []
                   if int(t["id"]) >= start)
    if [i for i, _, _ in extra] != list(range(start, start + len(extra))):
        raise BadInputError(f"added tokens {[i for i, _, _ in extra]} do not follow the vocabulary at id {start}")
    return extra


def _spm_from_model(base: Path, tj: Optional[dict]) -> Vocab:
    spv = gguf.SentencePieceVocab(base)
    tokens, scores, types = [], [], []
    for text, score, toktype in spv.all_tokens():
        tokens.append(text)
        scores.append(float(score))
        types.append(int(toktype))
    if tj is not None:
        added = _added_types(tj)
        for i in range(len(tokens)):
            if added.get(i) == TokenType.CONTROL and types[i] == TokenType.NORMAL:
                types[i] = int(TokenType.CONTROL)
        for _, content, special in _added_after(tj, len(tokens)):
            tokens.append(content.encode("utf-8"))
            scores.append(PAD_SCORE)
            types.append(int(TokenType.CONTROL if special else TokenType.USER_DEFINED))
    return Vocab("llama", None, tokens, scores, types, "tokenizer.model")


def _spm_type(piece: str, idx: int, unk: Optional[str], added: dict[int, int]) -> int:
    if idx in added:
        return int(TokenType.UNKNOWN) if piece == unk else added[idx]
    if piece == unk:
        return int(TokenType.UNKNOWN)
    if BYTE_PIECE.match(piece):
        return int(TokenType.BYTE)
    return int(TokenType.NORMAL)


def _spm_from_json(tj: dict) -> Vocab:
    """SentencePiece-style tokenizer.json (BPE with byte fallback, or Unigram) -> llama vocab."""
    model = tj["model"]
    added = _added_types(tj)
    if model["type"] == "Unigram":
        pieces = [(p, float(s)) for p, s in model["vocab"]]
        unk = pieces[model["unk_id"]][0] if model.get("unk_id") is not None else None
    else:
        by_id = sorted((i, p) for p, i in model["vocab"].items())
        if [i for i, _ in by_id] != list(range(len(by_id))):
            raise BadInputError("tokenizer.json: vocabulary ids are not 0..n-1")
        unk = model.get("unk_token") or next((t["content"] for t in tj.get("added_tokens") or []
                                              if t["content"] == "<unk>"), None)
        pieces, rank = [], 0
        for i, piece in by_id:
            kind = _spm_type(piece, i, unk, added)
            pieces.append((piece, -float(rank) if kind == TokenType.NORMAL else 0.0))
            rank += kind == TokenType.NORMAL
    types = [_spm_type(p, i, unk, added) for i, (p, _) in enumerate(pieces)]
    tokens, scores = [p.encode("utf-8") for p, _ in pieces], [s for _, s in pieces]
    for _, content, special in _added_after(tj, len(tokens)):
        tokens.append(content.encode("utf-8"))
        scores.append(PAD_SCORE)
        types.append(int(TokenType.CONTROL if special else TokenType.USER_DEFINED))
    return Vocab("llama", None, tokens, scores, types, "tokenizer.json")


def _pre_tokenizer(tj: dict) -> str:
    pre = tj.get("pre_tokenizer") or {}
    for step in pre.get("pretokenizers", [pre]):
        regex = (step.get("pattern") or {}).get("Regex")
        if regex is not None:
            if regex in PRE_TOKENIZERS:
                return PRE_TOKENIZERS[regex]
            raise UnsupportedError(f"tokenizer.json: unknown byte-level BPE split regex {regex[:60]!r}...; known "
                                   f"pre-tokenizers: {', '.join(sorted(set(PRE_TOKENIZERS.values())))}")
    raise UnsupportedError("tokenizer.json: a byte-level BPE without a split regex is not supported "
                           f"(known pre-tokenizers: {', '.join(sorted(set(PRE_TOKENIZERS.values())))})")


def _bpe_from_json(tj: dict) -> Vocab:
    vocab = tj["model"]["vocab"]
    by_id = sorted((i, p) for p, i in vocab.items())
    if [i for i, _ in by_id] != list(range(len(by_id))):
        raise BadInputError("tokenizer.json: vocabulary ids are not 0..n-1")
    added = _added_types(tj)
    tokens = [p.encode("utf-8") for _, p in by_id]
    types = [added.get(i, int(TokenType.NORMAL)) for i, _ in by_id]
    for _, content, special in _added_after(tj, len(tokens)):
        tokens.append(content.encode("utf-8"))
        types.append(int(TokenType.CONTROL if special else TokenType.USER_DEFINED))
    return Vocab("gpt2", _pre_tokenizer(tj), tokens, [0.0] * len(tokens), types, "tokenizer.json")


def read_vocab(base: Path) -> Vocab:
    """The vocabulary of the tokenizer in ``base`` (see the module docstring)."""
    tj = read_json(base / "tokenizer.json") if (base / "tokenizer.json").is_file() else None
    byte_level = tj is not None and (tj.get("decoder") or {}).get("type") == "ByteLevel"
    if tj is not None and byte_level and tj["model"]["type"] == "BPE":
        return _bpe_from_json(tj)
    if (base / "tokenizer.model").is_file():
        return _spm_from_model(base, tj)
    if tj is not None and tj["model"]["type"] in ("BPE", "Unigram"):
        return _spm_from_json(tj)
    raise UnsupportedError(f"{base}: no tokenizer.model and no tokenizer.json with a BPE or Unigram model; "
                           "a GGUF needs the tokenizer (SentencePiece or byte-level BPE)")


def _steps(part: Optional[dict]) -> list[dict]:
    """The steps of a tokenizer.json normalizer / pre-tokenizer (a Sequence or one step)."""
    if not part:
        return []
    if part.get("type") != "Sequence":
        return [part]
    return [step for sub in part.get("normalizers") or part.get("pretokenizers") or [] for step in _steps(sub)]


def space_prefix(base: Path) -> bool:
    """Whether the SentencePiece tokenizer in ``base`` puts a space before the text (LLaMA, Mistral: yes;
    Gemma: no), as llama.cpp's ``tokenizer.ggml.add_space_prefix`` says it (its default is yes). From
    tokenizer.json, what transformers runs (a ``Prepend("▁")`` normalizer, or a ``Metaspace`` that
    prepends), else from tokenizer.model's ``add_dummy_prefix``."""
    if (base / "tokenizer.json").is_file():
        tj = read_json(base / "tokenizer.json")
        if any(step.get("type") == "Prepend" for step in _steps(tj.get("normalizer"))):
            return True
        return any(step.get("type") == "Metaspace" and (step.get("prepend_scheme") in ("first", "always")
                                                        or step.get("add_prefix_space") is True)
                   for step in _steps(tj.get("pre_tokenizer")))
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((base / "tokenizer.model").read_bytes())
    return bool(proto.normalizer_spec.add_dummy_prefix)


def fit_to_rows(vocab: Vocab, rows: int) -> Vocab:
    """Check the vocabulary against the embedding rows; pad missing ids with UNUSED tokens."""
    if len(vocab) > rows:
        raise BadInputError(f"the tokenizer has {len(vocab)} tokens but the embedding has only {rows} rows; "
                            "the tokenizer does not belong to this model")
    if len(vocab) == rows:
        return vocab
    pad = range(len(vocab), rows)
    return Vocab(vocab.model, vocab.pre, vocab.tokens + [f"[PAD{i}]".encode() for i in pad],
                 vocab.scores + [PAD_SCORE] * len(pad), vocab.types + [int(TokenType.UNUSED)] * len(pad),
                 vocab.source)


def hf_adds_special(base: Path) -> dict[str, bool]:
    """Whether the Hugging Face tokenizer itself adds BOS / EOS to a plain text."""
    from blora_export.reference import load_tokenizer

    tok = load_tokenizer(base)
    ids = list(tok("a")["input_ids"])
    return {"bos": bool(ids) and tok.bos_token_id is not None and ids[0] == tok.bos_token_id,
            "eos": bool(ids) and tok.eos_token_id is not None and ids[-1] == tok.eos_token_id}


@contextmanager
def quiet_logger(name: str, level: int) -> Iterator[None]:
    """Raise one of gguf-py's loggers to ``level`` for the duration (restored after)."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(max(level, before))
    try:
        yield
    finally:
        logger.setLevel(before)


def stop_kinds(vocab: Vocab, stops: list[int], eos: Optional[int]) -> dict[str, int]:
    """``eot`` / ``eom`` ids for the model's stop ids other than its EOS, by their text, so llama.cpp
    stops where the base model stops; a stop id of another text relies on llama.cpp's own list."""
    kinds: dict[str, int] = {}
    for token_id in stops:
        if token_id == eos or not 0 <= token_id < len(vocab):
            continue
        text = vocab.tokens[token_id].decode("utf-8", "replace")
        if text in EOT_TEXTS:
            kinds.setdefault("eot", token_id)
        elif text in EOM_TEXTS:
            kinds.setdefault("eom", token_id)
        else:
            log.info("stop id %d (%s) is neither EOS nor an end-of-turn token: llama.cpp stops at it only if it "
                     "recognises the text", token_id, text)
    return kinds


def write_tokenizer(writer: GGUFWriter, base: Path, rows: int) -> dict:
    """Write ``tokenizer.ggml.*`` for the tokenizer in ``base``; return a summary for the result details."""
    vocab = fit_to_rows(read_vocab(base), rows)
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.model == "llama":
        writer.add_token_scores(vocab.scores)
        writer.add_add_space_prefix(space_prefix(base))
    writer.add_token_types(vocab.types)
    with quiet_logger("gguf.vocab", logging.ERROR):  # its heuristics warn about the <s> of a pair template
        special = SpecialVocab(base, load_merges=vocab.model == "gpt2", n_vocab=rows)
    if vocab.model == "gpt2" and not special.merges:
        raise BadInputError(f"{base}: a byte-level BPE tokenizer needs its merges (tokenizer.json or merges.txt)")
    special.add_special_token.update(hf_adds_special(base))
    stops = stop_token_ids(base, read_json(base / "config.json") if (base / "config.json").is_file() else {})
    for kind, token_id in stop_kinds(vocab, stops, special.special_token_ids.get("eos")).items():
        special.special_token_ids[kind] = token_id
    special.add_to_gguf(writer, quiet=True)
    return {"stop_ids": stops, "model": vocab.model, "pre": vocab.pre, "tokens": len(vocab), "source": vocab.source,
            "special_ids": dict(sorted(special.special_token_ids.items())),
            "add_bos": special.add_special_token.get("bos"), "merges": len(special.merges),
            "add_space_prefix": space_prefix(base) if vocab.model == "llama" else None,
            "chat_template": special.chat_template is not None}
