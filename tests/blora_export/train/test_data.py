"""Training data: Alpaca / text rows, prompt masking, bad lines, batch order."""
import json

import pytest
import torch

from blora_export.errors import BadInputError
from blora_export.reference import load_tokenizer
from blora_export.train.data import (
    IGNORE_INDEX,
    collate,
    format_prompt,
    global_batch_indices,
    load_examples,
    rank_batch,
    read_rows,
    tokenize_row,
)


@pytest.fixture(scope="module")
def tok(samples):
    return load_tokenizer(samples / "base")


def write(tmp_path, lines):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_alpaca_prompt_is_masked_response_and_eos_trained(tok):
    row = {"instruction": "Name the capital city of the country.", "input": "France", "output": "Paris."}
    ex = tokenize_row(row, tok, 1000)
    prompt, response = format_prompt(row)
    n_prompt = len(tok(prompt)["input_ids"])
    response_ids = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex.labels[:n_prompt] == (IGNORE_INDEX,) * n_prompt
    assert ex.labels[n_prompt:] == tuple(response_ids) == ex.input_ids[n_prompt:]
    assert ex.input_ids[0] == tok.bos_token_id
    assert "### Input:\nFrance" in prompt and "### Instruction:" in prompt
    assert "### Input" not in format_prompt({"instruction": "x", "output": "y"})[0]


def test_text_rows_train_every_token(tok):
    ex = tokenize_row({"text": "one two three"}, tok, 1000)
    assert ex.labels == ex.input_ids and ex.input_ids[-1] == tok.eos_token_id


def test_seq_len_truncates_and_drops_examples_without_response(tmp_path, tok, caplog):
    path = write(tmp_path, [json.dumps({"instruction": "What color is the sky?", "output": "blue"}),
                            json.dumps({"text": "one two three four five six seven eight nine ten"})])
    kept = load_examples(path, tok, 20)
    assert len(kept) == 1 and len(kept[0].input_ids) == 20
    assert "1 of 2 examples" in caplog.text
    with pytest.raises(BadInputError, match="raise --seq-len"):
        load_examples(write(tmp_path, [json.dumps({"instruction": "What color is the sky?", "output": "b"})]), tok, 20)


@pytest.mark.parametrize("line, match", [
    ('{"instruction": "x", "output": "y"', "not valid JSON"),
    ('[1, 2]', "expected a JSON object"),
    ('{"instruction": "x"}', "missing output"),
    ('{"instruction": "x", "output": 3}', "'output' must be a string"),
    ('{"text": ""}', "'text' must be a non-empty string"),
])
def test_bad_line_is_one_line_error_naming_its_number(tmp_path, line, match):
    path = write(tmp_path, ['{"text": "fine"}', "", line])
    with pytest.raises(BadInputError, match=match) as err:
        read_rows(path)
    assert f"{path}:3:" in str(err.value) and "\n" not in str(err.value)


def test_empty_file_is_refused(tmp_path):
    with pytest.raises(BadInputError, match="holds no examples"):
        read_rows(write(tmp_path, ["", "  "]))


def test_batch_order_is_a_function_of_seed_and_step():
    first = [global_batch_indices(5, 0, s, 4) for s in range(5)]
    assert first == [global_batch_indices(5, 0, s, 4) for s in range(5)]
    stream = [i for b in first for i in b]
    assert sorted(stream[:5]) == list(range(5)) and sorted(stream[5:10]) == list(range(5))  # epochs
    assert global_batch_indices(5, 1, 0, 4) != first[0] or global_batch_indices(5, 1, 1, 4) != first[1]


def test_data_parallel_shares_partition_the_global_batch(tok):
    exs = [tokenize_row({"text": "a " * (i + 1)}, tok, 64) for i in range(7)]
    whole = rank_batch(exs, 3, 2, 4, 0, 1, 0)
    parts = [rank_batch(exs, 3, 2, 2, r, 2, 0) for r in range(2)]
    rows = [tuple(t[m.bool()].tolist()) for p in parts for t, m in zip(p.input_ids, p.attention_mask)]
    want = [tuple(t[m.bool()].tolist()) for t, m in zip(whole.input_ids, whole.attention_mask)]
    assert rows == want


def test_collate_pads_right_and_masks_padding(tok):
    exs = [tokenize_row({"text": "one"}, tok, 64), tokenize_row({"text": "one two three"}, tok, 64)]
    b = collate(exs, pad_id=0)
    n0 = len(exs[0].input_ids)
    assert b.attention_mask[0].tolist() == [1] * n0 + [0] * (b.input_ids.shape[1] - n0)
    assert (b.labels[0, n0:] == IGNORE_INDEX).all() and b.tokens == sum(len(e.input_ids) for e in exs)
    assert b.input_ids.dtype == torch.long
