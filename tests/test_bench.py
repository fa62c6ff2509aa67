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
    for script in ("kv_cache.py", "threads.py", "serve.py", "gpu.py", "compile_kernels.py"):
        run = subprocess.run([sys.executable, str(bench / script), "--help"], capture_output=True, text=True, timeout=60,
                             cwd=tmp_path)
        assert run.returncode == 0 and run.stdout.startswith("usage:"), script
