"""Per-token cost of guided decoding (engine/guided.py): greedy decode time per token of the embedded
default model, unconstrained against a JSON schema and a regex that keep the output going to
max_tokens, at each batch size; and the time the engine spends in the grammar itself (masks filled,
copied and applied; tokens accepted) per decode step.

    python bench/guided.py                                   # batches 1 and 8, 128 tokens, 3 repeats
    python bench/guided.py --new-tokens 32 --repeats 1       # a quick check
    python bench/guided.py --device cuda --cuda-graphs       # on a GPU

Writes bench/results/guided-<device type>-<date>.json (with the machine and the command).
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

PROMPT = "def fibonacci(n):"
LONG_JSON = {"type": "array", "minItems": 1000, "items": {"type": "object", "additionalProperties": False,
                                                          "required": ["id", "name"], "properties": {
    "id": {"type": "integer"}, "name": {"type": "string", "maxLength": 12}}}}
LONG_REGEX = r"(def [a-z_]{1,12}\(n\):\n    return n\n){1000}"


class Timed:
    """Wraps a method, adding the seconds it takes to `total`."""

    def __init__(self, fn):
        self.fn, self.total = fn, 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.total += time.perf_counter() - start


def measure(llm, batch: int, guided, new_tokens: int) -> dict:
    from moela import SamplingParams

    guides = llm.engine.guides
    apply, accept = Timed(guides.apply), Timed(guides.accept)
    guides.apply, guides.accept = apply, accept
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True, guided_decoding=guided)
    try:
        start = time.perf_counter()
        outs = llm.generate([PROMPT] * batch, params)
        wall = time.perf_counter() - start
    finally:
        del guides.apply, guides.accept
    lengths = {len(o.outputs[0].token_ids) for o in outs}
    assert lengths == {new_tokens}, f"a request stopped early: {lengths}"
    decode = max(o.metrics.finish_time for o in outs) - min(o.metrics.first_token_time for o in outs)
    steps = new_tokens - 1
    return {"decode_ms_per_step": 1e3 * decode / steps, "decode_ms_per_token": 1e3 * decode / steps / batch,
            "grammar_ms_per_step": 1e3 * (apply.total + accept.total) / new_tokens, "wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory (default: the embedded default model)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="runs per case; the median is reported")
    p.add_argument("--threads", default="auto")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, ...")
    p.add_argument("--cuda-graphs", action="store_true", help="replay decode steps from CUDA graphs")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()

    from moela import LLM, SamplingParams
    from moela.engine.guided import GuidedDecodingParams

    threads = args.threads if args.threads == "auto" else int(args.threads)
    llm = LLM(model=args.model, threads=threads, device=args.device, cuda_graphs=args.cuda_graphs,
              max_num_seqs=max(args.batches), max_model_len=64 + args.new_tokens)
    llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=8))  # warm-up
    modes = {"none": None, "json_schema": GuidedDecodingParams(json=LONG_JSON),
             "regex": GuidedDecodingParams(regex=LONG_REGEX)}
    results = {}
    for batch in args.batches:
        for name, guided in modes.items():
            runs = [measure(llm, batch, guided, args.new_tokens) for _ in range(args.repeats)]
            results[f"batch{batch}/{name}"] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    for batch in args.batches:
        base = results[f"batch{batch}/none"]["decode_ms_per_step"]
        for name in modes:
            r = results[f"batch{batch}/{name}"]
            r["overhead_vs_none"] = r["decode_ms_per_step"] / base - 1
            print(f"batch {batch:2d} {name:12s} {r['decode_ms_per_step']:7.2f} ms/step  "
                  f"{r['decode_ms_per_token']:6.2f} ms/token  grammar {r['grammar_ms_per_step']:6.3f} ms/step  "
                  f"{100 * r['overhead_vs_none']:+6.1f}%")
    date = datetime.date.today().isoformat()
    record = {"date": date, "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
              "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
              "model": args.model or "embedded default", "new_tokens": args.new_tokens, "repeats": args.repeats,
              "threads": args.threads, "device": args.device, "cuda_graphs": args.cuda_graphs, "results": results}
    out = Path(args.out) / f"guided-{llm.engine.device.type}-{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
