"""The ``blora-export`` command line: each command parses options and calls one library function.

Exit codes: 0 success (verify: passed), 1 verify found a numerical failure,
2 bad input or usage, 3 internal error, 130 interrupted.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import sys
from pathlib import Path

import click
from click.core import ParameterSource

from . import api
from .errors import BloraError
from .io import write_text

log = logging.getLogger("blora_export")
EXIT_INTERNAL = 3


def _setup_logging(quiet: bool, debug: bool = False) -> None:
    level = logging.DEBUG if debug else (logging.WARNING if quiet else logging.INFO)
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)
    for noisy in ("transformers", "torch", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _emit_json(data: dict, target: str | None) -> None:
    text = json.dumps(data, indent=2, default=str)
    if target == "-":
        click.echo(text)
    elif target:
        write_text(target, text + "\n")


def refuse_inapplicable(applies: bool, where: str, *names: str) -> None:
    """Options given on the command line that do nothing for the chosen format: a usage error (exit 2)."""
    ctx = click.get_current_context()
    given = [p.opts[0] for p in ctx.command.params if p.name in names
             and ctx.get_parameter_source(p.name) not in (None, ParameterSource.DEFAULT)]
    if given and not applies:
        raise click.UsageError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to {where} only")


def common(func):
    """Options every command takes: --quiet and --debug."""
    @click.option("--quiet", "-q", is_flag=True, help="Only errors; no progress bars.")
    @click.option("--debug", is_flag=True, hidden=True, help="Show tracebacks.")
    @functools.wraps(func)
    def wrapper(*args, quiet: bool, debug: bool, **kwargs):
        _setup_logging(quiet, debug)
        with no_progress_bars(quiet):
            return func(*args, quiet=quiet, **kwargs)
    return wrapper


@contextlib.contextmanager
def no_progress_bars(quiet: bool):
    """--quiet: also the bars libraries draw with tqdm themselves (transformers' GGUF loader), for the command."""
    if not quiet:
        yield
        return
    from tqdm import std

    init = std.tqdm.__init__
    std.tqdm.__init__ = functools.partialmethod(init, disable=True)
    try:
        yield
    finally:
        std.tqdm.__init__ = init


def source_options(func):
    """--base and --merge-into: where the base model is and what the adapter merges into."""
    func = click.option("--merge-into", type=click.Choice(["original", "dequantized"]), default=None,
                        help="Merge into the original base weights or the quantized ones the adapter was "
                             "trained against (default: dequantized when blora_config.json names base_quant).")(func)
    return click.option("--base", type=click.Path(file_okay=False), default=None,
                        help="Base model folder (default: base_model_name_or_path of the checkpoint).")(func)


def overwrite_option(func):
    return click.option("--overwrite", is_flag=True, help="Replace an existing output.")(func)


def json_option(func):
    return click.option("--json", "json_out", default=None, metavar="PATH|-",
                        help="Write machine-readable results to PATH ('-' for stdout).")(func)


def report_export(result, json_out: str | None, quiet: bool) -> None:
    if json_out:
        _emit_json(result.to_json(), json_out)
    if json_out != "-" and not quiet:
        click.echo(f"wrote {result.path} ({result.format}, {result.seconds:.1f} s)")
        for key, value in result.details.items():
            click.echo(f"  {key}: {value}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="blora-export")
def cli() -> None:
    """Export Q-BLoRA / QA-BLoRA checkpoints to GGUF, ONNX, MLX and safetensors, and verify them."""


@cli.command()
@click.argument("ckpt", type=click.Path())
@click.option("--base", type=click.Path(file_okay=False), default=None, help="Base model folder.")
@json_option
@common
def inspect(ckpt, base, json_out, quiet):
    """Method, λ per module, rank, scaling, base and base quantization of a checkpoint."""
    api.check_report(json_out, api.source_paths(ckpt, base))
    info = api.inspect(ckpt, base)
    if json_out:
        _emit_json(info, json_out)
    if json_out == "-":
        return
    click.echo(f"{info['checkpoint']}: {info['method']} ({info['layout']} layout)")
    click.echo(f"  base        : {info['base']} ({info['architecture']}, {info['base_parameters']:,} parameters)")
    click.echo(f"  base quant  : {info['base_quant'] or 'not recorded'}")
    if info["forward"] == "folded":
        click.echo("  forward     : fold-aware (trained as α·q + param_dtype(β + s·H/λi))")
    click.echo(f"  rank {info['rank']}, lora_alpha {info['lora_alpha']}, rslora {info['use_rslora']}, "
               f"scaling s = {info['scaling']:g}")
    click.echo(f"  adapter     : {info['adapter_parameters']:,} parameters in {len(info['modules'])} modules")
    for name, m in info["modules"].items():
        shapes = ", ".join(f"{k} {v}" for k, v in m.items() if k in ("lora_A", "lora_B", "H"))
        click.echo(f"    {name:<42} λi={m['lambda_in']:<3} λo={m['lambda_out']:<3} {shapes}")


@cli.command()
@click.argument("ckpt", type=click.Path())
@click.argument("artifact", type=click.Path(), required=False)
@source_options
@click.option("--prompts", type=click.Path(dir_okay=False), default=None, help="File with one prompt per line.")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default="float16",
              help="Weight dtype of the in-memory merge (without ARTIFACT).")
@click.option("--runtime", default=None, help="Runtime that runs the artifact (gguf: gguf-py or llama.cpp).")
@json_option
@common
def verify(ckpt, artifact, base, merge_into, prompts, dtype, runtime, json_out, quiet):
    """Prove that a merge (or ARTIFACT) computes what the trained adapter computed.

    Exit 0 when every check passes, 1 on a numerical failure, 2 on bad input.
    """
    from .verify import format_report

    refuse_inapplicable(artifact is None, "verify without ARTIFACT (the in-memory merge)", "dtype")
    refuse_inapplicable(artifact is not None, "verify with an ARTIFACT", "runtime")
    reads = [*api.source_paths(ckpt, base), *(Path(p) for p in (artifact, prompts) if p is not None)]
    api.check_report(json_out, reads)
    options = {"runtime": runtime} if runtime else {}
    report = api.verify(ckpt, artifact, base=base, prompts=api.read_prompts(prompts), dtype=dtype,
                        merge_into=merge_into, quiet=quiet, **options)
    if json_out:
        _emit_json(report.to_json(), json_out)
    if json_out != "-" and not quiet:
        click.echo(format_report(report))
    elif quiet and json_out != "-":
        click.echo("PASS" if report.passed else "FAIL")
    sys.exit(0 if report.passed else 1)


@cli.command("to-safetensors")
@click.argument("ckpt", type=click.Path())
@click.argument("out_dir", type=click.Path(file_okay=False))
@source_options
@click.option("--layout", type=click.Choice(["hf", "mlx"]), default="hf", show_default=True,
              help="hf: merged 16-bit Hugging Face folder; mlx: low-bit mlx-lm folder.")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default="float16",
              help="Weight dtype of the merged model (--layout hf).")
