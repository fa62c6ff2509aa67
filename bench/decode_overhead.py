"""Per-step cost of a decode step beyond reading weights: aten ops per step and their time.

    python bench/decode_overhead.py                                  # bench-1b, batch 1, bf16, 2 threads
    python bench/decode_overhead.py --quantization int4 --threads 1
    PYTHONPATH=/path/to/other/checkout python bench/decode_overhead.py   # the same on another revision

Builds the model with random weights (moela.cost.measure.random_model), prefills one `--context`-token
prompt per sequence, then times `--steps` engine steps in which every sequence decodes one token, and
counts the aten ops one such step dispatches. The same runs on a "narrow" twin: the same layers,
heads, experts and routing with every width cut to a few dozen, whose step reads almost no weights,
so its time is the step's per-op overhead. `--compile` (an experiment) first hands each MLA and
router forward to torch.compile. Writes bench/results/decode_overhead-<revision>-<shape>-...json
(-loaded when the machine was busy at start).
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moela.config import ModelConfig

from moela.engine.config import EngineConfig
from moela.cost.catalog import load_model
from moela.cost.measure import random_model
from moela.engine.llm import LLMEngine
from moela.engine.sampler import SamplingParams

import record  # bench/record.py

NARROW = {"hidden_size": 64, "intermediate_size": 64, "moe_intermediate_size": 32, "q_lora_rank": 32, "kv_lora_rank": 32,
          "qk_nope_head_dim": 16, "qk_rope_head_dim": 16, "v_head_dim": 16, "vocab_size": 512}


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def compile_layers(model: torch.nn.Module) -> None:
    """torch.compile each MLA and router forward; wkv_b's per-head split is fixed first (its lazy rebuild
    check would break the graph)."""
    for layer in model.layers:
        w_uk, w_uv_t = layer.attn.absorbed_weights()
        layer.attn.absorbed_weights = lambda a=w_uk, b=w_uv_t: (a, b)
        layer.attn.forward = torch.compile(layer.attn.forward, dynamic=True)
        if hasattr(layer.ffn, "gate"):
            layer.ffn.gate.forward = torch.compile(layer.ffn.gate.forward, dynamic=True)


def measure(config: dict, args: argparse.Namespace) -> dict:
    model = random_model(ModelConfig.from_dict(config))
    extra = {"quantization": args.quantization} if args.quantization else {}
    engine = LLMEngine(EngineConfig(max_model_len=args.context + args.steps + 16, max_num_seqs=args.batch,
                                    skip_tokenizer_init=True, enable_prefix_caching=False, threads=args.threads, **extra),
                       model=model)
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0, max_tokens=args.steps + 12, ignore_eos=True)
    for prompt in torch.randint(2, config["vocab_size"], (args.batch, args.context), generator=gen).tolist():
        engine.add_request(prompt, params)
    while any(s.in_prefill for s in [*engine.scheduler.waiting, *engine.scheduler.running]):
        engine.step()
    compile_s = None
    if args.compile:
        start = time.perf_counter()
        compile_layers(engine.model)
        engine.step()
        engine.step()
        compile_s = time.perf_counter() - start
    for _ in range(3):
        engine.step()
    with CountOps() as ops:
        engine.step()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    times.sort()
    return {"ops_per_step": ops.count, "step_ms_median": 1e3 * times[len(times) // 2], "step_ms_min": 1e3 * times[0],
            "compile_s": compile_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="bench-1b", help="a catalog shape moela runs (bench-1b, bench-tiny)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=128, help="prompt tokens per sequence")
    p.add_argument("--steps", type=int, default=32, help="decode steps timed")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quantization", default=None, help="int8, int4, ... (EngineConfig.quantization)")
    p.add_argument("--compile", action="store_true", help="experiment: torch.compile MLA and router forwards")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    load = os.getloadavg()
    torch.manual_seed(0)
    config = load_model(args.shape).config
    results = {"full": measure(config, args), "narrow": measure(config | NARROW, args)}
    full, narrow = results["full"], results["narrow"]
    print(f"{args.shape}, batch {args.batch}, {args.quantization or 'bf16'}, {args.threads} threads"
          f"{', compiled MLA + router' if args.compile else ''}: {full['ops_per_step']} aten ops per decode step")
    print(f"step {full['step_ms_median']:.1f} ms (min {full['step_ms_min']:.1f}); narrow twin (per-op overhead) "
          f"{narrow['step_ms_median']:.1f} ms (min {narrow['step_ms_min']:.1f})")
    checkout = Path(sys.modules["moela"].__file__).parent.parent
    revision = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip() or "unknown"
    tag = "-".join([revision, args.shape, args.quantization or "bf16", f"b{args.batch}"] + (["compiled"] if args.compile else []))
    record.write(args.out, f"decode_overhead-{tag}", load, {"moela": str(checkout), "revision": revision,
                                                           "args": vars(args), "results": results})


if __name__ == "__main__":
    main()
