"""Real-size exports side by side with llama.cpp's own pipeline: wall time and peak memory.

    python bench/scale.py --sizes 1.1b                 # all commands + llama.cpp, table on stdout
    python bench/scale.py --sizes 1.1b,7b --json scale.json --keep
    python bench/scale.py --sizes 7b --commands to-gguf,llama.cpp,to-safetensors,to-onnx,mlx,to-peft
    python bench/scale.py --build-llama-cpp            # once: llama.cpp's convert + llama-quantize

Builds synthetic fp16 bases shard by shard (one shard's tensors in memory at a time, then
``model.safetensors.index.json``): ``1.1b`` is TinyLlama-shaped (hidden 2048, 22 layers, GQA
32/4, intermediate 5632, vocab 32000), ``7b`` LLaMA-2-7B-shaped (hidden 4096, 32 layers, 32
heads, intermediate 11008, vocab 32000), ``tiny`` a few-MB model for the smoke test. The
tokenizer is a 512-piece SentencePiece BPE trained offline on ``samples/corpus.txt``; the
embedding rows past it become ``[PADn]`` tokens in both our GGUF writer and llama.cpp's
converter. Two checkpoints: QA-BLoRA λi=32 λo=4 on a 4-bit 1x32 min-max grid, and Q-BLoRA
λ=2 on NF4 (blocksize 64, double quantization).

Each command runs in its own process under ``/usr/bin/time -v`` (``apt-get install time``):
wall time and peak resident set size, and the ratios to llama.cpp's ``convert_hf_to_gguf.py
--outtype f16`` + ``llama-quantize Q4_1`` (no merge at all) on the same base, in the same run.

llama.cpp's tools come from the llama-cpp-python sdist that pip gives for the installed version
(``pip download --no-deps --no-binary :all: llama-cpp-python==V``), unpacked and built with
cmake under the work folder (default ``~/.cache/blora-export-bench``) by ``--build-llama-cpp``;
nothing of llama.cpp is in this repository. Its converter runs with the sdist's own ``gguf-py``
and needs ``torch numpy sentencepiece transformers`` (already installed with blora-export). When the tools
are not built, the llama.cpp rows are reported as skipped, with the reason.

Each command's output is deleted once it has run (a 7B run's outputs would not fit a disk
together; ``qa.gguf`` stays for ``verify``) unless ``--keep-outputs``; the synthetic models and
what is left are deleted at the end unless ``--keep`` (the llama.cpp build
stays: it is a cache). Not run in CI except as a tiny-shape smoke test.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "samples"))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from scale_model import SHAPES, build_base, build_checkpoints, largest_tensor_bytes  # noqa: E402

DEFAULT_WORKDIR = Path.home() / ".cache" / "blora-export-bench"
TIME = "/usr/bin/time"
GB = 1e9


@dataclass
class Run:
    """One command's measurement."""

    name: str
    argv: list[str]
    status: str = "ok"  # ok | failed | skipped
    wall_s: float = 0.0
    user_s: float = 0.0
    sys_s: float = 0.0
    peak_rss_gb: float = 0.0
    note: str = ""
    target: str = ""
    met: bool | None = None
    extra: dict = field(default_factory=dict)


def parse_time_v(text: str) -> dict:
    """Wall, user, system seconds and peak RSS (bytes) from ``/usr/bin/time -v`` output."""
    def grab(pattern: str) -> str:
        m = re.search(pattern, text)
        if m is None:
            raise ValueError(f"/usr/bin/time -v output lacks {pattern!r}")
        return m.group(1)

    clock = grab(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)")
    wall = sum(float(p) * 60**i for i, p in enumerate(reversed(clock.split(":"))))
    return {"wall_s": wall, "user_s": float(grab(r"User time \(seconds\): ([\d.]+)")),
            "sys_s": float(grab(r"System time \(seconds\): ([\d.]+)")),
            "peak_rss": int(grab(r"Maximum resident set size \(kbytes\): (\d+)")) * 1024}


