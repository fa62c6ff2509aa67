"""Decode speed of ONNX Runtime (CPU) on `moela export onnx` graphs against moela's own CPU kernels, in
moela's engine either way (same scheduler, cache and sampler; only the step differs).

    python bench/onnx_runtime.py                                   # bench-1b, batches 1 and 8, 128-token prompts, 32 new
    python bench/onnx_runtime.py --shape tiny --new-tokens 8       # a smoke run

A random-weight checkpoint of the catalog shape is written, exported (float32, as ONNX Runtime's CPU
kernels run it), then each engine runs in its own process on the same prompts: moela's `auto` backend
in bfloat16 (the oneDNN-packed `cpu` backend where the CPU has it), moela's reference backend in
float32, and runtime "onnx" on the CPU provider in float32. The decode step is the median wall time of
the steps that run no prefill; decode tokens/s = batch / that step. Writes
bench/results/onnx-<shape>-<date>.json with the machine, its load average before the runs (a load above
half its core count means other work skewed every number), the command and every number.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENGINES = {  # name: (EngineConfig fields, which directory it reads)
    "moela-auto-bf16": ({"dtype": "bfloat16", "backend": "auto"}, "checkpoint"),
    "moela-reference-fp32": ({"dtype": "float32", "backend": "reference"}, "checkpoint"),
    "onnxruntime-cpu-fp32": ({"runtime": "onnx", "provider": "cpu"}, "onnx"),
}


def measure(args: argparse.Namespace) -> dict:
    """In the child process: one engine, every batch size; the decode step's median and the peak RSS."""
    import torch

    from moela import LLM, SamplingParams

    fields, source = ENGINES[args.engine]
    torch.set_num_threads(args.threads)
    llm = LLM(model=getattr(args, source), max_num_seqs=max(args.batches), skip_tokenizer_init=True,
              enable_prefix_caching=False, max_num_batched_tokens=max(args.batches) * args.prompt_len, **fields)
    engine, vocab = llm.engine, llm.engine.model_cfg.vocab_size
    llm.generate([[5] * 16], SamplingParams(max_tokens=4))  # warm-up
    out = {"backend": engine.backend.name if engine.backend else engine.runner.provider}
    for b in args.batches:
        g = torch.Generator().manual_seed(b)
        for prompt in torch.randint(2, vocab, (b, args.prompt_len), generator=g).tolist():
            engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True))
        steps = []
        while engine.has_unfinished():
            prefill = any(s.in_prefill for queue in (engine.scheduler.waiting, engine.scheduler.running) for s in queue)
            t = time.perf_counter()
            engine.step()
            if not prefill:
                steps.append(time.perf_counter() - t)
        step = sorted(steps)[len(steps) // 2]
        out[str(b)] = {"decode_step_ms": 1e3 * step, "decode_tokens_per_s": b / step, "steps": len(steps)}
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux's VmHWM belongs to the address space exec started; ru_maxrss
    there also counts the parent's at fork (the exporting parent's, here), so it is only the fallback."""
    status = Path("/proc/self/status")
    for line in status.read_text().splitlines() if status.exists() else []:
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="bench-1b", help="a benchmark shape of moela's model catalog (bench-1b, bench-tiny)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="sequences decoded together")
    p.add_argument("--prompt-len", type=int, default=128, help="tokens per prompt")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per sequence")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads of every engine")
    p.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES), help="what to measure")
    p.add_argument("--out", default="bench/results", help="folder for the JSON result")
    p.add_argument("--engine", choices=ENGINES, help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--onnx", help=argparse.SUPPRESS)
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if args.engine:
        print(json.dumps(measure(args)))
        return 0
    from moela.bench import write_checkpoint
    from moela.cost.catalog import model_names
    from moela.export import export_onnx

    shape = "bench-tiny" if args.shape == "tiny" else args.shape
    if shape not in model_names():
        print(f"error: --shape {args.shape!r} is not in moela's model catalog", file=sys.stderr)
        return 1
    load = os.getloadavg()[0]  # other work on the machine skews every number below
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, onnx = Path(tmp) / "checkpoint", Path(tmp) / "onnx"
        write_checkpoint(shape, checkpoint)
        t = time.perf_counter()
        export_onnx(checkpoint, onnx)
        export_s = time.perf_counter() - t
        os.sync()  # the export's weights reach the disk before the timed runs, not during them
        common = [sys.executable, __file__, "--checkpoint", str(checkpoint), "--onnx", str(onnx), "--threads", str(args.threads),
                  "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens), "--batches", *map(str, args.batches)]
        runs = {e: json.loads(subprocess.run(common + ["--engine", e], check=True, capture_output=True, text=True).stdout.splitlines()[-1])
                for e in args.engines}
    loaded = load > (os.cpu_count() or 1) / 2
    print(f"{shape}: {args.threads} threads, {args.prompt_len}-token prompts, {args.new_tokens} new tokens; export {export_s:.0f} s")
    print(f"{'engine':<22} {'kernels':<20} " + " ".join(f"{f'batch {b} ms':>11} {'tok/s':>7}" for b in args.batches) + f" {'RSS MB':>8}")
    for name, r in runs.items():
        cells = " ".join(f"{r[str(b)]['decode_step_ms']:>11.1f} {r[str(b)]['decode_tokens_per_s']:>7.1f}" for b in args.batches)
        print(f"{name:<22} {r['backend']:<20} {cells} {r['peak_rss_mb']:>8.0f}")
    if loaded:
        print(f"machine loaded: load average {load:.1f} on {os.cpu_count()} cores; these numbers are not comparable")
    date = datetime.datetime.now().strftime("%Y-%m-%d")
    out = Path(args.out) / f"onnx-{shape}-{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "python bench/onnx_runtime.py " + " ".join(argv), "date": date,
                               "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.processor() or platform.platform()}",
                               "load_avg_1m": round(load, 2), "loaded": loaded, "export_s": export_s, "args": vars(args),
                               "runs": runs}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
