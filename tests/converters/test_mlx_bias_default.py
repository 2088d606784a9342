"""MLX scales/biases default: float32 (the fold at mlx-lm's own noise) unless the checkpoint trained
fold-aware with float16 β' (then float16 is exact)."""
import json
import shutil

from blora_export import api
from converters.to_mlx import BIAS_TRADE, default_bias_dtype


def test_default_bias_dtype_follows_how_the_checkpoint_trained(samples, tmp_path):
    assert default_bias_dtype(api.open_job(samples / "qa-blora-q4_1", quiet=True)) == "float32"
    folded = tmp_path / "folded"
    shutil.copytree(samples / "qa-blora-q4_1", folded)
    config = json.loads((folded / "blora_config.json").read_text())
    (folded / "blora_config.json").write_text(json.dumps({**config, "forward": "folded"}))
    assert default_bias_dtype(api.open_job(folded, base=samples / "base", quiet=True)) == "float16"
    assert "+25%" in BIAS_TRADE["float32"] and "exact" in BIAS_TRADE["float16"]
