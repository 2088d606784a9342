"""The command line: exit codes, one-line errors, --json, --quiet, and no half-written outputs."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from blora_export.cli import main


def run(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def run_ok(args, capsys):
    try:
        main(args)
    except SystemExit as exc:
        out, err = capsys.readouterr()
        return exc.code, out, err
    out, err = capsys.readouterr()
    return 0, out, err


def test_inspect_json(samples, capsys):
    code, out, _ = run_ok(["inspect", str(samples / "qa-blora-q4_1"), "--json", "-"], capsys)
    info = json.loads(out)
    assert code == 0 and info["method"] == "qa-blora" and info["base_quant"]["block_in"] == 32
    assert {m["lambda_in"] for m in info["modules"].values()} == {32}


def test_verify_exit_codes_and_json(samples, tmp_path, capsys):
    code, out, _ = run(["verify", str(samples / "paper-qa-blora"), "--json", "-", "--quiet"], capsys)
    assert code == 0 and json.loads(out)["passed"] is True
    report = tmp_path / "r.json"
    code, out, _ = run(["verify", str(samples / "paper-qa-blora"), "--json", str(report)], capsys)
    assert code == 0 and "PASS" in out and json.loads(report.read_text())["passed"]


def test_verify_fails_with_exit_1_on_a_wrong_artifact(samples, tmp_path, capsys):
    # the merge of one checkpoint checked against another checkpoint's adapter: numerically wrong
    out_dir = tmp_path / "m"
    assert run_ok(["to-safetensors", str(samples / "paper-q-blora"), str(out_dir), "-q"], capsys)[0] == 0
    code, out, _ = run(["verify", str(samples / "paper-qa-blora"), str(out_dir), "-q"], capsys)
    assert code == 1 and out.strip() == "FAIL"


@pytest.mark.parametrize("args,match", [
    (["verify", "does-not-exist"], "is not a folder"),
    (["to-safetensors", "SAMPLE", "OUT", "--merge-into", "dequantized"], "use --merge-into original"),
    (["verify", "SAMPLE", "--prompts", "EMPTY"], "holds no prompts"),
    (["verify", "SAMPLE", "NOT_AN_ARTIFACT"], "not a recognised artifact"),
])
def test_bad_input_is_one_line_and_exit_2(samples, tmp_path, capsys, args, match):
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "junk").mkdir()
    subst = {"SAMPLE": str(samples / "paper-q-blora"), "OUT": str(tmp_path / "out"),
             "EMPTY": str(tmp_path / "empty.txt"), "NOT_AN_ARTIFACT": str(tmp_path / "junk")}
    code, out, err = run([subst.get(a, a) for a in args], capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error: ") and match in last and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_truncated_base_gives_one_line_error(samples, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(samples / "base", base)
    data = (base / "model.safetensors").read_bytes()
    (base / "model.safetensors").write_bytes(data[: len(data) // 2])
    code, _, err = run(["to-safetensors", str(samples / "paper-q-blora"), str(tmp_path / "o"),
                        "--base", str(base)], capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error: ") and "truncated" in last and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_console_script_runs_without_traceback(tmp_path):
    exe = shutil.which("blora-export") or f"{sys.executable} -m blora_export.cli"
    proc = subprocess.run(f"{exe} verify {tmp_path}/missing", shell=True, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "Traceback" not in proc.stderr


def test_outputs_are_never_clobbered_without_overwrite_and_inputs_never(samples, tmp_path, capsys):
    ckpt = tmp_path / "ck"
    shutil.copytree(samples / "q-blora-nf4", ckpt)
    cfg = json.loads((ckpt / "adapter_config.json").read_text())
    (ckpt / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(samples / "base")}))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run(["to-peft", str(ckpt), str(out), "-q"], capsys)
    assert code == 2 and "exists; pass --overwrite" in err and (out / "keep.txt").is_file()
    for target in (ckpt, ckpt / "inner", samples / "base"):
        code, _, err = run(["to-peft", str(ckpt), str(target), "-q", "--overwrite"], capsys)
        assert code == 2 and "would overwrite or lie inside the input" in err
    assert (ckpt / "blora_config.json").is_file()
    assert run_ok(["to-peft", str(ckpt), str(out), "-q", "--overwrite"], capsys)[0] == 0
    assert not (out / "keep.txt").exists() and (out / "adapter_config.json").is_file()


def test_usage_errors_are_one_line(capsys):
    code, _, err = run(["to-gguf", "a", "b", "--type", "q9"], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1


def test_artifact_of_another_checkpoint_is_a_clear_error(samples, tmp_path, capsys):
    gguf = tmp_path / "qa.gguf"
    assert run_ok(["to-gguf", str(samples / "qa-blora-q4_1"), str(gguf), "-q"], capsys)[0] == 0
    code, _, err = run(["verify", str(samples / "q-blora-nf4"), str(gguf), "-q"], capsys)
    assert code == 2 and "min-max grid" in err.strip().splitlines()[-1]
