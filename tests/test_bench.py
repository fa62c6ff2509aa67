"""`moela bench` runs end to end on a tiny shape and writes its JSON (numbers are not asserted: timings
belong to benchmarks, not tests)."""

import json

from moela.cli import main


def test_bench_tiny_writes_results(tmp_path, capsys):
    assert main(["bench", "--shape", "tiny", "--batches", "1", "2", "--prompt-len", "16", "--new-tokens", "4",
                 "--threads", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "moela tok/s" in out and "of roofline" in out
    (result,) = tmp_path.glob("throughput-tiny-*.json")
    data = json.loads(result.read_text())
    assert set(data["runs"]) == {"moela", "hf"} and data["copy_bandwidth_gb_s"] > 0
    for b in ("1", "2"):
        r = data["runs"]["moela"]["results"][b]
        assert r["tokens_per_s"] > 0 and r["roofline_bytes"] > 0 and r["speedup_vs_hf"] > 0
    assert data["runs"]["moela"]["kv_bytes_per_token"] == data["runs"]["hf"]["kv_bytes_per_token"]


def test_bench_quantized_roofline_reads_quantized_bytes(tmp_path, capsys):
    """--quantization int4 runs moela on int4 weights; its roofline counts the weights at half a byte."""
    args = ["bench", "--shape", "tiny", "--batches", "1", "--prompt-len", "8", "--new-tokens", "2", "--threads", "1",
            "--skip-hf"]
    for quant in ([], ["--quantization", "int4"]):
        assert main(args + quant + ["--out", str(tmp_path / (quant[-1] if quant else "bf16"))]) == 0
    assert "tiny: int4," in capsys.readouterr().out
    bf16, int4 = (json.loads(next((tmp_path / d).glob("throughput-tiny*.json")).read_text()) for d in ("bf16", "int4"))
    assert next((tmp_path / "int4").glob("throughput-tiny-int4-*.json"))
    assert int4["runs"]["moela"]["results"]["1"]["roofline_bytes"] < bf16["runs"]["moela"]["results"]["1"]["roofline_bytes"]


BLOCK_TRANSFORMERS = '''
import sys
class _NoTransformers:
    def find_spec(self, name, path=None, target=None):
        if name == "transformers" or name.startswith("transformers."):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, _NoTransformers())
'''


def test_skip_hf_needs_no_transformers(tmp_path):
    """As after the README's first command, which does not install transformers."""
    import os
    import subprocess
    import sys

    (tmp_path / "sitecustomize.py").write_text(BLOCK_TRANSFORMERS)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    cmd = [sys.executable, "-m", "moela.cli", "bench", "--shape", "tiny", "--batches", "1", "--prompt-len", "8",
           "--new-tokens", "2", "--threads", "1", "--out", str(tmp_path / "out")]
    run = subprocess.run(cmd + ["--skip-hf"], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "moela tok/s" in run.stdout and list((tmp_path / "out").glob("throughput-tiny-*.json"))
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 1 and "the transformers baseline needs transformers" in run.stderr and "--skip-hf" in run.stderr


def test_bench_scripts_help_runs_nothing(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).parents[1] / "bench"
    for script in ("kv_cache.py", "threads.py", "serve.py", "gpu.py", "compile_kernels.py", "quant_kernels.py",
                   "quant_quality.py", "decode_overhead.py", "quantized.py"):
        run = subprocess.run([sys.executable, str(bench / script), "--help"], capture_output=True, text=True, timeout=60,
                             cwd=tmp_path)
        assert run.returncode == 0 and run.stdout.startswith("usage:"), script


def test_peak_rss_is_the_childs_own():
    """Each engine's peak RSS is its own process's, not the high-water mark of the process that spawned it
    (getrusage's ru_maxrss carries that across exec)."""
    import subprocess
    import sys

    import torch

    from moela.bench import _rss_mb

    held = torch.ones(2**26)  # 256 MiB more in this process than the child will ever hold
    run = subprocess.run([sys.executable, "-c", "from moela.bench import _rss_mb; print(_rss_mb())"],
                         capture_output=True, text=True, check=True, timeout=120)
    assert float(run.stdout) < _rss_mb() - 200, (run.stdout, _rss_mb())
    del held
