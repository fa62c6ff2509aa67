"""Weight-only quantization side by side on this CPU, in one run: bench-1b in bf16 and int4 against
transformers and llama.cpp (bf16 and Q4_0 GGUF of the same weights), then a random-weight
DeepSeek-V2-Lite-shaped checkpoint, FP8 block-quantized as V3 ships, served at int8 and int4.

    python bench/quantized.py --llama-cpp /path/to/llama-build --big-dir /path/to/v2lite-fp8   # the full run
    python bench/quantized.py --shape bench-1b --batches 1 8 --prompt-len 16 --new-tokens 8 \\
        --big-shape bench-tiny --big-dir /tmp/tiny-fp8 --llama-cpp /path/to/llama-build          # a quick check

Each engine runs in its own subprocess (moela bench's children, so each peak RSS is its own) on the same
prompts; throughput is generated tokens / wall time of the whole run, decode ms the median decode step.
llama.cpp is built by bench/llama_cpp.sh (`build`) into --llama-cpp; this script converts the checkpoint
and runs llama-batched-bench (no --llama-cpp: that part is skipped). The big checkpoint is written to
--big-dir once, one layer per shard, never holding the model in memory. Its roofline divides the bytes a
decode step reads at the quantized width (moela.cost.formulas.decode_bytes) by the copy bandwidth
measured here. Writes bench/results/quantized-<date>.json (-loaded when the machine was busy at start).
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from moela import threads
from moela.bench import write_checkpoint
from moela.config import DEFAULT_MODEL_DIR, ModelConfig
from moela.cost.catalog import load_model
from moela.cost.measure import copy_bandwidth
from moela.loader import ARCHITECTURES
from moela.models import build_model
from moela.names import to_hf

import record  # bench/record.py

HERE = Path(__file__).parent
BLOCK = 128  # FP8 block size, as DeepSeek-V3's checkpoints
GIB = 2**30


def moela_run(checkpoint: Path, args: argparse.Namespace, batches: list[int], engine: str = "moela",
              quantization: str | None = None) -> dict:
    cmd = [sys.executable, "-m", "moela.bench", "--engine", engine, "--checkpoint", str(checkpoint), "--threads",
           str(args.threads), "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
           "--batches", *map(str, batches)] + (["--quantization", quantization] if quantization else [])
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def llama_cpp_runs(checkpoint: Path, args: argparse.Namespace) -> dict:
    """llama-batched-bench on the checkpoint converted to bf16 and Q4_0 GGUF."""
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the converter needs a tokenizer; any that fits the vocab
        shutil.copy(DEFAULT_MODEL_DIR / name, checkpoint / name)
    config = json.loads((checkpoint / "config.json").read_text())  # the converter reads num_key_value_heads, as HF's files have it
    (checkpoint / "config.json").write_text(json.dumps(config | {"num_key_value_heads": config["num_attention_heads"]}))
    run = subprocess.run(["bash", str(HERE / "llama_cpp.sh"), "convert", args.llama_cpp, str(checkpoint)],
                         capture_output=True, text=True, env=os.environ | {"PYTHON": sys.executable})
    if run.returncode:
        sys.exit(f"bench/llama_cpp.sh convert failed:\n{run.stderr[-4000:]}")
    binary = next(Path(args.llama_cpp).glob("llama_cpp_python-*/vendor/llama.cpp/build/bin/llama-batched-bench"))
    cmd = ["-c", str(max(args.batches) * (args.prompt_len + args.new_tokens)), "-b", "2048", "-ub", "512", "-npp",
           str(args.prompt_len), "-ntg", str(args.new_tokens), "-npl", ",".join(map(str, args.batches)), "-t",
           str(args.threads), "--output-format", "jsonl"]
    runs = {}
    for fmt in ("bf16", "q4_0"):
        for repack in ([], ["--no-repack"]):  # on AMX, repacked Q4_0 lacks a kernel MLA needs (aborts): then unpacked
            run = subprocess.run([str(binary), "-m", str(checkpoint / f"model-{fmt}.gguf"), *cmd, *repack],
                                 capture_output=True, text=True)
            if run.returncode == 0:
                break
        run.check_returncode()
        rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
        runs[fmt] = {str(r["pl"]): {"tokens_per_s": r["pl"] * r["tg"] / r["t"], "decode_tokens_per_s": r["speed_tg"]}
                     for r in rows} | {"flags": repack}
    return runs


def fp8_tensor(shape: torch.Size, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """N(0, 1/fan_in) weights as e4m3 codes (64 sigma-units, clamped at 448) and their per-block scale_inv."""
    out, fan_in = shape
    codes = torch.randn(shape, generator=gen).mul_(64).clamp_(-448, 448).to(torch.float8_e4m3fn)
    return codes, torch.full((math.ceil(out / BLOCK), math.ceil(fan_in / BLOCK)), fan_in ** -0.5 / 64)


def write_fp8_checkpoint(shape: str, path: Path, seed: int = 0) -> None:
    """The catalog shape with random weights in HF names: every layer matrix but the router FP8 with
    [128, 128] block scales, the rest bf16 (router biases fp32 zeros); one shard per layer plus an index."""
    config = load_model(shape).config
    cfg = ModelConfig.from_dict(config)
    meta = to_hf(dict(build_model(cfg, torch.bfloat16, "meta").state_dict()))
    gen, weight_map = torch.Generator().manual_seed(seed), {}
    path.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[str]] = {}
    for name in meta:
        groups.setdefault(name.split(".")[2] if name.startswith("model.layers.") else "rest", []).append(name)
    for group, names in groups.items():
        tensors = {}
        for name in names:
            t = meta[name]
            if name.endswith("e_score_correction_bias"):
                tensors[name] = torch.zeros(t.shape)
            elif t.dim() == 1:
                tensors[name] = (1 + 0.1 * torch.randn(t.shape, generator=gen)).bfloat16()
            elif group == "rest" or name.endswith("mlp.gate.weight"):
                scale = 1.0 if name == "model.embed_tokens.weight" else t.shape[-1] ** -0.5
                tensors[name] = (torch.randn(t.shape, generator=gen) * scale).bfloat16()
            else:
                tensors[name], tensors[name + "_scale_inv"] = fp8_tensor(t.shape, gen)
        shard = f"model-{group}.safetensors"
        save_file(tensors, str(path / shard), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, shard)
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}, indent=1))
    config = config | {"architectures": [ARCHITECTURES[cfg.model_type]], "dtype": "bfloat16",
                       "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [BLOCK, BLOCK]}}
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def big_runs(args: argparse.Namespace, bandwidth: float) -> dict:
    path = Path(args.big_dir)
    if not (path / "model.safetensors.index.json").is_file():
        print(f"writing a random FP8 {args.big_shape} checkpoint to {path} (once)", flush=True)
        write_fp8_checkpoint(args.big_shape, path)
        os.sync()  # the write-back of 16 GB of dirty pages would otherwise run during the timed runs
    runs = {}
    for quant in ("int8", "int4"):
        run = moela_run(path, args, args.big_batches, quantization=quant)
        for r in run["results"].values():
            r["fraction_of_roofline"] = r["roofline_bytes"] / bandwidth / (r["decode_step_ms"] / 1e3)
        run["rss_with_8k_tokens_gib"] = (run["peak_rss_mb"] * 2**20 + 8192 * run["kv_bytes_per_token"]) / GIB
        runs[quant] = run
    return runs


def report(small: dict, llama: dict, big: dict, args: argparse.Namespace) -> None:
    print(f"{args.shape}, {args.threads} threads, {args.prompt_len}-token prompts, {args.new_tokens} new; generated tok/s"
          " (decode-only tok/s for llama.cpp in brackets)")
    names = [*small, *(f"llama.cpp {f}" for f in llama)]
    print(f"{'batch':>5} " + " ".join(f"{n:>20}" for n in names))
    for b in map(str, args.batches):
        cells = [f"{small[n]['results'][b]['tokens_per_s']:.1f}" for n in small]
        cells += [f"{r[b]['tokens_per_s']:.1f} ({r[b]['decode_tokens_per_s']:.1f})" for r in llama.values()]
        print(f"{b:>5} " + " ".join(f"{c:>20}" for c in cells))
    for quant, run in big.items():
        print(f"{args.big_shape} {quant}: peak RSS {run['peak_rss_mb'] / 1024:.1f} GiB "
              f"({run['rss_with_8k_tokens_gib']:.1f} GiB with 8k cached tokens); " + "; ".join(
                  f"batch {b} {r['tokens_per_s']:.1f} tok/s, step {r['decode_step_ms']:.0f} ms, "
                  f"{r['fraction_of_roofline']:.0%} of roofline" for b, r in run["results"].items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="bench-1b", help="the shape compared with transformers and llama.cpp")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=threads.argument, default="auto")
    p.add_argument("--llama-cpp", help="bench/llama_cpp.sh's BUILD_DIR (llama.cpp built there); omitted: no llama.cpp")
    p.add_argument("--big-shape", default="deepseek-v2-lite", help="the catalog shape written as an FP8 checkpoint")
    p.add_argument("--big-dir", help="where that checkpoint is (written once if absent); omitted: that part is skipped")
    p.add_argument("--big-batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    load = os.getloadavg()
    args.threads = threads.free_now() if args.threads == "auto" else args.threads
    bandwidth = copy_bandwidth(mib=512, repeats=5)
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(args.shape, Path(tmp))
        small = {name: moela_run(Path(tmp), args, args.batches, engine, quant) for name, engine, quant in
                 (("moela bf16", "moela", None), ("moela int4", "moela", "int4"), ("transformers bf16", "hf", None))}
        llama = llama_cpp_runs(Path(tmp), args) if args.llama_cpp else {}
    big = big_runs(args, bandwidth) if args.big_dir else {}
    report(small, llama, big, args)
    record.write(args.out, "quantized", load, {"copy_bandwidth_gb_s": bandwidth / 1e9, "args": vars(args),
                                               "bench-1b": small, "llama.cpp": llama, "big": big})


if __name__ == "__main__":
    main()