def timed(name: str, argv: list[str], log_dir: Path, env: dict | None = None) -> Run:
    """Run ``argv`` under ``/usr/bin/time -v``; its output goes to ``log_dir/<name>.log``."""
    if not Path(TIME).is_file():
        raise SystemExit(f"{TIME} is missing: apt-get install time")
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"
    timing = log_dir / f"{name}.time"
    with open(log, "w") as fh:
        proc = subprocess.run([TIME, "-v", "-o", str(timing), *argv], stdout=fh, stderr=subprocess.STDOUT,
                              env={**os.environ, **(env or {})}, cwd=ROOT)
    run = Run(name, argv)
    stats = parse_time_v(timing.read_text())
    run.wall_s, run.user_s, run.sys_s = stats["wall_s"], stats["user_s"], stats["sys_s"]
    run.peak_rss_gb = stats["peak_rss"] / GB
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        # verify's INCONCLUSIVE (exit 1) is a verdict about the model, not a failure of the command
        inconclusive = proc.returncode == 1 and tail and tail[-1].strip() == "INCONCLUSIVE"
        run.status = "inconclusive" if inconclusive else "failed"
        run.note = f"exit {proc.returncode}: {' | '.join(tail)}"
    return run


# ---------------------------------------------------------------- llama.cpp tools

def llama_cpp_version() -> str:
    from importlib.metadata import version

    return version("llama-cpp-python")


def llama_cpp_dir(workdir: Path) -> Path:
    return workdir / f"llama_cpp_python-{llama_cpp_version()}" / "vendor" / "llama.cpp"


QUANTIZE_VIA_BINDING = ("import sys, llama_cpp; p = llama_cpp.llama_model_quantize_default_params(); "
                        "p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1; llama_cpp.llama_backend_init(); "
                        "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))")


def llama_cpp_tools(workdir: Path) -> tuple[Path, list[str]] | str:
    """``(convert_hf_to_gguf.py, quantize command prefix)`` or why they are not available.

    The quantize step is the built ``llama-quantize``; when only the sdist is unpacked (not yet
    built), llama-cpp-python's own ``llama_model_quantize`` (the library function that
    ``llama-quantize`` wraps, same version) is used instead, and the row says so.
    """
    try:
        tree = llama_cpp_dir(workdir)
    except Exception as exc:  # llama-cpp-python not installed
        return f"llama-cpp-python is not installed ({exc})"
    convert, quantize = tree / "convert_hf_to_gguf.py", tree / "build" / "bin" / "llama-quantize"
    if not convert.is_file():
        return f"llama.cpp tools not built under {tree} (run: python bench/scale.py --build-llama-cpp)"
    if quantize.is_file():
        return convert, [str(quantize)]
    return convert, [sys.executable, "-c", QUANTIZE_VIA_BINDING]


def build_llama_cpp(workdir: Path) -> None:
    """Fetch the llama-cpp-python sdist with pip, unpack it, build llama-quantize with cmake."""
    version = llama_cpp_version()
    workdir.mkdir(parents=True, exist_ok=True)
    sdist = workdir / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={version}", "-d", str(workdir)], check=True)
    tree = llama_cpp_dir(workdir)
    if not tree.is_dir():
        shutil.unpack_archive(str(sdist), str(workdir))
    subprocess.run(["cmake", "-B", "build", "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF"],
                   cwd=tree, check=True)
    subprocess.run(["cmake", "--build", "build", "--target", "llama-quantize", f"-j{os.cpu_count() or 2}"],
                   cwd=tree, check=True)
    print(f"built {tree / 'build' / 'bin' / 'llama-quantize'}")


# ---------------------------------------------------------------- commands

COMMANDS = ("to-gguf", "to-safetensors", "to-onnx", "mlx", "to-peft", "verify", "verify-gguf", "llama.cpp")


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "blora_export.cli", *args]