@click.option("--max-shard-size", default=2048, show_default=True, type=click.IntRange(min=1),
              help="Largest shard, in MiB (--layout hf).")
@click.option("--bits", type=click.Choice(["2", "3", "4", "5", "6", "8"]), default=None,
              help="Code width (--layout mlx; default: the checkpoint grid's, else 4).")
@click.option("--group-size", type=click.Choice(["32", "64", "128"]), default=None,
              help="Inputs per group (--layout mlx; default: 32).")
@click.option("--bias-dtype", type=click.Choice(["float16", "float32"]), default=None,
              help="Storage of scales and biases (--layout mlx). Default float32 (the folded offsets at the "
                   "runtime's own noise), float16 for a checkpoint trained fold-aware with float16 offsets (exact).")
@click.option("--requantize", is_flag=True,
              help="When the checkpoint's grid does not fold into the target, merge and re-quantize (PTQ).")
@overwrite_option
@json_option
@common
def to_safetensors(ckpt, out_dir, base, merge_into, layout, dtype, max_shard_size, bits, group_size, bias_dtype,
                   requantize, overwrite, json_out, quiet):
    """Write a merged Hugging Face folder, or (--layout mlx) a low-bit mlx-lm folder."""
    refuse_inapplicable(layout == "mlx", "--layout mlx", "bits", "group_size", "bias_dtype", "requantize")
    refuse_inapplicable(layout == "hf", "--layout hf", "dtype", "max_shard_size")
    common_args = dict(base=base, merge_into=merge_into, quiet=quiet, overwrite=overwrite, report=json_out)
    if layout == "hf":
        result = api.export(ckpt, out_dir, "safetensors", **common_args,
                            dtype=dtype, max_shard_bytes=max_shard_size * 1024**2)
    else:
        result = api.export(ckpt, out_dir, "mlx", **common_args,
                            bits=int(bits) if bits else None, group_size=int(group_size) if group_size else None,
                            bias_dtype=bias_dtype, requantize=requantize)
    report_export(result, json_out, quiet)


