"""`moela generate`: streams the same text generate() produces; bad input is one line and exit 1."""

import subprocess
import sys

import pytest

from conftest import edit_config
from moela import LLM, SamplingParams
from moela.cli import main


@pytest.fixture
def model_dir(text_model):
    return text_model


def test_generate_streams_greedy_text(model_dir, capsys):
    assert main(["generate", "--model", str(model_dir), "--max-tokens", "12", "--dtype", "float32", "--temperature", "0",
                 "--repetition-penalty", "1", "def fib"]) == 0
    out, err = capsys.readouterr()
    ref = LLM(model=model_dir, dtype="float32").generate("def fib", SamplingParams(temperature=0, max_tokens=12))
    assert out == ref[0].outputs[0].text + "\n"
    assert "tokens/s" in err


def test_generate_chat_and_sampling_flags(model_dir, capsys):
    args = ["generate", "--model", str(model_dir), "--chat", "--max-tokens", "6", "--temperature", "0.8",
            "--top-p", "0.9", "--top-k", "50", "--seed", "7", "hello"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first  # same seed, same text


@pytest.mark.parametrize("setup, message", [
    (lambda p: None, "no such model directory"),
    (lambda p: (p.mkdir(), (p / "config.json").write_text('{"model_type": "llama"}')), "'model_type' = 'llama' is not supported"),
])
def test_bad_model_is_one_line(tmp_path, capsys, setup, message):
    path = tmp_path / "m"
    setup(path)
    assert main(["generate", "--model", str(path), "hi"]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_bad_sampling_value_is_one_line(model_dir, capsys):
    assert main(["generate", "--model", str(model_dir), "--temperature", "-1", "hi"]) == 1
    assert "temperature = -1.0 is invalid" in capsys.readouterr().err


def test_console_script_reports_corrupt_checkpoint(model_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in model_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    edit_config(bad)
    run = subprocess.run([sys.executable, "-m", "moela.cli", "generate", "--model", str(bad), "hi"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert run.stderr.strip().startswith("error: ") and "model.safetensors: corrupt safetensors header" in run.stderr
    assert "Traceback" not in run.stderr
