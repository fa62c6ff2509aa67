"""Throughput of moela vs transformers `generate` on the same random weights, with the bandwidth roofline.

    moela bench                                         # bench-1b, batches 1 8 32, 128-token prompts, 64 new
    moela bench --shape tiny --batches 1 4 --skip-hf
    python bench/throughput.py ...                      # the same, from a checkout

The baseline needs transformers (the `test` extra); `--skip-hf` measures moela alone without it.

One checkpoint is written to a temporary directory, then each engine runs in its own subprocess (so
each peak RSS is its own) on the same prompts. Throughput = generated tokens / wall time of the whole
generate call. The roofline divides the bytes one decode step must read (all non-expert weights,
the routed experts a batch of B tokens is expected to touch, E * (1 - (1 - k/E)^B) per layer, and
the cached latents) by the copy bandwidth measured here. Writes bench/results/throughput-<shape>-<date>.json.
"""

import argparse
import datetime
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from moela import threads
from moela.config import QUANTIZATIONS, HelpFormatter, ModelConfig
from moela.cost import formulas as cost
from moela.cost.catalog import load_model, model_names, shape_from_model_config
from moela.cost.measure import copy_bandwidth, random_model
from moela.loader import save_model
from moela.ops import BACKENDS

SHAPES = [name for name in model_names() if name.startswith("bench-")]  # bench-1b, bench-tiny (catalog entries)


def write_checkpoint(shape: str, path: Path) -> None:
    """The catalog shape with random bf16 weights (moela.cost.measure.random_model), in HF format, flushed to
    disk: the kernel's write-back of gigabytes of dirty pages would otherwise run during the timed runs."""
    config = load_model(shape).config
    save_model(random_model(ModelConfig.from_dict(config)), path, dtype=torch.bfloat16, config=config)
    os.sync()


def prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch)
    return torch.randint(2, vocab, (batch, length), generator=g).tolist()


