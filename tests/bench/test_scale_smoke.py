"""Smoke run of bench/scale.py on a tiny shape, so the real-size bench does not rot.

Every command of the bench runs for real (each in its own process under /usr/bin/time -v).
llama.cpp's own pipeline runs only when its tools were built (``python bench/scale.py
--build-llama-cpp``); otherwise the bench must say, in its table and its JSON, that those rows
were skipped and why: never silently.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import scale  # noqa: E402

pytestmark = pytest.mark.skipif(not Path(scale.TIME).is_file(), reason="/usr/bin/time missing: apt-get install time")


def test_parse_time_v():
    text = ("\tUser time (seconds): 25.01\n\tSystem time (seconds): 1.50\n"
            "\tElapsed (wall clock) time (h:mm:ss or m:ss): 1:02.50\n"
            "\tMaximum resident set size (kbytes): 1048576\n")
    assert scale.parse_time_v(text) == {"wall_s": 62.5, "user_s": 25.01, "sys_s": 1.5, "peak_rss": 1024**3}
    with pytest.raises(ValueError, match="Maximum resident"):
        scale.parse_time_v(text.replace("Maximum", "Max"))


def test_tiny_shape_all_commands(tmp_path):
    workdir = tmp_path / "work"
    cache = scale.DEFAULT_WORKDIR
    tools = scale.llama_cpp_tools(cache)
    if not isinstance(tools, str):  # reuse the built llama.cpp tools (a cache, never built here)
        tree = scale.llama_cpp_dir(cache).parents[1]
        (workdir).mkdir()
        (workdir / tree.name).symlink_to(tree)
    out = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "scale.py"), "--sizes", "tiny", "--workdir",
                           str(workdir), "--json", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())["sizes"][0]
    runs = {r["name"]: r for r in result["runs"]}
    ours = [r for r in runs.values() if not r["name"].startswith("llama.cpp")]
    assert len(ours) == 9
    for r in ours:  # verify may say INCONCLUSIVE on the random tiny model (a verdict, not a failure)
        ok = ("ok", "inconclusive") if r["name"].startswith("verify") else ("ok",)
        assert r["status"] in ok and r["wall_s"] > 0 and r["peak_rss_gb"] > 0.01, r
    for name in scale.VERIFY_MATCH:  # verify's wall is judged against the export it checks
        assert "wall_vs_export" in runs[name]["extra"] and "wall <= 3x" in runs[name]["target"], runs[name]
    assert "GGUF llama.cpp maps" in runs["verify qa.gguf --runtime llama.cpp"]["target"]
    llama = [r for r in runs.values() if r["name"].startswith("llama.cpp")]
    assert len(llama) == 2
    if isinstance(tools, str):
        assert all(r["status"] == "skipped" and "not built" in r["note"] for r in llama)
        assert "skipped" in proc.stdout and "not built" in proc.stdout
    else:
        assert all(r["status"] == "ok" for r in llama), llama
        assert all("wall_vs_llama_cpp" in r["extra"] for r in ours)
    assert not (workdir / "models" / "tiny").exists()  # deleted without --keep
    shutil.rmtree(workdir, ignore_errors=True)