GGUF_TYPES = ["f32", "f16", "bf16", "q8_0", "q4_0", "q5_0", "q4_1", "q5_1"]
# llama.cpp's K-quant mixes, made by its own quantizer (llama-cpp-python) from the merged f32 model
GGUF_KQUANTS = ["q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k"]


@cli.command("to-gguf")
@click.argument("ckpt", type=click.Path())
@click.argument("out_file", type=click.Path(dir_okay=False))
@source_options
@click.option("--type", "gguf_type", type=click.Choice(GGUF_TYPES + GGUF_KQUANTS), default=None,
              help="Tensor type of the Linear weights (default: q4_1/q5_1 for a QA-BLoRA checkpoint on a "
                   "1x32 min-max grid, else f16). K types (q4_k_m ...) are llama.cpp's quantizer applied "
                   "to the exactly merged f32 model: post-training quantization, error reported.")
@click.option("--adapter-only", is_flag=True, help="Write a llama.cpp LoRA adapter GGUF instead of a full model.")
@click.option("--base-only", is_flag=True,
              help="Write the base the adapter was trained against, without it (what --adapter-only runs on).")
@click.option("--requantize", is_flag=True,
              help="When the checkpoint's grid does not fold into the type, merge and re-quantize (PTQ).")
@click.option("--quantize-embeddings", is_flag=True,
              help="Quantize token embeddings and the output head too (adds PTQ error, reported).")
@overwrite_option
@json_option
@common
def to_gguf(ckpt, out_file, base, merge_into, gguf_type, adapter_only, base_only, requantize, quantize_embeddings,
            overwrite, json_out, quiet):
    """Write a GGUF model (or LoRA adapter) that llama.cpp runs."""
    refuse_inapplicable(not adapter_only, "full models (not --adapter-only)", "requantize", "quantize_embeddings")
    result = api.export(ckpt, out_file, "gguf", base=base, merge_into=merge_into, quiet=quiet, overwrite=overwrite,
                        report=json_out,
                        gguf_type=gguf_type, adapter_only=adapter_only, base_only=base_only, requantize=requantize,
                        quantize_embeddings=quantize_embeddings)
    report_export(result, json_out, quiet)


@cli.command("to-onnx")
@click.argument("ckpt", type=click.Path())
@click.argument("out_dir", type=click.Path(file_okay=False))
@source_options
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int4", "int8"]), default="fp32", show_default=True,
              help="int4/int8: MatMulNBits with 4-/8-bit codes (exact for QA-BLoRA on a min-max grid of that width).")
@click.option("--block-size", type=click.Choice(["16", "32", "64", "128"]), default=None,
              help="int4/int8 block size along the input axis (default: 32).")
@click.option("--accuracy-level", type=click.Choice(["0", "4"]), default="0", show_default=True,
              help="MatMulNBits accuracy_level: 0 float activations (exact), 4 int8 activations (faster).")
@click.option("--requantize", is_flag=True,
              help="When the checkpoint's grid does not fold into the block size, merge and re-quantize (PTQ).")
@overwrite_option
@json_option
@common
def to_onnx(ckpt, out_dir, base, merge_into, precision, block_size, accuracy_level, requantize, overwrite, json_out,
            quiet):
    """Write an ONNX decoder with KV cache (plus genai_config.json) for onnxruntime."""
    refuse_inapplicable(precision in ("int4", "int8"), "--precision int4 / int8", "block_size", "accuracy_level",
                        "requantize")
    result = api.export(ckpt, out_dir, "onnx", base=base, merge_into=merge_into, quiet=quiet, overwrite=overwrite,
                        report=json_out,
                        precision=precision, block_size=int(block_size) if block_size else None,
                        accuracy_level=int(accuracy_level), requantize=requantize)
    report_export(result, json_out, quiet)


@cli.command("to-peft")
@click.argument("ckpt", type=click.Path())
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--base", type=click.Path(file_okay=False), default=None, help="Base model folder.")
@click.option("--layout", type=click.Choice(["peft", "mlx"]), default="peft", show_default=True,
              help="peft: standard PEFT LoRA adapter; mlx: mlx-lm adapter folder.")
@overwrite_option
@json_option
@common
def to_peft(ckpt, out_dir, base, layout, overwrite, json_out, quiet):
    """Write the adapter as a standard, hot-swappable LoRA adapter (exact)."""
    result = api.export(ckpt, out_dir, "peft", base=base, quiet=quiet, overwrite=overwrite, layout=layout,
                        report=json_out)
    report_export(result, json_out, quiet)


@cli.command()
@click.option("--base", required=True, type=click.Path(file_okay=False), help="Base model folder (Hugging Face, safetensors).")
@click.option("--data", required=True, type=click.Path(dir_okay=False),
              help="JSON lines: instruction/input/output (Alpaca template, prompt masked) or text.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Checkpoint folder to write.")