def run_moela(args: argparse.Namespace) -> dict:
    from moela import LLM, SamplingParams

    batches, prompt_len, new_tokens = args.batches, args.prompt_len, args.new_tokens
    llm = LLM(model=Path(args.checkpoint), dtype="bfloat16", max_num_seqs=max(batches), backend=args.backend,
              quantization=args.quantization, max_num_batched_tokens=max(batches) * prompt_len, skip_tokenizer_init=True,
              enable_prefix_caching=False, max_model_len=prompt_len + new_tokens + 16)  # a cache for what it runs, no more
    engine, results = llm.engine, {}
    shape, weight_dtype = shape_from_model_config(engine.model_cfg), (args.quantization or "bf16").split("-")[0]
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate(prompts(1, 16, llm.engine.model_cfg.vocab_size), SamplingParams(max_tokens=4))  # warm-up
    for b in batches:
        ps = prompts(b, prompt_len, engine.model_cfg.vocab_size)
        t0 = time.perf_counter()
        for p in ps:
            engine.add_request(p, params)
        steps = []
        while engine.has_unfinished():
            t = time.perf_counter()
            prefill = any(seq.in_prefill for seq in engine.scheduler.waiting) or any(s.in_prefill for s in engine.scheduler.running)
            engine.step()
            steps.append((prefill, time.perf_counter() - t))
        wall = time.perf_counter() - t0
        decode = [t for pre, t in steps if not pre]
        prefill_time = sum(t for pre, t in steps if pre)
        results[b] = {"tokens_per_s": b * new_tokens / wall, "wall_s": wall, "decode_step_ms": 1e3 * sorted(decode)[len(decode) // 2],
                      "prefill_tokens_per_s": b * prompt_len / prefill_time,
                      "roofline_bytes": sum(cost.decode_bytes(shape, b, prompt_len + new_tokens // 2, weight_dtype, "bf16"))}
    return {"results": results, "kv_bytes_per_token": engine.bytes_per_token, "peak_rss_mb": _rss_mb(),
            "backend": engine.backend.name}


def run_hf(args: argparse.Namespace) -> dict:
    from transformers import DeepseekV3ForCausalLM

    batches, prompt_len, new_tokens = args.batches, args.prompt_len, args.new_tokens
    model = DeepseekV3ForCausalLM.from_pretrained(args.checkpoint, dtype=torch.bfloat16).eval()
    vocab, results = model.config.vocab_size, {}
    kwargs = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    with torch.inference_mode():
        model.generate(torch.tensor(prompts(1, 16, vocab)), max_new_tokens=4, do_sample=False, pad_token_id=0)
        for b in batches:
            ids = torch.tensor(prompts(b, prompt_len, vocab))
            t0 = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
            wall = time.perf_counter() - t0
            assert out.shape[1] == prompt_len + new_tokens
            results[b] = {"tokens_per_s": b * new_tokens / wall, "wall_s": wall}
        past = model(torch.tensor(prompts(1, 64, vocab)), use_cache=True).past_key_values
    kv = sum(t.numel() * t.element_size() for layer in past.layers for t in (layer.keys, layer.values)) / 64
    return {"results": results, "kv_bytes_per_token": kv, "peak_rss_mb": _rss_mb()}


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False


def _rss_mb() -> float:
    """This process's peak RSS. Linux's VmHWM starts afresh at exec; ru_maxrss keeps the high-water mark of
    the process that spawned it (here the parent, which built the checkpoint)."""
    status = Path("/proc/self/status")
    if status.is_file():
        return next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmHWM:")) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    print(json.dumps((run_moela if args.engine == "moela" else run_hf)(args)))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moela bench", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--shape", choices=SHAPES + ["tiny"], default="bench-1b", help="a benchmark shape of moela's "
                   "model catalog (tiny = bench-tiny)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="sequences decoded together")
    p.add_argument("--prompt-len", type=int, default=128, help="tokens per prompt")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per sequence")
    p.add_argument("--threads", type=threads.argument, default="auto",
                   help="CPU threads of both engines: a number, or auto (the cores free when the run starts, fixed)")
    p.add_argument("--skip-hf", action="store_true", help="measure moela only (no transformers needed)")
    p.add_argument("--backend", choices=("auto", *BACKENDS), default="auto", help="moela's kernels")
    p.add_argument("--quantization", choices=QUANTIZATIONS, default=None, help="moela's weights: int8 or int4 (weight-only)")
    p.add_argument("--out", default="bench/results", help="folder for the JSON result")
    p.add_argument("--engine", choices=["moela", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.engine:
        child(args)
        return 0
    if not args.skip_hf and not _importable("transformers"):
        print("error: the transformers baseline needs transformers (pip install 'transformers>=5'); "
              "or run with --skip-hf to measure moela alone", file=sys.stderr)
        return 1
    if args.threads == "auto":
        args.threads = threads.free_now()
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(args.shape, Path(tmp))
        common = [sys.executable, "-m", "moela.bench", "--checkpoint", tmp, "--prompt-len", str(args.prompt_len), "--new-tokens",
                  str(args.new_tokens), "--threads", str(args.threads), "--batches", *map(str, args.batches),
                  "--shape", args.shape, "--backend", args.backend] + (["--quantization", args.quantization] if args.quantization else [])
        runs = {e: json.loads(subprocess.run(common + ["--engine", e], check=True, capture_output=True, text=True).stdout)
                for e in (["moela"] if args.skip_hf else ["moela", "hf"])}
    report(args, runs, copy_bandwidth(mib=512, repeats=5))
    return 0


def report(args: argparse.Namespace, runs: dict, bandwidth: float) -> None:
    ours, hf = runs["moela"], runs.get("hf")
    print(f"{args.shape}: {args.quantization or 'bf16'}, {args.threads} threads, {args.prompt_len}-token prompts, {args.new_tokens} new tokens; "
          f"copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(f"{'batch':>5} {'moela tok/s':>12} {'hf tok/s':>9} {'ratio':>6} {'decode ms':>10} {'roofline ms':>12} "
          f"{'of roofline':>12} {'prefill tok/s':>14}")
    for b in map(str, args.batches):
        r = ours["results"][b]
        floor_ms = 1e3 * r["roofline_bytes"] / bandwidth
        r["roofline_step_ms"], r["fraction_of_roofline"] = floor_ms, floor_ms / r["decode_step_ms"]
        h = hf["results"][b]["tokens_per_s"] if hf else float("nan")
        r["speedup_vs_hf"] = r["tokens_per_s"] / h if hf else None
        print(f"{b:>5} {r['tokens_per_s']:>12.1f} {h:>9.1f} {r['tokens_per_s'] / h:>6.2f} {r['decode_step_ms']:>10.1f} "
              f"{floor_ms:>12.1f} {floor_ms / r['decode_step_ms']:>12.0%} {r['prefill_tokens_per_s']:>14.0f}")
    print(f"KV bytes/token: moela {ours['kv_bytes_per_token']:,.0f}" + (f", transformers {hf['kv_bytes_per_token']:,.0f}" if hf else ""))
    print(f"peak RSS MB: moela {ours['peak_rss_mb']:,.0f}" + (f", transformers {hf['peak_rss_mb']:,.0f}" if hf else ""))
    date = datetime.datetime.now().strftime("%Y-%m-%d")
    out = Path(args.out) / f"throughput-{args.shape}{'-' + args.quantization if args.quantization else ''}-{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "moela bench " + " ".join(args.argv), "date": date,
                               "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.processor() or platform.platform()}",
                               "copy_bandwidth_gb_s": bandwidth / 1e9, "args": vars(args), "runs": runs}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
