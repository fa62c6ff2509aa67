"""Decode cost against context for V3 (dense MLA), V3.2 (DSA) and V4 (window + CSA/HCA) shaped random
models of equal width, on this CPU: step time, the time in each attention op, and cache bytes per sequence.

    python bench/sparse_attention.py                       # contexts 1k..32k, bf16, writes bench/results/
    python bench/sparse_attention.py --contexts 1024 4096 --steps 5

Each model is built with random weights; its cache is filled with random values for a context of L tokens
(a prefill of 32k tokens on a CPU would take minutes and changes nothing about the decode step); then
one sequence decodes `steps` tokens at position L and the median step is reported. Op times come from
wrapping the backend's ops with a timer (the op surface makes that a one-liner); "attention" is the op
that reads the cache (MLA: latent_attention; V3.2: sparse_latent_attention; V4: sink_attention), "indexer"
the scoring that picks keys (V3.2: indexer_topk; V4: index_scores). V3's attention grows with L; V3.2's
and V4's stay flat once L passes index_topk, while their indexers grow with L at a smaller slope.
"""

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from moela import ops, quantize
from moela.config import ModelConfig
from moela.cost.measure import random_model
from moela.engine.cache import CacheLayout
from moela.engine.runner import Runner
from moela.engine.sampler import SamplingParams
from moela.engine.sequence import Sequence

WIDTH = dict(vocab_size=4096, hidden_size=1024, num_hidden_layers=4, num_attention_heads=16, q_lora_rank=384,
             max_position_embeddings=65536, bos_token_id=0, eos_token_id=1)
MLA = dict(kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, intermediate_size=2048,
           moe_intermediate_size=256, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
           first_k_dense_replace=4, n_group=1, topk_group=1)
MODELS = {
    "V3 (dense MLA)": dict(WIDTH, model_type="deepseek_v3", **MLA),
    "V3.2 (DSA, top-512)": dict(WIDTH, model_type="deepseek_v32", index_n_heads=16, index_head_dim=64, index_topk=512,
                                **MLA),
    "V4 (window 128, CSA top-128, HCA)": dict(
        WIDTH, model_type="deepseek_v4", head_dim=128, qk_rope_head_dim=32, o_groups=4, o_lora_rank=256,
        sliding_window=128, layer_types=["sliding_attention", "compressed_sparse_attention",
                                         "heavily_compressed_attention", "compressed_sparse_attention"],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 128},
        moe_intermediate_size=256, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, num_hash_layers=1,
        index_n_heads=16, index_head_dim=64, index_topk=128),
}
ATTENTION = ("latent_attention", "sparse_latent_attention", "sink_attention")
INDEXER = ("indexer_topk", "index_scores")


def timed(backend: ops.Backend, totals: dict) -> ops.Backend:
    """The backend with every op timed into totals[op] (seconds)."""
    def wrap(name, fn):
        def run(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            totals[name] += time.perf_counter() - start
            return out
        return run
    return dataclasses.replace(backend, **{op: wrap(op, getattr(backend, op)) for op in ops.OPS})


def measure(cfg: ModelConfig, context: int, steps: int) -> dict:
    model = random_model(cfg)
    totals: dict[str, float] = defaultdict(float)
    quantize.prepare(model, timed(ops.select("auto", torch.device("cpu"), torch.bfloat16), totals))
    layout = CacheLayout.fit(model.cache_specs(), torch.bfloat16, 128)
    blocks = -(-(context + steps + 1) // layout.block_size)
    runner = Runner(model, layout, blocks, num_slots=1)
    for layer in runner.caches:  # a context of random cached values
        for t in layer.values():
            t.normal_()
    tokens = torch.randint(2, cfg.vocab_size, (context + steps,)).tolist()
    seq = Sequence("r", 0, tokens, context, SamplingParams(), None, None, num_computed=context,
                   block_table=list(range(blocks)), slot=0)
    times, per_op = [], []
    for _ in range(steps):
        totals.clear()
        start = time.perf_counter()
        runner.execute([(seq, 1)])
        times.append(time.perf_counter() - start)
        per_op.append(dict(totals))
        seq.num_computed += 1
    mid = sorted(range(steps), key=lambda i: times[i])[steps // 2]
    ms = lambda names: 1e3 * sum(per_op[mid].get(n, 0.0) for n in names)  # noqa: E731
    return {"context": context, "step_ms": 1e3 * times[mid], "attention_ms": ms(ATTENTION), "indexer_ms": ms(INDEXER),
            "cache_bytes_per_sequence": layout.bytes_per_token * context + layout.fixed_bytes_per_sequence}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    p.add_argument("--steps", type=int, default=9, help="decode steps per point (the median is reported)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, load = [], os.getloadavg()[0]  # other work on the machine skews every time below
    print(f"{'model':36} {'context':>8} {'step ms':>9} {'attention ms':>13} {'indexer ms':>11} {'cache/seq MB':>13}")
    for name, raw in MODELS.items():
        cfg = ModelConfig.from_dict(raw)
        for context in args.contexts:
            r = {"model": name, **measure(cfg, context, args.steps)}
            rows.append(r)
            print(f"{name:36} {context:>8} {r['step_ms']:>9.1f} {r['attention_ms']:>13.2f} {r['indexer_ms']:>11.2f} "
                  f"{r['cache_bytes_per_sequence'] / 1e6:>13.2f}", flush=True)
    date = datetime.date.today().isoformat()
    out = Path(args.out) / f"sparse_attention-{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "python bench/sparse_attention.py " + " ".join(sys.argv[1:]), "date": date,
                               "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.processor()}",
                               "threads": torch.get_num_threads(), "load_average_at_start": load, "models": MODELS,
                               "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
