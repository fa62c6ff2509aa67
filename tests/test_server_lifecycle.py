"""`moela serve` as a real process: SIGTERM stops admission (503), lets running requests drain up to
--drain-timeout, aborts the rest, and exits 0 with no child left; bad options exit 1."""

import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx

from moela.cli import main
from test_server import KEY, tiny_model, wait_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def finish_of(url: str, body: dict, started: threading.Event, out: dict, key: str) -> None:
    """Stream a completion; record its finish_reason and how many [DONE] it got."""
    finish, done = None, 0
    with httpx.stream("POST", url, json={**body, "stream": True}, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as r:
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done += 1
            elif line.startswith("data: "):
                started.set()
                finish = json.loads(line[6:])["choices"][0]["finish_reason"] or finish
    out[key] = (finish, done)


def test_sigterm_drains_running_requests_then_exits_cleanly(tmp_path_factory):
    path, _ = tiny_model(tmp_path_factory)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "moela.cli", "serve", str(path), "--port", str(port), "--dtype", "float32",
                             "--max-model-len", "512", "--drain-timeout", "1", "--api-key", KEY, "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: httpx.get(f"{url}/health").status_code == 200, 90, "the server to be ready")
        assert children(proc.pid) == []
        out: dict[str, tuple] = {}
        bodies = {"short": {"prompt": "hi", "max_tokens": 2, "ignore_eos": True},
                  "long": {"prompt": [5, 6], "max_tokens": 500, "n": 4, "ignore_eos": True}}
        started = {k: threading.Event() for k in bodies}
        threads = [threading.Thread(target=finish_of, args=(f"{url}/v1/completions", bodies[k], started[k], out, k))
                   for k in bodies]
        for t in threads:
            t.start()
        assert all(e.wait(30) for e in started.values())
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: httpx.get(f"{url}/health").status_code == 503, 5, "/health to say draining")
        late = httpx.post(f"{url}/v1/completions", json={"prompt": "late", "max_tokens": 2},
                          headers={"Authorization": f"Bearer {KEY}"})
        assert late.status_code == 503 and "Retry-After" in late.headers
        for t in threads:
            t.join(30)
        assert out == {"short": ("length", 1), "long": ("abort", 1)}
        assert proc.wait(timeout=30) == 0, proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_model_or_options_exit_1(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "missing")]) == 1
    assert "no such model directory" in capsys.readouterr().err


def test_engine_failing_to_load_exits_1(tmp_path_factory, tmp_path):
    path, _ = tiny_model(tmp_path_factory)
    for f in path.iterdir():
        shutil.copy(f, tmp_path / f.name)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # config fine, weights corrupt: fails on the engine thread
    assert main(["serve", str(tmp_path), "--port", "0", "--dtype", "float32", "--log-level", "error"]) == 1


def test_bad_port_and_context_are_refused_before_loading(tmp_path_factory, capsys):
    path, _ = tiny_model(tmp_path_factory)
    try:
        main(["serve", "--port", "99999"])
    except SystemExit as stop:
        assert stop.code == 2
    assert "argument --port: '99999' is not a TCP port (0-65535" in capsys.readouterr().err
    assert main(["serve", str(path), "--max-model-len", "100000"]) == 1
    assert "max_model_len = 100000 exceeds the model's max_position_embeddings = 512" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", str(path), "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "Traceback" not in err


def test_ready_is_logged_after_the_warm_up_and_requests_are_logged(tmp_path_factory):
    path, _ = tiny_model(tmp_path_factory)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moela.cli", "serve", "--model", str(path), "--port", str(port),
                             "--dtype", "float32", "--threads", "1", "--served-model-name", "tiny"],
                            stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if "ready: serving" in line:
                break
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 3},
                           timeout=30)
        assert reply.status_code == 200
        proc.send_signal(signal.SIGTERM)
        lines += proc.stderr.readlines()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = "".join(lines)
    assert "Uvicorn running" not in log
    assert log.index("loading") < log.index(f"ready: serving 'tiny' on http://127.0.0.1:{port}")
    assert "finished: " in log and " prompt + 3 generated tokens, length" in log
