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
