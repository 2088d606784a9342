"""The streamed forward: packed prompts compute what transformers computes per prompt, and streams
with the very same weights share one run."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from blora_export.base import BaseModel
from blora_export.reference import model_logits
from blora_export.stream import PACK_TOKENS, Stream, StreamedForward, pack

#: Float32 noise between one forward per prompt and one over the packed sequence (other GEMM
#: blockings, the same math); a prompt that attended to its neighbour would move by far more.
PACKED_REL_BOUND = 1e-5

# lengths 1 to 20: one prompt shorter than the 8-token windows below, others longer
PROMPTS = [[1, 5, 9, 13, 2, 7, 21, 30, 8, 4, 17, 3], [1], [1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58],
           [1, 3, 3, 3, 9]]


def test_pack_groups_consecutive_prompts_up_to_the_limit():
    assert pack([[0] * 3, [0] * 4, [0] * 2, [0] * 9, [0] * 1], limit=9) == [[0, 1, 2], [3], [4]]
    assert pack([[0] * 20], limit=9) == [[0]]  # a longer prompt is a sequence of its own
    assert pack([[0] * 5] * 3) == [[0, 1, 2]] and PACK_TOKENS >= 256
    assert pack([[0] * 5] * 3, limit=1) == [[0], [1], [2]]


@pytest.mark.parametrize("arch, kwargs", [("llama", {}), ("mistral", {"sliding_window": 8}), ("gemma2", {}),
                                          ("gemma3_text", {}), ("granite", {}), ("smollm3", {}), ("phi3", {}),
                                          ("qwen3", {})])
@pytest.mark.parametrize("limit", [PACK_TOKENS, 16])  # 16: the prompts in three sequences
def test_packed_prompts_match_transformers_per_prompt(tiny_base, monkeypatch, arch, kwargs, limit):
    """Each prompt's logits, packed with the others (block-diagonal attention, windows within the
    prompt, positions restarting at 0), are transformers' logits of that prompt alone."""
    import blora_export.stream as stream_module

    monkeypatch.setattr(stream_module, "PACK_TOKENS", limit)
    path = tiny_base(arch, **kwargs)
    vocab = BaseModel.open(path).config["vocab_size"]
    prompts = [[t % vocab for t in p] for p in PROMPTS]
    out = StreamedForward(BaseModel.open(path)).run(prompts, [Stream("base")])["base"]
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model_logits(model, prompts)
    assert [tuple(x.shape) for x in out] == [tuple(x.shape) for x in expected]
    for got, want in zip(out, expected):
        rel = float((got - want).abs().max() / want.abs().max())
        assert rel <= PACKED_REL_BOUND, (arch, rel)


def test_streams_with_the_same_weight_objects_share_one_run(tiny_base):
    """A stream whose weights are the same objects as an earlier one's (and that has no hooks) takes its
    outputs; a hooked stream, or one with equal values in other objects, computes its own."""
    base = BaseModel.open(tiny_base("llama"))

    def counted(name, cache):
        return cache.tensor(name)

    def copies(name, cache):
        return cache.tensor(name).clone()

    def nudge(part, prefix):  # a hook that changes nothing, but the stream must still run its own forward
        return [part.register_forward_hook(lambda _m, _a, out: out)] if prefix.endswith("layers.0") else []
    streams = [Stream("a", counted), Stream("b", counted), Stream("copy", copies), Stream("hooked", counted, nudge)]
    out = StreamedForward(base).run(PROMPTS[:2], streams)
    def shared(p, q):  # views of one computed tensor
        return all(x.data_ptr() == y.data_ptr() for x, y in zip(out[p], out[q]))
    assert shared("a", "b")  # not recomputed
    assert not shared("a", "copy") and not shared("a", "hooked")
    for name in ("copy", "hooked"):
        assert all(torch.equal(x, y) for x, y in zip(out["a"], out[name]))


def test_a_transformers_without_packed_masks_is_refused(tiny_base, monkeypatch):
    """Without a packed-sequence mask the prompts would attend to each other: refused, not computed."""
    import blora_export.stream as stream_module
    from blora_export.errors import UnsupportedError

    monkeypatch.setattr(stream_module, "causal_mask", lambda *a, **k: None)
    with pytest.raises(UnsupportedError, match="packed-sequence attention mask"):
        StreamedForward(BaseModel.open(tiny_base("llama"))).run(PROMPTS, [Stream("base")])
    monkeypatch.setattr(stream_module, "PACK_TOKENS", 1)  # one prompt per sequence: plain causal is right
    assert len(StreamedForward(BaseModel.open(tiny_base("llama"))).run(PROMPTS, [Stream("base")])["base"]) == len(PROMPTS)
