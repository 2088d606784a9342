"""bench/fidelity.py does not rot: its corpus parsing, scoring and one evaluation round on a sample."""
import gzip
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from blora_export.spec import MinMaxGrid

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import fidelity  # noqa: E402
import fidelity_corpus  # noqa: E402
import fidelity_eval  # noqa: E402


def test_corpus_is_read_from_the_packages_files(tmp_path):
    gcide = tmp_path / "dict-gcide" / fidelity_corpus.GCIDE_FILE
    gcide.parent.mkdir(parents=True)
    entry = "<p><hw>Ab*a\"cus</hw> <def>A table or tray strewn with sand, anciently used for drawing and calculating.</def></p>"
    gcide.write_bytes(gzip.compress((entry + "\n\n<-- a comment that is dropped -->\n\nshort\n").encode()))
    (tmp_path / "dict-gcide" / ".done").write_text("x\n")
    docs = tmp_path / "python3.11-doc" / fidelity_corpus.DOCS_DIR
    docs.mkdir(parents=True)
    held = next(f"f{i}.rst.txt" for i in range(100) if fidelity_corpus.is_heldout(f"f{i}.rst.txt"))
    kept = next(f"f{i}.rst.txt" for i in range(100) if not fidelity_corpus.is_heldout(f"f{i}.rst.txt"))
    text = ".. note::\n\nThe :func:`len` function returns the number of items of an object, as ``len(x)``.\n\n=====\n"
    (docs / held).write_text(text)
    (docs / kept).write_text(text.replace("number", "count"))
    (tmp_path / "python3.11-doc" / ".done").write_text("x\n")
    corpus = fidelity_corpus.load_corpus(tmp_path)
    assert corpus.pretrain == ["Ab*a\"cus A table or tray strewn with sand, anciently used for drawing and calculating."]
    assert corpus.heldout == ["The len function returns the number of items of an object, as len(x)."]
    assert corpus.finetune == ["The len function returns the count of items of an object, as len(x)."]


def test_score_is_perplexity_and_top1():
    windows = [[0, 1, 2, 1]]
    perfect = np.full((4, 3), -1e9)
    perfect[np.arange(3), [1, 2, 1]] = 0.0
    def score(logits):
        return fidelity_eval.score(fidelity_eval.log_probs([logits]), windows)
    assert score(perfect) == (1.0, 1.0)
    uniform = np.zeros((4, 3))
    ppl, top1 = score(uniform)
    assert math.isclose(ppl, 3.0) and top1 == 0.0  # argmax of a tie is token 0, never a target here
    shifted = np.roll(perfect, 1, axis=0) / 1e7  # logits aligned one position off: a wrong scorer's view
    ppl, top1 = score(shifted)
    assert ppl > 3.0 and top1 == 0.0


def test_kl_is_zero_for_the_same_function_and_exact_otherwise():
    ref = fidelity_eval.log_probs([np.array([[0.0, 0.0], [0.0, 0.0]])])  # one position: p = (1/2, 1/2)
    same = fidelity_eval.log_probs([np.array([[5.0, 5.0], [1.0, 2.0]])])  # shifted logits, same distribution
    assert fidelity_eval.mean_kl(ref, same) == pytest.approx(0.0, abs=1e-15)
    q = fidelity_eval.log_probs([np.array([[0.0, math.log(3.0)], [0.0, 0.0]])])  # q = (1/4, 3/4)
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert fidelity_eval.mean_kl(ref, q) == pytest.approx(expected, rel=1e-12)


def test_sizes_meet_the_issue():
    small = fidelity.SIZES["small"]
    params = (2 * small.vocab * small.hidden + small.layers * (
        2 * small.hidden * small.hidden + 2 * small.hidden * small.hidden * small.kv_heads // small.heads
        + 3 * small.hidden * small.intermediate))
    assert params >= 20_000_000 and small.intermediate % 256 == 0


def test_the_8_bit_run_trains_on_a_grid_both_8_bit_folds_take():
    from blora_export.fold import RUNTIME_GRIDS, fold_obstacles, mlx_grid, onnx_grid
    from blora_export.train.config import parse_target

    target = parse_target(fidelity.RUNS["qa-blora-8bit"]["target"])
    assert target.grid.bits == 8 and target.grid.block_in == 32 and target.name in RUNTIME_GRIDS
    for runtime in (onnx_grid(32, 8), mlx_grid(8, 32)):
        assert fold_obstacles("qa-blora", target.grid, "dequantized", [(target.lambda_in, 1)], runtime) == []
    assert fidelity_eval.grid_bits({"method": "qa-blora", "base_quant": target.grid.to_json()}) == 8
    assert fidelity_eval.grid_bits({"method": "q-blora", "base_quant": {"scheme": "nf4"}}) is None


@pytest.mark.slow
def test_one_evaluation_round_on_a_sample(samples, make_ckpt, tmp_path):
    base, ckpt = samples / "base", samples / "qa-blora-q4_1"
    ckpt8 = make_ckpt(base, "qa-blora", 32, 4, base_quant=MinMaxGrid(8, 1, 32), seed=11)
    paragraphs = [line for line in (samples / "corpus.txt").read_text().splitlines() if len(line) > 40]
    windows = fidelity_eval.heldout_windows(base, paragraphs, seq=16, count=2)
    assert len(windows) == 2 and all(len(w) == 16 for w in windows)
    cells = fidelity_eval.evaluate_all(base, {"qa-blora": ckpt, "qa-blora-8bit": ckpt8}, windows, tmp_path / "art")
    by = {(c["model"], c["artifact"]): c for c in cells}
    ref = by[("qa-blora", "torch")]["ppl"]
    for artifact in ("gguf-q4_1-fold", "onnx-int4-fold", "mlx-4-32-fold", "gguf-q4_k_m-ptq", "onnx-int4-rtn-ptq"):
        assert by[("qa-blora", artifact)]["ppl"] > 0 and by[("qa-blora", artifact)]["bytes"] > 0
    assert abs(by[("qa-blora", "onnx-int4-fold")]["ppl"] / ref - 1) < 1e-4  # exact fold, float32 activations
    assert by[("qa-blora", "torch")]["kl"] is None and by[("qa-blora", "onnx-int4-fold")]["kl"] < 1e-8
    assert by[("qa-blora", "gguf-q4_k_m-ptq")]["kl"] > 100 * by[("qa-blora", "onnx-int4-fold")]["kl"]
    # the 8-bit model: its two exact folds (float32 offsets / biases) and llama.cpp's Q8_0 of the merge
    assert {a for m, a in by if m == "qa-blora-8bit"} == {"torch", "onnx-int8-fold", "mlx-8bit-fold", "gguf-q8_0-ptq"}
    ref8 = by[("qa-blora-8bit", "torch")]["ppl"]
    for artifact in ("onnx-int8-fold", "mlx-8bit-fold"):
        assert by[("qa-blora-8bit", artifact)]["kind"] == "fold"
        assert abs(by[("qa-blora-8bit", artifact)]["ppl"] / ref8 - 1) < 1e-4, artifact
    table = fidelity_eval.format_table(cells + [{"model": "run", "seconds": 1.0, "machine": "test"}])
    assert "gguf-q4_1-fold" in table and "Δppl" in table and "qa-blora-8bit" in table
    fidelity_eval.plot(cells, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 1000
    json.dumps(cells)
