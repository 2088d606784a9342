"""Gemma's tokenizer and stop tokens in every output a runtime reads them from.

The tiny gemma2 / gemma3_text bases (samples/tiny_models.py) carry a Gemma-style SentencePiece
tokenizer: <pad>=0 <eos>=1 <bos>=2 <unk>=3, <start_of_turn> / <end_of_turn> (special), no dummy prefix,
byte fallback, <bos> added; Gemma's chat template; generation_config stops at [<eos>, <end_of_turn>].
llama.cpp must tokenize as transformers does (its default space prefix would not), and greedy
generation in llama.cpp's chat mode and in onnxruntime-genai must stop at <end_of_turn> where the
training-time model does.
"""
import json
import shutil

import numpy as np
import pytest
import torch
from families_support import field  # tests/converters, on sys.path by its conftest
from gguf import TokenType
from safetensors.torch import load_file, save_file

from blora_export import api
from converters import gguf_tokenizer
from converters.gguf_runtime import open_llama

TEXTS = ["The capital of France is", " a leading space", "two  spaces\nand a newline\n", "",
         "<start_of_turn>user\nWhere is Paris?<end_of_turn>\n<start_of_turn>model\n",
         "digits 12345 and bytes: café ☃ 😀", "<bos><eos><pad> are text here"]
CHAT = [{"role": "user", "content": "Once upon a time"}]


def _tokenizer(base):
    from blora_export.reference import load_tokenizer

    return load_tokenizer(base)


def _vocab_only(gguf):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)


@pytest.fixture(scope="module")
def gemma_gguf(ckpts, tmp_path_factory):
    out = tmp_path_factory.mktemp("gemma-gguf") / "m.gguf"
    api.export(ckpts("gemma3_text", "q-blora"), out, "gguf", gguf_type="f32", quiet=True)
    return out


