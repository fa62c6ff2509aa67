"""Decode speed with a fixed thread count against `--threads auto`, on an idle CPU, beside a competing
busy process (one core spinning in another process), and with that process starting mid-run; each
run in its own process.

    python bench/threads.py                     # the embedded default model, 96 greedy tokens
    python bench/threads.py --model DIR --tokens 64 --repeats 3

Writes bench/results/threads-<date>.json. A thread count above the free cores makes every parallel
op wait for the thread that shares its core with the other process; "auto" should stay close to the
best fixed count in every condition. "mid-run": the busy process starts 1 s into a 400-token decode,
and the speed counts only the tokens after that.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "def fibonacci(n):"


def spin() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def child(args: argparse.Namespace) -> None:
    import logging
    import threading

    from moela import LLM, SamplingParams

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    threads = args.threads if args.threads == "auto" else int(args.threads)
    llm = LLM(model=args.model, threads=threads, max_num_seqs=1)
    llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=8))  # warm-up
    engine, spinner, started = llm.engine, [], []
    if args.spin_after is not None:
        timer = threading.Timer(args.spin_after, lambda: (started.append(time.perf_counter()), spinner.append(spin())))
        timer.start()
    engine.add_request(PROMPT, SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True))
    stamps = []
    while engine.has_unfinished():
        engine.step()
        stamps.append(time.perf_counter())
    for proc in spinner:
        proc.kill()
    after = [t for t in stamps[1:] if not started or t > started[0]]
    print(json.dumps({"decode_tokens_per_s": (len(after) - 1) / (after[-1] - after[0]),
                      "threads_at_end": engine.threads.threads}))


def run(args: argparse.Namespace, threads: str, mid_run: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--child", "--threads", threads, "--tokens", str(400 if mid_run else args.tokens)]
    cmd += ["--spin-after", "1.0"] if mid_run else []
    cmd += ["--model", args.model] if args.model else []
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="model directory (default: the embedded default model)")
    p.add_argument("--tokens", type=int, default=96, help="greedy tokens per run")
    p.add_argument("--repeats", type=int, default=2, help="runs per setting (the table shows the median)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", default="auto", help=argparse.SUPPRESS)
    p.add_argument("--spin-after", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return 0
    cores = len(os.sched_getaffinity(0))
    settings = sorted({str(cores), "1"}, reverse=True) + ["auto"]
    rows = []
    for condition in ("idle", "busy", "mid-run"):
        spinner = spin() if condition == "busy" else None
        time.sleep(1.0 if spinner else 0.0)
        try:
            for threads in settings:
                runs = [run(args, threads, condition == "mid-run") for _ in range(args.repeats)]
                speeds = sorted(r["decode_tokens_per_s"] for r in runs)
                rows.append({"condition": condition, "threads": threads, "decode_tokens_per_s": speeds[len(speeds) // 2],
                             "runs": runs})
                print(f"{condition:>7}: threads {threads:>4}: {speeds[len(speeds) // 2]:7.1f} decode tok/s "
                      f"(threads at the end: {[r['threads_at_end'] for r in runs]})", flush=True)
        finally:
            if spinner:
                spinner.kill()
    date = datetime.date.today().isoformat()
    out = Path(__file__).parent / "results" / f"threads-{date}.json"
    out.write_text(json.dumps({"command": "python bench/threads.py " + " ".join(sys.argv[1:]), "date": date,
                               "machine": f"{platform.machine()} {cores} cores, {platform.processor() or platform.platform()}",
                               "model": args.model or "embedded default model", "tokens": args.tokens,
                               "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
