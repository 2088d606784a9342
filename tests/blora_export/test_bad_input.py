"""The bad-input corpus (issue 10, part 2): a clear error, nothing lost.

Every case builds broken inputs in ``tmp_path`` from copies of ``samples/``, runs the real CLI in a
subprocess and checks all of: the exit code (2: bad input or usage); stderr is exactly one line,
``error: ...``, naming the offending file or option and what is wrong; no ``Traceback`` anywhere;
every file and folder under the workspace (inputs, pre-existing outputs) is byte-identical
afterwards and nothing was added (no output, temporary file or empty parent folder left behind);
and nothing was unpickled (the pickles planted in the inputs would create a marker file).
Disk-full cases run in-process, the writers failing as their libraries do on a full disk.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "samples"
CHECKPOINTS = {"ckq": "q-blora-nf4", "ckqa": "qa-blora-q4_1", "ckpaper": "paper-q-blora"}
UNWRITABLE_AS_ROOT = Path("/sys")  # a read-only mount: root's permission bits cannot help it


ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "COLUMNS": "200"}
# Importing torch and transformers takes 3-8 s on a loaded 2-core machine, longer than most cases run. So a
# case's process is forked from a server that has imported them (nothing else: no thread pool is started)
# and then runs the CLI exactly as `python -m blora_export.cli ARGS` does (runpy, argv, stdio on files, exit
# status). BLORA_CLI_FRESH=1 starts a fresh interpreter per case instead (same results, ~5x slower).
PRELOAD = ("torch", "numpy", "safetensors.torch", "click", "gguf", "onnx", "onnxruntime", "transformers",
           "transformers.models.llama.modeling_llama", "tokenizers", "blora_export.api", "converters.to_gguf",
           "converters.to_onnx", "converters.to_safetensors", "converters.to_mlx", "converters.to_peft",
           "blora_export.train")
FORK_SERVER = r"""
import json, os, runpy, signal, sys, traceback
for name in sys.argv[1:]:
    __import__(name)