@click.option("--method", required=True, type=click.Choice(["q-blora", "qa-blora"]))
@click.option("--lambda", "lambda_", type=click.IntRange(min=1), default=None,
              help="λ for input and output (Q-BLoRA default: 2 for llama/qwen2, 8 for mistral).")
@click.option("--lambda-in", type=click.IntRange(min=1), default=None, help="λi (QA-BLoRA default: the target's block).")
@click.option("--lambda-out", type=click.IntRange(min=1), default=None, help="λo (QA-BLoRA default: 4).")
@click.option("--target", default=None,
              help="QA-BLoRA export target (default gguf-q4_1): gguf-q4_1, gguf-q5_1, onnx-int4-<bs>, "
                   "onnx-int8-<bs>, mlx-<bits>-<gs>, paper-<bi>x<bo>.")
@click.option("--rank", default=64, show_default=True, type=click.IntRange(min=1),
              help="LoRA rank r: Q-BLoRA trains R = λi·r; QA-BLoRA uses it only in the scaling alpha/r.")
@click.option("--alpha", default=16.0, show_default=True, type=float, help="lora_alpha (scaling = alpha / rank).")
@click.option("--steps", default=200, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", default=2e-4, show_default=True, type=float)
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(min=1), help="Examples per process and step.")
@click.option("--seq-len", default=512, show_default=True, type=click.IntRange(min=2))
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--fold-aware/--no-fold-aware", default=None,
              help="QA-BLoRA: train the folded weights α·q + fp16(β + s·H/λi), exactly what a runtime storing β' in "
                   "fp16 holds (default: on for gguf-*/mlx-*, off for onnx-int4-*, onnx-int8-* and paper-*).")
@click.option("--save-every", default=100, show_default=True, type=click.IntRange(min=1), help="Checkpoint every N steps.")
@click.option("--resume", is_flag=True, help="Continue the training saved in --out (same options; --steps may grow).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
@click.option("--seed", default=0, show_default=True, type=int)
@json_option
@common
def train(base, data, out, method, lambda_, lambda_in, lambda_out, target, rank, alpha, steps, lr, batch_size,
          seq_len, device, fold_aware, save_every, resume, overwrite, seed, json_out, quiet):
    """Fine-tune a Q-BLoRA / QA-BLoRA adapter; write a native checkpoint, train_log.jsonl and resumable state."""
    from .train import TrainConfig
    from .train import train as run_training

    api.check_report(json_out, [Path(base), Path(data)], [Path(out)])
    result = run_training(TrainConfig(
        base=Path(base), data=Path(data), out=Path(out), method=method, lambda_=lambda_, lambda_in=lambda_in,
        lambda_out=lambda_out, target=target, rank=rank, alpha=alpha, steps=steps, lr=lr, batch_size=batch_size,
        seq_len=seq_len, device=device, resume=resume, overwrite=overwrite, seed=seed, fold_aware=fold_aware,
        save_every=save_every, quiet=quiet))
    if not result.is_main:
        return
    summary = result.to_json()
    if json_out:
        _emit_json(summary, json_out)
    if json_out != "-" and not quiet:
        click.echo(f"wrote {summary['path']} ({summary['method']}, steps {summary['start_step']}->{summary['steps']}, "
                   f"{summary['seconds']:.1f} s)")
        click.echo(f"  loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f}, "
                   f"{summary['mean_tokens_per_s'] or 0:.0f} tokens/s on {summary['device']} x{summary['world_size']}")


def one_line(message) -> str:
    """An error message on one line: a library's multi-line text joined with '; '."""
    return "; ".join(line.strip() for line in str(message).splitlines() if line.strip())


def main(argv=None) -> None:
    """Entry point: one-line errors, never a traceback (unless --debug)."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.ClickException as exc:  # usage errors: one line, like every other error
        click.echo(f"error: {one_line(exc.format_message())} (see --help)", err=True)
        sys.exit(2)
    except BloraError as exc:
        if debug:
            raise
        click.echo(f"error: {one_line(exc)}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except (OSError, MemoryError) as exc:
        if debug:
            raise
        click.echo(f"error: {one_line(exc)}", err=True)
        sys.exit(2)
    except Exception as exc:  # noqa: BLE001 - last line of defence: one line, no traceback
        if debug:
            raise
        click.echo(f"internal error: {type(exc).__name__}: {one_line(exc)} (rerun with --debug for the traceback)", err=True)
        sys.exit(EXIT_INTERNAL)


if __name__ == "__main__":
    main()
