"""Tensor and expert parallelism over gloo: the engine's step times on 2 and 4 ranks (tensor parallel, expert
parallel) against one process, and the two ways training moves tokens to experts when each rank has its
own tokens (all-gather + reduce-scatter vs all-to-all dispatch and combine), beside the engine's way
(every rank has every token: serve its pairs, then all-reduce).

    python bench/parallel.py                                     # bench-tiny, small sizes: checks the script
    python bench/parallel.py --shape bench-1b --batch 8 --prompt-len 128 --tokens 64 --ranks 2 4 \\
        --moe-tokens 64 512 --moe-shape bench-1b

The ranks split the machine's cores (each gets cores / ranks threads; one process is measured with 1 and
with all cores), so on one machine this measures what the collectives cost, not a speed-up. Writes bench/results/parallel-<date>.json.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moela import LLM, SamplingParams  # noqa: E402
from moela.bench import write_checkpoint  # noqa: E402
from moela.config import ModelConfig  # noqa: E402
from moela.cost.catalog import load_model  # noqa: E402
from moela.engine.ranks import free_port  # noqa: E402
from moela.ops import reference  # noqa: E402
from moela.parallel import Mesh, Shard, all_reduce_output, exchanged, gathered, serve_pairs  # noqa: E402


def engine_steps(path: Path, args: argparse.Namespace, **parallel) -> dict:
    """Median prefill and decode step of one batch, greedy, after a warm-up request."""
    llm = LLM(model=path, dtype="bfloat16", skip_tokenizer_init=True, enable_prefix_caching=False,
              max_num_seqs=args.batch, max_num_batched_tokens=args.batch * args.prompt_len, **parallel)
    engine, params = llm.engine, SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(2, engine.model_cfg.vocab_size, (args.batch, args.prompt_len), generator=g).tolist()
    llm.generate(prompts[:1], SamplingParams(max_tokens=2))
    for p in prompts:
        engine.add_request(p, params)
    times = []
    while engine.has_unfinished():
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    llm.engine.close()
    return {"prefill_ms": times[0] * 1e3, "decode_ms": statistics.median(times[1:]) * 1e3, "steps": len(times)}


def moe_worker(rank: int, world: int, port: int, args: argparse.Namespace, results) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    cfg = ModelConfig.from_dict(load_model(args.moe_shape).config)
    E, d, inter, k = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    g = torch.Generator().manual_seed(0)
    w13, w2 = torch.randn(E, 2 * inter, d, generator=g) / d**0.5, torch.randn(E, d, inter, generator=g) / inter**0.5
    train = Shard(Mesh(rank, world, world, data_parallel=True), cfg)
    engine = Shard(Mesh(rank, world, world), cfg)
    name = "layers.1.ffn.experts"
    route = train.route(name, torch.device("cpu"))
    a13, a2 = (train.local(f"{name}.{w}", t).requires_grad_() for w, t in (("w13", w13), ("w2", w2)))
    rows = []
    for T in args.moe_tokens:
        x = torch.randn(T, d, generator=torch.Generator().manual_seed(rank)).requires_grad_()
        weights = torch.rand(T, k, generator=g).requires_grad_()
        indices = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
        everyone = torch.randn(world * T, d, generator=torch.Generator().manual_seed(9))

        def own_tokens(fn):
            return fn(x, weights, indices, a13, a2, moe=reference.moe, route=route, me=rank)

        def every_token():
            y = serve_pairs(everyone, weights.detach().repeat(world, 1), indices.repeat(world, 1), a13.detach(),
                            a2.detach(), moe=reference.moe, route=engine.route(name, everyone.device), me=rank)
            return all_reduce_output(None, (), y)

        row = {"tokens_per_rank": T}
        for label, step in (("allgather", lambda: own_tokens(gathered)), ("alltoall", lambda: own_tokens(exchanged))):
            row[f"{label}_forward_ms"] = timed(step, args.repeats)
            row[f"{label}_forward_backward_ms"] = timed(lambda: step().square().sum().backward(), args.repeats)
        with torch.no_grad():
            row["engine_allreduce_forward_ms"] = timed(every_token, args.repeats)
        rows.append(row)
    if rank == 0:
        results.put(rows)
    dist.destroy_process_group()


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def moe_comm(args: argparse.Namespace, world: int) -> list[dict]:
    ctx = mp.get_context("spawn")
    results, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=moe_worker, args=(r, world, port, args, results)) for r in range(world)]
    for p in procs:
        p.start()
    rows = results.get(timeout=1800)
    for p in procs:
        p.join()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="bench-tiny", help="catalog shape of the engine's random checkpoint")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--tokens", type=int, default=32, help="new tokens per sequence")
    p.add_argument("--ranks", type=int, nargs="+", default=[2], help="rank counts to run the engine on")
    p.add_argument("--moe-shape", default="bench-tiny", help="catalog shape of the expert layer of the comm bench")
    p.add_argument("--moe-tokens", type=int, nargs="+", default=[16, 128], help="tokens per rank in the comm bench")
    p.add_argument("--repeats", type=int, default=20, help="timed runs of each comm pattern (the median is kept)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / args.shape
        write_checkpoint(args.shape, path)
        engine = [{"ranks": 1, "mode": f"single, {t} thread(s)", **engine_steps(path, args, threads=t)}
                  for t in sorted({1, cores})]
        for n in args.ranks:
            for mode, extra in (("tensor", {}), ("expert", {"enable_expert_parallel": True})):
                engine.append({"ranks": n, "mode": mode, **engine_steps(path, args, tensor_parallel_size=n, **extra)})
                print(json.dumps(engine[-1]), flush=True)
    comm = {n: moe_comm(args, n) for n in args.ranks}
    result = {"command": "python bench/parallel.py " + " ".join(sys.argv[1:]), "date": str(datetime.date.today()),
              "machine": f"{platform.machine()} {cores} cores, {platform.platform()}", "torch": torch.__version__,
              "load_average": os.getloadavg(), "settings": {k: str(v) for k, v in vars(args).items()},
              "engine": engine, "moe_comm": comm}
    out = args.out or Path(__file__).parent / "results" / f"parallel-{result['date']}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