def test_gguf_carries_gemma_tokenizer_as_llama_cpp_converter_does(tiny_base, gemma_gguf):
    tok = _tokenizer(tiny_base("gemma3_text"))
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    assert field(gemma_gguf, "tokenizer.ggml.model") == "llama"
    assert field(gemma_gguf, "tokenizer.ggml.add_space_prefix") is False
    assert field(gemma_gguf, "tokenizer.ggml.add_bos_token") is True
    ids = {k: field(gemma_gguf, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding", "unknown", "eot")}
    assert ids == {"bos": 2, "eos": 1, "padding": 0, "unknown": 3, "eot": eot}
    assert field(gemma_gguf, "tokenizer.chat_template") == tok.chat_template
    types = field(gemma_gguf, "tokenizer.ggml.token_type")
    assert [types[tok.convert_tokens_to_ids(t)] for t in ("<start_of_turn>", "<end_of_turn>", "<0x41>")] == \
        [TokenType.CONTROL, TokenType.CONTROL, TokenType.BYTE]


def test_llama_cpp_tokenizes_gemma_as_transformers(tiny_base, gemma_gguf):
    tok = _tokenizer(tiny_base("gemma3_text"))
    llm = _vocab_only(gemma_gguf)
    try:
        for text in TEXTS:
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == tok(text)["input_ids"], text
        chat = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
        assert llm.tokenize(chat.encode(), add_bos=False, special=True) == \
            tok(chat, add_special_tokens=False)["input_ids"]
    finally:
        llm.close()


def test_space_prefix_dropped_breaks_llama_cpp_tokenization(ckpts, tiny_base, tmp_path, monkeypatch):
    """The test above can fail: with llama.cpp's default space prefix the texts tokenize differently."""
    monkeypatch.setattr(gguf_tokenizer, "space_prefix", lambda base: True)
    out = tmp_path / "m.gguf"
    api.export(ckpts("gemma3_text", "q-blora"), out, "gguf", gguf_type="f32", quiet=True)
    tok, llm = _tokenizer(tiny_base("gemma3_text")), _vocab_only(out)
    try:
        differ = [t for t in TEXTS if llm.tokenize(t.encode(), add_bos=True, special=True) != tok(t)["input_ids"]]
    finally:
        llm.close()
    assert len(differ) >= 4, differ


def test_space_prefix_follows_each_tokenizer(tiny_base):
    assert gguf_tokenizer.space_prefix(tiny_base("gemma2")) is False
    assert gguf_tokenizer.space_prefix(tiny_base("llama")) is True


def test_gemma_stop_ids_and_template_reach_every_output(ckpts, tiny_base, gemma_gguf, tmp_path):
    import llama_cpp
    from mlx_lm import load as mlx_load

    base = tiny_base("gemma3_text")
    stops = json.loads((base / "generation_config.json").read_text())["eos_token_id"]
    assert stops == [1, _tokenizer(base).convert_tokens_to_ids("<end_of_turn>")]
    llm = _vocab_only(gemma_gguf)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    assert [i for i in range(llama_cpp.llama_vocab_n_tokens(vocab)) if llama_cpp.llama_vocab_is_eog(vocab, i)] == stops
    llm.close()
    ckpt = ckpts("gemma3_text", "qa-blora")
    onnx = tmp_path / "onnx"
    api.export(ckpt, onnx, "onnx", quiet=True)
    assert json.loads((onnx / "genai_config.json").read_text())["model"]["eos_token_id"] == stops
    for kind in ("mlx", "safetensors"):
        out = tmp_path / kind
        api.export(ckpt, out, kind, quiet=True)
        assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == stops
        assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == _tokenizer(base).chat_template
        assert (out / "tokenizer.model").read_bytes() == (base / "tokenizer.model").read_bytes()
    _, mlx_tok = mlx_load(str(tmp_path / "mlx"))
    assert mlx_tok.eos_token_ids == set(stops)


def _stop_early_base(base, tmp_path, stop_id, third):
    """A copy of the (untied) ``base`` whose head makes ``stop_id`` the greedy choice after a few tokens: its
    row becomes 1.5x the row of ``third``, the token the trained model picks third (whose logit is the
    largest there). The tied tiny Gemma repeats one token after the chat prompt, and its head row is also
    the embedding of <end_of_turn>, which the prompt holds: the stop test takes the untied model."""
    out = tmp_path / "stop-base"
    shutil.copytree(base, out)
    state = load_file(str(out / "model.safetensors"))
    state["lm_head.weight"][stop_id] = 1.5 * state["lm_head.weight"][third]
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _reference_tokens(job, base, prompt, stops, steps):
    from blora_export.reference import adapter_branches, apply_trained_base, load_hf_model

    model = load_hf_model(base)
    apply_trained_base(model, job.base, job.plan)
    ids = list(prompt)
    with torch.no_grad(), adapter_branches(model, list(job.ckpt.modules.values())):
        while len(ids) < len(prompt) + steps and ids[-1] not in stops:
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def _genai_tokens(onnx, prompt, steps):
    import onnxruntime_genai as og

    model = og.Model(str(onnx))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + steps, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array(prompt, np.int32))
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


@pytest.mark.slow
def test_gemma_chat_stops_at_end_of_turn_in_llama_cpp_and_genai(tiny_base, make_ckpt, tmp_path):
    base = tiny_base("gemma3_text", tie_word_embeddings=False)
    tok = _tokenizer(base)
    eot, stops, steps = tok.convert_tokens_to_ids("<end_of_turn>"), [1, tok.convert_tokens_to_ids("<end_of_turn>")], 12
    prompt = list(tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
    first = _reference_tokens(api.open_job(make_ckpt(base, "q-blora", 2, 2), quiet=True), base, prompt, [], 3)
    stop_base = _stop_early_base(base, tmp_path, eot, first[-1])
    ckpt = make_ckpt(stop_base, "q-blora", 2, 2)
    job = api.open_job(ckpt, quiet=True)
    expected = _reference_tokens(job, stop_base, prompt, stops, steps)
    assert expected[-1] == eot and 2 < len(expected) < steps, expected  # the reference stops at <end_of_turn>

    gguf = tmp_path / "m.gguf"
    api.export(ckpt, gguf, "gguf", gguf_type="f32", quiet=True)
    llm = open_llama(gguf, n_ctx=128)
    try:  # llama.cpp's chat mode: the GGUF's chat template renders the prompt, generation stops at an EOG id
        reply = llm.create_chat_completion(CHAT, max_tokens=steps, temperature=0.0, top_k=1)
    finally:
        llm.close()
    assert reply["choices"][0]["finish_reason"] == "stop", reply
    assert reply["choices"][0]["message"]["content"] == tok.decode(expected[:-1]), reply
    assert reply["usage"]["prompt_tokens"] == len(prompt)  # the same rendered prompt (one <bos>)
    assert reply["usage"]["completion_tokens"] == len(expected) - 1  # llama-cpp-python does not count the EOG id

    onnx = tmp_path / "onnx"
    api.export(ckpt, onnx, "onnx", quiet=True)
    assert _genai_tokens(onnx, prompt, steps) == expected  # genai stops at <end_of_turn> (its eos_token_id list)