print("ready", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            signal.alarm(req["timeout"])
            sys.argv = ["blora_export.cli", *req["args"]]
            try:
                runpy.run_module("blora_export.cli", run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (exc.code is not None)
                if exc.code is not None and not isinstance(exc.code, int):
                    print(exc.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps(os.waitstatus_to_exitcode(status)), flush=True)
"""
_server: list = []


def _fork_server() -> subprocess.Popen:
    if not _server or _server[0].poll() is not None:
        proc = subprocess.Popen([sys.executable, "-c", FORK_SERVER, *PRELOAD], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, env=ENV)
        assert proc.stdout.readline().strip() == "ready"
        _server[:] = [proc]
    return _server[0]


def run_cli(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m blora_export.cli ARGS`` with this checkout on PYTHONPATH; nothing from the network."""
    args = [str(a) for a in args]
    if os.environ.get("BLORA_CLI_FRESH") == "1" or not hasattr(os, "fork"):
        return subprocess.run([sys.executable, "-m", "blora_export.cli", *args], capture_output=True,
                              text=True, env=ENV, timeout=timeout)
    server = _fork_server()
    with tempfile.TemporaryDirectory(prefix="blora-cli-") as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        server.stdin.write(json.dumps({"args": args, "stdout": str(out), "stderr": str(err), "timeout": timeout}) + "\n")
        server.stdin.flush()
        code = json.loads(server.stdout.readline())
        return subprocess.CompletedProcess(args, code, out.read_text(errors="replace"), err.read_text(errors="replace"))


@pytest.fixture(scope="module", autouse=True)
def _stop_fork_server():
    yield
    for proc in _server:
        proc.stdin.close()
        proc.wait(timeout=30)
    _server.clear()


def tree_state(root: Path) -> dict[str, str]:
    """Every path under ``root``: folders, symlinks (their target) and files (sha256 of the bytes)."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                state[rel] = "link:" + os.readlink(path)
            elif path.is_dir():
                state[rel] = "dir"
            else:
                state[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


class Unpickled:
    """Unpickling this object creates ``marker`` (``open(marker, "w")``): proof that a tool unpickled."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ------------------------------------------------------------------ the workspace and its edits

@dataclass
class WS:
    root: Path
    marker: Path
    artifacts: Path

    def __truediv__(self, rel: str) -> Path:
        return self.root / rel

    def edit_json(self, rel: str, change: Callable[[dict], None]) -> None:
        data = json.loads((self / rel).read_text())
        change(data)
        (self / rel).write_text(json.dumps(data))

    def set_json(self, rel: str, **values) -> None:
        self.edit_json(rel, lambda d: d.update(values))

    def drop_json(self, rel: str, *keys: str) -> None:
        self.edit_json(rel, lambda d: [d.pop(k) for k in keys])

    def edit_tensors(self, rel: str, change: Callable[[dict], None]) -> None:
        tensors = load_file(str(self / rel))
        change(tensors)
        save_file(tensors, str(self / rel), metadata={"format": "pt"})

    def truncate(self, rel: str, keep: Optional[int] = None) -> None:
        data = (self / rel).read_bytes()
        (self / rel).write_bytes(data[: len(data) // 2 if keep is None else keep])

    def plant_pickle(self, rel: str) -> None:
        (self / rel).write_bytes(pickle.dumps({"weight": Unpickled(self.marker)}))

    def copy_artifact(self, name: str, rel: str) -> None:
        src = self.artifacts / name
        if src.is_dir():
            shutil.copytree(src, self / rel)
        else:
            shutil.copy2(src, self / rel)

    def shard_base(self) -> None:
        """Split base/model.safetensors into two shards with an index (as large models come)."""
        tensors = load_file(str(self / "base/model.safetensors"))
        names = sorted(tensors)
        half = len(names) // 2
        parts = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
        for file, keys in parts.items():
            save_file({k: tensors[k] for k in keys}, str(self / "base" / file), metadata={"format": "pt"})
        (self / "base/model.safetensors").unlink()
        index = {"metadata": {}, "weight_map": {k: f for f, keys in parts.items() for k in keys}}
        (self / "base/model.safetensors.index.json").write_text(json.dumps(index))


def build_ws(root: Path, marker: Path, artifacts: Path) -> WS:
    root.mkdir()
    shutil.copytree(SAMPLES / "base", root / "base")
    for name, sample in CHECKPOINTS.items():
        shutil.copytree(SAMPLES / sample, root / name)  # base_model_name_or_path "../base" -> root/base
    (root / "data").mkdir()
    shutil.copy2(SAMPLES / "data" / "tiny.jsonl", root / "data" / "tiny.jsonl")
    (root / "prompts.txt").write_text("The quick brown fox\nOnce upon a time\n")
    return WS(root, marker, artifacts)


def zero_token_tokenizer(ws: WS) -> None:
    """A tokenizer.json whose vocabulary holds only the special tokens: text encodes to nothing."""
    def change(tj: dict) -> None:
        tj["model"].update(vocab={"<unk>": 0, "<s>": 1, "</s>": 2}, merges=[], byte_fallback=False, unk_token=None)
    ws.edit_json("base/tokenizer.json", change)


def unwritable_dir(ws: WS) -> Path:
    if os.geteuid() != 0:
        (ws / "ro").mkdir()
        os.chmod(ws / "ro", 0o555)
        return ws / "ro"
    return UNWRITABLE_AS_ROOT


# ------------------------------------------------------------------ the corpus

@dataclass
class Case:
    id: str
    args: str  # "{ws}" is the workspace, "{ro}" an unwritable folder; split on spaces
    match: tuple[str, ...]  # substrings of the one error line: the file or option, and what is wrong
    setup: Callable[[WS], None] = lambda ws: None
    code: int = 2
    slow: bool = False
    extra: dict = field(default_factory=dict)


def _corrupt(rel: str) -> Callable[[WS], None]:
    return lambda ws: (ws / rel).write_text('{"oops": ')


def _nan_lora(tensors: dict) -> None:
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key][0, 0] = float("nan")


def _wrong_rank_b(tensors: dict) -> None:
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key] = tensors[key][:, :-1].clone()


def _absent_module(tensors: dict) -> None:
    for key in [k for k in tensors if ".layers.0.self_attn.q_proj." in k]:
        tensors[key.replace(".layers.0.", ".layers.7.")] = tensors.pop(key)


def _lambda_not_dividing(tensors: dict) -> None:
    key = next(k for k in tensors if "q_proj.lora_A" in k)
    tensors[key] = tensors[key][:, :48].clone()  # in_features 128 / 48 is not whole


def _mismatched_blora(ws: WS) -> None:
    ws.set_json("ckqa/blora_config.json", method="q-blora")


def _nan_base(ws: WS) -> None:
    ws.edit_tensors("base/model.safetensors",
                    lambda t: t["model.layers.1.mlp.down_proj.weight"].__setitem__((0, 0), float("inf")))


def _pickle_only_adapter(ws: WS) -> None:
    (ws / "ckq/adapter_model.safetensors").unlink()
    ws.plant_pickle("ckq/adapter_model.bin")


def _pickle_only_base(ws: WS) -> None:
    (ws / "base/model.safetensors").unlink()
    ws.plant_pickle("base/pytorch_model.bin")


def _index_naming_pickle(ws: WS) -> None:
    ws.shard_base()
    ws.plant_pickle("base/model-00002-of-00002.safetensors")


def _onnx(change: Callable[[WS], None]) -> Callable[[WS], None]:
    def setup(ws: WS) -> None:
        ws.copy_artifact("onnx", "onnx")
        change(ws)
    return setup


def _onnx_int4_without_block(ws: WS) -> None:
    ws.edit_json("onnx/blora_export.json", lambda m: (m.update(precision="int4"), m.pop("int4", None)))


def _hf_artifact(ws: WS) -> None:
    (ws / "hf").mkdir()
    shutil.copy2(ws / "base/model.safetensors", ws / "hf/model.safetensors")
    (ws / "hf/config.json").write_text('{"model_type": "llama", ')


def _mlx_artifact(ws: WS) -> None:
    (ws / "mlx").mkdir()
    shutil.copy2(ws / "base/model.safetensors", ws / "mlx/model.safetensors")
    config = json.loads((ws / "base/config.json").read_text())
    config["quantization"] = {"group_size": "32", "bits": 4, "mode": "affine"}
    (ws / "mlx/config.json").write_text(json.dumps(config))


def _long_prompt(ws: WS) -> None:
    (ws / "prompts.txt").write_text("A short prompt\n" + "word " * 20_000 + "\n")


def _symlink_loop(ws: WS) -> None:
    os.symlink(ws / "loop-b.gguf", ws / "loop-a.gguf")
    os.symlink(ws / "loop-a.gguf", ws / "loop-b.gguf")


def _existing_output(ws: WS) -> None:
    (ws / "taken").mkdir()
    (ws / "taken/keep.txt").write_text("mine")


def _file_in_the_way(ws: WS) -> None:
    (ws / "afile").write_text("not a folder")


def _data(text: str | bytes) -> Callable[[WS], None]:
    def setup(ws: WS) -> None:
        path = ws / "data/tiny.jsonl"
        path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    return setup


TRAIN = "train --base {ws}/base --data {ws}/data/tiny.jsonl --method q-blora --rank 2 --steps 1 --seq-len 256"

CASES = [
    # --- checkpoint folder and its files
    Case("ckpt-missing", "inspect {ws}/nope", ("{ws}/nope", "is not a folder")),
    Case("ckpt-is-a-file", "to-gguf {ws}/data/tiny.jsonl {ws}/o.gguf", ("tiny.jsonl", "is not a folder")),
    Case("adapter-config-missing", "inspect {ws}/ckq", ("{ws}/ckq", "has no adapter_config.json"),
         lambda ws: (ws / "ckq/adapter_config.json").unlink()),
    Case("adapter-config-corrupt", "to-safetensors {ws}/ckq {ws}/o", ("ckq/adapter_config.json", "not valid JSON"),
         _corrupt("ckq/adapter_config.json")),
    Case("adapter-config-no-r", "inspect {ws}/ckpaper", ("ckpaper/adapter_config.json", "no r"),
         lambda ws: ws.drop_json("ckpaper/adapter_config.json", "r")),
    Case("adapter-config-r-zero", "to-peft {ws}/ckq {ws}/o", ("adapter_config.json", "r must be a whole number >= 1"),
         lambda ws: ws.set_json("ckq/adapter_config.json", r=0)),
    Case("adapter-config-negative-alpha", "to-gguf {ws}/ckqa {ws}/o.gguf",
         ("adapter_config.json", "lora_alpha must be a finite number > 0"),
         lambda ws: ws.set_json("ckqa/adapter_config.json", lora_alpha=-16)),
    Case("adapter-config-dora", "inspect {ws}/ckq", ("adapter_config.json", "use_dora"),
         lambda ws: ws.set_json("ckq/adapter_config.json", use_dora=True)),
    Case("base-not-local", "inspect {ws}/ckq", ("meta-llama/Llama-2-7b-hf", "not a local folder", "--base"),
         lambda ws: ws.set_json("ckq/adapter_config.json", base_model_name_or_path="meta-llama/Llama-2-7b-hf")),
    Case("adapter-weights-truncated", "to-onnx {ws}/ckq {ws}/o", ("ckq/adapter_model.safetensors", "truncated"),
         lambda ws: ws.truncate("ckq/adapter_model.safetensors")),
    Case("adapter-weights-nan", "to-safetensors {ws}/ckq {ws}/o", ("lora_A", "NaN")),
    Case("lora-b-wrong-shape", "inspect {ws}/ckpaper", ("lora_B", "disagree on the rank")),
    Case("target-module-absent", "inspect {ws}/ckq", ("layers.7.self_attn.q_proj", "the base model has no")),
    Case("lambda-does-not-divide", "inspect {ws}/ckpaper", ("q_proj", "λ must divide")),
    Case("adapter-only-pickle", "to-peft {ws}/ckq {ws}/o", ("{ws}/ckq", "never unpickles"), _pickle_only_adapter),
    Case("blora-config-corrupt", "inspect {ws}/ckqa", ("ckqa/blora_config.json", "not valid JSON"),
         _corrupt("ckqa/blora_config.json")),
    Case("blora-config-disagrees", "to-gguf {ws}/ckqa {ws}/o.gguf", ("blora_config.json says q-blora",),
         _mismatched_blora),
    # --- base folder: config.json, shards, index, tokenizer
    Case("base-is-a-file", "inspect {ws}/ckq --base {ws}/base/config.json", ("--base", "is a file")),
    Case("base-config-missing", "inspect {ws}/ckq --base {ws}/base", ("{ws}/base", "has no config.json"),
         lambda ws: (ws / "base/config.json").unlink()),
    Case("base-config-corrupt", "to-gguf {ws}/ckq {ws}/o.gguf", ("base/config.json", "not valid JSON"),
         _corrupt("base/config.json")),
    Case("base-architecture-unsupported", "inspect {ws}/ckq", ("'gpt2'", "not supported", "llama"),
         lambda ws: ws.set_json("base/config.json", model_type="gpt2")),
    Case("kv-heads-do-not-divide", "to-onnx {ws}/ckq {ws}/o", ("base/config.json", "num_key_value_heads 3 does not "
                                                                "divide num_attention_heads 4"),
         lambda ws: ws.set_json("base/config.json", num_key_value_heads=3)),
    Case("vocab-size-disagrees", "to-gguf {ws}/ckq {ws}/o.gguf", ("base/config.json", "vocab_size"),
         lambda ws: ws.set_json("base/config.json", vocab_size=1000)),
    Case("base-weights-truncated", "to-safetensors {ws}/ckq {ws}/o", ("base/model.safetensors", "truncated"),
         lambda ws: ws.truncate("base/model.safetensors")),
    Case("base-weights-pickle-only", "inspect {ws}/ckq", ("pytorch_model.bin", "never unpickles"), _pickle_only_base),
    Case("base-index-corrupt", "inspect {ws}/ckq", ("model.safetensors.index.json", "not valid JSON"),
         lambda ws: (ws.shard_base(), _corrupt("base/model.safetensors.index.json")(ws))),
    Case("base-index-shard-missing", "inspect {ws}/ckq", ("index.json", "missing", "model-00002-of-00002"),
         lambda ws: (ws.shard_base(), (ws / "base/model-00002-of-00002.safetensors").unlink())),
    Case("base-index-shard-truncated", "to-safetensors {ws}/ckq {ws}/o",
         ("model-00002-of-00002.safetensors", "truncated"),
         lambda ws: (ws.shard_base(), ws.truncate("base/model-00002-of-00002.safetensors"))),
    Case("base-index-shard-is-a-pickle", "to-gguf {ws}/ckq {ws}/o.gguf",
         ("model-00002-of-00002.safetensors", "not a safetensors file"), _index_naming_pickle),
    Case("base-weight-infinite-nested-output", "to-safetensors {ws}/ckq {ws}/new/deeper/o",
         ("model.layers.1.mlp.down_proj.weight", "NaN or infinite"), _nan_base),
    Case("tokenizer-encodes-nothing-gguf", "to-gguf {ws}/ckqa {ws}/o.gguf",
         ("tokenizer in", "base encodes", "to no tokens"),
         zero_token_tokenizer),
    Case("tokenizer-encodes-nothing-verify", "verify {ws}/ckqa", ("base encodes", "to no tokens"), zero_token_tokenizer),
    Case("tokenizer-json-corrupt", "to-gguf {ws}/ckqa {ws}/o.gguf", ("base/tokenizer.json", "not valid JSON"),
         _corrupt("base/tokenizer.json")),
    # --- artifacts given to verify
    Case("artifact-missing", "verify {ws}/ckqa {ws}/nope.gguf", ("nope.gguf", "does not exist")),
    Case("artifact-unrecognised", "verify {ws}/ckqa {ws}/data", ("{ws}/data", "not a recognised artifact")),
    Case("gguf-empty", "verify {ws}/ckqa {ws}/empty.gguf", ("empty.gguf", "not a GGUF file", "empty"),
         lambda ws: (ws / "empty.gguf").write_bytes(b"")),
    Case("gguf-truncated", "verify {ws}/ckqa {ws}/t.gguf", ("t.gguf", "not a readable GGUF file"),
         lambda ws: (ws.copy_artifact("model.gguf", "t.gguf"), ws.truncate("t.gguf", 4096))),
    Case("onnx-provenance-corrupt", "verify {ws}/ckqa {ws}/onnx", ("onnx/blora_export.json", "not valid JSON"),
         _onnx(_corrupt("onnx/blora_export.json"))),
    Case("onnx-genai-config-missing", "verify {ws}/ckqa {ws}/onnx", ("{ws}/onnx", "has no genai_config.json"),
         _onnx(lambda ws: (ws / "onnx/genai_config.json").unlink())),
    Case("onnx-int4-block-missing", "verify {ws}/ckqa {ws}/onnx", ("onnx/blora_export.json", "no 'int4' block"),
         _onnx(_onnx_int4_without_block)),
    Case("hf-artifact-config-corrupt", "verify {ws}/ckq {ws}/hf", ("hf/config.json", "not valid JSON"), _hf_artifact),
    Case("mlx-group-size-not-integer", "verify {ws}/ckqa {ws}/mlx", ("mlx/config.json", "group_size '32'"),
         _mlx_artifact),
    # --- prompts
    Case("prompts-empty", "verify {ws}/ckqa --prompts {ws}/prompts.txt", ("prompts.txt", "holds no prompts"),
         lambda ws: (ws / "prompts.txt").write_text("\n  \n")),
    Case("prompts-not-utf8", "verify {ws}/ckqa --prompts {ws}/prompts.txt", ("prompts.txt", "utf-8"),
         lambda ws: (ws / "prompts.txt").write_bytes(b"caf\xe9\xff\n")),
    Case("prompt-longer-than-context", "verify {ws}/ckqa --prompts {ws}/prompts.txt",
         ("prompts.txt:2", "longer than the model's context", "max_position_embeddings 512"), _long_prompt),
    Case("prompts-is-a-folder", "verify {ws}/ckqa --prompts {ws}/data", ("--prompts", "is a directory")),
    # --- --json
    Case("json-onto-adapter-weights", "verify {ws}/ckqa --json {ws}/ckqa/adapter_model.safetensors",
         ("--json", "adapter_model.safetensors", "would overwrite or lie inside the input")),
    Case("json-onto-base-config", "inspect {ws}/ckq --json {ws}/base/config.json",
         ("--json", "base/config.json", "would overwrite or lie inside the input")),
    Case("json-onto-export-output", "to-gguf {ws}/ckqa {ws}/o.gguf --json {ws}/o.gguf", ("--json", "other output")),
    Case("json-is-a-folder", "to-peft {ws}/ckq {ws}/o --json {ws}/data", ("--json", "is a folder")),
    Case("json-unwritable-found-first", "to-onnx {ws}/ckq {ws}/o --json {ro}/r.json", ("--json", "not writable")),
    Case("json-onto-train-data", TRAIN + " --out {ws}/run --json {ws}/data/tiny.jsonl",
         ("--json", "tiny.jsonl", "would overwrite or lie inside the input")),
    # --- output paths
    Case("output-symlink-loop", "to-gguf {ws}/ckqa {ws}/loop-a.gguf", ("loop-a.gguf", "symlink loop"), _symlink_loop),
    Case("output-inside-checkpoint", "to-safetensors {ws}/ckq {ws}/ckq/merged",
         ("ckq/merged", "would overwrite or lie inside the input")),
    Case("output-is-the-checkpoint", "to-peft {ws}/ckq {ws}/ckq --overwrite",
         ("output", "would overwrite or lie inside the input")),
    Case("output-is-the-base", "to-onnx {ws}/ckq {ws}/base --overwrite", ("{ws}/base", "would overwrite or lie inside")),
    Case("output-holds-the-base", "to-safetensors {ws}/ckq {ws} --overwrite", ("holds it", "would delete it")),
    Case("output-exists", "to-peft {ws}/ckq {ws}/taken", ("{ws}/taken", "exists; pass --overwrite"), _existing_output),
    Case("output-parent-is-a-file", "to-gguf {ws}/ckqa {ws}/afile/o.gguf", ("afile", "is not a folder"),
         _file_in_the_way),
    Case("output-unwritable", "to-safetensors {ws}/ckqa {ro}/merged --layout mlx", ("{ro}", "not writable")),
    Case("output-folder-is-a-file", "to-onnx {ws}/ckq {ws}/afile --overwrite", ("OUT_DIR", "afile", "is a file"),
         _file_in_the_way),
    # --- train
    Case("train-out-is-the-base", TRAIN + " --out {ws}/base --overwrite",
         ("--out", "{ws}/base", "would overwrite or lie inside the input")),
    Case("train-out-holds-the-data", TRAIN + " --out {ws}/data --overwrite",
         ("--out", "{ws}/data", "would overwrite or lie inside the input")),
    Case("train-lr-huge", TRAIN + " --out {ws}/run --lr 1e30", ("--lr 1e+30", "diverge")),
    Case("train-lr-nan", TRAIN + " --out {ws}/run --lr nan", ("--lr", "finite and > 0")),
    Case("train-loss-diverges", TRAIN + " --out {ws}/new/run --alpha 1e38", ("loss diverged", "lower --lr or --alpha")),
    Case("train-steps-zero", TRAIN.replace("--steps 1", "--steps 0") + " --out {ws}/run", ("--steps", "0")),
    Case("train-data-empty", TRAIN + " --out {ws}/run", ("tiny.jsonl", "holds no examples"), _data("\n")),
    Case("train-data-no-text-fields", TRAIN + " --out {ws}/run", ("tiny.jsonl:1", "needs 'text'"),
         _data('{"prompt": "hi", "completion": "there"}\n')),
    Case("train-data-not-json", TRAIN + " --out {ws}/run", ("tiny.jsonl:1", "not valid JSON"), _data("hello\n")),
    Case("train-data-not-utf8", TRAIN + " --out {ws}/run", ("tiny.jsonl", "utf-8"), _data(b'{"text": "\xff\xfe"}\n')),
    Case("train-target-unknown", TRAIN.replace("q-blora", "qa-blora") + " --target gguf-q9 --out {ws}/run",
         ("--target", "gguf-q9")),
    Case("train-lambda-cannot-fold", TRAIN.replace("q-blora", "qa-blora") + " --lambda-in 3 --out {ws}/run",
         ("lambda_in=3", "cannot fold")),
    # --- options that do not apply to the chosen format
    Case("bits-without-mlx-layout", "to-safetensors {ws}/ckq {ws}/o --bits 4", ("--bits", "--layout mlx only")),
    Case("dtype-with-mlx-layout", "to-safetensors {ws}/ckqa {ws}/o --layout mlx --dtype float32",
         ("--dtype", "--layout hf only")),
    Case("block-size-for-fp32-onnx", "to-onnx {ws}/ckqa {ws}/o --block-size 32",
         ("--block-size", "--precision int4 / int8 only")),
    # --- a fold the checkpoint's grid cannot take
    Case("int8-fold-of-a-4-bit-grid", "to-onnx {ws}/ckqa {ws}/o --precision int8",
         ("MatMulNBits int8", "the grid has 4-bit codes", "to-onnx --precision int4", "--requantize")),
    Case("mlx-8-bit-fold-of-a-4-bit-grid", "to-safetensors {ws}/ckqa {ws}/o --layout mlx --bits 8",
         ("MLX 8-bit", "the grid has 4-bit codes", "--layout mlx --bits 4", "--requantize")),
    Case("dtype-with-artifact", "verify {ws}/ckqa {ws}/x.gguf --dtype float32", ("--dtype", "without ARTIFACT")),
    Case("runtime-without-artifact", "verify {ws}/ckqa --runtime llama.cpp", ("--runtime", "with an ARTIFACT")),
    Case("requantize-with-adapter-only", "to-gguf {ws}/ckqa {ws}/o.gguf --adapter-only --requantize",
         ("--requantize", "full models")),
    Case("unknown-gguf-type", "to-gguf {ws}/ckqa {ws}/o.gguf --type q9", ("--type", "q9")),
]
SETUPS = {  # cases whose edit needs a closure over tensors
    "adapter-weights-nan": lambda ws: ws.edit_tensors("ckq/adapter_model.safetensors", _nan_lora),
    "lora-b-wrong-shape": lambda ws: ws.edit_tensors("ckpaper/adapter_model.safetensors", _wrong_rank_b),
    "target-module-absent": lambda ws: ws.edit_tensors("ckq/adapter_model.safetensors", _absent_module),
    "lambda-does-not-divide": lambda ws: ws.edit_tensors("ckpaper/adapter_model.safetensors", _lambda_not_dividing),
}


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Path:
    """Real exports of the QA-BLoRA sample (GGUF, ONNX fp32) that the artifact cases break copies of."""
    out = tmp_path_factory.mktemp("artifacts")
    ck = SAMPLES / "qa-blora-q4_1"
    for args in (["to-gguf", ck, out / "model.gguf", "-q"], ["to-onnx", ck, out / "onnx", "-q"]):
        proc = run_cli(*args)
        assert proc.returncode == 0, proc.stderr
    return out


def _params():
    for case in CASES:
        marks = [pytest.mark.slow] if case.slow else []
        yield pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", _params())
def test_bad_input(case: Case, tmp_path, artifacts):
    ws = build_ws(tmp_path / "ws", tmp_path / "UNPICKLED", artifacts)
    SETUPS.get(case.id, case.setup)(ws)
    ro = unwritable_dir(ws) if "{ro}" in case.args else None
    subst = {"ws": ws.root, "ro": ro}
    args = [a.format(**subst) for a in case.args.split()] + ["-q"]
    before = tree_state(ws.root)
    start = time.perf_counter()
    proc = run_cli(*args)
    seconds = time.perf_counter() - start
    lines = proc.stderr.splitlines()
    assert proc.returncode == case.code, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for want in case.match:
        assert want.format(**subst) in lines[0], f"{want!r} not in {lines[0]!r}"
    assert tree_state(ws.root) == before, "an input changed, or an output / temporary file / folder was left behind"
    assert not ws.marker.exists(), "something was unpickled"
    assert seconds < 60, f"a bad input should fail early, took {seconds:.0f} s"


def test_corpus_size():
    assert len(CASES) >= 45 and len({c.id for c in CASES}) == len(CASES)


# ------------------------------------------------------------------ disk full (in-process)
# Each writer fails as its library does on a full disk (both seen on a 64 KiB tmpfs): safetensors raises
# OSError ENOSPC (the streamed shard writer), gguf-py's numpy tofile an OSError
# "N requested and M written". The part written so far is left in the temporary file.

def _fill_safetensors(monkeypatch) -> None:
    import errno

    from blora_export.tensor_io import SafetensorsStream

    def add(self, name, tensor):  # shards are streamed tensor by tensor: the disk fills mid-shard
        self._data.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(SafetensorsStream, "add", add)


def _fill_gguf(monkeypatch) -> None:
    import converters.to_gguf as mod

    class FullDisk(mod.GGUFWriter):
        def write_tensor_data(self, tensor, *args, **kwargs):
            raise OSError(f"{tensor.nbytes} requested and {tensor.nbytes // 3} written")

    monkeypatch.setattr(mod, "GGUFWriter", FullDisk)


@pytest.mark.parametrize("command,out,fill", [
    ("to-safetensors", "new/merged", _fill_safetensors),
    ("to-gguf", "new/model.gguf", _fill_gguf),
], ids=["safetensors", "gguf"])
def test_disk_full_is_one_line_naming_the_output(command, out, fill, tmp_path, monkeypatch, capsys):
    from blora_export.cli import main

    ws = build_ws(tmp_path / "ws", tmp_path / "UNPICKLED", tmp_path)
    before = tree_state(ws.root)
    fill(monkeypatch)
    with pytest.raises(SystemExit) as exc:
        main([command, str(ws / "ckqa"), str(ws / out), "-q"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith(f"error: no space left on the device while writing {ws / out}"), err
    assert "the disk is full" in err
    assert tree_state(ws.root) == before  # no temporary file, no output, no empty 'new' folder


# ------------------------------------------------------------------ -q means quiet, and errors stay one line without it

def test_quiet_success_prints_nothing_on_stderr(artifacts):
    """The artifacts fixture's exports ran with -q; an export's stderr under -q is empty (no progress bar)."""
    with_bar = run_cli("to-gguf", SAMPLES / "qa-blora-q4_1", artifacts / "again.gguf", "-q")
    assert with_bar.returncode == 0 and with_bar.stderr == "", with_bar.stderr
    (artifacts / "again.gguf").unlink()


def test_error_is_the_last_and_only_error_line_without_quiet(tmp_path):
    ws = build_ws(tmp_path / "ws", tmp_path / "UNPICKLED", tmp_path)
    ws.set_json("base/config.json", num_key_value_heads=3)
    proc = run_cli("to-gguf", ws / "ckq", ws / "o.gguf")
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert lines[-1].startswith("error: ") and sum(ln.startswith("error") for ln in lines) == 1
    assert not (ws / "o.gguf").exists()


def test_quiet_silences_library_progress_bars(capsys):
    """-q also silences bars that libraries draw with tqdm themselves (transformers' GGUF loader), and only
    for the command."""
    from tqdm.auto import tqdm

    from blora_export.cli import no_progress_bars

    with no_progress_bars(True):
        list(tqdm(range(3), desc="library bar"))
    assert capsys.readouterr().err == ""
    list(tqdm(range(3), desc="library bar"))
    assert "library bar" in capsys.readouterr().err


@pytest.mark.slow
def test_quiet_verify_of_a_gguf_prints_only_the_verdict(artifacts):
    proc = run_cli("verify", SAMPLES / "qa-blora-q4_1", artifacts / "model.gguf", "-q")
    assert proc.returncode == 0 and proc.stdout == "PASS\n" and proc.stderr == "", proc.stderr