def our_commands(models: dict[str, Path], out: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (command group, argv)."""
    qa, qb = str(models["qa"]), str(models["qb"])
    return {
        "to-gguf q4_1 fold (QA-BLoRA)": ("to-gguf", cli("to-gguf", qa, str(out / "qa.gguf"), "--type", "q4_1")),
        "to-safetensors fp16 merge (Q-BLoRA/NF4)": ("to-safetensors", cli("to-safetensors", qb, str(out / "qb-fp16"))),
        "to-safetensors fp16 merge (QA-BLoRA)": ("to-safetensors", cli("to-safetensors", qa, str(out / "qa-fp16"))),
        "to-onnx int4 (QA-BLoRA)": ("to-onnx", cli("to-onnx", qa, str(out / "qa-onnx"), "--precision", "int4")),
        "to-safetensors --layout mlx (QA-BLoRA)": ("mlx", cli("to-safetensors", qa, str(out / "qa-mlx"), "--layout", "mlx")),
        "to-peft (Q-BLoRA)": ("to-peft", cli("to-peft", qb, str(out / "qb-peft"))),
        "verify (QA-BLoRA, no artifact)": ("verify", cli("verify", qa)),
        "verify (Q-BLoRA/NF4, no artifact)": ("verify", cli("verify", qb)),
        "verify qa.gguf --runtime llama.cpp": ("verify-gguf", cli("verify", qa, str(out / "qa.gguf"), "--runtime", "llama.cpp")),
    }


def run_llama_cpp(base: Path, out: Path, logs: Path, workdir: Path) -> list[Run]:
    tools = llama_cpp_tools(workdir)
    names = ["llama.cpp convert_hf_to_gguf --outtype f16", "llama.cpp llama-quantize Q4_1"]
    if isinstance(tools, str):
        return [Run(n, [], status="skipped", note=tools) for n in names]
    convert, quantize = tools
    if quantize[0] == sys.executable:
        names[1] = "llama.cpp Q4_1 (llama_model_quantize via llama-cpp-python: llama-quantize not built)"
    env = {"PYTHONPATH": str(convert.parent / "gguf-py"), "NO_LOCAL_GGUF": ""}
    f16 = out / "llama-f16.gguf"
    runs = [timed("llama-convert", [sys.executable, str(convert), str(base), "--outtype", "f16", "--outfile", str(f16)],
                  logs, env)]
    runs[0].name = names[0]
    if runs[0].status == "ok":
        argv = [*quantize, str(f16), str(out / "llama-q4_1.gguf")] + (["Q4_1"] if len(quantize) == 1 else [])
        runs.append(timed("llama-quantize", argv, logs))
        runs[1].name = names[1]
        f16.unlink(missing_ok=True)
    return runs


#: verify's wall target: at most 3x the export that makes the artifact it checks, on the same model.
VERIFY_MATCH = {"verify (QA-BLoRA, no artifact)": "to-safetensors fp16 merge (QA-BLoRA)",
                "verify (Q-BLoRA/NF4, no artifact)": "to-safetensors fp16 merge (Q-BLoRA/NF4)",
                "verify qa.gguf --runtime llama.cpp": "to-gguf q4_1 fold (QA-BLoRA)"}


def judge_verify_wall(runs: list[Run], gguf: Path, big: bool) -> None:
    """``verify`` wall <= 3x its matching export's wall (when both ran in this run); ``verify`` of a
    GGUF in llama.cpp: peak RSS <= what llama.cpp holds (the file, mapped) + 2 GB (and <= 12 GB at 7B)."""
    done = ("ok", "inconclusive")  # the command ran to its end
    walls = {r.name: r.wall_s for r in runs if r.status in done}
    for run in runs:
        if run.name == "verify qa.gguf --runtime llama.cpp" and run.status in done and gguf.is_file():
            limit = gguf.stat().st_size / GB + 2.0
            limit = min(limit, 12.0) if big else limit
            run.target, run.met = f"RSS <= {limit:.2f} GB (the GGUF llama.cpp maps + 2 GB)", run.peak_rss_gb <= limit
    for run in runs:
        export = VERIFY_MATCH.get(run.name)
        if export not in walls or run.status not in done:
            continue
        ratio = run.wall_s / walls[export]
        run.extra["wall_vs_export"] = ratio
        run.target += f"{'; ' if run.target else ''}wall <= 3x {export} ({ratio:.2f}x)"
        run.met = (run.met is not False) and ratio <= 3.0 if run.met is not None else None


def judge(run: Run, group: str, size: str, llama_wall: float | None, largest_gb: float) -> None:
    """The issue's target for this command, and whether the run met it."""
    big = size == "7b"
    if group == "to-gguf":
        rss = 1.5 if big else 1.0
        run.target = f"RSS <= {rss} GB" + ("" if big or llama_wall is None else ", wall <= llama.cpp")
        run.met = run.peak_rss_gb <= rss and (big or llama_wall is None or run.wall_s <= llama_wall)
    elif group in ("to-safetensors", "to-onnx", "mlx", "to-peft"):
        limit = 1.0 + largest_gb
        run.target, run.met = f"RSS <= {limit:.2f} GB (1 GB + largest tensor)", run.peak_rss_gb <= limit
    elif group == "verify":
        limit = 3.0 if big else 2.0
        run.target, run.met = f"RSS <= {limit} GB", run.peak_rss_gb <= limit
    if size == "tiny":
        run.met = None  # targets are for real sizes


def bench_size(size: str, commands: set[str], workdir: Path, keep: bool, keep_outputs: bool = False) -> dict:
    """Build (or reuse) one size's base and checkpoints, run everything, return the rows."""
    root = workdir / "models" / size
    t0 = time.perf_counter()
    base = build_base(root / "base", SHAPES[size])
    models = build_checkpoints(root, base)
    build_s = time.perf_counter() - t0
    out, logs = workdir / "out" / size, workdir / "logs" / size
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    runs: list[Run] = []
    if "llama.cpp" in commands:
        runs += run_llama_cpp(base, out, logs, workdir)
    llama = [r for r in runs if r.status == "ok"]
    llama_wall = sum(r.wall_s for r in llama) if len(llama) == 2 else None
    llama_rss = max((r.peak_rss_gb for r in llama), default=None)
    llama_cpu = sum(r.user_s + r.sys_s for r in llama) if llama_wall else None
    largest_gb = largest_tensor_bytes(SHAPES[size]) / GB
    for name, (group, argv) in our_commands(models, out).items():
        if group not in commands:
            continue
        run = timed(re.sub(r"\W+", "_", name).strip("_"), argv, logs)
        run.name = name
        judge(run, group, size, llama_wall, largest_gb)
        if llama_wall:
            run.extra = {"wall_vs_llama_cpp": run.wall_s / llama_wall, "rss_vs_llama_cpp": run.peak_rss_gb / llama_rss,
                         "cpu_vs_llama_cpp": (run.user_s + run.sys_s) / llama_cpu}
        runs.append(run)
        print(f"  {name}: {run.status} {run.wall_s:.1f} s {run.peak_rss_gb:.2f} GB {run.note}", flush=True)
        if not keep_outputs:  # a 7B run's outputs would not fit the disk together; only verify reads one back
            for child in out.iterdir():
                if child.name != "qa.gguf":
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
    judge_verify_wall(runs, out / "qa.gguf", size == "7b")
    if not keep:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    return {"size": size, "shape": asdict(SHAPES[size]), "params": SHAPES[size].params(),
            "largest_tensor_gb": largest_gb, "build_s": build_s, "llama_cpp_wall_s": llama_wall, "llama_cpp_cpu_s": llama_cpu,
            "llama_cpp_peak_rss_gb": llama_rss, "runs": [asdict(r) for r in runs]}


def table(result: dict) -> str:
    lines = [f"## {result['size']} ({result['params'] / 1e9:.2f} B parameters)", "",
             "| command | wall | CPU (user+sys) | peak RSS | wall / llama.cpp | CPU / llama.cpp | RSS / llama.cpp | target | met |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["runs"]:
        if r["status"] == "skipped":
            lines.append(f"| {r['name']} | skipped | | | | | | {r['note']} | |")
            continue
        ratios = r["extra"]
        wall_ratio = f"{ratios['wall_vs_llama_cpp']:.2f}x" if "wall_vs_llama_cpp" in ratios else "-"
        rss_ratio = f"{ratios['rss_vs_llama_cpp']:.2f}x" if "rss_vs_llama_cpp" in ratios else "-"
        cpu_ratio = f"{ratios['cpu_vs_llama_cpp']:.2f}x" if "cpu_vs_llama_cpp" in ratios else "-"
        met = {True: "yes", False: "**no**", None: ""}[r["met"]]
        note = r["note"].replace("|", "/")  # the log tail's lines are joined by '|': not a table cell break
        status = {"ok": "", "inconclusive": " **inconclusive** (verify's exit 1: its bound cannot tell the file from one "
                  "without the adapter)"}.get(r["status"], f" **{r['status']}**: {note}")
        lines.append(f"| {r['name']}{status} | {r['wall_s']:.1f} s | {r['user_s'] + r['sys_s']:.1f} s | "
                     f"{r['peak_rss_gb']:.2f} GB | {wall_ratio} | {cpu_ratio} | {rss_ratio} | {r['target']} | {met} |")
    if result["llama_cpp_wall_s"]:
        lines.append(f"| llama.cpp convert f16 + quantize Q4_1 | {result['llama_cpp_wall_s']:.1f} s | "
                     f"{result['llama_cpp_cpu_s']:.1f} s | {result['llama_cpp_peak_rss_gb']:.2f} GB | 1.00x | 1.00x | "
                     "1.00x | | |")
    return "\n".join(lines)


def environment() -> dict:
    mem = next((int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0) if Path("/proc/meminfo").is_file() else 0
    return {"cpus": os.cpu_count(), "memory_gb": round(mem / GB, 1), "python": platform.python_version(),
            "machine": platform.machine()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1.1b", help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--commands", default=",".join(COMMANDS), help=f"comma-separated, of {', '.join(COMMANDS)}")
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    ap.add_argument("--keep", action="store_true", help="keep the synthetic models (and the outputs left)")
    ap.add_argument("--keep-outputs", action="store_true", help="keep every command's output (disk: ~4x the base at 7B)")
    ap.add_argument("--json", help="write the results as JSON here ('-' for stdout)")
    ap.add_argument("--build-llama-cpp", action="store_true", help="fetch and build llama.cpp's tools, then exit")
    args = ap.parse_args(argv)
    if args.build_llama_cpp:
        build_llama_cpp(args.workdir)
        return 0
    sizes = [s for s in args.sizes.split(",") if s]
    commands = {c for c in args.commands.split(",") if c}
    unknown = [s for s in sizes if s not in SHAPES] + sorted(commands - set(COMMANDS))
    if unknown:
        ap.error(f"unknown size or command: {', '.join(unknown)}")
    results = {"environment": environment(), "sizes": []}
    for size in sizes:
        print(f"# {size}", flush=True)
        results["sizes"].append(bench_size(size, commands, args.workdir, args.keep, args.keep_outputs))
        print(table(results["sizes"][-1]) + "\n", flush=True)
    if args.json == "-":
        print(json.dumps(results, indent=2))
    elif args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    failed = [r["name"] for s in results["sizes"] for r in s["runs"] if r["status"] == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
