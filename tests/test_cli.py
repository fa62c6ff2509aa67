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


def test_version_and_help_shows_defaults(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.startswith("moela ")
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # help text wraps anywhere
    for shown in ("(default: 40)", "(default: 1.1)", "(default: 0.8)", "(default: 128)", "(default: auto)"):
        assert shown in out


def test_a_hub_id_says_moela_reads_local_directories(capsys):
    assert main(["generate", "--model", "deepseek-ai/DeepSeek-V2-Lite", "hi"]) == 1
    err = capsys.readouterr().err
    assert "deepseek-ai/DeepSeek-V2-Lite: no such model directory (moela reads local directories only" in err
    assert "huggingface-cli download deepseek-ai/DeepSeek-V2-Lite --local-dir DeepSeek-V2-Lite" in err


def test_max_tokens_past_the_context_is_capped_with_a_warning(model_dir, capsys):
    assert main(["generate", "--model", str(model_dir), "--max-tokens", "100000", "--temperature", "0",
                 "--dtype", "float32", "--threads", "1", "def fib"]) == 0
    err = capsys.readouterr().err
    assert "--max-tokens 100000: at most " in err and "new tokens fit after the" in err


def test_max_model_len_past_the_model_positions_is_refused(model_dir, capsys):
    limit = LLM(model=model_dir, dtype="float32").engine.model_cfg.max_position_embeddings
    with pytest.raises(ValueError, match=f"max_model_len = {limit + 1} exceeds the model's max_position_embeddings = {limit}"):
        LLM(model=model_dir, dtype="float32", max_model_len=limit + 1)


def test_threads_flag(model_dir, capsys):
    import torch

    before = torch.get_num_threads()
    try:
        assert main(["generate", "--model", str(model_dir), "--max-tokens", "2", "--threads", "2", "hi"]) == 0
        assert torch.get_num_threads() == 2 != before
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit):
        main(["generate", "--threads", "0", "hi"])
    assert "argument --threads: '0' is not 'auto' or a positive integer" in capsys.readouterr().err


def test_generate_quantized(model_dir, capsys):
    assert main(["generate", "--model", str(model_dir), "--quantization", "int4", "--max-tokens", "2", "hi"]) == 0
    with pytest.raises(SystemExit):
        main(["generate", "--quantization", "int3", "hi"])
    assert "invalid choice: 'int3'" in capsys.readouterr().err
